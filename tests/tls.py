"""Test certificates for broker ↔ adapter TLS: a CA, a server certificate, a client certificate.

    files = tls.generate(tmp_path / "tls")
    # adapter side (server):   --tls-cert files.server_cert --tls-key files.server_key
    #                          [--tls-client-ca files.ca_cert]   (mutual TLS)
    # broker side (client):    [routing] tls_ca = files.ca_cert
    #                          tls_cert = files.client_cert, tls_key = files.client_key (mTLS)

Every call makes a fresh, independent CA, so ``generate(other_dir)`` gives certificates that the
first CA does not trust (for "wrong CA is refused" tests). Keys are EC P-256 (fast to make),
written PEM/PKCS#8 unencrypted with mode 0600. The server certificate names ``localhost``,
``127.0.0.1`` and ``::1``, so either way of dialling the adapter verifies.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names the server certificate is valid for.
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
CLIENT_NAME = "certbroker-broker"


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the generated PEM files (all in one directory)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_credentials(self, *, mutual: bool = False) -> grpc.ServerCredentials:
        """Credentials for ``certbroker.adapters.sdk.serve(credentials=...)``; ``mutual`` requires
        a client
        certificate signed by this CA."""
        return grpc.ssl_server_credentials(
            [(self.server_key.read_bytes(), self.server_cert.read_bytes())],
            root_certificates=self.ca_cert.read_bytes() if mutual else None,
            require_client_auth=mutual,
        )

    def channel_credentials(self, *, client_cert: bool = False) -> grpc.ChannelCredentials:
        """Credentials of a client trusting this CA, presenting the client certificate when
        ``client_cert`` (mutual TLS)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert.read_bytes(),
            private_key=self.client_key.read_bytes() if client_cert else None,
            certificate_chain=self.client_cert.read_bytes() if client_cert else None,
        )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "certbroker tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _leaf(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier,
    now: dt.datetime,
    names: tuple[str, ...] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def generate(directory: Path, *, now: dt.datetime | None = None) -> TlsFiles:
    """Create ``directory`` with a fresh CA and server/client certificates signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    now = now or dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_name = _name("certbroker test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    _write_cert(files.ca_cert, ca_cert)
    _write_key(files.ca_key, ca_key)
    server_key, client_key = _key(), _key()
    server_cert = _leaf(
        "localhost",
        server_key,
        ca_name,
        ca_key,
        ExtendedKeyUsageOID.SERVER_AUTH,
        now,
        SERVER_NAMES,
    )
    client_cert = _leaf(
        CLIENT_NAME, client_key, ca_name, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH, now
    )
    _write_cert(files.server_cert, server_cert)
    _write_key(files.server_key, server_key)
    _write_cert(files.client_cert, client_cert)
    _write_key(files.client_key, client_key)
    return files
