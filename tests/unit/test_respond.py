"""Denials carry the provider's own error shape, and headers that stop SDK retries."""

from __future__ import annotations

import json

import pytest
from drawdown.respond import denial


@pytest.mark.parametrize(
    ("provider", "check"),
    [
        (
            "openai",
            lambda b: (
                b["error"]["code"] == "budget_exhausted"
                and b["error"]["type"] == "insufficient_quota"
                and "message" in b["error"]
            ),
        ),
        (
            "anthropic",
            lambda b: (
                b["type"] == "error"
                and b["error"]["type"] == "billing_error"
                and b["error"]["message"]
            ),
        ),
        (
            "gemini",
            lambda b: b["error"]["code"] == 402 and b["error"]["status"] == "RESOURCE_EXHAUSTED",
        ),
        (
            None,
            lambda b: (
                b["error"]
                == {"code": "budget_exhausted", "message": "drawdown: budget x usd 0.50 exhausted"}
            ),
        ),
    ],
)
def test_budget_denial_shapes(provider: str | None, check) -> None:
    d = denial(provider, "budget_exhausted", "drawdown: budget x usd 0.50 exhausted")
    assert d.status == 402
    assert d.headers["x-should-retry"] == "false"
    assert d.headers["x-drawdown-decision"] == "deny"
    assert d.headers["x-drawdown-reason"] == "budget_exhausted"
    assert check(json.loads(d.body))


def test_windowed_budget_gets_429_with_retry_after() -> None:
    d = denial("openai", "budget_exhausted", "m", status=429, retry_after=42)
    assert d.status == 429 and d.headers["retry-after"] == "42"
    assert json.loads(d.body)["error"]["type"] == "rate_limit_exceeded"


def test_statuses_by_reason() -> None:
    assert denial("anthropic", "not_authorized", "m").status == 403
    assert (
        json.loads(denial("anthropic", "not_authorized", "m").body)["error"]["type"]
        == "permission_error"
    )
    assert denial(None, "ledger_unavailable", "m").status == 503
    assert denial(None, "anomaly", "m").status == 429


@pytest.mark.parametrize(
    ("provider", "kind"),
    [("openai", "service_unavailable"), ("anthropic", "api_error"), ("gemini", "UNAVAILABLE")],
)
def test_a_proxy_shutting_down_asks_to_be_retried(provider: str, kind: str) -> None:
    """Every other refusal tells the SDK not to retry; this one is meant for another proxy."""
    made = denial(provider, "shutting_down", "m", retryable=True)
    assert made.status == 503 and made.headers["x-should-retry"] == "true"
    assert kind in made.body.decode()
    assert denial(provider, "ledger_unavailable", "m").headers["x-should-retry"] == "false"


def test_mcp_denial_is_a_jsonrpc_error_for_the_request_id() -> None:
    d = denial("mcp", "not_authorized", "drawdown: no", jsonrpc_ids=[7])
    body = json.loads(d.body)
    assert (
        d.status == 200
        and body["id"] == 7
        and body["jsonrpc"] == "2.0"
        and body["error"]["message"] == "drawdown: no"
    )
    batch = json.loads(denial("mcp", "not_authorized", "no", jsonrpc_ids=[1, "b"], batch=True).body)
    assert [e["id"] for e in batch] == [1, "b"]
    # A notification (no id) cannot get a JSON-RPC answer: a plain JSON error with the HTTP status.
    assert denial("mcp", "not_authorized", "no", jsonrpc_ids=[]).status == 403
