"""Thrift transport for kvstore: the only module that touches thriftpy2's transport layer.

Server: one thread per connection (like the seed's threaded server), framed
transport + binary protocol with thriftpy2's compiled codec. Unlike thriftpy2's
TServerSocket it never sets SO_REUSEPORT (two nodes must not share a port), and it
bounds what a peer can make it do:
- a frame header beyond ``max_frame_bytes`` is refused before the body is buffered;
- every request frame is received whole and walked by :func:`check_request` before
  thriftpy2 decodes it (the decoder can spin for seconds, holding the GIL, on a
  container of a non-data type: a 28-byte request once stalled a node for 6.8 s);
- at most ``max_connections`` connections (and threads) at once; more are refused
  with UNAVAILABLE;
- a client connection idle for ``idle_timeout_s`` is closed, well after a pooled
  Connection stops reusing it (REOPEN_AFTER_IDLE_S), so no request is written into
  a closing connection; the primary's replication connections never idle out;
- a frame must arrive whole within ``frame_deadline_s`` of its first byte.

Mutual TLS (optional; plaintext is the default): TLS 1.3 only, a certificate from the
cluster's CA required on both sides. The server runs each handshake in the connection's own
thread, bounded by the frame deadline, so a silent peer never stalls the accept loop; a
plaintext or unauthenticated peer is cut before any request is decoded. The peer's *role*
comes from its certificate: OU=node in the subject is a node, anything else a client, and
a client calling one of the server's ``node_only_methods`` is refused (FORBIDDEN) before the
handler runs. Host names are not checked: nodes are addressed by IP:port and register their
own addresses; trust rests on the CA alone (keep it private to the cluster). Under TLS,
timeouts are Python ones (``settimeout``): kernel ones (SO_RCVTIMEO) do not bound a TLS read.
Servers send no session tickets, which would make an idle client socket poll as readable
and fool the client's dead-connection check.

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
import ssl
import struct
import threading
import time
from collections.abc import Callable, Collection
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


# --------------------------------------------------------------------------- TLS

NODE_UNIT = "node"  # a certificate whose subject has OU=node is a node's; any other a client's


def server_tls_context(cert_path: str, key_path: str, ca_path: str) -> ssl.SSLContext:
    """A node's listening context: TLS 1.3, a client certificate from ``ca_path`` required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.num_tickets = 0  # a ticket arriving after the handshake would look like an EOF
    _require_mutual_tls(context, cert_path, key_path, ca_path)
    return context


