"""Entry points. The only module that parses argv and configures logging."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from kvstore import errors


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kazoo").setLevel(max(logging.WARNING, logging.getLogger().level))


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _cpu_list(text: str) -> set[int]:
    try:
        cpus = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of CPU numbers: {text}") from None
    # Not the inherited affinity: a node started by a pinned parent may still be pinned elsewhere.
    online = set(range(os.cpu_count() or 1))
    if not cpus or not cpus <= online:
        raise argparse.ArgumentTypeError(f"CPUs {text} not among this machine's {sorted(online)}")
    return cpus


# --------------------------------------------------------------------------- kv-node


def node_main(argv: Sequence[str] | None = None) -> int:
    from kvstore.config import Limits, NodeConfig
    from kvstore.node import StorageNode
    from kvstore.roles import EXIT_RESTART

    node_args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="kv-node",
        description="Run a storage node: serve the KeyValueService on HOST:PORT and register "
        "under PATH in ZooKeeper. The lowest registered node is the primary, the next the backup.",
    )
    parser.add_argument("host", metavar="HOST", help="address to serve on, e.g. 127.0.0.1")
    parser.add_argument("port", metavar="PORT", type=int, help="TCP port to serve on")
    parser.add_argument(
        "zk_connect", metavar="ZK_CONNECT", help="ZooKeeper connect string, e.g. 127.0.0.1:2181"
    )
    parser.add_argument("zk_path", metavar="PATH", help="parent znode, e.g. /kvstore")
    parser.add_argument(
        "--session-timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="ZooKeeper session timeout in seconds (default 10; failover does not wait for it)",
    )
    parser.add_argument(
        "--lease",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="read lease the backup grants the primary, seconds (default 1.0): how long a "
        "backup waits before taking over from a primary it cannot prove dead",
    )
    parser.add_argument(
        "--max-key-bytes",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="largest key accepted (default 1024)",
    )
    parser.add_argument(
        "--max-value-bytes",
        type=_positive_int,
        default=1024 * 1024,
        metavar="N",
        help="largest value accepted (default 1 MiB)",
    )
    parser.add_argument(
        "--stripes",
        type=_positive_int,
        default=256,
        metavar="N",
        help="number of lock stripes (default 256)",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)"
    )
    parser.add_argument(
        "--cpu",
        type=_cpu_list,
        default=None,
        metavar="LIST",
        help="pin the node to these CPUs, e.g. 0 or 0,1 (default: not pinned). A "
        "Python node runs on about one core anyway; pinning it saves the cross-core "
        "GIL hand-offs between its threads",
    )
    args = parser.parse_args(node_args)
    _setup_logging(args.log_level)
    if args.cpu:
        os.sched_setaffinity(0, args.cpu)  # before any thread starts: all of them inherit it
    limits = Limits(
        max_key_bytes=args.max_key_bytes,
        max_value_bytes=args.max_value_bytes,
        max_frame_bytes=max(
            16 * 1024 * 1024, 2 * (args.max_key_bytes + args.max_value_bytes) + 4096
        ),
    )
    config = NodeConfig(
        host=args.host,
        port=args.port,
        zk_connect=args.zk_connect,
        zk_path=args.zk_path,
        limits=limits,
        stripe_count=args.stripes,
        zk_session_timeout_s=args.session_timeout,
        lease_s=args.lease,
    )
    node = StorageNode(config)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _f: node.stop(f"signal {signal.Signals(s).name}"))
    try:
        code = node.run()
    except OSError as exc:
        logging.getLogger("kv-node").error("cannot serve on %s: %s", config.address, exc)
        return 1
    except errors.KVError as exc:
        logging.getLogger("kv-node").error("%s", exc)
        return 1
    if code == EXIT_RESTART:
        logging.getLogger("kv-node").warning("restarting with an empty store")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "kvstore", "node", *node_args])
    return code


# --------------------------------------------------------------------------- kv-createznode


def createznode_main(argv: Sequence[str] | None = None) -> int:
    from kvstore.coordination import create_parent

    parser = argparse.ArgumentParser(
        prog="kv-createznode",
        description="Create the parent znode PATH (and its parents) that nodes register under. "
        "Succeeds if it exists already.",
    )
    parser.add_argument("zk_connect", metavar="ZK_CONNECT", help="ZooKeeper connect string")
    parser.add_argument("zk_path", metavar="PATH", help="parent znode, e.g. /kvstore")
    parser.add_argument(
        "--reset",
        action="store_true",
        help="also clear the cluster metadata: the next node starts a NEW, EMPTY store. "
        "Only for when the data is lost anyway (every node holding it died)",
    )
    args = parser.parse_args(argv)
    _setup_logging("WARNING")
    try:
        outcome = create_parent(args.zk_connect, args.zk_path, reset=args.reset)
    except errors.KVError as exc:
        print(f"kv-createznode: {exc}", file=sys.stderr)
        return 1
    print(f"{args.zk_path}: {outcome}")
    return 0


# --------------------------------------------------------------------------- kv-client


def client_main(argv: Sequence[str] | None = None) -> int:
    from kvstore import bench
    from kvstore.config import ClientConfig
    from kvstore.history import write_events

    parser = argparse.ArgumentParser(
        prog="kv-client",
        description="The seed's benchmark: THREADS threads do random gets and puts (50/50 by "
        "default) on keys key-0..key-(KEYSPACE-1) for SECONDS, against the primary found through "
        "ZooKeeper. "
        "Prints throughput and latency; writes an execution log for kv-check.",
    )
    parser.add_argument("zk_connect", metavar="ZK_CONNECT", help="ZooKeeper connect string")
    parser.add_argument("zk_path", metavar="PATH", help="parent znode the nodes registered under")
    parser.add_argument("threads", metavar="THREADS", type=_positive_int)
    parser.add_argument("seconds", metavar="SECONDS", type=_positive_float)
    parser.add_argument("keyspace", metavar="KEYSPACE", type=_positive_int)
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
        type=_positive_int,
        default=2000,
        metavar="MS",
        help="per-request timeout in milliseconds (default 2000)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--procs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="spread the THREADS over N client processes (default 1), each with its "
        "own ZooKeeper session; process i logs thread ids from i*1000 on",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.write_ratio <= 1.0:
        parser.error("--write-ratio must be within [0, 1]")
    _setup_logging("WARNING")
    workload = bench.Workload(
        args.threads, args.seconds, args.keyspace, args.write_ratio, args.value_bytes, args.seed
    )
    config = ClientConfig(
        args.zk_connect,
        args.zk_path,
        rpc_timeout_ms=args.rpc_timeout_ms,
        zk_connect_timeout_s=min(10.0, args.seconds),
    )
    try:
        result = bench.run(workload, config, procs=args.procs)
    except errors.KVError as exc:
        print(f"kv-client: {exc}", file=sys.stderr)
        return 1
    for line in bench.summary_lines(result):
        print(line)
    if args.log != "-":
        write_events(args.log, result.events)
        print(f"Execution log: {args.log} ({len(result.events)} events)")
    return 0


# --------------------------------------------------------------------------- kv-check


def check_main(argv: Sequence[str] | None = None) -> int:
    from kvstore.checker import run_check

    parser = argparse.ArgumentParser(
        prog="kv-check",
        description="Check an execution log (WatCA format, as written by kv-client) for "
        "linearizability: every key is a register starting empty, written with unique values. "
        "Prints OK (exit 0) or each violation with the operations involved (exit 1).",
    )
    parser.add_argument("log", metavar="LOG", help="execution log file")
    args = parser.parse_args(argv)
    try:
        return run_check(args.log)
    except (OSError, errors.KVError) as exc:
        print(f"kv-check: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- kv-demo


def demo_main(argv: Sequence[str] | None = None) -> int:
    from kvstore.demo import run_demo

    parser = argparse.ArgumentParser(
        prog="kv-demo",
        description="Start a local ZooKeeper and two nodes, run kv-client, kill -9 the primary "
        "midway and restart it, then print throughput, latency and the kv-check verdict.",
    )
    parser.add_argument(
        "--seconds", type=_positive_float, default=20.0, help="benchmark length (default 20)"
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=4, help="client threads (default 4)"
    )
    parser.add_argument(
        "--keyspace", type=_positive_int, default=1000, help="number of keys (default 1000)"
    )
    parser.add_argument("--workdir", default="run/demo", help="where logs go (default run/demo)")
    args = parser.parse_args(argv)
    _setup_logging("INFO")
    return run_demo(args.seconds, args.threads, args.keyspace, args.workdir)


# --------------------------------------------------------------------------- kv-bench


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _mix_list(text: str) -> tuple[int, ...]:
    from kvstore.benchmark import parse_mix

    try:
        return tuple(parse_mix(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fault_list(text: str) -> tuple[str, ...]:
    from kvstore.benchmark import FAULT_KINDS

    values = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [value for value in values if value not in FAULT_KINDS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"fault kinds are {', '.join(FAULT_KINDS)}; got {text!r}")
    return values


def _placement_list(text: str) -> tuple[str, ...]:
    from kvstore.benchmark import PLACEMENTS

    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values or any(value not in PLACEMENTS for value in values):
        raise argparse.ArgumentTypeError(f"placements are {', '.join(PLACEMENTS)}; got {text!r}")
    return values


def bench_main(argv: Sequence[str] | None = None) -> int:
    import time
    from pathlib import Path

    from kvstore.benchmark import FAULT_KINDS, Matrix, Session
    from kvstore.zkserver import ZooKeeperServer

    parser = argparse.ArgumentParser(
        prog="kv-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Benchmark kvstore on this machine. Starts its own ZooKeeper (loopback, free port) and, for
every configuration, a fresh 2-node cluster under a new parent path; runs the kv-client
workload against it, checks the merged history for linearizability and prints one table row:
throughput, latency p50/p99/p99.9 (HDR histogram), the longest gap between successful
responses, failures, writes with unknown outcome, kills, the checker's verdict, and the CPU
used (in cores) by the client, the primary, the backup and the whole machine.

By default it runs the baseline (4 threads, 1000 keys, 50/50, 10-byte values, no faults,
1 client process), then varies one dimension at a time over the lists below (9 runs); --full
runs their whole cross product instead. A list may hold a single value. The baseline takes
the default value of each dimension whose list contains it, else the list's first value.""",
        epilog="examples:\n"
        "  kv-bench                      # the default one-at-a-time matrix, 15 s each\n"
        "  kv-bench --threads 4 --keyspace 1000 --mix 50/50 --value-bytes 10 --faults none "
        "--procs 1,2,4\n"
        "  kv-bench --no-matrix --memory-keys 1000000 --transfer-keys 100000\n"
        "  kv-bench --no-matrix --apache-client --apache-procs 1,2",
    )
    parser.add_argument(
        "--threads",
        type=_int_list,
        default=(1, 4, 16),
        metavar="LIST",
        help="client threads, e.g. 1,4,16 (default 1,4,16)",
    )
    parser.add_argument(
        "--keyspace",
        type=_int_list,
        default=(100, 1000, 100_000),
        metavar="LIST",
        help="numbers of keys, e.g. 100,1000,100000 (default 100,1000,100000)",
    )
    parser.add_argument(
        "--mix",
        type=_mix_list,
        default=(50, 95, 100),
        metavar="LIST",
        help="read/write mixes: 50/50,95/5,100/0 or the YCSB letters a,b,c "
        "(default 50/50,95/5,100/0)",
    )
    parser.add_argument(
        "--value-bytes",
        type=_int_list,
        default=(10, 1024),
        metavar="LIST",
        help="value sizes in bytes (default 10,1024). Values are padded up to this "
        "size; a value is never shorter than its unique tag value-<63-bit int> "
        "(about 25 bytes), so 10 means the seed's unpadded values",
    )
    parser.add_argument(
        "--faults",
        type=_fault_list,
        default=FAULT_KINDS,
        metavar="LIST",
        help="none and/or kill-primary: kill -9 the primary every 4 s and restart "
        "it at once (default none,kill-primary)",
    )
    parser.add_argument(
        "--procs",
        type=_int_list,
        default=(1,),
        metavar="LIST",
        help="client processes the threads are spread over, like kv-client --procs (default 1)",
    )
    parser.add_argument(
        "--placement",
        type=_placement_list,
        default=("free",),
        metavar="LIST",
        help="free (no CPU pinning) and/or split: both nodes pinned to CPU 0 with kv-node --cpu 0, "
        "the client to the other CPUs (default free)",
    )
    parser.add_argument(
        "--seconds",
        type=_positive_float,
        default=15.0,
        metavar="S",
        help="length of each run (default 15)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run the configurations N times, round by round (so a slow spell of "
        "the machine hits them all alike), and print medians (default 1)",
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
        default="run/bench/results.json",
        metavar="PATH",
        help="where to write every row and probe result as JSON, rewritten after "
        "each step (default run/bench/results.json)",
    )
    parser.add_argument(
        "--workdir",
        default="run/bench",
        metavar="DIR",
        help="ZooKeeper data and node logs go to DIR/<time>/; the execution log "
        "of a run the checker rejects is kept there too (default run/bench)",
    )
    parser.add_argument(
        "--memory-keys",
        type=_positive_int,
        default=0,
        metavar="N",
        help="also load N keys into a lone primary and report its RSS growth "
        "per key (VmRSS) minus the raw key+value bytes (e.g. 1000000)",
    )
    parser.add_argument(
        "--memory-value-bytes",
        type=_positive_int,
        default=10,
        metavar="B",
        help="value size for --memory-keys (default 10)",
    )
    parser.add_argument(
        "--transfer-keys",
        type=_positive_int,
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
        "Thrift's compiler from the seed IDL) against the primary of a fresh "
        "cluster, with the baseline's threads and keys, 50/50, for --seconds",
    )
    parser.add_argument(
        "--apache-procs",
        type=_int_list,
        default=(1, 2),
        metavar="LIST",
        help="process counts for --apache-client; the baseline's threads are split "
        "over them (default 1,2)",
    )
    parser.add_argument(
        "--apache-accelerated",
        action="store_true",
        help="with --apache-client: use TBinaryProtocolAccelerated (Apache's C codec)",
    )
    args = parser.parse_args(argv)
    _setup_logging("WARNING")
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
        )
    )
    workdir = Path(args.workdir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    session = Session(
        matrix=matrix,
        full=args.full,
        seconds=args.seconds,
        json_path=Path(args.json),
        workdir=workdir,
        memory_keys=args.memory_keys,
        memory_value_bytes=args.memory_value_bytes,
        transfer_keys=args.transfer_keys,
        apache_procs=args.apache_procs if args.apache_client else (),
        apache_accelerated=args.apache_accelerated,
        repeat=args.repeat,
        out=lambda line: print(line, flush=True),
    )
    print(f"== work directory: {workdir}; results: {args.json}", flush=True)
    try:
        with ZooKeeperServer(workdir / "zookeeper") as zk:
            session.run(zk.connect_string, zk.pid)
    except (errors.KVError, TimeoutError) as exc:
        print(f"kv-bench: {exc}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {
    "node": node_main,
    "client": client_main,
    "createznode": createznode_main,
    "check": check_main,
    "demo": demo_main,
    "bench": bench_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(f"usage: python -m kvstore {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[args[0]](args[1:])
