"""`drawdown report`: runs, budgets, decisions and anomalies from the ledger (SPEC §8 JSON contract).

`build()` gives the JSON report; `render_text()` the terminal view, `render_html()` one
self-contained page, and `stream_jsonl()` the decision log for observability pipelines.

A run's `status`, the first that applies (`would_status` applies the same order to its
would_deny decisions: what shadow mode would have done to the run under enforcement):
    budget_exhausted  a request of the run was denied because a budget was exhausted
    denied            a request was denied by the policy's authority (a rule, `requires`, an
                      unknown host) — not by an anomaly guard, nor by the proxy itself: its
                      own state, or a request it could not read or take whole (NOT_THE_RUNS)
    anomalous         an anomaly detector flagged the run (or its guard denied a request)
    normal            none of these
Hard stops come first because they say why a run ended; the run's `anomalies` list always
carries every anomaly, so an anomaly is never hidden by the status.

`tenant` and `workflow` (ReportFilter) narrow every section to one team's part of a fleet:
runs, decisions, denials, spend and the decision log to the requests of that tenant/workflow
(the ledger's own columns, not a prefix of the scope: a scope need not start with the tenant),
anomalies to those of its runs and workflows, and budgets to the instances that lie within it
(`_budget_sides`); an instance its traffic is charged to but others' is too (`*`, an agent's
across tenants) is listed marked `shared`, its spent and held being everyone's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from operator import itemgetter
from typing import IO, Any

from . import anomalies as anomaly_detection
from .budgets import window
from .escape import printable
from .identity import clean_value
from .ledger.api import (
    BATCH_HOLDER,
    EXHAUSTED,
    PROXY_REFUSALS,
    TOO_BIG,
    UNITS,
    Claim,
    Shortfall,
    agents_own,
    failed_attempt,
    forgiven,
)
from .ledger.reader import Reader
from .money import exact_usd, format_usd
from .money import usd_float as exact_usd_float
from .policy.match import LEVELS
from .policy.model import Judging, Policy
from .recording import redact

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_NEGATIVE = re.compile(r"^\s*-\s*\.?\d")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Spend buckets, finest first: the finest that gives at most MAX_BUCKETS over the report's span.
BUCKETS = (1, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400, 604800)
MAX_BUCKETS = 120
MAX_DENIALS = 500  # the most recent denials listed in the report
MAX_TIMELINE = 2000  # steps drawn per run in the HTML page
# Steps embedded in the whole page: a week of fleet traffic (481k decisions) made a 210 MB page
# Chromium took 85 s to draw. Runs a reader looks at first get theirs (`_timeline_order`);
# `drawdown report --run ID --html` draws one run, up to this many of its steps.
TIMELINE_BUDGET = 20_000
# The text BUDGETS table lists a per-run budget's instances one by one up to this many; past it
# (481k decisions: 96k lines, one per unit of each of 48k runs) the TOP_INSTANCES that spent
# most, and a line counting them all. `--run` lists the run's own.
MAX_RUN_INSTANCES = 10
TOP_INSTANCES = 5
STATUSES = ("budget_exhausted", "denied", "anomalous", "normal")
# Refusals that make no run `denied` (SPEC §8: an authority denial happened): its own statuses
# (budget, anomaly), the proxy's state (stopping for a deploy, its ledger down, a bug: a deploy
# marked every run with a call in the air `denied`), and the proxy's refusals of a request it
# cannot read (400) or take whole (413, limits.max_request_bytes). They still count among the
# run's denied requests.
REQUEST_REFUSALS = ("bad_request", "body_too_large")
NOT_THE_RUNS = ", ".join(
    f"'{code}'" for code in ("budget_exhausted", "anomaly", *PROXY_REFUSALS, *REQUEST_REFUSALS)
)


DECISIONS = ("allow", "deny", "would_deny")
# The runs table's columns, added to anomalies.scan()'s pass over the ledger (a row per run).
RUN_COLUMNS = f""",
    SUM(CASE WHEN decision = 'allow' THEN 1 ELSE 0 END) AS allowed,
    SUM(CASE WHEN decision = 'deny' THEN 1 ELSE 0 END) AS denied,
    SUM(CASE WHEN decision = 'would_deny' THEN 1 ELSE 0 END) AS would_deny,
    SUM(CASE WHEN decision = 'deny' AND reason_code = 'budget_exhausted' THEN 1 ELSE 0 END)
        AS budget_denials,
    SUM(CASE WHEN decision = 'deny' AND COALESCE(reason_code, '') NOT IN ({NOT_THE_RUNS})
        THEN 1 ELSE 0 END) AS other_denials,
    SUM(CASE WHEN decision = 'would_deny' AND reason_code = 'budget_exhausted' THEN 1 ELSE 0 END)
        AS would_budget,
    SUM(CASE WHEN decision = 'would_deny' AND COALESCE(reason_code, '') NOT IN ({NOT_THE_RUNS})
        THEN 1 ELSE 0 END) AS would_other,
    SUM(CASE WHEN decision = 'would_deny' AND reason_code = 'anomaly' THEN 1 ELSE 0 END)
        AS would_anomaly,
    COALESCE(SUM(actual_usd), 0) AS usd,
    COALESCE(SUM(est_usd), 0) AS est_usd,
    COALESCE(SUM(tokens_in), 0) AS tokens_in,
    COALESCE(SUM(tokens_out), 0) AS tokens_out,
    MIN(ts) AS started, MAX(COALESCE(completed_at, ts)) AS ended,
    SUM(CASE WHEN ts >= :floor THEN 1 ELSE 0 END) AS window_requests,
    COALESCE(SUM(CASE WHEN ts >= :floor THEN actual_usd END), 0) AS window_usd"""


def parse_duration(text: str, flag: str = "--since", like: str = "30m, 24h or 7d") -> float:
    """`like`: examples of what the flag takes (prune's --older-than takes a day at least)."""
    if _NEGATIVE.match(text):  # `-5m`: the window counts back from now already
        raise ValueError(
            f"{flag} counts back from now: give a positive duration like {like}; got {text!r}"
        )
    found = _DURATION.match(text)
    if not found:
        raise ValueError(f"{flag} wants a duration like {like}; got {text!r}")
    if not float(found.group(1)):  # `0m` read as "no --since": the whole ledger
        raise ValueError(f"{flag} wants a duration above zero; got {text!r}")
    # A window reaching past 1970 holds the whole ledger; unbounded, it would reach past the
    # dates Python can show (`--since 99999999999d`).
    return min(float(found.group(1)) * _SECONDS[found.group(2)], time.time())


_EXACT_FLOATS = 2**53  # integers a float holds exactly


def usd_float(nanos: int | None) -> float | None:
    """money.usd_float, a few times faster (a report makes some 500,000): an integer a float
    holds exactly, divided by 1e9, rounds once to the nearest float, as the exact Decimal
    quotient made a float does."""
    if type(nanos) is int and -_EXACT_FLOATS < nanos < _EXACT_FLOATS:
        return nanos / 1e9
    return exact_usd_float(nanos)


def iso_time(ts: float | None) -> str | None:
    """A time as every report writes it, to the second in UTC: `2026-12-05T00:00:00Z`."""
    return (
        None
        if not ts
        else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def as_stored(reader: Reader, run: str | None, level: str = "run") -> str | None:
    """An id (of a run, or of another identity `level`) as the ledger stores it. Identity
    escapes `/`, `:`, `%` and spaces in a value (a run `tkt/9` is kept as `tkt%2F9`): `--run
    tkt/9` found nothing. An id given already escaped, or one the ledger holds as given, is
    taken as it is."""
    if level not in LEVELS:  # a column name, never the caller's text
        raise ValueError(f"no identity level {level!r}")
    cleaned = clean_value(run) if run else None
    if run is None or cleaned is None or cleaned == run:
        return run
    if reader.query(f"SELECT 1 AS found FROM decisions WHERE {level} = :id LIMIT 1", {"id": run}):
        return run
    return cleaned


@dataclass(frozen=True)
class ReportFilter:
    """`--tenant` / `--workflow`: the part of the ledger a report is narrowed to (values as the
    ledger stores them). Empty when neither is given: the whole fleet, as before."""

    tenant: str | None = None
    workflow: str | None = None
    # SQLite: a tenant's rows are also sought as a range of the scope index (no index has the
    # tenant column; a scope starts with its tenant level when it has one: identity's order).
    # One tenant's of a fleet's 30k decisions: a scan of 89 ms became a range of 4 ms.
    scope_range: bool = False

    def __bool__(self) -> bool:
        return self.tenant is not None or self.workflow is not None

    @property
    def levels(self) -> dict[str, str]:
        return {
            level: value
            for level, value in (("tenant", self.tenant), ("workflow", self.workflow))
            if value is not None
        }

    def sql(self) -> str:
        """` AND tenant = :filter_tenant …` on the decisions' own columns (bound, never
        formatted in): what decides. The scope range only finds the rows faster."""
        exact = "".join(f" AND {level} = :filter_{level}" for level in self.levels)
        if self.scope_range and self.tenant is not None:
            exact += " AND scope >= :filter_scope_from AND scope < :filter_scope_to"
        return exact

    @property
    def params(self) -> dict[str, str]:
        found = {f"filter_{level}": value for level, value in self.levels.items()}
        if self.scope_range and self.tenant is not None:
            # `tenant:acme` and `tenant:acme/…` ('/' sorts just before '0'); `tenant:acme-eu`
            # falls in the range too, and `tenant = :filter_tenant` leaves it out.
            found["filter_scope_from"] = f"tenant:{self.tenant}"
            found["filter_scope_to"] = f"tenant:{self.tenant}0"
        return found

    def covers(self, row: Mapping[str, Any]) -> bool:
        """A run, an anomaly or any row with tenant/workflow fields lies within the filter."""
        return all(row.get(level) == value for level, value in self.levels.items())

    def as_dict(self, run: str | None) -> dict[str, str | None]:
        return {"tenant": self.tenant, "workflow": self.workflow, "run": run}


def _filter_of(reader: Reader, tenant: str | None, workflow: str | None) -> ReportFilter:
    for flag, value in (("tenant", tenant), ("workflow", workflow)):
        if value is not None and not value.strip():
            raise ValueError(f"--{flag} wants a {flag} id; got an empty one")
    return ReportFilter(
        as_stored(reader, tenant, "tenant"),
        as_stored(reader, workflow, "workflow"),
        scope_range=reader.is_sqlite,
    )


def build(
    db: str,
    *,
    run: str | None = None,
    since: float | None = None,
    now: float | None = None,
    policy: Policy | None = None,
    timelines: bool = False,
    tenant: str | None = None,
    workflow: str | None = None,
) -> dict[str, Any]:
    """The report. `policy` supplies the anomaly settings (defaults otherwise); `timelines`
    makes the HTML page's data: every run's steps (up to TIMELINE_BUDGET), and, unless for one
    `run`, a per-run budget's many instances summarised (`budget_summaries`). `tenant` and
    `workflow` narrow it to that part of the fleet (ReportFilter); an unknown one gives an
    empty report."""
    reader = Reader(db)
    try:
        with reader.snapshot():  # its totals, runs and budgets as of one moment
            return _build(
                reader,
                run=as_stored(reader, run),
                since=since,
                now=now or time.time(),
                policy=policy,
                timelines=timelines,
                narrow=_filter_of(reader, tenant, workflow),
            )
    finally:
        reader.close()


def run_outside(
    db: str,
    run: str,
    *,
    since: float | None = None,
    now: float | None = None,
) -> bool:
    """Whether the ledger holds `run` (since the cut-off) at all: `--run X --tenant Y` found
    nothing, and says whether X is another tenant's/workflow's run or no run at all."""
    reader = Reader(db)
    try:
        floor = (now or time.time()) - since if since else 0.0
        return bool(
            reader.query(
                "SELECT 1 AS found FROM decisions WHERE run = :run AND ts >= :floor LIMIT 1",
                {"run": as_stored(reader, run), "floor": floor},
            )
        )
    finally:
        reader.close()


def _retried(rows: list[dict[str, Any]], retries: Callable[[str], int]) -> set[str]:
    """anomalies.retried() of rows of several runs, each run's by its own `retries`."""
    by_retries: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_retries[retries(row["scope"])].append(row)
    return set().union(*(anomaly_detection.retried(of, n) for n, of in by_retries.items()))


def _status(row: dict[str, Any], anomalies: list[dict[str, Any]]) -> str:
    if row["budget_denials"]:
        return "budget_exhausted"
    if row["other_denials"]:
        return "denied"
    if anomalies:
        return "anomalous"
    return "normal"


def _would_status(row: dict[str, Any]) -> str | None:
    """Shadow mode: the status the run would have had if its would_deny decisions were enforced."""
    if row["would_budget"]:
        return "budget_exhausted"
    if row["would_other"]:
        return "denied"
    if row["would_anomaly"]:
        return "anomalous"
    return None


def _build(
    reader: Reader,
    *,
    run: str | None,
    since: float | None,
    now: float,
    policy: Policy | None = None,
    timelines: bool = False,
    narrow: ReportFilter = ReportFilter(),
) -> dict[str, Any]:
    floor = now - since if since else 0.0
    where = "ts >= :floor" + (" AND run = :run" if run else "") + narrow.sql()
    params: dict[str, Any] = {"floor": floor, "run": run, **narrow.params}
    # One pass over the ledger gives the runs table, the decisions' totals, the agents' history
    # and what the detectors need to know which runs to read (anomalies.scan): a week of a
    # fleet (481k decisions) read into Python, row by row, took most of half a minute.
    active, active_params = anomaly_detection.active_where(floor, run, narrow.levels)
    groups = anomaly_detection.scan(
        reader,
        {"active": active, "listed": where},
        {**active_params, **params},
        RUN_COLUMNS
        + "".join(
            f", SUM(CASE WHEN {where} AND decision = '{decision}' THEN 1 ELSE 0 END) AS n_{decision}"
            for decision in DECISIONS
        ),
    )
    counts = {decision: sum(g[f"n_{decision}"] for g in groups) for decision in DECISIONS}
    if any(g["requests"] != g["allowed"] + g["denied"] + g["would_deny"] for g in groups):
        # A decision of another name, somewhere: counted as the ledger names it.
        for row in reader.query(
            f"SELECT decision, COUNT(*) AS n FROM decisions WHERE {where} GROUP BY decision",
            params,
        ):
            counts[row["decision"]] = row["n"]
    listed = {g["scope"] for g in groups if g["listed"]}
    run_scopes: tuple[str, dict[str, Any]] = ("", {})
    if run and len(listed) <= anomaly_detection.SCOPES_A_QUERY:
        # No index has the run column: its scopes (the same rows) find them by the scope index,
        # where each query of `--run` read the whole table.
        named = {f"run_scope_{i}": scope for i, scope in enumerate(sorted(listed))}
        marks = ", ".join(f":{name}" for name in named)
        run_scopes = (f" AND scope IN ({marks})" if named else " AND 1 = 0", named)
        where += run_scopes[0]
        params.update(named)

    # Judged by the settings the policy given says, else each run by those the proxy recorded
    # for the policy it made the run's decisions under: a shadow team reading its report
    # without --policy got the built-in thresholds, not the ones it had set.
    judgings = (
        anomaly_detection.RunJudgings(Judging.of(policy))
        if policy
        else anomaly_detection.judging_of(reader, where, params)
    )
    judgings = anomaly_detection.each_run(reader, judgings, groups, run)
    judging = judgings.newest
    found, window = anomaly_detection.find(
        reader, floor=floor, run=run, judging=judgings, within=narrow.levels, groups=groups
    )
    if narrow:
        # Found for the filter's runs (their workflows read whole): a workflow-wide anomaly
        # of a workflow name two tenants share names both, and is kept for the filter's own.
        found = [anomaly for anomaly in found if narrow.covers(anomaly)]
    # A run's steps are what its guards count: not the attempts its SDK retried after a failure
    # (up to anomalies.loop.retries a request), nor the proxy's own refusals. The attempts it
    # retried are shown too (`retried`): a reader sees the provider's trouble.

    def retries(scope: str) -> int:
        return int(judgings.of(scope).settings.get("loop").param("retries", 0))

    totals: dict[str, int] = defaultdict(int)  # scope -> its rows (the whole run's)
    not_counted: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # scope -> [no steps, retried]
    for group in window:
        if narrow.covers(group):
            totals[group["scope"]] += group["requests"]
            not_counted[group["scope"]][0] += group["requests"] - group["own"]  # the proxy's
    failed: dict[tuple[str, str], int] = defaultdict(int)
    for row in reader.query(
        f"""SELECT scope, fingerprint, tenant, workflow, COUNT(*) AS n FROM decisions
            WHERE {failed_attempt()} AND fingerprint <> '' AND {agents_own()}
            GROUP BY scope, fingerprint, tenant, workflow"""
    ):
        if row["scope"] in totals and narrow.covers(row):
            failed[(row["scope"], row["fingerprint"])] += int(row["n"])
    for (scope, _), n in failed.items():  # the first `retries` failed attempts of a request
        not_counted[scope][0] += forgiven(n, retries(scope))
        not_counted[scope][1] += forgiven(n, retries(scope))
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for anomaly in found:
        in_each_run = _for_each_run(anomaly)
        for scope in anomaly["runs"]:
            by_run[scope].append(in_each_run)
        anomaly["runs_total"] = len(anomaly["runs"])
        anomaly["runs"] = anomaly["runs"][: anomaly_detection.MAX_EVIDENCE]

    # Oldest first; runs that started together in the order of their scopes.
    run_rows = sorted(
        (g for g in groups if g["scope"] in listed and g["run"] is not None),
        key=itemgetter("started", "scope"),
    )
    runs = []
    for row in run_rows:
        run_anomalies = by_run.get(row["scope"], [])
        entry: dict[str, Any] = {
            "run": row["run"],
            "scope": row["scope"],
            "tenant": row["tenant"],
            "workflow": row["workflow"],
            "agent": row["agent"],
            "requests": row["requests"],
            "steps": row["requests"] - not_counted[row["scope"]][0],
            "retried": not_counted[row["scope"]][1],
            "allowed": row["allowed"],
            "denied": row["denied"],
            "would_deny": row["would_deny"],
            "usd": usd_float(row["usd"]),
            "usd_nanos": row["usd"],
            "est_usd": usd_float(row["est_usd"]),
            "tokens_in": row["tokens_in"],
            "tokens_out": row["tokens_out"],
            "tokens": row["tokens_in"] + row["tokens_out"],
            "started": iso_time(row["started"]),
            "ended": iso_time(row["ended"]),
            "duration_s": round((row["ended"] or row["started"]) - row["started"], 3),
            "status": _status(row, run_anomalies),
            "would_status": _would_status(row),
            "anomalies": run_anomalies,
            # The policy whose recorded (or given) settings judged it; None: the built-in ones.
            "judged_by": judgings.of(row["scope"]).digest or None,
            # A run active since the cut-off is reported whole, as its status and anomalies
            # judge it; this is the part of it inside the window.
            "in_window": {
                "requests": row["window_requests"],
                "usd": usd_float(row["window_usd"]),
                "usd_nanos": row["window_usd"],
            }
            if since
            else None,
        }
        runs.append(entry)
    embedded = (
        _add_timelines(
            runs,
            totals,
            found,
            lambda rows: _retried([r for r in rows if narrow.covers(r)], retries),
            lambda scopes: anomaly_detection.decision_rows(reader, scopes),
            one_run=run is not None,
        )
        if timelines
        else None
    )

    # Which policy's settings judged how many of the runs listed.
    by_policy = judgings.runs_by_policy(row["scope"] for row in run_rows)
    refusing = {g["scope"] for g in groups if g["budget_denials"] or g["would_budget"]}
    budgets = _budgets(reader, floor, run, narrow, listed, refusing)
    # The page (as the text table) gets a per-run budget's instances past MAX_RUN_INSTANCES
    # summarised: 48k runs made 96k budget rows and 48k spend series, 62 of the 94 s Chromium
    # took to open the page. `--run ID --html` shows that run's whole; `--json` every one.
    summaries: list[dict[str, Any]] | None = None
    shown = budgets
    if timelines and run is None:
        shown, summaries = _summarised(budgets)
    result: dict[str, Any] = {
        "generated_at": iso_time(now),
        "since": iso_time(floor) if since else None,
        "filter": narrow.as_dict(run),
        "budgets": shown,
        "runs": runs,
        "decisions": counts,
        "anomalies": found,
        "judged_by": {
            "source": judging.source,
            "policy_digest": judging.digest or None,
            # The settings other than policy_digest's that judged some of the runs listed.
            "other_settings": sum(1 for digest in by_policy if digest != judging.digest),
            "unrecorded_policies": judging.unrecorded,
            "runs_by_policy": by_policy,
        },
        "spend": _spend(
            reader, floor, run, budgets, shown if summaries else None, narrow, run_scopes
        ),
        "denials": _denials(reader, where, params),  # the latest MAX_DENIALS
        "denials_total": counts["deny"] + counts["would_deny"],
    }
    if embedded is not None:
        result["timelines"] = embedded
    if summaries is not None:
        result["budget_summaries"] = summaries
    return result


def _for_each_run(anomaly: dict[str, Any]) -> dict[str, Any]:
    """The anomaly as each run it names lists it. One that spans runs (a fan-out over 3,000
    documents) keeps its run list and evidence only in the report's `anomalies`: copied into
    every run, they made the report grow with the square of its runs (633 MB of JSON)."""
    runs = anomaly["runs"]
    if len(runs) <= 1:
        return {**anomaly, "runs_total": len(runs)}
    lists = ("runs", "evidence", "denied", "would_deny")
    light = {key: value for key, value in anomaly.items() if key not in lists}
    return {**light, "runs_total": len(runs), "evidence": [], "denied": [], "would_deny": []}


def _budgets(
    reader: Reader,
    floor: float,
    run: str | None,
    narrow: ReportFilter = ReportFilter(),
    listed: Collection[str] = (),
    refusing: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """The budget instances of the report. `narrow`: those that lie within it, and those its
    requests (`listed`: the runs of the report's decisions) are charged to with others',
    marked `shared`. `refusing`: the runs with a budget's refusal (_refused)."""
    # An instance belongs to the run when its scope ends with that run level (run is the last
    # level); LIKE wildcards in a run id are escaped so `r_1` matches only `r_1`.
    budget_where = "updated_at >= :floor" + (
        " AND (scope = :run_only OR scope LIKE :run_scope ESCAPE '\\')" if run else ""
    )
    params = {
        "floor": floor,
        "run_only": f"run:{run}",
        "run_scope": "%/run:"
        + (run or "").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"),
        **narrow.params,
    }
    budget_rows = reader.query(
        f"SELECT * FROM budget_instances WHERE {budget_where} ORDER BY budget, scope, window_start",
        params,
    )
    if floor > 0:
        budget_rows = _with_refusing(
            reader, budget_rows, floor, params if run else None, narrow.sql(), narrow.params
        )
    sides: dict[int, str] = {}
    if narrow:
        side_of = _budget_sides(narrow, listed)
        for row in budget_rows:
            if (side := side_of(row["scope"])) is not None:
                sides[row["id"]] = side
        budget_rows = [row for row in budget_rows if row["id"] in sides]
    refused = _refused(reader, budget_rows, params if run else None, refusing)
    budgets = []
    for row in budget_rows:
        shared = {"shared": sides[row["id"]] == "shared"} if narrow else {}
        budgets.append(
            {
                "id": row["id"],
                "budget": row["budget"],
                "scope": row["scope"],
                "per": row["per"],
                "window_start": iso_time(row["window_start"]) if row["window_start"] else None,
                "limit": {
                    "usd": usd_float(row["limit_usd"]),
                    "tokens": row["limit_tokens"],
                    "requests": row["limit_requests"],
                },
                "spent": {
                    "usd": usd_float(row["spent_usd"]),
                    "tokens": row["spent_tokens"],
                    "requests": row["spent_requests"],
                },
                "reserved": {
                    "usd": usd_float(row["reserved_usd"]),
                    "tokens": row["reserved_tokens"],
                    "requests": row["reserved_requests"],
                },
                # The usd figures above are floats for display; these are the ledger's exact
                # integers (nano-dollars), as runs[].usd_nanos is.
                "usd_nanos": {
                    "limit": row["limit_usd"],
                    "spent": row["spent_usd"],
                    "reserved": row["reserved_usd"],
                },
                # Spent and held reach a limit, or a reserve found no room in it this window:
                # the run that was refused reads `budget_exhausted`, and so does its budget.
                "exhausted": row["id"] in refused
                or any(
                    row[f"limit_{u}"] is not None
                    and row[f"spent_{u}"] + row[f"reserved_{u}"] >= row[f"limit_{u}"]
                    for u in ("usd", "tokens", "requests")
                ),
                **shared,
            }
        )
    return budgets


def _scope_levels(scope: str) -> dict[str, str]:
    """`tenant:acme/agent:a` as {level: value}; a global budget's instance `*` names none.
    Identity escapes `/` and `:` in values, so each segment splits at its first `:`."""
    if scope in ("", "*"):
        return {}
    return {level: value for level, _, value in (part.partition(":") for part in scope.split("/"))}


def _budget_sides(narrow: ReportFilter, listed: Iterable[str]) -> Callable[[str], str | None]:
    """How an instance scope stands to the filter: "own" when it lies within it, "shared" when
    the filter's requests are charged to it together with others', None when they are not.

    An instance is named by the values of its budget's levels (ScopePattern.instance):
    - it names the filter's levels with the filter's values (`tenant:acme`,
      `tenant:acme/agent:*`'s, `tenant:acme/workflow:w/run:7f3a`): within the filter, own;
    - it names a run of the filter's (`agent:a/run:7f3a` of `agent:*/run:*`): a run is one
      tenant's and one workflow's, so that run's own, as `--run` lists it;
    - it names neither, but the filter's requests fall in it (`*`, `agent:research` of
      `agent:*`, `tenant:acme` under `--workflow`): others' requests fall in it too: shared;
    - anything else (another tenant's instance, one no request of the filter's falls in): out.
    `listed`: the runs (scopes) of the report's decisions (the filter, `--run`, `--since`): a
    shared instance is listed when the report's own requests fall in it."""
    wanted = narrow.levels
    heads: set[tuple[tuple[str, str], ...]] = set()  # the filter's scopes less their run
    by_run: dict[str, list[dict[str, str]]] = defaultdict(list)
    for scope in listed:
        levels = _scope_levels(scope)
        heads.add(tuple((k, v) for k, v in levels.items() if k != "run"))
        if "run" in levels:
            by_run[levels["run"]].append(levels)
    without_run = [dict(head) for head in heads]
    known: dict[str, str | None] = {}  # one answer per scope: a windowed budget repeats it

    def side(scope: str) -> str | None:
        if scope in known:
            return known[scope]
        levels = _scope_levels(scope)
        named = {level: levels[level] for level in wanted if level in levels}
        found: str | None
        if named != {level: wanted[level] for level in named}:
            found = None  # another tenant's or workflow's
        elif len(named) == len(wanted):
            found = "own"
        else:
            scopes = by_run.get(levels["run"], []) if "run" in levels else without_run
            falls_in = any(all(s.get(k) == v for k, v in levels.items()) for s in scopes)
            found = None if not falls_in else "own" if "run" in levels else "shared"
        known[scope] = found
        return found

    return side


# Denials naming an instance of the run's (`_budgets`' params: its scope ends with the run).
_RUN_BUDGET = " AND (budget = :run_only OR budget LIKE :run_scope ESCAPE '\\')"


def _with_refusing(
    reader: Reader,
    rows: list[dict[str, Any]],
    floor: float,
    run_params: dict[str, Any] | None,
    narrow_sql: str = "",
    narrow_params: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """`rows` and the instances that refused calls since `floor` without changing since (a
    refusal writes nothing to its instance): `--since 1h` listed no budget while the run it
    covered read `budget_exhausted` all that hour. A window that ended before `floor` is not
    one of them. `narrow_sql`: only those that refused the filter's calls."""
    which = (_RUN_BUDGET if run_params else "") + narrow_sql
    scopes = [
        row["budget"]
        for row in reader.query(
            "SELECT DISTINCT budget FROM decisions WHERE reason_code = 'budget_exhausted' "
            f"AND decision IN ('deny', 'would_deny') AND ts >= :floor AND budget IS NOT NULL{which}",
            {**(run_params or {}), **(narrow_params or {}), "floor": floor},
        )
    ]
    known = {row["id"] for row in rows}
    found = list(rows)
    for start in range(0, len(scopes), 500):
        chunk = scopes[start : start + 500]
        names = {f"s{i}": scope for i, scope in enumerate(chunk)}
        for row in reader.query(
            "SELECT * FROM budget_instances WHERE scope IN ("
            + ", ".join(f":{name}" for name in names)
            + ")",
            names,
        ):
            end = window(row["per"], row["window_start"])[1]
            if row["id"] not in known and (end is None or end > floor):
                known.add(row["id"])
                found.append(row)
    if len(found) == len(rows):
        return rows
    return sorted(found, key=lambda row: (row["budget"], row["scope"], row["window_start"]))


def _refused(
    reader: Reader,
    rows: list[dict[str, Any]],
    run_params: dict[str, Any] | None,
    refusing: Collection[str] | None = None,
) -> set[int]:
    """The budget instances (ids) that refused a reserve in their window — or, shadow, would
    have: the `budget_exhausted` decisions naming their scope, in the words the proxy refuses
    with (Shortfall.describe: `budget SCOPE usd 0.05 exhausted (…`), which name the instance's
    scope, unit, limit and window: of two budgets on one scope, only the one that refused is
    named (unless both have that same limit and window: the words cannot tell them apart).
    `refusing`: the runs (scopes) that hold every such decision, found by the scope index (no
    index has the reason: the whole table was read for a few hundred rows)."""
    if not rows:
        return set()
    which = _RUN_BUDGET if run_params else ""
    sql = (
        "SELECT budget, reason, ts FROM decisions WHERE reason_code = 'budget_exhausted' "
        f"AND decision IN ('deny', 'would_deny') AND ts >= :first{which}"
    )
    params = {**(run_params or {}), "first": min(row["window_start"] or 0 for row in rows)}
    if refusing is None or len(refusing) > anomaly_detection.MANY_SCOPES:
        denials = reader.query(sql, params)
    else:
        denials = anomaly_detection.query_in(reader, f"{sql} AND {{in}}", "scope", refusing, params)
    named = {denial["budget"] for denial in denials}
    by_scope: dict[str, list[tuple[dict[str, Any], tuple[str, ...], int | None]]] = defaultdict(
        list
    )
    for row in rows:
        if row["scope"] not in named:  # worded only for the instances a denial names
            continue
        claim = Claim(
            row["budget"],
            row["scope"],
            row["limit_usd"],
            row["limit_tokens"],
            row["limit_requests"],
            row["per"],
        )
        by_scope[row["scope"]].append(
            (row, _refusal_words(claim), window(row["per"], row["window_start"])[1])
        )
    refused: set[int] = set()
    for denial in denials:
        for row, words, end in by_scope.get(denial["budget"], ()):
            if (
                row["id"] not in refused
                and (row["window_start"] or 0) <= denial["ts"]
                and (end is None or denial["ts"] < end)
                and (denial["reason"] or "").startswith(words)
            ):
                refused.add(row["id"])
    return refused


def _refusal_words(claim: Claim) -> tuple[str, ...]:
    """How a refusal by this instance begins (Shortfall.head), spent (`… exhausted (`) or
    smaller than the call (`… is less than this call needs`), with its dollar limit as now
    (`usd 0.015`) or as earlier drawdowns rounded it (`usd 0.02`; `usd 0.0150`)."""
    words = []
    for unit in UNITS:
        limit = claim.limit(unit)
        if limit is None:
            continue
        short = Shortfall(claim, unit, limit, 0, 0, 0)
        spellings = [None, format_usd(limit, 2), format_usd(limit)] if unit == "usd" else [None]
        for spelt in spellings:
            head = short.head(spelt)
            words += [f"{head} {EXHAUSTED} (", f"{head} {TOO_BIG}"]
    return tuple(words)


def _bucket_size(first: float, last: float) -> int:
    span = max(last - first, 1.0)
    return next((size for size in BUCKETS if span / size <= MAX_BUCKETS), BUCKETS[-1])


def _bucket_sql(at: str, sqlite: bool) -> str:
    """SQL for the start of the bucket of `:size` seconds the time `at` falls in, as Python's
    `int(at // size) * size` takes it: in integers, floor(at) less its remainder by the size
    (a float quotient may round up into the next bucket)."""
    if sqlite:  # FLOOR() and MOD() are not in every build
        second = f"(CAST({at} AS INTEGER) - ({at} < CAST({at} AS INTEGER)))"
        return f"{second} - (({second} % :size) + :size) % :size"
    second = f"CAST(FLOOR({at}) AS BIGINT)"  # a cast alone rounds
    return f"{second} - MOD(MOD({second}, :size) + :size, :size)"  # psycopg reads `%` itself


def _spend(
    reader: Reader,
    floor: float,
    run: str | None,
    budgets: list[dict[str, Any]],
    shown: list[dict[str, Any]] | None = None,
    narrow: ReportFilter = ReportFilter(),
    run_scopes: tuple[str, dict[str, Any]] = ("", {}),
) -> dict[str, Any]:
    """Budget use over time: what committed calls charged, per budget instance and in total,
    in time buckets (from the holds: each names the instances it was charged to). A batch's
    submission is charged its request when it is sent, though its hold is kept until the
    batch ends (released then, or expired at its window): it counts at its submission.
    `shown`: only these instances get a series (the page's); `series_omitted` counts the rest
    that had one. `narrow`: the filter's calls only; a `shared` instance gets no series (it
    would draw the filter's part of it against everyone's limit). `run_scopes`: the run's
    scopes, SQL and parameters, to find its decisions by (`_build`)."""
    decision_filter = (" AND run = :run" + run_scopes[0] if run else "") + narrow.sql()
    run_filter = (
        f" AND h.id IN (SELECT hold_id FROM decisions WHERE hold_id IS NOT NULL{decision_filter})"
        if decision_filter
        else ""
    )
    params = {"floor": floor, "run": run, "holder": BATCH_HOLDER, **narrow.params, **run_scopes[1]}
    # (the time a hold counts at, its FROM and WHERE): each settled hold, and each batch
    # submission at the time it was sent (schema v6: batches held while they run).
    sources = [
        (
            "h.settled_at",
            "FROM holds h WHERE h.settled_at >= :floor AND h.state IN ('committed', 'expired') "
            "AND h.actual_usd IS NOT NULL AND h.process_id <> :holder" + run_filter,
        )
    ]
    if reader.schema_version >= 6:
        sources.append(
            (
                "b.ts",
                "FROM batch_holds b JOIN holds h ON h.id = b.hold_id "
                "WHERE b.ts >= :floor AND h.actual_usd IS NOT NULL" + run_filter,
            )
        )
    budgets = [b for b in budgets if not b.get("shared")]
    if shown is not None:
        shown = [b for b in shown if not b.get("shared")]
    empty: dict[str, Any] = {"bucket_seconds": BUCKETS[0], "series": []}
    if shown is not None:
        empty["series_omitted"] = 0
    spans = [
        span
        for at, body in sources
        for span in reader.query(f"SELECT MIN({at}) AS first, MAX({at}) AS last {body}", params)
        if span["first"] is not None
    ]
    if not spans:
        return empty
    size = _bucket_size(min(s["first"] for s in spans), max(s["last"] for s in spans))
    # Summed in the database by the instances a hold names and its bucket: a week's 460k holds
    # share a few 10,000 such pairs (each read into Python took 5 s).
    groups: list[tuple[Any, ...]] = []
    for source, (at, body) in enumerate(sources):
        bucket = _bucket_sql(at, reader.is_sqlite)
        groups += (
            (g["first"], source, g["first_id"], g["instance_ids"], g["bucket"], g["usd"],
             g["tokens"], g["requests"])
            for g in reader.query(
                f"""SELECT h.instance_ids, {bucket} AS bucket, MIN({at}) AS first,
                           MIN(h.id) AS first_id, SUM(h.actual_usd) AS usd,
                           SUM(COALESCE(h.actual_tokens, 0)) AS tokens,
                           SUM(COALESCE(h.actual_requests, 0)) AS requests
                    {body} GROUP BY 1, 2""",
                {**params, "size": size},
            )
        )  # fmt: skip
    # In the order their first holds settled, as each hold was added in turn: a series whose
    # spend ties another's keeps its place.
    groups.sort(key=itemgetter(0, 1, 2))
    known = {b["id"]: b for b in (budgets if shown is None else shown)}
    left_out: set[int] = set()
    if shown is not None:
        everyone = {b["id"] for b in budgets}
    sums: dict[Any, dict[int, list[int]]] = {}  # key -> bucket -> [usd, tokens, requests]
    for _, _, _, text, bucket, usd, tokens, requests in groups:
        ids = [int(i) for i in (text or "").split(",") if i]
        if shown is not None:
            left_out.update(i for i in ids if i in everyone and i not in known)
        start = int(bucket)
        for key in ("total", *(i for i in ids if i in known)):
            cells = sums.get(key)
            if cells is None:
                cells = sums[key] = {}
            cell = cells.get(start)
            if cell is None:
                cells[start] = [usd or 0, tokens or 0, requests or 0]
            else:
                cell[0] += usd or 0
                cell[1] += tokens or 0
                cell[2] += requests or 0
    series = []
    starts: dict[int, str | None] = {}  # each bucket's time, written once (60k series share 28)
    for key, buckets in sums.items():
        budget = known.get(key)
        cumulative = 0
        points = []
        for start in sorted(buckets):
            usd, tokens, requests = buckets[start]
            cumulative += usd
            if start not in starts:
                starts[start] = iso_time(start)
            points.append(
                {
                    "t": start,
                    "start": starts[start],
                    "usd": usd_float(usd),
                    "tokens": tokens,
                    "requests": requests,
                    "cum_usd": usd_float(cumulative),
                }
            )
        series.append(
            {
                "scope": budget["scope"] if budget else "all spend",
                "budget": budget["budget"] if budget else None,
                "per": budget["per"] if budget else None,
                "window_start": budget["window_start"] if budget else None,
                "limit": budget["limit"] if budget else None,
                "usd": usd_float(cumulative),
                "points": points,
            }
        )
    series.sort(key=lambda s: (s["budget"] is not None, -(s["usd"] or 0), s["scope"]))
    result: dict[str, Any] = {"bucket_seconds": size, "series": series}
    if shown is not None:
        result["series_omitted"] = len(left_out)
    return result


def _denials(reader: Reader, where: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    rows = reader.query(
        f"""SELECT request_id, ts, decision, reason_code, reason, scope, agent, run, action, budget,
                   status, est_usd
            FROM decisions WHERE {where} AND decision IN ('deny', 'would_deny')
            ORDER BY ts DESC, id DESC LIMIT {MAX_DENIALS}""",
        params,
    )
    return [
        {**row, "ts": iso_time(row["ts"]), "est_usd": usd_float(row["est_usd"])}
        for row in reversed(rows)
    ]


def _timeline_order(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs in the order they get a timeline from the page's budget: those a reader opens
    first (budget_exhausted, denied, anomalous, or so in shadow mode), then the rest; the most
    recent first within each."""
    by_recency = sorted(runs, key=lambda r: r["ended"] or r["started"] or "", reverse=True)
    return sorted(by_recency, key=lambda r: r["status"] == "normal" and r["would_status"] is None)


def _add_timelines(
    runs: list[dict[str, Any]],
    totals: Mapping[str, int],
    found: list[dict[str, Any]],
    retried_in: Callable[[list[dict[str, Any]]], set[str]],
    whole_rows: Callable[[Iterable[str]], list[dict[str, Any]]],
    *,
    one_run: bool = False,
) -> dict[str, int]:
    """Every attempt of each run, as the `timeline` the HTML page draws; `retried_in(rows)`:
    the failed attempts its SDK retried among its rows, shown but no steps; `totals`: each
    run's decisions (scope → how many), `whole_rows(scopes)`: all of the runs drawn. The page
    holds at most TIMELINE_BUDGET steps (MAX_TIMELINE a run, but the whole budget for
    `one_run`): a run whose steps no longer fit gets none (`timeline_omitted`), and a smaller
    one after it may still fit. Returns what the page holds: {budget, steps, runs_omitted}."""
    flagged: dict[str, list[str]] = defaultdict(list)
    for anomaly in found:
        for request_id in anomaly["evidence"]:
            flagged[request_id].append(anomaly["kind"])
    per_run = TIMELINE_BUDGET if one_run else MAX_TIMELINE
    left = TIMELINE_BUDGET
    drawn = []
    for entry in _timeline_order(runs):
        entry["timeline_total"] = totals.get(entry["scope"], 0)  # whole runs, as the table
        shown = min(entry["timeline_total"], per_run)
        entry["timeline_omitted"] = shown > left
        entry["timeline"] = []
        if not entry["timeline_omitted"]:
            left -= shown
            drawn.append(entry)
    steps: dict[str, list[dict[str, Any]]] = defaultdict(list)
    drawn_rows = whole_rows(entry["scope"] for entry in drawn)  # only the runs drawn
    for row in drawn_rows:
        steps[row["scope"]].append(row)
    retried = retried_in(drawn_rows)
    for entry in drawn:
        scope_rows = steps[entry["scope"]]
        start = scope_rows[0]["ts"] if scope_rows else 0.0
        entry["timeline"] = [_step(row, start, flagged, retried) for row in scope_rows[:per_run]]
    omitted = len(runs) - len(drawn)
    return {"budget": TIMELINE_BUDGET, "steps": TIMELINE_BUDGET - left, "runs_omitted": omitted}


def _step(
    row: dict[str, Any], start: float, flagged: dict[str, list[str]], retried: set[str]
) -> dict[str, Any]:
    ended = row.get("completed_at")
    duration = row.get("latency_ms")
    if duration is None and ended:
        duration = (ended - row["ts"]) * 1000
    return {
        "request_id": row["request_id"],
        "t": round(row["ts"] - start, 4),
        "ts": iso_time(row["ts"]),
        "ms": round(duration, 2) if duration is not None else None,
        "action": row.get("action"),
        "model": row.get("model"),
        "decision": row["decision"],
        "reason_code": row.get("reason_code"),
        "reason": row.get("reason"),
        "status": row.get("status"),
        "usd": usd_float(row.get("actual_usd") or 0),
        "est_usd": usd_float(row.get("est_usd") or 0),
        "tokens": (row.get("tokens_in") or 0) + (row.get("tokens_out") or 0),
        "request": f"{row.get('method') or ''} {row.get('host') or ''}{row.get('path') or ''}".strip(),
        "anomalies": flagged.get(row["request_id"], []),
        "retried": row["request_id"] in retried,
    }


# --- text ----------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[printable(c) if c is not None else "-" for c in r] for r in rows]  # a NULL column
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = [headers, *rows]
    # The last column is padded too: strip it, or every line ends in spaces.
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _limit(value: Any) -> str:
    return "-" if value is None else str(value)


def _requests_cell(run: dict[str, Any]) -> str:
    window = run.get("in_window")
    if window is None or window["requests"] == run["requests"]:
        return str(run["requests"])
    return f"{run['requests']} ({window['requests']} since)"


def _steps_cell(run: dict[str, Any]) -> str:
    retried = run.get("retried") or 0
    return str(run["steps"]) + (f" (+{retried} retried)" if retried else "")


def _per_run(budget: dict[str, Any]) -> bool:
    """An instance per run: the budget's last level is the run (`agent:*/run:*`)."""
    return budget["scope"].rsplit("/", 1)[-1].startswith("run:")


def _spent_most(budget: dict[str, Any]) -> tuple[int, int, int]:
    return (
        budget["usd_nanos"]["spent"] or 0,
        budget["spent"]["requests"] or 0,
        budget["spent"]["tokens"] or 0,
    )


def _group_of(budget: dict[str, Any]) -> str | None:
    """How a budget's many instances are summarised: one per run ("runs": those that spent
    most are listed) or, not per run, one per window ("windows": the latest are listed)."""
    if _per_run(budget):
        return "runs"
    return "windows" if budget["per"] else None


def _summarised(
    budgets: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The instances listed, and a summary of each budget past MAX_RUN_INSTANCES instances
    of one kind (_group_of): only TOP_INSTANCES are listed, in the place of its first. A
    `per: minute` budget makes 1,440 instances a day for each agent it covers."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for budget in budgets:
        kind = _group_of(budget)
        if kind is not None:
            groups[(budget["budget"], kind)].append(budget)
    many = {key: group for key, group in groups.items() if len(group) > MAX_RUN_INSTANCES}
    listed: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for budget in budgets:
        kind = _group_of(budget)
        group = many.get((budget["budget"], kind)) if kind is not None else None
        if group is None:
            listed.append(budget)
        elif budget is group[0]:
            if kind == "runs":
                # The exhausted first: in a shadow week, the runs enforcement would have stopped
                # are what the report is read for, and those that spent most may not be them.
                most = sorted(group, key=lambda b: (b["exhausted"], *_spent_most(b)), reverse=True)
                top = most[:TOP_INSTANCES]
            else:
                latest = sorted(group, key=lambda b: b["window_start"] or "", reverse=True)
                top = latest[:TOP_INSTANCES]
            listed.extend(top)
            spent = sum(b["usd_nanos"]["spent"] or 0 for b in group)
            held = sum(b["usd_nanos"]["reserved"] or 0 for b in group)
            summaries.append(
                {
                    "budget": budget["budget"],
                    "of": kind,
                    "instances": len(group),
                    "exhausted": sum(1 for b in group if b["exhausted"]),
                    "listed": len(top),
                    "usd": {"spent": usd_float(spent), "reserved": usd_float(held)},
                    "usd_nanos": {"spent": spent, "reserved": held},
                }
            )
    return listed, summaries


def _listed_budgets(
    budgets: list[dict[str, Any]], every_instance: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """The instances the BUDGETS table lists, and a line for each per-run budget it summarises."""
    if every_instance:
        return budgets, []
    listed, summaries = _summarised(budgets)
    return listed, [
        printable(
            f"{s['budget']}: {s['instances']:,} "
            + ("run instances" if s["of"] == "runs" else "windows")
            + f", {s['exhausted']:,} exhausted, "
            f"{exact_usd(s['usd_nanos']['spent'])} spent and "
            f"{exact_usd(s['usd_nanos']['reserved'])} held in all; listed: the "
            + (
                f"{s['listed']} exhausted or that spent most (`--run ID` lists a run's own, "
                "`--json` all)"
                if s["of"] == "runs"
                else f"{s['listed']} latest (`--json` lists all)"
            )
        )
        for s in summaries
    ]


def render_text(data: dict[str, Any], *, every_instance: bool = False) -> str:
    """`every_instance`: list every per-run budget instance (`--run`), else past
    MAX_RUN_INSTANCES of one budget only those exhausted or that spent most and a count."""
    out = []
    narrowed = data.get("filter") or {}
    if narrowed.get("tenant") is not None or narrowed.get("workflow") is not None:
        # A team's part of the fleet: said first, so a report of 0 runs is not read as a quiet
        # fleet (an unknown tenant gives an empty report, not an error).
        out.append(
            printable(
                "report of "
                + ", ".join(
                    f"{level} {narrowed[level]}"
                    for level in ("tenant", "workflow", "run")
                    if narrowed.get(level) is not None
                )
            )
        )
    d = data["decisions"]
    # Only shadow mode records would_deny: an enforced ledger's line says nothing of shadow.
    shadow = f", {d['would_deny']} would be denied (shadow)" if d["would_deny"] else ""
    out.append(f"decisions: {d['allow']} allowed, {d['deny']} denied{shadow}")
    if judged := _judged_by(data.get("judged_by")):
        out.append(judged)
    out.append("")
    out.append("RUNS")
    out.append(
        _table(
            [
                "scope",
                "status",
                "requests",
                "steps",
                "allowed",
                "denied",
                "would_deny",
                "usd",
                "tokens in/out",
                "anomalies",
            ],
            [
                [
                    r["scope"],
                    r["status"] + (f" (shadow: {r['would_status']})" if r["would_status"] else ""),
                    _requests_cell(r),
                    _steps_cell(r),
                    str(r["allowed"]),
                    str(r["denied"]),
                    str(r["would_deny"]),
                    exact_usd(r["usd_nanos"]),
                    f"{r['tokens_in']}/{r['tokens_out']}",
                    ",".join(sorted({a["kind"] for a in r["anomalies"]})) or "-",
                ]
                for r in data["runs"]
            ],
        )
        if data["runs"]
        else "(no runs)"
    )
    if any(_requests_cell(r) != str(r["requests"]) for r in data["runs"]):
        out.append(
            f"(runs active since {data['since']} are shown whole, as their status and anomalies "
            "judge them; `N since`: their requests from then on)"
        )
    out.append("")
    out.append("BUDGETS")
    rows = []
    listed, summaries = _listed_budgets(data["budgets"], every_instance)
    for b in listed:
        for unit in ("usd", "tokens", "requests"):
            limit = b["limit"][unit]
            if limit is None:
                continue
            rows.append(
                [
                    b["budget"],  # two budgets may share an instance scope (say, one per action)
                    b["scope"] + _marks(b),
                    (b["per"] or "lifetime")
                    + (f" from {b['window_start']}" if b["window_start"] else ""),
                    unit,
                    # usd exactly, from the nanos, as RUNS (a float rounded to 4 places showed
                    # a small spend as 0.0000, and 0.00015 as 0.0001)
                    *(
                        (exact_usd(b["usd_nanos"][k]) for k in ("spent", "reserved", "limit"))
                        if unit == "usd"
                        else (str(b["spent"][unit]), str(b["reserved"][unit]), _limit(limit))
                    ),
                ]
            )
    out.append(
        _table(["budget", "instance", "window", "unit", "spent", "held", "limit"], rows)
        if rows
        else "(no budgets)"
    )
    out.extend(f"({line})" for line in summaries)
    if any(b.get("shared") for b in listed):
        out.append(
            "(shared: an instance this report's requests are charged to together with others' "
            "outside it; its spent and held are everyone's)"
        )
    if data["anomalies"]:
        out.append("")
        out.append("ANOMALIES")
        for a in data["anomalies"]:
            denied = f" [denied {len(a['denied'])}]" if a.get("denied") else ""
            if a.get("would_deny"):
                denied += f" [would deny {len(a['would_deny'])}]"
            out.append(printable(f"  {a['kind']:<14} {a['scope']}: {a['detail']}{denied}"))
    return "\n".join(out)


def _marks(budget: dict[str, Any]) -> str:
    """` (shared, exhausted)`: what the JSON says of an instance beside its numbers (an instance
    refused a call for more than was left reads exhausted below its limit)."""
    marks = [mark for mark in ("shared", "exhausted") if budget.get(mark)]
    return f" ({', '.join(marks)})" if marks else ""


def _judged_by(judged: dict[str, Any] | None) -> str:
    """Whose anomaly settings the report applied: a reader comparing it with the policy's
    thresholds must know."""
    if not judged:
        return ""
    source, digest = judged["source"], judged["policy_digest"]
    unrecorded = judged.get("unrecorded_policies") or 0
    if source == "policy":
        line = f"anomalies judged by the policy given (--policy, {digest})"
    elif source == "ledger" and len(by_policy := judged.get("runs_by_policy") or {}) > 1:
        each = ", ".join(
            f"{policy} ({n} run{'s' if n != 1 else ''})" for policy, n in by_policy.items()
        )
        line = f"anomalies judged by the settings the proxy recorded for each run's policy: {each}"
    elif source == "ledger":
        # The one that judged the runs listed (a newer decision may be of no run: a scope
        # without a run level).
        digest = next(iter(by_policy), digest)
        line = (
            f"anomalies judged by the settings of policy {digest}, the proxy's, as it recorded them"
        )
    elif unrecorded:
        line = "anomalies judged by the built-in settings (see --policy)"
    else:
        return ""  # no decision here names a policy: nothing was judged that settings change
    if unrecorded:
        line += (
            f"; {unrecorded} polic{'ies' if unrecorded != 1 else 'y'} of these decisions left "
            "no settings in the ledger (an older drawdown's)"
        )
    return line


# --- decision log (JSON lines) -------------------------------------------------------------

_JSON_COLUMNS = ("query", "body_fields", "body", "mcp")
_USD_COLUMNS = ("est_usd", "actual_usd")
PAGE = 1000


def decision_log(
    db: str,
    *,
    run: str | None = None,
    since: float | None = None,
    now: float | None = None,
    tenant: str | None = None,
    workflow: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Every decision in the window (of `tenant`/`workflow` when given), oldest first, one
    dict each (read page by page)."""
    reader = Reader(db)
    try:
        run = as_stored(reader, run)
        narrow = _filter_of(reader, tenant, workflow)
        floor = (now or time.time()) - since if since else 0.0
        where = "id > :after AND ts >= :floor" + (" AND run = :run" if run else "") + narrow.sql()
        after = 0
        while True:
            page = reader.query(
                f"SELECT * FROM decisions WHERE {where} ORDER BY id LIMIT {PAGE}",
                {"after": after, "floor": floor, "run": run, **narrow.params},
            )
            for row in page:
                yield _log_entry(row)
            if len(page) < PAGE:
                return
            after = page[-1]["id"]
    finally:
        reader.close()


def _log_entry(row: dict[str, Any]) -> dict[str, Any]:
    entry = dict(row)
    entry["time"] = iso_time(row["ts"])
    for column in _USD_COLUMNS:
        if column in entry:
            entry[f"{column}_nanos"] = entry[column]
            entry[column] = usd_float(entry[column])
    for column in _JSON_COLUMNS:
        value = entry.get(column)
        if isinstance(value, str):
            try:
                entry[column] = redact(json.loads(value))  # again: older rows, other writers
            except ValueError:
                entry[column] = None
    if "stream" in entry and entry["stream"] is not None:
        entry["stream"] = bool(entry["stream"])
    return entry


def stream_jsonl(
    db: str,
    out: IO[str],
    *,
    run: str | None = None,
    since: float | None = None,
    now: float | None = None,
    tenant: str | None = None,
    workflow: str | None = None,
) -> int:
    """Write the decision log as JSON lines; returns how many."""
    count = 0
    for entry in decision_log(db, run=run, since=since, now=now, tenant=tenant, workflow=workflow):
        out.write(json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n")
        count += 1
    return count


# --- HTML ----------------------------------------------------------------------------------


def _script_json(data: Any) -> str:
    """JSON safe inside a <script> element: nothing in it can close the element or open a comment."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text


def render_html(data: dict[str, Any]) -> str:
    """One self-contained page (inline CSS, JS and SVG; nothing fetched when it is viewed).

    The data travels as JSON in a non-executable <script> element and the page's script
    builds the DOM with textContent/setAttribute only, so no agent name, path or reason
    can become markup.
    """
    folder = resources.files("drawdown") / "report_html"
    page = (folder / "report.html").read_text(encoding="utf-8")
    script = (folder / "report.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    parts = {
        "/*__CSS__*/": (folder / "report.css").read_text(encoding="utf-8"),
        "/*__JS__*/": script,
        # Only this exact script may run (Content-Security-Policy): defence in depth.
        "/*__SCRIPT_HASH__*/": f"sha256-{digest}",
        "/*__DATA__*/": _script_json(data),
    }
    # One pass: text put in is never searched again for markers.
    return _MARKERS.sub(lambda m: parts[m.group(0)], page)


_MARKERS = re.compile(r"/\*__(?:CSS|JS|SCRIPT_HASH|DATA)__\*/")
