"""Private networks of Linux network namespaces, for partition tests (root or CAP_NET_ADMIN).

:class:`NamespaceNetwork` builds one bridge, in a namespace of its own, and one namespace per
member (a node, ZooKeeper, the client), each joined to the bridge by a veth pair and given an
address of a private range (10.231.7.0/24 by default). Nothing is created in the namespace this
process runs in: no interface, address or rule of the machine's own network is touched, and the
addresses exist only inside the namespaces made here.

Links are cut with iptables rules inside a member's namespace (both directions, ``drop`` or
``reject``: a TCP reset) and healed by flushing those rules.

A process runs inside a member's namespace by its command :meth:`~NamespaceNetwork.prefix`
(``ip netns exec NS``, which execs the command: the PID stays the program's); a Python function
runs there with :meth:`~NamespaceNetwork.call_in`, on a thread of its own that first joins the
namespace (setns(2) moves only the calling thread; threads and processes it starts inherit it).

Invariants:

* :meth:`~NamespaceNetwork.destroy` deletes exactly the namespaces this object created (their
  veths and the bridge go with them), and is safe to call twice or after a failed create.
* every command is bounded in time (``COMMAND_TIMEOUT_S``), every wait by a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

IP = "ip"
IPTABLES = "iptables"
NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT_S = 10.0
DEFAULT_SUBNET = "10.231.7.0/24"
CUT_MODES = ("drop", "reject")


class NetnsError(Exception):
    """A namespace, link or rule could not be created, changed or removed."""


def run_command(argv: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run ``argv`` and return its stdout; NetnsError with its stderr if it fails."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def unavailable_reason(probe_name: str | None = None) -> str | None:
    """Why namespaces with veths and iptables rules cannot be used here, or None if they can:
    found by creating a namespace, a veth and a rule in it, then deleting the namespace."""
    for tool in (IP, IPTABLES):
        if shutil.which(tool) is None:
            return f"no {tool!r} binary (apt-get install iproute2 iptables)"
    name = probe_name or f"kvprobe-{os.getpid()}"
    try:
        run_command([IP, "netns", "add", name])
    except NetnsError as exc:
        return f"cannot create a network namespace (root / CAP_NET_ADMIN needed): {exc}"
    try:
        run_command([IP, "-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0"])
        run_command([IP, "netns", "exec", name, IPTABLES, "-A", "INPUT", "-i", "a0", "-j", "DROP"])
    except NetnsError as exc:
        return f"cannot create a veth pair or an iptables rule in a namespace: {exc}"
    finally:
        with contextlib.suppress(NetnsError):
            run_command([IP, "netns", "del", name])
    return None


_libc = ctypes.CDLL(None, use_errno=True)


def _enter(namespace: str) -> None:
    """Move the calling thread (only) into ``namespace``."""
    fd = os.open(os.path.join(NETNS_DIR, namespace), os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise NetnsError(f"setns({namespace}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class NamespaceNetwork:
    """A bridge and one namespace per member; names start with ``prefix`` (keep it short and
    unique, e.g. with the PID). Use as a context manager, or call create() and destroy()."""

    def __init__(self, prefix: str, members: Sequence[str], subnet: str = DEFAULT_SUBNET) -> None:
        network = ipaddress.ip_network(subnet)
        hosts = list(network.hosts())
        if len(members) > len(hosts) or len(set(members)) != len(members):
            raise ValueError(f"members must be distinct and fit in {subnet}: {members}")
        self.prefix = prefix
        self.prefix_length = network.prefixlen
        self.bridge_namespace = f"{prefix}-bridge"
        self.members = list(members)
        self._addresses = {name: str(hosts[i]) for i, name in enumerate(members)}
        self._created: list[str] = []
        self._cut_namespaces: set[str] = set()

    def namespace(self, member: str) -> str:
        return f"{self.prefix}-{member}"

    def address(self, member: str) -> str:
        """The member's address: it exists only inside the member's namespace."""
        return self._addresses[member]

    def prefix_command(self, member: str) -> list[str]:
        """The command prefix that runs a program inside ``member``'s namespace."""
        return [IP, "netns", "exec", self.namespace(member)]

    def run(self, member: str, argv: Sequence[str]) -> str:
        return run_command([*self.prefix_command(member), *argv])

    def create(self) -> None:
        """Create the bridge namespace, then each member's namespace, veth and address;
        on failure remove what was made and raise NetnsError."""
        try:
            self._add_namespace(self.bridge_namespace)
            bridge = [IP, "-n", self.bridge_namespace]
            run_command([*bridge, "link", "add", "br0", "type", "bridge"])
            run_command([*bridge, "link", "set", "br0", "up"])
            for index, member in enumerate(self.members):
                self._add_member(index, member)
        except NetnsError:
            self.destroy()
            raise

    def _add_namespace(self, name: str) -> None:
        run_command([IP, "netns", "add", name])
        self._created.append(name)
        run_command([IP, "-n", name, "link", "set", "lo", "up"])

    def _add_member(self, index: int, member: str) -> None:
        namespace = self.namespace(member)
        self._add_namespace(namespace)
        bridge = [IP, "-n", self.bridge_namespace]
        port = f"p{index}"
        run_command(
            [
                *bridge,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                namespace,
            ]
        )
        run_command([*bridge, "link", "set", port, "master", "br0", "up"])
        inside = [IP, "-n", namespace]
        address = f"{self.address(member)}/{self.prefix_length}"
        run_command([*inside, "addr", "add", address, "dev", "eth0"])
        run_command([*inside, "link", "set", "eth0", "up"])

    def destroy(self) -> None:
        """Delete the namespaces this object created (veths and the bridge go with them).
        Processes still inside keep a namespace alive: stop them first."""
        errors = []
        while self._created:
            name = self._created.pop()
            try:
                run_command([IP, "netns", "del", name])
            except NetnsError as exc:
                errors.append(str(exc))
        self._cut_namespaces.clear()
        if errors:
            raise NetnsError("; ".join(errors))

    def __enter__(self) -> NamespaceNetwork:
        self.create()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def cut(self, member: str, peer: str, mode: str = "drop") -> None:
        """Cut every packet between ``member`` and ``peer``, both directions.

        ``drop``: rules in ``member``'s namespace drop what comes from or goes to ``peer``
        (silence: the other side times out). ``reject``: each side's own attempts to send to
        the other are refused where they start (TCP: a reset, as if the peer had sent one;
        else ICMP unreachable), by OUTPUT rules in both namespaces: a rejecting rule in one
        namespace alone would have its own reset stopped by the rule for the other direction.
        """
        if mode not in CUT_MODES:
            raise ValueError(f"mode must be one of {CUT_MODES}, not {mode!r}")
        if mode == "drop":
            peer_address = self.address(peer)
            for chain, direction in (("INPUT", "-s"), ("OUTPUT", "-d")):
                self.run(member, [IPTABLES, "-A", chain, direction, peer_address, "-j", "DROP"])
            self._cut_namespaces.add(member)
            return
        for sender, receiver in ((member, peer), (peer, member)):
            rule = [IPTABLES, "-A", "OUTPUT", "-d", self.address(receiver)]
            self.run(sender, [*rule, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"])
            self.run(sender, [*rule, "-j", "REJECT"])
            self._cut_namespaces.add(sender)

    def heal(self) -> None:
        """Remove every rule :meth:`cut` added (flush the filter table where there were any)."""
        for member in sorted(self._cut_namespaces):
            self.run(member, [IPTABLES, "-F"])
        self._cut_namespaces.clear()

    def rules(self, member: str) -> str:
        return self.run(member, [IPTABLES, "-S"])

    def submit_in(self, member: str, function: Callable[..., T], *args: object) -> Future[T]:
        """Start ``function(*args)`` inside ``member``'s namespace, on a thread of its own (the
        threads and processes it starts are there too); its future result or exception."""
        future: Future[T] = Future()

        def body() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                _enter(self.namespace(member))
                future.set_result(function(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

        threading.Thread(target=body, name=f"netns-{member}", daemon=True).start()
        return future

    def call_in(
        self, member: str, function: Callable[..., T], *args: object, timeout_s: float = 60.0
    ) -> T:
        """``function(*args)`` run inside ``member``'s namespace (see :meth:`submit_in`): its
        result, or its exception; TimeoutError if it takes longer than ``timeout_s``."""
        return self.submit_in(member, function, *args).result(timeout=timeout_s)
