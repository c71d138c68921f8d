"""Thrift transport for kvstore: the only module that touches thriftpy2's transport layer.

Server: one thread per connection (like the seed's threaded server), framed
transport + binary protocol with thriftpy2's compiled codec. Unlike thriftpy2's
TServerSocket it never sets SO_REUSEPORT (two nodes must not share a port), it
refuses frames larger than ``max_frame_bytes`` before buffering them, and it
keeps idle connections open (a pooled connection must not die under a client).

Errors are mapped here, in one place:
- a handler's :class:`~kvstore.errors.KVError` goes out as a TApplicationException
  whose ``type`` is the error code (so a seed-only client sees an error);
- on the client side that exception comes back as the same KVError class;
- a failure to connect is a definite :class:`ConnectError` (nothing was sent);
  any failure after sending is an indefinite :class:`ConnectionLostError`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from thriftpy2.protocol.cybin import TCyBinaryProtocol  # type: ignore[attr-defined]
from thriftpy2.thrift import TApplicationException, TMessageType, TType
from thriftpy2.transport import TSocket, TTransportException
from thriftpy2.transport.framed import TCyFramedTransport

from kvstore import errors
from kvstore.idl import KeyValueService

log = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port)


# --------------------------------------------------------------------------- server


class MalformedFrameError(Exception):
    """A frame header out of bounds, or a message that does not fit in its frame."""


class _GuardedSocket:
    """Socket facade for TCyFramedTransport that holds every message to one bounded frame.

    The compiled framed transport would malloc whatever length a header claims, and it
    lets one message run on over any number of frames; a length field inside a small
    frame could then hold a connection (and its memory) forever. This facade refuses a
    header outside (0, max_frame_bytes] before reading the body, never hands out bytes
    past the current frame, and refuses to start a second frame within one message
    (``next_message`` starts a message). It reads the socket in 64 KiB chunks.
    """

    __slots__ = ("_frame_left", "_max_frame_bytes", "_may_start_frame", "_pending", "sock")

    def __init__(self, sock: socket.socket, max_frame_bytes: int) -> None:
        self.sock = sock
        self._max_frame_bytes = max_frame_bytes
        self._pending = b""
        self._frame_left = 0
        self._may_start_frame = True

    def next_message(self) -> None:
        self._may_start_frame = True

    def read(self, size: int) -> bytes:
        if self._frame_left == 0:
            self._start_frame()
        data = self._take(min(size, self._frame_left))
        self._frame_left -= len(data)
        return data

    def _start_frame(self) -> None:
        """Check the next frame's header (left in the buffer: it is handed out like the body)."""
        if not self._may_start_frame:
            raise MalformedFrameError("message runs past the end of its frame")
        while len(self._pending) < 4:
            more = self.sock.recv(65536)
            if not more:
                raise TTransportException(TTransportException.END_OF_FILE, "peer closed")
            self._pending += more
        frame_size = int.from_bytes(self._pending[:4], "big", signed=True)
        if not 0 < frame_size <= self._max_frame_bytes:
            raise MalformedFrameError(f"frame of {frame_size} bytes refused")
        self._frame_left = 4 + frame_size
        self._may_start_frame = False

    def _take(self, most: int) -> bytes:
        pending = self._pending
        if not pending:
            pending = self.sock.recv(65536)
            if not pending:
                raise TTransportException(TTransportException.END_OF_FILE, "peer closed")
        if len(pending) <= most:
            self._pending = b""
            return pending
        self._pending = pending[most:]
        return pending[:most]

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def flush(self) -> None:
        pass

    def is_open(self) -> bool:
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Dispatcher:
    """Calls the handler; maps KVError to a typed TApplicationException, bugs to INTERNAL_ERROR.

    Does what thriftpy2's TProcessor does, with the per-method lookups done once.
    """

    def __init__(self, service: Any, handler: object) -> None:
        self._methods: dict[str, tuple[Any, Any, Any, tuple[str, ...]]] = {}
        for name in service.thrift_services:
            args_cls = getattr(service, f"{name}_args")
            names = tuple(spec[1] for spec in args_cls.thrift_spec.values())
            result_cls = getattr(service, f"{name}_result")
            self._methods[name] = (args_cls, result_cls, getattr(handler, name), names)

    def process(self, iprot: Any, oprot: Any) -> None:
        api, _, seqid = iprot.read_message_begin()
        entry = self._methods.get(api)
        if entry is None:
            iprot.skip(TType.STRUCT)
            iprot.read_message_end()
            unknown = TApplicationException(
                TApplicationException.UNKNOWN_METHOD, f"unknown method {api}"
            )
            self._send(oprot, api, TMessageType.EXCEPTION, unknown, seqid)
            return
        args_cls, result_cls, method, names = entry
        args = args_cls()
        args.read(iprot)
        iprot.read_message_end()
        try:
            value = method(*[getattr(args, n) for n in names])
        except errors.KVError as exc:
            failure = TApplicationException(exc.code, str(exc))
            self._send(oprot, api, TMessageType.EXCEPTION, failure, seqid)
            return
        except Exception as exc:
            log.exception("handler %s failed", api)
            failure = TApplicationException(TApplicationException.INTERNAL_ERROR, f"{api}: {exc}")
            self._send(oprot, api, TMessageType.EXCEPTION, failure, seqid)
            return
        result = result_cls()
        result.success = value
        self._send(oprot, api, TMessageType.REPLY, result, seqid)

    @staticmethod
    def _send(oprot: Any, api: str, message_type: int, payload: Any, seqid: int) -> None:
        oprot.write_message_begin(api, message_type, seqid)
        payload.write(oprot)
        oprot.write_message_end()
        oprot.trans.flush()