def client_tls_context(cert_path: str, key_path: str, ca_path: str) -> ssl.SSLContext:
    """A caller's context (clients, and nodes calling nodes): TLS 1.3, the peer's certificate
    must come from ``ca_path``. No host name check: peers are addressed by IP:port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    _require_mutual_tls(context, cert_path, key_path, ca_path)
    return context


def _require_mutual_tls(context: ssl.SSLContext, cert: str, key: str, ca: str) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)


def is_node_certificate(cert: Any) -> bool:
    """True if a verified peer certificate (``getpeercert()``) has OU=node in its subject."""
    return any(
        name == "organizationalUnitName" and value == NODE_UNIT
        for rdn in (cert or {}).get("subject", ())
        for name, value in rdn
    )


def _handshake(tls: ssl.SSLSocket, deadline_s: float) -> None:
    """Complete a server-side handshake within ``deadline_s`` in all (not per receive)."""
    deadline = time.monotonic() + deadline_s
    tls.setblocking(False)
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        left_s = deadline - time.monotonic()
        poller = select.poll()
        poller.register(tls, events)
        if left_s <= 0 or not poller.poll(left_s * 1000):
            raise TimeoutError(f"no TLS handshake within {deadline_s:g} s")


# --------------------------------------------------------------------------- server


class MalformedFrameError(Exception):
    """No request in the frame, or a frame out of bounds: the connection is closed unanswered."""


class MalformedRequestError(Exception):
    """A request whose header reads well but whose arguments are malformed.

    The whole frame was read, so the node can answer it (BAD_REQUEST, with ``method`` and
    ``seqid``) before it closes the connection.
    """

    def __init__(self, reason: str, method: str, seqid: int) -> None:
        super().__init__(reason)
        self.method = method
        self.seqid = seqid


class _ArgumentsError(Exception):
    """Why the arguments of a request are malformed (becomes a MalformedRequestError)."""


class _IdleTimeoutError(Exception):
    """No request arrived on a connection for its idle timeout."""


# --------------------------------------------------------------------------- request check

MAX_NESTING = 32  # structs and containers within a request, its arguments struct included
# Container elements in one request, all containers together. Decoding creates an object per
# element (1.4 s of CPU, holding the GIL, for a 1 MB list of a million empty structs), so the
# frame bound alone would let one 16 MiB request stall a node for over 20 s.
MAX_ELEMENTS = 1 << 20

_VERSION_1 = 0x80010000
_HEADER = struct.Struct("!Ii")  # version | message type, method name length
_I32 = struct.Struct("!i")
_unpack_header = _HEADER.unpack_from
_unpack_i32 = _I32.unpack_from
_CALL_V1 = _VERSION_1 | TMessageType.CALL
_T_STOP, _T_STRING, _T_STRUCT, _T_MAP, _T_SET, _T_LIST = 0, 11, 12, 13, 14, 15
# Binary-protocol type ids: the width of the fixed-size types (bool, byte, double, i16, i32,
# i64), and the fewest bytes any value of a type takes (string: its length; struct: its STOP;
# map: key type, value type, count; set and list: element type, count). Every other id (0 STOP,
# 1 VOID, 5, 7, 9, 16-255) is no data type: thriftpy2 "skips" a value of such a type without
# consuming a byte, so a container of 2**31 of them held the GIL for seconds.
_FIXED_WIDTHS = {2: 1, 3: 1, 4: 8, 6: 2, 8: 4, 10: 8}
_WIDTH = tuple(_FIXED_WIDTHS.get(t, 0) for t in range(256))
_LEAST_BYTES = tuple(
    {**_FIXED_WIDTHS, _T_STRING: 4, _T_STRUCT: 1, _T_MAP: 6, _T_SET: 5, _T_LIST: 5}.get(t, 0)
    for t in range(256)
)


def check_request(frame: bytes) -> None:
    """Walk one framed binary-protocol request (length prefix included) without decoding it.

    Raises MalformedFrameError if the frame holds no strict binary-protocol call, and
    MalformedRequestError if its arguments are malformed: a type id that is no Thrift data
    type, a negative length or count, a string or container that runs past the frame end
    (every element of every type takes at least one byte, so a count larger than the bytes
    left is refused before any walking), more than MAX_ELEMENTS container elements, nesting
    deeper than MAX_NESTING, bytes after the message, or a message type other than CALL and
    ONEWAY. A request that passes is exactly
    what thriftpy2's decoder reads and skips, so decoding it ends at the frame end and every
    loop of the decoder consumes input.

    Tight, as it runs for every request: the arguments struct is walked inline.
    """
    try:
        version, name_length = _unpack_header(frame, 4)
    except struct.error:
        raise MalformedFrameError("frame too short for a message header") from None
    end = len(frame)
    pos = 16 + name_length
    if version != _CALL_V1 or name_length < 0 or pos > end:
        _check_header(frame, version, name_length)
    width = _WIDTH
    budget: list[int] | None = None  # container elements still allowed (made when needed)
    try:
        while True:
            field_type = frame[pos]
            if field_type == _T_STRING:
                length = _unpack_i32(frame, pos + 3)[0]
                pos += 7 + length
                if length < 0 or pos > end:
                    raise _ArgumentsError(f"a string of {length} bytes at byte {pos - length - 7}")
            elif width[field_type]:
                pos += 3 + width[field_type]
            elif field_type == _T_STOP:
                break
            elif field_type == _T_STRUCT:
                budget = budget or [MAX_ELEMENTS]
                pos = _skip_struct(frame, pos + 3, end, 2, budget)
            else:
                budget = budget or [MAX_ELEMENTS]
                pos = _skip_value(frame, pos + 3, end, field_type, 1, budget)
    except _ArgumentsError as exc:
        raise _request_error(frame, name_length, str(exc)) from None
    except (IndexError, struct.error):
        raise _request_error(frame, name_length, "the arguments run past the frame end") from None
    if pos + 1 != end:
        raise _request_error(frame, name_length, f"{end - pos - 1} bytes after the arguments")


def _check_header(frame: bytes, version: int, name_length: int) -> None:
    """Raise unless the header is a well-formed ONEWAY one (the slow path of check_request)."""
    if version & 0xFFFF0000 != _VERSION_1:
        raise MalformedFrameError(f"no binary-protocol message (header {version:#010x})")
    if name_length < 0 or 16 + name_length > len(frame):
        raise MalformedFrameError(f"a method name of {name_length} bytes does not fit its frame")
    if version & 0xFF != TMessageType.ONEWAY:
        raise _request_error(frame, name_length, f"message type {version & 0xFF} is not a call")


def _request_error(frame: bytes, name_length: int, reason: str) -> MalformedRequestError:
    method = frame[12 : 12 + name_length].decode("utf-8", "replace")
    return MalformedRequestError(reason, method, _unpack_i32(frame, 12 + name_length)[0])


def _skip_struct(buf: bytes, pos: int, end: int, depth: int, budget: list[int]) -> int:
    """The position after the struct at ``pos`` (check_request's loop, for nested structs)."""
    if depth > MAX_NESTING:
        raise _ArgumentsError(f"structs and containers nested deeper than {MAX_NESTING}")
    width = _WIDTH
    while True:
        field_type = buf[pos]
        if field_type == _T_STRING:
            length = _unpack_i32(buf, pos + 3)[0]
            pos += 7 + length
            if length < 0 or pos > end:
                raise _ArgumentsError(f"a string of {length} bytes at byte {pos - length - 7}")
        elif width[field_type]:
            pos += 3 + width[field_type]
        elif field_type == _T_STOP:
            return pos + 1
        elif field_type == _T_STRUCT:
            pos = _skip_struct(buf, pos + 3, end, depth + 1, budget)
        else:
            pos = _skip_value(buf, pos + 3, end, field_type, depth, budget)


def _skip_value(
    buf: bytes, pos: int, end: int, value_type: int, depth: int, budget: list[int]
) -> int:
    if value_type == _T_STRING:
        length = _unpack_i32(buf, pos)[0]
        if length < 0 or pos + 4 + length > end:
            raise _ArgumentsError(f"a string of {length} bytes at byte {pos}")
        return pos + 4 + length
    if _WIDTH[value_type]:
        return pos + _WIDTH[value_type]
    if value_type == _T_STRUCT:
        return _skip_struct(buf, pos, end, depth + 1, budget)
    if value_type in (_T_LIST, _T_SET):
        count = _unpack_i32(buf, pos + 1)[0]
        return _skip_list(buf, pos + 5, end, buf[pos], count, depth + 1, budget)
    if value_type == _T_MAP:
        return _skip_map(buf, pos, end, depth + 1, budget)
    raise _ArgumentsError(f"type id {value_type} at byte {pos - 3} is not a Thrift type")


def _check_count(count: int, least: int, pos: int, end: int, depth: int, budget: list[int]) -> None:
    if depth > MAX_NESTING:
        raise _ArgumentsError(f"structs and containers nested deeper than {MAX_NESTING}")
    if count < 0 or count * least > end - pos:
        raise _ArgumentsError(
            f"a container of {count} elements at byte {pos}: {end - pos} bytes left in the frame"
        )
    budget[0] -= count
    if budget[0] < 0:
        raise _ArgumentsError(f"more than {MAX_ELEMENTS} container elements in one request")


def _skip_list(
    buf: bytes, pos: int, end: int, element_type: int, count: int, depth: int, budget: list[int]
) -> int:
    """Skip a list's or set's ``count`` elements of ``element_type`` starting at ``pos``."""
    least = _LEAST_BYTES[element_type]
    if not least:
        raise _ArgumentsError(f"a container of type id {element_type}, not a Thrift type")
    _check_count(count, least, pos, end, depth, budget)
    if element_type == _T_STRING:
        for _ in range(count):
            length = _unpack_i32(buf, pos)[0]
            if length < 0:
                raise _ArgumentsError(f"a string of {length} bytes at byte {pos}")
            pos += 4 + length
        if pos > end:
            raise _ArgumentsError("a list of strings runs past the frame end")
        return pos
    if _WIDTH[element_type]:
        return pos + count * least
    if element_type == _T_STRUCT:
        for _ in range(count):
            pos = _skip_struct(buf, pos, end, depth + 1, budget)
        return pos
    for _ in range(count):
        pos = _skip_value(buf, pos, end, element_type, depth, budget)
    return pos


def _skip_map(buf: bytes, pos: int, end: int, depth: int, budget: list[int]) -> int:
    """Skip the map whose header (key type, value type, count) starts at ``pos``."""
    key_type, value_type = buf[pos], buf[pos + 1]
    count = _unpack_i32(buf, pos + 2)[0]
    pos += 6
    for element_type in (key_type, value_type):
        if not _LEAST_BYTES[element_type]:
            raise _ArgumentsError(f"a map of type id {element_type}, not a Thrift type")
    least = _LEAST_BYTES[key_type] + _LEAST_BYTES[value_type]
    _check_count(count, least, pos, end, depth, budget)
    if _WIDTH[key_type] and _WIDTH[value_type]:
        return pos + count * (_WIDTH[key_type] + _WIDTH[value_type])
    for _ in range(count):
        pos = _skip_value(buf, pos, end, key_type, depth, budget)
        pos = _skip_value(buf, pos, end, value_type, depth, budget)
    return pos


def _exception_frame(method: str, seqid: int, code: int, message: str) -> bytes:
    """A framed EXCEPTION message carrying a TApplicationException(type=code, message)."""
    name = method.encode("utf-8", "replace")
    text = message.encode("utf-8", "replace")
    body = b"".join(
        (
            _HEADER.pack(_VERSION_1 | TMessageType.EXCEPTION, len(name)),
            name,
            struct.pack("!ibhi", seqid, TType.STRING, 1, len(text)),
            text,
            struct.pack("!bhib", TType.I32, 2, code, _T_STOP),
        )
    )
    return _I32.pack(len(body)) + body


# --------------------------------------------------------------------------- server


class _FrameReader:
    """Socket facade for TCyFramedTransport that receives whole frames, within bounds.

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
    """

    __slots__ = (
        "_frame",
        "_frame_deadline_s",
        "_idle_timeout_s",
        "_is_tls",
        "_max_frame_bytes",
        "_pending",
        "_tls_poller",
        "sock",
    )

    def __init__(
        self, sock: socket.socket, max_frame_bytes: int, idle_timeout_s: float, deadline_s: float
    ) -> None:
        self.sock = sock
        self._max_frame_bytes = max_frame_bytes
        self._idle_timeout_s = idle_timeout_s
        self._frame_deadline_s = deadline_s
        self._pending = b""
        self._frame = b""
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
            raise MalformedFrameError(f"frame of {frame_size} bytes refused")
        total = 4 + frame_size
        if len(pending) < total:
            deadline = deadline or time.monotonic() + self._frame_deadline_s
            pending = self._receive_until(pending, total, deadline)
        if len(pending) == total:
            self._frame, self._pending = pending, b""
        else:
            self._frame, self._pending = pending[:total], pending[total:]
        return self._frame

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

    def read(self, size: int) -> bytes:
        frame = self._frame
        if len(frame) <= size:
            if not frame:
                raise MalformedFrameError("message runs past the end of its frame")
            self._frame = b""
            return frame
        self._frame = frame[size:]
        return frame[:size]

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def flush(self) -> None:
        pass

    def is_open(self) -> bool:
        return True

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
    not a node (``is_node`` False) calling one of ``node_only`` gets FORBIDDEN; the handler
    never sees the call.
    """

    def __init__(self, service: Any, handler: object, node_only: Collection[str] = ()) -> None:
        unknown = set(node_only) - set(service.thrift_services)
        if unknown:
            raise ValueError(f"node-only methods not in the service: {sorted(unknown)}")
        self._node_only = frozenset(node_only)
        self._methods: dict[str, tuple[Any, Any, Any, tuple[str, ...]]] = {}
        for name in service.thrift_services:
            args_cls = getattr(service, f"{name}_args")
            names = tuple(spec[1] for spec in args_cls.thrift_spec.values())
            result_cls = getattr(service, f"{name}_result")
            self._methods[name] = (args_cls, result_cls, getattr(handler, name), names)

    def process(self, iprot: Any, oprot: Any, is_node: bool = True) -> str:
        api, _, seqid = iprot.read_message_begin()
        entry = self._methods.get(api)
        if not is_node and api in self._node_only:
            iprot.skip(TType.STRUCT)
            iprot.read_message_end()
            refusal = TApplicationException(
                errors.ForbiddenError.code,
                f"{api} is for nodes only: this peer's certificate is a client's "
                f"(a node's has OU={NODE_UNIT})",
            )
            self._send(oprot, api, TMessageType.EXCEPTION, refusal, seqid)
            return ""
        if entry is None:
            iprot.skip(TType.STRUCT)
            iprot.read_message_end()
            unknown = TApplicationException(
                TApplicationException.UNKNOWN_METHOD, f"unknown method {api}"
            )
            self._send(oprot, api, TMessageType.EXCEPTION, unknown, seqid)
            return ""
        args_cls, result_cls, method, names = entry
        args = args_cls()
        args.read(iprot)
        iprot.read_message_end()
        try:
            value = method(*[getattr(args, n) for n in names])
        except errors.KVError as exc:
            failure = TApplicationException(exc.code, str(exc))
            self._send(oprot, api, TMessageType.EXCEPTION, failure, seqid)
            return ""
        except Exception as exc:
            log.exception("handler %s failed", api)
            failure = TApplicationException(TApplicationException.INTERNAL_ERROR, f"{api}: {exc}")
            self._send(oprot, api, TMessageType.EXCEPTION, failure, seqid)
            return ""
        result = result_cls()
        result.success = value
        self._send(oprot, api, TMessageType.REPLY, result, seqid)
        return str(api)

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

    ``tls`` (a :func:`server_tls_context`): every connection must complete a mutual TLS
    handshake, in its own thread, within ``frame_deadline_s``; a peer whose certificate is
    not a node's may not call ``node_only_methods``. Without it every peer may call anything.
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
    ) -> None:
        self.host = host
        self.port = port
        self._tls = tls
        self._dispatcher = _Dispatcher(KeyValueService, handler, node_only_methods)
        self._max_frame_bytes = max_frame_bytes
        self._on_disconnect = on_disconnect
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._is_closed = False
        self._refused_count = 0
        self._refusal_logged_at = 0.0
        self.set_connection_bounds(max_connections, idle_timeout_s, frame_deadline_s)

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
        with self._lock:
            if self._is_closed:
                sock.close()
                return
            is_admitted = len(self._connections) < self._max_connections
            if is_admitted:
                self._connections.add(sock)
        if not is_admitted:
            self._refuse(sock, peer)
            return
        # Under TLS the reader bounds receives itself (settimeout); a kernel receive timeout
        # would still fire on the blocking socket of a replication line that never idles out.
        idle_timeout_s = 0.0 if self._tls is not None else self._idle_timeout_s
        _configure_connection(sock, idle_timeout_s, self._frame_deadline_s)
        thread = threading.Thread(target=self._serve, args=(sock, peer), name="rpc-conn")
        thread.daemon = True
        thread.start()

    def _refuse(self, sock: socket.socket, peer: str) -> None:
        """Answer UNAVAILABLE without waiting on the peer, then close."""
        try:
            sock.setblocking(False)
            sock.send(self._refusal)
            # Closing over unread bytes would reset the line, which may discard the refusal.
            with contextlib.suppress(OSError):
                sock.recv(65536)
        except OSError:
            pass
        finally:
            sock.close()
        self._refused_count += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= 1.0:
            self._refusal_logged_at = now
            log.warning(
                "refused %d connection(s) (latest from %s): %d open, the limit",
                self._refused_count,
                peer,
                self._max_connections,
            )
            self._refused_count = 0

    def _secure(self, sock: socket.socket, peer: str) -> tuple[socket.socket, bool]:
        """The TLS socket over ``sock`` once the handshake is done, and whether the peer
        is a node. Raises OSError (ssl.SSLError, TimeoutError) if there is no handshake."""
        assert self._tls is not None
        tls = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._lock:  # wrapping detached ``sock``: close() must cut the TLS socket
            self._connections.discard(sock)
            self._connections.add(tls)
        try:
            _handshake(tls, self._frame_deadline_s)
        except BaseException:
            with self._lock:
                self._connections.discard(tls)
            tls.close()
            raise
        is_node = is_node_certificate(tls.getpeercert())
        log.debug("TLS connection from %s (%s)", peer, "node" if is_node else "client")
        return tls, is_node

    def _serve(self, sock: socket.socket, peer: str) -> None:
        is_node = True  # plaintext: every peer may call every method
        if self._tls is not None:
            try:
                sock, is_node = self._secure(sock, peer)
            except (OSError, ValueError) as exc:
                log.warning("refused a connection from %s: no TLS handshake: %s", peer, exc)
                with self._lock:
                    self._connections.discard(sock)
                sock.close()
                return
        reader = _FrameReader(
            sock, self._max_frame_bytes, self._idle_timeout_s, self._frame_deadline_s
        )
        proto = TCyBinaryProtocol(TCyFramedTransport(reader))
        process = self._dispatcher.process
        is_replication_line = False
        is_orderly = False
        try:
            while True:
                check_request(reader.next_frame())
                if process(proto, proto, is_node) == REPLICATION_METHOD and not is_replication_line:
                    is_replication_line = True
                    reader.never_idle_out()
        except TTransportException as exc:
            is_orderly = exc.type == TTransportException.END_OF_FILE
        except ConnectionError:
            pass
        except _IdleTimeoutError as exc:
            log.debug("closing the connection from %s: %s", peer, exc)
        except MalformedRequestError as exc:
            log.warning("refused a malformed %r request from %s: %s", exc.method, peer, exc)
            reply = _exception_frame(
                exc.method, exc.seqid, errors.BadRequestError.code, f"malformed request: {exc}"
            )
            with contextlib.suppress(OSError):
                sock.sendall(reply)
        except MalformedFrameError as exc:
            log.warning("closing the connection from %s: %s", peer, exc)
        except OSError:
            pass
        except Exception as exc:  # a request the decoder refused despite the check
            log.warning("closing the connection from %s after a bad request: %r", peer, exc)
        finally:
            with self._lock:
                self._connections.discard(sock)
            reader.close()
            if self._on_disconnect is not None:
                self._on_disconnect(is_orderly)

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


def _configure_connection(sock: socket.socket, idle_timeout_s: float, deadline_s: float) -> None:
    """No Nagle delay, keepalive, and kernel timeouts: idle wait on receives, progress on sends."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    _set_receive_timeout(sock, idle_timeout_s)
    _set_timeval(sock, socket.SO_SNDTIMEO, deadline_s)


# --------------------------------------------------------------------------- client


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
    of connecting (a failed one is a ConnectError), bounded by ``timeout_ms``. A node that
    refuses this side's certificate says so only after the handshake (TLS 1.3), so the first
    call then fails with ConnectionLostError.
    """

    def __init__(
        self,
        address: str,
        timeout_ms: int = 2000,
        connect_timeout_ms: int = 500,
        is_checked_before_use: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self._tls = tls
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
        if self._tls is None:
            _set_kernel_timeout(raw, self._timeout_ms)
        else:
            raw = self._secure(raw)
        self._socket = TSocket(sock=raw)
        self._poller = select.poll()
        self._poller.register(raw, select.POLLIN | select.POLLPRI)
        self._client = TCyBinaryProtocol(TCyFramedTransport(self._socket))

    def _secure(self, raw: socket.socket) -> socket.socket:
        """The TLS socket over ``raw`` (handshake done), or ConnectError: nothing was sent."""
        assert self._tls is not None
        raw.settimeout(self._timeout_ms / 1000)  # Python timeouts: the kernel's miss TLS reads
        try:
            return self._tls.wrap_socket(raw)
        except OSError as exc:
            raw.close()
            raise errors.ConnectError(f"no TLS connection to {self.address}: {exc}") from None

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
        now = time.monotonic()
        if self._client is not None and self._is_stale(now - self._used_at):
            self.close()
        if self._client is None:
            self.open()
        self._used_at = now
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

    def _is_stale(self, idle_s: float) -> bool:
        if self._is_checked_before_use:
            return idle_s >= REOPEN_AFTER_IDLE_S or self._is_dead()
        return idle_s >= CHECK_AFTER_IDLE_S and self._is_dead()

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
