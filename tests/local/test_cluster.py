"""LocalCluster, the harness of the demo, the benchmarks and the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.local.cluster import LocalCluster, NodeExitedError
from kvstore.local.zkserver import ZooKeeperServer


def test_a_node_that_exits_while_the_cluster_starts_is_named_in_one_line(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """kv-demo and kv-bench print ``summary`` (exit 1) instead of a traceback."""
    cluster = LocalCluster(
        zk_server.connect_string, zk_path, tmp_path, size=1, node_args=["--reply-budget-mb", "0"]
    )
    try:
        with pytest.raises(NodeExitedError) as failed:
            cluster.start(timeout_s=20)
    finally:
        cluster.stop()
    node = cluster.nodes[0]
    summary = failed.value.summary
    assert "\n" not in summary
    assert summary.startswith(f"node {node.address} exited with 2: ")
    assert "--reply-budget-mb" in summary  # kv-node's own last line: why it exited
    assert summary.endswith(f"(log: {node.log_path})")
    assert str(failed.value).startswith(summary + "\n")  # the log's tail follows, for tests
