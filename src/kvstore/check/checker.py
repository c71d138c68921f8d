"""Linearizability checker for histories of independent registers with read, write, delete and
compare-and-set (pure; no I/O besides reading a log file).

Model and invariants:

- every key is an independent register whose initial value is "" (absent: "" and absent are the
  same value); the register's sequential specification is :mod:`kvstore.check.register`;
- op A precedes op B in real time iff ``A.complete_ns < B.invoke_ns``: equal times are concurrent;
- a pending read is dropped; a pending write, delete or CAS may take effect at any time after its
  invocation (its completion counts as +infinity), or never;
- a verdict is per key: OK, a violation, or UNKNOWN (the search ran out of steps) -- never a guess.

Two algorithms, chosen per key:

- a key with only reads and writes goes to the zone algorithm below, which needs unique write
  values per key (a repeated value, or a write of "", is an input error: the key is reported as
  "duplicate write value" and not checked further);
- a key with any delete or CAS goes to the general search (:mod:`kvstore.check.search`: Wing &
  Gong with Lowe's memoization, as Porcupine does), bounded by ``max_search_steps`` per key; it
  reports "no linearization" with the ops at its deepest dead end.

Zone algorithm (Gibbons & Korach 1997; Golab, Li & Shah, PODC 2011), O(n log n) per key: a write and
the reads that returned its value form a *cluster* (the initial value is a virtual write at
-infinity). Let f be the earliest completion and s the latest invocation in a cluster. In every
linearization a cluster is one contiguous block, so cluster A must come before cluster B whenever
``f_A < s_B`` (some op of A precedes some op of B). Any cycle of that relation contains a 2-cycle,
so, once each read has a write it does not precede, the history is linearizable iff no two clusters
have ``f_A < s_B and f_B < s_A``. In zones (forward (f, s) if f < s, else backward [s, f]):

- two forward zones conflict iff their open intervals intersect (sharing an endpoint is fine);
- a backward zone conflicts with a forward zone iff it lies strictly inside it:
  ``f_A < s_B <= f_B < s_A``;
- two backward zones never conflict.
"""

from __future__ import annotations

import math
import sys
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from operator import attrgetter, itemgetter
from typing import TextIO

from kvstore.check import register, search
from kvstore.check.history import (
    CAS,
    DELETE,
    READ,
    WRITE,
    Event,
    LogFormatError,
    Op,
    StrPath,
    describe,
    format_event,
    gc_paused,
    parse_log,
    read_log,
    write_events,
)

DEFAULT_MAX_VIOLATIONS_PER_KEY = 3
DEFAULT_MAX_SEARCH_STEPS = search.DEFAULT_MAX_STEPS

EXIT_OK = 0
EXIT_VIOLATIONS = 1
EXIT_UNREADABLE = 2
EXIT_UNKNOWN = 3

STALE_READ = "stale read"
TWO_VALUES_CURRENT = "two values current at once"
NEVER_WRITTEN = "read of a never-written value"
READ_FROM_FUTURE = "read from the future"
DUPLICATE_WRITE = "duplicate write value"
NO_LINEARIZATION = "no linearization"


@dataclass(frozen=True, slots=True)
class Violation:
    """Why one key's history is not linearizable, with the operations that show it."""

    key: str
    reason: str
    ops: tuple[Op, ...]
    detail: str = ""


