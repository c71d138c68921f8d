"""Fault injection for a LocalCluster: kill -9 the node holding a role, restart it at once;
or a nemesis that mixes kills, pauses, ZooKeeper restarts and hostile requests.

Every loop here is bounded by a deadline and stops by itself; only processes the
cluster started are killed, by PID.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kvstore.bench import load
from kvstore.bench.workload import BenchResult, Workload
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.zkserver import is_ok

QUIET_END_S = 2.0
ROLE_POLL_S = 0.1


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
    # No kill in the last seconds of the run: the cluster gets time to recover before the end.
    quiet_end_s: float = QUIET_END_S
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
            if time.monotonic() + pause >= deadline - self.quiet_end_s or self._stop.wait(pause):
                return
            node = self._holder(deadline - self.quiet_end_s)
            if node is None:
                return
            node.kill()
            self.kills.append((time.monotonic() - origin, node.address))
            node.start()

    def _holder(self, until: float) -> NodeProcess | None:
        """The node holding the role, polled until ``until`` (a failover or re-sync may be
        in progress); None if nobody holds it by then or the killer was stopped. A primary
        only while a backup is in sync: killing the only in-memory copy loses the store for
        real (on a loaded machine the node restarted after the last kill may take seconds
        to start and join)."""
        while time.monotonic() < until:
            node = self.cluster.find(self.role)
            if node is not None and (self.role != "primary" or self.cluster.find("backup")):
                return node
            if self._stop.wait(ROLE_POLL_S):
                return None
        return None

    def join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def why_no_faults(seconds: float, first_s: float, replicas: int | None = None) -> str | None:
    """Why a run of ``seconds`` injects no fault at all when its first fault is due
    ``first_s`` in at the earliest (a Killer's or a Nemesis's interval): none comes in the
    last QUIET_END_S. With ``replicas``, for a Killer of the primary on a cluster keeping
    that many copies: it kills a primary only while a backup is in sync. None: faults come
    (each when a node holds the role it needs, see Killer._holder)."""
    if replicas is not None and replicas < 2:
        return "one copy has no backup to take over (a kill would lose the store)"
    if first_s >= seconds - QUIET_END_S:
        return (
            f"no fault comes in the last {QUIET_END_S:g} s of a run, nor before {first_s:g} s: "
            f"none fits in {seconds:g} s"
        )
    return None


def kill_all(cluster: LocalCluster) -> None:
    """kill -9 every running node of ``cluster`` at once (see kill_nodes)."""
    kill_nodes(cluster.nodes)


def kill_nodes(nodes: list[NodeProcess]) -> None:
    """kill -9 ``nodes`` at once: all are signalled before any is waited for (the processes
    a cluster started, by PID)."""
    running = [node.process for node in nodes if node.is_running()]
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
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[BenchResult, list[tuple[float, str]]]:
    """Run the benchmark (over ``procs`` client processes) while killing and restarting the
    node with ``role`` on a schedule that starts with the benchmark's clock (when ``on_start``
    is called too). The kill times are on the execution log's clock."""
    start_ns = time.monotonic_ns()
    killer = Killer(cluster, role, interval_s, workload.seconds, max_kills, seed, start_ns)
    result = _run_beside(killer, cluster, workload, start_ns, procs, on_start, progress)
    return result, killer.kills


class _Injector(Protocol):
    def start(self) -> None: ...
    def join(self) -> None: ...


def _run_beside(
    injector: _Injector,
    cluster: LocalCluster,
    workload: Workload,
    start_ns: int,
    procs: int,
    on_start: Callable[[], None] | None,
    progress: Callable[[int, int, float], None] | None,
) -> BenchResult:
    """Run the load with ``injector`` started on the load's clock, joined after it."""

    def start() -> None:
        injector.start()
        if on_start is not None:
            on_start()

    config = cluster.client_config()
    try:
        return load.run(workload, config, start_ns, procs=procs, on_start=start, progress=progress)
    finally:
        injector.join()


# --------------------------------------------------------------------------- the nemesis

# get() with an unknown field holding a list of 2**31 - 1 VOIDs: it froze a node for seconds
# before requests were checked before decoding (see RELIABILITY.md).
HOSTILE_REQUEST = bytes.fromhex("000000188001000100000003676574000000010f0002017fffffff00")
NEMESIS_FAULTS = ("kill-primary", "kill-backup", "pause-primary", "zookeeper-restart", "hostile")
PAUSE_S = 1.5  # past the 1 s lease: the backup must wait it out, the primary must not serve
PROBE_TIMEOUT_S = 2.0


