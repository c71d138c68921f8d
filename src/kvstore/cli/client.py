"""kv-client: the load generator (``kv-client ZK_CONNECT PATH THREADS SECONDS KEYSPACE``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvstore import errors
from kvstore.bench import load
from kvstore.bench.clients import CLIENT_KINDS, SHARED_CALL_TIMEOUT_S
from kvstore.bench.progress import maybe_progress
from kvstore.bench.workload import BenchResult, LoadInterrupted, Workload, summary_lines
from kvstore.check.history import Event, write_events
from kvstore.cli.args import (
    add_cluster_arguments,
    add_load_shape_arguments,
    add_tls_arguments,
    add_zk_tls_arguments,
    new_parser,
    positive_float,
    positive_int,
    report_error,
    setup_logging,
    share,
    tls_from,
    zk_tls_from,
)
from kvstore.cli.interrupts import Interrupts
from kvstore.config import ClientConfig


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    tls = tls_from(parser, args)
    zk_tls = zk_tls_from(parser, args)
    setup_logging("WARNING", is_quiet=True)
    try:
        workload = Workload(
            args.threads,
            args.seconds,
            args.keyspace,
            args.write_ratio,
            args.value_bytes,
            args.seed,
            client=args.client,
            delete_ratio=args.delete_ratio,
            cas_ratio=args.cas_ratio,
            key_dist=args.dist,
            zipfian_theta=args.zipfian_theta,
            rate=args.rate,
        )
    except ValueError as exc:
        parser.error(str(exc))
    config = ClientConfig(
        args.zk_connect,
        args.zk_path,
        rpc_timeout_ms=args.rpc_timeout_ms,
        zk_connect_timeout_s=min(10.0, args.seconds),
        tls=tls,
        zk_tls=zk_tls,
    )
    if args.log != "-" and not _is_writable(Path(args.log)):
        parser.error(f"--log: cannot write {args.log}")  # before the run, not after it
    with Interrupts("kv-client") as interrupts:
        return _run(workload, config, args, interrupts)


def _run(
    workload: Workload, config: ClientConfig, args: argparse.Namespace, interrupts: Interrupts
) -> int:
    """The load, its summary and its log. Interrupted (Ctrl-C, SIGTERM, SIGHUP) while the
    load runs, the run until then is summarized and logged all the same (the operations cut
    short pending: outcome unknown), then the line and its exit status; interrupted before
    it ran, nothing is logged."""
    result: BenchResult | None = None
    try:
        # Before the clock starts: the values earlier runs left (logged as starting values).
        start_ns = time.monotonic_ns()
        starting = [] if args.log == "-" else _starting_values(config, args)
        progress = maybe_progress(sys.stdout, args.seconds) if args.procs == 1 else None
        try:
            result = load.run(
                workload, config, start_ns=start_ns, procs=args.procs, progress=progress
            )
        except LoadInterrupted as interrupted:
            result = interrupted.result
        finally:
            interrupts.hold()  # the summary and the log are written whole
            if progress is not None:
                progress.done()
    except errors.KVError as exc:  # (after a signal: the interruption's, nothing logged)
        return interrupts.report_failure(exc, "" if args.log == "-" else "no execution log written")
    except KeyboardInterrupt:
        if result is None:  # before the load ran, or a client process's part was lost
            return interrupts.report("" if args.log == "-" else "no execution log written")
    for line in summary_lines(result):
        print(line)
    if args.log != "-":
        is_replaced = Path(args.log).exists()
        write_events(args.log, [*starting, *result.events])
        replaced = ", replacing the previous one" if is_replaced else ""
        held = f"; {len(starting) // 2} keys held values already" if starting else ""
        print(f"Execution log: {args.log} ({len(result.events)} events{held}{replaced})")
    if interrupts.received is not None:
        logged = "" if args.log == "-" else "the execution log holds the run until then"
        return interrupts.report(logged)
    if result.successes == 0:  # (the history is written all the same: it may be checked)
        report_error("kv-client", "no operation succeeded: no primary answered during the run")
        return 1
    return 0


def _starting_values(config: ClientConfig, args: argparse.Namespace) -> list[Event]:
    """The values the keys hold before the run (see load.starting_values); none, with a
    warning, if the cluster does not answer soon (the run then reports how it fares).
    ZooKeeper unreachable or the parent missing: raised (the run would fail the same)."""
    try:
        return load.starting_values(config, args.keyspace, timeout_s=min(5.0, args.seconds))
    except errors.CoordinationError:
        raise
    except errors.KVError as exc:
        report_error(
            "kv-client",
            f"warning: cannot read the keys' values before the run ({exc}); the log takes "
            "them to start empty, as kv-check does",
        )
        return []


def _is_writable(path: Path) -> bool:
    if path.exists():
        return not path.is_dir() and os.access(path, os.W_OK)
    return os.access(path.absolute().parent, os.W_OK)


def _parser() -> argparse.ArgumentParser:
    parser = new_parser(
        prog="kv-client",
        description="Load generator: THREADS threads do random gets and puts (50/50 by "
        "default) on keys key-0..key-(KEYSPACE-1) for SECONDS, against the primary found through "
        "ZooKeeper. Prints throughput and latency; writes an execution log for kv-check. "
        "Closed loop by default (each thread sends its next request when the previous one "
        "answered); --rate makes it open loop.",
        epilog="exit status: 0 done; 1 the cluster could not be reached, or no operation "
        "succeeded; 2 bad arguments; 130 interrupted (Ctrl-C; 143 SIGTERM, 129 SIGHUP): the "
        "run until then is summarized and logged (operations cut short as of unknown "
        "outcome), unless it had not started",
    )
    add_cluster_arguments(parser, "parent znode the nodes registered under")
    parser.add_argument("threads", metavar="THREADS", type=positive_int, help="client threads")
    parser.add_argument(
        "seconds", metavar="SECONDS", type=positive_float, help="how long to run, seconds"
    )
    parser.add_argument(
        "keyspace", metavar="KEYSPACE", type=positive_int, help="number of distinct keys"
    )
    parser.add_argument(
        "--log",
        default="execution.log",
        metavar="FILE",
        help="execution log to write, one operation event per line, for kv-check (default "
        "./execution.log, replaced if it exists); '-' for none",
    )
    parser.add_argument(
        "--write-ratio",
        type=share,
        default=0.5,
        metavar="P",
        help="probability that an operation is a put (default 0.5)",
    )
    parser.add_argument(
        "--delete-ratio",
        type=share,
        default=0.0,
        metavar="P",
        help="probability that an operation is a delete (default 0; needs --client shared). "
        "It adds to --write-ratio: reads get what the three leave",
    )
    parser.add_argument(
        "--cas-ratio",
        type=share,
        default=0.0,
        metavar="P",
        help="probability that an operation is a compare-and-set of the value this thread "
        "last read for the key (default 0; needs --client shared)",
    )
    parser.add_argument(
        "--value-bytes",
        type=int,
        default=0,
        metavar="N",
        help="pad values to N bytes (default: unpadded, value-<random 63-bit int>)",
    )
    parser.add_argument(
        "--rpc-timeout-ms",
        type=positive_int,
        default=2000,
        metavar="MS",
        help="per-request timeout in milliseconds (default 2000)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--procs",
        type=positive_int,
        default=1,
        metavar="N",
        help="spread the THREADS over N client processes (default 1), each with its "
        "own ZooKeeper session; their operations go to one execution log",
    )
    parser.add_argument(
        "--client",
        choices=CLIENT_KINDS,
        default="per-thread",
        help="per-thread: one plain client per thread (get/put, nothing retried; the "
        "default); shared: one kvstore.Client for all threads of a process (reads retried, "
        "exactly-once puts, each call retried for up to "
        f"{SHARED_CALL_TIMEOUT_S:g} s); shared-noeo: the shared Client with plain puts "
        "(no exactly-once)",
    )
    add_load_shape_arguments(parser)
    add_tls_arguments(parser, "the client's")
    add_zk_tls_arguments(parser)
    return parser
