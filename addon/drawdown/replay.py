"""`drawdown replay` (SPEC §10): re-decide the recorded traffic under another policy.

Every recorded request is taken in the order it arrived and walked through the same stages
the proxy runs — classify, authorize (with `requires` answered from the replay's own
history), the anomaly guards set to deny, then the budgets — with the new policy. Budgets
are simulated: a request that passes holds its estimate on every matching instance and is
charged its recorded actual when it completed, exactly as reserve and commit did live, so
a run budget runs out at the same request it would have under enforcement.

What the ledger recorded is what replay knows (see drawdown.recording): method, host,
port, path, query, the identity levels, model, estimate, actuals, status, the body's JSON
fields the recording policy referenced (or the whole body with `record: {bodies: full}`).
Headers are never recorded, so `header.*` conditions see nothing, and a request refused
live for one (a Host header or TLS SNI naming another host, a method-override header:
classify.unrecorded) is refused again; a json field the new policy reads but the ledger did
not keep is reported as a warning. Identity is taken as
recorded (the new policy's `identity:` section is not re-applied). A request the new policy
allows that was never forwarded when it was recorded (the recording policy denied it) is
assumed to have succeeded at its estimate (`assumed: true`).

Paths are recorded with their credentials redacted (drawdown.recording.redact_path): a
Telegram `/bot<token>/sendMessage` is kept as `/bot[redacted]/sendMessage`, so the globs and
`{name}` captures that matched it live still match. A capture whose recorded value is
redacted, like a query or body value the ledger holds redacted, has no value in replay (as a
header has none): a condition on it does not hold, and a `requires … same` that compares it
is unmet rather than met by two placeholders being equal. Replay warns when the new policy
reads such a value.
"""

from __future__ import annotations

import heapq
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

from . import meter
from .addon import fingerprint as fingerprint_of
from .addon import guards_for
from .authority import evaluate, facts_of
from .budgets import claims_for
from .classify import RequestView, classify, unmatched, unrecorded
from .identity import clean_value
from .ledger.api import (
    BATCH_HOLDER,
    LOOP_HINT,
    UNITS,
    Amount,
    Claim,
    Guards,
    LedgerError,
    Shortfall,
    agents_own,
    deciding_first,
    forgiven,
    is_failed_attempt,
    is_window_refusal,
)
from .ledger.reader import Reader
from .meter import TokenUsage, openai_realtime
from .meter.prices import url_provider
from .money import format_usd, usd_float
from .policy.match import LEVELS, canonical_host, missing
from .policy.model import Policy, hostless_action
from .recording import (
    MCP_CALL_FAILED,
    REDACTED,
    UNANSWERED_NOTES,
    body_fields,
    fields_read,
    metering_digest,
    omitted_fields,
    rebuild_json,
)
from .report import iso_time
from .respond import STATUS

_COLUMNS = (
    "d.id, d.request_id, d.ts, d.decision, d.reason_code, d.reason, d.scope, d.tenant, d.workflow, "
    "d.agent, d.run, d.action, d.provider, d.model, d.method, d.host, d.path, d.est_usd, "
    "d.est_tokens, d.actual_usd, d.tokens_in, d.tokens_out, d.status, d.fingerprint, d.completed_at, "
    "d.note, "
    "h.state AS hold_state, h.est_requests, h.process_id AS hold_process, "
    "h.settled_at AS hold_settled_at, h.expires_at AS hold_expires_at"
)
_FEATURES = ("port", "query", "body_fields", "body", "mcp")
_FEATURES_V7 = ("body_bytes", "metering")  # schema v7


@dataclass
class Replayed:
    """One recorded request, decided again."""

    request_id: str
    ts: float
    scope: str
    run: str | None
    agent: str | None
    action: str | None
    recorded: str  # the decision recorded live: allow | deny | would_deny
    decision: str  # the new policy's decision
    reason_code: str | None = None
    reason: str | None = None
    by: str | None = None  # the rule (file:line), budget instance or detector that decided
    status: int | None = None  # the HTTP status the proxy would have answered a denial with
    usd_recorded: int = 0  # nano-USD charged live
    usd_replayed: int = 0  # nano-USD it would have been charged under the new policy
    assumed: bool = False  # never forwarded live: success at its estimate is assumed

    def as_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "ts": iso_time(self.ts),
            "scope": self.scope,
            "run": self.run,
            "agent": self.agent,
            "action": self.action,
            "recorded": self.recorded,
            "decision": self.decision,
            "reason_code": self.reason_code,
            "reason": self.reason,
            "by": self.by,
            "status": self.status,
            "usd_recorded": usd_float(self.usd_recorded),
            "usd_replayed": usd_float(self.usd_replayed),
            "assumed": self.assumed,
        }


@dataclass(order=True)
class _Pending:
    """A forwarded request that settles (commit or release) when it completed live."""

    at: float
    seq: int
    keys: list[tuple[str, str, int]] = field(compare=False)
    estimate: Amount = field(compare=False)
    actual: Amount | None = field(compare=False)  # None: released (upstream error)
    facts: list[tuple[str, str, str, str]] = field(compare=False)


