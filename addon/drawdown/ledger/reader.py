"""Read-only access to a ledger for reports, replay and explain — off the proxy's hot path."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..recording import redact_path
from .api import LedgerError, schema_version
from .dsn import DEFAULT_DB, is_postgres, redact_dsn, sqlite_path

_NAMED = re.compile(r":([A-Za-z_][A-Za-z0-9_]*)")


class Reader:
    """`query(sql, params)` with `:name` placeholders on either backend; rows as dicts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._scrub: Callable[[str], str] = str
        if is_postgres(url):
            try:
                import psycopg
                from psycopg.rows import dict_row

                from .postgres import scrub
            except ImportError as exc:
                raise LedgerError(f"reading a PostgreSQL ledger needs psycopg: {exc}") from exc
            self.url = redact_dsn(url)  # error messages name the ledger, never its password
            self._scrub = lambda text: scrub(text, url)  # psycopg's messages may quote the DSN
            try:
                self._pg = psycopg.connect(
                    url, row_factory=dict_row, autocommit=True, connect_timeout=10
                )
            except psycopg.Error as exc:
                text = self._scrub(str(exc).strip())
                first = (text.splitlines() or [type(exc).__name__])[0]
                raise LedgerError(f"cannot open ledger {self.url}: {first}") from None
            self._sqlite = None
            try:
                schema = self._pg.execute("SELECT current_schema() AS s").fetchone()["s"]
            except psycopg.Error as exc:
                self._pg.close()
                raise LedgerError(
                    f"cannot read ledger {self.url}: {self._scrub(str(exc).strip())}"
                ) from None
            if schema is None:
                self._pg.close()  # not "not a drawdown ledger": a schema's name mistyped
                raise LedgerError(
                    f"{self.url}: its search_path names no schema that exists, so there is "
                    "no ledger there: check the schema's name"
                )
        else:
            path = sqlite_path(url)
            if not Path(path).exists():
                other = ", or pass --db" if url == DEFAULT_DB else ""
                raise LedgerError(
                    f"no ledger at {path} (start `drawdown run --db {path}` first{other})"
                )
            if Path(path).is_dir():
                raise LedgerError(f"{path} is a folder, not a ledger: pass --db the ledger's file")
            try:
                self._sqlite = _open_read_only(Path(path).resolve())
            except sqlite3.Error as exc:
                denied = _denied(Path(path))
                if denied is not None:  # SQLite says only "unable to open database file"
                    on = "" if denied == Path(path) else f" on {denied}"
                    raise LedgerError(f"cannot read ledger {path}: permission denied{on}") from exc
                raise _unreadable(path, exc) from exc
            self._pg = None

        # A newer drawdown's ledger may mean other things by the same columns: refused, as by run.
        found = self.query("SELECT value FROM meta WHERE key = 'schema_version'")
        self.schema_version = schema_version(
            found[0]["value"] if found else None,
            has_tables=not found and self.has_table("budget_instances"),
        )

    @property
    def is_sqlite(self) -> bool:
        """SQLite compares text byte by byte (BINARY), so a scope prefix is a range of its
        scope index; PostgreSQL's collation need not order text so."""
        return self._sqlite is not None

    def has_table(self, name: str) -> bool:
        if self._sqlite is not None:
            sql = "SELECT 1 AS found FROM sqlite_master WHERE type = 'table' AND name = :name"
        else:
            sql = "SELECT 1 AS found WHERE to_regclass(:name) IS NOT NULL"
        return bool(self.query(sql, {"name": name}))

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        params = params or {}
        try:
            if self._sqlite is not None:
                cursor = self._sqlite.execute(sql, params)
                names = [column[0] for column in cursor.description or ()]
                # Tuples zipped with the names: sqlite3.Row made into a dict cost 1.5 times as
                # much (a report reads a few 100,000 rows).
                found = _as_dicts(names, cursor.fetchall())
            else:
                cursor = self._pg.execute(_NAMED.sub(r"%(\1)s", sql), params)
                found = cursor.fetchall()
                # SUM() of a BIGINT is NUMERIC in PostgreSQL: give integers back as int, as SQLite
                # does. Only NUMERIC columns can hold one.
                numeric = [c.name for c in cursor.description or () if c.type_code == _NUMERIC]
                for row in found if numeric else ():
                    for name in numeric:
                        row[name] = _plain(row[name])
        except Exception as exc:  # sqlite3.Error / psycopg.Error: both mean "cannot read"
            raise _unreadable(self.url, exc, self._scrub) from None
        if found and any(column in found[0] for column in _REDACTED_COLUMNS):
            return _redacted(found)
        return found

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every query inside reads the ledger as of one moment. A report makes a dozen queries
        over seconds while a proxy writes: each read alone, its totals and its runs disagreed
        (767 rows apart at 41 calls a second). SQLite holds one WAL read transaction (the
        writer goes on; a checkpoint waits for it), PostgreSQL one REPEATABLE READ."""
        if self._sqlite is not None:
            self._sqlite.execute("BEGIN")
            try:
                yield
            finally:
                self._sqlite.rollback()  # read only: nothing to keep
            return
        from psycopg import IsolationLevel

        self._pg.isolation_level = IsolationLevel.REPEATABLE_READ
        self._pg.read_only = True
        with self._pg.transaction():
            yield

    def close(self) -> None:
        (self._sqlite or self._pg).close()


def _unreadable(url: str, exc: Exception, scrub: Callable[[str], str] = str) -> LedgerError:
    text = scrub(str(exc))
    first = (text.splitlines() or [type(exc).__name__])[0]
    if re.search(r"no such table|relation \S+ does not exist", first):
        # A database, but not one `drawdown run` wrote (or the wrong --db).
        return LedgerError(
            f"{url} is not a drawdown ledger ({first}): point --db at the ledger "
            "`drawdown run` writes"
        )
    return LedgerError(f"cannot read ledger {url}: {text}")


def _denied(path: Path) -> Path | None:
    """The file of a SQLite ledger (it, or its `-wal`) this user may not read, if any."""
    for each in (path, path.with_name(path.name + "-wal")):
        if each.exists() and not os.access(each, os.R_OK):
            return each
    return None


def _open_read_only(path: Path) -> sqlite3.Connection:
    """The SQLite ledger, read-only. SQLite still makes a WAL ledger's `-shm` file beside it,
    which fails in a folder this user may not write (a report run by someone other than the
    proxy's user). With no `-wal` or `-shm` there no process has it open for writing, so it is
    then opened as an immutable file: no locks, no `-shm`, nothing it could miss."""
    # Quoted: a `#`, `?` or `%` in a path is URI syntax, and SQLite then opened (and created)
    # another file than the ledger. As bytes: a file name need not be UTF-8.
    uri = f"file:{quote(os.fsencode(path))}"
    try:
        return _connect(f"{uri}?mode=ro")
    except sqlite3.OperationalError:
        beside = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
        if any(each.exists() for each in beside):
            raise
        return _connect(f"{uri}?mode=ro&immutable=1")


def _connect(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.execute("SELECT 1 FROM decisions LIMIT 1")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


_NUMERIC = 1700  # PostgreSQL's type oid of NUMERIC
_REDACTED_COLUMNS = ("path", "reason")


def _as_dicts(names: list[str], rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Rows as dicts, as sqlite3.Row made them: where two columns share a name (compared
    without case), each name's value is its first column's."""
    if len({name.lower() for name in names}) == len(names):
        return [dict(zip(names, row, strict=True)) for row in rows]
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        first.setdefault(name.lower(), i)
    picks = [(name, first[name.lower()]) for name in names]
    return [{name: row[i] for name, i in picks} for row in rows]


def _redacted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the credentials in their request paths (and reasons quoting one) redacted:
    the proxy redacts them before it writes, but a ledger written before it did, or by another
    writer, still holds them, and nothing read from here (reports, replay) may show one."""
    done: dict[str, str] = {}  # one redaction per text: most rows share a few paths
    for row in rows:
        for column in _REDACTED_COLUMNS:
            value = row.get(column)
            if isinstance(value, str) and "/" in value:
                clean = done.get(value)
                if clean is None:
                    clean = done[value] = redact_path(value)
                row[column] = clean
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def budget_instances(url: str) -> list[dict[str, Any]]:
    """Every budget instance with its limits, spend and holds (`drawdown budgets`)."""
    reader = Reader(url)
    try:
        return reader.query(
            "SELECT id, budget, scope, per, window_start, limit_usd, limit_tokens, limit_requests, "
            "spent_usd, spent_tokens, spent_requests, reserved_usd, reserved_tokens, "
            "reserved_requests, updated_at FROM budget_instances ORDER BY budget, scope, window_start"
        )
    finally:
        reader.close()


def held_batches(url: str) -> list[dict[str, Any]]:
    """The batch jobs held while they run (api.BatchHold): the key their results are charged
    under, the run that submitted them, what is held and until when (`drawdown budgets`)."""
    reader = Reader(url)
    try:
        if reader.schema_version < 6:  # a ledger from before batches were held
            return []
        return reader.query(
            "SELECT b.key, d.scope, h.est_usd, h.est_tokens, h.expires_at, "
            "h.instance_ids FROM batch_holds b "
            "JOIN holds h ON h.id = b.hold_id JOIN decisions d ON d.request_id = b.request_id "
            "WHERE h.state = 'active' ORDER BY h.expires_at, b.key"
        )
    finally:
        reader.close()
