"""The compiled policy: what the proxy consults on every request. Immutable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..meter.config import MeterConfig, PricePerMillion
from .match import Condition, HostPattern, PathPattern, ScopePattern
from .source import Problem

MODES = ("enforce", "shadow")
WINDOWS = ("minute", "hour", "day", "month")
UNITS = ("usd", "tokens", "requests")


@dataclass(frozen=True)
class Source:
    """Where an identity level's value may come from (SPEC §2)."""

    kind: str  # header | proxy_user | proxy_password | client_ip | value | idle_split
    arg: str | int | None = None


@dataclass(frozen=True)
class FieldTest:
    """`json.amount: {gt: 5000}` — a request field and the condition it must meet."""

    field: str  # json.<path> | query.<name> | header.<name> | path.<name> | model
    condition: Condition
    line: int = 0


@dataclass(frozen=True)
class ActionMatch:
    hosts: tuple[HostPattern, ...] = ()  # any of them; empty = any host
    methods: tuple[str, ...] = ()  # upper-case; empty = any method
    path: PathPattern | None = None
    tests: tuple[FieldTest, ...] = ()  # query/json/header conditions, all must hold

    @property
    def needs_body(self) -> bool:
        return any(t.field.startswith("json.") for t in self.tests)


@dataclass(frozen=True)
class Action:
    kind: str
    match: ActionMatch
    provider: str | None = None  # LLM actions: openai | anthropic | gemini | mcp
    cost_usd_nanos: int | None = None  # fixed cost of a tool action
    cost_header: str | None = None  # response header holding the actual cost in USD
    cost_json: str | None = None  # dotted path in the JSON response holding the actual cost in USD
    price: PricePerMillion | None = None  # price override for OpenAI-compatible hosts
    # OpenAI chat and legacy completions streams: add stream_options.include_usage when the client did not. False for
    # an OpenAI-compatible host that rejects the option (its streams are then "counted").
    stream_usage: bool = True
    tools: tuple[
        tuple[Any, str], ...
    ] = ()  # MCP: (compiled glob over tool names, kind), first match wins
    file: str = ""
    line: int = 0

    def tool_kind(self, tool: str) -> str | None:
        for glob, kind in self.tools:
            if glob.match(tool):
                return kind
        return None

    @property
    def is_llm(self) -> bool:
        return self.provider in ("openai", "anthropic", "gemini", "bedrock")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def hostless_action(actions: tuple[Action, ...] | list[Action]) -> Action | None:
    """The first action that names no host. With one, `unknown_hosts: passthrough` has no
    effect: any host may be that action's, so every host must be decrypted."""
    return next((a for a in actions if not a.match.hosts), None)


@dataclass(frozen=True)
class Limits:
    """Per-unit limits of a budget; None means the unit is not limited."""

    usd_nanos: int | None = None
    tokens: int | None = None
    requests: int | None = None


@dataclass(frozen=True)
class Budget:
    key: str  # stable identity of the budget across reloads: its name, or scope|per|actions
    scope: ScopePattern
    limits: Limits
    per: str | None = None  # minute | hour | day | month | None (lifetime)
    actions: tuple[Any, ...] = ()  # compiled globs over action kinds; empty = every action
    action_texts: tuple[str, ...] = ()
    mode: str | None = None  # per-budget override of the policy mode
    file: str = ""
    line: int = 0
    mode_line: int = field(default=0, compare=False, repr=False)  # of its `mode:`, if any

    def covers_action(self, kind: str | None) -> bool:
        if not self.actions:
            return True
        return kind is not None and any(glob.match(kind) for glob in self.actions)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Requirement:
    """`requires: [{action: crm.read, same: {json.customer_id: path.id}}]`: an earlier 2xx action in the run."""

    actions: tuple[str, ...]  # globs over action kinds
    here: str | None = None  # field of this request…
    there: str | None = None  # …that must equal this field of the earlier one
    line: int = field(default=0, compare=False, repr=False)  # of its `same:` (else its own)

    def describe(self) -> str:
        what = " or ".join(self.actions)
        if self.here is None:
            return f"an earlier successful {what} in this run"
        if self.here == self.there:
            return f"an earlier successful {what} in this run with the same {self.here}"
        return f"an earlier successful {what} in this run whose {self.there} equals this request's {self.here}"


@dataclass(frozen=True)
class Rule:
    """One authority rule (SPEC §5)."""

    effect: str  # allow | deny | constrain (action + when) | require (action + requires)
    scope: ScopePattern
    actions: tuple[Any, ...]  # compiled globs over action kinds
    action_texts: tuple[str, ...]
    when: tuple[FieldTest, ...] = ()
    requires: tuple[Requirement, ...] = ()
    mode: str | None = None
    name: str | None = None
    file: str = ""
    line: int = 0
    mode_line: int = field(default=0, compare=False, repr=False)  # of its `mode:`, if any

    def covers(self, kind: str | None) -> bool:
        return kind is not None and any(glob.match(kind) for glob in self.actions)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def describe(self) -> str:
        label = f"rule '{self.name}'" if self.name else "rule"
        return f"{label} at {self.where}"


