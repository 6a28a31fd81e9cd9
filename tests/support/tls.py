"""A throwaway certificate authority and a server certificate for the stand-in upstream.

The stand-in answers TLS for the real provider host names (api.openai.com, …) so a
proxy can be told to trust this CA and verify upstream certificates exactly as it
would in production (`--set ssl_verify_upstream_trusted_ca=ca.pem`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names every stand-in certificate covers. Provider hosts let SDKs keep their default
#: base URLs (the proxy is told to connect to the stand-in instead, see mitm_resolve.py);
#: the example.com family serves as tool APIs (CRM, refunds, MCP, repos) in policies.
DEFAULT_NAMES: tuple[str, ...] = (
    "localhost",
    "127.0.0.1",
    "::1",
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
    "*.openai.azure.com",
    "*.cognitiveservices.azure.com",
    # OpenAI-compatible hosts genai-prices knows by URL (tests/e2e/test_compatible_hosts_e2e.py).
    "api.groq.com",
    "api.deepseek.com",
    "api.stripe.com",
    "api.github.com",
    "example.com",
    "*.example.com",
    "example.org",
    "*.example.org",
    # APIs that carry credentials in the URL path (tests/e2e/test_path_secrets.py).
    "api.telegram.org",
    "hooks.slack.com",
    "discord.com",
)


@dataclass(frozen=True)
class TlsMaterial:
    """Paths of a CA and a server certificate/key it signed (all PEM)."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    names: tuple[str, ...]

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that trusts only this CA (for talking to the stand-in directly)."""
        return ssl.create_default_context(cafile=str(self.ca_cert))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_tls_material(
    directory: str | Path,
    extra_names: Iterable[str] = (),
    *,
    include_defaults: bool = True,
) -> TlsMaterial:
    """Write ca.pem, server.pem and server-key.pem into `directory` and return their paths.

    The server certificate's SANs are localhost, 127.0.0.1, ::1 (plus DEFAULT_NAMES when
    `include_defaults`) and `extra_names`. EC P-256 keys: fast to generate, accepted by
    OpenSSL's strict verification (Python 3.13 sets VERIFY_X509_STRICT by default, which
    is why the key identifiers and key usages below are present).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = DEFAULT_NAMES if include_defaults else ("localhost", "127.0.0.1", "::1")
    names = tuple(dict.fromkeys([*base, *extra_names]))

    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(days=1)
    not_after = now + dt.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "drawdown tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, "drawdown stand-in test CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_path = directory / "ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return TlsMaterial(directory, ca_path, cert_path, key_path, names)
