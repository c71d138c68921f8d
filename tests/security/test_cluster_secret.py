"""The shared cluster secret (``kv-node --cluster-secret-file``) against real node processes:
without TLS, only a connection that proved the secret may call the node-only methods; nodes
that share it replicate, fail over and stay linearizable; a wrong secret gets nowhere. The
per-connection role (rpc/secret.py PeerRole) is checked without sockets too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from secure_failover import kill_the_primary_under_load

import kvstore
from kvstore import errors
from kvstore.local.certs import write_cluster_secret
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.processes import free_port, wait_until
from kvstore.rpc import Connection, load_cluster_secret
from kvstore.rpc.secret import (
    NONCE_BYTES,
    ClusterSecret,
    PeerRole,
    authenticate_connection,
    new_nonce,
    prove,
)
from kvstore.server.handler import NODE_ONLY_METHODS

TIMEOUT_MS = 2000
ARG_ERROR_TIMEOUT_S = 60
SECRET = b"0123456789abcdef0123456789abcdef"
NODE_AT = "127.0.0.1:9090"  # the address a node advertises, which callers dial


# ----------------------------------------------------------------- without sockets


def test_a_connection_is_a_node_only_after_a_right_proof_for_a_fresh_nonce() -> None:
    role = PeerRole(is_node_certificate=True, needs_secret=True)
    assert not role.is_node
    client_nonce = new_nonce()
    with pytest.raises(errors.ForbiddenError, match="fresh"):
        role.authenticate(SECRET, client_nonce, b"x" * 32, NODE_AT)  # no challenge yet
    nonce = role.challenge()
    with pytest.raises(errors.ForbiddenError, match="wrong cluster secret"):
        role.authenticate(
            SECRET,
            client_nonce,
            prove(b"another secret!!", b"caller", nonce, client_nonce, NODE_AT),
            NODE_AT,
        )
    assert not role.is_node
    with pytest.raises(errors.ForbiddenError, match="fresh"):  # the nonce is used up
        role.authenticate(
            SECRET, client_nonce, prove(SECRET, b"caller", nonce, client_nonce, NODE_AT), NODE_AT
        )
    nonce = role.challenge()
    # The node's own answer for this nonce is no caller's proof.
    with pytest.raises(errors.ForbiddenError):
        role.authenticate(
            SECRET, client_nonce, prove(SECRET, b"node", nonce, client_nonce, NODE_AT), NODE_AT
        )
    nonce = role.challenge()
    answer = role.authenticate(
        SECRET, client_nonce, prove(SECRET, b"caller", nonce, client_nonce, NODE_AT), NODE_AT
    )
    assert role.is_node
    assert answer == prove(SECRET, b"node", nonce, client_nonce, NODE_AT)
    assert len(nonce) == NONCE_BYTES


def test_the_secret_does_not_make_a_client_certificate_a_node() -> None:
    role = PeerRole(is_node_certificate=False, needs_secret=True)
    nonce, client_nonce = role.challenge(), new_nonce()
    role.authenticate(
        SECRET, client_nonce, prove(SECRET, b"caller", nonce, client_nonce, NODE_AT), NODE_AT
    )
    assert not role.is_node
    assert "certificate is a client's" in role.refusal("join", "node")
    assert PeerRole(is_node_certificate=True, needs_secret=False).is_node  # the seed's mode


def test_a_caller_refuses_a_node_that_does_not_know_the_secret() -> None:
    role = PeerRole(is_node_certificate=True, needs_secret=True)

    def impostor(method: str, *args: bytes) -> bytes:
        return role.challenge() if method == "auth_challenge" else b"\0" * 32

    with pytest.raises(errors.ForbiddenError, match="does not know the cluster secret"):
        authenticate_connection(impostor, SECRET, "127.0.0.1:1")


def test_an_exchange_relayed_through_another_address_proves_nothing() -> None:
    """A process at another address (a dead member's, which a node still dials) passes the
    caller's messages on to a live node and back: the caller's proof names the address it
    dialed, so the live node refuses it, and the live node's answer would not satisfy the
    caller either (found by an attack campaign: with v1 proofs the relay made the attacker's
    connection a node's)."""
    live = PeerRole(is_node_certificate=True, needs_secret=True)
    answers: list[bytes] = []

    def relay(method: str, *args: bytes) -> bytes:
        if method == "auth_challenge":
            return live.challenge()
        answers.append(live.authenticate(SECRET, *args, NODE_AT))
        return answers[-1]

    with pytest.raises(errors.ForbiddenError, match="another address"):
        authenticate_connection(relay, SECRET, "127.0.0.1:9091")  # the relay's address
    assert not live.is_node and not answers
    nonce, client_nonce = live.challenge(), new_nonce()
    proof_for_relay = prove(SECRET, b"caller", nonce, client_nonce, "127.0.0.1:9091")
    with pytest.raises(errors.ForbiddenError):
        live.authenticate(SECRET, client_nonce, proof_for_relay, NODE_AT)
    # The node's answer names its own address: a caller that dialed elsewhere rejects it.
    nonce, client_nonce = live.challenge(), new_nonce()
    answer = live.authenticate(
        SECRET, client_nonce, prove(SECRET, b"caller", nonce, client_nonce, NODE_AT), NODE_AT
    )
    assert answer != prove(SECRET, b"node", nonce, client_nonce, "127.0.0.1:9091")


def test_proofs_of_0_2_count_only_while_upgrading() -> None:
    """0.2's exchange names no address. A node refuses it, unless started with
    --cluster-secret-upgrade (ClusterSecret.for_upgrade), which lets 0.2 and 0.3 nodes authenticate
    each other while a cluster is upgraded one node at a time; this version's proofs work
    either way."""

    def exchange(role: PeerRole, secret: bytes, version: int) -> None:
        def call(method: str, *args: bytes) -> bytes:
            if method == "auth_challenge":
                return role.challenge()
            return role.authenticate(secret, *args, NODE_AT)

        authenticate_connection(call, secret, NODE_AT, version)

    with pytest.raises(errors.ForbiddenError):
        exchange(PeerRole(is_node_certificate=True, needs_secret=True), SECRET, 1)
    upgrading = ClusterSecret.for_upgrade(SECRET)
    for version in (1, 2):
        role = PeerRole(is_node_certificate=True, needs_secret=True)
        exchange(role, upgrading, version)  # (the caller checked the node's answer)
        assert role.is_node
    exchange(PeerRole(is_node_certificate=True, needs_secret=True), SECRET, 2)


def test_the_secret_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    for mode in (0o644, 0o640, 0o604, 0o660):
        os.chmod(path, mode)
        with pytest.raises(ValueError, match="chmod 600"):
            load_cluster_secret(str(path))
    os.chmod(path, 0o600)
    assert load_cluster_secret(str(path)) == SECRET
    path.write_bytes(b"short\n")
    with pytest.raises(ValueError, match="at least 16"):
        load_cluster_secret(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        load_cluster_secret(str(tmp_path / "none"))


def test_kv_node_refuses_a_secret_file_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    os.chmod(path, 0o644)
    command = [sys.executable, "-m", "kvstore", "node", "127.0.0.1", str(free_port())]
    command += ["127.0.0.1:1", "/kvstore", "--cluster-secret-file", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=ARG_ERROR_TIMEOUT_S)
    assert done.returncode == 2, done
    assert f"chmod 600 {path}" in done.stderr and "Traceback" not in done.stderr
    assert SECRET.decode() not in done.stderr + done.stdout


# ----------------------------------------------------------------- real clusters


def test_without_the_secret_node_only_methods_are_forbidden(
    secret_cluster: LocalCluster,
) -> None:
    primary = secret_cluster.wait_for("primary")
    backup = secret_cluster.wait_for("backup")
    epoch = primary.status().epoch
    forged = {
        "replicate": ("k", "forged"),
        "replicate_batch": (epoch, ["k"], ["forged"], "join-x", None),
        "join": (epoch, "node-9999999999", "join-x", 1000),
        "sync_fetch": (epoch, "join-x", 0, 100),
        "sync_log": (epoch, "join-x", 0, 1 << 20),
        "join_done": (epoch, "join-x"),
        "backup_renamed": (epoch, "join-x", "node-9999999999"),
    }
    assert set(forged) == NODE_ONLY_METHODS
    for node in (primary, backup):
        conn = Connection(node.address, timeout_ms=TIMEOUT_MS)
        try:
            for method, args in forged.items():
                with pytest.raises(errors.ForbiddenError, match="cluster secret"):
                    conn.call(method, *args)
            assert conn.call("status").role in ("primary", "backup")  # still usable
        finally:
            conn.close()
    # Clients need no secret: the seed's get/put (a plain connection) and kvstore.Client.
    conn = Connection(primary.address, timeout_ms=TIMEOUT_MS)
    try:
        conn.call("put", "k", "plain")
        assert conn.call("get", "k") == "plain"
    finally:
        conn.close()
    with kvstore.Client(secret_cluster.zk_connect, secret_cluster.zk_path, timeout=10) as kv:
        assert kv.get("k") == "plain"
        assert kv.cas("k", "plain", "client")
    status = backup.status()
    assert status is not None and status.role == "backup" and status.key_count == 1


def test_a_wrong_secret_is_refused(secret_cluster: LocalCluster, secret_file: Path) -> None:
    primary = secret_cluster.wait_for("primary")
    epoch = primary.status().epoch
    wrong = Connection(primary.address, timeout_ms=TIMEOUT_MS, secret=b"not the cluster secret")
    with pytest.raises(errors.ForbiddenError, match="wrong cluster secret"):
        wrong.call("join", epoch, "node-9999999999", "join-x", 1000)
    right = Connection(
        primary.address, timeout_ms=TIMEOUT_MS, secret=load_cluster_secret(str(secret_file))
    )
    try:  # past the secret: the call reaches the handler, which refuses a stranger
        with pytest.raises(errors.UnavailableError, match="is not a designated backup"):
            right.call("join", epoch, "node-9999999999", "join-x", 1000)
    finally:
        right.close()


def join_with_another_secret(secret_cluster: LocalCluster, tmp_path: Path) -> NodeProcess:
    """A node with another cluster secret, started as the designated backup (the backup
    stopped), once it has said it cannot join."""
    secret_cluster.wait_for("backup").stop()
    other = NodeProcess(
        secret_cluster.zk_connect,
        secret_cluster.zk_path,
        tmp_path / "other",
        extra_args=["--cluster-secret-file", str(write_cluster_secret(tmp_path / "other.key"))],
    )
    secret_cluster.nodes.append(other)
    other.start()
    wait_until(
        lambda: "wrong cluster secret" in other.log_tail(100) or None,
        30,
        lambda: other.log_tail(100),
    )
    return other


def test_a_node_with_another_secret_cannot_join(
    secret_cluster: LocalCluster, tmp_path: Path
) -> None:
    other = join_with_another_secret(secret_cluster, tmp_path)
    status = other.status()
    assert status is not None and status.role == "standby", status
    primary = secret_cluster.wait_for("primary")
    assert re.search(
        r"refused authenticate: wrong cluster secret, or a proof made for another address than "
        r"\S+ \(\d+ refusals since the last such line; "
        r"the latest from 127\.0\.0\.1:\d+\)",
        primary.log_tail(100),
    ), primary.log_tail(100)
    with kvstore.Client(secret_cluster.zk_connect, secret_cluster.zk_path, timeout=10) as kv:
        kv.put("still", "serving")  # the primary went on without a backup
        assert kv.get("still") == "serving"


def test_a_cluster_with_the_secret_fails_over_and_stays_linearizable(
    secret_cluster: LocalCluster, tmp_path: Path
) -> None:
    kill_the_primary_under_load(secret_cluster, tmp_path, seed=5)  # rejoins proving the secret


JOIN_WATCH_S = 6.0  # how long the node that cannot join is watched


def test_a_node_that_cannot_join_says_why_once_and_backs_off(
    secret_cluster: LocalCluster, tmp_path: Path
) -> None:
    """Its joins fail for good (another secret): it says why once (again only if the reason
    changes, or after 30 s), and tries again after a pause that grows to 2 s, not every
    control tick (50 ms: about 18 refused joins a second, each logged)."""
    other = join_with_another_secret(secret_cluster, tmp_path)
    primary = secret_cluster.wait_for("primary")
    refused_before = refused_joins(primary)
    watched_until = time.monotonic() + JOIN_WATCH_S
    while time.monotonic() < watched_until:  # (bounded) it stays a standby meanwhile
        status = other.status()
        assert status is not None and status.role == "standby", status
        time.sleep(0.2)
    logged = other.log_path.read_text().splitlines()
    reasons = [line for line in logged if "wrong cluster secret" in line]
    assert len(reasons) == 1, reasons
    assert f"cannot join primary {primary.status().node_id}" in reasons[0], reasons
    # Pauses of 0.05, 0.1 ... 1.6, then 2 s: 8 tries in the first 6 s after the first.
    tried = refused_joins(primary) - refused_before
    assert 2 <= tried <= 8, f"{tried} joins refused in {JOIN_WATCH_S} s"  # (paused, not stuck)


def refused_joins(primary: NodeProcess) -> int:
    """The joins the primary refused for a wrong secret, by its (throttled) log lines."""
    counts = re.findall(
        r"refused authenticate: wrong cluster secret, or a proof made for another address than "
        r"\S+ \((\d+) refusals since",
        primary.log_path.read_text(),
    )
    return sum(int(count) for count in counts)
