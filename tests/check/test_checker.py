"""The linearizability checker: hand-built histories, a brute-force cross-check, a 1M-op log."""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from kvstore.check.checker import (
    DUPLICATE_WRITE,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_VIOLATIONS,
    NEVER_WRITTEN,
    NO_LINEARIZATION,
    READ_FROM_FUTURE,
    STALE_READ,
    TWO_VALUES_CURRENT,
    CheckResult,
    UnknownKey,
    check,
    check_file,
    run_check,
)
from kvstore.check.history import CAS, DELETE, READ, WRITE, Event, Op, op_events, write_events


def w(value: str, invoke_ns: int, complete_ns: int | None, key: str = "k", tid: int = 0) -> Op:
    return Op(tid, WRITE, key, value, invoke_ns, complete_ns)


def r(value: str | None, invoke_ns: int, complete_ns: int | None, key: str = "k") -> Op:
    return Op(1, READ, key, value, invoke_ns, complete_ns)


def reasons(result: CheckResult) -> list[str]:
    return [violation.reason for violation in result.violations]


# --- hand-built histories -------------------------------------------------------------------


def test_empty_history_is_ok() -> None:
    assert check([]) == CheckResult(True, 0, 0, [])


def test_sequential_history_is_ok() -> None:
    ops = [r("", 0, 1), w("a", 2, 3), r("a", 4, 5), w("b", 6, 7), r("b", 8, 9), r("b", 10, 11)]
    result = check(ops)
    assert result.is_ok
    assert (result.op_count, result.key_count) == (6, 1)


def test_reads_concurrent_with_a_write_may_see_old_then_new() -> None:
    ops = [w("a", 0, 10), r("", 1, 2), r("a", 3, 4), r("a", 5, 12)]
    assert check(ops).is_ok


def test_new_then_old_read_during_a_write_is_stale() -> None:
    ops = [w("a", 0, 10), r("a", 1, 2), r("", 3, 4)]
    assert reasons(check(ops)) == [STALE_READ]


def test_stale_read_after_a_newer_write_completed() -> None:
    ops = [w("a", 0, 1), w("b", 2, 3), r("a", 4, 5)]
    result = check(ops)
    assert reasons(result) == [STALE_READ]
    assert set(result.violations[0].ops) == {w("a", 0, 1), w("b", 2, 3), r("a", 4, 5)}


def test_lost_write_is_reported_with_the_lost_write() -> None:
    lost = w("b", 4, 5)
    ops = [w("a", 0, 1), r("a", 2, 3), lost, r("a", 6, 7), r("a", 8, 9)]
    result = check(ops)
    assert reasons(result) == [STALE_READ]
    assert lost in result.violations[0].ops


def test_read_of_initial_value_after_a_write_completed_is_stale() -> None:
    assert reasons(check([w("a", 0, 1), r("", 2, 3)])) == [STALE_READ]


def test_reads_of_initial_value_before_any_write_are_ok() -> None:
    assert check([r("", 0, 1), r("", 2, 3), w("a", 4, 5), r("a", 6, 7)]).is_ok
    assert check([r("", 0, 1), r("", 2, 3)]).is_ok


def test_equal_timestamps_are_concurrent() -> None:
    assert check([w("a", 0, 5), r("", 5, 6)]).is_ok  # the read began as the write ended
    assert not check([w("a", 0, 5), r("", 6, 7)]).is_ok
    # Two forward zones sharing an endpoint: [1, 5] for "a" and [5, 9] for "b".
    assert check([w("a", 0, 1), r("a", 5, 6), w("b", 2, 5), r("b", 9, 10)]).is_ok
    assert not check([w("a", 0, 1), r("a", 5, 6), w("b", 2, 4), r("b", 9, 10)]).is_ok


def test_read_of_a_never_written_value() -> None:
    result = check([w("a", 0, 1), r("ghost", 2, 3)])
    assert reasons(result) == [NEVER_WRITTEN]
    assert result.violations[0].ops == (r("ghost", 2, 3),)


