"""What kv-bench writes beside its JSON: the HDR histograms of every run, and plots.

In the session's directory (the one holding ``results.json``):
- ``histograms/<run>.hdr``: the run's latency histogram (microseconds) in HdrHistogram's
  compressed, base64 encoded form, one line; ``HdrHistogram.decode`` (the ``hdrhistogram``
  package) or any HdrHistogram library reads it back;
- ``histograms/<run>.hgrm``: its percentile distribution as text, in milliseconds, the
  format HdrHistogram's own tools print (and its online plotter reads);
- ``plots/<run>.throughput.png``: successful operations in each second of the run (and, as a
  thin line, in each 100 ms scaled to a rate, where a failover's gap shows), with a dashed
  line at every fault injected (kills, pauses, ZooKeeper restarts, hostile requests);
- ``plots/latency.png``: latency by percentile, one curve per configuration (its runs'
  histograms added up), on HdrHistogram's usual axis (0 %, 90 %, 99 %, 99.9 %, ...).

A run is ``<configuration name>`` or, from the second round on, ``<name>-round<k>``. Plots
need matplotlib (``pip install 'kvstore[plots]'``); without it they are skipped and
:attr:`Artifacts.skipped_because` says why, and everything else is still written. Files are
rewritten after every run, so an interrupted session keeps what it measured.
"""

from __future__ import annotations

import bisect
import io
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from kvstore.bench.workload import new_histogram

MS_PER_US = 1000  # histograms are recorded in microseconds; the text form is in milliseconds


def per_window(response_ns: Sequence[int], seconds: float, window_s: float = 1.0) -> list[int]:
    """How many responses fell in each window ``[i, i+1) * window_s`` of the run's
    ``seconds`` (times in ns on the run's clock; the few answered after the deadline are
    not counted)."""
    ordered = sorted(response_ns)
    windows = math.ceil(seconds / window_s - 1e-9)
    edges = [int(i * window_s * 1e9) for i in range(windows + 1)]
    return [
        bisect.bisect_left(ordered, high) - bisect.bisect_left(ordered, low)
        for low, high in itertools.pairwise(edges)
    ]


def fault_marks(row: dict[str, Any]) -> list[tuple[float, str]]:
    """(seconds on the run's clock, kind) of every fault a row's run injected."""
    if row.get("injected"):
        return [(fault["at_s"], fault["kind"]) for fault in row["injected"]]
    return [(at_s, "kill-primary") for at_s in row.get("kill_times_s", ())]


def percentile_text(histogram: HdrHistogram) -> str:
    """HdrHistogram's percentile distribution of ``histogram``, values in milliseconds."""
    out = io.BytesIO()
    histogram.output_percentile_distribution(out, MS_PER_US)
    return out.getvalue().decode()


def _load_plots() -> tuple[Any, str | None]:
    """The plotting module, or None and why not (matplotlib missing or broken)."""
    try:
        from kvstore.bench import plots
    except ImportError as exc:
        why = (
            "matplotlib is not installed"
            if (exc.name or "matplotlib").split(".")[0] == "matplotlib"
            else f"matplotlib could not be imported ({exc})"
        )
        return None, f"{why}; pip install 'kvstore[plots]' to get them"
    return plots, None


class Artifacts:
    """Writes the histograms and plots of a session's runs under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._plots, self.skipped_because = _load_plots()
        self._by_configuration: dict[str, HdrHistogram] = {}

    def add_run(self, row: dict[str, Any]) -> list[Path]:
        """Write the files of one run (a table row with ``histogram_encoded``); adds their
        paths to the row (``files``) and returns them."""
        histogram = HdrHistogram.decode(row["histogram_encoded"])
        run = row["name"] if not row.get("round") else f"{row['name']}-round{row['round']}"
        histograms = self.directory / "histograms"
        histograms.mkdir(parents=True, exist_ok=True)
        written = [histograms / f"{run}.hdr", histograms / f"{run}.hgrm"]
        written[0].write_text(row["histogram_encoded"] + "\n")
        written[1].write_text(percentile_text(histogram))
        merged = self._by_configuration.setdefault(row["name"], new_histogram())
        merged.add(histogram)
        if self._plots is not None:
            plots = self.directory / "plots"
            plots.mkdir(parents=True, exist_ok=True)
            written.append(plots / f"{run}.throughput.png")
            self._plots.throughput(
                written[-1],
                run,
                row.get("throughput_per_s", []),
                row.get("throughput_per_100ms", []),
                fault_marks(row),
            )
            written.append(plots / "latency.png")
            self._plots.latency(written[-1], self._by_configuration)
        row["files"] = [str(path.relative_to(self.directory)) for path in written]
        return written
