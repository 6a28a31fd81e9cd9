"""`drawdown replay` over seeded ledgers, and what the ledger records for it (redacted)."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import genai_prices
import pytest
from drawdown import replay
from drawdown.classify import RequestView, classify
from drawdown.cli import main
from drawdown.ledger.api import Amount
from drawdown.meter import MeterConfig, inspect_request
from drawdown.policy import PolicyInvalid
from drawdown.policy.match import missing
from drawdown.recording import features, rebuild_json, redact

from tests.support.policies import policy_from
from tests.unit.seeding import Seeder


@pytest.fixture
def seed(tmp_path: Path) -> Seeder:
    seeder = Seeder(tmp_path / "ledger.db")
    yield seeder
    seeder.close()


policy = policy_from


ACTIONS = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: crm.read, match: {host: crm.example.com, method: GET, path: "/customers/{id}"}, cost: {usd: 0.002}}
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}, cost: {usd: 0.01}}
"""


def view(
    method: str,
    url_path: str,
    body: Any = None,
    query: dict[str, str] | None = None,
    host: str = "api.stripe.com",
) -> RequestView:
    return RequestView(
        method,
        host,
        443,
        url_path,
        query or {},
        {},
        json.dumps(body).encode() if body is not None else b"",
    )


# --- recording -------------------------------------------------------------------------------


def test_query_values_with_secret_names_are_redacted(tmp_path: Path) -> None:
    p = policy(tmp_path, ACTIONS)
    v = view("GET", "/v1/models", query={"key": "AIzaSyD-secret-gemini-key-000000000", "alt": "sse", "access_token": "t0k",
                                         "x": "sk-proj-abcdef", "page": "2"})  # fmt: skip
    got = features(p, v, classify(p, v))
    assert json.loads(got["query"]) == {
        "key": "[redacted]",
        "alt": "sse",
        "access_token": "[redacted]",
        "x": "[redacted]",
        "page": "2",
    }
    assert got["port"] == 443 and got["body_fields"] is None and got["body"] is None


def test_fields_mode_keeps_only_what_policies_read(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        ACTIONS
        + """
authority:
  rules:
    - {scope: "*", action: refund.issue, requires: [{action: crm.read, same: {json.customer_id: path.id}}]}
    - {scope: "*", action: refund.issue, when: {json: {amount: {lte: 5000}, "metadata.api_key": {exists: true}}}}
record: {fields: [json.reason]}
""",
    )
    body = {
        "amount": 1200,
        "customer_id": "c-7",
        "reason": "damaged",
        "card": "4242424242424242",
        "metadata": {"api_key": "k"},
    }
    v = view("POST", "/v1/refunds", body)
    got = features(p, v, classify(p, v))
    assert json.loads(got["body_fields"]) == {"json.amount": 1200, "json.customer_id": "c-7", "json.reason": "damaged",
                                              "json.metadata.api_key": "[redacted]"}  # fmt: skip
    assert got["body"] is None and "4242" not in json.dumps(got)


def test_full_mode_keeps_the_body_redacted(tmp_path: Path) -> None:
    p = policy(tmp_path, ACTIONS + "record: {bodies: full}\n")
    body = {
        "amount": 5,
        "auth": {"user": "u", "password": "hunter2"},
        "items": [{"token": "x"}, {"note": "Bearer abc.def"}],
        "apiKey": "z",
    }
    v = view("POST", "/v1/refunds", body)
    kept = json.loads(features(p, v, classify(p, v))["body"])
    assert kept == {
        "amount": 5,
        "auth": "[redacted]",
        "items": [{"token": "[redacted]"}, {"note": "[redacted]"}],
        "apiKey": "[redacted]",
    }


def test_none_mode_keeps_no_body(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        ACTIONS
        + "record: {bodies: none}\nauthority:\n  rules:\n    - {scope: '*', action: refund.issue, when: {json: {amount: {lte: 5}}}}\n",
    )
    v = view("POST", "/v1/refunds", {"amount": 1})
    got = features(p, v, classify(p, v))
    assert got["body_fields"] is None and got["body"] is None


def test_big_bodies_are_not_kept_whole(tmp_path: Path) -> None:
    p = policy(tmp_path, ACTIONS + "record: {bodies: full, max_body_bytes: 100}\n")
    v = view("POST", "/v1/refunds", {"text": "x" * 500})
    assert features(p, v, classify(p, v))["body"] is None


def test_mcp_calls_are_recorded_and_rebuilt(tmp_path: Path) -> None:
    p = policy(
        tmp_path, "actions:\n  - {kind: mcp.docs, provider: mcp, match: {host: mcp.example.com}}\n"
    )
    v = view("POST", "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search", "arguments": {"q": "x"}}},
             host="mcp.example.com")  # fmt: skip
    got = features(p, v, classify(p, v))
    assert json.loads(got["mcp"]) == {"batch": False, "calls": [["tools/call", "search"]]}
    again = view("POST", "/mcp", host="mcp.example.com")
    again._json = rebuild_json(None, None, got["mcp"])
    assert classify(p, again).kind == "mcp.docs.search"


def test_rebuild_json_from_fields() -> None:
    fields = json.dumps(
        {"json.amount": 3, "json.metadata.tier": "gold", "json.items.*.sku": ["a", "b"]}
    )
    doc = rebuild_json(None, fields, None)
    assert doc == {"amount": 3, "metadata": {"tier": "gold"}, "items": [{"sku": "a"}, {"sku": "b"}]}
    assert rebuild_json(None, None, None) is missing()
    assert rebuild_json('{"a": 1}', fields, None) == {"a": 1}


def test_redact_keeps_ordinary_fields() -> None:
    assert redact({"max_tokens": 10, "tokens": 3, "model": "gpt-4o", "keyboard": "qwerty"}) == {
        "max_tokens": 10, "tokens": 3, "model": "gpt-4o", "keyboard": "qwerty"}  # fmt: skip


def test_record_section_is_validated(tmp_path: Path) -> None:
    with pytest.raises(PolicyInvalid) as caught:
        policy(tmp_path, "record:\n  bodies: everything\n  fields: [query.x]\n  colour: red\n")
    text = str(caught.value)
    assert "policy.yaml:2: record.bodies must be one of none, fields, full" in text
    assert "policy.yaml:3: record.fields: 'query.x' is not a json.<path> field" in text
    assert "policy.yaml:4: unknown key 'colour' in record" in text
    assert policy(tmp_path, "actions: []\n").record.bodies == "fields"


# --- replay ----------------------------------------------------------------------------------


def llm(seed: Seeder, run: str, agent: str = "research", body: str | None = None, **kw: Any) -> Any:
    return seed.call(agent=agent, run=run, body=body, features={"port": 443}, **kw)


def tool(seed: Seeder, run: str, method: str, host: str, path: str, fields: dict[str, Any] | None = None,
         agent: str = "support-1", **kw: Any) -> Any:  # fmt: skip
    return seed.call(agent=agent, run=run, action="tool", provider=None, model=None, method=method, host=host, path=path,
                     est_usd=0, actual_usd=0, features={"port": 443, "body_fields": json.dumps(fields) if fields else None}, **kw)  # fmt: skip


