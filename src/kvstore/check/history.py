"""Operation records and the execution-log format (pure data: no network, no threads).

The log is the WatCA format: one event per line, fields separated by tabs, times in integer
nanoseconds since the start of the run::

    <ns> INV <tid> R <key>
    <ns> RES <tid> R <key> <value>      (value empty for a missing key: the line ends with a tab)
    <ns> INV <tid> W <key> <value>
    <ns> RES <tid> W <key>
    <ns> INV <tid> D <key>
    <ns> RES <tid> D <key> <1|0>        (1: the key existed and was deleted)
    <ns> INV <tid> C <key> <expected> <new>   (compare-and-set; expected empty: only if absent)
    <ns> RES <tid> C <key> <1|0>        (1: swapped)

As an :data:`Event`, a D invocation has value None; a C invocation has the value
``f"{expected}\t{new}"`` (one tab inside); D and C responses have the value "1" or "0".

Invariants:

- a thread runs one operation at a time, so a RES belongs to the latest INV of the same thread;
- an INV that has no RES before the thread's next INV (or the end of the log) is *pending*: its
  outcome is unknown, recorded as ``complete_ns is None`` (a pending read also has ``value None``);
- keys and values never contain tabs or newlines: writers rely on the caller for this, the parser
  relies on it to split fields;
- parsing is lenient in one way only: a read RES without its trailing empty value field reads "";
- a completed D or C op always carries its returned flag (``returned_flag``), a pending one never.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import TypeAlias

from kvstore.errors import KVError

READ = "R"
WRITE = "W"
DELETE = "D"
CAS = "C"
KINDS = (READ, WRITE, DELETE, CAS)

_INVOKE = "INV"
_RESPOND = "RES"
_FLAGS = ("1", "0")

Event: TypeAlias = tuple[int, bool, int, str, str, "str | None"]
"""One log line as data: ``(t_ns, is_response, tid, kind, key, value)``."""

StrPath: TypeAlias = "str | os.PathLike[str]"


class LogFormatError(KVError, ValueError):
    """A line of an execution log is malformed; the message names the line number."""


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of one thread on one key.

    - READ: ``value`` is what it returned ("" for an absent key);
    - WRITE: ``value`` is what it wrote;
    - DELETE: ``value`` is None; ``returned_flag`` says whether the key existed;
    - CAS: ``value`` is the new value, ``expected`` the value it required ("": absent);
      ``returned_flag`` says whether it swapped.

    ``complete_ns is None`` means pending (outcome unknown): a pending read has ``value None``,
    a pending delete or CAS has ``returned_flag None``.
    """

    tid: int
    kind: str
    key: str
    value: str | None
    invoke_ns: int
    complete_ns: int | None
    expected: str | None = None
    returned_flag: bool | None = None

    @property
    def is_pending(self) -> bool:
        return self.complete_ns is None


def describe(op: Op) -> str:
    """One operation for humans: thread, kind, key, value and its real-time interval."""
    done = "pending" if op.complete_ns is None else f"{op.complete_ns} ns"
    return f"tid {op.tid} {_action(op)} [{op.invoke_ns} ns, {done}]"


def _action(op: Op) -> str:
    outcome = "" if op.returned_flag is None else f" -> {int(op.returned_flag)}"
    if op.kind == DELETE:
        return f"delete {op.key!r}{outcome}"
    if op.kind == CAS:
        return f"cas {op.key!r} {op.expected!r} => {op.value!r}{outcome}"
    if op.kind == WRITE:
        return f"write {op.key!r} = {op.value!r}"
    return f"read {op.key!r} -> {op.value!r}"


def format_event(
    t_ns: int, is_response: bool, tid: int, kind: str, key: str, value: str | None
) -> str:
    """One log line, without its newline. ``value`` is ignored where the line has no value field.

    Raises ValueError for an unknown kind, a D/C response value other than "1" or "0", or a C
    invocation value that is not ``expected<TAB>new``.
    """
    event = _RESPOND if is_response else _INVOKE
    prefix = f"{t_ns}\t{event}\t{tid}\t{kind}\t{key}"
    if kind == READ:
        return f"{prefix}\t{value or ''}" if is_response else prefix
    if kind == WRITE:
        return prefix if is_response else f"{prefix}\t{value}"
    if kind not in (DELETE, CAS):
        raise ValueError(f"unknown operation kind {kind!r} (expected one of {KINDS})")
    if is_response:
        if value not in _FLAGS:
            raise ValueError(f"a {kind} response value must be '1' or '0', not {value!r}")
        return f"{prefix}\t{value}"
    if kind == DELETE:
        return prefix
    if value is None or value.count("\t") != 1:
        raise ValueError(f"a CAS invocation value must be 'expected<TAB>new', not {value!r}")
    return f"{prefix}\t{value}"


def cas_value(expected: str, new: str) -> str:
    """The Event value of a CAS invocation."""
    return f"{expected}\t{new}"


def flag_value(flag: bool) -> str:
    """The Event value of a D or C response: "1" for True, "0" for False."""
    return "1" if flag else "0"


def op_events(op: Op) -> list[Event]:
    """The log events of one operation: its INV, and its RES unless it is pending."""
    events: list[Event] = [(op.invoke_ns, False, op.tid, op.kind, op.key, _invoked_value(op))]
    if op.complete_ns is not None:
        events.append((op.complete_ns, True, op.tid, op.kind, op.key, _returned_value(op)))
    return events


def _invoked_value(op: Op) -> str | None:
    if op.kind == WRITE:
        return op.value
    if op.kind == CAS:
        return cas_value(op.expected or "", op.value or "")
    return None


