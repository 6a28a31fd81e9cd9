"""PostgreSQL for the tests: the server (DRAWDOWN_PG_DSN), a fresh schema per test, a
ledger location on either backend, and a visible note when PostgreSQL tests were skipped
for want of a server.

Registered as a pytest plugin by tests/unit/conftest.py and tests/property/conftest.py
(fixtures `pg_url` and `backend`, the terminal summary); other modules call
`require_postgres()` and `fresh_schema()` directly. With DRAWDOWN_REQUIRE_POSTGRES=1 (CI) a missing server fails
the tests that need it instead of skipping them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

DEFAULT_DSN = "postgresql://127.0.0.1:5432/test"
_missing: list[str] = []  # node ids of the tests skipped for want of a server


def dsn() -> str:
    return os.environ.get("DRAWDOWN_PG_DSN") or DEFAULT_DSN


def required() -> bool:
    return os.environ.get("DRAWDOWN_REQUIRE_POSTGRES", "") not in ("", "0")


@functools.cache
def _probe(url: str) -> str | None:
    """None when the server answers, else why not (without the DSN's password)."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    from drawdown.ledger.dsn import redact_dsn

    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"no PostgreSQL server at {redact_dsn(url)} ({first})"
    return None


def require_postgres(node_id: str | None = None) -> str:
    """The DSN, or skip (fail when DRAWDOWN_REQUIRE_POSTGRES=1) when no server answers."""
    url = dsn()
    problem = _probe(url)
    if problem is None:
        return url
    if required():
        pytest.fail(f"{problem}; DRAWDOWN_REQUIRE_POSTGRES=1 demands one", pytrace=False)
    _missing.append(node_id or "?")
    pytest.skip(f"{problem}; set DRAWDOWN_PG_DSN to run the PostgreSQL tests")


def with_search_path(url: str, schema: str) -> str:
    """`url` whose sessions create and find their tables in `schema`."""
    option = quote(f"-c search_path={schema}", safe="")
    return f"{url}{'&' if '?' in url else '?'}options={option}"


@contextlib.contextmanager
def fresh_schema(prefix: str = "t", node_id: str | None = None) -> Iterator[str]:
    """A DSN with a schema of its own (search_path), dropped afterwards."""
    import psycopg

    url = require_postgres(node_id)
    schema = f"drawdown_{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_search_path(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            # Sessions a test left behind (a killed proxy, a leaked pool) must not block the drop.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND query ILIKE %s",
                (f"%{schema}%",),
            )
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A PostgreSQL ledger DSN with its own empty schema."""
    with fresh_schema(node_id=request.node.nodeid) as url:
        yield url


class LedgerBackend:
    """One ledger location on either backend: open ledgers on it, query it with `?` placeholders."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url  # a file path (sqlite) or a DSN (postgres)
        self._pg: Any = None

    def open(self, **kwargs: Any) -> Any:
        if self.kind == "sqlite":
            from drawdown.ledger.sqlite import SQLiteLedger

            return SQLiteLedger(self.url, **kwargs)
        from drawdown.ledger.postgres import PostgresLedger

        return PostgresLedger(self.url, **kwargs)

    def _pg_conn(self) -> Any:
        if self._pg is None:
            import psycopg

            self._pg = psycopg.connect(self.url, autocommit=True)
        return self._pg

    def _cursor(self, conn: Any, sql: str, params: tuple[Any, ...]) -> Any:
        if self.kind == "sqlite":
            return conn.execute(sql, params)
        return conn.execute(sql.replace("?", "%s"), params)

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows as tuples; also runs statements that return nothing (committed at once)."""
        return self._query(sql, params)[1]

    def dicts(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        names, found = self._query(sql, params)
        return [dict(zip(names, r, strict=True)) for r in found]

    def _query(self, sql: str, params: tuple[Any, ...]) -> tuple[list[str], list[tuple[Any, ...]]]:
        with contextlib.ExitStack() as stack:
            if self.kind == "sqlite":
                conn = stack.enter_context(
                    contextlib.closing(sqlite3.connect(self.url, timeout=30))
                )
                stack.enter_context(conn)  # commit on success
            else:
                conn = self._pg_conn()
            cur = self._cursor(conn, sql, params)
            if cur.description is None:
                return [], []
            return [c[0] for c in cur.description], [tuple(r) for r in cur.fetchall()]

    def scalar(self, sql: str, *params: Any) -> Any:
        return self.rows(sql, *params)[0][0]

    execute = rows

    @staticmethod
    def crash(ledger: Any) -> None:
        """Drop a ledger's connections without a clean shutdown (no stopped_at, holds stay)."""
        if hasattr(ledger, "pool"):
            ledger._closed = True
            ledger.pool.close()
        else:
            ledger.conn.close()

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
            self._pg = None


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerBackend]:
    """A fresh, empty ledger location on each backend (a file; a PostgreSQL schema)."""
    if request.param == "sqlite":
        found = LedgerBackend("sqlite", str(tmp_path / "ledger.db"))
        yield found
        found.close()
        return
    with fresh_schema(node_id=request.node.nodeid) as url:
        found = LedgerBackend("postgres", url)
        try:
            yield found
        finally:
            found.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _missing:
        return
    terminalreporter.write_sep("=", "PostgreSQL backend NOT tested", yellow=True, bold=True)
    terminalreporter.write_line(
        f"{len(_missing)} PostgreSQL test(s) skipped: {_probe(dsn())}. Start a server or set "
        "DRAWDOWN_PG_DSN=postgresql://…; DRAWDOWN_REQUIRE_POSTGRES=1 makes this an error.",
        yellow=True,
    )


def register(config: pytest.Config) -> None:
    """Register this module once, however many conftests ask."""
    import sys

    module = sys.modules[__name__]
    if not config.pluginmanager.is_registered(module):
        config.pluginmanager.register(module, "drawdown-support-pg")
