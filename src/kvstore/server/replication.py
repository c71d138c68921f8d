"""Primary -> backup forwarding (primary side) and the fence/lease book-keeping (backup side).

Invariants:
- The primary calls ``Replicator.replicate`` while holding the key's stripe write
  lock, so puts to one key reach the backup one at a time, in the order they are
  applied on the primary. Puts to different keys travel together: writes that arrive
  while a batch is on the wire are gathered into the next one (group commit), which
  one of their threads sends when the line is free (or, for a primary with several
  backups, the replicator's own sender thread, so that the lines work in parallel). At
  most one batch is in flight per backup.
- ``replicate`` returns only after the backup applied the entry (ack after apply):
  the batch holding it came back.
- Once a send fails the replicator is broken for good; every later caller gets
  :class:`BackupFailedError`. The primary must then drop the backup
  from the in-sync set (by CAS in ZooKeeper) before it acknowledges anything, and only
  then shuts the lines (``close``): an orderly close tells the backup it was dropped.
- Lease: a backup that accepts a batch at time t promises not to take over before
  t + lease_s (its clock). The primary counts its lease from the moment it *sent*
  the batch, minus a safety margin, so its lease always ends first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kvstore import errors
from kvstore.coordination import Member
from kvstore.idl import Change
from kvstore.rpc import Connection
from kvstore.server.handoff import PollSignal, held_lock, pass_through
from kvstore.server.sessions import RequestRecord

LEASE_SAFETY = 0.8  # the primary uses only this fraction of the lease it was granted
MAX_BATCH_ENTRIES = 4096
# The join protocol from which a backup reads exactly-once records sent flat beside a
# batch's puts (replicate_batch fields 8-10); an older backup would skip them unread.
FLAT_RECORDS = 2
DEFAULT_MAX_BATCH_BYTES = 8 << 20


class BackupFailedError(Exception):
    """Replication to the backup failed; the backup must be dropped from the in-sync set."""


class _Batch:
    """Writes that travel to the backup in one ``replicate_batch``.

    The thread that opened it sends it: at once if the line is free, else when
    ``turn`` is released (the batch before it came back). The others wait for ``done``
    to be released. Both are plain locks created held (see handoff).
    """

    __slots__ = (
        "acked",
        "changes",
        "clients",
        "done",
        "end_position",
        "error",
        "is_polled",
        "is_through",
        "keys",
        "seqs",
        "size",
        "turn",
        "values",
    )

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.values: list[str] = []
        # The entries' exactly-once records, made when the first one comes (see the IDL).
        self.clients: list[str] | None = None
        self.seqs: list[int] = []
        self.acked: list[int] = []
        self.changes: list[object] = []
        self.size = 0  # an upper bound of its encoded bytes
        self.end_position = 0  # in the primary's log, after its last write (0: no log)
        self.error: BackupFailedError | None = None
        self.turn = held_lock()
        self.done = held_lock()
        # A sender thread's batch: whether it went through, and whether an event loop
        # waits for that on the replicator's poll signal (Replicator.send_soon).
        self.is_through = False
        self.is_polled = False


# (the batch, whether its caller sends it, whether the line was free for it)
_Ticket = tuple[_Batch, bool, bool]


class Replicator:
    """The primary's line to one backup, for one join of that backup.

    Writes are batched (group commit): a thread that finds the line free sends its
    write at once; writes arriving meanwhile gather in the next batch, whose first
    thread sends it when the line frees up, and the others wait for its reply. So the
    backup handles one request per round trip, however many threads write. A batch
    closes at ``max_batch_bytes`` (kept under the backup's frame limit) or
    MAX_BATCH_ENTRIES. Heartbeats go on a pooled connection of their own. Every batch
    carries the epoch and the backup's join id, so the backup refuses anything sent
    for an earlier join. After ``close`` or any failure nothing more is sent.
    """

    def __init__(
        self,
        backup: Member,
        epoch: int,
        join_id: str,
        lease_s: float,
        rpc_timeout_ms: int,
        observe: Callable[[float, int], None] | None = None,
        tls: Any = None,  # the node's client TLS context (rpc.client_tls_context), if any
        secret: bytes | None = None,  # the cluster secret, proven on each new line
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        has_sender: bool = False,
    ) -> None:
        """``has_sender``: batches go out on a thread of this replicator's own instead of
        the thread that opened them (so that a primary with several backups waits for them
        in parallel; with one, the opener sending saves a thread hand-off per batch)."""
        self._tls = tls
        self._secret = secret
        self._observe = observe  # (seconds, entries) of each batch that went through
        self.backup = backup
        # Other names the backup may be listed under in this join (it registers again when
        # its ZooKeeper session expires): dropping it removes every one from the in-sync set.
        self.other_names: set[str] = set()
        self.durable_id: str | None = None  # the backup's, if it keeps a data directory
        self.identity: str | None = None  # its certificate's, pinned at join (TLS only)
        # The backup said (join protocol >= 2) it reads records sent flat beside the puts.
        self.takes_flat_records = True
        self.log_id: str | None = None  # the primary's log (sent with each batch's position)
        # [from, to) of the primary's log that this join replays (incremental catch-up)
        self.catch_up: tuple[int, int] | None = None
        self.epoch = epoch
        self.join_id = join_id
        self.is_in_sync = False
        self.is_broken = False
        self.is_heartbeating = False  # (the primary's) a heartbeat of its own is under way
        self.lease_until = 0.0
        self.last_send_at = time.monotonic()
        self._lease_s = lease_s * LEASE_SAFETY
        self._rpc_timeout_ms = rpc_timeout_ms
        self._idle: list[Connection] = []
        self._all: list[Connection] = []
        self._lock = threading.Lock()
        self._max_batch_bytes = max_batch_bytes
        self._queue: deque[_Batch] = deque()  # waiting to be sent, oldest first
        self._is_line_busy = False  # a batch is on the wire
        self._sender_work: threading.Semaphore | None = None
        self._polled: PollSignal | None = None  # the sender's signal to an event loop
        if has_sender:
            # Released once per batch opened, and once by close: the sender's wake-ups.
            self._sender_work = threading.Semaphore(0)
            self._polled = PollSignal()
            self._is_line_busy = True  # openers never send: the sender does
            sender = threading.Thread(
                target=self._sender_loop, name=f"replicate-{backup.address}", daemon=True
            )
            try:
                sender.start()
            except BaseException:
                self._polled.close()  # (the sender closes it once started)
                raise

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this join's backup may be listed under (its current one first)."""
        return (self.backup.name, *sorted(self.other_names - {self.backup.name}))

    @property
    def has_lease(self) -> bool:
        return time.monotonic() < self.lease_until

    def replicate(self, key: str, value: str, record: RequestRecord | None = None) -> None:
        """Return once the backup applied ``key = value`` (and remembered ``record``, the
        exactly-once (client_id, seq, acked_below) of the write, if any); raise
        BackupFailedError otherwise."""
        self.wait(self.enqueue(key, value, 0, record))

    def enqueue(
        self, key: str, value: str | None, position: int = 0, record: RequestRecord | None = None
    ) -> _Ticket:
        """Put ``key = value`` (a delete if ``value`` is None), with its exactly-once
        ``record`` if any, in the next batch; ``wait`` for the ticket. Writes reach the
        backup in the order of their enqueue calls. ``position``: the write's end in the
        primary's log (enqueued in log order; 0 without a log). Deletes, and records for a
        backup that does not read them flat, travel as Changes."""
        with self._lock:
            batch, is_opener = self._add(key, value, position, record)
            return self._ticket(batch, is_opener)

    def enqueue_many(
        self, writes: list[tuple[str, str | None, int, RequestRecord | None]]
    ) -> list[_Ticket]:
        """``enqueue`` each of ``writes`` (key, value, position, record), in order, but
        take the line only after the last: a group's writes share a batch (within its
        bounds) instead of the first going alone."""
        with self._lock:
            added = [self._add(*write) for write in writes]
            return [self._ticket(batch, is_opener) for batch, is_opener in added]

    def _add(
        self, key: str, value: str | None, position: int, record: RequestRecord | None
    ) -> tuple[_Batch, bool]:
        """Add one write to the open batch, or to a new one (then True: its opener). Call
        with ``_lock`` held."""
        if self.is_broken:
            raise BackupFailedError(f"replication to {self.backup.address} already failed")
        change = None
        if value is None or (record is not None and not self.takes_flat_records):
            client_id, seq, acked_below = record or (None, 0, 0)
            change = Change(key, value, client_id, seq, True, acked_below)
            chars = len(key) + len(value or "") + len(client_id or "")
        else:
            chars = len(key) + len(value) + (0 if record is None else len(record[0]) + 8)
        size = 4 * chars + 64  # UTF-8 takes at most 4 bytes a character; field headers
        queue = self._queue
        batch = queue[-1] if queue else None
        is_opener = (
            batch is None
            or batch.size + size > self._max_batch_bytes
            or len(batch.keys) + len(batch.changes) >= MAX_BATCH_ENTRIES
        )
        if is_opener:
            batch = _Batch()
            queue.append(batch)
        assert batch is not None
        if change is None:
            clients = batch.clients
            if record is not None and clients is None:
                clients = batch.clients = [""] * len(batch.keys)
                batch.seqs = [0] * len(clients)
                batch.acked = [0] * len(clients)
            if clients is not None:
                client_id, seq, acked_below = record or ("", 0, 0)
                clients.append(client_id)
                batch.seqs.append(seq)
                batch.acked.append(acked_below)
            batch.keys.append(key)
            batch.values.append(value)  # type: ignore[arg-type]
        else:
            batch.changes.append(change)
        batch.size += size
        batch.end_position = max(batch.end_position, position)
        return batch, is_opener

    def _ticket(self, batch: _Batch, is_opener: bool) -> _Ticket:
        """The ticket of a write just added (call with ``_lock`` held): an opener finding
        the line free takes it (the queue then holds its batch first)."""
        if self._sender_work is not None:
            if is_opener:
                self._sender_work.release()
            return batch, False, False  # the sender sends it; wait for its reply
        is_line_free = is_opener and not self._is_line_busy
        if is_line_free:  # then the queue held nothing before this batch
            self._is_line_busy = True
            self._queue.popleft()
        return batch, is_opener, is_line_free

    def wait(self, ticket: _Ticket) -> None:
        """Return once the backup applied the write of ``ticket``; raise BackupFailedError
        otherwise. The batch's first writer sends it (when the line is free)."""
        batch, is_opener, is_line_free = ticket
        if is_opener:
            if not is_line_free:
                batch.turn.acquire()  # the sender before dequeued it for us
            self._send_batch(batch)
        else:
            pass_through(batch.done)
        if batch.error is not None:
            raise batch.error

    def _send_batch(self, batch: _Batch) -> None:
        """Send ``batch`` (the line is ours), wake its threads, pass the line on."""
        try:
            self._deliver(batch)
        except BaseException:
            self.close()
            raise
        finally:
            self._pass_line(batch)

    def _sender_loop(self) -> None:
        """Send the queued batches one at a time, oldest first, until closed (then fail the
        ones left: ``_send`` refuses at once on a broken line)."""
        work, polled = self._sender_work, self._polled
        assert work is not None and polled is not None
        while True:
            work.acquire()
            with self._lock:
                batch = self._queue.popleft() if self._queue else None
            if batch is None:  # closed (every release but close's comes with a batch)
                polled.close()  # after its last signal
                return
            try:
                self._deliver(batch)
            except Exception:  # recorded in the batch; the line is broken for good
                self._break()
            finally:
                with self._lock:
                    batch.is_through = True
                    is_polled = batch.is_polled
                try:
                    if is_polled:  # before the waiters go: the loop's finish clears it then
                        polled.signal()
                finally:
                    batch.done.release()

    def _deliver(self, batch: _Batch) -> None:
        """Send ``batch``; a failure is recorded in ``batch.error`` (one that is not a
        BackupFailedError is raised again too): its threads never take it for sent."""
        try:
            records = None if batch.clients is None else (batch.clients, batch.seqs, batch.acked)
            self._send(batch.keys, batch.values, batch.changes or None, batch.end_position, records)
        except BackupFailedError as exc:
            batch.error = exc
        except BaseException as exc:
            batch.error = BackupFailedError(f"replication to {self.backup.address}: {exc!r}")
            raise

    @property
    def wants_spare_line(self) -> bool:
        """Fewer than two replication lines are open (see ``heartbeat``)."""
        return len(self._all) < 2 and not self.is_broken

    def heartbeat(self) -> None:
        """Send an empty batch: renews the lease, detects a dead backup. While fewer than
        two lines are open it goes on a new one: under load the batches keep one line busy,
        and a kill -9 of this process resets a line with a reply still unread (RST) but
        closes an idle one with FIN, which the backup takes as proof that the primary left
        (fast failover). So there is always an idle one."""
        self._send([], [], fresh=self.wants_spare_line)

    def _send(
        self,
        keys: list[str],
        values: list[str],
        changes: list[Any] | None = None,
        end_position: int = 0,
        records: tuple[list[str], list[int], list[int]] | None = None,
        fresh: bool = False,
    ) -> None:
        conn = self._new_connection() if fresh else self._checkout()
        started = time.monotonic()
        position, log_id = (end_position, self.log_id) if end_position else (None, None)
        try:
            conn.call(
                "replicate_batch",
                self.epoch,
                keys,
                values,
                self.join_id,
                changes,
                position,
                log_id,
                *(records or ()),
            )
        except Exception as exc:  # every failure, expected (KVError) or not, breaks the line
            raise self._failed(exc) from exc
        self._sent(conn, started, len(keys) + len(changes or ()))

    def _failed(self, exc: Exception) -> BackupFailedError:
        """Break the line after a failed batch (every failure, expected or not) ... but do
        not shut it: the backup takes an orderly close as proof that the primary left or
        dropped it, so lines close (``close``) only once the primary removed it from the
        in-sync set. A backup that refused a batch (its disk is full) would otherwise take
        over, and win if its CAS came first."""
        self._break()
        return BackupFailedError(f"replication to {self.backup.address}: {exc}")

    def _sent(self, conn: Connection, started: float, entries: int) -> None:
        """A batch sent at ``started`` went through on ``conn``: the lease runs from then."""
        if started + self._lease_s > self.lease_until:
            self.lease_until = started + self._lease_s
        self.last_send_at = started
        if self._observe is not None:
            self._observe(time.monotonic() - started, entries)
        self._idle.append(conn)

    def send_soon(
        self, ticket: _Ticket, is_polled: bool = False
    ) -> Delivery | SenderDelivery | None:
        """Like ``wait``, but if ``ticket`` opened its batch on a free line, send the batch
        and return without waiting for the reply: the caller waits until ``fileno`` is
        readable (or ``deadline`` passes), then calls ``Delivery.finish``. Otherwise (the
        line is busy, or another thread sends the batch) wait as ``wait`` does; None.
        With a sender thread the batch is the sender's to send: a delivery to ``finish``,
        whose ``fileno`` is the sender's poll signal if ``is_polled`` (the caller is the
        event loop, the only one that polls it; one batch at a time), else -1."""
        batch, is_opener, is_line_free = ticket
        if self.has_sender:
            return self._await_sender(ticket, is_polled)
        if not (is_opener and is_line_free):
            self.wait(ticket)
            return None
        entries = len(batch.keys) + len(batch.changes)
        try:
            conn = self._checkout()
            started = time.monotonic()
            records = None if batch.clients is None else (batch.clients, batch.seqs, batch.acked)
            position, log_id = (
                (batch.end_position, self.log_id) if batch.end_position else (None, None)
            )
            seqid = conn.send_call(
                "replicate_batch",
                self.epoch,
                batch.keys,
                batch.values,
                self.join_id,
                batch.changes or None,
                position,
                log_id,
                *(records or ()),
            )
        except Exception as exc:
            batch.error = exc if isinstance(exc, BackupFailedError) else self._failed(exc)
            self._pass_line(batch)
            raise batch.error from None
        return Delivery(self, batch, conn, seqid, started, entries)

    @property
    def has_sender(self) -> bool:
        """Whether batches go out on this replicator's sender thread."""
        return self._sender_work is not None

    def _await_sender(self, ticket: _Ticket, is_polled: bool) -> SenderDelivery | None:
        """``send_soon`` for a sender thread's batch (see there)."""
        batch = ticket[0]
        with self._lock:
            if not batch.is_through:
                if is_polled:
                    batch.is_polled = True
                return SenderDelivery(self, ticket, self._polled if is_polled else None)
        self.wait(ticket)
        return None

    def _pass_line(self, batch: _Batch) -> None:
        """``batch`` is through (sent or failed): wake its threads, pass the line on."""
        batch.done.release()
        with self._lock:  # invariant: the line is free only while the queue is empty
            following = self._queue.popleft() if self._queue else None
            self._is_line_busy = following is not None
        if following is not None:
            following.turn.release()

    def _checkout(self) -> Connection:
        if self.is_broken:
            raise BackupFailedError(f"replication to {self.backup.address} already failed")
        try:
            return self._idle.pop()
        except IndexError:
            return self._new_connection()

    def _new_connection(self) -> Connection:
        if self.is_broken:
            raise BackupFailedError(f"replication to {self.backup.address} already failed")
        # Not checked before each use: the backup never closes a live primary's
        # connection, and any failure breaks the whole line anyway.
        conn = Connection(
            self.backup.address,
            timeout_ms=self._rpc_timeout_ms,
            is_checked_before_use=False,
            tls=self._tls,
            secret=self._secret,
            expected_identity=self.identity,  # the backup that joined, no other node
        )
        with self._lock:
            if self.is_broken:
                raise BackupFailedError(f"replication to {self.backup.address} already failed")
            self._all.append(conn)
        return conn

    def _break(self) -> None:
        with self._lock:
            self.is_broken = True

    def close(self) -> None:
        """Stop for good; connections in use fail their call, none is reopened."""
        with self._lock:
            self.is_broken = True
            connections, self._all, self._idle = self._all, [], []
        for conn in connections:
            conn.shut()
        if self._sender_work is not None:
            # The sender fails what is queued, then ends (a second close's wake-up finds it
            # gone: harmless, nothing is queued on a broken line).
            self._sender_work.release()


class Delivery:
    """A batch sent to a backup whose reply is still to be read (``Replicator.send_soon``)."""

    __slots__ = ("_batch", "_conn", "_entries", "_replicator", "_seqid", "_started", "is_done")

    def __init__(
        self,
        replicator: Replicator,
        batch: _Batch,
        conn: Connection,
        seqid: int,
        started: float,
        entries: int,
    ) -> None:
        self._replicator = replicator
        self._batch = batch
        self._conn = conn
        self._seqid = seqid
        self._started = started
        self._entries = entries
        self.is_done = False

    def fileno(self) -> int:
        """The line's socket (readable once the reply came); -1 if it was closed."""
        return self._conn.fileno()

    @property
    def watch_key(self) -> object:
        """The line's socket object: the same open socket behind ``fileno`` while it lives."""
        return self._conn.raw_socket

    @property
    def deadline(self) -> float:
        """When the reply is late: ``abandon`` then."""
        return self._started + self._replicator._rpc_timeout_ms / 1000

    def finish(self) -> None:
        """Read the reply (waiting for it if it has not come) and pass the line on; raises
        BackupFailedError if the batch failed. Once only: later calls just report."""
        batch = self._batch
        if not self.is_done:
            self.is_done = True
            replicator = self._replicator
            try:
                self._conn.receive_reply("replicate_batch", self._seqid)
            except Exception as exc:
                batch.error = replicator._failed(exc)
            else:
                replicator._sent(self._conn, self._started, self._entries)
            replicator._pass_line(batch)
        if batch.error is not None:
            raise batch.error

    def abandon(self) -> None:
        """No reply within the deadline: cut the line (``finish`` then fails)."""
        self._conn.close()


class SenderDelivery:
    """A batch a replicator's sender thread sends (``Replicator.send_soon``): ``fileno``, the
    sender's poll signal, is readable once it went through (-1: not polled, just finish)."""

    __slots__ = ("_replicator", "_signal", "_ticket", "deadline")

    def __init__(self, replicator: Replicator, ticket: _Ticket, signal: PollSignal | None) -> None:
        self._replicator = replicator
        self._ticket = ticket
        self._signal = signal
        # The sender's own call is bounded by the RPC timeout; it may wait for the batch
        # before it as long.
        self.deadline = time.monotonic() + 2 * replicator._rpc_timeout_ms / 1000

    def fileno(self) -> int:
        return -1 if self._signal is None else self._signal.fileno()

    @property
    def watch_key(self) -> object:
        """The sender's signal: the same eventfd behind ``fileno`` for as long as it lives."""
        return self._signal

    def finish(self) -> None:
        """Wait until the batch went through; raises BackupFailedError if it failed."""
        try:
            self._replicator.wait(self._ticket)
        finally:
            if self._signal is not None:
                self._signal.clear()  # (signalled before the wait ended)

    def abandon(self) -> None:
        """Nothing to cut: the sender's call ends within its own timeout."""


class BackupFence:
    """Backup side: which primary epoch and join the node accepts batches for, and its lease.

    All changes happen under one lock, so a takeover (``fence_if``) can never
    interleave with a batch being applied and acknowledged.
    """

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.lock = threading.Lock()
        self.accepting: tuple[int, str] | None = None  # (epoch, join id)
        # The certificate identity of the primary of that join (TLS only; server/identity.py).
        self.identity: str | None = None
        self.lease_granted_until = 0.0
        self.last_heard_at = time.monotonic()
        self.connection_closed_at = 0.0
        # When the current join's primary closed a replication connection in order (EOF):
        # its process exited, or it dropped this backup (after removing it from the
        # in-sync set by CAS). Unlike a refused or reset connection, a firewall cannot
        # produce it, so it proves no old primary serves on its lease any more.
        self.orderly_close_at = 0.0

    def open(self, epoch: int, join_id: str, identity: str | None = None) -> None:
        with self.lock:
            self.accepting = (epoch, join_id)
            self.identity = identity
            self.last_heard_at = time.monotonic()

    def close(self) -> None:
        with self.lock:
            self.accepting = None
            self.identity = None

    def check(self, epoch: int | None, join_id: str | None) -> None:
        """Raise StaleEpochError unless this batch belongs to the open join. Call with lock held."""
        if self.accepting is None or (epoch, join_id) != self.accepting:
            raise errors.StaleEpochError(
                f"replicate from epoch {epoch} refused: this node accepts "
                f"{'nothing' if self.accepting is None else f'epoch {self.accepting[0]}'} "
                f"(a replicate must come from the current primary, for this node's current join)"
            )

    def granted(self) -> None:
        """Record an accepted batch. Call with lock held, after applying it."""
        now = time.monotonic()
        self.last_heard_at = now
        self.lease_granted_until = now + self.lease_s

    def closed_in_order(self, join_id: str) -> None:
        """A connection of join ``join_id`` ended with EOF from the primary."""
        with self.lock:
            if self.accepting is not None and self.accepting[1] == join_id:
                self.orderly_close_at = time.monotonic()

    @property
    def has_primary_left(self) -> bool:
        """The current primary closed its replication line in order and sent nothing since."""
        return self.orderly_close_at > self.last_heard_at

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
                self.accepting = None
                return True
            return False
