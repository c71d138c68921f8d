"""kv-bench: the benchmark matrix on fresh local clusters, plus the capacity probes.

One managed ZooKeeper serves the whole session. Every configuration gets a fresh
2-node LocalCluster under a parent path of its own, so every history starts from
empty registers, and its merged history is checked for linearizability. A row is
printed as soon as its configuration finishes and the JSON file is rewritten after
every step, so an interrupted session keeps what it measured.

CPU figures (see :class:`kvstore.procstat.CpuMeter`), in cores over the measured
interval: the client (its worker processes included), the primary, the backup, irq
(interrupt time, mostly loopback TCP's receive work; it overlaps the processes' figures),
"other" (everything else that ran meanwhile but ZooKeeper, which is in the JSON) and the
whole machine. A run with a large "other" figure shared the CPUs with someone else.

Storage (``--storage``, see :mod:`kvstore.bench.storage`): nodes on disk keep their data
directories under the run's work directory, ``<workdir>/<name>/data-<run id>/node-<i>``; they
are removed after a run whose check passed and kept (like the execution log) otherwise.

Invariants: loopback only; everything started is stopped (by PID, through the objects
that started it) when its step ends; every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shutil
import statistics
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.bench import faults, load, storage
from kvstore.bench.artifacts import per_window
from kvstore.bench.keys import ZIPFIAN_THETA
from kvstore.bench.procstat import CpuMeter
from kvstore.bench.workload import BenchResult, Workload
from kvstore.check import checker
from kvstore.check.checker import check_events
from kvstore.check.history import CAS, DELETE, write_events
from kvstore.local.certs import write_certificates
from kvstore.local.cluster import LocalCluster

FAULT_KINDS = ("none", "kill-primary", "nemesis")
NEMESIS_INTERVAL_S = (3.0, 5.0)
KILL_INTERVAL_S = 4.0
YCSB_MIXES = {"a": 50, "b": 95, "c": 100}  # read share, percent


@dataclass(frozen=True, slots=True)
class Scenario:
    threads: int
    keyspace: int
    read_percent: int
    value_bytes: int
    faults: str
    procs: int
    placement: str = "auto"
    client: str = "per-thread"  # one of CLIENT_KINDS (kvstore.bench.clients)
    storage: str = "memory"  # one of STORAGE_KINDS (kvstore.bench.storage)
    dist: str = "uniform"  # one of KEY_DISTRIBUTIONS (kvstore.bench.keys)
    rate: float = 0.0  # target ops/s of the whole load (open loop); 0: closed loop
    transport: str = "plain"  # one of TRANSPORTS
    replicas: int = 2  # the replication factor (kv-createznode --replicas): N nodes, N copies
    io: str = "events"  # one of IO_KINDS: kv-node --io

    @property
    def mix(self) -> str:
        return f"{self.read_percent}/{100 - self.read_percent}"

    @property
    def name(self) -> str:
        """Unique per configuration; the key choice and rate appear when not the default."""
        return (
            f"t{self.threads}-k{self.keyspace}-r{self.read_percent}-v{self.value_bytes}-"
            f"{self.faults}-p{self.procs}-{self.placement}-{self.storage}-{self.client}"
            + ("" if self.dist == "uniform" else f"-{self.dist}")
            + (f"-rate{self.rate:g}" if self.rate else "")
            + ("" if self.transport == "plain" else f"-{self.transport}")
            + ("" if self.replicas == 2 else f"-n{self.replicas}")
            + ("" if self.io == "events" else f"-{self.io}")
        )

    def workload(
        self,
        seconds: float,
        zipfian_theta: float = ZIPFIAN_THETA,
        delete_ratio: float = 0.0,
        cas_ratio: float = 0.0,
    ) -> Workload:
        """``delete_ratio``, ``cas_ratio``: shares of all operations, out of the writes."""
        write_ratio = (100 - self.read_percent) / 100 - delete_ratio - cas_ratio
        return Workload(
            self.threads,
            seconds,
            self.keyspace,
            max(0.0, write_ratio),
            self.value_bytes,
            client=self.client,
            key_dist=self.dist,
            zipfian_theta=zipfian_theta,
            rate=self.rate,
            delete_ratio=delete_ratio,
            cas_ratio=cas_ratio,
        )


BASELINE = Scenario(
    threads=4, keyspace=1000, read_percent=50, value_bytes=10, faults="none", procs=1
)
DIMENSIONS = (
    "threads",
    "keyspace",
    "read_percent",
    "value_bytes",
    "faults",
    "procs",
    "placement",
    "client",
    "storage",
    "dist",
    "rate",
    "transport",
    "replicas",
    "io",
)
# plain: plaintext Thrift (the programs' default). tls: mutual TLS 1.3 from the client to
# the nodes and between the nodes, certificates from a throwaway CA (kv-certs) for the run.
TRANSPORTS = ("plain", "tls")
# events: one thread serves the clients' data calls and groups their writes (kv-node's
# default); threads: a thread per connection (kv-node --io threads).
IO_KINDS = ("events", "threads")
# auto: each node pins itself to one CPU chosen by its port (kv-node's default). free: no CPU
# pinning (--cpu all). split: both nodes pinned to CPU 0 (kv-node --cpu 0), the client to the
# other CPUs: no cross-core GIL hand-offs inside a process, and the client does not compete
# with the nodes for a core.
PLACEMENTS = ("auto", "free", "split")
_PLACEMENT_ARGS = {"auto": [], "free": ["--cpu", "all"], "split": ["--cpu", "0"]}


@dataclass(frozen=True)
class Matrix:
    """The values to try in each dimension."""

    threads: tuple[int, ...] = (1, 4, 16)
    keyspace: tuple[int, ...] = (100, 1000, 100_000)
    read_percent: tuple[int, ...] = (50, 95, 100)
    value_bytes: tuple[int, ...] = (10, 1024)
    faults: tuple[str, ...] = ("none", "kill-primary")
    procs: tuple[int, ...] = (1,)
    placement: tuple[str, ...] = ("auto",)
    client: tuple[str, ...] = ("per-thread",)
    storage: tuple[str, ...] = ("memory",)
    dist: tuple[str, ...] = ("uniform",)
    rate: tuple[float, ...] = (0.0,)
    transport: tuple[str, ...] = ("plain",)
    replicas: tuple[int, ...] = (2,)
    io: tuple[str, ...] = ("events",)

    def scenarios(self, full: bool = False) -> list[Scenario]:
        """The cross product if ``full``; else the baseline, then one dimension varied at a time.

        The baseline takes BASELINE's value in each dimension that offers it, else the
        dimension's first value.
        """
        values = [getattr(self, dimension) for dimension in DIMENSIONS]
        if full:
            return [Scenario(*combination) for combination in itertools.product(*values)]
        base = Scenario(
            *(
                getattr(BASELINE, dimension)
                if getattr(BASELINE, dimension) in options
                else options[0]
                for dimension, options in zip(DIMENSIONS, values, strict=True)
            )
        )
        chosen = [base]
        for dimension, options in zip(DIMENSIONS, values, strict=True):
            for option in options:
                scenario = dataclasses.replace(base, **{dimension: option})
                if scenario not in chosen:
                    chosen.append(scenario)
        return chosen


# When each fault kind's first fault comes at the earliest, seconds into a run.
FIRST_FAULT_S = {"kill-primary": KILL_INTERVAL_S, "nemesis": NEMESIS_INTERVAL_S[0]}


def why_no_faults(scenario: Scenario, seconds: float) -> str | None:
    """Why ``scenario`` would inject none of its faults in a run of ``seconds`` (None: it
    injects them, or has none): a row named for faults that never came would mislead."""
    if scenario.faults not in FIRST_FAULT_S:
        return None
    replicas = scenario.replicas if scenario.faults == "kill-primary" else None
    return faults.why_no_faults(seconds, FIRST_FAULT_S[scenario.faults], replicas)


def parse_mix(text: str) -> int:
    """'50/50', '95/5', '100/0' (read/write percent), or a YCSB workload letter a, b, c: its
    read share only (YCSB's workloads also choose keys zipfian: that is the ``dist``
    dimension)."""
    text = text.strip().lower()
    if text in YCSB_MIXES:
        return YCSB_MIXES[text]
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or int(match.group(1)) + int(match.group(2)) != 100:
        raise ValueError(f"not a read/write mix like 95/5, or a, b, c: {text!r}")
    return int(match.group(1))


# --------------------------------------------------------------------------- one configuration


def run_scenario(
    zk_connect: str,
    zk_pid: int | None,
    scenario: Scenario,
    seconds: float,
    workdir: Path,
    restart_zookeeper: Callable[[], None] | None = None,
    zipfian_theta: float = ZIPFIAN_THETA,
    progress: Callable[[int, int, float], None] | None = None,
    delete_ratio: float = 0.0,
    cas_ratio: float = 0.0,
) -> dict[str, Any]:
    """Run one configuration on a fresh cluster; its table row (a dict). The nemesis
    restarts ZooKeeper among its faults when ``restart_zookeeper`` is given; ``progress``
    is called about once a second while the load runs (one client process only);
    ``delete_ratio`` and ``cas_ratio`` (shares of all operations, out of the writes) need
    the shared Client, and the row then counts the deletes and compare-and-sets sent."""
    node_args = list(_PLACEMENT_ARGS[scenario.placement])
    if scenario.io != "events":
        node_args += ["--io", scenario.io]
    run_id = uuid.uuid4().hex[:8]
    cluster = LocalCluster(
        zk_connect,
        f"/kv-bench-{run_id}",
        workdir / scenario.name,
        size=scenario.replicas,
        node_args=node_args,
        replicas=None if scenario.replicas == 2 else scenario.replicas,
    )
    data_dir = storage.use_storage(
        cluster, scenario.storage, workdir / scenario.name / f"data-{run_id}"
    )
    if scenario.transport == "tls":
        certs = write_certificates(workdir / scenario.name / f"certs-{run_id}")
        for node in cluster.nodes:
            node.extra_args += certs.node_args()
        cluster.client_tls = certs.client
    elif scenario.transport != "plain":
        raise ValueError(f"unknown transport {scenario.transport!r} (expected one of {TRANSPORTS})")
    workload = scenario.workload(seconds, zipfian_theta, delete_ratio, cas_ratio)
    kills: list[tuple[float, str]] = []
    injected: list[tuple[float, str, str]] = []
    own_cpus = os.sched_getaffinity(0)
    try:
        cluster.start()
        if scenario.placement == "split" and len(own_cpus) > 1:
            os.sched_setaffinity(0, own_cpus - {0})  # client processes spawned now inherit it
        primary, backup = cluster.find("primary"), cluster.find("backup")
        meter = CpuMeter(
            {
                "primary": primary.pid if primary else None,
                "backup": backup.pid if backup else None,
                "zookeeper": zk_pid,
            }
        )
        if scenario.faults == "kill-primary":
            result, kills = faults.run_with_kills(
                cluster,
                workload,
                "primary",
                (KILL_INTERVAL_S, KILL_INTERVAL_S),
                procs=scenario.procs,
                on_start=meter.start,
                progress=progress,
            )
        elif scenario.faults == "nemesis":
            result, injected = faults.run_with_nemesis(
                cluster,
                workload,
                NEMESIS_INTERVAL_S,
                restart_zookeeper,
                procs=scenario.procs,
                on_start=meter.start,
                progress=progress,
            )
            kills = [(at_s, address) for at_s, kind, address in injected if "kill" in kind]
        elif scenario.faults == "none":
            config = cluster.client_config()
            result = load.run(
                workload, config, procs=scenario.procs, on_start=meter.start, progress=progress
            )
        else:
            raise ValueError(
                f"unknown fault kind {scenario.faults!r} (expected one of {FAULT_KINDS})"
            )
        cores = meter.stop()
    finally:
        os.sched_setaffinity(0, own_cpus)
        cluster.stop()
    if kills:  # killed nodes were reaped into this process's children rusage; nodes restarted
        cores.update(client=None, primary=None, backup=None, other=None)  # irq, machine: valid
    verdict = check_events(result.events)
    log_path = None
    if not verdict.is_ok:
        log_path = workdir / f"{scenario.name}.execution.log"
        write_events(log_path, result.events)
    elif data_dir is not None:
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir = None
    row = _row(scenario, result, verdict, kills, cores, log_path)
    row["data_dir"] = str(data_dir) if data_dir else None
    if scenario.dist == "zipfian":
        row["zipfian_theta"] = zipfian_theta
    if delete_ratio or cas_ratio:
        sent = Counter(event[3] for event in result.events if not event[1])
        row.update(delete_ratio=delete_ratio, cas_ratio=cas_ratio)
        row.update(deletes=sent[DELETE], compare_and_sets=sent[CAS])
    responses = [t for t, is_response, *_ in result.events if is_response]
    row["throughput_per_s"] = per_window(responses, seconds, 1.0)
    row["throughput_per_100ms"] = per_window(responses, seconds, 0.1)
    row["histogram_encoded"] = result.histogram.encode().decode()
    if injected:
        row["injected"] = [
            {"at_s": round(at_s, 3), "kind": kind, "node": node, "longest_gap_s": round(gap, 4)}
            for (at_s, kind, node), gap in zip(
                injected, faults.recovery_s(injected, responses), strict=True
            )
        ]
    return row


def _row(
    scenario: Scenario,
    result: BenchResult,
    verdict: checker.CheckResult,
    kills: list[tuple[float, str]],
    cores: dict[str, float | None],
    log_path: Path | None,
) -> dict[str, Any]:
    return {
        "name": scenario.name,
        **dataclasses.asdict(scenario),
        "mix": scenario.mix,
        "seconds": result.elapsed_s,
        "throughput": result.throughput,
        "successes": result.successes,
        "p50_ms": result.latency_ms(50),
        "p99_ms": result.latency_ms(99),
        "p999_ms": result.latency_ms(99.9),
        "max_ms": result.max_latency_ms,
        "mean_ms": result.mean_latency_ms,
        "longest_gap_ms": result.longest_gap_s * 1000,
        "failures": sum(result.failures.values()),
        "failures_by_kind": dict(result.failures),
        "indefinite_writes": result.indefinite_writes,
        "kills": len(kills),
        "kill_times_s": [round(at_s, 3) for at_s, _ in kills],
        "check": (
            "OK"
            if verdict.is_ok
            else f"UNKNOWN ({len(verdict.unknown_keys)} keys)"
            if verdict.unknown_keys and not verdict.violations
            else f"VIOLATIONS ({len(verdict.violations)})"
        ),
        "checked_ops": verdict.op_count,
        "cores": cores,
        "log": str(log_path) if log_path else None,
    }


# --------------------------------------------------------------------------- the table


COLUMNS = (
    ("threads", "thr", 4, "{}"),
    ("keyspace", "keys", 7, "{}"),
    ("mix", "mix", 6, "{}"),
    ("value_bytes", "value", 5, "{}"),
    ("faults", "faults", 12, "{}"),
    ("procs", "procs", 5, "{}"),
    ("placement", "place", 5, "{}"),
    ("client", "client", 11, "{}"),
    ("storage", "storage", 11, "{}"),
    ("dist", "dist", 7, "{}"),
    ("rate", "rate", 6, "{:.0f}"),
    ("transport", "trans", 5, "{}"),
    ("replicas", "N", 2, "{}"),
    ("io", "io", 7, "{}"),
    ("throughput", "ops/s", 7, "{:.0f}"),
    ("p50_ms", "p50ms", 6, "{:.3f}"),
    ("p99_ms", "p99ms", 6, "{:.3f}"),
    ("p999_ms", "p99.9ms", 7, "{:.2f}"),
    ("longest_gap_ms", "gap_ms", 7, "{:.1f}"),
    ("failures", "fail", 5, "{}"),
    ("indefinite_writes", "unkn", 4, "{}"),
    ("kills", "kills", 5, "{}"),
    ("check", "check", 6, "{}"),
)


def header() -> str:
    cells = [title.rjust(width) for _, title, width, _ in COLUMNS]
    return " ".join(cells) + "  cores: client/primary/backup/irq/other/machine"


def cores_text(cores: dict[str, float | None]) -> str:
    """client/primary/backup/irq/other/machine, "-" for what is not known."""
    return "/".join(
        "-" if cores.get(name) is None else f"{cores[name]:.2f}"
        for name in ("client", "primary", "backup", "interrupts", "other", "machine")
    )


def format_row(row: dict[str, Any]) -> str:
    cells = [
        (form.format(row[key]) if key in row else "-").rjust(width)
        for key, _, width, form in COLUMNS
    ]
    return " ".join(cells) + f"  {cores_text(row.get('cores') or {})}"


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """Per configuration run more than once: median (min-max) throughput, median p99, worst
    gap. Per fault configuration: its median throughput as a share of the same
    configuration's without faults. Per configuration on disk, or with a shared client: its
    median throughput and latencies as ratios to the same configuration's in memory, or with
    per-thread clients (and shared to shared-noeo: what exactly-once costs)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    medians = {
        name: statistics.median(r["throughput"] for r in group) for name, group in groups.items()
    }
    lines = []
    if any(len(group) > 1 for group in groups.values()):
        lines.append("== over the rounds: median (min-max) ops/s, median p99, worst gap, checks")
        for name, group in groups.items():
            throughputs = [r["throughput"] for r in group]
            checks = ",".join(sorted({r["check"] for r in group}))
            lines.append(
                f"{name}: {medians[name]:.0f} ({min(throughputs):.0f}-{max(throughputs):.0f}) "
                "ops/s, "
                f"p99 {statistics.median(r['p99_ms'] for r in group):.3f} ms, worst gap "
                f"{max(r['longest_gap_ms'] for r in group):.1f} ms, {len(group)} runs {checks}"
            )
    for name, group in groups.items():
        first = group[0]
        if first["faults"] == "none":
            continue
        twin = _twin(groups, first, "faults", "none")
        if twin is not None and medians[twin] > 0:
            lines.append(
                f"{name}: {medians[name] / medians[twin]:.0%} of the no-fault throughput; longest "
                f"gap {max(r['longest_gap_ms'] for r in group):.0f} ms; "
                f"{sum(r['kills'] for r in group)} kills; checks "
                f"{','.join(sorted({r['check'] for r in group}))}"
            )
    for dimension, kind, base in (
        ("storage", "disk", "memory"),
        ("storage", "disk-always", "memory"),
        ("client", "shared", "per-thread"),
        ("client", "shared-noeo", "per-thread"),
        ("client", "shared", "shared-noeo"),  # what exactly-once costs
        ("transport", "tls", "plain"),
        ("io", "threads", "events"),
        *(("replicas", n, 2) for n in sorted({r.get("replicas", 2) for r in rows}) if n != 2),
    ):
        lines.extend(_ratio_lines(groups, medians, dimension, kind, base))
    return lines


