"""kv: use a cluster from the shell (``kv get KEY``, ``kv put KEY VALUE``, ...).

The cluster is named by --zk/--path, else $KV_ZK/$KV_PATH, else 127.0.0.1:2181 and /kvstore.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from kvstore import errors
from kvstore.cli.args import (
    add_tls_arguments,
    add_zk_tls_arguments,
    new_parser,
    positive_float,
    positive_int,
    report_error,
    tls_from,
    zk_connect,
    zk_path,
    zk_tls_from,
)
from kvstore.cli.interrupts import Interrupts
from kvstore.client.client import DEFAULT_PATH, DEFAULT_ZK, MAX_TIMEOUT_S, Client
from kvstore.client.status import SERVING_ROLES, cluster_state
from kvstore.config import ClientConfig, Limits
from kvstore.server.storage import StripedStore
from kvstore.server.wal import SNAPSHOT_FILE, WriteAheadLog

EXIT_OK = 0
EXIT_NO = 1  # get/del of a missing key, cas that did not swap
EXIT_UNAVAILABLE = 2  # ZooKeeper unreachable, no primary, timeout
EXIT_USAGE = 64  # bad arguments (EX_USAGE)
LOAD_THREADS = 8
DEFAULT_TIMEOUT_S = 5.0

EPILOG = f"""\
exit status: {EXIT_OK} done; {EXIT_NO} key missing (get, del, any of mget), cas did not swap,
or dump --data-dir of a damaged directory (what was intact is dumped);
{EXIT_UNAVAILABLE} cluster unreachable, no primary (status: no node answers as primary), or
timed out; {EXIT_USAGE} bad arguments (a key or value refused for its size or encoding included);
128 + the signal when interrupted (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP: a write under way
may or may not have been applied).

