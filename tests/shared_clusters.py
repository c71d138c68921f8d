"""A cluster that tests share (not a test module: conftest.py and test modules import it;
tests/ is on sys.path through conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import kvstore
from kvstore.local.cluster import LocalCluster, NodeProcess


class SharedCluster:
    """A cluster tests share (a module's, or the session's), handed to each as a fresh one
    would be: every node serving (one primary, the others synced backups) with an empty
    store. A test may write to it; one that leaves it otherwise (a node stopped or exited, or
    in another role, or keys that cannot be deleted) gets it replaced, under a new parent
    path, before the next test. So no test depends on another's, and one cluster starts
    instead of one a test (each start: a kv-createznode and a process per node, 1.5 to 3 s)."""

    RESET_TIMEOUT_S = 30.0

    def __init__(self, make: Callable[[str], LocalCluster]) -> None:
        """``make(zk_path)``: a new cluster (not started) under that parent path."""
        self._make = make
        self._cluster: LocalCluster | None = None

    def hand_out(self) -> LocalCluster:
        cluster = self._cluster
        if cluster is not None and not self._emptied(cluster):
            self.stop()
            cluster = None
        if cluster is None:
            cluster = self._make(f"/kvstore-test-{uuid.uuid4().hex}")
            try:
                cluster.start()
            except BaseException:
                cluster.stop()
                raise
            self._cluster = cluster
        return cluster

    def stop(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.stop()

    def _emptied(self, cluster: LocalCluster) -> bool:
        """Delete every key it holds; whether it then serves as when it started, empty."""
        try:
            roles = sorted(str(node.role()) for node in cluster.nodes)
            if roles != ["backup"] * (len(cluster.nodes) - 1) + ["primary"]:
                return False
            primary = cluster.wait_for("primary", self.RESET_TIMEOUT_S)
            keys = list(primary.dump())
            if keys:
                config = cluster.client_config()
                with kvstore.Client(
                    config.zk_connect,
                    config.zk_path,
                    timeout=self.RESET_TIMEOUT_S,
                    tls=config.tls,
                    zk_tls=config.zk_tls,
                ) as kv:
                    for key in keys:
                        kv.delete(key)
            return all(_key_count(node) == 0 for node in cluster.nodes)
        except (kvstore.KVError, RuntimeError, TimeoutError):  # (RuntimeError: a node exited)
            return False


def _key_count(node: NodeProcess) -> int | None:
    status = node.status(timeout_ms=5000)
    return None if status is None else int(status.key_count)


def shared_for_a_scope(make: Callable[[str], LocalCluster]) -> Iterator[SharedCluster]:
    """The body of a session- or module-scoped fixture: a SharedCluster of ``make``'s
    clusters, stopped at the end of the scope."""
    shared = SharedCluster(make)
    try:
        yield shared
    finally:
        shared.stop()
