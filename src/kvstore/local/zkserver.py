"""A managed, real, standalone ZooKeeper server for tests and demos.

:class:`ZooKeeperServer` runs ``org.apache.zookeeper.server.ZooKeeperServerMain``
from the installed jars (Debian's ``zookeeper`` package puts them in
``/usr/share/java``) as a child process, in a directory of its own: ``zoo.cfg``,
``data/`` and ``zookeeper.log`` (the server's stdout and stderr, appended across
restarts) all live under ``base_dir``.

Invariants:

* ``start()`` returns only once the server serves sessions (``srvr`` gives its state;
  ``ruok``'s ``imok`` comes before that); otherwise it stops what it launched and raises
  :class:`ZooKeeperServerError` with the tail of the log (or, interrupted, re-raises).
* ``stop()`` signals only the process this object started (through its
  ``Popen`` handle), never anything found by name.
* ``restart()`` keeps the port and the data directory, so persistent znodes and
  unexpired sessions survive it.

The server is tuned for tests: a short ``tickTime`` and a session range of
``2 * tickTime`` .. 30 s, so a client can ask for a 1 s session and lose it
quickly once it stops heart-beating.

With ``tls`` (the server's certificate and key, and the CA its clients' certificates must
come from; PEM) it listens on a TLS port only (``secureClientPort``, Netty, TLS 1.3, a client
certificate required): ``connect_string`` then names that port, and the readiness poll
asks ``srvr`` over TLS, showing the server's own certificate.

By default it listens on loopback; ``host`` and ``command_prefix`` (e.g. ``ip netns exec NS``,
which must exec the server, keeping the PID) run it on an address inside a network namespace:
give ``port`` then, and call ``start()`` from a thread inside that namespace (its readiness
poll connects to ``host``).

This module uses the standard library only (no kazoo).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from kvstore.config import TlsConfig
from kvstore.errors import KVError
from kvstore.local.processes import free_port, terminate, wait_until

CLASSPATH_ENV = "KVSTORE_ZK_CLASSPATH"
JAR_DIR = Path("/usr/share/java")
MAIN_CLASS = "org.apache.zookeeper.server.ZooKeeperServerMain"
MAX_SESSION_TIMEOUT_MS = 30_000
JVM_OPTIONS = ("-Xmx512m", "-XX:+UseSerialGC", "-Djava.awt.headless=true")

# Unversioned names, as Debian installs them (each is a symlink to the versioned jar).
REQUIRED_JARS = (
    "zookeeper",
    "zookeeper-jute",
    "slf4j-api",
    "slf4j-simple",  # the one slf4j binding: logs to stderr, i.e. to zookeeper.log
    "netty-handler",
    "netty-transport",
    "netty-common",
    "netty-buffer",
    "netty-resolver",
    "netty-codec",
    "netty-transport-native-epoll",
    "netty-transport-native-unix-common",
    "metrics-core",
    "commons-cli",
    "commons-io",
    "jackson-core",
    "jackson-databind",
    "jackson-annotations",
    "snappy-java",
)

# A cold JVM takes a while over its first TLS handshakes: a shorter wait fails them all.
RUOK_TLS_TIMEOUT_S = 5.0
TLS13_CIPHER_SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
_INSTALL_HINT = "run scripts/setup (or: apt-get install zookeeper)"


class ZooKeeperServerError(KVError):
    """The managed ZooKeeper could not be found, started or stopped."""


def find_zookeeper_classpath() -> str:
    """The server classpath: ``$KVSTORE_ZK_CLASSPATH`` if set, else jars in /usr/share/java."""
    override = os.environ.get(CLASSPATH_ENV)
    if override:
        return override
    jars = [JAR_DIR / f"{name}.jar" for name in REQUIRED_JARS]
    missing = [jar.name for jar in jars if not jar.is_file()]
    if missing:
        raise ZooKeeperServerError(
            f"ZooKeeper jars missing from {JAR_DIR}: {', '.join(missing)}; "
            f"{_INSTALL_HINT}, or set {CLASSPATH_ENV}"
        )
    return os.pathsep.join(str(jar) for jar in jars)


def find_java() -> str:
    """The ``java`` executable: ``$JAVA_HOME/bin/java`` if it exists, else ``java`` on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise ZooKeeperServerError(
            f"no java executable (not on PATH, nor in $JAVA_HOME/bin); {_INSTALL_HINT}"
        )
    return found


def is_ok(host: str, port: int, timeout_s: float = 0.5, tls: ssl.SSLContext | None = None) -> bool:
    """True if the ZooKeeper server at host:port answers ``ruok`` with ``imok`` (over TLS
    with ``tls``): it runs, though it may not serve sessions yet (see :func:`is_serving`)."""
    return _four_letter_word(host, port, b"ruok", timeout_s, tls) == b"imok"


def is_serving(
    host: str, port: int, timeout_s: float = 0.5, tls: ssl.SSLContext | None = None
) -> bool:
    """True if the ZooKeeper server at host:port serves sessions: ``srvr`` gives its state
    (``imok`` comes earlier, and a session opened before this drops at once: kazoo then logs
    "Connection dropped" and connects again)."""
    reply = _four_letter_word(host, port, b"srvr", timeout_s, tls)
    return reply is not None and reply.startswith(b"Zookeeper version")


