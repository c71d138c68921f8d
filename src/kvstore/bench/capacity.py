"""Capacity probes for kv-bench: a bulk loader, memory per key, and state-transfer time.

- :func:`load_keys` puts ``key-0 .. key-(count-1)`` once each, spread over worker
  processes (spawned) and threads, each thread with its own client.
- :func:`measure_memory` loads keys into a lone primary and reads the growth of the
  node process's resident set (``VmRSS`` in ``/proc/<pid>/status``).
- :func:`measure_transfer` loads keys into a lone primary, keeps a writer putting,
  starts a backup and times its state transfer (until it reports role "backup";
  the backup's own "in sync with primary ...: K keys in T s" log line gives the
  precise figure).

Invariants: loopback only; every wait is bounded; every process started here is
stopped (by PID, through the objects that started it) before the probe returns.
"""

from __future__ import annotations

import multiprocessing
import random
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvstore import errors
from kvstore.bench.procstat import vm_rss_kib
from kvstore.client.locator import KVClient, PrimaryLocator
from kvstore.config import ClientConfig
from kvstore.coordination import create_parent
from kvstore.local.cluster import LocalCluster, NodeProcess, wait_until

LOAD_PROCS = 2
LOAD_THREADS_PER_PROC = 4
LOAD_RETRY_S = 5.0  # a put refused definitely (not applied) is retried for this long
MIN_LOAD_RATE = 500  # keys/s: a load slower than this is given up as stuck
IN_SYNC_LINE = re.compile(r"in sync with primary (\S+): (\d+) keys in ([\d.]+) s")


def key_bytes(count: int) -> int:
    """Total length of the key names key-0 .. key-(count-1)."""
    total, digits, low = 0, 1, 0
    while low < count:
        high = min(count, 10**digits)
        total += (high - low) * (4 + digits)
        low, digits = high, digits + 1
    return total


def make_value(index: int, value_bytes: int) -> str:
    return str(index).rjust(value_bytes, "v")[-value_bytes:] if value_bytes else ""


# --------------------------------------------------------------------------- bulk loader


def load_keys(
    zk_connect: str,
    zk_path: str,
    count: int,
    value_bytes: int,
    first: int = 0,
    procs: int = LOAD_PROCS,
    threads: int = LOAD_THREADS_PER_PROC,
) -> float:
    """Put key-first .. key-(first+count-1) once each; returns the seconds it took."""
    slices = _slices(first, first + count, procs * threads)
    per_proc = [slices[i::procs] for i in range(procs)]
    began = time.monotonic()
    context = multiprocessing.get_context("spawn")
    with context.Pool(procs) as pool:  # leaving the block terminates the workers
        pending = pool.starmap_async(
            _load_slices, [(zk_connect, zk_path, part, value_bytes) for part in per_proc if part]
        )
        pending.get(timeout=60 + count / MIN_LOAD_RATE)
    return time.monotonic() - began


def _slices(low: int, high: int, parts: int) -> list[tuple[int, int]]:
    size = -(-(high - low) // parts)
    return [(start, min(high, start + size)) for start in range(low, high, max(size, 1))]


def _load_slices(
    zk_connect: str, zk_path: str, slices: list[tuple[int, int]], value_bytes: int
) -> int:
    """A loader process: one thread (and client) per slice. Raises if any put failed."""
    config = ClientConfig(zk_connect, zk_path)
    locator = PrimaryLocator(config)
    failures: list[BaseException] = []

    def put_range(low: int, high: int) -> None:
        client = KVClient(locator, config)
        try:
            for i in range(low, high):
                client.put(f"key-{i}", make_value(i, value_bytes), retry_s=LOAD_RETRY_S)
        except errors.KVError as exc:
            failures.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=put_range, args=part, daemon=True) for part in slices]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()  # bounded by the pool's timeout in the parent
    finally:
        locator.close()
    if failures:
        raise errors.KVError(f"loading failed: {failures[0]!r}")
    return sum(high - low for low, high in slices)


# --------------------------------------------------------------------------- memory per key


