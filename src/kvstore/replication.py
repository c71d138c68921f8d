"""Primary -> backup forwarding (primary side) and the fence/lease book-keeping (backup side).

Invariants:
- The primary calls ``Replicator.replicate`` while holding the key's stripe write
  lock, so puts to one key reach the backup one at a time, in the order they are
  applied on the primary. Puts to different keys replicate in parallel, each
  calling thread on its own connection.
- ``replicate`` returns only after the backup applied the entry (ack after apply).
- Once a send fails the replicator is broken for good; every later caller gets
  :class:`BackupFailedError`. The primary must then drop the backup
  from the in-sync set (by CAS in ZooKeeper) before it acknowledges anything.
- Lease: a backup that accepts a batch at time t promises not to take over before
  t + lease_s (its clock). The primary counts its lease from the moment it *sent*
  the batch, minus a safety margin, so its lease always ends first.
"""

from __future__ import annotations

import threading
import time

from kvstore import errors
from kvstore.coordination import Member
from kvstore.rpc import Connection

LEASE_SAFETY = 0.8  # the primary uses only this fraction of the lease it was granted


class BackupFailedError(Exception):
    """Replication to the backup failed; the backup must be dropped from the in-sync set."""


class Replicator:
    """The primary's line to one backup: one connection per calling thread, no shared queue.

    A put holds its key's stripe write lock until its entry is applied, so entries of
    one key never overtake each other even though threads replicate in parallel.
    """

    def __init__(self, backup: Member, epoch: int, lease_s: float, rpc_timeout_ms: int) -> None:
        self.backup = backup
        self.epoch = epoch
        self.is_in_sync = False
        self.is_broken = False
        self.lease_until = 0.0
        self.last_send_at = time.monotonic()
        self._lease_s = lease_s * LEASE_SAFETY
        self._rpc_timeout_ms = rpc_timeout_ms
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._lock = threading.Lock()

    @property
    def has_lease(self) -> bool:
        return time.monotonic() < self.lease_until

    def replicate(self, key: str, value: str) -> None:
        """Return once the backup applied ``key = value``; raise BackupFailedError otherwise."""
        self._send([key], [value])

    def heartbeat(self) -> None:
        """Send an empty batch: renews the lease, detects a dead backup."""
        self._send([], [])

    def _send(self, keys: list[str], values: list[str]) -> None:
        if self.is_broken:
            raise BackupFailedError(f"replication to {self.backup.address} already failed")
        conn = getattr(self._local, "conn", None) or self._connect()
        started = time.monotonic()
        try:
            conn.call("replicate_batch", self.epoch, keys, values)
        except Exception as exc:  # every failure, expected (KVError) or not, breaks the line
            self.is_broken = True
            raise BackupFailedError(f"replication to {self.backup.address}: {exc}") from exc
        if started + self._lease_s > self.lease_until:
            self.lease_until = started + self._lease_s
        self.last_send_at = started

    def _connect(self) -> Connection:
        # Not checked before each use: the backup never closes a live primary's connection,
        # and any failure breaks the whole line anyway.
        conn = Connection(
            self.backup.address, timeout_ms=self._rpc_timeout_ms, is_checked_before_use=False
        )
        with self._lock:
            if self.is_broken:
                raise BackupFailedError(f"replication to {self.backup.address} already failed")
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            self.is_broken = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


class BackupFence:
    """Backup side: which epoch's replicates are accepted, and the lease granted so far.

    All changes happen under one lock, so a takeover (``fence_if``) can never
    interleave with a batch being applied and acknowledged.
    """

    def __init__(self, lease_s: float) -> None:
        self._lease_s = lease_s
        self.lock = threading.Lock()
        self.accepting_epoch: int | None = None
        self.lease_granted_until = 0.0
        self.last_heard_at = time.monotonic()
        self.connection_closed_at = 0.0

    def open(self, epoch: int) -> None:
        with self.lock:
            self.accepting_epoch = epoch
            self.last_heard_at = time.monotonic()

    def check(self, epoch: int | None) -> None:
        """Raise StaleEpochError unless batches of ``epoch`` are accepted. Call with lock held."""
        if epoch is None or epoch != self.accepting_epoch:
            raise errors.StaleEpochError(
                f"replicate from epoch {epoch} refused: this node accepts epoch "
                f"{self.accepting_epoch} (a replicate must come from the current primary)"
            )

    def granted(self) -> None:
        """Record an accepted batch. Call with lock held, after applying it."""
        now = time.monotonic()
        self.last_heard_at = now
        self.lease_granted_until = now + self._lease_s

    def is_suspect(self, suspect_after_s: float) -> bool:
        now = time.monotonic()
        return (
            self.connection_closed_at > self.last_heard_at
            or now - self.last_heard_at > suspect_after_s
        )

    def fence_if(self, is_primary_dead: bool) -> bool:
        """Stop accepting the current primary if it is dead or its lease ran out."""
        with self.lock:
            if is_primary_dead or time.monotonic() >= self.lease_granted_until:
                self.accepting_epoch = None
                return True
            return False
