"""kv-node: run one storage node (``kv-node HOST PORT ZK_CONNECT PATH``, the original order).

The parent znode PATH must exist (``kv-createznode`` creates it): without it kv-node says
what to run and exits 1, unless --create-parent asks it to create PATH as kv-createznode
would with the same credentials.

A node that must start over (deposed, or its session expired while it held no listed copy)
exits the node object with EXIT_RESTART; this program then re-executes itself with the same
arguments plus --restarted, so the new node starts from a clean process. --restarted turns
--create-parent off: a parent missing then was deleted while the node ran, and re-creating
it would bring the cluster back new and empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from kvstore import errors
from kvstore.cli.args import (
    CPU_AUTO,
    SCHED_POLICIES,
    add_cluster_arguments,
    add_tls_arguments,
    add_zk_auth_arguments,
    add_zk_tls_arguments,
    cpu_list,
    new_parser,
    placement,
    positive_float,
    positive_int,
    set_scheduling,
    setup_logging,
    tcp_port,
    tls_from,
    zk_auth_from,
    zk_tls_from,
)
from kvstore.config import MIB, Limits, NodeConfig, TlsConfig
from kvstore.coordination import createznode_command
from kvstore.rpc import load_cluster_secret, parse_address
from kvstore.rpc.budget import LARGE_REPLY_BYTES
from kvstore.rpc.secret import ClusterSecret
from kvstore.server.node import PARENT_GONE, StorageNode
from kvstore.server.roles import EXIT_RESTART
from kvstore.server.wal import FSYNC_MODES


def _config_default(name: str) -> Any:
    """NodeConfig's default for ``name``: --fsync and --snapshot-every-mb have no argparse
    default of their own (giving them without --data-dir is refused)."""
    return next(f.default for f in dataclasses.fields(NodeConfig) if f.name == name)


def main(argv: Sequence[str] | None = None) -> int:
    node_args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(node_args)
    zk_auth = zk_auth_from(parser, args)
    setup_logging(args.log_level, log_format=args.log_format)
    cpus = placement(args.cpu, args.port)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # before any thread starts: all of them inherit it
        pinned = ",".join(map(str, sorted(cpus)))
        logging.getLogger("kv-node").info("running on CPU %s (--cpu %s)", pinned, args.cpu)
    refused = None if args.sched is None else set_scheduling(args.sched)  # (as the placement)
    if refused is not None:
        logging.getLogger("kv-node").warning(
            "kept the default scheduling (--sched %s: %s)", args.sched, refused
        )
    limits = Limits.for_sizes(args.max_key_bytes, args.max_value_bytes)
    limits = dataclasses.replace(
        limits,
        max_connections=args.max_connections,
        idle_timeout_s=args.idle_timeout,
        frame_deadline_s=args.frame_deadline,
        reply_budget_bytes=args.reply_budget_mb * MIB,
    )
    if (
        args.data_dir is not None
        and os.path.exists(args.data_dir)
        and not os.path.isdir(args.data_dir)
    ):
        parser.error(f"--data-dir: {args.data_dir} exists and is not a directory")
    if args.data_dir is None:
        given = [
            o
            for o, v in (("--fsync", args.fsync), ("--snapshot-every-mb", args.snapshot_every_mb))
            if v is not None
        ]
        if given:  # (a node an operator believes durable would keep nothing on disk)
            verb = "needs" if len(given) == 1 else "need"
            parser.error(
                f"{' and '.join(given)} {verb} --data-dir: without it the store lives in "
                "memory only"
            )
    if args.metrics_host is not None and args.metrics_port is None:
        parser.error("--metrics-host needs --metrics-port (the metrics are off without it)")
    if args.host in ("0.0.0.0", "::") and args.advertise is None:
        parser.error(
            f"bound to every interface ({args.host}): --advertise HOST:PORT names the "
            "address other nodes and clients reach this node at"
        )
    if args.cluster_secret_upgrade and args.cluster_secret_file is None:
        parser.error("--cluster-secret-upgrade needs --cluster-secret-file")
    if args.cluster_secret_upgrade:
        logging.getLogger("kv-node").warning(
            "accepting 0.2's proofs of the cluster secret too (--cluster-secret-upgrade): "
            "restart this node without it once every node runs this version"
        )
    try:
        secret = (
            None
            if args.cluster_secret_file is None
            else load_cluster_secret(args.cluster_secret_file)
        )
        if secret is not None and args.cluster_secret_upgrade:
            secret = ClusterSecret.for_upgrade(secret)
        security = _Security(zk_auth, zk_tls_from(parser, args), tls_from(parser, args), secret)
        config = _config(args, limits, security)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        node = StorageNode(config)  # loads the data directory, if any
    except (OSError, errors.KVError) as exc:
        logging.getLogger("kv-node").error("cannot start: %s", exc)
        return 1
    # StorageNode builds its RpcServer with the frame bound only; the connection bounds go here.
    node.server.set_connection_bounds(
        limits.max_connections, limits.idle_timeout_s, limits.frame_deadline_s
    )
    # SIGHUP too (its terminal closed): an orderly stop, not the default's abrupt death,
    # which leaves the znode to its session timeout and says nothing. Unless ignored (nohup).
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, lambda s, _f: node.stop(f"signal {signal.Signals(s).name}"))
    try:
        code = node.run()
    except OSError as exc:
        logging.getLogger("kv-node").error("cannot serve on %s: %s", config.address, exc)
        return 1
    except errors.NoClusterError as exc:
        advice = _no_cluster_advice(args, config.zk_auth_options)
        logging.getLogger("kv-node").error("%s: %s", exc, advice)
        return 1
    except errors.KVError as exc:
        logging.getLogger("kv-node").error("%s", exc)
        return 1
    if code == EXIT_RESTART:
        logging.getLogger("kv-node").warning(
            "restarting (from its data directory, or empty without one)"
        )
        sys.stdout.flush()
        sys.stderr.flush()
        again = node_args if args.restarted else [RESTARTED, *node_args]  # (options first)
        os.execv(sys.executable, [sys.executable, "-m", "kvstore", "node", *again])
    return code


RESTARTED = "--restarted"


def _no_cluster_advice(args: argparse.Namespace, auth_options: Sequence[str]) -> str:
    """What to do about a missing parent znode: the kv-createznode command that creates it
    with this node's ZooKeeper credentials and TLS (the password itself never shown)."""
    if args.restarted:
        return PARENT_GONE
    tls = None
    if args.zk_tls_cert is not None:
        tls = TlsConfig(args.zk_tls_cert, args.zk_tls_key, args.zk_tls_ca)
    command = createznode_command(args.zk_connect, args.zk_path, auth_options, tls)
    return f"create the cluster with `{command}` (or pass --create-parent)"


