"""Which key a load thread touches next: uniform, or YCSB-style zipfian.

- ``uniform``: every key ``key-0 .. key-(N-1)`` equally likely, drawn per operation.
- ``zipfian``: the key of rank i (``key-i``; ``key-0`` is the most popular) has probability
  proportional to ``1 / (i + 1) ** theta``, with YCSB's default theta 0.99
  (:data:`ZIPFIAN_THETA`): with 1,000 keys, ``key-0`` gets about 13 % of the operations and
  the 10 % most popular keys about 69 %. YCSB's own workloads (A, B, C) choose keys this way; YCSB
  also scatters which keys are the popular ones over the key space (its "scrambled"
  zipfian), which changes nothing for a store that hashes keys to locks.

Zipfian draws are not made on the hot path: :func:`zipfian_sequence` draws a fixed sequence
of :data:`SEQUENCE_LENGTH` key indices once (inverse transform on the exact cumulative
distribution, bisection) and every thread walks it from its own starting point, one array
lookup per operation (cheaper than the uniform draw). A thread that makes more operations
than the sequence is long starts it over; that changes no key's frequency.
"""

from __future__ import annotations

import functools
import itertools
import random
from array import array

KEY_DISTRIBUTIONS = ("uniform", "zipfian")
ZIPFIAN_THETA = 0.99  # YCSB's default (ZipfianGenerator.ZIPFIAN_CONSTANT)
SEQUENCE_LENGTH = 1 << 18  # a power of two: threads wrap around with a mask


def zipfian_weights(keyspace: int, theta: float) -> list[float]:
    """Unnormalised probabilities of the keys of rank 0 .. keyspace - 1."""
    return [1.0 / rank**theta for rank in range(1, keyspace + 1)]


def zipfian_probabilities(keyspace: int, theta: float) -> list[float]:
    """The exact probability of each key index under the zipfian distribution."""
    weights = zipfian_weights(keyspace, theta)
    total = sum(weights)
    return [weight / total for weight in weights]


@functools.lru_cache(maxsize=4)
def zipfian_sequence(keyspace: int, theta: float, seed: int | None) -> array:
    """:data:`SEQUENCE_LENGTH` key indices drawn from the zipfian distribution over
    ``keyspace`` keys (shared read-only by the threads of a process)."""
    if not 0 < theta < 1:
        raise ValueError(f"the zipfian theta must be within (0, 1), got {theta}")
    cumulative = list(itertools.accumulate(zipfian_weights(keyspace, theta)))
    rng = random.Random(seed)
    return array("l", rng.choices(range(keyspace), cum_weights=cumulative, k=SEQUENCE_LENGTH))


def start_position(thread_index: int, threads: int) -> int:
    """Where thread ``thread_index`` of ``threads`` starts in the shared sequence: evenly
    spread, so threads do not repeat each other's keys in step."""
    return thread_index * SEQUENCE_LENGTH // max(threads, 1) & (SEQUENCE_LENGTH - 1)