class Simulation:
    """The ledger's state as the new policy would have left it, request by request."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        # (budget key, instance scope, window start) -> [spent usd, tokens, requests, reserved …]
        self.instances: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0] * 6)
        # (scope, field, value) -> the action kinds that succeeded with it: what `requires` asks
        # for, looked up, not searched (a search per request made replay quadratic)
        self.facts: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self.pending: list[_Pending] = []
        self.repeats: Counter[tuple[str, str]] = Counter()  # (scope, fingerprint) -> decisions
        self.steps: Counter[str] = Counter()  # scope -> decisions
        # scope -> fingerprint -> failed attempts (api.failed_attempt) finished so far; and
        # those still to finish: (completed_at, seq, scope, fingerprint), a heap
        self.failed: dict[str, Counter[str]] = defaultdict(Counter)
        # (scope, fingerprint) -> a budget window's refusals, which the loop guard forgives too
        self.window_refusals: Counter[tuple[str, str]] = Counter()
        self.failing: list[tuple[float, int, str, str]] = []
        self.runs: dict[tuple[str, str], set[str]] = defaultdict(
            set
        )  # (tenant, workflow) -> scopes
        self.reads = _read_fields(policy)
        self.redacted: Counter[str] = Counter()  # field -> requests whose value is redacted
        # LLM calls the new policy meters otherwise (recording.metering_digest): those whose
        # estimate stayed the recorded one (no body recorded to estimate again), and those
        # whose cost was priced again from their recorded token counts
        self.estimates_kept = 0
        self.costs_repriced = 0
        # LLM calls the recording did not meter (their host named by no action then): charged
        # their estimate from the recorded body; those without one, nothing.
        self.unmetered = 0
        self.unmetered_unestimated = 0
        self.retries_dropped = 0  # recorded SDK retries of attempts the new policy refuses
        # LLM calls with no model recorded (an unmetered host, no body kept) that a `model`
        # condition of the new policy read as absent
        self.modelless = 0
        self.reads_model = _reads_model(policy)
        # MCP requests recorded without their JSON-RPC messages (the recording policy did not
        # name the server `provider: mcp`, nor kept bodies): decided as the bare MCP action
        self.mcp_unrecorded = 0
        # requests to hosts the new policy's `unknown_hosts: passthrough` would not decrypt:
        # the proxy would never see them (no decision, no step)
        self.passed_through = 0
        self._seq = 0

    def settle_until(self, ts: float) -> None:
        while self.pending and self.pending[0].at <= ts:
            self._settle(heapq.heappop(self.pending))
        # A failed attempt is forgiven once it has failed, as in the ledger: in flight, it counts.
        while self.failing and self.failing[0][0] <= ts:
            _, _, scope, fingerprint = heapq.heappop(self.failing)
            self.failed[scope][fingerprint] += 1

    def _settle(self, item: _Pending) -> None:
        for key in item.keys:
            cell = self.instances[key]
            for i, unit in enumerate(UNITS):
                cell[3 + i] -= item.estimate.get(unit)
                if item.actual is not None:
                    cell[i] += item.actual.get(unit)
        if item.actual is not None:
            for scope, action, name, value in item.facts:
                self.facts[(scope, name, value)].add(action)

    def history(self, scope: str, actions: Sequence[str], name: str, value: str | None) -> bool:
        done = self.facts.get((scope, name, value or ""), ())
        return any(fnmatchcase(a, g) for a in done for g in actions)

    def check_guards(self, row: dict[str, Any], guards: Guards) -> tuple[str, str] | None:
        """(detector, detail) when a guard refuses — the same counts as the ledger's `plan.Counts.trip`."""
        scope = row["scope"]
        failed = self.failed[scope]
        if guards.max_repeats is not None and row.get("fingerprint"):
            key = (scope, row["fingerprint"])
            repeats = self.repeats[key] - forgiven(
                failed[row["fingerprint"]] + self.window_refusals[key], guards.retries
            )
            if repeats >= guards.max_repeats:
                return (
                    "loop",
                    f"loop: this identical {row['kind']} request was already made {repeats} times in "
                    f"{scope} (anomalies.loop.repeats: {guards.max_repeats}; {LOOP_HINT})",
                )
        steps = self.steps[scope] - sum(forgiven(n, guards.retries) for n in failed.values())
        if guards.max_steps is not None and steps >= guards.max_steps:
            return (
                "step_count",
                f"step_count: {scope} already took {steps} steps "
                f"(anomalies.step_count.max: {guards.max_steps})",
            )
        workflow = row.get("workflow")
        if guards.max_runs_per_workflow is not None and workflow is not None:
            runs = self.runs[(row.get("tenant") or "", workflow)]
            if scope not in runs and len(runs) >= guards.max_runs_per_workflow:
                return (
                    "fan_out",
                    f"fan_out: workflow {workflow} already has {len(runs)} runs "
                    f"(anomalies.fan_out.max_runs_per_workflow: {guards.max_runs_per_workflow})",
                )
        return None

    def shortfalls(self, claims: Sequence[Claim], estimate: Amount) -> list[Shortfall]:
        found = []
        for claim in claims:
            cell = self.instances[(claim.budget, claim.scope, claim.window_start)]
            for i, unit in enumerate(UNITS):
                limit = claim.limit(unit)
                needed = estimate.get(unit)
                if limit is not None and cell[i] + cell[3 + i] + needed > limit:
                    # Every short unit, as the ledger's reserve (plan.py) collects them: which
                    # decides (402 for a window no refill helps, before 429) is picked of all.
                    found.append(Shortfall(claim, unit, limit, cell[i], cell[3 + i], needed))
        return deciding_first(found)

    def hold(
        self,
        claims: Sequence[Claim],
        estimate: Amount,
        at: float,
        actual: Amount | None,
        facts: list[tuple[str, str, str, str]],
    ) -> None:
        keys = [(c.budget, c.scope, c.window_start) for c in claims]
        for key in keys:
            cell = self.instances[key]
            for i, unit in enumerate(UNITS):
                cell[3 + i] += estimate.get(unit)
        self._seq += 1
        heapq.heappush(self.pending, _Pending(at, self._seq, keys, estimate, actual, facts))

    def count(self, row: dict[str, Any], out: Replayed, fingerprint: str | None) -> None:
        """Every decision row counts for the guards, as it does in the ledger; one forwarded
        again that failed retryably live is forgiven from when it failed (up to the policy's
        anomalies.loop.retries). One the new policy denies is a denial, counted; by a budget
        window, the loop guard forgives it as a failed attempt (api.WINDOW_REFUSAL)."""
        decision = out.decision
        self.steps[row["scope"]] += 1
        if fingerprint:
            self.repeats[(row["scope"], fingerprint)] += 1
            if is_window_refusal(decision, out.reason_code, out.status):
                self.window_refusals[(row["scope"], fingerprint)] += 1
        done = row.get("completed_at")
        if (
            fingerprint
            and decision != "deny"
            and is_failed_attempt(row["decision"], fingerprint, row.get("status"), done is not None)
        ):
            self._seq += 1
            heapq.heappush(self.failing, (done, self._seq, row["scope"], fingerprint))
        if row.get("workflow") is not None and decision != "deny":
            self.runs[(row.get("tenant") or "", row["workflow"])].add(row["scope"])