@dataclasses.dataclass(frozen=True)
class _Security:
    """The node's credentials, from its options."""

    zk_auth: str | None
    zk_tls: TlsConfig | None
    tls: TlsConfig | None
    cluster_secret: bytes | None = dataclasses.field(repr=False)


def _config(args: argparse.Namespace, limits: Limits, security: _Security) -> NodeConfig:
    """The node's configuration from its arguments (ValueError if they do not fit together)."""
    return NodeConfig(
        host=args.host,
        port=args.port,
        zk_connect=args.zk_connect,
        zk_path=args.zk_path,
        limits=limits,
        stripe_count=args.stripes,
        zk_session_timeout_s=args.session_timeout,
        lease_s=args.lease,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        event_front=args.io == "events",
        advertise=args.advertise,
        data_dir=args.data_dir,
        fsync=args.fsync or _config_default("fsync"),
        snapshot_every_bytes=(
            args.snapshot_every_mb * MIB
            if args.snapshot_every_mb
            else _config_default("snapshot_every_bytes")
        ),
        zk_auth=security.zk_auth,
        zk_auth_file=args.zk_auth_file,
        zk_tls=security.zk_tls,
        tls=security.tls,
        cluster_secret=security.cluster_secret,
        create_parent=args.create_parent and not args.restarted,
    )


def _address(text: str) -> str:
    try:
        host, port = parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if host in ("0.0.0.0", "::"):
        raise argparse.ArgumentTypeError("advertise an address others can reach, not 0.0.0.0")
    return f"{host}:{tcp_port(str(port))}"