@dataclass(frozen=True)
class Authority:
    default: str = "allow"  # allow | deny
    rules: tuple[Rule, ...] = ()

    def fact_fields(self, kind: str) -> frozenset[str]:
        """Fields of a successful `kind` request that later `requires … same:` checks will compare."""
        fields: set[str] = set()
        for rule in self.rules:
            for requirement in rule.requires:
                if any(_glob_match(pattern, kind) for pattern in requirement.actions):
                    fields.add(requirement.there or "")
        return frozenset(fields)


def _glob_match(pattern: str, kind: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(kind, pattern)


@dataclass(frozen=True)
class Detector:
    """One structural anomaly detector (SPEC §9): thresholds, which actions, flag or deny."""

    name: str
    on_detect: str = "flag"  # flag | deny
    actions: tuple[str, ...] = ()  # globs over action kinds; empty = every action
    params: tuple[tuple[str, Any], ...] = ()  # the detector's thresholds, e.g. (("repeats", 5),)

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def covers(self, kind: str | None) -> bool:
        from fnmatch import fnmatchcase

        return not self.actions or (
            kind is not None and any(fnmatchcase(kind, a) for a in self.actions)
        )


# name → (parameter → default). Detectors a policy does not name keep these, and flag.
DETECTORS: dict[str, dict[str, Any]] = {
    # the same request (action + body) more than `repeats` times in a run; the first `retries`
    # failed attempts of each request (408/409/429/5xx or no answer: what the SDKs retry, 2
    # times by default) are not counted by loop or step_count
    "loop": {"repeats": 5, "retries": 2},
    # a costed call committed at < ratio × its reservation (no `actions`: tool calls only, since
    # an LLM reservation includes the whole max_tokens and a short reply is normal)
    "under_commit": {"ratio": Decimal("0.1")},
    # a call that should take time answered by the upstream in < N ms (no `actions`: LLM calls)
    "fast_commit": {"latency_ms": 5},
    "step_count": {
        "max": 60,
        "history_runs": 100,
        "history_percentile": 99,
        "history_min_runs": 20,  # fewer earlier runs of the agent: only `max` applies
        "history_factor": Decimal("2"),  # flag above factor × the agent's percentile
    },  # run far above expected
    "fan_out": {"max_runs_per_workflow": 5, "max_agents_per_workflow": 10},
    # two agents of a workflow with step counts this far apart (the busier one at least min_steps)
    "handoff": {"ratio": Decimal("3"), "min_steps": 10},
    "drift": {"ratio": Decimal("2.0")},  # actual above ratio × estimate
    "unpriced_model": {},  # a model genai-prices does not know (charged at the fallback price)
}
# The least each parameter may be (1 unless named): retries 0 counts every attempt.
MINIMUMS: dict[tuple[str, str], int] = {("loop", "retries"): 0}
# Only these can refuse a request before it runs; the others are known after the call.
DENIABLE = ("loop", "step_count", "fan_out")


@dataclass(frozen=True)
class AnomalySettings:
    detectors: tuple[Detector, ...] = tuple(
        Detector(name, params=tuple(p.items())) for name, p in DETECTORS.items()
    )

    def get(self, name: str) -> Detector:
        for detector in self.detectors:
            if detector.name == name:
                return detector
        return Detector(name, params=tuple(DETECTORS.get(name, {}).items()))

    def denying(self, name: str) -> Detector | None:
        detector = self.get(name)
        return detector if detector.on_detect == "deny" else None


# The ledger's `meta` key of the anomaly settings of a policy the proxy ran (Judging.record),
# by the digest prefix its decisions carry: a report without --policy judges by them.
JUDGING_KEY = "anomalies:"


@dataclass(frozen=True)
class Judging:
    """What a report's detectors judge runs by: a policy's `anomalies:` settings, and the action
    kinds it prices itself (which `unpriced_model` never flags). `source` says where they came
    from: `policy` (given to the report), `ledger` (recorded by the proxy that made the
    decisions), `defaults` (neither). `others`: how many other settings the report's
    decisions were made under (a reload mid-way, two fleets on one ledger; which judged which
    runs is anomalies.RunJudgings'); `unrecorded`:
    how many policies they were made under whose settings the ledger does not have (an older
    drawdown's, or a record it cannot read), so the report cannot tell."""

    settings: AnomalySettings = field(default_factory=AnomalySettings)
    priced: frozenset[str] | None = None  # None: not known (no policy), ask genai-prices only
    source: str = "defaults"
    digest: str = ""
    others: int = 0
    unrecorded: int = 0

    @classmethod
    def of(cls, policy: Policy) -> Judging:
        priced = frozenset(a.kind for a in policy.actions if a.price is not None)
        return cls(policy.anomalies, priced, "policy", policy.digest[:16])

    def record(self) -> str:
        """The settings as the ledger keeps them (JSON; Decimals as strings, exactly)."""
        detectors = [
            {
                "name": d.name,
                "on_detect": d.on_detect,
                "actions": list(d.actions),
                "params": {k: str(v) if isinstance(v, Decimal) else v for k, v in d.params},
            }
            for d in self.settings.detectors
        ]
        return json.dumps({"detectors": detectors, "priced": sorted(self.priced or ())})

    @classmethod
    def from_record(cls, text: str, digest: str) -> Judging | None:
        """The settings a proxy recorded; None if unreadable. A detector or parameter this
        drawdown does not know (recorded by a newer one) is left out; one it knows that the
        record lacks keeps its default."""
        try:
            data = json.loads(text)
            detectors = []
            for item in data["detectors"]:
                defaults = DETECTORS.get(item["name"])
                if defaults is None:
                    continue
                params = dict(defaults)
                for key, value in item["params"].items():
                    if key in defaults:
                        params[key] = (
                            Decimal(str(value))
                            if isinstance(defaults[key], Decimal)
                            else int(value)
                        )
                on_detect = item["on_detect"] if item["on_detect"] in ("flag", "deny") else "flag"
                actions = tuple(str(a) for a in item["actions"])
                detectors.append(Detector(item["name"], on_detect, actions, tuple(params.items())))
            priced = frozenset(str(kind) for kind in data["priced"])
        except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError):
            return None
        named = {d.name for d in detectors}
        detectors += [
            Detector(name, params=tuple(p.items()))
            for name, p in DETECTORS.items()
            if name not in named
        ]
        return cls(AnomalySettings(tuple(detectors)), priced, "ledger", digest)


