"""Incremental catch-up, the primary's side: which joins may replay its log, and the records.

A restarted backup names how far its copy on disk goes in a primary's log (a marker: epoch,
log id, position; see wal.py for the marker invariant). The primary lets the join replay
its log from there, instead of copying every stripe, only if all of these hold:

- it has a data directory (a log to read from);
- the marker names *this* log in *this* epoch: one primary process serves an epoch and its
  log id changes at every start, so the backup's copy is this log's prefix plus some of its
  later records. A copy from any other history (another primary, an older epoch, a reset
  cluster) may hold writes this primary never had, and is replaced, never caught up;
- its log still holds the position (snapshots trim old segments; the position is then
  pinned until the join ends, so later snapshots keep them).

The range replayed is [marker, the log's end when the join began): ``plan`` runs under the
lock that orders log appends and replication, so every write logged after that end is
forwarded to the joining backup, and every one before it is in the range. The backup
leaves alone the keys forwarded writes changed meanwhile (they are newer).
"""

from __future__ import annotations

from kvstore import errors
from kvstore.idl import LogChunk
from kvstore.server.replication import Replicator
from kvstore.server.wal import CorruptLogError, Marker, WriteAheadLog


def plan(
    store_log: WriteAheadLog | None, epoch: int, replicator: Replicator, since: Marker | None
) -> str:
    """Let ``replicator``'s join replay our log from ``since`` if the rules above allow it
    (call with the lock that orders appends and enqueues held). Returns how it will join."""
    if store_log is None:
        return "full copy (no data directory here)"
    replicator.log_id = store_log.log_id  # batches carry it with their positions
    if since is None:
        return "full copy (the backup names no log position)"
    marker_epoch, log_id, position = since
    if (marker_epoch, log_id) != (epoch, store_log.log_id):
        return f"full copy (its copy follows another history: epoch {marker_epoch}, log {log_id})"
    if not store_log.covers(position):
        return f"full copy (our log no longer holds position {position})"
    end = store_log.position
    replicator.catch_up = (position, end)
    store_log.pin(replicator.join_id, position)
    return f"catch-up from our log, positions {position} to {end} ({end - position} bytes)"


def next_chunk(
    store_log: WriteAheadLog | None, replicator: Replicator, position: int, max_bytes: int
) -> object:
    """The records of ``replicator``'s catch-up from ``position`` (about ``max_bytes``), as
    they are in our log: the backup checks them as it would its own files."""
    if replicator.catch_up is None or store_log is None:
        raise errors.UnavailableError(f"join {replicator.join_id} copies the store; no catch-up")
    start, end = replicator.catch_up
    if not start <= position <= end:
        raise errors.BadRequestError(f"position {position} is outside {start}..{end}")
    try:
        records, after = store_log.read_range(position, end, max_bytes)
    except CorruptLogError as exc:
        raise errors.UnavailableError(f"catch-up impossible: {exc}") from None
    return LogChunk(records=records, next_position=-1 if after >= end else after)


def unpin(store_log: WriteAheadLog | None, replicator: Replicator) -> None:
    """The join ended (in sync, replaced or dropped): snapshots may trim its range."""
    if replicator.catch_up is not None and store_log is not None:
        store_log.unpin(replicator.join_id)