def _parser() -> argparse.ArgumentParser:
    parser = new_parser(
        prog="kv-node",
        description="Run a storage node: serve the key-value service on HOST:PORT and register "
        "under PATH in ZooKeeper. The lowest registered node is the primary, the next N - 1 "
        "its backups (N: the replication factor, kv-createznode --replicas, default 2), any "
        "further ones standbys. PATH must exist: create it first with kv-createznode "
        "ZK_CONNECT PATH (or pass --create-parent).",
        epilog="exit status: 0 stopped (SIGTERM, SIGINT or SIGHUP: an orderly stop); 1 cannot "
        "serve (port taken, ZooKeeper unreachable or refusing the credentials, no parent "
        "znode PATH or it was deleted while the node ran, a parent znode anyone may write "
        "although this node has credentials, damaged data directory or one in use (or a copy "
        "of a running node's), a data directory holding keys when this node would start a new "
        "cluster or keys of another cluster incarnation); 2 bad arguments (a cluster "
        "secret file others may read, --tls-* files that do not load or a certificate "
        "expired or not yet valid included); "
        "3 DATA LOST (no node holding a complete copy is alive; the message says how to start "
        "over)",
    )
    parser.add_argument("host", metavar="HOST", help="address to serve on, e.g. 127.0.0.1")
    parser.add_argument("port", metavar="PORT", type=tcp_port, help="TCP port to serve on")
    add_cluster_arguments(
        parser, "parent znode, e.g. /kvstore, created beforehand by kv-createznode"
    )
    parser.add_argument(
        "--create-parent",
        action="store_true",
        help="create PATH if it does not exist, as kv-createznode ZK_CONNECT PATH would with "
        "the same ZooKeeper credentials and TLS (with --zk-auth: writable only with them), "
        "instead of refusing to start. A mistyped PATH then starts a new, empty cluster. "
        "Only when the node starts: one deleted while the node runs is never re-created "
        "(the node stops, exit 1)",
    )
    parser.add_argument(RESTARTED, action="store_true", help=argparse.SUPPRESS)
    _add_timing_arguments(parser)
    _add_limit_arguments(parser)
    _add_serving_arguments(parser)
    _add_durability_arguments(parser)
    add_zk_auth_arguments(parser)
    add_zk_tls_arguments(parser)
    add_tls_arguments(parser, "this node's (with OU=node: it may replicate to other nodes)")
    parser.add_argument(
        "--cluster-secret-file",
        metavar="FILE",
        help="a secret shared by the cluster's nodes (at least 16 bytes; the file must not be "
        "accessible by group or others, chmod 600): only connections that prove it may call "
        "replication, join and state transfer, and this node proves it on its own calls to "
        "other nodes. Authenticates nodes without TLS (with TLS, both are required). Every "
        "node of the cluster needs the same one",
    )
    parser.add_argument(
        "--cluster-secret-upgrade",
        action="store_true",
        help="only while a cluster with --cluster-secret-file is upgraded from 0.2, one node "
        "at a time: also accept 0.2's proofs of the secret, and use them with a node that "
        "refuses this version's (0.2's name no address, so an exchange could be relayed: "
        "restart every node without this option once all run this version)",
    )
    _add_process_arguments(parser)
    return parser


def _add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """ZooKeeper session and the read lease."""
    parser.add_argument(
        "--session-timeout",
        type=positive_float,
        default=10.0,
        metavar="S",
        help="ZooKeeper session timeout in seconds (default 10; failover does not wait for it)",
    )
    parser.add_argument(
        "--lease",
        type=positive_float,
        default=1.0,
        metavar="S",
        help="read lease the backup grants the primary, seconds (default 1.0): how long a "
        "backup waits before taking over from a primary it cannot prove dead",
    )


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """What a node accepts: sizes, connections, time; lock stripes."""
    parser.add_argument(
        "--max-key-bytes",
        type=positive_int,
        default=1024,
        metavar="N",
        help="largest key accepted, in bytes (default 1024; give every node the same)",
    )
    parser.add_argument(
        "--max-value-bytes",
        type=positive_int,
        default=1024 * 1024,
        metavar="N",
        help="largest value accepted, in bytes (default 1 MiB = 1048576; give every node "
        "the same: replication batches are sized by the primary's limit)",
    )
    bounds = Limits()
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=bounds.max_connections,
        metavar="N",
        help=f"connections served at once (default {bounds.max_connections}); one more is "
        "refused with UNAVAILABLE 'too many connections'",
    )
    parser.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=bounds.idle_timeout_s,
        metavar="S",
        help=f"close a client connection idle this long, seconds (default {bounds.idle_timeout_s:g}"
        "; the primary's replication connections are exempt)",
    )
    parser.add_argument(
        "--frame-deadline",
        type=positive_float,
        default=bounds.frame_deadline_s,
        metavar="S",
        help="a request must arrive whole within this many seconds of its first byte, and "
        f"every reply must make progress as often (default {bounds.frame_deadline_s:g})",
    )
    parser.add_argument(
        "--reply-budget-mb",
        type=positive_int,
        default=bounds.reply_budget_bytes // MIB,
        metavar="N",
        help="MiB of replies the node may hold that its clients have not read yet, across "
        f"all connections (default {bounds.reply_budget_bytes // MIB}): while it holds more, "
        f"a reply over {LARGE_REPLY_BYTES // 1024} KiB (a large get or get_many) is answered "
        "UNAVAILABLE 'busy' instead, which clients retry; smaller replies are always served. "
        "Bounds what clients that never read their replies make the node hold, whatever "
        "--max-connections",
    )
    parser.add_argument(
        "--stripes",
        type=positive_int,
        default=256,
        metavar="N",
        help="how many locks the keys are spread over (default 256): writes to keys of "
        "different stripes go on in parallel; nodes of one cluster may differ",
    )


