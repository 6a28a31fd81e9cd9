"""The CA an agent must trust: mitmproxy's CA in the confdir, bundled with the system's CAs.

Pointing SSL_CERT_FILE at mitmproxy's CA alone would break every other TLS connection
the agent makes; the bundle keeps them working. The JVM reads no PEM bundle, so the same
certificates are also written as a PKCS#12 truststore (`javax.net.ssl.trustStore`).

Two sides, kept apart: the proxy (`drawdown run`) loads, or mints, the CA and its key;
an agent (`drawdown env`) needs only the CA's public certificate and never makes one, so
that an agent pod handed that certificate alone trusts the proxy's CA, not one of its own.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import ssl
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

CA_KEY = "mitmproxy-ca.pem"  # mitmproxy's CA: its private key, then its certificate(s)
CA_CERT = "mitmproxy-ca-cert.pem"  # the public certificate alone, what agents are given
DHPARAM = "mitmproxy-dhparam.pem"  # mitmproxy writes it beside the CA when it is missing
BUNDLE = "drawdown-ca-bundle.pem"
TRUSTSTORE = "drawdown-ca-truststore.p12"
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_UNREADABLE_BY_THIS_USER = (errno.EACCES, errno.EPERM)


class CAUnusable(Exception):
    """The confdir cannot hold a CA, or the CA in it cannot be read: said in one line."""


class BundleUnwritable(CAUnusable):
    """The agents' bundle cannot be written in `folder`; each caller says what to do."""

    def __init__(self, folder: Path, reason: str) -> None:
        super().__init__(f"cannot write the agents' CA bundle in {folder} ({reason})")
        self.folder = folder
        self.reason = reason


