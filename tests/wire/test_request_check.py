"""rpc.check_request, without sockets: what it refuses, and that what it passes decodes safely.

The property test is the check's contract with thriftpy2's decoder: a frame that passes is
read by the compiled decoder (as the server reads it) to exactly its last byte.
"""

from __future__ import annotations

import logging
import random
import struct
import time
from typing import Any

import pytest
from hostile_frames import FREEZE_REQUEST, SAMPLE_ARGS, encode_call, mutate, valid_frames
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TType
from thriftpy2.transport.memory import TCyMemoryBuffer

from kvstore.idl import KeyValueService, Lookup, RequestId
from kvstore.rpc import (
    CONNECTION_METHODS,
    MAX_ELEMENTS,
    MAX_NESTING,
    MalformedFrameError,
    MalformedRequestError,
    check_request,
)
from kvstore.rpc.framecheck import NAME_SHOWN, _ThrottledLog, parse_usual_call, read_reply
from kvstore.rpc.front import Frames, codec
from kvstore.rpc.server import _Dispatcher

T_BOOL, T_BYTE, T_I32, T_STRING, T_STRUCT, T_MAP, T_LIST = 2, 3, 8, 11, 12, 13, 15
SENTINEL = b"<end of frame>"
VALID_FRAMES = valid_frames()


def call(method: str, args: bytes, message_type: int = 1, seqid: int = 7) -> bytes:
    """A framed request whose arguments struct is ``args`` (without its STOP byte)."""
    name = method.encode()
    body = struct.pack("!Ii", 0x80010000 | message_type, len(name)) + name
    body += struct.pack("!i", seqid) + args + b"\x00"
    return struct.pack("!i", len(body)) + body


def field(field_type: int, field_id: int) -> bytes:
    return struct.pack("!Bh", field_type, field_id)


