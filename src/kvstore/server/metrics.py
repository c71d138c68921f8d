"""What a node tells Prometheus (``kv-node --metrics-port P``): ``/metrics`` and ``/healthz``.

Counters and histograms are updated where things happen (one call each, off locks where
possible; those per request, per replicated batch and per fsync only when a metrics port is
configured, as they cost microseconds on the hot path); the node's state (role, epoch,
in-sync set, keys, connections) is read at scrape time by a collector, so it costs the
request path nothing. Every node has its own
registry: tests may run several nodes in one process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

ROLES = ("starting", "standby", "syncing", "backup", "primary", "stopped")
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class NodeState:
    """A node's state at scrape time."""

    role: str
    epoch: int
    in_sync_size: int
    keys: int
    connections: int


class NodeMetrics:
    """One node's metrics and its registry."""

    def __init__(self, state: Callable[[], NodeState]) -> None:
        self.state = state
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "kvstore_requests", "Requests handled, by method and result", ["method", "result"],
            registry=registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "kvstore_request_duration_seconds", "Time to handle a request, by method", ["method"],
            buckets=LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.replication_seconds = Histogram(
            "kvstore_replication_duration_seconds",
            "Primary to backup round trip of one replicated batch (heartbeats included)",
            buckets=LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.replication_entries = Counter(
            "kvstore_replicated_entries", "Entries sent to the backup", registry=registry
        )
        self.failovers = Counter(
            "kvstore_failovers", "Times this node became primary", ["reason"], registry=registry
        )
        self.transfer_keys = Counter(
            "kvstore_state_transfer_keys", "Keys copied from a primary while joining",
            registry=registry,
        )  # fmt: skip
        self.catch_up_records = Counter(
            "kvstore_catch_up_records", "Log records replayed from a primary while joining",
            registry=registry,
        )  # fmt: skip
        self.transfer_seconds = Histogram(
            "kvstore_state_transfer_duration_seconds", "Time to join a primary (copy included)",
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry,
        )  # fmt: skip
        self.fsync_seconds = Histogram(
            "kvstore_wal_fsync_duration_seconds", "Time of one write-ahead log fsync",
            buckets=LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip
        registry.register(_StateCollector(state))

    def observe_request(self, method: str, result: str, seconds: float) -> None:
        self.requests.labels(method, result).inc()
        self.request_seconds.labels(method).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self, state: Callable[[], NodeState]) -> None:
        self._state = state

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._state()
        role = GaugeMetricFamily("kvstore_role", "1 for the role this node has", labels=["role"])
        for name in ROLES:
            role.add_metric([name], 1.0 if state.role == name else 0.0)
        yield role
        yield GaugeMetricFamily("kvstore_epoch", "Primary epoch served under", value=state.epoch)
        yield GaugeMetricFamily(
            "kvstore_in_sync_nodes", "Nodes in the in-sync set", value=state.in_sync_size
        )
        yield GaugeMetricFamily("kvstore_keys", "Keys in this node's store", value=state.keys)
        yield GaugeMetricFamily(
            "kvstore_open_connections", "Client and peer connections open", value=state.connections
        )


class MetricsServer:
    """``/metrics`` (Prometheus text) and ``/healthz`` (200 while the node serves its role,
    503 while it starts or stops) on a small threaded HTTP server."""

    def __init__(self, host: str, port: int, metrics: NodeMetrics) -> None:
        handler = _handler_class(metrics)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]

    def start(self) -> None:
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_class(metrics: NodeMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                role = metrics.state().role
                is_healthy = role in ("standby", "syncing", "backup", "primary")
                self._reply(200 if is_healthy else 503, f"{role}\n".encode(), "text/plain")
            else:
                self._reply(404, b"not found: try /metrics or /healthz\n", "text/plain")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics: " + format, *args)

    return Handler


def instrument(handler: Any, methods: list[str], metrics: NodeMetrics) -> None:
    """Replace each of ``handler``'s ``methods`` by one that counts and times its calls
    (result "ok" or the error's class). Only with a metrics port: it costs a few µs a call."""
    for name in methods:
        setattr(handler, name, _timed(name, getattr(handler, name), metrics))
    if isinstance(getattr(handler, "grouped_methods", None), frozenset):
        handler.prepare = _counted_refusals(handler.prepare, metrics)
        handler.end_group = _timed_group(handler.end_group, metrics)


def _timed(name: str, method: Callable[..., Any], metrics: NodeMetrics) -> Callable[..., Any]:
    ok = metrics.requests.labels(name, "ok")
    duration = metrics.request_seconds.labels(name)
    clock = time.perf_counter

    def timed(*args: Any) -> Any:
        began = clock()
        try:
            result = method(*args)
        except Exception as exc:
            metrics.requests.labels(name, type(exc).__name__).inc()
            duration.observe(clock() - began)
            raise
        ok.inc()
        duration.observe(clock() - began)
        return result

    return timed


def _counted_refusals(prepare: Callable[..., Any], metrics: NodeMetrics) -> Callable[..., Any]:
    """The event front's check of a write: a refusal is a request that ended there."""

    def counted(method: str, args: Any) -> Any:
        try:
            return prepare(method, args)
        except Exception as exc:
            metrics.requests.labels(method, type(exc).__name__).inc()
            metrics.request_seconds.labels(method).observe(0.0)
            raise

    return counted


def _timed_group(end_group: Callable[..., Any], metrics: NodeMetrics) -> Callable[..., Any]:
    """The event front's group of writes: each write counts as a request that took as long
    as its group (from ``begin_group``)."""
    clock = time.perf_counter

    def timed(pending: Any) -> list[Any]:
        results: list[Any] = end_group(pending)
        seconds = clock() - pending.began
        for method, result in zip(pending.methods, results, strict=True):
            outcome = type(result).__name__ if isinstance(result, Exception) else "ok"
            metrics.requests.labels(method, outcome).inc()
            metrics.request_seconds.labels(method).observe(seconds)
        return results

    return timed
