"""Sessions are not data: a backup whose ZooKeeper session expires keeps its store.

The compound fault that used to lose an in-memory store: the backup's session expires,
and the primary dies before the backup is back. The backup held every acknowledged
write; it must register again with its data and take over with all of it (before, it
restarted empty and the cluster stopped with DATA LOST). Meanwhile the old primary is
restarted, empty: it must not say DATA LOST while the listed backup, without a znode,
does not answer (it waits for it), and it joins the backup once that took over.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import kvstore
from kvstore.bench import load
from kvstore.bench.workload import Workload, summary_lines
from kvstore.check import checker
from kvstore.config import ClientConfig
from kvstore.coordination import ClusterView, connect
from kvstore.local.cluster import LocalCluster
from kvstore.local.processes import wait_until

pytestmark = pytest.mark.faults

SESSION_TIMEOUT_S = 1.0
PRE_WRITTEN_KEYS = 300
LOAD_S = 10.0
FAULT_AT_S = 2.0
EXPIRY_WITHIN_S = 15.0


@contextmanager
def cluster_view(zk_connect: str, zk_path: str) -> Iterator[ClusterView]:
    zk = connect(zk_connect, 10.0, 10.0)
    try:
        yield ClusterView(zk, zk_path, lambda: None)
    finally:
        zk.stop()
        zk.close()


def test_backup_keeps_its_data_when_its_session_expires_and_the_primary_dies(
    zk_server, zk_path: str, tmp_path: Path
) -> None:
    """Under load: SIGSTOP the backup, kill -9 the primary, resume the backup once ZooKeeper
    expired its session. It must take over with every acknowledged write."""
    cluster = LocalCluster(
        zk_server.connect_string,
        zk_path,
        tmp_path / "nodes",
        node_args=["--session-timeout", str(SESSION_TIMEOUT_S)],
    )
    written = {f"pre-{i}": f"v{i}" for i in range(PRE_WRITTEN_KEYS)}
    fault: dict[str, float] = {}
    try:
        cluster.start()
        primary, backup = cluster.wait_for("primary"), cluster.wait_for("backup")
        backup_name = backup.status().node_id
        assert primary.pid is not None and backup.pid is not None
        with kvstore.Client(zk_server.connect_string, zk_path, timeout=30) as kv:
            for key, value in written.items():
                kv.put(key, value)

        def inject(view: ClusterView, start_ns: int) -> None:
            time.sleep(FAULT_AT_S)  # the fault's schedule, not a wait for readiness
            assert backup.pid is not None and primary.pid is not None
            os.kill(backup.pid, signal.SIGSTOP)
            try:
                primary.kill()
                fault["killed_s"] = (time.monotonic_ns() - start_ns) / 1e9

                def session_expired() -> bool | None:
                    view.refresh()
                    return all(m.name != backup_name for m in view.members()) or None

                wait_until(session_expired, EXPIRY_WITHIN_S, lambda: "session never expired")
                primary.start()  # empty, at the old address, while the backup is paused

                def restarted_node_waits() -> bool | None:
                    assert primary.is_running(), f"the restarted node exited:\n{primary.log_tail()}"
                    return "does not answer" in primary.log_tail(50) or None

                wait_until(restarted_node_waits, EXPIRY_WITHIN_S, primary.log_tail)
            finally:
                os.kill(backup.pid, signal.SIGCONT)
            fault["resumed_s"] = (time.monotonic_ns() - start_ns) / 1e9

        with cluster_view(zk_server.connect_string, zk_path) as view:
            start_ns = time.monotonic_ns()
            injector = threading.Thread(target=inject, args=(view, start_ns), daemon=True)
            result = load.run(
                Workload(4, LOAD_S, 100, seed=5),
                ClientConfig(zk_server.connect_string, zk_path),
                start_ns,
                on_start=injector.start,
            )
            injector.join(EXPIRY_WITHIN_S + 10)
        assert "resumed_s" in fault, "the fault was not injected"
        new_primary = cluster.wait_for("primary", 30)
        assert new_primary is backup, "the backup did not take over"
        with kvstore.Client(zk_server.connect_string, zk_path, timeout=30) as kv:
            assert kv.get_many(list(written)) == written, "acknowledged writes lost"
        assert cluster.wait_for("backup", 30) is primary  # the restarted node joined
    finally:
        if backup.pid is not None and backup.is_running():
            os.kill(backup.pid, signal.SIGCONT)
        cluster.stop()
    verdict = checker.check_events(result.events, tmp_path / "execution.log")
    assert verdict.is_ok, "\n".join(str(v) for v in verdict.violations[:10])
    responses = [t for t, is_response, *_ in result.events if is_response]
    assert any(t > fault["resumed_s"] * 1e9 for t in responses), "no progress after the fault"
    print(
        f"\nbackup paused past its session, primary killed at {fault['killed_s']:.2f} s, "
        f"backup resumed at {fault['resumed_s']:.2f} s: " + " | ".join(summary_lines(result))
    )