def test_run_budget_blocks_where_enforcement_would_have(seed: Seeder, tmp_path: Path) -> None:
    calls = [
        llm(seed, "r1", body=f"step {i}", est_usd=2_000_000, actual_usd=1_000_000) for i in range(5)
    ]
    other = [
        llm(seed, "r2", body=f"s{i}", est_usd=2_000_000, actual_usd=1_000_000) for i in range(2)
    ]
    p = policy(tmp_path, ACTIONS + 'budgets:\n  - {scope: "agent:*/run:*", usd: 0.004}\n')
    data = replay.replay(p, str(seed.path))
    assert data["requests"] == 7 and data["recorded"] == {"allow": 7, "deny": 0, "would_deny": 0}
    assert data["decisions"] == {"allow": 5, "deny": 2, "would_deny": 0}
    assert [b["request_id"] for b in data["blocked"]] == [c.request_id for c in calls[3:]]
    first = data["blocked"][0]
    assert first["reason_code"] == "budget_exhausted" and first["status"] == 402
    assert first["by"] == "budget 'agent:*/run:*' on agent:research/run:r1"
    assert "budget agent:research/run:r1 usd 0.004 exhausted (spent 0.0030" in first["reason"]
    (run,) = data["runs"]
    assert run["scope"] == "tenant:acme/agent:research/run:r1" and run["blocked"] == 2
    assert run["usd_recorded"] == 0.005 and run["usd_replayed"] == 0.003
    assert run["first_blocked"]["request_id"] == calls[3].request_id
    assert not {o.request_id for o in other} & {b["request_id"] for b in data["blocked"]}


def test_windowed_budget_answers_429(seed: Seeder, tmp_path: Path) -> None:
    for i in range(3):
        llm(seed, "r", body=str(i))
    p = policy(tmp_path, ACTIONS + 'budgets:\n  - {scope: "agent:*", per: hour, requests: 2}\n')
    (blocked,) = replay.replay(p, str(seed.path))["blocked"]
    assert blocked["status"] == 429


def test_rules_and_requires_use_recorded_fields(seed: Seeder, tmp_path: Path) -> None:
    tool(seed, "s1", "GET", "crm.example.com", "/customers/c1")
    ok = tool(
        seed,
        "s1",
        "POST",
        "api.stripe.com",
        "/v1/refunds",
        {"json.customer_id": "c1", "json.amount": 100},
    )
    wrong = tool(
        seed,
        "s1",
        "POST",
        "api.stripe.com",
        "/v1/refunds",
        {"json.customer_id": "c2", "json.amount": 100},
    )
    big = tool(
        seed,
        "s1",
        "POST",
        "api.stripe.com",
        "/v1/refunds",
        {"json.customer_id": "c1", "json.amount": 9000},
    )
    intern = tool(
        seed,
        "s2",
        "POST",
        "api.stripe.com",
        "/v1/refunds",
        {"json.customer_id": "c1", "json.amount": 1},
        agent="intern",
    )
    p = policy(
        tmp_path,
        ACTIONS
        + """
authority:
  rules:
    - {name: no-interns, scope: "agent:intern", deny: [refund.issue]}
    - {name: lookup-first, scope: "*", action: refund.issue, requires: [{action: crm.read, same: {json.customer_id: path.id}}]}
    - {name: small-only, scope: "*", action: refund.issue, when: {json: {amount: {lte: 5000}}}}
""",
    )
    data = replay.replay(p, str(seed.path))
    blocked = {b["request_id"]: b for b in data["blocked"]}
    assert set(blocked) == {wrong.request_id, big.request_id, intern.request_id}
    assert ok.request_id not in blocked
    assert (
        blocked[wrong.request_id]["reason_code"] == "requires_unmet"
        and "lookup-first" in blocked[wrong.request_id]["by"]
    )
    assert (
        "small-only" in blocked[big.request_id]["by"] and blocked[big.request_id]["status"] == 403
    )
    assert "no-interns" in blocked[intern.request_id]["by"]
    assert data["warnings"] == []


def test_a_lookup_the_new_policy_blocks_leaves_no_fact(seed: Seeder, tmp_path: Path) -> None:
    tool(seed, "s", "GET", "crm.example.com", "/customers/c1")
    refund = tool(seed, "s", "POST", "api.stripe.com", "/v1/refunds", {"json.customer_id": "c1"})
    p = policy(
        tmp_path,
        ACTIONS
        + """
authority:
  rules:
    - {scope: "*", deny: [crm.read]}
    - {scope: "*", action: refund.issue, requires: [{action: crm.read, same: {json.customer_id: path.id}}]}
""",
    )
    assert {b["request_id"] for b in replay.replay(p, str(seed.path))["blocked"]} >= {
        refund.request_id
    }


def test_loop_guard_in_the_new_policy(seed: Seeder, tmp_path: Path) -> None:
    same = [llm(seed, "r", body="same prompt") for _ in range(4)]
    p = policy(tmp_path, ACTIONS + "anomalies:\n  loop: {repeats: 2, on_detect: deny}\n")
    data = replay.replay(p, str(seed.path))
    assert [b["request_id"] for b in data["blocked"]] == [s.request_id for s in same[2:]]
    assert data["blocked"][0]["by"] == "anomalies.loop" and data["blocked"][0]["status"] == 429


def test_a_budget_windows_refusals_are_forgiven_in_the_new_policy(
    seed: Seeder, tmp_path: Path
) -> None:
    """As the ledger's guard: a window's 429 says when to come back; the first loop.retries
    of its refusals of a request are forgiven, and the identical call made after the wait
    (the next minute) is no loop."""
    # Three within one minute of T0 (:20), the last followed by a minute's wait.
    same = [llm(seed, "r", body="same", gap=60.0 if i == 2 else 0.5) for i in range(3)]
    later = llm(seed, "r", body="same")

    def blocked(retries: int) -> dict[str, tuple[str, int]]:
        p = policy(
            tmp_path,
            ACTIONS
            + 'budgets:\n  - {scope: "agent:*/run:*", per: minute, requests: 1}\n'
            + f"anomalies:\n  loop: {{repeats: 2, retries: {retries}, on_detect: deny}}\n",
        )
        data = replay.replay(p, str(seed.path))
        return {b["request_id"]: (b["reason_code"], b["status"]) for b in data["blocked"]}

    assert blocked(2) == {call.request_id: ("budget_exhausted", 429) for call in same[1:]}
    # With no refusal forgiven, the call made after the wait is the third: a loop.
    assert blocked(0)[later.request_id] == ("anomaly", 429)


def test_a_retried_failure_is_no_repeat_in_the_new_policy(seed: Seeder, tmp_path: Path) -> None:
    """As the ledger's guard: the first loop.retries failed attempts of a request are forgiven
    once they have failed; one still in flight when the next starts counts."""
    failed = llm(seed, "r", body="same", actual_usd=None, status=500)
    retry = llm(seed, "r", body="same")
    again = llm(seed, "r", body="same")
    deny = "anomalies:\n  loop: {repeats: 1, on_detect: deny%s}\n"
    data = replay.replay(policy(tmp_path, ACTIONS + deny % ""), str(seed.path))
    assert [b["request_id"] for b in data["blocked"]] == [again.request_id]
    strict = replay.replay(policy(tmp_path, ACTIONS + deny % ", retries: 0"), str(seed.path))
    assert [b["request_id"] for b in strict["blocked"]] == [retry.request_id, again.request_id]
    assert failed.request_id not in {b["request_id"] for b in strict["blocked"]}
    # Concurrent: the next identical request started before the first had failed.
    llm(seed, "c", body="same", actual_usd=None, status=503, took=5.0, gap=-4.0)
    overlapping = llm(seed, "c", body="same")
    data = replay.replay(policy(tmp_path, ACTIONS + deny % ""), str(seed.path))
    assert overlapping.request_id in {b["request_id"] for b in data["blocked"]}


