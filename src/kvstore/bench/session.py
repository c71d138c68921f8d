"""A kv-bench session: the matrix, the Apache-client runs and the capacity probes, in order.

One managed ZooKeeper serves the whole session (the caller starts it). A row is printed
as soon as its configuration finishes and the JSON report is rewritten after every step,
so an interrupted session keeps what it measured; beside the JSON go each run's HDR
histogram and the plots (:mod:`kvstore.bench.artifacts`). While a configuration runs, a
progress line is shown when ``progress_stream`` is a terminal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kvstore.bench import apacheclient, capacity
from kvstore.bench.artifacts import Artifacts
from kvstore.bench.checkout import source_version
from kvstore.bench.keys import ZIPFIAN_THETA
from kvstore.bench.matrix import (
    BASELINE,
    Matrix,
    Scenario,
    cores_text,
    format_row,
    header,
    run_scenario,
    summarize,
    why_no_faults,
)
from kvstore.bench.progress import maybe_progress


@dataclass
class Session:
    """Everything kv-bench was asked to do, and where the results go."""

    matrix: Matrix | None
    full: bool
    seconds: float
    json_path: Path
    workdir: Path
    memory_keys: int = 0
    memory_value_bytes: int = 10
    transfer_keys: int = 0
    apache_procs: tuple[int, ...] = ()
    apache_accelerated: bool = False
    repeat: int = 1
    zipfian_theta: float = ZIPFIAN_THETA
    delete_ratio: float = 0.0  # of all operations, out of the writes (--client shared)
    cas_ratio: float = 0.0
    out: Callable[[str], None] = print
    progress_stream: TextIO | None = None  # a live progress line there, if it is a terminal
    restart_zookeeper: Callable[[], None] | None = None  # for the nemesis
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def run(self, zk_connect: str, zk_pid: int | None) -> dict[str, Any]:
        self.report = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "source": source_version(),
            "seconds": self.seconds,
            "rows": [],
        }
        self.out(f"== source {self.report['source']}, {os.cpu_count()} CPUs")
        if self.delete_ratio or self.cas_ratio:
            self.report.update(delete_ratio=self.delete_ratio, cas_ratio=self.cas_ratio)
            self.out(
                f"== deletes {self.delete_ratio:.0%} and compare-and-sets {self.cas_ratio:.0%} "
                "of all operations, out of each mix's writes"
            )
        if self.matrix is not None:
            self._run_matrix(zk_connect, zk_pid)
        if self.apache_procs:
            self._run_apache(zk_connect, zk_pid)
        if self.memory_keys:
            self.out(
                f"== memory: {self.memory_keys} keys of {self.memory_value_bytes}-byte values, "
                "lone primary"
            )
            memory = capacity.measure_memory(
                zk_connect, self.workdir / "memory", self.memory_keys, self.memory_value_bytes
            )
            self.report["memory"] = memory.as_dict()
            self.out(
                f"   RSS {memory.rss_before_kib} -> {memory.rss_after_kib} KiB: "
                f"{memory.rss_per_key_bytes:.1f} B/key, of which key+value "
                f"{memory.raw_bytes_per_key:.1f} B, overhead {memory.overhead_per_key_bytes:.1f} "
                f"B/key (loaded in {memory.load_s:.1f} s)"
            )
            self._save()
        if self.transfer_keys:
            self.out(
                f"== state transfer: {self.transfer_keys} keys of 100-byte values, writer running"
            )
            transfer = capacity.measure_transfer(
                zk_connect, self.workdir / "transfer", self.transfer_keys
            )
            self.report["transfer"] = transfer.as_dict()
            self.out(
                f"   backup process start -> role backup: {transfer.until_backup_role_s:.2f} s; "
                f"backup log: {transfer.in_sync_keys} keys in {transfer.in_sync_s} s; writer acked "
                f"{transfer.writer_puts} puts meanwhile ({transfer.writer_failures} failed); keys "
                f"after: primary {transfer.primary_keys_after}, backup {transfer.backup_keys_after}"
            )
            self._save()
        return self.report

    def _run_matrix(self, zk_connect: str, zk_pid: int | None) -> None:
        assert self.matrix is not None
        scenarios = []
        for scenario in self.matrix.scenarios(self.full):
            why = why_no_faults(scenario, self.seconds)
            if why is None:
                scenarios.append(scenario)
            else:
                self.out(f"== left out {scenario.name}: {why}")
        rounds = f", {self.repeat} rounds" if self.repeat > 1 else ""
        self.out(f"== {len(scenarios)} configurations, {self.seconds:g} s each{rounds}")
        artifacts = Artifacts(self.json_path.parent)
        if artifacts.skipped_because:
            self.out(
                f"== plots skipped: {artifacts.skipped_because}; JSON and histograms are written"
            )
        self.out(header())
        for round_number in range(self.repeat):  # rounds, so slow spells hit every configuration
            for index, scenario in enumerate(round_order(scenarios, round_number)):
                step = round_number * len(scenarios) + index + 1
                label = f"[{step}/{len(scenarios) * self.repeat}]"
                row = self._run_one(zk_connect, zk_pid, scenario, label)
                row["round"] = round_number
                self.report["rows"].append(row)
                artifacts.add_run(row)
                self.out(format_row(row))
                for fault in row.get("injected", ()):
                    self.out(_fault_line(fault))
                self._save()
        for line in summarize(self.report["rows"]):
            self.out(line)

    def _run_one(
        self, zk_connect: str, zk_pid: int | None, scenario: Scenario, label: str
    ) -> dict[str, Any]:
        """One configuration's row, with a progress line meanwhile (on a terminal)."""
        progress = (
            maybe_progress(self.progress_stream, self.seconds, label)
            if self.progress_stream is not None and scenario.procs == 1
            else None
        )
        try:
            return run_scenario(
                zk_connect,
                zk_pid,
                scenario,
                self.seconds,
                self.workdir,
                self.restart_zookeeper,
                self.zipfian_theta,
                progress,
                self.delete_ratio,
                self.cas_ratio,
            )
        finally:
            if progress is not None:
                progress.done()

    def _run_apache(self, zk_connect: str, zk_pid: int | None) -> None:
        script = apacheclient.find_script()
        if script is None:
            self.out(
                "== Apache client: scripts/bench-apache-client not found (run from the checkout)"
            )
            return
        base = BASELINE if self.matrix is None else self.matrix.scenarios()[0]
        self.report["apache_client"] = []
        for procs in self.apache_procs:
            figures = apacheclient.run(
                zk_connect,
                script,
                procs,
                max(1, base.threads // procs),
                self.seconds,
                base.keyspace,
                self.apache_accelerated,
                self.workdir,
                zk_pid,
            )
            self.report["apache_client"].append(figures)
            cores = figures["cores"]
            self.out(
                f"== Apache Thrift client ({procs} x {figures['threads']} threads, "
                f"{'accelerated' if self.apache_accelerated else 'pure-Python'} binary protocol): "
                f"{figures['throughput']} ops/s, p50 {figures['p50_ms']} ms, "
                f"p99 {figures['p99_ms']} ms, failures {figures['failures']}; "
                f"cores (client with its start-up): {cores_text(cores)}"
            )
            self._save()

    def _save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.json_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        temporary.replace(self.json_path)


def round_order(scenarios: list[Scenario], round_number: int) -> list[Scenario]:
    """The order round ``round_number`` (from 0) runs the configurations in: as listed,
    then backwards, and so on. In a fixed order the first configuration of every round
    would always follow the previous round's last and always run before its twins: a
    machine that slows down (or speeds up) across a round would favour one side of every
    ratio the same way. Alternating, the drift cancels over two rounds."""
    return scenarios if round_number % 2 == 0 else scenarios[::-1]


def _fault_line(fault: dict[str, Any]) -> str:
    node = fault["node"] or "-"
    gap_s = fault["longest_gap_s"]
    cost = f"{gap_s * 1000:.1f} ms" if gap_s >= 0 else "no success after it"
    return (
        f"     {fault['at_s']:8.2f} s  {fault['kind']:<17} {node:<21} "
        f"longest gap until the next fault: {cost}"
    )
