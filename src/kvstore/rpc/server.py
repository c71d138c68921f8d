"""The threaded Thrift server of a node: bounded frame reading, dispatch, connections."""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from thriftpy2.thrift import TApplicationException, TMessageType, TType
from thriftpy2.transport import TTransportException

from kvstore import errors
from kvstore.idl import KeyValueService
from kvstore.rpc import front
from kvstore.rpc.budget import (
    DEFAULT_REPLY_BUDGET_BYTES,
    LARGE_REPLY_BYTES,
    ReplyBudget,
    reply_header,
)
from kvstore.rpc.framecheck import (
    _I32,
    TLS_HANDSHAKE_START,
    MalformedFrameError,
    MalformedRequestError,
    _exception_frame,
    _ThrottledLog,
    bad_request_log,
    check_request,
    frame_size_error,
    shown_name,
)
from kvstore.rpc.front import Frames
from kvstore.rpc.secret import CHALLENGE_METHOD, CONNECTION_METHODS, PeerRole
from kvstore.rpc.tls import (
    NODE_UNIT,
    _handshake,
    close_refused,
    is_node_certificate,
    peer_certificate_identity,
    subject_common_name,
)

log = logging.getLogger(__name__)


# The server connection a thread serves (one thread per connection, never reused): what
# the handler may ask about its peer. Set once when the connection opens, only under TLS.
_connection = threading.local()


def peer_identity() -> str | None:
    """The identity (tls.certificate_identity) of the peer of the server connection this
    thread serves: for a handler, during a call. None without TLS (or outside a server
    connection's thread)."""
    return getattr(_connection, "identity", None)


class _IdleTimeoutError(Exception):
    """No request arrived on a connection for its idle timeout."""


# --------------------------------------------------------------------------- server


