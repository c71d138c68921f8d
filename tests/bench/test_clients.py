"""The --client dimension without sockets: the worker loop against a stub shared Client,
the exactly-once-free put adapter, and the option in kv-bench and kv-client."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from kvstore import errors
from kvstore.bench import load
from kvstore.bench.clients import (
    CLIENT_KINDS,
    FixedPause,
    PutsWithoutExactlyOnce,
    open_clients,
)
from kvstore.bench.matrix import Matrix, Scenario
from kvstore.bench.workload import ThreadResult, Workload, _worker, merge
from kvstore.check.history import READ, WRITE
from kvstore.cli import bench as bench_cli
from kvstore.cli import client as client_cli
from kvstore.config import ClientConfig


class _StubSharedClient:
    """Like kvstore.Client: get returns None for a missing key, put has no retry argument.
    Fails the calls whose number is in ``failures``."""

    def __init__(self, failures: dict[int, errors.KVError] | None = None) -> None:
        self.data: dict[str, str] = {}
        self.calls = 0
        self.failures = failures or {}

    def _maybe_fail(self) -> None:
        self.calls += 1
        failure = self.failures.get(self.calls)
        if failure is not None:
            raise failure

    def get(self, key: str) -> str | None:
        self._maybe_fail()
        return self.data.get(key)

    def put(self, key: str, value: str) -> None:
        self._maybe_fail()
        self.data[key] = value


class _CountingPause(FixedPause):
    def __init__(self) -> None:
        self.waits = 0

    def wait_for_change(self, generation: int, timeout_s: float) -> None:
        self.waits += 1


def _run_worker(workload: Workload, client: Any) -> tuple[ThreadResult, _CountingPause]:
    result = ThreadResult()
    pause = _CountingPause()
    start = time.monotonic_ns()
    _worker(3, workload, client, pause, start, [start + int(0.05 * 1e9)], result)
    return result, pause


def test_shared_worker_logs_successes_and_missing_keys_as_the_initial_value() -> None:
    workload = Workload(1, 0.05, 1000, write_ratio=0.5, seed=4, client="shared")
    result, pause = _run_worker(workload, _StubSharedClient())
    events = result.events
    assert len(events) == 2 * len(result.success_ns) > 0
    assert pause.waits == 0 and not result.failures
    for invocation, response in zip(events[::2], events[1::2], strict=True):
        assert not invocation[1] and response[1]
        assert invocation[2:5] == response[2:5]
        assert invocation[0] <= response[0]
    reads = [response for response in events[1::2] if response[3] == READ]
    assert reads and all(isinstance(response[5], str) for response in reads)
    # 1000 keys, a few hundred operations: some reads find their key missing and log "".
    assert any(response[5] == "" for response in reads)
    assert {e[3] for e in events} == {READ, WRITE}


def test_shared_worker_keeps_an_indefinite_put_pending_and_drops_definite_failures() -> None:
    failures = {
        1: errors.DeadlineExceededError("gave up", is_definite=False, last_error=None),
        2: errors.DeadlineExceededError("gave up", is_definite=True, last_error=None),
        3: errors.ConnectionLostError("indefinite"),
    }
    workload = Workload(1, 0.05, 10, write_ratio=1.0, seed=5, client="shared-noeo")
    result, pause = _run_worker(workload, _StubSharedClient(failures))
    assert result.failures == Counter({"DeadlineExceededError": 2, "ConnectionLostError": 1})
    assert result.indefinite_writes == 2
    assert pause.waits == 3
    # The two unknown-outcome puts stay as invocations without a response, first in the log.
    assert [(e[1], e[3]) for e in result.events[:2]] == [(False, WRITE), (False, WRITE)]
    assert result.events[2][1] is False and result.events[3][1] is True
    assert len(result.events) == 2 * len(result.success_ns) + 2


def test_puts_without_exactly_once_go_out_as_plain_non_idempotent_puts() -> None:
    calls: list[tuple[Any, ...]] = []

    class _Client:
        def get(self, key: str) -> str | None:
            return None

        def _call(self, method: str, args: tuple[Any, ...], is_idempotent: bool = True) -> Any:
            calls.append((method, args, is_idempotent))

    adapter = PutsWithoutExactlyOnce(_Client())  # type: ignore[arg-type]
    adapter.put("key-1", "value-1")
    assert calls == [("put", ("key-1", "value-1"), False)]
    assert adapter.get("key-1") is None


def test_open_clients_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown client kind"):
        open_clients("pooled", 1, ClientConfig("127.0.0.1:1", "/x"))


# --------------------------------------------------------------------------- the matrix


def test_client_is_a_matrix_dimension_and_part_of_the_name() -> None:
    matrix = Matrix(
        threads=(4,),
        keyspace=(1000,),
        read_percent=(50,),
        value_bytes=(10,),
        faults=("none",),
        client=CLIENT_KINDS,
    )
    scenarios = matrix.scenarios()
    assert [s.client for s in scenarios] == list(CLIENT_KINDS)
    assert len({s.name for s in scenarios}) == 3
    assert scenarios[1].name.endswith("-shared")
    assert Scenario(4, 1000, 50, 10, "none", 1, client="shared").workload(1.0).client == "shared"


# --------------------------------------------------------------------------- the options


def test_kv_bench_parses_a_client_list() -> None:
    parser = bench_cli._parser()
    assert parser.parse_args([]).client == ("per-thread",)
    args = parser.parse_args(["--client", "per-thread,shared,shared-noeo"])
    assert args.client == ("per-thread", "shared", "shared-noeo")


@pytest.mark.parametrize("text", ["pooled", "shared,nope", ""])
def test_kv_bench_refuses_an_unknown_client(text: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_cli._parser().parse_args(["--client", text])
    assert exit_info.value.code == 2
    assert "client kinds are per-thread, shared, shared-noeo" in capsys.readouterr().err


def test_kv_client_passes_its_client_kind_to_the_workload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Workload] = []

    def fake_run(
        workload: Workload,
        config: ClientConfig,
        start_ns: int | None = None,
        procs: int = 1,
        progress: Any = None,
    ) -> Any:
        seen.append(workload)
        return merge(workload, 1.0, [], 0, 0)

    monkeypatch.setattr(load, "run", fake_run)
    argv = ["127.0.0.1:1", "/kv", "2", "1", "10", "--log", "-"]
    assert client_cli.main([*argv, "--client", "shared-noeo"]) == 1  # (no operation ran)
    assert client_cli.main(argv) == 1
    assert [w.client for w in seen] == ["shared-noeo", "per-thread"]


def test_kv_client_refuses_an_unknown_client(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        client_cli.main(["127.0.0.1:1", "/kv", "2", "1", "10", "--client", "pooled"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
