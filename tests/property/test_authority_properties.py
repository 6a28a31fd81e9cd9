"""Property tests: authority decisions are deterministic and do not depend on rule order."""

from __future__ import annotations

import random

from drawdown.authority import evaluate
from drawdown.classify import RequestView
from drawdown.policy.match import compile_condition, compile_glob, compile_scope
from drawdown.policy.model import Authority, FieldTest, Requirement, Rule
from hypothesis import given, settings
from hypothesis import strategies as st

KINDS = ["llm", "crm.read", "refund.issue", "repo.write"]
AGENTS = ["support-1", "support-lead", "coder", "research"]

rule_strategy = st.builds(
    lambda effect, scope, kinds, amount, shadow: Rule(
        effect=effect,
        scope=compile_scope(scope),
        actions=tuple(compile_glob(k) for k in kinds),
        action_texts=tuple(kinds),
        when=(FieldTest("json.amount", compile_condition({"lte": amount})),)
        if amount is not None
        else (),
        requires=(Requirement(("crm.read",)),) if effect == "require" else (),
        mode="shadow" if shadow else None,
    ),
    effect=st.sampled_from(["allow", "deny", "constrain", "require"]),
    scope=st.sampled_from(["*", "agent:support-*", "agent:support-lead", "agent:coder", "agent:*"]),
    kinds=st.lists(st.sampled_from([*KINDS, "refund.*", "*"]), min_size=1, max_size=2),
    amount=st.one_of(st.none(), st.integers(0, 10_000)),
    shadow=st.booleans(),
).filter(lambda r: r.effect != "constrain" or r.when)


@settings(max_examples=300, deadline=None)
@given(
    rules=st.lists(rule_strategy, max_size=8),
    default=st.sampled_from(["allow", "deny"]),
    agent=st.sampled_from(AGENTS),
    kind=st.sampled_from(KINDS),
    amount=st.integers(0, 10_000),
    history=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_decision_is_deterministic_and_order_independent(
    rules, default, agent, kind, amount, history, seed
) -> None:
    view = RequestView("POST", "h", 443, "/", body=b'{"amount": %d}' % amount)
    levels = {"agent": agent, "run": "r"}

    def decide(ordered: list[Rule]) -> str:
        evaluation = evaluate(
            Authority(default, tuple(ordered)), levels, "agent:x/run:r", kind, view
        )
        return evaluation.finish([history] * len(evaluation.checks)).decision

    first = decide(rules)
    assert decide(rules) == first  # same policy, same request: same decision
    shuffled = list(rules)
    random.Random(seed).shuffle(shuffled)
    assert decide(shuffled) == first
    # Deny wins: adding an enforced deny for this kind and scope always denies.
    deny = Rule("deny", compile_scope("*"), (compile_glob(kind),), (kind,))
    assert decide([*rules, deny]) == "deny"
