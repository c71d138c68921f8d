"""Small helpers for the processes this package starts on this machine: a free loopback
port, polling for readiness, and stopping a child by PID (never by name)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

POLL_S = 0.02
T = TypeVar("T")


def wait_until(found: Callable[[], T | None], timeout_s: float, failure: Callable[[], str]) -> T:
    """Poll ``found`` every POLL_S until it returns something; TimeoutError(failure()) after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = found()
        if value is not None:
            return value
        time.sleep(POLL_S)
    raise TimeoutError(failure())


_HANDED_OUT: set[tuple[str, int]] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, close),
    and never handed out before by this process: the kernel picks port 0's port at random,
    so two calls before either port is bound (the nodes of one cluster are given theirs
    before any starts) could get the same one (a 4-node test cluster once did)."""
    with _HANDED_OUT_LOCK:
        for _ in range(1000):  # bounded: thousands of ports are free
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if (host, port) not in _HANDED_OUT:
                _HANDED_OUT.add((host, port))
                return port
    raise OSError(f"no port on {host} that this process has not handed out already")


def terminate(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM the process, SIGKILL it if it outlives ``timeout_s``, and reap it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
