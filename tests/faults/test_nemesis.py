"""The nemesis under load: kills of either node, a paused primary, ZooKeeper restarts and
hostile requests, at random; the history must stay linearizable and every fault must be
followed by a successful response."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.bench import faults
from kvstore.bench.workload import Workload
from kvstore.check import checker
from kvstore.local.cluster import LocalCluster
from kvstore.local.zkserver import ZooKeeperServer

pytestmark = pytest.mark.faults
SECONDS = 16.0


def test_nemesis_under_load_stays_linearizable(tmp_path: Path, zk_path: str) -> None:
    with ZooKeeperServer(tmp_path / "zookeeper") as zk:
        cluster = LocalCluster(zk.connect_string, zk_path, tmp_path / "nodes", size=2)
        try:
            cluster.start()
            workload = Workload(4, SECONDS, 200, seed=5)
            result, injected = faults.run_with_nemesis(
                cluster, workload, (2.0, 3.0), restart_zookeeper=zk.restart, seed=5
            )
        finally:
            cluster.stop()
    verdict = checker.check_events(result.events)
    assert verdict.verdict == "OK", "\n".join(str(v) for v in verdict.violations[:10])
    assert len({kind for _, kind, _ in injected}) >= 3, injected
    responses = [t for t, is_response, *_ in result.events if is_response]
    gaps = faults.recovery_s(injected, responses)
    assert all(gap >= 0 for gap in gaps), list(zip(injected, gaps, strict=True))
    print(
        *(
            f"{at:.2f}s {kind} {gap * 1000:.0f}ms"
            for (at, kind, _), gap in zip(injected, gaps, strict=True)
        )
    )