examples:
  kv put greeting hello
  kv put config < config.json     # the value from standard input, byte for byte (UTF-8)
  kv get greeting                 # prints hello; nothing and exit 1 if missing
  kv cas counter 2 --expect 1     # set to 2 only if it is 1 (--absent: only if missing)
  kv mget a b c                   # KEY<TAB>VALUE per key; a missing key alone on its line
  kv -o json mget a b c           # {{"a": "1", "b": null, ...}}
  kv dump backup.jsonl            # every key, a JSON object per line
  kv load backup.jsonl            # put them back (into this or another cluster)
  kv status"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = new_parser(
        prog="kv",
        description="Read and write a kvstore cluster found through ZooKeeper.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parser_class=_Parser,
    )
    _add_common_arguments(parser)
    parser.set_defaults(
        output="text", timeout=DEFAULT_TIMEOUT_S, max_value_bytes=Limits().max_value_bytes
    )  # (--zk, --path: in main)
    add_tls_arguments(parser, "the client's")
    add_zk_tls_arguments(parser)
    # The same options after the command too (kv status -o json): set only where given.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _add_common_arguments(common)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **options: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], **options)

    get = command("get", help="print a key's value (and a newline)")
    get.add_argument("key")
    get.add_argument(
        "-n",
        "--no-newline",
        action="store_true",
        help="print the value alone: what kv put stored, byte for byte",
    )
    put = command("put", help="set a key")
    put.add_argument("key")
    put.add_argument("value", nargs="?", help="the value (default: read standard input to its end)")
    command("del", help="delete a key").add_argument("key")
    cas = command("cas", help="compare-and-set: set only if the value is as expected")
    cas.add_argument("key")
    cas.add_argument("value", help="the new value")
    condition = cas.add_mutually_exclusive_group(required=True)
    condition.add_argument("--expect", metavar="OLD", help="swap only if the value is OLD")
    condition.add_argument("--absent", action="store_true", help="swap only if the key is missing")
    command("mget", help="print several keys").add_argument("keys", nargs="+")
    command("status", help="list the nodes: address, role, epoch, in-sync, keys")
    dump = command(
        "dump",
        help='export every key: a JSON object per line, {"key": ..., "value": ...}',
        description="Export every key and value, a JSON object per line. Not one instant: a "
        "key neither written nor deleted during the dump is in it exactly once, one written "
        "meanwhile may or may not be. A failover during the dump fails it (exit 2): run it "
        "again.",
    )
    dump.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="write here (whole or not at all: FILE appears once the dump is complete, "
        "replacing one that exists); default standard output",
    )
    dump.add_argument(
        "--data-dir",
        metavar="DIR",
        help="read a STOPPED node's data directory instead of the cluster (no ZooKeeper): its "
        "keys as that node last held them, to rescue data a cluster cannot serve any more "
        "(a lost parent znode, a reset, a directory moved aside). Its log files are left as "
        "they were",
    )
    load = command(
        "load",
        help="import what kv dump wrote (put every key; the others are left as they are)",
        description="Put every key of a kv dump file (every line's form is checked before "
        "the first put; a put the nodes refuse, say a value over their limit, stops it with "
        "the key and how many were loaded). Exactly-once puts: after a failure, running it "
        "again is safe.",
    )
    load.add_argument("file", nargs="?", metavar="FILE", help="default standard input")
    load.add_argument(
        "--threads",
        type=positive_int,
        default=LOAD_THREADS,
        metavar="N",
        help=f"puts under way at once (default {LOAD_THREADS})",
    )
    return parser


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--zk, --path, -o and --timeout: before the command, or after it."""
    parser.add_argument(
        "--zk",
        type=zk_connect,
        metavar="HOSTS",
        help=f"ZooKeeper connect string (default $KV_ZK or {DEFAULT_ZK})",
    )
    parser.add_argument(
        "--path",
        type=zk_path,
        help=f"the cluster's parent znode (default $KV_PATH or {DEFAULT_PATH})",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        help="text (default: values as they are, a table for status) or json (one JSON "
        "document, for scripts)",
    )
    parser.add_argument(
        "--max-value-bytes",
        type=positive_int,
        metavar="N",
        help="the nodes' --max-value-bytes where it was raised (default "
        f"{Limits().max_value_bytes}, theirs): a large put whose send fails is then retried, "
        "not taken for one over their limit",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        metavar="S",
        help="seconds a command may take, retries through a failover included (default "
        f"{DEFAULT_TIMEOUT_S:g})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for option, variable, default, check in (
        ("zk", "KV_ZK", DEFAULT_ZK, zk_connect),
        ("path", "KV_PATH", DEFAULT_PATH, zk_path),
    ):
        if getattr(args, option) is None:
            try:
                setattr(args, option, check(os.environ.get(variable, default)))
            except argparse.ArgumentTypeError as exc:
                parser.error(f"${variable}: {exc}")
    if args.timeout > MAX_TIMEOUT_S:
        parser.error(f"--timeout: at most {MAX_TIMEOUT_S:g} s (exactly-once records expire)")
    args.tls = tls_from(parser, args)
    args.zk_tls = zk_tls_from(parser, args)
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)  # our one line says it all
    # (SIGTERM and SIGHUP as Ctrl-C: one line, 128 + the signal; an unfinished dump is
    # not left behind)
    with Interrupts("kv") as interrupts:
        try:
            if args.command == "put" and args.value is None:
                args.value = _value_from_stdin(parser)
            if args.command == "load" and args.file in (None, "-") and _is_terminal(sys.stdin):
                parser.error("load: give FILE, or send the dump on standard input (kv load < FILE)")
            if args.command == "status":
                return _status(args)
            if args.command == "dump" and args.data_dir is not None:
                pairs, is_damaged = _stored_pairs(args.data_dir)
                done = _dump(pairs, args.file)
                return EXIT_NO if is_damaged and done == EXIT_OK else done
            with Client(
                args.zk,
                args.path,
                timeout=args.timeout,
                tls=args.tls,
                zk_tls=args.zk_tls,
                max_value_bytes=args.max_value_bytes,
            ) as kv:
                return _run(kv, args)
        except (errors.BadRequestError, errors.TooLargeError) as exc:  # the arguments refused
            report_error("kv", exc)
            return EXIT_USAGE
        except errors.KVError as exc:
            report_error("kv", exc)
            return EXIT_UNAVAILABLE
        except KeyboardInterrupt:  # a write under way may or may not have been applied
            return interrupts.report()


def _run(kv: Client, args: argparse.Namespace) -> int:
    is_json = args.output == "json"
    if args.command == "get":
        value = kv.get(args.key)
        if value is not None and args.no_newline and not is_json:
            sys.stdout.write(value)
        elif value is not None or is_json:
            _emit(is_json, {"key": args.key, "value": value}, value or "")
        return EXIT_OK if value is not None else EXIT_NO
    if args.command == "put":
        kv.put(args.key, args.value)  # (read from stdin by main if not given)
        _emit(is_json, {"key": args.key, "ok": True}, "OK")
        return EXIT_OK
    if args.command == "del":
        existed = kv.delete(args.key)
        _emit(is_json, {"key": args.key, "deleted": existed}, "1" if existed else "0")
        return EXIT_OK if existed else EXIT_NO
    if args.command == "cas":
        swapped = kv.cas(args.key, None if args.absent else args.expect, args.value)
        _emit(is_json, {"key": args.key, "swapped": swapped}, "1" if swapped else "0")
        return EXIT_OK if swapped else EXIT_NO
    if args.command == "dump":
        return _dump(kv.scan(), args.file)
    if args.command == "load":
        return _load(kv, _entries(args.file), args.threads, is_json)
    values = kv.get_many(args.keys)
    text = "\n".join(k if v is None else f"{k}\t{v}" for k, v in values.items())
    _emit(is_json, values, text)
    return EXIT_NO if None in values.values() else EXIT_OK


def _is_terminal(stream: TextIO | None) -> bool:
    """Whether reading ``stream`` would wait for somebody's typing (or there is none)."""
    return stream is None or stream.isatty()