class _FrameReader(Frames):
    """Socket facade for TCyFramedTransport that receives whole frames, within bounds.

    ``pending``: bytes already received (a connection the event front hands over).
    ``next_frame`` receives one complete frame (its length header included) before anything
    decodes it: a header outside (0, max_frame_bytes] is refused before the body is read,
    memory grows with the bytes received (never with what a header claims), the wait for a
    frame's first byte is bounded by the idle timeout (none after ``never_idle_out``), and
    the rest of the frame must arrive within ``frame_deadline_s`` of it. ``read`` then hands
    out only that frame, so a message can never run on into the next frame. Timeouts are
    kernel ones (SO_RCVTIMEO); the receive timeout changes only while a frame arrives in
    pieces. A TLS socket (the kernel's timeouts do not bound a TLS read) has a Python one
    instead (``settimeout``): the frame deadline bounds each of its receives and sends, and
    the idle wait is a poll for the first byte of a request.

    ``write`` sends a reply frame; with a ``budget`` (rpc/budget.py), a large one is counted
    in it while it is sent, and replaced by UNAVAILABLE if the node is over its budget
    (unless it answers one of ``exempt``: counted, sent all the same). ``has_grown`` is set
    after a large frame, either way: the codec's buffers grew to hold it (see front.codec).
    """

    __slots__ = (
        "_budget",
        "_exempt",
        "_frame_deadline_s",
        "_idle_timeout_s",
        "_is_tls",
        "_max_frame_bytes",
        "_peer",
        "_pending",
        "_tls_poller",
        "has_grown",
        "sock",
    )

    def __init__(
        self,
        sock: socket.socket,
        max_frame_bytes: int,
        idle_timeout_s: float,
        deadline_s: float,
        pending: bytes = b"",
        *,
        budget: ReplyBudget | None = None,
        exempt: frozenset[str] = frozenset(),
        peer: str = "",
    ) -> None:
        super().__init__()
        self.sock = sock
        self._budget = budget
        self._exempt = exempt
        self._peer = peer
        self.has_grown = False
        self._max_frame_bytes = max_frame_bytes
        self._idle_timeout_s = idle_timeout_s
        self._frame_deadline_s = deadline_s
        self._pending = pending
        self._is_tls = isinstance(sock, ssl.SSLSocket)
        self._tls_poller: select.poll | None = None
        if self._is_tls:
            sock.settimeout(deadline_s)
            self._tls_poller = select.poll()
            self._tls_poller.register(sock, select.POLLIN)

    def _wait_at_most(self, seconds: float) -> None:
        """Bound each receive to ``seconds`` (> 0) while a frame arrives in pieces."""
        if self._is_tls:
            self.sock.settimeout(max(0.001, seconds))
        else:
            _set_receive_timeout(self.sock, seconds)

    def _wait_as_usual(self) -> None:
        if self._is_tls:
            self.sock.settimeout(self._frame_deadline_s)
        else:
            _set_receive_timeout(self.sock, self._idle_timeout_s)

    def never_idle_out(self) -> None:
        self._idle_timeout_s = 0.0
        self._wait_as_usual()

    def next_frame(self) -> bytes:
        pending = self._pending
        deadline = 0.0
        if not pending:
            pending = self._receive_first()
        if len(pending) < 4:
            deadline = time.monotonic() + self._frame_deadline_s
            pending = self._receive_until(pending, 4, deadline)
        frame_size = _I32.unpack_from(pending)[0]
        if not 0 < frame_size <= self._max_frame_bytes:
            raise frame_size_error(pending[:2], frame_size)
        total = 4 + frame_size
        if total > LARGE_REPLY_BYTES:
            self.has_grown = True
        if len(pending) < total:
            deadline = deadline or time.monotonic() + self._frame_deadline_s
            pending = self._receive_until(pending, total, deadline)
        if len(pending) == total:
            self.frame, self._pending = pending, b""
        else:
            self.frame, self._pending = pending[:total], pending[total:]
        return self.frame

    def _receive_first(self) -> bytes:
        sock = self.sock
        if self._tls_poller is not None and not sock.pending():  # type: ignore[attr-defined]
            idle_s = self._idle_timeout_s
            if not self._tls_poller.poll(idle_s * 1000 if idle_s > 0 else None):
                raise _IdleTimeoutError(f"no request for {idle_s:g} s")
        try:
            data = sock.recv(65536)
        except (BlockingIOError, TimeoutError):
            raise _IdleTimeoutError(f"no request for {self._idle_timeout_s:g} s") from None
        if not data:
            raise TTransportException(TTransportException.END_OF_FILE, "peer closed")
        return data

    def _receive_until(self, pending: bytes, size: int, deadline: float) -> bytes:
        chunks, received, sock = [pending], len(pending), self.sock
        try:
            while received < size:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise MalformedFrameError(self._slow(received, size))
                self._wait_at_most(left_s)
                try:
                    chunk = sock.recv(min(size - received, 1 << 18))
                except (BlockingIOError, TimeoutError):
                    raise MalformedFrameError(self._slow(received, size)) from None
                if not chunk:
                    raise TTransportException(TTransportException.END_OF_FILE, "peer closed")
                chunks.append(chunk)
                received += len(chunk)
        finally:
            self._wait_as_usual()
        return b"".join(chunks)

    def _slow(self, received: int, size: int) -> str:
        return f"{received} of {size} frame bytes in {self._frame_deadline_s:g} s: too slow"

    def write(self, data: bytes) -> None:
        """Send one whole reply frame (TCyFramedTransport writes each in one piece)."""
        size = len(data)
        if size <= LARGE_REPLY_BYTES:
            self.sock.sendall(data)
            return
        self.has_grown = True
        budget = self._budget
        if budget is None:
            self.sock.sendall(data)
            return
        if not budget.take(size):
            method, seqid = reply_header(data)
            if method not in self._exempt:
                self.sock.sendall(budget.refusal(method, seqid, size, self._peer))
                return
            budget.add(size)
        try:
            self.sock.sendall(data)
        finally:
            budget.release(size)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO: 0 waits forever; anything else at least a millisecond."""
    _set_timeval(sock, socket.SO_RCVTIMEO, seconds)


def _set_timeval(sock: socket.socket, option: int, seconds: float) -> None:
    micros = 0 if seconds <= 0 else max(1000, int(seconds * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", *divmod(micros, 1_000_000)))


class _Dispatcher:
    """Calls the handler; maps KVError to a typed TApplicationException, bugs to INTERNAL_ERROR.

    Does what thriftpy2's TProcessor does, with the per-method lookups done once.
    ``process`` returns the method's name if it answered normally, else "". A peer that is
    not a node (``peer.is_node`` False) calling one of ``node_only`` gets FORBIDDEN; the
    handler never sees the call. The connection methods (auth_challenge, authenticate with
    ``secret``) act on the peer's role and never reach the handler either.
    """

    def __init__(
        self,
        service: Any,
        handler: object,
        node_only: Collection[str] = (),
        secret: bytes | None = None,
    ) -> None:
        unknown = set(node_only) - set(service.thrift_services)
        if unknown:
            raise ValueError(f"node-only methods not in the service: {sorted(unknown)}")
        self._node_only = frozenset(node_only)
        self._secret = secret
        self.own_address = ""  # the node's advertised host:port, which secret proofs name
        self._refused_count = 0  # authentications refused since the last line logged
        self._refusal_logged_at = 0.0
        self._connection_methods = {
            name: (getattr(service, f"{name}_args"), getattr(service, f"{name}_result"))
            for name in CONNECTION_METHODS
        }
        self._methods: dict[str, tuple[Any, Any, Any, tuple[str, ...]]] = {}
        for name in service.thrift_services:
            if name in CONNECTION_METHODS:
                continue
            args_cls = getattr(service, f"{name}_args")
            names = tuple(spec[1] for spec in args_cls.thrift_spec.values())
            result_cls = getattr(service, f"{name}_result")
            self._methods[name] = (args_cls, result_cls, getattr(handler, name), names)

    def process(self, iprot: Any, oprot: Any, peer: PeerRole) -> str:
        api, _, seqid = iprot.read_message_begin()
        return self.answer(api, seqid, iprot, oprot, peer)

    def answer(self, api: str, seqid: int, iprot: Any, oprot: Any, peer: PeerRole) -> str:
        """Serve the call whose message header was read (see ``process``).

        The event front answers a get or lookup in the usual layout without this method
        (front._answer_read, for the methods ``is_open_to_all``): a check added here, before
        the handler, belongs there too."""
        entry = self._methods.get(api)
        if not peer.is_node and api in self._node_only:
            iprot.skip(TType.STRUCT)
            iprot.read_message_end()
            refusal = TApplicationException(
                errors.ForbiddenError.code, peer.refusal(api, NODE_UNIT)
            )
            self._send(oprot, api, TMessageType.EXCEPTION, refusal, seqid)
            return ""
        if entry is None and api in self._connection_methods:
            return self._connection_call(api, iprot, oprot, seqid, peer)
        if entry is None:
            iprot.skip(TType.STRUCT)
            iprot.read_message_end()
            unknown = TApplicationException(
                TApplicationException.UNKNOWN_METHOD, f"unknown method {shown_name(api)}"
            )
            # (named as errors show it: a megabyte of name is not worth a megabyte of answer)
            self._send(oprot, shown_name(api), TMessageType.EXCEPTION, unknown, seqid)
            return ""
        args = self.read_args(api, iprot)
        try:
            value = entry[2](*args)
        except Exception as exc:
            self.reply_error(oprot, api, seqid, exc)
            return ""
        self.reply(oprot, api, seqid, value)
        return str(api)

    def call(self, api: str, *args: Any) -> Any:
        """The handler's ``api`` on arguments decoded already (the front's hand-parsed
        reads): what ``answer`` calls, its failures raised for ``reply_error``."""
        return self._methods[api][2](*args)

    def is_open_to_all(self, api: str) -> bool:
        """Whether any peer may call the handler's ``api`` (not a node-only one)."""
        return api in self._methods and api not in self._node_only

    def read_args(self, api: str, iprot: Any) -> list[Any]:
        """The arguments of a call to one of the service's methods, in order."""
        args_cls, _, _, names = self._methods[api]
        args = args_cls()
        args.read(iprot)
        iprot.read_message_end()
        return [getattr(args, n) for n in names]

    def reply(self, oprot: Any, api: str, seqid: int, value: Any) -> None:
        result = self._methods[api][1]()
        result.success = value
        self._send(oprot, api, TMessageType.REPLY, result, seqid)

    def reply_error(self, oprot: Any, api: str, seqid: int, exc: Exception) -> None:
        """A KVError as its typed TApplicationException; anything else is a bug: logged,
        and answered INTERNAL_ERROR."""
        if isinstance(exc, errors.KVError):
            failure = TApplicationException(exc.code, str(exc))
        else:
            log.error("handler %s failed", api, exc_info=exc)
            failure = TApplicationException(TApplicationException.INTERNAL_ERROR, f"{api}: {exc}")
        self._send(oprot, api, TMessageType.EXCEPTION, failure, seqid)

    def _connection_call(self, api: str, iprot: Any, oprot: Any, seqid: int, peer: PeerRole) -> str:
        """auth_challenge / authenticate: they change what this connection may call."""
        args_cls, result_cls = self._connection_methods[api]
        args = args_cls()
        args.read(iprot)
        iprot.read_message_end()
        result = result_cls()
        try:
            if api == CHALLENGE_METHOD:
                result.success = peer.challenge()
            else:
                result.success = peer.authenticate(
                    self._secret, args.client_nonce, args.proof, self.own_address
                )
        except errors.KVError as exc:
            self._log_refusal(api, exc, peer.peer)
            failure = TApplicationException(exc.code, str(exc))
            self._send(oprot, api, TMessageType.EXCEPTION, failure, seqid)
            return ""
        self._send(oprot, api, TMessageType.REPLY, result, seqid)
        return api

    def _log_refusal(self, api: str, exc: errors.KVError, peer: str) -> None:
        """At most one line a second: a misconfigured node retries many times a second."""
        self._refused_count += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= 1.0:
            log.warning(
                "refused %s: %s (%d refusals since the last such line; the latest from %s)",
                api,
                exc,
                self._refused_count,
                peer,
            )
            self._refusal_logged_at, self._refused_count = now, 0

    @staticmethod
    def _send(oprot: Any, api: str, message_type: int, payload: Any, seqid: int) -> None:
        oprot.write_message_begin(api, message_type, seqid)
        payload.write(oprot)
        oprot.write_message_end()
        oprot.trans.flush()


