"""Linearizability of one object's history by search: Wing & Gong with Lowe's memoization (pure).

The algorithm is the one Porcupine runs (Lowe, "Testing for linearizability", 2017): the history's
INV and RES entries form a doubly linked list in time order; the search repeatedly takes a
*minimal* op (one whose INV comes before the first RES still in the list), asks the model whether
it can take effect in the current state, and if so lifts its entries out of the list and starts
again from the head; when no minimal op fits, it puts the last lifted op back and tries the next
one. Invariants:

- op A precedes op B in real time iff ``A.complete_ns < B.invoke_ns``: at equal times an INV is
  ordered before a RES, so the two are concurrent;
- only minimal ops are linearized, so every prefix the search builds respects real time;
- a pending op (``complete_ns None``) completes at +infinity and may be left out: the search
  succeeds as soon as every completed op is linearized. Pending INVs live in a list of their own
  and are tried only after every minimal completed op failed (see :class:`_Search`);
- memoization (Lowe), extended to optional ops: a configuration (linearized ops, state) is not
  explored if one with the same completed ops, the same state and a subset of its pending ops
  was: anything the larger one can still do, the smaller one can (it may skip pending ops);
- the search stops after ``max_steps`` steps with UNKNOWN: it never guesses.

Without trying pending ops last and that subsumption, every pending write would double the search
space for the rest of the history. The set of linearized ops is kept small: completed ops are
ranked by invocation, and the set is ``(k, above, pending)``: every completed op of rank < k, the
ranks k + i for the bits i of ``above`` (all invoked before op k completed, so few), and the
pending ops whose bits are set in ``pending``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Generic, TypeAlias, TypeVar

from kvstore.check.history import Op

DEFAULT_MAX_STEPS = 2_000_000

OK = "OK"
ILLEGAL = "ILLEGAL"
UNKNOWN = "UNKNOWN"

S = TypeVar("S", bound=Hashable)

_HEAD = 0
_RES = -1  # res_of of a RES entry or a list's end
_SHOWN_OPS = 4  # ops kept for the report of a dead end

_Frontier = tuple[int, int, int]  # (k, above, pending): see the module docstring
_Child: TypeAlias = "tuple[int, S, _Frontier]"  # a pending op's INV, the state and frontier after


@dataclass(frozen=True, slots=True)
class SearchResult(Generic[S]):
    """The verdict, and for ILLEGAL/UNKNOWN the deepest dead end the search met.

    ``prefix_length`` ops could be linearized at most; ``prefix_tail`` are the last of them and
    ``stuck`` the ops none of which could come next (indices into the ops searched, the one
    completing first leading); ``stuck_state`` is the state at that point.
    """

    outcome: str
    steps: int
    prefix_length: int = 0
    prefix_tail: tuple[int, ...] = ()
    stuck: tuple[int, ...] = ()
    stuck_state: S | None = None


def linearize(
    ops: Sequence[Op],
    step: Callable[[S, Op], tuple[bool, S]],
    initial_state: S,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> SearchResult[S]:
    """Search for a linearization of ``ops`` (one object's history) under the model ``step``."""
    return _Search(ops, step, initial_state).run(max_steps)


class _Search(Generic[S]):
    """One search: the entry lists, the current state and linearized set, and the undo stack.

    The main pass walks the main list from its head to the first RES (the *blocking* one),
    trying each completed minimal op. If none leads anywhere, the pending pass computes every
    configuration one pending op (invoked before the blocking RES) leads to, registers them all
    as explored, and then explores them in turn: registering them first is what lets a
    configuration reached through two pending ops be skipped when one of them would do.
    """

    def __init__(
        self, ops: Sequence[Op], step: Callable[[S, Op], tuple[bool, S]], initial: S
    ) -> None:
        self.ops = ops
        self.step = step
        self.state = initial
        self.nxt, self.prv, self.op_of, self.res_of = _entry_lists(ops)
        self.pending_head = len(self.nxt) - 2
        self.rank, self.completed_count = _ranks(ops)
        self.frontier: _Frontier = (0, 0, 0)
        # The undo stack: per linearized op, (its INV, the state and frontier before it, and the
        # pending pass it came from with its position there, or None for a completed op).
        self.calls: list[tuple[int, S, _Frontier, list[_Child[S]] | None, int]] = []
        self.seen: dict[tuple[int, int, S], list[int]] = {(0, 0, initial): [0]}  # -> pending sets
        self.dead_end: SearchResult[S] | None = None

    def run(self, max_steps: int) -> SearchResult[S]:
        node = self.nxt[_HEAD]
        pending_pass: list[_Child[S]] | None = None
        position = steps = 0
        while self.frontier[0] < self.completed_count:
            if steps >= max_steps:
                return self._result(UNKNOWN, max_steps)
            steps += 1
            if pending_pass is None:
                if self.res_of[node] > 0:  # a completed minimal op's INV
                    node = self._try(node)
                    continue
                pending_pass, position = self._pending_children(node), 0
                steps += len(pending_pass)
            elif position < len(pending_pass):
                self._take(pending_pass, position)
                node, pending_pass = self.nxt[_HEAD], None
            elif self.calls:
                node, pending_pass, position = self._backtrack()
            else:
                self._note_dead_end()
                return self._result(ILLEGAL, steps)
        return SearchResult(OK, steps, len(self.calls))

    def _try(self, node: int) -> int:
        """Linearize the op of INV entry ``node`` if it fits and is new; the next entry to try."""
        op_index = self.op_of[node]
        fits, after = self.step(self.state, self.ops[op_index])
        if fits:
            frontier = self._with(op_index)
            if self._is_new(frontier, after):
                self.calls.append((node, self.state, self.frontier, None, 0))
                self.state, self.frontier = after, frontier
                self._lift(node)
                return self.nxt[_HEAD]
        return self.nxt[node]

    def _pending_children(self, blocking: int) -> list[_Child[S]]:
        """The new configurations one pending op invoked before ``blocking`` leads to
        (registered as explored)."""
        children: list[_Child[S]] = []
        node = self.nxt[self.pending_head]
        while node < blocking and self.res_of[node] == 0:
            fits, after = self.step(self.state, self.ops[self.op_of[node]])
            if fits:
                frontier = self._with(self.op_of[node])
                if self._is_new(frontier, after):
                    children.append((node, after, frontier))
            node = self.nxt[node]
        return children

    def _take(self, children: list[_Child[S]], position: int) -> None:
        """Move to a configuration of a pending pass."""
        node, after, frontier = children[position]
        self.calls.append((node, self.state, self.frontier, children, position))
        self.state, self.frontier = after, frontier
        self._lift(node)

    def _backtrack(self) -> tuple[int, list[_Child[S]] | None, int]:
        """Undo the last linearized op; where to go on: ``(main entry, pending pass, position)``."""
        self._note_dead_end()
        node, self.state, self.frontier, pending_pass, position = self.calls.pop()
        self._unlift(node)
        return self.nxt[node], pending_pass, position + 1

    def _is_new(self, frontier: _Frontier, state: S) -> bool:
        """False if a configuration subsuming this one was explored; else remember this one."""
        k, above, pending = frontier
        explored = self.seen.get((k, above, state))
        if explored is None:
            self.seen[(k, above, state)] = [pending]
            return True
        if any(mask & ~pending == 0 for mask in explored):
            return False
        explored[:] = [mask for mask in explored if pending & ~mask]  # drop those it subsumes
        explored.append(pending)
        return True

    def _with(self, op_index: int) -> _Frontier:
        """The frontier with one more op linearized."""
        k, above, pending = self.frontier
        rank = self.rank[op_index]
        if rank < 0:
            return (k, above, pending | 1 << (-rank - 1))
        above |= 1 << (rank - k)
        trailing_ones = (above ^ (above + 1)).bit_length() - 1
        return (k + trailing_ones, above >> trailing_ones, pending)

    def _lift(self, node: int) -> None:
        nxt, prv = self.nxt, self.prv
        for entry in (node, self.res_of[node]) if self.res_of[node] else (node,):
            nxt[prv[entry]] = nxt[entry]
            prv[nxt[entry]] = prv[entry]

    def _unlift(self, node: int) -> None:
        nxt, prv = self.nxt, self.prv
        for entry in (self.res_of[node], node) if self.res_of[node] else (node,):
            nxt[prv[entry]] = entry
            prv[nxt[entry]] = entry

    def _note_dead_end(self) -> None:
        """Remember the deepest point where no minimal op fits (for the report)."""
        depth = len(self.calls)
        if self.dead_end is not None and depth <= self.dead_end.prefix_length:
            return
        tail = tuple(self.op_of[call[0]] for call in self.calls[-_SHOWN_OPS:])
        stuck = self._minimal_ops()
        self.dead_end = SearchResult(ILLEGAL, 0, depth, tail, stuck, self.state)

    def _minimal_ops(self) -> tuple[int, ...]:
        """The ops that could come next: the one that completes first, the other completed ones,
        then the pending ones."""
        candidates: list[int] = []
        node = self.nxt[_HEAD]
        while self.res_of[node] > 0:
            candidates.append(self.op_of[node])
            node = self.nxt[node]
        blocking, first = node, self.op_of[node]
        node = self.nxt[self.pending_head]
        while self.res_of[node] == 0 and node < blocking:
            candidates.append(self.op_of[node])
            node = self.nxt[node]
        others = [index for index in candidates if index != first]
        return tuple([first, *others][:_SHOWN_OPS] if first >= 0 else others[:_SHOWN_OPS])

    def _result(self, outcome: str, steps: int) -> SearchResult[S]:
        end = self.dead_end
        if end is None:
            return SearchResult(outcome, steps, len(self.calls))
        return SearchResult(
            outcome, steps, end.prefix_length, end.prefix_tail, end.stuck, end.stuck_state
        )


def _entry_lists(ops: Sequence[Op]) -> tuple[list[int], list[int], list[int], list[int]]:
    """The entries as ``(next, prev, op of entry, res_of)`` over two linked lists.

    Entries 1..E are the INVs and RESs in time order (INV first at equal times); pending ops have
    no RES. The main list runs from entry 0 (head) through the completed ops' INVs and RESs to
    entry E + 1; the pending list from entry E + 2 through the pending INVs to E + 3.
    ``res_of`` is the RES entry of a completed op's INV, 0 for a pending INV, and _RES for a RES
    or a list's end.
    """
    timeline: list[tuple[int, bool, int]] = []
    for index, op in enumerate(ops):
        timeline.append((op.invoke_ns, False, index))
        if op.complete_ns is not None:
            timeline.append((op.complete_ns, True, index))
    timeline.sort()
    count = len(timeline)
    op_of, res_of = [-1] * (count + 4), [_RES] * (count + 4)
    res_entry: dict[int, int] = {}
    for node in range(count, 0, -1):
        _, is_response, index = timeline[node - 1]
        op_of[node] = index
        if is_response:
            res_entry[index] = node
        else:
            res_of[node] = res_entry.get(index, 0)
    nxt, prv = [-1] * (count + 4), [-1] * (count + 4)
    main = [node for node in range(1, count + 1) if res_of[node] != 0]
    pending = [node for node in range(1, count + 1) if res_of[node] == 0]
    _link(nxt, prv, [_HEAD, *main, count + 1])
    _link(nxt, prv, [count + 2, *pending, count + 3])
    return nxt, prv, op_of, res_of


def _link(nxt: list[int], prv: list[int], nodes: list[int]) -> None:
    for before, after in pairwise(nodes):
        nxt[before], prv[after] = after, before


def _ranks(ops: Sequence[Op]) -> tuple[list[int], int]:
    """Per op: its rank among completed ops by invocation, or ``-1 - i`` for pending op i."""
    rank = [0] * len(ops)
    completed = sorted(
        (op.invoke_ns, index) for index, op in enumerate(ops) if op.complete_ns is not None
    )
    for position, (_, index) in enumerate(completed):
        rank[index] = position
    pending = [index for index, op in enumerate(ops) if op.complete_ns is None]
    for position, index in enumerate(pending):
        rank[index] = -1 - position
    return rank, len(completed)