def string(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def list_header(element_type: int, count: int) -> bytes:
    return struct.pack("!Bi", element_type, count)


def refusal(frame: bytes) -> MalformedRequestError:
    with pytest.raises(MalformedRequestError) as caught:
        check_request(frame)
    return caught.value


def decode_exactly(frame: bytes) -> None:
    """Decode as the server does; fail unless the decoder stopped at the frame's last byte."""
    buffer = TCyMemoryBuffer(frame[4:] + SENTINEL)
    proto = TCyBinaryProtocol(buffer)
    method, _, _ = proto.read_message_begin()
    args_cls = getattr(KeyValueService, f"{method}_args", None)
    if args_cls is None:
        proto.skip(TType.STRUCT)
    else:
        args_cls().read(proto)
    assert buffer.read(len(SENTINEL)) == SENTINEL


def test_the_hostile_frames_cover_every_method_of_the_service() -> None:
    """A method added to the IDL gets its sample request, so every test here walks it too
    (the cluster secret's handshake methods have tests of their own)."""
    assert set(SAMPLE_ARGS) == set(KeyValueService.thrift_services) - CONNECTION_METHODS


@pytest.mark.parametrize("method", sorted(SAMPLE_ARGS))
def test_every_request_the_client_writes_passes(method: str) -> None:
    frame = valid_frames()[method]
    check_request(frame)
    decode_exactly(frame)


def test_large_values_and_unknown_fields_pass() -> None:
    check_request(encode_call("put", ("k" * 1024, "v" * 1_000_000)))
    extra = field(T_LIST, 9) + list_header(T_STRUCT, 3) + b"\x00" * 3  # three empty structs
    extra += field(T_MAP, 10) + struct.pack("!BBi", T_I32, T_BOOL, 2) + b"\x00" * 10
    extra += field(T_LIST, 11) + list_header(T_BYTE, 0)
    frame = call("get", field(T_STRING, 1) + string(b"key") + extra)
    check_request(frame)
    decode_exactly(frame)


def test_the_28_byte_freeze_is_refused_at_once() -> None:
    started = time.monotonic()
    error = refusal(FREEZE_REQUEST)
    assert time.monotonic() - started < 0.1
    assert (error.method, error.seqid) == ("get", 1)
    assert "type id 1, not a Thrift type" in str(error)


@pytest.mark.parametrize("element_type", [0, 1, 5, 7, 9, 16, 17, 18, 0x80, 255])
def test_a_container_of_no_data_type_is_refused(element_type: int) -> None:
    for count in (0, 1, 2**31 - 1):
        as_list = field(T_LIST, 2) + list_header(element_type, count)
        as_map = field(T_MAP, 2) + struct.pack("!BBi", T_STRING, element_type, count)
        for args in (as_list, as_map):
            assert "not a Thrift type" in str(refusal(call("get", args)))


def test_a_count_that_cannot_fit_in_the_frame_is_refused() -> None:
    # Three bools and the STOP byte after the list: four bytes left, which a fifth bool would
    # not fit in (a fourth would leave the arguments without their STOP byte).
    fits = field(T_LIST, 2) + list_header(T_BOOL, 3) + b"\x01\x00\x01"
    check_request(call("get", fits))
    too_many = field(T_LIST, 2) + list_header(T_BOOL, 5) + b"\x01\x00\x01"
    assert "5 elements at byte 27: 4 bytes left" in str(refusal(call("get", too_many)))
    for element_type in (T_I32, T_STRING, T_STRUCT, T_MAP, T_LIST):
        huge = field(T_LIST, 2) + list_header(element_type, 2**31 - 1)
        assert "2147483647 elements" in str(refusal(call("get", huge)))
    negative = field(T_LIST, 2) + list_header(T_STRING, -1)
    assert "-1 elements" in str(refusal(call("get", negative)))


def test_container_elements_per_request_are_bounded() -> None:
    """An element costs one byte, but an object to decode: a request may hold MAX_ELEMENTS."""
    half = MAX_ELEMENTS // 2
    two_lists = field(T_LIST, 2) + list_header(T_STRUCT, half) + b"\x00" * half
    two_lists += field(T_LIST, 3) + list_header(T_BOOL, half) + b"\x01" * half
    check_request(call("get", two_lists))
    one_more = two_lists + field(T_LIST, 4) + list_header(T_BYTE, 1) + b"\x07"
    assert f"more than {MAX_ELEMENTS}" in str(refusal(call("get", one_more)))


@pytest.mark.parametrize("length", [-5, 5, 2**20, 2**31 - 1])
def test_a_string_past_the_frame_end_is_refused(length: int) -> None:
    args = field(T_STRING, 1) + struct.pack("!i", length) + b"abc"
    assert f"a string of {length} bytes" in str(refusal(call("put", args)))


@pytest.mark.parametrize("field_type", [1, 5, 7, 9, 16, 18, 0x80, 255])
def test_a_field_of_no_data_type_is_refused(field_type: int) -> None:
    unknown = field(field_type, 9) + b"abcd"  # (at field 1 it is refused for not being a string)
    assert "not a Thrift type" in str(refusal(call("get", unknown)))


def test_nesting_is_bounded() -> None:
    def nested_lists(depth: int) -> bytes:
        inner = list_header(T_I32, 0)
        for _ in range(depth - 1):
            inner = list_header(T_LIST, 1) + inner
        return field(T_LIST, 2) + inner

    deepest = call("get", nested_lists(MAX_NESTING - 1))  # + the arguments struct
    check_request(deepest)
    decode_exactly(deepest)
    assert "nested deeper" in str(refusal(call("get", nested_lists(MAX_NESTING))))
    structs = field(T_STRUCT, 2) + field(T_STRUCT, 1) * 40 + b"\x00" * 40
    assert "nested deeper" in str(refusal(call("get", structs)))


def test_bytes_after_the_message_and_truncation_are_refused() -> None:
    frame = valid_frames()["put"]
    trailing = frame + b"\x00"
    trailing = struct.pack("!i", len(trailing) - 4) + trailing[4:]
    assert "1 bytes after the arguments" in str(refusal(trailing))
    truncated = struct.pack("!i", len(frame) - 5) + frame[4:-1]  # no STOP byte
    assert "past the frame end" in str(refusal(truncated))


def test_only_calls_are_accepted() -> None:
    frame = valid_frames()["get"]
    oneway = frame[:7] + bytes([4]) + frame[8:]  # it would get a reply the client never reads
    assert "oneway" in str(refusal(oneway))
    reply = frame[:7] + bytes([2]) + frame[8:]
    assert "not a call" in str(refusal(reply))


@pytest.mark.parametrize(
    ("method", "args"),
    [
        # expected as a number: decoded as absent, it would mean "only if absent"
        ("compare_and_set", field(T_STRING, 1) + string(b"k") + field(TType.I32, 2) + b"\0\0\0\5"),
        # the request id's seq as a string: decoded as 0, exactly-once would be lost
        (
            "put_once",
            field(T_STRING, 1)
            + string(b"k")
            + field(T_STRING, 2)
            + string(b"v")
            + field(T_STRUCT, 3)
            + field(T_STRING, 1)
            + string(b"c")
            + field(T_STRING, 2)
            + string(b"1")
            + b"\0",
        ),
        ("get_many", field(T_LIST, 1) + list_header(TType.I32, 1) + b"\0\0\0\1"),  # keys
        ("get", field(TType.I64, 1) + b"\0" * 8),
        ("remove", field(T_STRING, 1) + string(b"k") + field(T_STRING, 2) + string(b"id")),
    ],
    ids=["cas-expected", "put-once-seq", "get-many-keys", "get-key", "remove-id"],
)
def test_an_argument_of_another_type_than_the_idl_says_is_refused(method: str, args: bytes) -> None:
    assert "as the IDL says" in str(refusal(call(method, args)))


def test_a_field_the_idl_does_not_know_is_skipped_whatever_its_type() -> None:
    args = field(T_STRING, 1) + string(b"k") + field(T_LIST, 9) + list_header(TType.I32, 1)
    frame = call("get", args + b"\0\0\0\1")
    check_request(frame)
    decode_exactly(frame)


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack("!i", 3) + b"\x80\x01\x00",  # too short for a header
        struct.pack("!i", 8) + b"GET / HT",  # no version
        struct.pack("!i", 12) + b"\x00\x00\x00\x03get\x01\x00\x00\x00\x01",  # unversioned
        call("get", b"")[:8] + struct.pack("!i", 1000) + call("get", b"")[12:],  # long name
        call("get", b"")[:8] + struct.pack("!i", -3) + call("get", b"")[12:],  # negative name
    ],
    ids=["short", "http", "unversioned", "long-name", "negative-name"],
)
def test_no_request_header_is_a_malformed_frame(frame: bytes) -> None:
    with pytest.raises(MalformedFrameError):
        check_request(frame)


@settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(method=st.sampled_from(sorted(SAMPLE_ARGS)), seed=st.integers(0, 2**32 - 1))
def test_what_passes_decodes_to_its_last_byte(method: str, seed: int) -> None:
    frame = mutate(random.Random(seed), VALID_FRAMES[method])
    try:
        check_request(frame)
    except (MalformedFrameError, MalformedRequestError):
        return
    if struct.unpack_from("!i", frame)[0] != len(frame) - 4:
        return  # the frame reader refuses a header that does not match; not the check's job
    started = time.monotonic()
    decode_exactly(frame)
    assert time.monotonic() - started < 1.0


def test_a_long_method_name_is_cut_short_in_the_error() -> None:
    name = b"A" * (4 << 20)  # a client may send megabytes of name: logs and replies repeat it
    body = struct.pack("!Ii", 0x80010002, len(name)) + name + struct.pack("!i", 1) + b"\0"
    error = refusal(struct.pack("!i", len(body)) + body)
    assert error.method == "A" * NAME_SHOWN + "..."


def test_bad_request_warnings_are_logged_at_most_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test-bad-requests")
    throttled = _ThrottledLog("bad requests")
    with caplog.at_level(logging.WARNING, logger="test-bad-requests"):
        for i in range(100):
            throttled.warning(logger, "refused request %d", i)
        assert [r.getMessage() for r in caplog.records] == ["refused request 0"]
        throttled._logged_at -= 1.0  # a second went by
        throttled.warning(logger, "refused request %d", 100)
    assert caplog.records[-1].getMessage() == (
        "refused request 100 (and 99 more bad requests in the last second)"
    )


# --------------------------------------------------------------------------- parse_usual_call


def decoded(frame: bytes) -> tuple[str, int, list[Any]]:
    """(method, seqid, arguments) as the server's general path reads them."""
    proto = TCyBinaryProtocol(TCyMemoryBuffer(frame[4:]))
    method, _, seqid = proto.read_message_begin()
    args = getattr(KeyValueService, f"{method}_args")()
    args.read(proto)
    values = [getattr(args, name) for _, name, *_ in args.thrift_spec.values()]
    if isinstance(values[-1], RequestId):
        request = values[-1]
        values[-1] = (request.client_id, request.seq, request.acked_below)
    return method, seqid, values


