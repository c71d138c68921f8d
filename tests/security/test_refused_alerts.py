"""Which TLS alerts mean the node refused this side's certificate (no sockets needed)."""

from __future__ import annotations

import ssl

import pytest

from kvstore.rpc.client import _is_refused_certificate


def _alert(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, reason)
    exc.reason = reason
    return exc


@pytest.mark.parametrize(
    "reason",
    [
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        # A certificate that expired while the client (or node) ran: the node says so in
        # its alert; it was a ConnectionLostError (outcome unknown) instead of FORBIDDEN.
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    ],
)
def test_a_refusal_of_this_sides_certificate(reason: str) -> None:
    assert _is_refused_certificate(_alert(reason))


@pytest.mark.parametrize("reason", ["UNEXPECTED_EOF_WHILE_READING", "TLSV1_ALERT_PROTOCOL_VERSION"])
def test_not_a_refusal_of_the_certificate(reason: str) -> None:
    assert not _is_refused_certificate(_alert(reason))
