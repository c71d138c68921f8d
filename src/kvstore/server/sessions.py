"""Exactly-once records: the outcome of each client's recent writes, kept per lock stripe.

A write that carries (client_id, seq) is applied at most once. Its outcome is recorded in
the table of the key's stripe, under that stripe's write lock, in the same step as the
write itself, and travels with it to the backup (replication) and to a joining backup
(state transfer). A retry of the same request always names the same key, so it meets the
record under the same lock: on this node, or on the backup that took over.

Bounded memory: a client reports the lowest seq it still awaits (``acked_below``); records
below it are dropped when the client next writes to the stripe. Records of a client that
stopped writing expire ``ttl_s`` after its last write there. A client retries a request
for at most its timeout, far below the TTL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from kvstore import errors

DEFAULT_TTL_S = 300.0

# A write's exactly-once identity: (client_id, seq, acked_below).
RequestRecord = tuple[str, int, int]


class _ClientRecords:
    __slots__ = ("floor", "highest", "last_seen", "outcomes")

    def __init__(self) -> None:
        self.outcomes: dict[int, tuple[bool, str]] = {}  # seq -> (outcome, key)
        self.highest = 0  # the highest seq in outcomes (or higher)
        self.floor = 0  # the highest acked_below seen: records below it were dropped
        self.last_seen = 0.0


class SessionTable:
    """One stripe's records. Not locked itself: call with the stripe's lock held."""

    __slots__ = ("_clients", "_next_sweep", "_ttl_s")

    def __init__(self, ttl_s: float = DEFAULT_TTL_S) -> None:
        self._clients: dict[str, _ClientRecords] = {}
        self._ttl_s = ttl_s
        self._next_sweep = time.monotonic() + ttl_s

    def outcome(self, client_id: str, seq: int) -> bool | None:
        """The recorded outcome of this request, or None if it was never applied here.

        Raises BadRequestError for a request below what its client since said it no longer
        awaits, with no record: a late attempt of a call the client gave up on (say, held
        up behind a stalled write until the client timed out). Its record, if it was
        applied, may be gone, so applying it could apply it twice."""
        records = self._clients.get(client_id)
        if records is None:
            return None
        entry = records.outcomes.get(seq)
        if entry is not None:
            return entry[0]
        if seq < records.floor:
            raise errors.BadRequestError(
                f"request {seq} of client {client_id} comes after the client moved past it "
                "(a late retry of a call it gave up on): not applied"
            )
        return None

    def record(self, key: str, client_id: str, seq: int, outcome: bool, acked_below: int) -> None:
        now = time.monotonic()
        records = self._clients.get(client_id)
        if records is None:
            records = self._clients[client_id] = _ClientRecords()
        outcomes = records.outcomes
        if outcomes:
            if records.highest < acked_below:  # the usual case: every one was answered
                outcomes.clear()
            elif min(outcomes) < acked_below:
                for old in [s for s in outcomes if s < acked_below]:
                    del outcomes[old]
        outcomes[seq] = (outcome, key)
        if seq > records.highest:
            records.highest = seq
        if acked_below > records.floor:
            records.floor = acked_below
        records.last_seen = now
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        expired = [c for c, r in self._clients.items() if now - r.last_seen > self._ttl_s]
        for client_id in expired:
            del self._clients[client_id]
        self._next_sweep = now + self._ttl_s

    def items(self) -> Iterator[tuple[str, str, int, bool, int]]:
        """Every record as (key, client_id, seq, outcome, floor), for state transfer and
        snapshots (floor: the client's, see ``outcome``)."""
        for client_id, records in self._clients.items():
            for seq, (outcome, key) in records.outcomes.items():
                yield key, client_id, seq, outcome, records.floor

    def add_if_absent(
        self, key: str, client_id: str, seq: int, outcome: bool, acked_below: int = 0
    ) -> None:
        """Copy a record (from a snapshot, a replayed log or a state transfer; ``acked_below``
        where known: the floor it set); one already present (forwarded meanwhile) wins."""
        records = self._clients.get(client_id)
        if records is None:
            records = self._clients[client_id] = _ClientRecords()
            records.last_seen = time.monotonic()
        records.outcomes.setdefault(seq, (outcome, key))
        if seq > records.highest:
            records.highest = seq
        if acked_below > records.floor:
            records.floor = acked_below

    def clear(self) -> None:
        self._clients.clear()

    def __len__(self) -> int:
        return sum(len(r.outcomes) for r in self._clients.values())