def _add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """Where others reach the node, and its metrics."""
    parser.add_argument(
        "--advertise",
        type=_address,
        default=None,
        metavar="HOST:PORT",
        help="the address other nodes and clients use to reach this node, registered in "
        "ZooKeeper (default HOST:PORT; set it when binding 0.0.0.0 or behind NAT)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics and a health check at "
        "/healthz (200 while serving a role, 503 while starting or stopping); 0 picks a "
        "free port (logged). Default: off (it costs a few µs per request)",
    )
    parser.add_argument(
        "--metrics-host",
        default=None,
        metavar="ADDRESS",
        help="the address the metrics port binds (default: HOST), e.g. 127.0.0.1 for a local "
        "monitoring agent: the metrics port has no authentication",
    )
    parser.add_argument(
        "--io",
        choices=("events", "threads"),
        default="events",
        help="events (default): one thread serves the clients' reads and writes, and the "
        "writes that arrive together are replicated together (fewer thread hand-offs, see "
        "BENCHMARKS.md); threads: a thread per connection. Replication, state transfer "
        "and TLS handshakes always run on threads of their own",
    )


def _add_durability_arguments(parser: argparse.ArgumentParser) -> None:
    """The data directory."""
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="keep the store on disk in DIR (write-ahead log + snapshots): the node recovers "
        "it after a restart, and the cluster survives losing every node at once. Without "
        "it the store lives in memory only",
    )
    parser.add_argument(
        "--fsync",
        choices=FSYNC_MODES,
        help="with --data-dir, when a write reaches the disk before it is acknowledged: "
        "always (an fsync inside each append, shared with no other; a group of writes the "
        "front received together, or a replicated batch, is one append), batch (default: "
        "concurrent writes share one fsync; "
        "no acknowledged write is lost), never (the OS decides: a machine crash may lose "
        "acknowledged writes)",
    )
    parser.add_argument(
        "--snapshot-every-mb",
        type=positive_int,
        metavar="MB",
        help="with --data-dir, snapshot and trim the log after this much log (default "
        f"{_config_default('snapshot_every_bytes') // MIB})",
    )


def _add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """Logging and CPU placement."""
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log verbosity (default INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines (default) or one JSON object per line, for log collectors",
    )
    parser.add_argument(
        "--cpu",
        type=cpu_list,
        default=CPU_AUTO,
        metavar="LIST",
        help="pin the node to these CPUs, e.g. 0 or 0,1; 'all' leaves it free; 'auto' "
        "(default) pins it to one CPU, chosen by its port, when nothing placed it already "
        "(taskset, cpuset) and the machine has several. A Python node runs on about one "
        "core anyway: on one CPU its threads hand the GIL over without cross-core "
        "wake-ups (about half the CPU per request, see BENCHMARKS.md)",
    )
    parser.add_argument(
        "--sched",
        choices=sorted(SCHED_POLICIES),
        default=None,
        help="the kernel's scheduling policy for the node's threads (default: the one it "
        "was started with): 'normal' (SCHED_OTHER) or 'batch' (SCHED_BATCH: a thread that "
        "wakes up waits for the running "
        "one to block instead of preempting it). 'batch' suits nodes that share a CPU with "
        "each other (a local cluster: 12-18%% more throughput at 16 client threads); beside "
        "clients on the same CPU it made a 4-thread client slower (BENCHMARKS.md)",
    )
