"""The register model: what each kind of operation may return in a state, and the state after."""

from __future__ import annotations

import pytest

from kvstore.check.history import CAS, DELETE, READ, WRITE, Op
from kvstore.check.register import INITIAL_STATE, is_constraining, step


def op(kind: str, value: str | None = None, expected: str | None = None, flag: bool | None = None,
       complete_ns: int | None = 2) -> Op:  # fmt: skip
    return Op(1, kind, "k", value, 1, complete_ns, expected, flag)


def test_the_initial_state_is_absent_which_is_the_empty_string() -> None:
    assert INITIAL_STATE == ""


@pytest.mark.parametrize(
    ("state", "operation", "expected_step"),
    [
        ("a", op(READ, "a"), (True, "a")),
        ("a", op(READ, "b"), (False, "a")),
        ("", op(READ, ""), (True, "")),
        ("a", op(WRITE, "b"), (True, "b")),
        ("a", op(DELETE, flag=True), (True, "")),
        ("a", op(DELETE, flag=False), (False, "")),
        ("", op(DELETE, flag=False), (True, "")),
        ("", op(DELETE, flag=True), (False, "")),
        ("a", op(CAS, "b", "a", True), (True, "b")),
        ("c", op(CAS, "b", "a", True), (False, "b")),
        ("c", op(CAS, "b", "a", False), (True, "c")),
        ("a", op(CAS, "b", "a", False), (False, "a")),
        ("", op(CAS, "b", "", True), (True, "b")),  # expected "": only if absent
        ("a", op(CAS, "b", "", True), (False, "b")),
        ("a", op(CAS, "b", "", False), (True, "a")),
    ],
)
def test_completed_operations(state: str, operation: Op, expected_step: tuple[bool, str]) -> None:
    ok, after = step(state, operation)
    assert ok == expected_step[0]
    if ok:  # the state after an impossible step is never used
        assert after == expected_step[1]


@pytest.mark.parametrize(
    ("state", "operation", "after"),
    [
        ("a", op(WRITE, "b", complete_ns=None), "b"),
        ("a", op(DELETE, complete_ns=None), ""),
        ("", op(DELETE, complete_ns=None), ""),
        ("a", op(CAS, "b", "a", complete_ns=None), "b"),  # swaps when it can
        ("c", op(CAS, "b", "a", complete_ns=None), "c"),  # else changes nothing
    ],
)
def test_pending_operations_always_fit(state: str, operation: Op, after: str) -> None:
    assert step(state, operation) == (True, after)


def test_only_pending_reads_are_dropped_up_front() -> None:
    assert not is_constraining(op(READ, None, complete_ns=None))
    assert is_constraining(op(READ, "a"))
    assert all(is_constraining(op(kind, complete_ns=None)) for kind in (WRITE, DELETE, CAS))


def test_an_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown operation kind"):
        step("", op("X"))
