"""kv-bench: the benchmark matrix and probes on fresh local clusters (see bench/session.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvstore import errors
from kvstore.bench import faults
from kvstore.bench.baseline import run_compare
from kvstore.bench.clients import CLIENT_KINDS
from kvstore.bench.matrix import (
    FAULT_KINDS,
    FIRST_FAULT_S,
    IO_KINDS,
    PLACEMENTS,
    TRANSPORTS,
    Matrix,
    parse_mix,
    why_no_faults,
)
from kvstore.bench.session import Session
from kvstore.bench.storage import STORAGE_KINDS
from kvstore.cli.args import (
    add_load_shape_arguments,
    check_replicas_option,
    choice_list,
    int_list,
    new_parser,
    positive_float,
    positive_int,
    report_error,
    setup_logging,
    share,
)
from kvstore.cli.interrupts import Interrupts
from kvstore.coordination import MAX_REPLICAS
from kvstore.local.cluster import NodeExitedError
from kvstore.local.zkserver import ZooKeeperServer


def _mix_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(parse_mix(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fault_list(text: str) -> tuple[str, ...]:
    return choice_list(text, FAULT_KINDS, "fault kinds")


def _placement_list(text: str) -> tuple[str, ...]:
    return choice_list(text, PLACEMENTS, "placements")


def _client_list(text: str) -> tuple[str, ...]:
    return choice_list(text, CLIENT_KINDS, "client kinds")


def _storage_list(text: str) -> tuple[str, ...]:
    return choice_list(text, STORAGE_KINDS, "storage kinds")


def _io_list(text: str) -> tuple[str, ...]:
    return choice_list(text, IO_KINDS, "io kinds")


def _transport_list(text: str) -> tuple[str, ...]:
    return choice_list(text, TRANSPORTS, "transports")


def _parser() -> argparse.ArgumentParser:
    parser = new_parser(
        prog="kv-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Benchmark kvstore on this machine. Starts its own ZooKeeper (loopback, free port) and, for
every configuration, a fresh cluster (2 nodes, N with --replicas N) under a new parent path;
runs the kv-client workload against it, checks the merged history for linearizability and
prints one table row:
throughput, latency p50/p99/p99.9 (HDR histogram), the longest gap between successful
responses, failures, writes with unknown outcome, kills, the checker's verdict, and the CPU
used (in cores) by the client, the primary, the backup and the whole machine. On a terminal a
progress line (ops/s, failures, elapsed) shows while a configuration runs (with --procs 1).

Beside the JSON results (DIR/<time>/results.json, never overwritten) it writes each run's
HDR latency histogram (histograms/<run>.hdr: HdrHistogram's encoded form; <run>.hgrm: the
percentile table in ms) and plots (plots/<run>.throughput.png: successful ops per second
with a dashed line at each fault; plots/latency.png: latency by percentile, one curve per
configuration). Plots need matplotlib: pip install 'kvstore[plots]'; without it kv-bench
says so once and writes the rest.

By default it runs the baseline (4 threads, 1000 keys, 50/50, 10-byte values, no faults,
1 client process), then varies one dimension at a time over the lists below (9 runs); --full
runs their whole cross product instead. A list may hold a single value. The baseline takes
the default value of each dimension whose list contains it, else the list's first value.

Key choice (--dist) and load (--rate) are dimensions too: --dist uniform,zipfian compares
uniform keys with YCSB's zipfian ones (the --mix letters a, b, c give YCSB's read shares;
add --dist zipfian for YCSB's key choice as well), and --rate 2000,8000 runs open-loop
loads at those targets, with latencies measured from each request's intended start (no
coordinated omission); 0 is the closed loop.""",
        epilog="exit status: 0 every step ran (each row shows its own check verdict: a "
        "failed check\ndoes not change the exit status); 1 the work directory cannot be "
        "made, ZooKeeper or a\ncluster did not start, or --java-baseline gave no ratio; 2 bad "
        "arguments; 130\ninterrupted (Ctrl-C; 143 SIGTERM, 129 SIGHUP) once "
        "ZooKeeper and the nodes are\nstopped: the JSON holds the rows finished until then.\n\n"
        "examples:\n"
        "  kv-bench                      # the default one-at-a-time matrix, 15 s each\n"
        "  kv-bench --threads 4 --keyspace 1000 --mix 50/50 --value-bytes 10 --faults none "
        "--procs 1,2,4\n"
        "  kv-bench --threads 4,16 --keyspace 1000 --mix 50/50 --value-bytes 10 --faults none "
        "--client per-thread,shared,shared-noeo --full\n"
        "  kv-bench --threads 4,16 --keyspace 1000 --mix 50/50 --value-bytes 10 "
        "--faults none,kill-primary --storage memory,disk --full --repeat 2\n"
        "  kv-bench --no-matrix --memory-keys 1000000 --transfer-keys 100000\n"
        "  kv-bench --no-matrix --apache-client --apache-procs 1,2\n"
        "  kv-bench --threads 4 --keyspace 1000 --mix a --value-bytes 10 --faults none "
        "--dist zipfian --rate 2000,5000,10000\n"
        "  kv-bench --threads 4 --keyspace 100 --mix 50/50 --value-bytes 10 --faults nemesis "
        "--client shared --delete-ratio 0.1 --cas-ratio 0.2 --seconds 60",
    )
    _add_matrix_arguments(parser)
    _add_session_arguments(parser)
    _add_probe_arguments(parser)
    return parser


