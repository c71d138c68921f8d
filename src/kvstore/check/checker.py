"""Linearizability checker for histories of independent read/write registers (pure; no I/O
besides reading a log file).

Model and invariants:

- every key is an independent register whose initial value is "" (empty);
- write values are unique per key (a repeated value, or a write of "", is an input error: the
  key is reported as "duplicate write value" and not checked further);
- op A precedes op B in real time iff ``A.complete_ns < B.invoke_ns``: equal times are concurrent;
- a pending read is dropped; a pending write that some read returned may take effect at any time
  after its invocation (its completion counts as +infinity); a pending write nobody read is dropped.

Algorithm (Gibbons & Korach 1997; Golab, Li & Shah, PODC 2011), O(n log n) per key: a write and
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
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter
from typing import TextIO

from kvstore.check.history import READ, WRITE, LogFormatError, Op, StrPath, gc_paused, read_log

DEFAULT_MAX_VIOLATIONS_PER_KEY = 3

STALE_READ = "stale read"
TWO_VALUES_CURRENT = "two values current at once"
NEVER_WRITTEN = "read of a never-written value"
READ_FROM_FUTURE = "read from the future"
DUPLICATE_WRITE = "duplicate write value"


@dataclass(frozen=True, slots=True)
class Violation:
    """Why one key's history is not linearizable, with the operations that show it."""

    key: str
    reason: str
    ops: tuple[Op, ...]
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict on a whole history. ``op_count`` counts every record, pending ones included."""

    is_ok: bool
    op_count: int
    key_count: int
    violations: list[Violation]

    @property
    def violating_key_count(self) -> int:
        return len({violation.key for violation in self.violations})


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


def check(
    ops: Iterable[Op], max_violations_per_key: int = DEFAULT_MAX_VIOLATIONS_PER_KEY
) -> CheckResult:
    """Check a history; reports every violating key, at most ``max_violations_per_key`` each."""
    ops_by_key: dict[str, list[Op]] = defaultdict(list)
    violations: list[Violation] = []
    with gc_paused():
        for op in ops:
            ops_by_key[op.key].append(op)
        for key, key_ops in ops_by_key.items():
            violations.extend(islice(_key_violations(key, key_ops), max_violations_per_key))
    op_count = sum(len(key_ops) for key_ops in ops_by_key.values())
    return CheckResult(not violations, op_count, len(ops_by_key), violations)


def check_file(path: StrPath) -> CheckResult:
    """Check the log file at ``path``."""
    return check(read_log(path))


def run_check(path: StrPath, out: TextIO | None = None) -> int:
    """Check a log and print the verdict to ``out`` (default stdout).

    Returns 0 if linearizable, 1 on violations, 2 if the log cannot be read or parsed.
    """
    out = sys.stdout if out is None else out
    try:
        result = check_file(path)
    except (OSError, LogFormatError) as error:
        print(f"ERROR: {error}", file=out)
        return 2
    if result.is_ok:
        print(f"OK ({result.op_count} operations, {result.key_count} keys)", file=out)
        return 0
    for violation in result.violations:
        print(f"VIOLATION key={violation.key!r}: {violation.reason}: {violation.detail}", file=out)
        for op in violation.ops:
            print(f"    {describe(op)}", file=out)
    print(
        f"NOT LINEARIZABLE: {len(result.violations)} violations on {result.violating_key_count} "
        f"of {result.key_count} keys ({result.op_count} operations)",
        file=out,
    )
    return 1


def describe(op: Op) -> str:
    """One operation for humans: thread, kind, key, value and its real-time interval."""
    done = "pending" if op.complete_ns is None else f"{op.complete_ns} ns"
    action = "write" if op.kind == WRITE else "read"
    arrow = "=" if op.kind == WRITE else "->"
    return f"tid {op.tid} {action} {op.key!r} {arrow} {op.value!r} [{op.invoke_ns} ns, {done}]"


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
