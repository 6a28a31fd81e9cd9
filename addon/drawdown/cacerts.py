"""The CA an agent must trust: mitmproxy's CA in the confdir, bundled with the system's CAs.

Pointing SSL_CERT_FILE at mitmproxy's CA alone would break every other TLS connection
the agent makes; the bundle keeps them working. The JVM reads no PEM bundle, so the same
certificates are also written as a PKCS#12 truststore (`javax.net.ssl.trustStore`).
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import warnings
from pathlib import Path

CA_CERT = "mitmproxy-ca-cert.pem"
BUNDLE = "drawdown-ca-bundle.pem"
TRUSTSTORE = "drawdown-ca-truststore.p12"
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class CAUnusable(Exception):
    """The confdir cannot hold a CA, or the CA in it cannot be read: said in one line."""


def ensure_ca(confdir: Path) -> Path:
    """mitmproxy's CA certificate, created (key mode 0600) if the proxy never ran with this
    confdir, and loaded as the proxy will load it: a broken CA is reported here, in a line,
    rather than as a traceback from mitmproxy after the proxy announced itself."""
    from mitmproxy.certs import CertStore
    from mitmproxy.options import CONF_BASENAME, Options

    try:
        confdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "it is not a directory" if confdir.exists() else exc.strerror
        raise CAUnusable(f"--confdir {confdir} cannot be used: {reason}") from None
    try:
        minting = not (confdir / f"{CONF_BASENAME}-ca.pem").exists()
    except OSError as exc:  # a folder that cannot be searched
        raise CAUnusable(f"--confdir {confdir} cannot be used: {exc.strerror or exc}") from None
    if minting:  # as CertStore.from_store would, but a failure here leaves no CA to move away
        try:
            CertStore.create_store(confdir, CONF_BASENAME, Options().key_size)
        except OSError as exc:
            raise CAUnusable(
                f"--confdir {confdir} holds no CA yet and cannot take a new one "
                f"({exc.strerror or exc}): make it writable, or choose another --confdir"
            ) from None
    try:
        CertStore.from_store(str(confdir), CONF_BASENAME, Options().key_size)
        cert = confdir / CA_CERT
        cert.read_bytes()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CAUnusable(
            f"the CA in {confdir} cannot be read ({reason.split('. ')[0]}); move its "
            f"{CONF_BASENAME}-ca*.pem files away to mint a new CA, then rerun `drawdown env` "
            "so that agents trust it"
        ) from None
    return cert


def system_ca_file() -> Path | None:
    candidates = [
        os.environ.get("DRAWDOWN_SYSTEM_CA"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    try:
        import certifi

        return Path(certifi.where())
    except ImportError:
        return None


def ca_bundle(confdir: Path) -> Path:
    """Write (or refresh) the bundle of system CAs + drawdown's CA and return its path."""
    cert = ensure_ca(confdir)
    system = system_ca_file()
    parts = [system.read_text()] if system else []
    parts.append(cert.read_text())
    bundle = confdir / BUNDLE
    text = "\n".join(p.rstrip("\n") + "\n" for p in parts)
    try:
        current = bundle.read_text()
    except (OSError, UnicodeDecodeError):
        current = None  # missing or unreadable: written afresh
    truststore = confdir / TRUSTSTORE
    if current != text:
        _replace(bundle, text.encode(), confdir, "CA bundle")
    if current != text or not truststore.is_file():
        _replace(truststore, java_truststore(text.encode()), confdir, "Java truststore")
    return bundle


def _replace(path: Path, data: bytes, confdir: Path, what: str) -> None:
    """Write `path` whole or not at all: an agent starting meanwhile reads the old file."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CAUnusable(
            f"cannot write the agents' {what} {path} ({exc.strerror or exc}): "
            f"make {confdir} writable, or choose another --confdir"
        ) from None


def java_truststore(pem: bytes) -> bytes:
    """The bundle's certificates as a password-less PKCS#12 Java truststore (each a trusted
    certificate entry, which the JVM loads without a password since Java 11.0.12)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import NoEncryption, pkcs12

    entries = []
    for number, block in enumerate(_PEM.findall(pem)):
        with warnings.catch_warnings():  # a system CA with a negative serial number, say
            warnings.simplefilter("ignore")
            try:
                cert = x509.load_pem_x509_certificate(block)
            except ValueError:
                continue  # one the JVM could not use either
        entries.append(pkcs12.PKCS12Certificate(cert, f"drawdown-{number}".encode()))
    return pkcs12.serialize_java_truststore(entries, NoEncryption())