def _redacted(name: str, value: Any) -> bool:
    """Whether the ledger holds this field's value redacted (a path capture may have taken
    text around the redacted part: `{name}` of `/{name}/…` is `bot[redacted]`)."""
    if not isinstance(value, str):
        return False
    return REDACTED in value if name.startswith("path.") else value == REDACTED


class _RecordedView(RequestView):
    """A request as the ledger kept it. A redacted value reads as absent: the same placeholder
    in two requests says nothing about their two secrets."""

    def field(self, name: str) -> Any:
        value = super().field(name)
        return missing() if _redacted(name, value) else value


def _view(row: dict[str, Any]) -> RequestView:
    query = json.loads(row["query"]) if row.get("query") else {}
    # What the proxy could not read (recording.features): it is not read here either.
    notes = json.loads(row["body_fields"]) if row.get("body_fields") else {}
    repeated = notes.get("_repeated", [])
    view = _RecordedView(
        method=row.get("method") or "GET",
        host=canonical_host(row.get("host") or ""),  # as the proxy matches it now
        port=int(row.get("port") or 443),
        path=row.get("path") or "/",
        query={str(k): str(v) for k, v in query.items()},
        headers={},
        body=b"",
        model=row.get("model"),
        query_repeats=frozenset(n[6:] for n in repeated if n.startswith("query.")),
        undecodable=notes.get("_undecodable"),
    )
    view._json = rebuild_json(row.get("body"), row.get("body_fields"), row.get("mcp"))
    view._unreadable = notes.get("_unreadable")
    view._form_repeats = frozenset(n[5:] for n in repeated if n.startswith("json."))
    return view


def _levels(row: dict[str, Any]) -> dict[str, str]:
    return {level: row[level] for level in LEVELS if row.get(level) is not None}


def _forwarded(row: dict[str, Any]) -> bool:
    return row["decision"] != "deny"


def _kept(row: dict[str, Any]) -> bool:
    """A batch's submission whose hold was kept past it, until the batch ended (BatchHold)."""
    return row.get("hold_process") == BATCH_HOLDER


def _held_until(row: dict[str, Any]) -> float | None:
    """When the request's hold ended live: its completion, or a batch's end (its results
    read, or its window passed; a batch still held, its window's end)."""
    if _kept(row):
        return row.get("hold_settled_at") or row.get("hold_expires_at")
    return row.get("completed_at")


def _succeeded(row: dict[str, Any]) -> bool:
    status = row.get("status")
    note = row.get("note") or ""
    return (
        (row.get("hold_state") in ("committed", "expired") or _kept(row))
        and status is not None
        and (200 <= int(status) < 300)
        and note != MCP_CALL_FAILED  # answered 200, yet the call failed
        # Charged, though its answer never arrived whole: live, it wrote no fact to meet a
        # later `requires` (an MCP result streamed, then the connection reset).
        and not note.startswith(UNANSWERED_NOTES)
    )