ConnectionHook = Callable[[], None]


class RpcServer:
    """Threaded framed/binary Thrift server for the KeyValueService.

    ``on_disconnect`` (optional) is called in the connection's thread when it ends,
    so a handler can keep per-connection state in a threading.local.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: object,
        max_frame_bytes: int,
        on_disconnect: ConnectionHook | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._dispatcher = _Dispatcher(KeyValueService, handler)
        self._max_frame_bytes = max_frame_bytes
        self._on_disconnect = on_disconnect
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._is_closed = False

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
        self._listener = listener

    def start(self) -> None:
        if self._listener is None:
            self.bind()
        thread = threading.Thread(target=self._accept_loop, name="rpc-accept", daemon=True)
        thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._is_closed:
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                if self._is_closed:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed (%s); still serving existing connections", exc)
                    threading.Event().wait(0.05)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            with self._lock:
                if self._is_closed:
                    sock.close()
                    return
                self._connections.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name="rpc-conn", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        guard = _GuardedSocket(sock, self._max_frame_bytes)
        proto = TCyBinaryProtocol(TCyFramedTransport(guard))
        dispatcher = self._dispatcher
        try:
            while True:
                guard.next_message()
                dispatcher.process(proto, proto)
        except (TTransportException, ConnectionError, OSError):
            pass
        except MalformedFrameError as exc:
            log.warning("closing connection: %s (frame limit %d bytes)", exc, self._max_frame_bytes)
        except Exception as exc:  # malformed message: bad version, bad type, truncated data
            log.warning("closing connection after a malformed request: %r", exc)
        finally:
            with self._lock:
                self._connections.discard(sock)
            guard.close()
            if self._on_disconnect is not None:
                self._on_disconnect()

    def close(self) -> None:
        """Stop accepting, then cut every open connection."""
        with self._lock:
            self._is_closed = True
            connections = list(self._connections)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------- client


class Connection:
    """One connection to one node. Not thread-safe: one per thread, or per pool slot.

    ``call`` raises :class:`errors.ConnectError` when nothing was sent, the node's
    own KVError when it refused, and :class:`errors.ConnectionLostError` when the
    outcome is unknown; after the last two kinds of transport failure the
    connection is closed and the next call reconnects.
    """

    def __init__(
        self,
        address: str,
        timeout_ms: int = 2000,
        connect_timeout_ms: int = 500,
        is_checked_before_use: bool = True,
    ) -> None:
        self.address = address
        self._is_checked_before_use = is_checked_before_use
        self._is_shut = False
        self._host, self._port = parse_address(address)
        self._timeout_ms = timeout_ms
        self._connect_timeout_ms = connect_timeout_ms
        self._socket: TSocket | None = None
        self._poller: select.poll | None = None
        self._client: Any = None  # the protocol object while connected
        self._seqid = 0

    def open(self) -> None:
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
        _set_kernel_timeout(raw, self._timeout_ms)
        self._socket = TSocket(sock=raw)
        self._poller = select.poll()
        self._poller.register(raw, select.POLLIN | select.POLLPRI)
        self._client = TCyBinaryProtocol(TCyFramedTransport(self._socket))

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
        if self._client is not None and self._is_checked_before_use and self._is_dead():
            self.close()
        if self._client is None:
            self.open()
        try:
            return self._invoke(self._client, method, args)
        except TApplicationException as exc:
            raise _from_application_error(exc) from None
        except errors.ProtocolError:
            self.close()
            raise
        except (TTransportException, OSError, EOFError) as exc:
            self.close()
            raise errors.ConnectionLostError(f"{method} to {self.address}: {exc!r}") from None
        except Exception as exc:  # undecodable reply
            self.close()
            raise errors.ProtocolError(f"{method} to {self.address}: {exc!r}") from None

    def _invoke(self, proto: Any, method: str, args: tuple[Any, ...]) -> Any:
        """One request/response exchange (what thriftpy2's TClient does, minus its lookups)."""
        args_cls, result_cls, has_result = _CLIENT_METHODS[method]
        self._seqid = seqid = (self._seqid + 1) & 0x7FFFFFFF
        proto.write_message_begin(method, TMessageType.CALL, seqid)
        args_cls(*args).write(proto)
        proto.write_message_end()
        proto.trans.flush()
        _, message_type, reply_seqid = proto.read_message_begin()
        if message_type == TMessageType.EXCEPTION:
            exc = TApplicationException()
            exc.read(proto)
            proto.read_message_end()
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


def probe(address: str, timeout_ms: int) -> Any | None:
    """Ask a node for its status. None if nothing listens there (connection refused).

    Raises ConnectionLostError / ConnectError on a timeout: the node may be alive but stuck.
    """
    conn = Connection(address, timeout_ms=timeout_ms, connect_timeout_ms=timeout_ms)
    try:
        return conn.call("status")
    except errors.ConnectError as exc:
        if exc.is_refused:
            return None
        raise
    finally:
        conn.close()
