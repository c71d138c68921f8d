"""kv-client: the seed's load generator (``kv-client ZK_CONNECT PATH THREADS SECONDS KEYSPACE``)."""

from __future__ import annotations

from collections.abc import Sequence

from kvstore import errors
from kvstore.bench import load
from kvstore.bench.clients import CLIENT_KINDS, SHARED_CALL_TIMEOUT_S
from kvstore.bench.workload import Workload, summary_lines
from kvstore.check.history import write_events
from kvstore.cli.args import (
    add_cluster_arguments,
    new_parser,
    positive_float,
    positive_int,
    report_error,
    setup_logging,
)
from kvstore.config import ClientConfig


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser(
        prog="kv-client",
        description="The seed's benchmark: THREADS threads do random gets and puts (50/50 by "
        "default) on keys key-0..key-(KEYSPACE-1) for SECONDS, against the primary found through "
        "ZooKeeper. "
        "Prints throughput and latency; writes an execution log for kv-check.",
    )
    add_cluster_arguments(parser, "parent znode the nodes registered under")
    parser.add_argument("threads", metavar="THREADS", type=positive_int)
    parser.add_argument("seconds", metavar="SECONDS", type=positive_float)
    parser.add_argument("keyspace", metavar="KEYSPACE", type=positive_int)
    parser.add_argument(
        "--log",
        default="execution.log",
        metavar="FILE",
        help="execution log to write (default ./execution.log); '-' for none",
    )
    parser.add_argument(
        "--write-ratio",
        type=float,
        default=0.5,
        metavar="P",
        help="probability that an operation is a put (default 0.5)",
    )
    parser.add_argument(
        "--value-bytes",
        type=int,
        default=0,
        metavar="N",
        help="pad values to N bytes (default: the seed's value-<random int>)",
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
        "own ZooKeeper session; process i logs thread ids from i*1000 on",
    )
    parser.add_argument(
        "--client",
        choices=CLIENT_KINDS,
        default="per-thread",
        help="per-thread: a seed-style client per thread (get/put, nothing retried; the "
        "default); shared: one kvstore.Client for all threads of a process (reads retried, "
        "exactly-once puts, each call retried for up to "
        f"{SHARED_CALL_TIMEOUT_S:g} s); shared-noeo: the shared Client with plain puts "
        "(no exactly-once)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.write_ratio <= 1.0:
        parser.error("--write-ratio must be within [0, 1]")
    setup_logging("WARNING")
    workload = Workload(
        args.threads,
        args.seconds,
        args.keyspace,
        args.write_ratio,
        args.value_bytes,
        args.seed,
        client=args.client,
    )
    config = ClientConfig(
        args.zk_connect,
        args.zk_path,
        rpc_timeout_ms=args.rpc_timeout_ms,
        zk_connect_timeout_s=min(10.0, args.seconds),
    )
    try:
        result = load.run(workload, config, procs=args.procs)
    except errors.KVError as exc:
        report_error("kv-client", exc)
        return 1
    for line in summary_lines(result):
        print(line)
    if args.log != "-":
        write_events(args.log, result.events)
        print(f"Execution log: {args.log} ({len(result.events)} events)")
    return 0
