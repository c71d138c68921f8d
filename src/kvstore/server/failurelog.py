"""Logging a step that fails over and over, say the node's control step while ZooKeeper is
away: the log must say what happened in a few plain lines, not the same warning every few
seconds for as long as the outage lasts, and it must say when the step works again.

Invariants: a failure whose text differs from the previous one is logged at once; the same
text again is logged at most once per ``repeat_every_s``, with how many failures came in
between; the first success after failures is logged once, with their count and duration.
Not thread-safe: one loop owns it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

REPEAT_EVERY_S = 30.0


class FailureLog:
    """The log lines of one repeated ``what`` (e.g. "control step")."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        repeat_every_s: float = REPEAT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._repeat_every_s = repeat_every_s
        self._clock = clock
        self._first_at: float | None = None  # when the current run of failures began
        self._failures = 0  # in the current run
        self._held = 0  # failures not logged since the last line
        self._reason = ""
        self._logged_at = 0.0

    def failed(self, reason: str) -> None:
        now = self._clock()
        if self._first_at is None:
            self._first_at = now
        self._failures += 1
        if reason != self._reason:
            self._reason, self._held, self._logged_at = reason, 0, now
            self._log.warning("%s failed: %s (retrying)", self._what, reason)
        elif now - self._logged_at >= self._repeat_every_s:
            self._log.warning(
                "%s still failing: %s (%d more times in the last %.0f s)",
                self._what,
                reason,
                self._held + 1,
                now - self._logged_at,
            )
            self._held, self._logged_at = 0, now
        else:
            self._held += 1

    def succeeded(self) -> None:
        if self._first_at is None:
            return
        self._log.info(
            "%s works again, after %d failed attempts over %.1f s",
            self._what,
            self._failures,
            self._clock() - self._first_at,
        )
        self._first_at, self._failures, self._held, self._reason = None, 0, 0, ""
