"""Reserve-time anomaly guards (loop, step_count, fan_out) for the PostgreSQL ledger.

The SQLite ledger counts decision rows inside its one write lock. The PostgreSQL ledger
decides a whole batch at once, its decision rows not yet written, so it counts what
the ledger holds (read under transaction-scoped advisory locks, one per run scope and
per workflow, taken in a fixed order so that proxies guarding the same run queue up
instead of counting past each other) plus the rows this batch adds before each reserve.
Every reserve and record adds exactly one decision row whatever it decides, so the
counts before each reserve are known before any budget is looked at.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .api import DecisionRow, Guards, Tripped

# Sorted by hash, taken in that order (the subquery keeps the order for the outer call).
LOCK = """
SELECT pg_advisory_xact_lock(s.h) FROM (
    SELECT DISTINCT hashtextextended('drawdown.guard:' || current_schema() || ':' || k, 0) AS h
    FROM unnest(%s::text[]) AS k ORDER BY h
) AS s
"""
REPEATS = """
SELECT k.scope, k.fp, (SELECT COUNT(*) FROM decisions d WHERE d.scope = k.scope AND d.fingerprint = k.fp)
FROM unnest(%s::text[], %s::text[]) AS k(scope, fp)
"""
STEPS = """
SELECT k.scope, (SELECT COUNT(*) FROM decisions d WHERE d.scope = k.scope)
FROM unnest(%s::text[]) AS k(scope)
"""
RUNS = """
SELECT k.w, k.t, (SELECT COUNT(DISTINCT d.scope) FROM decisions d
                  WHERE d.workflow = k.w AND COALESCE(d.tenant, '') = k.t AND d.decision <> 'deny')
FROM unnest(%s::text[], %s::text[]) AS k(w, t)
"""
KNOWN = """
SELECT DISTINCT d.workflow, d.scope, COALESCE(d.tenant, '') FROM decisions d
WHERE d.workflow = ANY(%s) AND d.scope = ANY(%s) AND d.decision <> 'deny'
"""


def guards_of(args: tuple[Any, ...]) -> Guards | None:
    """The guards of a `reserve` call's arguments, if it has any that apply."""
    guards = args[4] if len(args) > 4 else None
    return guards if guards is not None and guards.any else None


def lock_keys(reserves: Iterable[tuple[DecisionRow, Guards]]) -> list[str]:
    keys = set()
    for row, guards in reserves:
        if guards.max_repeats is not None or guards.max_steps is not None:
            keys.add(f"scope:{row.scope}")
        if guards.max_runs_per_workflow is not None and row.workflow is not None:
            keys.add(f"workflow:{row.workflow}\x1f{row.tenant or ''}")
    return sorted(keys)


@dataclass
class Counts:
    """What the guards count, kept current as the batch adds decision rows."""

    repeats: dict[tuple[str, str], int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    runs: dict[tuple[str, str], int] = field(default_factory=dict)
    known: set[tuple[str, str]] = field(default_factory=set)  # (workflow, scope) seen
    seen: set[tuple[str, str, str]] = field(default_factory=set)  # (workflow, tenant, scope)

    def add(self, row: DecisionRow) -> None:
        """A decision row the batch records (before the next reserve is checked)."""
        if row.fingerprint and (row.scope, row.fingerprint) in self.repeats:
            self.repeats[row.scope, row.fingerprint] += 1
        if row.scope in self.steps:
            self.steps[row.scope] += 1
        # Only runs that got a request through count (as in SQLiteLedger._check_guards): a run
        # refused at its first request must not become "known" through its own denied row.
        if row.workflow is not None and row.decision != "deny":
            self.known.add((row.workflow, row.scope))
            run = (row.workflow, row.tenant or "", row.scope)
            if run not in self.seen:
                self.seen.add(run)
                if run[:2] in self.runs:
                    self.runs[run[:2]] += 1

    def trip(self, row: DecisionRow, guards: Guards) -> Tripped | None:
        """The same checks, in the same order and words, as SQLiteLedger._check_guards."""
        if guards.max_repeats is not None and row.fingerprint:
            repeats = self.repeats[row.scope, row.fingerprint]
            if repeats >= guards.max_repeats:
                return Tripped(
                    "loop",
                    f"loop: this identical {row.action} request was already made {repeats} times in "
                    f"{row.scope} (anomalies.loop.repeats: {guards.max_repeats})",
                )
        if guards.max_steps is not None:
            steps = self.steps[row.scope]
            if steps >= guards.max_steps:
                return Tripped(
                    "step_count",
                    f"step_count: {row.scope} already took {steps} steps (anomalies.step_count.max: {guards.max_steps})",
                )
        if (
            guards.max_runs_per_workflow is not None
            and row.workflow is not None
            and (row.workflow, row.scope) not in self.known  # a new run of the workflow
        ):
            runs = self.runs[row.workflow, row.tenant or ""]
            if runs >= guards.max_runs_per_workflow:
                return Tripped(
                    "fan_out",
                    f"fan_out: workflow {row.workflow} already has {runs} runs "
                    f"(anomalies.fan_out.max_runs_per_workflow: {guards.max_runs_per_workflow})",
                )
        return None


class Reader:
    """Queues the guard queries of a batch (inside a pipeline) and reads their answers."""

    def __init__(
        self, conn: Any, guarded: list[tuple[DecisionRow, Guards]], rows: list[DecisionRow]
    ):
        self.cursors: dict[str, Any] = {}
        conn.cursor().execute(LOCK, (lock_keys(guarded),))
        repeats = sorted(
            {
                (r.scope, r.fingerprint)
                for r, g in guarded
                if g.max_repeats is not None and r.fingerprint
            }
        )
        steps = sorted({r.scope for r, g in guarded if g.max_steps is not None})
        fan = [(r, g) for r, g in guarded if g.max_runs_per_workflow is not None and r.workflow]
        runs = sorted({(r.workflow or "", r.tenant or "") for r, _ in fan})
        if repeats:
            self._query(
                conn, "repeats", REPEATS, ([s for s, _ in repeats], [f for _, f in repeats])
            )
        if steps:
            self._query(conn, "steps", STEPS, (steps,))
        if runs:
            self._query(conn, "runs", RUNS, ([w for w, _ in runs], [t for _, t in runs]))
            workflows = sorted({r.workflow for r in rows if r.workflow is not None})
            scopes = sorted({r.scope for r in rows if r.workflow is not None})
            self._query(conn, "known", KNOWN, (workflows, scopes))

    def _query(self, conn: Any, name: str, sql: str, params: tuple[Any, ...]) -> None:
        self.cursors[name] = conn.cursor()
        self.cursors[name].execute(sql, params)

    def counts(self) -> Counts:
        found = Counts()
        if "repeats" in self.cursors:
            found.repeats = {(s, f): n for s, f, n in self.cursors["repeats"].fetchall()}
        if "steps" in self.cursors:
            found.steps = dict(self.cursors["steps"].fetchall())
        if "runs" in self.cursors:
            found.runs = {(w, t): n for w, t, n in self.cursors["runs"].fetchall()}
            for workflow, scope, tenant in self.cursors["known"].fetchall():
                found.known.add((workflow, scope))
                found.seen.add((workflow, tenant, scope))
        return found
