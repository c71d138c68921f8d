"""Crash tests of nodes on disk (kv-node --data-dir, --fsync batch, as kv-bench --storage disk).

- The primary killed -9 every 4-5 s and restarted at once under load: the restarted node
  recovers its store from its data directory and rejoins; the history stays linearizable and
  the clients make progress after every kill.
- Both nodes killed -9 at once under load, then both restarted: every put acknowledged before
  the kill must still be there. Checked by the checker itself: after the load, every key of
  the keyspace is read back (one ``get_many``) and the reads are appended to the execution
  history as completed reads, each spanning the call (invoked before it, completed after it,
  one thread id per key). A read then passes only if it returns the key's last acknowledged
  value or that of a write whose outcome is unknown (invoked, never answered) and not
  superseded; a lost acknowledged put is a violation naming its key. The load runs on past
  the restart, so the reads of the recovered cluster during the load are checked too. A
  recovered node takes over only once the dead nodes' ZooKeeper sessions expired, so these
  nodes run with a 3 s session timeout (the default 10 s would make the test 7 s longer).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from test_crash import (
    append_final_reads,
    assert_progress_after_each_kill,
    check_history,
    writes_acknowledged_before,
)

from kvstore.bench import faults, load, storage
from kvstore.bench.workload import Workload, key_names, summary_lines
from kvstore.config import ClientConfig
from kvstore.local.cluster import LocalCluster

pytestmark = pytest.mark.faults

SECONDS = float(os.environ.get("KVSTORE_CRASH_SECONDS", "14"))
THREADS = 4
KEYS = 200
KILL_BOTH_AT_S = 2.5
SESSION_TIMEOUT_S = 3.0  # of the nodes killed together (see above)


@pytest.fixture
def disk_cluster(idle_cluster: LocalCluster, tmp_path: Path) -> LocalCluster:
    """Two nodes each with a data directory of its own (fsync batch): a primary and a backup."""
    storage.use_storage(idle_cluster, "disk", tmp_path / "data")
    idle_cluster.start()
    return idle_cluster


def test_kill_primary_every_few_seconds_on_disk_stays_linearizable(
    disk_cluster: LocalCluster, tmp_path: Path
) -> None:
    workload = Workload(THREADS, SECONDS, 1_000, seed=21)
    result, kills = faults.run_with_kills(disk_cluster, workload, "primary", (4.0, 5.0), seed=21)

    assert len(kills) >= 2, f"expected at least two kills of the primary, got {kills}"
    verdict = check_history(result, tmp_path)
    assert verdict.op_count > 0
    assert_progress_after_each_kill(result, kills)
    print(f"\ndisk primary kills={len(kills)}: " + " | ".join(summary_lines(result)))
    # The restarted node recovered from its disk and is a synced backup again.
    disk_cluster.wait_for("primary", timeout_s=30)
    disk_cluster.wait_for("backup", timeout_s=30)


def test_acknowledged_puts_survive_kill_9_of_both_nodes_under_load(
    idle_cluster: LocalCluster, tmp_path: Path
) -> None:
    disk_cluster = idle_cluster
    storage.use_storage(disk_cluster, "disk", tmp_path / "data")
    for node in disk_cluster.nodes:
        node.extra_args += ["--session-timeout", str(SESSION_TIMEOUT_S)]
    disk_cluster.start()
    config = ClientConfig(disk_cluster.zk_connect, disk_cluster.zk_path)
    workload = Workload(THREADS, 9.0, KEYS, write_ratio=0.7, seed=22)
    start_ns = time.monotonic_ns()
    killed_at_s: list[float] = []
    stop = threading.Event()

    def kill_both_then_restart() -> None:
        if stop.wait(KILL_BOTH_AT_S):
            return
        faults.kill_all(disk_cluster)
        killed_at_s.append((time.monotonic_ns() - start_ns) / 1e9)
        for node in disk_cluster.nodes:
            node.start()

    killer = threading.Thread(target=kill_both_then_restart, daemon=True)
    killer.start()
    try:
        result = load.run(workload, config, start_ns)
    finally:
        stop.set()
        killer.join(timeout=30)
    assert killed_at_s, "the load ended before both nodes were killed"
    kill_ns = int(killed_at_s[0] * 1e9)
    acknowledged = writes_acknowledged_before(result, kill_ns)
    assert len(acknowledged) > KEYS // 2, f"only {len(acknowledged)} keys written before the kill"
    # The clients ride through: one node recovers from its disk and takes over (~3 s).
    assert_progress_after_each_kill(result, [(killed_at_s[0], "both nodes")])

    disk_cluster.wait_for("primary", timeout_s=30)
    append_final_reads(result, disk_cluster, list(key_names(KEYS)), start_ns)

    verdict = check_history(result, tmp_path)
    assert verdict.key_count == KEYS
    print(
        f"\nboth killed at {killed_at_s[0]:.2f} s; {len(acknowledged)} keys acknowledged before; "
        + " | ".join(summary_lines(result))
    )
    disk_cluster.wait_for("backup", timeout_s=30)  # and the other node catches up
