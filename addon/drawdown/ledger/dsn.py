"""Ledger URLs: the SQLite file one names, and how one may be shown (a PostgreSQL DSN
without its password)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from .api import NotALedger

# The ledger a command uses without --db.
DEFAULT_DB = "./drawdown.db"


def is_postgres(url: str | None) -> bool:
    """Whether a ledger URL names a PostgreSQL database (else a SQLite file)."""
    return (url or "").startswith(("postgresql://", "postgres://"))


# Any `scheme://`, in any case: a mistyped one (`postgresq://`, `POSTGRESQL://`) holds the
# password all the same.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


def _secret_parameter(pair: str) -> bool:
    """A query parameter that holds a password (libpq's `password`, `sslpassword`)."""
    return "password" in pair.partition("=")[0].lower()


def redact_dsn(url: str) -> str:
    """`url` fit for messages and logs: a DSN (`scheme://…`) loses its password, in its user
    info and in any query parameter named like one (`password=`, `sslpassword=`); paths pass."""
    found = _SCHEME.match(url)
    if found is None:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"{found.group(0)}…"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostinfo}" if ":" in userinfo else f"{user}@{hostinfo}"
    pairs = [pair for pair in parts.query.split("&") if pair]
    if netloc == parts.netloc and not parts.fragment and not any(map(_secret_parameter, pairs)):
        return url  # nothing to hide (`sqlite:///…` is shown as written)
    query = "&".join(
        f"{pair.partition('=')[0]}=***" if _secret_parameter(pair) else pair for pair in pairs
    )
    scheme = found.group(0)[:-3]  # as written: urlsplit lowers it (`POSTGRESQL://` is a typo)
    return urlunsplit((scheme, netloc, parts.path, query, ""))


def sqlite_path(url: str) -> str:
    """The file a SQLite ledger URL names (`PATH` or `sqlite:///PATH`). One naming none is
    refused: SQLite would open a private temporary database for "", lost at exit, and a
    reader would take Path("") for the current folder."""
    path = url.removeprefix("sqlite:///")
    if not path.strip():
        raise NotALedger("--db names no file: give it the ledger's path")
    return path
