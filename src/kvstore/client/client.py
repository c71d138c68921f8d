"""The public client library: ``kvstore.Client``.

One Client is shared safely by any number of threads: they share one ZooKeeper session
(the primary's address, kept fresh by watches) and each thread gets its own connection
to the primary (a Thrift connection is not thread-safe; per-thread connections need no
lock on the hot path).

Retries: every call is retried until its timeout, transparently.
- Reads (get, get_many) are safe to repeat.
- Writes carry a client id and a per-write sequence number; the primary records the
  outcome of each applied write with the data, on every in-sync replica, so a write
  retried after a lost reply or a failover gets its original outcome instead of being
  applied twice (exactly-once). A ``cas`` that was applied never reports False on retry,
  and a retried ``put`` never overwrites a newer write.
  Each thread writes under its own id (a *lane*: the Client's id plus a number, handed
  back for reuse when the thread ends). A thread waits for each of its calls, so every
  write before its current one was answered: the request itself says so, and the
  primary may forget older outcomes. No lock is shared between threads per write.
- Errors that retrying cannot fix (a key or value too large, a malformed request, the
  primary's disk full) are raised at once. When the timeout runs out,
  :class:`~kvstore.errors.DeadlineExceededError` says whether the write may have been
  applied (``is_definite``).

On a cluster of the seed's nodes (no kvstore metadata in ZooKeeper) only get and put
work, without exactly-once; get cannot tell a missing key from "" there.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from kvstore import errors
from kvstore.client.locator import PrimaryLocator, tls_context
from kvstore.config import ClientConfig, Limits, TlsConfig
from kvstore.idl import RequestId
from kvstore.rpc import Connection

DEFAULT_ZK = "127.0.0.1:2181"
DEFAULT_PATH = "/kvstore"
# The longest timeout: a write is retried for its whole timeout, and the nodes keep its
# exactly-once record for 5 minutes after its lane last wrote to the key's stripe
# (server/sessions.py DEFAULT_TTL_S). A retry after the record expired would be applied again.
MAX_TIMEOUT_S = 240.0
RETRY_PAUSE_S = 0.05  # at most this long between attempts (sooner when ZooKeeper reports a change)
_PERMANENT = (
    errors.TooLargeError,
    errors.BadRequestError,
    errors.UnsupportedError,
    errors.ForbiddenError,
    errors.DiskFullError,  # until someone frees space: say so at once
)


_SEED_METHODS = frozenset({"get", "put"})  # what the seed's nodes serve

# Keys per get_many call: a node decodes and reads a call in one go, holding up its other
# clients meanwhile (0.5-0.75 s measured for a million keys), and refuses more than 131,072
# elements in one request (rpc.MAX_ELEMENTS) and a reply larger than a frame.
GET_MANY_KEYS = 10_000
# Entries a scan asks for per call (whole lock stripes: a chunk may hold more).
SCAN_CHUNK_KEYS = 5_000


class Client:
    """A thread-safe client of one kvstore cluster.

    ``timeout`` (seconds, at most MAX_TIMEOUT_S) bounds each call, retries included:
    no attempt waits longer than what is left of it (one that opens a connection may add
    the connect timeout, 0.5 s). ``tls`` connects to the nodes with mutual TLS (a client
    certificate from the cluster's CA: it may read and write, not replicate); ``zk_tls`` to
    ZooKeeper's secure port. ``max_value_bytes``: the nodes' ``--max-value-bytes`` where it
    was raised (a request over their frame limit is refused at once, TooLargeError, as the
    node closes the connection unread; it tells this side the limit). Use as a context
    manager, or call :meth:`close`.
    """

    def __init__(
        self,
        zk: str = DEFAULT_ZK,
        path: str = DEFAULT_PATH,
        *,
        timeout: float = 10.0,
        rpc_timeout_ms: int = 2000,
        connect_timeout_ms: int = 500,
        tls: TlsConfig | None = None,
        zk_tls: TlsConfig | None = None,
        max_value_bytes: int = Limits().max_value_bytes,
    ) -> None:
        if not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if timeout > MAX_TIMEOUT_S:
            raise ValueError(
                f"timeout must be at most {MAX_TIMEOUT_S:g} s, got {timeout!r}: the nodes keep a "
                "write's exactly-once record for 5 minutes, and a retry after it expired "
                "could apply the write twice"
            )
        self.timeout = timeout
        self._config = ClientConfig(
            zk,
            path,
            rpc_timeout_ms=rpc_timeout_ms,
            connect_timeout_ms=connect_timeout_ms,
            zk_connect_timeout_s=min(10.0, timeout),
            tls=tls,
            zk_tls=zk_tls,
        )
        self._tls = tls_context(tls)  # before ZooKeeper: a bad file fails at once
        self._max_frame_bytes = Limits.for_sizes(
            Limits().max_key_bytes, max_value_bytes
        ).max_frame_bytes
        # Each attempt's bounds: none longer than the whole call's (a shorter one near the
        # deadline, see _call_within).
        limit_ms = max(1, int(timeout * 1000))
        self._rpc_timeout_ms = min(rpc_timeout_ms, limit_ms)
        self._connect_timeout_ms = min(connect_timeout_ms, limit_ms)
        self._rpc_timeout_s = self._rpc_timeout_ms / 1000
        self._locator = PrimaryLocator(self._config)
        self._new_identity()
        _CLIENTS.add(self)
        self._is_closed = False
        self._locator.on_primary_moved(self._leave_old_primary)

    def _new_identity(self) -> None:
        """A fresh client id, no lanes and no per-thread connections (at start, and in a
        child after fork: parent and child must never write under the same id and
        sequence numbers, nor share a connection: a child's close() must not shut the
        parent's sockets, which it inherited)."""
        self._lock = threading.Lock()  # (one another thread held at the fork stays held)
        # Every thread's connection, held weakly: the thread's own storage holds it (with a
        # _ConnectionCloser), so a thread that ends takes its connection with it.
        self._connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.client_id = uuid.uuid4().hex
        self._free_lanes: list[_Lane] = []
        self._next_lane = itertools.count(1).__next__
        self._local = threading.local()

    # ------------------------------------------------------------------ the API

    def get(self, key: str) -> str | None:
        """The key's value, or None if it does not exist."""
        _check_key(key)
        if self._locator.is_seed_cluster:
            value: str = self._call("get", (key,))
            return value or None
        found = self._call("lookup", (key,))
        return found.value if found.found else None

    def get_many(self, keys: Iterable[str]) -> dict[str, str | None]:
        """Every key's value (None for a missing key). Each value is current on its own;
        the result is not a snapshot across keys."""
        if isinstance(keys, str):  # (a str is an iterable of keys, one per character)
            raise errors.BadRequestError("get_many takes a list of keys, not a str")
        wanted = list(keys)
        for key in wanted:
            _check_key(key)
        deadline = time.monotonic() + self.timeout  # (the whole call's, not each chunk's)
        if self._locator.is_seed_cluster:
            return {key: self._call("get", (key,), deadline=deadline) or None for key in wanted}
        found: dict[str, str] = {}
        chunks = [wanted[i : i + GET_MANY_KEYS] for i in range(0, len(wanted), GET_MANY_KEYS)]
        while chunks:  # (a node serves one call at a time)
            chunk = chunks.pop()
            try:
                found.update(self._call("get_many", (chunk,), deadline=deadline))
            except errors.TooLargeError:
                if len(chunk) == 1:  # (cannot be: a frame holds the largest key and value)
                    raise
                half = len(chunk) // 2  # large values: the reply would not fit a frame
                chunks += [chunk[:half], chunk[half:]]
        return {key: found.get(key) for key in wanted}

    def scan(self, chunk_keys: int = SCAN_CHUNK_KEYS) -> Iterator[tuple[str, str]]:
        """Every (key, value) of the store, fetched a chunk of lock stripes at a time (for an
        export or a backup: ``kv dump``). Not one instant: each stripe is copied at one, so a
        key neither written nor deleted during the scan comes exactly once, and one written
        meanwhile may or may not come. A failover during the scan raises UnavailableError
        (the next primary's stripes are not this one's): scan again."""
        stripe, epoch = 0, 0
        while True:
            chunk = self._call("scan", (stripe, max(1, chunk_keys), epoch))
            if epoch and chunk.epoch != epoch:
                raise errors.UnavailableError(
                    f"the primary changed during the scan (epoch {epoch} to {chunk.epoch}): "
                    "scan again"
                )
            epoch = chunk.epoch
            yield from zip(chunk.keys, chunk.values, strict=True)
            if chunk.next_stripe < 0:
                return
            stripe = chunk.next_stripe

    def put(self, key: str, value: str) -> None:
        """Set the key's value (exactly once, even when retried across a failover)."""
        _check_key(key)
        if self._locator.is_seed_cluster:
            self._call("put", (key, value), is_idempotent=False)
            return
        self._write("put_once", key, value)

    def delete(self, key: str) -> bool:
        """Delete the key; True if it existed."""
        _check_key(key)
        result: bool = self._write("remove", key)
        return result

    def cas(self, key: str, expected: str | None, value: str) -> bool:
        """Set the key to ``value`` only if its value is ``expected`` (None: only if absent).
        True if it did."""
        _check_key(key)
        result: bool = self._write("compare_and_set", key, expected, value)
        return result

    def close(self) -> None:
        with self._lock:
            self._is_closed = True
            connections = list(self._connections)
            self._connections = weakref.WeakSet()
        for conn in connections:
            conn.shut()  # (a call under way fails instead of reconnecting)
        if not isinstance(self._locator, _LocatorAfterFork):  # (nothing to close in a child)
            self._locator.close()

    def __repr__(self) -> str:
        state = "closed" if self._is_closed else f"timeout={self.timeout:g}"
        return (
            f"<kvstore.Client {self._config.zk_connect} {self._config.zk_path} {state} "
            f"id={self.client_id}>"
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ retries

    def _write(self, method: str, *args: Any) -> Any:
        lease: _LaneLease | None = getattr(self._local, "lane", None)
        if lease is None:
            lease = self._local.lane = _LaneLease(self)
        if lease.lane.is_busy:
            # A write from inside one of this thread's writes (a signal handler, a
            # finalizer): a lane of its own, back to the free list when this call ends.
            lease = _LaneLease(self)
        lane = lease.lane
        lane.seq = seq = lane.seq + 1
        # Every earlier write of this lane was answered (or given up on): acked_below = seq.
        request = lane.request  # (one per lane, reused: the lane is this call's alone)
        request.seq = request.acked_below = seq
        lane.is_busy = True
        try:
            return self._call(method, (*args, request))
        finally:
            lane.is_busy = False

    def _call(
        self,
        method: str,
        args: tuple[Any, ...],
        is_idempotent: bool = True,
        deadline: float | None = None,
    ) -> Any:
        """Call ``method`` on the primary, retrying until the timeout (or ``deadline``, a
        ``time.monotonic()`` instant: a call made of several). ``is_idempotent``: the call
        may be repeated (reads, and writes that carry a request id)."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:  # (a later part of a call made of several)
            raise errors.DeadlineExceededError(
                f"{method} did not succeed within {self.timeout:g} s: "
                "its earlier parts took it all",
                is_definite=True,
                last_error=None,
            )
        may_be_applied = False
        first_error: errors.KVError | None = None  # (the last attempt's may be cut short)
        while True:
            if self._is_closed:  # (nothing to wait for: it will not open again)
                if not may_be_applied:
                    raise errors.UnavailableError("the client is closed")
                closed = errors.UnavailableError(
                    f"the client was closed during {method}: it may have been applied"
                )
                closed.is_definite = False  # (an earlier attempt may have been applied)
                raise closed
            generation = self._locator.generation
            try:
                return self._call_once(method, args, remaining_s)
            except _PERMANENT:
                raise
            except errors.KVError as exc:
                may_be_applied = may_be_applied or not exc.is_definite
                if may_be_applied and not is_idempotent:
                    raise
                first_error = first_error or exc
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    why = f"{exc}"
                    if f"{first_error}" != why:  # (bounded by the deadline, the last attempt
                        # may only have timed out: the first says what went wrong)
                        why += f" (the first attempt: {first_error})"
                    raise errors.DeadlineExceededError(
                        f"{method} did not succeed within {self.timeout:g} s: {why}",
                        is_definite=not may_be_applied,
                        last_error=exc,
                    ) from None
                self._locator.wait_for_change(generation, min(RETRY_PAUSE_S, remaining_s))
                remaining_s = max(0.001, deadline - time.monotonic())

    def _call_once(self, method: str, args: tuple[Any, ...], remaining_s: float) -> Any:
        locator = self._locator
        if locator.is_seed_cluster and method not in _SEED_METHODS:  # (hot path: one read)
            if locator.is_new_cluster:  # (retried: the first primary comes soon)
                raise errors.UnavailableError(
                    "no primary yet: the cluster's first node has not taken the primary role"
                )
            raise errors.UnsupportedError(f"{method} needs kvstore nodes (the seed's have get/put)")
        address = locator.primary_address()
        if not address:
            raise errors.UnavailableError("no primary registered in ZooKeeper")
        conn = self._connection(address)
        if remaining_s < self._rpc_timeout_s:  # (rare: a retry near the deadline)
            return self._call_within(conn, method, args, remaining_s)
        return locator.call_primary(conn, method, args)

    def _call_within(
        self, conn: Connection, method: str, args: tuple[Any, ...], remaining_s: float
    ) -> Any:
        """One attempt bounded by what is left of the call's timeout, not the usual RPC
        timeout (else a call could run over its timeout by up to that much)."""
        limit_ms = max(1, int(remaining_s * 1000))
        conn.set_timeouts(limit_ms, min(self._connect_timeout_ms, limit_ms))
        try:
            return self._locator.call_primary(conn, method, args)
        finally:
            conn.set_timeouts(self._rpc_timeout_ms, self._connect_timeout_ms)

    def _leave_old_primary(self, address: str) -> None:
        """ZooKeeper names a new primary: calls still waiting on the old one end now (and
        are retried there, exactly-once) instead of at their timeout."""
        with self._lock:
            stale = [conn for conn in list(self._connections) if conn.address != address]
        for conn in stale:
            conn.close()

    def _connection(self, address: str) -> Connection:
        """This thread's connection to ``address`` (a new one when the primary moved)."""
        old: Connection | None = getattr(self._local, "conn", None)
        if old is not None and old.address == address:
            return old
        conn = Connection(
            address,
            self._rpc_timeout_ms,
            self._connect_timeout_ms,
            # Every call to kvstore nodes may be repeated (reads, exactly-once writes): a call
            # into a connection the node closed is retried, so a connection in use is not
            # polled for EOF before each call (one system call each), only after a rest.
            # The seed's put may not be repeated: never write it into a closed connection.
            is_checked_before_use=self._locator.is_seed_cluster,
            tls=self._tls,
            max_frame_bytes=self._max_frame_bytes,
        )
        with self._lock:
            if self._is_closed:
                raise errors.UnavailableError("the client is closed")
            if old is not None:
                self._connections.discard(old)
            self._connections.add(conn)
        if old is not None:
            old.close()
        self._local.conn = conn
        self._local.closer = _ConnectionCloser(conn)  # (the old one's closes the old again)
        return conn


def _check_key(key: str) -> None:
    """BadRequestError for an empty key, at once: the nodes refuse it (see NodeHandler._key);
    and for a key that is not a str (bytes would be sent as their text, so that get_many
    would look its answer up under another key: found, yet reported missing)."""
    if not isinstance(key, str):
        raise errors.BadRequestError(f"a key is a str, not {type(key).__name__}: {key!r:.60}")
    if key == "":
        raise errors.BadRequestError("the key is empty (a key has at least one character)")


_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._new_identity()
        # The parent's ZooKeeper session lives on in the parent: its threads are not here, so
        # this child would never hear of a failover (and closing it would wait 10 s for them).
        client._locator = _LocatorAfterFork(client)  # type: ignore[assignment]


class _LocatorAfterFork:
    """Stands in for the parent's PrimaryLocator in a forked child: the first use opens a
    ZooKeeper session of the child's own (a CoordinationError if it cannot)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        client = self._client
        with client._lock:
            locator = client._locator
            if isinstance(locator, _LocatorAfterFork):
                if client._is_closed:
                    raise errors.UnavailableError("the client is closed")
                locator = client._locator = PrimaryLocator(client._config)
                locator.on_primary_moved(client._leave_old_primary)
        return getattr(locator, name)


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ConnectionCloser:
    """Closes a thread's connection when the thread ends (its storage goes): a process that
    keeps starting threads would otherwise keep one open connection per thread it ever ran,
    until the node refuses new ones. Only in the process that opened it: a forked child
    drops its copies of the parent's connections without shutting the parent's sockets."""

    __slots__ = ("conn", "pid")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()

    def __del__(self) -> None:
        if os.getpid() == self.pid:
            self.conn.close()


class _Lane:
    """An exactly-once identity used by one thread at a time: a client id and its last seq."""

    __slots__ = ("client_id", "is_busy", "request", "seq")

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.seq = 0
        self.is_busy = False  # a write on it is under way
        self.request = RequestId(client_id=client_id, seq=0, acked_below=0)


class _LaneLease:
    """A thread's hold on a lane (kept in the Client's thread-local storage). When the
    thread ends its storage goes, and the lane returns to the Client's free list, its
    sequence intact, for the next new thread: a process that keeps starting threads
    reuses a few ids instead of leaving a record under a new id each time."""

    __slots__ = ("free", "lane")

    def __init__(self, client: Client) -> None:
        self.free = client._free_lanes
        try:
            self.lane = self.free.pop()  # list.pop and append are atomic: no lock
        except IndexError:
            self.lane = _Lane(f"{client.client_id}-{client._next_lane()}")

    def __del__(self) -> None:
        self.free.append(self.lane)
