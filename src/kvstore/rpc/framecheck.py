"""The request check: every frame is walked before thriftpy2 decodes it (see the package
docstring); a malformed request is answered BAD_REQUEST or its connection closed."""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import Any

from thriftpy2.thrift import TMessageType, TType

from kvstore.idl import KeyValueService

log = logging.getLogger(__name__)


class MalformedFrameError(Exception):
    """No request in the frame, or a frame out of bounds: the connection is closed, unanswered
    but for ``answer`` (bytes to send first, if any)."""

    def __init__(self, message: str, answer: bytes = b"") -> None:
        super().__init__(message)
        self.answer = answer


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


# --------------------------------------------------------------------------- request check

MAX_NESTING = 32  # structs and containers within a request, its arguments struct included
# Container elements in one request, all containers together. Decoding creates an object per
# element (1.4 s of CPU, holding the GIL, for a 1 MB list of a million empty structs; 0.5 s
# for a get_many of a million short keys, every other client waiting), so the frame bound
# alone would let one 16 MiB request stall a node for over 20 s. The largest requests the
# nodes send each other hold a few times MAX_BATCH_ENTRIES (4096) elements.
MAX_ELEMENTS = 1 << 17

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


# A TLS record starts with its content type (22: handshake) and major version (3).
TLS_HANDSHAKE_START = b"\x16\x03"
# What a plaintext node answers a TLS handshake with, before it closes the connection: a TLS
# alert record (type 21, version 3.3, 2 bytes: fatal, no_application_protocol), which a TLS
# client reads as TLSV1_ALERT_NO_APPLICATION_PROTOCOL and can fail at once on (a TLS node
# never sends that alert: it offers no protocols by ALPN). Without it the client sees the
# handshake cut short, as from a TLS node refusing new connections for now, and retries.
NOT_TLS_ALERT = b"\x15\x03\x03\x00\x02\x02\x78"
NOT_TLS_ALERT_REASON = "NO_APPLICATION_PROTOCOL"  # (in OpenSSL's name of the alert)


def frame_size_error(header: bytes, frame_size: int) -> MalformedFrameError:
    """The error for a frame length out of bounds; ``header``: the connection's first
    bytes. A TLS ClientHello reads as a length of about 370 MB: say what it is."""
    if header.startswith(TLS_HANDSHAKE_START):
        return MalformedFrameError(
            "a TLS handshake, but this node serves plaintext (start it with --tls-cert, "
            "--tls-key and --tls-ca, or connect without TLS)",
            answer=NOT_TLS_ALERT,
        )
    return MalformedFrameError(f"frame of {frame_size} bytes refused")


def check_request(frame: bytes) -> None:
    """Walk one framed binary-protocol request (length prefix included) without decoding it.

    Raises MalformedFrameError if the frame holds no strict binary-protocol call, and
    MalformedRequestError if its arguments are malformed: a type id that is no Thrift data
    type, a negative length or count, a string or container that runs past the frame end
    (every element of every type takes at least one byte, so a count larger than the bytes
    left is refused before any walking), more than MAX_ELEMENTS container elements, nesting
    deeper than MAX_NESTING, bytes after the message, a message type other than CALL, or an
    argument (or a field or element within one) of another type than the IDL gives it: the
    decoder would skip it as if it were absent, so a compare-and-set whose ``expected`` came as
    a number would mean "only if absent". A request that passes is exactly what thriftpy2's
    decoder reads and skips, so decoding it ends at the frame end and every loop of the
    decoder consumes input.
    """
    try:
        version, name_length = _unpack_header(frame, 4)
    except struct.error:
        raise MalformedFrameError("frame too short for a message header") from None
    end = len(frame)
    pos = 16 + name_length
    if version != _CALL_V1 or name_length < 0 or pos > end:
        _check_header(frame, version, name_length)
    fields = _ARGUMENTS.get(frame[12 : 12 + name_length], _NO_FIELDS)  # unknown: answered so
    try:
        pos = _check_struct(frame, pos, end, 1, [MAX_ELEMENTS], fields)
    except _ArgumentsError as exc:
        raise _request_error(frame, name_length, str(exc)) from None
    except (IndexError, struct.error):
        raise _request_error(frame, name_length, "the arguments run past the frame end") from None
    if pos != end:
        raise _request_error(frame, name_length, f"{end - pos} bytes after the arguments")


