"""The SQLite ledger: one file (WAL) shared safely by several proxy processes on one machine.

Every write runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's single
write lock up front: a reserve reads every matching budget instance, checks them
all, then holds on all of them, and no other process can interleave between the
check and the apply. That is the whole atomicity argument, across threads and
processes alike.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from .api import (
    DECISION_INSERT_FIELDS,
    IDLE_RUN_SQL,
    UNITS,
    Amount,
    Claim,
    Completion,
    DecisionRow,
    Guards,
    HistoryQuery,
    LedgerError,
    ReserveOutcome,
    Settled,
    Shortfall,
    Tripped,
    decision_values,
)
from .schema import migrate

_INSERT_DECISION = "INSERT INTO decisions ({}) VALUES ({})".format(
    ", ".join(DECISION_INSERT_FIELDS), ", ".join("?" * len(DECISION_INSERT_FIELDS))
)

T = TypeVar("T")

_INSTANCE_COLUMNS = (
    "id, limit_usd, limit_tokens, limit_requests, spent_usd, spent_tokens, spent_requests, "
    "reserved_usd, reserved_tokens, reserved_requests"
)


class SQLiteLedger:
    """Synchronous; one connection; serialise calls (AsyncLedger runs it on one writer thread)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        process_id: str | None = None,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        register: bool = True,
    ) -> None:
        self.path = str(path)
        self.process_id = (
            process_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self._lock = threading.RLock()
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self.conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a commit survives a crash of this process (the WAL is
            # written before COMMIT returns) but not a power loss; FULL adds an fsync per batch.
            self.conn.execute(f"PRAGMA synchronous = {synchronous}")
            # Checkpoints (copying the WAL into the database, with an fsync) are run by the
            # proxy's maintenance task on its own connection, so a reserve never waits for one;
            # this large automatic threshold is only the backstop when nothing else checkpoints.
            self.conn.execute("PRAGMA wal_autocheckpoint = 10000")
            self._checkpointer: sqlite3.Connection | None = None
            self.db = sqlite_utils.Database(self.conn)
            self._write(lambda: migrate(self.db))
            if register:
                now = time.time()
                self._write(
                    lambda: self.conn.execute(
                        "INSERT INTO processes (id, pid, host, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
                        (self.process_id, os.getpid(), socket.gethostname(), now, now),
                    )
                )
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc

    # --- transactions ------------------------------------------------------------------

    def _write(self, fn: Callable[[], T]) -> T:
        with self._lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger unavailable: {exc}") from exc
            try:
                result = fn()
                self.conn.execute("COMMIT")
                return result
            except BaseException as exc:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    raise LedgerError(f"ledger unavailable: {exc}") from exc
                raise

    def run_batch(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Run several operations in ONE transaction (one lock, one WAL commit), each in its own
        savepoint so a failing one leaves the others intact. Returns results or exceptions."""

        def body() -> list[Any]:
            results: list[Any] = []
            for name, args in calls:
                self.conn.execute("SAVEPOINT op")
                try:
                    results.append(getattr(self, f"_{name}")(*args))
                    self.conn.execute("RELEASE op")
                except Exception as exc:  # one op's failure must not undo the others
                    self.conn.execute("ROLLBACK TO op")
                    self.conn.execute("RELEASE op")
                    results.append(LedgerError(str(exc)) if isinstance(exc, sqlite3.Error) else exc)
            return results

        return self._write(body)

    # --- public operations (each its own transaction) --------------------------------------

    def reserve(
        self,
        row: DecisionRow,
        claims: Sequence[Claim],
        estimate: Amount,
        expires_at: float,
        guards: Guards | None = None,
    ) -> ReserveOutcome:
        return self._write(lambda: self._reserve(row, claims, estimate, expires_at, guards))

    def record(self, row: DecisionRow) -> None:
        self._write(lambda: self._record(row))

    def commit(self, request_id: str, hold_id: int, completion: Completion, now: float) -> Settled:
        return self._write(lambda: self._commit(request_id, hold_id, completion, now))

    def release(
        self, request_id: str, hold_id: int, completion: Completion, reason: str, now: float
    ) -> Settled:
        return self._write(lambda: self._release(request_id, hold_id, completion, reason, now))

    def history(self, queries: Sequence[HistoryQuery]) -> list[bool]:
        return self._write(lambda: self._history(queries))

    def idle_run(self, key: str, idle_seconds: float, candidate: str, now: float) -> str:
        return self._write(lambda: self._idle_run(key, idle_seconds, candidate, now))

    def extend(self, hold_ids: Sequence[int], expires_at: float) -> None:
        self._write(lambda: self._extend(hold_ids, expires_at))

    def heartbeat(self, now: float) -> None:
        self._write(lambda: self._heartbeat(now))

    def sweep(self, now: float, lease_seconds: float) -> int:
        return self._write(lambda: self._sweep(now, lease_seconds))

    def release_mine(self, now: float, reason: str) -> int:
        return self._write(lambda: self._release_mine(now, reason))

    def checkpoint(self) -> None:
        """Move the WAL into the database without blocking writers (PASSIVE), on a second
        connection so the writer thread never waits for the checkpoint's fsync."""
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    self.path, timeout=1.0, check_same_thread=False
                )
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            raise LedgerError(f"checkpoint of {self.path} failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            try:
                self._write(lambda: self._stopped(time.time()))
            except LedgerError:
                pass
            self.conn.close()
            if self._checkpointer is not None:
                self._checkpointer.close()

    # --- operations, inside a transaction ---------------------------------------------------

    def _reserve(
        self,
        row: DecisionRow,
        claims: Sequence[Claim],
        estimate: Amount,
        expires_at: float,
        guards: Guards | None = None,
    ) -> ReserveOutcome:
        cur = self.conn
        tripped = self._check_guards(row, guards) if guards is not None and guards.any else None
        if tripped is not None:
            if not guards.shadow:
                row.decision, row.reason_code, row.reason = "deny", "anomaly", tripped.detail
                row.status = 429
                self._record(row)
                return ReserveOutcome("deny", None, tripped=tripped)
            if row.decision == "allow":
                row.decision, row.reason_code, row.reason = "would_deny", "anomaly", tripped.detail
        instance_ids: list[int] = []
        shortfalls: list[Shortfall] = []
        shadow_shortfalls: list[Shortfall] = []
        # Check every instance first...
        for claim in claims:
            found = cur.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM budget_instances WHERE budget = ? AND scope = ? AND window_start = ?",
                (claim.budget, claim.scope, claim.window_start),
            ).fetchone()
            limits = (claim.limit_usd, claim.limit_tokens, claim.limit_requests)
            if found is None:
                found = cur.execute(
                    "INSERT INTO budget_instances (budget, scope, window_start, per, limit_usd, limit_tokens, "
                    "limit_requests, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    f"RETURNING {_INSTANCE_COLUMNS}",
                    (
                        claim.budget,
                        claim.scope,
                        claim.window_start,
                        claim.per,
                        *limits,
                        row.ts,
                        row.ts,
                    ),
                ).fetchone()
            elif (
                tuple(found[1:4]) != limits
            ):  # the policy changed this budget's limits: the new ones apply
                cur.execute(
                    "UPDATE budget_instances SET limit_usd = ?, limit_tokens = ?, limit_requests = ? WHERE id = ?",
                    (*limits, found[0]),
                )
            instance_ids.append(found[0])
            for index, unit in enumerate(UNITS):
                limit = limits[index]
                if limit is None:
                    continue
                spent, reserved, needed = found[4 + index], found[7 + index], estimate.get(unit)
                if spent + reserved + needed > limit:
                    short = Shortfall(claim, unit, limit, spent, reserved, needed)
                    (shadow_shortfalls if claim.shadow else shortfalls).append(short)
        # ...then apply to all, or to none.
        if shortfalls:
            row.decision = "deny"
            row.reason_code = row.reason_code or "budget_exhausted"
            row.reason = shortfalls[0].describe()
            row.budget = shortfalls[0].claim.scope
            row.status = 429 if shortfalls[0].claim.per else 402  # what the agent is answered
            self._record(row)
            return ReserveOutcome("deny", None, tuple(shortfalls), tuple(shadow_shortfalls))
        if shadow_shortfalls and row.decision == "allow":
            row.decision = "would_deny"
            row.reason_code = "budget_exhausted"
            row.reason = shadow_shortfalls[0].describe()
            row.budget = shadow_shortfalls[0].claim.scope
        if instance_ids:
            placeholders = ",".join("?" * len(instance_ids))
            cur.execute(
                "UPDATE budget_instances SET reserved_usd = reserved_usd + ?, reserved_tokens = reserved_tokens + ?, "
                f"reserved_requests = reserved_requests + ?, updated_at = ? WHERE id IN ({placeholders})",
                (estimate.usd, estimate.tokens, estimate.requests, row.ts, *instance_ids),
            )
        hold_id = cur.execute(
            "INSERT INTO holds (request_id, process_id, state, created_at, expires_at, instance_ids, "
            "est_usd, est_tokens, est_requests) VALUES (?, ?, 'active', ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                row.request_id,
                self.process_id,
                row.ts,
                expires_at,
                ",".join(map(str, instance_ids)),
                estimate.usd,
                estimate.tokens,
                estimate.requests,
            ),
        ).fetchone()[0]
        self._record(row, hold_id)
        return ReserveOutcome(row.decision, hold_id, (), tuple(shadow_shortfalls), tripped)

    def _check_guards(self, row: DecisionRow, guards: Guards) -> Tripped | None:
        """Loop, step-count and fan-out limits, counted over this run's (or workflow's) decisions."""
        if guards.max_repeats is not None and row.fingerprint:
            (repeats,) = self.conn.execute(
                "SELECT COUNT(*) FROM decisions WHERE scope = ? AND fingerprint = ?",
                (row.scope, row.fingerprint),
            ).fetchone()
            if repeats >= guards.max_repeats:
                return Tripped(
                    "loop",
                    f"loop: this identical {row.action} request was already made {repeats} times in "
                    f"{row.scope} (anomalies.loop.repeats: {guards.max_repeats})",
                )
        if guards.max_steps is not None:
            (steps,) = self.conn.execute(
                "SELECT COUNT(*) FROM decisions WHERE scope = ?", (row.scope,)
            ).fetchone()
            if steps >= guards.max_steps:
                return Tripped(
                    "step_count",
                    f"step_count: {row.scope} already took {steps} steps (anomalies.step_count.max: {guards.max_steps})",
                )
        if guards.max_runs_per_workflow is not None and row.workflow is not None:
            # Only runs that got a request through count: a run refused at its first request
            # stays refused (its denied row must not make it "known" the next time).
            known = self.conn.execute(
                "SELECT 1 FROM decisions WHERE workflow = ? AND scope = ? AND decision <> 'deny' LIMIT 1",
                (row.workflow, row.scope),
            ).fetchone()
            if known is None:
                (runs,) = self.conn.execute(
                    "SELECT COUNT(DISTINCT scope) FROM decisions WHERE workflow = ? AND COALESCE(tenant, '') = ? "
                    "AND decision <> 'deny'",
                    (row.workflow, row.tenant or ""),
                ).fetchone()
                if runs >= guards.max_runs_per_workflow:
                    return Tripped(
                        "fan_out",
                        f"fan_out: workflow {row.workflow} already has {runs} runs "
                        f"(anomalies.fan_out.max_runs_per_workflow: {guards.max_runs_per_workflow})",
                    )
        return None

    def _record(self, row: DecisionRow, hold_id: int | None = None) -> None:
        self.conn.execute(_INSERT_DECISION, decision_values(row, hold_id))

    def _hold(self, hold_id: int) -> tuple[Any, ...] | None:
        return self.conn.execute(
            "SELECT state, est_usd, est_tokens, est_requests, instance_ids, actual_usd FROM holds WHERE id = ?",
            (hold_id,),
        ).fetchone()

    def _commit(self, request_id: str, hold_id: int, completion: Completion, now: float) -> Settled:
        hold = self._hold(hold_id)
        if hold is None:
            raise LedgerError(f"no hold {hold_id}")
        state, est_usd, est_tokens, est_requests, ids_text, already_charged = hold
        ids = [int(i) for i in ids_text.split(",")] if ids_text else []
        actual = completion.actual
        overage = False
        if state == "active":
            self._apply(ids, -est_usd, -est_tokens, -est_requests, actual, now)
            self.conn.execute(
                "UPDATE holds SET state = 'committed', settled_at = ?, actual_usd = ?, actual_tokens = ?, "
                "actual_requests = ?, usage_source = ? WHERE id = ?",
                (now, actual.usd, actual.tokens, actual.requests, completion.usage_source, hold_id),
            )
            overage = self._note_overage(ids, request_id, hold_id, now)
            self._complete(request_id, completion, now)
            self._facts(request_id, completion, now)
            return Settled(True, "committed", overage)
        if state == "expired" and already_charged is None:
            # The sweeper released this hold (its proxy looked dead or it outlived its TTL), but the
            # call did complete: the money was spent, so charge it without touching reservations.
            self._apply(ids, 0, 0, 0, actual, now)
            self.conn.execute(
                "UPDATE holds SET actual_usd = ?, actual_tokens = ?, actual_requests = ?, usage_source = ? WHERE id = ?",
                (actual.usd, actual.tokens, actual.requests, completion.usage_source, hold_id),
            )
            self._event(
                "late_commit",
                request_id,
                hold_id,
                None,
                f"hold had expired; charged {actual.usd} nano-USD",
                now,
            )
            overage = self._note_overage(ids, request_id, hold_id, now)
            self._complete(request_id, completion, now)
            return Settled(True, "expired", overage)
        return Settled(False, state)

    def _release(
        self, request_id: str, hold_id: int, completion: Completion, reason: str, now: float
    ) -> Settled:
        hold = self._hold(hold_id)
        if hold is None:
            raise LedgerError(f"no hold {hold_id}")
        state, est_usd, est_tokens, est_requests, ids_text, _ = hold
        if state != "active":
            return Settled(False, state)
        ids = [int(i) for i in ids_text.split(",")] if ids_text else []
        self._apply(ids, -est_usd, -est_tokens, -est_requests, Amount(), now)
        self.conn.execute(
            "UPDATE holds SET state = 'released', settled_at = ?, settle_reason = ?, actual_usd = 0, "
            "actual_tokens = 0, actual_requests = 0 WHERE id = ?",
            (now, reason, hold_id),
        )
        self._complete(request_id, completion, now, note=completion.note or reason)
        return Settled(True, "released")

    def _apply(
        self, ids: list[int], d_usd: int, d_tokens: int, d_requests: int, actual: Amount, now: float
    ) -> None:
        if not ids:
            return
        placeholders = ",".join("?" * len(ids))
        self.conn.execute(
            "UPDATE budget_instances SET reserved_usd = reserved_usd + ?, reserved_tokens = reserved_tokens + ?, "
            "reserved_requests = reserved_requests + ?, spent_usd = spent_usd + ?, spent_tokens = spent_tokens + ?, "
            f"spent_requests = spent_requests + ?, updated_at = ? WHERE id IN ({placeholders})",
            (d_usd, d_tokens, d_requests, actual.usd, actual.tokens, actual.requests, now, *ids),
        )

    def _note_overage(self, ids: list[int], request_id: str, hold_id: int, now: float) -> bool:
        if not ids:
            return False
        placeholders = ",".join("?" * len(ids))
        over = self.conn.execute(
            f"SELECT id, scope, budget FROM budget_instances WHERE id IN ({placeholders}) AND ("
            "spent_usd > limit_usd OR spent_tokens > limit_tokens OR spent_requests > limit_requests)",
            ids,
        ).fetchall()
        for instance_id, scope, budget in over:
            self._event(
                "overage",
                request_id,
                hold_id,
                instance_id,
                f"{budget}: {scope} is over its limit",
                now,
            )
        return bool(over)

    def _complete(
        self, request_id: str, completion: Completion, now: float, note: str | None = None
    ) -> None:
        self.conn.execute(
            "UPDATE decisions SET status = ?, actual_usd = ?, tokens_in = ?, tokens_out = ?, usage_source = ?, "
            "priced = ?, model = COALESCE(?, model), latency_ms = ?, upstream_ms = ?, completed_at = ?, "
            "note = ? WHERE request_id = ?",
            (
                completion.status,
                completion.actual.usd,
                completion.tokens_in,
                completion.tokens_out,
                completion.usage_source,
                None if completion.priced is None else int(completion.priced),
                completion.model,
                completion.latency_ms,
                completion.upstream_ms,
                now,
                note or completion.note,
                request_id,
            ),
        )

    def _facts(self, request_id: str, completion: Completion, now: float) -> None:
        if completion.facts:
            self.conn.executemany(
                "INSERT INTO facts (scope, action, field, value, request_id, ts) VALUES (?, ?, ?, ?, ?, ?)",
                [(f.scope, f.action, f.field, f.value, request_id, now) for f in completion.facts],
            )

    def _idle_run(self, key: str, idle_seconds: float, candidate: str, now: float) -> str:
        """The agent's current idle-split run: `candidate` becomes it after `idle_seconds` of silence."""
        (run,) = self.conn.execute(
            IDLE_RUN_SQL.replace("%s", "?"), (key, candidate, now, now, idle_seconds)
        ).fetchone()
        return run

    def _history(self, queries: Sequence[HistoryQuery]) -> list[bool]:
        answers = []
        for query in queries:
            likes = " OR ".join("action LIKE ? ESCAPE '\\'" for _ in query.actions)
            found = self.conn.execute(
                f"SELECT 1 FROM facts WHERE scope = ? AND field = ? AND value = ? AND ({likes}) LIMIT 1",
                (
                    query.scope,
                    query.field,
                    query.value or "",
                    *(glob_to_like(a) for a in query.actions),
                ),
            ).fetchone()
            answers.append(found is not None)
        return answers

    def _event(
        self,
        kind: str,
        request_id: str | None,
        hold_id: int | None,
        instance_id: int | None,
        detail: str,
        now: float,
    ) -> None:
        self.conn.execute(
            "INSERT INTO events (ts, kind, request_id, hold_id, instance_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (now, kind, request_id, hold_id, instance_id, detail),
        )

    def _extend(self, hold_ids: Sequence[int], expires_at: float) -> None:
        if hold_ids:
            placeholders = ",".join("?" * len(hold_ids))
            self.conn.execute(
                f"UPDATE holds SET expires_at = MAX(expires_at, ?) WHERE state = 'active' AND id IN ({placeholders})",
                (expires_at, *hold_ids),
            )

    def _heartbeat(self, now: float) -> None:
        self.conn.execute(
            "UPDATE processes SET heartbeat_at = ? WHERE id = ?", (now, self.process_id)
        )

    def _stopped(self, now: float) -> None:
        self.conn.execute(
            "UPDATE processes SET stopped_at = ?, heartbeat_at = ? WHERE id = ?",
            (now, now, self.process_id),
        )

    def _expire(
        self, where: str, params: Sequence[Any], now: float, reason: str, state: str = "expired"
    ) -> int:
        holds = self.conn.execute(
            f"SELECT id, request_id, est_usd, est_tokens, est_requests, instance_ids FROM holds WHERE state = 'active' AND ({where})",
            params,
        ).fetchall()
        for hold_id, request_id, est_usd, est_tokens, est_requests, ids_text in holds:
            ids = [int(i) for i in ids_text.split(",")] if ids_text else []
            self._apply(ids, -est_usd, -est_tokens, -est_requests, Amount(), now)
            self.conn.execute(
                "UPDATE holds SET state = ?, settled_at = ?, settle_reason = ? WHERE id = ? AND state = 'active'",
                (state, now, reason, hold_id),
            )
            self.conn.execute(
                "UPDATE decisions SET completed_at = ?, note = ? WHERE request_id = ? AND completed_at IS NULL",
                (now, reason, request_id),
            )
        return len(holds)

    def _sweep(self, now: float, lease_seconds: float) -> int:
        expired = self._expire("expires_at < ?", (now,), now, "ttl expired")
        expired += self._expire(
            "process_id IN (SELECT id FROM processes WHERE id != ? AND heartbeat_at < ?)",
            (self.process_id, now - lease_seconds),
            now,
            "proxy lease lapsed",
        )
        return expired

    def _release_mine(self, now: float, reason: str) -> int:
        return self._expire("process_id = ?", (self.process_id,), now, reason, state="released")


def glob_to_like(pattern: str) -> str:
    """An action-kind glob as a SQL LIKE pattern (portable to PostgreSQL, unlike GLOB)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def open_sqlite(url: str, **kwargs: Any) -> SQLiteLedger:
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    return SQLiteLedger(path, **kwargs)