@dataclass
class Nemesis:
    """Every ``interval_s`` ([low, high]) until ``seconds``, one fault drawn at random from
    ``kinds``: kill -9 of the primary or the backup (restarted at once), SIGSTOP of the
    primary for PAUSE_S, a ZooKeeper restart (when ``restart_zookeeper`` is given), a
    hostile request to the primary. One fault at a time: each is injected only while
    ZooKeeper answers and a primary serves with an in-sync backup. ``faults`` lists
    (seconds since ``origin_ns``, kind, address); only processes the cluster started are
    signalled, by PID."""

    cluster: LocalCluster
    interval_s: tuple[float, float]
    seconds: float
    kinds: tuple[str, ...] = NEMESIS_FAULTS
    restart_zookeeper: Callable[[], None] | None = None
    seed: int | None = None
    origin_ns: int | None = None
    faults: list[tuple[float, str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random(self.seed)
        kinds = [k for k in self.kinds if k != "zookeeper-restart" or self.restart_zookeeper]
        began = time.monotonic()
        deadline = began + self.seconds
        origin = began if self.origin_ns is None else self.origin_ns / 1e9
        while len(self.faults) < 1000:
            pause = rng.uniform(*self.interval_s)
            if time.monotonic() + pause >= deadline - QUIET_END_S or self._stop.wait(pause):
                return
            kind = rng.choice(kinds)
            at_s = time.monotonic() - origin
            address = self._inject(kind)
            if address is not None:
                self.faults.append((at_s, kind, address))

    def _inject(self, kind: str) -> str | None:
        """Inject one fault; the address it hit ("" for ZooKeeper), None if nobody held
        the role it needs right now."""
        if kind == "zookeeper-restart":
            assert self.restart_zookeeper is not None
            self.restart_zookeeper()
            return ""
        if not self._is_healthy():
            # One fault at a time, within the failure model of two in-memory copies: hitting
            # the second copy while the first is down or re-syncing, or a node while
            # ZooKeeper is away (no failover possible, sessions expiring), can lose the last
            # copy; the nodes then rightly stop with DATA LOST and the run measures nothing.
            return None
        node = self.cluster.find("backup" if kind == "kill-backup" else "primary")
        if node is None or node.pid is None:
            return None
        if kind in ("kill-primary", "kill-backup"):
            node.kill()
            node.start()
        elif kind == "pause-primary":
            os.kill(node.pid, signal.SIGSTOP)
            try:
                self._stop.wait(PAUSE_S)
            finally:
                os.kill(node.pid, signal.SIGCONT)
        elif kind == "hostile":
            _send_hostile_request(node.address)
        else:
            raise ValueError(f"unknown fault {kind!r} (expected one of {NEMESIS_FAULTS})")
        return node.address

    def _is_healthy(self) -> bool:
        """ZooKeeper answers, and a primary serves with an in-sync backup."""
        host, _, port = self.cluster.zk_connect.split(",")[0].rpartition(":")
        if not is_ok(host, int(port)):
            return False
        return bool(self.cluster.find("primary") and self.cluster.find("backup"))

    def join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def _send_hostile_request(address: str) -> None:
    """Send HOSTILE_REQUEST to a node and read whatever it answers (bounded)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S) as sock:
            sock.sendall(HOSTILE_REQUEST)
            sock.recv(4096)
    except OSError:
        pass  # refused, reset or timed out: the node's business; the load shows the cost


def recovery_s(faults: list[tuple[float, str, str]], success_ns: list[int]) -> list[float]:
    """What each fault cost: the longest time without a successful response from the fault
    until the next fault (or the last response), in seconds; -1 if no response came after
    it at all. Faults and responses on the execution log's clock."""
    ordered = sorted(success_ns)
    starts = [int(at_s * 1e9) for at_s, _, _ in faults]
    ends = [*starts[1:], ordered[-1] if ordered else 0]
    gaps = []
    for start, end in zip(starts, ends, strict=True):
        first = bisect.bisect_right(ordered, start)
        if first >= len(ordered):
            gaps.append(-1.0)
            continue
        times = [start, *ordered[first : bisect.bisect_right(ordered, end)], end]
        gaps.append(max(b - a for a, b in itertools.pairwise(times)) / 1e9)
    return gaps


def run_with_nemesis(
    cluster: LocalCluster,
    workload: Workload,
    interval_s: tuple[float, float],
    restart_zookeeper: Callable[[], None] | None = None,
    seed: int | None = None,
    procs: int = 1,
    on_start: Callable[[], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[BenchResult, list[tuple[float, str, str]]]:
    """Run the benchmark while a Nemesis injects faults; fault times on the log's clock."""
    start_ns = time.monotonic_ns()
    nemesis = Nemesis(
        cluster, interval_s, workload.seconds, restart_zookeeper=restart_zookeeper,
        seed=seed, origin_ns=start_ns,
    )  # fmt: skip
    result = _run_beside(nemesis, cluster, workload, start_ns, procs, on_start, progress)
    return result, nemesis.faults