@dataclass
class MemoryReport:
    keys: int
    value_bytes: int
    rss_before_kib: int
    rss_after_kib: int
    rss_per_key_bytes: float
    raw_bytes_per_key: float  # key + value, as UTF-8
    overhead_per_key_bytes: float
    load_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_memory(zk_connect: str, log_dir: Path, keys: int, value_bytes: int) -> MemoryReport:
    """RSS growth of a lone primary per key loaded (a warm-up load is not counted)."""
    cluster = LocalCluster(zk_connect, _fresh_path("memory"), log_dir, size=1)
    try:
        cluster.start()
        node = cluster.nodes[0]
        assert node.pid is not None
        warm_up = min(10_000, keys)  # first connections, threads, allocator arenas
        load_keys(zk_connect, cluster.zk_path, warm_up, value_bytes, first=keys)
        before = vm_rss_kib(node.pid)
        load_s = load_keys(zk_connect, cluster.zk_path, keys, value_bytes)
        _wait_for_key_count(node, keys + warm_up)
        after = vm_rss_kib(node.pid)
    finally:
        cluster.stop()
    per_key = (after - before) * 1024 / keys
    raw = (key_bytes(keys) + keys * value_bytes) / keys
    return MemoryReport(keys, value_bytes, before, after, per_key, raw, per_key - raw, load_s)


def _wait_for_key_count(node: NodeProcess, count: int, timeout_s: float = 30.0) -> None:
    def reached() -> Any | None:
        status = node.status(timeout_ms=2000)
        return status if status is not None and status.key_count >= count else None

    wait_until(reached, timeout_s, lambda: f"node {node.address} did not reach {count} keys")


# --------------------------------------------------------------------------- state transfer


@dataclass
class TransferReport:
    keys: int
    value_bytes: int
    load_s: float
    until_backup_role_s: float  # from starting the backup process to its reporting "backup"
    in_sync_keys: int | None  # from the backup's log line
    in_sync_s: float | None
    writer_puts: int  # puts acknowledged while the backup joined
    writer_failures: int
    primary_keys_after: int | None
    backup_keys_after: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_transfer(
    zk_connect: str, log_dir: Path, keys: int, value_bytes: int = 100, timeout_s: float = 300.0
) -> TransferReport:
    """Time a backup's state transfer of ``keys`` keys while a writer keeps putting."""
    zk_path = _fresh_path("transfer")
    create_parent(zk_connect, zk_path)
    primary = NodeProcess(zk_connect, zk_path, log_dir)
    backup = NodeProcess(zk_connect, zk_path, log_dir)
    writer = _Writer(ClientConfig(zk_connect, zk_path), keys, value_bytes)
    try:
        primary.start()
        primary.wait_for_role(["primary"])
        load_s = load_keys(zk_connect, zk_path, keys, value_bytes)
        writer.start(timeout_s)
        began = time.monotonic()
        backup.start()
        backup.wait_for_role(["backup"], timeout_s=timeout_s)
        until_backup_s = time.monotonic() - began
        writer.stop()
        primary_status, backup_status = primary.status(2000), backup.status(2000)
    finally:
        writer.stop()
        backup.stop()
        primary.stop()
    match = IN_SYNC_LINE.search(backup.log_path.read_text(errors="replace"))
    return TransferReport(
        keys=keys,
        value_bytes=value_bytes,
        load_s=load_s,
        until_backup_role_s=until_backup_s,
        in_sync_keys=int(match.group(2)) if match else None,
        in_sync_s=float(match.group(3)) if match else None,
        writer_puts=writer.puts,
        writer_failures=writer.failures,
        primary_keys_after=primary_status.key_count if primary_status else None,
        backup_keys_after=backup_status.key_count if backup_status else None,
    )


class _Writer:
    """One thread putting random existing keys until stopped (or its time limit)."""

    def __init__(self, config: ClientConfig, keyspace: int, value_bytes: int) -> None:
        self._config = config
        self._keyspace = keyspace
        self._value_bytes = value_bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.puts = 0
        self.failures = 0

    def start(self, timeout_s: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(timeout_s,), daemon=True)
        self._thread.start()

    def _run(self, timeout_s: float) -> None:
        locator = PrimaryLocator(self._config)
        client = KVClient(locator, self._config)
        rng = random.Random()
        deadline = time.monotonic() + timeout_s
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                index = rng.randrange(self._keyspace)
                try:
                    client.put(f"key-{index}", make_value(rng.getrandbits(40), self._value_bytes))
                    self.puts += 1
                except errors.KVError:
                    self.failures += 1
                    self._stop.wait(0.01)
        finally:
            client.close()
            locator.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _fresh_path(what: str) -> str:
    return f"/kv-bench-{what}-{uuid.uuid4().hex[:8]}"
