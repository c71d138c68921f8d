"""kv-bench's pictures, drawn with matplotlib (an optional extra: ``kvstore[plots]``).

Importing this module fails with ImportError when matplotlib is missing; the caller
(:mod:`kvstore.bench.artifacts`) then skips plots. Figures are drawn on matplotlib's Agg
canvas directly (no pyplot, no global figure state, no display needed), and written as PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hdrh.histogram import HdrHistogram
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

DPI = 100
FAULT_COLOURS = {
    "kill-primary": "tab:red",
    "kill-backup": "tab:orange",
    "pause-primary": "tab:purple",
    "zookeeper-restart": "tab:brown",
    "hostile": "tab:gray",
}
# Percentiles on HdrHistogram's usual axis: x = 1 / (1 - p), so 90 %, 99 %, 99.9 % are evenly
# spaced on a log scale.
NINES = (0.0, 90.0, 99.0, 99.9, 99.99, 99.999)
CURVE_POINTS = 120


def throughput(
    path: Path,
    title: str,
    per_second: Sequence[int],
    per_100ms: Sequence[int],
    faults: Sequence[tuple[float, str]],
) -> None:
    """Successful operations per second over the run (filled), the same in 100 ms windows
    (a thin line, scaled to ops/s: a failover's gap shows there), a dashed line per fault."""
    figure = Figure(figsize=(9, 3.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.stairs(per_second, range(len(per_second) + 1), fill=True, alpha=0.3, color="tab:blue")
    axes.stairs(per_second, range(len(per_second) + 1), color="tab:blue", label="ops/s, per second")
    if per_100ms:
        edges = [i / 10 for i in range(len(per_100ms) + 1)]
        rates = [count * 10 for count in per_100ms]
        axes.stairs(rates, edges, color="tab:green", linewidth=0.7, label="ops/s, per 100 ms")
    labelled: set[str] = set()
    for at_s, kind in faults:
        axes.axvline(
            at_s,
            color=FAULT_COLOURS.get(kind, "black"),
            linestyle="--",
            linewidth=1.2,
            label=None if kind in labelled else kind,
        )
        labelled.add(kind)
    axes.set_xlim(0, max(len(per_second), 1))
    axes.set_ylim(bottom=0)
    axes.set_xlabel("seconds since the load started")
    axes.set_ylabel("successful operations per second")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    figure.savefig(path)


def latency(path: Path, histograms: Mapping[str, HdrHistogram]) -> None:
    """Latency (ms, log scale) by percentile, one curve per configuration."""
    figure = Figure(figsize=(9, 5.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, histogram in histograms.items():
        points = _curve(histogram)
        if points:
            axes.plot([x for x, _ in points], [y for _, y in points], label=name, linewidth=1.3)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(FixedLocator([100 / (100 - p) for p in NINES]))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([f"{p:g}%" for p in NINES])
    axes.set_xlim(left=1)
    axes.set_xlabel("percentile")
    axes.set_ylabel("latency, ms")
    axes.set_title("latency by percentile (HDR histograms)", fontsize=9)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7, loc="lower right")
    figure.savefig(path)


def _curve(histogram: HdrHistogram) -> list[tuple[float, float]]:
    """(1 / (1 - p), latency ms) from p = 0 up to the highest percentile the count resolves."""
    count = histogram.get_total_count()
    if count == 0:
        return []
    points = []
    for step in range(CURVE_POINTS + 1):
        x = 10 ** (step / 20)  # 1 ... 10^6, i.e. p from 0 to 99.9999 %
        if x > count:
            break
        percentile = 100 * (1 - 1 / x)
        points.append((x, histogram.get_value_at_percentile(percentile) / 1000))
    points.append((float(count), histogram.get_max_value() / 1000))
    return points
