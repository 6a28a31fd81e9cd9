"""Authority (SPEC §5): deny wins, then allow, then default; requires; per-rule shadow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from drawdown.authority import canonical, evaluate, facts_of
from drawdown.classify import RequestView
from drawdown.policy import PolicyInvalid, load_policy

SUPPORT = """
authority:
  default: allow
  rules:
    - {scope: "agent:support-*", allow: [llm, crm.read]}
    - {scope: "agent:support-*", deny: [refund.issue]}
    - {scope: "agent:support-lead", allow: [refund.issue], when: {json: {amount: {lte: 5000}}}}
    - {scope: "*", action: refund.issue, requires: [crm.read]}
    - {scope: "*", action: refund.issue, requires: [{action: crm.read, same: {json.customer_id: path.id}}]}
    - {scope: "*", action: llm, when: {model: {in: [gpt-4o-mini, claude-haiku-4-5]}}}
"""


def policy_from(tmp_path: Path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return load_policy(path)


def view(body: object = None, model: str | None = None, params: dict | None = None) -> RequestView:
    return RequestView(
        "POST", "api.stripe.com", 443, "/v1/refunds", {}, {},
        json.dumps(body).encode() if body is not None else b"", params or {}, model,
    )  # fmt: skip


def decide(policy, agent: str, kind: str, v: RequestView, history: list[bool] | None = None):
    levels = {"agent": agent, "run": "r1"}
    evaluation = evaluate(policy.authority, levels, f"agent:{agent}/run:r1", kind, v)
    answers = history if history is not None else [True] * len(evaluation.checks)
    return evaluation, evaluation.finish(answers)


def test_explicit_deny_wins_over_allow(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, SUPPORT)
    # support-lead is allowed refunds ≤ 5000, but the support-* deny rule also matches it: deny wins.
    _, verdict = decide(
        policy, "support-lead", "refund.issue", view({"amount": 100, "customer_id": "c1"})
    )
    assert verdict.decision == "deny" and verdict.reason_code == "not_authorized"
    assert verdict.rule is not None and verdict.rule.line == 6


def test_allow_with_condition(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
authority:
  default: deny
  rules:
    - {scope: "agent:lead", allow: [refund.issue], when: {json: {amount: {lte: 5000}}}}
""",
    )
    assert decide(policy, "lead", "refund.issue", view({"amount": 5000}))[1].decision == "allow"
    over = decide(policy, "lead", "refund.issue", view({"amount": 5001}))[1]
    assert over.decision == "deny" and "authority default: deny" in (over.reason or "")
    assert decide(policy, "other", "refund.issue", view({"amount": 1}))[1].decision == "deny"


def test_default_applies_when_no_rule_matches(tmp_path: Path) -> None:
    allow = policy_from(
        tmp_path, "authority: {default: allow, rules: [{scope: 'agent:x', deny: [a]}]}"
    )
    assert decide(allow, "y", "a", view())[1].decision == "allow"
    deny = policy_from(
        tmp_path, "authority: {default: deny, rules: [{scope: 'agent:x', allow: [a]}]}"
    )
    assert decide(deny, "y", "a", view())[1].decision == "deny"
    assert decide(deny, "x", "a", view())[1].decision == "allow"


def test_requires_unmet_denies_even_where_allowed(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
authority:
  default: deny
  rules:
    - {scope: "*", allow: [refund.issue]}
    - {scope: "*", action: refund.issue, requires: [crm.read]}
""",
    )
    _evaluation, verdict = decide(policy, "a", "refund.issue", view({"amount": 1}), history=[False])
    assert verdict.decision == "deny" and verdict.reason_code == "requires_unmet"
    assert "an earlier successful crm.read in this run" in (verdict.reason or "")
    assert (
        decide(policy, "a", "refund.issue", view({"amount": 1}), history=[True])[1].decision
        == "allow"
    )


def test_met_requirement_allows_nothing_by_itself(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        "authority:\n  default: deny\n  rules:\n    - {scope: '*', action: refund.issue, requires: [crm.read]}\n",
    )
    assert decide(policy, "a", "refund.issue", view(), history=[True])[1].decision == "deny"


def test_requires_same_field_checks_the_value(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, SUPPORT)
    evaluation, _ = decide(
        policy, "agent-x", "refund.issue", view({"customer_id": 42, "amount": 10})
    )
    queries = [(c.requirement.actions, c.requirement.there, c.value) for c in evaluation.checks]
    assert queries == [(("crm.read",), None, None), (("crm.read",), "path.id", "42")]
    missing_field = decide(policy, "agent-x", "refund.issue", view({"amount": 10}))[1]
    assert missing_field.decision == "deny" and "has no json.customer_id" in (
        missing_field.reason or ""
    )


def test_constraint_rule_on_model(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, SUPPORT)
    assert decide(policy, "research", "llm", view(model="gpt-4o-mini"))[1].decision == "allow"
    expensive = decide(policy, "research", "llm", view(model="gpt-5"))[1]
    assert expensive.decision == "deny" and "does not meet the condition" in (
        expensive.reason or ""
    )


def test_shadow_rule_reports_would_deny(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        "authority:\n  rules:\n    - {scope: 'agent:coder', deny: [repo.write], mode: shadow}\n",
    )
    verdict = decide(policy, "coder", "repo.write", view())[1]
    assert verdict.decision == "would_deny" and verdict.reason_code == "not_authorized"
    both = policy_from(
        tmp_path,
        "authority:\n  rules:\n    - {scope: 'agent:coder', deny: [repo.write], mode: shadow}\n"
        "    - {scope: 'agent:coder', deny: [repo.*]}\n",
    )
    assert decide(both, "coder", "repo.write", view())[1].decision == "deny"


def test_facts_recorded_for_later_requirements(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, SUPPORT)
    read = RequestView("GET", "crm.example.com", 443, "/api/customers/42", path_params={"id": "42"})
    assert facts_of(policy.authority, "crm.read", read) == [("", ""), ("path.id", "42")]
    assert facts_of(policy.authority, "llm", read) == []


@pytest.mark.parametrize(
    ("a", "b"),
    [(42, "42"), (42, 42.0), ("c-1", "c-1"), (True, True), ({"x": 1, "y": 2}, {"y": 2, "x": 1})],
)
def test_canonical_values_compare_across_requests(a: object, b: object) -> None:
    assert canonical(a) == canonical(b)


def test_rule_schema_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        """authority:
  default: maybe
  rules:
    - {scope: "*", allow: [a], deny: [b]}
    - {scope: "*", allow: [a], requires: [b]}
    - {scope: "*", action: a}
    - {scope: "*", action: a, requires: [{action: b, same: "bogus.x"}]}
    - {scope: "*", allow: [a], when: {jsn: {x: 1}}}
"""
    )
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(path)
    text = [str(p) for p in caught.value.problems]
    assert any(":2: authority.default must be one of allow, deny" in t for t in text)
    assert any(":4: a rule names its actions with exactly one of" in t for t in text)
    assert any(":5: 'requires' goes with 'action: KIND'" in t for t in text)
    assert any(":6: a rule with 'action:' needs 'requires:' or 'when:'" in t for t in text)
    assert any(":7: 'bogus.x' is not a request field" in t for t in text)
    assert any(":8: unknown field 'jsn' in when" in t for t in text)