ConnectionHook = Callable[[bool], None]  # called with is_orderly: the peer closed with EOF

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_FRAME_DEADLINE_S = 10.0
# TLS connections whose handshake is under way at once (each waits on a thread of its own,
# for at most the frame deadline); one more cuts the oldest of them. A flood of silent
# connections otherwise parked a thread each, up to the connection limit: a thousand threads
# woke together at their deadline and held the interpreter long enough for the primary to
# lose its lease (an attack campaign made a TLS cluster fail over so, 4 runs out of 4).
# Cutting the oldest, not refusing the newest: a real handshake takes milliseconds, so a
# flood of silent connections cuts its own, not the nodes' and clients' new connections.
MAX_HANDSHAKES = 64
# close() waits at most this long for the accept and connection threads to end (a handler
# still running, e.g. a put waiting for its backup, ends when its call returns).
CLOSE_JOIN_S = 2.0
# A connection on which this method succeeded is the primary's replication line: it is never
# closed for being idle (a pooled one may rest while another carries the heartbeats, and the
# primary reuses it unchecked: closing it would make the primary drop its backup).
REPLICATION_METHOD = "replicate_batch"


class RpcServer:
    """Threaded framed/binary Thrift server for the KeyValueService.

    Every request frame is received whole and checked by :func:`check_request` before it
    is decoded. At most ``max_connections`` connections are served at once (so at most as
    many threads); a connection beyond that gets an UNAVAILABLE "too many connections"
    exception and is closed, and the accept loop carries on. A client connection idle for
    ``idle_timeout_s`` is closed (a pooled client notices the close before reusing it);
    the primary's replication connections are exempt. A frame must arrive whole within
    ``frame_deadline_s`` of its first byte, and every send must progress within as long.

    ``on_disconnect(is_orderly)`` (optional) is called in the connection's thread when it
    ends, so a handler can keep per-connection state in a threading.local; ``is_orderly``
    is True when the peer closed it in order (EOF), not by a reset or an error.

    Replies its clients have not read are bounded by ``reply_budget_bytes`` across the
    connections (rpc/budget.py): while the node holds more, a large reply (over
    LARGE_REPLY_BYTES, not to a node-only method) is answered UNAVAILABLE instead.

    ``tls`` (a :func:`server_tls_context`): every connection must complete a mutual TLS
    handshake, in its own thread, within ``frame_deadline_s``; a peer whose certificate is
    not a node's may not call ``node_only_methods``; the handler learns the peer's identity
    (its certificate's fingerprint) from :func:`peer_identity`. ``cluster_secret``: a
    connection may call them only once it authenticated with the secret (rpc/secret.py;
    under TLS, and with a node's certificate) for ``advertised_address``, the host:port
    other nodes dial (default: the one it binds). With neither, every peer may call
    anything.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: object,
        max_frame_bytes: int,
        on_disconnect: ConnectionHook | None = None,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        frame_deadline_s: float = DEFAULT_FRAME_DEADLINE_S,
        tls: ssl.SSLContext | None = None,
        node_only_methods: Collection[str] = (),
        cluster_secret: bytes | None = None,
        advertised_address: str | None = None,
        event_front: bool = True,
        inline_methods: Collection[str] = front.INLINE_METHODS,
        reply_budget_bytes: int = DEFAULT_REPLY_BUDGET_BYTES,
    ) -> None:
        self.host = host
        self.port = port
        self._tls = tls
        self._needs_secret = cluster_secret is not None
        self._dispatcher = _Dispatcher(KeyValueService, handler, node_only_methods, cluster_secret)
        self._advertised_address = advertised_address
        self._node_only = frozenset(node_only_methods)  # (their replies are never refused)
        self._reply_budget = ReplyBudget(reply_budget_bytes)
        self._max_frame_bytes = max_frame_bytes
        self._on_disconnect = on_disconnect
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()  # accept + connection threads, to join
        self._lock = threading.Lock()
        self._is_closed = False
        self._refusal_log = _ThrottledLog("connections refused")
        # TLS connections whose handshake is not over, oldest first: the admitted socket,
        # and the one to shut to cut it (the TLS socket once wrapped).
        self._handshaking: dict[socket.socket, socket.socket] = {}
        self._cut_log = _ThrottledLog("handshakes cut")
        self.set_connection_bounds(max_connections, idle_timeout_s, frame_deadline_s)
        self._front: front.EventFront | None = None
        if event_front and front.is_available():
            inline = frozenset(inline_methods) & set(KeyValueService.thrift_services)
            self._front = front.EventFront(self, handler, inline)

    def set_connection_bounds(
        self, max_connections: int, idle_timeout_s: float, frame_deadline_s: float
    ) -> None:
        """Bound connections, idle time and frame time (for connections accepted from now)."""
        if max_connections < 1 or idle_timeout_s <= 0 or frame_deadline_s <= 0:
            raise ValueError("connection bounds must be positive")
        self._max_connections = max_connections
        self._idle_timeout_s = idle_timeout_s
        self._frame_deadline_s = frame_deadline_s
        self._refusal = _exception_frame(
            "",
            0,
            errors.UnavailableError.code,
            f"too many connections: this node serves at most {max_connections}",
        )
        self._plaintext_refusal = _exception_frame(
            "",
            0,
            errors.ForbiddenError.code,
            "this node accepts TLS connections only: connect with TLS (kv, kv-client: "
            "--tls-cert, --tls-key and --tls-ca; kvstore.Client: tls=TlsConfig(...))",
        )

    @property
    def reply_budget(self) -> ReplyBudget:
        """The replies the server holds that its clients have not read, and their bound."""
        return self._reply_budget

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def bind(self) -> None:
        """Bind and listen; raises OSError (EADDRINUSE) if another process holds the port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.port))
            listener.listen(256)
        except OSError:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._dispatcher.own_address = self._advertised_address or f"{self.host}:{self.port}"
        self._listener = listener

    def start(self) -> None:
        if self._listener is None:
            self.bind()
        threads = [threading.Thread(target=self._accept_loop, name="rpc-accept", daemon=True)]
        if self._front is not None:
            threads.append(threading.Thread(target=self._front.run, name="rpc-front", daemon=True))
            self._front.has_thread = True
        with self._lock:
            self._threads.update(threads)
        for thread in threads:
            thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._is_closed:
            try:
                sock, peer = listener.accept()
            except OSError as exc:
                if self._is_closed:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed (%s); still serving existing connections", exc)
                    threading.Event().wait(0.05)
                continue
            try:
                self._admit(sock, f"{peer[0]}:{peer[1]}")
            except Exception:  # one connection's failure must never end the accept loop
                log.exception("could not serve a connection from %s:%s", *peer[:2])
                with self._lock:
                    self._connections.discard(sock)
                with contextlib.suppress(OSError):
                    sock.close()

    def _admit(self, sock: socket.socket, peer: str) -> None:
        is_tls = self._tls is not None
        oldest = None
        with self._lock:
            if self._is_closed:
                sock.close()
                return
            is_admitted = len(self._connections) < self._max_connections
            if is_admitted:
                self._connections.add(sock)
                if is_tls:
                    if len(self._handshaking) >= MAX_HANDSHAKES:
                        oldest = self._handshaking.pop(next(iter(self._handshaking)))
                    self._handshaking[sock] = sock
        if not is_admitted:
            self._refuse(sock, peer)
            return
        if oldest is not None:
            self._cut_handshake(oldest, peer)
        try:
            # Under TLS the reader bounds receives itself (settimeout); a kernel receive
            # timeout would still fire on the blocking socket of a replication line that
            # never idles out.
            idle_timeout_s = 0.0 if is_tls else self._idle_timeout_s
            _configure_connection(sock, idle_timeout_s, self._frame_deadline_s)
            if self._front is not None and not is_tls:
                self._front.add(sock, peer)
            else:  # (under TLS the thread hands it to the front after the handshake)
                self._serve_in_thread(sock, peer)
        except BaseException:
            self._end_handshake(sock)
            raise

    def _end_handshake(self, sock: socket.socket) -> None:
        """``sock`` (as admitted) is past its handshake, or gone."""
        with self._lock:
            self._handshaking.pop(sock, None)

    def _cut_handshake(self, sock: socket.socket, peer: str) -> None:
        """Cut a handshake under way (its thread then fails it and ends)."""
        with contextlib.suppress(OSError):  # (closed meanwhile)
            # The socket's own shutdown, also for a TLS one: SSLSocket.shutdown drops its
            # SSL object first, and the handshake thread then died of an AttributeError.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        self._cut_log.warning(
            log,
            "cut the oldest of %d TLS handshakes under way for a connection from %s: a flood "
            "of connections that send nothing?",
            MAX_HANDSHAKES,
            peer,
        )

    def _serve_in_thread(
        self, sock: socket.socket, peer: str, handover: front.Handover | None = None
    ) -> None:
        """Serve an admitted connection on a thread of its own (``handover``: where the
        event front left it)."""
        thread = threading.Thread(target=self._serve, args=(sock, peer, handover), name="rpc-conn")
        thread.daemon = True
        with self._lock:
            self._threads.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._threads.discard(thread)
            raise

    def _refuse(self, sock: socket.socket, peer: str) -> None:
        """Answer UNAVAILABLE without waiting on the peer, then close. Under TLS just close:
        a TLS client would read a plaintext answer as a broken handshake."""
        try:
            sock.setblocking(False)
            if self._tls is None:
                sock.send(self._refusal)
            # Closing over unread bytes would reset the line, which may discard the refusal.
            with contextlib.suppress(OSError):
                sock.recv(65536)
        except OSError:
            pass
        finally:
            sock.close()
        self._refusal_log.warning(
            log, "refused a connection from %s: %d open, the limit", peer, self._max_connections
        )

    def _secure(self, sock: socket.socket, peer: str) -> tuple[socket.socket, bool, str | None]:
        """The TLS socket over ``sock`` once the handshake is done, whether the peer is a
        node, and its identity. Raises OSError (ssl.SSLError, TimeoutError) if there is no
        handshake."""
        assert self._tls is not None
        started = time.monotonic()  # (one frame deadline for the peek and the handshake)
        if not _starts_like_tls(sock, self._frame_deadline_s):
            with contextlib.suppress(OSError):  # a plaintext client: tell it, in plaintext
                sock.sendall(self._plaintext_refusal)
            raise ConnectionError("a plaintext request; this node accepts TLS connections only")
        tls = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._lock:  # wrapping detached ``sock``: close() must cut the TLS socket
            is_cut = sock not in self._handshaking  # (cut as it was wrapped: shut too late)
            if not is_cut:  # (and so must cutting the handshake)
                self._handshaking[sock] = tls
            self._connections.discard(sock)
            self._connections.add(tls)
        try:
            if is_cut:
                raise ConnectionError("cut for a newer connection (too many handshakes)")
            _handshake(tls, self._frame_deadline_s, started)
            self._end_handshake(sock)  # (done: not to be cut from now on)
        except BaseException as exc:
            with self._lock:
                self._connections.discard(tls)
            if isinstance(exc, ssl.SSLError):  # refused: let the peer read why
                close_refused(tls)
            else:
                tls.close()
            raise
        cert = tls.getpeercert()
        is_node = is_node_certificate(cert)
        identity = peer_certificate_identity(tls)
        if log.isEnabledFor(logging.DEBUG):
            kind = "node" if is_node else "client"
            log.debug("TLS connection from %s (%s %r)", peer, kind, subject_common_name(cert))
        return tls, is_node, identity

    def _forget_connection(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.discard(sock)

    def _serve(
        self, sock: socket.socket, peer: str, handover: front.Handover | None = None
    ) -> None:
        is_node = True  # the certificate's role; plaintext: every peer's
        identity = None
        pending = owed = b""
        unsent_owed = 0  # bytes of ``owed`` counted in the reply budget (by the front)
        if handover is not None:
            pending, owed, secured = handover
            unsent_owed = len(owed)
            if secured is not None:
                is_node, identity = secured
        elif self._tls is not None:
            admitted = sock
            try:
                sock, is_node, identity = self._secure(sock, peer)
            except Exception as exc:  # (OSError, ValueError; anything else the ssl module
                # raises for a handshake cut under it must end this connection, not the thread)
                bad_request_log.warning(
                    log, "refused a connection from %s: no TLS handshake: %s", peer, exc
                )
                with self._lock:
                    self._connections.discard(sock)
                sock.close()
                self._forget_this_thread()
                return
            finally:
                self._end_handshake(admitted)
            if self._front is not None:  # the front serves it from here on
                self._front.add(sock, peer, (is_node, identity))
                self._forget_this_thread()
                return
        role = PeerRole(is_node, self._needs_secret, peer)  # plaintext, no secret: a node
        if identity is not None:
            _connection.identity = identity  # for the handler (peer_identity): once, not per call
        reader = _FrameReader(
            sock,
            self._max_frame_bytes,
            self._idle_timeout_s,
            self._frame_deadline_s,
            pending,
            budget=self._reply_budget,
            exempt=self._node_only,
            peer=peer,
        )
        proto = front.codec(reader)
        process = self._dispatcher.process
        is_replication_line = False
        is_orderly = False
        try:
            if owed:
                sock.sendall(owed)  # (each send within the frame deadline: SO_SNDTIMEO)
                self._reply_budget.release(unsent_owed)
                unsent_owed = 0
            while True:
                check_request(reader.next_frame())
                if process(proto, proto, role) == REPLICATION_METHOD and not is_replication_line:
                    is_replication_line = True
                    reader.never_idle_out()
                if reader.has_grown:
                    proto = front.codec(reader)
                    reader.has_grown = False
        except TTransportException as exc:
            is_orderly = exc.type == TTransportException.END_OF_FILE
        except ConnectionError:
            pass
        except _IdleTimeoutError as exc:
            log.debug("closing the connection from %s: %s", peer, exc)
        except MalformedRequestError as exc:
            bad_request_log.warning(
                log, "refused a malformed %r request from %s: %s", exc.method, peer, exc
            )
            reply = _exception_frame(
                exc.method, exc.seqid, errors.BadRequestError.code, f"malformed request: {exc}"
            )
            with contextlib.suppress(OSError):
                sock.sendall(reply)
        except MalformedFrameError as exc:
            bad_request_log.warning(log, "closing the connection from %s: %s", peer, exc)
            if exc.answer:
                with contextlib.suppress(OSError):
                    sock.sendall(exc.answer)
        except OSError:
            pass
        except Exception as exc:  # a request the decoder refused despite the check
            bad_request_log.warning(
                log, "closing the connection from %s after a bad request: %r", peer, exc
            )
        finally:
            if unsent_owed:
                self._reply_budget.release(unsent_owed)
            with self._lock:
                self._connections.discard(sock)
            reader.close()
            try:
                if self._on_disconnect is not None:
                    self._on_disconnect(is_orderly)
            finally:
                self._forget_this_thread()

    def _forget_this_thread(self) -> None:
        with self._lock:
            self._threads.discard(threading.current_thread())

    def close(self, join_timeout_s: float = CLOSE_JOIN_S) -> int:
        """Stop accepting, cut every open connection, then wait (at most ``join_timeout_s``
        in all) for the accept and connection threads to end. Returns how many still run."""
        with self._lock:
            self._is_closed = True
            connections = list(self._connections)
        if self._front is not None:
            self._front.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return self._join_threads(time.monotonic() + join_timeout_s, join_timeout_s)

    def _join_threads(self, deadline: float, join_timeout_s: float) -> int:
        """Join the server's threads until ``deadline``; a connection admitted just before
        close may start its thread meanwhile, so look again until none is left."""
        while True:
            with self._lock:
                threads = [t for t in self._threads if t is not threading.current_thread()]
            left = [t for t in threads if t.ident is None or t.is_alive()]
            if not left or time.monotonic() >= deadline:
                break
            for thread in left:
                if thread.ident is None:
                    threading.Event().wait(0.001)  # about to start
                else:
                    thread.join(max(0.0, deadline - time.monotonic()))
        running = len(left)
        if running:
            log.warning(
                "%d server thread(s) still running %g s after close", running, join_timeout_s
            )
        return running


def _configure_connection(sock: socket.socket, idle_timeout_s: float, deadline_s: float) -> None:
    """No Nagle delay, keepalive, and kernel timeouts: idle wait on receives, progress on sends."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    _set_receive_timeout(sock, idle_timeout_s)
    _set_timeval(sock, socket.SO_SNDTIMEO, deadline_s)


def _starts_like_tls(sock: socket.socket, deadline_s: float) -> bool:
    """Whether the first bytes a new connection sends (waited for up to ``deadline_s``)
    could begin a TLS handshake; True too if it sends nothing (the handshake then fails)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(deadline_s * 1000):
        return True
    try:
        first = sock.recv(len(TLS_HANDSHAKE_START), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return True
    return TLS_HANDSHAKE_START.startswith(first)
