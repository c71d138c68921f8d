"""Durability of one node's store: a write-ahead log and snapshots (``kv-node --data-dir``).

Files in the data directory:
- ``node-id``: this node's stable id (it survives restarts; ZooKeeper names change);
- ``incarnation``: the id of the cluster whose data the files hold (coordination.py), written
  before the node first changes them for that cluster; absent in a new directory, one written
  by an earlier version, or one last synced with a cluster whose metadata has no id;
- ``lock``: locked (flock) by the node process using the directory, which writes its process
  id into it: a second node given the same directory refuses to start;
- ``wal-<segment>.log``: log segments, numbered upwards; every mutation is one record;
- ``snapshot``: the newest snapshot; its header names the first segment to replay after it;
- ``incomplete``: present while the files do not hold a complete copy (a join is copying
  into them: ``reset``, or a catch-up is replaying a primary's log into them: ``catch-up``).

Positions and markers (incremental catch-up). A position is a byte count of this process's
appends (from 0 when the log opens; ``log_id`` names that instance). A primary logs its
writes in replication order, so each batch it sends is a contiguous range of its log, ending
at a position it sends along. A backup that holds a complete copy appends a *marker* (the
primary's epoch, log id and the batch's end position) after each batch it applied. Marker
invariant: the store these files recover is the primary's store as of that position, plus
some of the primary's records after it (a batch applied in part, a catch-up cut short).
So replaying the primary's log from there (what ``read_range`` serves) restores it exactly.
``reset`` removes every marker (and a crash in the middle of one leaves ``incomplete`` =
``reset``, which voids the markers left).

Invariants:
- A mutation is appended and applied to memory under its key's stripe write lock, so a
  snapshot (taken stripe by stripe under read locks, after switching to a new segment)
  holds every mutation of the older segments; replaying the newer ones over it gives the
  latest value of every key (per key, the log is in apply order).
- One snapshot at a time (the snapshot loop and a join's copy both take one): two at
  once would share the temporary file, and the one that finished second would drop the
  segment the other still needs, or replace a complete snapshot with an older, partial one.
- A write is acknowledged only after ``wait_durable`` for its position returned: with
  ``fsync=batch`` concurrent writers share one fsync (group commit); an event loop that
  must not block asks ``sync_soon`` instead, and the log's syncer thread joins that group
  commit for it and signals an eventfd when the fsync ended; ``always`` syncs each
  append on its own; ``never`` leaves flushing to the OS (a crash of the machine can lose
  acknowledged writes; a crash of the process cannot).
- Recovery: a torn last record (a crash mid-append) is cut off with a warning; a bad
  checksum before the end of a segment refuses to start, naming the file and offset.
- A full disk (ENOSPC, EDQUOT) costs nothing but the write that found it: an append that
  fails, wholly or in part, is cut off again (the segment never holds a partial record
  followed by whole ones) and raises :class:`~kvstore.errors.DiskFullError`; the next append
  after space was freed succeeds. A snapshot that fails leaves the previous snapshot and every
  segment in place (its temporary file is removed); ``snapshot_room`` says when one is
  worth trying.
- An fsync that fails leaves the log unusable (the kernel may have dropped the pages it could
  not write): every later append and wait refuses, until the node restarts and recovers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from kvstore import errors
from kvstore.server.handoff import PollSignal, held_lock, pass_through
from kvstore.server.records import (
    BULK,
    DELETE,
    HEADER,
    MARKER,
    PUT,
    RECORD,
    SNAPSHOT_HEADER,
    CorruptLogError,
    ExactlyOnce,
    Marker,
    Mutation,
    decode,
    encode,
    encode_bulk,
    encode_marker,
    encode_record,
    encode_snapshot_header,
    frame,
    read_records,
    scan,
    whole_records,
)

__all__ = [  # the record format, for the log's users
    "BULK",
    "DELETE",
    "MARKER",
    "PUT",
    "RECORD",
    "SNAPSHOT_HEADER",
    "CorruptLogError",
    "ExactlyOnce",
    "Marker",
    "Mutation",
    "WriteAheadLog",
    "decode",
    "encode",
    "encode_bulk",
    "encode_record",
    "frame",
    "scan",
]

log = logging.getLogger(__name__)

FSYNC_MODES = ("always", "batch", "never")
SNAPSHOT_FILE = "snapshot"
INCOMPLETE_FILE = "incomplete"
NEWEST_SEGMENT_FILE = "newest-segment"  # the highest segment number the log has opened
NODE_ID_FILE = "node-id"
FORMER_IDS_FILE = "node-id.former"  # ids this directory had before (newest first)
FORMER_IDS_KEPT = 8
INCARNATION_FILE = "incarnation"  # the cluster whose data the files hold
LEASE_FILE = "lease"  # the longest read lease this node may still have out, seconds
LOCK_FILE = "lock"  # held by the node using the directory (flock), with its process id


# --------------------------------------------------------------------------- the log


class WriteAheadLog:
    """Appends records to the current segment; group commit of fsyncs."""

    def __init__(
        self,
        directory: Path,
        fsync: str = "batch",
        observe_fsync: Callable[[float], None] | None = None,
    ) -> None:
        self._observe_fsync = observe_fsync
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}")
        self.directory = directory
        self.fsync_mode = fsync
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_directory(directory)
        try:
            # A snapshot being written when the node died: up to a store's size, never read.
            with contextlib.suppress(FileNotFoundError):
                (directory / (SNAPSHOT_FILE + ".tmp")).unlink()
            self.node_id = self._node_id()
            self.former_ids = self._recorded_former_ids()
            self.incarnation = self._recorded_incarnation()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._append_lock = threading.Lock()
        self._appended = 0  # bytes appended since open (a position, not a file offset)
        self._synced = 0
        self._sync_lock = threading.Lock()
        # Held around every fsync of a segment: an fsync of a duplicate can succeed right
        # after one of the original failed (the error is reported once), so the failure is
        # recorded before any other fsync's success is taken for one.
        self._fsync_lock = threading.Lock()
        self._is_syncing = False  # an fsync is running
        self._next_sync: _SyncRound | None = None  # waiters for the fsync after it
        self._failure: str | None = None  # set for good when an fsync fails
        # sync_soon's requests, for a syncer thread started by the first (None ends it)
        self._sync_requests: queue.SimpleQueue[SyncDelivery | None] | None = None
        self._sync_signal: PollSignal | None = None  # the syncer's eventfd (sync_soon)
        self._is_closed = False
        self.bytes_since_snapshot = 0
        self._bytes_at_switch = 0  # bytes_since_snapshot when the last snapshot began
        self.segment = max(self.segments(), default=0)
        self._fd = -1
        self._recovered_segment = -1  # the one recovery opened (for appends)
        self._segment_bytes = 0  # size of the current segment file
        self.log_id = uuid.uuid4().hex[:16]  # this instance (positions count from 0 in it)
        self._segment_starts: dict[int, int] = {}  # segments opened by it -> first position
        self._pins: dict[str, int] = {}  # name -> a position whose segments must stay
        self.marker: Marker | None = None  # the last one recovered or appended
        self._free_at_snapshot = 0  # free bytes when the last snapshot was let through
        self._snapshot_failed_at_free: int | None = None  # ... if it failed for room
        self._marker_at_switch: Marker | None = None
        self._snapshot_lock = threading.Lock()  # held while a snapshot is taken (one at a time)
        # True while the files hold a complete copy of the store as it was when this node
        # was last in sync: after recovery, and after a join completed. A reset (the store
        # was cleared to copy from a primary) makes it False until then.
        self.is_complete_copy = False

    def lease_to_wait_out(self, lease_s: float) -> float:
        """How long a node starting with ``lease_s`` must wait before it may take over:
        its own lease or, if longer, one an earlier run granted and has not waited out
        (recorded here until ``lease_waited_out``)."""
        path = self.directory / LEASE_FILE
        try:
            earlier = float(path.read_text())
        except (OSError, ValueError):
            earlier = 0.0
        longest = max(earlier, lease_s)
        if longest != earlier:
            _write_durably(path, f"{longest}\n".encode())
        return longest

    def lease_waited_out(self, lease_s: float) -> None:
        """The wait is over: from now on only this run's ``lease_s`` may be out."""
        _write_durably(self.directory / LEASE_FILE, f"{lease_s}\n".encode())

    def _node_id(self) -> str:
        path = self.directory / NODE_ID_FILE
        if path.exists():
            return path.read_text().strip()
        node_id = uuid.uuid4().hex[:12]
        _write_durably(path, node_id.encode() + b"\n")
        return node_id

    def _recorded_former_ids(self) -> list[str]:
        try:
            return (self.directory / FORMER_IDS_FILE).read_text().split()[:FORMER_IDS_KEPT]
        except FileNotFoundError:
            return []

    @property
    def node_ids(self) -> frozenset[str]:
        """Every id a cluster's metadata may list this directory under: its current one and
        those it had before (see ``new_node_id``)."""
        return frozenset([self.node_id, *self.former_ids])

    def new_node_id(self) -> str:
        """Give the directory a new id before the node is listed again (it joins, or takes
        over after recovering from disk). A copy of the directory made before (``cp -a``
        while the node was stopped) keeps an older id, so after an outage of every node it
        is not taken for this node, whose later writes it lacks: a cluster lists a node
        under its newest id. The ids it had stay its own (the last FORMER_IDS_KEPT, for a
        listing under one of them that was not replaced yet). Durable before it returns."""
        former = list(dict.fromkeys([self.node_id, *self.former_ids]))[:FORMER_IDS_KEPT]
        _write_durably(self.directory / FORMER_IDS_FILE, "".join(f"{i}\n" for i in former).encode())
        node_id = uuid.uuid4().hex[:12]
        _write_durably(self.directory / NODE_ID_FILE, node_id.encode() + b"\n")
        self.node_id, self.former_ids = node_id, former
        return node_id

    def _recorded_incarnation(self) -> str | None:
        path = self.directory / INCARNATION_FILE
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def record_incarnation(self, incarnation: str | None) -> None:
        """The files hold the data of cluster ``incarnation`` from now on (None: of a cluster
        whose id is unknown, so the file goes). Durable before it returns."""
        if incarnation == self.incarnation:
            return
        path = self.directory / INCARNATION_FILE
        if incarnation is None:
            path.unlink(missing_ok=True)
            _fsync_directory(self.directory)
        else:
            _write_durably(path, incarnation.encode() + b"\n")
        self.incarnation = incarnation

    def segments(self) -> list[int]:
        return sorted(
            int(p.stem.split("-", 1)[1])
            for p in self.directory.glob("wal-*.log")
            if p.stem.split("-", 1)[1].isdigit()
        )

    def segment_path(self, segment: int) -> Path:
        return self.directory / f"wal-{segment:08d}.log"

    # ------------------------------------------------------------------ recovery

    def recover(
        self, on_damage: Callable[[CorruptLogError], None] | None = None
    ) -> Iterator[Mutation]:
        """The snapshot's records, then every later segment's, in order (markers are not
        yielded: the last one becomes ``marker``). Then the log is open for appends in a
        new segment. ``on_damage`` (a rescue, never a node's start): told of each damaged
        file or missing segment, instead of CorruptLogError, and the recovery goes on with
        the next file (the damaged one's records before the damage are yielded)."""
        incomplete = self.directory / INCOMPLETE_FILE
        state = incomplete.read_text().strip() if incomplete.exists() else ""
        for mutation in self._recorded(state != "reset", on_damage):
            if mutation.kind == MARKER:
                assert mutation.record is not None
                log_id, epoch, position = mutation.record
                self.marker = (epoch, log_id, position)
            else:
                yield mutation
        if state == "reset":
            self.marker = None  # a crash in the middle of a reset: no marker holds
        self.is_complete_copy = not state

    def _recorded(
        self, is_checked: bool, on_damage: Callable[[CorruptLogError], None] | None
    ) -> Iterator[Mutation]:
        """``is_checked``: refuse a segment missing between the snapshot and the last one
        (not after a reset cut short, whose files are thrown away at the next join)."""

        @contextlib.contextmanager
        def tolerated() -> Iterator[None]:
            """A rescue (``on_damage``) is told of the damage and goes on; a start raises."""
            try:
                yield
            except CorruptLogError as exc:
                if on_damage is None:
                    raise
                on_damage(exc)

        first = 0
        snapshot = self.directory / SNAPSHOT_FILE
        segments = self.segments()
        if snapshot.exists():
            records = read_records(snapshot, is_torn_tail_allowed=False)
            header = None
            with tolerated():  # (rescued: a snapshot without a readable header is left out)
                found = next(records, None)
                if found is None or found.kind != SNAPSHOT_HEADER or found.record is None:
                    raise CorruptLogError(f"{snapshot} has no header", "refusing to start")
                header = found.record
            if header is not None:
                first = header[1]
                segments = [s for s in segments if s >= first]
                if is_checked:
                    with tolerated():
                        self._check_segments(segments, first)
                with tolerated():
                    yield from records
        elif is_checked:
            with tolerated():
                self._check_segments(segments, None)
        for i, segment in enumerate(segments):
            with tolerated():
                yield from read_records(self.segment_path(segment), i == len(segments) - 1)
        self._open_segment(max([*segments, first - 1, 0]) + 1)
        self._recovered_segment = self.segment

    def _check_segments(self, segments: list[int], first: int | None) -> None:
        """CorruptLogError if a segment is missing from ``first`` (the snapshot's; None: the
        first present) to the newest this directory opened (NEWEST_SEGMENT_FILE; in a
        directory of an earlier version, which has none, the last present): segments are
        numbered one after the other, and a missing one held writes."""
        try:
            recorded = int((self.directory / NEWEST_SEGMENT_FILE).read_text())
        except (FileNotFoundError, ValueError):
            recorded = 0
        newest = max([*segments[-1:], recorded])
        if not newest:
            return  # (no segment, none recorded)
        start = first if first is not None else (segments[0] if segments else newest)
        missing = sorted(set(range(start, newest + 1)) - set(segments))
        if missing:
            present = f"{segments[0]}..{segments[-1]}" if segments else "none"
            raise CorruptLogError(
                f"{self.directory}: log segment(s) {', '.join(map(str, missing[:5]))} "
                f"missing (present: {present}, the newest written {newest}"
                + ("" if first is None else f", snapshot from {first}")
                + ")",
                "refusing to start: recovering without them would lose the writes they held",
            )

    def _open_segment(self, segment: int) -> None:
        fd = os.open(self.segment_path(segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fsync_directory(self.directory)
        # Recorded once the segment exists for good: a crash before leaves the older number,
        # which the segments present satisfy.
        self._record_newest_segment(segment)
        old, old_segment = self._fd, self.segment
        self._fd, self.segment = fd, segment
        self._segment_bytes = os.fstat(fd).st_size
        self._segment_starts[segment] = self._appended
        if old >= 0:
            try:
                with self._fsync_lock:  # see _sync_now
                    os.fsync(old)
            except OSError as exc:
                # An fsync under way on a duplicate of it could succeed now, for bytes whose
                # write-back just failed: nothing is known to be on disk any more.
                self._failure = f"fsync of {self.segment_path(old_segment)} failed: {exc}"
                log.error("write-ahead log in %s: %s", self.directory, self._failure)
                raise
            finally:
                os.close(old)

    # ------------------------------------------------------------------ appending

    @property
    def position(self) -> int:
        """The end of the last append (call with appends stopped, e.g. under the lock that
        orders them)."""
        return self._appended

    def append_marker(self, marker: Marker) -> int:
        """Record how far this copy goes in a primary's log (see the module docstring)."""
        data = encode_marker(marker)
        with self._append_lock:
            self._check_usable()
            self._write_whole(data)
            self._appended += len(data)
            self.marker = marker
            position = self._appended
        if self.fsync_mode == "always":
            self._sync_to(position)
        return position

    def append(self, data: bytes) -> int:
        """Write ``data`` (whole records); returns the position to pass to wait_durable."""
        with self._append_lock:
            self._check_usable()
            self._write_whole(data)
            self._appended += len(data)
            self.bytes_since_snapshot += len(data)
            position = self._appended
        if self.fsync_mode == "always":
            self._sync_to(position)
        return position

    def _write_whole(self, data: bytes) -> None:
        """Write ``data`` at the end of the current segment, or nothing: a write that fails
        part way is cut off again. Call with the append lock held."""
        size = self._segment_bytes
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, "no byte written")
                view = view[written:]
        except OSError as exc:
            self._cut_back(size)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.DiskFullError(
                    f"disk full: the write-ahead log in {self.directory} cannot grow "
                    f"({exc.strerror}); nothing was written. Free space there and writes resume"
                ) from None
            raise errors.UnavailableError(
                f"write-ahead log append failed in {self.directory}: {exc}; nothing was written"
            ) from None
        self._segment_bytes = size + len(data)

    def _cut_back(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:  # the segment may end in a partial record: stop appending
            self._failure = f"could not cut a failed append off {self.segment_path(self.segment)}"
            log.error("%s: %s", self._failure, exc)

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise errors.UnavailableError(
                f"the write-ahead log in {self.directory} failed earlier ({self._failure}); "
                f"restart the node to recover from its files"
            )

    def wait_durable(self, position: int) -> None:
        """Return once everything up to ``position`` is on disk (group commit: one thread
        syncs for everyone who appended before it started)."""
        if self.fsync_mode == "never" or self._synced >= position:
            return
        self._sync_to(position)

    def sync_soon(self, position: int) -> SyncDelivery | None:
        """``wait_durable`` on the log's syncer thread: returns what to wait for (its
        ``fileno`` turns readable when the fsync ended; then ``finish``), or None if there is
        nothing to wait for, or it cannot be had (the caller's ``wait_durable`` does it)."""
        if self.fsync_mode != "batch" or self._synced >= position:
            return None
        with self._sync_lock:
            if self._is_closed:
                return None  # (wait_durable fails: closed)
            if self._sync_signal is None:
                try:
                    self._sync_signal = PollSignal()
                except OSError:  # out of descriptors
                    return None
            delivery = SyncDelivery(position, self._sync_signal)
            if self._sync_requests is None:
                requests: queue.SimpleQueue[SyncDelivery | None] = queue.SimpleQueue()
                syncer = threading.Thread(
                    target=self._run_syncer, args=(requests,), name="wal-syncer", daemon=True
                )
                try:
                    syncer.start()
                except RuntimeError:  # no thread to be had: the caller waits itself
                    delivery.signal()
                    delivery.finish()
                    return None
                self._sync_requests = requests  # only once something reads it
            self._sync_requests.put(delivery)
        return delivery

    def _run_syncer(self, requests: queue.SimpleQueue[SyncDelivery | None]) -> None:
        try:
            while (delivery := requests.get()) is not None:
                try:
                    with contextlib.suppress(Exception):  # the caller's wait_durable raises it
                        self.wait_durable(delivery.position)
                finally:
                    delivery.signal()
        finally:
            assert self._sync_signal is not None
            self._sync_signal.close()  # after the last request's signal

    def _sync_to(self, position: int) -> None:
        """One fsync runs at a time. A thread that finds one running joins the next round;
        the first to join it runs that fsync when the running one ends, for everything
        appended by then (its waiters' records included; none if the one before covered
        them), and wakes them. A failed fsync breaks the log for good: whatever it was
        for may be lost, and a later fsync of the same file can succeed all the same."""
        while True:
            with self._sync_lock:
                if self._synced >= position:
                    return
                if self._failure is not None:
                    raise errors.ReplicationFailedError(
                        f"the write-ahead log in {self.directory} could not be synced "
                        f"({self._failure}); outcome unknown"
                    )
                round_ = self._next_sync
                is_runner = round_ is None
                if round_ is None:
                    round_ = self._next_sync = _SyncRound()
                if position > round_.upto:
                    round_.upto = position
                is_now = is_runner and not self._is_syncing
                if is_now:
                    self._is_syncing = True
                    self._next_sync = None
            if not is_runner:
                pass_through(round_.done)
            else:
                if not is_now:
                    round_.turn.acquire()  # the fsync before it ended and handed over
                self._run_sync(round_)

    def _run_sync(self, round_: _SyncRound) -> None:
        target = 0
        try:
            if self._synced < round_.upto and self._failure is None:  # else: nothing to do
                target = self._sync_now()
        finally:
            with self._sync_lock:
                if self._failure is None:  # (a switch of segments may have failed meanwhile)
                    self._synced = max(self._synced, target)
                following, self._next_sync = self._next_sync, None
                self._is_syncing = following is not None
            round_.done.release()
            if following is not None:
                following.turn.release()

    def _sync_now(self) -> int:
        """fsync the current segment; returns the position it made durable (older segments
        were synced when appends moved on from them). A failure breaks the log for good."""
        with self._append_lock:  # a duplicate: a segment switch may close the original
            if self._fd < 0:  # closing syncs what was appended, but it is not ours to say
                raise errors.ReplicationFailedError(
                    f"the write-ahead log in {self.directory} closed; outcome unknown"
                )
            target, fd = self._appended, os.dup(self._fd)
        began = time.monotonic()
        try:
            with self._fsync_lock:  # a failed switch is recorded before this one's success
                os.fsync(fd)
                if self._failure is not None:
                    return 0
        except OSError as exc:
            self._failure = f"fsync failed: {exc}"
            log.error("write-ahead log in %s: %s", self.directory, self._failure)
            return 0
        finally:
            os.close(fd)
        if self._observe_fsync is not None:
            self._observe_fsync(time.monotonic() - began)
        return target

    # ------------------------------------------------------------------ snapshots

    def write_snapshot(self, records: Callable[[], Iterator[bytes]]) -> None:
        """Switch appends to a new segment, write ``records()`` (the store, read after the
        switch) as the snapshot, then drop the segments it covers; waits for a snapshot
        already being taken. If it fails (a full disk: DiskFullError) the previous snapshot
        and every segment stay as they were."""
        with self._snapshot_lock:
            first_segment = self._start_snapshot()
            self._finish_snapshot(first_segment, records())

    def _start_snapshot(self) -> int:
        """Switch appends to a new segment; returns it (the snapshot's first segment)."""
        with self._append_lock:
            self._open_segment(self.segment + 1)
            self._bytes_at_switch = self.bytes_since_snapshot
            self._marker_at_switch = self.marker
            return self.segment

    def snapshot_room(self) -> str | None:
        """None if a snapshot may be tried now, else why not. Trying one that does not fit
        fills the disk (failing the writes) until its file is removed, but only a snapshot
        gives back the room a log of overwrites takes. One surely fits in the last one plus
        the log since (every key's latest record is in one or the other); it likely fits
        in the last one and a quarter, unless one failed for room and none was freed since."""
        stat = os.statvfs(self.directory)
        free = stat.f_bavail * stat.f_frsize
        snapshot = self.directory / SNAPSHOT_FILE
        last = snapshot.stat().st_size if snapshot.exists() else 0
        bound = last + self.bytes_since_snapshot
        failed_at = self._snapshot_failed_at_free
        if free >= bound or (
            free >= last + last // 4 + (1 << 20) and (failed_at is None or free > failed_at)
        ):
            self._free_at_snapshot = free
            return None
        return f"{free} bytes free in {self.directory}; a snapshot may need up to {bound}"

    def _finish_snapshot(self, first_segment: int, records: Iterator[bytes]) -> None:
        """Write the snapshot durably, then drop the segments it covers."""
        temporary = self.directory / (SNAPSHOT_FILE + ".tmp")
        try:
            with open(temporary, "wb") as file:
                file.write(encode_snapshot_header(first_segment))
                if self._marker_at_switch is not None:  # the copy holds at least that much
                    file.write(encode_marker(self._marker_at_switch))
                for record in records:
                    file.write(record)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.directory / SNAPSHOT_FILE)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._snapshot_failed_at_free = self._free_at_snapshot
                raise errors.DiskFullError(
                    f"disk full: no room for a snapshot in {self.directory}; the previous "
                    f"snapshot and the log are kept"
                ) from None
            raise
        self._snapshot_failed_at_free = None
        with self._append_lock:
            self.bytes_since_snapshot -= self._bytes_at_switch
        _fsync_directory(self.directory)
        with self._append_lock:
            kept = self._pinned_segments()
            for segment in self.segments():
                if segment < first_segment and segment not in kept:
                    self.segment_path(segment).unlink()
                    self._segment_starts.pop(segment, None)

    def reset(self) -> None:
        """Forget everything on disk (the store was cleared to copy from a primary)."""
        self._set_incomplete("reset")  # first: a crash in the middle voids what is left
        with self._append_lock:
            segment = self.segment + 1
            self._open_segment(segment)
            with contextlib.suppress(FileNotFoundError):
                (self.directory / SNAPSHOT_FILE).unlink()
            for old in self.segments():
                if old < segment:
                    self.segment_path(old).unlink()
                    self._segment_starts.pop(old, None)
            _fsync_directory(self.directory)
            self.bytes_since_snapshot = 0
            self.marker = None

    def begin_catch_up(self) -> None:
        """A primary's log is about to be replayed into this copy: it is incomplete until
        ``mark_complete`` (its marker still holds, see the module docstring)."""
        self._set_incomplete("catch-up")

    def mark_complete(self) -> None:
        """The files hold a complete copy again (a join finished; its records are durable)."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / INCOMPLETE_FILE).unlink()
            _fsync_directory(self.directory)
        self.is_complete_copy = True

    def _set_incomplete(self, why: str) -> None:
        self.is_complete_copy = False
        _write_durably(self.directory / INCOMPLETE_FILE, why.encode() + b"\n")

    # ------------------------------------------------------------------ reading back

    def covers(self, position: int) -> bool:
        """Whether this instance's segments still hold every record from ``position`` on
        (snapshots trim the oldest segments first)."""
        with self._append_lock:
            if not 0 <= position <= self._appended:
                return False
            segment = self._segment_at(position)
        return segment >= 0 and self.segment_path(segment).exists()

    def _segment_at(self, position: int) -> int:
        """The segment that holds ``position`` (the last one opened at or before it; -1 if
        that one was trimmed). Call with the append lock held."""
        found = -1
        for segment, start in sorted(self._segment_starts.items()):
            if start <= position:
                found = segment
        return found

    def pin(self, name: str, position: int) -> None:
        """Keep the segments from ``position`` on (snapshots do not trim them) until unpin."""
        with self._append_lock:
            self._pins[name] = position

    def unpin(self, name: str) -> None:
        with self._append_lock:
            self._pins.pop(name, None)

    def _pinned_segments(self) -> set[int]:
        if not self._pins:
            return set()
        lowest = min(self._pins.values())
        starts = sorted(self._segment_starts.items())
        return {
            segment
            for i, (segment, _) in enumerate(starts)
            if i + 1 == len(starts) or starts[i + 1][1] > lowest
        }

    def read_range(self, start: int, end: int, max_bytes: int) -> tuple[bytes, int]:
        """The records from position ``start`` (a record's first byte) up to ``end`` (one's
        last) as they are in the files, about ``max_bytes`` of them (at least one); and the
        position after the last one (``end`` when done). Raises CorruptLogError if the range
        is not whole any more (trimmed, damaged)."""
        if not self.covers(start):
            raise CorruptLogError(f"the log no longer holds position {start}")
        with self._append_lock:
            segment = self._segment_at(start)
            first = self._segment_starts[segment]
            following = [s for s in self._segment_starts.values() if s > start]
        path = self.segment_path(segment)
        stop = min([end, *following])
        with open(path, "rb") as file:
            file.seek(start - first)
            data = file.read(min(stop - start, max_bytes))
            size = whole_records(data)
            if size == 0 and start < stop:  # the first record is larger than max_bytes
                data += file.read(max(0, HEADER.size - len(data)))
                if len(data) >= HEADER.size:
                    data += file.read(HEADER.size + HEADER.unpack_from(data)[0] - len(data))
                size = whole_records(data)
                if size == 0:
                    raise CorruptLogError(f"{path}: no whole record at position {start}")
        return data[:size], start + size

    def close(self) -> None:
        with self._sync_lock:
            self._is_closed = True
            if self._sync_requests is not None:
                self._sync_requests.put(None)  # after the requests before it
            elif self._sync_signal is not None:  # (no syncer thread to close it)
                self._sync_signal.close()
        with self._append_lock:
            try:
                if self._fd >= 0:
                    is_unused = self._is_unused_segment()
                    try:
                        if self.fsync_mode != "never":
                            os.fsync(self._fd)
                    finally:
                        os.close(self._fd)
                        self._fd = -1
                    if is_unused:
                        self._drop_unused_segment()
            finally:
                if self._lock_fd >= 0:
                    os.close(self._lock_fd)  # (releases the directory)
                    self._lock_fd = -1

    def _is_unused_segment(self) -> bool:
        """Whether the segment open is the empty one recovery opened, nothing appended since
        (a node refused to start, or stopped idle)."""
        return self._appended == 0 and self._segment_starts == {self._recovered_segment: 0}

    def _drop_unused_segment(self) -> None:
        """Remove the empty segment recovery opened: a node refused at every start (restarted
        by systemd every few seconds) would leave one per start. The newest segment recorded
        goes back to the one before, which the segments present satisfy (recovery checked)."""
        if self._record_newest_segment(self.segment - 1):
            with contextlib.suppress(OSError):
                self.segment_path(self.segment).unlink()
                _fsync_directory(self.directory)

    def _record_newest_segment(self, segment: int) -> bool:
        """Write NEWEST_SEGMENT_FILE, best effort (a full disk: an older number only checks
        less); whether it was written."""
        try:
            _write_durably(self.directory / NEWEST_SEGMENT_FILE, f"{segment}\n".encode())
        except OSError:
            return False
        return True


class SyncDelivery:
    """An fsync up to ``position`` that the log's syncer thread waits for
    (``WriteAheadLog.sync_soon``): ``fileno``, the log's eventfd, is readable once it ended,
    so an event loop can watch it beside its sockets (one delivery at a time: the eventfd
    is shared by the log's deliveries). Whether it succeeded, ``wait_durable`` says."""

    __slots__ = ("_done", "_signal", "deadline", "position")

    def __init__(self, position: int, signal: PollSignal) -> None:
        self.position = position
        self._signal = signal
        self._done = held_lock()
        self.deadline = math.inf  # a stalled disk stalls the writes, not the event loop

    def fileno(self) -> int:
        return self._signal.fileno()

    @property
    def watch_key(self) -> object:
        """The log's eventfd: the same file behind ``fileno`` for as long as the log lives."""
        return self._signal

    def signal(self) -> None:
        """The fsync ended (the syncer thread)."""
        self._signal.signal()
        self._done.release()

    def finish(self) -> None:
        """Wait until the fsync ended (then the eventfd is quiet until the next one)."""
        pass_through(self._done)
        self._signal.clear()

    def abandon(self) -> None:
        """Nothing to cut: an fsync ends by itself."""


class _SyncRound:
    """The threads waiting for one fsync (see WriteAheadLog._sync_to)."""

    __slots__ = ("done", "turn", "upto")

    def __init__(self) -> None:
        self.turn = held_lock()
        self.done = held_lock()
        self.upto = 0  # the highest position a waiter of this round needs on disk


def _lock_directory(directory: Path) -> int:
    """Hold the directory's lock file for as long as the returned descriptor is open (the
    process lives): two nodes on one data directory would delete each other's log. Raises
    DataDirectoryInUseError naming the process that holds it."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # (some network mounts)
            log.warning("cannot lock %s (%s): make sure no other node uses it", directory, exc)
            return fd
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise errors.DataDirectoryInUseError(
            f"the data directory {directory} is in use by another node (process {holder}); "
            f"give each node a directory of its own"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _write_durably(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
