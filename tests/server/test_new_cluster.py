"""A node that starts a NEW cluster (a fresh parent path, or one cleared by ``kv-createznode
--reset``) starts it empty: with a data directory that holds keys of an earlier cluster it
refuses and exits 1 (the files stay as they are), in memory it discards what it held. A node
that joins a new cluster as backup has no keys of another cluster in its data directory (it
refuses and exits 1), and records the id of the cluster (its incarnation) there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import kvstore
from kvstore.coordination import ClusterMeta, connect, create_parent
from kvstore.local.cluster import LocalCluster, NodeProcess, read_meta
from kvstore.local.processes import wait_until
from kvstore.local.zkserver import ZooKeeperServer

TIMEOUT_S = 30.0


def exit_or_primary(node: NodeProcess) -> str:
    """Poll until the node exits ("exit N") or serves as primary ("primary, K keys")."""

    def outcome() -> str | None:
        assert node.process is not None
        code = node.process.poll()
        if code is not None:
            return f"exit {code}"
        status = node.status()
        if status is not None and status.role == "primary":
            return f"primary, {status.key_count} keys"
        return None

    return wait_until(outcome, TIMEOUT_S, lambda: f"neither exit nor primary\n{node.log_tail()}")


def last_run(node: NodeProcess) -> str:
    return node.log_path.read_text().rsplit("--- starting:", 1)[1]


def assert_refused(node: NodeProcess, data_dir: Path, keys: int) -> None:
    assert exit_or_primary(node) == "exit 1", node.log_tail()
    logged = last_run(node)
    assert f"data directory {data_dir} holds {keys} keys of an earlier cluster" in logged, logged
    assert "move" in logged and "Traceback" not in logged, logged
    assert (data_dir / "node-id").exists()  # nothing was deleted
    assert any(data_dir.glob("wal-*.log")), sorted(data_dir.iterdir())


@pytest.fixture
def nodes(zk_server: ZooKeeperServer, tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """Node processes a test appends (stopped at the end)."""
    started: list[NodeProcess] = []
    try:
        yield started
    finally:
        for node in started:
            node.stop()


def test_a_data_directory_of_an_earlier_cluster_is_refused_under_a_new_path(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    zk = zk_server.connect_string
    data_dir = tmp_path / "data"
    create_parent(zk, zk_path)
    node = NodeProcess(zk, zk_path, tmp_path / "logs", extra_args=["--data-dir", str(data_dir)])
    nodes.append(node)
    node.start()
    node.wait_for_role(["primary"])
    with kvstore.Client(zk, zk_path, timeout=10) as kv:
        for key in ("a", "b", "c"):
            kv.put(key, "earlier")
    node.stop()

    fresh = f"{zk_path}-fresh"
    create_parent(zk, fresh)
    node.zk_path = fresh
    node.start()
    assert_refused(node, data_dir, 3)

    data_dir.rename(tmp_path / "data-aside")  # as the message says
    node.start()
    assert exit_or_primary(node) == "primary, 0 keys"
    assert "started a new, empty store" in last_run(node)
    with kvstore.Client(zk, fresh, timeout=10) as kv:
        assert kv.get("a") is None


def test_reset_after_the_newest_disk_was_lost_refuses_the_older_copy(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """The new-user walkthrough: the backup is killed, the primary acknowledges more writes
    alone, then dies with its disk. After --reset the old backup must not serve its older
    copy as the "new, empty store" (k=1 although k=2 was acknowledged, a deleted key back)."""
    zk = zk_server.connect_string
    create_parent(zk, zk_path)
    cluster = LocalCluster(zk, zk_path, tmp_path / "logs", size=2)
    for i, node in enumerate(cluster.nodes):  # short sessions: the dead znodes go soon
        node.extra_args += ["--data-dir", str(tmp_path / f"data-{i}"), "--session-timeout", "2"]
    try:
        cluster.start()
        primary, backup = cluster.wait_for("primary"), cluster.wait_for("backup")
        with kvstore.Client(zk, zk_path, timeout=10) as kv:
            kv.put("k", "1")
            kv.put("old", "yes")
            backup.kill()
            kv.put("k", "2")  # acknowledged by the primary alone
            assert kv.delete("old")
        primary.kill()
        shutil.rmtree(tmp_path / "data-0")  # the primary's disk is lost
        backup.start()
        wait_until(
            lambda: "waiting for one with a data directory" in last_run(backup) or None,
            TIMEOUT_S,
            backup.log_tail,
        )
        # (the backup is registered, waiting: the operator insists)
        assert create_parent(zk, zk_path, reset=True, force=True) == "reset"
        assert_refused(backup, tmp_path / "data-1", 2)

        (tmp_path / "data-1").rename(tmp_path / "data-1-aside")
        backup.start()
        assert exit_or_primary(backup) == "primary, 0 keys"
        with kvstore.Client(zk, zk_path, timeout=10) as kv:
            assert kv.get("k") is None
            assert kv.get("old") is None
    finally:
        cluster.stop()


def test_a_node_in_memory_that_starts_a_new_cluster_discards_what_it_held(
    cluster: LocalCluster,
) -> None:
    """--reset under a running cluster is refused (it would discard the store), --force
    does it: the primary is deposed (it restarts empty, saying why); the backup, now the
    lowest member, starts the new cluster: empty, not with its old copy."""
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        kv.put("k", "before the reset")
    backup = cluster.wait_for("backup")
    old_primary = cluster.wait_for("primary")
    refused = kv_createznode_reset(cluster)
    assert refused.returncode == 1, refused
    assert "refusing to reset" in refused.stderr and "--force" in refused.stderr, refused
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        assert kv.get("k") == "before the reset"  # nothing changed
    assert create_parent(cluster.zk_connect, cluster.zk_path, reset=True, force=True) == "reset"

    def new_primary() -> NodeProcess | None:
        meta = cluster.meta()
        if not meta.is_initialized:
            return None
        for node in cluster.nodes:
            status = node.status()
            if status is not None and status.node_id == meta.primary and status.role == "primary":
                return node
        return None

    primary = wait_until(new_primary, TIMEOUT_S, cluster.logs)
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        assert kv.get("k") is None
    assert primary is backup, cluster.logs()
    assert "the cluster metadata was reset" in old_primary.log_path.read_text()
    assert "discarded 1 key" in last_run(primary), last_run(primary)


def test_a_data_directory_of_another_cluster_is_refused_as_a_backup(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    """A node pointed at another cluster (a wrong path, or its own after a mistaken --reset)
    with keys in its data directory must not join it: the join would replace its files with
    the primary's copy. It exits 1 naming both incarnations, its files untouched; moved
    aside, it joins empty and the new directory records the cluster's incarnation."""
    zk = zk_server.connect_string
    data_dir = tmp_path / "data"
    create_parent(zk, zk_path)
    old = NodeProcess(zk, zk_path, tmp_path / "logs", extra_args=["--data-dir", str(data_dir)])
    nodes.append(old)
    old.start()
    old.wait_for_role(["primary"])
    with kvstore.Client(zk, zk_path, timeout=10) as kv:
        kv.put("a", "earlier")
        kv.put("b", "earlier")
    old.stop()
    earlier = (data_dir / "incarnation").read_text().strip()
    assert earlier == read_meta(zk, zk_path).incarnation
    files = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name != "lock"}

    fresh = f"{zk_path}-fresh"
    create_parent(zk, fresh)
    first = NodeProcess(zk, fresh, tmp_path / "logs")  # in memory: starts the cluster
    nodes.append(first)
    first.start()
    first.wait_for_role(["primary"])
    incarnation = read_meta(zk, fresh).incarnation
    assert incarnation not in ("", earlier)
    old.zk_path = fresh
    old.start()
    assert exit_or_primary(old) == "exit 1", old.log_tail()
    logged = last_run(old)
    assert f"data directory {data_dir} holds 2 keys of cluster incarnation {earlier}" in logged
    assert f"{fresh} holds incarnation {incarnation}" in logged and "move" in logged, logged
    assert {name: (data_dir / name).read_bytes() for name in files} == files  # (+ an empty segment)

    data_dir.rename(tmp_path / "data-aside")
    old.start()
    assert old.wait_for_role(["backup"]).key_count == 0
    assert (data_dir / "incarnation").read_text().strip() == incarnation


