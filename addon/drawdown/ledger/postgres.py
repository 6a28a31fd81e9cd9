"""The PostgreSQL ledger: one database shared by a fleet of proxies on any number of hosts.

Same operations and outcomes as the SQLite ledger (sqlite.py); only the way a
transaction gets exclusive use of the rows it decides on differs.

Isolation and locking. Every transaction runs at READ COMMITTED and takes row locks
(`SELECT … FOR UPDATE`) on every row whose value it decides on, before it decides:

0. the keys its commits charge under at most once (Completion.once: a batch's results) and
   the keys of the batch holds they change (Completion.batch), transaction advisory locks in
   hash order, then the charges already made under them and the holds kept under them;
1. the holds it settles (commit/release), `ORDER BY id`;
2. the anomaly-guard keys of its reserves (transaction advisory locks, see pg_guards.py);
3. the budget instances it needs, after creating missing ones with
   `INSERT … WHERE NOT EXISTS … ON CONFLICT DO NOTHING` in key order;
4. those instances, `ORDER BY id FOR UPDATE`.

Once a row is locked no other transaction can change it until we commit, and READ
COMMITTED's FOR UPDATE returns the row's latest committed version (not a stale
snapshot), so the check "spent + reserved + estimate ≤ limit on every instance" and the
writes that follow act on the same values: no lost update, no overspend — the argument
is the same as SQLite's single write lock, narrowed to the rows involved. SERIALIZABLE
would add nothing but aborts. Holds are then written with `AND state = <the state we
read>` guards and the batch is rolled back if any guard misses.

No deadlocks: every transaction waits for locks in that one global order and never
waits for a lock that ranks below one it holds, so no cycle of waits can form. The
sweeper takes hold locks with SKIP LOCKED (it never waits for a hold: a locked hold is
being settled right now, and a later sweep sees it if it is still active), then instance
locks in id order; a decision row is only updated by the transaction holding its hold's
lock. Should PostgreSQL still report a deadlock (40P01), the transaction is retried.

A hold ends exactly once: it leaves `active` only under its row lock, and the new state
is written with `WHERE state = 'active'`; proxies sweeping at once skip each other's
locked holds and re-check the state of the rest.

Throughput. AsyncLedger hands `run_batch` every operation queued while the previous
batch ran; the hot ones (reserve, record, commit, release, history) share ONE
transaction: the locks for the whole batch are taken up front (in the order above), the
decisions are computed in Python on the locked values, and the writes go out as one
statement per kind in one pipeline (psycopg pipeline mode) — three round trips and one
WAL flush per batch instead of per operation. If a statement fails (e.g. a duplicate
request id) the batch is re-run one operation per transaction, so a bad operation fails
alone. Maintenance (heartbeat, extend, sweep, release_mine) runs in transactions of its
own. Connections come from a psycopg_pool ConnectionPool (writers + 2).

Retries. Serialization failures, deadlocks (40001, 40P01) and lock timeouts are retried
at once with jitter; lost connections are retried with backoff for `retry_seconds`, then
the operation raises LedgerError (the proxy answers per on_ledger_error). A COMMIT whose
acknowledgement was lost may have happened, so after a lost connection the batch is
re-run in replay mode: a reserve or record whose decision row already exists returns
that decision (request ids are unique) instead of holding twice, and a commit or
release finds its hold already settled (applied=False) instead of charging twice.
Nothing committed is lost: every write is in a committed transaction or in none.
Messages never contain the DSN's password (redact_dsn).

CockroachDB / YugabyteDB speak this protocol but run SERIALIZABLE (or emulate READ
COMMITTED) and abort far more often — hence the 40001 retry loop. For them,
`pg_advisory_xact_lock` (migrations, guards) would become lock rows, `hashtextextended`
has no equivalent in CockroachDB, and identity sequences would better be unique_rowid()
or UUID keys (hot ranges); SKIP LOCKED needs a recent version.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg_pool import ConnectionPool, PoolTimeout

from . import pg_guards
from .api import (
    DECISION_INSERT_FIELDS,
    HOLDERS,
    IDLE_RUN_SQL,
    Amount,
    Claim,
    Completion,
    DecisionRow,
    Guards,
    HistoryQuery,
    LeaseWatch,
    LedgerError,
    ReserveOutcome,
    Settled,
)
from .dsn import redact_dsn
from .pg_schema import migrate, refuse_foreign
from .plan import (
    HOLD_COLUMNS,
    INSTANCE_COLUMNS,
    BatchJobs,
    Hold,
    Plan,
    commit_keys,
    decision_rows,
    guarded_reserves,
    in_order,
    restore,
    settled_hold_ids,
    snapshot,
)
from .sqlite import glob_to_like

T = TypeVar("T")
log = logging.getLogger(__name__)
# psycopg_pool logs every checkout at INFO; the proxy logs at INFO. Keep its warnings.
if logging.getLogger("psycopg.pool").level == logging.NOTSET:
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)

# Retry at once: the transaction was rolled back and re-running it is safe.
_CONFLICTS = (errors.SerializationFailure, errors.DeadlockDetected, errors.LockNotAvailable)
_MAX_CONFLICT_RETRIES = 20

_LOCK_HOLDS = f"SELECT {HOLD_COLUMNS} FROM holds WHERE id = ANY(%s) ORDER BY id FOR UPDATE OF holds"
# Rows that must exist before they can be locked; NOT EXISTS spares a sequence value per
# known key, ON CONFLICT absorbs a concurrent creator (we wait for it, then skip), and
# ORDER BY makes every transaction create keys in the same order.
_CREATE_INSTANCES = """
INSERT INTO budget_instances (budget, scope, window_start, per, limit_usd, limit_tokens,
                              limit_requests, created_at, updated_at)
