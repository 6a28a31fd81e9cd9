"""Ledger URLs as they may be shown: a PostgreSQL DSN without its password."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_dsn(url: str) -> str:
    """`url` fit for messages and logs: a PostgreSQL DSN loses its password; paths pass."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://…"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostinfo}" if ":" in userinfo else f"{user}@{hostinfo}"
    query = "&".join(
        "password=***" if pair.lower().startswith("password=") else pair
        for pair in parts.query.split("&")
        if pair
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
