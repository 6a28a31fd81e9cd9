"""`drawdown prune`: take the history of runs that ended long ago out of the ledger.

A ledger keeps a row per call in `decisions` and `holds` (and its facts and events): at fleet
rates that is millions of rows a month, which every report reads. Pruning deletes the rows
of **whole runs** quiet since the cutoff, never part of a run that is still going: the
guards (`step_count`, `loop`, `requires`) read a run's own history, and a run cut in half
would get its steps back.

What pruning never changes is what a budget has spent. An instance's `spent` stays as it
is; the settled holds deleted from under it are summed into `budget_carried`, so the
conservation check (`drawdown verify`: spent = what its holds charged) still adds up, now
as kept holds + carried. A windowed instance whose window ended before the cutoff, and
that no kept hold names, is deleted with its carried sum: no reserve can reach a past
window. Lifetime instances are kept for ever, whatever their scope: a run id seen again
must find its budget spent.

Kept whatever their age: active holds (a batch job's, held until its results are read) and
their runs; the keys a charge is made once under, and batch input estimates (a few rows per
batch, and a download of old results must not be charged again); each agent's idle_split
run (`idle_runs`); on SQLite, the run of the newest hold (a new hold is numbered after it).

Each step is one short transaction of at most `batch` decisions, so proxies writing to
the same ledger wait at most for one of them, and every commit leaves the invariants
true: a hold is deleted in the transaction that carries its charge.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..budgets import window
from .api import LedgerError
from .dsn import is_postgres
from .reader import Reader

UNITS = ("usd", "tokens", "requests")


@dataclass
class Pruned:
    """What a prune took out (or, with dry_run, would take out)."""

    before: float
    runs: int = 0
    decisions: int = 0
    holds: int = 0
    facts: int = 0
    events: int = 0
    windows: int = 0  # budget instances of windows that ended before the cutoff
    processes: int = 0
    kept_runs: int = 0  # quiet runs kept: for an active hold (a batch job still running) or
    kept_newest: int = 0  # of them, those for SQLite's newest hold alone (numbered after it)
    carried: dict[str, int] = field(default_factory=lambda: dict.fromkeys(UNITS, 0))


class _Tx:
    """One transaction on either backend, with `?` placeholders."""

    def __init__(self, execute: Callable[[str, Sequence[Any]], Any], postgres: bool) -> None:
        self._execute = execute
        self._postgres = postgres

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self.run(sql, params)
        return [tuple(r) for r in cursor.fetchall()]

    def run(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._execute(sql.replace("?", "%s") if self._postgres else sql, params)

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.run(sql, params).rowcount or 0


class _ReadOnly:
    """A dry run's view of the ledger: read only, so it changes nothing, not even the schema."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader
        self.postgres = is_postgres(reader.url)

    def read(self, fn: Callable[[_Tx], Any]) -> Any:
        def execute(sql: str, params: Sequence[Any]) -> Any:
            names = iter(range(len(params)))
            named = re.sub(r"\?", lambda _: f":p{next(names)}", sql)
            rows = self._reader.query(named, {f"p{i}": value for i, value in enumerate(params)})
            return _Rows([tuple(row.values()) for row in rows])

        return fn(_Tx(execute, False))

    transaction = read

    def close(self) -> None:
        self._reader.close()


