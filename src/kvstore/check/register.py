"""The sequential specification of one key: a register with read, write, delete and CAS (pure).

Model and invariants:

- the state is the key's value; absent is "" (the initial state), so a read returning "" saw an
  absent key, and a write of "" makes the key absent;
- READ returns the state; WRITE sets it;
- DELETE returns whether the state was non-empty (the key existed) and makes it "";
- CAS(expected, new) swaps iff the state equals ``expected`` ("": only if absent), then sets
  ``new``; the flag it returned must say whether it swapped;
- a pending op (no response, ``returned_flag None``) may take effect or not: a pending write or
  delete may take effect in any state; a pending CAS swaps if the state allows it, and otherwise
  changes nothing. Pending reads are dropped before checking.

:func:`step` is the model the linearizability search runs: ``step(state, op) -> (ok, state)``.
"""

from __future__ import annotations

from kvstore.check.history import CAS, DELETE, READ, WRITE, Op

INITIAL_STATE = ""


def step(state: str, op: Op) -> tuple[bool, str]:
    """Apply ``op`` to ``state``: whether what it returned is possible, and the state after it."""
    kind = op.kind
    if kind == READ:
        return state == (op.value or ""), state
    if kind == WRITE:
        return True, op.value or ""
    if kind == DELETE:
        existed = op.returned_flag
        return existed is None or existed == (state != ""), ""
    if kind == CAS:
        return _cas(state, op)
    raise ValueError(f"unknown operation kind {kind!r}")


def _cas(state: str, op: Op) -> tuple[bool, str]:
    would_swap = state == (op.expected or "")
    if op.returned_flag is None:  # pending: swaps if it can (failing would change nothing)
        return True, (op.value or "") if would_swap else state
    if op.returned_flag:
        return would_swap, op.value or ""
    return not would_swap, state


def is_constraining(op: Op) -> bool:
    """False for an op the search may drop up front: a pending read (it returned nothing)."""
    return not (op.kind == READ and op.complete_ns is None)
