"""One kill -9 of the primary under a short load, checked: for the security tests, which show
that a secured cluster still fails over (the killed node rejoins through the same checks)."""

from __future__ import annotations

from pathlib import Path

from kvstore.bench import faults
from kvstore.bench.workload import Workload
from kvstore.check import checker
from kvstore.local.cluster import LocalCluster

LOAD_S = 6.0
KILL_AT_S = 3.0  # before the killer's quiet end (the last 2 s)


def kill_the_primary_under_load(cluster: LocalCluster, tmp_path: Path, seed: int) -> None:
    """4 threads on 100 keys for LOAD_S, the primary killed at KILL_AT_S and restarted: the
    history is linearizable, operations succeed after the kill, the killed node rejoins."""
    workload = Workload(4, LOAD_S, 100, seed=seed)
    result, kills = faults.run_with_kills(
        cluster, workload, "primary", (KILL_AT_S, KILL_AT_S), max_kills=1, seed=seed
    )
    assert len(kills) == 1, kills
    verdict = checker.check_events(result.events, tmp_path / "execution.log")
    assert verdict.is_ok, "\n".join(str(v) for v in verdict.violations[:10])
    assert verdict.op_count > 0
    kill_ns = int(kills[0][0] * 1e9)
    assert any(t > kill_ns for t, is_response, *_ in result.events if is_response)
    cluster.wait_for("primary")
    cluster.wait_for("backup")
    assert "took over" in cluster.logs(200)
