"""kv-demo: the README's main job (local ZooKeeper, two nodes, load, a kill -9, the verdict)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvstore import errors
from kvstore.bench.demo import run_demo
from kvstore.bench.faults import QUIET_END_S
from kvstore.cli.args import (
    check_replicas_option,
    new_parser,
    positive_float,
    positive_int,
    setup_logging,
)
from kvstore.cli.interrupts import Interrupts
from kvstore.coordination import MAX_REPLICAS
from kvstore.local.cluster import NodeExitedError

EPILOG = """\
exit status: 0 the history checked linearizable; 1 it did not (violations), or the demo
could not run (no Java or ZooKeeper, a port taken, ...); 2 bad arguments, or the execution
log could not be read back; 3 no violation found, but some keys undecided (as kv-check);
130 interrupted (Ctrl-C; 143 SIGTERM, 129 SIGHUP), once everything it started is stopped."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser(
        prog="kv-demo",
        description="Start a local ZooKeeper and two nodes (N with --replicas N), run "
        "kv-client, kill -9 the primary "
        "midway and restart it, then print throughput, latency and the kv-check verdict. "
        "There is no kill with --replicas 1 (it would lose the only copy), nor in a run of "
        f"{2 * QUIET_END_S:g} s or less (no fault comes in its last {QUIET_END_S:g} s); the "
        "demo says so when it starts.",
        epilog=EPILOG,
    )
    parser.add_argument(
        "--seconds", type=positive_float, default=20.0, help="benchmark length (default 20)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=4, help="client threads (default 4)"
    )
    parser.add_argument(
        "--keyspace", type=positive_int, default=1000, help="number of keys (default 1000)"
    )
    parser.add_argument("--workdir", default="run/demo", help="where logs go (default run/demo)")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="the same, secured: throwaway certificates (mutual TLS between every node and "
        "client, and to ZooKeeper, which listens on a TLS port only), ZooKeeper digest "
        "credentials for the parent znode and the nodes; all written under the work directory",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=2,
        metavar="N",
        help=f"replication factor: N nodes keeping N copies of every write (kv-createznode "
        f"--replicas N; 1 to {MAX_REPLICAS}, default 2; not with --secure)",
    )
    args = parser.parse_args(argv)
    check_replicas_option(parser, args.replicas)
    if args.secure and args.replicas != 2:
        parser.error("--replicas is for the plain demo (--secure runs two nodes)")
    setup_logging("INFO")
    # Its ZooKeeper sessions' reconnect chatter (kazoo warnings) is not the demo's story: a
    # failure that matters ends the demo with its own line.
    logging.getLogger("kazoo").setLevel(logging.ERROR)
    with Interrupts("kv-demo") as interrupts:
        try:
            return run_demo(
                args.seconds, args.threads, args.keyspace, args.workdir, args.secure, args.replicas
            )
        except NodeExitedError as exc:  # (its log says why)
            return interrupts.report_failure(exc.summary, "stopped the cluster")
        except (errors.KVError, OSError) as exc:  # no Java or ZooKeeper, a port taken, ...
            return interrupts.report_failure(exc, "stopped the cluster")
        except KeyboardInterrupt:  # (ZooKeeper and the nodes were stopped on the way out)
            return interrupts.report("stopped the cluster")