def _add_matrix_arguments(parser: argparse.ArgumentParser) -> None:
    """The dimensions of the matrix: one list each."""
    parser.add_argument(
        "--threads",
        type=int_list,
        default=(1, 4, 16),
        metavar="LIST",
        help="client threads, e.g. 1,4,16 (default 1,4,16)",
    )
    parser.add_argument(
        "--keyspace",
        type=int_list,
        default=(100, 1000, 100_000),
        metavar="LIST",
        help="numbers of keys, e.g. 100,1000,100000 (default 100,1000,100000)",
    )
    parser.add_argument(
        "--mix",
        type=_mix_list,
        default=(50, 95, 100),
        metavar="LIST",
        help="read/write mixes: 50/50,95/5,100/0 or the YCSB letters a,b,c (the read shares "
        "of YCSB's workloads A, B, C: 50, 95, 100 %%; for their zipfian key choice add "
        "--dist zipfian) (default 50/50,95/5,100/0)",
    )
    for kind, what in (("delete", "a delete"), ("cas", "a compare-and-set")):
        parser.add_argument(
            f"--{kind}-ratio",
            type=share,
            default=0.0,
            metavar="P",
            help=f"share of all operations that are {what} (taken out of each mix's writes: "
            "the read share stays the mix's, where kv-client's --delete-ratio and --cas-ratio "
            "add to its --write-ratio; needs --client shared; default 0)",
        )
    parser.add_argument(
        "--value-bytes",
        type=int_list,
        default=(10, 1024),
        metavar="LIST",
        help="value sizes in bytes (default 10,1024). Values are padded up to this "
        "size; a value is never shorter than its unique tag value-<63-bit int> "
        "(about 25 bytes), so 10 means unpadded values",
    )
    parser.add_argument(
        "--faults",
        type=_fault_list,
        default=("none", "kill-primary"),
        metavar="LIST",
        help="none, kill-primary (kill -9 the primary every 4 s and restart it at once) "
        "and/or nemesis (every 3-5 s one of: kill -9 of the primary or the backup, SIGSTOP "
        "of the primary past its lease, a ZooKeeper restart, a hostile request; each fault "
        "is listed with the longest gap until the next fault) (default none,kill-primary)",
    )
    parser.add_argument(
        "--procs",
        type=int_list,
        default=(1,),
        metavar="LIST",
        help="client processes the threads are spread over, like kv-client --procs (default 1)",
    )
    parser.add_argument(
        "--placement",
        type=_placement_list,
        default=("auto",),
        metavar="LIST",
        help="auto (each node picks its CPU: kv-node's default --cpu auto), free (kv-node "
        "--cpu all: no pinning) and/or split: both nodes pinned to CPU 0 with kv-node --cpu 0, "
        "the client to the other CPUs (default auto)",
    )
    parser.add_argument(
        "--client",
        type=_client_list,
        default=("per-thread",),
        metavar="LIST",
        help="how the threads of a client process talk to the cluster: per-thread (a plain "
        "client per thread: get/put, nothing retried), shared (one kvstore.Client for all "
        "threads: reads retried, exactly-once puts) and/or shared-noeo (the shared Client with "
        "plain puts, no exactly-once: what exactly-once costs) (default per-thread)",
    )
    parser.add_argument(
        "--storage",
        type=_storage_list,
        default=("memory",),
        metavar="LIST",
        help="where the nodes keep their store: memory (no data directory), disk (kv-node "
        "--data-dir under the run's work directory, --fsync batch: concurrent writes share one "
        "fsync) and/or disk-always (--fsync always: an fsync per append, shared with no "
        "other). Data directories are removed after a run whose check passed (default memory)",
    )
    parser.add_argument(
        "--io",
        type=_io_list,
        default=("events",),
        metavar="LIST",
        help="how the nodes serve their connections (kv-node --io): events (the default: "
        "one thread serves the clients' data calls and replicates the writes that arrive "
        "together as one batch) and/or threads (a thread per connection); the summary prints "
        "threads/events, same session (default events)",
    )
    parser.add_argument(
        "--transport",
        type=_transport_list,
        default=("plain",),
        metavar="LIST",
        help="plain (plaintext Thrift, every program's default) and/or tls (mutual TLS 1.3 "
        "from the client to the nodes and between the nodes, with certificates from a "
        "throwaway CA made for the run, as kv-certs writes them); the summary prints "
        "tls/plain, same session "
        "(default plain)",
    )
    parser.add_argument(
        "--replicas",
        type=int_list,
        default=(2,),
        metavar="LIST",
        help=f"replication factor(s) N, 1 to {MAX_REPLICAS}: a cluster of N nodes keeping N "
        "copies of every write (kv-createznode --replicas N); the summary prints e.g. n3/n2, "
        "same session "
        "(default 2: a primary and one backup)",
    )
    add_load_shape_arguments(parser, is_list=True)


