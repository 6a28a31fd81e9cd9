"""Replay, end to end: record mixed traffic (several agents and runs, LLM and tool calls) through
a proxy in shadow mode, replay it against an enforcing policy with `drawdown replay`, then send
the same traffic live through a proxy enforcing that policy: replay's would-block list is what
the enforcing proxy actually blocked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.support.proxy import DrawdownProcess
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

ACTIONS = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: crm.read, match: {host: crm.example.com, method: GET, path: "/customers/{id}"}, cost: {usd: 0.002}}
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}, cost: {usd: 0.01}}
  - {kind: search, match: {host: search.example.com}, cost: {usd: 0.001}}
"""
# What the team ran for a week: no limits, everything recorded.
SHADOW = "mode: shadow\nrecord: {bodies: full}\n" + ACTIONS
# What they want to enforce.
ENFORCE = ACTIONS + textwrap.dedent(
    """
    budgets:
      - {scope: "agent:*/run:*", requests: 6}
      - {scope: "agent:researcher", usd: 0.00007}
    authority:
      rules:
        - {name: no-intern-refunds, scope: "agent:intern", deny: [refund.issue]}
        - name: look-up-first
          scope: "*"
          action: refund.issue
          requires: [{action: crm.read, same: {json.customer_id: path.id}}]
    anomalies:
      loop: {repeats: 3, on_detect: deny}
    """
)


def traffic(proxy: DrawdownProcess) -> list[int]:
    """The same sequence of calls, whatever the proxy decides; the status each got."""
    statuses: list[int] = []

    def headers(agent: str, run: str) -> dict[str, str]:
        return {"X-Drawdown-Agent": agent, "X-Drawdown-Run": run}

    def ask(agent: str, run: str, prompt: str) -> None:
        with proxy.openai_client(default_headers=headers(agent, run), max_retries=0) as client:
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=50,
                )
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)

    with proxy.http_client() as http:

        def call(agent: str, run: str, method: str, url: str, body: dict | None = None) -> None:
            statuses.append(
                http.request(method, url, json=body, headers=headers(agent, run)).status_code
            )

        for i in range(8):  # a run budget of 6 requests stops the 7th
            ask("researcher", "R1", f"research question {i}")
        call("support", "S1", "GET", "https://crm.example.com/customers/c1")
        call(
            "support",
            "S1",
            "POST",
            "https://api.stripe.com/v1/refunds",
            {"customer_id": "c1", "amount": 1200},
        )
        call(
            "support",
            "S1",
            "POST",
            "https://api.stripe.com/v1/refunds",
            {"customer_id": "c2", "amount": 300},
        )
        call("intern", "I1", "GET", "https://crm.example.com/customers/c1")
        call(
            "intern",
            "I1",
            "POST",
            "https://api.stripe.com/v1/refunds",
            {"customer_id": "c1", "amount": 50},
        )
        for _ in range(5):  # the 4th identical search is a loop
            call("poller", "P1", "GET", "https://search.example.com/status?job=7")
        for i in range(4):  # the researcher's dollar budget runs out in the second run
            ask("researcher", "R2", f"follow-up {i}")
    return statuses


def blocked_live(proxy: DrawdownProcess) -> list[tuple[str, int, str]]:
    """(scope, position of the request in its scope, reason) of every request the proxy denied."""
    rows = proxy.query(
        "SELECT scope, decision, reason_code, request_id FROM decisions ORDER BY ts, id"
    )
    position: dict[str, int] = {}
    found = []
    for scope, decision, reason, _ in rows:
        position[scope] = position.get(scope, -1) + 1
        if decision == "deny":
            found.append((scope, position[scope], reason))
    return found


def test_replay_predicts_what_enforcement_blocks(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    recording = tmp_path / "shadow.db"
    shadow = drawdown_proxy(SHADOW, db=recording)
    shadow_statuses = traffic(shadow)
    assert set(shadow_statuses) == {200}  # shadow mode blocks nothing
    shadow.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE completed_at IS NULL", until=lambda r: r[0][0] == 0
    )
    shadow.stop()

    policy = tmp_path / "enforce.yaml"
    policy.write_text(ENFORCE)
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", "replay", "--policy", str(policy), "--db", str(recording), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    replayed = json.loads(result.stdout)
    assert replayed["warnings"] == []
    order = [row[0] for row in shadow.query("SELECT request_id FROM decisions ORDER BY ts, id")]
    scopes = dict(shadow.query("SELECT request_id, scope FROM decisions"))
    position: dict[str, int] = {}
    where: dict[str, tuple[str, int]] = {}
    for request_id in order:
        scope = scopes[request_id]
        position[scope] = position.get(scope, -1) + 1
        where[request_id] = (scope, position[scope])
    predicted = [(*where[b["request_id"]], b["reason_code"]) for b in replayed["blocked"]]
    assert {p[2] for p in predicted} == {
        "budget_exhausted",
        "requires_unmet",
        "not_authorized",
        "anomaly",
    }

    standin.clear()
    live = drawdown_proxy(policy, db=tmp_path / "live.db")
    live_statuses = traffic(live)
    actual = blocked_live(live)
    assert sorted(predicted) == sorted(actual)
    # …and the statuses the agents saw are the ones replay named.
    denied_statuses = sorted(s for s in live_statuses if s != 200)
    assert denied_statuses == sorted(b["status"] for b in replayed["blocked"])
    # Replay's per-run summary names where each run was first stopped.
    first = {r["scope"]: r["first_blocked"]["reason_code"] for r in replayed["runs"]}
    assert first["tenant:default/agent:researcher/run:R1"] == "budget_exhausted"
    assert first["tenant:default/agent:intern/run:I1"] == "not_authorized"
    assert first["tenant:default/agent:poller/run:P1"] == "anomaly"
    assert first["tenant:default/agent:researcher/run:R2"] == "budget_exhausted"
    assert {r["scope"] for r in replayed["runs"]} == set(first) and len(first) == 5
