"""Operation records and the execution-log format (pure data: no network, no threads).

The log is the WatCA format: one event per line, fields separated by tabs, times in integer
nanoseconds since the start of the run::

    <ns> INV <tid> R <key>
    <ns> RES <tid> R <key> <value>      (value empty for a missing key: the line ends with a tab)
    <ns> INV <tid> W <key> <value>
    <ns> RES <tid> W <key>

Invariants:

- a thread runs one operation at a time, so a RES belongs to the latest INV of the same thread;
- an INV that has no RES before the thread's next INV (or the end of the log) is *pending*: its
  outcome is unknown, recorded as ``complete_ns is None`` (a pending read also has ``value None``);
- keys and values never contain tabs or newlines: writers rely on the caller for this, the parser
  relies on it to split fields;
- parsing is lenient in one way only: a read RES without its trailing empty value field reads "".
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

_INVOKE = "INV"
_RESPOND = "RES"

Event: TypeAlias = tuple[int, bool, int, str, str, "str | None"]
"""One log line as data: ``(t_ns, is_response, tid, kind, key, value)``."""

StrPath: TypeAlias = "str | os.PathLike[str]"


class LogFormatError(KVError, ValueError):
    """A line of an execution log is malformed; the message names the line number."""


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of one thread: a write of ``value``, or a read that returned ``value``.

    ``complete_ns is None`` means pending (outcome unknown); a pending read has ``value None``.
    """

    tid: int
    kind: str
    key: str
    value: str | None
    invoke_ns: int
    complete_ns: int | None

    @property
    def is_pending(self) -> bool:
        return self.complete_ns is None


def format_event(
    t_ns: int, is_response: bool, tid: int, kind: str, key: str, value: str | None
) -> str:
    """One log line, without its newline. ``value`` is ignored where the line has no value field."""
    if kind == READ:
        if is_response:
            return f"{t_ns}\t{_RESPOND}\t{tid}\t{READ}\t{key}\t{value or ''}"
        return f"{t_ns}\t{_INVOKE}\t{tid}\t{READ}\t{key}"
    if kind == WRITE:
        if is_response:
            return f"{t_ns}\t{_RESPOND}\t{tid}\t{WRITE}\t{key}"
        return f"{t_ns}\t{_INVOKE}\t{tid}\t{WRITE}\t{key}\t{value}"
    raise ValueError(f"unknown operation kind {kind!r} (expected {READ!r} or {WRITE!r})")


def op_events(op: Op) -> list[Event]:
    """The log events of one operation: its INV, and its RES unless it is pending."""
    written = op.value if op.kind == WRITE else None
    events: list[Event] = [(op.invoke_ns, False, op.tid, op.kind, op.key, written)]
    if op.complete_ns is not None:
        returned = op.value if op.kind == READ else None
        events.append((op.complete_ns, True, op.tid, op.kind, op.key, returned))
    return events


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
        problem = "expected <ns> <INV|RES> <tid> <R|W> <key> [<value>]"
        raise _malformed(line_no, line, problem) from None
    field_count = len(fields)
    if kind == READ:
        if event == _INVOKE and field_count == 5:
            return (t_ns, False, tid, kind, key, None)
        if event == _RESPOND and field_count <= 6:
            return (t_ns, True, tid, kind, key, fields[5] if field_count == 6 else "")
    elif kind == WRITE:
        if event == _INVOKE and field_count == 6:
            return (t_ns, False, tid, kind, key, fields[5])
        if event == _RESPOND and field_count == 5:
            return (t_ns, True, tid, kind, key, None)
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
    return Op(tid, kind, key, value if kind == WRITE else None, t_ns, None)


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
    return Op(tid, kind, key, returned if kind == READ else written, invoke_ns, complete_ns)


def _malformed(line_no: int, line: str, problem: str) -> LogFormatError:
    return LogFormatError(f"line {line_no}: malformed log line ({problem}): {line.rstrip()!r}")