def _check_header(frame: bytes, version: int, name_length: int) -> None:
    """Raise: the header is not a well-formed CALL one (the slow path of check_request)."""
    if version & 0xFFFF0000 != _VERSION_1:
        raise MalformedFrameError(f"no binary-protocol message (header {version:#010x})")
    if name_length < 0 or 16 + name_length > len(frame):
        raise MalformedFrameError(f"a method name of {name_length} bytes does not fit its frame")
    message_type = version & 0xFF
    if message_type == TMessageType.ONEWAY:  # it would be answered: the client reads no reply
        raise _request_error(frame, name_length, "a oneway call: no method here is oneway")
    raise _request_error(frame, name_length, f"message type {message_type} is not a call")


def _request_error(frame: bytes, name_length: int, reason: str) -> MalformedRequestError:
    method = shown_name(frame[12 : 12 + min(name_length, 4 * NAME_SHOWN + 4)])
    return MalformedRequestError(reason, method, _unpack_i32(frame, 12 + name_length)[0])


NAME_SHOWN = 64  # characters of a method name that errors and logs repeat


def shown_name(name: str | bytes) -> str:
    """A method name as errors and logs show it: at most NAME_SHOWN characters (a client
    may send megabytes of name) and "..." if there were more."""
    if isinstance(name, bytes):  # (enough bytes for NAME_SHOWN + 1 characters)
        name = name[: 4 * NAME_SHOWN + 4].decode("utf-8", "replace")
    return name if len(name) <= NAME_SHOWN else name[:NAME_SHOWN] + "..."


