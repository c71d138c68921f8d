"""The live progress line: only on a terminal, one carriage-return line, cleared at the end."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Callable

from kvstore.bench.progress import maybe_progress
from kvstore.local.cluster import LocalCluster

PROGRESS = re.compile(r"\r +[\d.]+/3 s +[\d,]+ ops +[\d,]+ ops/s +[\d,]+ failed")
TIMEOUT_S = 60


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_progress_unless_the_stream_is_a_terminal() -> None:
    assert maybe_progress(io.StringIO(), 10) is None


def test_progress_rewrites_one_line_and_clears_it() -> None:
    terminal = Terminal()
    progress = maybe_progress(terminal, 10)
    assert progress is not None
    progress(12_345, 2, 2.0)
    progress(24_000, 2, 4.0)
    written = terminal.getvalue()
    assert "\n" not in written
    assert written.count("\r") == 2
    assert "24,000 ops" in written and "6,000 ops/s" in written and "2 failed" in written
    progress.done()
    assert terminal.getvalue().endswith("\r")


def test_progress_is_labelled_when_asked() -> None:
    terminal = Terminal()
    progress = maybe_progress(terminal, 10, "[2/9]")
    assert progress is not None
    progress(100, 0, 1.0)
    assert terminal.getvalue().startswith("\r[2/9]  ")


def test_kv_client_shows_progress_on_a_real_terminal_only(
    shared_cluster: LocalCluster, on_a_terminal: Callable[[list[str], float], tuple[int, str]]
) -> None:
    args = [sys.executable, "-m", "kvstore", "client", shared_cluster.zk_connect,
            shared_cluster.zk_path, "2", "3", "100", "--log", "-"]  # fmt: skip
    code, output = on_a_terminal(args, TIMEOUT_S)
    assert code == 0, output
    assert PROGRESS.search(output), output
    assert "Aggregate throughput" in output
    piped = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert piped.returncode == 0, piped.stdout + piped.stderr
    assert "\r" not in piped.stdout and not PROGRESS.search(piped.stdout)
    assert "Aggregate throughput" in piped.stdout
