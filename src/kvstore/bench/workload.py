"""The seed's benchmark workload: threads doing random gets and puts for a fixed time.

Each thread loops until the deadline: with probability ``write_ratio`` a put of
``key-N`` (N drawn from ``key_dist`` over [0, keyspace), see :mod:`kvstore.bench.keys`) to a
fresh unique value, else a get of such a key. Every operation is logged (WatCA format, see
history.py):
- a success gets its INV and RES;
- a definite failure (certainly not applied) is dropped from the log;
- an indefinite put keeps its INV without RES (its outcome is unknown); an
  indefinite get is dropped (it changed nothing);
- a read of a missing key (None from the shared Client) is logged as "", the
  register's initial value.
The next iteration is always a new operation with a new value: the worker retries
nothing (the shared ``kvstore.Client`` retries inside a call; see
:mod:`kvstore.bench.clients` for the client kinds).
Latencies go into HDR histograms (microseconds); the longest gap is the longest
time between two successful responses, over all threads.

The cyclic garbage collector is off while the threads run (``gc_paused``): the
log grows by two tuples per operation, and a full collection of it stopped every thread for
~100 ms at 10,000 ops/s, which showed up as the run's longest gap (the store's, it seemed).
Reference counting still frees what the threads drop; cycles wait for the end of the run.

Closed or open loop: with ``rate`` 0 (the default) each thread sends its next operation as
soon as the previous one ended, and a latency runs from sending to the response. With a
``rate`` (operations per second, all threads together) each thread sends on a fixed
schedule, one operation every ``threads / rate`` seconds, and a latency runs from the
operation's *intended* start on that schedule: an operation held up behind a slow one counts
its wait, as it would for a user arriving at that time (no coordinated omission). A thread
that falls behind sends at once until it has caught up. The log records the actual sending
time (the checker needs the real invocation).

The threads may be spread over several processes (see :mod:`kvstore.bench.procs`):
every process logs against the same time origin (``start_ns``), runs until the same
deadline and uses its own range of thread ids;
their results merge (:func:`merge`) into one :class:`BenchResult`, as a single
process's threads do. Every wait is bounded, so a run ends by itself even if the
cluster is gone.
"""

from __future__ import annotations

import functools
import random
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from kvstore import errors
from kvstore.bench.clients import LoadClient, Pacer, open_clients
from kvstore.bench.keys import (
    KEY_DISTRIBUTIONS,
    SEQUENCE_LENGTH,
    ZIPFIAN_THETA,
    start_position,
    zipfian_sequence,
)
from kvstore.check.history import (
    CAS,
    DELETE,
    READ,
    WRITE,
    Event,
    cas_value,
    flag_value,
    gc_paused,
)
from kvstore.config import ClientConfig

MAX_LATENCY_US = 120_000_000
WAIT_AFTER_FAILURE_S = 0.02
KEY_NAMES_CACHED_UP_TO = 250_000  # larger keyspaces format key names on the fly
# How long past the deadline a thread may still be finishing its last operation:
# beyond this its connection is closed under it (its operation then ends at once).
STOP_GRACE_S = 1.0


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, 3)