SELECT k.budget, k.scope, k.window_start, k.per, k.limit_usd, k.limit_tokens, k.limit_requests,
       k.ts, k.ts
FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::bigint[],
            %s::bigint[], %s::float8[])
     AS k(budget, scope, window_start, per, limit_usd, limit_tokens, limit_requests, ts)
WHERE NOT EXISTS (SELECT 1 FROM budget_instances b
                  WHERE b.budget = k.budget AND b.scope = k.scope AND b.window_start = k.window_start)
ORDER BY k.budget, k.scope, k.window_start
ON CONFLICT (budget, scope, window_start) DO NOTHING
"""
_LOCK_INSTANCES = f"""
SELECT {INSTANCE_COLUMNS} FROM budget_instances WHERE id IN (
    SELECT unnest(string_to_array(h.instance_ids, ',')::bigint[]) FROM holds h WHERE h.id = ANY(%s)
    UNION
    SELECT b.id FROM budget_instances b
    JOIN unnest(%s::text[], %s::text[], %s::bigint[]) AS k(budget, scope, window_start)
      ON b.budget = k.budget AND b.scope = k.scope AND b.window_start = k.window_start
) ORDER BY id FOR UPDATE OF budget_instances
"""
_LOCK_INSTANCE_IDS = (
    f"SELECT {INSTANCE_COLUMNS} FROM budget_instances WHERE id = ANY(%s) "
    "ORDER BY id FOR UPDATE OF budget_instances"
)


@dataclass(frozen=True)
class _Bulk:
    """One statement writing any number of rows: the rows travel as ONE JSON parameter (an
    array of arrays) that the statement unpacks into typed columns — one execution instead
    of one per row, and json.dumps (C) instead of adapting every value in Python."""

    sql: str  # `{rows}` stands for the unpacked rows, a subquery `v` with `columns`
    columns: tuple[tuple[str, str], ...]  # (name, PostgreSQL type)

    def statement(self) -> str:
        fields = ", ".join(
            f"(e->>{i})::{kind} AS {name}" for i, (name, kind) in enumerate(self.columns)
        )
        return self.sql.format(
            rows=f"(SELECT {fields} FROM json_array_elements(%s::json) AS e) AS v"
        )

    def params(self, rows: Sequence[Sequence[Any]]) -> tuple[str]:
        try:
            return (json.dumps(rows, allow_nan=False),)
        except ValueError:  # JSON has no NaN/Infinity (a latency might be one): store NULL
            clean = [
                [None if isinstance(v, float) and not math.isfinite(v) else v for v in row]
                for row in rows
            ]
            return (json.dumps(clean, allow_nan=False),)


def _columns(kinds: str) -> tuple[tuple[str, str], ...]:
    """'id:bigint name:text …' → ((id, bigint), (name, text), …)."""
    return tuple(tuple(item.split(":")) for item in kinds.split())  # type: ignore[misc]


# Absolute values are safe: every row written here is locked by this transaction.
_WRITE_INSTANCES = _Bulk(
    """UPDATE budget_instances AS b SET
    limit_usd = v.limit_usd, limit_tokens = v.limit_tokens, limit_requests = v.limit_requests,
    spent_usd = v.spent_usd, spent_tokens = v.spent_tokens, spent_requests = v.spent_requests,
    reserved_usd = v.reserved_usd, reserved_tokens = v.reserved_tokens,
    reserved_requests = v.reserved_requests, updated_at = v.updated_at
    FROM {rows} WHERE b.id = v.id""",
    _columns(
        "id:bigint limit_usd:bigint limit_tokens:bigint limit_requests:bigint spent_usd:bigint "
        "spent_tokens:bigint spent_requests:bigint reserved_usd:bigint reserved_tokens:bigint "
        "reserved_requests:bigint updated_at:float8"
    ),
)
# Guarded by the state read under the lock: a miss rolls the batch back (see _check).
_WRITE_HOLDS = _Bulk(
    """UPDATE holds AS h SET
    state = v.state, settled_at = v.settled_at, settle_reason = v.settle_reason,
    actual_usd = v.actual_usd, actual_tokens = v.actual_tokens,
    actual_requests = v.actual_requests, usage_source = v.usage_source
    FROM {rows} WHERE h.id = v.id AND h.state = v.was""",
    _columns(
        "id:bigint was:text state:text settled_at:float8 settle_reason:text actual_usd:bigint "
        "actual_tokens:bigint actual_requests:bigint usage_source:text"
    ),
)
_HOLD_INSERT_COLUMNS = _columns(
    "id:bigint request_id:text process_id:text created_at:float8 expires_at:float8 "
    "instance_ids:text est_usd:bigint est_tokens:bigint est_requests:bigint"
)
_INSERT_HOLDS = _Bulk(
    "INSERT INTO holds (state, {names}) SELECT 'active', v.* FROM {{rows}}".format(
        names=", ".join(name for name, _ in _HOLD_INSERT_COLUMNS)
    ),
    _HOLD_INSERT_COLUMNS,
)
_DECISION_INSERT_COLUMNS = _columns(
    "request_id:text ts:float8 decision:text reason_code:text reason:text mode:text scope:text "
    "tenant:text workflow:text agent:text run:text action:text provider:text model:text "
    "method:text host:text path:text est_usd:bigint est_tokens:bigint fingerprint:text "
    "status:bigint budget:text policy_digest:text port:bigint query:text body_fields:text "
    "body:text mcp:text body_bytes:bigint metering:text stream:bigint hold_id:bigint "
    "completed_at:float8"
)
assert tuple(name for name, _ in _DECISION_INSERT_COLUMNS) == DECISION_INSERT_FIELDS
_INSERT_DECISIONS = _Bulk(
    "INSERT INTO decisions ({names}) SELECT * FROM {{rows}}".format(
        names=", ".join(name for name, _ in _DECISION_INSERT_COLUMNS)
    ),
    _DECISION_INSERT_COLUMNS,
)
_COMPLETE_DECISIONS = _Bulk(
    """UPDATE decisions AS d SET status = v.status, actual_usd = v.actual_usd,
    tokens_in = v.tokens_in, tokens_out = v.tokens_out, usage_source = v.usage_source,
    priced = v.priced, model = COALESCE(v.model, d.model), latency_ms = v.latency_ms, upstream_ms = v.upstream_ms,
    completed_at = v.completed_at, note = v.note
    FROM {rows} WHERE d.request_id = v.request_id""",
    _columns(
        "status:bigint actual_usd:bigint tokens_in:bigint tokens_out:bigint usage_source:text "
        "priced:bigint model:text latency_ms:float8 upstream_ms:float8 completed_at:float8 note:text "
        "request_id:text"
    ),
)
_EXPIRE_DECISIONS = _Bulk(
    """UPDATE decisions AS d SET completed_at = v.completed_at, note = v.note
    FROM {rows} WHERE d.request_id = v.request_id AND d.completed_at IS NULL""",
    _columns("completed_at:float8 note:text request_id:text"),
)
_INSERT_EVENTS = _Bulk(
    "INSERT INTO events (ts, kind, request_id, hold_id, instance_id, detail) SELECT * FROM {rows}",
    _columns("ts:float8 kind:text request_id:text hold_id:bigint instance_id:bigint detail:text"),
)
_INSERT_ONCE_CHARGES = _Bulk(
    "INSERT INTO once_charges (key, request_id, ts) SELECT * FROM {rows}",
    _columns("key:text request_id:text ts:float8"),
)
# A commit charging under a once key first waits for whoever charges under it now (its row may
# not exist yet, so there is no row to lock), then reads whether it was charged already.
_LOCK_ONCE = """
SELECT pg_advisory_xact_lock(s.h) FROM (
    SELECT DISTINCT hashtextextended('drawdown.once:' || current_schema() || ':' || k, 0) AS h
    FROM unnest(%s::text[]) AS k ORDER BY h
) AS s
"""
_CHARGED_ONCE = "SELECT key, request_id FROM once_charges WHERE key = ANY(%s)"
# Batch holds (api.BatchHold), read under the keys' advisory locks (taken with the once keys').
_KEPT_HOLDS = "SELECT key, hold_id FROM batch_holds WHERE key = ANY(%s)"
_KEEP_HOLDS = _Bulk(
    """UPDATE holds AS h SET process_id = v.process_id, expires_at = v.expires_at,
    est_requests = 0 FROM {rows} WHERE h.id = v.id AND h.state = 'active'""",
    _columns("process_id:text expires_at:float8 id:bigint"),
)
_INSERT_BATCH_HOLDS = _Bulk(
    "INSERT INTO batch_holds (key, hold_id, request_id, ts) SELECT * FROM {rows}",
    _columns("key:text hold_id:bigint request_id:text ts:float8"),
)
_INSERT_BATCH_INPUTS = _Bulk(
    "INSERT INTO batch_inputs (key, estimate, request_id, ts) SELECT * FROM {rows} "
    "ON CONFLICT (key) DO UPDATE SET estimate = excluded.estimate, "
    "request_id = excluded.request_id, ts = excluded.ts",
    _columns("key:text estimate:text request_id:text ts:float8"),
)
_MOVE_BATCH_HOLDS = _Bulk(
    "UPDATE batch_holds AS b SET key = v.new_key FROM {rows} WHERE b.key = v.old_key",
    _columns("new_key:text old_key:text"),
)
_INSERT_FACTS = _Bulk(
    "INSERT INTO facts (scope, action, field, value, request_id, ts) SELECT * FROM {rows}",
    _columns("scope:text action:text field:text value:text request_id:text ts:float8"),
)


# --- secrets ------------------------------------------------------------------------------


def _secrets(url: str) -> list[str]:
    """What of `url` a message must not show: the DSN itself, then every password in it
    (`password`, `sslpassword`: any parameter named like one), as given and URL-quoted."""
    from urllib.parse import quote

    found = []
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        params = {}
    for name, value in params.items():
        if "password" in name.lower() and value:
            found += [str(value), quote(str(value), safe="")]
    # Longest first, so that no password is left half shown by a shorter one inside it.
    return [url, *sorted(dict.fromkeys(found), key=len, reverse=True)]


def scrub(text: str, url: str) -> str:
    """`text` (a psycopg message may quote the DSN it was given) with no password of `url` in it."""
    for secret in _secrets(url):
        text = text.replace(secret, redact_dsn(url) if "://" in secret else "***")
    return text


class _StatementFailed(Exception):
    """A statement of a batch failed for a reason retrying will not cure."""


class _CutBatch(Exception):
    """The guards of the batch from `at` on depend on how the budgets decide the part before
    it (Plan.trip): each part is decided in a transaction of its own, in order."""

    def __init__(self, at: int) -> None:
        super().__init__(at)
        self.at = at


# --- the ledger -------------------------------------------------------------------------------


class PostgresLedger:
    """Thread-safe (a connection pool); AsyncLedger runs `writers` threads over it."""

    def __init__(
        self,
        url: str,
        *,
        process_id: str | None = None,
        register: bool = True,
        leases: LeaseWatch | None = None,
        writers: int = 1,
        pool_size: int | None = None,
        connect_timeout: float = 5.0,
        retry_seconds: float = 5.0,
        lock_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.safe_url = redact_dsn(url)
        self._url = url  # only for scrub(): never printed
        self.process_id = (
            process_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self.writers = max(1, writers)
        self.leases = leases or LeaseWatch()  # the other proxies' heartbeats, as seen by sweep
        self.retry_seconds = retry_seconds
        self.connect_timeout = connect_timeout
        self._lock_timeout_ms = int(lock_timeout * 1000)
        self._closed = False
        self._hold_sequence: str | None = None
        try:
            # One plain connection first: a clear error when the server is unreachable or the
            # ledger is too new, before a pool starts reconnecting in the background.
            with psycopg.connect(url, connect_timeout=max(1, round(connect_timeout))) as conn:
                self._configure(conn)
                refuse_foreign(conn, self.safe_url)
                migrate(conn)
                self._hold_sequence = conn.execute(
                    "SELECT pg_get_serial_sequence('holds', 'id')"
                ).fetchone()[0]
                if register:
                    now = time.time()
                    conn.execute(
                        "INSERT INTO processes (id, pid, host, started_at, heartbeat_at) "
                        "VALUES (%s, %s, %s, %s, %s)",
                        (self.process_id, os.getpid(), socket.gethostname(), now, now),
                    )
                conn.commit()
        except psycopg.Error as exc:
            raise LedgerError(f"cannot open ledger {self.safe_url}: {self._clean(exc)}") from None
        size = pool_size or self.writers + 2  # the writers, call_sync at shutdown, one spare
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=size,
            kwargs={"connect_timeout": max(1, round(connect_timeout))},
            configure=self._configure,
            open=False,
            name="drawdown-ledger",
            timeout=retry_seconds,
        )
        self.pool.open(wait=False)

    # --- connections and retries --------------------------------------------------------------

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.autocommit = True
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED  # the design relies on it
        # A proxy stuck mid-transaction must not keep budget rows locked for ever; a lock wait
        # that long means something is wrong: fail (retry, then LedgerError) rather than hang.
        conn.execute(f"SET lock_timeout = {self._lock_timeout_ms}")
        conn.execute("SET idle_in_transaction_session_timeout = 30000")
        # Which proxy a session belongs to, for pg_stat_activity (and for killing it in tests).
        conn.execute(
            "SELECT set_config('application_name', %s, false)",
            (f"drawdown {self.process_id}"[:63],),
        )
        conn.autocommit = False

    def _clean(self, exc: BaseException) -> str:
        text = str(exc).strip() or type(exc).__name__
        text = scrub(text, self._url)
        return text.splitlines()[0] if text else text

    def _transaction(self, fn: Callable[[psycopg.Connection[Any], bool], T]) -> T:
        """Run `fn(conn, replay)` in one transaction and commit it, retrying what retrying cures."""
        if self._closed:
            raise LedgerError(f"ledger {self.safe_url} is closed")
        deadline = time.monotonic() + self.retry_seconds
        conflicts = 0
        replay = False
        backoff = 0.05
        while True:
            try:
                conn = self.pool.getconn(timeout=max(0.05, deadline - time.monotonic()))
            except PoolTimeout as exc:
                raise LedgerError(
                    f"ledger unavailable: no connection to {self.safe_url} within "
                    f"{self.retry_seconds:g} s ({self._clean(exc)})"
                ) from None
            try:
                try:
                    result = fn(conn, replay)
                    conn.commit()
                    return result
                except BaseException:
                    if not conn.closed:
                        try:
                            conn.rollback()
                        except psycopg.Error:
                            pass
                    raise
                finally:
                    self.pool.putconn(conn)
            except _CONFLICTS as exc:
                conflicts += 1
                if conflicts > _MAX_CONFLICT_RETRIES or time.monotonic() > deadline:
                    raise LedgerError(
                        f"ledger busy: gave up after {conflicts} conflicts ({self._clean(exc)})"
                    ) from None
                time.sleep(random.uniform(0, 0.002 * conflicts))  # jitter: do not collide again
            except psycopg.OperationalError as exc:
                # Connection lost or server restarting. If COMMIT was in flight it may have
                # happened: the re-run is a replay (see the module docstring).
                replay = True
                if time.monotonic() + backoff > deadline:
                    raise LedgerError(
                        f"ledger unavailable: {self.safe_url}: {self._clean(exc)}"
                    ) from None
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            except psycopg.Error as exc:
                raise _StatementFailed(self._clean(exc)) from exc

    # --- batches --------------------------------------------------------------------------------

    def run_batch(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Run several operations; results (or exceptions) in order. The hot ones share one
        transaction; maintenance runs in its own (it is rare and scans holds)."""

        def together(batch: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
            results: list[Any] = []
            while batch:
                try:
                    return results + self._hot(batch)
                except _CutBatch as cut:  # rolled back before anything was written
                    results += together(batch[: cut.at])
                    batch = batch[cut.at :]
                except _StatementFailed:
                    # Find the culprit: one transaction per operation, each failing alone.
                    return results + [self._one(call) for call in batch]
                except LedgerError as exc:
                    return results + [exc] * len(batch)
            return results

        return in_order(calls, together, self._one)

    def _one(self, call: tuple[str, tuple[Any, ...]]) -> Any:
        try:
            return getattr(self, call[0])(*call[1])
        except Exception as exc:  # returned, not raised: one op's failure is its own
            return exc

    def _hot(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        saved = snapshot(calls)

        def attempt(conn: psycopg.Connection[Any], replay: bool) -> list[Any]:
            restore(saved)  # a retried attempt starts from the rows as the caller made them
            return self._hot_attempt(conn, calls, replay)

        try:
            return self._transaction(attempt)
        except BaseException:
            restore(saved)
            raise

    def _hot_attempt(
        self,
        conn: psycopg.Connection[Any],
        calls: Sequence[tuple[str, tuple[Any, ...]]],
        replay: bool,
    ) -> list[Any]:
        tx = Plan(self.process_id)
        hold_ids = settled_hold_ids(calls)
        rows = decision_rows(calls)
        guarded = guarded_reserves(calls)
        with conn.pipeline() as pipeline:
            # Locks in the global order: once keys, holds, guard keys, instance keys, instances.
            cur_holds = cur_instances = cur_ids = cur_replay = cur_once = None
            once, batch_keys = commit_keys(calls)
            locked = sorted({*once, *batch_keys}) if batch_keys else once
            if locked:
                conn.cursor().execute(_LOCK_ONCE, (locked,))
            if once:
                cur_once = conn.cursor()
                cur_once.execute(_CHARGED_ONCE, (once,))
            if batch_keys:  # the holds kept for these batches: locked with the settled ones
                cur_kept = conn.cursor()
                cur_kept.execute(_KEPT_HOLDS, (batch_keys,))
                pipeline.sync()
                tx.jobs = BatchJobs(kept=dict(cur_kept.fetchall()))
                hold_ids = sorted({*hold_ids, *tx.jobs.kept.values()})
            if hold_ids:
                cur_holds = conn.cursor()
                cur_holds.execute(_LOCK_HOLDS, (hold_ids,))
            if replay and rows:
                cur_replay = conn.cursor()
                cur_replay.execute(
                    "SELECT d.request_id, d.decision, d.hold_id, h.process_id FROM decisions d "
                    "LEFT JOIN holds h ON h.id = d.hold_id WHERE d.request_id = ANY(%s)",
                    ([r.request_id for r in rows],),
                )
            if guarded:
                # A reserve a guard denies must not create budget instances (as in SQLite), so
                # the guards are decided first, at the cost of one more round trip.
                reader = pg_guards.Reader(conn, guarded, rows, calls)
                pipeline.sync()
                self._read_replay(tx, cur_replay)
                cur_replay = None
                cut = tx.trip(calls, reader.counts())
                if cut is not None:
                    raise _CutBatch(cut)
            keys = tx.claimed_keys(calls)
            ordered = sorted(keys)
            key_columns = (
                [k[0] for k in ordered],
                [k[1] for k in ordered],
                [k[2] for k in ordered],
            )
            if ordered:
                claims = [keys[k] for k in ordered]
                conn.cursor().execute(
                    _CREATE_INSTANCES,
                    (
                        *key_columns,
                        [c.per for c, _ in claims],
                        [c.limit_usd for c, _ in claims],
                        [c.limit_tokens for c, _ in claims],
                        [c.limit_requests for c, _ in claims],
                        [ts for _, ts in claims],
                    ),
                )
            if hold_ids or ordered:
                cur_instances = conn.cursor()
                cur_instances.execute(_LOCK_INSTANCES, (hold_ids, *key_columns))
            reserves = tx.reserves(calls)
            if reserves:
                cur_ids = conn.cursor()
                cur_ids.execute(
                    "SELECT nextval(%s::regclass) FROM generate_series(1, %s)",
                    (self._hold_sequence, reserves),
                )
            queries = [q for name, args in calls if name == "history" for q in args[0]]
            history_cursors = [self._history_query(conn, q) for q in queries]
            pipeline.sync()
            if cur_once is not None:
                tx.charged_once = dict(cur_once.fetchall())
            if cur_holds is not None:
                tx.add_holds(cur_holds.fetchall())
            if cur_instances is not None:
                tx.add_instances(cur_instances.fetchall())
            if cur_ids is not None:
                tx.hold_ids = [r[0] for r in cur_ids.fetchall()]
                tx.hold_ids.reverse()  # pop() hands them out in ascending order
            self._read_replay(tx, cur_replay)
            answers = [cur.fetchone() is not None for cur in history_cursors]

            results = tx.decide(calls, answers)
            checks = self._flush(conn, tx)
        self._check(checks)  # the pipeline has synced: row counts are in
        return results

    @staticmethod
    def _read_replay(tx: Plan, cursor: Any) -> None:
        if cursor is not None:
            tx.replayed = {r[0]: (r[1], r[2], r[3]) for r in cursor.fetchall()}

    def _history_query(self, conn: psycopg.Connection[Any], query: HistoryQuery) -> Any:
        likes = " OR ".join("action LIKE %s ESCAPE '\\'" for _ in query.actions)
        cur = conn.cursor()
        cur.execute(
            f"SELECT 1 FROM facts WHERE scope = %s AND field = %s AND value = %s AND ({likes}) LIMIT 1",
            (
                query.scope,
                query.field,
                query.value or "",
                *(glob_to_like(a) for a in query.actions),
            ),
        )
        return cur

    def _flush(self, conn: psycopg.Connection[Any], tx: Plan) -> list[tuple[Any, int, str]]:
        """Queue every write of the transaction, one statement per kind (we are inside a
        pipeline). Returns the guarded statements with the row counts they must report."""
        guards: list[tuple[Any, int, str]] = []

        def write(bulk: _Bulk, rows: Sequence[Sequence[Any]], guard: str | None = None) -> None:
            if rows:
                cur = conn.cursor()
                cur.execute(bulk.statement(), bulk.params(rows))
                if guard:
                    guards.append((cur, len(rows), guard))

        write(_INSERT_HOLDS, tx.new_holds)
        write(
            _WRITE_HOLDS,
            tx.dirty_holds(),
            "holds changed under their lock",
        )
        write(
            _WRITE_INSTANCES,
            tx.dirty_instances(),
            "budget instances vanished",
        )
        write(_INSERT_DECISIONS, tx.new_decisions)
        write(_COMPLETE_DECISIONS, tx.completions)
        write(_EXPIRE_DECISIONS, tx.expiries)
        write(_INSERT_EVENTS, tx.events)
        write(_INSERT_FACTS, tx.facts)
        write(_INSERT_ONCE_CHARGES, tx.once_charges)
        jobs = tx.jobs
        if jobs is not None:
            write(_KEEP_HOLDS, jobs.kept_holds, "kept holds vanished")
            write(_INSERT_BATCH_HOLDS, jobs.new)
            write(_MOVE_BATCH_HOLDS, jobs.moved)
            write(_INSERT_BATCH_INPUTS, jobs.inputs)
        return guards

    @staticmethod
    def _check(guards: list[tuple[Any, int, str]]) -> None:
        for cur, expected, what in guards:
            if cur.rowcount != expected:  # cannot happen under our locks; never commit if it does
                raise LedgerError(f"ledger invariant violated: {what} ({cur.rowcount}/{expected})")

    # --- public operations (each its own transaction unless batched) ---------------------------

    def reserve(
        self,
        row: DecisionRow,
        claims: Sequence[Claim],
        estimate: Amount,
        expires_at: float,
        guards: Guards | None = None,
    ) -> ReserveOutcome:
        return self._single("reserve", (row, claims, estimate, expires_at, guards))

    def record(self, row: DecisionRow) -> None:
        self._single("record", (row,))

    def commit(self, request_id: str, hold_id: int, completion: Completion, now: float) -> Settled:
        return self._single("commit", (request_id, hold_id, completion, now))

    def release(
        self, request_id: str, hold_id: int, completion: Completion, reason: str, now: float
    ) -> Settled:
        return self._single("release", (request_id, hold_id, completion, reason, now))

    def history(self, queries: Sequence[HistoryQuery]) -> list[bool]:
        return self._single("history", (queries,))

    def _single(self, name: str, args: tuple[Any, ...]) -> Any:
        try:
            (result,) = self._hot([(name, args)])
        except _StatementFailed as exc:
            raise LedgerError(f"ledger refused {name}: {exc}") from None
        if isinstance(result, BaseException):
            raise result
        return result

    def extend(self, hold_ids: Sequence[int], expires_at: float) -> None:
        if not hold_ids:
            return

        def body(conn: psycopg.Connection[Any], replay: bool) -> None:
            # Hold locks in id order, like every other transaction (see the docstring).
            conn.execute(
                "UPDATE holds SET expires_at = GREATEST(expires_at, %s) WHERE id IN ("
                "SELECT id FROM holds WHERE id = ANY(%s) AND state = 'active' "
                "ORDER BY id FOR UPDATE)",
                (expires_at, sorted(hold_ids)),
            )

        self._maintenance("extend", body)

    def batch_input(self, key: str) -> str | None:
        found = self._maintenance(
            "batch_input",
            lambda conn, replay: conn.execute(
                "SELECT estimate FROM batch_inputs WHERE key = %s", (key,)
            ).fetchone(),
        )
        return None if found is None else found[0]

    def idle_run(self, key: str, idle_seconds: float, candidate: str, now: float) -> str:
        """The agent's current idle-split run, shared by every proxy on this ledger."""
        return self._maintenance(
            "idle_run",
            lambda conn, replay: conn.execute(
                IDLE_RUN_SQL, (key, candidate, now, now, idle_seconds)
            ).fetchone()[0],
        )

    def remember(self, key: str, value: str) -> None:
        self._maintenance(
            "remember",
            lambda conn, replay: conn.execute(
                "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                (key, value),
            ),
        )

    def heartbeat(self, now: float) -> None:
        self._maintenance(
            "heartbeat",
            lambda conn, replay: conn.execute(
                "UPDATE processes SET heartbeat_at = %s WHERE id = %s", (now, self.process_id)
            ),
        )

    def sweep(self, now: float, lease_seconds: float) -> int:
        # SKIP LOCKED: a hold locked right now is being settled (or swept by another proxy);
        # waiting for it would only serialise the sweepers. A later sweep sees it if still active.
        def sweep(conn: psycopg.Connection[Any], replay: bool) -> int:
            holders = conn.execute(HOLDERS.format(mark="%s"), (self.process_id,)).fetchall()
            dead = self.leases.lapsed(holders, lease_seconds)
            lapsed = f" OR process_id IN ({', '.join(['%s'] * len(dead))})" if dead else ""
            return self._expire(
                conn,
                "expires_at < %s" + lapsed,
                (now, *dead),
                now,
                lambda hold: (
                    "ttl expired"
                    if hold.expires_at is not None and hold.expires_at < now
                    else "proxy lease lapsed"
                ),
                skip_locked=True,
            )

        return self._maintenance("sweep", sweep)

    def release_mine(self, now: float, reason: str) -> int:
        return self._maintenance(
            "release_mine",
            lambda conn, replay: self._expire(
                conn, "process_id = %s", (self.process_id,), now, lambda hold: reason, "released"
            ),
        )

    def close(self) -> None:
        if self._closed:
            return
        try:
            now = time.time()
            self._maintenance(
                "close",
                lambda conn, replay: conn.execute(
                    "UPDATE processes SET stopped_at = %s, heartbeat_at = %s WHERE id = %s",
                    (now, now, self.process_id),
                ),
            )
        except LedgerError:
            pass
        self._closed = True
        self.pool.close()

    def _maintenance(self, name: str, body: Callable[[psycopg.Connection[Any], bool], T]) -> T:
        try:
            return self._transaction(body)
        except _StatementFailed as exc:
            raise LedgerError(f"ledger refused {name}: {exc}") from None

    # --- maintenance on a transaction's locked rows -------------------------------------------

    def _expire(
        self,
        conn: psycopg.Connection[Any],
        where: str,
        params: Sequence[Any],
        now: float,
        reason: Callable[[Hold], str],
        state: str = "expired",
        *,
        skip_locked: bool = False,
    ) -> int:
        """End every active hold matching `where`: hold locks, then instance locks, then writes."""
        tx = Plan(self.process_id)
        found = conn.execute(
            f"SELECT {HOLD_COLUMNS} FROM holds WHERE state = 'active' AND ({where}) "
            f"ORDER BY id FOR UPDATE OF holds{' SKIP LOCKED' if skip_locked else ''}",
            params,
        ).fetchall()
        if not found:
            return 0
        holds = [Hold.from_row(r) for r in found]
        ids = sorted({i for h in holds for i in h.instance_ids})
        if ids:
            tx.add_instances(conn.execute(_LOCK_INSTANCE_IDS, (ids,)).fetchall())
        for hold in holds:
            tx.expire(hold, state, reason(hold), now)
        with conn.pipeline():
            checks = self._flush(conn, tx)
        self._check(checks)
        return len(holds)
