"""How one process's load threads talk to the cluster: the ``--client`` dimension.

- ``per-thread``: one :class:`~kvstore.client.locator.KVClient` per thread, sharing a
  PrimaryLocator, calling the seed's ``get`` / ``put``. Nothing is retried: a failure is
  reported to the worker, which pauses until ZooKeeper reports a change (at most 20 ms).
- ``shared``: one :class:`kvstore.Client` shared by all threads (per-thread connections
  inside), ``get`` and ``put``: reads retried, puts exactly-once (``put_once``: client id
  and sequence number, outcome recorded on the primary and the backup).
- ``shared-noeo``: the same shared Client, but puts go out as the seed's plain ``put``,
  without exactly-once bookkeeping (see :class:`PutsWithoutExactlyOnce`): shared against
  shared-noeo is what exactly-once costs, client and server side together.

The shared Client retries each call until :data:`SHARED_CALL_TIMEOUT_S`; an operation in
progress at the deadline may take that long (plus one last attempt) to end, and
:attr:`ThreadClients.finishing_s` tells the load runner so: every run stays bounded.
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

from kvstore import errors
from kvstore.client.client import RETRY_PAUSE_S, Client
from kvstore.client.locator import KVClient, PrimaryLocator
from kvstore.config import ClientConfig

CLIENT_KINDS = ("per-thread", "shared", "shared-noeo")
# The shared Client's timeout per call, retries included: enough to ride out a failover
# (tens of milliseconds after a kill -9), short enough to end a run soon after its deadline.
SHARED_CALL_TIMEOUT_S = 5.0


class LoadClient(Protocol):
    """What a load thread calls. ``get`` returns None for a missing key (the shared Client)."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str) -> None: ...


class Pacer(Protocol):
    """What a load thread waits on after a failed operation (a PrimaryLocator, typically)."""

    @property
    def generation(self) -> int: ...

    def wait_for_change(self, generation: int, timeout_s: float) -> None: ...


class ThreadClients(Protocol):
    """One process's clients: ``per_thread[i]`` serves thread i (the same object for all
    threads when shared)."""

    per_thread: list[LoadClient]
    pacer: Pacer
    finishing_s: float  # how long an operation in progress at the deadline may still take

    def abort(self) -> None:
        """Make operations still in progress past ``finishing_s`` end soon."""

    def close(self) -> None: ...


def open_clients(kind: str, threads: int, config: ClientConfig) -> ThreadClients:
    """The clients of ``kind`` (one of :data:`CLIENT_KINDS`) for ``threads`` threads, with
    the primary already looked up."""
    if kind == "per-thread":
        return PerThreadClients(threads, config)
    if kind in ("shared", "shared-noeo"):
        return SharedClient(threads, config, is_exactly_once=kind == "shared")
    raise ValueError(f"unknown client kind {kind!r} (expected one of {CLIENT_KINDS})")


class PerThreadClients:
    """``per-thread``: a KVClient per thread and one PrimaryLocator (today's kv-client)."""

    def __init__(self, threads: int, config: ClientConfig) -> None:
        self._locator = PrimaryLocator(config)
        self.pacer: Pacer = self._locator
        self._clients = [KVClient(self._locator, config) for _ in range(threads)]
        self.per_thread: list[LoadClient] = list(self._clients)
        # Closing a thread's connection ends its call at once (as an unknown outcome).
        self.finishing_s = (config.rpc_timeout_ms + config.connect_timeout_ms) / 1000
        with contextlib.suppress(errors.KVError):
            self._locator.primary_address()  # look the primary up now, not on the clock

    def abort(self) -> None:
        for client in self._clients:
            client.close()

    def close(self) -> None:
        self.abort()
        self._locator.close()


class SharedClient:
    """``shared`` / ``shared-noeo``: one kvstore.Client for every thread of the process."""

    def __init__(self, threads: int, config: ClientConfig, is_exactly_once: bool) -> None:
        self._client = client_for(config, SHARED_CALL_TIMEOUT_S)
        client: LoadClient = (
            self._client if is_exactly_once else PutsWithoutExactlyOnce(self._client)
        )
        self.per_thread = [client] * threads
        # The Client already waited for the cluster to change while it retried.
        self.pacer: Pacer = FixedPause()
        last_attempt_s = (config.rpc_timeout_ms + config.connect_timeout_ms) / 1000
        self.finishing_s = SHARED_CALL_TIMEOUT_S + RETRY_PAUSE_S + last_attempt_s
        with contextlib.suppress(errors.KVError):
            # Not logged: a read changes nothing. Looks the primary up now, not on the clock.
            self._client.get("key-0")

    def abort(self) -> None:
        """Nothing to do: the Client reconnects under a closed connection and retries until
        its timeout, which ``finishing_s`` already covers."""

    def close(self) -> None:
        self._client.close()


def client_for(config: ClientConfig, timeout_s: float) -> Client:
    """The library's Client for the cluster ``config`` names, with its timeouts and TLS."""
    return Client(
        config.zk_connect,
        config.zk_path,
        timeout=timeout_s,
        rpc_timeout_ms=config.rpc_timeout_ms,
        connect_timeout_ms=config.connect_timeout_ms,
        tls=config.tls,
        zk_tls=config.zk_tls,
    )


class PutsWithoutExactlyOnce:
    """The shared Client with puts sent as the seed's plain ``put`` (no client id, sequence
    number or recorded outcome), which is exactly what ``Client.put`` does on a cluster of
    the seed's nodes: ``_call`` retries only errors that prove the put was not applied and
    reports an indefinite one at once. Reads are the Client's own ``get``.

    Measures the shared Client without exactly-once, to put a figure on what it costs. It
    uses the Client's internal ``_call``, as ``Client.put`` itself does.
    """

    def __init__(self, client: Client) -> None:
        self.get = client.get
        self._call = client._call

    def put(self, key: str, value: str) -> None:
        self._call("put", (key, value), is_idempotent=False)


class FixedPause:
    """A Pacer that just waits: generation never changes, wait_for_change sleeps."""

    generation = 0

    def wait_for_change(self, generation: int, timeout_s: float) -> None:
        time.sleep(timeout_s)
