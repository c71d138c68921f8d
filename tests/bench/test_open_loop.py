"""kv-client --rate on a real cluster: the achieved rate follows the target, and latencies
count from the intended start (a slow request's wait is charged to the ones behind it)."""

from __future__ import annotations

import gc
import itertools
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvstore.bench import procs
from kvstore.bench.workload import (
    LoadClients,
    ThreadResult,
    Workload,
    _first_intended_ns,
    _worker,
)
from kvstore.local.cluster import LocalCluster

SECONDS = 4
GRACE_S = 60


def _client(cluster: LocalCluster, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kvstore", "client", cluster.zk_connect, cluster.zk_path, *args],
        capture_output=True,
        text=True,
        timeout=SECONDS + GRACE_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("procs", [1, 2])
def test_rate_keeps_the_achieved_rate_near_the_target(
    shared_cluster: LocalCluster, tmp_path: Path, procs: int
) -> None:
    target = 600  # with 2 processes: 400 ops/s for the one with 2 threads, 200 for the other
    out = _client(
        shared_cluster, "3", str(SECONDS), "100", "--rate", str(target), "--dist", "zipfian",
        "--procs", str(procs), "--log", str(tmp_path / "execution.log"),
    )  # fmt: skip
    match = re.search(r"Successful operations: (\d+) in ([\d.]+) s", out)
    assert match, out
    achieved = int(match.group(1)) / float(match.group(2))
    assert 0.7 * target <= achieved <= 1.3 * target, out
    shape = re.search(rf"Open loop: target {target} ops/s, achieved (\d+)%", out)
    assert shape and 70 <= int(shape.group(1)) <= 130, out
    assert "Keys: zipfian, theta 0.99" in out


class _Slow:
    """Every answer takes ``delay_s``: a server far slower than the schedule."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def get(self, key: str) -> str:
        time.sleep(self.delay_s)
        return ""

    def put(self, key: str, value: str) -> None:
        time.sleep(self.delay_s)


class _Steady:
    generation = 0

    def wait_for_change(self, generation: int, timeout_s: float) -> None:
        pass


def _latencies_ms(rate: float) -> ThreadResult:
    workload = Workload(1, 0.5, 10, seed=1, rate=rate)
    result = ThreadResult()
    start = time.monotonic_ns()
    _worker(0, workload, _Slow(0.01), _Steady(), start, [start + 500_000_000], result)
    result.fold_latencies()
    return result


def test_open_loop_charges_the_queueing_delay_closed_loop_does_not() -> None:
    # 10 ms per request, one every 5 ms wanted: the backlog grows through the run, and the
    # open loop's latencies say so; the closed loop's stay at the service time.
    closed, opened = _latencies_ms(0), _latencies_ms(200)
    assert closed.histogram.get_value_at_percentile(99) < 100_000  # µs
    assert opened.histogram.get_value_at_percentile(99) > 150_000
    assert opened.histogram.get_max_value() > 2 * closed.histogram.get_max_value()


def test_open_loop_below_capacity_sends_on_schedule() -> None:
    workload = Workload(2, 0.5, 10, seed=1, rate=100)  # each thread: one request per 20 ms
    start = time.monotonic_ns()
    results = [ThreadResult(), ThreadResult()]
    threads = [
        threading.Thread(
            target=_worker,
            args=(tid, workload, _Slow(0), _Steady(), start, [start + 500_000_000], results[tid]),
        )
        for tid in (0, 1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    sent = sorted(t for result in results for t in result.success_ns)
    assert 45 <= len(sent) <= 51  # 100/s for 0.5 s
    # The two threads interleave: one request about every 10 ms, not two at once every 20 ms.
    gaps_ms = sorted((b - a) / 1e6 for a, b in itertools.pairwise(sent))
    assert 5 < gaps_ms[len(gaps_ms) // 2] < 15


def test_processes_share_the_rate_and_interleave_their_slots() -> None:
    parts = procs.process_workloads(Workload(4, 1.0, 10, rate=800), 2)
    assert [part.rate for part in parts] == [400, 400]
    assert {part.interval_ns for part in parts} == {5_000_000}  # 4 threads / 800 per s
    deadline = 10**9
    slots = sorted(
        _first_intended_ns(part.thread_id_base + j, part, deadline)
        for part in parts
        for j in range(part.threads)
    )
    assert [b - a for a, b in itertools.pairwise(slots)] == [1_250_000] * 3  # evenly spread


class _RecordsCollector(_Slow):
    """Notes whether the cyclic garbage collector was on at each request."""

    def __init__(self) -> None:
        super().__init__(0.001)
        self.seen: set[bool] = set()

    def get(self, key: str) -> str:
        self.seen.add(gc.isenabled())
        return super().get(key)

    def put(self, key: str, value: str) -> None:
        self.seen.add(gc.isenabled())
        super().put(key, value)


class _Clients:
    def __init__(self, client: _RecordsCollector) -> None:
        self.per_thread, self.pacer, self.finishing_s = [client], _Steady(), 1.0


def test_the_load_runs_without_cyclic_collections_and_turns_them_back_on() -> None:
    # A full collection of the growing log stopped every thread for ~100 ms at 10,000 ops/s:
    # the longest gap measured was the load generator's, not the store's.
    client = _RecordsCollector()
    load = LoadClients.__new__(LoadClients)  # (its clients are the stand-in above)
    load.workload, load.clients = Workload(1, 0.2, 10, seed=1), _Clients(client)
    assert gc.isenabled()
    start = time.monotonic_ns()
    results = load.run(start, start + 200_000_000)
    assert len(results[0].success_ns) > 10
    assert client.seen == {False}
    assert gc.isenabled()
    gc.disable()  # off before: it stays off
    try:
        start = time.monotonic_ns()
        load.run(start, start + 50_000_000)
        assert not gc.isenabled()
    finally:
        gc.enable()
