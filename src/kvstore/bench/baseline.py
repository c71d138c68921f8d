"""The same-run yardstick: the seed's Java original, measured by its own compare script.

The script (kept outside this project, with the Java binaries it runs) starts the Java
nodes and ours alternately (A-B-B-A) under the seed's Java client and prints ops/s and CPU
per operation of each, then the medians and the ratio ours/Java. Only a ratio from one
invocation means anything on a shared machine, so kv-bench prints the script's own ratio.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

RATIO_PREFIX = "ratio ours/java:"


def run_compare(
    script: Path, seconds: float, rounds: int, out: Callable[[str], None], log_path: Path
) -> float | None:
    """Run ``script`` against this installation's kv-node; echo its table through ``out``
    (and into ``log_path``); return the ratio ours/Java, None if it printed none."""
    node = f"{shlex.quote(sys.executable)} -m kvstore node"
    command = [
        str(script),
        "--seconds",
        str(max(4, round(seconds))),
        "--rounds",
        str(rounds),
        "--node",
        node,
    ]
    ratio = None
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process,
    ):
        assert process.stdout is not None
        try:
            for line in process.stdout:
                log.write(line)
                out(f"   {line.rstrip()}")
                if line.startswith(RATIO_PREFIX):
                    try:
                        ratio = float(line[len(RATIO_PREFIX) :].split()[0])
                    except (IndexError, ValueError):
                        ratio = None
        except BaseException:  # Ctrl-C, SIGTERM (cli/interrupts.py): stop it too
            _stop(process)
            raise
    return ratio


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM the script (it stops the nodes, client and ZooKeeper it started on its way
    out), SIGKILL it if it is not gone within STOP_TIMEOUT_S."""
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


STOP_TIMEOUT_S = 15.0
