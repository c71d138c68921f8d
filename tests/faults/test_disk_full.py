"""The primary's disk fills up under write load, then space is freed.

The primary's ``--data-dir`` is on a small tmpfs made by the test (skipped, with the reason,
where mounting is not permitted), filled with a ballast file but for a few hundred KB; the
load (4 threads, half puts of ~1 KB) fills the rest. While it is full:

- every write is refused with DiskFullError, a definite error (nothing applied anywhere), so
  the load's history has no unknown outcome from it;
- reads go on.

Then the ballast is deleted and writes succeed again, without a restart. The load's history
goes through the checker, with a final read of every key; and the primary's files, recovered
offline after the nodes stopped, hold exactly what the primary served (the refused appends
left nothing behind in its log).

The same with the backup's disk: the primary drops it and acknowledges every write alone;
once space is freed the backup joins again by itself and holds what the primary holds.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from test_crash import append_final_reads, check_history

import kvstore
from conftest import SmallFilesystems
from kvstore import errors
from kvstore.bench import load
from kvstore.bench.workload import Workload, key_names, summary_lines
from kvstore.check.history import READ, WRITE
from kvstore.config import ClientConfig
from kvstore.local.cluster import LocalCluster
from kvstore.local.processes import wait_until
from kvstore.server.storage import StripedStore
from kvstore.server.wal import WriteAheadLog

pytestmark = pytest.mark.faults

KEYS = 200
FULL_FOR_S = 1.5  # how long the disk stays full under load


def _put_outcome(kv: kvstore.Client) -> str:
    try:
        kv.put("probe", "x" * 1000)
    except errors.DiskFullError:
        return "full"
    return "ok"


def start_with_a_small_disk(
    cluster: LocalCluster, filesystems: SmallFilesystems, tmp_path: Path, on: int, free_bytes: int
) -> tuple[Path, Path]:
    """Start the cluster, node ``on`` (0: the primary) keeping its data on an 8 MB tmpfs, the
    other on the usual disk; then fill the tmpfs but ``free_bytes``. (Its data dir, the ballast.)"""
    small = filesystems.mount(8 << 20)
    for i, node in enumerate(cluster.nodes):
        node.extra_args += ["--data-dir", str(small / "node" if i == on else tmp_path / "other")]
    cluster.start()
    return small / "node", filesystems.fill(small, leave_bytes=free_bytes)


def test_writes_fail_definitely_while_the_primarys_disk_is_full_and_resume_once_freed(
    small_filesystems: SmallFilesystems, idle_cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster = idle_cluster
    cluster.nodes[0].extra_args += ["--snapshot-every-mb", "1"]
    data_dir, ballast = start_with_a_small_disk(cluster, small_filesystems, tmp_path, 0, 300_000)

    workload = Workload(4, 9.0, KEYS, write_ratio=0.5, value_bytes=1000, seed=31)
    config = ClientConfig(cluster.zk_connect, cluster.zk_path)
    start_ns = time.monotonic_ns()
    marks: dict[str, float] = {}
    reads_while_full: list[str | None] = []

    def fill_then_free() -> None:
        with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
            wait_until(
                lambda: _put_outcome(kv) == "full" or None,
                20,
                lambda: f"the disk never filled\n{cluster.logs()}",
            )
            marks["full"] = (time.monotonic_ns() - start_ns) / 1e9
            reads_while_full.append(kv.get("key-1"))  # raises if reads stopped
            time.sleep(FULL_FOR_S)  # the load runs against the full disk meanwhile
            ballast.unlink()
            marks["freed"] = (time.monotonic_ns() - start_ns) / 1e9
            wait_until(
                lambda: _put_outcome(kv) == "ok" or None,
                20,
                lambda: f"writes did not resume\n{cluster.logs()}",
            )

    controller = threading.Thread(target=fill_then_free, daemon=True)
    controller.start()
    result = load.run(workload, config, start_ns)
    controller.join(timeout=60)
    assert "freed" in marks, f"the controller did not finish: {marks}\n{cluster.logs()}"

    assert result.failures["DiskFullError"] > 0, result.failures
    assert result.indefinite_writes == 0, result.failures  # a refusal applied nothing
    full_ns, freed_ns = int(marks["full"] * 1e9), int(marks["freed"] * 1e9)
    responses = [(t, kind) for t, is_response, _, kind, *_ in result.events if is_response]
    assert any(full_ns < t < freed_ns and kind == READ for t, kind in responses)
    assert any(t > freed_ns and kind == WRITE for t, kind in responses)

    values = append_final_reads(result, cluster, list(key_names(KEYS)), start_ns)
    served = {key: value for key, value in values.items() if value is not None}
    verdict = check_history(result, tmp_path)
    assert verdict.key_count == KEYS
    print(
        f"\nfull at {marks['full']:.2f} s, freed at {marks['freed']:.2f} s: "
        + " | ".join(summary_lines(result))
    )

    cluster.stop()
    recovered = StripedStore()
    recovered.log = WriteAheadLog(data_dir)
    recovered.recover()
    recovered.log.close()
    on_disk = recovered.snapshot()
    on_disk.pop("probe", None)
    assert on_disk == served


def test_a_backup_whose_disk_fills_is_dropped_and_joins_again_once_space_is_freed(
    small_filesystems: SmallFilesystems, idle_cluster: LocalCluster, tmp_path: Path
) -> None:
    """The primary goes on alone (every write acknowledged); the backup comes back by itself."""
    cluster = idle_cluster
    primary, backup = cluster.nodes
    _, ballast = start_with_a_small_disk(cluster, small_filesystems, tmp_path, 1, 100_000)
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        for i in range(300):  # ~300 KB: more than the backup has room for
            kv.put(f"k{i}", f"v{i}-" + "x" * 1000)
        wait_until(
            lambda: "dropped backup" in primary.log_path.read_text() or None,
            30,
            lambda: f"the backup was not dropped\n{cluster.logs()}",
        )
        ballast.unlink()
        backup.wait_for_role(["backup"], timeout_s=60)
        kv.put("after", "freed")
    expected = primary.dump()
    lines = primary.log_path.read_text() + backup.log_path.read_text()
    print("\n" + "\n".join(re.findall(r".*(?:dropped backup|joining|in sync with).*", lines)))
    primary.stop()
    backup.wait_for_role(["primary"], timeout_s=30)
    assert backup.dump() == expected