class _ThrottledLog:
    """Warnings a client can cause as fast as it likes (bad requests and the connections
    closed for them, replies refused for the reply budget), at most one a second: the log
    would fill the disk. ``counted``: what the line counts that it held back."""

    def __init__(self, counted: str) -> None:
        self._counted = counted
        self._lock = threading.Lock()
        self._logged_at = -1.0
        self._held = 0

    def warning(self, logger: logging.Logger, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._logged_at < 1.0:
                self._held += 1
                return
            held, self._held, self._logged_at = self._held, 0, now
        if held:
            message += " (and %d more %s in the last second)"
            args = (*args, held, self._counted)
        logger.warning(message, *args)


bad_request_log = _ThrottledLog("bad requests")


def _type_error(buf: bytes, pos: int, expected: _Expected) -> _ArgumentsError:
    field_id = int.from_bytes(buf[pos + 1 : pos + 3], "big", signed=True)
    return _ArgumentsError(
        f"{expected[2]} (field {field_id}) is of type {_type_name(buf[pos])}, not "
        f"{_type_name(expected[0])} as the IDL says (byte {pos})"
    )


def _type_name(type_id: int) -> str:
    return TType._VALUES_TO_NAMES.get(type_id, f"type {type_id}").lower()


def _check_value(
    buf: bytes, pos: int, end: int, expected: _Expected, depth: int, budget: list[int]
) -> int:
    """The position after the value at ``pos``, of ``expected``'s type (its header was
    checked): a struct's fields and a container's element types are checked against it too."""
    value_type, nested, _ = expected
    if nested is None:
        return _skip_value(buf, pos, end, value_type, depth, budget)
    if value_type == _T_STRUCT:
        return _check_struct(buf, pos, end, depth + 1, budget, nested)
    if value_type == _T_MAP:  # (no argument of the IDL is a map: its elements are walked)
        for at, element in ((pos, nested[0]), (pos + 1, nested[1])):
            if buf[at] != element[0]:
                raise _ArgumentsError(
                    f"{element[2]} holds {_type_name(buf[at])}s, not {_type_name(element[0])}s "
                    f"as the IDL says (byte {at})"
                )
        return _skip_map(buf, pos, end, depth + 1, budget)
    element = nested  # a list or a set
    element_type, count = buf[pos], _unpack_i32(buf, pos + 1)[0]
    if element_type != element[0]:
        raise _ArgumentsError(
            f"{element[2]} holds {_type_name(element_type)}s, not {_type_name(element[0])}s "
            f"as the IDL says (byte {pos})"
        )
    if element[1] is None:
        return _skip_list(buf, pos + 5, end, element_type, count, depth + 1, budget)
    pos += 5
    _check_count(count, _LEAST_BYTES[element_type], pos, end, depth + 1, budget)
    for _ in range(count):
        pos = _check_value(buf, pos, end, element, depth + 1, budget)
    return pos


def _check_struct(
    buf: bytes, pos: int, end: int, depth: int, budget: list[int], fields: _Fields
) -> int:
    """The position after the struct at ``pos``, whose fields must have ``fields``' types
    (fields it does not name are walked, as the decoder skips them). Tight, as it runs for
    every request: strings and fixed-width values are walked inline."""
    if depth > MAX_NESTING:
        raise _ArgumentsError(f"structs and containers nested deeper than {MAX_NESTING}")
    width = _WIDTH
    while True:
        field_type = buf[pos]
        if field_type == _T_STOP:
            return pos + 1
        expected = fields.get(buf[pos + 1] << 8 | buf[pos + 2])
        if expected is not None and expected[0] != field_type:
            raise _type_error(buf, pos, expected)
        if field_type == _T_STRING:
            length = _unpack_i32(buf, pos + 3)[0]
            pos += 7 + length
            if length < 0 or pos > end:
                raise _ArgumentsError(f"a string of {length} bytes at byte {pos - length - 7}")
        elif width[field_type]:
            pos += 3 + width[field_type]
        elif expected is not None:
            pos = _check_value(buf, pos + 3, end, expected, depth, budget)
        elif field_type == _T_STRUCT:
            pos = _check_struct(buf, pos + 3, end, depth + 1, budget, _NO_FIELDS)
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
        return _check_struct(buf, pos, end, depth + 1, budget, _NO_FIELDS)
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
            pos = _check_struct(buf, pos, end, depth + 1, budget, _NO_FIELDS)
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


# --------------------------------------------------------------------------- argument types

# What the IDL says of a value: its wire type id; for a struct, its fields' (by field id), for a
# list or set, its element's, for a map, its key's and value's (None: nothing within); and
# its name (an element's: its container's).
_Expected = tuple[int, Any, str]
_Fields = dict[int, _Expected]
_NO_FIELDS: _Fields = {}
_WIRE_TYPE = {TType.BINARY: TType.STRING}  # binary travels as a string


def _fields(thrift_spec: dict[int, tuple[Any, ...]]) -> _Fields:
    """{field id: _Expected} of a thriftpy2 ``thrift_spec``."""
    return {
        field_id: _expected(entry[0], entry[2] if len(entry) == 4 else None, entry[1])
        for field_id, entry in thrift_spec.items()
    }


def _expected(type_id: int, within: Any, name: str) -> _Expected:
    wire = _WIRE_TYPE.get(type_id, type_id)
    if wire == _T_STRUCT:
        return wire, _fields(within.thrift_spec), name
    if wire in (_T_LIST, _T_SET):
        return wire, _element(within, name), name
    if wire == _T_MAP:
        return wire, (_element(within[0], name), _element(within[1], name)), name
    return wire, None, name


def _element(spec: Any, container: str) -> _Expected:
    """An element's _Expected from thriftpy2's form: a type id, or (type id, what is within)."""
    if isinstance(spec, int):
        return _expected(spec, None, container)
    return _expected(spec[0], spec[1], container)


_ARGUMENTS: dict[bytes, _Fields] = {
    name.encode(): _fields(getattr(KeyValueService, f"{name}_args").thrift_spec)
    for name in KeyValueService.thrift_services
}


# --------------------------------------------------------------------------- the common calls

# The calls clients send most, put_once, put, get and lookup, laid out as every Thrift
# binary-protocol client writes them (strict header, fields in id order, all of put_once's
# RequestId set), are checked and decoded in one pass here, and a get's or lookup's reply
# built by hand. The general way walks the frame once to check it, then thriftpy2 builds
# argument and result structs through their Python __init__:
# - a put_once's decoding cost 5.0 us against 2.9 for a put (timeit), most of what
#   exactly-once added to a write on the primary;
# - the general way served a get in 10.4 us and a lookup in 11.1 (its Lookup struct), this
#   way 3.5 and 4.6 (timeit, both ways in one run, the handler over a trivial node).
# Anything else (another layout, invalid UTF-8, a reply of another shape) goes the general way.
HAND_PARSED_READS = frozenset({"get", "lookup"})
_PUT_ONCE = _HEADER.pack(_CALL_V1, 8) + b"put_once"
_PUT = _HEADER.pack(_CALL_V1, 3) + b"put"
_GET = _HEADER.pack(_CALL_V1, 3) + b"get"
_LOOKUP = _HEADER.pack(_CALL_V1, 6) + b"lookup"
_KEY, _VALUE, _REQUEST_ID = b"\x0b\x00\x01", b"\x0b\x00\x02", b"\x0c\x00\x03"
_CLIENT_ID = b"\x0b\x00\x01"
# After the client id: seq (i64, field 2), acked_below (i64, field 3), the RequestId's STOP
# and the arguments' STOP (type byte, field id, value; read as integers: cheaper than bytes).
_SEQS = struct.Struct("!BhqBhqH")
_I64 = 10  # TType.I64


def parse_usual_call(frame: bytes) -> tuple[str, int, list[Any]] | None:
    """(method, seqid, arguments) of a framed put_once, put, get or lookup in the usual layout
    (see above), exactly as ``check_request`` would pass it and thriftpy2 decode it, but for a
    put_once's RequestId: the tuple (client_id, seq, acked_below), not the IDL's struct
    (building a NamedTuple for it cost 0.5 us, a quarter of what parsing the RequestId costs).
    None for anything else, which the caller checks and decodes the general way."""
    if frame.startswith(_PUT_ONCE, 4):  # (pos: where the first field starts, after the seqid)
        api, pos = "put_once", 24
    elif frame.startswith(_PUT, 4):
        api, pos = "put", 19
    elif frame.startswith(_GET, 4):
        api, pos = "get", 19
    elif frame.startswith(_LOOKUP, 4):
        api, pos = "lookup", 22
    else:
        return None
    end = len(frame)
    try:
        seqid = _unpack_i32(frame, pos - 4)[0]
        if not frame.startswith(_KEY, pos):
            return None
        length = _unpack_i32(frame, pos + 3)[0]
        start, pos = pos + 7, pos + 7 + length
        if length < 0 or pos > end:
            return None
        key = frame[start:pos].decode()
        if api in HAND_PARSED_READS:
            return (api, seqid, [key]) if pos + 1 == end and frame[pos] == 0 else None
        if not frame.startswith(_VALUE, pos):
            return None
        length = _unpack_i32(frame, pos + 3)[0]
        start, pos = pos + 7, pos + 7 + length
        if length < 0 or pos > end:
            return None
        value = frame[start:pos].decode()
        if api == "put":
            return (api, seqid, [key, value]) if pos + 1 == end and frame[pos] == 0 else None
        if not frame.startswith(_REQUEST_ID, pos) or not frame.startswith(_CLIENT_ID, pos + 3):
            return None
        length = _unpack_i32(frame, pos + 6)[0]
        start, pos = pos + 10, pos + 10 + length
        if length < 0 or pos + 24 != end:
            return None
        client_id = frame[start:pos].decode()
        seq_type, seq_id, seq, acked_type, acked_id, acked_below, stops = _SEQS.unpack_from(
            frame, pos
        )
    except (UnicodeDecodeError, IndexError, struct.error):
        return None
    if seq_type != _I64 or seq_id != 2 or acked_type != _I64 or acked_id != 3 or stops:
        return None
    return api, seqid, [key, value, (client_id, seq, acked_below)]


_REPLY_V1 = _VERSION_1 | TMessageType.REPLY
_GET_REPLY = _HEADER.pack(_REPLY_V1, 3) + b"get"
_LOOKUP_REPLY = _HEADER.pack(_REPLY_V1, 6) + b"lookup"
# A reply: its frame length, header, name and seqid; then its result struct's field 0 (the
# success) as a string (get) or as the Lookup struct: found (bool, field 1), value (string,
# field 2) if found; the STOPs close the Lookup and the result.
_STRING_RESULT = struct.Struct("!Bhi")  # type, field 0, the string's length
_FOUND = b"\x0c\x00\x00\x02\x00\x01\x01\x0b\x00\x02"  # a struct (field 0): found = True, value:
_NOT_FOUND = b"\x0c\x00\x00\x02\x00\x01\x00\x00\x00"  # found = False, STOP, STOP
_I32_BYTES = struct.Struct("!i").pack


def read_reply(api: str, seqid: int, value: Any) -> bytes | None:
    """The framed reply to a get or lookup whose handler returned ``value`` (a get's str, a
    lookup's Lookup), as thriftpy2 writes it; None if ``value`` is not of that shape (the
    caller answers the general way)."""
    try:
        if api == "get":
            data = value.encode()
            body = _STRING_RESULT.pack(11, 0, len(data)) + data + b"\0"
            header = _GET_REPLY
        elif value.found is True and type(value.value) is str:
            data = value.value.encode()
            body = _FOUND + _I32_BYTES(len(data)) + data + b"\0\0"
            header = _LOOKUP_REPLY
        elif value.found is False and value.value is None:
            body, header = _NOT_FOUND, _LOOKUP_REPLY
        else:
            return None
    except (AttributeError, UnicodeEncodeError):
        return None
    return _I32_BYTES(len(header) + 4 + len(body)) + header + _I32_BYTES(seqid) + body