@dataclass(frozen=True, slots=True)
class UnknownKey:
    """A key the search could not decide within its step budget: neither OK nor a violation."""

    key: str
    op_count: int
    steps: int


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict on a whole history. ``op_count`` counts every record, pending ones included.

    ``is_ok`` only if every key was decided linearizable: no violations and no unknown keys.
    """

    is_ok: bool
    op_count: int
    key_count: int
    violations: list[Violation]
    unknown_keys: list[UnknownKey] = field(default_factory=list)

    @property
    def violating_key_count(self) -> int:
        return len({violation.key for violation in self.violations})

    @property
    def verdict(self) -> str:
        """One of "OK", "NOT LINEARIZABLE" (violations win) or "UNKNOWN" (some key undecided)."""
        if self.violations:
            return "NOT LINEARIZABLE"
        return "UNKNOWN" if self.unknown_keys else "OK"

    @property
    def exit_code(self) -> int:
        """What kv-check exits with for this result (see :func:`run_check`)."""
        if self.violations:
            return EXIT_VIOLATIONS
        return EXIT_UNKNOWN if self.unknown_keys else EXIT_OK


class _Cluster:
    """A write (None: the initial value) and the completed reads that returned its value."""

    __slots__ = (
        "first_done",
        "last_start",
        "max_invoke_ns",
        "min_complete_ns",
        "read_count",
        "value",
        "write",
    )

    def __init__(self, value: str, write: Op | None) -> None:
        self.value = value
        self.write = write
        self.read_count = 0
        self.first_done = write  # the op completing first (None: the virtual initial write)
        self.last_start = write  # the op invoked last
        if write is None:
            self.min_complete_ns: float = -math.inf
            self.max_invoke_ns: float = -math.inf
        else:
            done = write.complete_ns
            self.min_complete_ns = math.inf if done is None else done
            self.max_invoke_ns = write.invoke_ns

    def add_read(self, read: Op) -> None:
        """Add a completed read of this cluster's value."""
        done = read.complete_ns
        assert done is not None, "pending reads are dropped before clustering"
        self.read_count += 1
        if done < self.min_complete_ns:
            self.min_complete_ns = done
            self.first_done = read
        if read.invoke_ns > self.max_invoke_ns:
            self.max_invoke_ns = read.invoke_ns
            self.last_start = read

    @property
    def is_forward(self) -> bool:
        return self.min_complete_ns < self.max_invoke_ns

    @property
    def is_live(self) -> bool:
        """False for a cluster that constrains nothing: no reads and no completed write."""
        has_completed_write = self.write is not None and self.write.complete_ns is not None
        return self.read_count > 0 or has_completed_write


def check_events(events: Iterable[Event], keep_at: StrPath | None = None) -> CheckResult:
    """The verdict on a run's events (as kv-check would give on their log), also written to
    ``keep_at`` as an execution log if given (to look at after a failure)."""
    ordered = sorted(events, key=itemgetter(0))
    if keep_at is not None:
        write_events(keep_at, ordered)
    return check(parse_log(format_event(*event) for event in ordered))


def check(
    ops: Iterable[Op],
    max_violations_per_key: int = DEFAULT_MAX_VIOLATIONS_PER_KEY,
    max_search_steps: int = DEFAULT_MAX_SEARCH_STEPS,
) -> CheckResult:
    """Check a history; reports every violating key, at most ``max_violations_per_key`` each.

    A key with a delete or CAS is searched for at most ``max_search_steps`` steps, after which
    it is reported in ``unknown_keys``.
    """
    ops_by_key: dict[str, list[Op]] = defaultdict(list)
    violations: list[Violation] = []
    unknown: list[UnknownKey] = []
    with gc_paused():
        for op in ops:
            ops_by_key[op.key].append(op)
        for key, key_ops in ops_by_key.items():
            if any(op.kind in (DELETE, CAS) for op in key_ops):
                found = _searched_key(key, key_ops, max_search_steps)
                if isinstance(found, UnknownKey):
                    unknown.append(found)
                elif found is not None:
                    violations.append(found)
            else:
                violations.extend(islice(_key_violations(key, key_ops), max_violations_per_key))
    op_count = sum(len(key_ops) for key_ops in ops_by_key.values())
    is_ok = not violations and not unknown
    return CheckResult(is_ok, op_count, len(ops_by_key), violations, unknown)


def check_file(path: StrPath, max_search_steps: int = DEFAULT_MAX_SEARCH_STEPS) -> CheckResult:
    """Check the log file at ``path``."""
    return check(read_log(path), max_search_steps=max_search_steps)


