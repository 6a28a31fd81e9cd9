"""Reserve-time anomaly guards (loop, step_count, fan_out) for the PostgreSQL ledger.

The PostgreSQL ledger decides a whole batch at once, its decision rows not yet written,
so it counts what the ledger holds (read under transaction-scoped advisory locks, one per run scope and
per workflow, taken in a fixed order so that proxies guarding the same run queue up
instead of counting past each other) plus the rows this batch adds before each reserve.
Every reserve and record adds exactly one decision row whatever it decides, so the
counts before each reserve are known before any budget is looked at; except whether a new
run is a run of its workflow for fan_out, which turns on its budgets: there the batch is cut
(Plan.trip) and its parts decided in turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .api import DecisionRow, Guards, agents_own, failed_attempt, window_refusals_counted
from .plan import Counts, GuardKeys, step_cap

# Sorted by hash, taken in that order (the subquery keeps the order for the outer call).
LOCK = """
SELECT pg_advisory_xact_lock(s.h) FROM (
    SELECT DISTINCT hashtextextended('drawdown.guard:' || current_schema() || ':' || k, 0) AS h
    FROM unnest(%s::text[]) AS k ORDER BY h
) AS s
"""
# Counted up to a cap (GuardKeys), as in SQLite: a refused agent that goes on calling must not
# make each of its reserves count every refusal so far.
# A budget window's refusals among them, which the loop guard forgives, in the same walk.
REPEATS = f"""
SELECT k.scope, k.fp, s.n, s.w FROM unnest(%s::text[], %s::text[], %s::int[]) AS k(scope, fp, cap)
CROSS JOIN LATERAL (
    SELECT COUNT(*) AS n, {window_refusals_counted("d.")} AS w FROM (
        SELECT d.decision, d.reason_code, d.status FROM decisions d
        WHERE d.scope = k.scope AND d.fingerprint = k.fp AND {agents_own("d.reason_code")}
        LIMIT k.cap) d) s
"""
# The cap is plan.step_cap(), its forgiven attempts read from the partial index in the query.
STEPS = f"""
SELECT k.scope, (SELECT COUNT(*) FROM (
    SELECT 1 FROM decisions d WHERE d.scope = k.scope AND {agents_own("d.reason_code")}
    LIMIT k.most + %s + (
        SELECT COALESCE(SUM(LEAST(f.n, GREATEST(k.retries, 0))), 0) FROM (
            SELECT COUNT(*) AS n FROM decisions f
            WHERE f.scope = k.scope AND {failed_attempt("f.")} GROUP BY f.fingerprint) f)) s)
FROM unnest(%s::text[], %s::int[], %s::int[]) AS k(scope, most, retries)
"""
# The failed attempts the loop and step_count guards forgive (the partial index idx_decisions_failed).
FAILED = f"""
SELECT d.scope, d.fingerprint, COUNT(*) FROM decisions d
WHERE d.scope = ANY(%s) AND {failed_attempt("d.")}
GROUP BY d.scope, d.fingerprint
"""
# Rows in flight that a commit or release of the batch turns into failed attempts.
INFLIGHT = f"""
SELECT d.request_id, d.scope, d.fingerprint FROM decisions d
WHERE d.request_id = ANY(%s) AND d.completed_at IS NULL AND d.decision <> 'deny'
  AND d.fingerprint IS NOT NULL AND {agents_own("d.reason_code")}
"""
# A workflow's runs, walked one index seek each (the next scope and its row's tenant) up to
# the cap: a DISTINCT read every row of them (28 ms for five runs of 20,000 rows).
RUNS = """
SELECT k.w, k.t, (
    WITH RECURSIVE walk(scope, n) AS (
        SELECT f.scope, (COALESCE(f.tenant, '') = k.t)::int
        FROM (SELECT d.scope, d.tenant FROM decisions d
              WHERE d.workflow = k.w AND d.decision <> 'deny' ORDER BY d.scope LIMIT 1) f
        UNION ALL
        SELECT nx.scope, walk.n + (COALESCE(nx.tenant, '') = k.t)::int
        FROM walk CROSS JOIN LATERAL (
            SELECT d.scope, d.tenant FROM decisions d
            WHERE d.workflow = k.w AND d.decision <> 'deny' AND d.scope > walk.scope
            ORDER BY d.scope LIMIT 1) nx
        WHERE walk.n < k.cap
    )
    SELECT COALESCE(MAX(walk.n), 0) FROM walk)