def test_a_retried_failure_is_no_step_in_the_new_policy(seed: Seeder, tmp_path: Path) -> None:
    for i in range(3):
        llm(seed, "r", body=f"s{i}", actual_usd=None, status=None)  # no answer: the client left
        llm(seed, "r", body=f"s{i}")
    last = llm(seed, "r", body="s3")
    p = policy(tmp_path, ACTIONS + "anomalies:\n  step_count: {max: 3, on_detect: deny}\n")
    data = replay.replay(p, str(seed.path))
    assert [b["request_id"] for b in data["blocked"]] == [last.request_id]
    assert "already took 3 steps" in data["blocked"][0]["reason"]


def test_a_shadow_policy_only_flags(seed: Seeder, tmp_path: Path) -> None:
    for i in range(3):
        llm(seed, "r", body=str(i))
    p = policy(
        tmp_path,
        "mode: shadow\n" + ACTIONS + 'budgets:\n  - {scope: "agent:*/run:*", requests: 1}\n',
    )
    data = replay.replay(p, str(seed.path))
    assert data["blocked"] == [] and data["decisions"] == {"allow": 1, "deny": 0, "would_deny": 2}
    assert data["runs"][0]["would_deny"] == 2


def test_requests_denied_live_are_assumed_to_succeed_when_now_allowed(
    seed: Seeder, tmp_path: Path
) -> None:
    tool(
        seed,
        "s",
        "POST",
        "api.stripe.com",
        "/v1/refunds",
        {"json.amount": 1},
        deny=("not_authorized", "no"),
    )
    data = replay.replay(policy(tmp_path, ACTIONS), str(seed.path))
    assert (
        data["recorded"]["deny"] == 1 and data["decisions"]["allow"] == 1 and data["changed"] == 1
    )
    assert data["usd_replayed"] == 0.01  # the refund's fixed cost, as its estimate


def test_a_request_denied_before_its_estimate_is_priced_at_its_hosts_prices(
    seed: Seeder, tmp_path: Path
) -> None:
    """Re-estimated from its recorded body as the proxy would: a Groq model at genai-prices'
    Groq price, which a run budget the fallback price would exhaust lets through."""
    model, max_tokens = "llama-3.3-70b-versatile", 1000
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }
    seed.call(
        agent="research", run="g", model=model, host="api.groq.com",
        path="/openai/v1/chat/completions", est_usd=0, deny=("not_authorized", "no"),
        features={"port": 443, "body": json.dumps(body)},
    )  # fmt: skip
    groq = "actions:\n  - {kind: llm, provider: openai, match: {host: api.groq.com}}\n"
    budget = 'budgets:\n  - {scope: "agent:*/run:*", usd: 0.01}\n'
    data = replay.replay(policy(tmp_path, groq + budget), str(seed.path))
    assert data["decisions"] == {"allow": 1, "deny": 0, "would_deny": 0}, data
    prompt = inspect_request(
        "openai", "POST", "/v1/chat/completions", {}, json.dumps(body).encode(), MeterConfig()
    )
    usage = genai_prices.Usage(input_tokens=prompt.input_tokens, output_tokens=max_tokens)
    price = genai_prices.calc_price(
        usage, model, provider_api_url="https://api.groq.com/openai/v1/chat/completions"
    )
    assert data["usd_replayed_nanos"] == math.ceil(price.total_price * 1_000_000_000)


def test_warns_about_fields_the_ledger_never_recorded_in_the_window(
    seed: Seeder, tmp_path: Path
) -> None:
    tool(seed, "s", "POST", "api.stripe.com", "/v1/refunds", {"json.amount": 1})
    p = policy(
        tmp_path,
        ACTIONS
        + """
authority:
  rules:
    - {scope: "*", action: refund.issue, when: {json: {currency: {eq: usd}}, header.x-tier: {eq: gold}}}
""",
    )
    warnings = replay.replay(p, str(seed.path))["warnings"]
    assert any("json.currency" in w and "did not record" in w for w in warnings)
    assert any("header.x-tier" in w and "never recorded" in w for w in warnings)
    # A window with nothing in it (`--since 1s`) replayed 0 requests and still warned.
    quiet = replay.replay(p, str(seed.path), since=1, now=seed.now + 3600)
    assert quiet["requests"] == 0 and quiet["warnings"] == []
    # Nor of a rule on an action the window held no request of (found walking a shadow week).
    later = seed.now + 3600
    seed.now = later
    llm(seed, "r")
    chat_only = replay.replay(p, str(seed.path), since=60, now=later + 60)
    assert chat_only["requests"] == 1 and chat_only["warnings"] == []


def test_since_limits_the_replayed_traffic(seed: Seeder, tmp_path: Path) -> None:
    for i in range(4):
        llm(seed, "r", body=str(i), gap=3600)
    p = policy(tmp_path, ACTIONS)
    assert replay.replay(p, str(seed.path), since=3 * 3600, now=seed.now)["requests"] == 2


