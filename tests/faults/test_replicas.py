"""Replication factor N = 3 (``kv-createznode --replicas 3``): three in-sync copies.

- In memory, four nodes (the fourth a standby), under load: a backup paused past the RPC
  timeout (the primary drops it and keeps renewing the other's lease: no failover); the
  primary killed -9 (both
  backups may take over: one wins, the other rejoins it, the standby joins); then the
  primary and a backup at the same moment (the last backup takes over alone). The clients
  ride through, and each history (plus a read of every key afterwards) passes the checker.
  Then the replication factor goes down to 2 on the serving cluster (a backup is let go)
  and back up to 3 (a standby joins).
- On disk: every node killed -9 at once under write load, restarted one by one with the
  primary last; then again, with the primary first: every acknowledged write is still there
  (the checker again).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_crash import (
    append_final_reads,
    assert_progress_after_each_kill,
    check_history,
    writes_acknowledged_before,
)

import kvstore
from kvstore.bench import faults, load, storage
from kvstore.bench.workload import Workload, key_names, summary_lines
from kvstore.check.history import WRITE
from kvstore.coordination import create_parent
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.processes import wait_until

pytestmark = pytest.mark.faults

THREADS = 4
KEYS = 200
FAULT_AT_S = 2.5
PAUSE_S = 3.0  # past the RPC timeout (2 s) and the lease (1 s)
WRITER_TID = 2_000_000  # above the load's and the final reader's thread ids
SESSION_TIMEOUT_S = 3.0  # of nodes killed for good: their znodes go sooner


def roles(cluster: LocalCluster) -> dict[str, list[NodeProcess]]:
    found: dict[str, list[NodeProcess]] = {}
    for node in cluster.nodes:
        status = node.status() if node.is_running() else None
        found.setdefault(status.role if status else "down", []).append(node)
    return found


def describe(found: dict[str, list[NodeProcess]]) -> str:
    return ", ".join(f"{role}: {[n.address for n in nodes]}" for role, nodes in found.items())


def wait_for_roles(cluster: LocalCluster, wanted: dict[str, int], timeout_s: float = 30.0) -> None:
    def matches() -> bool | None:
        now = roles(cluster)
        return all(len(now.get(role, [])) == count for role, count in wanted.items()) or None

    wait_until(
        matches,
        timeout_s,
        lambda: f"roles never became {wanted}: {describe(roles(cluster))}\n{cluster.logs()}",
    )


def replicated_cluster(zk_server, zk_path: str, directory: Path, size: int) -> LocalCluster:
    cluster = LocalCluster(zk_server.connect_string, zk_path, directory, size=size, replicas=3)
    for node in cluster.nodes:
        node.extra_args += ["--session-timeout", str(SESSION_TIMEOUT_S)]
    return cluster


def kill(pick: Callable[[dict[str, list[NodeProcess]]], list[NodeProcess]]) -> Fault:
    """kill -9 the nodes ``pick`` chooses by role, at the same moment; not restarted."""

    def fault(now: dict[str, list[NodeProcess]]) -> list[NodeProcess]:
        victims = pick(now)
        faults.kill_nodes(victims)
        return victims

    return fault


def pause_a_backup(now: dict[str, list[NodeProcess]]) -> list[NodeProcess]:
    """SIGSTOP one backup for PAUSE_S (always resumed, by PID)."""
    node = now["backup"][0]
    assert node.pid is not None
    os.kill(node.pid, signal.SIGSTOP)
    try:
        time.sleep(PAUSE_S)  # the fault's length, not a wait for readiness
    finally:
        os.kill(node.pid, signal.SIGCONT)
    return [node]


Fault = Callable[[dict[str, list[NodeProcess]]], list[NodeProcess]]


def run_with_fault(
    cluster: LocalCluster, fault: Fault, tmp_path: Path, seed: int
) -> list[NodeProcess]:
    """6 s of load; FAULT_AT_S in, ``fault`` (given the nodes by role). Checks the history,
    plus a read of every key afterwards, and that the clients went on after the fault.
    Returns the nodes it hit."""
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=30) as kv:
        before = kv.get_many(list(key_names(KEYS)))  # an earlier run's values
    start_ns = time.monotonic_ns()
    fault_at_s: list[float] = []
    victims: list[NodeProcess] = []

    def inject() -> None:
        time.sleep(FAULT_AT_S)  # the fault's schedule, not a wait for readiness
        fault_at_s.append((time.monotonic_ns() - start_ns) / 1e9)
        victims.extend(fault(roles(cluster)))

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    try:
        result = load.run(
            Workload(THREADS, 6.0, KEYS, seed=seed), cluster.client_config(), start_ns
        )
    finally:
        injector.join(timeout=30)
    assert fault_at_s, "the load ended before the fault"
    for i, (key, value) in enumerate(before.items()):  # as writes done before the load
        if value is not None:
            result.events.append((0, False, WRITER_TID + i, WRITE, key, value))
            result.events.append((1, True, WRITER_TID + i, WRITE, key, None))
    assert_progress_after_each_kill(result, [(fault_at_s[0], "the fault")])
    cluster.wait_for("primary")
    append_final_reads(result, cluster, list(key_names(KEYS)), start_ns)
    tmp_path.mkdir(exist_ok=True)
    check_history(result, tmp_path)
    print(f"\n{len(victims)} hit at {fault_at_s[0]:.2f} s: " + " | ".join(summary_lines(result)))
    return victims


def test_three_copies_ride_through_failures_of_two_nodes(
    zk_server, zk_path: str, tmp_path: Path
) -> None:
    cluster = replicated_cluster(zk_server, zk_path, tmp_path / "nodes", size=4)
    try:
        cluster.start()
        wait_for_roles(cluster, {"primary": 1, "backup": 2, "standby": 1})
        meta = cluster.meta()
        assert meta.replicas == 3 and len(meta.in_sync) == 3, meta

        # A backup paused past the RPC timeout: the primary drops it and goes on with the
        # other, whose lease it keeps renewing meanwhile (no failover); it comes back.
        primary = roles(cluster)["primary"][0]
        epoch = cluster.meta().epoch
        run_with_fault(cluster, pause_a_backup, tmp_path / "pause", seed=30)
        assert cluster.meta().epoch == epoch, "a paused backup caused a failover"
        assert roles(cluster)["primary"] == [primary]
        wait_for_roles(cluster, {"primary": 1, "backup": 2, "standby": 1})

        # The primary alone: both backups may take over, one wins, the other rejoins it; the
        # standby joins as the third copy.
        down = run_with_fault(
            cluster, kill(lambda now: now["primary"][:1]), tmp_path / "one", seed=31
        )
        wait_for_roles(cluster, {"primary": 1, "backup": 2, "down": 1})
        assert len(cluster.meta().in_sync) == 3

        # The primary and a backup at the same moment: the last backup takes over alone.
        both = kill(lambda now: [now["primary"][0], now["backup"][0]])
        down += run_with_fault(cluster, both, tmp_path / "two", seed=32)
        wait_for_roles(cluster, {"primary": 1, "down": 3})

        # The killed nodes come back: two backups, the third waits as a standby.
        for node in down:
            node.start()
        wait_for_roles(cluster, {"primary": 1, "backup": 2, "standby": 1})
        assert len(cluster.meta().in_sync) == 3

        # Fewer copies on the serving cluster: the primary lets one backup go.
        create_parent(cluster.zk_connect, cluster.zk_path, replicas=2)
        wait_for_roles(cluster, {"primary": 1, "backup": 1, "standby": 2})
        meta = cluster.meta()
        assert meta.replicas == 2 and len(meta.in_sync) == 2, meta

        # And more again: a standby joins as the third copy.
        create_parent(cluster.zk_connect, cluster.zk_path, replicas=3)
        wait_for_roles(cluster, {"primary": 1, "backup": 2, "standby": 1})
        assert len(cluster.meta().in_sync) == 3
    finally:
        cluster.stop()


def test_acknowledged_writes_survive_kill_9_of_three_nodes_on_disk(
    zk_server, zk_path: str, tmp_path: Path
) -> None:
    cluster = replicated_cluster(zk_server, zk_path, tmp_path / "nodes", size=3)
    storage.use_storage(cluster, "disk", tmp_path / "data")
    try:
        cluster.start()
        wait_for_roles(cluster, {"primary": 1, "backup": 2})
        start_ns = time.monotonic_ns()
        killed_at_s: list[float] = []
        stop = threading.Event()

        def kill_all_twice() -> None:
            """Every node killed -9 at once, restarted 0.5 s apart: first the backups then
            the primary; once a primary serves again, the primary first."""
            for first_role, pause_s in (("backup", FAULT_AT_S), ("primary", 1.0)):
                if stop.wait(pause_s):
                    return
                deadline = time.monotonic() + 20  # bounded: the cluster recovering
                while not roles(cluster).get("primary"):
                    if time.monotonic() > deadline or stop.wait(0.1):
                        return
                now = roles(cluster)
                other = "primary" if first_role == "backup" else "backup"
                ranked = [*now.get(first_role, []), *now.get(other, [])]
                # Every node is restarted: those in another role (syncing, say) last.
                order = [*ranked, *(node for node in cluster.nodes if node not in ranked)]
                faults.kill_all(cluster)
                killed_at_s.append((time.monotonic_ns() - start_ns) / 1e9)
                for node in order:
                    node.start()
                    if stop.wait(0.5):  # the restart schedule
                        return

        killer = threading.Thread(target=kill_all_twice, daemon=True)
        killer.start()
        # Long enough for two recoveries (~3 s each) on a loaded machine, and progress after.
        workload = Workload(THREADS, 14.0, KEYS, write_ratio=0.7, seed=32)
        try:
            result = load.run(workload, cluster.client_config(), start_ns)
        finally:
            stop.set()
            killer.join(timeout=30)
        assert len(killed_at_s) == 2, f"the load ended before both kills: {killed_at_s}"
        kill_ns = int(killed_at_s[0] * 1e9)
        acknowledged = writes_acknowledged_before(result, kill_ns)
        assert len(acknowledged) > KEYS // 2, f"only {len(acknowledged)} keys written before"
        assert_progress_after_each_kill(result, [(at_s, "every node") for at_s in killed_at_s])
        cluster.wait_for("primary", timeout_s=30)
        append_final_reads(result, cluster, list(key_names(KEYS)), start_ns)
        verdict = check_history(result, tmp_path)
        assert verdict.key_count == KEYS
        wait_for_roles(cluster, {"primary": 1, "backup": 2})
        print(
            f"\nall three killed at {killed_at_s[0]:.2f} s (restarted primary last) and "
            f"{killed_at_s[1]:.2f} s (primary first); {len(acknowledged)} keys acknowledged "
            "before the first; " + " | ".join(summary_lines(result))
        )
    finally:
        cluster.stop()
