"""Structural anomaly detection (SPEC §9): deterministic signals read from the ledger, no LLM judge.

Every detector looks only at what the reserve/commit record holds — decision rows, their
holds, fingerprints, estimates, actuals and latencies — so the same ledger and the same
settings always give the same anomalies. Settings come from the policy's `anomalies:`
section (`policy.model.DETECTORS` holds the defaults):

    loop            the same request (decisions.fingerprint: action + method + path + body)
                    made more than `repeats` times in one scope (a run)
    step_count      a run with more than `max` steps; or, once the agent has
                    `history_min_runs` earlier runs, more than `history_factor` × the
                    `history_percentile` of its last `history_runs` runs
    fan_out         a workflow with more than `max_runs_per_workflow` runs (distinct scopes)
                    or `max_agents_per_workflow` agents
    handoff         two agents of one workflow whose step counts differ by more than
                    `ratio` (the busier one with at least `min_steps`), steps counted as
                    step_count counts them
    under_commit    a committed, costed call charged below `ratio` × its reservation
                    (default actions: tool calls — an LLM reservation holds max_tokens)
    fast_commit     a call the upstream answered in under `latency_ms` (default actions:
                    billable LLM calls — no real model answers in a few milliseconds)
    drift           a committed call charged above `ratio` × its estimate
    unpriced_model  an LLM call on a model genai-prices does not know, charged at the
                    fallback price

loop, step_count and fan_out count exactly what the reserve-time guards count
(the ledger's `plan.Counts.trip`), so a detector set to `on_detect: deny` flags the runs it denied:
loop and step_count leave out the first `loop.retries` failed attempts of each request in a run
(ledger.api.failed_attempt: answered 408/409/429/5xx or not at all, which the SDKs retry), and
so do handoff and the report's steps (`not_steps`).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from .ledger.api import (
    PROXY_REFUSALS,
    LedgerError,
    agents_own,
    failed_attempt,
    forgiven,
    is_failed_attempt,
    is_window_refusal,
)
from .ledger.reader import Reader
from .money import format_usd
from .policy.model import JUDGING_KEY, AnomalySettings, Detector, Judging, Policy

LLM_PROVIDERS = ("openai", "anthropic", "gemini", "bedrock")
MAX_EVIDENCE = 200  # ids listed per anomaly; `evidence_total` tells how many there were
GUARDED = ("loop", "step_count", "fan_out")  # detectors that may deny at reserve time


@dataclass
class Anomaly:
    kind: str
    scope: str  # the run's scope path, or tenant/workflow for workflow-wide anomalies
    detail: str  # plain words
    evidence: list[str]  # request ids of the decisions involved, oldest first
    run: str | None = None
    agent: str | None = None
    workflow: str | None = None
    tenant: str | None = None
    on_detect: str = "flag"
    denied: list[str] = field(default_factory=list)  # evidence the guard refused (on_detect: deny)
    would_deny: list[str] = field(default_factory=list)  # evidence a shadow-mode guard let through
    runs: list[str] = field(default_factory=list)  # run scopes the anomaly concerns
    first_ts: float = 0.0
    # Whether the live guard enforces this rule: step_count's history rule and fan_out's
    # agents are only ever flagged, whatever on_detect says (the report said "deny").
    guarded: bool = True
    # Made of a guard's refusals that no flagged anomaly explains (detect()).
    refusals_only: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "scope": self.scope,
            "run": self.run,
            "agent": self.agent,
            "workflow": self.workflow,
            "tenant": self.tenant,
            "detail": self.detail,
            "evidence": self.evidence[:MAX_EVIDENCE],
            "evidence_total": len(self.evidence),
            "on_detect": self.on_detect,
            "denied": self.denied[:MAX_EVIDENCE],
            "would_deny": self.would_deny[:MAX_EVIDENCE],
            "runs": self.runs or [self.scope],
        }


def _ids(rows: Iterable[dict[str, Any]]) -> list[str]:
    return [r["request_id"] for r in rows]


def _committed(row: dict[str, Any]) -> bool:
    """Forwarded, answered 2xx and charged (not released, not denied). A hold the sweeper
    expired counts when its call's commit came late and charged it (the ledger's late commit:
    the decision row then has its status and actual; an expired hold never committed has none)."""
    status = row.get("status")
    return (
        row.get("decision") != "deny"
        and (
            row.get("hold_state") == "committed"
            or (row.get("hold_state") == "expired" and row.get("actual_usd") is not None)
        )
        and status is not None
        and 200 <= int(status) < 300
    )


def _failed(row: dict[str, Any]) -> bool:
    """A failed attempt its SDK retries (ledger.api.failed_attempt)."""
    status = row.get("status")
    return is_failed_attempt(
        row.get("decision"),
        row.get("fingerprint"),
        None if status is None else int(status),
        row.get("completed_at") is not None,
    )


def _window_refused(row: dict[str, Any]) -> bool:
    """A budget window's refusal, which the loop guard forgives as a failed attempt."""
    status = row.get("status")
    return is_window_refusal(
        row.get("decision"), row.get("reason_code"), None if status is None else int(status)
    )


def _is_llm(row: dict[str, Any]) -> bool:
    return row.get("provider") in LLM_PROVIDERS


def _a_models_answer(row: dict[str, Any]) -> bool:
    """Not a batch's submission: its answer is the job's receipt (a model answers later, and
    the batch is charged when its results are read), so its speed and its $0 say nothing."""
    from .meter.api import batch_submission  # as _model_known: the meter only when needed

    provider, method, path = row.get("provider"), row.get("method"), row.get("path")
    return not (
        provider in LLM_PROVIDERS
        and isinstance(method, str)
        and isinstance(path, str)
        and batch_submission(provider, method, path)
    )


def _run_of(row: dict[str, Any], kind: str, detail: str, rows: list[dict[str, Any]]) -> Anomaly:
    return Anomaly(
        kind=kind,
        scope=row["scope"],
        detail=detail,
        evidence=_ids(rows),
        run=row.get("run"),
        agent=row.get("agent"),
        workflow=row.get("workflow"),
        tenant=row.get("tenant"),
        first_ts=rows[0]["ts"],
    )


def _by_scope(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["scope"]].append(row)
    return grouped


def _usd(nanos: int | None) -> str:
    return format_usd(nanos or 0)


def _once_per_run(
    hits: Iterable[dict[str, Any]],
    kind: str,
    describe: Callable[[list[dict[str, Any]], str], str],
) -> list[Anomaly]:
    """One anomaly per run for the calls a per-call detector flagged; `describe(rows, kinds)`
    words it from the run's flagged rows (oldest first) and their action kinds."""
    found = []
    for scope_rows in _by_scope(hits).values():
        kinds = ", ".join(sorted({str(r.get("action")) for r in scope_rows}))
        found.append(_run_of(scope_rows[0], kind, describe(scope_rows, kinds), scope_rows))
    return found


# --- per-call detectors, reported once per run ---------------------------------------------


def under_commit(rows: Sequence[dict[str, Any]], detector: Detector) -> list[Anomaly]:
    ratio = Decimal(detector.param("ratio"))
    hits = [
        r
        for r in rows
        if _committed(r)
        and (r.get("est_usd") or 0) > 0
        and (detector.covers(r.get("action")) if detector.actions else not _is_llm(r))
        and Decimal(r.get("actual_usd") or 0) < ratio * Decimal(r["est_usd"])
        and _a_models_answer(r)
    ]
    return _once_per_run(
        hits,
        "under_commit",
        lambda rows, kinds: (
            f"{len(rows)} {kinds} call(s) committed far below their reservation "
            f"(first: {_usd(rows[0].get('actual_usd'))} of {_usd(rows[0]['est_usd'])}, under "
            f"{ratio} × the reservation): the result may be fabricated or cached"
        ),
    )


