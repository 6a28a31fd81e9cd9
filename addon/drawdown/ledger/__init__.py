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
    ReserveOutcome,
)

__all__ = [
    "Amount",
    "Claim",
    "Completion",
    "DecisionRow",
    "Ledger",
    "LedgerError",
    "LedgerTooNew",
    "ReserveOutcome",
    "open_ledger",
]


def open_ledger(url: str, **kwargs: Any) -> Ledger:
    """`PATH`, `sqlite:///PATH` → SQLite; `postgresql://…` → PostgreSQL."""
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from .postgres import PostgresLedger
        except ImportError as exc:
            raise LedgerError(
                f"the PostgreSQL ledger needs psycopg: pip install 'drawdown[postgres]' ({exc})"
            ) from exc
        return PostgresLedger(url, **kwargs)
    from .sqlite import open_sqlite

    return open_sqlite(url, **kwargs)
