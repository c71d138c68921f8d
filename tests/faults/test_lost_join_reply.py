"""A lost ``join_done`` reply followed by a primary crash.

The primary lists the joining backup in the in-sync set, answers, and dies; the answer
never arrives, and ZooKeeper does not answer the backup's first question either. The
backup holds a complete copy and is listed: it must take over with every write, neither
wiping itself nor waiting for the dead primary (it used to become a standby that retried
the dead primary forever).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

import kvstore
from kvstore.local.cluster import LocalCluster, NodeProcess

pytestmark = pytest.mark.faults

NODE_ARGS = ["--session-timeout", "2"]
KEYS = 300
INJECTOR = Path(__file__).with_name("lost_join_reply_node.py")


def test_backup_whose_join_done_reply_was_lost_takes_over_from_a_dead_primary(
    zk_server, zk_path: str, tmp_path: Path
) -> None:
    log_dir = tmp_path / "nodes"
    primary = NodeProcess(zk_server.connect_string, zk_path, log_dir, extra_args=NODE_ARGS)
    cluster = LocalCluster(zk_server.connect_string, zk_path, log_dir, nodes=[primary])
    written = {f"k{i}": f"v{i}" for i in range(KEYS)}
    try:
        cluster.start()
        with kvstore.Client(zk_server.connect_string, zk_path, timeout=30) as kv:
            for key, value in written.items():
                kv.put(key, value)
        assert primary.pid is not None
        backup = NodeProcess(
            zk_server.connect_string,
            zk_path,
            log_dir,
            extra_args=NODE_ARGS,
            command_prefix=[sys.executable, str(INJECTOR), str(primary.pid)],
        )
        cluster.nodes.append(backup)
        backup.start()
        backup.wait_for_role(["primary"], timeout_s=20)
        assert "reply lost (injected)" in backup.log_tail(200), "the fault was not injected"
        # Killed by the injector (its exit may lag the takeover a moment on a busy machine:
        # its sockets close before the process is reaped).
        assert primary.process is not None
        assert primary.process.wait(timeout=10) == -signal.SIGKILL
        with kvstore.Client(zk_server.connect_string, zk_path, timeout=30) as kv:
            assert kv.get_many(list(written)) == written, "acknowledged writes lost"
    finally:
        cluster.stop()
