"""A one-line live progress report for load runs, on a terminal only.

``maybe_progress(stream)`` returns a reporter when ``stream`` is a terminal, else None (so a
log file or a pipe gets no carriage-return noise). The load runner calls it about once a
second with the operations and failures so far; ``done()`` clears the line.
"""

from __future__ import annotations

from typing import TextIO


class TtyProgress:
    def __init__(self, stream: TextIO, seconds: float, label: str = "") -> None:
        self._stream = stream
        self._seconds = seconds
        self._label = label
        self._width = 0

    def __call__(self, successes: int, failures: int, elapsed_s: float) -> None:
        rate = successes / elapsed_s if elapsed_s > 0 else 0.0
        line = (
            f"{self._label}  {elapsed_s:5.1f}/{self._seconds:g} s  {successes:,} ops  "
            f"{rate:,.0f} ops/s  {failures:,} failed"
        )
        self._width = max(self._width, len(line))
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()

    def done(self) -> None:
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()


def maybe_progress(stream: TextIO, seconds: float, label: str = "") -> TtyProgress | None:
    """A progress reporter for ``stream`` if it is a terminal, else None; ``label`` starts
    the line (kv-bench: which configuration)."""
    isatty = getattr(stream, "isatty", None)
    return TtyProgress(stream, seconds, label) if isatty is not None and isatty() else None