def _returned_value(op: Op) -> str | None:
    if op.kind == READ:
        return op.value
    if op.kind in (DELETE, CAS):
        return flag_value(bool(op.returned_flag))
    return None


def write_events(path: StrPath, events: Iterable[Event]) -> None:
    """Write ``events`` to ``path`` as a log, sorted by time (stably: ties keep their order)."""
    ordered = sorted(events, key=itemgetter(0))
    with open(path, "w", encoding="utf-8", newline="\n") as log:
        log.writelines(f"{format_event(*event)}\n" for event in ordered)


def parse_event(line: str, line_no: int = 0) -> Event | None:
    """Decode one log line; None for a blank line. Raises LogFormatError naming ``line_no``."""
    fields = line.rstrip("\r\n").split("\t")
    try:
        t_ns, event, tid = int(fields[0]), fields[1], int(fields[2])
        kind, key = fields[3], fields[4]
    except (ValueError, IndexError):
        if not line.strip():
            return None
        problem = "expected <ns> <INV|RES> <tid> <R|W|D|C> <key> [<value>...]"
        raise _malformed(line_no, line, problem) from None
    field_count = len(fields)
    if event == _INVOKE:
        if field_count == 6 and kind == WRITE:
            return (t_ns, False, tid, kind, key, fields[5])
        if field_count == 5 and kind in (READ, DELETE):
            return (t_ns, False, tid, kind, key, None)
        if field_count == 7 and kind == CAS:
            return (t_ns, False, tid, kind, key, f"{fields[5]}\t{fields[6]}")
    elif event == _RESPOND:
        if kind == READ and field_count <= 6:
            return (t_ns, True, tid, kind, key, fields[5] if field_count == 6 else "")
        if kind == WRITE and field_count == 5:
            return (t_ns, True, tid, kind, key, None)
        if kind in (DELETE, CAS) and field_count == 6 and fields[5] in _FLAGS:
            return (t_ns, True, tid, kind, key, fields[5])
    problem = f"not a valid {event!r} {kind!r} line with {field_count} fields"
    raise _malformed(line_no, line, problem)


def parse_log(lines: Iterable[str]) -> list[Op]:
    """Pair each thread's INV with its RES; unanswered INVs become pending ops.

    Ops are returned in the order of their INV lines.
    """
    with gc_paused():
        return _paired_ops(lines)


def read_log(path: StrPath) -> list[Op]:
    """Parse the log file at ``path``."""
    with open(path, encoding="utf-8") as log:
        return parse_log(log)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building millions of acyclic records.

    Each allocation burst would otherwise trigger collections that rescan every record built
    so far (about a third of the parse time on a 1M-operation log).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _paired_ops(lines: Iterable[str]) -> list[Op]:
    ops: list[Op | None] = []
    open_by_tid: dict[int, tuple[int, int, Event]] = {}  # tid -> (slot in ops, line_no, INV)
    for line_no, line in enumerate(lines, 1):
        event = parse_event(line, line_no)
        if event is None:
            continue
        tid = event[2]
        if not event[1]:
            earlier = open_by_tid.get(tid)
            if earlier is not None:
                ops[earlier[0]] = _pending_op(earlier[2])
            open_by_tid[tid] = (len(ops), line_no, event)
            ops.append(None)
            continue
        opened = open_by_tid.pop(tid, None)
        if opened is None:
            raise _malformed(line_no, line, f"a response of thread {tid} with no invocation")
        ops[opened[0]] = _completed_op(opened[2], event, line_no, opened[1])
    for slot, _, invocation in open_by_tid.values():
        ops[slot] = _pending_op(invocation)
    return ops  # type: ignore[return-value]  # every slot was filled above


def _pending_op(invocation: Event) -> Op:
    t_ns, _, tid, kind, key, value = invocation
    if kind == WRITE:
        return Op(tid, kind, key, value, t_ns, None)
    if kind == CAS:
        expected, new = _split_cas(value)
        return Op(tid, kind, key, new, t_ns, None, expected)
    return Op(tid, kind, key, None, t_ns, None)


def _completed_op(invocation: Event, response: Event, line_no: int, invoke_line_no: int) -> Op:
    invoke_ns, _, tid, kind, key, written = invocation
    complete_ns, _, _, response_kind, response_key, returned = response
    if response_kind != kind or response_key != key:
        raise LogFormatError(
            f"line {line_no}: response {response_kind} {response_key!r} of thread {tid} does not "
            f"match its invocation {kind} {key!r} on line {invoke_line_no}"
        )
    if complete_ns < invoke_ns:
        raise LogFormatError(
            f"line {line_no}: response of thread {tid} at {complete_ns} ns precedes its "
            f"invocation at {invoke_ns} ns on line {invoke_line_no}"
        )
    if kind == READ:
        return Op(tid, kind, key, returned, invoke_ns, complete_ns)
    if kind == WRITE:
        return Op(tid, kind, key, written, invoke_ns, complete_ns)
    is_hit = returned == "1"
    if kind == DELETE:
        return Op(tid, kind, key, None, invoke_ns, complete_ns, None, is_hit)
    expected, new = _split_cas(written)
    return Op(tid, kind, key, new, invoke_ns, complete_ns, expected, is_hit)


def _split_cas(value: str | None) -> tuple[str, str]:
    """``(expected, new)`` from a CAS invocation's Event value (validated by the parser)."""
    expected, _, new = (value or "").partition("\t")
    return expected, new


def _malformed(line_no: int, line: str, problem: str) -> LogFormatError:
    return LogFormatError(f"line {line_no}: malformed log line ({problem}): {line.rstrip()!r}")