@dataclass(frozen=True, slots=True)
class Workload:
    threads: int
    seconds: float
    keyspace: int
    write_ratio: float = 0.5
    value_bytes: int = 0  # 0: the seed's "value-<random 63-bit int>"
    seed: int | None = None
    thread_id_base: int = 0
    client: str = "per-thread"  # one of kvstore.bench.clients.CLIENT_KINDS
    # Shares of deletes and compare-and-sets (the rest of the non-puts are gets); they need
    # a client that has them (``shared``).
    delete_ratio: float = 0.0
    cas_ratio: float = 0.0
    key_dist: str = "uniform"  # one of kvstore.bench.keys.KEY_DISTRIBUTIONS
    zipfian_theta: float = ZIPFIAN_THETA
    rate: float = 0.0  # target operations per second of all threads together; 0: closed loop
    # Open loop over several processes: where this process's slots fall between another's,
    # as a fraction of the gap between two of its own threads' slots (set by procs).
    slot_phase: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.write_ratio + self.delete_ratio + self.cas_ratio <= 1:
            raise ValueError("put, delete and cas ratios must add up to at most 1")
        if self.key_dist not in KEY_DISTRIBUTIONS:
            raise ValueError(
                f"unknown key distribution {self.key_dist!r} (expected one of {KEY_DISTRIBUTIONS})"
            )
        if not 0 < self.zipfian_theta < 1:
            raise ValueError(f"the zipfian theta must be within (0, 1), got {self.zipfian_theta}")
        if self.rate < 0:
            raise ValueError(f"the target rate must be >= 0, got {self.rate}")
        if self.is_mixed and self.client != "shared":
            raise ValueError(
                "deletes and compare-and-sets need the shared client (--client shared)"
            )

    @property
    def is_mixed(self) -> bool:
        """Deletes or compare-and-sets in the mix (run by :func:`_mixed_worker`)."""
        return self.delete_ratio > 0 or self.cas_ratio > 0

    @property
    def interval_ns(self) -> int:
        """Open loop: the time between two operations of one thread; 0: closed loop."""
        return int(self.threads * 1e9 / self.rate) if self.rate > 0 else 0

    def key_sequence(self) -> array | None:
        """The shared sequence of key indices threads walk (zipfian); None: draw uniformly."""
        if self.key_dist == "uniform":
            return None
        return zipfian_sequence(self.keyspace, self.zipfian_theta, self.seed)


@dataclass
class ThreadResult:
    """What one thread measured (or, combined, a whole process: see :func:`combine`).

    Latencies are appended to ``latency_us`` on the hot path and folded into
    ``histogram`` afterwards (:meth:`fold_latencies`).
    """

    events: list[Event] = field(default_factory=list)
    success_ns: array = field(default_factory=lambda: array("q"))
    histogram: HdrHistogram = field(default_factory=new_histogram)
    failures: Counter = field(default_factory=Counter)
    indefinite_writes: int = 0
    latency_us: array = field(default_factory=lambda: array("q"))

    def fold_latencies(self) -> None:
        """Move the latencies of ``latency_us`` into ``histogram``."""
        record = self.histogram.record_value
        for latency_us, count in Counter(self.latency_us).items():
            record(latency_us, count)
        self.latency_us = array("q")

    def to_wire(self) -> dict[str, Any]:
        """A picklable form (the histogram encoded), for sending to another process."""
        self.fold_latencies()
        return {
            "events": self.events,
            "success_ns": self.success_ns,
            "histogram": self.histogram.encode(),
            "failures": dict(self.failures),
            "indefinite_writes": self.indefinite_writes,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> ThreadResult:
        return cls(
            events=wire["events"],
            success_ns=wire["success_ns"],
            histogram=HdrHistogram.decode(wire["histogram"]),
            failures=Counter(wire["failures"]),
            indefinite_writes=wire["indefinite_writes"],
        )


@dataclass
class BenchResult:
    workload: Workload
    elapsed_s: float
    successes: int
    failures: Counter
    indefinite_writes: int
    histogram: HdrHistogram
    longest_gap_s: float
    events: list[Event]

    @property
    def throughput(self) -> float:
        return self.successes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self, percentile: float) -> float:
        return float(self.histogram.get_value_at_percentile(percentile)) / 1000.0

    @property
    def mean_latency_ms(self) -> float:
        return float(self.histogram.get_mean_value()) / 1000.0

    @property
    def max_latency_ms(self) -> float:
        return float(self.histogram.get_max_value()) / 1000.0


class _KeyNames:
    """``key_names[i] == f"key-{i}"``, computed on access (for keyspaces too big to cache)."""

    def __getitem__(self, index: int) -> str:
        return f"key-{index}"