def _reason(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text.split(". ")[0]


def certificates(pem: bytes) -> bytes:
    """The PEM certificates in `pem`, and nothing else: a CA file's private key never leaves it."""
    return b"".join(block + b"\n" for block in _PEM.findall(pem))


# --- the proxy's side: the CA and its key ------------------------------------------------


def ensure_ca(confdir: Path, passphrase: str | None = None) -> bytes:
    """The CA's certificates (PEM), minted (key mode 0600) if the proxy never ran with this
    confdir, else read as the proxy will read them, and never rewritten: a broken CA is
    reported here, in a line, rather than as a traceback from mitmproxy after the proxy
    announced itself. `passphrase`: mitmproxy's `cert_passphrase`, for an encrypted key."""
    try:
        confdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "it is not a directory" if confdir.exists() else exc.strerror
        raise CAUnusable(f"--confdir {confdir} cannot be used: {reason}") from None
    try:
        minting = not (confdir / CA_KEY).exists()
        shipped_cert = minting and (confdir / CA_CERT).exists()
    except OSError as exc:  # a folder that cannot be searched
        raise CAUnusable(f"--confdir {confdir} cannot be used: {exc.strerror or exc}") from None
    if shipped_cert:
        # An agent's copy of the certificate (a ConfigMap mounted where the key's Secret
        # belonged): a CA minted over it would be trusted by no agent, and silently.
        raise CAUnusable(
            f"--confdir {confdir} holds the CA's certificate ({CA_CERT}) but not its key "
            f"({CA_KEY}): give `drawdown run` the confdir the CA was made in, or move "
            f"{CA_CERT} away to mint a new CA"
        )
    if minting:  # as CertStore.from_store would, but a failure here leaves no CA to move away
        from mitmproxy.certs import CertStore
        from mitmproxy.options import CONF_BASENAME, Options

        try:
            CertStore.create_store(confdir, CONF_BASENAME, Options().key_size)
        except OSError as exc:
            raise CAUnusable(
                f"--confdir {confdir} holds no CA yet and cannot take a new one "
                f"({exc.strerror or exc}): make it writable, or choose another --confdir"
            ) from None
    return certificates(_read_ca(confdir, passphrase))


def _read_ca(confdir: Path, passphrase: str | None = None) -> bytes:
    """mitmproxy-ca.pem, checked as mitmproxy's CertStore.from_files reads it. Only a CA that
    is there and is no CA earns the advice to mint another: that changes the CA every agent
    trusts, which a CA this user may not read, or a read-only folder, never calls for."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = confdir / CA_KEY
    try:
        raw = path.read_bytes()
    except OSError as exc:
        if exc.errno in _UNREADABLE_BY_THIS_USER:
            raise CAUnusable(
                f"the CA in {confdir} cannot be read by this user ({_reason(exc)}): run "
                f"drawdown as the user that owns {path}, or let this one read it"
            ) from None
        raise CAUnusable(f"the CA in {confdir} cannot be read ({_reason(exc)})") from None
    try:
        load_pem_private_key(raw, passphrase.encode() if passphrase else None)
        x509.load_pem_x509_certificates(raw)
    except TypeError:  # cryptography's word for a passphrase missing, or given needlessly
        if passphrase:
            raise CAUnusable(
                f"cert_passphrase is set, but the CA key in {confdir} is not encrypted: "
                "leave cert_passphrase out"
            ) from None
        raise CAUnusable(
            f"the CA key in {confdir} is encrypted: give its passphrase with "
            "--set cert_passphrase=PASSPHRASE"
        ) from None
    except ValueError as exc:
        if passphrase and b"ENCRYPTED" in raw:
            raise CAUnusable(
                f"the CA key in {confdir} cannot be decrypted with cert_passphrase "
                f"({_reason(exc)}): check the passphrase"
            ) from None
        raise CAUnusable(
            f"the CA in {confdir} cannot be read ({_reason(exc)}); if it is lost, move its "
            "mitmproxy-ca*.pem files away to mint a new one, then give every agent the new "
            f"certificate ({CA_CERT}, or `drawdown env` run again)"
        ) from None
    return raw


@contextlib.contextmanager
def loadable_confdir(confdir: Path) -> Iterator[Path]:
    """A confdir mitmproxy can load the CA from: `confdir` itself, or, when it cannot take
    the one file mitmproxy adds beside the CA (a read-only Kubernetes Secret, say), a private
    copy of the CA (folder 0700, key 0600) removed when the proxy stops. Call after ensure_ca."""
    from mitmproxy.certs import DEFAULT_DHPARAM

    dhparam = confdir / DHPARAM
    try:
        # Written here, once, rather than by each worker's mitmproxy racing to write it.
        if not dhparam.exists():
            dhparam.write_bytes(DEFAULT_DHPARAM)
        in_place = True
    except OSError:
        in_place = False
    if in_place:
        yield confdir
        return
    try:
        copy = Path(tempfile.mkdtemp(prefix="drawdown-ca-"))
    except OSError as exc:
        raise CAUnusable(
            f"--confdir {confdir} is read-only and mitmproxy must write beside its CA; no "
            f"private copy could be made in {tempfile.gettempdir()} ({_reason(exc)}): set "
            "TMPDIR to a writable folder, or make the confdir writable"
        ) from None
    try:
        try:
            dh = dhparam.read_bytes()
        except OSError:
            dh = DEFAULT_DHPARAM
        for name, data in ((CA_KEY, _read_ca(confdir)), (DHPARAM, dh)):
            fd = os.open(copy / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as out:
                out.write(data)
        yield copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


# --- the agents' side: the public certificate --------------------------------------------


def agent_ca(confdir: Path | None = None, ca_cert: Path | None = None) -> bytes:
    """The proxy CA's certificates for agents, read from `ca_cert` or from `confdir`, and
    never made: a CA made here would be trusted by agents and used by no proxy."""
    if ca_cert is not None:
        try:
            found = certificates(ca_cert.read_bytes())
        except OSError as exc:
            raise CAUnusable(f"--ca-cert {ca_cert} cannot be read ({_reason(exc)})") from None
        if not _valid(found):
            raise CAUnusable(
                f"--ca-cert {ca_cert} holds no PEM certificate: give it the proxy's {CA_CERT}"
            )
        return found
    assert confdir is not None
    if confdir.exists() and not confdir.is_dir():
        raise CAUnusable(f"--confdir {confdir} cannot be used: it is not a directory")
    # The CA file itself first, as the proxy serves it (its certificates only): on the proxy's
    # host that keeps one bundle for `run` and `env`. An agent has only the certificate.
    problems = []
    for name in (CA_KEY, CA_CERT):
        try:
            found = certificates((confdir / name).read_bytes())
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{name}: {_reason(exc)}")
            continue
        if _valid(found):
            return found
        problems.append(f"{name}: no certificate in it")
    raise CAUnusable(
        f"no CA certificate in {confdir}"
        + (f" ({'; '.join(problems)})" if problems else "")
        + f": the proxy's host has it, as {CA_CERT} in the --confdir of its `drawdown run` "
        "(made when the proxy first starts); run `drawdown env` there, or copy that file to "
        "this host and pass it with --ca-cert FILE"
    )


def _valid(pem: bytes) -> bool:
    from cryptography import x509

    try:
        return bool(x509.load_pem_x509_certificates(pem))
    except ValueError:
        return False


def cache_folder(ca_pem: bytes) -> Path:
    """Where `drawdown env` writes a bundle for a CA whose confdir it may not write: one folder
    per CA in the user's cache ($XDG_CACHE_HOME, else ~/.cache), so two proxies' CAs never
    share a bundle."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    try:
        root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    except RuntimeError:  # no home directory to find
        raise CAUnusable(
            "no cache folder for the agents' CA bundle (no home directory): give --bundle-dir DIR"
        ) from None
    return root / "drawdown" / f"ca-{hashlib.sha256(ca_pem).hexdigest()[:16]}"


# --- the bundle --------------------------------------------------------------------------


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


def write_bundle(folder: Path, ca_pem: bytes) -> Path:
    """Write (or leave, when current) the bundle of system CAs + `ca_pem`, and its Java
    truststore, in `folder`; the bundle's path. BundleUnwritable when the folder refuses."""
    system = system_ca_file()
    parts = [system.read_text()] if system else []
    parts.append(ca_pem.decode("ascii"))
    bundle = folder / BUNDLE
    text = "\n".join(p.rstrip("\n") + "\n" for p in parts)
    try:
        current = bundle.read_text()
    except (OSError, UnicodeDecodeError):
        current = None  # missing or unreadable: written afresh
    truststore = folder / TRUSTSTORE
    try:
        if current != text or not truststore.is_file():
            folder.mkdir(parents=True, exist_ok=True)
        if current != text:
            _replace(bundle, text.encode())
        if current != text or not truststore.is_file():
            _replace(truststore, java_truststore(text.encode()))
    except OSError as exc:
        raise BundleUnwritable(folder, _reason(exc)) from None
    return bundle


def ca_bundle(confdir: Path) -> Path:
    """The proxy's side: its CA, loaded or minted, and the agents' bundle beside it."""
    return write_bundle(confdir, ensure_ca(confdir))


def _replace(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: an agent starting meanwhile reads the old file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


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