def _add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """Length, repeats, and where results go."""
    parser.add_argument(
        "--seconds",
        type=positive_float,
        default=15.0,
        metavar="S",
        help="length of each run (default 15)",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=1,
        metavar="N",
        help="run the configurations N times, round by round (so a slow spell of "
        "the machine hits them all alike; every other round in reverse order, so a "
        "drift across a round favours no side), and print medians and each round's "
        "ratios (default 1)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="run the full cross product of the lists instead of varying one dimension at a time",
    )
    parser.add_argument(
        "--no-matrix",
        action="store_true",
        help="skip the throughput matrix (to run only the probes below)",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="where to write every row and probe result as JSON, rewritten after "
        "each step; the histograms/ and plots/ directories go beside it (default: "
        "results.json in this session's own DIR/<time>/, so no run overwrites another's)",
    )
    parser.add_argument(
        "--workdir",
        default="run/bench",
        metavar="DIR",
        help="ZooKeeper data and node logs go to DIR/<time>/; the execution log "
        "of a run the checker rejects, and its nodes' data directories, are kept there too "
        "(default run/bench)",
    )


def _add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """The probes beside the matrix: memory, state transfer, the Apache client."""
    parser.add_argument(
        "--memory-keys",
        type=positive_int,
        default=0,
        metavar="N",
        help="also load N keys into a lone primary and report its RSS growth "
        "per key (VmRSS) minus the raw key+value bytes (e.g. 1000000)",
    )
    parser.add_argument(
        "--memory-value-bytes",
        type=positive_int,
        default=10,
        metavar="B",
        help="value size for --memory-keys (default 10)",
    )
    parser.add_argument(
        "--transfer-keys",
        type=positive_int,
        default=0,
        metavar="N",
        help="also load N keys of 100-byte values into a lone primary, start a "
        "backup while a writer keeps putting, and report the state-transfer time "
        "(e.g. 100000)",
    )
    parser.add_argument(
        "--apache-client",
        action="store_true",
        help="also run scripts/bench-apache-client (a client generated by Apache "
        "Thrift's compiler from the original service IDL, scripts/seed.thrift) against the "
        "primary of a fresh cluster, with the baseline's threads and keys, 50/50, for --seconds",
    )
    parser.add_argument(
        "--apache-procs",
        type=int_list,
        default=(1, 2),
        metavar="LIST",
        help="process counts for --apache-client; the baseline's threads are split "
        "over them (default 1,2)",
    )
    parser.add_argument(
        "--java-baseline",
        metavar="SCRIPT",
        type=Path,
        help="also run the original Java implementation against our nodes with this compare "
        "script "
        "(e.g. ../shared/baseline/compare: the Java nodes and ours in turn, A-B-B-A, under "
        "the original Java client) for --java-rounds rounds of --seconds, and print its "
        "same-run ratio ours/Java after the table",
    )
    parser.add_argument(
        "--java-rounds",
        type=positive_int,
        default=3,
        metavar="N",
        help="rounds of --java-baseline (default 3; the ratio is of the medians)",
    )
    parser.add_argument(
        "--apache-accelerated",
        action="store_true",
        help="with --apache-client: use TBinaryProtocolAccelerated (Apache's C codec)",
    )


