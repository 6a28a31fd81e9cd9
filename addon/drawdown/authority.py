"""Who may do what, in what order (SPEC §5). Deterministic; no I/O.

Precedence: an explicit deny (or an unmet `requires`, or a failed `action … when`
constraint) wins; then any matching allow; then the default. A met requirement
allows nothing by itself. Rules in `mode: shadow` never block: what they would have
denied is reported as `would_deny`. The outcome does not depend on rule order —
only which reason is quoted first does.

Evaluation is two-phase because `requires` looks at the run's history in the
ledger: `evaluate` returns the static part and the history checks still needed;
`Evaluation.finish(present)` takes their answers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .classify import RequestView
from .policy.match import holds, missing
from .policy.model import Authority, Requirement, Rule
from .recording import is_secret


def canonical(value: Any) -> str | None:
    """A field value as compared across requests: 42, 42.0 and "42" are the same customer."""
    if value is missing() or value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(Decimal(value).normalize())
    if isinstance(value, float):
        return str(Decimal(repr(value)).normalize())
    if isinstance(value, str):
        try:
            return (
                str(Decimal(value.strip()).normalize())
                if value.strip().lstrip("-").replace(".", "", 1).isdigit()
                else value
            )
        except ArithmeticError:
            return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def kept(there: str, value: str | None) -> str | None:
    """A `requires … same` value as the run's history (the ledger's facts) keeps it: a secret,
    by the name of the field it is stored under (`path.token`) or by its shape, only as its
    SHA-256. Both sides of the comparison go through here, so equal values still match."""
    if value is None or not is_secret(there, value):
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class HistoryCheck:
    """Has this run already succeeded at one of `requirement.actions` (with `there` == value)?"""

    rule: Rule
    requirement: Requirement
    value: str | None  # this request's `here` value; None when the requirement has no `same`

    @property
    def key(self) -> tuple[tuple[str, ...], str, str | None]:
        return (self.requirement.actions, self.requirement.there or "", self.value)


@dataclass(frozen=True)
class Verdict:
    decision: str  # allow | deny | would_deny
    reason_code: str | None = None
    reason: str | None = None
    rule: Rule | None = None


@dataclass
class Evaluation:
    authority: Authority
    kind: str
    scope: str
    denial: tuple[str, str, Rule] | None = None  # (code, reason, rule) of the first enforced denial
    shadow_denial: tuple[str, str, Rule] | None = None
    allowed_by: Rule | None = None
    checks: list[HistoryCheck] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)  # for `drawdown explain`

    def _deny(self, rule: Rule, code: str, reason: str) -> None:
        if rule.mode == "shadow":
            self.shadow_denial = self.shadow_denial or (code, reason, rule)
        else:
            self.denial = self.denial or (code, reason, rule)

    def finish(self, present: list[bool] | None = None) -> Verdict:
        for check, ok in zip(self.checks, present or [False] * len(self.checks), strict=True):
            if ok:
                self.trace.append(
                    f"{check.rule.describe()}: requirement met ({check.requirement.describe()})"
                )
                continue
            self.trace.append(
                f"{check.rule.describe()}: requirement NOT met ({check.requirement.describe()})"
            )
            self._deny(
                check.rule,
                "requires_unmet",
                f"{self.kind} requires {check.requirement.describe()} ({check.rule.describe()})",
            )
        if self.denial:
            code, reason, rule = self.denial
            return Verdict("deny", code, reason, rule)
        if self.allowed_by is None and self.authority.default == "deny":
            return Verdict(
                "deny",
                "not_authorized",
                f"no rule allows {self.kind} for {self.scope} (authority default: deny)",
            )
        if self.shadow_denial:
            code, reason, rule = self.shadow_denial
            return Verdict("would_deny", code, reason, rule)
        return Verdict("allow", rule=self.allowed_by)


def evaluate(
    authority: Authority, levels: Mapping[str, str], scope: str, kind: str, view: RequestView
) -> Evaluation:
    result = Evaluation(authority, kind, scope or "(no scope)")
    for rule in authority.rules:
        if not rule.scope.matches(levels) or not rule.covers(kind):
            continue
        if (unsure := view.unsure(rule.when)) is not None:
            _unreadable(result, rule, *unsure)
            continue
        when_ok = all(holds(test.condition, view.field(test.field)) for test in rule.when)
        shadow = " (shadow)" if rule.mode == "shadow" else ""
        if rule.effect == "deny" and when_ok:
            result.trace.append(f"{rule.describe()}: deny {kind}{shadow}")
            result._deny(
                rule,
                "not_authorized",
                f"{kind} is not allowed for {result.scope} ({rule.describe()})",
            )
        elif rule.effect == "allow" and when_ok:
            result.trace.append(f"{rule.describe()}: allow {kind}{shadow}")
            if rule.mode != "shadow" and result.allowed_by is None:
                result.allowed_by = rule
        elif rule.effect == "allow":
            result.trace.append(
                f"{rule.describe()}: would allow {kind}, but its 'when' does not hold"
            )
        elif rule.effect == "constrain" and not when_ok:
            result.trace.append(f"{rule.describe()}: condition on {kind} not met{shadow}")
            result._deny(
                rule, "not_authorized", f"{kind} does not meet the condition of {rule.describe()}"
            )
        elif rule.effect == "require" and when_ok:
            for requirement in rule.requires:
                if requirement.here and (why := view.unread(requirement.here)) is not None:
                    _unreadable(result, rule, requirement.here, why)
                    continue
                value = canonical(view.field(requirement.here)) if requirement.here else None
                if requirement.here and value is None:
                    result.trace.append(
                        f"{rule.describe()}: this request has no {requirement.here} to match"
                    )
                    result._deny(
                        rule,
                        "requires_unmet",
                        f"{kind} requires {requirement.describe()}, but this request has no {requirement.here} ({rule.describe()})",
                    )
                    continue
                value = kept(requirement.there or "", value)
                result.checks.append(HistoryCheck(rule, requirement, value))
    return result


def _unreadable(result: Evaluation, rule: Rule, name: str, why: str) -> None:
    """A rule that reads a field the request does not let drawdown read as its upstream will
    (a body neither JSON nor a plain form, a parameter given twice): it neither holds nor
    fails for sure, so the request is refused, 400, rather than decided on a guess."""
    shadow = " (shadow)" if rule.mode == "shadow" else ""
    result.trace.append(f"{rule.describe()}: cannot read {name}: {why}{shadow}")
    result._deny(
        rule,
        "bad_request",
        f"{result.kind}: {rule.describe()} reads {name}, which drawdown cannot read as the "
        f"upstream would: {why}",
    )


def facts_of(authority: Authority, kind: str, view: RequestView) -> list[tuple[str, str]]:
    """What a successful `kind` request must leave in the run's history for later `requires` checks."""
    facts = []
    for name in sorted(authority.fact_fields(kind)):
        if not name:
            facts.append(("", ""))
        elif view.unread(name) is not None:
            continue  # no fact a later `requires … same` could match on a guess
        elif (value := kept(name, canonical(view.field(name)))) is not None:
            facts.append((name, value))
    return facts
