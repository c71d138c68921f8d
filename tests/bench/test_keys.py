"""Key choice: the zipfian sequence is as skewed as the distribution says, uniform is flat, and
the workers walk it."""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest

from kvstore.bench.keys import (
    SEQUENCE_LENGTH,
    ZIPFIAN_THETA,
    start_position,
    zipfian_probabilities,
    zipfian_sequence,
)
from kvstore.bench.workload import ThreadResult, Workload, _worker


def test_zipfian_sequence_matches_the_distribution_with_a_fixed_seed() -> None:
    keyspace = 1000
    counts = Counter(zipfian_sequence(keyspace, ZIPFIAN_THETA, 42))
    expected = zipfian_probabilities(keyspace, ZIPFIAN_THETA)
    assert expected[0] == pytest.approx(0.129, abs=0.001)  # the figure --help quotes
    # The most popular keys, each within 4 standard deviations of its expected count.
    for index in range(20):
        mean = SEQUENCE_LENGTH * expected[index]
        sd = math.sqrt(mean * (1 - expected[index]))
        assert abs(counts[index] - mean) < 4 * sd, (index, counts[index], mean)
    top_tenth = sum(counts[i] for i in range(keyspace // 10)) / SEQUENCE_LENGTH
    assert top_tenth == pytest.approx(sum(expected[:100]), abs=0.01)
    assert 0.65 < top_tenth < 0.72  # skewed: 10 % of the keys take over two thirds
    assert counts[0] > 50 * counts[500]  # popularity falls with the rank
    assert min(counts) >= 0 and max(counts) < keyspace


def test_zipfian_theta_sets_the_skew() -> None:
    mild = Counter(zipfian_sequence(1000, 0.5, 1))
    steep = Counter(zipfian_sequence(1000, 0.99, 1))
    assert steep[0] > 3 * mild[0]


def test_zipfian_sequence_is_reproducible_and_refuses_a_bad_theta() -> None:
    assert zipfian_sequence(100, 0.9, 7) == zipfian_sequence.__wrapped__(100, 0.9, 7)
    with pytest.raises(ValueError, match="theta"):
        zipfian_sequence.__wrapped__(100, 1.0, 7)


def test_threads_start_spread_over_the_sequence() -> None:
    starts = [start_position(i, 4) for i in range(4)]
    assert starts == [0, SEQUENCE_LENGTH // 4, SEQUENCE_LENGTH // 2, 3 * SEQUENCE_LENGTH // 4]


class _Instant:
    def get(self, key: str) -> str:
        return ""

    def put(self, key: str, value: str) -> None:
        pass


class _Steady:
    generation = 0

    def wait_for_change(self, generation: int, timeout_s: float) -> None:
        pass


def _keys_touched(key_dist: str) -> Counter:
    workload = Workload(1, 0.1, 1000, write_ratio=0.5, seed=5, key_dist=key_dist)
    workload.key_sequence()  # drawn before the clock starts, as LoadClients does
    result = ThreadResult()
    start = time.monotonic_ns()
    _worker(0, workload, _Instant(), _Steady(), start, [start + 100_000_000], result)
    return Counter(event[4] for event in result.events if event[1])


def test_the_worker_touches_keys_by_the_chosen_distribution() -> None:
    zipfian, uniform = _keys_touched("zipfian"), _keys_touched("uniform")
    assert sum(zipfian.values()) > 500 and sum(uniform.values()) > 500
    zipf_share = zipfian["key-0"] / sum(zipfian.values())
    uniform_share = uniform.most_common(1)[0][1] / sum(uniform.values())
    assert 0.08 < zipf_share < 0.18
    assert uniform_share < 0.03


def test_workload_refuses_an_unknown_distribution_or_rate() -> None:
    with pytest.raises(ValueError, match="distribution"):
        Workload(1, 1.0, 10, key_dist="hotspot")
    with pytest.raises(ValueError, match="rate"):
        Workload(1, 1.0, 10, rate=-1)
