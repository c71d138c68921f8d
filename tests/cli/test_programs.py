"""Every program's surface: help without internal names, one-line failures, exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvstore
from kvstore.cli import COMMANDS
from kvstore.cli import node as kv_node
from kvstore.config import NodeConfig
from kvstore.coordination import ClusterMeta, connect, create_parent
from kvstore.local.cluster import NodeProcess
from kvstore.local.processes import free_port, wait_until
from kvstore.local.zkserver import ZooKeeperServer

TIMEOUT_S = 60
INTERNAL_NAMES = re.compile(r"the seed\b|seed's|seed-style|WatCA|KeyValueService|i\*1000", re.I)

PORT = str(free_port())  # (the node fails before it binds it, or cannot: ZooKeeper is absent)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize("program", sorted(COMMANDS))
def test_help_speaks_to_users(program: str) -> None:
    result = run(program, "--help")
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())  # argparse wraps lines
    assert not INTERNAL_NAMES.findall(flat)


@pytest.mark.parametrize("program", sorted(COMMANDS))
def test_help_gives_the_exit_status(program: str) -> None:
    flat = " ".join(run(program, "--help").stdout.split())
    assert "exit status: 0 " in flat


def test_an_unknown_program_is_named() -> None:
    result = run("frob")
    assert result.returncode == 2 and "no program 'frob'" in result.stderr


def test_the_package_lists_its_programs() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert all(name in result.stdout for name in COMMANDS)
    assert run().returncode == 2
    version = run("--version")
    assert (version.returncode, version.stdout.split()[0]) == (0, "kvstore")


def test_an_unwritable_log_is_refused_before_the_load_runs(tmp_path: Path) -> None:
    for log in ("/nonexistent/x.log", str(tmp_path)):  # no such directory; a directory
        result = run("client", "127.0.0.1:1", "/x", "1", "30", "10", "--log", log)
        assert result.returncode == 2 and "--log: cannot write" in result.stderr


def test_a_log_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "binary.log").write_bytes(b"x\xff\n")
    result = run("check", str(tmp_path / "binary.log"))
    assert result.returncode == 2
    assert "is not an execution log" in result.stderr and "Traceback" not in result.stderr


def test_a_log_that_cannot_be_read_or_parsed_is_one_line_on_stderr(tmp_path: Path) -> None:
    (tmp_path / "bad.log").write_text("1\tINV\t1\tR\tk\nnonsense\n")
    for log, why in (("missing.log", "cannot read"), ("bad.log", "line 2: malformed log line")):
        result = run("check", str(tmp_path / log))
        assert result.returncode == 2 and result.stdout == "", result
        assert result.stderr.startswith(f"kv-check: {why}"), result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_a_timeout_must_be_a_positive_number(value: str) -> None:
    assert run("kv", "--timeout", value, "get", "k").returncode == 64


@pytest.mark.parametrize(
    "args",
    [
        ("client", "127.0.0.1:1", "/x", "1", "1", "10", "--log", "-"),
        ("createznode", "127.0.0.1:1", "/x"),
    ],
)
def test_unreachable_zookeeper_is_one_line(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "WARNING" not in result.stderr and "Traceback" not in result.stderr


def test_a_load_whose_zookeeper_is_unreachable_says_so_once(tmp_path: Path) -> None:
    """Reading the keys' values before the run fails as the run would: one line, not a
    warning about those values and then the same failure again."""
    result = subprocess.run(
        [sys.executable, "-m", "kvstore", "client", "127.0.0.1:1", "/x", "1", "1", "10"],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot reach ZooKeeper" in result.stderr, result
    assert not (tmp_path / "execution.log").exists()


def test_a_damaged_data_directory_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "wal-00000001.log").write_bytes(b"not a record at all, and more after it " * 4)
    (tmp_path / "wal-00000002.log").write_bytes(b"")
    result = run("node", "127.0.0.1", PORT, "127.0.0.1:1", "/x", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "wal-00000001.log is damaged at offset 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_timings_that_do_not_nest_are_a_usage_error() -> None:
    result = run("node", "127.0.0.1", PORT, "127.0.0.1:1", "/x", "--lease", "0.1")
    assert result.returncode == 2
    assert "lease" in result.stderr


@pytest.mark.parametrize(
    "options", [("--fsync", "always"), ("--snapshot-every-mb", "1"), ("--fsync", "batch")]
)
def test_disk_options_without_a_data_directory_are_a_usage_error(options: tuple[str, ...]) -> None:
    """An operator who asks for fsyncs but forgets --data-dir must not get a node that keeps
    nothing on disk without a word."""
    result = run("node", "127.0.0.1", PORT, "127.0.0.1:1", "/x", *options)
    assert result.returncode == 2
    assert f"{options[0]} needs --data-dir" in result.stderr, result.stderr


def test_a_metrics_host_without_a_metrics_port_is_a_usage_error() -> None:
    result = run("node", "127.0.0.1", PORT, "127.0.0.1:1", "/x", "--metrics-host", "127.0.0.1")
    assert result.returncode == 2 and "--metrics-host needs --metrics-port" in result.stderr


def test_binding_every_interface_needs_an_advertised_address() -> None:
    result = run("node", "0.0.0.0", PORT, "127.0.0.1:1", "/x")
    assert result.returncode == 2
    assert "--advertise" in result.stderr
    refused = run("node", "0.0.0.0", PORT, "127.0.0.1:1", "/x", "--advertise", "0.0.0.0:1")
    assert refused.returncode == 2


def test_node_logs_can_be_json_lines(tmp_path: Path) -> None:
    (tmp_path / "wal-00000001.log").write_bytes(b"not a record at all, and more after it " * 4)
    (tmp_path / "wal-00000002.log").write_bytes(b"")
    data_dir = str(tmp_path)
    result = run("node", "127.0.0.1", PORT, "127.0.0.1:1", "/x", "--data-dir", data_dir,
                 "--log-format", "json")  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and lines
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(entries[-1])
    assert entries[-1]["level"] == "ERROR"


def test_createznode_sets_the_replication_factor_and_reset_keeps_it(zk_server, zk_path) -> None:
    zk = zk_server.connect_string
    created = run("createznode", "--replicas", "3", zk, zk_path)
    assert created.returncode == 0 and "replication factor 3" in created.stdout, created
    assert run("createznode", "--reset", zk, zk_path).returncode == 0
    client = connect(zk, 10.0, 10.0)
    try:
        assert ClusterMeta.from_bytes(client.get(zk_path)[0]).replicas == 3
    finally:
        client.stop()
        client.close()
    one = run("createznode", "--replicas", "1", zk, zk_path)
    assert one.returncode == 0 and "one copy, no backup" in one.stderr, one
    refused = run("createznode", "--replicas", "0", zk, zk_path)
    assert refused.returncode == 2 and "--replicas must be 1 to" in refused.stderr


def test_a_znode_that_is_no_clusters_parent_is_refused_by_createznode_and_node(
    zk_server: ZooKeeperServer, zk_path: str
) -> None:
    """A path holding other data, a node's ephemeral registration and ZooKeeper's own
    /zookeeper are no cluster's parent: kv-createznode exits 1 instead of saying "exists",
    and a node exits 1 at once instead of retrying forever (or serving under /zookeeper)."""
    zk = zk_server.connect_string
    client = connect(zk, 10.0, 10.0)
    try:
        client.create(zk_path, b"hello")
        ephemeral = client.create(f"{zk_path}-member", b"127.0.0.1:1", ephemeral=True)
        for path, why in (
            (zk_path, "holds data that is not a kvstore cluster's metadata"),
            (ephemeral, "is an ephemeral znode"),
            ("/zookeeper", "belongs to ZooKeeper itself"),
            ("/zookeeper/kv", "belongs to ZooKeeper itself"),
        ):
            made = run("createznode", zk, path)
            assert made.returncode == 1 and why in made.stderr, made
            started = time.monotonic()
            node = run("node", "127.0.0.1", PORT, zk, path)
            assert node.returncode == 1 and why in node.stderr, node
            assert "Traceback" not in node.stderr
            assert time.monotonic() - started < 30  # (not its connect deadline over and over)
        assert client.get(zk_path)[0] == b"hello"
        assert sorted(client.get_children("/zookeeper")) == ["config", "quota"]  # no node there
        reset = run("createznode", "--reset", zk, zk_path)  # asked for: it becomes a parent
        assert reset.returncode == 0, reset
        assert ClusterMeta.from_bytes(client.get(zk_path)[0]).epoch == 0
    finally:
        client.stop()
        client.close()


def test_a_metrics_port_in_use_is_named_as_such() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run("node", "127.0.0.1", PORT, "127.0.0.1:1", "/x", "--metrics-port", port)
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr, result.stderr


def test_a_load_that_no_primary_answered_exits_1(
    zk_server: ZooKeeperServer, tmp_path: Path
) -> None:
    path = "/no-nodes-here"
    create_parent(zk_server.connect_string, path)
    log = tmp_path / "execution.log"
    result = run("client", zk_server.connect_string, path, "1", "1", "10", "--log", str(log))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no operation succeeded" in result.stderr
    assert log.exists()  # the history is kept all the same


@pytest.mark.parametrize(
    ("options", "shown"),
    [((), ""), (("--zk-auth", "kv:s3cret"), "--zk-auth USER:PASSWORD ")],
    ids=["anonymous", "credentials"],
)
def test_kv_node_refuses_a_parent_that_does_not_exist(
    zk_server: ZooKeeperServer, zk_path: str, options: tuple[str, ...], shown: str
) -> None:
    """A mistyped PATH must not start a second, empty cluster: one line saying what to run
    (with the credentials' option, never the password), exit 1, and nothing created."""
    zk = zk_server.connect_string
    result = run("node", "127.0.0.1", PORT, zk, zk_path, *options)
    assert result.returncode == 1, result
    errors_logged = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors_logged) == 1, result.stderr
    assert errors_logged[0].endswith(
        f"kv-node: {zk_path} does not exist in ZooKeeper {zk}: create the cluster with "
        f"`kv-createznode {shown}{zk} {zk_path}` (or pass --create-parent)"
    ), errors_logged
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr
    client = connect(zk, 10.0, 10.0)
    try:
        assert client.exists(zk_path) is None
    finally:
        client.stop()
        client.close()