def _decide(sim: Simulation, row: dict[str, Any]) -> Replayed | None:
    """One request through the new policy's pipeline (addon.Drawdown.request, step by step).
    None: the proxy would never see it (relayed unread under `unknown_hosts: passthrough`)."""
    policy = sim.policy
    view = _view(row)
    classification = classify(policy, view)
    action = classification.action
    if classification.mcp_error is not None and _mcp_unrecorded(row):
        # Recorded by a policy that did not read this server as MCP, without its body: its
        # JSON-RPC messages were never kept, so no tool can be told. Refusing it as unreadable
        # (as it was, every call) is not what the proxy would do: it is decided as the bare
        # MCP action, and replay says so.
        sim.mcp_unrecorded += 1
        classification = replace(classification, mcp_error=None)
    if action is not None and action.is_llm and view.model is None:
        # Not metered when recorded (its host named by no LLM action): the model is in its
        # body, if that was kept.
        view.model = getattr(_inspected(policy, action, view, row), "model", None)
    if action is not None and action.is_llm and view.model is None and sim.reads_model:
        sim.modelless += 1
    sim.redacted.update(n for n in sim.reads if _redacted(n, RequestView.field(view, n)))
    levels = _levels(row)
    scope = row["scope"]
    out = Replayed(
        request_id=row["request_id"],
        ts=row["ts"],
        scope=scope,
        run=row.get("run"),
        agent=row.get("agent"),
        action=classification.kind,
        recorded=row["decision"],
        decision="allow",
        usd_recorded=row.get("actual_usd") or 0 if _forwarded(row) else 0,
    )
    shadow = policy.mode == "shadow"

    def deny(code: str, reason: str, by: str | None, status: int | None = None) -> None:
        # An enforced denial in a shadow policy is only reported (the request goes on).
        if shadow:
            if out.decision == "allow":
                out.decision, out.reason_code, out.reason, out.by = "would_deny", code, reason, by
            return
        out.decision, out.reason_code, out.reason, out.by = "deny", code, reason, by
        out.status = status or STATUS.get(code, 403)

    def finish(claims: Sequence[Claim], estimate: Amount, fingerprint: str | None) -> Replayed:
        sim.count(row, out, fingerprint)
        if out.decision == "deny":
            return out
        actual, repriced = _actual(row, action, estimate, policy)
        sim.costs_repriced += repriced
        if action is not None and action.is_llm and row.get("provider") is None:
            sim.unmetered += 1
            sim.unmetered_unestimated += not estimate.usd
        if not _forwarded(row):
            out.assumed = True
        out.usd_replayed = actual.usd if actual else 0
        facts = []
        if actual is not None and (_succeeded(row) or out.assumed) and kind is not None:
            facts = list(
                dict.fromkeys(
                    (scope, each, name, value)
                    for each, seen in classification.authorizations(view)
                    for name, value in facts_of(policy.authority, each, seen)
                )
            )
        done = _held_until(row) if _forwarded(row) else None
        sim.hold(claims, estimate, done or row["ts"], actual, facts)
        return out

    kind = classification.kind
    if row.get("reason_code") == "internal_host":
        # Refused live for where its client was (drawdown_internal_hosts), which no policy
        # waives and the ledger does not keep: the same client would be refused again.
        out.decision, out.reason_code, out.reason, out.by = (
            "deny", "internal_host", row.get("reason") or "", None,
        )  # fmt: skip
        out.status = STATUS["internal_host"]
        return finish([], Amount(), None)
    if row.get("reason_code") == "bad_request" and unrecorded(row.get("reason")):
        # Decided live on what the ledger does not keep (a Host header, the TLS SNI, a method
        # override header): the same request would be refused again.
        deny("bad_request", row.get("reason") or "", None)
        if out.decision == "deny":
            return finish([], Amount(), None)
    if classification.path_error is not None:
        deny("bad_request", classification.path_error, None)
        if out.decision == "deny":
            return finish([], Amount(), None)
    if action is None:
        if policy.unknown_hosts == "passthrough" and not _decrypted(policy, view):
            # mitmproxy's allow_hosts would relay it unread: no decision, no step, no row.
            sim.passed_through += 1
            return None
        if policy.unknown_hosts == "deny":
            deny(
                "unknown_host",
                unmatched(view),
                None,
            )
        # Fingerprinted live (since v7's recording), so its failed attempts are forgiven steps.
        return finish([], Amount(), row.get("fingerprint"))

    size = _body_bytes(row)
    if size is not None and size > policy.limits.max_request_bytes:
        # As the proxy: refused before it is read; shadow lets it through unread (no estimate).
        deny(
            "body_too_large",
            f"the request body ({size} bytes) is larger than this proxy accepts "
            f"(limits.max_request_bytes: {policy.limits.max_request_bytes})",
            None,
        )
        if out.decision == "deny":
            return finish([], Amount(), None)
        claims = claims_for(policy, levels, kind, row["ts"])
        return finish(claims, Amount(requests=max(1, len(classification.kinds))), None)

    if (problem := view.undecodable or classification.body_error) is not None:
        # As the proxy: refused unread; shadow lets it through unread (no estimate).
        deny("bad_request", f"cannot read this request as the upstream would: {problem}", None)
        if out.decision == "deny":
            return finish([], Amount(), None)
        claims = claims_for(policy, levels, kind, row["ts"])
        return finish(claims, Amount(requests=max(1, len(classification.kinds))), None)

    if classification.mcp_error is not None:
        deny("bad_request", f"cannot read this MCP request: {classification.mcp_error[1]}", None)
        if out.decision == "deny":
            return finish([], Amount(), None)
        claims = claims_for(policy, levels, kind, row["ts"])
        return finish(claims, Amount(requests=1), None)

    estimate = Amount(usd=action.cost_usd_nanos or 0, requests=max(1, len(classification.kinds)))
    counted = True  # a step of the agent: charged, guarded
    if action.is_llm:
        if row.get("reason_code") == "bad_request":
            deny("bad_request", row.get("reason") or "unreadable request", None)
            return finish([], Amount(), None)
        counted = (
            meter.charging(action.provider, view.method, view.path, view.model, view.query)
            != "free"
        )
        estimate, kept = _llm_estimate(policy, action, view, row)
        sim.estimates_kept += kept

    assert kind is not None
    # The proxy fingerprints a request before authority decides it: a denied repeat counts too.
    fingerprint = (
        row.get("fingerprint") if counted and not classification.mcp_housekeeping else None
    )
    if fingerprint and classification.mcp and row.get("mcp") is None:
        # Recorded as no MCP request, its fingerprint hashed the JSON-RPC id too (a new one
        # every call: no loop ever); its kept body gives the messages the proxy would hash.
        fingerprint = fingerprint_of(kind, view, classification)
    if policy.authority.rules or policy.authority.default == "deny":
        for each, seen in classification.authorizations(view):
            evaluation = evaluate(policy.authority, levels, scope, each, seen)
            present = [
                sim.history(scope, c.requirement.actions, c.requirement.there or "", c.value)
                for c in evaluation.checks
            ]
            verdict = evaluation.finish(present)
            rule = verdict.rule.describe() if verdict.rule else "authority.default"
            if verdict.decision == "deny":
                deny(verdict.reason_code or "not_authorized", verdict.reason or "", rule)
                if out.decision == "deny":
                    return finish([], Amount(), fingerprint)
                break
            if verdict.decision == "would_deny" and out.decision == "allow":
                out.decision, out.reason_code, out.reason, out.by = (
                    "would_deny",
                    verdict.reason_code,
                    verdict.reason,
                    rule,
                )
    if not counted:  # e.g. count_tokens: uncharged, unguarded
        return finish([], Amount(), None)

    claims = claims_for(policy, levels, classification.kinds, row["ts"])
    guards = guards_for(policy, classification.kinds or kind)
    if guards is not None:
        tripped = sim.check_guards({**row, "kind": kind, "fingerprint": fingerprint}, guards)
        if tripped is not None:
            detector, detail = tripped
            if not guards.shadow:
                out.decision, out.reason_code, out.reason, out.by = (
                    "deny",
                    "anomaly",
                    detail,
                    (f"anomalies.{detector}"),
                )
                out.status = STATUS["anomaly"]
                return finish([], Amount(), fingerprint)
            if out.decision == "allow":
                out.decision, out.reason_code, out.reason, out.by = (
                    "would_deny",
                    "anomaly",
                    detail,
                    f"anomalies.{detector}",
                )
    shortfalls = sim.shortfalls(claims, estimate)
    enforced = [s for s in shortfalls if not s.claim.shadow]
    if enforced:
        first = enforced[0]
        out.decision, out.reason_code, out.reason = "deny", "budget_exhausted", first.describe()
        out.by = f"budget '{first.claim.budget}' on {first.claim.scope}"
        out.status = 429 if first.waits else 402
        return finish([], Amount(), fingerprint)
    if shortfalls and out.decision == "allow":
        first = shortfalls[0]
        out.decision, out.reason_code, out.reason = (
            "would_deny",
            "budget_exhausted",
            first.describe(),
        )
        out.by = f"budget '{first.claim.budget}' on {first.claim.scope}"
    return finish(claims, estimate, fingerprint)


