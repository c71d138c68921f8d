"""TLS to ZooKeeper against a real ZooKeeper that listens on a TLS port only (secureClientPort,
a client certificate required): sessions without TLS, without a certificate or with another
CA's are refused; a whole cluster (nodes, kv-createznode, kv, the load) runs over it with mutual
TLS and digest credentials, fails over after kill -9 and stays linearizable."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.handlers.threading import KazooTimeoutError
from secure_failover import kill_the_primary_under_load

from kvstore import errors
from kvstore.config import TlsConfig
from kvstore.coordination import connect
from kvstore.local.certs import CertificateFiles, issue, load_ca, tls_args, write_certificates
from kvstore.local.cluster import LocalCluster, secure_cluster
from kvstore.local.zkserver import ZooKeeperServer

REFUSED_WITHIN_S = 2.0
CONNECT_S = 30.0
CLI_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return write_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def zk_tls_server(
    tmp_path_factory: pytest.TempPathFactory, certs: CertificateFiles
) -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper-tls"), tls=certs.zookeeper)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def refused(zk: KazooClient) -> None:
    try:
        with pytest.raises(KazooTimeoutError):
            zk.start(timeout=REFUSED_WITHIN_S)
    finally:
        zk.stop()
        zk.close()


def test_only_tls_sessions_with_a_certificate_from_the_ca_get_in(
    zk_tls_server: ZooKeeperServer, certs: CertificateFiles, tmp_path: Path
) -> None:
    hosts = zk_tls_server.connect_string
    with pytest.raises(errors.CoordinationError, match="cannot reach ZooKeeper") as plain:
        connect(hosts, 10.0, REFUSED_WITHIN_S)  # plaintext
    assert "connection broken" in str(plain.value) and "--zk-tls-ca" in str(plain.value)
    refused(KazooClient(hosts=hosts, use_ssl=True, ca=str(certs.ca_cert)))  # no certificate
    other = write_certificates(tmp_path / "other", ca_name="another CA")
    stranger = TlsConfig(other.node.cert_path, other.node.key_path, str(certs.ca_cert))
    with pytest.raises(errors.CoordinationError):
        connect(hosts, 10.0, REFUSED_WITHIN_S, tls=stranger)
    zk = connect(hosts, 10.0, CONNECT_S, tls=certs.client)
    try:
        assert "zookeeper" in zk.get_children("/")
    finally:
        zk.stop()
        zk.close()


def test_the_zookeeper_host_name_is_checked(certs: CertificateFiles, tmp_path: Path) -> None:
    """A ZooKeeper whose certificate (from the right CA) does not name the address dialled
    is refused: kazoo checks the host name."""
    ca_cert, ca_key = load_ca(certs)
    elsewhere = issue(certs, "zookeeper-elsewhere", ca_cert, ca_key, hosts=("zk.example",))
    with (
        ZooKeeperServer(tmp_path / "zookeeper", tls=elsewhere) as server,
        pytest.raises(errors.CoordinationError),
    ):
        connect(server.connect_string, 10.0, REFUSED_WITHIN_S, tls=certs.node)


def kv(cluster: LocalCluster, certs: CertificateFiles, *args: str) -> str:
    command = [sys.executable, "-m", "kvstore", "kv", "--zk", cluster.zk_connect]
    command += ["--path", cluster.zk_path, *tls_args(certs.client)]
    command += [*tls_args(certs.client, "--zk-tls"), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done
    return done.stdout


def test_a_cluster_runs_over_zookeeper_tls(
    zk_tls_server: ZooKeeperServer,
    zk_path: str,
    certs: CertificateFiles,
    tmp_path: Path,
) -> None:
    cluster, created = secure_cluster(zk_tls_server.connect_string, zk_path, tmp_path, certs)
    assert created == f"{zk_path}: created (secure ACL)"
    try:
        cluster.start()
        assert kv(cluster, certs, "put", "greeting", "hello") == "OK\n"
        assert kv(cluster, certs, "get", "greeting") == "hello\n"
        kill_the_primary_under_load(cluster, tmp_path, seed=3)
        assert "no ZooKeeper credentials" not in cluster.logs(200)
    finally:
        cluster.stop()
