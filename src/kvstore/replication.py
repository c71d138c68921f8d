"""Primary -> backup forwarding (primary side) and the fence/lease book-keeping (backup side).

Invariants:
- Entries reach the backup in the order ``Replicator.replicate`` was called. The
  primary calls it while holding the key's stripe write lock, so puts to one key
  are applied in the same order on both nodes.
- ``replicate`` returns only after the backup applied the entry (ack after apply).
  Concurrent callers share one ``replicate_batch`` RPC (group commit): the first
  caller to find the line idle sends everything queued so far, the others wait.
- Once a send fails the replicator is broken for good; every waiting and later
  caller gets :class:`BackupFailedError`. The primary must then drop the backup
  from the in-sync set (by CAS in ZooKeeper) before it acknowledges anything.
- Lease: a backup that accepts a batch at time t promises not to take over before
  t + lease_s (its clock). The primary counts its lease from the moment it *sent*
  the batch, minus a safety margin, so its lease always ends first.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from kvstore import errors
from kvstore.coordination import Member
from kvstore.rpc import Connection

LEASE_SAFETY = 0.8  # the primary uses only this fraction of the lease it was granted


class BackupFailedError(Exception):
    """Replication to the backup failed; the backup must be dropped from the in-sync set."""


class _Batch:
    __slots__ = ("error", "is_done", "keys", "size_bytes", "values")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.values: list[str] = []
        self.size_bytes = 0
        self.is_done = False
        self.error: BaseException | None = None


class Replicator:
    """The primary's line to one backup (one connection, group commit)."""

    def __init__(
        self,
        backup: Member,
        epoch: int,
        lease_s: float,
        rpc_timeout_ms: int,
        max_batch_bytes: int,
    ) -> None:
        self.backup = backup
        self.epoch = epoch
        self.is_in_sync = False
        self.is_broken = False
        self.lease_until = 0.0
        self.last_send_at = time.monotonic()
        self._lease_s = lease_s * LEASE_SAFETY
        self._max_batch_bytes = max_batch_bytes
        self._conn = Connection(backup.address, timeout_ms=rpc_timeout_ms)
        self._cv = threading.Condition(threading.Lock())
        self._unsent: deque[_Batch] = deque()
        self._is_sending = False
        self._wait_s = rpc_timeout_ms / 1000 + 1.0

    @property
    def has_lease(self) -> bool:
        return time.monotonic() < self.lease_until

    def replicate(self, key: str, value: str) -> None:
        """Return once the backup applied ``key = value``; raise BackupFailedError otherwise."""
        self._drive(self._enqueue(key, value))

    def heartbeat(self) -> None:
        """Send an (empty) batch now: renews the lease, detects a dead backup."""
        self._drive(self._enqueue(None, None))

    def _enqueue(self, key: str | None, value: str | None) -> _Batch:
        with self._cv:
            if self.is_broken:
                raise BackupFailedError(f"replication to {self.backup.address} already failed")
            batch = self._unsent[-1] if self._unsent else None
            if batch is None or batch.size_bytes >= self._max_batch_bytes:
                batch = _Batch()
                self._unsent.append(batch)
            if key is not None and value is not None:
                batch.keys.append(key)
                batch.values.append(value)
                batch.size_bytes += len(key) + len(value) + 8
            return batch

    def _drive(self, batch: _Batch) -> None:
        with self._cv:
            while not batch.is_done:
                if self._is_sending:
                    if not self._cv.wait(self._wait_s) and self._is_sending:
                        self._fail_all(BackupFailedError("replication stalled"))
                    continue
                self._send_oldest()
        if batch.error is not None:
            raise BackupFailedError(str(batch.error)) from batch.error

    def _send_oldest(self) -> None:
        """Called with the lock held; sends without it, as the group's leader."""
        sending = self._unsent.popleft()
        self._is_sending = True
        self._cv.release()
        error: BaseException | None = None
        try:
            started = time.monotonic()
            self._conn.call("replicate_batch", self.epoch, sending.keys, sending.values)
            self.lease_until = max(self.lease_until, started + self._lease_s)
            self.last_send_at = started
        except Exception as exc:  # every failure, expected (KVError) or not, breaks the line
            error = exc
        finally:
            self._cv.acquire()
            self._is_sending = False
        sending.is_done = True
        sending.error = error
        if error is not None:
            self._fail_all(error)
        self._cv.notify_all()

    def _fail_all(self, error: BaseException) -> None:
        self.is_broken = True
        while self._unsent:
            batch = self._unsent.popleft()
            batch.is_done = True
            batch.error = error
        self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._fail_all(BackupFailedError("replicator closed"))
        self._conn.close()


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