def run_check(
    path: StrPath,
    out: TextIO | None = None,
    max_search_steps: int = DEFAULT_MAX_SEARCH_STEPS,
    err: TextIO | None = None,
    error_prefix: str = "ERROR: ",
) -> int:
    """Check a log and print the verdict to ``out`` (default stdout), or why it cannot be
    read to ``err`` (default ``out``) after ``error_prefix``; returns the exit code.

    Exit codes: 0 (EXIT_OK) linearizable; 1 (EXIT_VIOLATIONS) violations found (whether or not
    some keys are also undecided); 2 (EXIT_UNREADABLE) the log cannot be read or parsed;
    3 (EXIT_UNKNOWN) no violations, but some keys undecided within ``max_search_steps``.
    """
    out = sys.stdout if out is None else out
    try:
        result = check_file(path, max_search_steps)
    except (OSError, LogFormatError) as error:
        why = (
            f"cannot read {path}: {error.strerror or error}"
            if isinstance(error, OSError)
            else error
        )
        print(f"{error_prefix}{why}", file=out if err is None else err)
        return EXIT_UNREADABLE
    if result.is_ok:
        print(f"OK ({result.op_count} operations, {result.key_count} keys)", file=out)
        return EXIT_OK
    for violation in result.violations:
        print(f"VIOLATION key={violation.key!r}: {violation.reason}: {violation.detail}", file=out)
        for op in violation.ops:
            print(f"    {describe(op)}", file=out)
    for unknown in result.unknown_keys:
        print(
            f"UNKNOWN key={unknown.key!r}: undecided after {unknown.steps} search steps "
            f"({unknown.op_count} operations)",
            file=out,
        )
    print(_summary(result), file=out)
    return result.exit_code


def _summary(result: CheckResult) -> str:
    counts = f"of {result.key_count} keys ({result.op_count} operations)"
    undecided = f"{len(result.unknown_keys)} keys undecided {counts}"
    if not result.violations:
        return f"UNKNOWN: no violations, {undecided}"
    violated = f"{len(result.violations)} violations on {result.violating_key_count} {counts}"
    return f"NOT LINEARIZABLE: {violated}" + (f"; {undecided}" if result.unknown_keys else "")


def _searched_key(key: str, ops: list[Op], max_steps: int) -> Violation | UnknownKey | None:
    """Check one key by search: None if linearizable."""
    constraining = [op for op in ops if register.is_constraining(op)]
    found = search.linearize(constraining, register.step, register.INITIAL_STATE, max_steps)
    if found.outcome == search.OK:
        return None
    if found.outcome == search.UNKNOWN:
        return UnknownKey(key, len(ops), found.steps)
    return Violation(key, NO_LINEARIZATION, *_dead_end(found, constraining))


def _dead_end(found: search.SearchResult[str], ops: list[Op]) -> tuple[tuple[Op, ...], str]:
    """The ops to show for a key with no linearization, and what they show."""
    stuck = [ops[index] for index in found.stuck]
    state = found.stuck_state
    if not found.prefix_tail:
        return tuple(stuck), f"none of the operations below can come first (value {state!r})"
    detail = (
        f"the longest legal order found covers {found.prefix_length} of {len(ops)} operations "
        f"and ends with the first one below; the value is then {state!r} and none of the others "
        "(the earliest to complete first) can come next"
    )
    return (ops[found.prefix_tail[-1]], *stuck), detail


def _key_violations(key: str, ops: list[Op]) -> Iterator[Violation]:
    writes = [op for op in ops if op.kind == WRITE]
    reads = [op for op in ops if op.kind == READ and op.complete_ns is not None]
    clusters, duplicates = _write_clusters(writes)
    if duplicates:
        yield from (_duplicate(key, pair) for pair in duplicates)
        return
    unwritten = _add_reads(clusters, reads)
    yield from (_never_written(key, value, value_reads) for value, value_reads in unwritten.items())
    live = [cluster for cluster in clusters.values() if cluster.is_live]
    yield from _future_reads(key, live)
    yield from _zone_conflicts(key, live)


def _write_clusters(writes: list[Op]) -> tuple[dict[str, _Cluster], list[tuple[Op | None, Op]]]:
    """One cluster per written value plus the initial one; and the writes repeating a value."""
    clusters = {"": _Cluster("", None)}
    duplicates: list[tuple[Op | None, Op]] = []
    for write in writes:
        value = write.value or ""
        earlier = clusters.get(value)
        if earlier is not None:
            duplicates.append((earlier.write, write))
        else:
            clusters[value] = _Cluster(value, write)
    return clusters, duplicates


def _add_reads(clusters: dict[str, _Cluster], reads: list[Op]) -> dict[str, list[Op]]:
    """Put each read in its value's cluster; returns the reads of values nobody wrote."""
    unwritten: dict[str, list[Op]] = defaultdict(list)
    for read in reads:
        cluster = clusters.get(read.value or "")
        if cluster is None:
            unwritten[read.value or ""].append(read)
        else:
            cluster.add_read(read)
    return unwritten


