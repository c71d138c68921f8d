"""Hostile request frames for the wire tests, and the commands that measure what they cost.

Not a test module: tests/wire/test_request_check.py and test_server_bounds.py import it, and
it runs as a program (an in-process RpcServer on a loopback port, no ZooKeeper)::

    python3 tests/wire/hostile_frames.py check-cost        # ns per check_request of typical frames
    python3 tests/wire/hostile_frames.py fuzz --frames 20000   # worst time to refuse a mutant
    python3 tests/wire/hostile_frames.py freeze [--rpc PATH]   # the 28-byte request, before/after

``freeze --rpc PATH`` loads the server from another copy of rpc.py (for example the one before
the request check: ``git show <commit>:src/kvstore/rpc.py > /tmp/rpc_before.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport.memory import TCyMemoryBuffer

from kvstore import errors, rpc
from kvstore.idl import (
    Change,
    KeyValueService,
    LogChunk,
    Lookup,
    NodeStatus,
    RequestId,
    ScanChunk,
    SyncChunk,
)

# The measured request: get() with an unknown field 2 holding a list of 2**31 - 1 VOIDs.
FREEZE_REQUEST = bytes.fromhex("000000188001000100000003676574000000010f0002017fffffff00")

_ID = RequestId(client_id="client-1", seq=9, acked_below=8)
SAMPLE_ARGS: dict[str, tuple[Any, ...]] = {
    "get": ("key-1",),
    "put": ("key-1", "value-1"),
    "replicate": ("key-1", "value-1"),
    "dump": (),
    "replicate_batch": (
        7,
        ["a", "b"],
        ["1", "2"],
        "join-1",
        [Change(key="c", value="3", client_id="client-1", seq=5, outcome=True, acked_below=4)],
        8192,
        "log-1",
        ["client-1", ""],
        [9, 0],
        [8, 0],
    ),
    "status": (),
    "join": (7, "node-2", "join-1", 1000, "durable-1", 6, "log-1", 4096, 2),
    "sync_fetch": (7, "join-1", 0, 100),
    "sync_log": (7, "join-1", 4096, 1 << 20),
    "join_done": (7, "join-1"),
    "backup_renamed": (7, "join-1", "node-3"),
    "lookup": ("key-1",),
    "get_many": (["a", "b", "c"],),
    "put_once": ("key-1", "value-1", _ID),
    "remove": ("key-1", _ID),
    "compare_and_set": ("key-1", "old", "new", _ID),
    "scan": (0, 100, 7),
}


class TrivialHandler:
    """Answers every method of the service with a fixed, well-formed result."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        results: dict[str, Any] = {
            "get": "v",
            "dump": {"k": "v"},
            "status": NodeStatus("node-1", "primary", 1, 1, "127.0.0.1:1"),
            "join": 1,
            "sync_fetch": SyncChunk([], [], -1, []),
            "sync_log": LogChunk(b"", -1),
            "lookup": Lookup(found=True, value="v"),
            "get_many": {"a": "v"},
            "remove": True,
            "compare_and_set": False,
            "scan": ScanChunk([], [], -1, 7),
        }
        if name not in SAMPLE_ARGS:
            raise AttributeError(name)

        def answer(*_args: Any) -> Any:
            if name == "replicate":
                raise errors.StaleEpochError("replicate is always refused")
            return results.get(name)

        return answer


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``sock``; AssertionError if the server closes it first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the server closed the connection after {len(data)} of {size} bytes"
        data += chunk
    return data


def encode_call(method: str, args: tuple[Any, ...], seqid: int = 1) -> bytes:
    """A framed CALL as kvstore's client writes it (thriftpy2's compiled codec)."""
    buffer = TCyMemoryBuffer()
    proto = TCyBinaryProtocol(buffer)
    proto.write_message_begin(method, TMessageType.CALL, seqid)
    getattr(KeyValueService, f"{method}_args")(*args).write(proto)
    body = buffer.getvalue()
    return struct.pack("!i", len(body)) + body


