"""KVClient: finds the primary through ZooKeeper watches and talks to it.

Errors keep their meaning from :mod:`kvstore.errors`: a *definite* error
(``err.is_definite``) means the operation was certainly not applied; an
indefinite one means it may have been. The client retries only definite errors
(and only when asked to, with ``retry_s``); an indefinite put is reported to the
caller, never silently sent again.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from kvstore import errors
from kvstore.config import ClientConfig, TlsConfig
from kvstore.coordination import ClusterView, connect, createznode_command
from kvstore.rpc import Connection, client_tls_context

REFRESH_RETRY_S = 0.2  # between attempts to re-read the primary while ZooKeeper is away


@functools.lru_cache(maxsize=16)
def tls_context(tls: TlsConfig | None) -> Any:
    """The client TLS context for ``tls`` (None for plaintext), loaded once per process.

    Raises OSError (ssl.SSLError) if a file cannot be read or does not fit the others."""
    if tls is None:
        return None
    return client_tls_context(tls.cert_path, tls.key_path, tls.ca_path)


class PrimaryLocator:
    """Shared by all threads of a client: the primary's address, kept off the request path.

    Once the primary is known, requests never wait for ZooKeeper: ``primary_address``
    returns the cached address. Watches, session changes and ``refresh`` (after a node
    refused a request) only wake a background thread that re-reads the metadata; while
    ZooKeeper is unreachable the last known primary keeps serving. A node's NotPrimary
    answer names the primary it knows (``use_hint``), which is used at once.
    """

    def __init__(self, config: ClientConfig) -> None:
        self._zk = connect(
            config.zk_connect,
            config.zk_session_timeout_s,
            config.zk_connect_timeout_s,
            tls=config.zk_tls,
        )
        self._changed = threading.Condition()
        self._generation = 0
        self._address = ""
        self._is_seed = False
        self._is_new = False
        self._is_closed = False
        self._moved_callbacks: list[weakref.WeakMethod[Callable[[str], None]]] = []
        self._stale = threading.Event()
        self._view = ClusterView(
            self._zk, config.zk_path, self._on_change, config.zk_request_timeout_s
        )
        if not self._view.exists():
            self.close()  # (needs what is set above)
            raise no_parent_error(config)
        with contextlib.suppress(errors.KVError):
            self._read()  # the first look-up, before anyone asks
        threading.Thread(target=self._refresh_loop, name="kv-locator", daemon=True).start()

    def _on_change(self) -> None:
        """From kazoo's threads: never block."""
        self._stale.set()
        self._bump()

    def _bump(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def _refresh_loop(self) -> None:
        while not self._is_closed:
            self._stale.wait()
            self._stale.clear()
            if self._is_closed:
                return
            try:
                self._read()
            except errors.KVError:
                self._stale.set()  # ZooKeeper unreachable: keep the cached primary, try again
                time.sleep(REFRESH_RETRY_S)

    def _read(self) -> None:
        meta, _ = self._view.meta()
        self._is_new = meta.is_kvstore and not meta.is_initialized
        if meta.is_initialized:
            address, is_seed = meta.primary_address, False
        else:  # no primary named (seed nodes, or a new cluster's first one): the seed's rule
            address, is_seed = self._view.lowest_child_address(), True
        previous = self._address
        self._address, self._is_seed = address, is_seed
        if address != previous:
            self._bump()
            if previous:
                self._tell_moved(address)

    def on_primary_moved(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(new_address)`` (a bound method, held weakly) when ZooKeeper names
        another primary: a call still waiting on the old one (paused, cut off) can end now
        instead of at its timeout."""
        self._moved_callbacks.append(weakref.WeakMethod(callback))  # type: ignore[arg-type]

    def _tell_moved(self, address: str) -> None:
        alive = []
        for reference in list(self._moved_callbacks):
            callback = reference()
            if callback is not None:
                alive.append(reference)
                callback(address)
        self._moved_callbacks = alive

    @property
    def generation(self) -> int:
        return self._generation

    def primary_address(self) -> str:
        """The primary's host:port as last known, or "" if none is known yet.

        A parent znode without kvstore metadata is taken for a cluster of the seed's
        nodes: its lowest child is the primary (the seed's rule).
        """
        return self._address

    @property
    def is_seed_cluster(self) -> bool:
        """True while the parent znode names no primary: a cluster of the seed's nodes, or a
        new kvstore cluster whose first node has not taken the primary role yet (then
        ``is_new_cluster`` too, unless an earlier version of kv-createznode made it)."""
        return self._is_seed

    @property
    def is_new_cluster(self) -> bool:
        """True while the parent holds kvstore metadata (kv-createznode's) but names no
        primary yet. The seed's nodes may register under such a parent too: only get and
        put can tell, and they work either way (the seed's rule finds the lowest node)."""
        return self._is_new

    def refresh(self) -> None:
        """Re-read the primary from ZooKeeper, in the background."""
        self._view.refresh()
        self._stale.set()

    def use_hint(self, address: str) -> None:
        """A node said the primary is at ``address``: use it until ZooKeeper says more."""
        if address and address != self._address:
            self._address = address
            self._bump()

    def call_primary(self, conn: Connection, method: str, args: tuple[Any, ...]) -> Any:
        """Call ``method`` over ``conn`` (to the primary as last known). After a refusal or a
        failed connect, re-read the primary in the background; a NotPrimary hint is used at
        once. The error is raised as it came."""
        try:
            return conn.call(method, *args)
        except errors.NotPrimaryError as exc:
            self.refresh()
            self.use_hint(exc.primary_address)
            raise
        except (errors.ConnectError, errors.UnavailableError):
            self.refresh()
            raise

    def wait_for_change(self, generation: int, timeout_s: float) -> None:
        """Wait (at most timeout_s) until ZooKeeper reports a change after ``generation``."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != generation, timeout_s)

    def close(self) -> None:
        self._is_closed = True
        self._stale.set()
        self._zk.stop()
        self._zk.close()


class KVClient:
    """One thread's client. Create one per thread; they may share a PrimaryLocator."""

    def __init__(self, locator: PrimaryLocator, config: ClientConfig) -> None:
        self._locator = locator
        self._config = config
        self._conn: Connection | None = None
        locator.on_primary_moved(self._leave_old_primary)

    def _leave_old_primary(self, address: str) -> None:
        """ZooKeeper names a new primary: end a call still waiting on the old one (its
        outcome becomes unknown) rather than let it run to its timeout."""
        conn = self._conn
        if conn is not None and conn.address != address:
            conn.close()

    def get(self, key: str, retry_s: float = 0.0) -> str:
        result: str = self._call("get", (key,), retry_s)
        return result

    def put(self, key: str, value: str, retry_s: float = 0.0) -> None:
        self._call("put", (key, value), retry_s)

    def _call(self, method: str, args: tuple[Any, ...], retry_s: float) -> Any:
        deadline = time.monotonic() + retry_s
        while True:
            generation = self._locator.generation
            try:
                return self._call_once(method, args)
            except errors.KVError as exc:
                if not exc.is_definite or time.monotonic() >= deadline:
                    raise
                self._locator.wait_for_change(generation, min(0.05, retry_s))

    def _call_once(self, method: str, args: tuple[Any, ...]) -> Any:
        address = self._locator.primary_address()
        if not address:
            raise errors.UnavailableError("no primary registered in ZooKeeper")
        conn = self._conn
        if conn is None or conn.address != address:
            if conn is not None:
                conn.close()
            conn = self._conn = Connection(
                address,
                self._config.rpc_timeout_ms,
                self._config.connect_timeout_ms,
                tls=tls_context(self._config.tls),
            )
        return self._locator.call_primary(conn, method, args)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def no_parent_error(config: ClientConfig) -> errors.CoordinationError:
    """The parent path does not exist: say which command creates it."""
    command = createznode_command(config.zk_connect, config.zk_path)
    return errors.CoordinationError(f"{config.zk_path} does not exist: create it with {command}")