FROM unnest(%s::text[], %s::text[], %s::int[]) AS k(w, t, cap)
"""
# Is each run already one of its workflow's? The first row that says so is enough.
KNOWN = """
SELECT k.w, k.s, (SELECT COALESCE(d.tenant, '') FROM decisions d
                  WHERE d.workflow = k.w AND d.scope = k.s AND d.decision <> 'deny' LIMIT 1)
FROM unnest(%s::text[], %s::text[]) AS k(w, s)
"""


def lock_keys(reserves: Iterable[tuple[DecisionRow, Guards]]) -> list[str]:
    keys = set()
    for row, guards in reserves:
        if guards.max_repeats is not None or guards.max_steps is not None:
            keys.add(f"scope:{row.scope}")
        if guards.max_runs_per_workflow is not None and row.workflow is not None:
            keys.add(f"workflow:{row.workflow}\x1f{row.tenant or ''}")
    return sorted(keys)


class Reader:
    """Queues the guard queries of a batch (inside a pipeline) and reads their answers."""

    def __init__(
        self,
        conn: Any,
        guarded: list[tuple[DecisionRow, Guards]],
        rows: list[DecisionRow],
        calls: Sequence[tuple[str, tuple[Any, ...]]] = (),
    ):
        self.conn = conn
        self.cursors: dict[str, Any] = {}
        conn.cursor().execute(LOCK, (lock_keys(guarded),))
        keys = self.keys = GuardKeys.of(guarded, rows, calls)
        if keys.repeats:
            self._query(
                conn,
                "repeats",
                REPEATS,
                ([s for s, _ in keys.repeats], [f for _, f in keys.repeats], keys.repeat_caps),
            )
        if keys.steps:
            most = [m for m, _ in keys.step_limits]
            retries = [r for _, r in keys.step_limits]
            self._query(conn, "steps", STEPS, (len(keys.settling), keys.steps, most, retries))
        if keys.failed:
            self._query(conn, "failed", FAILED, (keys.failed,))
        if keys.settling:
            self._query(conn, "inflight", INFLIGHT, (keys.settling,))
        if keys.runs:  # the runs themselves are counted once known is read (counts())
            pairs = keys.pairs
            self._query(conn, "known", KNOWN, ([w for w, _ in pairs], [s for _, s in pairs]))

    def _query(self, conn: Any, name: str, sql: str, params: tuple[Any, ...]) -> None:
        self.cursors[name] = conn.cursor()
        self.cursors[name].execute(sql, params)

    def counts(self) -> Counts:
        found = Counts()
        if "repeats" in self.cursors:
            for scope, fingerprint, n, refusals in self.cursors["repeats"].fetchall():
                found.repeats[scope, fingerprint] = n
                if refusals:
                    found.window_refusals[scope, fingerprint] = refusals
        if "steps" in self.cursors:
            found.steps = dict(self.cursors["steps"].fetchall())
        found.failed = {scope: {} for scope in self.keys.failed}
        if "failed" in self.cursors:
            for scope, fingerprint, n in self.cursors["failed"].fetchall():
                found.failed[scope][fingerprint] = n
        keys = self.keys
        caps = dict(zip(keys.repeats, keys.repeat_caps, strict=True))
        found.capped_repeats = {key for key, n in found.repeats.items() if n >= caps[key]}
        for scope, (most, retries) in zip(keys.steps, keys.step_limits, strict=True):
            # The cap the STEPS query computed in the database, from the same failed attempts.
            if found.steps[scope] >= step_cap(
                most, retries, found.failed.get(scope, {}), len(keys.settling)
            ):
                found.capped_steps.add(scope)
        if "inflight" in self.cursors:
            for request_id, scope, fingerprint in self.cursors["inflight"].fetchall():
                if scope in found.failed:
                    found.inflight[request_id] = (scope, fingerprint)
        if "known" in self.cursors:
            for workflow, scope, tenant in self.cursors["known"].fetchall():
                if tenant is not None:
                    found.known.add((workflow, scope))
                    found.seen.add((workflow, tenant, scope))
            # Only a new run needs its workflow's runs counted: once a run, one more round trip.
            wanted = self.keys.runs_to_count(found.known)
            if wanted:
                runs = [self.keys.runs[i] for i in wanted]
                cursor = self.conn.cursor()
                cursor.execute(
                    RUNS,
                    (
                        [w for w, _ in runs],
                        [t for _, t in runs],
                        [self.keys.run_caps[i] for i in wanted],
                    ),
                )
                found.runs = {(w, t): n for w, t, n in cursor.fetchall()}
        return found
