"""Registration in ZooKeeper: never a second znode at our address (when a reply is lost),
never a second node under one node id (a copied data directory)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from kazoo.exceptions import ConnectionLoss

from kvstore import errors
from kvstore.coordination import Coordinator, connect
from kvstore.local.cluster import LocalCluster
from kvstore.local.zkserver import ZooKeeperServer

ADDRESS = "127.0.0.1:9"


def test_a_retried_registration_adopts_the_znode_whose_reply_and_lookup_were_lost(
    zk_server: ZooKeeperServer, zk_path: str
) -> None:
    """The create lands but its reply is lost, and so is the lookup for our own znode: the
    retry must find that znode rather than create another one (which would pose as a
    second member at our address, designated backup until our session ends)."""
    zk = connect(zk_server.connect_string, 10.0, 10.0)
    coordinator = Coordinator(zk, zk_path, lambda: None)
    real_create, real_children = zk.create_async, zk.get_children_async
    lost = {"create": 1, "children": 1}

    def create_reply_lost(path: str, *args: Any, **kwargs: Any) -> Any:
        result = real_create(path, *args, **kwargs)
        if lost["create"] and path.startswith(f"{zk_path}/"):  # a member, not the parent
            lost["create"] -= 1
            result.get(timeout=10)  # it landed
            raise ConnectionLoss()
        return result

    def children_lost(*args: Any, **kwargs: Any) -> Any:
        if lost["children"]:
            lost["children"] -= 1
            raise ConnectionLoss()
        return real_children(*args, **kwargs)

    zk.ensure_path(zk_path)
    try:
        zk.create_async = create_reply_lost  # type: ignore[method-assign]
        zk.get_children_async = children_lost  # type: ignore[method-assign]
        with pytest.raises(errors.CoordinationError):
            coordinator.register(ADDRESS)
        name = coordinator.register(ADDRESS)
        children = zk.get_children(zk_path)
        assert children == [name]
        assert zk.get(f"{zk_path}/{name}")[0] == ADDRESS.encode()
    finally:
        zk.create_async, zk.get_children_async = real_create, real_children  # type: ignore[method-assign]
        coordinator.close()


def test_registration_never_creates_the_parent(zk_server: ZooKeeperServer, zk_path: str) -> None:
    """A missing parent is a definite NoClusterError, also for a retry after an unclear
    failure (which looks for its own znode first); nothing is created."""
    zk = connect(zk_server.connect_string, 10.0, 10.0)
    coordinator = Coordinator(zk, zk_path, lambda: None)
    try:
        with pytest.raises(errors.NoClusterError, match=f"{zk_path} does not exist"):
            coordinator.register(ADDRESS)
        coordinator._may_have_registered = True  # as after a create whose reply was lost
        with pytest.raises(errors.NoClusterError):
            coordinator.register(ADDRESS)
        assert zk.exists(zk_path) is None
    finally:
        coordinator.close()


def test_a_node_started_from_a_copy_of_a_live_node_s_data_directory_refuses(
    idle_cluster: LocalCluster, tmp_path: Path
) -> None:
    """A copy of a data directory (cp -r) carries its node id: a node started from it while
    the original's node runs exits 1 with one line, instead of serving under the same id."""
    first, second = idle_cluster.nodes
    data_dir = tmp_path / "data"
    first.extra_args += ["--data-dir", str(data_dir)]
    first.start()
    first.wait_for_role(["primary"])
    shutil.copytree(data_dir, tmp_path / "copy")
    second.extra_args += ["--data-dir", str(tmp_path / "copy")]
    second.start()
    assert second.process is not None
    assert second.process.wait(timeout=20) == 1, second.log_tail()
    node_id = (data_dir / "node-id").read_text().strip()
    logged = second.log_tail()
    assert f"at {first.address} runs with this node's id {node_id}" in logged, logged
    assert "Traceback" not in logged
    assert first.wait_for_role(["primary"]).key_count == 0
