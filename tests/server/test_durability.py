"""Nodes with --data-dir: the cluster survives losing every node at once (kill -9 of both),
and recovers from any one member of the last in-sync set that kept its disk."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient

import kvstore
from kvstore.bench import faults
from kvstore.coordination import ClusterMeta
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.processes import wait_until
from kvstore.local.zkserver import ZooKeeperServer
from kvstore.server.wal import WriteAheadLog

KEYS = 300


@pytest.fixture
def durable_cluster(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> Iterator[LocalCluster]:
    cluster = LocalCluster(zk_server.connect_string, zk_path, tmp_path / "logs", size=2)
    for i, node in enumerate(cluster.nodes):
        node.extra_args += ["--data-dir", str(tmp_path / f"data-{i}"), "--snapshot-every-mb", "1"]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def write_keys(cluster: LocalCluster) -> dict[str, str | None]:
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        for i in range(KEYS):
            kv.put(f"k{i}", f"v{i}-" + "x" * 4000)  # ~1.2 MB: at least one snapshot
        for i in range(0, KEYS, 3):
            assert kv.delete(f"k{i}")
        assert kv.cas("k1", f"v1-{'x' * 4000}", "swapped")
        return kv.get_many([f"k{i}" for i in range(KEYS)])


def read_keys(cluster: LocalCluster) -> dict[str, str | None]:
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=30) as kv:
        return kv.get_many([f"k{i}" for i in range(KEYS)])


def kill_all_then_start(cluster: LocalCluster, wipe: Path | None = None) -> None:
    faults.kill_all(cluster)  # at once: one by one, the last one would take over first
    if wipe is not None:
        shutil.rmtree(wipe)
    for node in cluster.nodes:
        node.start()
    cluster.wait_for("primary")


def test_every_acknowledged_write_survives_kill_9_of_every_node(
    durable_cluster: LocalCluster,
) -> None:
    expected = write_keys(durable_cluster)
    kill_all_then_start(durable_cluster)
    assert read_keys(durable_cluster) == expected
    durable_cluster.wait_for("backup")  # and the other node catches up


def test_one_surviving_disk_of_the_in_sync_set_is_enough(
    durable_cluster: LocalCluster, tmp_path: Path
) -> None:
    expected = write_keys(durable_cluster)
    kill_all_then_start(durable_cluster, wipe=tmp_path / "data-0")
    assert read_keys(durable_cluster) == expected


def test_a_node_recovering_from_disk_first_waits_out_the_lease_it_may_have_granted(
    durable_cluster: LocalCluster,
) -> None:
    """A primary cut off from ZooKeeper may go on serving reads on a lease granted before
    its backup restarted: the restarted node takes over only after that lease ran out, even
    when it now runs with a shorter one (the longest lease still out is kept on disk)."""
    expected = write_keys(durable_cluster)
    for lease in ("6", "0.3"):  # 6 s: longer than a start and the recovery deferral (3 s)
        faults.kill_all(durable_cluster)
        for node in durable_cluster.nodes:
            node.extra_args += ["--lease", lease]  # the last --lease given counts
            node.start()
        primary = durable_cluster.wait_for("primary")
        assert read_keys(durable_cluster) == expected
        restart = primary.log_path.read_text().rsplit("--- starting:", 1)[1]
        waited = restart.index("waiting out the read lease")
        assert waited < restart.index("recovered from disk"), lease


def seed_rule_primary_and_meta(cluster: LocalCluster) -> tuple[str, ClusterMeta]:
    """The primary as the seed's Java client finds it (the children sorted by name,
    Collections.sort: the first one's data), and the cluster metadata."""
    zk = KazooClient(hosts=cluster.zk_connect)
    zk.start(timeout=30)
    try:
        children = sorted(zk.get_children(cluster.zk_path))
        address = zk.get(f"{cluster.zk_path}/{children[0]}")[0].decode()
        return address, ClusterMeta.from_bytes(zk.get(cluster.zk_path)[0])
    finally:
        zk.stop()
        zk.close()


def test_the_seed_clients_rule_finds_the_primary_and_the_metadata_keeps_the_ids(
    durable_cluster: LocalCluster,
) -> None:
    for round_ in range(2):  # as started, and after a full restart (the backup may lead)
        primary = durable_cluster.wait_for("primary")
        durable_cluster.wait_for("backup")
        address, meta = seed_rule_primary_and_meta(durable_cluster)
        assert address == primary.address, f"round {round_}"
        assert len(meta.in_sync) == 2
        assert len(meta.durable_members()) == 2  # both keep a data directory
        kill_all_then_start(durable_cluster)


def node_on_the_copy(zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path) -> NodeProcess:
    """A node (not started) whose data directory is ``tmp_path / "copy"``."""
    return NodeProcess(
        zk_server.connect_string,
        zk_path,
        tmp_path / "logs",
        extra_args=["--data-dir", str(tmp_path / "copy"), "--session-timeout", "2"],
    )


def assert_waits_for_the_last_in_sync_set(node: NodeProcess) -> None:
    """``node`` says it waits for a disk of the last in-sync set, and serves as no primary."""
    wait_until(
        lambda: "waiting for one with a data directory" in node.log_path.read_text() or None,
        30,
        lambda: f"{node.address} never waited for the last in-sync set\n{node.log_tail()}",
    )
    status = node.status()
    assert status is not None and status.role != "primary", status


