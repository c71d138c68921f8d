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


# --------------------------------------------------------------------------- kv-node


def node_main(argv: Sequence[str] | None = None) -> int:
    from kvstore.config import Limits, NodeConfig
    from kvstore.node import EXIT_RESTART, StorageNode

    node_args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="kv-node",
        description="Run a storage node: serve the KeyValueService on HOST:PORT and register "
        "under PATH in ZooKeeper. The lowest registered node is the primary, the next the backup.",
    )
    parser.add_argument("host", metavar="HOST", help="address to serve on, e.g. 127.0.0.1")
    parser.add_argument("port", metavar="PORT", type=int, help="TCP port to serve on")
    parser.add_argument("zk_connect", metavar="ZK_CONNECT", help="ZooKeeper connect string, e.g. 127.0.0.1:2181")
    parser.add_argument("zk_path", metavar="PATH", help="parent znode, e.g. /kvstore")
    parser.add_argument("--session-timeout", type=_positive_float, default=10.0, metavar="S",
                        help="ZooKeeper session timeout in seconds (default 10; failover does not wait for it)")
    parser.add_argument("--lease", type=_positive_float, default=1.0, metavar="S",
                        help="read lease the backup grants the primary, seconds (default 1.0): how long a "
                        "backup waits before taking over from a primary it cannot prove dead")
    parser.add_argument("--max-key-bytes", type=_positive_int, default=1024, metavar="N",
                        help="largest key accepted (default 1024)")
    parser.add_argument("--max-value-bytes", type=_positive_int, default=1024 * 1024, metavar="N",
                        help="largest value accepted (default 1 MiB)")
    parser.add_argument("--stripes", type=_positive_int, default=256, metavar="N",
                        help="number of lock stripes (default 256)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)")
    args = parser.parse_args(node_args)
    _setup_logging(args.log_level)
    limits = Limits(
        max_key_bytes=args.max_key_bytes,
        max_value_bytes=args.max_value_bytes,
        max_frame_bytes=max(16 * 1024 * 1024, 2 * (args.max_key_bytes + args.max_value_bytes) + 4096),
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
    parser.add_argument("--reset", action="store_true",
                        help="also clear the cluster metadata: the next node starts a NEW, EMPTY store. "
                        "Only for when the data is lost anyway (every node holding it died)")
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
        description="The seed's benchmark: THREADS threads do random gets and puts (50/50 by default) "
        "on keys key-0..key-(KEYSPACE-1) for SECONDS, against the primary found through ZooKeeper. "
        "Prints throughput and latency; writes an execution log for kv-check.",
    )
    parser.add_argument("zk_connect", metavar="ZK_CONNECT", help="ZooKeeper connect string")
    parser.add_argument("zk_path", metavar="PATH", help="parent znode the nodes registered under")
    parser.add_argument("threads", metavar="THREADS", type=_positive_int)
    parser.add_argument("seconds", metavar="SECONDS", type=_positive_float)
    parser.add_argument("keyspace", metavar="KEYSPACE", type=_positive_int)
    parser.add_argument("--log", default="execution.log", metavar="FILE",
                        help="execution log to write (default ./execution.log); '-' for none")
    parser.add_argument("--write-ratio", type=float, default=0.5, metavar="P",
                        help="probability that an operation is a put (default 0.5)")
    parser.add_argument("--value-bytes", type=int, default=0, metavar="N",
                        help="pad values to N bytes (default: the seed's value-<random int>)")
    parser.add_argument("--rpc-timeout-ms", type=_positive_int, default=2000, metavar="MS",
                        help="per-request timeout in milliseconds (default 2000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.write_ratio <= 1.0:
        parser.error("--write-ratio must be within [0, 1]")
    _setup_logging("WARNING")
    workload = bench.Workload(args.threads, args.seconds, args.keyspace, args.write_ratio,
                              args.value_bytes, args.seed)
    config = ClientConfig(args.zk_connect, args.zk_path, rpc_timeout_ms=args.rpc_timeout_ms,
                          zk_connect_timeout_s=min(10.0, args.seconds))
    try:
        result = bench.run(workload, config)
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
    parser.add_argument("--seconds", type=_positive_float, default=20.0, help="benchmark length (default 20)")
    parser.add_argument("--threads", type=_positive_int, default=4, help="client threads (default 4)")
    parser.add_argument("--keyspace", type=_positive_int, default=1000, help="number of keys (default 1000)")
    parser.add_argument("--workdir", default="run/demo", help="where logs go (default run/demo)")
    args = parser.parse_args(argv)
    _setup_logging("INFO")
    return run_demo(args.seconds, args.threads, args.keyspace, args.workdir)


COMMANDS = {
    "node": node_main,
    "client": client_main,
    "createznode": createznode_main,
    "check": check_main,
    "demo": demo_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(f"usage: python -m kvstore {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[args[0]](args[1:])
