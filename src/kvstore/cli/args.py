"""What every program shares: argument types, the ZooKeeper arguments, logging, error lines."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from kvstore.bench.keys import KEY_DISTRIBUTIONS, ZIPFIAN_THETA
from kvstore.config import TlsConfig
from kvstore.coordination import MAX_REPLICAS, check_connect_string, check_replicas
from kvstore.rpc import client_tls_context

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def new_parser(
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser, **kwargs: Any
) -> argparse.ArgumentParser:
    """An ArgumentParser with the --version every program has."""
    from kvstore import __version__

    parser = parser_class(**kwargs)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, is_quiet: bool = False, log_format: str = "text") -> None:
    """One logging configuration for every program. ``is_quiet``: a command-line tool that
    reports failures in its own line, so kazoo's connection chatter is silenced;
    ``log_format`` "json" writes one JSON object per line (for log collectors)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    kazoo_level = logging.CRITICAL if is_quiet else max(logging.WARNING, logging.getLogger().level)
    logging.getLogger("kazoo").setLevel(kazoo_level)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # (argparse would name the function: "invalid positive_int value")
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < math.inf:  # (nan and inf too)
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def share(text: str) -> float:
    """A share (a probability): a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within 0 and 1, got {text}")
    return value


def check_replicas_option(parser: argparse.ArgumentParser, *values: int | None) -> None:
    """A usage error (exit 2) unless every ``--replicas`` value given is a replication
    factor kvstore supports (kv-createznode, kv-demo and kv-bench say it alike)."""
    try:
        for value in values:
            if value is not None:
                check_replicas(value)
    except ValueError:
        parser.error(f"--replicas must be 1 to {MAX_REPLICAS}")


def int_list(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers, e.g. ``1,4,16``."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def choice_list(text: str, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A comma-separated, non-empty list of words from ``choices``."""
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values or any(value not in choices for value in values):
        raise argparse.ArgumentTypeError(f"{what} are {', '.join(choices)}; got {text!r}")
    return values


def cpu_list(text: str) -> set[int] | str:
    """``auto``, ``all`` or a list of CPU numbers, e.g. 0 or 0,1."""
    if text in (CPU_AUTO, CPU_ALL):
        return text
    try:
        cpus = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not auto, all or a list of CPU numbers: {text}"
        ) from None
    # Not the inherited affinity: a node started by a pinned parent may still be pinned elsewhere.
    online = set(range(os.cpu_count() or 1))
    if not cpus or not cpus <= online:
        raise argparse.ArgumentTypeError(f"CPUs {text} not among this machine's {sorted(online)}")
    return cpus


CPU_AUTO = "auto"
CPU_ALL = "all"
SCHED_POLICIES = {"batch": os.SCHED_BATCH, "normal": os.SCHED_OTHER}


def set_scheduling(policy: str) -> str | None:
    """Run this process (and the threads it starts later) under ``policy`` of
    SCHED_POLICIES; None when done, else why not (a kernel or sandbox that refuses it)."""
    try:
        os.sched_setscheduler(0, SCHED_POLICIES[policy], os.sched_param(0))
    except OSError as exc:
        return str(exc)
    return None


def placement(choice: set[int] | str, port: int) -> set[int] | None:
    """The CPUs a node pins itself to for ``--cpu choice`` (None: leave it as it is).

    ``auto`` pins to one CPU only when the process may run on every CPU of a machine
    with several (nobody placed it: no taskset, no cpuset), choosing by the port so
    that the nodes of one machine spread over its CPUs.
    """
    if not isinstance(choice, str):
        return set(choice)
    if choice == CPU_ALL:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2 or len(allowed) != (os.cpu_count() or 1):
        return None
    return {allowed[port % len(allowed)]}