class _Rows:
    """A read's rows, as a cursor gives them."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._rows = rows
        self.rowcount = len(rows)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._rows


class _Backend:
    """A write connection to the ledger at `url`, opened as the proxy opens it (migrated, so
    `budget_carried` exists), never creating a ledger that is not there."""

    def __init__(self, url: str, busy_timeout: float) -> None:
        self.postgres = is_postgres(url)
        if self.postgres:
            from .postgres import PostgresLedger

            self._ledger: Any = PostgresLedger(url, register=False, lock_timeout=busy_timeout)
        else:
            from .dsn import sqlite_path
            from .sqlite import SQLiteLedger

            self._ledger = SQLiteLedger(
                sqlite_path(url), register=False, create=False, busy_timeout=busy_timeout
            )

    def transaction(self, fn: Callable[[_Tx], Any]) -> Any:
        """`fn` in one write transaction; LedgerError (one line) for whatever the database
        refuses (a user without DELETE, a full disk)."""
        if self.postgres:
            from .postgres import _StatementFailed

            try:
                return self._ledger._transaction(
                    lambda conn, _replay: fn(_Tx(lambda sql, p: conn.execute(sql, p), True))
                )
            except _StatementFailed as exc:
                raise LedgerError(f"ledger refused the prune: {exc}") from None
        conn = self._ledger.conn
        return self._ledger._write(lambda: fn(_Tx(lambda sql, p: conn.execute(sql, p), False)))

    def read(self, fn: Callable[[_Tx], Any]) -> Any:
        """`fn` outside a write transaction: a long scan must not keep proxies from writing."""
        if self.postgres:
            return self.transaction(fn)
        conn = self._ledger.conn
        try:
            return fn(_Tx(lambda sql, p: conn.execute(sql, p), False))
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read ledger {self._ledger.path}: {exc}") from None

    def close(self) -> None:
        self._ledger.close()


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(items: Sequence[Any]) -> str:
    return ", ".join("?" * len(items))


def prune(
    url: str,
    before: float,
    *,
    batch: int = 2000,
    dry_run: bool = False,
    busy_timeout: float = 10.0,
    now: float | None = None,
) -> Pruned:
    """Prune the runs of the ledger at `url` whose last decision is older than `before`
    (epoch seconds), and what belongs only to them. See the module docstring."""
    now = time.time() if now is None else now
    if before > now:
        raise ValueError("the cutoff is in the future: nothing that old can be pruned")
    result = Pruned(before=before)
    # Read first: a file or database that is no ledger (an empty file, a database without
    # its tables) is refused, never made one; a dry run only reads.
    reader = Reader(url)
    if not reader.has_table("decisions"):
        reader.close()
        raise LedgerError(f"{reader.url} is no drawdown ledger: it has no decisions table")
    backend: _Backend | _ReadOnly
    if dry_run:
        backend = _ReadOnly(reader)
    else:
        reader.close()
        backend = _Backend(url, busy_timeout)
    try:
        reuses_ids = not backend.postgres
        quiet, kept, newest = backend.read(lambda tx: _quiet_runs(tx, before, reuses_ids))
        result.runs, result.kept_runs, result.kept_newest = len(quiet), len(kept), len(newest)
        if dry_run:
            backend.read(lambda tx: _count(tx, quiet, before, result))
            return result
        for scopes in _chunks(quiet, max(1, batch // 10)):
            while backend.transaction(
                lambda tx, s=scopes: _prune_decisions(tx, s, before, batch, result)
            ):
                pass
        while backend.transaction(
            lambda tx: _prune_by_time(tx, "events", "ts", before, batch, result)
        ):
            pass
        ended = backend.read(lambda tx: _ended_windows(tx, before))
        backend.transaction(lambda tx: _prune_windows(tx, ended, result))
        backend.transaction(lambda tx: _prune_housekeeping(tx, before, result))
        return result
    finally:
        backend.close()


def _quiet_runs(
    tx: _Tx, before: float, reuses_ids: bool
) -> tuple[list[str | None], list[str | None], list[str | None]]:
    """The scopes (runs) whose last decision is older than `before`, those of them kept for
    an active hold, and those of the kept that hold no active one, only the newest. A decision
    without a scope (refused before its caller was known) counts as a run of its own: the
    NULL scope, pruned by age."""
    quiet = [
        scope
        for (scope,) in tx.rows(
            "SELECT scope FROM decisions WHERE scope IS NOT NULL GROUP BY scope HAVING MAX(ts) < ?",
            (before,),
        )
    ]
    held = {
        scope
        for (scope,) in tx.rows(
            "SELECT DISTINCT d.scope FROM holds h JOIN decisions d ON d.request_id = h.request_id "
            "WHERE h.state = 'active' AND d.scope IS NOT NULL"
        )
    }
    newest: set[str | None] = set()
    if reuses_ids:
        # SQLite numbers a new hold MAX(id) + 1: were the newest hold pruned, the next would
        # take its id, which a kept reference may still name (a batch's key: a download of
        # its old results then settled that new call's hold). The run holding it stays.
        newest = {
            scope
            for (scope,) in tx.rows(
                "SELECT d.scope FROM holds h JOIN decisions d ON d.request_id = h.request_id "
                "WHERE h.id = (SELECT MAX(id) FROM holds)"
            )
        }
    keep = held | newest
    kept = [scope for scope in quiet if scope in keep]
    pruned: list[str | None] = [scope for scope in quiet if scope not in keep]
    if tx.rows("SELECT 1 FROM decisions WHERE scope IS NULL AND ts < ? LIMIT 1", (before,)):
        pruned.append(None)
    return pruned, kept, [scope for scope in kept if scope not in held]  # type: ignore[return-value]


def _scope_filter(scopes: Sequence[str | None]) -> tuple[str, list[Any]]:
    named = [s for s in scopes if s is not None]
    parts = []
    if named:
        parts.append(f"scope IN ({_marks(named)})")
    if len(named) != len(scopes):
        parts.append("scope IS NULL")
    return "(" + " OR ".join(parts) + ")", named


# A decision whose hold is still active stays (a batch job's): verify wants its decision.
_NOT_HELD = "(hold_id IS NULL OR hold_id NOT IN (SELECT id FROM holds WHERE state = 'active'))"


def _count(tx: _Tx, scopes: Sequence[str | None], before: float, result: Pruned) -> None:
    for chunk in _chunks(scopes, 500):
        where, params = _scope_filter(chunk)
        (found, held), *_ = tx.rows(
            f"SELECT COUNT(*) AS n, COUNT(hold_id) AS held FROM decisions WHERE {where} AND ts < ? AND {_NOT_HELD}",
            (*params, before),
        )
        result.decisions += found
        result.holds += held
        named = [s for s in chunk if s is not None]
        if named:
            ((facts,),) = tx.rows(
                f"SELECT COUNT(*) FROM facts WHERE scope IN ({_marks(named)}) AND ts < ?",
                (*named, before),
            )
            result.facts += facts
    ((events,),) = tx.rows("SELECT COUNT(*) FROM events WHERE ts < ?", (before,))
    result.events = events
    result.windows = len(_ended_windows(tx, before, set(scopes)))


def _prune_decisions(
    tx: _Tx, scopes: Sequence[str | None], before: float, batch: int, result: Pruned
) -> bool:
    """One transaction: up to `batch` decisions of these runs, their settled holds (their
    charges carried), and the runs' facts. True while there is more to do."""
    # A run that spoke again since it was found quiet is no longer pruned: its guards read
    # its whole history. (And ts < before below: what a run says during this transaction.)
    named = [s for s in scopes if s is not None]
    if named:
        spoke = {
            scope
            for (scope,) in tx.rows(
                f"SELECT DISTINCT scope FROM decisions WHERE scope IN ({_marks(named)}) "
                "AND ts >= ?",
                (*named, before),
            )
        }
        if spoke:
            scopes = [s for s in scopes if s not in spoke]
            if not scopes:
                return False
    where, params = _scope_filter(scopes)
    found = tx.rows(
        f"SELECT id, hold_id FROM decisions WHERE {where} AND ts < ? AND {_NOT_HELD} LIMIT ?",
        (*params, before, batch),
    )
    hold_ids = [hold for _, hold in found if hold is not None]
    if hold_ids:
        # What this transaction deleted is what it carries (RETURNING): a second prune at
        # the same moment (two crons) reads the same holds but deletes, so carries, none.
        deleted = tx.rows(
            f"DELETE FROM holds WHERE id IN ({_marks(hold_ids)}) AND state <> 'active' "
            "RETURNING instance_ids, actual_usd, actual_tokens, actual_requests",
            hold_ids,
        )
        _carry(tx, deleted, result)
        result.holds += len(deleted)
        # A batch's key names its hold: gone with it, so that no later download of its
        # results can settle whatever hold that id names next.
        tx.run(
            f"DELETE FROM batch_holds WHERE hold_id IN ({_marks(hold_ids)}) "
            "AND hold_id NOT IN (SELECT id FROM holds)",
            hold_ids,
        )
    if found:
        ids = [decision for decision, _ in found]
        result.decisions += tx.count(f"DELETE FROM decisions WHERE id IN ({_marks(ids)})", ids)
    if len(found) == batch:
        return True
    named = [s for s in scopes if s is not None]
    if named:  # the runs' last decisions are gone: their facts go in the same transaction
        result.facts += tx.count(
            f"DELETE FROM facts WHERE scope IN ({_marks(named)}) AND ts < ?", (*named, before)
        )
    return False


