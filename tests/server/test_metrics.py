"""kv-node --metrics-port: Prometheus text a real scraper parses, counters that grow, /healthz."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kvstore
from kvstore.coordination import create_parent
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.processes import free_port
from kvstore.local.zkserver import ZooKeeperServer

TIMEOUT_S = 10


@pytest.fixture
def metered_cluster(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalCluster, dict[str, int]]]:
    cluster = LocalCluster(zk_server.connect_string, zk_path, tmp_path_factory.mktemp("nodes"))
    ports = {}
    for node in cluster.nodes:
        ports[node.address] = free_port()
        node.extra_args += ["--metrics-port", str(ports[node.address])]
    try:
        cluster.start()
        yield cluster, ports
    finally:
        cluster.stop()


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT_S) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_scrape_under_load_parses_and_counts(
    metered_cluster: tuple[LocalCluster, dict[str, int]],
) -> None:
    cluster, ports = metered_cluster
    port = ports[cluster.wait_for("primary").address]
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        for i in range(50):
            kv.put(f"k{i}", "v")
        first = samples(scrape(port)[1])
        for i in range(50):
            kv.get(f"k{i}")
            kv.put(f"k{i}", "w")
        second = samples(scrape(port)[1])

    put_ok = ("kvstore_requests_total", (("method", "put_once"), ("result", "ok")))
    assert first[put_ok] >= 50
    assert second[put_ok] >= first[put_ok] + 50
    lookups = ("kvstore_requests_total", (("method", "lookup"), ("result", "ok")))
    assert second[lookups] >= 50
    assert second[("kvstore_role", (("role", "primary"),))] == 1.0
    assert second[("kvstore_role", (("role", "backup"),))] == 0.0
    assert second[("kvstore_epoch", ())] >= 1
    assert second[("kvstore_in_sync_nodes", ())] == 2
    assert second[("kvstore_keys", ())] == 50
    replicated = ("kvstore_replication_duration_seconds_count", ())
    assert second[replicated] > first[replicated]


def test_healthz_names_the_role(metered_cluster: tuple[LocalCluster, dict[str, int]]) -> None:
    cluster, ports = metered_cluster
    primary, backup = cluster.wait_for("primary"), cluster.wait_for("backup")
    assert scrape(ports[primary.address], "/healthz") == (200, "primary\n")
    assert scrape(ports[backup.address], "/healthz") == (200, "backup\n")
    assert scrape(ports[primary.address], "/nothing")[0] == 404


def test_metrics_bind_the_metrics_host_when_given(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """--metrics-host puts the unauthenticated metrics port on another address than the
    service's (SECURITY.md): here 127.0.0.2, and nothing on the node's 127.0.0.1."""
    port = free_port("127.0.0.2")
    create_parent(zk_server.connect_string, zk_path)
    node = NodeProcess(
        zk_server.connect_string,
        zk_path,
        tmp_path,
        extra_args=["--metrics-port", str(port), "--metrics-host", "127.0.0.2"],
    )
    try:
        node.start()
        node.wait_for_role(["primary"])
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/healthz", timeout=TIMEOUT_S) as r:
            assert (r.status, r.read()) == (200, b"primary\n")
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT_S)
        assert isinstance(refused.value.reason, ConnectionRefusedError), refused.value
    finally:
        node.stop()
