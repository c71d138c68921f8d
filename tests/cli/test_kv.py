"""The kv command against a live cluster: round trips, exit codes, JSON, status, errors.

The tests that leave both nodes serving share one cluster (conftest's ``shared_cluster``)."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kazoo.client import KazooClient

import kvstore
from kvstore.coordination import create_parent
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.processes import wait_until
from kvstore.local.zkserver import ZooKeeperServer
from kvstore.server.records import CorruptLogError
from kvstore.server.storage import StripedStore
from kvstore.server.wal import SNAPSHOT_FILE, WriteAheadLog

TIMEOUT_S = 60


def kv(
    cluster: LocalCluster | None, *args: str, zk: str = "", stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if cluster is not None:
        env.update(KV_ZK=cluster.zk_connect, KV_PATH=cluster.zk_path)
    command = [sys.executable, "-m", "kvstore", "kv", *(["--zk", zk] if zk else []), *args]
    done = subprocess.run(
        command,
        capture_output=True,
        input=stdin if stdin is not None else b"",
        env=env,
        timeout=TIMEOUT_S,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def test_round_trip_and_exit_codes(shared_cluster: LocalCluster) -> None:
    assert kv(shared_cluster, "put", "greeting", "hello").returncode == 0
    got = kv(shared_cluster, "get", "greeting")
    assert (got.returncode, got.stdout) == (0, "hello\n")
    missing = kv(shared_cluster, "get", "nothing")
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", "")
    assert kv(shared_cluster, "del", "greeting").returncode == 0
    assert kv(shared_cluster, "get", "greeting").returncode == 1
    assert kv(shared_cluster, "del", "greeting").returncode == 1
    assert kv(shared_cluster, "cas", "n", "1", "--absent").returncode == 0
    assert kv(shared_cluster, "cas", "n", "2", "--expect", "9").returncode == 1
    assert kv(shared_cluster, "cas", "n", "2", "--expect", "1").returncode == 0
    assert kv(shared_cluster, "get", "n").stdout == "2\n"


def test_json_output_parses(shared_cluster: LocalCluster) -> None:
    kv(shared_cluster, "put", "a", "1")
    values = json.loads(kv(shared_cluster, "-o", "json", "mget", "a", "b").stdout)
    assert values == {"a": "1", "b": None}
    missing = kv(shared_cluster, "-o", "json", "get", "b")
    assert missing.returncode == 1
    assert json.loads(missing.stdout) == {"key": "b", "value": None}


def test_mget_text_shows_a_missing_key_alone_and_exits_1(shared_cluster: LocalCluster) -> None:
    kv(shared_cluster, "put", "a", "1")
    kv(shared_cluster, "put", "empty", "")
    some = kv(shared_cluster, "mget", "a", "empty", "missing")
    assert (some.returncode, some.stdout) == (1, "a\t1\nempty\t\nmissing\n")
    every = kv(shared_cluster, "mget", "a", "empty")
    assert (every.returncode, every.stdout) == (0, "a\t1\nempty\t\n")


def test_put_without_a_value_reads_standard_input_unchanged(shared_cluster: LocalCluster) -> None:
    text = "line one\nzwei: \u00fc\n" + "x" * 300_000  # over what argv takes in one argument
    put = kv(shared_cluster, "put", "doc", stdin=text.encode())
    assert put.returncode == 0, put.stderr
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=20) as client:
        assert client.get("doc") == text
    back = kv(shared_cluster, "get", "-n", "doc")
    assert (back.returncode, back.stdout) == (0, text)  # byte for byte: no newline added
    not_text = kv(shared_cluster, "put", "doc", stdin=b"\xff\xfe")
    assert not_text.returncode == 64
    assert not_text.stderr.startswith("kv: put: standard input is not UTF-8")
    assert not_text.stderr.count("\n") == 1  # one line: no usage text


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("put", "k"), "give VALUE, or send it on standard input"),
        (("load",), "give FILE, or send the dump on standard input"),
        (("load", "-"), "give FILE, or send the dump on standard input"),
    ],
)
def test_reading_standard_input_from_a_terminal_is_a_usage_error(
    args: tuple[str, ...], said: str
) -> None:
    master, slave = pty.openpty()  # would wait for the user's typing, if it read it
    try:
        result = subprocess.run(
            [sys.executable, "-m", "kvstore", "kv", "--zk", "127.0.0.1:1", *args],
            stdin=slave, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
        )  # fmt: skip
    finally:
        os.close(slave)
        os.close(master)
    assert result.returncode == 64, result.stderr
    assert said in result.stderr


def test_dump_then_load_round_trips_every_key(shared_cluster: LocalCluster, tmp_path: Path) -> None:
    cluster = shared_cluster
    values = {f"k{i}": f"v{i}-" + "x" * 300 for i in range(300)}  # (over a pipe's 64 KiB)
    values |= {"tab\tkey": "line\nbreak", "ключ": "значение ✓", "empty": ""}
    with kvstore.Client(cluster.zk_connect, cluster.zk_path) as client:
        for key, value in values.items():
            client.put(key, value)
        assert dict(client.scan(chunk_keys=1)) == values  # a stripe or so per call
        assert sorted(key for key, _ in client.scan()) == sorted(values)  # each once
    backup = tmp_path / "backup.jsonl"
    dumped = kv(cluster, "dump", str(backup))
    assert (dumped.returncode, dumped.stderr) == (0, f"dumped {len(values)} keys to {backup}\n")
    lines = backup.read_text().splitlines()
    assert {json.loads(line)["key"]: json.loads(line)["value"] for line in lines} == values
    assert kv(cluster, "dump").stdout.splitlines() == lines  # standard output alike
    env = dict(os.environ, KV_ZK=cluster.zk_connect, KV_PATH=cluster.zk_path)
    with subprocess.Popen(  # kv dump | head -1
        [sys.executable, "-m", "kvstore", "kv", "dump"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as head:
        assert head.stdout is not None and head.stderr is not None
        assert head.stdout.readline().decode() == lines[0] + "\n"
        head.stdout.close()
        assert head.wait(TIMEOUT_S) == 141  # (as cat's, 128 + SIGPIPE)
        assert head.stderr.read() == b""  # no traceback
    assert not list(tmp_path.glob(".*partial"))
    with kvstore.Client(cluster.zk_connect, cluster.zk_path) as client:
        client.delete("k1")
        client.put("k2", "changed")
        loaded = kv(cluster, "load", str(backup))
        assert (loaded.returncode, loaded.stdout) == (0, f"loaded {len(values)} keys\n")
        assert client.get_many(values) == values
    bad = b'{"key": "fresh", "value": "1"}\n{"key": 5, "value": "x"}\n'
    refused = kv(cluster, "load", stdin=bad)  # (standard input: no FILE)
    assert refused.returncode == 64
    assert "standard input line 2" in refused.stderr
    assert kv(cluster, "get", "fresh").returncode == 1  # every line is checked first
    too_large = (
        b'{"key": "LA", "value": "a"}\n{"key": "LB", "value": "%s"}\n{"key": "LC", "value": "c"}\n'
        % (
            b"x" * (2 << 20)  # over the nodes' 1 MiB: only the node knows its limit
        )
    )
    stopped = kv(cluster, "load", "--threads", "1", stdin=too_large)
    assert stopped.returncode == 64, stopped
    said = re.search(r"\(key 'LB', entry 2 of 3\); keys loaded: (\d);", stopped.stderr)
    assert said is not None, stopped.stderr
    with kvstore.Client(cluster.zk_connect, cluster.zk_path) as client:
        there = client.get_many(["LA", "LB", "LC"])  # (LC: begun before the stop, or not)
    assert there["LA"] == "a" and there["LB"] is None, there
    assert int(said[1]) == sum(value is not None for value in there.values()), (said, there)
    empty_key = b'{"key": "fresh", "value": "1"}\n{"key": "", "value": "x"}\n'
    refused = kv(cluster, "load", stdin=empty_key)  # (an earlier version stored one)
    assert refused.returncode == 64
    assert "standard input line 2: the key is empty" in refused.stderr
    assert kv(cluster, "get", "fresh").returncode == 1


def test_status_marks_a_stale_znode_and_exits_2_without_a_primary(cluster: LocalCluster) -> None:
    # A znode whose node died, while another node answers at its address (a restart): the
    # primary removes its own cluster's such znodes within a tick, so one is made by hand.
    backup = next(n for n in cluster.nodes if n is not cluster.wait_for("primary"))
    standby = NodeProcess(cluster.zk_connect, cluster.zk_path, cluster.log_dir)
    cluster.nodes.append(standby)  # (a third node: it waits, and has joined no epoch yet)
    standby.start()
    standby.wait_for_role(["standby"])
    zk = KazooClient(hosts=cluster.zk_connect)
    zk.start(timeout=TIMEOUT_S)
    try:
        zk.create(
            f"{cluster.zk_path}/node-", backup.address.encode(), ephemeral=True, sequence=True
        )
        nodes = json.loads(kv(cluster, "-o", "json", "status").stdout)
        assert sorted(n["role"] for n in nodes) == ["backup", "primary", "stale", "standby"]
        table = kv(cluster, "status")
        assert table.returncode == 0 and "(stale: a node that stopped" in table.stdout
        row = next(line.split() for line in table.stdout.splitlines() if "standby" in line)
        assert row[2:] == ["standby", "-", "no", "0"], table.stdout  # no epoch 0 shown
    finally:
        zk.stop()
        zk.close()
    for node in cluster.nodes:
        node.kill()
    dead = kv(cluster, "status")  # (their znodes outlive them until their sessions expire)
    assert dead.returncode == 2, dead.stdout
    assert "no node answers as primary" in dead.stdout
    # Still listed in sync by the metadata, but neither counted as such nor given an epoch.
    assert ": 0 in sync and serving" in dead.stdout, dead.stdout
    assert "(listed in sync, not answering as primary or backup: node-" in dead.stdout
    dead_json = kv(cluster, "-o", "json", "status")
    assert dead_json.returncode == 2
    assert all(n["epoch"] is None for n in json.loads(dead_json.stdout)), dead_json.stdout


def test_status_lists_both_nodes(shared_cluster: LocalCluster) -> None:
    kv(shared_cluster, "put", "a", "1")
    nodes = json.loads(kv(shared_cluster, "-o", "json", "status").stdout)
    assert sorted(n["role"] for n in nodes) == ["backup", "primary"]
    assert all(n["is_in_sync"] and n["keys"] == 1 for n in nodes)
    assert len({n["epoch"] for n in nodes}) == 1 and nodes[0]["epoch"] >= 1
    table = kv(shared_cluster, "status").stdout.splitlines()
    assert table[0].split() == ["NODE", "ADDRESS", "ROLE", "EPOCH", "IN-SYNC", "KEYS"]
    assert len(table) == 4
    assert table[3] == "replication factor 2: 2 in sync and serving"
    after = kv(shared_cluster, "status", "-o", "json")  # (the options go after the command too)
    assert sorted(n["role"] for n in json.loads(after.stdout)) == ["backup", "primary"]


def test_unreachable_zookeeper_is_one_line_and_exit_2() -> None:
    result = kv(None, "--timeout", "1", "get", "k", zk="127.0.0.1:1")
    assert result.returncode == 2
    after = kv(None, "get", "k", "--zk", "127.0.0.1:1", "--timeout", "1")
    assert (after.returncode, after.stderr) == (2, result.stderr), after
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
    for command in (("get", "k"), ("status",)):
        result = kv(None, "--path", "/no-such-parent", *command, zk=zk_server.connect_string)
        assert (result.returncode, result.stdout) == (2, "")
        assert "does not exist: create it with kv-createznode" in result.stderr, command
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
        ("createznode", "127.0.0.1:2181", "relative"),
        ("node", "127.0.0.1", "9000", "127.0.0.1:2181", "/a//b"),
        ("kv", "--path", "/trailing/", "get", "k"),
        ("bench", "--keyspace", "1,,2"),
    ],
    ids=[
        "kv-zk",
        "node-port-0",
        "node-port-big",
        "advertise-port-0",
        "node-zk",
        "createznode",
        "client",
        "relative-path",
        "empty-path-part",
        "trailing-slash",
        "empty-list-item",
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
    shared_cluster: LocalCluster,
) -> None:
    # not UTF-8 (from the shell's bytes); too long; empty (an unset "$KEY")
    for key in ("bad\udcffkey", "k" * 5000, ""):
        started = time.monotonic()
        result = kv(shared_cluster, "--timeout", "20", "put", key, "v")
        assert result.returncode == 64, result.stderr
        assert time.monotonic() - started < 10  # not retried until the timeout
        assert result.stderr.startswith("kv: ") and "Traceback" not in result.stderr
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=20) as client:
        with pytest.raises(kvstore.BadRequestError) as refused:
            client.put("k", 5)  # type: ignore[arg-type]
        assert refused.value.is_definite
        for call in (lambda: client.get(""), lambda: client.cas("", None, "v")):
            with pytest.raises(kvstore.BadRequestError, match="the key is empty"):
                call()


def test_a_data_dir_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    command = ["node", "127.0.0.1", "9000", "127.0.0.1:1", "/p", "--data-dir"]
    result = subprocess.run(
        [sys.executable, "-m", "kvstore", *command, str(not_a_directory)],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"--data-dir: {not_a_directory} exists and is not a directory" in result.stderr


def test_a_new_cluster_without_a_primary_yet_is_waited_for_not_taken_for_a_seed_one(
    zk_server: ZooKeeperServer, zk_path: str
) -> None:
    """Between kv-createznode and the first node taking the primary role, the parent holds
    kvstore metadata without a primary: calls wait for one (until their timeout) instead of
    failing at once as if the nodes were the seed's (which have no delete, cas or scan)."""
    create_parent(zk_server.connect_string, zk_path)
    for args in (("del", "a"), ("cas", "a", "1", "--absent"), ("dump",), ("get", "a")):
        result = kv(None, "--path", zk_path, "--timeout", "1", *args, zk=zk_server.connect_string)
        assert result.returncode == 2, (args, result)
        assert "seed" not in result.stderr and "no primary" in result.stderr, (args, result)
    with kvstore.Client(zk_server.connect_string, zk_path, timeout=0.5) as client:
        with pytest.raises(kvstore.DeadlineExceededError, match="no primary") as failed:
            client.delete("a")
        assert failed.value.is_definite


