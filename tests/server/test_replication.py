"""Replication, state transfer, failover and restart: real ZooKeeper, real node processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kvstore
from cluster_load import writes_meanwhile
from kvstore import errors
from kvstore.client.locator import KVClient, PrimaryLocator
from kvstore.config import ClientConfig
from kvstore.coordination import create_parent
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.processes import wait_until
from kvstore.local.zkserver import ZooKeeperServer
from kvstore.rpc import Connection, probe
from kvstore.server.roles import EXIT_DATA_LOST

RETRY_S = 15.0


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[KVClient]:
    config = ClientConfig(cluster.zk_connect, cluster.zk_path)
    locator = PrimaryLocator(config)
    kv = KVClient(locator, config)
    yield kv
    kv.close()
    locator.close()


def poll(
    condition: Callable[[], object], timeout_s: float = 20.0, what: str = "condition"
) -> object:
    return wait_until(
        lambda: condition() or None, timeout_s, lambda: f"{what} not reached within {timeout_s} s"
    )


def put_all(kv: KVClient, items: dict[str, str]) -> None:
    for key, value in items.items():
        kv.put(key, value, retry_s=RETRY_S)


def test_backup_applies_every_acknowledged_put(cluster: LocalCluster, client: KVClient) -> None:
    items = {f"k{i}": f"v{i}-é" for i in range(300)}
    put_all(client, items)
    backup = cluster.find("backup")
    assert backup is not None
    status = backup.status()
    assert status is not None and status.key_count == len(items)
    assert client.get("k7") == "v7-é"
    assert client.get("never-written") == ""


def test_primary_failover_keeps_every_write_and_restarted_node_resyncs(
    cluster: LocalCluster, client: KVClient
) -> None:
    items = {f"k{i}": f"v{i}" for i in range(500)}
    put_all(client, items)
    old_primary = cluster.find("primary")
    assert old_primary is not None
    old_primary.kill()
    new_primary = cluster.wait_for("primary", timeout_s=20)
    assert new_primary is not old_primary
    assert new_primary.dump() == items
    items["after"] = "failover"
    client.put("after", "failover", retry_s=RETRY_S)

    old_primary.start()
    old_primary.wait_for_role(["backup"], timeout_s=30)
    status = old_primary.status()
    assert status is not None and status.key_count == len(items)
    # The restarted node now holds everything: it can take over in turn.
    new_primary.kill()
    assert cluster.wait_for("primary", timeout_s=20) is old_primary
    assert old_primary.dump() == items


def test_backup_restart_rejoins_and_syncs(cluster: LocalCluster, client: KVClient) -> None:
    put_all(client, {f"k{i}": "before" for i in range(200)})
    backup = cluster.find("backup")
    primary = cluster.find("primary")
    assert backup is not None and primary is not None
    backup.kill()
    client.put("while-backup-down", "x", retry_s=RETRY_S)
    backup.start()
    backup.wait_for_role(["backup"], timeout_s=30)
    primary.kill()
    assert cluster.wait_for("primary", timeout_s=20) is backup
    data = backup.dump()
    assert len(data) == 201 and data["while-backup-down"] == "x"


def test_state_transfer_under_concurrent_puts(idle_cluster: LocalCluster) -> None:
    cluster = idle_cluster
    primary, backup = cluster.nodes
    primary.start()
    primary.wait_for_role(["primary"])
    config = ClientConfig(cluster.zk_connect, cluster.zk_path)
    locator = PrimaryLocator(config)
    expected: dict[str, str] = {}
    preload = KVClient(locator, config)
    for i in range(20_000):
        preload.put(f"key-{i}", f"old-{i}", retry_s=RETRY_S)
        expected[f"key-{i}"] = f"old-{i}"
    preload.close()

    stop = threading.Event()
    acked: list[dict[str, str]] = [{} for _ in range(3)]

    def writer(slot: int) -> None:
        kv = KVClient(locator, config)
        deadline = time.monotonic() + 60
        n = 0
        while not stop.is_set() and time.monotonic() < deadline:
            key = f"key-{(n % 6_000) * 3 + slot}"  # disjoint keys per writer
            value = f"new-{slot}-{n}"
            kv.put(key, value, retry_s=RETRY_S)
            acked[slot][key] = value
            n += 1
        kv.close()

    writers = [threading.Thread(target=writer, args=(slot,)) for slot in range(3)]
    for thread in writers:
        thread.start()
    poll(lambda: sum(map(len, acked)) > 500, what="writers running")
    backup.start()  # joins while the writers keep going
    backup.wait_for_role(["backup"], timeout_s=30)
    poll(lambda: sum(map(len, acked)) > 5000, what="writes after the join")
    stop.set()
    for thread in writers:
        thread.join(timeout=30)
    for slot_acked in acked:
        expected.update(slot_acked)
    locator.close()

    primary.kill()  # the backup's copy is now the only one: it must be exact
    cluster.wait_for("primary", timeout_s=20)
    assert backup.dump() == expected


def test_graceful_stop_hands_over(cluster: LocalCluster, client: KVClient) -> None:
    put_all(client, {"a": "1", "b": "2"})
    primary = cluster.find("primary")
    assert primary is not None
    primary.stop()
    assert primary.process is not None and primary.process.returncode == 0
    new_primary = cluster.wait_for("primary", timeout_s=20)
    assert new_primary.dump() == {"a": "1", "b": "2"}


def test_paused_primary_is_replaced_after_its_lease_and_steps_down(
    cluster: LocalCluster, client: KVClient
) -> None:
    put_all(client, {"a": "1"})
    primary = cluster.find("primary")
    backup = cluster.find("backup")
    assert primary is not None and backup is not None and primary.pid is not None
    os.kill(primary.pid, signal.SIGSTOP)
    try:
        assert cluster.wait_for("primary", timeout_s=20) is backup
        client.put("a", "2", retry_s=RETRY_S)
    finally:
        os.kill(primary.pid, signal.SIGCONT)
    # The old primary learns it was deposed, restarts empty and rejoins as backup.
    primary.wait_for_role(["backup"], timeout_s=30)
    assert client.get("a", retry_s=RETRY_S) == "2"


def test_a_dropped_backup_that_joined_again_is_not_probed_for_ever(
    cluster: LocalCluster,
) -> None:
    """The primary probes a dropped backup each control tick until it is proven dead (its
    znode then goes). One that joined again is alive: it was probed about 20 times a second
    for as long as it lived (each probe a connection, left in TIME_WAIT by the primary)."""
    primary = cluster.wait_for("primary")
    backup = cluster.wait_for("backup")
    assert backup.pid is not None
    with writes_meanwhile(cluster, RETRY_S):  # the primary drops it on a failed batch
        os.kill(backup.pid, signal.SIGSTOP)
        try:
            poll(lambda: "dropped backup" in primary.log_path.read_text(), what="backup dropped")
        finally:
            os.kill(backup.pid, signal.SIGCONT)
    # (Its own status said "backup" until it noticed the drop: the primary says it is back.)
    poll(lambda: primary.log_path.read_text().count(" is in sync ") >= 2, what="rejoined")
    before = connections_to(backup.port)
    time.sleep(2)  # (what is measured is the absence of probes over a while)
    probes = connections_to(backup.port) - before
    # (The primary's lines to it may open just after its join: a few. Probes made ~40.)
    assert len(probes) <= 4, f"{len(probes)} new connections to the rejoined backup in 2 s"


def connections_to(port: int) -> set[str]:
    """This host's TCP connections to ``port``, open or closed lately (TIME_WAIT lasts a
    minute), each by its local address."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return {
        fields[1] for fields in map(str.split, lines)
        if int(fields[2].rsplit(":", 1)[1], 16) == port
    }  # fmt: skip