def _four_letter_word(
    host: str, port: int, word: bytes, timeout_s: float, tls: ssl.SSLContext | None
) -> bytes | None:
    """The server's whole reply to ``word`` (up to 64 KiB), None if it cannot be had."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        sock.sendall(word)
        reply = b""
        while len(reply) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    except OSError:
        return None
    finally:
        sock.close()
    return reply


class ZooKeeperServer:
    """One standalone ZooKeeper process, owned by this object. Use as a context manager."""

    HOST = "127.0.0.1"

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        tick_time_ms: int = 200,
        host: str = HOST,
        command_prefix: Sequence[str] = (),
        tls: TlsConfig | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.command_prefix = list(command_prefix)
        self.base_dir = Path(base_dir)
        self.tick_time_ms = tick_time_ms
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise ZooKeeperServerError("port not chosen yet: call start() first")
        return self._port

    @property
    def connect_string(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "zookeeper.log"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def config_path(self) -> Path:
        return self.base_dir / "zoo.cfg"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 30.0) -> None:
        """Launch the server and return once it serves; raise with the log tail if not."""
        if self._process is not None:
            raise ZooKeeperServerError(f"already started (pid {self._process.pid})")
        classpath = find_zookeeper_classpath()
        command = [*self.command_prefix, find_java(), *JVM_OPTIONS, "-cp", classpath, MAIN_CLASS]
        if self._port is None:
            self._port = free_port(self.host)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.tls is not None:
            self._write_key_store(self.tls)
        self.config_path.write_text(self._config_text())
        command.append(str(self.config_path))
        with self.log_path.open("ab") as log:
            log.write(f"--- kvstore: starting ZooKeeper on {self.connect_string}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                command,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, terminate, self._process)
        try:
            self._wait_until_ok(timeout_s)
        except BaseException:  # (Ctrl-C, or a signal a program turned into it, too)
            self.stop()
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the process this object started (SIGTERM, then SIGKILL) and reap it."""
        process, self._process = self._process, None
        if process is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        terminate(process, timeout_s)

    def restart(self, timeout_s: float = 30.0) -> None:
        """Stop, then start again on the same port with the same data directory."""
        self.stop()
        self.start(timeout_s=timeout_s)

    def log_tail(self, lines: int = 50) -> str:
        """The last ``lines`` lines of the server's log ("" if there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ZooKeeperServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ZooKeeperServer(port={self._port}, pid={self.pid}, base_dir={self.base_dir})"

    @property
    def key_store_path(self) -> Path:
        return self.base_dir / "tls" / "server.pem"

    def _write_key_store(self, tls: TlsConfig) -> None:
        """ZooKeeper's PEM key store is one file: the private key, then the certificate."""
        pem = Path(tls.key_path).read_bytes() + Path(tls.cert_path).read_bytes()
        path = self.key_store_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(pem)

    def _listen_settings(self) -> dict[str, object]:
        if self.tls is None:
            return {"clientPort": self.port, "clientPortAddress": self.host}
        return {
            "secureClientPort": self.port,
            "secureClientPortAddress": self.host,
            # Unknown keys become zookeeper.* system properties: the Netty factory (the only
            # one with TLS) and the client port's ssl.* settings.
            "serverCnxnFactory": "org.apache.zookeeper.server.NettyServerCnxnFactory",
            "ssl.keyStore.location": self.key_store_path,
            "ssl.keyStore.type": "PEM",
            "ssl.trustStore.location": self.tls.ca_path,
            "ssl.trustStore.type": "PEM",
            "ssl.clientAuth": "need",
            "ssl.protocol": "TLSv1.3",
            "ssl.enabledProtocols": "TLSv1.3",
            # ZooKeeper 3.8's default list has TLS 1.2 suites only: the handshake would fail.
            "ssl.ciphersuites": ",".join(TLS13_CIPHER_SUITES),
        }

    def _ruok_tls(self) -> ssl.SSLContext | None:
        """The readiness poll's TLS context: the server's own certificate, its CA."""
        if self.tls is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # the server this object started, whatever it is named
        context.load_cert_chain(self.tls.cert_path, self.tls.key_path)
        context.load_verify_locations(self.tls.ca_path)
        return context

    def _config_text(self) -> str:
        settings = {
            "tickTime": self.tick_time_ms,
            "dataDir": self.data_dir,
            **self._listen_settings(),
            "maxClientCnxns": 0,
            "minSessionTimeout": 2 * self.tick_time_ms,
            "maxSessionTimeout": MAX_SESSION_TIMEOUT_MS,
            "admin.enableServer": "false",
            "4lw.commands.whitelist": "ruok,srvr,stat,mntr",
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _wait_until_ok(self, timeout_s: float) -> None:
        process = self._process
        assert process is not None
        tls = self._ruok_tls()

        def answered() -> bool | None:
            if is_serving(self.host, self.port, RUOK_TLS_TIMEOUT_S if tls else 0.5, tls):
                return True
            exit_code = process.poll()
            if exit_code is not None:
                raise self._start_error(f"exited with status {exit_code} before serving")
            return None

        try:
            wait_until(answered, timeout_s, lambda: "")
        except TimeoutError:
            raise self._start_error(f"did not serve within {timeout_s:.1f} s") from None

    def _start_error(self, what: str) -> ZooKeeperServerError:
        return ZooKeeperServerError(
            f"ZooKeeper on {self.connect_string} {what}; log {self.log_path}, last lines:\n"
            f"{self.log_tail(30)}"
        )
