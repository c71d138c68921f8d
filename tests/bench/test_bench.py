"""The benchmark's bookkeeping, without sockets: the worker loop's log, merging per-process
results, the longest gap, and how threads are spread over processes."""

from __future__ import annotations

import pickle
import threading
import time
from array import array
from collections import Counter

import pytest

from kvstore import errors
from kvstore.bench import procs
from kvstore.bench.workload import (
    STOP_GRACE_S,
    Event,
    LoadClients,
    ThreadResult,
    Workload,
    _worker,
    combine,
    longest_gap_s,
    merge,
    summary_lines,
)
from kvstore.check.history import READ, WRITE


def _result(
    events: list[Event],
    success_ns: list[int],
    latencies_us: list[int],
    failures: dict[str, int] | None = None,
    indefinite_writes: int = 0,
) -> ThreadResult:
    return ThreadResult(
        events=events,
        success_ns=array("q", success_ns),
        failures=Counter(failures or {}),
        indefinite_writes=indefinite_writes,
        latency_us=array("q", latencies_us),
    )


# --------------------------------------------------------------------------- longest gap


def test_longest_gap_counts_from_the_start_between_successes_and_to_the_deadline() -> None:
    assert longest_gap_s([150, 200, 250], 100, 1000, now_ns=10_000) == pytest.approx(750e-9)
    assert longest_gap_s([400, 500], 100, 600, now_ns=10_000) == pytest.approx(300e-9)
    assert longest_gap_s([150, 900, 950], 100, 1000, now_ns=10_000) == pytest.approx(750e-9)


def test_longest_gap_without_successes_is_the_whole_run() -> None:
    assert longest_gap_s([], 1_000, 3_000_000_000, now_ns=4_000_000_000) == pytest.approx(3.0)


def test_longest_gap_ends_now_if_the_deadline_is_still_ahead() -> None:
    assert longest_gap_s([100, 200], 0, 10_000, now_ns=700) == pytest.approx(500e-9)


def test_longest_gap_defaults_to_the_real_clock() -> None:
    now = time.monotonic_ns()
    assert longest_gap_s([now - 10], now - 20, now - 5) == pytest.approx(10e-9)


# --------------------------------------------------------------------------- merging


def test_merge_of_per_process_results_sent_over_the_wire() -> None:
    first = combine(
        [
            _result(
                [(10, False, 0, WRITE, "key-1", "a"), (30, True, 0, WRITE, "key-1", "a")],
                [1_030],
                [20],
            ),
            _result(
                [(12, False, 1, READ, "key-2", None)], [], [], failures={"UnavailableError": 2}
            ),
        ]
    )
    second = _result(
        [(11, False, 1000, WRITE, "key-1", "b")], [], [], {"ConnectionLostError": 1}, 1
    )
    second.histogram.record_value(400)
    second.latency_us.extend([100, 100, 300])
    second.success_ns.extend([1_060, 1_040, 1_900])
    wires = [pickle.loads(pickle.dumps(r.to_wire())) for r in (first, second)]

    merged = merge(
        Workload(3, 1.0, 10),
        elapsed_s=2.0,
        results=[ThreadResult.from_wire(wire) for wire in wires],
        began_ns=1_000,
        deadline_ns=2_000,
    )

    assert merged.successes == 4
    assert merged.throughput == pytest.approx(2.0)
    assert merged.failures == Counter({"UnavailableError": 2, "ConnectionLostError": 1})
    assert merged.indefinite_writes == 1
    assert sorted(e[2] for e in merged.events) == [0, 0, 1, 1000]
    assert merged.histogram.get_total_count() == 5
    assert merged.histogram.get_min_value() == 20
    assert merged.histogram.get_max_value() == pytest.approx(400, rel=1e-3)
    assert merged.latency_ms(50) == pytest.approx(0.1, rel=1e-3)
    # successes at 1030, 1040, 1060, 1900 (unsorted across processes); gaps measured in order
    assert merged.longest_gap_s == pytest.approx(840e-9)


def test_merge_of_nothing_is_an_empty_result() -> None:
    merged = merge(Workload(1, 1.0, 10), 1.0, [], began_ns=0, deadline_ns=0)
    assert merged.successes == 0
    assert merged.throughput == 0.0
    assert merged.events == []
    assert merged.histogram.get_total_count() == 0
    assert summary_lines(merged)[0] == "Aggregate throughput: 0 RPCs/s"


def test_fold_latencies_moves_them_into_the_histogram() -> None:
    result = _result([], [], [5, 5, 7])
    result.fold_latencies()
    assert len(result.latency_us) == 0
    assert result.histogram.get_total_count() == 3
    assert result.histogram.get_max_value() == 7


# --------------------------------------------------------------------------- processes


def test_split_threads_is_even_and_never_leaves_a_process_empty() -> None:
    assert procs.split_threads(4, 1) == [4]
    assert procs.split_threads(4, 2) == [2, 2]
    assert procs.split_threads(5, 2) == [3, 2]
    assert procs.split_threads(16, 3) == [6, 5, 5]
    assert procs.split_threads(2, 4) == [1, 1]


def test_process_workloads_have_disjoint_thread_ids() -> None:
    parts = procs.process_workloads(Workload(5, 2.0, 100, seed=3, thread_id_base=7), 2)
    assert [p.threads for p in parts] == [3, 2]
    assert [p.thread_id_base for p in parts] == [7, 1007]
    assert all(p.seconds == 2.0 and p.keyspace == 100 and p.seed == 3 for p in parts)
    wide = procs.process_workloads(Workload(3000, 1.0, 10), 2)
    ids = [set(range(p.thread_id_base, p.thread_id_base + p.threads)) for p in wide]
    assert not ids[0] & ids[1]