def _body_bytes(row: dict[str, Any]) -> int | None:
    """The request body's size, as limits.max_request_bytes measured it live: recorded since
    schema v7; before, known only of a request refused for it (its reason names the size)."""
    if row.get("body_bytes") is not None:
        return int(row["body_bytes"])
    if row.get("reason_code") == "body_too_large":
        found = re.search(r"request body \((\d+) bytes\)", row.get("reason") or "")
        if found:
            return int(found.group(1))
    return None


def _metering_changed(policy: Policy, action: Any, row: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the new policy (estimate settings, price) meters this LLM call otherwise than
    the recording one did. A ledger from before schema v7 does not say: taken as unchanged."""
    recorded = row.get("metering")
    if not recorded:
        return False, False
    estimate, _, price = recorded.partition(":")
    new_estimate, _, new_price = metering_digest(policy, action).partition(":")
    return estimate != new_estimate, price != new_price


def _llm_estimate(
    policy: Policy, action: Any, view: RequestView, row: dict[str, Any]
) -> tuple[Amount, bool]:
    """The estimate made live, unless the new policy meters the call otherwise; then, as for a
    request the recording policy denied before estimating it, the meter's estimate from the
    recorded body (`record: {bodies: full}`), else its actual. With it, whether the recorded
    estimate was kept though the new policy meters the call otherwise (no body to estimate)."""
    changed = any(_metering_changed(policy, action, row))
    # Estimated live, unless the new policy meters it otherwise and its body is there to say
    # how. A metered call's estimate is its tokens too, where its price is $0 (a tokens budget
    # refused on them); a call the recording did not meter was estimated nothing.
    metered = row.get("provider") is not None
    estimated = row.get("est_usd") or (metered and row.get("est_tokens"))
    if estimated and not (changed and row.get("body")):
        recorded = Amount(usd=row["est_usd"], tokens=row.get("est_tokens") or 0, requests=1)
        return recorded, changed
    if meter.batch_results_download(action.provider, view.method, view.path):
        # A batch's results: live, the download held room for one request and no money (the
        # batch was billed upstream), then was charged its answers' usage.
        return Amount(requests=1), False
    if meter.charging(action.provider, view.method, view.path) == "step" and (
        openai_realtime.is_realtime(view.path)
    ):
        # A Realtime session and its responses: live, each held room for one request and
        # no money (the price is known only at response.done), then charged its actual.
        return Amount(requests=1), False
    if (llm := _inspected(policy, action, view, row)) is not None:
        estimate = Amount(
            usd=llm.estimate_usd_nanos, tokens=llm.input_tokens + llm.max_output_tokens, requests=1
        )
        return estimate, False
    tokens = (row.get("tokens_in") or 0) + (row.get("tokens_out") or 0)
    return Amount(usd=row.get("actual_usd") or 0, tokens=tokens, requests=1), False


def _inspected(
    policy: Policy, action: Any, view: RequestView, row: dict[str, Any]
) -> meter.LLMRequest | None:
    """The meter's reading of a recorded body (`record: {bodies: full}`), as the proxy reads a
    request: its model and estimate. None without a body, or one the meter cannot read."""
    if not row.get("body"):
        return None
    try:
        # The ledger keeps no scheme: port 80 is plain HTTP, as the proxy sees it.
        scheme = "http" if view.port == 80 else "https"
        return meter.inspect_request(
            action.provider, view.method, view.path, view.query, row["body"].encode(),
            policy.meter, action.price, origin=meter.origin(scheme, view.host, view.port),
        )  # fmt: skip
    except meter.MeterRequestError:
        return None


def _mcp_unrecorded(row: dict[str, Any]) -> bool:
    """Whether the ledger kept nothing of this request's JSON-RPC messages: recorded as no
    MCP request (the `mcp` column empty) and without its body. One the recording policy read
    as MCP and refused as unreadable is refused again."""
    refused_unread = (row.get("reason") or "").startswith("cannot read this MCP request")
    return row.get("mcp") is None and not row.get("body") and not refused_unread


def _decrypted(policy: Policy, view: RequestView) -> bool:
    """Under `unknown_hosts: passthrough`, whether the proxy decrypts (sees) this request:
    its host is one an action names (addon._apply_passthrough), or an action names none."""
    if hostless_action(policy.actions) is not None:
        return True
    return any(h.matches(view.host, view.port) for a in policy.actions for h in a.match.hosts)


def _reads_model(policy: Policy) -> bool:
    """Whether the policy's rules read the request's model (a condition or a `requires`)."""
    return any(t.field == "model" for rule in policy.authority.rules for t in rule.when) or any(
        "model" in (r.here, r.there) for rule in policy.authority.rules for r in rule.requires
    )


def _actual(
    row: dict[str, Any], action: Any, estimate: Amount, policy: Policy
) -> tuple[Amount | None, bool]:
    """What the request is charged when it completes (None when it was released live), and
    whether that was priced again from its recorded token counts (the new policy prices the
    call otherwise)."""
    if not _forwarded(row):
        return estimate, False  # never ran: assume it costs its estimate
    state = row.get("hold_state")
    committed = (
        state == "committed"
        or (state == "expired" and row.get("actual_usd") is not None)
        or _kept(row)  # its request charged; its batch then held until it ended
    )
    if not committed:
        return None, False
    if action is None:
        return Amount(), False
    if action.is_llm and row.get("provider") is None:
        # A call the recording policy did not meter (a host it did not name): no usage was
        # read from its answer, so it costs what the new policy estimates (with its body
        # recorded; else nothing, and replay says so: _metering_warnings).
        return estimate, False
    if action.is_llm:
        tokens_in, tokens_out = row.get("tokens_in") or 0, row.get("tokens_out") or 0
        usd = row.get("actual_usd") or 0
        _, price_changed = _metering_changed(policy, action, row)
        if price_changed and (tokens_in or tokens_out):
            # Priced as the proxy prices a committed usage, from the two counts the ledger
            # keeps (their cache reads, audio and image tokens at the text price).
            port = int(row.get("port") or 443)
            origin = meter.origin("http" if port == 80 else "https", row.get("host") or "", port)
            usd, _ = meter.price_usage(
                action.provider,
                row.get("model"),
                TokenUsage(input_tokens=tokens_in, output_tokens=tokens_out),
                policy.meter,
                action.price,
                matched=url_provider(origin, row.get("path") or "/"),
            )
            return Amount(usd=usd, tokens=tokens_in + tokens_out, requests=1), True
        return Amount(usd=usd, tokens=tokens_in + tokens_out, requests=1), False
    usd = action.cost_usd_nanos or 0
    if (action.cost_header or action.cost_json) and row.get("actual_usd"):
        usd = row["actual_usd"]  # the tool reported its cost live
    return Amount(usd=usd, requests=estimate.requests), False


def _read_fields(policy: Policy) -> tuple[str, ...]:
    """The path, query and body fields the policy's conditions and `requires … same` read."""
    names = {t.field for a in policy.actions for t in a.match.tests}
    for rule in policy.authority.rules:
        names.update(t.field for t in rule.when)
        for requirement in rule.requires:
            names.update(f for f in (requirement.here, requirement.there) if f)
    return tuple(sorted(n for n in names if n.startswith(("path.", "query.", "json."))))


def _metering_warnings(sim: Simulation | None) -> list[str]:
    found = []
    if sim is not None and sim.estimates_kept:
        found.append(
            f"the new policy meters {sim.estimates_kept} recorded LLM call(s) otherwise (its "
            "`price:` or `meter:` settings) than the recording policy did; without their "
            "bodies their estimates are the recorded ones (record them with "
            "`record: {bodies: full}` to have them estimated again)"
        )
    if sim is not None and sim.retries_dropped:
        found.append(
            f"{sim.retries_dropped} recorded request(s) were SDK retries of failed attempts the "
            "new policy refuses; refused, they would not have been retried, so they are left out"
        )
    if sim is not None and sim.unmetered:
        found.append(
            f"{sim.unmetered} LLM call(s) went to hosts the recording policy did not meter, so "
            "no usage was recorded for them: they are charged the new policy's estimate"
            + (
                f"; {sim.unmetered_unestimated} of them had no recorded body to estimate, and "
                "are charged nothing (record them with `record: {bodies: full}`, or compare "
                "live)"
                if sim.unmetered_unestimated
                else ""
            )
        )
    if sim is not None and sim.modelless:
        found.append(
            f"{sim.modelless} LLM call(s) have no model recorded (their host was not metered "
            "when recorded, and their bodies were not kept): the new policy's conditions on "
            "`model` saw none (record them with `record: {bodies: full}`, or compare live)"
        )
    if sim is not None and sim.mcp_unrecorded:
        found.append(
            f"{sim.mcp_unrecorded} request(s) to the new policy's MCP actions were recorded "
            "without their JSON-RPC messages (the recording policy did not name the server "
            "`provider: mcp`, nor kept bodies): their tools cannot be told, so they were "
            "decided as the MCP action itself, and no loop among them could be seen"
        )
    if sim is not None and sim.passed_through:
        found.append(
            f"{sim.passed_through} request(s) went to hosts the new policy names in no action: "
            "under its `unknown_hosts: passthrough` the proxy would relay them unread, so they "
            "are no decisions or steps here"
        )
    if sim is not None and sim.costs_repriced:
        found.append(
            f"{sim.costs_repriced} LLM call(s) priced otherwise by the new policy were charged "
            "again from their recorded input and output token counts (cache reads, audio and "
            "image tokens at the text price)"
        )
    return found


def _warnings(
    policy: Policy, rows: Sequence[dict[str, Any]], redacted: Counter[str], kinds: set[str]
) -> list[str]:
    """What replay could not apply of the new policy to these rows (whose requests it
    classified as `kinds`)."""
    found = []
    # What deciding the window's requests read: a rule of an action it held no request of
    # read nothing, and warned all the same.
    read = fields_read(policy, kinds)
    wanted = {name for name in body_fields(policy) if name in read or name in policy.record.fields}
    kept: set[str] = set()
    full = False
    omitted: set[str] = set()
    for row in rows:
        if row.get("body"):
            full = True
        if row.get("body_fields"):
            kept.update(k for k in json.loads(row["body_fields"]) if k.startswith("json."))
            omitted.update(omitted_fields(row["body_fields"]))
    missing = sorted(wanted - kept - omitted) if not full else []
    if missing:
        found.append(
            "the new policy reads "
            + ", ".join(missing)
            + ", which the ledger did not record for any request: those conditions saw no value "
            "(record them with `record: {fields: [...]}` or `record: {bodies: full}`)"
        )
    if omitted & wanted:
        found.append(
            "some requests' " + ", ".join(sorted(omitted & wanted)) + " were too large to record"
        )
    headers = sorted(name for name in read if name.startswith("header."))
    if headers:
        found.append(
            "the new policy reads "
            + ", ".join(headers)
            + "; headers are never recorded, so replay treats them as absent"
        )
    if redacted:
        found.append(
            "the new policy reads "
            + ", ".join(f"{name} ({n} request(s))" for name, n in sorted(redacted.items()))
            + ", which the ledger holds redacted (a credential): replay treats it as absent, "
            "so conditions on it did not hold and a `requires … same` on it was unmet"
        )
    if moved := _identity_moved(policy, rows):
        found.append(
            "the new policy's identity: section is not applied: every request keeps the "
            "levels it was recorded with, though the new one names "
            + ", ".join(f"{level} {value!r} for {n} request(s)" for level, value, n in moved)
            + " (budgets and rules on those levels are replayed against the recorded ones)"
        )
    reporting = sorted({a.kind for a in policy.actions if a.cost_header or a.cost_json} & kinds)
    if reporting:
        found.append(
            "the new policy reads tool costs from answers (cost_header/cost_json on "
            + ", ".join(reporting)
            + "); answers are not recorded, so those calls are charged what the ledger recorded "
            "(the reported cost where the recording policy read one, else its fixed cost)"
        )
    if rows and not any(row.get("port") is not None for row in rows):
        found.append(
            "this ledger holds no request features (port, query, body fields): it was written by "
            "an older drawdown, so conditions on them saw nothing"
        )
    return found


def _identity_moved(policy: Policy, rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """(level, value, requests) where the new policy's identity sets a level to a constant
    (`tenant: [{value: acme}]` first) that recorded requests hold otherwise: replay keeps the
    recorded levels, so what it says of that level's budgets and rules is not what the proxy
    would do. Other sources (headers, the proxy user) cannot be told from the ledger."""
    moved = []
    for level, sources in policy.identity.items():
        if not sources or sources[0].kind != "value":
            continue
        value = clean_value(str(sources[0].arg))
        differ = sum(1 for row in rows if row.get(level) != value)
        if differ:
            moved.append((level, str(value), differ))
    return moved


def replay(
    policy: Policy, db: str, *, since: float | None = None, now: float | None = None
) -> dict[str, Any]:
    """Re-decide every recorded request since `since` seconds ago under `policy`.

    A run (or workflow) active in the window is replayed from its first request: what it did
    before the window counts toward its loop repeats, steps, run budget, fan-out and the
    lookups `requires` names, as it did under enforcement. Only the window's requests are
    reported. (Budgets above the run, say a tenant's, see only these runs' earlier spend.)
    """
    reader = Reader(db)
    try:
        floor = (now or time.time()) - since if since else 0.0
        features = _feature_columns(reader)
        active = "SELECT DISTINCT {0} FROM decisions WHERE ts >= :floor AND {0} IS NOT NULL"
        window = (
            f"(d.ts >= :floor OR d.scope IN ({active.format('scope')}) "
            f"OR d.workflow IN ({active.format('workflow')}))"
            if since
            else "d.ts >= :floor"
        )
        rows = reader.query(
            f"SELECT {_COLUMNS}{features} FROM decisions d LEFT JOIN holds h ON h.id = d.hold_id "
            # A request the proxy's own state turned away (a stop, its ledger down) was retried
            # by its SDK, and the retry is in the ledger: replaying both would count it twice.
            f"WHERE {window} AND {agents_own('d.reason_code')} "
            "ORDER BY d.ts, d.id",
            {"floor": floor},
        )
    finally:
        reader.close()
    sim = Simulation(policy)
    results = []
    # An attempt that failed retryably in the recording and that the new policy refuses: its
    # SDK retried it then, but would not now (a refusal says x-should-retry: false), so its
    # retries are left out, not refused again and counted as steps and repeats.
    refused: dict[tuple[str, str], float] = {}  # (scope, fingerprint) -> when it was made
    dropped: set[str] = set()
    relayed: set[str] = set()  # under passthrough, never seen by the proxy
    for row in rows:
        key = (row["scope"], row.get("fingerprint") or "")
        made = refused.pop(key, None) if key[1] else None
        if made is not None and row["ts"] - made <= SDK_RETRY_SECONDS:
            if _failed(row):  # and its own retry, if it failed too
                refused[key] = row["ts"]
            dropped.add(row["request_id"])
            continue
        sim.settle_until(row["ts"])
        decided = _decide(sim, row)
        if decided is None:
            relayed.add(row["request_id"])
            continue
        if decided.decision == "deny" and key[1] and _failed(row):
            refused[key] = row["ts"]
        if row["ts"] >= floor:  # earlier rows only bring the state up to the window
            results.append(decided)
    left_out = dropped | relayed
    in_window = [row for row in rows if row["ts"] >= floor and row["request_id"] not in left_out]
    sim.retries_dropped = sum(
        1 for row in rows if row["ts"] >= floor and row["request_id"] in dropped
    )
    return _summary(policy, in_window, results, since=iso_time(floor) if since else None, sim=sim)


# The longest an SDK waits before retrying a failed attempt (openai's and anthropic's back off
# up to 8 s; a server's Retry-After can ask for more, up to a minute).
SDK_RETRY_SECONDS = 60.0


def _failed(row: dict[str, Any]) -> bool:
    """Whether the recorded attempt failed as the SDKs retry (failed_attempt)."""
    return is_failed_attempt(
        row["decision"],
        row.get("fingerprint"),
        row.get("status"),
        row.get("completed_at") is not None,
    )


def _feature_columns(reader: Reader) -> str:
    """The replay columns this ledger has (a ledger from before they existed has none)."""
    columns = ""
    for names in (_FEATURES, _FEATURES_V7):
        try:
            reader.query(f"SELECT {names[0]} FROM decisions WHERE 1 = 0")
        except LedgerError:  # a ledger from before these columns
            break
        columns += "".join(f", d.{name}" for name in names)
    return columns


def _summary(
    policy: Policy,
    rows: Sequence[dict[str, Any]],
    results: list[Replayed],
    since: str | None,
    sim: Simulation | None = None,
) -> dict[str, Any]:
    recorded = Counter(r.recorded for r in results)
    replayed = Counter(r.decision for r in results)
    runs: dict[str, dict[str, Any]] = {}
    for r in results:
        entry = runs.setdefault(
            r.scope,
            {
                "scope": r.scope,
                "run": r.run,
                "agent": r.agent,
                "requests": 0,
                "blocked": 0,
                "would_deny": 0,
                "first_blocked": None,
                "usd_recorded": 0,
                "usd_replayed": 0,
            },
        )
        entry["requests"] += 1
        entry["usd_recorded"] += r.usd_recorded
        entry["usd_replayed"] += r.usd_replayed
        if r.decision == "deny":
            entry["blocked"] += 1
            if entry["first_blocked"] is None:
                entry["first_blocked"] = {
                    "request_id": r.request_id,
                    "ts": iso_time(r.ts),
                    "action": r.action,
                    "reason_code": r.reason_code,
                    "reason": r.reason,
                    "by": r.by,
                }
        elif r.decision == "would_deny":
            entry["would_deny"] += 1
    for entry in runs.values():
        for key in ("usd_recorded", "usd_replayed"):
            entry[f"{key}_nanos"] = entry[key]
            entry[key] = usd_float(entry[key])
    by: Counter[tuple[str, str]] = Counter(
        (r.reason_code or "", r.by or "") for r in results if r.decision != "allow"
    )
    return {
        "policy": list(policy.files),
        "policy_digest": policy.digest[:16],
        "mode": policy.mode,
        "since": since,
        "requests": len(results),
        "recorded": {k: recorded.get(k, 0) for k in ("allow", "deny", "would_deny")},
        "decisions": {k: replayed.get(k, 0) for k in ("allow", "deny", "would_deny")},
        "changed": sum(1 for r in results if r.decision != r.recorded),
        "blocked": [r.as_dict() for r in results if r.decision == "deny"],
        "would_deny": [r.as_dict() for r in results if r.decision == "would_deny"],
        "runs": sorted(
            (e for e in runs.values() if e["blocked"] or e["would_deny"]),
            key=lambda e: (e["first_blocked"] or {}).get("ts") or "",
        ),
        "all_runs": len(runs),
        "by": [
            {"reason_code": code, "by": rule, "requests": n}
            for (code, rule), n in sorted(by.items(), key=lambda item: -item[1])
        ],
        "usd_recorded": usd_float(sum(r.usd_recorded for r in results)),
        "usd_replayed": usd_float(sum(r.usd_replayed for r in results)),
        "usd_recorded_nanos": sum(r.usd_recorded for r in results),  # exact, as runs[] carry
        "usd_replayed_nanos": sum(r.usd_replayed for r in results),
        # Nothing replayed, nothing the policy read could have been missing from it.
        "warnings": _warnings(
            policy,
            rows,
            sim.redacted if sim else Counter(),
            {r.action for r in results if r.action},
        )
        + _metering_warnings(sim)
        if results
        else [],
    }


def render_text(data: dict[str, Any]) -> str:
    from .report import _table

    rec, new = data["recorded"], data["decisions"]
    out = [
        f"replayed {data['requests']} recorded request(s) in {data['all_runs']} scope(s)"
        + (f" since {data['since']}" if data["since"] else "")
        + f" against {', '.join(data['policy'])} (mode {data['mode']})",
        f"  as recorded: {rec['allow']} allowed, {rec['deny']} denied, {rec['would_deny']} would deny",
        f"  new policy:  {new['allow']} allowed, {new['deny']} denied, {new['would_deny']} would deny"
        f"  ({data['changed']} decision(s) changed)",
        f"  spend: ${format_usd(data['usd_recorded_nanos'])} as recorded, "
        f"${format_usd(data['usd_replayed_nanos'])} under the new policy",
    ]
    for warning in data["warnings"]:
        out.append(f"  warning: {warning}")
    out.append("")
    out.append("RUNS THE NEW POLICY STOPS OR FLAGS")
    if data["runs"]:
        out.append(
            _table(
                [
                    "scope",
                    "requests",
                    "blocked",
                    "would_deny",
                    "first blocked by",
                    "spent then",
                    "spent now",
                ],
                [
                    [
                        e["scope"],
                        str(e["requests"]),
                        str(e["blocked"]),
                        str(e["would_deny"]),
                        (e["first_blocked"] or {}).get("by") or "-",
                        format_usd(e["usd_recorded_nanos"]),
                        format_usd(e["usd_replayed_nanos"]),
                    ]
                    for e in data["runs"]
                ],
            )
        )
    else:
        out.append("(none: the new policy would have let every recorded request through)")
    if data["blocked"]:
        out.append("")
        out.append("BLOCKED REQUESTS")
        out.append(
            _table(
                ["time", "scope", "action", "status", "reason"],
                [
                    [
                        b["ts"] or "",
                        b["scope"],
                        b["action"] or "-",
                        str(b["status"]),
                        f"{b['reason_code']}: {b['reason']}",
                    ]
                    for b in data["blocked"]
                ],
            )
        )
    if data["by"]:
        out.append("")
        out.append("BY RULE, BUDGET OR DETECTOR")
        out.extend(
            f"  {b['requests']:>5}  {b['reason_code']:<17} {b['by'] or '-'}" for b in data["by"]
        )
    return "\n".join(out)
