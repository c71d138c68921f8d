"""ZooKeeper access control against a real ZooKeeper: with digest credentials the parent and
member znodes are writable only with them (readable by anyone), so an anonymous session can
neither register, delete a member nor change the metadata, and the hijack of the "Security"
issue (a fake child plus a compare-and-set naming it primary) fails while the cluster keeps
serving. Garbage children never count as members. Without credentials nothing changes."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import ACL, OPEN_ACL_UNSAFE, Permissions

import kvstore
from kvstore import errors
from kvstore.cli import createznode
from kvstore.cli.args import add_zk_auth_arguments, zk_auth_from
from kvstore.coordination import (
    ClusterMeta,
    ClusterView,
    Coordinator,
    Member,
    connect,
    create_parent,
    durable_id,
    is_address,
)
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.processes import free_port, wait_until
from kvstore.local.zkserver import ZooKeeperServer

AUTH = "kvstore:s3cret"
NODE_EXIT_TIMEOUT_S = 60.0
SESSION_S = 10.0
# A first connection attempt that reaches a server still starting can hang for a whole
# session timeout before kazoo retries: allow several attempts on a loaded machine.
CONNECT_S = 30.0
SERVE_FOR_S = 1.5  # the hijack took the cluster down "within a second"
SECURE = {("digest", "kvstore"): Permissions.ALL, ("world", "anyone"): Permissions.READ}


def perms(acls: list[ACL]) -> dict[tuple[str, str], int]:
    """Permissions by identity; ZooKeeper hides digest hashes from those without ADMIN."""
    return {(acl.id.scheme, acl.id.id.split(":", 1)[0]): acl.perms for acl in acls}


@pytest.fixture
def anonymous(zk_server: ZooKeeperServer) -> Iterator[KazooClient]:
    """A ZooKeeper session without credentials, as anyone on the network could open."""
    zk = connect(zk_server.connect_string, SESSION_S, CONNECT_S)
    try:
        yield zk
    finally:
        zk.stop()
        zk.close()


def register(zk_server: ZooKeeperServer, path: str, address: str, auth: str | None) -> Coordinator:
    coordinator = Coordinator(
        connect(zk_server.connect_string, SESSION_S, CONNECT_S, auth), path, lambda: None
    )
    coordinator.register(address)
    return coordinator


# ----------------------------------------------------------------- credentials and ACLs


def test_anonymous_session_cannot_change_a_secured_cluster(
    zk_server: ZooKeeperServer, zk_path: str, anonymous: KazooClient
) -> None:
    assert (
        create_parent(zk_server.connect_string, zk_path, timeout_s=CONNECT_S, auth=AUTH)
        == "created (secure ACL)"
    )
    node = register(zk_server, zk_path, "127.0.0.1:9", AUTH)
    try:
        member = f"{zk_path}/{node.name}"
        assert perms(anonymous.get_acls(zk_path)[0]) == SECURE
        assert perms(anonymous.get_acls(member)[0]) == SECURE
        with pytest.raises(NoAuthError):
            anonymous.create(f"{zk_path}/node-", b"127.0.0.1:1", ephemeral=True, sequence=True)
        with pytest.raises(NoAuthError):
            anonymous.set(zk_path, ClusterMeta(7, "node-x", "127.0.0.1:1").to_bytes())
        with pytest.raises(NoAuthError):
            anonymous.delete(member)
        with pytest.raises(NoAuthError):
            anonymous.set_acls(zk_path, OPEN_ACL_UNSAFE)
        # Reading stays open: clients find the primary without credentials.
        assert anonymous.get_children(zk_path) == [node.name]
        assert anonymous.get(member)[0] == b"127.0.0.1:9"
        # The credentials can change the metadata.
        _, version = node.meta()
        assert node.compare_and_set(ClusterMeta(1, node.name, "127.0.0.1:9"), version)
    finally:
        node.close()


def test_registration_without_the_credentials_is_refused_clearly(
    zk_server: ZooKeeperServer, zk_path: str
) -> None:
    create_parent(zk_server.connect_string, zk_path, timeout_s=CONNECT_S, auth=AUTH)
    for auth in (None, "kvstore:wrong"):
        coordinator = Coordinator(
            connect(zk_server.connect_string, SESSION_S, CONNECT_S, auth), zk_path, lambda: None
        )
        try:
            with pytest.raises(errors.CoordinationError, match="not authorized"):
                coordinator.register("127.0.0.1:9")
            assert coordinator.members() == []
        finally:
            coordinator.close()


def test_node_with_wrong_password_exits_with_a_clear_error(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    create_parent(zk_server.connect_string, zk_path, timeout_s=CONNECT_S, auth=AUTH)
    auth_file = tmp_path / "zk-auth"
    auth_file.write_text("kvstore:wrong\n")
    auth_file.chmod(0o600)
    command = [sys.executable, "-m", "kvstore", "node", "127.0.0.1", str(free_port())]
    command += [zk_server.connect_string, zk_path]
    result = subprocess.run(
        [*command, "--zk-auth-file", str(auth_file)],
        capture_output=True,
        text=True,
        timeout=NODE_EXIT_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "not authorized (NoAuth)" in output
    assert "--zk-auth" in output
    assert "Traceback" not in output
    # Without credentials: the parent is secured, so say so (before: a warning that anyone
    # may write the cluster's state, then NoAuth).
    result = subprocess.run(command, capture_output=True, text=True, timeout=NODE_EXIT_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "writable by anyone" not in output and "Traceback" not in output, output
    assert "writable only with the cluster's ZooKeeper credentials" in output, output
    assert "--zk-auth-file" in output


def test_secure_existing_tightens_a_world_writable_parent(
    zk_server: ZooKeeperServer,
    zk_path: str,
    anonymous: KazooClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert createznode.main([zk_server.connect_string, zk_path]) == 0
    listener = socket.create_server(("127.0.0.1", 0))  # (a node that runs: it listens)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    open_node = register(zk_server, zk_path, address, None)
    try:
        anonymous.set(zk_path, b"")  # world-open, as the seed's
        assert createznode.main(["--zk-auth", AUTH, zk_server.connect_string, zk_path]) == 0
        assert "writable by anyone (--secure-existing" in capsys.readouterr().out
        argv = ["--zk-auth", AUTH, "--secure-existing", zk_server.connect_string, zk_path]
        # A node without credentials is registered: securing would lock it out, so refused.
        assert createznode.main(argv) == 1
        refusal = capsys.readouterr().err
        assert f"refusing to secure {zk_path}: 1 registered node(s) answer" in refusal
        assert open_node.name in refusal and "Stop every node" in refusal
        assert perms(anonymous.get_acls(zk_path)[0]) != SECURE
        listener.close()  # stopped (killed: its znode lingers until its session expires)
        assert createznode.main(argv) == 0, capsys.readouterr().err
    finally:
        listener.close()
        open_node.close()
    assert createznode.main(argv) == 0  # (its ephemeral znode went with its session)
    assert "secured" in capsys.readouterr().out
    assert perms(anonymous.get_acls(zk_path)[0]) == SECURE
    with pytest.raises(NoAuthError):
        anonymous.set(zk_path, b"")
    with pytest.raises(NoAuthError):
        anonymous.create(f"{zk_path}/node-x", b"127.0.0.1:1")
    # Changing the secured parent without the credentials: refused, and said as a change
    # (it used to say "creating", of a parent that exists).
    assert createznode.main(["--replicas", "3", zk_server.connect_string, zk_path]) == 1
    refusal = capsys.readouterr().err
    assert f"changing the existing {zk_path} refused: not authorized" in refusal, refusal


def test_secure_existing_needs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KV_ZK_AUTH", raising=False)
    with pytest.raises(SystemExit) as exited:
        createznode.main(["--secure-existing", "127.0.0.1:1", "/kvstore"])
    assert exited.value.code == 2


def test_credentials_come_from_option_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = argparse.ArgumentParser()
    add_zk_auth_arguments(parser)
    monkeypatch.delenv("KV_ZK_AUTH", raising=False)
    assert zk_auth_from(parser, parser.parse_args([])) is None
    assert zk_auth_from(parser, parser.parse_args(["--zk-auth", "u:p:q"])) == "u:p:q"
    (tmp_path / "auth").write_text("file:pw\n")
    (tmp_path / "auth").chmod(0o640)  # a password others may read: refused, as ssh would
    with pytest.raises(SystemExit):
        zk_auth_from(parser, parser.parse_args(["--zk-auth-file", str(tmp_path / "auth")]))
    (tmp_path / "auth").chmod(0o600)
    assert zk_auth_from(parser, parser.parse_args(["--zk-auth-file", str(tmp_path / "auth")]))
    monkeypatch.setenv("KV_ZK_AUTH", "env:pw")
    assert zk_auth_from(parser, parser.parse_args([])) == "env:pw"
    assert zk_auth_from(parser, parser.parse_args(["--zk-auth", "u:p"])) == "u:p"
    for bad in (["--zk-auth", "nopassword"], ["--zk-auth", ":pw"], ["--zk-auth-file", "/none"]):
        with pytest.raises(SystemExit):
            zk_auth_from(parser, parser.parse_args(bad))


# ----------------------------------------------------------------- garbage members


def test_garbage_children_are_never_members(
    zk_server: ZooKeeperServer,
    zk_path: str,
    anonymous: KazooClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without credentials anyone may add children: none that is not an ephemeral
    node-<...><10 digits> with host:port data may sort lowest (the seed's rule included) or
    count as a member."""
    create_parent(zk_server.connect_string, zk_path, timeout_s=CONNECT_S)
    bad_data = anonymous.create(
        f"{zk_path}/node-", b"not an address", ephemeral=True, sequence=True
    )
    for name in ("node-x", "node-", "node-12345", "aaa", "node-x-000000001"):
        anonymous.create(f"{zk_path}/{name}", b"127.0.0.1:1", ephemeral=True)
    persistent = anonymous.create(f"{zk_path}/node-", b"127.0.0.1:1", sequence=True)
    good = anonymous.create(f"{zk_path}/node-", b"127.0.0.1:9999", ephemeral=True, sequence=True)
    view = ClusterView(anonymous, zk_path, lambda: None)
    with caplog.at_level(logging.WARNING, logger="kvstore.coordination"):
        assert view.members() == [Member(good.rsplit("/", 1)[-1], "127.0.0.1:9999")]
        assert view.lowest_child_address() == "127.0.0.1:9999"
        view.refresh()
        view.members()
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(ignored) == 2, ignored  # each logged once
    assert any(bad_data in m and "is not host:port" in m for m in ignored), ignored
    assert any(persistent in m and "not ephemeral" in m for m in ignored), ignored
    assert Member("node-x", "127.0.0.1:1").sequence == -1
    assert durable_id("node-x") is None


