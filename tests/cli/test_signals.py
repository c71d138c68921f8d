"""Ctrl-C, SIGTERM and SIGHUP, as users send them to real programs: one line, exit 128 + the
signal, no traceback, and nothing the program started left running (its process tree is
read from /proc before the signal: children of the PID started here, never found by name)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore import errors
from kvstore.local.cluster import LocalCluster
from kvstore.rpc import probe

WAIT_S = 60.0  # for a cluster to come up, or a program to end, on a loaded machine
POLL_S = 0.05


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as file:
                found += [int(child) for child in file.read().split()]
    except OSError:  # gone meanwhile
        pass
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (children, their children, ...)."""
    found: list[int] = []
    pending = [pid]
    for _ in range(10_000):  # bounded: a process tree, not a cycle
        if not pending:
            break
        for child in _children(pending.pop()):
            if child not in found:
                found.append(child)
                pending.append(child)
    return found


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot): with the PID, names one process even
    once PIDs wrap (two xdist workers start many)."""
    fields = _stat(pid)
    return None if fields is None else fields[19]


def is_alive(pid: int, started: str | None = None) -> bool:
    """Running (a zombie has ended: only its exit status waits to be collected), and the
    process that started at ``started`` if given (not another one under a reused PID)."""
    fields = _stat(pid)
    if fields is None or (started is not None and fields[19] != started):
        return False
    return fields[0] != "Z"


def poll(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"not within {timeout_s} s: {what}")


class Program:
    """A kvstore program started here, its output in files (read once it ended), and every
    process below it that it left running killed (by PID) at the end."""

    def __init__(self, tmp_path: Path, *args: str, new_session: bool = False) -> None:
        self.out_path, self.err_path = tmp_path / "stdout", tmp_path / "stderr"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvstore", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=new_session,  # a process group of its own, as on a terminal
            )
        self.seen: dict[int, str] = {}  # PID: its start time

    @property
    def pid(self) -> int:
        return self.process.pid

    def record(self) -> list[int]:
        """Note the processes below it now (to check later that none outlives it)."""
        for pid in descendants(self.pid):
            started = start_time(pid)
            if pid not in self.seen and started is not None:
                self.seen[pid] = started
        return list(self.seen)

    def finish(self, signum: int, to_group: bool = False) -> tuple[int, str, str]:
        """Send ``signum`` (to its process group: as a terminal does), wait for the end;
        (exit status, stdout, stderr)."""
        self.record()
        if to_group:
            os.killpg(self.pid, signum)
        else:
            self.process.send_signal(signum)
        code = self.process.wait(timeout=WAIT_S)
        return code, self.out_path.read_text(), self.err_path.read_text()

    def left_running(self) -> list[int]:
        return [pid for pid, started in self.seen.items() if is_alive(pid, started)]

    def kill_leftovers(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=WAIT_S)
        for pid in self.left_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Program]]:
    programs: list[Program] = []

    def _start(*args: str, new_session: bool = False) -> Program:
        programs.append(Program(tmp_path, *args, new_session=new_session))
        return programs[-1]

    yield _start
    for program in programs:
        program.kill_leftovers()


def _node_addresses(pids: list[int]) -> list[str]:
    """HOST:PORT of each ``kvstore node HOST PORT ...`` among ``pids`` (read from /proc)."""
    addresses = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                argv = file.read().decode().split("\0")
        except OSError:
            continue
        if argv[1:4] == ["-m", "kvstore", "node"]:
            addresses.append(f"{argv[4]}:{argv[5]}")
    return addresses


def _roles(addresses: list[str]) -> list[str]:
    roles = []
    for address in addresses:
        try:
            status = probe(address, 500)
        except errors.KVError:
            status = None
        roles.append("" if status is None else str(status.role))
    return roles


def _wait_for_the_cluster(program: Program) -> None:
    """Until two nodes below ``program`` answer, as primary and backup (its ZooKeeper too)."""

    def serving() -> bool:
        assert program.process.poll() is None, program.err_path.read_text()
        addresses = _node_addresses(program.record())
        return sorted(_roles(addresses)) == ["backup", "primary"]

    poll(serving, WAIT_S, "a primary and a backup")


# --------------------------------------------------------------------------- SIGTERM


@pytest.mark.parametrize(
    "args",
    [
        ("bench", "--threads", "2", "--keyspace", "100", "--mix", "50/50",
         "--value-bytes", "10", "--faults", "none", "--seconds", "30"),
        ("demo", "--seconds", "30"),
    ],
    ids=["kv-bench", "kv-demo"],
)  # fmt: skip
def test_sigterm_stops_everything_it_started_then_one_line_and_143(
    tmp_path: Path, start: Callable[..., Program], args: tuple[str, ...]
) -> None:
    program = start(*args, "--workdir", str(tmp_path / "work"))
    _wait_for_the_cluster(program)
    assert len(program.seen) >= 3  # ZooKeeper and two nodes at least
    code, out, err = program.finish(signal.SIGTERM)
    assert program.left_running() == []  # before exiting, not eventually
    prog = f"kv-{args[0]}"
    assert (code, err) == (143, f"{prog}: interrupted (SIGTERM): stopped the cluster\n"), out
    assert "Traceback" not in out


# --------------------------------------------------------------------------- kv-client


def _running(program: Program) -> bool:
    """Its threads or processes are up: kazoo's connection threads at least (it is waiting
    for ZooKeeper, or past that)."""
    assert program.process.poll() is None, program.err_path.read_text()
    return len(os.listdir(f"/proc/{program.pid}/task")) > 1


@pytest.mark.parametrize(
    ("program", "args", "line"),
    [
        ("createznode", (), "kv-createznode: interrupted\n"),
        ("client", ("2", "30", "10", "--log", "LOG"),
         "kv-client: interrupted: no execution log written\n"),
    ],
    ids=["kv-createznode", "kv-client"],
)  # fmt: skip
def test_ctrl_c_while_waiting_for_zookeeper_is_one_line_and_130(
    tmp_path: Path, start: Callable[..., Program], program: str, args: tuple[str, ...], line: str
) -> None:
    log = tmp_path / "execution.log"
    args = tuple(str(log) if arg == "LOG" else arg for arg in args)
    started = start(program, "127.0.0.1:1", "/x", *args)  # (nothing listens on port 1)
    poll(lambda: _running(started), WAIT_S, "connecting to ZooKeeper")
    code, out, err = started.finish(signal.SIGINT)
    assert (code, err, out) == (130, line, "")
    assert not log.exists()


@pytest.mark.parametrize(
    ("signum", "line"),
    [
        (signal.SIGINT, "kv: interrupted\n"),
        (signal.SIGTERM, "kv: interrupted (SIGTERM)\n"),
        (signal.SIGHUP, "kv: interrupted (SIGHUP)\n"),
    ],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_kv_interrupted_while_waiting_for_zookeeper_is_one_line_and_128_plus_the_signal(
    start: Callable[..., Program], signum: signal.Signals, line: str
) -> None:
    """(SIGTERM and SIGHUP ended kv silently, by the signal's default action.)"""
    started = start("kv", "--zk", "127.0.0.1:1", "--timeout", "60", "get", "k")
    poll(lambda: _running(started), WAIT_S, "connecting to ZooKeeper")
    code, out, err = started.finish(signum)
    assert (code, err, out) == (128 + signum, line, "")


@pytest.mark.parametrize(
    ("signum", "procs", "to_group"),
    [(signal.SIGINT, "1", True), (signal.SIGINT, "2", True), (signal.SIGTERM, "2", False)],
    ids=["ctrl-c", "ctrl-c-with-2-client-processes", "sigterm-with-2-client-processes"],
)
def test_an_interrupted_load_prints_its_summary_and_writes_a_log_that_checks(
    tmp_path: Path,
    start: Callable[..., Program],
    shared_cluster: LocalCluster,
    signum: signal.Signals,
    procs: str,
    to_group: bool,
) -> None:
    """Ctrl-C on a terminal reaches the whole process group; SIGTERM (kill, a service
    manager) the program alone: its client processes must not be left running."""
    log = tmp_path / "execution.log"
    primary = shared_cluster.wait_for("primary")
    program = start(
        "client", shared_cluster.zk_connect, shared_cluster.zk_path, "4", "60", "100",
        "--procs", procs, "--log", str(log), new_session=True,
    )  # fmt: skip

    def writing() -> bool:  # the load runs: keys were written
        assert program.process.poll() is None, program.err_path.read_text()
        status = primary.status()
        return status is not None and status.key_count > 0

    poll(writing, WAIT_S, "the load writing")
    code, out, err = program.finish(signum, to_group=to_group)
    name = "" if signum == signal.SIGINT else f" ({signum.name})"
    assert code == 128 + signum, out + err
    assert err == f"kv-client: interrupted{name}: the execution log holds the run until then\n"
    assert "Successful operations:" in out and f"Execution log: {log}" in out
    # Its client processes stopped before it did; multiprocessing's resource tracker (when
    # there are some) ends when it sees its parent gone.
    poll(lambda: not program.left_running(), 10.0, "every process below it ended")
    check = subprocess.run(
        [sys.executable, "-m", "kvstore", "check", str(log)],
        capture_output=True, text=True, timeout=WAIT_S, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout
    assert check.stdout.startswith("OK (")
