"""Fault injection for a LocalCluster: kill -9 the node holding a role, restart it at once.

Every loop here is bounded by a deadline and stops by itself; only processes the
cluster started are killed, by PID.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.bench import load
from kvstore.bench.workload import BenchResult, Workload
from kvstore.config import ClientConfig
from kvstore.local.cluster import LocalCluster


@dataclass
class Killer:
    """Kills the node holding ``role`` every ``interval_s`` ([low, high]) until ``seconds``.

    ``kills`` lists (seconds since ``origin_ns``, address): pass the benchmark's
    ``start_ns`` to have them on the execution log's clock (default: since start()).
    """

    cluster: LocalCluster
    role: str
    interval_s: tuple[float, float]
    seconds: float
    max_kills: int = 1000
    seed: int | None = None
    origin_ns: int | None = None
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
        origin = began if self.origin_ns is None else self.origin_ns / 1e9
        while len(self.kills) < self.max_kills:
            pause = rng.uniform(*self.interval_s)
            if time.monotonic() + pause >= deadline or self._stop.wait(pause):
                return
            node = self.cluster.find(self.role)
            if node is None:
                continue  # nobody holds the role right now (failover in progress)
            node.kill()
            self.kills.append((time.monotonic() - origin, node.address))
            node.start()

    def join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def kill_all(cluster: LocalCluster) -> None:
    """kill -9 every running node of ``cluster`` at once: all are signalled before any is
    waited for (the processes this cluster started, by PID)."""
    running = [node.process for node in cluster.nodes if node.is_running()]
    for process in running:
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
    for process in running:
        assert process is not None
        process.wait(timeout=10)


def run_with_kills(
    cluster: LocalCluster,
    workload: Workload,
    role: str,
    interval_s: tuple[float, float],
    max_kills: int = 1000,
    seed: int | None = None,
    procs: int = 1,
    on_start: Callable[[], None] | None = None,
) -> tuple[BenchResult, list[tuple[float, str]]]:
    """Run the benchmark (over ``procs`` client processes) while killing and restarting the
    node with ``role`` on a schedule that starts with the benchmark's clock (when ``on_start``
    is called too). The kill times are on the execution log's clock."""
    config = ClientConfig(cluster.zk_connect, cluster.zk_path)
    start_ns = time.monotonic_ns()
    killer = Killer(cluster, role, interval_s, workload.seconds, max_kills, seed, start_ns)

    def start() -> None:
        killer.start()
        if on_start is not None:
            on_start()

    try:
        result = load.run(workload, config, start_ns, procs=procs, on_start=start)
    finally:
        killer.join()
    return result, killer.kills