# --------------------------------------------------------------------------- the worker loop


class _StubLocator:
    generation = 0

    def __init__(self) -> None:
        self.waits = 0

    def wait_for_change(self, generation: int, timeout_s: float) -> None:
        self.waits += 1


class _StubClient:
    """Answers from a dict; fails the calls whose number is in ``failures``."""

    def __init__(self, failures: dict[int, errors.KVError] | None = None) -> None:
        self.data: dict[str, str] = {}
        self.calls = 0
        self.failures = failures or {}

    def _maybe_fail(self) -> None:
        self.calls += 1
        failure = self.failures.get(self.calls)
        if failure is not None:
            raise failure

    def get(self, key: str, retry_s: float = 0.0) -> str:
        self._maybe_fail()
        return self.data.get(key, "")

    def put(self, key: str, value: str, retry_s: float = 0.0) -> None:
        self._maybe_fail()
        self.data[key] = value


def _run_worker(workload: Workload, client: _StubClient, seconds: float = 0.05):
    result = ThreadResult()
    start = time.monotonic_ns()
    locator = _StubLocator()
    _worker(7, workload, client, locator, start, [start + int(seconds * 1e9)], result)  # type: ignore[arg-type]
    return result, locator


def test_worker_logs_each_success_as_invocation_and_response() -> None:
    workload = Workload(1, 0.05, 50, write_ratio=0.5, value_bytes=40, seed=1)
    result, _ = _run_worker(workload, _StubClient())
    events = result.events
    assert len(events) == 2 * len(result.success_ns) == 2 * len(result.latency_us) > 0
    for invocation, response in zip(events[::2], events[1::2], strict=True):
        assert not invocation[1] and response[1]
        assert invocation[2] == response[2] == 7
        assert invocation[3] == response[3] and invocation[4] == response[4]
        assert invocation[0] <= response[0]
        assert 0 <= int(invocation[4].removeprefix("key-")) < 50
    written = [e[5] for e in events[::2] if e[3] == WRITE]
    assert written and len(set(written)) == len(written)
    assert all(len(value) == 40 and value.startswith("value-") for value in written)
    assert {e[3] for e in events} == {READ, WRITE}


def test_worker_drops_definite_failures_and_keeps_indefinite_puts_pending() -> None:
    failures = {
        1: errors.UnavailableError("definite"),
        2: errors.ConnectionLostError("indefinite"),
        3: errors.ConnectionLostError("indefinite"),
    }
    workload = Workload(1, 0.05, 10, write_ratio=1.0, seed=2)
    result, locator = _run_worker(workload, _StubClient(failures))
    assert result.failures == Counter({"UnavailableError": 1, "ConnectionLostError": 2})
    assert result.indefinite_writes == 2
    assert locator.waits == 3
    # The two unknown-outcome puts stay as invocations without a response, first in the log.
    assert [e[1] for e in result.events[:3]] == [False, False, False]
    assert len(result.events) == 2 * len(result.success_ns) + 2


def test_worker_drops_an_indefinite_get() -> None:
    failures = {1: errors.ConnectionLostError("indefinite")}
    workload = Workload(1, 0.05, 10, write_ratio=0.0, seed=3)
    result, _ = _run_worker(workload, _StubClient(failures))
    assert result.indefinite_writes == 0
    assert len(result.events) == 2 * len(result.success_ns)


# --------------------------------------------------------------------------- stopping early


class _Stuck(_StubClient):
    """Answers until its ``stuck_at``-th call, which hangs until abort(): its outcome is
    then unknown, as on a connection closed under a call."""

    def __init__(self, stuck_at: int) -> None:
        super().__init__()
        self.stuck_at = stuck_at
        self.aborted = threading.Event()

    def _maybe_fail(self) -> None:
        super()._maybe_fail()
        if self.calls >= self.stuck_at:
            self.aborted.wait(30)
            raise errors.ConnectionLostError("closed under the call")


class _Clients:
    """LoadClients' clients: one per thread, each its own stub."""

    def __init__(self, clients: list[_StubClient]) -> None:
        self.per_thread, self.pacer, self.finishing_s = clients, _StubLocator(), 1.0

    def abort(self) -> None:
        for client in self.per_thread:
            if isinstance(client, _Stuck):
                client.aborted.set()


def test_a_run_stopped_early_ends_soon_and_its_history_is_valid() -> None:
    stuck = _Stuck(stuck_at=50)
    load = LoadClients.__new__(LoadClients)  # (its clients are the stand-ins above)
    load.workload = Workload(2, 60.0, 10, write_ratio=1.0, seed=5)
    load.clients = _Clients([_StubClient(), stuck])
    stop = threading.Event()
    began = time.monotonic()
    start = time.monotonic_ns()
    threading.Timer(0.2, stop.set).start()
    results = load.run(start, start + 60 * 10**9, stop=stop)
    assert time.monotonic() - began < 2 * STOP_GRACE_S + 2  # the stop, then the abort
    assert stuck.aborted.is_set()
    free, cut = results
    assert len(free.events) == 2 * len(free.success_ns) > 0  # every operation answered
    # The call cut short by the abort: its put stays pending (outcome unknown).
    assert cut.indefinite_writes == 1
    assert [e[1] for e in cut.events].count(False) == len(cut.success_ns) + 1
    assert not cut.events[-1][1]