@pytest.mark.parametrize(
    ("variable", "value"), [("KV_ZK", ""), ("KV_PATH", "relative"), ("KV_PATH", "")]
)
def test_a_bad_environment_default_is_named(variable: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvstore", "kv", "get", "k"],
        capture_output=True,
        text=True,
        env={**os.environ, variable: value},
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 64
    assert f"kv: error: ${variable}: " in result.stderr, result.stderr


def test_a_timeout_that_is_no_number_is_said_so() -> None:
    result = kv(None, "--timeout", "abc", "get", "k")
    assert result.returncode == 64 and "--timeout: not a number: 'abc'" in result.stderr


def _snapshot_then_log(directory: Path, keys: int) -> tuple[StripedStore, dict[str, str]]:
    """A node's data directory (its store still open): ``keys`` keys in a snapshot, then a
    delete and an overwrite in the log after it; and what it holds."""
    store = StripedStore(8)
    store.log = WriteAheadLog(directory)
    store.recover()
    for i in range(keys):
        store.wait_durable(store.put(f"k{i}", f"v{i}"))
    store.write_snapshot()  # (the snapshot and the log after it, both read)
    store.wait_durable(store.apply_change("k3", None))
    store.wait_durable(store.put("k4", "changed"))
    return store, {f"k{i}": f"v{i}" for i in range(keys) if i != 3} | {"k4": "changed"}


def test_dump_reads_a_stopped_nodes_data_directory_without_zookeeper(tmp_path: Path) -> None:
    """The way out when no cluster serves a directory's data any more (its parent znode
    lost, a reset, a directory moved aside): its keys as that node held them."""
    directory = tmp_path / "data"
    store, expected = _snapshot_then_log(directory, 20)
    busy = kv(None, "dump", "--data-dir", str(directory), zk="127.0.0.1:1")
    assert busy.returncode == 2 and "in use by another node" in busy.stderr, busy
    store.log.close()
    files = sorted(directory.glob("wal-*"))
    dumped = kv(None, "dump", "--data-dir", str(directory), zk="127.0.0.1:1")  # (no ZooKeeper)
    assert dumped.returncode == 0, dumped
    assert sorted(directory.glob("wal-*")) == files  # (read, not written to)
    lines = [json.loads(line) for line in dumped.stdout.splitlines()]
    assert {entry["key"]: entry["value"] for entry in lines} == expected
    empty = kv(None, "dump", "--data-dir", str(tmp_path / "none"))
    assert empty.returncode == 64 and "holds no node's data" in empty.stderr, empty


def test_dump_of_a_damaged_data_directory_rescues_what_is_intact(tmp_path: Path) -> None:
    """A node refuses to start on a damaged snapshot; kv dump --data-dir is the rescue: the
    records before the damage, every later file's, a line naming the damage, exit 1."""
    directory = tmp_path / "data"
    store, expected = _snapshot_then_log(directory, 200)
    assert store.log is not None
    store.log.close()
    snapshot = directory / SNAPSHOT_FILE
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the middle: not a torn tail
    snapshot.write_bytes(bytes(data))
    refused = StripedStore(8)
    refused.log = WriteAheadLog(directory)
    with pytest.raises(CorruptLogError, match="is damaged at offset"):
        refused.recover()  # (what a node does: refuse)
    refused.log.close()
    dumped = kv(None, "dump", "--data-dir", str(directory), zk="127.0.0.1:1")
    assert dumped.returncode == 1, dumped
    assert "is damaged at offset" in dumped.stderr and "dumping what is intact" in dumped.stderr
    assert "refusing to start" not in dumped.stderr  # (what a node does, not this rescue)
    found = {entry["key"]: entry["value"] for entry in map(json.loads, dumped.stdout.splitlines())}
    assert found["k4"] == "changed" and "k3" not in found  # (the log after the snapshot)
    assert found.items() <= expected.items()
    assert 0 < len(found) < len(expected)  # (the stripes after the damage are lost)


def test_a_timeout_past_the_exactly_once_records_is_refused() -> None:
    result = kv(None, "--timeout", "600", "put", "k", "v", zk="127.0.0.1:1")
    assert result.returncode == 64 and "exactly-once" in result.stderr


def _ports_connected_to(port: int) -> set[int]:
    """The local ports of this machine's IPv4 TCP sockets connected to ``port``, in any state
    (/proc/net/tcp: "local rem st ...", addresses as HEXIP:HEXPORT)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote = line.split()[1:3]
        if int(remote.split(":")[1], 16) == port:
            ports.add(int(local.split(":")[1], 16))
    return ports


def test_max_value_bytes_tells_a_large_put_cut_off_from_one_too_large(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    """Nodes with a raised --max-value-bytes accept a value over the default frame limit
    (16 MiB). A send of it that fails for another reason (here: the nodes paused, the send
    times out) is retried when kv is told the nodes' limit; without it kv takes the failed
    send for the nodes refusing the frame, and gives up at once."""
    raised = str(24 * 1024 * 1024)
    local = LocalCluster(
        zk_server.connect_string,
        zk_path,
        tmp_path / "nodes",
        node_args=["--max-value-bytes", raised],
    )
    big = tmp_path / "big"
    big.write_bytes(b"v" * (17 * 1024 * 1024))
    try:
        local.start()
        primary = local.wait_for("primary")
        local.wait_for("backup")
        pids = [node.pid for node in local.nodes if node.pid is not None]
        assert len(pids) == 2

        def resume() -> None:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

        # Both paused: the backup cannot take over meanwhile (kv would find it serving).
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            refused = kv(local, "--timeout", "20", "put", "big", stdin=big.read_bytes())
            assert refused.returncode == 64, refused.stderr
            assert "frame limit" in refused.stderr, refused.stderr
            earlier = _ports_connected_to(primary.port)
            env = dict(os.environ, KV_ZK=local.zk_connect, KV_PATH=local.zk_path)
            command = [sys.executable, "-m", "kvstore", "kv", "--max-value-bytes", raised]
            with open(big, "rb") as value:
                retried = subprocess.Popen(
                    [*command, "--timeout", "30", "put", "big"],
                    stdin=value, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                )  # fmt: skip
            try:  # its first send times out (kv's RPC timeout is 2 s) and it connects again
                wait_until(
                    lambda: len(_ports_connected_to(primary.port) - earlier) >= 2 or None,
                    TIMEOUT_S,
                    lambda: "kv did not try the put a second time",
                )
            except BaseException:
                retried.kill()
                raise
        finally:
            resume()
        _, err = retried.communicate(timeout=TIMEOUT_S)
        assert retried.returncode == 0, err
        stored = kv(local, "--max-value-bytes", raised, "get", "big", "-n")
        assert stored.returncode == 0 and len(stored.stdout) == big.stat().st_size
    finally:
        local.stop()


def test_a_node_port_given_as_zookeeper_is_named_a_likely_mix_up(
    shared_cluster: LocalCluster,
) -> None:
    node = shared_cluster.wait_for("primary").address
    result = kv(None, "--timeout", "3", "get", "k", zk=node)
    assert result.returncode == 2, result
    assert "is it ZooKeeper's port, not a kvstore node's?" in result.stderr, result.stderr