def test_the_hand_parsed_calls_have_the_shapes_the_parser_assumes() -> None:
    """parse_usual_call reads, and read_reply writes, these IDL shapes byte by byte: a field
    added to one of them would be misread or dropped there, so such a change fails here."""

    def shape(cls: Any) -> dict[int, tuple[int, str]]:
        return {field_id: spec[:2] for field_id, spec in cls.thrift_spec.items()}

    key, value = (T_STRING, "key"), (T_STRING, "value")
    assert shape(KeyValueService.get_args) == shape(KeyValueService.lookup_args) == {1: key}
    assert shape(KeyValueService.put_args) == {1: key, 2: value}
    assert shape(KeyValueService.put_once_args) == {1: key, 2: value, 3: (T_STRUCT, "id")}
    assert shape(RequestId) == {
        1: (T_STRING, "client_id"),
        2: (TType.I64, "seq"),
        3: (TType.I64, "acked_below"),
    }
    assert shape(KeyValueService.get_result) == {0: (T_STRING, "success")}
    assert shape(KeyValueService.lookup_result) == {0: (T_STRUCT, "success")}
    assert shape(Lookup) == {1: (T_BOOL, "found"), 2: (T_STRING, "value")}


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("get", ("key-1",)),
        ("get", ("k" * 100_000,)),
        ("lookup", ("ключ",)),
        ("lookup", ("",)),  # (the handler refuses it, as the general path's does)
        ("put", ("key-1", "value-1")),
        ("put", ("ключ", "")),
        ("put", ("k", "v" * 100_000)),
        ("put_once", ("key-1", "value-1", RequestId(client_id="c-1", seq=9, acked_below=8))),
        ("put_once", ("k", "", RequestId(client_id="c", seq=-(2**63), acked_below=2**63 - 1))),
        ("put_once", ("k", "ü" * 1000, RequestId(client_id="c" * 128, seq=0, acked_below=0))),
    ],
)
def test_the_usual_calls_are_parsed_as_the_general_path_reads_them(
    method: str, args: tuple[Any, ...]
) -> None:
    frame = encode_call(method, args, seqid=12345)
    check_request(frame)
    assert parse_usual_call(frame) == decoded(frame)


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("put_once", ("key-1", "value-1", None)),  # no RequestId: the general path
        ("put_once", ("key-1", "value-1", RequestId(client_id="c", seq=1))),  # one unset
        ("get", (None,)),  # no key: the general path (the handler refuses it)
        ("get_many", (["key-1"],)),
        ("remove", ("key-1", RequestId(client_id="c", seq=1, acked_below=1))),
    ],
)
def test_other_requests_are_left_to_the_general_path(method: str, args: tuple[Any, ...]) -> None:
    assert parse_usual_call(encode_call(method, args)) is None


@pytest.mark.parametrize(
    "frame",
    [
        encode_call("put", ("key-1", "value-1")).replace(b"value-1", b"value\xff1"),
        call("get", field(T_STRING, 1) + string(b"k\xff")),  # invalid UTF-8
        call("get", field(T_STRING, 1) + string(b"k") + field(T_I32, 2) + b"\0\0\0\1"),
        call("lookup", field(T_STRING, 1) + string(b"k"), message_type=4),  # a ONEWAY
    ],
)
def test_odd_layouts_are_left_to_the_general_path(frame: bytes) -> None:
    assert parse_usual_call(frame) is None


@settings(
    max_examples=2000,  # (500 mutated frames a method)
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(method=st.sampled_from(["put", "put_once", "get", "lookup"]), seed=st.integers(0, 2**32 - 1))
def test_what_parse_usual_call_accepts_passes_the_check_and_decodes_alike(
    method: str, seed: int
) -> None:
    """parse_usual_call stands in for check_request and the decoder: whatever it accepts (the
    frame reader has matched the length header to the frame) they accept, with the same
    arguments."""
    frame = mutate(random.Random(seed), VALID_FRAMES[method])
    frame = struct.pack("!i", len(frame) - 4) + frame[4:]
    result = parse_usual_call(frame)
    if result is None:
        return
    check_request(frame)
    assert result == decoded(frame)


# --------------------------------------------------------------------------- read_reply


class _AnyHandler:
    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


_DISPATCHER = _Dispatcher(KeyValueService, _AnyHandler())


def general_reply(method: str, seqid: int, value: Any) -> bytes:
    """The reply the general path writes (thriftpy2's result struct)."""
    frames = Frames()
    _DISPATCHER.reply(codec(frames), method, seqid, value)
    return bytes(frames.outbox)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(value=st.text(), seqid=st.integers(-(2**31), 2**31 - 1), is_found=st.booleans())
def test_replies_to_reads_are_built_as_thriftpy2_writes_them(
    value: str, seqid: int, is_found: bool
) -> None:
    assert read_reply("get", seqid, value) == general_reply("get", seqid, value)
    found = Lookup(found=True, value=value) if is_found else Lookup(found=False)
    assert read_reply("lookup", seqid, found) == general_reply("lookup", seqid, found)


@pytest.mark.parametrize(
    ("method", "value"),
    [
        ("get", None),
        ("get", b"bytes"),
        ("get", "\ud800"),  # (no UTF-8 for a lone surrogate)
        ("lookup", Lookup(found=True, value=None)),
        ("lookup", Lookup(found=False, value="v")),
        ("lookup", "v"),
    ],
)
def test_a_reply_of_another_shape_is_left_to_the_general_path(method: str, value: Any) -> None:
    assert read_reply(method, 1, value) is None