def rate(text: str) -> float:
    """A target rate in operations per second: >= 0 (0: as fast as possible)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a number of operations per second: {text!r}"
        ) from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def rate_list(text: str) -> tuple[float, ...]:
    """A comma-separated, non-empty list of rates, e.g. ``0,2000,8000``."""
    values = tuple(rate(part) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates, got {text!r}")
    return values


def zipfian_theta(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be within (0, 1), got {text}")
    return value


def dist_list(text: str) -> tuple[str, ...]:
    return choice_list(text, KEY_DISTRIBUTIONS, "key distributions")


DIST_HELP = (
    "key choice: uniform (every key equally likely; the default) or zipfian (YCSB's: key-i "
    "has probability proportional to 1/(i+1)^THETA, key-0 the most popular; YCSB's "
    "workloads A, B and C choose keys this way)"
)
RATE_HELP = (
    "target operations per second, all threads together (0: as fast as possible, the "
    "default). Open loop: each thread sends one request every THREADS/OPS seconds on a fixed "
    "schedule, and a latency is measured from the request's intended start on that schedule, "
    "so time spent waiting behind a slow request counts (no coordinated omission); a thread "
    "that falls behind sends at once until it has caught up. Without it the load is a closed "
    "loop"
)


def add_load_shape_arguments(parser: argparse.ArgumentParser, is_list: bool = False) -> None:
    """--dist, --zipfian-theta and --rate: which keys a load touches and how fast it sends
    (kv-client; kv-bench, ``is_list``, takes lists of distributions and of rates)."""
    if is_list:
        parser.add_argument(
            "--dist", type=dist_list, default=("uniform",), metavar="LIST",
            help=f"{DIST_HELP}. A comma-separated list: each value is a configuration",
        )  # fmt: skip
    else:
        parser.add_argument("--dist", choices=KEY_DISTRIBUTIONS, default="uniform", help=DIST_HELP)
    parser.add_argument(
        "--zipfian-theta",
        type=zipfian_theta,
        default=ZIPFIAN_THETA,
        metavar="THETA",
        help=f"skew of --dist zipfian, within (0, 1), larger is more skewed (default "
        f"{ZIPFIAN_THETA:g}, YCSB's: with 1000 keys, key-0 then gets about 13%% of the "
        "operations and the 100 most popular keys about 69%%)",
    )
    if is_list:
        parser.add_argument(
            "--rate", type=rate_list, default=(0.0,), metavar="LIST",
            help=f"{RATE_HELP}. A comma-separated list: each value is a configuration",
        )  # fmt: skip
    else:
        parser.add_argument("--rate", type=rate, default=0.0, metavar="OPS", help=RATE_HELP)


def zk_connect(text: str) -> str:
    """A ZooKeeper connect string (``host:port,...``, optionally ``/chroot``), read as kazoo
    reads it."""
    try:
        check_connect_string(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not a ZooKeeper connect string (host:port,...): {text!r}: {exc}"
        ) from None
    return text


def tcp_port(text: str) -> int:
    """A TCP port to serve on: 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {value}")
    return value


def add_cluster_arguments(parser: argparse.ArgumentParser, path_help: str) -> None:
    """The positional ZK_CONNECT PATH pair (in the seed's order) that names a cluster."""
    parser.add_argument(
        "zk_connect",
        metavar="ZK_CONNECT",
        type=zk_connect,
        help="ZooKeeper connect string, e.g. 127.0.0.1:2181",
    )
    parser.add_argument("zk_path", metavar="PATH", type=zk_path, help=path_help)


def zk_path(text: str) -> str:
    """A cluster's parent znode path as ZooKeeper spells it: absolute, no empty, "." or
    ".." part, no trailing slash (kazoo would quietly mend some, and messages would then
    name a path that is not the one used)."""
    parts = text.split("/")
    if not text.startswith("/") or text == "/" or any(p in ("", ".", "..") for p in parts[1:]):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a znode path: expected an absolute path such as /kvstore "
            "(no empty, '.' or '..' parts, no trailing slash)"
        )
    return text


ZK_AUTH_ENV = "KV_ZK_AUTH"


def add_zk_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """--zk-auth / --zk-auth-file: the ZooKeeper digest credentials (else $KV_ZK_AUTH)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--zk-auth",
        metavar="USER:PASSWORD",
        help="authenticate to ZooKeeper by digest; znodes created are then writable only "
        f"with these credentials and readable by anyone. Also read from ${ZK_AUTH_ENV} "
        "(which, unlike this option, does not show in ps). Default: none, world-open znodes",
    )
    group.add_argument(
        "--zk-auth-file",
        metavar="FILE",
        help="read USER:PASSWORD for --zk-auth from the first line of FILE (private to its "
        "owner: chmod 600)",
    )


def zk_auth_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The credentials from --zk-auth, --zk-auth-file or $KV_ZK_AUTH (in that order)."""
    auth = args.zk_auth
    if args.zk_auth_file:
        path = args.zk_auth_file
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & 0o077:  # (as for the cluster secret, and as ssh refuses such a key)
                parser.error(
                    f"--zk-auth-file: {path} is accessible by group or others (mode "
                    f"{mode:04o}): the ZooKeeper password must be private to its owner "
                    f"(chmod 600 {path})"
                )
            with open(path, encoding="utf-8") as file:
                auth = file.readline().strip()
        except OSError as exc:
            parser.error(f"--zk-auth-file: {exc.strerror}: {path}")
    if auth is None:
        auth = os.environ.get(ZK_AUTH_ENV) or None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not (user and sep and password):
            parser.error("ZooKeeper credentials must be USER:PASSWORD (both non-empty)")
    return auth


