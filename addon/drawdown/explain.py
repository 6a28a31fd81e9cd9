"""`drawdown explain`: how one request would be classified and decided, and why — no proxy needed."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from . import meter
from .authority import evaluate
from .budgets import claims_for
from .classify import RequestView, addressed, classify, first_values, normalize_path
from .identity import Caller, IdleRuns, header_map, identify, identity_headers
from .ledger.api import (
    Amount,
    Claim,
    DecisionRow,
    Guards,
    Shortfall,
    agents_own,
    deciding_order,
    failed_attempt,
    window_refusals_counted,
)
from .ledger.plan import Counts
from .meter.decode import compressed, request_coding_problem
from .money import exact_usd, format_usd
from .policy import Policy
from .recording import redact, redact_path
from .respond import STATUS


def as_the_proxy_reads(headers: list[tuple[str, str]]) -> tuple[dict[str, str], Any]:
    """(the headers identity reads, the headers classification and authority read), from the
    request's header fields, as the proxy has them (Drawdown.requestheaders): each name given
    twice folded to "a, b" as mitmproxy's Headers.get folds it; identity reads every header,
    the rest of the proxy reads the request once the identity headers (X-Drawdown-*) and
    Proxy-Authorization are stripped."""
    from mitmproxy.http import Headers

    fields = [
        (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        for name, value in headers
    ]
    caller = header_map(fields)
    seen = Headers(fields)
    for name in identity_headers(list(caller)):
        del seen[name]
    if "proxy-authorization" in caller:
        del seen["proxy-authorization"]
    return caller, seen


@dataclass
class Explanation:
    steps: list[tuple[str, str]] = field(default_factory=list)  # (stage, what happened)
    decision: str = "allow"
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, stage: str, text: str) -> None:
        self.steps.append((stage, text))

    def text(self) -> str:
        width = max(len(stage) for stage, _ in self.steps) if self.steps else 0
        lines = [f"{stage.ljust(width)}  {text}" for stage, text in self.steps]
        lines.append("")
        lines.append(f"decision: {self.decision}" + (f" — {self.reason}" if self.reason else ""))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reason": self.reason,
            "steps": [list(s) for s in self.steps],
            **self.data,
        }


def explain(
    policy: Policy,
    *,
    url: str,
    method: str | None,
    headers: list[tuple[str, str]],
    body: bytes,
    proxy_user: str | None = None,
    proxy_password: str | None = None,
    proxyauth: str | None = None,
    client_ip: str | None = None,
    db: str | None = None,
) -> Explanation:
    """`proxyauth`: as the proxy's option of that name (`--set proxyauth=…`), of which only
    whether it is set and whether it is `any` matter: the credentials are not checked."""
    out = Explanation()
    parts = urlsplit(url if "://" in url else f"https://{url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # As the proxy reads it (`API.openai.com.` is api.openai.com); a Host header naming
    # another host than the URL's is refused, one naming an IP address's host is decided by.
    host, address, host_error = addressed(
        parts.hostname or "", port, [("Host header", v) for k, v in headers if k.lower() == "host"]
    )
    method = (method or ("POST" if body else "GET")).upper()
    caller_headers, seen_headers = as_the_proxy_reads(headers)
    # The body is given decoded. The proxy reads a body it cannot decode as none, and stops
    # decoding a compressed one past limits.max_request_bytes (meter.decode.decode_body).
    limit = policy.limits.max_request_bytes
    coding = seen_headers.get("content-encoding")
    undecodable = request_coding_problem(coding)
    packed = compressed(coding)
    read = b"" if undecodable is not None or (packed and len(body) > limit) else body
    # As the proxy reads a query: each name's first value, the names given twice noted.
    query, query_repeats = first_values(parse_qsl(parts.query, keep_blank_values=True))
    view = RequestView(
        method=method,
        scheme=parts.scheme,
        host=host,
        port=port,
        address=address,
        host_error=host_error,
        path=normalize_path(parts.path or "/"),
        query=query,
        headers=seen_headers,
        body=read,
        query_repeats=query_repeats,
        # A coding the proxy would not decode refuses the body all the same.
        undecodable=undecodable,
    )
    now = time.time()
    if proxy_user is None and proxy_password is None:
        # As the proxy, on a request sent to it in the clear: the credentials in its header.
        from .addon import _basic_credentials

        value = caller_headers.get("proxy-authorization")
        proxy_user, proxy_password = (value and _basic_credentials(value)) or (None, None)
    authenticated = None
    if proxyauth:
        # mitmproxy's ProxyAuth answers a request without credentials before drawdown sees it.
        if proxy_user is None and proxy_password is None:
            out.add(
                "proxyauth",
                "no proxy credentials (--proxy-user): the proxy asks for them, whatever the "
                "policy or its mode says",
            )
            out.decision = "deny"
            out.reason = "proxy_auth_required (407)"
            return out
        out.add(
            "proxyauth",
            "the proxy checks these credentials (wrong ones get 407); explain assumes they pass"
            + ("" if proxyauth == "any" else ", and the password is a secret, never a run id"),
        )
        authenticated = proxy_user or ""
        if proxyauth != "any":
            proxy_password = None  # as Drawdown.requestheaders: never a run id in the ledger
    caller = Caller(
        caller_headers,
        proxy_user=proxy_user,
        proxy_password=proxy_password,
        client_ip=client_ip,
        authenticated_user=authenticated,
    )
    identity = identify(policy.identity, caller, None if db else IdleRuns(), now)
    if identity.pending_idle is not None:
        # An agent that names no run: with a ledger, the idle-split run the proxy is still in.
        key, seconds = identity.pending_idle
        found = _current_idle_run(db, key, identity.levels, seconds, now) if db else None
        if found is None:
            identity = identify(policy.identity, caller, IdleRuns(), now)
            if db:
                minted = (
                    f"idle_split {seconds}s (minted: the ledger shows no idle-split run of "
                    f"this agent in the last {seconds}s)"
                )
                identity = replace(identity, sources={**identity.sources, "run": minted})
        else:
            run, how = found
            resolved = identity.with_run(run)
            identity = replace(
                resolved, sources={**resolved.sources, "run": f"idle_split {seconds}s ({how})"}
            )
    origin = ", ".join(f"{level} from {source}" for level, source in identity.sources.items())
    out.add("identity", f"{identity.path or '(no levels)'}  ({origin})")
    for note in _unknown_callers(policy, caller, identity.levels, now):
        out.add("identity", note)
    out.data["scope"] = identity.path

    classification = classify(policy, view)
    action = classification.action
    if action is not None and len(body) > limit:
        # As the proxy: refused before anything else is read (a host, a path, the body).
        told = f"decodes to over {limit} bytes" if packed else f"is {len(body)} bytes"
        out.add(
            "body",
            f"the request body {told}, more than this proxy accepts "
            f"(limits.max_request_bytes: {limit})",
        )
        out.data["action"] = classification.kind
        out.decision = "would_deny" if policy.mode == "shadow" else "deny"
        out.reason = f"body_too_large ({STATUS['body_too_large']})"
        return out
    if (error := classification.host_error or classification.path_error) is not None:
        out.add("host" if classification.host_error else "path", error)
        out.decision = "would_deny" if policy.mode == "shadow" else "deny"
        out.reason = "bad_request (400)"
        return out
    if action is None:
        out.add(
            "action",
            f"no action matches {method} {host}{redact_path(view.path)}; "
            f"unknown_hosts: {policy.unknown_hosts}",
        )
        out.data["action"] = None
        if policy.unknown_hosts == "deny":
            out.decision = "would_deny" if policy.mode == "shadow" else "deny"
            out.reason = "unknown_host (403)"
        else:
            out.reason = f"forwarded without accounting (unknown_hosts: {policy.unknown_hosts})"
        return out
    # As the ledger would keep them: a bot token in the URL is not echoed back.
    params = {name: redact(value, name) for name, value in classification.path_params.items()}
    captured = (
        ", captured " + ", ".join(f"{name}={value}" for name, value in params.items())
        if params
        else ""
    )
    out.add(
        "action",
        f"{action.kind} (the action at {action.where}{', provider ' + action.provider if action.provider else ''}{captured})",
    )
    out.data["action"] = action.kind
    if (problem := view.undecodable or classification.body_error) is not None:
        out.add("body", f"cannot read the request as the upstream would: {problem}")
        out.decision = "would_deny" if policy.mode == "shadow" else "deny"
        out.reason = "bad_request (400)"
        return out
    if classification.mcp_error is not None:
        out.add("mcp", f"cannot read the request: {classification.mcp_error[1]}")
        out.decision = "would_deny" if policy.mode == "shadow" else "deny"
        out.reason = "bad_request (400)"
        return out

    # As the proxy: a JSON-RPC batch takes one request for each of its calls.
    estimate = Amount(usd=action.cost_usd_nanos or 0, requests=max(1, len(classification.kinds)))
    free = False
    if action.is_llm:
        try:
            llm = meter.inspect_request(
                action.provider,
                method,
                view.path,
                view.query,
                view.body,
                policy.meter,
                action.price,
                origin=meter.origin(view.scheme, host, port),  # priced as the proxy prices it
                content_type=view.headers.get("content-type"),
            )
        except meter.MeterRequestError as exc:
            out.add("estimate", f"cannot read the request: {exc}")
            out.decision = "would_deny" if policy.mode == "shadow" else "deny"
            out.reason = "bad_request (400)"
            return out
        view.model = llm.model  # as the proxy does: authority's `when: {model: …}` reads it
        # Which of genai-prices' providers: the host's own (api.groq.com: groq), then the family's.
        providers = meter.price_providers(llm.provider, llm.price_provider)
        if not llm.priced:
            priced = f" (model unknown to genai-prices' {' and '.join(providers)}: fallback price)"
        elif llm.billable and action.price is None:
            rest = "".join(f", else {other}'s" for other in providers[1:])
            priced = f" (genai-prices' {providers[0]} prices{rest})"
        else:
            priced = ""
        # Billed outside tokens and known before the call: a transcription's seconds of audio,
        # tts-1's characters, a search model's web search.
        extras = "".join(f" + {n} {key}" for key, n in sorted(llm.expected_extras.items()))
        if llm.once_key is not None:
            out.add(
                "estimate",
                f"{llm.provider} {llm.endpoint}: a batch's results, held at $0 (the batch was "
                "billed upstream); charged the usage its answers report at genai-prices' batch "
                "price, the first time they are read, and the batch's hold released",
            )
        elif not llm.billable:  # no tokens, no estimate: what the provider does with it instead
            out.add(
                "estimate",
                f"{llm.provider} {llm.endpoint}{' model ' + llm.model if llm.model else ''}: "
                "no tokens to meter; "
                + (
                    "the provider does not bill it: uncharged and unguarded"
                    if not llm.step
                    else "billed by the provider other than per token: counted as a request "
                    "at $0 (to price it, match it first with a tool action that has a `cost`)"
                ),
            )
        else:
            batch = llm.batch
            what = (
                f"a batch of {batch.requests} requests at the batch price, most on {llm.model}"
                if batch is not None and llm.billable
                else f"model {llm.model}"
                if llm.model
                else "(no model named)"
            )
            out.add(
                "estimate",
                f"{llm.provider} {llm.endpoint} {what}: {llm.input_tokens} input tokens "
                f"+ up to {llm.max_output_tokens} output{extras} = "
                f"≈${format_usd(llm.estimate_usd_nanos)}{priced}",
            )
            if batch is not None and llm.billable:
                out.add(
                    "estimate",
                    "held past the submission, until the batch's results are read or it ends "
                    "without results (at most its window and an hour): the room it may use "
                    "stays taken while it runs",
                )
        free = not llm.billable and not llm.step
        estimate = Amount(
            usd=llm.estimate_usd_nanos, tokens=llm.input_tokens + llm.max_output_tokens, requests=1
        )
    elif action.cost_usd_nanos:
        out.add("estimate", f"fixed cost ${format_usd(action.cost_usd_nanos)}")
    out.data["estimate"] = {
        "usd_nanos": estimate.usd,
        "tokens": estimate.tokens,
        "requests": estimate.requests,
    }

    kind = classification.kind or action.kind
    if classification.mcp:
        calls = ", ".join(
            f"{m.method}{'(' + m.tool + ')' if m.tool else ''} → {m.kind}"
            for m in classification.mcp
        )
        out.add("mcp", calls)
    out.data["action"] = kind
    if policy.authority.rules or policy.authority.default == "deny":
        for each, seen in classification.authorizations(view) or [(kind, view)]:
            evaluation = evaluate(policy.authority, identity.levels, identity.path, each, seen)
            # Without a ledger, assume the run's history meets the requirements and say so.
            if evaluation.checks and db:
                history = _history(db, identity.path, evaluation.checks)
            else:
                history = [True] * len(evaluation.checks)
                for check in evaluation.checks:
                    out.add("requires", f"{check.requirement.describe()} (pass --db to look it up)")
            verdict = evaluation.finish(history)
            for line in (
                evaluation.trace
                if db
                else [t for t in evaluation.trace if "requirement met" not in t]
            ):
                out.add("authority", line)
            if not evaluation.trace:
                out.add("authority", f"no rule matches {each}; default: {policy.authority.default}")
            if verdict.decision != "allow":
                out.decision = (
                    "would_deny"
                    if policy.mode == "shadow" or verdict.decision == "would_deny"
                    else "deny"
                )
                status = STATUS.get(verdict.reason_code or "", 403)  # bad_request: 400
                out.reason = f"{verdict.reason_code} ({status if verdict.decision == 'deny' else 'shadow'}): {verdict.reason}"
                if verdict.decision == "deny":
                    return out
            elif evaluation.checks and not db:
                out.reason = "only if the run's history meets the requirement(s) above, else requires_unmet (403)"
            elif verdict.rule is not None:
                out.add("authority", f"allowed by {verdict.rule.describe()}")

    if free:  # as the proxy does: authorized, then forwarded with no budget or guard
        out.reason = out.reason or "passes through uncharged"
        return out

    from .addon import fingerprint, guards_for  # as the proxy decides them

    guards = guards_for(policy, classification.kinds or kind)
    if guards is not None and not db:
        out.add("detectors", "loop, step_count or fan_out may refuse it (pass --db to count)")
    elif guards is not None:
        row = DecisionRow(
            "explain",
            now,
            "allow",
            policy.mode,
            identity.path,
            tenant=identity.levels.get("tenant"),
            workflow=identity.levels.get("workflow"),
            action=kind,
            fingerprint=None
            if classification.mcp_housekeeping
            else fingerprint(kind, view, classification),
        )
        tripped = _guard_counts(db, row, guards).trip(row, guards)
        if tripped is not None:
            out.add("detector", tripped.detail)
            out.decision = "would_deny" if guards.shadow else "deny"
            out.reason = f"anomaly (429): {tripped.detail}"
            if not guards.shadow:
                return out

    claims = claims_for(policy, identity.levels, classification.kinds or kind, now)
    if not claims:
        out.add("budgets", "none cover this scope and action")
    state = _ledger_state(db, claims) if db else {}
    shortfalls = []
    for claim in claims:
        limits = ", ".join(
            f"{unit} {exact_usd(claim.limit_usd, 2) if unit == 'usd' else claim.limit(unit)}"
            for unit in ("usd", "tokens", "requests")
            if claim.limit(unit) is not None
        )
        line = f"{claim.scope} ({claim.budget}; {limits}{' per ' + claim.per if claim.per else ''}{'; shadow' if claim.shadow else ''})"
        held = state.get((claim.budget, claim.scope, claim.window_start))
        # Without the ledger (or before the instance exists) nothing is spent: a limit below
        # the estimate refuses the call all the same.
        for unit in ("usd", "tokens", "requests"):
            limit = claim.limit(unit)
            if limit is None:
                continue
            used = held[f"spent_{unit}"] + held[f"reserved_{unit}"] if held is not None else 0
            if used + estimate.get(unit) > limit:
                shortfalls.append((claim, unit))
        if held is not None:
            line += (
                f" — spent ${format_usd(held['spent_usd'])}, {held['spent_requests']} request(s)"
            )
        out.add("budget", line)
    if not db and shortfalls and not out.reason:
        # Not even an empty budget has room for it: decided without the ledger.
        claim, unit = sorted(shortfalls, key=lambda s: (s[0].shadow, deciding_order(s[0])))[0]
        out.decision = "would_deny" if claim.shadow or policy.mode == "shadow" else "deny"
        status = "402"  # no window will take it: waiting cannot help
        out.reason = (
            f"budget {claim.scope} {unit}: its limit is below this call's estimate, so it "
            f"refuses it whatever was spent ({'shadow' if claim.shadow else status})"
        )
    elif db:

        def waits(claim: Claim, unit: str) -> bool:  # the proxy's rule, Shortfall.waits
            limit = claim.limit(unit) or 0
            return Shortfall(claim, unit, limit, 0, 0, estimate.get(unit)).waits

        enforced = sorted(
            (s for s in shortfalls if not s[0].shadow),
            key=lambda s: deciding_order(s[0], waits(*s)),
        )
        if enforced:
            claim, unit = enforced[0]
            out.decision = "would_deny" if policy.mode == "shadow" else "deny"
            status = "429" if waits(claim, unit) else "402"
            out.reason = f"budget {claim.scope} {unit} exhausted ({status})"
        elif shortfalls:
            out.decision = "would_deny"
            out.reason = f"shadow budget {shortfalls[0][0].scope} {shortfalls[0][1]} exhausted"
        elif not out.reason:
            out.reason = "fits every budget" if claims else "no budget applies"
    elif not out.reason:
        out.reason = (
            "if every budget above has room (pass --db to check the ledger)"
            if claims
            else "no budget applies"
        )
    elif claims:
        out.reason += "; and if every budget above has room"
    return out


_PROBE = "explain-probe"


def _unknown_callers(
    policy: Policy, caller: Caller, levels: Mapping[str, str], now: float
) -> list[str]:
    """The levels the proxy would take from the caller's address, which every live request
    has and explain has only when told (--client-ip): the scope shown differs there. (Proxy
    credentials an agent may well not send: without --proxy-user, explain assumes none.)"""
    if caller.client_ip is not None:
        return []
    probed = identify(policy.identity, replace(caller, client_ip=_PROBE), IdleRuns(), now)
    return [
        f"{level}: the proxy would take it from the caller's address, which explain was not "
        "given (pass --client-ip)"
        for level, value in probed.levels.items()
        if value == _PROBE and levels.get(level) != _PROBE
    ]


# The run ids idle_split mints (identity.IdleRuns, and the ledger's for --workers):
# secrets.token_hex(4).
_MINTED = re.compile(r"[0-9a-f]{8}")


def _current_idle_run(
    db: str, key: str, levels: Mapping[str, str], idle_seconds: int, now: float
) -> tuple[str, str] | None:
    """The idle-split run the proxy would continue for this agent, and how explain knows it;
    None when it would mint a new one. The proxy continues only a run idle_split started,
    used less than `idle_seconds` ago, never a run the agent named (identity.IdleRuns):
    proxies started with --workers keep that run in the ledger (idle_runs); one proxy process
    keeps it in memory, where explain cannot look, so the ledger's requests stand in for it."""
    from .ledger.reader import Reader

    reader = Reader(db)
    try:
        shared = reader.query("SELECT run, last_seen FROM idle_runs WHERE key = :key", {"key": key})
        if shared and now - shared[0]["last_seen"] < idle_seconds:
            ago = now - shared[0]["last_seen"]
            return shared[0]["run"], (
                f"the agent's current run in the ledger: the idle-split run proxies started "
                f"with --workers keep there, last used {ago:.0f}s ago"
            )
        rows = reader.query(
            "SELECT run, ts FROM decisions WHERE COALESCE(tenant, '') = :tenant "
            "AND COALESCE(workflow, '') = :workflow AND COALESCE(agent, '') = :agent "
            "AND run IS NOT NULL AND LENGTH(run) = 8 AND ts > :since ORDER BY ts DESC",
            {
                **{level: levels.get(level, "") for level in ("tenant", "workflow", "agent")},
                "since": now - idle_seconds,
            },
        )
    finally:
        reader.close()
    ended = shared[0]["run"] if shared else None  # the workers' run, idle too long: not continued
    for row in rows:
        if _MINTED.fullmatch(row["run"]) and row["run"] != ended:
            return row["run"], (
                f"assumed the agent's current run in the ledger: its latest run with an id "
                f"idle_split mints, {now - row['ts']:.0f}s ago; a single proxy process keeps "
                "its idle-split runs in memory, so a proxy restarted since, or a run the agent "
                "named with such an id, makes this wrong"
            )
    return None