def valid_frames() -> dict[str, bytes]:
    return {method: encode_call(method, args) for method, args in SAMPLE_ARGS.items()}


# --------------------------------------------------------------------------- mutations

HUGE_COUNTS = (2**31 - 1, 2**31, 2**32 - 1, 2**30, 65536, 255)


def _flip_bytes(rng: random.Random, body: bytearray) -> None:
    for _ in range(rng.randint(1, 4)):
        body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)


def _huge_count(rng: random.Random, body: bytearray) -> None:
    at = rng.randrange(max(1, len(body) - 3))
    body[at : at + 4] = struct.pack("!I", rng.choice(HUGE_COUNTS))


def _wrong_type(rng: random.Random, body: bytearray) -> None:
    body[rng.randrange(len(body))] = rng.choice((0, 1, 5, 7, 9, 12, 13, 14, 15, 16, 18, 0x80, 255))


def _truncate(rng: random.Random, body: bytearray) -> None:
    del body[rng.randrange(len(body)) :]


def _trailing(rng: random.Random, body: bytearray) -> None:
    body.extend(rng.randbytes(rng.randint(1, 8)))


def _hostile_field(rng: random.Random, body: bytearray) -> None:
    """Insert an unknown field before the arguments' STOP: a container no decoder should walk."""
    element = rng.choice((0, 1, 5, 16, 0x80, 2, 12, 15))
    count = struct.pack("!I", rng.choice(HUGE_COUNTS))
    kind = rng.choice(("list", "set", "map", "deep"))
    if kind == "map":
        field = struct.pack("!bhBB", 13, 99, element, rng.choice((1, 11, 15))) + count
    elif kind == "deep":
        depth = rng.choice((31, 33, 64, 500))
        field = struct.pack("!bh", 15, 99) + struct.pack("!bi", 15, 1) * depth
        field += struct.pack("!bi", 8, 0)
    else:
        field = struct.pack("!bhB", 15 if kind == "list" else 14, 99, element) + count
    at = len(body) - 1 if body and body[-1] == 0 else len(body)
    body[at:at] = field


def _splice(rng: random.Random, body: bytearray) -> None:
    start = rng.randrange(len(body))
    piece = body[start : start + rng.randint(1, 16)]
    at = rng.randrange(len(body))
    body[at:at] = piece * rng.randint(1, 4)


MUTATIONS = (_flip_bytes, _huge_count, _wrong_type, _truncate, _trailing, _hostile_field, _splice)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """One to three mutations of a valid frame's body; the length header then says its size
    (mostly: sometimes it keeps the old one, or claims a little more or less)."""
    body = bytearray(frame[4:])
    for _ in range(rng.randint(1, 3)):
        if not body:
            break
        rng.choice(MUTATIONS)(rng, body)
    length = len(body)
    roll = rng.random()
    if roll < 0.05:
        length = len(frame) - 4
    elif roll < 0.10:
        length = max(1, length + rng.randint(-3, 3))
    return struct.pack("!i", length) + bytes(body)


