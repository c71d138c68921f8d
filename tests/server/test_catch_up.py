"""A restarted backup with a data directory catches up from the primary's log (incremental),
and copies the whole store when it cannot (the log was trimmed, or another history).

Each test ends with the backup's store compared with the primary's: the primary is stopped,
the backup takes over, and its ``dump`` must equal the primary's last one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import kvstore
from cluster_load import writes_meanwhile
from kvstore.bench import faults, storage
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.processes import wait_until

KEYS = 1000
MISSED = 300  # writes while the backup is down


@pytest.fixture
def durable_cluster(idle_cluster: LocalCluster, tmp_path: Path) -> LocalCluster:
    """Two nodes, each with a data directory (not started)."""
    storage.use_storage(idle_cluster, "disk", tmp_path / "data")
    return idle_cluster


def log_since(node: NodeProcess, offset: int) -> str:
    return node.log_path.read_text(errors="replace")[offset:]


def restart_and_wait(node: NodeProcess) -> str:
    """Start ``node`` again, wait until it is the backup; its log lines since the start."""
    offset = len(node.log_path.read_text(errors="replace"))
    node.start()
    node.wait_for_role(["backup"], timeout_s=60)
    return log_since(node, offset)


def assert_backup_holds(cluster: LocalCluster, primary: NodeProcess, backup: NodeProcess) -> None:
    expected = primary.dump()
    primary.stop()  # SIGTERM: the backup takes over at once
    backup.wait_for_role(["primary"], timeout_s=30)
    assert backup.dump() == expected


def write_missed(kv: kvstore.Client, value_bytes: int = 50) -> None:
    """MISSED writes: overwrites, new keys and deletes of existing keys."""
    for i in range(MISSED):
        if i % 10 == 0:
            assert kv.delete(f"k{i}")
        else:
            kv.put(f"k{i * 7 % (KEYS + 100)}", f"missed-{i}-" + "m" * value_bytes)


def test_a_restarted_backup_replays_only_the_writes_it_missed(
    durable_cluster: LocalCluster,
) -> None:
    cluster = durable_cluster
    cluster.start()
    primary, backup = cluster.nodes
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        for i in range(KEYS):
            kv.put(f"k{i}", f"v{i}-" + "x" * 100)
        backup.kill()
        write_missed(kv)
    # The primary said in words why it dropped the backup (not a repr of thriftpy2's
    # "TTransportException(type=4, message='TSocket read 0 bytes')").
    dropped = [line for line in log_since(primary, 0).splitlines() if "dropped backup" in line]
    assert dropped and all("Exception(" not in line for line in dropped), dropped
    primary_offset = len(primary.log_path.read_text(errors="replace"))
    lines = restart_and_wait(backup)

    caught_up = re.search(r"caught up from its log from position \d+: (\d+) records", lines)
    assert caught_up, lines
    assert int(caught_up.group(1)) == MISSED  # exactly the writes it missed, not the keys
    assert "full copy" not in lines
    served = re.search(
        r"catch-up from our log, positions \d+ to \d+ \((\d+) bytes\)",
        log_since(primary, primary_offset),
    )
    assert served, log_since(primary, primary_offset)
    assert int(served.group(1)) < MISSED * 200  # about 100 bytes a record
    print(f"\n{caught_up.group(0)}; primary served {served.group(1)} bytes of its log")
    assert_backup_holds(cluster, primary, backup)


def test_a_backup_copies_the_store_when_the_primary_log_was_trimmed(
    durable_cluster: LocalCluster,
) -> None:
    cluster = durable_cluster
    for node in cluster.nodes:
        node.extra_args += ["--snapshot-every-mb", "1"]
    cluster.start()
    primary, backup = cluster.nodes
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        for i in range(KEYS):
            kv.put(f"k{i}", f"v{i}")
        backup.kill()
        snapshots = primary.log_path.read_text().count("snapshot of")
        write_missed(kv, value_bytes=5000)  # 1.5 MB: the primary snapshots and trims its log
        wait_until(
            lambda: primary.log_path.read_text().count("snapshot of") > snapshots or None,
            30,
            lambda: f"the primary did not snapshot\n{primary.log_tail()}",
        )
    primary_offset = len(primary.log_path.read_text(errors="replace"))
    with writes_meanwhile(cluster):  # some reach the backup's first join after it gave up
        lines = restart_and_wait(backup)

    assert "full copy of" in lines, lines
    assert "caught up" not in lines
    primary_lines = log_since(primary, primary_offset)
    assert "our log no longer holds position" in primary_lines
    # The join it gave up for a copy is no in-sync backup the primary lost: no warning.
    assert "dropped backup" not in primary_lines, primary_lines
    assert_backup_holds(cluster, primary, backup)


def test_a_copy_from_another_history_is_replaced_not_caught_up(
    durable_cluster: LocalCluster,
) -> None:
    """Both nodes killed: the one that recovers first starts a new epoch, whose log does not
    continue the other's copy (that copy may hold writes the new primary never had)."""
    cluster = durable_cluster
    cluster.start()
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        for i in range(KEYS // 4):
            kv.put(f"k{i}", f"v{i}")
    offsets = [len(node.log_path.read_text(errors="replace")) for node in cluster.nodes]
    faults.kill_all(cluster)
    for node in cluster.nodes:
        node.start()
    primary = cluster.wait_for("primary", timeout_s=60)
    backup = cluster.wait_for("backup", timeout_s=60)
    lines = log_since(backup, offsets[cluster.nodes.index(backup)])
    assert "full copy of" in lines and "caught up" not in lines, lines
    primary_lines = log_since(primary, offsets[cluster.nodes.index(primary)])
    # the old backup's copy names the old epoch; the old primary's names no position
    assert re.search(r"follows another history|names no log position", primary_lines)
    assert_backup_holds(cluster, primary, backup)