def fast_commit(rows: Sequence[dict[str, Any]], detector: Detector) -> list[Anomaly]:
    limit = float(detector.param("latency_ms"))

    def latency(row: dict[str, Any]) -> float | None:
        value = row.get("upstream_ms")
        return row.get("latency_ms") if value is None else value

    hits = [
        r
        for r in rows
        if _committed(r)
        and latency(r) is not None
        and 0 <= latency(r) < limit  # negative: a clock stepped back (older ledgers)
        and (
            detector.covers(r.get("action"))
            if detector.actions
            else _is_llm(r) and (r.get("est_usd") or 0) > 0
        )
        and _a_models_answer(r)
    ]
    return _once_per_run(
        hits,
        "fast_commit",
        lambda rows, kinds: (
            f"{len(rows)} {kinds} call(s) answered in under {limit:g} ms "
            f"(first: {latency(rows[0]):.1f} ms), too fast for a real call: "
            "a cache, a mock or a fabricated answer"
        ),
    )


def drift(rows: Sequence[dict[str, Any]], detector: Detector) -> list[Anomaly]:
    ratio = Decimal(detector.param("ratio"))
    hits = [
        r
        for r in rows
        if _committed(r)
        and (r.get("est_usd") or 0) > 0
        and detector.covers(r.get("action"))
        and Decimal(r.get("actual_usd") or 0) > ratio * Decimal(r["est_usd"])
    ]
    return _once_per_run(
        hits,
        "drift",
        lambda rows, kinds: (
            f"{len(rows)} {kinds} call(s) cost more than {ratio} × their estimate "
            f"(first: {_usd(rows[0].get('actual_usd'))} against {_usd(rows[0]['est_usd'])} "
            "estimated): the estimates no longer fit this traffic"
        ),
    )


def _model_known(provider: str, model: str) -> bool:
    from .meter.prices import PROVIDER_IDS, _known

    provider_id = PROVIDER_IDS.get(provider, provider)
    if _known(provider_id, model):
        return True
    return "/" in model and _known(provider_id, model.rsplit("/", 1)[-1])


def unpriced_model(
    rows: Sequence[dict[str, Any]], detector: Detector, overridden: frozenset[str] = frozenset()
) -> list[Anomaly]:
    """`overridden`: action kinds whose policy names a `price:`, so they never use the fallback."""

    def unpriced(row: dict[str, Any]) -> bool:
        if row.get("priced") is not None:  # recorded by the meter when the ledger has the column
            return not row["priced"]
        # TODO(priced column): until every ledger records `priced`, ask genai-prices again.
        model = row.get("model")
        return (
            bool(model)
            and row.get("action") not in overridden
            and not _model_known(row["provider"], model)
        )

    hits = [
        r
        for r in rows
        if _committed(r) and _is_llm(r) and detector.covers(r.get("action")) and unpriced(r)
    ]
    return _once_per_run(
        hits,
        "unpriced_model",
        lambda rows, kinds: (
            f"{len(rows)} call(s) on {', '.join(sorted({str(r.get('model')) for r in rows}))}, "
            "a model genai-prices does not know: "
            "charged at the fallback price (meter.fallback_price), not the real one"
        ),
    )


# --- run and workflow structure ------------------------------------------------------------


_BODILESS = frozenset({"GET", "HEAD", "OPTIONS"})


def _request_named(first: dict[str, Any], fingerprint: str) -> str:
    """`METHOD host/path, body #…` of a loop's request, its fingerprint (action, method, path,
    query and body) told by what tells identical calls apart: a GET has no body."""
    where = f"{first.get('method') or ''} {first.get('host') or ''}{first.get('path') or ''}"
    of = "request" if (first.get("method") or "").upper() in _BODILESS else "body"
    return f"{where.strip()}, {of} #{fingerprint[:8]}"


def loop(rows: Sequence[dict[str, Any]], detector: Detector) -> list[Anomaly]:
    repeats = int(detector.param("repeats"))
    retries = int(detector.param("retries", 0))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("fingerprint") and detector.covers(row.get("action")):
            groups[(row["scope"], row["fingerprint"])].append(row)
    found = []
    for group in groups.values():
        # as the guard: a budget window's refusals are forgiven with the failed attempts
        refusals = sum(1 for r in group if _window_refused(r))
        retried = forgiven(sum(1 for r in group if _failed(r)) + refusals, retries)
        if len(group) - retried <= repeats:
            continue
        first = group[0]
        among = ", a budget window's refusals among them" if refusals else ""
        not_counted = (
            f", not counting {retried} failed attempt(s) its client retried{among} "
            f"(anomalies.loop.retries: {retries})"
            if retried
            else ""
        )
        found.append(
            _run_of(
                first,
                "loop",
                f"the same {first.get('action')} request ({_request_named(first, first['fingerprint'])}) "
                f"was made {len(group) - retried} times in this run "
                f"(anomalies.loop.repeats: {repeats}){not_counted}",
                group,
            )
        )
    return found


def _counted(rows: Sequence[dict[str, Any]], retries: int) -> list[bool]:
    """For each row of one run (oldest first): is it a step? Not when it is one of the first
    `retries` failed attempts of its request (the guards' forgiveness, plan.Counts)."""
    failed: dict[str, int] = defaultdict(int)
    steps = []
    for row in rows:
        retried = _failed(row) and failed[row["fingerprint"]] < retries
        if retried:
            failed[row["fingerprint"]] += 1
        steps.append(not retried)
    return steps


def retried(rows: Sequence[dict[str, Any]], retries: int) -> set[str]:
    """The request ids of `rows` (decision rows, oldest first) that are failed attempts the
    guards forgive (`_counted`): attempts the agent's SDK retried, no steps of their run.
    The first `retries` failed attempts of each request (fingerprint) in each run, in one
    pass (run by run, for every workflow a handoff may flag, it was a report's slowest check)."""
    forgiven_ids: set[str] = set()
    failed: dict[tuple[str, Any], int] = defaultdict(int)
    for r in rows:
        if r.get("reason_code") in PROXY_REFUSALS or not _failed(r):
            continue
        key = (r["scope"], r["fingerprint"])
        if failed[key] < retries:
            failed[key] += 1
            forgiven_ids.add(r["request_id"])
    return forgiven_ids


def not_steps(rows: Sequence[dict[str, Any]], retries: int) -> set[str]:
    """The request ids of `rows` (decision rows, oldest first) that are no steps of their run,
    as the guards count: the proxy's own refusals, and the failed attempts they forgive."""
    refused = {r["request_id"] for r in rows if r.get("reason_code") in PROXY_REFUSALS}
    return refused | retried(rows, retries)


def percentile(values: Sequence[int], pct: float) -> int:
    """Nearest-rank percentile (an observed value, no interpolation)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _step_params(detector: Detector) -> tuple[int, int, float, int, Decimal]:
    """step_count's max, history_runs, history_percentile, history_min_runs, history_factor."""
    return (
        int(detector.param("max")),
        int(detector.param("history_runs")),
        float(detector.param("history_percentile")),
        int(detector.param("history_min_runs")),
        Decimal(detector.param("history_factor")),
    )


