"""The in-memory map and its striped reader-writer locks. No network, no ZooKeeper.

Keys are spread over ``stripe_count`` shards, each a dict guarded by its own
reader-writer lock (readerwriterlock's fair lock). Readers of one stripe run
together; a writer has the stripe alone. The primary keeps a stripe's write lock
while a put is being replicated, so no reader sees a value before the backup has
applied it.

A snapshot is taken stripe by stripe under each stripe's read lock; it is a
consistent copy of every stripe at the moment that stripe was copied.

Each stripe also holds the exactly-once records of the writes to its keys
(:class:`~kvstore.server.sessions.SessionTable`), changed under the same lock.

While a backup joins (from ``clear`` to ``forget_tombstones``) deletes leave tombstones:
a key deleted by a forwarded change is not brought back by an older snapshot copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from readerwriterlock import rwlock

from kvstore.server.sessions import SessionTable


class StripedStore:
    def __init__(self, stripe_count: int = 256) -> None:
        if stripe_count < 1:
            raise ValueError("stripe_count must be >= 1")
        self.stripe_count = stripe_count
        self._shards: list[dict[str, str]] = [{} for _ in range(stripe_count)]
        self.sessions = [SessionTable() for _ in range(stripe_count)]
        self._tombstones: list[set[str]] | None = None
        locks = [rwlock.RWLockFair() for _ in range(stripe_count)]
        self._read_locks = [lock.gen_rlock() for lock in locks]
        self._write_locks = [lock.gen_wlock() for lock in locks]

    def get(self, key: str) -> str | None:
        i = hash(key) % self.stripe_count
        with self._read_locks[i]:
            return self._shards[i].get(key)

    def put(self, key: str, value: str) -> None:
        i = hash(key) % self.stripe_count
        with self._write_locks[i]:
            self._shards[i][key] = value

    def put_many(self, keys: list[str], values: list[str]) -> None:
        """Apply writes in list order (one stripe lock at a time)."""
        for key, value in zip(keys, values, strict=True):
            self.put(key, value)

    def apply_change(
        self,
        key: str,
        value: str | None,
        record: tuple[str, int, bool, int] | None = None,
    ) -> None:
        """Set ``key`` (delete it if ``value`` is None) and remember ``record``
        (client_id, seq, outcome, acked_below), atomically under the stripe's lock."""
        i = hash(key) % self.stripe_count
        with self._write_locks[i]:
            if value is not None:
                self._shards[i][key] = value
            else:
                self._shards[i].pop(key, None)
                if self._tombstones is not None:
                    self._tombstones[i].add(key)
            if record is not None:
                self.sessions[i].record(key, *record)

    def put_if_absent_many(self, keys: list[str], values: list[str]) -> int:
        """Insert entries whose key is neither present nor deleted since ``clear``;
        returns how many were inserted."""
        inserted = 0
        tombstones = self._tombstones
        for key, value in zip(keys, values, strict=True):
            i = hash(key) % self.stripe_count
            with self._write_locks[i]:
                shard = self._shards[i]
                if key not in shard and (tombstones is None or key not in tombstones[i]):
                    shard[key] = value
                    inserted += 1
        return inserted

    def add_records(self, records: list[tuple[str, str, int, bool]]) -> None:
        """Copy exactly-once records (key, client_id, seq, outcome) from a snapshot;
        a record already present (forwarded meanwhile) wins."""
        for key, client_id, seq, outcome in records:
            i = hash(key) % self.stripe_count
            with self._write_locks[i]:
                self.sessions[i].add_if_absent(key, client_id, seq, outcome)

    def forget_tombstones(self) -> None:
        """The join is over: deletes no longer need to shadow snapshot copies."""
        self._tombstones = None

    def stripe_for_write(self, key: str) -> tuple[Any, dict[str, str]]:
        """The key's stripe write lock (not taken) and the shard dict that holds the key.

        For callers that must do more than a put while holding the lock (the primary
        replicates first): ``lock, shard = ...; with lock: ...``.
        """
        i = hash(key) % self.stripe_count
        return self._write_locks[i], self._shards[i]

    def sessions_for(self, key: str) -> SessionTable:
        """The exactly-once records of the key's stripe (use with its write lock held)."""
        return self.sessions[hash(key) % self.stripe_count]

    def get_many(self, keys: list[str]) -> dict[str, str]:
        """The present keys among ``keys`` with their values (each read under its stripe lock)."""
        found: dict[str, str] = {}
        for key in keys:
            value = self.get(key)
            if value is not None:
                found[key] = value
        return found

    @contextmanager
    def all_write_locked(self) -> Iterator[None]:
        """Hold every stripe's write lock (in stripe order, so no deadlock with each other)."""
        for lock in self._write_locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(self._write_locks):
                lock.release()

    def snapshot_stripes(
        self, first: int, max_entries: int, max_bytes: int = 1 << 62
    ) -> tuple[list[str], list[str], list[tuple[str, str, int, bool]], int]:
        """Copy whole stripes from ``first`` on, until ``max_entries`` or ``max_bytes`` is reached.

        Returns (keys, values, records, next_stripe); records are the stripes' exactly-once
        records; next_stripe is -1 after the last stripe. At least one stripe is copied per
        call, so a caller always makes progress.
        """
        keys: list[str] = []
        values: list[str] = []
        records: list[tuple[str, str, int, bool]] = []
        size = 0
        i = first
        while i < self.stripe_count and len(keys) < max_entries and size < max_bytes:
            with self._read_locks[i]:
                shard = self._shards[i]
                keys.extend(shard.keys())
                values.extend(shard.values())
                records.extend(self.sessions[i].items())
                size += sum(len(k) + len(v) for k, v in shard.items())
            i += 1
        return keys, values, records, (i if i < self.stripe_count else -1)

    def snapshot(self) -> dict[str, str]:
        result: dict[str, str] = {}
        for i, shard in enumerate(self._shards):
            with self._read_locks[i]:
                result.update(shard)
        return result

    def clear(self) -> None:
        """Empty every stripe (and its records) and start keeping tombstones (a join begins)."""
        with self.all_write_locked():
            for shard, sessions in zip(self._shards, self.sessions, strict=True):
                shard.clear()
                sessions.clear()
            self._tombstones = [set() for _ in range(self.stripe_count)]

    def __len__(self) -> int:
        return sum(len(shard) for shard in self._shards)