def _guard_counts(db: str, row: DecisionRow, guards: Guards) -> Counts:
    """What the reserve's guards would count for this request, read from the ledger."""
    from .ledger.reader import Reader

    counts = Counts()
    reader = Reader(db)
    try:
        where = {"scope": row.scope, "fingerprint": row.fingerprint}
        if guards.max_repeats is not None:
            (found,) = reader.query(
                f"SELECT COUNT(*) AS n, {window_refusals_counted()} AS w "
                "FROM decisions WHERE scope = :scope "
                f"AND fingerprint = :fingerprint AND {agents_own()}",
                where,
            )
            counts.repeats[row.scope, row.fingerprint or ""] = found["n"]
            counts.window_refusals[row.scope, row.fingerprint or ""] = found["w"]
        if guards.max_steps is not None:
            counts.steps[row.scope] = reader.query(
                f"SELECT COUNT(*) AS n FROM decisions WHERE scope = :scope AND {agents_own()}",
                where,
            )[0]["n"]
        if guards.max_repeats is not None or guards.max_steps is not None:
            # The failed attempts the guards forgive (anomalies.loop.retries), as the ledger reads them.
            counts.failed[row.scope] = {
                r["fingerprint"]: r["n"]
                for r in reader.query(
                    "SELECT fingerprint, COUNT(*) AS n FROM decisions WHERE scope = :scope "
                    f"AND {failed_attempt()} GROUP BY fingerprint",
                    where,
                )
            }
        if guards.max_runs_per_workflow is not None and row.workflow is not None:
            runs = reader.query(
                "SELECT DISTINCT scope FROM decisions WHERE workflow = :workflow "
                "AND COALESCE(tenant, '') = :tenant AND decision <> 'deny'",
                {"workflow": row.workflow, "tenant": row.tenant or ""},
            )
            counts.runs[row.workflow, row.tenant or ""] = len(runs)
            if any(r["scope"] == row.scope for r in runs):
                counts.known.add((row.workflow, row.scope))
        return counts
    finally:
        reader.close()


