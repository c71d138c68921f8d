"""The on-disk record format of the write-ahead log and snapshots (see wal.py for the files).

A record is ``<u32 length><u32 crc32 of payload><u32 crc32 of the first 8 bytes><payload>``
(the header has its own checksum, so a damaged length is not mistaken for a torn write).
A payload is a kind byte and length-prefixed UTF-8 fields: ``P key value`` (put) or
``D key`` (delete), each optionally followed by an exactly-once record ``client_id seq
acked_below``; ``R key client_id seq outcome`` (a record alone, in snapshots);
``S first_segment`` (a snapshot's header); ``M epoch position log_id`` (a marker: how far
a backup's copy goes in a primary's log, see wal.py); ``B ...`` (a snapshot's stripe, many
puts at once, see :func:`encode_bulk`).

Decoding checks every record's checksums: a damaged record at the very end of a file is a
torn write (cut off, if allowed), anywhere else it is corruption (:class:`CorruptLogError`).
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from kvstore import errors

log = logging.getLogger(__name__)

HEADER = struct.Struct(">III")
_HEADER_CHECKED = struct.Struct(">II")
_LEN = struct.Struct(">I")
_I64 = struct.Struct(">q")
_I64X2 = struct.Struct(">qq")
_BULK_WITH_LENGTHS = 1 << 31
PUT, DELETE, RECORD, SNAPSHOT_HEADER, MARKER, BULK = b"P", b"D", b"R", b"S", b"M", b"B"

# (client_id, seq, acked_below) of an exactly-once write
ExactlyOnce = tuple[str, int, int]
# (epoch, log_id, position) of a primary's log: how far a backup's copy goes
Marker = tuple[int, str, int]


class CorruptLogError(errors.KVError):
    """A log or snapshot file is damaged before its end: refusing to start. ``damage``: what
    is wrong, without what a node does about it (``consequence``: kv dump --data-dir
    rescues what it can instead)."""

    def __init__(self, damage: str, consequence: str = "") -> None:
        super().__init__(f"{damage}; {consequence}" if consequence else damage)
        self.damage = damage


@dataclass(frozen=True, slots=True)
class Mutation:
    """One decoded record."""

    kind: bytes
    key: str
    value: str | None = None
    record: ExactlyOnce | None = None
    outcome: bool = True
    bulk: tuple[list[str], list[str]] | None = None  # (keys, values) of a BULK record


# --------------------------------------------------------------------------- encoding


def _text(value: str) -> bytes:
    data = value.encode()
    return _LEN.pack(len(data)) + data


def encode(key: str, value: str | None, record: ExactlyOnce | None = None) -> bytes:
    """A put (or a delete, ``value`` None) as one framed record."""
    parts = [PUT if value is not None else DELETE, _text(key)]
    if value is not None:
        parts.append(_text(value))
    if record is not None:
        parts += [_text(record[0]), _I64.pack(record[1]), _I64.pack(record[2])]
    return frame(b"".join(parts))


def encode_record(key: str, client_id: str, seq: int, outcome: bool, floor: int = 0) -> bytes:
    """A snapshot's exactly-once record; ``floor``: its client's (see sessions.py), written
    before the outcome byte, which stays last (a node of an earlier version reads the
    record without the floor)."""
    outcome_byte = b"\1" if outcome else b"\0"
    payload = RECORD + _text(key) + _text(client_id) + _I64X2.pack(seq, floor) + outcome_byte
    return frame(payload)


def encode_marker(marker: Marker) -> bytes:
    epoch, log_id, position = marker
    return frame(MARKER + _I64.pack(epoch) + _I64.pack(position) + _text(log_id))


def encode_snapshot_header(first_segment: int) -> bytes:
    return frame(SNAPSHOT_HEADER + _I64.pack(first_segment))


def frame(payload: bytes) -> bytes:
    checked = _HEADER_CHECKED.pack(len(payload), zlib.crc32(payload))
    return checked + _LEN.pack(zlib.crc32(checked)) + payload


def encode_bulk(keys: list[str], values: list[str]) -> bytes:
    """Many puts as one record (snapshots), decoded with a few C calls instead of one record
    per key: ``B count`` and all keys, then all values, as one UTF-8 text, each followed by
    NUL; if any key or value holds a NUL, ``B count`` with the flag bit 2**31, then every
    key's and every value's length in characters (u32 little-endian), then the text."""
    text = "\0".join([*keys, *values, ""])
    if text.count("\0") == 2 * len(keys):
        return frame(b"".join((BULK, _LEN.pack(len(keys)), text.encode())))
    lengths = array("I", map(len, keys))
    lengths.extend(map(len, values))
    if sys.byteorder == "big":
        lengths.byteswap()
    text = "".join(keys) + "".join(values)
    count = _LEN.pack(len(keys) | _BULK_WITH_LENGTHS)
    return frame(b"".join((BULK, count, lengths.tobytes(), text.encode())))


def _decode_bulk(data: bytes, start: int, end: int) -> Mutation:
    (count,) = _LEN.unpack_from(data, start + 1)
    at = start + 1 + _LEN.size
    if not count & _BULK_WITH_LENGTHS:
        pieces = data[at:end].decode().split("\0")
        if len(pieces) != 2 * count + 1 or pieces[-1]:
            raise ValueError("a bulk record's text does not hold its entries")
        return Mutation(BULK, "", bulk=(pieces[:count], pieces[count:-1]))
    count &= ~_BULK_WITH_LENGTHS
    text_at = at + 8 * count
    if text_at > end:
        raise ValueError("bulk lengths run past their record")
    lengths = array("I")
    lengths.frombytes(data[at:text_at])
    if sys.byteorder == "big":
        lengths.byteswap()
    text = data[text_at:end].decode()
    if sum(lengths) != len(text):
        raise ValueError("bulk lengths do not add up to its text")
    ends = list(accumulate(lengths))
    pieces = [text[a:b] for a, b in zip([0, *ends][:-1], ends, strict=True)]
    return Mutation(BULK, "", bulk=(pieces[:count], pieces[count:]))


def decode(payload: bytes) -> Mutation:
    return decode_at(payload, 0, len(payload))


def decode_at(data: bytes, start: int, end: int) -> Mutation:
    """The record whose payload is ``data[start:end]`` (no copy of the payload)."""
    kind = data[start : start + 1]
    if kind in (PUT, DELETE):  # the hot path of log replay
        (size,) = _LEN.unpack_from(data, start + 1)
        at = start + 1 + _LEN.size + size
        key = data[start + 1 + _LEN.size : at].decode()
        value = None
        if kind == PUT:
            (size,) = _LEN.unpack_from(data, at)
            value = data[at + _LEN.size : at + _LEN.size + size].decode()
            at += _LEN.size + size
        record = None
        if at < end:
            (size,) = _LEN.unpack_from(data, at)
            client_id = data[at + _LEN.size : at + _LEN.size + size].decode()
            at += _LEN.size + size
            seq, acked_below = _I64X2.unpack_from(data, at)
            record, at = (client_id, seq, acked_below), at + _I64X2.size
        if at != end:
            raise ValueError("fields do not fill their record")
        return Mutation(kind, key, value, record)
    if kind == BULK:
        return _decode_bulk(data, start, end)
    return _decode_other(kind, data[start + 1 : end])


class _Reader:
    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def text(self) -> str:
        (size,) = _LEN.unpack_from(self.data, self.offset)
        start = self.offset + _LEN.size
        self.offset = start + size
        if self.offset > len(self.data):
            raise ValueError("field runs past its record")
        return self.data[start : self.offset].decode()

    def i64(self) -> int:
        (value,) = _I64.unpack_from(self.data, self.offset)
        self.offset += _I64.size
        return int(value)


def _decode_other(kind: bytes, body: bytes) -> Mutation:
    reader = _Reader(body)
    if kind == SNAPSHOT_HEADER:
        return Mutation(kind, "", record=("", reader.i64(), 0))
    if kind == MARKER:
        epoch, position = reader.i64(), reader.i64()
        return Mutation(kind, "", record=(reader.text(), epoch, position))
    if kind == RECORD:  # (without a floor: written by an earlier version)
        key, client_id, seq = reader.text(), reader.text(), reader.i64()
        floor = reader.i64() if reader.offset + 1 < len(body) else 0
        return Mutation(kind, key, record=(client_id, seq, floor), outcome=body[-1:] == b"\1")
    raise ValueError(f"unknown record kind {kind!r}")


def read_records(path: Path, is_torn_tail_allowed: bool) -> Iterator[Mutation]:
    """Every record of a file. A damaged record at the very end is a torn write: the file
    is cut there (if allowed); anywhere else it is corruption (CorruptLogError)."""

    def cut(offset: int, problem: str) -> None:
        log.warning("%s: cutting a torn last record at offset %d (%s)", path, offset, problem)
        with open(path, "r+b") as file:
            file.truncate(offset)
            os.fsync(file.fileno())

    for _, _, mutation in scan(path.read_bytes(), str(path), cut if is_torn_tail_allowed else None):
        yield mutation


def scan(
    data: bytes, where: str, on_torn_tail: Callable[[int, str], None] | None = None
) -> Iterator[tuple[int, int, Mutation]]:
    """(offset, end, record) of every record in ``data`` (read from ``where``). A damaged
    record raises CorruptLogError, unless it is a torn tail and ``on_torn_tail`` is given:
    that is called with its offset and the problem, and the scan ends there."""
    view = memoryview(data)
    unpack_header, crc32, total = HEADER.unpack_from, zlib.crc32, len(data)
    offset = 0
    while offset < total:
        if offset + HEADER.size <= total:  # the fast path: a whole, intact record
            size, crc, header_crc = unpack_header(data, offset)
            start, end = offset + HEADER.size, offset + HEADER.size + size
            if (
                end <= total
                and crc32(view[offset : offset + _HEADER_CHECKED.size]) == header_crc
                and crc32(view[start:end]) == crc
            ):
                try:
                    yield offset, end, decode_at(data, start, end)
                except (ValueError, struct.error, UnicodeDecodeError) as exc:
                    raise CorruptLogError(
                        f"{where}: undecodable record at offset {offset}: {exc}"
                    ) from None
                offset = end
                continue
        problem = check_record(data, offset) or "damaged"
        if on_torn_tail is not None and _is_tail(data, offset):
            on_torn_tail(offset, problem)
            return
        raise CorruptLogError(
            f"{where} is damaged at offset {offset} ({problem})",
            "refusing to start. Move the data directory aside to start this node empty: it "
            "then copies the store from the primary, if another node holds it (if none does, "
            "keep the directory: it holds the data, up to the damage)",
        )


def whole_records(data: bytes) -> int:
    """The length of the longest run of whole records at the start of ``data`` (by their
    headers; checksums are checked by whoever decodes them)."""
    offset, total = 0, len(data)
    while offset + HEADER.size <= total:
        end = offset + HEADER.size + HEADER.unpack_from(data, offset)[0]
        if end > total:
            break
        offset = end
    return offset


def check_record(data: bytes, offset: int) -> str | None:
    if offset + HEADER.size > len(data):
        return "truncated header"
    size, crc, header_crc = HEADER.unpack_from(data, offset)
    if zlib.crc32(data[offset : offset + _HEADER_CHECKED.size]) != header_crc:
        return "header checksum mismatch"
    end = offset + HEADER.size + size
    if end > len(data):
        return "truncated record"
    if zlib.crc32(data[offset + HEADER.size : end]) != crc:
        return "checksum mismatch"
    return None


def _is_tail(data: bytes, offset: int) -> bool:
    """A bad record is the torn tail if a crash in the middle of one append explains it: its
    header is incomplete, or intact but its payload runs to the end of the file."""
    if offset + HEADER.size > len(data):
        return True
    size, _, header_crc = HEADER.unpack_from(data, offset)
    if zlib.crc32(data[offset : offset + _HEADER_CHECKED.size]) != header_crc:
        return False
    return offset + HEADER.size + size >= len(data)