def _carry(tx: _Tx, deleted: Sequence[Sequence[Any]], result: Pruned) -> None:
    """Add what the deleted holds (instance_ids, actual usd, tokens, requests) charged to each
    instance they name, in budget_carried."""
    sums: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for instance_ids, *actuals in deleted:
        for index, unit in enumerate(UNITS):
            result.carried[unit] += actuals[index] or 0
        for instance in {int(i) for i in (instance_ids or "").split(",") if i}:
            total = sums[instance]
            for index in range(3):
                total[index] += actuals[index] or 0
            total[3] += 1
    now = time.time()
    for instance, (usd, tokens, requests, holds) in sorted(sums.items()):
        tx.run(
            "INSERT INTO budget_carried (instance_id, usd, tokens, requests, holds, pruned_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (instance_id) DO UPDATE SET "
            "usd = budget_carried.usd + excluded.usd, "
            "tokens = budget_carried.tokens + excluded.tokens, "
            "requests = budget_carried.requests + excluded.requests, "
            "holds = budget_carried.holds + excluded.holds, pruned_at = excluded.pruned_at",
            (instance, usd, tokens, requests, holds, now),
        )


def _prune_by_time(
    tx: _Tx, table: str, column: str, before: float, batch: int, result: Pruned
) -> bool:
    deleted = tx.count(
        f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {column} < ? LIMIT ?)",
        (before, batch),
    )
    setattr(result, table, getattr(result, table) + deleted)
    return deleted == batch