def test_read_from_the_future() -> None:
    result = check([r("a", 0, 1), w("a", 2, 3)])
    assert reasons(result)[0] == READ_FROM_FUTURE
    assert set(result.violations[0].ops) == {r("a", 0, 1), w("a", 2, 3)}


def test_concurrent_writes_observed_in_either_order_are_ok() -> None:
    writes = [w("a", 0, 10), w("b", 0, 10)]
    assert check([*writes, r("a", 11, 12), r("a", 13, 14)]).is_ok
    assert check([*writes, r("b", 11, 12), r("b", 13, 14)]).is_ok
    assert check([*writes, r("a", 2, 3), r("b", 4, 5), r("b", 11, 12)]).is_ok
    assert check([*writes, r("b", 2, 3), r("a", 4, 5), r("a", 11, 12)]).is_ok


def test_concurrent_writes_observed_in_both_orders_are_a_violation() -> None:
    writes = [w("a", 0, 10), w("b", 0, 10)]
    assert reasons(check([*writes, r("a", 11, 12), r("b", 13, 14)])) == [TWO_VALUES_CURRENT]
    # While the writes run: "a", then "b", then "a" again, which is a stale read of "a".
    assert reasons(check([*writes, r("a", 2, 3), r("b", 4, 5), r("a", 6, 7)])) == [STALE_READ]


def test_pending_write_that_was_read_takes_effect_any_time_after_invocation() -> None:
    assert check([w("a", 5, None), r("", 6, 7), r("a", 100, 101), r("a", 200, 201)]).is_ok
    assert check([w("a", 0, 1), w("b", 5, None), r("a", 6, 7), r("b", 8, 9)]).is_ok


def test_pending_write_read_before_its_invocation_is_from_the_future() -> None:
    assert reasons(check([r("a", 0, 1), w("a", 5, None)])) == [READ_FROM_FUTURE]


def test_pending_write_never_read_is_dropped() -> None:
    assert check([w("a", 0, 1), w("b", 2, None), r("a", 10, 11)]).is_ok
    assert check([w("b", 2, None), r("", 10, 11)]).is_ok


def test_pending_reads_are_dropped() -> None:
    assert check([w("a", 0, 1), r(None, 2, None), r("a", 3, 4)]).is_ok


def test_duplicate_write_values_are_an_input_error_not_a_crash() -> None:
    result = check([w("a", 0, 1), w("a", 2, 3), r("a", 4, 5)])
    assert reasons(result) == [DUPLICATE_WRITE]
    assert result.violations[0].ops == (w("a", 0, 1), w("a", 2, 3))
    assert reasons(check([w("", 0, 1), r("", 2, 3)])) == [DUPLICATE_WRITE]


def test_keys_are_independent_and_every_violating_key_is_reported() -> None:
    ops = [
        w("a", 0, 1, key="x"), r("a", 2, 3, key="y"),  # "a" was written to x, not y
        w("a", 0, 1, key="z"), w("b", 2, 3, key="z"), r("a", 4, 5, key="z"),
        w("a", 0, 1, key="ok"), r("a", 2, 3, key="ok"),
    ]  # fmt: skip
    result = check(ops)
    assert [(v.key, v.reason) for v in result.violations] == [
        ("y", NEVER_WRITTEN),
        ("z", STALE_READ),
    ]
    assert (result.op_count, result.key_count, result.violating_key_count) == (7, 4, 2)


def test_violations_per_key_are_capped() -> None:
    ops = [w("a", 0, 1)] + [r(f"ghost{i}", 2 + i, 3 + i) for i in range(20)]
    assert len(check(ops).violations) == 3
    assert len(check(ops, max_violations_per_key=5).violations) == 5


def test_run_check_prints_ok(tmp_path: Path) -> None:
    path = _write_ops(tmp_path / "ok.log", [w("a", 0, 1, tid=1), r("a", 2, 3)])
    out = io.StringIO()
    assert run_check(path, out=out) == 0
    assert out.getvalue() == "OK (2 operations, 1 keys)\n"


