"""kvstore.local.netns: members reach each other over the bridge, a cut stops exactly the link it
names (DROP: silence, REJECT: a refusal), heal restores it, destroy removes every namespace.
Skipped, with the reason, where namespaces cannot be made."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from kvstore.local import netns

PORT = 7000


@pytest.fixture
def network() -> Iterator[netns.NamespaceNetwork]:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    net = netns.NamespaceNetwork(f"kvn{os.getpid()}", ["a", "b", "c"], subnet="10.231.8.0/24")
    net.create()
    try:
        yield net
    finally:
        net.destroy()


def listen(address: str) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((address, PORT))
    server.listen(8)
    return server


def connect(address: str) -> str:
    """ "ok", "refused" or "timeout": what a connection to address:PORT meets."""
    try:
        with socket.create_connection((address, PORT), timeout=0.5):
            return "ok"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"


def test_cut_and_heal_affect_only_the_named_link(network: netns.NamespaceNetwork) -> None:
    servers = [network.call_in(m, listen, network.address(m)) for m in ("a", "b")]
    try:
        to_a, to_b = network.address("a"), network.address("b")
        assert network.call_in("b", connect, to_a) == "ok"
        network.cut("a", "b", "reject")
        assert network.call_in("b", connect, to_a) == "refused"
        assert network.call_in("a", connect, to_b) == "refused"
        assert network.call_in("c", connect, to_a) == "ok"
        network.heal()
        assert network.call_in("b", connect, to_a) == "ok"
        network.cut("a", "b", "drop")
        assert network.call_in("b", connect, to_a) == "timeout"
        assert network.call_in("a", connect, to_b) == "timeout"
        assert network.call_in("c", connect, to_a) == "ok"
        network.heal()
        assert network.call_in("b", connect, to_a) == "ok"
        assert "-A" not in network.rules("a") + network.rules("b")
    finally:
        for server in servers:
            server.close()


def test_addresses_exist_only_inside_the_namespaces(network: netns.NamespaceNetwork) -> None:
    assert network.address("a") not in netns.run_command(["ip", "-4", "addr"])
    assert network.address("a") in network.run("a", ["ip", "-4", "addr"])


def test_destroy_removes_every_namespace(network: netns.NamespaceNetwork) -> None:
    names = [network.namespace(m) for m in network.members] + [network.bridge_namespace]
    listed = netns.run_command(["ip", "netns", "list"])
    assert all(name in listed for name in names)
    network.destroy()
    listed = netns.run_command(["ip", "netns", "list"])
    assert not any(name in listed.split() for name in names)
    network.destroy()  # a second time is harmless
