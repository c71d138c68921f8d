"""The in-memory map and its striped locks. No network, no ZooKeeper.

Keys are spread over ``stripe_count`` shards, each a dict guarded by its own lock
for writers. The primary keeps a stripe's lock while a write is being replicated
and logged, so writes to one key reach the backup and the log in the order they are
applied.

Readers take no lock. Invariant: the primary puts a value into its shard only once
the backup has applied it and the log holds it durably (``write_group`` in the
node), so whatever a reader finds is already safe to return, and a
dict lookup is atomic (the GIL). The seed's reader-writer lock made a get wait
for a put in flight on its stripe; with the value published last it need not.

``snapshot`` (what ``dump`` returns) is one consistent cut of the whole store: it holds
every stripe's lock at once, taken in stripe order (``all_locked``; a group of writes
takes its stripes' locks in the same order, so nothing deadlocks), and writers wait for
the copy. The copies that need no cut are taken stripe by stripe under each stripe's
lock, each consistent at the moment its stripe was copied: a joining backup's (forwarded
writes are never overwritten by it) and the disk snapshot's (the log segments after its
switch are replayed over it, see wal.py).

Each stripe also holds the exactly-once records of the writes to its keys
(:class:`~kvstore.server.sessions.SessionTable`), changed under the same lock.

While a backup joins (from ``clear`` or ``begin_catch_up`` to ``forget_touched``) every key a
forwarded change sets or deletes is remembered as *touched*: an older copy of it (a stripe
copied from the primary, a record replayed from the primary's log) never overwrites it, and
a deleted key is not brought back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kvstore import errors
from kvstore.server import wal
from kvstore.server.records import CorruptLogError
from kvstore.server.sessions import RequestRecord, SessionTable

# The exactly-once records of a batch's puts, flat: client ids ("" for none), seqs,
# acked_belows (see replicate_batch in the IDL).
FlatRecords = tuple[list[str], list[int], list[int]]

SNAPSHOT_BULK_ENTRIES = 65536  # puts per snapshot record (one record per stripe, mostly)


class StripedStore:
    def __init__(self, stripe_count: int = 256) -> None:
        if stripe_count < 1:
            raise ValueError("stripe_count must be >= 1")
        self.stripe_count = stripe_count
        self._shards: list[dict[str, str]] = [{} for _ in range(stripe_count)]
        self.sessions = [SessionTable() for _ in range(stripe_count)]
        self._touched: list[set[str]] | None = None
        self.log: wal.WriteAheadLog | None = None  # set by a node with a data directory
        self._locks = [threading.Lock() for _ in range(stripe_count)]

    def get(self, key: str) -> str | None:
        """No lock: see the module's invariant."""
        return self._shards[hash(key) % self.stripe_count].get(key)

    def put(self, key: str, value: str) -> int:
        """Set ``key``; returns the log position to wait for (0 without a log)."""
        i = hash(key) % self.stripe_count
        with self._locks[i]:
            position = self.log_write(key, value)  # first: a full disk changes nothing
            self._shards[i][key] = value
            if self._touched is not None:
                self._touched[i].add(key)
            return position

    def put_many(
        self, keys: list[str], values: list[str], records: FlatRecords | None = None
    ) -> int:
        """Apply writes in list order, each with its exactly-once record if ``records``
        names one, under their stripes' locks, logged first in one append (a full disk
        changes nothing: DiskFullError, none applied); returns the log position to wait
        for."""
        if not keys:  # a heartbeat
            return 0
        taken = self.lock_stripes(keys)
        try:
            # (read under the locks: a join sets it under every stripe's lock)
            shards, sessions, touched = self._shards, self.sessions, self._touched
            count = self.stripe_count
            position = 0
            if self.log is not None:  # (without one, no record tuple per write to log)
                position = self._log_many(keys, values, records)
            if records is None:
                for key, value in zip(keys, values, strict=True):
                    i = hash(key) % count
                    shards[i][key] = value
                    if touched is not None:
                        touched[i].add(key)
                return position
            clients, seqs, acked = records
            for key, value, client_id, seq, acked_below in zip(
                keys, values, clients, seqs, acked, strict=True
            ):
                i = hash(key) % count
                shards[i][key] = value
                if touched is not None:
                    touched[i].add(key)
                if client_id:
                    sessions[i].record(key, client_id, seq, True, acked_below)
        finally:
            self.unlock_stripes(taken)
        return position

    def _log_many(self, keys: list[str], values: list[str], records: FlatRecords | None) -> int:
        """Log ``put_many``'s writes in one append (its stripe locks held); the position to
        wait for. Raises what stopped them (none is applied then)."""
        if records is None:
            logged: list[RequestRecord | None] = [None] * len(keys)
        else:
            logged = [
                (client_id, seq, acked_below) if client_id else None
                for client_id, seq, acked_below in zip(*records, strict=True)
            ]
        positions, failure = self.log_writes(list(zip(keys, values, logged, strict=True)))
        if failure is not None:
            raise failure
        return positions[-1] if positions else 0

    def log_write(self, key: str, value: str | None, record: RequestRecord | None = None) -> int:
        """Append a mutation to the log (call with the key's stripe lock held, in the
        same hold that applies it); returns its position, 0 without a log."""
        log = self.log
        return 0 if log is None else log.append(wal.encode(key, value, record))

    def log_writes(
        self,
        mutations: list[tuple[str, str | None, RequestRecord | None]],
        may_split: bool = False,
    ) -> tuple[list[int], Exception | None]:
        """Log the mutations in order (call with their stripe locks held, in the hold that
        applies them): each logged one's end position, and what stopped the rest. One
        append holds them all; if the disk is too full for it (nothing was written) and
        ``may_split``, one append each, so those before a refused one go on. Any other
        failure stops them all, with its own outcome (after an fsync failed, say, the
        records may be in the file: not definite)."""
        log = self.log
        if log is None:
            return [0] * len(mutations), None
        encoded = [wal.encode(key, value, record) for key, value, record in mutations]
        positions: list[int] = []
        try:
            position = log.append(b"".join(encoded)) - sum(map(len, encoded))
        except errors.DiskFullError as exc:
            if not may_split:
                return positions, exc
            for data in encoded:
                try:
                    positions.append(log.append(data))
                except Exception as exc:
                    return positions, exc
            return positions, None
        except Exception as exc:
            return positions, exc
        for data in encoded:
            position += len(data)
            positions.append(position)
        return positions, None

    def wait_durable(self, position: int) -> None:
        if position and self.log is not None:
            self.log.wait_durable(position)

    def sync_soon(self, position: int) -> wal.SyncDelivery | None:
        """``wait_durable`` on the log's syncer thread (see WriteAheadLog.sync_soon)."""
        return None if not position or self.log is None else self.log.sync_soon(position)

    def apply_change(
        self,
        key: str,
        value: str | None,
        record: tuple[str, int, bool, int] | None = None,
    ) -> int:
        """Set ``key`` (delete it if ``value`` is None) and remember ``record``
        (client_id, seq, outcome, acked_below), atomically under the stripe's lock.
        Returns the log position to wait for."""
        i = hash(key) % self.stripe_count
        with self._locks[i]:
            position = self.log_write(
                key, value, None if record is None else (record[0], record[1], record[3])
            )
            if value is not None:
                self._shards[i][key] = value
            else:
                self._shards[i].pop(key, None)
            if self._touched is not None:
                self._touched[i].add(key)
            if record is not None:
                self.sessions[i].record(key, *record)
            return position

    def replay_untouched(self, data: bytes, where: str) -> tuple[int, int, int]:
        """Replay the primary's log records in ``data`` (checked as in our own files), except
        on keys touched by a forwarded change since the join began (those are newer: only
        the exactly-once record is added there). Returns (records, replayed, the log position
        to wait for). Holds every stripe's lock while it applies them (a few MB at a time),
        so that the records it keeps reach our log in one write, before any later change."""
        touched = self._touched
        assert touched is not None, "replay only during a catch-up"
        found = [
            entry
            for entry in wal.scan(data, where)
            if entry[2].kind in (wal.PUT, wal.DELETE)  # not a marker
        ]
        shards, sessions, stripe_count = self._shards, self.sessions, self.stripe_count
        with self.all_locked():
            kept = [
                (start, end, mutation)
                for start, end, mutation in found
                if mutation.key not in touched[hash(mutation.key) % stripe_count]
            ]
            position = self.log_write_raw(b"".join(data[start:end] for start, end, _ in kept))
            for _, _, mutation in kept:
                shard = shards[hash(mutation.key) % stripe_count]
                if mutation.value is None:
                    shard.pop(mutation.key, None)
                else:
                    shard[mutation.key] = mutation.value
            for _, _, mutation in found:
                if mutation.record is not None:
                    client_id, seq, acked_below = mutation.record
                    table = sessions[hash(mutation.key) % stripe_count]
                    table.add_if_absent(mutation.key, client_id, seq, True, acked_below)
        return len(found), len(kept), position

    def log_write_raw(self, records: bytes) -> int:
        """Append whole records as they are (0 without a log or records)."""
        log = self.log
        return 0 if log is None or not records else log.append(records)

    def log_marker(self, marker: wal.Marker) -> int:
        """Record how far this copy goes in the primary's log (0 without a log)."""
        return 0 if self.log is None else self.log.append_marker(marker)

    def put_if_absent_many(self, keys: list[str], values: list[str]) -> int:
        """Insert entries whose key is neither present nor deleted since ``clear``;
        returns how many were inserted."""
        inserted = 0
        touched = self._touched
        for key, value in zip(keys, values, strict=True):
            i = hash(key) % self.stripe_count
            with self._locks[i]:
                shard = self._shards[i]
                if key not in shard and (touched is None or key not in touched[i]):
                    shard[key] = value
                    inserted += 1
        return inserted

    def add_records(self, records: list[tuple[str, str, int, bool, int]]) -> None:
        """Copy exactly-once records (key, client_id, seq, outcome, floor) from a primary's
        stripes; a record already present (forwarded meanwhile) wins."""
        for key, client_id, seq, outcome, floor in records:
            i = hash(key) % self.stripe_count
            with self._locks[i]:
                self.sessions[i].add_if_absent(key, client_id, seq, outcome, floor)

    def forget_touched(self) -> None:
        """The join is over: forwarded changes no longer need to shadow older copies."""
        self._touched = None

    def begin_catch_up(self) -> None:
        """A join that keeps this store and replays the primary's log into it begins."""
        with self.all_locked():
            self._touched = [set() for _ in range(self.stripe_count)]
        if self.log is not None:
            self.log.begin_catch_up()

    def stripe_for_write(self, key: str) -> tuple[Any, dict[str, str]]:
        """The key's stripe lock (not taken) and the shard dict that holds the key.

        For callers that must do more than a put while holding the lock (the primary
        replicates first): ``lock, shard = ...; with lock: ...``.
        """
        i = hash(key) % self.stripe_count
        return self._locks[i], self._shards[i]

    def sessions_for(self, key: str) -> SessionTable:
        """The exactly-once records of the key's stripe (use with its lock held)."""
        return self.sessions[hash(key) % self.stripe_count]

    def get_many(self, keys: list[str]) -> dict[str, str]:
        """The present keys among ``keys`` with their values."""
        found: dict[str, str] = {}
        shards, stripe_count = self._shards, self.stripe_count
        for key in keys:
            value = shards[hash(key) % stripe_count].get(key)
            if value is not None:
                found[key] = value
        return found

    @contextmanager
    def all_locked(self) -> Iterator[None]:
        """Hold every stripe's lock (in stripe order, so no deadlock with each other)."""
        for lock in self._locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(self._locks):
                lock.release()

    def lock_stripes(self, keys: list[str]) -> list[Any]:
        """Take the stripe locks of ``keys``, each once, in stripe order like ``all_locked``
        (the primary's group of writes; nothing deadlocks); give them to ``unlock_stripes``."""
        count, locks = self.stripe_count, self._locks
        taken = [locks[i] for i in sorted({hash(key) % count for key in keys})]
        for lock in taken:
            lock.acquire()
        return taken

    @staticmethod
    def unlock_stripes(taken: list[Any]) -> None:
        for lock in reversed(taken):
            lock.release()

    def snapshot_stripes(
        self, first: int, max_entries: int, max_bytes: int = 1 << 62
    ) -> tuple[list[str], list[str], list[tuple[str, str, int, bool, int]], int]:
        """Copy whole stripes from ``first`` on, until ``max_entries`` or ``max_bytes`` is reached.

        Returns (keys, values, records, next_stripe); records are the stripes' exactly-once
        records; next_stripe is -1 after the last stripe. At least one stripe is copied per
        call, so a caller always makes progress.
        """
        keys: list[str] = []
        values: list[str] = []
        records: list[tuple[str, str, int, bool, int]] = []
        size = 0
        i = first
        while i < self.stripe_count and len(keys) < max_entries and size < max_bytes:
            with self._locks[i]:
                shard = self._shards[i]
                keys.extend(shard.keys())
                values.extend(shard.values())
                records.extend(self.sessions[i].items())
                size += sum(len(k) + len(v) for k, v in shard.items())
            i += 1
        return keys, values, records, (i if i < self.stripe_count else -1)

    def snapshot(self) -> dict[str, str]:
        """Every key and value at one instant: no write lands while it is copied."""
        result: dict[str, str] = {}
        with self.all_locked():
            for shard in self._shards:
                result.update(shard)
        return result

    def clear(self) -> None:
        """Empty every stripe (and its records) and start remembering touched keys (a join
        that copies the whole store begins)."""
        with self.all_locked():
            for shard, sessions in zip(self._shards, self.sessions, strict=True):
                shard.clear()
                sessions.clear()
            self._touched = [set() for _ in range(self.stripe_count)]
            if self.log is not None:
                self.log.reset()

    # ------------------------------------------------------------------ durability

    def recover(self, on_damage: Callable[[CorruptLogError], None] | None = None) -> int:
        """Load the log's snapshot and segments into this (empty) store; returns the number
        of records read. Call before serving, from one thread. ``on_damage``: a rescue
        (WriteAheadLog.recover), never for a store that serves."""
        assert self.log is not None
        count = 0
        shards, stripe_count = self._shards, self.stripe_count
        for mutation in self.log.recover(on_damage):
            if mutation.bulk is not None:  # a snapshot's stripe: thousands of puts at once
                keys, values = mutation.bulk
                count += len(keys)
                for key, value in zip(keys, values, strict=True):
                    shards[hash(key) % stripe_count][key] = value
                continue
            count += 1
            i = hash(mutation.key) % stripe_count
            if mutation.kind == wal.PUT:
                self._shards[i][mutation.key] = mutation.value  # type: ignore[assignment]
            elif mutation.kind == wal.DELETE:
                self._shards[i].pop(mutation.key, None)
            record = mutation.record
            if record is not None:
                self.sessions[i].add_if_absent(
                    mutation.key, record[0], record[1], mutation.outcome, record[2]
                )
        return count

    def write_snapshot(self) -> None:
        """Snapshot to disk without stopping writes for long, then trim the log."""
        assert self.log is not None
        self.log.write_snapshot(self._snapshot_records)

    def _snapshot_records(self) -> Iterator[bytes]:
        for i in range(self.stripe_count):
            with self._locks[i]:
                items = list(self._shards[i].items())
                records = list(self.sessions[i].items())
            for first in range(0, len(items), SNAPSHOT_BULK_ENTRIES):
                chunk = items[first : first + SNAPSHOT_BULK_ENTRIES]
                yield wal.encode_bulk([k for k, _ in chunk], [v for _, v in chunk])
            for key, client_id, seq, outcome, floor in records:
                yield wal.encode_record(key, client_id, seq, outcome, floor)

    def __len__(self) -> int:
        return sum(len(shard) for shard in self._shards)
