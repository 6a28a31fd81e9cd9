"""Classification: the first action whose match fits names the request."""

from __future__ import annotations

import json
from pathlib import Path

from drawdown.budgets import claims_for, window
from drawdown.classify import RequestView, classify
from drawdown.policy import load_policy

POLICY = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: crm.read, match: {host: crm.example.com, method: GET, path: "/api/customers/{id}"}, cost: {usd: 0.002}}
  - {kind: refund.big, match: {host: api.stripe.com, method: POST, path: /v1/refunds, json: {amount: {gt: 5000}}}}
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}}
  - {kind: search, match: {host: api.search.example, query: {q: {exists: true}}}}
  - {kind: repo.write, match: {host: api.github.com, method: [PUT, POST], path: "/repos/*/contents/tests/**"}}
budgets:
  - {scope: "tenant:*", per: day, usd: 100}
  - {scope: "agent:*/run:*", usd: 0.5}
  - {scope: "agent:support-*/run:*", actions: [refund.*], requests: 3}
"""


def view(
    method: str, host: str, path: str, body: object = None, query: dict[str, str] | None = None
) -> RequestView:
    return RequestView(
        method,
        host,
        443,
        path,
        query or {},
        {},
        json.dumps(body).encode() if body is not None else b"",
    )


def test_first_match_wins_with_body_conditions(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy(tmp_path / "p.yaml")
    assert classify(policy, view("POST", "api.openai.com", "/v1/chat/completions")).kind == "llm"
    assert (
        classify(policy, view("POST", "api.stripe.com", "/v1/refunds", {"amount": 9000})).kind
        == "refund.big"
    )
    assert (
        classify(policy, view("POST", "api.stripe.com", "/v1/refunds", {"amount": 100})).kind
        == "refund.issue"
    )
    assert (
        classify(policy, view("POST", "api.stripe.com", "/v1/refunds", None)).kind == "refund.issue"
    )
    crm = classify(policy, view("GET", "crm.example.com", "/api/customers/c-9"))
    assert crm.kind == "crm.read" and crm.path_params == {"id": "c-9"}
    assert classify(policy, view("DELETE", "crm.example.com", "/api/customers/c-9")).action is None
    assert (
        classify(policy, view("GET", "api.search.example", "/s", query={"q": "x"})).kind == "search"
    )
    assert classify(policy, view("GET", "api.search.example", "/s")).action is None
    assert (
        classify(policy, view("PUT", "api.github.com", "/repos/app/contents/tests/unit/a.py")).kind
        == "repo.write"
    )
    assert (
        classify(policy, view("PUT", "api.github.com", "/repos/app/contents/src/a.py")).action
        is None
    )
    assert classify(policy, view("GET", "example.org", "/")).action is None


def test_budget_instances_per_scope_and_action(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy(tmp_path / "p.yaml")
    levels = {"tenant": "acme", "agent": "support-2", "run": "r7"}
    now = 1_700_000_123.0
    llm = claims_for(policy, levels, "llm", now)
    assert [(c.budget, c.scope) for c in llm] == [
        ("tenant:* per day", "tenant:acme"),
        ("agent:*/run:*", "agent:support-2/run:r7"),
    ]
    assert llm[0].window_start == 1_699_920_000 and llm[0].window_end == 1_700_006_400
    refund = claims_for(policy, levels, "refund.issue", now)
    assert [c.scope for c in refund] == [
        "tenant:acme",
        "agent:support-2/run:r7",
        "agent:support-2/run:r7",
    ]
    assert refund[2].limit_requests == 3
    # No run level: run budgets do not apply.
    assert [c.budget for c in claims_for(policy, {"tenant": "acme", "agent": "x"}, "llm", now)] == [
        "tenant:* per day"
    ]


def test_windows() -> None:
    assert window(None, 123.0) == (0, None)
    assert window("minute", 125.0) == (120, 180)
    assert window("hour", 3 * 3600 + 5) == (3 * 3600, 4 * 3600)
    start, end = window("month", 1_709_251_200.0 + 10)  # 2024-03-01T00:00:10Z
    assert (start, end) == (1_709_251_200, 1_709_251_200 + 31 * 86400)
    feb = window("month", 1_706_745_600.0 + 5)  # 2024-02-01 (leap year)
    assert feb[1] - feb[0] == 29 * 86400


def test_escaped_paths_read_as_servers_read_them() -> None:
    """%-escapes of letters, digits and -._~ mean the characters themselves to every server
    (RFC 3986 §2.3); %2F, other escapes and dot segments are left for the ambiguity check."""
    from drawdown.classify import normalize_path

    assert normalize_path("/docs/%6Dcp") == "/docs/mcp"
    assert normalize_path("/customers/%63%2d7%7E") == "/customers/c-7~"
    assert normalize_path("/v1%2Frefunds/%25/%20") == "/v1%2Frefunds/%25/%20"
    assert normalize_path("/x/%2e%2e/admin") == "/x/../admin"  # then refused if it changes


def test_a_path_another_action_would_read_is_refused_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    p = load_policy(tmp_path / "p.yaml")
    refund = {"amount": 100}
    assert classify(p, view("POST", "api.stripe.com", "/v1/refunds", refund)).path_error is None
    for path in ("/v1%2Frefunds", "/v1/refunds/x/..", "/v1/./x/../refunds"):
        found = classify(p, view("POST", "api.stripe.com", path, refund))
        assert found.path_error is not None and "/v1/refunds" in found.path_error, path
    # Decoded or not, a path that stays the same action's is no problem, nor one whose
    # resolved reading no action names by path (a%2Fb: two segments, no action's)...
    for path in ("/api/customers/c%207", "/api/customers/a%2Fb"):
        same = classify(p, view("GET", "crm.example.com", path))
        assert same.path_error is None and same.kind == "crm.read", path
    # ...but an LLM endpoint hidden behind a %2F (host-only action: same kind) is: the
    # meter would not know it for chat completions, and the call would go unmetered.
    hidden = classify(p, view("POST", "api.openai.com", "/v1/chat%2Fcompletions", {}))
    assert hidden.action is not None and hidden.path_error is not None


def test_an_escaped_slash_inside_a_segment_is_read_as_the_action_names_it(tmp_path: Path) -> None:
    """GitLab's API names a project `group%2Fproject` in one segment and never splits it.
    Resolved, the path names no action (only a catch-all takes it): no escape from the
    action that names the raw path, so it is not refused."""
    (tmp_path / "p.yaml").write_text(
        "actions:\n"
        "  - {kind: mr.create, match: {host: gitlab.example.com, method: POST,"
        ' path: "/api/v4/projects/{project}/merge_requests"}}\n'
        "  - {kind: other, match: {}}\n"
    )
    p = load_policy(tmp_path / "p.yaml")
    found = classify(
        p, view("POST", "gitlab.example.com", "/api/v4/projects/group%2Fapp/merge_requests")
    )
    assert found.path_error is None and found.kind == "mr.create"
    assert found.path_params == {"project": "group%2Fapp"}