def test_metadata_of_an_earlier_version_gets_an_incarnation(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    """A parent created by an earlier kv-createznode (no data) gets an id from the node that
    starts the cluster; metadata without one (an earlier version's write) gets the primary's
    back, the one its data directory records."""
    zk = connect(zk_server.connect_string, 10.0, 10.0)
    try:
        zk.create(zk_path, b"")
        data_dir = tmp_path / "data"
        node = NodeProcess(
            zk_server.connect_string, zk_path, tmp_path, extra_args=["--data-dir", str(data_dir)]
        )
        nodes.append(node)
        node.start()
        node.wait_for_role(["primary"])
        incarnation = read_meta(zk_server.connect_string, zk_path).incarnation
        assert incarnation and (data_dir / "incarnation").read_text().strip() == incarnation
        data, stat = zk.get(zk_path)
        earlier = replace(ClusterMeta.from_bytes(data), incarnation="")
        zk.set(zk_path, earlier.to_bytes(), version=stat.version)
        wait_until(
            lambda: read_meta(zk_server.connect_string, zk_path).incarnation == incarnation or None,
            TIMEOUT_S,
            node.log_tail,
        )
    finally:
        zk.stop()
        zk.close()


def test_kv_createznode_gives_each_new_cluster_an_incarnation(
    zk_server: ZooKeeperServer, zk_path: str
) -> None:
    zk = zk_server.connect_string
    create_parent(zk, zk_path)
    created = read_meta(zk, zk_path).incarnation
    create_parent(zk, zk_path, replicas=3)  # an existing parent keeps its incarnation
    assert created and read_meta(zk, zk_path).incarnation == created
    create_parent(zk, zk_path, reset=True)  # a new cluster
    reset = read_meta(zk, zk_path)
    assert reset.incarnation not in ("", created) and reset.replicas == 3


def test_a_reset_right_after_every_node_died_is_not_refused(cluster: LocalCluster) -> None:
    """Killed nodes keep their znodes until their ZooKeeper sessions expire (10 s): the
    reset that DATA LOST prints must not be refused for them, only for nodes that run."""
    for node in cluster.nodes:
        node.kill()
    reset = kv_createznode_reset(cluster)
    assert reset.returncode == 0 and reset.stdout.startswith("/"), reset
    assert not cluster.meta().is_initialized


def kv_createznode_reset(cluster: LocalCluster) -> subprocess.CompletedProcess[str]:
    """``kv-createznode --reset`` of the cluster's parent, as an operator runs it."""
    command = ["createznode", "--reset", cluster.zk_connect, cluster.zk_path]
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *command], capture_output=True, text=True, timeout=60
    )
