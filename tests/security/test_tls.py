"""Mutual TLS against real node processes: who gets in, what a client certificate may call,
failover, and that a silent peer stalls nobody. Certificates come from kvstore.local.certs."""

from __future__ import annotations

import datetime
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

import kvstore
from kvstore import errors
from kvstore.config import TlsConfig
from kvstore.local.certs import CertificateFiles, issue, load_ca, tls_args, write_certificates
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.processes import wait_until
from kvstore.local.zkserver import ZooKeeperServer
from kvstore.rpc import NODE_UNIT, Connection, client_tls_context, own_identity
from shared_clusters import SharedCluster, shared_for_a_scope

CLIENT_TIMEOUT_S = 10.0
REFUSAL_TIMEOUT_MS = 2000


def context(tls: TlsConfig) -> ssl.SSLContext:
    return client_tls_context(tls.cert_path, tls.key_path, tls.ca_path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return write_certificates(tmp_path_factory.mktemp("certs"))


def tls_nodes(
    zk_connect: str, zk_path: str, log_dir: Path, certs: CertificateFiles
) -> LocalCluster:
    """A primary and a backup (not started) serving mutual TLS, each with a certificate of its
    own (node-1, node-2: two identities); its loads use the client certificate. The shared
    node certificate: secure_cluster's."""
    nodes = [
        NodeProcess(zk_connect, zk_path, log_dir, extra_args=tls_args(node))
        for node in (certs.node_numbered(1), certs.node_numbered(2))
    ]
    return LocalCluster(zk_connect, zk_path, log_dir, nodes=nodes, client_tls=certs.client)


@pytest.fixture
def tls_cluster(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path, certs: CertificateFiles
) -> Iterator[LocalCluster]:
    """tls_nodes, started: a primary and a synced backup, for this test alone."""
    local = tls_nodes(zk_server.connect_string, zk_path, tmp_path / "nodes", certs)
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def _shared_tls_nodes(
    zk_server: ZooKeeperServer,
    certs: CertificateFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SharedCluster]:
    yield from shared_for_a_scope(
        lambda zk_path: tls_nodes(
            zk_server.connect_string, zk_path, tmp_path_factory.mktemp("tls-nodes"), certs
        )
    )


@pytest.fixture
def shared_tls_cluster(_shared_tls_nodes: SharedCluster) -> LocalCluster:
    """Like tls_cluster, but the module's tests that leave both nodes serving share it (with
    an empty store for each: shared_clusters.py)."""
    return _shared_tls_nodes.hand_out()


def client(cluster: LocalCluster, tls: TlsConfig, timeout: float = CLIENT_TIMEOUT_S) -> Any:
    return kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=timeout, tls=tls)


def primary_address(cluster: LocalCluster) -> str:
    primary = cluster.find("primary")
    assert primary is not None, cluster.logs()
    return primary.address