def test_kv_node_with_create_parent_starts_a_cluster_that_serves(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    node = NodeProcess(zk_server.connect_string, zk_path, tmp_path, extra_args=["--create-parent"])
    try:
        node.start()
        node.wait_for_role(["primary"])
        with kvstore.Client(zk_server.connect_string, zk_path, timeout=10) as kv:
            kv.put("greeting", "hello")
            assert kv.get("greeting") == "hello"
        assert f"created the parent znode {zk_path} (--create-parent)" in node.log_tail(200)
    finally:
        node.stop()


def test_the_missing_parent_line_names_the_nodes_zookeeper_options() -> None:
    """The kv-createznode command shown carries the node's credential file and ZooKeeper TLS
    options (absolute, quoted for the shell); a restarted node, which found its parent gone,
    says so."""
    given = ["127.0.0.1", "9000", "zk1:2181,zk2:2181", "/kvstroe", "--zk-auth-file", "my auth"]
    given += ["--zk-tls-cert", "c.pem", "--zk-tls-key", "k.pem", "--zk-tls-ca", "ca.pem"]
    parser = kv_node._parser()
    args = parser.parse_args(given)
    auth = node_config(zk_auth="u:p", zk_auth_file=args.zk_auth_file).zk_auth_options
    here = os.getcwd()
    assert kv_node._no_cluster_advice(args, auth) == (
        f"create the cluster with `kv-createznode --zk-auth-file '{here}/my auth' "
        f"--zk-tls-cert {here}/c.pem --zk-tls-key {here}/k.pem --zk-tls-ca {here}/ca.pem "
        "zk1:2181,zk2:2181 /kvstroe` (or pass --create-parent)"
    )
    restarted = parser.parse_args([kv_node.RESTARTED, *given])
    assert kv_node._no_cluster_advice(restarted, auth).startswith("it was deleted while")
    # Credentials from $KV_ZK_AUTH (or --zk-auth): the placeholder, never the password.
    assert node_config(zk_auth="u:p").zk_auth_options == ("--zk-auth", "USER:PASSWORD")
    assert node_config().zk_auth_options == ()


def node_config(zk_auth: str | None = None, zk_auth_file: str | None = None) -> NodeConfig:
    return NodeConfig("127.0.0.1", 9000, "zk1:2181", "/kvstroe", zk_auth=zk_auth,
                      zk_auth_file=zk_auth_file)  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_node_waiting_for_zookeeper_stops_at_once_and_warns_once(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM while the node waits for an unreachable ZooKeeper (up to its 15 s connect
    timeout) stops it at once, exit 0; kazoo's warning at each reconnect shows once. SIGHUP
    (the node's terminal closed) stops it the same way (it used to die at once, silently)."""
    log_path = tmp_path / "node.log"
    command = [sys.executable, "-m", "kvstore", "node", "127.0.0.1", str(free_port())]
    with open(log_path, "wb") as log:
        node = subprocess.Popen(
            [*command, "127.0.0.1:1", "/x"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: "Connection dropped" in log_path.read_text() or None,
            30,
            log_path.read_text,
        )
        time.sleep(2)  # (kazoo retries several times a second meanwhile)
        node.send_signal(signum)
        assert node.wait(timeout=5) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    output = log_path.read_text()
    assert output.count("Connection dropped") == 1, output
    assert "connecting to ZooKeeper at 127.0.0.1:1 (giving up after 15 s)" in output, output
    assert f"stopping: signal {signum.name}" in output and "Traceback" not in output


@pytest.mark.parametrize(
    "args",
    [("--replicas", "1", "--seconds", "1"), ("--replicas", "3", "--seconds", "2")],
    ids=["one-copy", "too-short-for-a-kill"],
)
def test_the_demo_announces_no_kill_when_none_will_come(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    result = run("demo", *args, "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "; no kill -9: " in result.stdout
    assert "kill -9 of the primary at" not in result.stdout
    assert "killed primary" not in result.stdout
    # (with --replicas 3 the demo itself creates the parent: its ZooKeeper session too)
    assert "WARNING" not in result.stdout + result.stderr
    assert "Connection dropped" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("--faults", "kill-primary", "--seconds", "5"), "give --seconds above 6"),
        (("--faults", "nemesis", "--seconds", "4"), "give --seconds above 5"),
        (("--faults", "kill-primary", "--replicas", "1", "--seconds", "7"), "no backup"),
    ],
)
def test_bench_refuses_faults_that_would_never_come(
    tmp_path: Path, args: tuple[str, ...], why: str
) -> None:
    result = run("bench", "--threads", "1", "--keyspace", "10", "--mix", "50/50",
                 "--value-bytes", "10", *args, "--workdir", str(tmp_path))  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert why in result.stderr and not list(tmp_path.iterdir())
