"""Connections to a node: one request at a time, errors mapped to the kvstore tree."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from thriftpy2.protocol.cybin import TCyBinaryProtocol  # type: ignore[attr-defined]
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TSocket, TTransportException
from thriftpy2.transport.framed import TCyFramedTransport

from kvstore import errors
from kvstore.idl import KeyValueService
from kvstore.rpc.framecheck import NOT_TLS_ALERT_REASON
from kvstore.rpc.secret import accepts_v1, authenticate_connection
from kvstore.rpc.tls import peer_certificate_identity, short_identity

log = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port)


# --------------------------------------------------------------------------- client


class _FrameTooLargeError(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _Socket(TSocket):  # type: ignore[misc]
    """thriftpy2's TSocket; a failed send of a frame over ``frame_limit`` says so (a node
    closes the connection, unread, on a frame longer than its limit)."""

    frame_limit: int | None = None

    def write(self, buf: bytes) -> None:
        try:
            self.sock.sendall(buf)
        except OSError:
            if self.frame_limit is not None and len(buf) > self.frame_limit:
                raise _FrameTooLargeError(len(buf)) from None
            raise


class Connection:
    """One connection to one node. Not thread-safe: one per thread, or per pool slot.

    ``call`` raises :class:`errors.ConnectError` when nothing was sent, the node's
    own KVError when it refused, and :class:`errors.ConnectionLostError` when the
    outcome is unknown; after the last two kinds of transport failure the
    connection is closed and the next call reconnects.

    Reuse never writes into a connection the node closed while it was idle (which would
    make the outcome unknown): a connection idle for REOPEN_AFTER_IDLE_S is replaced (nodes
    close idle client connections only after DEFAULT_IDLE_TIMEOUT_S), and a reused one is
    first checked for EOF; one made with ``is_checked_before_use=False`` is checked only
    after CHECK_AFTER_IDLE_S of rest.

    ``tls`` (a :func:`client_tls_context`): connect with mutual TLS; the handshake is part
    of connecting (a failed one is a ConnectError), bounded by ``timeout_ms``; a node
    certificate this side cannot trust is a ForbiddenError (retrying would not help). A node
    that refuses this side's certificate says so only after the handshake (TLS 1.3): the
    first call then fails with ForbiddenError if its alert says so, else (it just closed
    the connection) with ConnectionLostError.

    ``secret`` (the cluster secret, bytes): every new connection first proves it
    (rpc/secret.py), as part of connecting: a node that refuses it, or does not know it
    itself, is a ForbiddenError; a failure on the way a ConnectError. Either way the call
    was not sent.

    ``peer_identity``: under TLS, the identity (tls.certificate_identity) of the certificate
    the node showed on the current connection (None before connecting, or in plaintext).
    ``expected_identity``: under TLS, every new connection must show that one, else it is
    closed before anything is sent and the call fails with ForbiddenError (None: any node).

    ``max_frame_bytes``: the nodes' frame limit. A request longer than it whose send fails
    (the node closed the connection unread) is a TooLargeError, not retried; None: such a
    failure is a lost connection like any other.
    """

    def __init__(
        self,
        address: str,
        timeout_ms: int = 2000,
        connect_timeout_ms: int = 500,
        is_checked_before_use: bool = True,
        tls: ssl.SSLContext | None = None,
        secret: bytes | None = None,
        expected_identity: str | None = None,
        max_frame_bytes: int | None = None,
    ) -> None:
        self.address = address
        self._max_frame_bytes = max_frame_bytes
        self.expected_identity = expected_identity
        self.peer_identity: str | None = None
        self._tls = tls
        self._secret = secret
        self._is_checked_before_use = is_checked_before_use
        self._is_shut = False
        self._host, self._port = parse_address(address)
        self._timeout_ms = timeout_ms
        self._connect_timeout_ms = connect_timeout_ms
        self._socket: TSocket | None = None
        self._poller: select.poll | None = None
        self._client: Any = None  # the protocol object while connected
        self._seqid = 0
        self._used_at = 0.0

    def set_timeouts(self, timeout_ms: int, connect_timeout_ms: int) -> None:
        """Bound each receive and send (and connect) from now on, on the open connection too."""
        self._timeout_ms, self._connect_timeout_ms = timeout_ms, connect_timeout_ms
        sock = self.raw_socket
        if sock is None:
            return
        with contextlib.suppress(OSError):  # (closed meanwhile: the next open applies them)
            if self._tls is None:
                _set_kernel_timeout(sock, timeout_ms)
            else:
                sock.settimeout(timeout_ms / 1000)

    def open(self) -> None:
        self._connect()
        if self._secret is None:
            return
        try:
            self._authenticate(self._secret, 2)
        except errors.ForbiddenError:
            if not accepts_v1(self._secret):
                raise
            # (upgrading from 0.2: a node of that version knows only its proofs)
            self._connect()
            self._authenticate(self._secret, 1)

    def _connect(self) -> None:
        if self._is_shut:
            raise errors.ConnectError(f"connection to {self.address} was shut")
        try:
            raw = socket.create_connection(
                (self._host, self._port), timeout=self._connect_timeout_ms / 1000
            )
        except OSError as exc:
            refused = isinstance(exc, ConnectionRefusedError)
            raise errors.ConnectError(
                f"cannot connect to {self.address}: {exc}", is_refused=refused
            ) from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is None:
            _set_kernel_timeout(raw, self._timeout_ms)
        else:
            raw = self._secure(raw)
        self._socket = _Socket(sock=raw)
        self._socket.frame_limit = self._max_frame_bytes
        self._poller = select.poll()
        self._poller.register(raw, select.POLLIN | select.POLLPRI)
        self._client = TCyBinaryProtocol(TCyFramedTransport(self._socket))
        self._used_at = time.monotonic()  # a call right after an explicit open reuses it

    def _authenticate(self, secret: bytes, version: int) -> None:
        """Prove the cluster secret on the new connection (closed if that fails), with the
        exchange of ``version`` (rpc/secret.py)."""

        def call(method: str, *args: Any) -> Any:
            try:
                return self._read_reply(method, self._write_call(method, args))
            except TApplicationException as exc:
                raise _from_application_error(exc) from None

        try:
            authenticate_connection(call, secret, self.address, version)
        except errors.ForbiddenError:
            self.close()
            raise
        except (errors.KVError, TTransportException, OSError, EOFError) as exc:
            self.close()
            raise errors.ConnectError(f"cannot authenticate to {self.address}: {exc!r}") from None

    def _secure(self, raw: socket.socket) -> socket.socket:
        """The TLS socket over ``raw`` (handshake done), or ConnectError: nothing was sent."""
        assert self._tls is not None
        raw.settimeout(self._timeout_ms / 1000)  # Python timeouts: the kernel's miss TLS reads
        try:
            tls = self._tls.wrap_socket(raw)
        except ssl.SSLCertVerificationError as exc:  # retrying would not change it
            raw.close()
            raise errors.ForbiddenError(
                f"cannot trust {self.address}'s certificate: {exc.verify_message} (is the "
                "CA given to this side the cluster's?)"
            ) from None
        except OSError as exc:
            raw.close()
            if _is_plaintext_answer(exc):
                raise errors.ForbiddenError(
                    f"{self.address} serves plaintext, not TLS: connect without TLS (kv, "
                    "kv-client: no --tls-* options), or start the nodes with TLS"
                ) from None
            hint = ""
            if isinstance(exc, ssl.SSLEOFError) or getattr(exc, "reason", None) in _CUT_SHORT:
                hint = (
                    " (the node ended the handshake: it does not serve TLS, or it refuses new "
                    "connections for now (too many): see its log)"
                )
            raise errors.ConnectError(f"no TLS connection to {self.address}: {exc}{hint}") from None
        self.peer_identity = identity = peer_certificate_identity(tls)
        expected = self.expected_identity
        if expected is not None and identity != expected:
            with contextlib.suppress(OSError):
                tls.close()
            raise errors.ForbiddenError(
                f"{self.address} shows certificate {short_identity(identity)}, not the "
                f"expected {short_identity(expected)}: not the node this call is for"
            )
        return tls

    def _is_dead(self) -> bool:
        """True if an idle connection has something to read: the peer closed it (or broke it).

        Checked before each reuse, so a request is never written into a connection the
        server already closed (which would make its outcome needlessly unknown).
        """
        poller = self._poller
        if poller is None:
            return True
        try:
            return bool(poller.poll(0))
        except OSError:
            return True

    def call(self, method: str, *args: Any) -> Any:
        return self.receive_reply(method, self.send_call(method, *args))

    def send_call(self, method: str, *args: Any) -> int:
        """The first half of ``call``: send the request; returns its seqid, for
        ``receive_reply`` (a caller may wait for the reply with ``fileno`` meanwhile)."""
        now = time.monotonic()
        if self._client is not None and self._is_stale(now - self._used_at):
            self.close()
        if self._client is None:
            self.open()
        self._used_at = now
        return self._guarded(method, self._write_call, method, args)  # type: ignore[no-any-return]

    def receive_reply(self, method: str, seqid: int) -> Any:
        """The second half of ``call``: read and check the reply to request ``seqid``."""
        return self._guarded(method, self._read_reply, method, seqid)

    def fileno(self) -> int:
        """The socket's file descriptor while connected, else -1."""
        raw = self.raw_socket
        return raw.fileno() if raw is not None else -1

    @property
    def raw_socket(self) -> socket.socket | None:
        """The connected socket object (a new one each time the connection opens), or None."""
        sock = self._socket
        return sock.sock if sock is not None else None

    def _guarded(self, method: str, exchange: Callable[..., Any], *args: Any) -> Any:
        """``exchange(*args)``, its failures as KVErrors (closing the connection unless the
        node answered with an error)."""
        try:
            return exchange(*args)
        except TApplicationException as exc:
            raise _from_application_error(exc) from None
        except errors.ProtocolError:
            self.close()
            raise
        except errors.BadRequestError:  # (an argument that does not encode: nothing was sent)
            raise
        except _FrameTooLargeError as exc:  # (the node closed the line on a frame it never read)
            self.close()
            raise errors.TooLargeError(
                f"{method}: the request is {exc.size:,} bytes and {self.address} closed the "
                f"connection while it was sent: over the nodes' frame limit ({exc.size:,} > "
                f"{self._max_frame_bytes:,} bytes unless their --max-value-bytes ask for more)"
            ) from None
        except ssl.SSLError as exc:
            self.close()
            if _is_refused_certificate(exc):  # its handshake failed: it read no request
                raise errors.ForbiddenError(
                    f"{self.address} refused this side's certificate ({exc.reason}): is it "
                    "signed by the cluster's CA?"
                ) from None
            raise errors.ConnectionLostError(f"{method} to {self.address}: {_lost(exc)}") from None
        except (TTransportException, OSError, EOFError) as exc:
            self.close()
            raise errors.ConnectionLostError(f"{method} to {self.address}: {_lost(exc)}") from None
        except Exception as exc:  # undecodable reply
            self.close()
            raise errors.ProtocolError(f"{method} to {self.address}: {exc!r}") from None

    def _is_stale(self, idle_s: float) -> bool:
        if self._is_checked_before_use:
            return idle_s >= REOPEN_AFTER_IDLE_S or self._is_dead()
        return idle_s >= CHECK_AFTER_IDLE_S and self._is_dead()

    def _write_call(self, method: str, args: tuple[Any, ...]) -> int:
        """Send one request (what thriftpy2's TClient does, minus its lookups)."""
        proto = self._client
        self._seqid = seqid = (self._seqid + 1) & 0x7FFFFFFF
        proto.write_message_begin(method, TMessageType.CALL, seqid)
        try:
            _CLIENT_METHODS[method][0](*args).write(proto)
        except Exception as exc:  # a value of the wrong type, a str that is no UTF-8...
            self.close()  # (drops the half-written frame, never sent)
            raise errors.BadRequestError(
                f"{method}: an argument cannot be sent ({_encoding_problem(exc)}); not sent"
            ) from None
        proto.write_message_end()
        proto.trans.flush()
        return seqid

    def _read_reply(self, method: str, seqid: int) -> Any:
        proto = self._client
        if proto is None:  # closed meanwhile (by another thread)
            raise TTransportException(TTransportException.NOT_OPEN, "connection closed")
        _, result_cls, has_result = _CLIENT_METHODS[method]
        _, message_type, reply_seqid = proto.read_message_begin()
        if message_type == TMessageType.EXCEPTION:
            exc = TApplicationException()
            exc.read(proto)
            proto.read_message_end()
            if reply_seqid != seqid:  # sent before reading the request: the node is closing
                self.close()
            raise exc
        result = result_cls()
        result.read(proto)
        proto.read_message_end()
        if reply_seqid != seqid:
            raise errors.ProtocolError(
                f"{method}: reply {reply_seqid} does not match request {seqid}"
            )
        value = getattr(result, "success", None)
        if has_result and value is None:
            raise errors.ProtocolError(f"{method}: reply without a result")
        return value

    def shut(self) -> None:
        """Close for good: later calls fail with ConnectError instead of reconnecting."""
        self._is_shut = True
        self.close()

    def close(self) -> None:
        """Close the socket. May be called from another thread to abort a call in progress."""
        sock, self._socket, self._client, self._poller = self._socket, None, None, None
        raw = sock.sock if sock is not None else None
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)
            raw.close()