def _ratio_lines(
    groups: dict[str, list[dict[str, Any]]],
    medians: dict[str, float],
    dimension: str,
    kind: Any,
    base: Any,
) -> list[str]:
    """For each configuration with ``dimension`` = ``kind``: its median throughput and
    latencies as ratios to the same configuration's with ``base`` (same session: same
    machine state, as far as the rounds can make it)."""
    lines = []
    defaults = {
        "storage": "memory",
        "client": "per-thread",
        "transport": "plain",
        "replicas": 2,
        "io": "events",
    }
    for name, group in groups.items():
        if group[0].get(dimension, defaults[dimension]) != kind:
            continue
        twin = _twin(groups, group[0], dimension, base)
        if twin is None or medians[twin] <= 0:
            continue
        ratios = [f"ops/s {medians[name] / medians[twin]:.2f}"]
        for key, title in (("p50_ms", "p50"), ("p99_ms", "p99")):
            mine = statistics.median(r[key] for r in group)
            theirs = statistics.median(r[key] for r in groups[twin])
            if theirs > 0:
                ratios.append(f"{title} {mine / theirs:.2f}")
        label = f"n{kind}/n{base}" if dimension == "replicas" else f"{kind}/{base}"
        lines.append(f"{name}: {label} {', '.join(ratios)}{_paired(group, groups[twin])}")
    return lines


