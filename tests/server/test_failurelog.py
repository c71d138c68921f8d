"""A step that fails over and over is logged in a few plain lines, and its recovery once."""

from __future__ import annotations

import logging

import pytest

from kvstore.server.failurelog import FailureLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_repeats_are_held_back_and_the_recovery_is_said(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    failures = FailureLog(logging.getLogger("t"), "control step", repeat_every_s=30, clock=clock)
    caplog.set_level(logging.INFO, "t")
    failures.succeeded()  # nothing failed: nothing to say
    for _ in range(7):  # a failure every 5 s for 35 s
        failures.failed("ZooKeeper reading metadata failed: no answer in time")
        clock.now += 5
    failures.failed("another reason")
    failures.succeeded()
    failures.succeeded()
    assert [r.getMessage() for r in caplog.records] == [
        "control step failed: ZooKeeper reading metadata failed: no answer in time (retrying)",
        "control step still failing: ZooKeeper reading metadata failed: no answer in time "
        "(6 more times in the last 30 s)",
        "control step failed: another reason (retrying)",
        "control step works again, after 8 failed attempts over 35.0 s",
    ]
