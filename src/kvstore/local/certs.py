"""Throwaway certificates for mutual TLS (a CA, node certificates and a client certificate),
cluster secrets and ZooKeeper credentials.

For tests, demos and trying TLS out (``kv-certs DIR``), not for production: the CA's key is
written next to the certificates and nothing is ever revoked. Every certificate is signed
by the CA; a node's subject has OU=node (what makes a peer a *node*: it may replicate),
the client's has none. ``node.crt`` is one certificate all nodes may share; ``node-1.crt``,
``node-2.crt``, ... give each node an identity of its own (CN ``kvstore node-<i>``), which
the nodes pin (see SECURITY.md: a shared certificate makes every node the same identity).
Private keys are written 0600. Host names are not in the certificates: kvstore checks the
CA, the role and the identity, not names (nodes are addressed by IP:port).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvstore.config import TlsConfig
from kvstore.rpc import NODE_UNIT

VALID_DAYS = 365
ZOOKEEPER_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """Where write_certificates put everything (all PEM)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def node(self) -> TlsConfig:
        return self.tls("node")

    def node_numbered(self, number: int) -> TlsConfig:
        """The TlsConfig of per-node certificate ``node-<number>`` (from 1)."""
        return self.tls(f"node-{number}")

    @property
    def client(self) -> TlsConfig:
        return self.tls("client")

    @property
    def zookeeper(self) -> TlsConfig:
        return self.tls("zookeeper")

    def tls(self, name: str) -> TlsConfig:
        """The TlsConfig of the certificate ``name`` (node, client, or one made by issue)."""
        d = self.directory
        return TlsConfig(str(d / f"{name}.crt"), str(d / f"{name}.key"), str(self.ca_cert))

    def node_args(self) -> list[str]:
        """kv-node's (or kv's, with ``client``) TLS options for the node certificate."""
        return tls_args(self.node)


def tls_args(tls: TlsConfig, prefix: str = "--tls") -> list[str]:
    """The options naming ``tls``'s files (``prefix`` --zk-tls: for ZooKeeper's TLS port)."""
    return [
        f"{prefix}-cert",
        tls.cert_path,
        f"{prefix}-key",
        tls.key_path,
        f"{prefix}-ca",
        tls.ca_path,
    ]


DEFAULT_NODE_CERTIFICATES = 3


def write_certificates(
    directory: Path | str,
    ca_name: str = "kvstore test CA",
    nodes: int = DEFAULT_NODE_CERTIFICATES,
) -> CertificateFiles:
    """Write ca.crt/ca.key, node.crt/node.key (OU=node, for nodes that share one identity),
    node-1.crt/.key ... node-``nodes``.crt/.key (OU=node, each a distinct CN: one identity
    per node), client.crt/client.key and zookeeper.crt/zookeeper.key (for a local
    ZooKeeper's TLS port: its clients check the host name, so it names 127.0.0.1 and
    localhost)."""
    if nodes < 0:
        raise ValueError("the number of per-node certificates cannot be negative")
    files = CertificateFiles(Path(directory))
    files.directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = (
        _builder(ca_subject, ca_subject, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(is_ca=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(files.directory / "ca.key", ca_key)
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for name in certificate_names(nodes):
        _issue_named(files, name, ca_cert, ca_key)
    return files


def certificate_names(nodes: int) -> list[str]:
    """The certificates write_certificates issues: node, node-1 .. node-``nodes``, client,
    zookeeper."""
    return ["node", *(f"node-{number}" for number in range(1, nodes + 1)), "client", "zookeeper"]


def add_certificates(directory: Path | str, nodes: int) -> list[str]:
    """Issue, with the CA already in ``directory``, each certificate of
    :func:`certificate_names` that it lacks (say ``node-4`` for a node added to the
    cluster); never touch one that exists. Returns the names written. Raises OSError if the
    CA cannot be read, ValueError if a certificate's key is there without it (or the
    reverse)."""
    files = CertificateFiles(Path(directory))
    folder = files.directory
    halves = {
        name: ((folder / f"{name}.crt").exists(), (folder / f"{name}.key").exists())
        for name in certificate_names(nodes)
    }
    lone = [name for name, (has_cert, has_key) in halves.items() if has_cert != has_key]
    if lone:
        raise ValueError(
            f"{', '.join(lone)}: a certificate without its key or a key without its "
            "certificate; move it aside first"
        )
    missing = [name for name, (has_cert, _) in halves.items() if not has_cert]
    if missing:
        ca_cert, ca_key = load_ca(files)
        for name in missing:
            _issue_named(files, name, ca_cert, ca_key)
    return missing


def _issue_named(
    files: CertificateFiles,
    name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> None:
    """Issue one of certificate_names: a node's (OU=node), the client's or ZooKeeper's."""
    if name == "zookeeper":
        issue(files, name, ca_cert, ca_key, hosts=ZOOKEEPER_HOSTS)
    elif name == "client":
        issue(files, name, ca_cert, ca_key)
    else:
        issue(files, name, ca_cert, ca_key, unit=NODE_UNIT)


def issue(
    files: CertificateFiles,
    name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    unit: str | None = None,
    hosts: tuple[str, ...] = (),
    valid: tuple[datetime.datetime, datetime.datetime] | None = None,
) -> TlsConfig:
    """Write ``name``.crt/.key signed by the CA, with OU=``unit`` if given, and ``hosts``
    (IP addresses or DNS names) as subject alternative names, for peers that check them;
    ``valid``: from when until when (default: from now for VALID_DAYS)."""
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, f"kvstore {name}")]
    if unit is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        _builder(x509.Name(attributes), ca_cert.subject, key.public_key(), valid)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(is_ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(files.directory / f"{name}.key", key)
    (files.directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files.tls(name)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def load_ca(files: CertificateFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA written by write_certificates (to issue more certificates with it)."""
    cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = serialization.load_pem_private_key((files.directory / "ca.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{files.directory / 'ca.key'} is not the EC key kv-certs writes")
    return cert, key


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: object,
    valid: tuple[datetime.datetime, datetime.datetime] | None = None,
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    since, until = valid or (
        now - datetime.timedelta(minutes=5),
        now + datetime.timedelta(days=VALID_DAYS),
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(since)
        .not_valid_after(until)
    )


def _key_usage(is_ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not is_ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=is_ca,
        crl_sign=is_ca,
        encipher_only=False,
        decipher_only=False,
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key (PEM, unencrypted) readable by its owner only, from its creation."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(path, pem)


def write_cluster_secret(path: Path | str) -> Path:
    """Write a fresh cluster secret (32 random bytes, base64) for ``kv-node
    --cluster-secret-file``, readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, base64.b64encode(secrets.token_bytes(32)) + b"\n")
    return path


def write_zk_credentials(path: Path | str, user: str = "kvstore") -> str:
    """Write fresh ZooKeeper digest credentials (one ``user:password`` line, for
    ``--zk-auth-file``), readable by its owner only; returns them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    credentials = f"{user}:{secrets.token_urlsafe(24)}"
    _write_private(path, f"{credentials}\n".encode())
    return credentials


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file only its owner may read, from its creation."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600)  # whatever the umask
