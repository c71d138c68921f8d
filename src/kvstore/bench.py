"""The seed's benchmark workload: threads doing random gets and puts for a fixed time.

Each thread loops until the deadline: with probability ``write_ratio`` a put of
``key-N`` (N uniform in [0, keyspace)) to a fresh unique value, else a get of
such a key. Every operation is logged (WatCA format, see history.py):
- a success gets its INV and RES;
- a definite failure (certainly not applied) is dropped from the log;
- an indefinite put keeps its INV without RES (its outcome is unknown); an
  indefinite get is dropped (it changed nothing).
The next iteration is always a new operation with a new value: nothing is retried.
Latencies go into HDR histograms (microseconds); the longest gap is the longest
time between two successful responses, over all threads.
"""

from __future__ import annotations

import random
import threading
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from kvstore import errors
from kvstore.client import KVClient, PrimaryLocator
from kvstore.config import ClientConfig
from kvstore.history import READ, WRITE

Event = tuple[int, bool, int, str, str, str | None]
MAX_LATENCY_US = 120_000_000
WAIT_AFTER_FAILURE_S = 0.02


@dataclass(frozen=True, slots=True)
class Workload:
    threads: int
    seconds: float
    keyspace: int
    write_ratio: float = 0.5
    value_bytes: int = 0  # 0: the seed's "value-<random 63-bit int>"
    seed: int | None = None
    thread_id_base: int = 0


@dataclass
class ThreadResult:
    events: list[Event] = field(default_factory=list)
    success_ns: array = field(default_factory=lambda: array("q"))
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, MAX_LATENCY_US, 3))
    failures: Counter = field(default_factory=Counter)
    indefinite_writes: int = 0


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


def make_value(rng: random.Random, value_bytes: int) -> str:
    unique = f"value-{rng.getrandbits(63)}"
    if value_bytes <= len(unique):
        return unique
    return unique + "x" * (value_bytes - len(unique))


def _worker(
    tid: int,
    workload: Workload,
    client: KVClient,
    locator: PrimaryLocator,
    start_ns: int,
    deadline_ns: int,
    result: ThreadResult,
) -> None:
    rng = random.Random(None if workload.seed is None else workload.seed * 1_000_003 + tid)
    events, success_ns, record = result.events, result.success_ns, result.histogram.record_value
    clock = time.monotonic_ns
    while (began := clock()) < deadline_ns:
        key = f"key-{rng.randrange(workload.keyspace)}"
        is_write = rng.random() < workload.write_ratio
        generation = locator.generation
        try:
            if is_write:
                value: str | None = make_value(rng, workload.value_bytes)
                events.append((began - start_ns, False, tid, WRITE, key, value))
                client.put(key, value)  # type: ignore[arg-type]
            else:
                events.append((began - start_ns, False, tid, READ, key, None))
                value = client.get(key)
        except errors.KVError as exc:
            result.failures[type(exc).__name__] += 1
            if is_write and not exc.is_definite:
                result.indefinite_writes += 1
            else:
                events.pop()
            locator.wait_for_change(generation, WAIT_AFTER_FAILURE_S)
            continue
        done = clock()
        events.append((done - start_ns, True, tid, WRITE if is_write else READ, key, value))
        success_ns.append(done)
        record((done - began) // 1000 or 1)


def run(workload: Workload, config: ClientConfig, start_ns: int | None = None) -> BenchResult:
    """Run the workload against the cluster ``config`` points at; blocks ~workload.seconds."""
    locator = PrimaryLocator(config)
    clients = [KVClient(locator, config) for _ in range(workload.threads)]
    results = [ThreadResult() for _ in range(workload.threads)]
    start_ns = time.monotonic_ns() if start_ns is None else start_ns
    began = time.monotonic_ns()
    deadline_ns = began + int(workload.seconds * 1e9)
    threads = [
        threading.Thread(
            target=_worker,
            args=(workload.thread_id_base + i, workload, clients[i], locator, start_ns, deadline_ns, results[i]),
            name=f"bench-{i}",
            daemon=True,
        )
        for i in range(workload.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed_s = (time.monotonic_ns() - began) / 1e9
    for client in clients:
        client.close()
    locator.close()
    return merge(workload, elapsed_s, results, began, deadline_ns)


def merge(
    workload: Workload, elapsed_s: float, results: list[ThreadResult], began_ns: int, deadline_ns: int
) -> BenchResult:
    histogram = HdrHistogram(1, MAX_LATENCY_US, 3)
    failures: Counter = Counter()
    events: list[Event] = []
    times = array("q")
    for result in results:
        histogram.add(result.histogram)
        failures.update(result.failures)
        events.extend(result.events)
        times.extend(result.success_ns)
    return BenchResult(
        workload=workload,
        elapsed_s=elapsed_s,
        successes=len(times),
        failures=failures,
        indefinite_writes=sum(r.indefinite_writes for r in results),
        histogram=histogram,
        longest_gap_s=longest_gap_s(sorted(times), began_ns, deadline_ns),
        events=events,
    )


def longest_gap_s(sorted_success_ns: list[int], began_ns: int, deadline_ns: int) -> float:
    """Longest time without a successful response, from the start to the deadline."""
    previous = began_ns
    longest = 0
    for t in sorted_success_ns:
        longest = max(longest, t - previous)
        previous = t
    longest = max(longest, min(deadline_ns, time.monotonic_ns()) - previous)
    return max(longest, 0) / 1e9


def summary_lines(result: BenchResult) -> list[str]:
    failures = ", ".join(f"{name}={count}" for name, count in sorted(result.failures.items()))
    return [
        f"Aggregate throughput: {result.throughput:.0f} RPCs/s",
        f"Average latency: {result.mean_latency_ms:.3f} ms",
        f"Latency p50: {result.latency_ms(50):.3f} ms  p99: {result.latency_ms(99):.3f} ms  "
        f"p99.9: {result.latency_ms(99.9):.3f} ms  max: {result.max_latency_ms:.3f} ms",
        f"Successful operations: {result.successes} in {result.elapsed_s:.1f} s; "
        f"failed: {sum(result.failures.values())}" + (f" ({failures})" if failures else "")
        + f"; writes with unknown outcome: {result.indefinite_writes}",
        f"Longest gap between successful responses: {result.longest_gap_s * 1000:.1f} ms",
    ]