def _value_from_stdin(parser: argparse.ArgumentParser) -> str:
    """``kv put KEY`` without VALUE: standard input to its end, unchanged (no newline cut)."""
    if _is_terminal(sys.stdin):
        parser.error("put: give VALUE, or send it on standard input (kv put KEY < FILE)")
    data = sys.stdin.buffer.read()
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise errors.BadRequestError(
            f"put: standard input is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "values are text"
        ) from None


def _dump(pairs: Iterable[tuple[str, str]], file: str | None) -> int:
    if file is None or file == "-":
        _write_dump(pairs, sys.stdout)
        return EXIT_OK
    path = Path(file)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as out:
            count = _write_dump(pairs, out)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
    except OSError as exc:
        raise errors.BadRequestError(f"dump: cannot write {path}: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
    print(f"dumped {count} keys to {path}", file=sys.stderr)
    return EXIT_OK


def _write_dump(pairs: Iterable[tuple[str, str]], out: TextIO) -> int:
    """Every key and value as a JSON object per line; how many."""
    count = 0
    for key, value in pairs:
        out.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
        count += 1
    return count


def _stored_pairs(directory: str) -> tuple[list[tuple[str, str]], bool]:
    """The keys and values a stopped node's data directory holds, recovered as the node
    would (DataDirectoryInUseError while a node uses it), and whether it is damaged: then
    what is intact (the records of a damaged file before the damage, every other file's)."""
    path = Path(directory)
    has_data = (path / SNAPSHOT_FILE).exists() or any(path.glob("wal-*"))
    if not path.is_dir() or not has_data:
        raise errors.BadRequestError(f"dump: {directory} holds no node's data (no log or snapshot)")
    store = StripedStore()
    store.log = WriteAheadLog(path, fsync="never")
    damage: list[str] = []
    try:
        store.recover(on_damage=lambda exc: damage.append(exc.damage))
        for problem in damage:
            print(f"kv: {problem}: dumping what is intact", file=sys.stderr)
        if damage:
            print(
                f"kv: {directory} is damaged: the dump holds every key that could be read, "
                "but keys may be missing, older than the node held them, or back though deleted "
                f"(exit {EXIT_NO})",
                file=sys.stderr,
            )
        if not store.log.is_complete_copy:
            print(
                f"kv: {directory} holds an incomplete copy (a join or catch-up was cut short): "
                "keys may be missing or older",
                file=sys.stderr,
            )
    finally:
        store.log.close()
    return sorted(store.snapshot().items()), bool(damage)


def _entries(file: str | None) -> list[tuple[str, str]]:
    """The (key, value) pairs of a dump, every line checked (BadRequestError names the
    first bad one)."""
    if file is None or file == "-":
        lines = sys.stdin.buffer.read().splitlines()
        where = "standard input"
    else:
        try:
            lines = Path(file).read_bytes().splitlines()
        except OSError as exc:
            raise errors.BadRequestError(f"load: {exc.strerror}: {file}") from None
        where = file
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:  # (UnicodeDecodeError included)
            raise errors.BadRequestError(f"load: {where} line {number}: {exc}") from None
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("key"), str)
            and isinstance(entry.get("value"), str)
        ):
            raise errors.BadRequestError(
                f'load: {where} line {number}: not {{"key": TEXT, "value": TEXT}} '
                "(what kv dump writes)"
            )
        if not entry["key"]:  # (an earlier version stored one; the nodes refuse it now)
            raise errors.BadRequestError(
                f"load: {where} line {number}: the key is empty (a key has at least one character)"
            )
        entries.append((entry["key"], entry["value"]))
    return entries