def add_tls_arguments(parser: argparse.ArgumentParser, whose: str) -> None:
    """--tls-cert / --tls-key / --tls-ca: mutual TLS (all three, or none: plaintext)."""
    group = parser.add_argument_group(
        "mutual TLS (all three or none; TLS 1.3, PEM files, e.g. from kv-certs DIR)"
    )
    group.add_argument("--tls-cert", metavar="FILE", help=f"{whose} certificate")
    group.add_argument("--tls-key", metavar="FILE", help="its private key")
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="the CA certificate every peer's certificate must be signed by",
    )


def add_zk_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--zk-tls-cert / --zk-tls-key / --zk-tls-ca: TLS to ZooKeeper (all three, or none)."""
    group = parser.add_argument_group(
        "TLS to ZooKeeper's secureClientPort (all three or none; PEM files). ZK_CONNECT "
        "then names the secure port; the server's host name is checked against it"
    )
    group.add_argument(
        "--zk-tls-cert",
        metavar="FILE",
        help="the certificate shown to ZooKeeper (e.g. --tls-cert's)",
    )
    group.add_argument("--zk-tls-key", metavar="FILE", help="its private key")
    group.add_argument(
        "--zk-tls-ca", metavar="FILE", help="the CA ZooKeeper's certificate must be signed by"
    )


def tls_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TlsConfig | None:
    """The TlsConfig from --tls-*, None without them; a usage error if only some are given
    or the files do not load."""
    return _tls_files(parser, "--tls", (args.tls_cert, args.tls_key, args.tls_ca))


def zk_tls_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TlsConfig | None:
    """The TlsConfig from --zk-tls-*, as :func:`tls_from`."""
    return _tls_files(parser, "--zk-tls", (args.zk_tls_cert, args.zk_tls_key, args.zk_tls_ca))


def _tls_files(
    parser: argparse.ArgumentParser, prefix: str, files: tuple[str | None, str | None, str | None]
) -> TlsConfig | None:
    cert, key, ca = files
    if cert is None and key is None and ca is None:
        return None
    if cert is None or key is None or ca is None:
        parser.error(f"{prefix}-cert, {prefix}-key and {prefix}-ca go together")
    for option, path in ((f"{prefix}-cert", cert), (f"{prefix}-key", key), (f"{prefix}-ca", ca)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:  # (ssl's own message names no file)
            parser.error(f"{option} {path}: {exc.strerror or exc}")
    try:
        client_tls_context(cert, key, ca)
    except (OSError, ValueError) as exc:
        hint = ""
        if "KEY_VALUES_MISMATCH" in str(exc):
            hint = f" ({prefix}-key {key} is not the key of {prefix}-cert {cert})"
        else:  # (ssl's message names no file: find the one that is not what it should be)
            hint = _unreadable_pem(prefix, cert, key, ca)
        parser.error(f"cannot load the {prefix}-* files: {exc}{hint}")
    for option, path in ((f"{prefix}-cert", cert), (f"{prefix}-ca", ca)):
        problem = _validity_problem(path)
        if problem is not None:
            parser.error(f"{option} {path}: {problem}")
    return TlsConfig(cert, key, ca)


def _unreadable_pem(prefix: str, cert: str, key: str, ca: str) -> str:
    """ " (OPTION FILE is not ...)" for the first file that is not the PEM it should be, or
    "" if each one reads as such."""
    for option, path in ((f"{prefix}-cert", cert), (f"{prefix}-ca", ca)):
        try:
            x509.load_pem_x509_certificate(Path(path).read_bytes())
        except (OSError, ValueError):
            return f" ({option} {path} is not a PEM certificate)"
    try:
        serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except TypeError:  # (it wants a password)
        return f" ({prefix}-key {key} is encrypted: give a key without a passphrase)"
    except (OSError, ValueError, UnsupportedAlgorithm):
        return f" ({prefix}-key {key} is not a PEM private key)"
    return ""


def _validity_problem(path: str) -> str | None:
    """Why the (first) certificate in ``path`` is not valid now, None if it is: every peer
    would refuse it, so a program had better say so when it starts than retry for ever."""
    try:
        certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None  # (loaded by ssl all the same: leave the verdict to it)
    now = datetime.datetime.now(datetime.UTC)
    minute = "%Y-%m-%d %H:%M UTC"
    if certificate.not_valid_after_utc < now:
        return (
            f"the certificate expired on {certificate.not_valid_after_utc.strftime(minute)}: "
            "every peer refuses it; issue a new one"
        )
    if certificate.not_valid_before_utc > now:
        since = certificate.not_valid_before_utc.strftime(minute)
        return f"the certificate is valid only from {since} (is this machine's clock right?)"
    return None


def report_error(prog: str, exc: BaseException | str) -> None:
    """The one line a program prints on stderr when it gives up."""
    print(f"{prog}: {exc}", file=sys.stderr)