def session_directory(parent: Path) -> Path:
    """A new directory ``parent/<time>`` for this session, created here; ``<time>-2``,
    ``-3``, ... if another session started in the same second: none shares another's."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free session directory for {stamp} in {parent}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_replicas_option(parser, *args.replicas)
    setup_logging("WARNING")
    logging.getLogger("kazoo").setLevel(logging.ERROR)  # connection chatter between table rows
    matrix = (
        None
        if args.no_matrix
        else Matrix(
            args.threads,
            args.keyspace,
            args.mix,
            args.value_bytes,
            args.faults,
            args.procs,
            args.placement,
            args.client,
            args.storage,
            args.dist,
            args.rate,
            args.transport,
            args.replicas,
            args.io,
        )
    )
    if matrix is not None:
        _check_faults(parser, matrix, args.seconds, args.full)
        _check_deletes_and_cas(parser, matrix, args.delete_ratio, args.cas_ratio)
    with Interrupts("kv-bench") as interrupts:
        try:
            return _run(args, matrix, interrupts)
        except KeyboardInterrupt:  # (ZooKeeper and the nodes were stopped on the way out)
            return interrupts.report("stopped the cluster")


def _check_deletes_and_cas(
    parser: argparse.ArgumentParser, matrix: Matrix, delete_ratio: float, cas_ratio: float
) -> None:
    """Deletes and compare-and-sets come out of the writes, and need the shared Client."""
    if not delete_ratio and not cas_ratio:
        return
    if set(matrix.client) != {"shared"}:
        parser.error("--delete-ratio and --cas-ratio need --client shared (and no other)")
    for read_percent in matrix.read_percent:
        if (100 - read_percent) / 100 < delete_ratio + cas_ratio - 1e-9:
            parser.error(
                f"--mix {read_percent}/{100 - read_percent} leaves {100 - read_percent} % "
                f"writes, fewer than the deletes and compare-and-sets asked for "
                f"({(delete_ratio + cas_ratio) * 100:g} %)"
            )


def _check_faults(
    parser: argparse.ArgumentParser, matrix: Matrix, seconds: float, full: bool
) -> None:
    """A usage error for --faults that --seconds leaves no time for, and for a matrix whose
    every configuration would be left out (kill-primary with one copy, see Session)."""
    for kind in matrix.faults:
        if kind not in FIRST_FAULT_S:
            continue
        first_s = FIRST_FAULT_S[kind]
        why = faults.why_no_faults(seconds, first_s)
        if why is not None:
            parser.error(
                f"--faults {kind} with --seconds {seconds:g}: {why} (give --seconds above "
                f"{first_s + faults.QUIET_END_S:g})"
            )
    if all(why_no_faults(scenario, seconds) for scenario in matrix.scenarios(full)):
        parser.error(
            "--faults kill-primary with --replicas 1: there is no backup to take over, and "
            "no other configuration to run"
        )


def _run(args: argparse.Namespace, matrix: Matrix | None, interrupts: Interrupts) -> int:
    try:
        workdir = session_directory(Path(args.workdir).resolve())
    except OSError as exc:
        report_error("kv-bench", exc)
        return 1
    json_path = Path(args.json) if args.json else workdir / "results.json"
    session = Session(
        matrix=matrix,
        full=args.full,
        seconds=args.seconds,
        json_path=json_path,
        workdir=workdir,
        memory_keys=args.memory_keys,
        memory_value_bytes=args.memory_value_bytes,
        transfer_keys=args.transfer_keys,
        apache_procs=args.apache_procs if args.apache_client else (),
        apache_accelerated=args.apache_accelerated,
        repeat=args.repeat,
        zipfian_theta=args.zipfian_theta,
        delete_ratio=args.delete_ratio,
        cas_ratio=args.cas_ratio,
        out=lambda line: print(line, flush=True),
        progress_stream=sys.stdout,
    )
    print(f"== work directory: {workdir}; results: {json_path}", flush=True)
    try:
        with ZooKeeperServer(workdir / "zookeeper") as zk:
            session.restart_zookeeper = zk.restart
            session.run(zk.connect_string, zk.pid)
    except NodeExitedError as exc:  # (its log says why)
        return interrupts.report_failure(exc.summary, "stopped the cluster")
    except (errors.KVError, TimeoutError) as exc:
        return interrupts.report_failure(exc, "stopped the cluster")
    if args.java_baseline is not None:
        return _java_baseline(args.java_baseline, args.seconds, args.java_rounds, workdir)
    return 0


def _java_baseline(script: Path, seconds: float, rounds: int, workdir: Path) -> int:
    if not script.is_file():
        report_error("kv-bench", FileNotFoundError(f"--java-baseline: no script at {script}"))
        return 1
    print(f"== the original Java implementation, same run ({script}, {rounds} rounds):", flush=True)
    log_path = workdir / "java-baseline.txt"
    ratio = run_compare(script, seconds, rounds, lambda line: print(line, flush=True), log_path)
    if ratio is None:
        print(f"== no ratio from {script}; its output is in {log_path}", flush=True)
        return 1
    print(f"== ours/Java (the original Java client, same run): {ratio:.2f}", flush=True)
    return 0