def test_run_check_prints_violations_with_the_operations(tmp_path: Path) -> None:
    ops = [w("a", 0, 1, tid=2), w("b", 2, 3, tid=3), r("a", 4, 5)]
    path = _write_ops(tmp_path / "stale.log", ops)
    out = io.StringIO()
    assert run_check(path, out=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("VIOLATION key='k': stale read: ")
    assert "tid 3 write 'k' = 'b' [2 ns, 3 ns]" in [line.strip() for line in lines[1:4]]
    assert lines[-1].startswith("NOT LINEARIZABLE: 1 violations on 1 of 1 keys")


def test_run_check_reports_a_malformed_log(tmp_path: Path) -> None:
    path = tmp_path / "bad.log"
    path.write_text("1\tINV\t1\tR\tk\nnonsense\n", encoding="utf-8")
    out = io.StringIO()
    assert run_check(path, out=out) == 2
    assert out.getvalue().startswith("ERROR: line 2: ")


def _write_ops(path: Path, ops: Sequence[Op]) -> Path:
    write_events(path, [event for op in ops for event in op_events(op)])
    return path


# --- delete and compare-and-set (the search) --------------------------------------------------


def d(existed: bool | None, invoke_ns: int, complete_ns: int | None, tid: int = 2) -> Op:
    return Op(tid, DELETE, "k", None, invoke_ns, complete_ns, returned_flag=existed)


def cas(expected: str, new: str, swapped: bool | None, invoke_ns: int, complete_ns: int | None,
        tid: int = 3) -> Op:  # fmt: skip
    return Op(tid, CAS, "k", new, invoke_ns, complete_ns, expected=expected, returned_flag=swapped)


def test_cas_reported_success_although_the_value_differed() -> None:
    result = check([w("a", 0, 1), cas("b", "x", True, 2, 3)])
    assert reasons(result) == [NO_LINEARIZATION]
    assert result.violations[0].key == "k"
    assert cas("b", "x", True, 2, 3) in result.violations[0].ops


def test_cas_reported_failure_although_the_value_matched() -> None:
    assert reasons(check([w("a", 0, 1), cas("a", "x", False, 2, 3)])) == [NO_LINEARIZATION]
    assert check([w("a", 0, 1), cas("b", "x", False, 2, 3), r("a", 4, 5)]).is_ok


def test_two_concurrent_cas_from_the_same_value_cannot_both_succeed() -> None:
    both = [w("a", 0, 1), cas("a", "x", True, 2, 10, tid=3), cas("a", "y", True, 3, 9, tid=4)]
    result = check(both)
    assert reasons(result) == [NO_LINEARIZATION]
    assert set(both[1:]) <= set(result.violations[0].ops)
    one = [w("a", 0, 1), cas("a", "x", True, 2, 10, tid=3), cas("a", "y", False, 3, 9, tid=4)]
    assert check([*one, r("x", 11, 12)]).is_ok
    assert not check([*one, r("y", 11, 12)]).is_ok


def test_cas_chain_from_absent() -> None:
    ops = [cas("", "a", True, 0, 1), cas("a", "b", True, 2, 3), cas("", "c", False, 4, 5)]
    assert check([*ops, r("b", 6, 7)]).is_ok
    assert not check([w("z", 0, 1), cas("", "a", True, 2, 3)]).is_ok  # not absent any more


def test_delete_returning_0_after_a_completed_write() -> None:
    result = check([w("a", 0, 1), d(False, 2, 3)])
    assert reasons(result) == [NO_LINEARIZATION]
    assert result.violations[0].ops == (w("a", 0, 1), d(False, 2, 3))


def test_delete_results() -> None:
    assert check([d(False, 0, 1), w("a", 2, 3), d(True, 4, 5), d(False, 6, 7)]).is_ok
    assert not check([d(True, 0, 1)]).is_ok  # nothing to delete
    assert not check([w("a", 0, 1), d(True, 2, 3, tid=2), d(True, 4, 5, tid=4)]).is_ok
    assert check([w("a", 0, 10), d(False, 1, 2), r("a", 11, 12)]).is_ok  # delete came first


def test_a_read_of_empty_after_a_delete_is_ok() -> None:
    assert check([w("a", 0, 1), d(True, 2, 3), r("", 4, 5)]).is_ok
    assert not check([w("a", 0, 1), d(True, 2, 3), r("a", 4, 5)]).is_ok


def test_a_pending_cas_whose_effect_a_later_read_saw() -> None:
    assert check([w("a", 0, 1), cas("a", "x", None, 2, None), r("x", 5, 6)]).is_ok
    assert check([w("a", 0, 1), cas("a", "x", None, 2, None), r("a", 5, 6)]).is_ok  # never
    assert not check([w("a", 0, 1), cas("b", "x", None, 2, None), r("x", 5, 6)]).is_ok
    assert not check([w("a", 0, 1), r("x", 2, 3), cas("a", "x", None, 5, None)]).is_ok


def test_pending_deletes_and_writes_may_take_effect_later_or_never() -> None:
    assert check([w("a", 0, 1), d(None, 2, None), r("a", 3, 4), r("", 5, 6)]).is_ok
    assert check([w("a", 0, 1), d(None, 2, None), r("a", 3, 4), r("a", 5, 6)]).is_ok
    assert not check([w("a", 0, 1), d(None, 2, None), r("", 3, 4), r("a", 5, 6)]).is_ok
    assert check([d(False, 0, 1), w("a", 2, None), r("", 3, 4), r("a", 5, 6)]).is_ok
    assert check([d(False, 0, 1), w("a", 2, None), r("", 3, 4)]).is_ok


def test_keys_with_delete_or_cas_may_repeat_write_values() -> None:
    ops = [w("a", 0, 1), d(True, 2, 3), w("a", 4, 5), cas("a", "a", True, 6, 7), r("a", 8, 9)]
    assert check(ops).is_ok
    assert reasons(check([w("a", 0, 1), w("a", 2, 3)])) == [DUPLICATE_WRITE]  # reads/writes only


def test_each_key_goes_to_its_own_algorithm() -> None:
    ops = [
        w("a", 0, 1, key="rw"), w("b", 2, 3, key="rw"), r("a", 4, 5, key="rw"),  # stale
        w("a", 0, 1), d(False, 2, 3),  # key "k": delete of an existing key returned 0
        w("a", 0, 1, key="fine"), r("a", 2, 3, key="fine"),
    ]  # fmt: skip
    result = check(ops)
    assert [(v.key, v.reason) for v in result.violations] == [
        ("rw", STALE_READ),
        ("k", NO_LINEARIZATION),
    ]


def hard_history(write_count: int) -> list[Op]:
    """Many concurrent writes, a delete, and a read of a value nobody wrote: the search has to
    try every subset of the writes before it can say no (the memo only saves the order)."""
    writes = [w(f"v{i}", 0, 100, tid=10 + i) for i in range(write_count)]
    return [*writes, d(None, 0, None), r("never", 200, 201)]


def test_the_step_budget_makes_a_key_unknown_not_a_violation() -> None:
    result = check(hard_history(16), max_search_steps=10_000)
    assert not result.is_ok
    assert result.violations == []
    assert result.unknown_keys == [UnknownKey("k", 18, 10_000)]
    assert (result.verdict, result.exit_code) == ("UNKNOWN", EXIT_UNKNOWN)
    decided = check(hard_history(6), max_search_steps=10_000)
    assert (decided.verdict, decided.exit_code) == ("NOT LINEARIZABLE", EXIT_VIOLATIONS)
    assert check([]).exit_code == EXIT_OK


def test_run_check_prints_unknown_keys_and_exits_3(tmp_path: Path) -> None:
    path = _write_ops(tmp_path / "hard.log", hard_history(16))
    out = io.StringIO()
    assert run_check(path, out=out, max_search_steps=1_000) == 3
    assert out.getvalue().splitlines() == [
        "UNKNOWN key='k': undecided after 1000 search steps (18 operations)",
        "UNKNOWN: no violations, 1 keys undecided of 1 keys (18 operations)",
    ]
    violating = [*hard_history(16), w("a", 0, 1, key="x"), r("", 2, 3, key="x")]
    path = _write_ops(tmp_path / "hard_and_bad.log", violating)
    assert run_check(path, out=io.StringIO(), max_search_steps=1_000) == 1


def test_run_check_prints_a_search_violation_with_its_operations(tmp_path: Path) -> None:
    ops = [w("a", 0, 1, tid=1), cas("a", "x", True, 2, 10), cas("a", "y", True, 3, 9, tid=4)]
    path = _write_ops(tmp_path / "cas.log", ops)
    out = io.StringIO()
    assert run_check(path, out=out) == 1
    lines = [line.strip() for line in out.getvalue().splitlines()]
    assert lines[0].startswith("VIOLATION key='k': no linearization: the longest legal order")
    assert "covers 2 of 3 operations" in lines[0]
    assert "tid 4 cas 'k' 'a' => 'y' -> 1 [3 ns, 9 ns]" in lines
    assert "tid 3 cas 'k' 'a' => 'x' -> 1 [2 ns, 10 ns]" in lines
    assert lines[-1].startswith("NOT LINEARIZABLE: 1 violations on 1 of 1 keys")


# --- cross-check against brute force --------------------------------------------------------


def brute_force_is_linearizable(ops: Sequence[Op]) -> bool:
    """Wing & Gong search over linearization orders, memoized on (ops done, register values).

    A pending write completes at +infinity and must be placed too: placing an unread write
    last changes no read, so this is the same as letting it be dropped.
    """
    ops = [op for op in ops if not (op.kind == READ and op.complete_ns is None)]
    keys = sorted({op.key for op in ops})
    ends = [math.inf if op.complete_ns is None else op.complete_ns for op in ops]
    must_follow = [sum(1 << j for j, end in enumerate(ends) if end < op.invoke_ns) for op in ops]
    everything = (1 << len(ops)) - 1
    dead_ends: set[tuple[int, tuple[str, ...]]] = set()

    def search(done: int, values: tuple[str, ...]) -> bool:
        if done == everything:
            return True
        if (done, values) in dead_ends:
            return False
        for index, op in enumerate(ops):
            if done >> index & 1 or must_follow[index] & ~done:
                continue
            slot = keys.index(op.key)
            if op.kind == WRITE:
                after = (*values[:slot], op.value or "", *values[slot + 1 :])
            elif values[slot] == op.value:
                after = values
            else:
                continue
            if search(done | 1 << index, after):
                return True
        dead_ends.add((done, values))
        return False

    return search(0, ("",) * len(keys))


def simulated_history(rng: random.Random, op_count: int, keys: Sequence[str]) -> list[Op]:
    """A linearizable history: each op takes effect at a random point of its interval."""
    planned = []
    for index in range(op_count):
        invoke_ns = rng.randrange(12)
        complete_ns: int | None = invoke_ns + rng.randrange(6)
        if rng.random() < 0.15:
            complete_ns = None
        effect_ns = rng.uniform(invoke_ns, invoke_ns + 8 if complete_ns is None else complete_ns)
        kind = rng.choice((READ, WRITE))
        planned.append((effect_ns, index, kind, rng.choice(keys), invoke_ns, complete_ns))
    registers: dict[str, str] = {}
    ops = []
    for _, index, kind, key, invoke_ns, complete_ns in sorted(planned):
        value: str | None
        if kind == WRITE:
            value = f"v{index}"
            if complete_ns is not None or rng.random() < 0.5:
                registers[key] = value
        else:
            value = None if complete_ns is None else registers.get(key, "")
        ops.append(Op(index, kind, key, value, invoke_ns, complete_ns))
    return ops


def corrupted(rng: random.Random, ops: list[Op]) -> list[Op]:
    """Change one op: a read's value, or an op's real-time interval."""
    ops = list(ops)
    index = rng.randrange(len(ops))
    op = ops[index]
    if op.kind == READ and op.complete_ns is not None and rng.random() < 0.6:
        written = [o.value or "" for o in ops if o.kind == WRITE and o.key == op.key]
        value = rng.choice([*written, "", "never-written"])
        ops[index] = replace(op, value=value)
    else:
        invoke_ns = rng.randrange(12)
        complete_ns = None if op.complete_ns is None else invoke_ns + rng.randrange(4)
        ops[index] = replace(op, invoke_ns=invoke_ns, complete_ns=complete_ns)
    return ops


def random_history(rng: random.Random) -> list[Op]:
    keys = ("a", "b")[: rng.randint(1, 2)]
    ops = simulated_history(rng, rng.randint(1, 8), keys)
    for _ in range(rng.choice((0, 1, 1, 2))):
        ops = corrupted(rng, ops)
    return ops


def test_random_small_histories_agree_with_brute_force() -> None:
    rng = random.Random(20240611)
    verdicts = {True: 0, False: 0}
    for _ in range(10_000):
        ops = random_history(rng)
        expected = brute_force_is_linearizable(ops)
        result = check(ops)
        assert result.is_ok == expected, ops
        assert expected or result.violations, ops
        verdicts[expected] += 1
    assert min(verdicts.values()) >= 1500, verdicts  # both verdicts are well exercised


def test_brute_force_agrees_on_the_hand_built_cases() -> None:
    assert brute_force_is_linearizable([w("a", 0, 5), r("", 5, 6)])
    assert not brute_force_is_linearizable([w("a", 0, 5), r("", 6, 7)])
    assert brute_force_is_linearizable([w("a", 5, None), r("a", 100, 101)])
    assert not brute_force_is_linearizable([r("a", 0, 1), w("a", 5, None)])


# --- a large log ----------------------------------------------------------------------------


def simulated_log_events(
    op_count: int, thread_count: int, key_count: int, seed: int
) -> list[Event]:
    """Events of a linearizable run: op i takes effect at (i + threads) * 10 ns, thread i % threads.

    Each op starts and ends less than ``threads * 5`` ns from its effect, so a thread's ops never
    overlap. About 0.1% of writes are pending; half of those take effect.
    """
    rng = random.Random(seed)
    slot_ns = 10
    window_ns = thread_count * slot_ns // 2
    registers: dict[str, str] = {}
    events: list[Event] = []
    for index in range(op_count):
        tid = index % thread_count
        effect_ns = (index + thread_count) * slot_ns
        invoke_ns = effect_ns - rng.randrange(window_ns)
        complete_ns = effect_ns + rng.randrange(window_ns)
        key = f"key{rng.randrange(key_count)}"
        if rng.random() < 0.5:
            value = f"value{index}"
            is_pending = rng.random() < 0.001
            if not is_pending or rng.random() < 0.5:
                registers[key] = value
            events.append((invoke_ns, False, tid, WRITE, key, value))
            if not is_pending:
                events.append((complete_ns, True, tid, WRITE, key, None))
        else:
            events.append((invoke_ns, False, tid, READ, key, None))
            events.append((complete_ns, True, tid, READ, key, registers.get(key, "")))
    return events


def test_a_million_operation_log_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "million.log"
    write_events(path, simulated_log_events(1_000_000, 8, 10_000, seed=7))
    started = time.perf_counter()
    result = check_file(path)
    elapsed_s = time.perf_counter() - started
    with capsys.disabled():
        print(f"\ncheck_file on 1,000,000 operations: {elapsed_s:.2f} s")
    assert result.is_ok, result.violations[:3]
    assert (result.op_count, result.key_count) == (1_000_000, 10_000)