def assert_takes_over_with_every_write(
    cluster: LocalCluster, node: NodeProcess, keys: list[str]
) -> None:
    """``node``, a member of the last in-sync set, started: it takes over with every key."""
    node.start()
    assert cluster.wait_for("primary") is node
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=30) as kv:
        assert kv.get_many(keys) == dict.fromkeys(keys, "new")


def test_a_copy_dropped_from_the_in_sync_set_never_takes_over_with_its_shorter_history(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """The backup is killed, the primary drops it and goes on alone; then the primary is
    killed too and the old backup comes back first, its disk intact but behind. It must
    wait for the primary's disk (the last in-sync set) instead of serving its older copy;
    once the primary is back, every write acknowledged after the drop is there."""
    cluster = LocalCluster(zk_server.connect_string, zk_path, tmp_path / "logs", size=2)
    for i, node in enumerate(cluster.nodes):  # short sessions: the dead znodes go soon
        node.extra_args += ["--data-dir", str(tmp_path / f"data-{i}"), "--session-timeout", "2"]
    try:
        cluster.start()
        primary, backup = cluster.wait_for("primary"), cluster.wait_for("backup")
        keys = [f"k{i}" for i in range(50)]
        with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
            for key in keys:
                kv.put(key, "old")
            backup.kill()
            for key in keys:  # the first of these drops the backup from the in-sync set
                kv.put(key, "new")
        assert seed_rule_primary_and_meta(cluster)[1].in_sync == (primary.status().node_id,)
        primary.kill()
        backup.start()
        assert_waits_for_the_last_in_sync_set(backup)
        assert_takes_over_with_every_write(cluster, primary, keys)
        backup.wait_for_role(["backup"])
        # The old backup registered first, but answers with a directory outside the last
        # in-sync set: it cannot recover, so the primary did not wait 3 s for it to.
        assert "letting a node registered before" not in primary.log_path.read_text()
    finally:
        cluster.stop()


def test_a_copy_of_a_data_directory_never_takes_over_for_the_node_it_was_copied_from(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """The backup is stopped, its directory copied (``cp -a``), and it is restarted; then
    writes are acknowledged by both and every node is killed. A third node started from the
    copy carries the backup's old id but not those writes: it must wait for the last in-sync
    set instead of taking over as the backup (each listing gives a node a new id)."""
    cluster = LocalCluster(zk_server.connect_string, zk_path, tmp_path / "logs", size=2)
    for i, node in enumerate(cluster.nodes):  # short sessions: the dead znodes go soon
        node.extra_args += ["--data-dir", str(tmp_path / f"data-{i}"), "--session-timeout", "2"]
    copy = node_on_the_copy(zk_server, zk_path, tmp_path)
    try:
        cluster.start()
        backup = cluster.wait_for("backup")
        keys = [f"k{i}" for i in range(50)]
        with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
            for key in keys:
                kv.put(key, "old")
            backup.stop()
            shutil.copytree(tmp_path / f"data-{cluster.nodes.index(backup)}", tmp_path / "copy")
            backup.start()
            backup.wait_for_role(["backup"])
            for key in keys:
                kv.put(key, "new")
        faults.kill_all(cluster)
        copy.start()
        assert_waits_for_the_last_in_sync_set(copy)
        assert_takes_over_with_every_write(cluster, backup, keys)
    finally:
        copy.stop()
        cluster.stop()


def test_a_copy_of_a_data_directory_never_takes_over_for_the_node_that_started_the_cluster(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """The directory is copied before its node first starts the cluster (a new cluster lists
    its first primary without a join): the copy, empty, must not take over for it."""
    cluster = LocalCluster(zk_server.connect_string, zk_path, tmp_path / "logs", size=1)
    (node,) = cluster.nodes
    node.extra_args += ["--data-dir", str(tmp_path / "data-0"), "--session-timeout", "2"]
    WriteAheadLog(tmp_path / "data-0").close()  # the directory and its id, as a node's first run
    shutil.copytree(tmp_path / "data-0", tmp_path / "copy")
    copy = node_on_the_copy(zk_server, zk_path, tmp_path)
    try:
        cluster.start()
        cluster.wait_for("primary")
        with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
            kv.put("k", "v")
        faults.kill_all(cluster)
        copy.start()
        assert_waits_for_the_last_in_sync_set(copy)
    finally:
        copy.stop()
        cluster.stop()


@pytest.mark.parametrize("size", [2, 3])
def test_after_a_full_restart_the_backup_rejoins_before_the_old_sessions_expire(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path, size: int
) -> None:
    """The old processes' znodes outlive them by a session timeout (30 s here). The node
    that recovers as primary proves them dead (the restarted nodes answer at their
    addresses under other names) and removes them, so the other node is the designated
    backup at once instead of after the old backup's session expired. With three nodes and
    two copies, the old standby's znode too (the lowest left, it would be designated)."""
    cluster = LocalCluster(zk_server.connect_string, zk_path, tmp_path / "logs", size=size)
    for i, node in enumerate(cluster.nodes):
        node.extra_args += ["--data-dir", str(tmp_path / f"data-{i}"), "--session-timeout", "30"]
    try:
        cluster.start()
        expected = write_keys(cluster)
        kill_all_then_start(cluster)
        # Recovery lets a lower-registered node go first (3 s) and waits out the lease (1 s).
        cluster.wait_for("backup", timeout_s=12)
        assert len(cluster.meta().in_sync) == 2
        assert read_keys(cluster) == expected
    finally:
        cluster.stop()