def _load(kv: Client, entries: list[tuple[str, str]], threads: int, is_json: bool) -> int:
    loaded: list[None] = []  # (one per put done: list.append is atomic)

    def put(entry: tuple[str, str]) -> None:
        kv.put(*entry)
        loaded.append(None)

    def advice(exc: errors.KVError) -> str:
        if isinstance(exc, (errors.TooLargeError, errors.BadRequestError)):
            return "fix the file and load it again"
        return "load it again"

    pool = ThreadPoolExecutor(threads, thread_name_prefix="kv-load")
    position = 0
    try:
        for _ in pool.map(put, entries):
            position += 1  # (the first failure, in the file's order, is raised here)
    except errors.KVError as exc:
        pool.shutdown(cancel_futures=True)  # (the puts under way end first)
        key = entries[position][0]
        exc.args = (
            f"load: {exc} (key {key!r:.80}, entry {position + 1} of {len(entries)}); "
            f"keys loaded: {len(loaded)}; {advice(exc)} (loading the same keys again is safe)",
        )
        raise
    finally:  # (after a failure or Ctrl-C, the puts not begun are not made)
        pool.shutdown(cancel_futures=True)
    _emit(is_json, {"loaded": len(entries)}, f"loaded {len(entries)} keys")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    config = ClientConfig(
        args.zk, args.path, zk_connect_timeout_s=args.timeout, tls=args.tls, zk_tls=args.zk_tls
    )
    meta, reports = cluster_state(config)
    # Serving needs a primary (the seed's nodes have no status: there, any node answering;
    # a new kvstore cluster has no primary yet: not serving).
    if meta.is_kvstore:
        is_serving = any(r.role == "primary" for r in reports)
    else:
        is_serving = any(r.role not in ("unreachable", "stale") for r in reports)
    exit_status = EXIT_OK if is_serving else EXIT_UNAVAILABLE
    if args.output == "json":
        print(json.dumps([r.as_dict() for r in reports], indent=2))
        return exit_status
    rows = [("NODE", "ADDRESS", "ROLE", "EPOCH", "IN-SYNC", "KEYS")]
    for r in reports:
        keys = "-" if r.keys is None else str(r.keys)
        epoch = "-" if r.serving_epoch is None else str(r.serving_epoch)
        in_sync = "yes" if r.is_in_sync else "no"
        rows.append((r.name, r.address, r.role, epoch, in_sync, keys))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    if not reports:
        print(f"(no node registered under {args.path})")
    elif meta.is_initialized:
        serving = {r.name for r in reports if r.is_in_sync and r.role in SERVING_ROLES}
        print(f"replication factor {meta.replicas}: {len(serving)} in sync and serving")
        absent = sorted(set(meta.in_sync) - serving)
        if absent:  # (the primary drops them within a second or so, or it is gone itself)
            print(f"(listed in sync, not answering as primary or backup: {', '.join(absent)})")
    for failed in (r for r in reports if r.error):
        how = "failed the TLS check" if failed.role == "forbidden" else "did not answer"
        print(f"({failed.name} {how}: {failed.error})")
    if any(r.role == "stale" for r in reports):
        print("(stale: a node that stopped; its znode goes when its ZooKeeper session expires)")
    if reports and all(r.role == "forbidden" for r in reports):
        # (Whether the cluster serves others is unknown: its nodes refused this client.)
        print("no node answers this client: each connection failed the TLS check (see above)")
    elif reports and not is_serving:
        print("no node answers as primary: the cluster cannot serve now")
    return exit_status


def _emit(is_json: bool, data: object, text: str) -> None:
    print(json.dumps(data) if is_json else text)
