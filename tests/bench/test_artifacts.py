"""What kv-bench writes beside its JSON: histograms that decode back to what was measured,
throughput windows, and PNG plots that decode (when matplotlib is there)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.bench.artifacts import Artifacts, fault_marks, per_window
from kvstore.bench.workload import new_histogram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _histogram(seed: int, mean_us: float, count: int = 5000):
    rng = random.Random(seed)
    histogram = new_histogram()
    for _ in range(count):
        histogram.record_value(int(rng.expovariate(1 / mean_us)) + 1)
    return histogram


def _row(name: str, histogram, round_number: int = 0) -> dict:
    return {
        "name": name,
        "round": round_number,
        "histogram_encoded": histogram.encode().decode(),
        "throughput_per_s": [900, 1000, 400, 1000],
        "throughput_per_100ms": [100] * 20 + [0] * 5 + [80] * 15,
        "kill_times_s": [2.05],
    }


def test_per_window_counts_responses_in_each_window_of_the_run() -> None:
    responses = [int(t * 1e9) for t in (0.0, 0.5, 0.99, 1.0, 2.5, 2.99, 3.2)]
    assert per_window(responses, 3.0) == [3, 1, 2]  # 3.2 s: after the deadline, not counted
    assert per_window(responses, 3.0, 0.5) == [1, 2, 1, 0, 0, 2]
    assert per_window([], 2.0) == [0, 0]


def test_fault_marks_from_kills_or_the_nemesis() -> None:
    assert fault_marks({"kill_times_s": [4.0, 8.1]}) == [
        (4.0, "kill-primary"),
        (8.1, "kill-primary"),
    ]
    injected = [{"at_s": 3.5, "kind": "pause-primary", "node": "x", "longest_gap_s": 1.2}]
    assert fault_marks({"injected": injected, "kill_times_s": []}) == [(3.5, "pause-primary")]


def test_histogram_files_parse_back_to_the_measured_histogram(tmp_path: Path) -> None:
    from hdrh.histogram import HdrHistogram

    measured = _histogram(1, 300)
    row = _row("t4-k100", measured)
    Artifacts(tmp_path).add_run(row)
    encoded = (tmp_path / "histograms" / "t4-k100.hdr").read_text().strip()
    decoded = HdrHistogram.decode(encoded)
    assert decoded.get_total_count() == measured.get_total_count() == 5000
    for percentile in (50, 99, 99.9, 100):
        assert decoded.get_value_at_percentile(percentile) == measured.get_value_at_percentile(
            percentile
        )
    # The text form: HdrHistogram's percentile table, in milliseconds.
    table = (tmp_path / "histograms" / "t4-k100.hgrm").read_text().splitlines()
    assert table[0].split() == ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    rows = [line.split() for line in table[1:] if line.strip() and not line.startswith("#")]
    values_ms = [float(r[0]) for r in rows]
    percentiles = [float(r[1]) for r in rows]
    assert percentiles == sorted(percentiles) and percentiles[-1] == 1.0
    assert int(rows[-1][2]) == 5000
    assert values_ms[-1] == pytest.approx(measured.get_max_value() / 1000, abs=0.001)
    above = next(i for i, p in enumerate(percentiles) if p >= 0.5)
    median_ms = measured.get_value_at_percentile(50) / 1000
    assert values_ms[above - 1] - 0.001 <= median_ms <= values_ms[above] + 0.001
    assert row["files"][:2] == ["histograms/t4-k100.hdr", "histograms/t4-k100.hgrm"]


def test_later_rounds_get_files_of_their_own(tmp_path: Path) -> None:
    artifacts = Artifacts(tmp_path)
    artifacts.add_run(_row("t4", _histogram(1, 300), 0))
    artifacts.add_run(_row("t4", _histogram(2, 300), 1))
    names = sorted(p.name for p in (tmp_path / "histograms").iterdir())
    assert names == ["t4-round1.hdr", "t4-round1.hgrm", "t4.hdr", "t4.hgrm"]


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_are_written_and_decode(tmp_path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    artifacts = Artifacts(tmp_path)
    assert artifacts.skipped_because is None
    artifacts.add_run(_row("fast", _histogram(1, 200)))
    written = artifacts.add_run(_row("slow", _histogram(2, 900)))
    throughput = tmp_path / "plots" / "slow.throughput.png"
    latency = tmp_path / "plots" / "latency.png"
    assert throughput in written and latency in written
    for path in (throughput, latency):
        width, height = _png_size(path)
        assert width >= 600 and height >= 300
        pixels = image.imread(path)
        assert pixels.shape[:2] == (height, width)
        assert pixels.std() > 0.01  # something is drawn, not a blank canvas
    assert (tmp_path / "plots" / "fast.throughput.png").exists()


def test_without_matplotlib_plots_are_skipped_with_the_reason(tmp_path: Path) -> None:
    # A fresh interpreter in which importing matplotlib fails, as when it is not installed.
    script = f"""
import sys
sys.modules["matplotlib"] = None
from kvstore.bench.artifacts import Artifacts
from kvstore.bench.workload import new_histogram
histogram = new_histogram()
histogram.record_value(100)
artifacts = Artifacts(__import__("pathlib").Path({str(tmp_path)!r}))
print(artifacts.skipped_because)
artifacts.add_run({{"name": "t1", "histogram_encoded": histogram.encode().decode()}})
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "matplotlib is not installed" in done.stdout
    assert "pip install 'kvstore[plots]'" in done.stdout
    assert sorted(p.name for p in (tmp_path / "histograms").iterdir()) == ["t1.hdr", "t1.hgrm"]
    assert not (tmp_path / "plots").exists()