# A node closes a client connection after DEFAULT_IDLE_TIMEOUT_S without a request.
REOPEN_AFTER_IDLE_S = 120.0
CHECK_AFTER_IDLE_S = 1.0


def _encoding_problem(exc: Exception) -> str:
    """What thriftpy2 found wrong with an argument, briefly."""
    field = getattr(exc, "field", None)
    if field is not None:
        value = getattr(exc, "value", None)
        return f"{field}={value!r:.60} is not what the IDL says"
    return f"{exc!r:.120}"


def _set_kernel_timeout(sock: socket.socket, timeout_ms: int) -> None:
    """Bound every send and receive in the kernel (SO_SNDTIMEO/SO_RCVTIMEO) on a blocking socket.

    A Python-level timeout (settimeout) makes every send and receive poll() first: two more
    system calls per request. A kernel timeout fails the call with EAGAIN instead, which
    surfaces as an OSError like any other broken connection.
    """
    sock.settimeout(None)
    seconds, remainder_ms = divmod(timeout_ms, 1000)
    timeval = struct.pack("ll", seconds, remainder_ms * 1000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


_CLIENT_METHODS: dict[str, tuple[Any, Any, bool]] = {
    name: (
        getattr(KeyValueService, f"{name}_args"),
        getattr(KeyValueService, f"{name}_result"),
        0 in getattr(KeyValueService, f"{name}_result").thrift_spec,
    )
    for name in KeyValueService.thrift_services
}


def _from_application_error(exc: TApplicationException) -> errors.KVError:
    message = exc.message or ""
    if exc.type == TApplicationException.UNKNOWN_METHOD:
        return errors.ProtocolError(f"unknown method: {message}")
    if exc.type == TApplicationException.INTERNAL_ERROR:
        # The handler crashed before or after applying: the outcome is unknown.
        return errors.ProtocolError(f"node internal error: {message}")
    return errors.from_code(exc.type, message)


def _lost(exc: BaseException) -> str:
    """A broken connection in words, for the log lines and errors that carry it (a repr of
    thriftpy2's or ssl's exception says little to an operator)."""
    if isinstance(exc, TTransportException):
        if exc.type == TTransportException.END_OF_FILE:
            return "the other side closed the connection"
        if exc.type == TTransportException.TIMED_OUT:
            return "no reply in time"
        return f"the connection failed ({exc.message})"
    if isinstance(exc, (EOFError, BrokenPipeError, ssl.SSLEOFError)):
        return "the other side closed the connection"
    if isinstance(exc, (TimeoutError, BlockingIOError)):  # (a kernel timeout: EAGAIN)
        return "no reply in time"
    if isinstance(exc, ConnectionResetError):
        return "the other side reset the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return repr(exc)


# How OpenSSL reports a handshake the peer cut short or answered with something else.
_CUT_SHORT = frozenset({"UNEXPECTED_EOF_WHILE_READING", "WRONG_VERSION_NUMBER"})


def _is_plaintext_answer(exc: OSError) -> bool:
    """Whether a failed handshake was a plaintext node's answer (framecheck.NOT_TLS_ALERT;
    Python may not know OpenSSL's name for that alert, and then gives only its text)."""
    if not isinstance(exc, ssl.SSLError):
        return False
    return NOT_TLS_ALERT_REASON in f"{exc.reason} {exc}".upper().replace(" ", "_")


def _is_refused_certificate(exc: ssl.SSLError) -> bool:
    """Whether the node's TLS alert says it refused this side's certificate (TLS 1.3 tells
    a client so only as it reads the first reply)."""
    reason = exc.reason or ""
    return "ALERT" in reason and any(
        word in reason
        for word in (
            "UNKNOWN_CA",
            "BAD_CERTIFICATE",
            "CERTIFICATE_REQUIRED",
            "DECRYPT_ERROR",
            "CERTIFICATE_UNKNOWN",
            "ACCESS_DENIED",
            # a certificate that expired (or was revoked) after this side started
            "CERTIFICATE_EXPIRED",
            "CERTIFICATE_REVOKED",
            "UNSUPPORTED_CERTIFICATE",
        )
    )


def takes_connections(address: str, timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to ``address`` (host:port) opens within ``timeout_s``: some
    process serves there (whatever it speaks: TLS, another node)."""
    try:
        host, port = parse_address(address)
        socket.create_connection((host.strip("[]"), port), timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


def probe(address: str, timeout_ms: int, tls: ssl.SSLContext | None = None) -> Any | None:
    """Ask a node for its status. None if nothing listens there (connection refused).

    Raises ConnectionLostError / ConnectError on a timeout: the node may be alive but stuck.
    """
    conn = Connection(address, timeout_ms=timeout_ms, connect_timeout_ms=timeout_ms, tls=tls)
    try:
        return conn.call("status")
    except errors.ConnectError as exc:
        if exc.is_refused:
            return None
        raise
    finally:
        conn.close()
