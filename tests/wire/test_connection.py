"""rpc.Connection against bare loopback sockets: how failures are classed."""

from __future__ import annotations

import socket
import time

import pytest

from kvstore import errors
from kvstore.local.processes import free_port
from kvstore.rpc import Connection


def test_a_silent_peer_times_out_as_an_unknown_outcome() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts (in the kernel) but never answers
        conn = Connection(f"127.0.0.1:{listener.getsockname()[1]}", timeout_ms=300)
        began = time.monotonic()
        with pytest.raises(errors.ConnectionLostError) as caught:
            conn.call("status")
        assert not caught.value.is_definite, "the request was sent: its outcome is unknown"
        assert time.monotonic() - began < 5, "the kernel timeout did not fire"
        # Said as a timeout (the kernel's is EAGAIN: "Resource temporarily unavailable").
        assert str(caught.value).endswith("no reply in time"), caught.value


def test_nobody_listening_is_a_definite_refusal() -> None:
    conn = Connection(f"127.0.0.1:{free_port()}", timeout_ms=300, connect_timeout_ms=300)
    with pytest.raises(errors.ConnectError) as caught:
        conn.call("status")
    assert caught.value.is_definite and caught.value.is_refused


def test_a_shut_connection_never_reconnects() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        conn = Connection(f"127.0.0.1:{listener.getsockname()[1]}", timeout_ms=300)
        conn.shut()
        with pytest.raises(errors.ConnectError, match="shut"):
            conn.call("status")
