"""The Wing & Gong search on register histories with deletes and CAS: unit cases, a brute-force
cross-check, hypothesis properties on sequential histories, and the time of a 20,000-op log."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.check.checker import check, check_file
from kvstore.check.history import (
    CAS,
    DELETE,
    KINDS,
    READ,
    WRITE,
    Event,
    Op,
    cas_value,
    flag_value,
    write_events,
)
from kvstore.check.register import INITIAL_STATE, step
from kvstore.check.search import ILLEGAL, OK, UNKNOWN, linearize


def op(kind: str, value: str | None, invoke_ns: int, complete_ns: int | None,
       expected: str | None = None, flag: bool | None = None, tid: int = 0) -> Op:  # fmt: skip
    return Op(tid, kind, "k", value, invoke_ns, complete_ns, expected, flag)


def search(ops: Sequence[Op], max_steps: int = 100_000) -> str:
    return linearize(ops, step, INITIAL_STATE, max_steps).outcome


# --- the search itself ------------------------------------------------------------------------


def test_an_empty_or_all_pending_history_is_ok_without_a_step() -> None:
    assert linearize([], step, INITIAL_STATE).steps == 0
    pending = [op(WRITE, "a", 0, None), op(DELETE, None, 1, None), op(CAS, "b", 2, None, "a")]
    result = linearize(pending, step, INITIAL_STATE)
    assert (result.outcome, result.steps) == (OK, 0)


def test_a_sequential_history_takes_one_step_per_op() -> None:
    ops = [op(WRITE, f"v{i}", 2 * i, 2 * i + 1) for i in range(5_000)]
    ops.append(op(DELETE, None, 10_000, 10_001, flag=True))
    result = linearize(ops, step, INITIAL_STATE)
    assert (result.outcome, result.steps, result.prefix_length) == (OK, len(ops), len(ops))


def test_pending_ops_may_be_left_out_or_placed_late() -> None:
    base = [op(WRITE, "a", 0, 1), op(CAS, "b", 2, None, "a")]
    assert search([*base, op(READ, "a", 10, 11)]) == OK
    assert search([*base, op(READ, "b", 10, 11)]) == OK
    assert search([*base, op(READ, "b", 10, 11), op(READ, "a", 12, 13)]) == ILLEGAL


def test_equal_times_are_concurrent() -> None:
    assert search([op(WRITE, "a", 0, 5), op(READ, "", 5, 6)]) == OK
    assert search([op(WRITE, "a", 0, 5), op(READ, "", 6, 7)]) == ILLEGAL


def test_a_dead_end_reports_the_deepest_prefix_and_the_ops_stuck_after_it() -> None:
    ops = [
        op(WRITE, "a", 0, 1),
        op(CAS, "x", 2, 10, "a", True, tid=1),
        op(CAS, "y", 3, 9, "a", True, tid=2),
        op(READ, "x", 20, 21),
    ]
    result = linearize(ops, step, INITIAL_STATE)
    assert (result.outcome, result.prefix_length) == (ILLEGAL, 2)
    assert result.prefix_tail[0] == 0
    assert set(result.stuck) == {1, 2} - set(result.prefix_tail)
    assert result.stuck_state in {"x", "y"}


def test_the_budget_gives_unknown_with_the_steps_taken() -> None:
    writes = [op(WRITE, f"v{i}", 0, 100, tid=i) for i in range(12)]
    ops = [*writes, op(READ, "never", 200, 201)]
    result = linearize(ops, step, INITIAL_STATE, max_steps=500)
    assert (result.outcome, result.steps) == (UNKNOWN, 500)
    assert linearize(ops, step, INITIAL_STATE, max_steps=10_000_000).outcome == ILLEGAL


def test_many_pending_writes_do_not_blow_up_the_search() -> None:
    """Each pending write may take effect at any later point or never: 2**20 subsets, unless
    the search tries pending ops last and skips configurations subsumed by explored ones."""
    pending = [op(WRITE, f"p{i}", i, None, tid=100 + i) for i in range(20)]
    chain = [op(CAS, f"v{i + 1}", 100 + 2 * i, 101 + 2 * i, f"v{i}", True) for i in range(1_000)]
    first = op(WRITE, "v0", 50, 51)
    legal = [*pending, first, *chain, op(READ, "p7", 5_000, 5_001)]
    result = linearize(legal, step, INITIAL_STATE, max_steps=1_000_000)
    assert result.outcome == OK
    illegal = [*legal, op(DELETE, None, 6_000, 6_001, flag=False)]  # a pending write is left
    result = linearize(illegal, step, INITIAL_STATE, max_steps=1_000_000)
    assert result.outcome == ILLEGAL
    assert result.prefix_length >= len(legal) - len(pending) + 1  # all completed ops but one
    assert result.stuck[0] == len(illegal) - 1


# --- cross-check against brute force ----------------------------------------------------------


def reference_is_linearizable(ops: Sequence[Op]) -> bool:
    """Every order that respects real time, every subset of the pending ops: written from the
    specification (not from kvstore.check.register), memoized on (ops placed, value)."""
    ops = [o for o in ops if not (o.kind == READ and o.complete_ns is None)]
    ends = [math.inf if o.complete_ns is None else o.complete_ns for o in ops]
    must_follow = [sum(1 << j for j, end in enumerate(ends) if end < o.invoke_ns) for o in ops]
    completed = sum(1 << i for i, o in enumerate(ops) if o.complete_ns is not None)
    dead_ends: set[tuple[int, str]] = set()

    def outcomes(value: str, o: Op) -> list[str]:
        """The values after ``o`` if what it returned is possible in ``value``."""
        swapped = value == (o.expected or "")
        if o.kind == READ:
            return [value] if value == o.value else []
        if o.kind == WRITE:
            return [o.value or ""]
        if o.kind == DELETE:
            return [""] if o.returned_flag in (None, value != "") else []
        if o.returned_flag is None:
            return [o.value or ""] if swapped else [value]
        return ([o.value or ""] if swapped else [value]) if o.returned_flag == swapped else []

    def search(done: int, value: str) -> bool:
        if done & completed == completed:
            return True
        if (done, value) in dead_ends:
            return False
        for index, o in enumerate(ops):
            if done >> index & 1 or must_follow[index] & ~done:
                continue
            if any(search(done | 1 << index, after) for after in outcomes(value, o)):
                return True
        dead_ends.add((done, value))
        return False

    return search(0, "")


def simulated_ops(rng: random.Random, op_count: int, pending_share: float = 0.15) -> list[Op]:
    """A linearizable history on one key: each op takes effect at a random point of its interval
    (a pending one at any time after its invocation, or never)."""
    planned = []
    for index in range(op_count):
        invoke_ns = rng.randrange(12)
        complete_ns: int | None = invoke_ns + rng.randrange(6)
        if rng.random() < pending_share:
            complete_ns = None
        effect_ns = rng.uniform(invoke_ns, invoke_ns + 8 if complete_ns is None else complete_ns)
        planned.append((effect_ns, index, rng.choice(KINDS), invoke_ns, complete_ns))
    value = ""
    ops = []
    for _, index, kind, invoke_ns, complete_ns in sorted(planned):
        takes_effect = complete_ns is not None or rng.random() < 0.5
        new_op, after = simulated_op(rng, kind, index, value, takes_effect)
        value = after if takes_effect else value
        ops.append(replace(new_op, invoke_ns=invoke_ns, complete_ns=complete_ns))
    return [strip_if_pending(o) for o in ops]


def simulated_op(
    rng: random.Random, kind: str, index: int, value: str, has_effect: bool = True
) -> tuple[Op, str]:
    """One op applied to ``value``. Writes write unique values (as the zone algorithm needs for
    keys with only reads and writes); CAS often sets one of a few values, so values recur."""
    new = f"v{index % 5}" if rng.random() < 0.5 else f"v{index}"
    if kind == READ:
        return op(READ, value, 0, 0, tid=index), value
    if kind == WRITE:
        return op(WRITE, f"v{index}", 0, 0, tid=index), f"v{index}"
    if kind == DELETE:
        return op(DELETE, None, 0, 0, flag=value != "", tid=index), ""
    expected = rng.choice([value, value, "", f"v{rng.randrange(5)}"])
    swapped = has_effect and value == expected
    return op(CAS, new, 0, 0, expected, swapped, tid=index), new if swapped else value


def strip_if_pending(o: Op) -> Op:
    """A pending op returned nothing: no read value, no flag."""
    if o.complete_ns is not None:
        return o
    return replace(o, value=None if o.kind == READ else o.value, returned_flag=None)


def corrupted(rng: random.Random, ops: list[Op]) -> list[Op]:
    """Change one op: what it returned, or its real-time interval."""
    ops = list(ops)
    index = rng.randrange(len(ops))
    o = ops[index]
    if o.complete_ns is not None and o.kind != WRITE and rng.random() < 0.6:
        ops[index] = wrong_result(o, rng.choice(["", "v0", "v1", "v2", "never-written"]))
    else:
        invoke_ns = rng.randrange(12)
        complete_ns = None if o.complete_ns is None else invoke_ns + rng.randrange(4)
        ops[index] = replace(o, invoke_ns=invoke_ns, complete_ns=complete_ns)
    return ops


def wrong_result(o: Op, other_value: str) -> Op:
    """``o`` returning something else: a flipped flag, or a read of another value."""
    if o.kind == READ:
        return replace(o, value=other_value if other_value != o.value else f"{o.value}!")
    return replace(o, returned_flag=not o.returned_flag)


@pytest.mark.parametrize(("max_ops", "pending_share"), [(8, 0.15), (11, 0.4)])
def test_random_small_histories_agree_with_brute_force(max_ops: int, pending_share: float) -> None:
    rng = random.Random(20240612 + max_ops)
    verdicts = {True: 0, False: 0}
    for _ in range(4_000):
        ops = simulated_ops(rng, rng.randint(1, max_ops), pending_share)
        assert reference_is_linearizable(ops), ops  # the simulation is right
        for _ in range(rng.choice((0, 1, 1, 2))):
            ops = corrupted(rng, ops)
        expected = reference_is_linearizable(ops)
        assert (search(ops) == OK) == expected, ops
        verdicts[expected] += 1
    assert min(verdicts.values()) >= 500, verdicts  # both verdicts are well exercised


# --- properties of sequential histories -------------------------------------------------------

OP_SPECS = st.lists(
    st.tuples(st.sampled_from(KINDS), st.sampled_from(["a", "b", "c"]), st.randoms()),
    min_size=1,
    max_size=40,
)


def sequential_history(specs: list[tuple[str, str, random.Random]]) -> list[Op]:
    """Ops one after another (op i runs in [10i, 10i + 5]) on a few keys, from a simulation."""
    values: dict[str, str] = {}
    ops = []
    for index, (kind, key, rng) in enumerate(specs):
        o, values[key] = simulated_op(rng, kind, index, values.get(key, ""))
        ops.append(replace(o, key=key, invoke_ns=10 * index, complete_ns=10 * index + 5))
    return ops


@settings(max_examples=300, deadline=None)
@given(OP_SPECS)
def test_sequential_histories_of_a_register_are_linearizable(
    specs: list[tuple[str, str, random.Random]],
) -> None:
    result = check(sequential_history(specs))
    assert result.is_ok, result.violations


@settings(max_examples=300, deadline=None)
@given(OP_SPECS, st.data())
def test_a_sequential_history_with_one_wrong_result_is_not_linearizable(
    specs: list[tuple[str, str, random.Random]], data: st.DataObject
) -> None:
    ops = sequential_history(specs)
    returning = [index for index, o in enumerate(ops) if o.kind != WRITE]
    if not returning:  # only writes: add a (correct) read of the last one
        ops.append(replace(ops[-1], kind=READ, invoke_ns=10**6, complete_ns=10**6))
        returning = [len(ops) - 1]
    index = data.draw(st.sampled_from(returning))
    ops[index] = wrong_result(ops[index], data.draw(st.sampled_from(["", "v0", "v3", "x"])))
    result = check(ops)
    assert not result.is_ok
    assert result.violations, result.unknown_keys


# --- a larger log -----------------------------------------------------------------------------


def simulated_log_events(
    op_count: int, thread_count: int, key_count: int, seed: int
) -> list[Event]:
    """Events of a linearizable run with every kind: op i takes effect at (i + threads) * 10 ns,
    on thread i % threads, and starts and ends less than ``threads * 5`` ns from its effect, so
    at most about ``threads`` ops overlap. About 0.1% of ops are pending."""
    rng = random.Random(seed)
    window_ns = thread_count * 5
    values: dict[str, str] = {}
    events: list[Event] = []
    for index in range(op_count):
        tid, key = index % thread_count, f"key{rng.randrange(key_count)}"
        effect_ns = (index + thread_count) * 10
        kind = rng.choices(KINDS, weights=(40, 30, 10, 20))[0]
        is_pending = rng.random() < 0.001
        o, after = simulated_op(rng, kind, index, values.get(key, ""), not is_pending)
        if not is_pending or rng.random() < 0.5:
            values[key] = after
        invoke_ns = effect_ns - rng.randrange(window_ns)
        events.append((invoke_ns, False, tid, kind, key, invoked_value(o)))
        if not is_pending:
            complete_ns = effect_ns + rng.randrange(window_ns)
            events.append((complete_ns, True, tid, kind, key, returned_value(o)))
    return events


def invoked_value(o: Op) -> str | None:
    if o.kind == CAS:
        return cas_value(o.expected or "", o.value or "")
    return o.value if o.kind == WRITE else None


def returned_value(o: Op) -> str | None:
    if o.kind in (DELETE, CAS):
        return flag_value(bool(o.returned_flag))
    return o.value if o.kind == READ else None


def test_a_20000_operation_log_with_deletes_and_cas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mixed.log"
    write_events(path, simulated_log_events(20_000, 4, 100, seed=11))
    started = time.perf_counter()
    result = check_file(path)
    elapsed_s = time.perf_counter() - started
    with capsys.disabled():
        print(f"\ncheck_file on 20,000 operations with deletes and CAS: {elapsed_s:.2f} s")
    assert result.is_ok, (result.violations[:3], result.unknown_keys[:3])
    assert (result.op_count, result.key_count) == (20_000, 100)