def test_member_data_must_be_host_and_port() -> None:
    for good in ("127.0.0.1:9090", "localhost:1", "::1:65535", "db-1.example:80"):
        assert is_address(good), good
    for bad in ("", "127.0.0.1", ":9090", "h:0", "h:65536", "h:p", "h :1", "h:1\n", "x" * 5):
        assert not is_address(bad), bad


# ----------------------------------------------------------------- real clusters


def test_hijack_fails_and_the_secured_cluster_keeps_serving(
    zk_server: ZooKeeperServer,
    zk_path: str,
    anonymous: KazooClient,
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(
        zk_server.connect_string, zk_path, tmp_path, size=2, node_args=["--zk-auth", AUTH]
    )
    try:
        cluster.start()  # kv-createznode with the nodes' credentials: the secure ACL
        assert perms(anonymous.get_acls(zk_path)[0]) == SECURE
        primary = cluster.wait_for("primary").status()
        with kvstore.Client(zk_server.connect_string, zk_path, timeout=10) as kv:
            kv.put("before", "1")
            # The hijack: a child node-x, then a CAS naming it primary (epoch + 1).
            with pytest.raises(NoAuthError):
                anonymous.create(f"{zk_path}/node-x", b"127.0.0.1:1", ephemeral=True)
            data, stat = anonymous.get(zk_path)
            meta = ClusterMeta.from_bytes(data)
            forged = ClusterMeta(meta.epoch + 1, "node-x", "127.0.0.1:1", ("node-x",))
            with pytest.raises(NoAuthError):
                anonymous.set(zk_path, forged.to_bytes(), version=stat.version)
            keep_serving(kv, SERVE_FOR_S)
        after = cluster.wait_for("primary").status()
        assert (after.node_id, after.epoch) == (primary.node_id, primary.epoch)
        cluster.wait_for("backup")
        logs = cluster.logs(200)
        assert "deposed" not in logs and "restarting" not in logs, logs
        assert "writable by anyone" not in logs, logs
        assert AUTH.split(":")[1] not in logs  # the password is masked in the logs
    finally:
        cluster.stop()


def test_children_made_with_the_credentials_but_not_by_nodes_are_ignored(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """A persistent node-<sequence> child made with the credentials (by hand, or by a
    script) sorts lowest, and a garbage-named one sits beside it: neither becomes primary
    nor designated backup; the two real nodes form the cluster."""
    create_parent(zk_server.connect_string, zk_path, timeout_s=CONNECT_S, auth=AUTH)
    authed = connect(zk_server.connect_string, SESSION_S, CONNECT_S, AUTH)
    cluster = LocalCluster(
        zk_server.connect_string, zk_path, tmp_path, size=2, node_args=["--zk-auth", AUTH]
    )
    try:
        stray = authed.create(f"{zk_path}/node-", b"127.0.0.1:1", sequence=True)
        authed.create(f"{zk_path}/node-x", b"127.0.0.1:2", ephemeral=True)
        cluster.start()
        primary = cluster.wait_for("primary").status()
        backup = cluster.wait_for("backup").status()
        meta = ClusterMeta.from_bytes(authed.get(zk_path)[0])
        assert meta.primary == primary.node_id
        assert set(meta.in_sync) == {primary.node_id, backup.node_id}
        assert Member(stray.rsplit("/", 1)[-1], "").sequence < Member(primary.node_id, "").sequence
        with kvstore.Client(zk_server.connect_string, zk_path, timeout=10) as kv:
            kv.put("k", "v")
            assert kv.get("k") == "v"
        assert "not ephemeral" in cluster.logs(200)
    finally:
        cluster.stop()
        authed.stop()
        authed.close()


def keep_serving(kv: kvstore.Client, seconds: float) -> None:
    """Write and read back for ``seconds``: every operation must succeed."""
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        kv.put(f"k{count % 10}", str(count))
        assert kv.get(f"k{count % 10}") == str(count)
        count += 1
    assert kv.get("before") == "1"


def test_create_parent_makes_what_kv_createznode_makes_with_the_same_credentials(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """kv-node --create-parent --zk-auth creates the parent and its missing ancestors just
    as kv-createznode --zk-auth does: the same ACL (secure) and data on each."""
    zk = zk_server.connect_string
    made_by = {"createznode": f"{zk_path}/a/kvstore", "node": f"{zk_path}/b/kvstore"}
    assert createznode.main(["--zk-auth", AUTH, zk, made_by["createznode"]]) == 0
    node = NodeProcess(
        zk, made_by["node"], tmp_path, extra_args=["--create-parent", "--zk-auth", AUTH]
    )
    authed = connect(zk, SESSION_S, CONNECT_S, AUTH)  # (ADMIN: sees the digests whole)
    try:
        node.start()
        node.wait_for_role(["primary"])
        for level in (1, 0):  # the ancestor, then the parent
            made = {
                by: authed.get_acls(path.rsplit("/", level)[0])[0] for by, path in made_by.items()
            }
            assert made["node"] == made["createznode"], level
            assert perms(made["node"]) == SECURE
        assert authed.get(f"{zk_path}/b")[0] == authed.get(f"{zk_path}/a")[0] == b""
    finally:
        node.stop()
        authed.stop()
        authed.close()


def test_nodes_warn_when_anyone_can_write(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node without credentials on a world-open parent (the seed's mode) serves and says
    the cluster is writable by anyone."""
    create_parent(zk_server.connect_string, zk_path, timeout_s=CONNECT_S)  # world-open
    plain = NodeProcess(zk_server.connect_string, zk_path, tmp_path)
    try:
        monkeypatch.delenv("KV_ZK_AUTH", raising=False)
        plain.start()
        plain.wait_for_role(["primary"])
        wait_for_log(plain, "no ZooKeeper credentials")
    finally:
        plain.stop()


def test_a_node_with_credentials_refuses_a_world_writable_parent(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With credentials (here from $KV_ZK_AUTH) a world-writable parent voids them: the
    node exits 1 with one line naming the fix, registers nothing; once the parent is
    secured it starts."""
    create_parent(zk_server.connect_string, zk_path, timeout_s=CONNECT_S)  # world-open
    monkeypatch.setenv("KV_ZK_AUTH", AUTH)
    command = [sys.executable, "-m", "kvstore", "node", "127.0.0.1", str(free_port())]
    command += [zk_server.connect_string, zk_path]
    result = subprocess.run(command, capture_output=True, text=True, timeout=NODE_EXIT_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    errors_logged = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors_logged) == 1, output
    assert "writable by anyone (ACL: world:anyone=ALL)" in errors_logged[0]
    fix = f"--secure-existing {zk_server.connect_string} {zk_path}"
    assert fix in errors_logged[0]
    assert "Traceback" not in output and AUTH not in output
    # Given a file, the command it prints names that file (not --zk-auth USER:PASSWORD).
    auth_file = tmp_path / "zk-auth"
    auth_file.write_text(AUTH)
    auth_file.chmod(0o600)
    without_env = {k: v for k, v in os.environ.items() if k != "KV_ZK_AUTH"}
    result = subprocess.run(
        [*command, "--zk-auth-file", str(auth_file)],
        capture_output=True, text=True, timeout=NODE_EXIT_TIMEOUT_S, env=without_env,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"--zk-auth-file {auth_file} {fix}" in result.stdout + result.stderr
    view = connect(zk_server.connect_string, SESSION_S, CONNECT_S)
    try:
        assert view.get_children(zk_path) == []  # it registered nothing
    finally:
        view.stop()
        view.close()
    argv = ["--zk-auth", AUTH, "--secure-existing", zk_server.connect_string, zk_path]
    assert createznode.main(argv) == 0
    secured = NodeProcess(zk_server.connect_string, zk_path, tmp_path)
    try:
        secured.start()
        secured.wait_for_role(["primary"])
        assert "writable by anyone" not in secured.log_tail(200)
        assert "no ZooKeeper credentials" not in secured.log_tail(200)
    finally:
        secured.stop()


def wait_for_log(node: NodeProcess, text: str, timeout_s: float = 10.0) -> None:
    wait_until(lambda: text in node.log_tail(200) or None, timeout_s, node.log_tail)


def test_data_lost_names_a_reset_that_works_on_a_secured_parent(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """The DATA LOST line's kv-createznode --reset carries the credentials option (a
    secured parent refuses a reset without them), never the password itself."""
    zk = zk_server.connect_string
    assert createznode.main(["--zk-auth", AUTH, zk, zk_path]) == 0
    # (a short session: the newcomer decides once the dead node's znode is gone)
    only, newcomer = (
        NodeProcess(zk, zk_path, tmp_path, extra_args=["--zk-auth", AUTH, *session])
        for session in (["--session-timeout", "2"], [])
    )
    try:
        only.start()
        only.wait_for_role(["primary"])
        with kvstore.Client(zk, zk_path, timeout=20) as kv:
            kv.put("precious", "data")
        only.kill()  # the only copy is gone before anyone synced it
        newcomer.start()
        assert newcomer.process is not None
        assert newcomer.process.wait(timeout=60) == 3
        lost = newcomer.log_tail(50)
        reset = f"kv-createznode --reset --zk-auth USER:PASSWORD {zk} {zk_path}"
        assert reset in lost and AUTH not in lost, lost
    finally:
        only.stop()
        newcomer.stop()