@functools.lru_cache(maxsize=2)
def key_names(keyspace: int) -> Sequence[str]:
    """The key names ``key-0 .. key-(keyspace-1)``, shared read-only by all threads."""
    if keyspace > KEY_NAMES_CACHED_UP_TO:
        return _KeyNames()  # type: ignore[return-value]
    return [f"key-{i}" for i in range(keyspace)]


# --------------------------------------------------------------------------- one thread

SEQUENCE_MASK = SEQUENCE_LENGTH - 1


def _start_position(tid: int, workload: Workload) -> int:
    """Where thread ``tid`` starts in the shared key sequence (zipfian); other processes'
    threads (another ``thread_id_base``) start elsewhere."""
    own = start_position(tid - workload.thread_id_base, workload.threads)
    return (own + workload.thread_id_base * 40_503) & SEQUENCE_MASK


def _first_intended_ns(tid: int, workload: Workload, deadline_ns: int) -> int:
    """Open loop: the first slot of thread ``tid``. The threads' slots interleave evenly
    from the start of the run (the deadline minus its length), those of several processes
    too (``slot_phase``)."""
    own = tid - workload.thread_id_base + workload.slot_phase
    phase_ns = int(workload.interval_ns * own / max(workload.threads, 1))
    return deadline_ns - int(workload.seconds * 1e9) + phase_ns


