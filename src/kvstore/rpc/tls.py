"""Mutual TLS for the node service: contexts, the handshake, the role a certificate carries."""

from __future__ import annotations

import hashlib
import logging
import select
import socket
import ssl
import time
from typing import Any

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- TLS

NODE_UNIT = "node"  # a certificate whose subject has OU=node is a node's; any other a client's


def server_tls_context(cert_path: str, key_path: str, ca_path: str) -> ssl.SSLContext:
    """A node's listening context: TLS 1.3, a client certificate from ``ca_path`` required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.num_tickets = 0  # a ticket arriving after the handshake would look like an EOF
    _require_mutual_tls(context, cert_path, key_path, ca_path)
    return context


def client_tls_context(cert_path: str, key_path: str, ca_path: str) -> ssl.SSLContext:
    """A caller's context (clients, and nodes calling nodes): TLS 1.3, the peer's certificate
    must come from ``ca_path``. No host name check: peers are addressed by IP:port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    _require_mutual_tls(context, cert_path, key_path, ca_path)
    return context


def _require_mutual_tls(context: ssl.SSLContext, cert: str, key: str, ca: str) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)


def is_node_certificate(cert: Any) -> bool:
    """True if a verified peer certificate (``getpeercert()``) has OU=node in its subject."""
    return any(
        name == "organizationalUnitName" and value == NODE_UNIT
        for rdn in (cert or {}).get("subject", ())
        for name, value in rdn
    )


# A node's *identity* is the SHA-256 fingerprint of its certificate (DER): it names one
# certificate, whatever names the CA put in it (two certificates with the same CN are two
# identities), both sides compute it the same way from the bytes, and a node reads its own
# certificate only when it starts (every start publishes it again), so renewing one costs
# nothing. Nodes sharing one certificate share one identity: pinning then tells them apart
# no more than the role does.
IDENTITY_PREFIX = "sha256:"


def certificate_identity(der: bytes) -> str:
    """The identity of a certificate given in DER (``getpeercert(binary_form=True)``)."""
    return IDENTITY_PREFIX + hashlib.sha256(der).hexdigest()


def peer_certificate_identity(tls: ssl.SSLSocket) -> str | None:
    """The identity of the certificate the peer of a TLS socket showed (None: none)."""
    der = tls.getpeercert(binary_form=True)
    return None if not der else certificate_identity(der)


def own_identity(cert_path: str) -> str:
    """The identity of the certificate this side shows: the first one in ``cert_path``
    (PEM; any CA certificates after it are its chain). ssl.SSLError (an OSError, like a
    certificate the TLS context cannot load) if there is none."""
    with open(cert_path, encoding="ascii", errors="replace") as file:
        pem = file.read()
    end_marker = "-----END CERTIFICATE-----"
    start = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find(end_marker, start)
    try:
        if start < 0 or end < 0:
            raise ValueError("no PEM certificate")
        der = ssl.PEM_cert_to_DER_cert(pem[start : end + len(end_marker)])
    except ValueError as exc:
        raise ssl.SSLError(f"{cert_path}: {exc}") from None
    return certificate_identity(der)


def short_identity(identity: str | None) -> str:
    """An identity shortened for messages (its first 16 hex digits)."""
    if identity is None:
        return "(none)"
    return identity[: len(IDENTITY_PREFIX) + 16]


def subject_common_name(cert: Any) -> str:
    """The CN of a verified peer certificate (``getpeercert()``), for messages ("" if none)."""
    return ",".join(
        value
        for rdn in (cert or {}).get("subject", ())
        for name, value in rdn
        if name == "commonName"
    )


REFUSAL_LINGER_S = 0.5  # how long a refused handshake's connection waits for the peer's EOF
REFUSAL_DRAIN_BYTES = 256 * 1024


def close_refused(tls: ssl.SSLSocket, linger_s: float = REFUSAL_LINGER_S) -> None:
    """Close a connection whose handshake this side refused (say, a certificate from another
    CA) so that the peer reads the alert OpenSSL sent. Under TLS 1.3 the client counts its
    handshake done before the server has checked its certificate, and sends its request at
    once: closed with that request unread, the connection is reset (RST), and the peer's
    kernel drops the alert before its client reads it, which then sees only an EOF (a third
    of the time on loopback). So: stop sending, read (and drop) what arrives until the peer
    closes, at most ``linger_s`` and REFUSAL_DRAIN_BYTES, then close."""
    try:
        tls.shutdown(socket.SHUT_WR)  # (drops the TLS layer: reads below are plain bytes)
        deadline = time.monotonic() + linger_s
        drained = 0
        while drained < REFUSAL_DRAIN_BYTES:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                break
            tls.settimeout(left_s)
            chunk = tls.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
    finally:
        tls.close()


def _handshake(tls: ssl.SSLSocket, deadline_s: float, started: float | None = None) -> None:
    """Complete a server-side handshake within ``deadline_s`` in all (not per receive),
    counted from ``started`` (a monotonic time; default now)."""
    deadline = (time.monotonic() if started is None else started) + deadline_s
    tls.setblocking(False)
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        left_s = deadline - time.monotonic()
        poller = select.poll()
        poller.register(tls, events)
        if left_s <= 0 or not poller.poll(left_s * 1000):
            raise TimeoutError(f"no TLS handshake within {deadline_s:g} s")
