"""Deletes and compare-and-sets through the shared Client while the primary is killed -9:
the checker (with its general search for keys that see deletes and compare-and-sets) must
say linearizable. A retried compare-and-set applied twice, or reported False after it was
applied, shows up as a violation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.bench import faults
from kvstore.bench.workload import Workload
from kvstore.check import checker
from kvstore.check.history import CAS, DELETE
from kvstore.local.cluster import LocalCluster

pytestmark = pytest.mark.faults


def test_deletes_and_cas_under_primary_kills_stay_linearizable(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    workload = Workload(
        4, 12.0, 50, write_ratio=0.3, seed=11, client="shared", delete_ratio=0.1, cas_ratio=0.2
    )
    result, kills = faults.run_with_kills(cluster, workload, "primary", (3.5, 4.5), seed=11)
    verdict = checker.check_events(result.events, tmp_path / "execution.log")

    assert len(kills) >= 2, kills
    assert verdict.verdict == "OK", "\n".join(str(v) for v in verdict.violations[:10])
    done = {(kind, value) for _, is_response, _, kind, _, value in result.events if is_response}
    assert {(DELETE, "1"), (CAS, "1"), (CAS, "0")} <= done, "the mix ran every kind"