def _future_reads(key: str, clusters: list[_Cluster]) -> Iterator[Violation]:
    """A read that completed before its value's write was invoked."""
    for cluster in clusters:
        write = cluster.write
        if write is not None and cluster.min_complete_ns < write.invoke_ns:
            read = cluster.first_done
            assert read is not None  # the earliest completion is a read here
            detail = (
                f"a read returned {cluster.value!r} at {read.complete_ns} ns, "
                f"before its write began at {write.invoke_ns} ns"
            )
            yield Violation(key, READ_FROM_FUTURE, (write, read), detail)


def _zone_conflicts(key: str, clusters: list[_Cluster]) -> Iterator[Violation]:
    """Pairs of clusters each of which must precede the other (see the module docstring)."""
    forward = sorted((c for c in clusters if c.is_forward), key=attrgetter("min_complete_ns"))
    backward = [c for c in clusters if not c.is_forward]
    yield from _overlapping_forward_zones(key, forward)
    yield from _backward_zones_inside_forward(key, forward, backward)


def _overlapping_forward_zones(key: str, forward: list[_Cluster]) -> Iterator[Violation]:
    """Forward zones sorted by start: each one against the earlier zone reaching furthest right."""
    furthest: _Cluster | None = None
    for zone in forward:
        if furthest is not None and zone.min_complete_ns < furthest.max_invoke_ns:
            yield _conflict(key, furthest, zone)
        if furthest is None or zone.max_invoke_ns > furthest.max_invoke_ns:
            furthest = zone


def _backward_zones_inside_forward(
    key: str, forward: list[_Cluster], backward: list[_Cluster]
) -> Iterator[Violation]:
    """For [s_B, f_B], the forward zones with f_A < s_B form a prefix; need max s_A > f_B."""
    if not forward or not backward:
        return
    starts = [zone.min_complete_ns for zone in forward]
    furthest_so_far: list[_Cluster] = []
    for zone in forward:
        if not furthest_so_far or zone.max_invoke_ns > furthest_so_far[-1].max_invoke_ns:
            furthest_so_far.append(zone)
        else:
            furthest_so_far.append(furthest_so_far[-1])
    for zone in backward:
        count = bisect_left(starts, zone.max_invoke_ns)
        if count and furthest_so_far[count - 1].max_invoke_ns > zone.min_complete_ns:
            yield _conflict(key, furthest_so_far[count - 1], zone)


def _conflict(key: str, first: _Cluster, second: _Cluster) -> Violation:
    """``first`` must precede ``second`` (f1 < s2) and follow it (f2 < s1)."""
    is_stale = first.write is None or second.write is None or not second.is_forward
    reason = STALE_READ if is_stale else TWO_VALUES_CURRENT
    detail = (
        f"value {first.value!r} must come before {second.value!r} "
        f"({_precedes(first.first_done, second.last_start)}) and after it "
        f"({_precedes(second.first_done, first.last_start)})"
    )
    witnesses = (first.first_done, second.last_start, second.first_done, first.last_start)
    ops = tuple(sorted(set(op for op in witnesses if op is not None), key=_op_order))
    return Violation(key, reason, ops, detail)


def _precedes(earlier: Op | None, later: Op | None) -> str:
    if earlier is None or later is None:
        return "the initial value comes first"
    return (
        f"tid {earlier.tid} {_verb(earlier)} completed at {earlier.complete_ns} ns, before "
        f"tid {later.tid} {_verb(later)} began at {later.invoke_ns} ns"
    )


def _op_order(op: Op) -> tuple[int, float]:
    return (op.invoke_ns, math.inf if op.complete_ns is None else op.complete_ns)


def _verb(op: Op) -> str:
    return f"write of {op.value!r}" if op.kind == WRITE else f"read of {op.value!r}"


def _duplicate(key: str, pair: tuple[Op | None, Op]) -> Violation:
    earlier, later = pair
    if earlier is None:
        detail = f"a write of {later.value!r}, the initial value: reads cannot tell them apart"
        return Violation(key, DUPLICATE_WRITE, (later,), detail)
    detail = f"{later.value!r} written twice: the checker needs unique write values per key"
    return Violation(key, DUPLICATE_WRITE, (earlier, later), detail)


def _never_written(key: str, value: str, reads: list[Op]) -> Violation:
    detail = f"{len(reads)} read(s) returned {value!r}, which no operation wrote to this key"
    return Violation(key, NEVER_WRITTEN, tuple(reads[:3]), detail)