def test_cli_replay_text_and_json(
    seed: Seeder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        llm(seed, "r1", body=str(i))
    path = tmp_path / "enforce.yaml"
    path.write_text(ACTIONS + 'budgets:\n  - {scope: "agent:*/run:*", requests: 2}\n')
    assert main(["replay", "--policy", str(path), "--db", str(seed.path)]) == 0
    text = capsys.readouterr().out
    assert (
        "1 denied" in text
        and "tenant:acme/agent:research/run:r1" in text
        and "BLOCKED REQUESTS" in text
    )
    assert main(["replay", "--policy", str(path), "--db", str(seed.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decisions"]["deny"] == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets: 3\n")
    assert main(["replay", "--policy", str(bad), "--db", str(seed.path)]) == 1
    assert main(["replay", "--policy", str(path), "--db", str(tmp_path / "nope.db")]) == 1


@pytest.mark.parametrize("refusal", ["shutting_down", "internal_error"])
def test_a_call_turned_away_by_the_proxys_own_state_is_replayed_once(
    seed: Seeder, tmp_path: Path, refusal: str
) -> None:
    """Its SDK retried it (a 503 or a 500) and the retry is in the ledger: replaying the
    refusal too counted the call twice, against the run's budget."""
    llm(seed, "r1", body="step 1")
    llm(seed, "r1", body="step 2", deny=(refusal, "turned away by the proxy"))
    retried = llm(seed, "r1", body="step 2")
    p = policy(tmp_path, ACTIONS + 'budgets:\n  - {scope: "agent:*/run:*", requests: 2}\n')
    data = replay.replay(p, str(seed.path))
    assert data["requests"] == 2 and data["decisions"] == {"allow": 2, "deny": 0, "would_deny": 0}
    assert retried.request_id not in {b["request_id"] for b in data["blocked"]}


def test_since_still_counts_what_a_run_did_before_the_window(seed: Seeder, tmp_path: Path) -> None:
    """A run that spans the `--since` boundary: enforcement counted its earlier steps (loop
    repeats, its run budget, the lookup `requires` names); replay started it from nothing and
    let through what the new policy would have refused."""
    looped = [
        llm(seed, "span", body="same prompt", est_usd=1000, actual_usd=1000) for _ in range(4)
    ]
    spender = [llm(seed, "spend", body=f"s{i}", est_usd=1_000_000, actual_usd=1_000_000) for i in range(3)]  # fmt: skip
    tool(seed, "refunds", "GET", "crm.example.com", "/customers/c1")
    seed.now += 7200
    floor = seed.now
    looped += [
        llm(seed, "span", body="same prompt", est_usd=1000, actual_usd=1000) for _ in range(4)
    ]
    spender += [llm(seed, "spend", body=f"t{i}", est_usd=1_000_000, actual_usd=1_000_000) for i in range(2)]  # fmt: skip
    refund = tool(
        seed, "refunds", "POST", "api.stripe.com", "/v1/refunds", {"json.customer_id": "c1"}
    )
    p = policy(
        tmp_path,
        ACTIONS
        + 'budgets:\n  - {scope: "agent:*/run:*", actions: [llm], usd: 0.004}\n'
        + "anomalies:\n  loop: {repeats: 5, on_detect: deny}\n"
        + "authority:\n  rules:\n"
        + '    - {scope: "*", action: refund.issue, requires: [{action: crm.read, same: {json.customer_id: path.id}}]}\n',
    )
    now = seed.now + 60
    whole = replay.replay(p, str(seed.path), now=now)
    window = replay.replay(p, str(seed.path), since=now - floor, now=now)
    blocked = [
        looped[5].request_id,
        looped[6].request_id,
        looped[7].request_id,
        spender[4].request_id,
    ]
    assert [b["request_id"] for b in whole["blocked"]] == blocked
    # The window reports its own requests only, decided as the whole history decided them.
    assert window["requests"] == 4 + 2 + 1 and window["recorded"]["allow"] == 7
    assert [b["request_id"] for b in window["blocked"]] == blocked
    assert refund.request_id not in {b["request_id"] for b in window["blocked"]}
    assert {r["run"]: r["requests"] for r in window["runs"]} == {"span": 4, "spend": 2}


def test_replay_spend_is_printed_exactly(seed: Seeder, tmp_path: Path) -> None:
    """The summary's spend went through a float at 4 places: $0.000035 read $0.0000, while
    the runs table below it (from the nanos) read 0.000035."""
    for i in range(7):
        llm(seed, "tiny", body=f"s{i}", est_usd=5_000, actual_usd=5_000)
    p = policy(tmp_path, ACTIONS + 'budgets:\n  - {scope: "agent:*/run:*", requests: 6}\n')
    data = replay.replay(p, str(seed.path))
    assert (data["usd_recorded_nanos"], data["usd_replayed_nanos"]) == (35_000, 30_000)
    assert data["usd_recorded"] == 0.000035
    text = replay.render_text(data)
    assert "spend: $0.000035 as recorded, $0.00003 under the new policy" in text


REFUND = b'{"charge": "ch_1", "amount": 500}'
AGENT = "identity:\n  agent: [{value: support-1}]\n  run: [{value: r1}]\n"


def record(
    tmp_path: Path,
    policy_text: str,
    calls: Sequence[tuple[str, str, bytes] | tuple[str, str, bytes, dict[str, str]]],
    answer: bytes = b"{}",
) -> tuple[Path, list[int]]:
    """Send `calls` (method, host+path, body[, headers]) through the real addon, each upstream
    answering 200 with `answer`; return the ledger and the status each call got."""
    from drawdown.addon import Drawdown
    from mitmproxy import http
    from mitmproxy.test import tflow, tutils

    from tests.support.addon_harness import drive

    statuses: list[int] = []

    async def steps(addon: Drawdown) -> None:
        for method, url, body, *more in calls:
            host, _, path = url.partition("/")
            headers = {"content-type": "application/json", **(more[0] if more else {})}
            request = tutils.treq(
                host=host, port=443, scheme=b"https", method=method.encode(), path=b"/" + path.encode(),
                headers=http.Headers([(k.encode(), v.encode()) for k, v in headers.items()]), content=body,
            )  # fmt: skip
            flow = tflow.tflow(req=request)
            addon.requestheaders(flow)
            await addon.request(flow)
            if flow.response is None:  # forwarded: the upstream says yes
                flow.response = tutils.tresp(status_code=200, content=answer)
                addon.responseheaders(flow)
                await addon.response(flow)
            statuses.append(flow.response.status_code)

    return drive(tmp_path, policy_text, steps), statuses


def test_a_request_authority_denied_again_and_again_is_a_loop_when_replayed(
    tmp_path: Path,
) -> None:
    """The proxy fingerprinted a request only after authority allowed it: a refund denied
    three times was recorded without one, so a replay under a policy that allows refunds
    could not see the loop the agent was in."""
    import sqlite3

    denying = ACTIONS + AGENT + 'authority:\n  rules:\n    - {scope: "*", deny: [refund.issue]}\n'
    db, statuses = record(tmp_path, denying, [("POST", "api.stripe.com/v1/refunds", REFUND)] * 3)
    assert statuses == [403, 403, 403]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT reason_code, fingerprint FROM decisions").fetchall()
    assert [code for code, _ in rows] == ["not_authorized"] * 3
    assert len({fp for _, fp in rows}) == 1 and rows[0][1], "the denied repeats share a fingerprint"

    loop = "anomalies:\n  loop: {repeats: 2, on_detect: deny}\n"
    data = replay.replay(policy(tmp_path, ACTIONS + AGENT + loop, "new.yaml"), str(db))
    assert data["decisions"] == {"allow": 2, "deny": 1, "would_deny": 0}
    assert [b["by"] for b in data["blocked"]] == ["anomalies.loop"]


def test_replay_counts_authority_denials_as_the_proxy_does(tmp_path: Path) -> None:
    """Two refunds refused for want of a lookup, the lookup, then the same refund: the proxy
    counts the refused two as repeats and stops the third as a loop; replaying the same policy
    over that traffic must decide every request as the proxy did."""
    text = (
        ACTIONS + AGENT + "anomalies:\n  loop: {repeats: 2, on_detect: deny}\n"
        'authority:\n  rules:\n    - {scope: "*", action: refund.issue, requires: [crm.read]}\n'
    )
    refund = ("POST", "api.stripe.com/v1/refunds", REFUND)
    db, statuses = record(
        tmp_path, text, [refund, refund, ("GET", "crm.example.com/customers/7", b""), refund]
    )
    assert statuses == [403, 403, 200, 429]  # the last one: a loop
    data = replay.replay(policy(tmp_path, text, "same.yaml"), str(db))
    assert data["changed"] == 0, data["blocked"]
    assert [b["by"] for b in data["blocked"]][-1] == "anomalies.loop"


def test_an_image_call_counts_on_a_requests_budget_in_replay_as_live(tmp_path: Path) -> None:
    """An image generation is a request the proxy counts (a step billed other than per token);
    replay treated it as free and would have let a second image past a budget of one."""
    text = ACTIONS + AGENT + 'budgets:\n  - {scope: "agent:*/run:*", actions: [llm], requests: 1}\n'
    image = (
        "POST",
        "api.openai.com/v1/images/generations",
        b'{"model": "dall-e-3", "prompt": "a cat"}',
    )
    db, statuses = record(tmp_path, text, [image, image, ("GET", "api.openai.com/v1/models", b"")])
    assert statuses == [200, 402, 200]  # the listing costs nothing: no budget refuses it
    data = replay.replay(policy(tmp_path, text, "same.yaml"), str(db))
    assert data["changed"] == 0, data["blocked"]
    assert data["decisions"] == {"allow": 2, "deny": 1, "would_deny": 0}


def test_a_gpt_image_counts_on_a_usd_budget_in_replay_as_live(tmp_path: Path) -> None:
    """A GPT image model bills per token: the proxy reserves an image's price on USD budgets
    (an answer without usage commits that estimate), and replay re-decides it the same way;
    a larger budget lets the second image through."""
    budget = 'budgets:\n  - {scope: "agent:*/run:*", usd: %s}\n'
    image = (
        "POST",
        "api.openai.com/v1/images/generations",
        b'{"model": "gpt-image-1", "prompt": "a cat", "quality": "high", "size": "1024x1024"}',
    )
    text = ACTIONS + AGENT + budget % "0.30"
    db, statuses = record(tmp_path, text, [image, image])
    assert statuses == [200, 402]  # 4160 tokens at $40/M: $0.17 each
    data = replay.replay(policy(tmp_path, text, "same.yaml"), str(db))
    assert data["changed"] == 0, data["blocked"]
    assert data["decisions"] == {"allow": 1, "deny": 1, "would_deny": 0}
    looser = replay.replay(policy(tmp_path, ACTIONS + AGENT + budget % "1", "looser.yaml"), str(db))
    assert looser["decisions"]["allow"] == 2


class CountedScope(str):
    """A scope that counts the comparisons made with it (a subclass's __eq__ is tried first)."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        CountedScope.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_a_requirement_is_looked_up_not_searched_among_every_lookup(tmp_path: Path) -> None:
    """`requires` asked the replay's history by comparing the request with every earlier
    successful lookup of every run: a week of 90,000 requests spent 8 of its 10 s there."""
    sim = replay.Simulation(policy(tmp_path, ACTIONS))
    for n in range(5000):
        scope = f"tenant:acme/agent:support/run:r{n}"
        sim.hold([], Amount(), float(n), Amount(), [(scope, "crm.read", "path.id", f"c{n}")])
    sim.settle_until(5000.0)
    CountedScope.comparisons = 0
    asked = CountedScope("tenant:acme/agent:support/run:r4999")
    assert sim.history(asked, ["crm.read"], "path.id", "c4999")
    assert not sim.history(asked, ["crm.*"], "path.id", "c1")  # another run's lookup
    assert not sim.history(asked, ["refund.issue"], "path.id", "c4999")  # another action
    assert CountedScope.comparisons <= 3


def test_a_llama_invoke_counts_on_a_usd_budget_in_replay_as_live(tmp_path: Path) -> None:
    """A Bedrock invoke of another family than Claude was a $0 step; the proxy now reserves
    its estimate on USD budgets (genai-prices' `aws` price of the Llama body's prompt and
    max_gen_len), and replay re-decides it the same way."""
    bedrock = (
        "actions:\n  - {kind: llm, provider: bedrock, "
        'match: {host: "bedrock-runtime.*.amazonaws.com"}}\n'
    )
    budget = 'budgets:\n  - {scope: "agent:*/run:*", usd: %s}\n'
    invoke = (
        "POST",
        "bedrock-runtime.us-east-1.amazonaws.com/model/us.meta.llama3-3-70b-instruct-v1%3A0/invoke",
        b'{"prompt": "Write the report", "max_gen_len": 2000}',
    )
    text = bedrock + AGENT + budget % "0.001"  # one reserve: 2000+ tokens at $0.72/M, $0.00144
    db, statuses = record(tmp_path, text, [invoke])
    assert statuses == [402]
    data = replay.replay(policy(tmp_path, text, "same.yaml"), str(db))
    assert data["changed"] == 0, data["blocked"]
    assert data["decisions"] == {"allow": 0, "deny": 1, "would_deny": 0}
    looser = replay.replay(policy(tmp_path, bedrock + AGENT + budget % "1", "looser.yaml"), str(db))
    assert looser["decisions"]["allow"] == 1


def chat(content: str, max_tokens: int = 100) -> tuple[str, str, bytes]:
    body = {"model": "gpt-4o-mini", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    return ("POST", "api.openai.com/v1/chat/completions", json.dumps(body).encode())


def test_a_body_the_size_limit_refuses_is_refused_in_replay_as_live(tmp_path: Path) -> None:
    """limits.max_request_bytes refuses a body live (413) before it is read; replay skipped the
    check, so the unchanged policy replayed changed that decision. The ledger now keeps each
    body's size: the same policy decides as live, a looser one lets it through, a stricter
    one refuses what live let through."""
    text = ACTIONS + AGENT + "limits: {max_request_bytes: %d}\n"
    big = chat("x" * 5000)
    db, statuses = record(tmp_path, text % 2000, [chat("hi"), big, chat("hello")])
    assert statuses == [200, 413, 200]
    same = replay.replay(policy(tmp_path, text % 2000, "same.yaml"), str(db))
    assert same["changed"] == 0, same["blocked"]
    (refused,) = same["blocked"]
    assert (refused["reason_code"], refused["status"]) == ("body_too_large", 413)
    assert "(limits.max_request_bytes: 2000)" in refused["reason"]
    looser = replay.replay(policy(tmp_path, text % 10_000, "looser.yaml"), str(db))
    assert looser["decisions"] == {"allow": 3, "deny": 0, "would_deny": 0}
    stricter = replay.replay(policy(tmp_path, text % 50, "stricter.yaml"), str(db))
    assert stricter["decisions"] == {"allow": 0, "deny": 3, "would_deny": 0}


USAGE = json.dumps(
    {"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                  "finish_reason": "stop"}],
     "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}}
).encode()  # fmt: skip


BUDGET = 'budgets:\n  - {scope: "agent:*/run:*", usd: 0.05}\n'
DEARER = ACTIONS.replace(
    "match: {host: api.openai.com}}",
    "match: {host: api.openai.com}, price: {input: 100, output: 400}}",
)
CALLS = [chat("step one"), chat("step two"), chat("step three")]


def test_enforce_under_a_dearer_price_stops_the_second_call(tmp_path: Path) -> None:
    """What replay must predict (below): the first call ($0.04 estimate) fits the $0.05 budget,
    costs $0.14 (1,000 tokens in at $100/M, 100 out at $400/M), and the budget refuses the rest."""
    assert DEARER != ACTIONS
    _, statuses = record(tmp_path, DEARER + AGENT + BUDGET, CALLS, USAGE)
    assert statuses == [200, 402, 402]


@pytest.mark.parametrize("bodies", ["full", "fields"])
def test_replay_estimates_and_prices_as_a_new_price_would(tmp_path: Path, bodies: str) -> None:
    """A team that raises an action's `price:` must see replay stop what enforce then stops.
    Replay kept the recorded estimates and costs (genai-prices' gpt-4o-mini: a few hundredths
    of a cent), so it let every call through. Now each call records its metering settings:
    one metered otherwise has its cost priced again from its recorded tokens, and its estimate
    made again from its recorded body (kept, with a warning, when the body was not recorded)."""
    recording = f"record: {{bodies: {bodies}}}\n"
    text, dearer = (actions + AGENT + BUDGET + recording for actions in (ACTIONS, DEARER))
    db, statuses = record(tmp_path, text, CALLS, USAGE)
    assert statuses == [200, 200, 200]
    same = replay.replay(policy(tmp_path, text, "same.yaml"), str(db))
    assert same["changed"] == 0 and same["warnings"] == []
    # As enforce decides under the dearer price (the test below).
    data = replay.replay(policy(tmp_path, dearer, "dearer.yaml"), str(db))
    assert data["decisions"] == {"allow": 1, "deny": 2, "would_deny": 0}, data
    assert data["usd_replayed_nanos"] == 140_000_000
    assert any("charged again from their recorded input and output token counts" in w
               for w in data["warnings"])  # fmt: skip
    kept = [w for w in data["warnings"] if "their estimates are the recorded ones" in w]
    assert bool(kept) == (bodies == "fields"), data["warnings"]


SEARCH = "  - {kind: search, match: {host: search.example.com}}\nanomalies:\n  loop: {repeats: 2, on_detect: deny}\n"
SEARCHES = [("GET", f"search.example.com/q?term={t}", b"") for t in "abccc"]


def test_enforce_stops_a_looping_search_once_its_host_has_an_action(tmp_path: Path) -> None:
    """What replay must predict (below): the identical search's third call is a loop."""
    _, statuses = record(tmp_path, ACTIONS + SEARCH + AGENT, SEARCHES)
    assert statuses == [200, 200, 200, 200, 429]


def test_a_host_no_action_named_is_guarded_in_replay_once_the_new_policy_names_it(
    tmp_path: Path,
) -> None:
    """Bringing a tool host under the policy is a step of adoption: its calls were recorded
    with no action, and with no fingerprint, so replay never applied the loop guard to them
    while enforce then refused the loop. They are fingerprinted now (as an unnamed action)."""
    db, statuses = record(tmp_path, ACTIONS + AGENT, SEARCHES)
    assert statuses == [200] * 5
    data = replay.replay(policy(tmp_path, ACTIONS + SEARCH + AGENT, "named.yaml"), str(db))
    assert data["decisions"] == {"allow": 4, "deny": 1, "would_deny": 0}, data["blocked"]
    (looped,) = data["blocked"]
    assert (looped["reason_code"], looped["status"], looped["by"]) == (
        "anomaly",
        429,
        "anomalies.loop",
    )


def test_a_path_written_with_escapes_is_decided_as_the_server_reads_it(tmp_path: Path) -> None:
    """Matched raw, `/v1/%72efunds` missed the refund action (every server reads it as
    /v1/refunds) and went through as an unknown host's call: a denied action ran. It is now
    read decoded; a `%2F` or a dot segment that would make it another action's path to a
    server that resolves them is refused (400), whichever way the upstream would read it.
    Replay decides the recorded requests the same way."""
    text = ACTIONS + AGENT + 'authority:\n  rules:\n    - {scope: "*", deny: [refund.issue]}\n'
    refunds = [
        ("POST", f"api.stripe.com{path}", REFUND)
        for path in ("/v1/refunds", "/v1/%72efunds", "/v1%2Frefunds", "/v1/x/../refunds")
    ]
    looked_up = ("GET", "crm.example.com/customers/%63-7", b"")  # /customers/c-7: same action
    db, statuses = record(tmp_path, text, [*refunds, looked_up])
    assert statuses == [403, 403, 400, 400, 200]
    data = replay.replay(policy(tmp_path, text, "same.yaml"), str(db))
    assert data["changed"] == 0, data["blocked"]
    reasons = [b["reason"] for b in data["blocked"]]
    assert "the path /v1%2Frefunds reads as /v1/refunds to a server that decodes" in reasons[2]


def test_requests_a_server_reads_otherwise_are_decided_in_replay_as_live(tmp_path: Path) -> None:
    """`/v1//refunds`, `/V1/Refunds`, `/v1/refunds;x=1`, a `_method` or an override header
    asking for a denied DELETE, a Host header naming another host than the request went to:
    each went through live as an unknown call, and is refused (400) now. A host is read as DNS
    reads it (`api.openai.com.` is the LLM's). Replay decides them alike: the path and query
    it reads again; a Host header or override header, which the ledger does not keep, it
    takes from the recorded refusal."""
    crm_delete = "  - {kind: crm.delete, match: {host: crm.example.com, method: DELETE}}\n"
    rules = 'authority:\n  rules:\n    - {scope: "*", deny: [refund.issue, crm.delete]}\n'
    text = ACTIONS + crm_delete + AGENT + rules
    override = {"X-HTTP-Method-Override": "DELETE"}
    calls = [
        ("POST", "api.stripe.com/v1//refunds", REFUND),
        ("POST", "api.stripe.com/V1/Refunds", REFUND),
        ("POST", "api.stripe.com/v1/refunds;x=1", REFUND),
        ("POST", "crm.example.com/customers/c-1?_method=DELETE", b""),
        ("POST", "crm.example.com/customers/c-1", b"", override),
        ("POST", "crm.example.com/v1/refunds", REFUND, {"Host": "api.stripe.com"}),
        chat("hello"),
        ("POST", "api.openai.com./v1/chat/completions", chat("hi")[2], {"Host": "api.openai.com."}),
        ("GET", "crm.example.com/customers/C-1", b""),  # a capital in a capture: the same action
    ]
    db, statuses = record(tmp_path, text, calls)
    assert statuses == [400] * 6 + [200] * 3
    data = replay.replay(policy(tmp_path, text, "same.yaml"), str(db))
    assert data["changed"] == 0, data["blocked"]
    reasons = [b["reason"] for b in data["blocked"]]
    assert "reads as /v1/refunds to a server that merges repeated slashes" in reasons[0]
    assert "reads as DELETE to a server that honours the X-HTTP-Method-Override" in reasons[4]
    assert reasons[5].startswith("the request goes to crm.example.com but its Host header")
    with sqlite3.connect(db) as ledger:
        rows = ledger.execute("SELECT host, action FROM decisions ORDER BY id").fetchall()
    assert rows[-2] == ("api.openai.com", "llm")


def test_shadow_mode_forwards_a_request_naming_two_hosts_as_would_deny(tmp_path: Path) -> None:
    """As for any bad_request in shadow mode: recorded would_deny and forwarded, decided on by
    where it was sent. Replayed under the policy enforced, it is refused."""
    text = ACTIONS + AGENT
    calls = [
        ("POST", "crm.example.com/v1/refunds", REFUND, {"Host": "api.stripe.com"}),
        ("POST", "crm.example.com/customers/c-1", b"", {"X-HTTP-Method": "GET"}),
    ]
    db, statuses = record(tmp_path, "mode: shadow\n" + text, calls)
    assert statuses == [200, 200]
    with sqlite3.connect(db) as ledger:
        rows = ledger.execute("SELECT decision, reason_code, host FROM decisions ORDER BY id")
        assert rows.fetchall() == [("would_deny", "bad_request", "crm.example.com")] * 2
    data = replay.replay(policy(tmp_path, "mode: enforce\n" + text, "enforced.yaml"), str(db))
    assert data["decisions"] == {"allow": 0, "deny": 2, "would_deny": 0}, data["blocked"]


def test_recorded_sdk_retries_of_an_attempt_now_refused_are_left_out(
    seed: Seeder, tmp_path: Path
) -> None:
    """Recorded in shadow, an upstream's two 503s made the SDK send one call three times.
    Enforced, its first attempt is refused (x-should-retry: false) and never retried: replay
    refused all three, counting each as a step and a repeat, where live refused one."""
    llm(seed, "r", body="a")
    llm(seed, "r", body="b")
    first = llm(seed, "r", body="c", actual_usd=None, status=503)
    llm(seed, "r", body="c", actual_usd=None, status=503)
    llm(seed, "r", body="c")
    last = llm(seed, "r", body="d")
    p = policy(tmp_path, ACTIONS + 'budgets:\n  - {scope: "agent:*/run:*", requests: 2}\n')
    data = replay.replay(p, str(seed.path))
    assert [b["request_id"] for b in data["blocked"]] == [first.request_id, last.request_id]
    assert data["requests"] == 4
    assert any("2 recorded request(s) were SDK retries" in w for w in data["warnings"])
    # Allowed now, they were sent and retried as recorded: every attempt replayed.
    loose = replay.replay(policy(tmp_path, ACTIONS), str(seed.path))
    assert loose["requests"] == 6 and not any("SDK retries" in w for w in loose["warnings"])


def test_a_call_the_recording_did_not_meter_costs_its_estimate(
    seed: Seeder, tmp_path: Path
) -> None:
    """An LLM host the recording policy named by no action: no usage was read from its
    answers, and replay charged its calls $0 under a policy that meters them."""
    body = json.dumps({"model": "claude-3-5-haiku-latest", "max_tokens": 200,
                       "messages": [{"role": "user", "content": "hello"}]})  # fmt: skip
    for _ in range(2):
        seed.call(run="a", action="unknown", provider=None, model=None, host="api.anthropic.com",
                  path="/v1/messages", est_usd=0, actual_usd=0, tokens=(0, 0),
                  features={"body": body, "port": 443})  # fmt: skip
    seed.call(run="b", action="unknown", provider=None, model=None, host="api.anthropic.com",
              path="/v1/messages", est_usd=0, actual_usd=0, tokens=(0, 0),
              features={"port": 443})  # fmt: skip
    metered = ACTIONS + "  - {kind: llm, provider: anthropic, match: {host: api.anthropic.com}}\n"
    data = replay.replay(policy(tmp_path, metered), str(seed.path))
    # The two with a body: claude-3-5-haiku's estimate for a 1-word prompt and 200 tokens out.
    one = inspect_request(
        "anthropic", "POST", "/v1/messages", {}, body.encode(), MeterConfig(), None
    ).estimate_usd_nanos
    assert one > 0 and data["usd_replayed_nanos"] == 2 * one
    assert any(
        "3 LLM call(s) went to hosts the recording policy did not meter" in w
        and "1 of them had no recorded body" in w
        for w in data["warnings"]
    )


def test_a_null_column_in_a_text_table_is_a_dash_not_a_traceback() -> None:
    """A decision without a scope (the column allows NULL) broke replay's text output."""
    from drawdown.report import _table

    assert _table(["scope", "blocked"], [[None, "1"]]).splitlines()[2] == "-      1"


# --- replay against enforce: the audit of 2026-12-07 -----------------------------------------

MCP_CALL = (
    b'{"jsonrpc": "2.0", "id": %d, "method": "tools/call", '
    b'"params": {"name": "search_docs", "arguments": {"q": "budgets"}}}'
)


def mcp_calls(first: int, count: int) -> list[tuple[str, str, bytes]]:
    """An MCP session's identical tool calls, each with its own JSON-RPC id, as an SDK sends."""
    return [("POST", "mcp.example.com/docs/mcp", MCP_CALL % (first + n)) for n in range(count)]


@pytest.mark.parametrize("bodies", [False, True])
def test_mcp_calls_recorded_by_a_policy_that_did_not_name_the_server(
    tmp_path: Path, bodies: bool
) -> None:
    """Recorded under a plain tool action, MCP calls kept no JSON-RPC message: replay under a
    policy naming the server `provider: mcp` refused every one as unreadable (enforce let them
    through), and with their bodies kept it hashed the JSON-RPC ids and saw no loop (enforce
    stopped the 3rd). Now: without bodies, decided as the MCP action, with a warning; with
    them, decided as enforce decides."""
    plain = "actions:\n  - {kind: docs, match: {host: mcp.example.com}}\n" + AGENT
    if bodies:
        plain += "record: {bodies: full}\n"
    strict = (
        "actions:\n  - {kind: mcp.docs, provider: mcp, match: {host: mcp.example.com, "
        "path: /docs/mcp}}\n" + AGENT + "anomalies:\n  loop: {repeats: 2, on_detect: deny}\n"
    )
    (tmp_path / "recorded").mkdir()
    (tmp_path / "live").mkdir()
    answer = b'{"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "ok"}]}}'
    db, statuses = record(tmp_path / "recorded", plain, mcp_calls(1, 4), answer)
    assert statuses == [200] * 4
    live_db, _ = record(tmp_path / "live", strict, mcp_calls(1, 4), answer)
    with sqlite3.connect(live_db) as conn:  # refused as JSON-RPC errors, HTTP 200 (MCP's way)
        live = conn.execute("SELECT decision, status FROM decisions ORDER BY id").fetchall()
    assert live == [("allow", 200)] * 2 + [("deny", 429)] * 2  # a loop at the third call
    data = replay.replay(policy(tmp_path, strict, "strict.yaml"), str(db))
    if bodies:
        assert [b["status"] for b in data["blocked"]] == [429, 429]
        assert [b["by"] for b in data["blocked"]] == ["anomalies.loop"] * 2
        assert not any("JSON-RPC" in w for w in data["warnings"])
    else:
        assert data["blocked"] == [] and data["decisions"]["allow"] == 4
        assert any(
            w.startswith("4 request(s) to the new policy's MCP actions were recorded without")
            for w in data["warnings"]
        )


@pytest.mark.parametrize("bodies", [False, True])
def test_a_model_condition_reads_the_model_of_a_call_the_recording_did_not_meter(
    tmp_path: Path, bodies: bool
) -> None:
    """An Anthropic host the recording policy named by no action: no model was recorded, and
    replay refused every call under a rule allowing cheap models (enforce allowed them). With
    the body kept, the model is read from it; without, replay says so."""
    recording = "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
    recording += AGENT + ("record: {bodies: full}\n" if bodies else "")
    strict = (
        "actions:\n  - {kind: llm, provider: anthropic, match: {host: api.anthropic.com}}\n"
        + AGENT
        + 'authority:\n  rules:\n    - {scope: "*", action: llm, when: {model: {in: '
        "[claude-haiku-4-5]}}}\n"
    )
    haiku = (
        "POST",
        "api.anthropic.com/v1/messages",
        b'{"model": "claude-haiku-4-5", "max_tokens": 20, '
        b'"messages": [{"role": "user", "content": "hi"}]}',
    )
    (tmp_path / "recorded").mkdir()
    (tmp_path / "live").mkdir()
    db, _ = record(tmp_path / "recorded", recording, [haiku] * 2)
    _, live = record(tmp_path / "live", strict, [haiku] * 2)
    assert live == [200, 200]
    data = replay.replay(policy(tmp_path, strict, "strict.yaml"), str(db))
    warned = any("have no model recorded" in w for w in data["warnings"])
    if bodies:
        assert data["blocked"] == [] and not warned
    else:
        assert [b["reason_code"] for b in data["blocked"]] == ["not_authorized"] * 2 and warned


def test_a_call_priced_at_nothing_keeps_its_tokens_estimate(seed: Seeder, tmp_path: Path) -> None:
    """A model priced $0 (`price: {input: 0, output: 0}`) under a tokens budget: its estimate
    was $0, taken as none, and replay held its actual 11 tokens where the proxy held 71; it
    allowed 7 calls the proxy stopped at 3."""
    for _ in range(7):
        seed.call(est_usd=0, est_tokens=71, actual_usd=0, tokens=(6, 5))
    text = (
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}, "
        "price: {input: 0, output: 0}}\n"
        'budgets:\n  - {scope: "agent:*/run:*", tokens: 100}\n'
    )
    data = replay.replay(policy(tmp_path, text), str(seed.path))
    assert data["decisions"] == {"allow": 3, "deny": 4, "would_deny": 0}
    assert "tokens 100 exhausted" in data["blocked"][0]["reason"]


def test_a_budget_short_on_two_units_decides_as_the_ledger_does(
    seed: Seeder, tmp_path: Path
) -> None:
    """Short on its day's usd (a later window would take it: 429) and on tokens past the
    whole limit (no window will: 402): the ledger answers 402; replay stopped at the first
    short unit and said 429."""
    seed.call(est_usd=190_000_000, est_tokens=50, actual_usd=190_000_000, tokens=(30, 20))
    seed.call(est_usd=20_000_000, est_tokens=159, actual_usd=20_000_000, tokens=(100, 59))
    text = ACTIONS + 'budgets:\n  - {scope: "agent:*", per: day, usd: 0.2, tokens: 100}\n'
    data = replay.replay(policy(tmp_path, text), str(seed.path))
    (blocked,) = data["blocked"]
    assert blocked["status"] == 402 and "tokens 100 per day" in blocked["reason"]


@pytest.mark.parametrize(
    "note", ["stream cut short: upstream reset", "response cut short: client disconnected"]
)
def test_a_lookup_cut_short_meets_no_requirement(seed: Seeder, tmp_path: Path, note: str) -> None:
    """A lookup charged though its answer never arrived whole wrote no fact live, so the
    refund after it was refused `requires_unmet`; replay counted it a success and allowed."""
    lookup = {"query": None, "body_fields": None, "port": 443}
    seed.call(action="crm.read", provider=None, model=None, method="GET",
              host="crm.example.com", path="/customers/c1", features=lookup, note=note)  # fmt: skip
    seed.call(action="refund.issue", provider=None, model=None, host="api.stripe.com",
              path="/v1/refunds", features={"body_fields": '{"json.customer_id": "c1"}',
                                            "port": 443})  # fmt: skip
    text = (
        ACTIONS + 'authority:\n  rules:\n    - {scope: "*", action: refund.issue, requires: '
        "[{action: crm.read, same: {json.customer_id: path.id}}]}\n"
    )
    data = replay.replay(policy(tmp_path, text), str(seed.path))
    assert [b["reason_code"] for b in data["blocked"]] == ["requires_unmet"]
    seed.call(action="crm.read", provider=None, model=None, method="GET",
              host="crm.example.com", path="/customers/c1", features=lookup)  # fmt: skip
    seed.call(action="refund.issue", provider=None, model=None, host="api.stripe.com",
              path="/v1/refunds", features={"body_fields": '{"json.customer_id": "c1"}',
                                            "port": 443})  # fmt: skip
    again = replay.replay(policy(tmp_path, text, "again.yaml"), str(seed.path))
    assert len(again["blocked"]) == 1  # the refund after a whole answer is allowed


def test_hosts_passthrough_relays_are_no_decisions_or_steps(seed: Seeder, tmp_path: Path) -> None:
    """Under the new policy's `unknown_hosts: passthrough`, requests to a host no action names
    are relayed unread: the proxy never counts them. Replay counted them as steps and blocked
    an LLM call the proxy let through."""
    for host in ["api.openai.com"] * 2 + ["files.example.net"] * 3 + ["api.openai.com"] * 2:
        if host == "api.openai.com":
            seed.call(run="r1")
        else:
            seed.call(run="r1", action="unknown", provider=None, model=None, method="GET",
                      host=host, path="/f", features={"port": 443})  # fmt: skip
    text = (
        "unknown_hosts: passthrough\n" + ACTIONS
        + "anomalies:\n  step_count: {max: 3, on_detect: deny}\n"
    )  # fmt: skip
    data = replay.replay(policy(tmp_path, text), str(seed.path))
    assert data["requests"] == 4 and len(data["blocked"]) == 1
    assert any(w.startswith("3 request(s) went to hosts the new policy names in no action")
               for w in data["warnings"])  # fmt: skip


def test_what_replay_cannot_apply_is_said(seed: Seeder, tmp_path: Path) -> None:
    """The new policy's constant identity (`tenant: [{value: acme}]`) and a cost it reads from
    answers (`cost_header`): neither can be applied to recorded rows, and replay was silent
    while enforce refused calls it allowed."""
    for _ in range(3):
        seed.call(tenant="default", features={"port": 443})
    text = (
        "identity:\n  tenant: [{value: acme}]\n"
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
        "  - {kind: search, match: {host: tool.example.com}, cost: {usd: 0.002}, "
        "cost_header: X-Request-Cost}\n"
    )
    warnings = replay.replay(policy(tmp_path, text), str(seed.path))["warnings"]
    assert any(
        "identity: section is not applied" in w and "tenant 'acme' for 3 request(s)" in w
        for w in warnings
    )
    # Only once the window holds a call of that action: the llm calls read no cost.
    assert not any("tool costs from answers" in w for w in warnings)
    seed.call(tenant="default", action="search", provider=None, model=None, method="GET",
              host="tool.example.com", path="/q", features={"port": 443})  # fmt: skip
    warnings = replay.replay(policy(tmp_path, text), str(seed.path))["warnings"]
    assert any("tool costs from answers (cost_header/cost_json on search)" in w for w in warnings)
    same = "identity:\n  tenant: [{value: default}]\n" + ACTIONS
    assert replay.replay(policy(tmp_path, same, "same.yaml"), str(seed.path))["warnings"] == []
