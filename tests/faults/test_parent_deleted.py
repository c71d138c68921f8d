"""A node never re-creates a parent znode deleted while it ran: it stops (exit 1) instead.

A new parent holds a new, empty cluster. The node used to re-create it whenever it
registered, so a parent an operator deleted came back, empty, as soon as a node registered
again: a primary or a standby whose ZooKeeper session expired (a standby restarts, a new
process with the same arguments: --create-parent must not apply to it), or a node whose
znode vanished with the parent.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from kazoo.exceptions import NotEmptyError

from kvstore.coordination import ClusterView, connect, create_parent
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.processes import wait_until

pytestmark = pytest.mark.faults

SESSION_TIMEOUT_S = 1.0
WITHIN_S = 15.0
# A first connection attempt that reaches a busy server can hang for a whole session
# timeout before kazoo retries: allow several attempts on a loaded machine.
ZK_CONNECT_S = 30.0


@contextmanager
def cluster_view(zk_connect: str, zk_path: str) -> Iterator[ClusterView]:
    zk = connect(zk_connect, 10.0, ZK_CONNECT_S)
    try:
        yield ClusterView(zk, zk_path, lambda: None)
    finally:
        zk.stop()
        zk.close()


def expire_then_delete_the_parent(
    node: NodeProcess, zk_connect: str, zk_path: str, others: Sequence[NodeProcess] = ()
) -> None:
    """SIGSTOP ``node``, stop the ``others``, and once ZooKeeper expired the node's session
    delete the (now empty) parent znode; SIGCONT the node."""
    status = node.status()
    assert status is not None and node.pid is not None
    os.kill(node.pid, signal.SIGSTOP)
    try:
        for other in others:
            other.stop()  # (its session ends with it)
        with cluster_view(zk_connect, zk_path) as view:

            def session_expired() -> bool | None:
                view.refresh()
                return all(m.name != status.node_id for m in view.members()) or None

            wait_until(session_expired, WITHIN_S, lambda: "the session never expired")
            view.zk.delete(zk_path)  # not recursive: no member may be left
    finally:
        os.kill(node.pid, signal.SIGCONT)


def assert_stops_without_the_parent(node: NodeProcess, zk_connect: str, zk_path: str) -> None:
    """The node exits 1 saying why, and the parent stays deleted."""
    process = node.process
    assert process is not None
    code = wait_until(process.poll, WITHIN_S, lambda: f"still running\n{node.log_tail()}")
    log = node.log_tail(200)
    assert code == 1, log
    assert f"{zk_path} does not exist in ZooKeeper" in log, log
    assert "it was deleted while this node ran" in log, log
    assert "Traceback" not in log, log
    with cluster_view(zk_connect, zk_path) as view:
        assert not view.exists(), "the parent was re-created"


def test_a_primary_does_not_recreate_a_parent_deleted_while_its_session_expired(
    zk_server, zk_path: str, tmp_path: Path
) -> None:
    """The primary registers again on its new session, by itself (no restart)."""
    create_parent(zk_server.connect_string, zk_path, timeout_s=ZK_CONNECT_S)
    node = NodeProcess(
        zk_server.connect_string,
        zk_path,
        tmp_path,
        extra_args=["--session-timeout", str(SESSION_TIMEOUT_S)],
    )
    try:
        node.start()
        node.wait_for_role(["primary"])
        expire_then_delete_the_parent(node, zk_server.connect_string, zk_path)
        assert_stops_without_the_parent(node, zk_server.connect_string, zk_path)
    finally:
        node.stop()


@pytest.mark.parametrize("extra", [[], ["--create-parent"]], ids=["plain", "create-parent"])
def test_a_standby_restarting_after_its_session_expired_does_not_recreate_the_parent(
    zk_server, zk_path: str, tmp_path: Path, extra: list[str]
) -> None:
    """A standby restarts (a new process, same arguments) when its session expires; the
    restart must not create the parent, not even if the node was started with
    --create-parent (a parent missing then was deleted while it ran)."""
    # One copy: the second node waits as a standby.
    create_parent(zk_server.connect_string, zk_path, timeout_s=ZK_CONNECT_S, replicas=1)
    primary = NodeProcess(zk_server.connect_string, zk_path, tmp_path)
    standby = NodeProcess(
        zk_server.connect_string,
        zk_path,
        tmp_path,
        extra_args=["--session-timeout", str(SESSION_TIMEOUT_S), *extra],
    )
    try:
        primary.start()
        primary.wait_for_role(["primary"])
        standby.start()
        standby.wait_for_role(["standby"])
        expire_then_delete_the_parent(standby, zk_server.connect_string, zk_path, [primary])
        assert_stops_without_the_parent(standby, zk_server.connect_string, zk_path)
        assert "restarting" in standby.log_tail(200)
    finally:
        standby.stop()
        primary.stop()


def test_a_serving_cluster_whose_parent_is_deleted_stops(
    zk_server, zk_path: str, tmp_path: Path
) -> None:
    """``deleteall`` of a serving cluster's parent (members first, then the parent): the
    primary and the backup both stop, none re-creates it. (Served on, they could not fence
    a failover any more, and clients no longer find them.)"""
    cluster = LocalCluster(zk_server.connect_string, zk_path, tmp_path)
    try:
        cluster.start()
        with cluster_view(zk_server.connect_string, zk_path) as view:

            def deleted() -> bool | None:
                try:
                    view.zk.delete(zk_path, recursive=True)
                except NotEmptyError:  # a member registered meanwhile: again
                    return None
                return True

            wait_until(deleted, WITHIN_S, lambda: "members kept coming")
        for node in cluster.nodes:
            assert_stops_without_the_parent(node, zk_server.connect_string, zk_path)
    finally:
        cluster.stop()
