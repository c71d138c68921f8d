"""kv-check: check an execution log for linearizability."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kvstore import errors
from kvstore.check.checker import run_check
from kvstore.cli.args import new_parser, report_error


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser(
        prog="kv-check",
        description="Check an execution log (as kv-client writes it: one invocation or "
        "response event per line) for linearizability: every key is a register starting "
        "empty (a missing key reads as empty), written with unique values, and changed by "
        "gets, puts, deletes and compare-and-sets. Prints OK or each violation with the "
        "operations involved.",
        epilog="exit status: 0 linearizable; 1 violations; 2 the log cannot be read or "
        "parsed; 3 no violation found, but some keys stayed undecided (a key with very many "
        "concurrent operations of unknown outcome exhausts the search budget); 130 "
        "interrupted (Ctrl-C)",
    )
    parser.add_argument("log", metavar="LOG", help="execution log file")
    args = parser.parse_args(argv)
    try:
        # (a log it cannot read: one line on stderr, as every program here says it gives up)
        return run_check(args.log, err=sys.stderr, error_prefix="kv-check: ")
    except (OSError, errors.KVError) as exc:
        report_error("kv-check", exc)
        return 2
    except UnicodeDecodeError as exc:
        report_error("kv-check", f"{args.log} is not an execution log (not UTF-8: {exc})")
        return 2