RECORD_BODIES = ("none", "fields", "full")


@dataclass(frozen=True)
class RecordSettings:
    """What the ledger keeps of each request for `drawdown replay` (never headers; secrets redacted).

    bodies: none — no body; fields — the json.* fields this policy references plus `fields`;
    full — the whole JSON body (up to max_body_bytes).
    """

    bodies: str = "fields"
    fields: tuple[str, ...] = ()  # extra json.* fields to keep, for policies not written yet
    max_body_bytes: int = 65536


@dataclass(frozen=True)
class RequestLimits:
    """`limits:` — a request body above max_request_bytes (raw or decoded) is refused with 413,
    before it is tokenized or forwarded. Applies to requests an action matches. The default is
    the largest request any supported provider accepts (Anthropic's 32 MB)."""

    max_request_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class HoldSettings:
    ttl_seconds: int = 900  # a hold lives this long unless its stream is still flowing
    lease_seconds: int = 30  # a dead proxy's holds are released this long after its last heartbeat


@dataclass(frozen=True)
class Policy:
    mode: str = "enforce"
    unknown_hosts: str = "allow"  # allow | deny | passthrough
    on_ledger_error: str | None = None  # deny | allow; None = deny in enforce mode, allow in shadow
    identity: dict[str, tuple[Source, ...]] = field(default_factory=dict)
    actions: tuple[Action, ...] = ()
    budgets: tuple[Budget, ...] = ()
    authority: Authority = field(default_factory=Authority)
    anomalies: AnomalySettings = field(default_factory=AnomalySettings)
    meter: MeterConfig = field(default_factory=MeterConfig)
    holds: HoldSettings = field(default_factory=HoldSettings)
    record: RecordSettings = field(default_factory=RecordSettings)
    limits: RequestLimits = field(default_factory=RequestLimits)
    files: tuple[str, ...] = ()
    digest: str = ""  # sha256 of the policy text, recorded with decisions
    # `FILE:LINE: warning: …`: valid, but likely not what was meant (printed by `drawdown check`)
    warnings: tuple[Problem, ...] = ()

    @property
    def ledger_error_allows(self) -> bool:
        if self.on_ledger_error is not None:
            return self.on_ledger_error == "allow"
        return self.mode == "shadow"

    @property
    def uses_proxy_auth(self) -> bool:
        return any(
            s.kind in ("proxy_user", "proxy_password")
            for sources in self.identity.values()
            for s in sources
        )

    def budget_mode(self, budget: Budget) -> str:
        """A budget's own `mode: shadow` trials it under an enforced policy; a shadow policy
        (or `--mode shadow`) blocks nothing, whatever a budget says, as it does for rules."""
        return "shadow" if self.mode == "shadow" else budget.mode or self.mode
