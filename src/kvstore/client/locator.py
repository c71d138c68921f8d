"""KVClient: finds the primary through ZooKeeper watches and talks to it.

Errors keep their meaning from :mod:`kvstore.errors`: a *definite* error
(``err.is_definite``) means the operation was certainly not applied; an
indefinite one means it may have been. The client retries only definite errors
(and only when asked to, with ``retry_s``); an indefinite put is reported to the
caller, never silently sent again.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kvstore import errors
from kvstore.config import ClientConfig
from kvstore.coordination import ClusterView, connect
from kvstore.rpc import Connection


class PrimaryLocator:
    """Shared by all threads of a client: the primary's address, kept fresh by watches."""

    def __init__(self, config: ClientConfig) -> None:
        self._zk = connect(
            config.zk_connect, config.zk_session_timeout_s, config.zk_connect_timeout_s
        )
        self._changed = threading.Condition()
        self._generation = 0
        self._view = ClusterView(
            self._zk, config.zk_path, self._on_change, config.zk_request_timeout_s
        )
        if not self._view.exists():
            self.close()
            raise errors.CoordinationError(
                f"{config.zk_path} does not exist: create it with "
                f"kv-createznode {config.zk_connect} {config.zk_path}"
            )

    def _on_change(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    @property
    def generation(self) -> int:
        return self._generation

    def primary_address(self) -> str:
        """The primary's host:port, or "" if there is none right now.

        A parent znode without kvstore metadata is taken for a cluster of the seed's
        nodes: its lowest child is the primary (the seed's rule).
        """
        meta, _ = self._view.meta()
        if meta.is_initialized:
            return meta.primary_address
        return self._view.lowest_child_address()

    @property
    def is_seed_cluster(self) -> bool:
        """True while the parent znode carries no kvstore metadata (seed nodes, or a new
        cluster whose first node has not taken the primary role yet)."""
        return not self._view.meta()[0].is_initialized

    def refresh(self) -> None:
        self._view.refresh()

    def wait_for_change(self, generation: int, timeout_s: float) -> None:
        """Wait (at most timeout_s) until ZooKeeper reports a change after ``generation``."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != generation, timeout_s)

    def close(self) -> None:
        self._zk.stop()
        self._zk.close()


class KVClient:
    """One thread's client. Create one per thread; they may share a PrimaryLocator."""

    def __init__(self, locator: PrimaryLocator, config: ClientConfig) -> None:
        self._locator = locator
        self._config = config
        self._conn: Connection | None = None

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
                address, self._config.rpc_timeout_ms, self._config.connect_timeout_ms
            )
        try:
            return conn.call(method, *args)
        except (errors.NotPrimaryError, errors.ConnectError, errors.UnavailableError):
            self._locator.refresh()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
