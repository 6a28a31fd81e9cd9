"""The ledger: budget instances, holds, decisions and events (SQLite by default, PostgreSQL for fleets)."""

from __future__ import annotations

from typing import Any

from .api import (
    Amount,
    Claim,
    Completion,
    DecisionRow,
    Ledger,
    LedgerError,
    LedgerTooNew,
    NotALedger,
    ReserveOutcome,
)
from .dsn import is_postgres

__all__ = [
    "Amount",
    "Claim",
    "Completion",
    "DecisionRow",
    "Ledger",
    "LedgerError",
    "LedgerTooNew",
    "NotALedger",
    "ReserveOutcome",
    "open_ledger",
]


def open_ledger(url: str, *, timeout: float | None = None, **kwargs: Any) -> Ledger:
    """`PATH`, `sqlite:///PATH` → SQLite; `postgresql://…` → PostgreSQL.

    `timeout`: how long one operation may wait for a lock before it fails with LedgerError
    (SQLite's busy timeout, PostgreSQL's lock_timeout).
    """
    if is_postgres(url):
        if timeout is not None:
            kwargs.setdefault("lock_timeout", timeout)
        try:
            from .postgres import PostgresLedger
        except ImportError as exc:
            raise LedgerError(
                f"the PostgreSQL ledger needs psycopg: pip install 'drawdown[postgres]' ({exc})"
            ) from exc
        return PostgresLedger(url, **kwargs)
    from .sqlite import open_sqlite

    if timeout is not None:
        kwargs.setdefault("busy_timeout", timeout)
    return open_sqlite(url, **kwargs)