def mutants(seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    frames = list(valid_frames().values())
    for _ in range(count):
        yield mutate(rng, rng.choice(frames))


# --------------------------------------------------------------------------- a server


@contextmanager
def serving(server_module: ModuleType = rpc, **bounds: Any) -> Iterator[Any]:
    """An RpcServer on a free loopback port with TrivialHandler; closed afterwards."""
    server = server_module.RpcServer("127.0.0.1", 0, TrivialHandler(), 1 << 20, **bounds)
    server.start()
    try:
        yield server
    finally:
        server.close()


def exchange(port: int, data: bytes, timeout_s: float) -> tuple[bytes, float]:
    """Send data, end our side, read until the node closes; (what it sent back, seconds)."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while True:
                sock.settimeout(max(0.001, started + timeout_s - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return received, time.monotonic() - started


# --------------------------------------------------------------------------- commands


def _cpu_ns_per_call(function: Callable[[], object], rounds: int) -> float:
    """CPU time (not wall time: the machine may be shared) per call, best of 5 runs."""
    best = float("inf")
    for _ in range(5):
        started = time.process_time_ns()
        for _ in range(rounds):
            function()
        best = min(best, (time.process_time_ns() - started) / rounds)
    return best


def _decode(frame: bytes) -> None:
    """What the server does after the check: thriftpy2's compiled decoder reads the args."""
    proto = TCyBinaryProtocol(TCyMemoryBuffer(frame[4:]))
    method, _, _ = proto.read_message_begin()
    getattr(KeyValueService, f"{method}_args")().read(proto)


def measure_check_cost(rounds: int) -> None:
    frames = valid_frames()
    frames["put (1 KiB value)"] = encode_call("put", ("key-1", "v" * 1024))
    check = rpc.check_request
    print(f"CPU ns per frame, best of 5 x {rounds}; decode = thriftpy2 reading the same request")
    for label in ("get", "put", "put (1 KiB value)", "put_once", "replicate_batch", "get_many"):
        frame = frames[label]
        check_ns = _cpu_ns_per_call(lambda f=frame: check(f), rounds)
        decode_ns = _cpu_ns_per_call(lambda f=frame: _decode(f), rounds)
        print(
            f"check_request {label:<18} {len(frame):>5} bytes: {check_ns:6.0f} ns "
            f"(decode {decode_ns:6.0f} ns: the check adds {check_ns / decode_ns:4.0%})"
        )


def measure_fuzz(frames: int, seed: int) -> None:
    times: list[float] = []
    worst = (0.0, b"")
    with serving() as server:
        conn = rpc.Connection(f"127.0.0.1:{server.port}", timeout_ms=5000)
        for frame in mutants(seed, frames):
            _, elapsed = exchange(server.port, frame, 5.0)
            times.append(elapsed)
            worst = max(worst, (elapsed, frame))
            conn.call("get", "k")
        conn.close()
    times.sort()
    print(
        f"{frames} mutated frames (seed {seed}): answered or closed in median "
        f"{statistics.median(times) * 1e3:.2f} ms, p99 {times[int(len(times) * 0.99)] * 1e3:.2f} "
        f"ms, worst {worst[0] * 1e3:.2f} ms (frame {worst[1][:64].hex()})"
    )


def measure_freeze(rpc_path: str | None) -> None:
    module = rpc
    if rpc_path:
        spec = importlib.util.spec_from_file_location("kvstore_rpc_under_test", rpc_path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    with serving(module) as server:
        conn = rpc.Connection(f"127.0.0.1:{server.port}", timeout_ms=120_000)
        conn.call("get", "k")
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            started = time.monotonic()
            sock.sendall(FREEZE_REQUEST)
            # Time for the server to take the bad request up (a frozen server cannot say when);
            # the get then waits for as long as decoding it holds the GIL.
            time.sleep(0.2)
            conn.call("get", "k")
            waited = time.monotonic() - started
            sock.settimeout(60)
            reply = sock.recv(65536)
        conn.close()
    print(f"{len(FREEZE_REQUEST)}-byte request {FREEZE_REQUEST.hex()} (server: {module.__file__})")
    print(f"a get sent 0.2 s after it on another connection: answered {waited:.3f} s after it")
    print(f"the bad request's connection got {reply!r}")


def main(argv: list[str] | None = None) -> int:
    logging.disable(logging.WARNING)  # the server logs every refusal
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("check-cost", help="ns per check_request of typical frames")
    cost.add_argument("--rounds", type=int, default=100_000)
    fuzz = commands.add_parser("fuzz", help="time to answer or close mutated frames")
    fuzz.add_argument("--frames", type=int, default=20_000)
    fuzz.add_argument("--seed", type=int, default=1)
    freeze = commands.add_parser("freeze", help="how long the 28-byte request stalls a server")
    freeze.add_argument("--rpc", metavar="PATH", help="load RpcServer from this rpc.py instead")
    args = parser.parse_args(argv)
    if args.command == "check-cost":
        measure_check_cost(args.rounds)
    elif args.command == "fuzz":
        measure_fuzz(args.frames, args.seed)
    else:
        measure_freeze(args.rpc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
