"""kv-bench end to end, as a user runs it: a progress line on a terminal only, the JSON, the
histograms and the plots beside it, and an open-loop rate that holds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

from kvstore.cli.bench import session_directory

SECONDS = 3
RATE = 400
TIMEOUT_S = 120
PROGRESS = re.compile(r"\r\[1/1\] +[\d.]+/3 s +[\d,]+ ops +[\d,]+ ops/s +[\d,]+ failed")
BENCH_ARGS = (
    "--threads", "2", "--keyspace", "100", "--mix", "50/50", "--value-bytes", "10",
    "--faults", "none", "--seconds", str(SECONDS),
)  # fmt: skip


def _result_dir(output: str) -> Path:
    match = re.search(r"results: (\S+results\.json)", output)
    assert match, output
    return Path(match.group(1)).parent


def test_on_a_terminal_progress_histograms_plots_and_the_rate(
    tmp_path: Path, on_a_terminal: Callable[[list[str], float], tuple[int, str]]
) -> None:
    pytest.importorskip("matplotlib")
    code, output = on_a_terminal(
        [sys.executable, "-m", "kvstore", "bench", *BENCH_ARGS, "--dist", "zipfian",
         "--rate", str(RATE), "--workdir", str(tmp_path)],
        TIMEOUT_S,
    )  # fmt: skip
    assert code == 0, output
    assert PROGRESS.search(output), output
    assert "plots skipped" not in output
    directory = _result_dir(output)
    [row] = json.loads((directory / "results.json").read_text())["rows"]
    assert row["dist"] == "zipfian" and row["zipfian_theta"] == 0.99 and row["rate"] == RATE
    assert row["check"] == "OK"
    assert 0.7 * RATE <= row["throughput"] <= 1.3 * RATE, row["throughput"]
    assert len(row["throughput_per_s"]) == SECONDS
    assert 0.7 * RATE * SECONDS <= sum(row["throughput_per_s"]) <= row["successes"]
    histogram = HdrHistogram.decode((directory / row["files"][0]).read_text().strip())
    assert histogram.get_total_count() == row["successes"]
    assert histogram.get_value_at_percentile(99) / 1000 == pytest.approx(row["p99_ms"])
    for name in row["files"][2:]:
        assert (directory / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {Path(name).name for name in row["files"][2:]} == {
        f"{row['name']}.throughput.png",
        "latency.png",
    }


def test_not_on_a_terminal_no_progress_and_without_matplotlib_no_plots(tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['matplotlib'] = None; "  # as if it were not installed
        "from kvstore.cli.bench import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *BENCH_ARGS, "--dist", "uniform,zipfian",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\r" not in done.stdout
    assert not re.search(r"[\d,]+ ops +[\d,]+ ops/s", done.stdout), done.stdout
    assert done.stdout.count("plots skipped: matplotlib is not installed") == 1, done.stdout
    assert "pip install 'kvstore[plots]'" in done.stdout
    directory = _result_dir(done.stdout)
    rows = json.loads((directory / "results.json").read_text())["rows"]
    assert [row["dist"] for row in rows] == ["uniform", "zipfian"]
    for row in rows:
        assert [Path(name).suffix for name in row["files"]] == [".hdr", ".hgrm"]
        assert all((directory / name).exists() for name in row["files"])
    assert not (directory / "plots").exists()


def test_sessions_started_in_the_same_second_get_directories_of_their_own(tmp_path: Path) -> None:
    directories = [session_directory(tmp_path) for _ in range(3)]
    assert len(set(directories)) == 3 and all(d.is_dir() for d in directories)
    assert all(d.parent == tmp_path for d in directories)
