"""The interrupt handling every program shares (kvstore.cli.interrupts) and the entry
point that catches Ctrl-C while a program loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import kvstore.cli
from kvstore.cli import COMMANDS, program_name
from kvstore.cli.interrupts import Interrupts

REPOSITORY = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60


# --------------------------------------------------------------------------- start-up

INTERRUPTED_IMPORT = """\
import os, runpy, signal, sys

class InterruptTheImport:  # Ctrl-C just as the program's module loads
    def find_spec(self, name, path=None, target=None):
        if name == "kvstore.cli.kv":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptTheImport())
sys.argv = ["kvstore", "kv", "get", "k"]
runpy.run_module("kvstore", run_name="__main__")
"""


def test_ctrl_c_while_the_program_loads_is_one_line_and_130() -> None:
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_IMPORT],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (130, "kv: interrupted\n")


def test_the_installed_commands_start_through_the_interrupt_catching_entry_point() -> None:
    scripts = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == sorted(program_name(command) for command in COMMANDS)
    for script, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == "kvstore.cli", target  # (a program's own module imports it all first)
        command = function.removesuffix("_command")
        assert program_name(command) == script and callable(getattr(kvstore.cli, function))


# --------------------------------------------------------------------------- Interrupts


def test_only_the_first_signal_interrupts_and_the_handlers_come_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with Interrupts("kv-test") as interrupts:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # (the handler runs first)
        os.kill(os.getpid(), signal.SIGHUP)  # ignored now: the cleanup is not cut short
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.report("stopped") == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert capsys.readouterr().err == "kv-test: interrupted (SIGTERM): stopped\n"


def test_a_held_signal_is_noted_not_raised_and_an_ignored_one_stays_ignored(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with Interrupts("kv-test") as interrupts:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert interrupts.received is None
            interrupts.hold()
            os.kill(os.getpid(), signal.SIGINT)
            assert interrupts.received == signal.SIGINT
            assert interrupts.report() == 130
    finally:
        signal.signal(signal.SIGHUP, before)
    assert capsys.readouterr().err == "kv-test: interrupted\n"


def test_a_failure_after_a_signal_is_the_interruption_and_before_it_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """kv-bench once exited 1 with "ZooKeeper checking the parent path failed" on SIGTERM:
    its cleanup stopped ZooKeeper under a call in flight, and that error replaced the
    interruption."""
    with Interrupts("kv-test") as interrupts:
        assert interrupts.report_failure(OSError("no ZooKeeper"), "stopped") == 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # (the handler runs first)
        assert interrupts.report_failure(OSError("connection closed"), "stopped") == 143
    assert capsys.readouterr().err == (
        "kv-test: no ZooKeeper\nkv-test: interrupted (SIGTERM): stopped\n"
    )
