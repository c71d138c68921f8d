"""Writes in the background while a test does something else to a cluster (not a test
module: tests/ is on sys.path through conftest.py)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import kvstore
from kvstore.local.cluster import LocalCluster


@contextlib.contextmanager
def writes_meanwhile(cluster: LocalCluster, timeout_s: float = 10.0) -> Iterator[None]:
    """Puts of 100 keys from another thread through an exactly-once Client (``timeout_s``
    a call, failovers included) until the block is left (bounded: 100,000 at most). A put
    that fails in the end fails the test when the block is left."""
    done = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=timeout_s) as kv:
                for i in range(100_000):
                    if done.is_set():
                        return
                    kv.put(f"meanwhile{i % 100}", str(i))
        except Exception as exc:  # (seen by the test, not lost in the thread)
            failures.append(exc)

    writer = threading.Thread(target=write, name="writes-meanwhile")
    writer.start()
    try:
        yield
    finally:
        done.set()
        writer.join(timeout_s * 3)
    assert not writer.is_alive(), "the writer did not stop"
    assert not failures, failures
