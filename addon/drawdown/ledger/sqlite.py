"""The SQLite ledger: one file (WAL) shared safely by several proxy processes on one machine.

Every write runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's single
write lock up front: a reserve reads every matching budget instance, checks them
all, then holds on all of them, and no other process can interleave between the
check and the apply. That is the whole atomicity argument, across threads and
processes alike.

Throughput. The writer thread hands `run_batch` every operation queued meanwhile;
they share one transaction, and the hot ones are decided together by the planner
(plan.py, shared with the PostgreSQL backend): each budget instance and hold the
batch touches is read once, every operation is decided in order on those values,
and each kind of row is written with one executemany — so a batch costs a few
statements per budget instance rather than a dozen per operation. And a batch need not read
at all what this connection wrote last: while PRAGMA data_version says no other connection has
committed since, the last batch's budget instances and this process's active holds are still
exactly what the file holds (KnownRows), so the next batch decides on them as they are. Any
other connection's commit, or a maintenance write of this one (sweep, extend), and they are
read again; a failed transaction forgets them.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import sqlite_utils

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
    NotALedger,
    ReserveOutcome,
    Settled,
    agents_own,
    failed_attempt,
    foreign_tables,
    window_refusals_counted,
)
from .dsn import sqlite_path
from .plan import (
    COMPLETION_FIELDS,
    HOLD_COLUMNS,
    HOT,
    INSTANCE_COLUMNS,
    NEW_HOLD_FIELDS,
    BatchJobs,
    Counts,
    GuardKeys,
    Hold,
    Instance,
    Plan,
    commit_keys,
    decision_rows,
    guarded_reserves,
    in_order,
    restore,
    settled_hold_ids,
    snapshot,
    step_cap,
)
from .schema import migrate

_INSERT_DECISION = "INSERT INTO decisions ({}) VALUES ({})".format(
    ", ".join(DECISION_INSERT_FIELDS), ", ".join("?" * len(DECISION_INSERT_FIELDS))
)

_SELECT_INSTANCE = (
    f"SELECT {INSTANCE_COLUMNS} FROM budget_instances "
    "WHERE budget = ? AND scope = ? AND window_start = ?"
)
_CREATE_INSTANCE = (
    "INSERT INTO budget_instances (budget, scope, window_start, per, limit_usd, limit_tokens, "
    f"limit_requests, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {INSTANCE_COLUMNS}"
)
_INSERT_HOLD = "INSERT INTO holds (state, {}) VALUES ('active', {})".format(
    ", ".join(NEW_HOLD_FIELDS), ", ".join("?" * len(NEW_HOLD_FIELDS))
)
# Numbered parameters follow Hold.values() and Instance.values(): id first, then the values.
_WRITE_HOLD = (
    "UPDATE holds SET state = ?3, settled_at = ?4, settle_reason = ?5, actual_usd = ?6, "
    "actual_tokens = ?7, actual_requests = ?8, usage_source = ?9 WHERE id = ?1 AND state = ?2"
)
_WRITE_INSTANCE = (
    "UPDATE budget_instances SET limit_usd = ?2, limit_tokens = ?3, limit_requests = ?4, "
    "spent_usd = ?5, spent_tokens = ?6, spent_requests = ?7, reserved_usd = ?8, "
    "reserved_tokens = ?9, reserved_requests = ?10, updated_at = ?11 WHERE id = ?1"
)
_COMPLETE_DECISION = (
    "UPDATE decisions SET status = ?, actual_usd = ?, tokens_in = ?, tokens_out = ?, "
    "usage_source = ?, priced = ?, model = COALESCE(?, model), latency_ms = ?, upstream_ms = ?, "
    "completed_at = ?, note = ? WHERE request_id = ?"
)
assert _COMPLETE_DECISION.count("?") == len(COMPLETION_FIELDS)
_EXPIRE_DECISION = (
    "UPDATE decisions SET completed_at = ?, note = ? WHERE request_id = ? AND completed_at IS NULL"
)
_INSERT_EVENT = (
    "INSERT INTO events (ts, kind, request_id, hold_id, instance_id, detail) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_FACT = (
    "INSERT INTO facts (scope, action, field, value, request_id, ts) VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_ONCE_CHARGE = "INSERT INTO once_charges (key, request_id, ts) VALUES (?, ?, ?)"
_KEEP_HOLD = (
    "UPDATE holds SET process_id = ?, expires_at = ?, est_requests = 0 "
    "WHERE id = ? AND state = 'active'"
)
_INSERT_BATCH_HOLD = "INSERT INTO batch_holds (key, hold_id, request_id, ts) VALUES (?, ?, ?, ?)"
_MOVE_BATCH_HOLD = "UPDATE batch_holds SET key = ? WHERE key = ?"
_INSERT_BATCH_INPUT = (
    "INSERT INTO batch_inputs (key, estimate, request_id, ts) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET estimate = excluded.estimate, "
    "request_id = excluded.request_id, ts = excluded.ts"
)

STEP = agents_own()  # the decision rows the step and loop guards count
# ...less the failed attempts they forgive (read from the partial index idx_decisions_failed)
FAILED = (
    f"SELECT fingerprint, COUNT(*) FROM decisions WHERE scope = ? AND {failed_attempt()} "
    "GROUP BY fingerprint"
)
# Counted up to a cap (GuardKeys): the index finds the run's rows, the LIMIT stops the count;
# a budget window's refusals among them, which the loop guard forgives, in the same walk.
REPEATS = (
    f"SELECT COUNT(*), {window_refusals_counted()} FROM ("
    "SELECT decision, reason_code, status FROM decisions "
    f"WHERE scope = ? AND fingerprint = ? AND {STEP} LIMIT ?)"
)
STEPS = f"SELECT COUNT(*) FROM (SELECT 1 FROM decisions WHERE scope = ? AND {STEP} LIMIT ?)"
# fan_out reads the partial index of the rows that got through (schema v4), never a run's
# refusals; named, so that SQLite cannot take the full (workflow, scope) index instead. It
# walks the workflow's runs one seek each (the next scope, then its tenant), up to the cap:
# a DISTINCT read every row of them, 17 ms for five runs of 20,000 rows each new run.
RUNS = """
WITH RECURSIVE walk(scope, n) AS (
    SELECT (SELECT scope FROM decisions INDEXED BY idx_decisions_runs
            WHERE workflow = ?1 AND decision <> 'deny' ORDER BY scope LIMIT 1), 0
    UNION ALL
    SELECT (SELECT d.scope FROM decisions d INDEXED BY idx_decisions_runs
            WHERE d.workflow = ?1 AND d.decision <> 'deny' AND d.scope > walk.scope
            ORDER BY d.scope LIMIT 1),
           walk.n + (SELECT COALESCE(d.tenant, '') = ?2 FROM decisions d
                     INDEXED BY idx_decisions_runs
                     WHERE d.workflow = ?1 AND d.scope = walk.scope AND d.decision <> 'deny'
                     LIMIT 1)
    FROM walk WHERE walk.scope IS NOT NULL AND walk.n < ?3
)
SELECT MAX(n) FROM walk
"""
# Is this run already one of the workflow's? The first row that says so is enough.
KNOWN = (
    "SELECT COALESCE(tenant, '') FROM decisions INDEXED BY idx_decisions_runs "
    "WHERE workflow = ? AND scope = ? AND decision <> 'deny' LIMIT 1"
)

T = TypeVar("T")

log = logging.getLogger(__name__)

# Rows the writer changes between two wakes of the checkpoint thread (start_checkpoints): about
# 2 MB of WAL. At the ledger's full rate (~10,000 reserve+commit lifecycles/s, ~9 pages each)
# a checkpoint a second would leave the WAL to reach wal_autocheckpoint several times a second,
# and the writer to copy it into the database itself, between two batches.
CHECKPOINT_CHANGES = 2_000

# Operations that never touch holds or budget instances: the rows this connection knows stay known.
_KEEPS_ROWS = frozenset({"idle_run", "heartbeat", "history", "batch_input", "remember"})
# Active holds kept beyond the last batch (for their commit): about the requests in flight.
_MAX_KNOWN_HOLDS = 65_536


@dataclass
class KnownRows:
    """The hot rows as this connection last wrote them: the last batch's budget instances and
    the active holds it has made. Valid while PRAGMA data_version stays the same, i.e. while no
    other connection (another proxy process, a sweeper, the CLI) commits to the file: the next
    batch then decides on these instead of reading them again."""

    version: int
    instances: dict[int, Instance]
    by_key: dict[tuple[str, str, int], Instance]
    holds: dict[int, Hold]
    top_hold_id: int | None  # the largest hold id in the file, if known


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def _refuse_foreign(conn: sqlite3.Connection, path: str) -> None:
    """NotALedger for another application's database (api.foreign_tables). A ledger from
    before `meta` is refused by migrate, with its own message."""
    tables = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' "
            "ESCAPE '\\' ORDER BY name"
        )
    ]
    if named := foreign_tables(tables, lambda: _has_schema_version(conn)):
        raise NotALedger(
            f"{path} is not a drawdown ledger: it holds tables drawdown does not make ({named}); "
            "point --db at the ledger, or at a new file"
        )


def _has_schema_version(conn: sqlite3.Connection) -> bool:
    try:
        found = conn.execute("SELECT 1 FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # another application's `meta`, without our columns
        return False
    return found is not None


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
        create: bool = True,
        leases: LeaseWatch | None = None,
    ) -> None:
        """`create=False`: open the file only if it is there (a ledger the proxy lost, see
        `lost`, is reopened, never made anew: a new file starts with empty budgets)."""
        self.path = str(path)
        self.busy_timeout = busy_timeout
        self.process_id = (
            process_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self._lock = threading.RLock()
        self.leases = leases or LeaseWatch()  # the other proxies' heartbeats, as seen by _sweep
        # The file this connection opened (device, inode): `lost` compares the path's with it.
        self._file: tuple[int, int] | None = None
        try:
            if self.path != ":memory:" and create:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(
                self.path if create else _existing(self.path),
                timeout=busy_timeout,
                isolation_level=None,
                check_same_thread=False,
                uri=not create,
            )
            try:
                _refuse_foreign(self.conn, self.path)  # before a pragma or a table changes it
            except NotALedger:
                self.conn.close()  # the proxy's maintenance may look again every tick
                raise
            # A new ledger gets 1 KiB pages: a transaction changes a few small rows in about a
            # dozen b-tree pages, and each changed page goes whole into the WAL — with 4 KiB pages
            # a lone reserve or commit wrote ~4× the bytes (measured: one operation per
            # transaction 20 % faster, batches 4 %). Fixed at creation; an existing file keeps its own.
            self.conn.execute("PRAGMA page_size = 1024")
            self._when_free("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a commit survives a crash of this process (the WAL is
            # written before COMMIT returns) but not a power loss; FULL adds an fsync per batch.
            self.conn.execute(f"PRAGMA synchronous = {synchronous}")
            # Checkpoints (copying the WAL into the database, with an fsync) are run by the
            # proxy's maintenance task on its own connection, so a reserve never waits for one;
            # this large automatic threshold is only the backstop when nothing else checkpoints.
            self.conn.execute("PRAGMA wal_autocheckpoint = 10000")
            self._checkpointer: sqlite3.Connection | None = None
            # The checkpoint thread (start_checkpoints), and when the writer next wakes it.
            self._checkpoint_thread: threading.Thread | None = None
            self._checkpoint_wake = threading.Event()
            self._checkpoint_due: int | None = None  # conn.total_changes; None: no thread
            # Checkpoints run on a thread of their own: closing their connection while one is
            # in progress would free it under that thread (a crash at shutdown), hence the lock.
            self._checkpoint_lock = threading.Lock()
            self._closed = False
            # What this connection last committed of the hot rows (see KnownRows), and, inside
            # a transaction, what it knows of them now; None: read them from the file.
            self._known: KnownRows | None = None
            self._rows: KnownRows | None = None
            self._version = 0
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
            # From here on the write lock is waited for by _begin, not by SQLite's busy handler.
            self.conn.execute("PRAGMA busy_timeout = 0")
            if self.path != ":memory:":
                found = os.stat(self.path)
                self._file = (found.st_dev, found.st_ino)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        except OSError as exc:  # from mkdir: a file in the way, no permission
            raise LedgerError(
                f"cannot open ledger {self.path}: its folder {exc.filename} cannot be made "
                f"({exc.strerror or exc})"
            ) from exc

    # --- transactions ------------------------------------------------------------------

    def _when_free(self, sql: str) -> None:
        """Run `sql`, retrying while another process holds the lock it needs, up to busy_timeout.

        SQLite's own busy handler sleeps 1, 2, 5, 10 … 100 ms between tries: against another
        proxy whose writer commits a batch every millisecond, it lost the race for the write
        lock again and again (p99 of 0.7 s with two workers). Short, jittered polls find the
        gap between the other writer's batches within a few milliseconds. And some refusals
        never reach the busy handler at all (two proxies switching a new file to WAL at once)."""
        deadline: float | None = None  # set at the first refusal: no clock read when free
        while True:
            try:
                self.conn.execute(sql)
                return
            except sqlite3.Error as exc:
                # Extended codes (SQLITE_BUSY_RECOVERY, _SNAPSHOT, …) are busy too.
                busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
                if deadline is None:
                    deadline = time.monotonic() + self.busy_timeout
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(random.uniform(0.0001, 0.0004))

    def _begin(self) -> None:
        """Take the write lock, waiting up to busy_timeout for another process to let go of it."""
        try:
            self._when_free("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger unavailable: {exc}") from exc

    def _write(self, fn: Callable[[], T], *, keeps_rows: bool = False) -> T:
        """Run `fn` in one write transaction. `keeps_rows`: `fn` leaves holds and budget
        instances alone, or keeps `self._rows` current as it changes them (run_batch)."""
        with self._lock:
            self._begin()
            known, self._known = self._known, None  # taken: a failure leaves nothing known
            try:
                # Under the write lock: no other connection can commit until we do, so this is
                # the version our own commit leaves too (a connection's own writes don't count).
                (self._version,) = self.conn.execute("PRAGMA data_version").fetchone()
                fresh = keeps_rows and known is not None and known.version == self._version
                self._rows = known if fresh else None
                result = fn()
                self.conn.execute("COMMIT")
                self._known = self._rows
                due = self._checkpoint_due
                if due is not None and self.conn.total_changes >= due:
                    self._checkpoint_due = self.conn.total_changes + CHECKPOINT_CHANGES
                    self._checkpoint_wake.set()
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
        """Run several operations in ONE transaction (one lock, one WAL commit). The hot ones
        are decided together by the planner (plan.py): each budget instance and hold is read
        once and written once, however many operations touch it. Should a write fail (say a
        duplicate request id), they are re-run one by one, each in its own savepoint, so a
        bad operation fails alone. Returns results or exceptions, in order."""
        saved = snapshot(calls)
        try:
            return self._write(lambda: self._run(calls, saved), keeps_rows=True)
        except BaseException:
            restore(saved)  # nothing was written, so nothing was decided
            raise

    def _run(
        self,
        calls: Sequence[tuple[str, tuple[Any, ...]]],
        saved: list[tuple[DecisionRow, tuple[Any, ...]]],
    ) -> list[Any]:
        if len(calls) == 1 and calls[0][0] in HOT:
            return self._planned(calls)  # alone in its transaction: a failure rolls it all back

        def together(batch: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
            try:
                return self._in_savepoint(lambda: self._planned(batch))
            except (sqlite3.Error, OverflowError):  # OverflowError: an int past SQLite's 64 bits
                restore(saved)
                return [self._alone(call) for call in batch]

        return in_order(calls, together, self._alone)

    def _in_savepoint(self, fn: Callable[[], T]) -> T:
        self.conn.execute("SAVEPOINT op")
        try:
            result = fn()
        except BaseException:
            self.conn.execute("ROLLBACK TO op")
            self.conn.execute("RELEASE op")
            raise
        self.conn.execute("RELEASE op")
        return result

    def _alone(self, call: tuple[str, tuple[Any, ...]]) -> Any:
        """One operation in its own savepoint: its failure (returned) leaves the others intact."""
        name, args = call
        saved = snapshot([call])
        if name not in HOT and name not in _KEEPS_ROWS:
            self._rows = None  # a maintenance write (sweep, extend …) may change any of them
        try:
            if name in HOT:
                return self._in_savepoint(lambda: self._planned([call]))[0]
            return self._in_savepoint(lambda: getattr(self, f"_{name}")(*args))
        except Exception as exc:
            restore(saved)
            return LedgerError(str(exc)) if isinstance(exc, sqlite3.Error | OverflowError) else exc

    def _planned(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Read what the hot operations need, decide them in order, write the outcome.
        Inside the write transaction: nothing read here can change before we commit. Where
        the guards cut the batch (Plan.trip), its parts are decided in turn."""
        results: list[Any] = []
        while calls:
            decided = self._planned_until_cut(calls)
            results += decided
            calls = calls[len(decided) :]
        return results

    def _planned_until_cut(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """The results of `calls` up to where the guards cut them, decided and written."""
        plan = Plan(self.process_id)
        conn = self.conn
        # Taken: the plan changes these objects as it decides, so a failure must drop them.
        rows, self._rows = self._rows, None
        guarded = guarded_reserves(calls)
        if guarded:
            keys = GuardKeys.of(guarded, decision_rows(calls), calls)
            cut = plan.trip(calls, self._guard_counts(keys))
            if cut is not None:  # nothing read so far was changed: the part before the cut
                self._rows = rows
                return self._planned_until_cut(calls[:cut])  # the same reads: no cut
        hold_ids = settled_hold_ids(calls)
        once, batch_keys = commit_keys(calls)
        if batch_keys:  # the holds kept for the batches these commits read or end
            kept = dict(
                conn.execute(
                    f"SELECT key, hold_id FROM batch_holds WHERE key IN ({_marks(batch_keys)})",
                    batch_keys,
                )
            )
            plan.jobs = BatchJobs(kept=kept)
            hold_ids = sorted(set(hold_ids) | set(kept.values()))
        if rows is not None:
            known_holds = rows.holds
            for i in hold_ids:  # a loop, not a generator: one step per settled hold
                if i in known_holds:
                    plan.holds[i] = known_holds.pop(i)
            hold_ids = [i for i in hold_ids if i not in plan.holds]
        if hold_ids:
            plan.add_holds(
                conn.execute(
                    f"SELECT {HOLD_COLUMNS} FROM holds WHERE id IN ({_marks(hold_ids)})", hold_ids
                )
            )
        for key, (claim, ts) in plan.claimed_keys(calls).items():
            known = rows.by_key.get(key) if rows is not None else None
            if known is not None:
                plan.use_instance(known)
                continue
            found = conn.execute(_SELECT_INSTANCE, key).fetchone()
            if found is None:
                budget, scope, window_start = key
                limits = (claim.limit_usd, claim.limit_tokens, claim.limit_requests)
                found = conn.execute(
                    _CREATE_INSTANCE, (budget, scope, window_start, claim.per, *limits, ts, ts)
                ).fetchone()
            plan.add_instances((found,))
        self._read_held_instances(plan, rows)
        if once:  # under the write lock: no one else charges under these keys before we commit
            plan.charged_once = dict(
                conn.execute(
                    f"SELECT key, request_id FROM once_charges WHERE key IN ({_marks(once)})", once
                )
            )
        new_holds = plan.reserves(calls)
        top = rows.top_hold_id if rows is not None else None
        if new_holds:
            if top is None:
                # Under the write lock no one else inserts a hold: the next ids are ours.
                (top,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM holds").fetchone()
            plan.hold_ids = list(range(top + new_holds, top, -1))  # pop() hands out top+1 first
        answers = self._history([q for name, args in calls if name == "history" for q in args[0]])
        results = plan.decide(calls, answers)
        self._flush(plan)
        if top is not None:
            top += new_holds - len(plan.hold_ids)  # the ids handed out
        self._rows = self._known_after(plan, rows, top)
        return results

    def _known_after(self, plan: Plan, before: KnownRows | None, top: int | None) -> KnownRows:
        """What this connection knows of the hot rows once the plan is written: the plan's
        instances, and the active holds (earlier batches' not settled here, and this one's)."""
        holds = before.holds if before is not None else {}  # the plan's holds were taken out
        for hold in plan.holds.values():
            if hold.state == "active":
                hold.was, hold.dirty = hold.state, False
                holds[hold.id] = hold
        if len(holds) > _MAX_KNOWN_HOLDS:  # settled elsewhere or forgotten: read them again
            holds = {i: h for i, h in holds.items() if i in plan.holds}
        for inst in plan.instances.values():
            inst.dirty = False
        return KnownRows(self._version, plan.instances, plan.by_key, holds, top)

    def _read_held_instances(self, plan: Plan, rows: KnownRows | None = None) -> None:
        """The budget instances the plan's holds are on, those not read yet."""
        held = {i for h in plan.holds.values() for i in h.instance_ids} - plan.instances.keys()
        if rows is not None:
            known = held & rows.instances.keys()
            for i in known:
                plan.use_instance(rows.instances[i])
            held -= known
        if held:
            ids = sorted(held)
            plan.add_instances(
                self.conn.execute(
                    f"SELECT {INSTANCE_COLUMNS} FROM budget_instances WHERE id IN ({_marks(ids)})",
                    ids,
                )
            )

    def _guard_counts(self, keys: GuardKeys) -> Counts:
        conn, counts = self.conn, Counts()
        for scope in keys.failed:  # first: a step count's cap depends on them
            counts.failed[scope] = dict(conn.execute(FAILED, (scope,)).fetchall())
        for (scope, fingerprint), cap in zip(keys.repeats, keys.repeat_caps, strict=True):
            repeats, refusals = conn.execute(REPEATS, (scope, fingerprint, cap)).fetchone()
            counts.repeats[scope, fingerprint] = repeats
            if refusals:
                counts.window_refusals[scope, fingerprint] = refusals
            if counts.repeats[scope, fingerprint] >= cap:
                counts.capped_repeats.add((scope, fingerprint))
        for scope, (most, retries) in zip(keys.steps, keys.step_limits, strict=True):
            cap = step_cap(most, retries, counts.failed.get(scope, {}), len(keys.settling))
            (counts.steps[scope],) = conn.execute(STEPS, (scope, cap)).fetchone()
            if counts.steps[scope] >= cap:
                counts.capped_steps.add(scope)
        if keys.settling:
            for request_id, scope, fingerprint in conn.execute(
                "SELECT request_id, scope, fingerprint FROM decisions "
                f"WHERE request_id IN ({_marks(keys.settling)}) AND completed_at IS NULL "
                f"AND decision <> 'deny' AND fingerprint IS NOT NULL AND {STEP}",
                keys.settling,
            ):
                if scope in counts.failed:
                    counts.inflight[request_id] = (scope, fingerprint)
        for workflow, scope in keys.pairs:  # first: only a new run needs its workflow's runs
            found = conn.execute(KNOWN, (workflow, scope)).fetchone()
            if found is not None:
                counts.known.add((workflow, scope))
                counts.seen.add((workflow, found[0], scope))
        for i in keys.runs_to_count(counts.known):
            (workflow, tenant), cap = keys.runs[i], keys.run_caps[i]
            (counts.runs[workflow, tenant],) = conn.execute(
                RUNS, (workflow, tenant, cap)
            ).fetchone()
        return counts

    def _flush(self, plan: Plan) -> None:
        """Every write of the plan, one executemany per kind."""
        conn = self.conn

        def write(sql: str, rows: Sequence[Sequence[Any]], guard: str | None = None) -> None:
            if rows:
                changed = conn.executemany(sql, rows).rowcount
                if guard and changed != len(rows):  # cannot happen under the write lock
                    raise LedgerError(f"ledger invariant violated: {guard} ({changed}/{len(rows)})")

        write(_INSERT_HOLD, plan.new_holds)
        write(_WRITE_HOLD, plan.dirty_holds(), "holds changed under the write lock")
        write(_WRITE_INSTANCE, plan.dirty_instances(), "budget instances vanished")
        write(_INSERT_DECISION, plan.new_decisions)
        write(_COMPLETE_DECISION, plan.completions)
        write(_EXPIRE_DECISION, plan.expiries)
        write(_INSERT_EVENT, plan.events)
        write(_INSERT_FACT, plan.facts)
        write(_INSERT_ONCE_CHARGE, plan.once_charges)
        jobs = plan.jobs
        if jobs is not None:
            write(_KEEP_HOLD, jobs.kept_holds, "kept holds vanished")
            write(_INSERT_BATCH_HOLD, jobs.new)
            write(_MOVE_BATCH_HOLD, jobs.moved)
            write(_INSERT_BATCH_INPUT, jobs.inputs)

    # --- public operations (each its own transaction) --------------------------------------

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
        return self._write(lambda: self._history(queries), keeps_rows=True)

    def _single(self, name: str, args: tuple[Any, ...]) -> Any:
        (result,) = self.run_batch([(name, args)])
        if isinstance(result, BaseException):
            raise result
        return result

    def idle_run(self, key: str, idle_seconds: float, candidate: str, now: float) -> str:
        return self._write(
            lambda: self._idle_run(key, idle_seconds, candidate, now), keeps_rows=True
        )

    def extend(self, hold_ids: Sequence[int], expires_at: float) -> None:
        self._write(lambda: self._extend(hold_ids, expires_at))

    def batch_input(self, key: str) -> str | None:
        return self._write(lambda: self._batch_input(key), keeps_rows=True)

    def _batch_input(self, key: str) -> str | None:
        found = self.conn.execute("SELECT estimate FROM batch_inputs WHERE key = ?", (key,))
        row = found.fetchone()
        return None if row is None else row[0]

    def remember(self, key: str, value: str) -> None:
        self._write(lambda: self._remember(key, value), keeps_rows=True)

    def _remember(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value)
        )

    def heartbeat(self, now: float) -> None:
        self._write(lambda: self._heartbeat(now), keeps_rows=True)

    def sweep(self, now: float, lease_seconds: float) -> int:
        return self._write(lambda: self._sweep(now, lease_seconds))

    def release_mine(self, now: float, reason: str) -> int:
        return self._write(lambda: self._release_mine(now, reason))

    def checkpoint(self) -> None:
        """Move the WAL into the database without blocking writers (PASSIVE), on a second
        connection so the writer thread never waits for the checkpoint's fsync."""
        with self._checkpoint_lock:
            if self._closed:
                raise LedgerError(f"ledger {self.path} is closed")
            try:
                if self._checkpointer is None:
                    # Never makes the file: a ledger deleted under the proxy stays gone (`lost`).
                    self._checkpointer = sqlite3.connect(
                        _existing(self.path), timeout=1.0, check_same_thread=False, uri=True
                    )
                self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                raise LedgerError(f"checkpoint of {self.path} failed: {exc}") from exc

    def start_checkpoints(self, every: float = 1.0) -> None:
        """Checkpoint from a thread of its own (the proxy's writer never copies the WAL itself):
        every `every` seconds, and sooner, woken by the writer, after each CHECKPOINT_CHANGES
        rows it commits. Stopped by stop_checkpoints or close."""
        with self._checkpoint_lock:
            if self._checkpoint_thread is not None or self._closed:
                return
            self._checkpoint_wake.clear()
            thread = threading.Thread(
                target=self._checkpoint_loop, args=(every,), name="drawdown-checkpoint", daemon=True
            )
            self._checkpoint_thread = thread
            self._checkpoint_due = self.conn.total_changes + CHECKPOINT_CHANGES
        thread.start()

    def stop_checkpoints(self) -> None:
        with self._checkpoint_lock:
            thread, self._checkpoint_thread = self._checkpoint_thread, None
            self._checkpoint_due = None
        if thread is not None:
            self._checkpoint_wake.set()
            thread.join(5.0)

    def _checkpoint_loop(self, every: float) -> None:
        me = threading.current_thread()
        while True:
            self._checkpoint_wake.wait(every)
            self._checkpoint_wake.clear()
            if self._checkpoint_thread is not me:  # stopped (or closed): a new one may run
                return
            try:
                self.checkpoint()
            except LedgerError as exc:  # another process checkpointing, say; the next one will do
                log.debug("drawdown: checkpoint skipped: %s", exc)

    def lost(self) -> str | None:
        """What became of the ledger's file, if the path no longer names the file this
        connection writes: "deleted", or "replaced by another file". SQLite goes on writing to
        the file it opened, which no other process (another worker, a report, a restart)
        would see. None while it is still there, or when the path cannot be looked at."""
        if self._file is None:
            return None
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return "deleted"
        except OSError:  # a folder we may not search for a moment: not a reason to stop
            return None
        if (found.st_dev, found.st_ino) != self._file:
            return "replaced by another file"
        return None

    def close(self) -> None:
        self.stop_checkpoints()
        with self._lock:
            try:
                self._write(lambda: self._stopped(time.time()))
            except LedgerError:
                pass
            self.conn.close()
        with self._checkpoint_lock:  # waits for a checkpoint in progress
            self._closed = True
            if self._checkpointer is not None:
                self._checkpointer.close()

    # --- maintenance, inside a transaction ---------------------------------------------------

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
        """End every active hold matching `where`, returning its estimate (the planner's expire)."""
        plan = Plan(self.process_id)
        plan.add_holds(
            self.conn.execute(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE state = 'active' AND ({where})", params
            )
        )
        self._read_held_instances(plan)
        for hold in list(plan.holds.values()):
            plan.expire(hold, state, reason, now)
        self._flush(plan)
        return len(plan.holds)

    def _sweep(self, now: float, lease_seconds: float) -> int:
        expired = self._expire("expires_at < ?", (now,), now, "ttl expired")
        holders = self.conn.execute(HOLDERS.format(mark="?"), (self.process_id,))
        dead = self.leases.lapsed(holders, lease_seconds)
        if dead:
            expired += self._expire(
                f"process_id IN ({_marks(dead)})", dead, now, "proxy lease lapsed"
            )
        return expired

    def _release_mine(self, now: float, reason: str) -> int:
        return self._expire("process_id = ?", (self.process_id,), now, reason, state="released")


def glob_to_like(pattern: str) -> str:
    """An action-kind glob as a SQL LIKE pattern (portable to PostgreSQL, unlike GLOB)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _existing(path: str) -> str:
    """A URI that opens the SQLite file at `path` for writing but never creates it. Quoted:
    a `#`, `?` or `%` in a path is URI syntax; as bytes: a file name need not be UTF-8."""
    return f"file:{quote(os.fsencode(os.path.abspath(path)))}?mode=rw"


def open_sqlite(url: str, **kwargs: Any) -> SQLiteLedger:
    return SQLiteLedger(sqlite_path(url), **kwargs)