def kill_the_only_copy(cluster: LocalCluster) -> tuple[NodeProcess, NodeProcess]:
    """The first node, primary alone, takes a put and is killed before anyone synced it
    (its znode goes 2 s later); returns it and the second node, not started yet."""
    only, newcomer = cluster.nodes
    only.extra_args += ["--session-timeout", "2"]  # the newcomer decides once its znode goes
    only.start()
    only.wait_for_role(["primary"])
    Connection(only.address).call("put", "precious", "data")
    only.kill()
    return only, newcomer


def says_data_lost(newcomer: NodeProcess) -> None:
    newcomer.start()
    assert newcomer.process is not None
    assert newcomer.process.wait(timeout=30) == EXIT_DATA_LOST
    assert "DATA LOST" in newcomer.log_path.read_text()


def test_a_standby_replaces_a_killed_backup_before_its_session_expires(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """A backup killed -9 leaves its znode for its session timeout (30 s here), and the
    standby behind it is designated only once it goes. Nothing listens at the dead
    backup's address: the primary removes its znode at once (it waited for the session,
    a proof of death being another node answering there), and the standby joins."""
    cluster = LocalCluster(zk_server.connect_string, zk_path, tmp_path / "nodes", size=3)
    primary, *others = cluster.nodes
    for node in others:
        node.extra_args += ["--session-timeout", "30"]
    try:
        cluster.start()
        backup = cluster.wait_for("backup")
        standby = next(node for node in others if node is not backup)
        standby.wait_for_role(["standby"])  # (it may still be starting)
        Connection(primary.address).call("put", "k", "v")
        backup.kill()
        wait_until(lambda: standby.role() == "backup" or None, 10, cluster.logs)
        assert Connection(standby.address).call("status").key_count == 1
        assert "is gone (nothing listens at its address); removing its znode" in (
            primary.log_path.read_text()
        )
    finally:
        cluster.stop()


def test_no_complete_copy_left_is_reported_not_served(idle_cluster: LocalCluster) -> None:
    cluster = idle_cluster
    only, newcomer = kill_the_only_copy(cluster)
    says_data_lost(newcomer)

    assert create_parent(cluster.zk_connect, cluster.zk_path, reset=True) == "reset"
    newcomer.start()
    newcomer.wait_for_role(["primary"])
    with pytest.raises(errors.KVError):
        Connection(only.address, connect_timeout_ms=200).call("get", "precious")
    assert Connection(newcomer.address).call("get", "precious") == ""


def test_another_cluster_at_the_last_copys_address_is_no_copy(
    idle_cluster: LocalCluster, tmp_path: Path
) -> None:
    """The only copy died and a node of another cluster now serves at its address (its
    port reused): that node is no copy of this cluster's data, so the newcomer says DATA
    LOST instead of waiting for it for ever (their incarnations differ)."""
    cluster = idle_cluster
    only, newcomer = kill_the_only_copy(cluster)
    other_path = f"{cluster.zk_path}-other"
    create_parent(cluster.zk_connect, other_path)
    stranger = NodeProcess(cluster.zk_connect, other_path, tmp_path, port=only.port)
    try:
        stranger.start()
        assert stranger.wait_for_role(["primary"]).epoch >= 1  # (as high as the dead one's)
        says_data_lost(newcomer)
    finally:
        stranger.stop()


def test_primary_whose_session_expired_keeps_its_data(zk_server, zk_path, tmp_path) -> None:
    """The only copy must survive a ZooKeeper session expiry: the primary re-registers."""
    create_parent(zk_server.connect_string, zk_path)
    node = NodeProcess(
        zk_server.connect_string, zk_path, tmp_path, extra_args=["--session-timeout", "1"]
    )
    try:
        node.start()
        before = node.wait_for_role(["primary"])
        Connection(node.address).call("put", "precious", "data")
        assert node.pid is not None
        os.kill(node.pid, signal.SIGSTOP)  # stops heart-beating: the session expires
        try:
            poll(
                lambda: not _has_member(zk_server.connect_string, zk_path, before.node_id),
                what="the session to expire",
            )
        finally:
            os.kill(node.pid, signal.SIGCONT)
        after = poll(lambda: _renamed_primary(node, before.node_id), what="re-registration")
        assert after.epoch == before.epoch
        assert Connection(node.address).call("get", "precious") == "data"
    finally:
        node.stop()


def _has_member(zk_connect: str, zk_path: str, name: str) -> bool:
    from kvstore.coordination import connect

    zk = connect(zk_connect, session_timeout_s=10, connect_timeout_s=10)
    try:
        return name in zk.get_children(zk_path)
    finally:
        zk.stop()
        zk.close()


def _renamed_primary(node: NodeProcess, old_name: str) -> object:
    status = node.status()
    if status is not None and status.role == "primary" and status.node_id != old_name:
        return status
    return None


def test_a_node_bound_to_every_interface_registers_its_advertised_address(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    cluster = LocalCluster(zk_server.connect_string, zk_path, tmp_path, size=1)
    node = cluster.nodes[0]
    node.host = "0.0.0.0"
    node.extra_args += ["--advertise", f"127.0.0.1:{node.port}"]
    cluster.create_parent()
    try:
        node.start()

        def primary_status() -> Any | None:
            status = probe(f"127.0.0.1:{node.port}", 500)
            return status if status is not None and status.role == "primary" else None

        status = wait_until(primary_status, 30, node.log_tail)
        assert status.primary_address == f"127.0.0.1:{node.port}"
        with kvstore.Client(zk_server.connect_string, zk_path, timeout=10) as kv:
            kv.put("k", "v")
            assert kv.get("k") == "v"
    finally:
        cluster.stop()


def test_a_backup_let_go_by_a_lower_replication_factor_says_why(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """kv-createznode --replicas 2 on a serving 3-copy cluster: one backup is let go, and its
    log says so (it used to say "no longer in sync with the primary; rejoining", which
    reads like a fault, and it stays a standby)."""
    cluster = LocalCluster(
        zk_server.connect_string, zk_path, tmp_path / "nodes", size=3, replicas=3
    )
    try:
        cluster.start()
        backups = [node for node in cluster.nodes if node.role() == "backup"]
        assert len(backups) == 2, cluster.logs()
        create_parent(zk_server.connect_string, zk_path, replicas=2)
        let_go = wait_until(
            lambda: next((node for node in backups if node.role() == "standby"), None),
            20,
            cluster.logs,
        )
        line = wait_until(
            lambda: next(
                (
                    text
                    for text in let_go.log_path.read_text().splitlines()
                    if "no longer a backup" in text
                ),
                None,
            ),
            10,
            let_go.log_tail,
        )
        assert "dropped this node from its in-sync set" in line, line
        assert "replication factor 2" in line, line
        # ... and, as a standby, why it does not join (once: not at every control step).
        wait_until(
            lambda: "standby: the replication factor is 2" in let_go.log_path.read_text() or None,
            10,
            let_go.log_tail,
        )
        assert let_go.log_path.read_text().count("standby: the replication factor") == 1
    finally:
        cluster.stop()