def _ended_windows(tx: _Tx, before: float, pruning: set[str | None] | None = None) -> list[int]:
    """Windowed instances whose window ended before `before`, holding nothing, and named by
    no hold still kept (a call reserved in a window and settled after it keeps it)."""
    candidates = [
        instance
        for instance, per, start in tx.rows(
            "SELECT id, per, window_start FROM budget_instances WHERE per IS NOT NULL "
            "AND window_start < ? AND reserved_usd = 0 AND reserved_tokens = 0 "
            "AND reserved_requests = 0",
            (before,),
        )
        if (window(per, float(start))[1] or before) < before
    ]
    if not candidates:
        return []
    # Only a hold made before the cutoff can name a window that ended before it. For a dry
    # run, the settled holds of the runs it would prune are as good as gone.
    named: set[int] = set()
    for instance_ids, state, scope in tx.rows(
        "SELECT h.instance_ids, h.state, d.scope FROM holds h "
        "LEFT JOIN decisions d ON d.request_id = h.request_id WHERE h.created_at < ?",
        (before,),
    ):
        if pruning is not None and state != "active" and scope in pruning:
            continue
        named.update(int(i) for i in (instance_ids or "").split(",") if i)
    return [instance for instance in candidates if instance not in named]


def _prune_windows(tx: _Tx, ended: Sequence[int], result: Pruned) -> None:
    # Read before this transaction: no hold made now can name a window that has ended, and
    # `reserved = 0` is checked again here in case a late reserve reached one (clock skew).
    for chunk in _chunks(ended, 500):
        idle = (
            f"id IN ({_marks(chunk)}) AND reserved_usd = 0 AND reserved_tokens = 0 "
            "AND reserved_requests = 0"
        )
        tx.run(
            f"DELETE FROM budget_carried WHERE instance_id IN (SELECT id FROM budget_instances WHERE {idle})",
            chunk,
        )
        result.windows += tx.count(f"DELETE FROM budget_instances WHERE {idle}", chunk)


def _prune_housekeeping(tx: _Tx, before: float, result: Pruned) -> None:
    # idle_runs stay (a row per agent): an agent back after the cutoff but within its
    # idle_split is still in its run, whose budget is spent; without the row it got a new one.
    # A process stopped cleanly released its holds; one that died is swept by the others.
    result.processes = tx.count(
        "DELETE FROM processes WHERE stopped_at IS NOT NULL AND stopped_at < ? "
        "AND id NOT IN (SELECT process_id FROM holds WHERE state = 'active')",
        (before,),
    )