def kv(cluster: LocalCluster, tls: TlsConfig, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kvstore", "kv", "--zk", cluster.zk_connect]
    command += ["--path", cluster.zk_path, *tls_args(tls), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_kv_certs_writes_pem_files_with_private_keys_0600(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvstore", "certs", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--tls-cert" in done.stdout
    for name in ("ca", "node", "node-1", "node-2", "node-3", "client"):
        assert (tmp_path / "c" / f"{name}.crt").read_text().startswith("-----BEGIN CERTIFICATE")
        mode = stat.S_IMODE(os.stat(tmp_path / "c" / f"{name}.key").st_mode)
        assert mode == 0o600, oct(mode)
    assert not (tmp_path / "c" / "node-4.crt").exists()
    # Each per-node certificate is a node's (OU=node) with a name of its own.
    subjects = {
        x509.load_pem_x509_certificate((tmp_path / "c" / f"{name}.crt").read_bytes()).subject
        for name in ("node", "node-1", "node-2", "node-3")
    }
    assert len(subjects) == 4
    assert all(s.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME) for s in subjects)
    subprocess.run(
        [sys.executable, "-m", "kvstore", "certs", "--nodes", "5", str(tmp_path / "d")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert (tmp_path / "d" / "node-5.crt").exists()
    # An existing CA is kept unless --force: certificates signed by it would stop working.
    # Only the certificates DIR lacks are written, signed by it (a node added to a running
    # cluster needs one; before, kv-certs refused, and --force replaced the CA).
    d = tmp_path / "d"
    before = {path.name: path.read_bytes() for path in d.iterdir()}
    again = [sys.executable, "-m", "kvstore", "certs", str(d)]
    kept = subprocess.run(again, capture_output=True, text=True, timeout=60, check=False)
    assert kept.returncode == 0 and "nothing written" in kept.stdout, kept.stderr
    added = subprocess.run(
        [*again, "--nodes", "6"], capture_output=True, text=True, timeout=60, check=False
    )
    assert added.returncode == 0 and "node-6.crt" in added.stdout, added.stderr
    assert {path.name: path.read_bytes() for path in d.iterdir() if path.name in before} == before
    ca = x509.load_pem_x509_certificate(before["ca.crt"])
    node_6 = x509.load_pem_x509_certificate((d / "node-6.crt").read_bytes())
    node_6.verify_directly_issued_by(ca)
    assert node_6.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    (d / "client.crt").unlink()  # a key without its certificate: not overwritten
    lone = subprocess.run(again, capture_output=True, text=True, timeout=60, check=False)
    assert lone.returncode == 1 and "client" in lone.stderr
    assert (d / "client.key").read_bytes() == before["client.key"]
    subprocess.run([*again, "--force"], capture_output=True, timeout=60, check=True)
    assert (d / "ca.crt").read_bytes() != before["ca.crt"]


def _expired_node_certificate(certs: CertificateFiles) -> TlsConfig:
    """A node certificate from the cluster's CA whose validity ended a month ago."""
    ca_cert, ca_key = load_ca(certs)
    now = datetime.datetime.now(datetime.UTC)
    ended = (now - datetime.timedelta(days=400), now - datetime.timedelta(days=30))
    return issue(certs, "expired", ca_cert, ca_key, unit=NODE_UNIT, valid=ended)


def test_tls_files_that_cannot_work_are_one_line_naming_the_file(
    certs: CertificateFiles, tmp_path: Path
) -> None:
    """An expired certificate, a missing file, a key of another certificate, a file of the
    wrong kind: kv-node (and
    kv) say which file and why when they start, exit 2. Before, an expired certificate
    started a node that retried its join for ever, logging SSL reprs every few seconds, and
    a missing file's line did not name it."""
    node_1, node_2 = certs.node_numbered(1), certs.node_numbered(2)
    cases = {
        "the certificate expired on": _expired_node_certificate(certs),
        f"--tls-cert {tmp_path / 'none.crt'}: No such file": TlsConfig(
            str(tmp_path / "none.crt"), node_1.key_path, node_1.ca_path
        ),
        "is not the key of --tls-cert": TlsConfig(
            node_1.cert_path, node_2.key_path, node_1.ca_path
        ),
        f"--tls-cert {node_1.key_path} is not a PEM certificate": TlsConfig(
            node_1.key_path,
            node_1.key_path,
            node_1.ca_path,  # (a key given as the certificate)
        ),
        f"--tls-key {node_1.cert_path} is not a PEM private key": TlsConfig(
            node_1.cert_path, node_1.cert_path, node_1.ca_path
        ),
    }
    programs = {2: ["node", "127.0.0.1", "1", "127.0.0.1:1", "/x"], 64: ["kv", "status"]}
    for expected, tls in cases.items():
        for status, program in programs.items():  # (bad arguments: kv's is 64)
            command = [sys.executable, "-m", "kvstore", program[0], *tls_args(tls), *program[1:]]
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
            last = done.stderr.strip().splitlines()[-1]
            assert done.returncode == status and expected in last, (program[0], done.stderr)


def test_a_tls_cluster_serves_the_client_and_kv(
    shared_tls_cluster: LocalCluster, certs: CertificateFiles
) -> None:
    with client(shared_tls_cluster, certs.client) as kv_client:
        kv_client.put("k", "v1")
        assert kv_client.get("k") == "v1"
        assert kv_client.cas("k", "v1", "v2")
        assert not kv_client.cas("k", "v1", "v3")
        assert kv_client.get_many(["k", "none"]) == {"k": "v2", "none": None}
        assert kv_client.delete("k")
        assert kv_client.get("k") is None
    assert kv(shared_tls_cluster, certs.client, "put", "greeting", "hello").returncode == 0
    got = kv(shared_tls_cluster, certs.client, "get", "greeting")
    assert (got.returncode, got.stdout) == (0, "hello\n"), got.stderr
    nodes = json.loads(kv(shared_tls_cluster, certs.client, "-o", "json", "status").stdout)
    assert sorted(n["role"] for n in nodes) == ["backup", "primary"]
    assert all(n["is_in_sync"] and n["keys"] == 1 for n in nodes)


def test_plaintext_to_a_tls_port_is_refused(
    shared_tls_cluster: LocalCluster, certs: CertificateFiles
) -> None:
    address = primary_address(shared_tls_cluster)
    with pytest.raises(errors.ForbiddenError, match="accepts TLS connections only"):
        Connection(address, timeout_ms=REFUSAL_TIMEOUT_MS).call("status")
    # The cluster without TLS options at all: kv cannot read it, and says why at once.
    command = [sys.executable, "-m", "kvstore", "kv", "--zk", shared_tls_cluster.zk_connect]
    command += ["--path", shared_tls_cluster.zk_path, "--timeout", "30", "get", "k"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done
    assert "accepts TLS connections only" in done.stderr and "--tls-ca" in done.stderr
    assert time.monotonic() - started < 25  # not retried until its timeout
    command[-2:] = ["status"]
    status = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert status.returncode == 2, status
    assert "failed the TLS check: this node accepts TLS connections only" in status.stdout
    # It does not claim the cluster cannot serve: it serves, just not this client.
    assert "cannot serve" not in status.stdout and "each connection failed" in status.stdout, (
        status.stdout
    )
    with client(shared_tls_cluster, certs.client) as kv_client:
        kv_client.put("still", "serving")


def test_tls_to_a_plaintext_node_names_the_mismatch(
    cluster: LocalCluster, certs: CertificateFiles
) -> None:
    """The plaintext node answers a TLS handshake with an alert that says so: the client
    gives up at once (its timeout is not waited out) and names the mismatch."""
    started = time.monotonic()
    done = kv(cluster, certs.client, "--timeout", "30", "get", "k")
    assert done.returncode == 2, done
    assert "serves plaintext, not TLS: connect without TLS" in done.stderr, done.stderr
    assert time.monotonic() - started < 25  # not retried until its timeout
    status = kv(cluster, certs.client, "--timeout", "30", "status")
    assert status.returncode == 2 and "forbidden" in status.stdout, status
    assert "failed the TLS check" in status.stdout and "serves plaintext" in status.stdout
    logs = cluster.logs()
    assert "a TLS handshake, but this node serves plaintext" in logs


def test_no_client_certificate_is_refused(
    shared_tls_cluster: LocalCluster, certs: CertificateFiles
) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(str(certs.ca_cert))  # trusts the node, shows no certificate
    conn = Connection(
        primary_address(shared_tls_cluster), timeout_ms=REFUSAL_TIMEOUT_MS, tls=anonymous
    )
    with pytest.raises(errors.KVError):  # (the node just closes it: no proof, no hint)
        conn.call("put", "sneaky", "value")
    conn.close()
    with client(shared_tls_cluster, certs.client) as kv_client:
        assert kv_client.get("sneaky") is None


def test_a_certificate_from_another_ca_is_refused(
    shared_tls_cluster: LocalCluster, certs: CertificateFiles, tmp_path: Path
) -> None:
    other = write_certificates(tmp_path / "other", ca_name="another CA")
    # Its own CA on the client side: the node's certificate fails the client's check.
    conn = Connection(
        primary_address(shared_tls_cluster), timeout_ms=REFUSAL_TIMEOUT_MS, tls=context(other.node)
    )
    with pytest.raises(errors.ForbiddenError, match=r"cannot trust .* certificate"):
        conn.call("status")
    # Trusting the cluster's CA, but showing another CA's (node!) certificate: the node refuses.
    forged = TlsConfig(other.node.cert_path, other.node.key_path, str(certs.ca_cert))
    conn = Connection(
        primary_address(shared_tls_cluster), timeout_ms=REFUSAL_TIMEOUT_MS, tls=context(forged)
    )
    with pytest.raises(errors.ForbiddenError, match="refused this side's certificate"):
        conn.call("put", "forged", "value")
    conn.close()
    # Every time: the node lets the client read its alert before it closes (it used to
    # close with the request unread, a reset that lost the alert a third of the time:
    # the client then saw only "closed", and kv-node's join retries alternated reasons).
    for _ in range(30):
        with pytest.raises(errors.ForbiddenError, match="refused this side's certificate"):
            conn.call("put", "forged", "value")
        conn.close()
    # Neither is retried until the timeout: both say so at once.
    for tls in (other.node, forged):
        started = time.monotonic()
        with pytest.raises(errors.ForbiddenError), client(shared_tls_cluster, tls, timeout=30) as c:
            c.get("forged")
        assert time.monotonic() - started < 20
    with client(shared_tls_cluster, certs.client) as kv_client:
        assert kv_client.get("forged") is None


def test_a_client_certificate_may_not_replicate_or_join(
    shared_tls_cluster: LocalCluster, certs: CertificateFiles
) -> None:
    with client(shared_tls_cluster, certs.client) as kv_client:
        kv_client.put("k", "before")
        address = primary_address(shared_tls_cluster)
        epoch = shared_tls_cluster.nodes[0].status().epoch
        conn = Connection(address, timeout_ms=REFUSAL_TIMEOUT_MS, tls=context(certs.client))
        with pytest.raises(errors.ForbiddenError, match="nodes only"):
            conn.call("join", epoch, "node-9999999999", "join-x", 1000)
        with pytest.raises(errors.ForbiddenError):
            conn.call("replicate_batch", epoch, ["k"], ["forged"], "join-x", None)
        with pytest.raises(errors.ForbiddenError):
            conn.call("sync_fetch", epoch, "join-x", 0, 100)
        assert conn.call("status").role == "primary"  # the same connection stays usable
        conn.close()
        # Another certificate with OU=node from the same CA would be a node: the role rule.
        ca_cert, ca_key = load_ca(certs)
        issue(certs, "second-client", ca_cert, ca_key, unit="clients")
        other = Connection(
            address, timeout_ms=REFUSAL_TIMEOUT_MS, tls=context(certs.tls("second-client"))
        )
        with pytest.raises(errors.ForbiddenError):
            other.call("join_done", epoch, "join-x")
        other.close()
        kv_client.put("k", "after")
        assert kv_client.get("k") == "after"
    backup = shared_tls_cluster.find("backup")
    assert backup is not None and backup.status().key_count == 1, shared_tls_cluster.logs()


def identity(tls: TlsConfig) -> str:
    return own_identity(tls.cert_path)


def listed_identities(cluster: LocalCluster) -> dict[str, str]:
    """{identity: role} of the in-sync set, as the metadata lists it."""
    meta = cluster.meta()
    assert set(dict(meta.identities)) == set(meta.in_sync), meta
    return {i: "primary" if n == meta.primary else "backup" for n, i in meta.identities}


def test_failover_under_tls(tls_cluster: LocalCluster, certs: CertificateFiles) -> None:
    """Each node with its own certificate: the metadata lists both identities, and after a
    kill -9 of the primary the backup takes over under its own; the old one rejoins."""
    primary, backup = tls_cluster.nodes
    one, two = identity(certs.node_numbered(1)), identity(certs.node_numbered(2))
    assert listed_identities(tls_cluster) == {one: "primary", two: "backup"}
    with client(tls_cluster, certs.client, timeout=30.0) as kv_client:
        for i in range(50):
            kv_client.put(f"k{i}", f"v{i}")
        primary.kill()
        backup.wait_for_role(["primary"], timeout_s=30)
        assert kv_client.get("k49") == "v49"
        kv_client.put("after", "failover")
        assert kv_client.get_many(["k0", "after"]) == {"k0": "v0", "after": "failover"}
        assert listed_identities(tls_cluster) == {two: "primary"}
        primary.start()  # rejoins as backup, over TLS, with its own certificate
        primary.wait_for_role(["backup"], timeout_s=30)
        kv_client.put("rejoined", "yes")
        assert kv_client.get("rejoined") == "yes"
    assert listed_identities(tls_cluster) == {two: "primary", one: "backup"}


def test_another_node_certificate_may_not_replicate_or_join_as_the_backup(
    shared_tls_cluster: LocalCluster, certs: CertificateFiles
) -> None:
    """node-3 is a node (OU=node, same CA) but neither the primary nor its backup: the
    backup refuses its replicate_batch before looking at the epoch and join id, and the
    primary refuses its join (and the rest of a join) in the listed backup's name, which
    would otherwise strip the in-sync backup. The cluster stays whole and serving."""
    with client(shared_tls_cluster, certs.client) as kv_client:
        kv_client.put("k", "before")
        meta = shared_tls_cluster.meta()
        backup_name = next(n for n in meta.in_sync if n != meta.primary)
        primary, backup = primary_address(shared_tls_cluster), shared_tls_cluster.find("backup")
        assert backup is not None
        third = context(certs.node_numbered(3))

        to_backup = Connection(backup.address, timeout_ms=REFUSAL_TIMEOUT_MS, tls=third)
        batch = (meta.epoch, ["k"], ["forged"], "join-x", None)
        with pytest.raises(errors.ForbiddenError, match="only from the primary it joined"):
            to_backup.call("replicate_batch", *batch)
        assert to_backup.call("status").role == "backup"  # refused, not cut off
        to_backup.close()
        # The shared node certificate is another identity too; the primary's own gets as far
        # as the fence, which refuses the join id it does not know (STALE_EPOCH, not 107).
        shared = Connection(backup.address, timeout_ms=REFUSAL_TIMEOUT_MS, tls=context(certs.node))
        with pytest.raises(errors.ForbiddenError):
            shared.call("replicate_batch", *batch)
        shared.close()
        primarys = context(certs.node_numbered(1))
        as_primary = Connection(backup.address, timeout_ms=REFUSAL_TIMEOUT_MS, tls=primarys)
        with pytest.raises(errors.StaleEpochError):
            as_primary.call("replicate_batch", *batch)
        as_primary.close()

        to_primary = Connection(primary, timeout_ms=REFUSAL_TIMEOUT_MS, tls=third)
        with pytest.raises(errors.ForbiddenError, match="lists it with certificate"):
            to_primary.call("join", meta.epoch, backup_name, "join-x", 1000)
        for method, args in (
            ("join_done", ("join-x",)),
            ("sync_fetch", ("join-x", 0, 100)),
            ("sync_log", ("join-x", 0, 1000)),
            ("backup_renamed", ("join-x", "node-9999999999")),
        ):
            with pytest.raises(errors.ForbiddenError, match="belongs to certificate"):
                to_primary.call(method, meta.epoch, *args)
        to_primary.close()

        assert shared_tls_cluster.meta().in_sync == meta.in_sync  # nobody was stripped
        kv_client.put("k", "after")
        assert kv_client.get("k") == "after"
    assert backup.status().key_count == 1
    assert "dropped backup" not in shared_tls_cluster.logs(200)


def test_a_silent_connection_does_not_stall_others(
    shared_tls_cluster: LocalCluster, certs: CertificateFiles
) -> None:
    primary = shared_tls_cluster.find("primary")
    assert primary is not None
    silent = [socket.create_connection((primary.host, primary.port)) for _ in range(4)]
    try:
        started = time.monotonic()
        conn = Connection(primary.address, timeout_ms=REFUSAL_TIMEOUT_MS, tls=context(certs.client))
        assert conn.call("status").role == "primary"
        conn.call("put", "quick", "answer")
        conn.close()
        assert time.monotonic() - started < 1.5  # the handshake deadline is 10 s
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.parametrize("misfit", ["plaintext", "another CA"])
def test_a_node_that_cannot_join_a_tls_cluster_says_why_once(
    tls_cluster: LocalCluster, certs: CertificateFiles, tmp_path: Path, misfit: str
) -> None:
    """A plaintext node, or one whose certificate another CA signed, stays a standby: it
    logs why it cannot join (it used to log nothing and retry every 50 ms), and only once
    while the reason holds."""
    backup = tls_cluster.find("backup")
    assert backup is not None
    backup.stop()  # the newcomer is the designated backup
    args = [] if misfit == "plaintext" else tls_args(write_certificates(tmp_path / "other").node)
    other = NodeProcess(tls_cluster.zk_connect, tls_cluster.zk_path, tmp_path, extra_args=args)
    tls_cluster.nodes.append(other)
    other.start()
    reason = "accepts TLS connections only" if misfit == "plaintext" else "cannot trust"

    def logged() -> list[str]:
        return [line for line in other.log_tail(200).splitlines() if "cannot join" in line]

    lines = wait_until(lambda: logged() or None, 30, lambda: other.log_tail(100))
    assert reason in lines[0], lines
    watched_until = time.monotonic() + 3.0
    while time.monotonic() < watched_until:  # (bounded) a standby meanwhile, logging no more
        assert other.is_running(), other.log_tail()
        time.sleep(0.2)
    assert len(logged()) == 1, logged()