def _history(db: str, scope: str, checks: list[Any]) -> list[bool]:
    from .ledger.reader import Reader
    from .ledger.sqlite import glob_to_like

    reader = Reader(db)
    try:
        answers = []
        for check in checks:
            likes = " OR ".join(
                f"action LIKE :a{i} ESCAPE '\\'" for i in range(len(check.requirement.actions))
            )
            params = {f"a{i}": glob_to_like(a) for i, a in enumerate(check.requirement.actions)}
            params.update(scope=scope, field=check.requirement.there or "", value=check.value or "")
            rows = reader.query(
                f"SELECT 1 FROM facts WHERE scope = :scope AND field = :field AND value = :value AND ({likes}) LIMIT 1",
                params,
            )
            answers.append(bool(rows))
        return answers
    finally:
        reader.close()


def _ledger_state(db: str, claims: list[Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    from .ledger.reader import Reader

    reader = Reader(db)
    try:
        found = {}
        for claim in claims:
            rows = reader.query(
                "SELECT * FROM budget_instances WHERE budget = :budget AND scope = :scope AND window_start = :ws",
                {"budget": claim.budget, "scope": claim.scope, "ws": claim.window_start},
            )
            if rows:
                found[(claim.budget, claim.scope, claim.window_start)] = rows[0]
        return found
    finally:
        reader.close()
