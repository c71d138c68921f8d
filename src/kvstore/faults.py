"""Fault injection for a LocalCluster: kill -9 the node holding a role, restart it at once.

Every loop here is bounded by a deadline and stops by itself; only processes the
cluster started are killed, by PID.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from kvstore import bench
from kvstore.cluster import LocalCluster
from kvstore.config import ClientConfig


@dataclass
class Killer:
    """Kills the node holding ``role`` every ``interval_s`` ([low, high]) until ``seconds``."""

    cluster: LocalCluster
    role: str
    interval_s: tuple[float, float]
    seconds: float
    max_kills: int = 1000
    seed: int | None = None
    kills: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"kill-{self.role}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random(self.seed)
        began = time.monotonic()
        deadline = began + self.seconds
        while len(self.kills) < self.max_kills:
            pause = rng.uniform(*self.interval_s)
            if time.monotonic() + pause >= deadline or self._stop.wait(pause):
                return
            node = self.cluster.find(self.role)
            if node is None:
                continue  # nobody holds the role right now (failover in progress)
            node.kill()
            self.kills.append((time.monotonic() - began, node.address))
            node.start()

    def join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def run_with_kills(
    cluster: LocalCluster,
    workload: bench.Workload,
    role: str,
    interval_s: tuple[float, float],
    max_kills: int = 1000,
    seed: int | None = None,
) -> tuple[bench.BenchResult, list[tuple[float, str]]]:
    """Run the benchmark while killing (and restarting) the node with ``role`` on a schedule."""
    config = ClientConfig(cluster.zk_connect, cluster.zk_path)
    killer = Killer(cluster, role, interval_s, workload.seconds, max_kills, seed)
    killer.start()
    try:
        result = bench.run(workload, config)
    finally:
        killer.join()
    return result, killer.kills