def _agents_runs(
    history: Iterable[Mapping[str, Any]],
) -> tuple[dict[tuple[Any, Any], list[Mapping[str, Any]]], dict[tuple[Any, Any], list[float]]]:
    """Each agent's ((tenant, agent)) runs of `history`, oldest first, and their start times.
    Sorted once, so that a run finds those started before it by bisection (sorting them again
    for every run made reports on a ledger of 20,000 runs take minutes)."""
    by_agent: dict[tuple[Any, Any], list[Mapping[str, Any]]] = defaultdict(list)
    for run in history:
        by_agent[(run.get("tenant"), run.get("agent"))].append(run)
    started: dict[tuple[Any, Any], list[float]] = {}
    for key, runs in by_agent.items():
        runs.sort(key=lambda r: r["started"])  # stable: ties keep the ledger's order
        started[key] = [r["started"] for r in runs]
    return by_agent, started


def step_count(
    rows: Sequence[dict[str, Any]],
    detector: Detector,
    history: Sequence[dict[str, Any]] = (),
    retries: int = 0,
) -> list[Anomaly]:
    """`history`: {tenant, agent, scope, steps, started} for every run in the ledger;
    `retries`: anomalies.loop.retries, the failed attempts per request that are not steps."""
    limit, window, pct, minimum, factor = _step_params(detector)
    by_agent, started = _agents_runs(history)
    found = []
    for scope, scope_rows in _by_scope(rows).items():
        first = scope_rows[0]
        if first.get("run") is None:
            continue
        # The guard refuses a covered request once `max` steps precede it in the scope.
        counted = _counted(scope_rows, retries)
        before = list(itertools.accumulate(counted, initial=0))
        steps = before.pop()
        over = [
            r for r, n in zip(scope_rows, before, strict=True)
            if n >= limit and detector.covers(r["action"])
        ]  # fmt: skip
        if over:
            anomaly = _run_of(
                first,
                "step_count",
                f"this run took {steps} steps, above anomalies.step_count.max ({limit})",
                over,
            )
            found.append(anomaly)
            continue
        key = (first.get("tenant"), first.get("agent"))
        runs = by_agent.get(key, [])
        # The last `window` of the agent's other runs started before this one, oldest first.
        earlier: list[Mapping[str, Any]] = []
        i = bisect.bisect_left(started.get(key, []), first["ts"])
        while i > 0 and len(earlier) < window:
            i -= 1
            if runs[i]["scope"] != scope:
                earlier.append(runs[i])
        earlier.reverse()
        if len(earlier) < minimum:
            continue
        expected = percentile([int(r["steps"]) for r in earlier], pct)
        threshold = factor * expected
        if steps > threshold:
            anomaly = _run_of(
                first,
                "step_count",
                f"this run took {steps} steps; the agent's last {len(earlier)} runs took "
                f"{expected} at the {pct:g}th percentile (flagged above {factor} × that; "
                "flagged only: the guard enforces anomalies.step_count.max)",
                scope_rows[int(threshold) :] or scope_rows,
            )
            anomaly.guarded = False
            found.append(anomaly)
    return found


