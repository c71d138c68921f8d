"""The kv command against a live cluster: round trips, exit codes, JSON, status, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import kvstore
from kvstore.local.cluster import LocalCluster
from kvstore.local.zkserver import ZooKeeperServer

TIMEOUT_S = 60


def kv(cluster: LocalCluster | None, *args: str, zk: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if cluster is not None:
        env.update(KV_ZK=cluster.zk_connect, KV_PATH=cluster.zk_path)
    command = [sys.executable, "-m", "kvstore", "kv", *(["--zk", zk] if zk else []), *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, check=False
    )


def test_round_trip_and_exit_codes(cluster: LocalCluster) -> None:
    assert kv(cluster, "put", "greeting", "hello").returncode == 0
    got = kv(cluster, "get", "greeting")
    assert (got.returncode, got.stdout) == (0, "hello\n")
    missing = kv(cluster, "get", "nothing")
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", "")
    assert kv(cluster, "del", "greeting").returncode == 0
    assert kv(cluster, "get", "greeting").returncode == 1
    assert kv(cluster, "del", "greeting").returncode == 1
    assert kv(cluster, "cas", "n", "1", "--absent").returncode == 0
    assert kv(cluster, "cas", "n", "2", "--expect", "9").returncode == 1
    assert kv(cluster, "cas", "n", "2", "--expect", "1").returncode == 0
    assert kv(cluster, "get", "n").stdout == "2\n"


def test_json_output_parses(cluster: LocalCluster) -> None:
    kv(cluster, "put", "a", "1")
    values = json.loads(kv(cluster, "-o", "json", "mget", "a", "b").stdout)
    assert values == {"a": "1", "b": None}
    missing = kv(cluster, "-o", "json", "get", "b")
    assert missing.returncode == 1
    assert json.loads(missing.stdout) == {"key": "b", "value": None}


def test_status_lists_both_nodes(cluster: LocalCluster) -> None:
    kv(cluster, "put", "a", "1")
    nodes = json.loads(kv(cluster, "-o", "json", "status").stdout)
    assert sorted(n["role"] for n in nodes) == ["backup", "primary"]
    assert all(n["is_in_sync"] and n["keys"] == 1 for n in nodes)
    table = kv(cluster, "status").stdout.splitlines()
    assert table[0].split() == ["NODE", "ADDRESS", "ROLE", "EPOCH", "IN-SYNC", "KEYS"]
    assert len(table) == 4
    assert table[3] == "replication factor 2: 2 in sync"


def test_unreachable_zookeeper_is_one_line_and_exit_2() -> None:
    result = kv(None, "--timeout", "1", "get", "k", zk="127.0.0.1:1")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("kv: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [(), ("get",), ("cas", "k", "v"), ("frob",)])
def test_usage_errors_exit_64(args: tuple[str, ...]) -> None:
    assert kv(None, *args).returncode == 64


@pytest.mark.parametrize(
    "program", ["kv", "node", "client", "createznode", "check", "demo", "bench"]
)
def test_every_program_has_version(program: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvstore", program, "--version"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.split()[-1].count(".") == 2


def test_a_parent_path_that_does_not_exist_is_one_line_and_exit_2(
    zk_server: ZooKeeperServer,
) -> None:
    result = kv(None, "--path", "/no-such-parent", "get", "k", zk=zk_server.connect_string)
    assert (result.returncode, result.stdout) == (2, "")
    assert "does not exist: create it with kv-createznode" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    with pytest.raises(kvstore.CoordinationError, match="does not exist"):
        kvstore.Client(zk_server.connect_string, "/no-such-parent", timeout=5)


@pytest.mark.parametrize(
    "command",
    [
        ("kv", "--zk", "127.0.0.1:abc", "get", "k"),
        ("node", "127.0.0.1", "0", "127.0.0.1:2181", "/p"),
        ("node", "127.0.0.1", "99999", "127.0.0.1:2181", "/p"),
        ("node", "127.0.0.1", "9000", "127.0.0.1:2181", "/p", "--advertise", "127.0.0.1:0"),
        ("node", "127.0.0.1", "9000", "h:abc", "/p"),
        ("createznode", "h:abc", "/p"),
        ("client", "h:abc", "/p", "1", "1", "10"),
    ],
    ids=[
        "kv-zk",
        "node-port-0",
        "node-port-big",
        "advertise-port-0",
        "node-zk",
        "createznode",
        "client",
    ],
)
def test_a_malformed_port_or_connect_string_is_a_usage_error(command: tuple[str, ...]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvstore", *command],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == (64 if command[0] == "kv" else 2), result.stderr
    assert "error: argument" in result.stderr and "Traceback" not in result.stderr


def test_a_key_that_cannot_be_sent_or_is_too_large_fails_at_once_with_exit_64(
    cluster: LocalCluster,
) -> None:
    for key in ("bad\udcffkey", "k" * 5000):  # not UTF-8 (from the shell's bytes); too long
        started = time.monotonic()
        result = kv(cluster, "--timeout", "20", "put", key, "v")
        assert result.returncode == 64, result.stderr
        assert time.monotonic() - started < 10  # not retried until the timeout
        assert result.stderr.startswith("kv: ") and "Traceback" not in result.stderr
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=20) as client:
        with pytest.raises(kvstore.BadRequestError) as refused:
            client.put("k", 5)  # type: ignore[arg-type]
        assert refused.value.is_definite