def _worker(
    tid: int,
    workload: Workload,
    client: LoadClient,
    locator: Pacer,
    start_ns: int,
    until: list[int],
    result: ThreadResult,
) -> None:
    """The load generator's hot path: everything it needs is bound to locals up front.
    ``until[0]``: the deadline; set to 0, the thread stops before its next operation."""
    rng = random.Random(None if workload.seed is None else workload.seed * 1_000_003 + tid)
    uniform, random_bits = rng.random, rng.getrandbits
    keys, keyspace = key_names(workload.keyspace), workload.keyspace
    sequence, position = workload.key_sequence(), _start_position(tid, workload)
    write_ratio, value_bytes = workload.write_ratio, workload.value_bytes
    padding = "x" * value_bytes
    events = result.events
    log, succeeded, record = events.append, result.success_ns.append, result.latency_us.append
    get, put = client.get, client.put
    clock, sleep = time.monotonic_ns, time.sleep
    interval_ns, intended = workload.interval_ns, _first_intended_ns(tid, workload, until[0])
    while (began := clock()) < until[0]:
        if interval_ns:  # open loop: wait for this operation's slot; latency from the slot
            if began < intended:
                if intended >= until[0]:
                    break
                sleep((intended - began) / 1e9)
                began = clock()
            origin, intended = intended, intended + interval_ns
        else:
            origin = began
        if sequence is None:
            key = keys[int(uniform() * keyspace)]
        else:
            key, position = keys[sequence[position]], (position + 1) & SEQUENCE_MASK
        is_write = uniform() < write_ratio
        generation = locator.generation
        try:
            if is_write:
                value = f"value-{random_bits(63)}"
                if len(value) < value_bytes:
                    value += padding[len(value) :]
                log((began - start_ns, False, tid, WRITE, key, value))
                put(key, value)
            else:
                log((began - start_ns, False, tid, READ, key, None))
                value = get(key) or ""  # None: missing, the register's initial value
        except errors.KVError as exc:
            result.failures[type(exc).__name__] += 1
            if is_write and not exc.is_definite:
                result.indefinite_writes += 1
            else:
                events.pop()
            locator.wait_for_change(generation, WAIT_AFTER_FAILURE_S)
            continue
        done = clock()
        log((done - start_ns, True, tid, WRITE if is_write else READ, key, value))
        succeeded(done)
        record((done - origin) // 1000 or 1)


def _mixed_worker(
    tid: int,
    workload: Workload,
    client: Any,
    locator: Pacer,
    start_ns: int,
    until: list[int],
    result: ThreadResult,
) -> None:
    """Gets, puts, deletes and compare-and-sets through a client that has them (the shared
    kvstore.Client). A compare-and-set swaps the value this thread last read for the key
    ("" if it read none: only if absent) for a fresh unique value. Logged like _worker: a
    write-kind operation (put, delete, cas) whose outcome is unknown keeps its invocation."""
    rng = random.Random(None if workload.seed is None else workload.seed * 1_000_003 + tid)
    uniform, random_bits = rng.random, rng.getrandbits
    keys, keyspace = key_names(workload.keyspace), workload.keyspace
    sequence, position = workload.key_sequence(), _start_position(tid, workload)
    put_below = workload.write_ratio
    delete_below = put_below + workload.delete_ratio
    cas_below = delete_below + workload.cas_ratio
    last_read: dict[str, str] = {}
    events, clock = result.events, time.monotonic_ns
    interval_ns, intended = workload.interval_ns, _first_intended_ns(tid, workload, until[0])
    while (began := clock()) < until[0]:
        if interval_ns:
            if began < intended:
                if intended >= until[0]:
                    break
                time.sleep((intended - began) / 1e9)
                began = clock()
            origin, intended = intended, intended + interval_ns
        else:
            origin = began
        if sequence is None:
            key = keys[int(uniform() * keyspace)]
        else:
            key, position = keys[sequence[position]], (position + 1) & SEQUENCE_MASK
        draw = uniform()
        kind = (
            WRITE if draw < put_below
            else DELETE if draw < delete_below
            else CAS if draw < cas_below
            else READ
        )  # fmt: skip
        generation = locator.generation
        try:
            if kind == WRITE:
                value = f"value-{random_bits(63)}"
                events.append((began - start_ns, False, tid, WRITE, key, value))
                client.put(key, value)
                returned = None
            elif kind == DELETE:
                events.append((began - start_ns, False, tid, DELETE, key, None))
                returned = flag_value(client.delete(key))
            elif kind == CAS:
                expected, new = last_read.get(key, ""), f"value-{random_bits(63)}"
                events.append((began - start_ns, False, tid, CAS, key, cas_value(expected, new)))
                returned = flag_value(client.cas(key, expected or None, new))
            else:
                events.append((began - start_ns, False, tid, READ, key, None))
                returned = last_read[key] = client.get(key) or ""
        except errors.KVError as exc:
            result.failures[type(exc).__name__] += 1
            if kind != READ and not exc.is_definite:
                result.indefinite_writes += 1
            else:
                events.pop()
            locator.wait_for_change(generation, WAIT_AFTER_FAILURE_S)
            continue
        done = clock()
        events.append((done - start_ns, True, tid, kind, key, returned))
        result.success_ns.append(done)
        result.latency_us.append((done - origin) // 1000 or 1)


# --------------------------------------------------------------------------- one process


class LoadClients:
    """One process's share of the load: its clients (of ``workload.client``'s kind), ready."""

    def __init__(self, workload: Workload, config: ClientConfig) -> None:
        self.workload = workload
        self.config = config
        key_names(workload.keyspace)  # built now, not on the clock
        workload.key_sequence()  # likewise (zipfian)
        self.clients = open_clients(workload.client, workload.threads, config)

    def run(
        self,
        start_ns: int,
        deadline_ns: int,
        progress: Callable[[int, int, float], None] | None = None,
        stop: threading.Event | None = None,
    ) -> list[ThreadResult]:
        """Run every thread until ``deadline_ns``; returns in bounded time after it.
        ``progress(successes, failures, elapsed_s)`` is called about once a second.

        The run ends early when ``stop`` is set (from another thread) or on KeyboardInterrupt
        (Ctrl-C, or a signal the program turned into one): each thread finishes the operation
        it is in and starts no other; one still going STOP_GRACE_S later is aborted. What the
        threads logged is a valid history up to then: an operation cut short keeps only its
        invocation (pending, outcome unknown), as one that failed indefinitely does. A stopped
        run returns it; an interrupted one raises :class:`RunInterrupted` with it."""
        stop = threading.Event() if stop is None else stop
        per_thread, pacer = self.clients.per_thread, self.clients.pacer
        results = [ThreadResult() for _ in per_thread]
        until = [deadline_ns]  # the threads' deadline; 0 stops them early
        threads = [
            threading.Thread(
                target=_mixed_worker if self.workload.is_mixed else _worker,
                args=(
                    self.workload.thread_id_base + i,
                    self.workload,
                    client,
                    pacer,
                    start_ns,
                    until,
                    results[i],
                ),
                name=f"bench-{i}",
                daemon=True,
            )
            for i, client in enumerate(per_thread)
        ]
        with gc_paused():
            try:
                for thread in threads:
                    thread.start()
                _wait_for(threads, results, deadline_ns, stop, progress)
                if stop.is_set():
                    self._end_early(threads, until)
                else:
                    # An operation in progress at the deadline may take up to the RPC timeout
                    # (and a reconnect; the shared Client: its retries); past that, abort()
                    # ends it.
                    finishing_ns = int((self.clients.finishing_s + STOP_GRACE_S) * 1e9)
                    self._join_or_abort(threads, deadline_ns + finishing_ns)
            except KeyboardInterrupt as interrupt:
                self._end_early(threads, until)
                raise RunInterrupted(_collected(threads, results, is_quiet=True)) from interrupt
        return _collected(threads, results, is_quiet=stop.is_set())

    def _end_early(self, threads: list[threading.Thread], until: list[int]) -> None:
        """Stop the threads before their next operation; abort what still runs after
        STOP_GRACE_S; wait STOP_GRACE_S more (at most) for them to end."""
        until[0] = 0
        started = [thread for thread in threads if thread.ident is not None]
        self._join_or_abort(started, time.monotonic_ns() + int(STOP_GRACE_S * 1e9))

    def _join_or_abort(self, threads: list[threading.Thread], deadline_ns: int) -> None:
        """Wait for the threads until ``deadline_ns``; then abort what still runs and wait
        STOP_GRACE_S more (at most)."""
        _join_all(threads, deadline_ns)
        if any(thread.is_alive() for thread in threads):
            self.clients.abort()
            _join_all(threads, time.monotonic_ns() + int(STOP_GRACE_S * 1e9))

    def close(self) -> None:
        self.clients.close()


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a signal the program turned into it) ended :meth:`LoadClients.run` early;
    ``results``: what each thread did until then, a valid history."""

    def __init__(self, results: list[ThreadResult]) -> None:
        super().__init__("interrupted")
        self.results = results


class LoadInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a signal the program turned into it) ended a whole load early (one process
    or several, see :func:`kvstore.bench.load.run`); ``result``: the run until then, a valid
    history (an operation cut short is pending: its outcome unknown)."""

    def __init__(self, result: BenchResult) -> None:
        super().__init__("interrupted")
        self.result = result


def _collected(
    threads: list[threading.Thread], results: list[ThreadResult], is_quiet: bool
) -> list[ThreadResult]:
    """``results``, copied where a thread still runs (and then said on stderr, unless
    ``is_quiet``: a run ended early, where threads cut short are expected)."""
    stuck = sum(thread.is_alive() for thread in threads)
    if not stuck:
        return results
    if not is_quiet:
        print(
            f"kv-client: {stuck} thread(s) did not stop; using what they logged so far",
            file=sys.stderr,
        )
    return [_snapshot(result) for result in results]


def _wait_for(
    threads: list[threading.Thread],
    results: list[ThreadResult],
    deadline_ns: int,
    stop: threading.Event,
    progress: Callable[[int, int, float], None] | None,
) -> None:
    """Wait until the deadline, ``stop``, or every thread ended; meanwhile call ``progress``
    (if any) about once a second."""
    began_ns = time.monotonic_ns()
    while (left_ns := deadline_ns - time.monotonic_ns()) > 0:
        if stop.wait(timeout=min(1.0, left_ns / 1e9)):
            return
        if not any(thread.is_alive() for thread in threads):
            return
        if progress is None:
            continue
        successes = sum(len(result.success_ns) for result in results)
        try:
            failures = sum(sum(result.failures.values()) for result in results)
        except RuntimeError:  # a thread added a new failure kind meanwhile
            failures = -1
        progress(successes, failures, (time.monotonic_ns() - began_ns) / 1e9)


def _join_all(threads: Iterable[threading.Thread], until_ns: int) -> None:
    for thread in threads:
        thread.join(timeout=max(0.0, (until_ns - time.monotonic_ns()) / 1e9))


def _snapshot(result: ThreadResult) -> ThreadResult:
    """A copy of a result a (stuck) thread may still be appending to."""
    return ThreadResult(
        events=list(result.events),
        success_ns=array("q", result.success_ns),
        histogram=result.histogram,
        failures=Counter(result.failures),
        indefinite_writes=result.indefinite_writes,
        latency_us=array("q", result.latency_us),
    )


# --------------------------------------------------------------------------- merging


def combine(results: Iterable[ThreadResult]) -> ThreadResult:
    """One ThreadResult holding everything of ``results`` (latencies folded in)."""
    total = ThreadResult()
    for result in results:
        total.events.extend(result.events)
        total.success_ns.extend(result.success_ns)
        total.latency_us.extend(result.latency_us)
        total.histogram.add(result.histogram)
        total.failures.update(result.failures)
        total.indefinite_writes += result.indefinite_writes
    total.fold_latencies()
    return total


def merge(
    workload: Workload,
    elapsed_s: float,
    results: list[ThreadResult],
    began_ns: int,
    deadline_ns: int,
) -> BenchResult:
    total = combine(results)
    return BenchResult(
        workload=workload,
        elapsed_s=elapsed_s,
        successes=len(total.success_ns),
        failures=total.failures,
        indefinite_writes=total.indefinite_writes,
        histogram=total.histogram,
        longest_gap_s=longest_gap_s(sorted(total.success_ns), began_ns, deadline_ns),
        events=total.events,
    )


def longest_gap_s(
    sorted_success_ns: Sequence[int], began_ns: int, deadline_ns: int, now_ns: int | None = None
) -> float:
    """Longest time without a successful response, from the start to the deadline (or to
    ``now_ns``, default now, if that is earlier)."""
    previous = began_ns
    longest = 0
    for t in sorted_success_ns:
        longest = max(longest, t - previous)
        previous = t
    end_ns = min(deadline_ns, time.monotonic_ns() if now_ns is None else now_ns)
    longest = max(longest, end_ns - previous)
    return max(longest, 0) / 1e9


def summary_lines(result: BenchResult) -> list[str]:
    failures = ", ".join(f"{name}={count}" for name, count in sorted(result.failures.items()))
    return [
        f"Aggregate throughput: {result.throughput:.0f} RPCs/s",
        f"Average latency: {result.mean_latency_ms:.3f} ms",
        f"Latency p50: {result.latency_ms(50):.3f} ms  p99: {result.latency_ms(99):.3f} ms  "
        f"p99.9: {result.latency_ms(99.9):.3f} ms  max: {result.max_latency_ms:.3f} ms",
        f"Successful operations: {result.successes} in {result.elapsed_s:.1f} s; "
        f"failed: {sum(result.failures.values())}"
        + (f" ({failures})" if failures else "")
        + f"; writes with unknown outcome: {result.indefinite_writes}",
        f"Longest gap between successful responses: {result.longest_gap_s * 1000:.1f} ms",
        *_shape_lines(result),
    ]


def _shape_lines(result: BenchResult) -> list[str]:
    """How the load was shaped, when it was not the default (uniform keys, closed loop). An
    open loop that reached well under its target was limited by the cluster or the client."""
    workload, lines = result.workload, []
    if workload.key_dist == "zipfian":
        lines.append(f"Keys: zipfian, theta {workload.zipfian_theta:g} (key-0 the most popular)")
    if workload.rate > 0:
        lines.append(
            f"Open loop: target {workload.rate:.0f} ops/s, achieved "
            f"{result.throughput / workload.rate:.0%}; latencies from each request's intended "
            "start"
        )
    return lines