def _workflows(rows: Iterable[dict[str, Any]]) -> dict[tuple[Any, str], list[dict[str, Any]]]:
    grouped: dict[tuple[Any, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("workflow"):
            grouped[(row.get("tenant"), row["workflow"])].append(row)
    return grouped


def _workflow_anomaly(
    key: tuple[Any, str], kind: str, detail: str, evidence: list[dict[str, Any]], runs: list[str]
) -> Anomaly:
    tenant, workflow = key
    scope = (f"tenant:{tenant}/" if tenant else "") + f"workflow:{workflow}"
    return Anomaly(
        kind=kind,
        scope=scope,
        detail=detail,
        evidence=_ids(evidence),
        workflow=workflow,
        tenant=tenant,
        runs=runs,
        first_ts=evidence[0]["ts"] if evidence else 0.0,
    )


def fan_out(
    rows: Sequence[dict[str, Any]],
    detector: Detector,
    workflows: dict[tuple[Any, str], list[dict[str, Any]]] | None = None,
) -> list[Anomaly]:
    """`rows`: every decision of the workflows concerned (`workflows`: _workflows(rows)).

    Like the guard, a run counts from its first request of any kind, and a run beyond the
    limit is reported when that first request is one of the detector's actions.
    """
    max_runs = int(detector.param("max_runs_per_workflow"))
    max_agents = int(detector.param("max_agents_per_workflow"))
    found = []
    for key, wf_rows in (_workflows(rows) if workflows is None else workflows).items():
        firsts: dict[str, dict[str, Any]] = {}
        agents: dict[Any, dict[str, Any]] = {}
        for row in wf_rows:
            # As the guard counts: runs that got a request through, and runs it refused.
            if row.get("decision") == "deny" and not (row.get("reason") or "").startswith(
                "fan_out:"
            ):
                continue
            firsts.setdefault(row["scope"], row)
            agents.setdefault(row.get("agent"), row)
        extra = [r for r in list(firsts.values())[max_runs:] if detector.covers(r.get("action"))]
        if extra:
            # "started 1500 runs" read as 1,500 runs at work when the guard had refused 1,495
            # at their first request.
            refused = sum(1 for r in firsts.values() if r.get("decision") == "deny")
            stopped = f", {refused} of them refused at their first request" if refused else ""
            found.append(
                _workflow_anomaly(
                    key,
                    "fan_out",
                    f"workflow {key[1]} started {len(firsts)} runs{stopped} "
                    f"(anomalies.fan_out.max_runs_per_workflow: {max_runs})",
                    extra,
                    [r["scope"] for r in extra],
                )
            )
        extra = [r for r in list(agents.values())[max_agents:] if detector.covers(r.get("action"))]
        if extra:
            anomaly = _workflow_anomaly(
                key,
                "fan_out",
                f"workflow {key[1]} involved {len(agents)} agents "
                f"(anomalies.fan_out.max_agents_per_workflow: {max_agents}; flagged only)",
                extra,
                [r["scope"] for r in extra],
            )
            anomaly.guarded = False
            found.append(anomaly)
    return found


def handoff(
    rows: Sequence[dict[str, Any]],
    detector: Detector,
    retries: int = 0,
    workflows: dict[tuple[Any, str], list[dict[str, Any]]] | None = None,
) -> list[Anomaly]:
    """`retries`: anomalies.loop.retries; an agent's steps are those step_count counts, so a
    provider's 503s its SDK retried do not make it look busier than its partner.
    `workflows`: _workflows(rows), taken when the detector covers every action."""
    ratio = Decimal(detector.param("ratio"))
    min_steps = int(detector.param("min_steps"))
    found = []
    if workflows is None or detector.actions:
        workflows = _workflows(r for r in rows if detector.covers(r.get("action")))
    for key, wf_rows in workflows.items():
        per_agent: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for row in wf_rows:
            per_agent[row.get("agent")].append(row)
        if len(per_agent) < 2:
            continue
        left_out = not_steps(wf_rows, retries)
        steps = {
            agent: sum(1 for r in agent_rows if r["request_id"] not in left_out)
            for agent, agent_rows in per_agent.items()
        }
        ordered = sorted(per_agent.items(), key=lambda item: (steps[item[0]], str(item[0])))
        (quiet, quiet_rows), (busy, busy_rows) = ordered[0], ordered[-1]
        if steps[busy] < min_steps or steps[busy] <= ratio * steps[quiet]:
            continue
        evidence = sorted(quiet_rows + busy_rows, key=lambda r: r["ts"])
        runs = sorted({r["scope"] for r in evidence})
        found.append(
            _workflow_anomaly(
                key,
                "handoff",
                f"in workflow {key[1]}, agent {busy} took {steps[busy]} steps and agent "
                f"{quiet} {steps[quiet]}: more than {ratio} × apart, so work handed from one "
                "to the other may have been dropped or repeated",
                evidence,
                runs,
            )
        )
    return found


# --- all of them ---------------------------------------------------------------------------


def _guard_denials(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Requests a reserve-time guard refused (deny) or, in shadow mode, would have refused
    (would_deny), by (detector, scope). Both are reported even when the report's settings
    differ from the proxy's and the flag itself does not fire."""
    denied: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("reason_code") == "anomaly" and row.get("decision") in ("deny", "would_deny"):
            kind = (row.get("reason") or "").split(":", 1)[0]
            denied[(kind if kind in GUARDED else "anomaly", row["scope"])].append(row)
    return denied


def detect(
    rows: Sequence[dict[str, Any]], settings: AnomalySettings | None = None, **options: Any
) -> list[dict[str, Any]]:
    """Every anomaly in `rows` (decision rows + `hold_state`, oldest first), as report dicts,
    in the order they began (`options`: _detect()'s)."""
    return [a.as_dict() for a in _in_order(_detect(rows, settings, **options))]


def _in_order(found: list[Anomaly]) -> list[Anomaly]:
    return sorted(found, key=lambda a: (a.first_ts, a.kind, a.scope))


def _detect(
    rows: Sequence[dict[str, Any]],
    settings: AnomalySettings | None = None,
    *,
    history: Sequence[dict[str, Any]] = (),
    workflow_rows: Sequence[dict[str, Any]] | None = None,
    priced_actions: frozenset[str] = frozenset(),
    calls_only: frozenset[str] = frozenset(),
) -> list[Anomaly]:
    """Every anomaly in `rows` (decision rows + `hold_state`, oldest first).

    `workflow_rows`: every decision of the workflows in `rows` (default: `rows`);
    `history`: step counts of every run, for step_count's history rule; `calls_only`: runs
    (scopes) whose rows in `rows` are only those the per-call detectors may flag, known to
    have no loop, no step count and no guard's refusal to flag (find()).
    """
    settings = settings or AnomalySettings()
    rows = sorted(rows, key=lambda r: (r["ts"], r.get("id") or 0))
    wf_rows = sorted(workflow_rows if workflow_rows is not None else rows, key=lambda r: r["ts"])
    retries = int(settings.get("loop").param("retries", 0))
    whole = [r for r in rows if r["scope"] not in calls_only] if calls_only else rows
    by_workflow = _workflows(wf_rows)
    found: list[Anomaly] = [
        *loop(whole, settings.get("loop")),
        *step_count(whole, settings.get("step_count"), history, retries),
        *fan_out(wf_rows, settings.get("fan_out"), by_workflow),
        *handoff(wf_rows, settings.get("handoff"), retries, by_workflow),
        *under_commit(rows, settings.get("under_commit")),
        *fast_commit(rows, settings.get("fast_commit")),
        *drift(rows, settings.get("drift")),
        *unpriced_model(rows, settings.get("unpriced_model"), priced_actions),
    ]
    # Requests a guard denied (or, in shadow mode, would have denied) belong to the anomaly that
    # explains them; one with no matching flag (the report was run with other settings than the
    # proxy) stands alone.
    alone: dict[tuple[str, str, Any], Anomaly] = {}
    # Lookups kept as `found` grows, each keeping the first anomaly in `found`'s order (scanning
    # every anomaly's evidence for each refused request was quadratic in the guarded runs).
    by_request: dict[tuple[str, str], Anomaly] = {}  # (kind, request id in its evidence)
    by_run: dict[tuple[str, str], Anomaly] = {}  # (kind, its scope or one of its runs)
    # (id(anomaly), "evidence" | "denied" | "would_deny") → the ids in that list
    listed: dict[tuple[int, str], set[str]] = defaultdict(set)

    def index(anomaly: Anomaly) -> None:
        for request_id in anomaly.evidence:
            by_request.setdefault((anomaly.kind, request_id), anomaly)
        for run_scope in (anomaly.scope, *anomaly.runs):
            by_run.setdefault((anomaly.kind, run_scope), anomaly)
        listed[(id(anomaly), "evidence")].update(anomaly.evidence)

    for anomaly in found:
        index(anomaly)
    repeats: dict[tuple[str, Any], list[dict[str, Any]]] | None = None  # a loop's requests
    for (kind, scope), denied in _guard_denials(rows).items():
        for row in denied:
            # The anomaly whose evidence holds this request (a loop: the same fingerprint),
            # else one of the same kind on this run (a run refused after its first request).
            request_id = row["request_id"]
            match = by_request.get((kind, request_id))
            if match is None and kind != "loop":
                match = by_run.get((kind, scope))
            if match is None:
                key = (kind, scope, row.get("fingerprint") if kind == "loop" else None)
                match = alone.get(key)
                if match is None:
                    involved = [row]
                    detail = row.get("reason") or kind
                    if kind == "loop" and row.get("fingerprint"):
                        if repeats is None:
                            repeats = defaultdict(list)
                            for r in rows:
                                repeats[(r["scope"], r.get("fingerprint"))].append(r)
                        involved = repeats[(scope, row["fingerprint"])]
                    match = alone[key] = _run_of(involved[0], kind, detail, involved)
                    match.refusals_only = True
                    found.append(match)
                    index(match)
            match.on_detect = "deny"
            which = "denied" if row.get("decision") == "deny" else "would_deny"
            if request_id not in listed[(id(match), which)]:
                listed[(id(match), which)].add(request_id)
                getattr(match, which).append(request_id)
            if request_id not in listed[(id(match), "evidence")]:
                listed[(id(match), "evidence")].add(request_id)
                match.evidence.append(request_id)
                by_request.setdefault((kind, request_id), match)
    for (kind, _, fingerprint), anomaly in alone.items():
        if kind == "loop" and fingerprint:
            # Worded once its refusals are known, as loop() words a flagged one: a guard's own
            # reason ("already made 3 times") is the count when it first refused, not the run's.
            first = next(r for r in rows if r["request_id"] == anomaly.evidence[0])
            refused = len(anomaly.denied) + len(anomaly.would_deny)
            anomaly.detail = (
                f"the same {first.get('action')} request ({_request_named(first, fingerprint)}) "
                f"was made {len(anomaly.evidence)} times in this run; "
                f"the loop guard {'refused' if anomaly.denied else 'would have refused'} "
                f"{refused} of them"
            )
    for anomaly in found:
        if (
            anomaly.on_detect == "flag"
            and anomaly.guarded
            and settings.get(anomaly.kind).on_detect == "deny"
        ):
            anomaly.on_detect = "deny"
    return found


# --- from a ledger -------------------------------------------------------------------------

DECISION_FIELDS = (
    "d.id, d.request_id, d.ts, d.decision, d.reason_code, d.reason, d.mode, d.scope, d.tenant, "
    "d.workflow, d.agent, d.run, d.action, d.provider, d.model, d.method, d.host, d.path, "
    "d.est_usd, d.est_tokens, d.actual_usd, d.tokens_in, d.tokens_out, d.usage_source, "
    "d.status, d.latency_ms, d.upstream_ms, d.stream, d.fingerprint, d.hold_id, d.budget, "
    "d.completed_at, d.note, h.state AS hold_state"
)


# What detect() decides by (the per-call detectors' candidate calls are read with these), and
# what it words an anomaly with besides (WORDING_FIELDS: read for the runs it may flag). Not
# what only a timeline shows: the 35 columns of every run were half a report's time. Without
# `path`, a batch submission looks like a model's answer, and without `reason` a guard's
# refusal is of no known detector: each can only flag more calls, never fewer.
DECIDING_FIELDS = (
    "d.id, d.request_id, d.ts, d.decision, d.reason_code, d.scope, d.tenant, d.workflow, "
    "d.agent, d.run, d.action, d.provider, d.model, d.est_usd, d.actual_usd, d.status, "
    "d.latency_ms, d.upstream_ms, d.fingerprint, d.completed_at, h.state AS hold_state"
)
WORDING_FIELDS = DECIDING_FIELDS + ", d.reason, d.method, d.host, d.path"
SCOPES_A_QUERY = 500  # bound parameters per `scope IN (…)` (SQLite allows 999 in old builds)


def _priced_column(reader: Reader) -> str:
    """`d.priced` once the meter records it on the decision row (a column another change adds)."""
    try:
        reader.query("SELECT priced FROM decisions WHERE 1 = 0")
    except LedgerError:  # no such column in this ledger yet
        return ""
    return ", d.priced"


def decision_rows(
    reader: Reader, scopes: Iterable[str], more_columns: str = "", fields: str = DECISION_FIELDS
) -> list[dict[str, Any]]:
    """Every decision row of these runs (scopes), `fields` (and `hold_state`, `more_columns`),
    oldest first."""
    rows = _decisions_in(reader, "scope", set(scopes), fields + more_columns)
    rows.sort(key=lambda r: (r["ts"], r["id"]))
    return rows


def active_where(
    floor: float = 0.0, run: str | None = None, within: Mapping[str, str | None] | None = None
) -> tuple[str, dict[str, Any]]:
    """SQL (and its parameters) for the decisions that make a run one of find()'s: since
    `floor`, of `run`, of `within`'s tenant and/or workflow ({"tenant": "acme"})."""
    narrowed = {level: value for level, value in (within or {}).items() if value is not None}
    if not narrowed.keys() <= {"tenant", "workflow"}:  # column names: never the caller's text
        raise ValueError(f"anomalies are narrowed by tenant or workflow, not {sorted(narrowed)}")
    where = "ts >= :floor" + (" AND run = :run" if run else "")
    where += "".join(f" AND {level} = :within_{level}" for level in narrowed)
    return where, {"floor": floor, "run": run, **{f"within_{k}": v for k, v in narrowed.items()}}


_REFUSED = f"reason_code IN ({', '.join(f"'{code}'" for code in PROXY_REFUSALS)})"
# What scan() counts of each run: its rows, the proxy's refusals among them (no steps of the
# run's), when its first own row came (step_count's history) and its requests a guard refused
# (each one an anomaly). Written so that the common row (reason_code NULL) is decided at the
# first test: NOT IN a COALESCE, three times a row, was a quarter of the pass's time.
SCAN_COLUMNS = (
    "COUNT(*) AS requests, "
    f"SUM(CASE WHEN {_REFUSED} THEN 1 ELSE 0 END) AS refused, "
    f"MIN(CASE WHEN {_REFUSED} THEN NULL ELSE ts END) AS own_started, "
    "SUM(CASE WHEN reason_code = 'anomaly' AND decision IN ('deny', 'would_deny') THEN 1 ELSE 0 "
    "END) AS guarded"
)
GROUP_LEVELS = ("tenant", "agent", "scope", "workflow", "run")


def scan(
    reader: Reader, flags: Mapping[str, str], params: Mapping[str, Any], columns: str = ""
) -> list[dict[str, Any]]:
    """One pass over every decision of the ledger, a row per run (its identity columns,
    GROUP_LEVELS) with SCAN_COLUMNS, `columns` (more aggregates, e.g. the report's runs table)
    and, for each of `flags` (name → an SQL condition on a decision), 1 when a row of the run
    meets it. Enough to tell which runs and workflows a detector may flag, and the agents'
    history, without reading 481k rows into Python (a week of a fleet: most of a report's
    time). Each row's `scope` names its run; a scope's rows share its levels (identity builds
    the scope from them), so a scope has one group."""
    same = {
        name: next(n for n, c in flags.items() if c == condition)
        for name, condition in flags.items()
    }
    marks = "".join(
        f", MAX(CASE WHEN {condition} THEN 1 ELSE 0 END) AS {name}"
        for name, condition in flags.items()
        if same[name] == name  # a condition given twice is tested once
    )
    levels = ", ".join(GROUP_LEVELS)
    groups = reader.query(
        f"SELECT {levels}, {SCAN_COLUMNS}{columns}{marks} FROM decisions GROUP BY {levels}",
        dict(params),
    )
    for group in groups:
        group["own"] = group["requests"] - group["refused"]  # its own rows: its steps and more
        for name, first in same.items():
            if first != name:
                group[name] = group[first]
    return groups


def history_of(groups: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """step_count's history from scan()'s groups: {tenant, agent, scope, steps, started} of
    every run, its own rows counted (as the guards count them, before forgiving retries)."""
    found: dict[tuple[Any, Any, str], dict[str, Any]] = {}
    for group in groups:
        if group["run"] is None or not group["own"]:
            continue
        key = (group["tenant"], group["agent"], group["scope"])
        entry = found.get(key)
        if entry is None:
            found[key] = {
                "tenant": group["tenant"],
                "agent": group["agent"],
                "scope": group["scope"],
                "steps": int(group["own"]),
                "started": group["own_started"],
            }
        else:  # one scope, its rows in several groups: a ledger written by hand
            entry["steps"] += int(group["own"])
            entry["started"] = min(entry["started"], group["own_started"])
    return list(found.values())


# Past this many runs, a query over them reads the whole table once and keeps theirs: looked
# up through the scope index, a fleet's 48,000 runs read it in random order (a day's 6,500
# took 0.25 s so, 0.6 s by reading the week's whole table).
MANY_SCOPES = 20_000


def _of_scopes(
    reader: Reader, sql: str, params: Mapping[str, Any], scopes: set[str]
) -> list[dict[str, Any]]:
    """`sql` (its condition on the run written `{scopes}`, on a column named `scope` in the
    result) for the rows of these runs only."""
    if not scopes:
        return []
    if len(scopes) > MANY_SCOPES:
        found = reader.query(sql.replace("{scopes}", "1 = 1"), dict(params))
        return [row for row in found if row["scope"] in scopes]
    return query_in(reader, sql.replace("{scopes}", "{in}"), "d.scope", scopes, params)


def query_in(
    reader: Reader,
    sql: str,
    column: str,
    values: Iterable[str],
    params: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """`sql` with its `{in}` made `column IN (…)`, SCOPES_A_QUERY of `values` (sorted) a
    query, the rows of every query in turn. `column`: a name of ours, never a caller's text."""
    wanted = sorted(values)
    rows: list[dict[str, Any]] = []
    for at in range(0, len(wanted), SCOPES_A_QUERY):
        chunk = {f"in{i}": value for i, value in enumerate(wanted[at : at + SCOPES_A_QUERY])}
        marks = ", ".join(f":{name}" for name in chunk)
        rows += reader.query(
            sql.replace("{in}", f"{column} IN ({marks})"), {**(params or {}), **chunk}
        )
    return rows


def _percentiles(steps: Sequence[int], window: int, pct: float) -> list[int | None]:
    """percentile(steps[max(0, i - window):i], pct) for every i in 0..len(steps), in one
    sweep over a sorted window (a run's earlier runs, as step_count picks them)."""
    ordered: list[int] = []
    found: list[int | None] = [None]
    for i, value in enumerate(steps):
        bisect.insort(ordered, value)
        if i >= window:
            del ordered[bisect.bisect_left(ordered, steps[i - window])]
        rank = max(1, math.ceil(pct / 100 * len(ordered)))
        found.append(ordered[min(rank, len(ordered)) - 1] if ordered else None)
    return found


def _may_count_too_many(
    runs: Mapping[str, Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
    detector: Detector,
) -> set[str]:
    """The runs step_count may flag, from their counts: more own rows than `max`, or than
    `history_factor` × the percentile of the agent's earlier runs. A run's own rows are at
    least its steps, so none it flags is missed. `runs`: scope → its scan() group."""
    limit, window, pct, minimum, factor = _step_params(detector)
    by_agent, started = _agents_runs(history)  # as step_count orders them
    expected: dict[tuple[Any, Any], list[int | None]] = {}
    found = set()
    for scope, run in runs.items():
        if run["run"] is None or not run["own"]:
            continue
        own = int(run["own"])
        if own > limit:
            found.add(scope)
            continue
        key = (run["tenant"], run["agent"])
        i = bisect.bisect_left(started.get(key, []), run["own_started"])
        # Its own entry starts when it does, at i or after: the `window` before i are its
        # earlier runs, as step_count takes them.
        if min(i, window) < minimum:
            continue
        if key not in expected:
            steps = [int(entry["steps"]) for entry in by_agent[key]]
            expected[key] = _percentiles(steps, window, pct)
        percentile_before = expected[key][i]
        if percentile_before is not None and own > factor * percentile_before:
            found.add(scope)
    return found


def _may_flag_workflows(
    groups: Iterable[Mapping[str, Any]],
    names: set[str],
    settings: AnomalySettings,
    failed: Mapping[str, int],
) -> set[tuple[Any, str]]:
    """The workflows ((tenant, workflow)) of these names fan_out or handoff may flag, from
    their runs' counts: more runs or agents than fan_out allows (counting every run and agent
    with a row of its own), or agents whose steps may lie further apart than handoff allows
    (an agent's steps are at most its own rows, and at least those less its runs' failed
    attempts). Supersets, so none either flags is missed. `failed`: scope → failed attempts."""
    fan, hand = settings.get("fan_out"), settings.get("handoff")
    max_runs = int(fan.param("max_runs_per_workflow"))
    max_agents = int(fan.param("max_agents_per_workflow"))
    ratio = Decimal(hand.param("ratio"))
    min_steps = int(hand.param("min_steps"))
    scopes: dict[tuple[Any, str], set[str]] = defaultdict(set)
    agents: dict[tuple[Any, str], dict[Any, list[int]]] = defaultdict(dict)
    for group in groups:
        workflow = group["workflow"]
        if not workflow or workflow not in names or not group["own"]:
            continue
        key = (group["tenant"], workflow)
        scopes[key].add(group["scope"])
        counts = agents[key].setdefault(group["agent"], [0, 0])
        counts[0] += int(group["own"])
        counts[1] += failed.get(group["scope"], 0)
    found = set()
    for key, runs in scopes.items():
        per_agent = agents[key]
        if len(runs) > max_runs or len(per_agent) > max_agents:
            found.add(key)
            continue
        if len(per_agent) < 2:
            continue
        most = max(own for own, _ in per_agent.values())
        # Only covered actions count when handoff names some: then an agent may have none.
        least = 0 if hand.actions else min(own - lost for own, lost in per_agent.values())
        if most >= min_steps and (ratio < 0 or most > ratio * least):
            found.add(key)
    return found


def _per_call_suspects(
    judged_by: Sequence[AnomalySettings], priced_column: str
) -> tuple[str, dict[str, Any]]:
    """SQL for the committed calls the per-call detectors may flag (under_commit, fast_commit,
    drift, unpriced_model) by any of these settings, with margins that only take in more; the
    detectors then decide on these rows as they would on every row."""
    under = max(float(Decimal(s.get("under_commit").param("ratio"))) for s in judged_by)
    over = min(float(Decimal(s.get("drift").param("ratio"))) for s in judged_by)
    fast = max(float(s.get("fast_commit").param("latency_ms")) for s in judged_by)
    llm = ", ".join(f"'{provider}'" for provider in LLM_PROVIDERS)
    unpriced = f"d.provider IN ({llm})" + (
        " AND (d.priced IS NULL OR d.priced = 0)" if priced_column else ""
    )
    latency = "COALESCE(d.upstream_ms, d.latency_ms)"
    sql = f"""SELECT {DECIDING_FIELDS}{priced_column} FROM decisions d
        LEFT JOIN holds h ON h.id = d.hold_id
        WHERE {{scopes}} AND d.decision <> 'deny' AND d.status >= 200 AND d.status < 300
          AND ((d.est_usd > 0 AND COALESCE(d.actual_usd, 0) < d.est_usd * :under_ratio)
               OR (d.est_usd > 0 AND COALESCE(d.actual_usd, 0) > d.est_usd * :drift_ratio)
               OR ({latency} >= 0 AND {latency} < :fast_ms)
               OR ({unpriced}))
          AND (h.state = 'committed' OR (h.state = 'expired' AND d.actual_usd IS NOT NULL))"""
    # Floats, widened: a product a hair off the exact Decimal one must not leave a call out.
    return sql, {
        "under_ratio": under + abs(under) * 1e-9 + 1e-12,
        "drift_ratio": over - abs(over) * 1e-9 - 1e-12,
        "fast_ms": fast,
    }


@dataclass(frozen=True)
class RunJudgings:
    """The settings each run of a report is judged by. `newest`: the report's own (those of
    the policy its newest decision was made under, as judging_of() finds them; a policy's given
    with --policy; the defaults), which judge every run `of_runs` does not name; `of_runs`:
    scope → the settings recorded for the policy the run's own newest decision was made under,
    where they differ (judged_runs()); `last`: scope → when the run's newest decision was made
    (a workflow is judged by its newest run's settings); `recorded`: policy digest → its
    recorded settings, one object for the policies of the same settings (`newest` for its own)."""

    newest: Judging = field(default_factory=Judging)
    of_runs: Mapping[str, Judging] = field(default_factory=dict)
    last: Mapping[str, float] = field(default_factory=dict)
    recorded: Mapping[str, Judging] = field(default_factory=dict)
    each_run: bool = False  # each_run() has found the runs' own (or that they share `newest`)

    def of(self, scope: str) -> Judging:
        return self.of_runs.get(scope, self.newest)

    def runs_by_policy(self, scopes: Iterable[str]) -> dict[str, int]:
        """Policy digest → how many of these runs its settings judge, most runs first (none
        for the runs the built-in settings judge)."""
        counts: dict[str, int] = defaultdict(int)
        for scope in scopes:
            if digest := self.of(scope).digest:
                counts[digest] += 1
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _recorded(reader: Reader, digests: Iterable[str]) -> dict[str, Judging]:
    """The settings recorded for these policies (digest → them), of those with a readable record."""
    found: dict[str, Judging] = {}
    for row in query_in(
        reader, "SELECT key, value FROM meta WHERE {in}", "key", (JUDGING_KEY + d for d in digests)
    ):
        digest = row["key"].removeprefix(JUDGING_KEY)
        if (judging := Judging.from_record(row["value"], digest)) is not None:
            found[digest] = judging
    return found


def judging_of(reader: Reader, where: str, params: dict[str, Any]) -> RunJudgings:
    """The settings a report of the decisions `where` selects is judged by, without --policy:
    those the proxy recorded for the policy it made the newest of them under (a decision made
    under a policy whose settings were not recorded, by an older drawdown, is passed over for
    the next newest); the defaults if none was recorded. `others` counts the other settings
    these decisions were made under; `unrecorded` the policies whose settings are not known.
    Each run's own settings are found by judged_runs(), from these."""
    digests = [
        row["policy_digest"]
        for row in reader.query(
            f"""SELECT policy_digest, MAX(ts) AS last FROM decisions
                WHERE {where} AND policy_digest IS NOT NULL AND policy_digest <> ''
                GROUP BY policy_digest ORDER BY last DESC, policy_digest DESC""",
            params,
        )
    ]  # newest first
    recorded = _recorded(reader, digests)
    unrecorded = len(digests) - len(recorded)
    # Policies of the same settings judge as one, named by the newest of them.
    alike: dict[tuple[AnomalySettings, frozenset[str] | None], Judging] = {}
    for digest in digests:
        if (judging := recorded.get(digest)) is not None:
            recorded[digest] = alike.setdefault((judging.settings, judging.priced), judging)
    if not alike:
        return RunJudgings(Judging(unrecorded=unrecorded))
    newest = next(iter(alike.values()))
    summary = replace(newest, others=len(alike) - 1, unrecorded=unrecorded)
    return RunJudgings(
        summary,
        recorded={d: summary if j is newest else j for d, j in recorded.items()},
    )


def judged_runs(reader: Reader, judgings: RunJudgings, scopes: set[str]) -> RunJudgings:
    """`judgings` with each of these runs' own settings: those recorded for the policy of its
    newest decision that has them, in the whole ledger (a run active in a report's window is
    judged as the whole report judges it); a run with none, by `newest`."""
    found = _of_scopes(
        reader,
        "SELECT d.scope, d.policy_digest, MAX(d.ts) AS last FROM decisions d "
        "WHERE {scopes} GROUP BY d.scope, d.policy_digest",
        {},
        scopes,
    )
    # Newest first; of one time, in the digests' order (no database's own).
    found.sort(key=lambda row: (row["last"], row["policy_digest"] or ""), reverse=True)
    recorded = dict(judgings.recorded)
    unknown = {row["policy_digest"] for row in found if row["policy_digest"]} - recorded.keys()
    if unknown:  # policies whose decisions all lie outside the report's own
        alike = {(j.settings, j.priced): j for j in reversed(list(recorded.values()))}
        for digest, judging in _recorded(reader, unknown).items():
            recorded[digest] = alike.setdefault((judging.settings, judging.priced), judging)
    last: dict[str, float] = {}
    of_runs: dict[str, Judging] = {}
    for row in found:
        scope = row["scope"]
        last.setdefault(scope, row["last"])
        own = recorded.get(row["policy_digest"] or "")
        if own is not None and scope not in of_runs:
            of_runs[scope] = own
    return replace(
        judgings,
        of_runs={scope: own for scope, own in of_runs.items() if own is not judgings.newest},
        last=last,
        recorded=recorded,
        each_run=True,
    )


def each_run(
    reader: Reader, judgings: RunJudgings, groups: Iterable[Mapping[str, Any]], run: str | None
) -> RunJudgings:
    """`judgings` with the own settings of each active run of scan()'s `groups` and of every
    run of their workflows (judged_runs()), where they may differ from `newest`: the
    report's decisions were made under more than one, or a workflow's other runs lie outside
    them (`--run`)."""
    if judgings.each_run:
        return judgings
    if judgings.newest.source == "policy":  # --policy judges every run alike
        return replace(judgings, each_run=True)
    active: set[str] = set()
    workflows = set()
    for group in groups:
        if group["active"]:
            active.add(group["scope"])
            if group["workflow"] is not None:
                workflows.add((group["tenant"], group["workflow"]))
    if len({id(own) for own in judgings.recorded.values()}) > 1 or (run and workflows):
        of_workflows = {g["scope"] for g in groups if (g["tenant"], g["workflow"]) in workflows}
        return judged_runs(reader, judgings, active | of_workflows)
    return replace(judgings, each_run=True)


def find(
    reader: Reader,
    *,
    floor: float = 0.0,
    run: str | None = None,
    policy: Policy | None = None,
    within: dict[str, str] | None = None,
    groups: list[dict[str, Any]] | None = None,
    judging: Judging | RunJudgings | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(anomalies, scan()'s groups of the runs they were found for) for the runs active since
    `floor`.

    Whole runs and whole workflows are judged, not just the window, so counts match the guards.
    The runs and workflows a detector may flag are found from scan()'s counts and a few
    narrow queries (repeated requests, calls a per-call detector may flag), each a superset of
    what it flags; detect() runs over the whole rows of those alone (of a run flagged only by
    a per-call detector, its flagged calls) and finds what it would over every row: a run's
    own anomalies come from its rows alone, a workflow's from its own. `within`: only the
    runs of this tenant and/or
    workflow ({"tenant": "acme"}; `drawdown report --tenant`). Their workflows are still read
    whole and the agents' history fleet-wide, so each anomaly is the one the whole report
    finds, without reading every other team's runs. `groups`: scan()'s, made with an `active`
    flag of active_where()'s condition (the report's own pass). `judging`: the settings to judge
    by, one for all runs or each run's (judging_of()'s), else `policy`'s, else the defaults.
    The runs judged by the same settings are judged together, and a workflow by its newest
    run's settings.
    """
    where, params = active_where(floor, run, within)
    if groups is None:
        groups = scan(reader, {"active": where}, params)
    if judging is None:
        judging = Judging.of(policy) if policy else Judging()
    judgings = judging if isinstance(judging, RunJudgings) else RunJudgings(judging)
    active = {group["scope"] for group in groups if group["active"]}
    window = [group for group in groups if group["scope"] in active]
    runs: dict[str, dict[str, Any]] = {}
    # Rows of one scope in several groups: a ledger written by hand, read whole to be sure.
    doubled = {g["scope"] for g in window if runs.setdefault(g["scope"], g) is not g}
    failed: dict[str, int] = defaultdict(int)  # every failed attempt of a run (handoff's bound)
    failed_runs = reader.query(
        f"""SELECT scope, run IS NOT NULL AS of_run, COUNT(*) AS n FROM decisions
            WHERE {failed_attempt()} GROUP BY scope, fingerprint, run IS NOT NULL"""
    )
    for r in failed_runs:
        failed[r["scope"]] += int(r["n"])

    # The runs judged by each settings, and the workflows of the runs: by their newest run's.
    judgings = each_run(reader, judgings, groups, run)
    workflows = {(g["tenant"], g["workflow"]) for g in window if g["workflow"] is not None}
    of_workflows = [g for g in groups if (g["tenant"], g["workflow"]) in workflows]
    parts: dict[int, tuple[Judging, set[str]]] = {}  # by id(): judging_of() shares them
    for scope in sorted(active):
        own = judgings.of(scope)
        parts.setdefault(id(own), (own, set()))[1].add(scope)
    newest_run: dict[tuple[Any, str], tuple[float, str]] = {}
    for g in of_workflows:
        candidate = (judgings.last.get(g["scope"], 0.0), g["scope"])
        key = (g["tenant"], g["workflow"])
        newest_run[key] = max(newest_run.get(key, candidate), candidate)
    workflows_of: dict[int, set[tuple[Any, str]]] = defaultdict(set)
    for key, (_, scope) in newest_run.items():
        own = judgings.of(scope)
        parts.setdefault(id(own), (own, set()))  # a run outside the report's may judge it
        workflows_of[id(own)].add(key)
    if not parts:
        return [], window
    # What may be flagged by the laxest settings of all, read once: read for each settings,
    # each read the whole table again once its runs were many (MANY_SCOPES).
    judged_by = [own.settings for own, _ in parts.values()]
    priced_column = _priced_column(reader)
    repeated = _of_scopes(
        reader,
        "SELECT d.scope, COUNT(*) AS n FROM decisions d WHERE {scopes} "
        "AND d.fingerprint IS NOT NULL GROUP BY d.scope, d.fingerprint HAVING COUNT(*) > :repeats",
        {"repeats": min(int(s.get("loop").param("repeats")) for s in judged_by)},
        active,
    )
    calls_sql, calls_params = _per_call_suspects(judged_by, priced_column)
    # The runs' own steps: the proxy's refusals (a stop, its ledger down) are not theirs.
    calls = [
        r
        for r in _of_scopes(reader, calls_sql, calls_params, active)
        if r["reason_code"] not in PROXY_REFUSALS
    ]
    calls.sort(key=lambda r: (r["ts"], r["id"]))
    context = _Context(
        reader,
        groups,
        runs,
        failed,
        failed_runs,
        history_of(groups),
        priced_column,
        repeated,
        calls,
    )
    found: list[Anomaly] = []
    for part, (own, scopes) in parts.items():
        found += _find_judged(context, own, scopes, doubled & scopes, workflows_of[part])
    if len(parts) > 1:
        found = _with_workflows_refusals(found)
    return [a.as_dict() for a in _in_order(found)], window


def _with_workflows_refusals(found: list[Anomaly]) -> list[Anomaly]:
    """`found` with the fan_out guard's refusals of a run judged by other settings than its
    workflow moved into the workflow's fan_out anomaly: judged apart, the run's refusals were
    explained by no anomaly of its own settings (detect() made one of them alone)."""
    of_run: dict[str, Anomaly] = {}
    for anomaly in found:
        # The workflow's runs anomaly, which its guard enforces (the agents' is only flagged).
        if anomaly.kind == "fan_out" and anomaly.guarded and not anomaly.refusals_only:
            for scope in anomaly.runs:
                of_run.setdefault(scope, anomaly)
    kept = []
    for anomaly in found:
        workflows = of_run.get(anomaly.scope) if anomaly.kind == "fan_out" else None
        if workflows is None or not anomaly.refusals_only:
            kept.append(anomaly)
            continue
        workflows.on_detect = "deny"
        for which in ("evidence", "denied", "would_deny"):
            ids: list[str] = getattr(workflows, which)
            present = set(ids)
            ids += [i for i in getattr(anomaly, which) if i not in present]
    return kept


@dataclass(frozen=True)
class _Context:
    """What find() reads once for every settings its runs are judged by."""

    reader: Reader
    groups: list[dict[str, Any]]  # scan()'s
    runs: dict[str, dict[str, Any]]  # scope → its scan() group, of the active runs
    failed: Mapping[str, int]  # scope → every failed attempt of the run
    failed_runs: list[dict[str, Any]]  # scope, of_run, n: failed attempts of each request
    history: list[dict[str, Any]]  # history_of(groups), before forgiving retries
    priced_column: str  # _priced_column()'s
    repeated: list[dict[str, Any]]  # scope, n: requests a run repeated, past any settings' repeats
    calls: list[dict[str, Any]]  # calls any settings' per-call detectors may flag, oldest first


def _find_judged(
    context: _Context,
    judging: Judging,
    active: set[str],
    suspects: set[str],
    workflows: set[tuple[Any, str]],
) -> list[Anomaly]:
    """The anomalies of these active runs and workflows ((tenant, workflow)), judged by
    `judging`; `suspects`: runs to read whole whatever the counts say."""
    reader, groups, runs = context.reader, context.groups, context.runs
    settings = judging.settings
    priced_column = context.priced_column
    # Earlier runs' steps as the guards count them: less their forgiven failed attempts.
    retries = int(settings.get("loop").param("retries", 0))
    retried: dict[str, int] = defaultdict(int)
    for r in context.failed_runs:
        if r["of_run"]:
            retried[r["scope"]] += forgiven(int(r["n"]), retries)
    history = [
        {**h, "steps": int(h["steps"]) - retried.get(h["scope"], 0)} for h in context.history
    ]
    # In the order step_count takes each agent's runs (a stable sort keeps ties as they came):
    # its sort of each agent's runs then finds them sorted, twice a report.
    history.sort(key=lambda h: h["started"])
    priced = judging.priced

    # The runs a detector may flag: a guard refused one of their requests; a request repeated
    # past loop.repeats; more own rows than step_count allows (read whole); a call the per-call
    # detectors flag (decided on the few calls that may be, each judged alone: only these are
    # read of a run flagged for nothing else).
    suspects = set(suspects)
    suspects |= {scope for scope in active if runs[scope]["guarded"]}
    suspects |= _may_count_too_many(
        {scope: runs[scope] for scope in active}, history, settings.get("step_count")
    )
    repeats = int(settings.get("loop").param("repeats"))
    suspects |= {row["scope"] for row in context.repeated if int(row["n"]) > repeats}
    suspects &= active
    calls = [r for r in context.calls if r["scope"] in active]
    hits = (
        *under_commit(calls, settings.get("under_commit")),
        *fast_commit(calls, settings.get("fast_commit")),
        *drift(calls, settings.get("drift")),
        *unpriced_model(calls, settings.get("unpriced_model"), priced or frozenset()),
    )
    calls_only = frozenset({hit.scope for hit in hits} - suspects)
    # Read whole, with what words them, are the calls flagged of those runs: their other rows
    # cannot be (with `path`, a batch's submission is not flagged as a model's answer).
    flagged_calls = {i for hit in hits if hit.scope in calls_only for i in hit.evidence}

    # The workflows fan_out or handoff may flag, of those judged here: read whole.
    names = {workflow for _, workflow in workflows}
    flagged_workflows = _may_flag_workflows(groups, names, settings, context.failed) & workflows
    workflow_rows = [
        row
        for row in _of_workflows(reader, {workflow for _, workflow in flagged_workflows})
        if (row["tenant"], row["workflow"]) in flagged_workflows
    ]
    workflow_rows.sort(key=lambda r: (r["ts"], r["id"]))
    rows = decision_rows(reader, suspects, priced_column, WORDING_FIELDS)
    rows += _of_requests(reader, flagged_calls, WORDING_FIELDS + priced_column)
    return _detect(
        [r for r in rows if r["reason_code"] not in PROXY_REFUSALS],
        settings,
        history=history,
        workflow_rows=workflow_rows,
        priced_actions=priced or frozenset(),
        calls_only=calls_only,
    )


def _of_requests(reader: Reader, ids: set[str], columns: str) -> list[dict[str, Any]]:
    """The decision rows of these request ids (`columns`, and hold_state)."""
    return _decisions_in(reader, "request_id", ids, columns)


def _decisions_in(
    reader: Reader, column: str, values: Iterable[str], columns: str
) -> list[dict[str, Any]]:
    """The decision rows (`columns`, joined with their holds) whose `column` is one of
    `values`. `column`: this module's own names only."""
    sql = f"SELECT {columns} FROM decisions d LEFT JOIN holds h ON h.id = d.hold_id WHERE {{in}}"
    return query_in(reader, sql, f"d.{column}", values)


def _of_workflows(reader: Reader, names: set[str]) -> list[dict[str, Any]]:
    """The own decision rows of the workflows of these names (every tenant's)."""
    sql = f"""SELECT d.id, d.request_id, d.ts, d.decision, d.reason, d.scope, d.tenant,
                     d.workflow, d.agent, d.run, d.action, d.fingerprint, d.status,
                     d.completed_at
              FROM decisions d WHERE {{in}} AND {agents_own("d.reason_code")}"""
    return query_in(reader, sql, "d.workflow", names)
