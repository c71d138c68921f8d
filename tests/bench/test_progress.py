"""The live progress line: only on a terminal, one carriage-return line, cleared at the end."""

from __future__ import annotations

import io

from kvstore.bench.progress import maybe_progress


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
