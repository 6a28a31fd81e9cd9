"""Metering options of LLM actions: `price` (OpenAI-compatible hosts) and `stream_usage`, and how
the proxy hands them to the meter; the ledger's `priced` flag."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import pytest
from drawdown.addon import Drawdown
from drawdown.classify import RequestView
from drawdown.ledger.api import Amount, Claim, Completion, DecisionRow
from drawdown.ledger.sqlite import SQLiteLedger
from drawdown.meter import MeterConfig, PricePerMillion, inspect_request
from drawdown.policy import PolicyInvalid, load_policy

STREAM_BODY = json.dumps(
    {"model": "llama-3.3-70b", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(write(tmp_path, text))
    return [str(p) for p in caught.value.problems]


def test_stream_usage_defaults_to_true_and_can_be_turned_off(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - kind: llm.strict
    provider: openai
    match: {host: llm.internal}
    price: {input: 0.59, output: 0.79, cache_read: 0.1}
    stream_usage: false
""",
        )
    )
    default, strict = policy.actions
    assert default.stream_usage is True and default.price is None
    assert strict.stream_usage is False
    # Exact prices: Decimals, not floats.
    assert strict.price == PricePerMillion(
        input=Decimal("0.59"), output=Decimal("0.79"), cache_read=Decimal("0.1")
    )


def test_stream_usage_is_validated_with_file_and_line(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """actions:
  - {kind: a, provider: openai, match: {host: a.example}, stream_usage: "no"}
  - {kind: b, provider: openai, match: {host: b.example}, stream_usage: yes}
  - {kind: c, provider: anthropic, match: {host: c.example}, stream_usage: false}
  - {kind: d, match: {host: d.example}, stream_usage: false}
  - {kind: e, provider: openai, match: {host: e.example}, stream_usge: false}
  - {kind: f, provider: openai, match: {host: f.example}, price: {input: 1}}
""",
    )
    f = str(tmp_path / "policy.yaml")
    assert f"{f}:2: stream_usage must be true or false, not 'no'" in found
    # YAML 1.1's `yes` stays text: reported, never read as true.
    assert f"{f}:3: stream_usage must be true or false, not 'yes'" in found
    only_openai = "'stream_usage' (ask for usage in OpenAI chat and completions streams) applies to provider: openai actions only"
    assert f"{f}:4: {only_openai}" in found
    assert f"{f}:5: {only_openai}" in found
    assert any(
        p.startswith(f"{f}:6: unknown key 'stream_usge'") and "stream_usage" in p for p in found
    )
    assert f"{f}:7: price needs 'output'" in found


def _inspect(policy_text: str, tmp_path: Path, host: str):  # -> meter.LLMRequest
    policy = load_policy(write(tmp_path, policy_text))
    (action,) = [a for a in policy.actions if a.match.hosts[0].text == host]
    view = RequestView(
        method="POST",
        host=host,
        port=443,
        path="/openai/v1/chat/completions",
        headers={"content-type": "application/json"},
        body=STREAM_BODY,
    )
    return asyncio.run(Drawdown()._inspect(policy, action, view))


POLICY = """
actions:
  - {kind: llm.groq, provider: openai, match: {host: groq.example}, price: {input: 0.59, output: 0.79}}
  - {kind: llm.strict, provider: openai, match: {host: strict.example}, stream_usage: false}
"""


def test_the_proxy_asks_for_stream_usage_unless_the_action_opts_out(tmp_path: Path) -> None:
    asked = _inspect(POLICY, tmp_path, "groq.example")
    assert asked.rewritten_body is not None and asked.strip_usage_chunk
    assert json.loads(asked.rewritten_body)["stream_options"] == {"include_usage": True}
    # The override prices the estimate: a model genai-prices does not know is still "priced".
    assert asked.priced and asked.estimate_usd_nanos > 0

    left = _inspect(POLICY, tmp_path, "strict.example")
    assert left.rewritten_body is None and not left.strip_usage_chunk
    assert left.stream and left.billable


def test_the_ledger_records_whether_a_call_was_priced(tmp_path: Path) -> None:
    ledger = SQLiteLedger(str(tmp_path / "ledger.db"))
    claim = Claim("run", "run:r", limit_usd=10**12, limit_tokens=None, limit_requests=None)
    try:
        for request_id, priced in (("known", True), ("unknown", False), ("tool", None)):
            row = DecisionRow(
                request_id=request_id, ts=1.0, decision="allow", mode="enforce", scope="run:r"
            )
            outcome = ledger.reserve(row, [claim], Amount(usd=100, tokens=10, requests=1), 1e12)
            assert outcome.hold_id is not None
            completion = Completion(
                actual=Amount(usd=50, tokens=5, requests=1), status=200, priced=priced
            )
            ledger.commit(request_id, outcome.hold_id, completion, 2.0)
        found = dict(ledger.conn.execute("SELECT request_id, priced FROM decisions").fetchall())
    finally:
        ledger.close()
    assert found == {"known": 1, "unknown": 0, "tool": None}


def test_uncharged_requests_keep_their_model_for_conditions_and_the_ledger() -> None:
    body = json.dumps({"model": "claude-haiku-4-5", "messages": []}).encode()
    counted = inspect_request(
        "anthropic", "POST", "/v1/messages/count_tokens", {}, body, MeterConfig()
    )
    assert (counted.billable, counted.model) == (False, "claude-haiku-4-5")
    other = inspect_request(
        "openai",
        "POST",
        "/v1/moderations",
        {},
        b'{"model": "omni-moderation-latest"}',
        MeterConfig(),
    )
    assert (other.billable, other.model) == (False, "omni-moderation-latest")
    upload = inspect_request("openai", "POST", "/v1/files", {}, b"--boundary\r\n...", MeterConfig())
    assert upload.model is None
