"""Certificates made by the tests with `cryptography`: a CA, server and client certificates.

`Pki` writes PEM files into a directory. A server certificate names ``localhost`` and
``127.0.0.1`` (DNS and IP SANs), so clients dial ``127.0.0.1:PORT`` without a name override; a
client certificate carries its common name and a DNS SAN, the names the servers' identity files
map to roles. Keys are EC P-256: fast to make, so each test can have fresh ones.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


class Pki:
    """A certificate authority in ``directory`` that issues server and client certificates."""

    def __init__(self, directory: Path, *, name: str = "snapcache test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = directory / f"{name.replace(' ', '-')}.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        stem: str,
        *,
        common_name: str,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
        client: bool = False,
        cert_path: Path | None = None,
        key_path: Path | None = None,
    ) -> Issued:
        """A leaf certificate for a server (default) or a client, written as ``stem.pem`` / ``stem.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_file = cert_path or self.directory / f"{stem}.pem"
        key_file = key_path or self.directory / f"{stem}.key"
        # key first, then certificate: the order a rotation writes them
        _write_key(key, key_file)
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(cert=cert_file, key=key_file)

    def server(self, stem: str = "server", **paths: Path) -> Issued:
        """A server certificate for localhost / 127.0.0.1."""
        return self.issue(
            stem, common_name="localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",), **paths
        )

    def client(self, name: str) -> Issued:
        """A client certificate with common name and DNS SAN ``name``."""
        return self.issue(f"client-{name}", common_name=name, dns_names=(name,), client=True)


def serial_of(pem: bytes) -> int:
    """The serial number of a PEM certificate (to tell which one a server presented)."""
    return x509.load_pem_x509_certificate(pem).serial_number