STOLEN_CORES = 0.05  # the host took this much of a CPU away during a run: a noisy run


def _paired(group: list[dict[str, Any]], twins: list[dict[str, Any]]) -> str:
    """With more than one round: each round's throughput ratio to its twin of the same
    round, and their median. This machine's speed drifts from round to round; both halves
    of a pair ran in the same round, so a pair's ratio drifts less than the medians'.

    A round in which the host stole STOLEN_CORES or more from either half is marked "*",
    and the median of the other rounds follows: a marked round's ratio says more about
    the host than about the code (one session's TLS/plaintext rounds read 0.57 to 1.10
    when marked, 0.77 and 0.78 when not)."""
    # (strict=False: a session cut short may lack a last twin)
    pairs = [(r, t) for r, t in zip(group, twins, strict=False) if t["throughput"]]
    if len(pairs) < 2:
        return ""
    ratios = [r["throughput"] / t["throughput"] for r, t in pairs]
    stolen = [max(_stolen(r), _stolen(t)) >= STOLEN_CORES for r, t in pairs]
    each = " ".join(
        f"{ratio:.2f}{'*' if hit else ''}" for ratio, hit in zip(ratios, stolen, strict=True)
    )
    text = f"; per round {each} (median {statistics.median(ratios):.2f}"
    quiet = [ratio for ratio, hit in zip(ratios, stolen, strict=True) if not hit]
    if quiet and len(quiet) < len(ratios):
        text += f"; without the * rounds {statistics.median(quiet):.2f}"
    return text + ")"


def _stolen(row: dict[str, Any]) -> float:
    """The cores the host stole during the run (0 where not recorded: older results)."""
    return (row.get("cores") or {}).get("steal") or 0.0


def _twin(
    groups: dict[str, list[dict[str, Any]]], row: dict[str, Any], dimension: str, value: Any
) -> str | None:
    """The name of the group that differs from ``row`` only in ``dimension``, set to ``value``
    (rows from before a dimension existed lack it: missing equals missing)."""
    return next(
        (
            name
            for name, candidates in groups.items()
            if candidates[0].get(dimension) == value
            and all(candidates[0].get(d) == row.get(d) for d in DIMENSIONS if d != dimension)
        ),
        None,
    )
