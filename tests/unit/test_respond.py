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


@pytest.mark.parametrize(
    ("reason", "status", "retry_after", "code", "retried"),
    [
        ("budget_exhausted", None, None, "ServiceQuotaExceededException", False),
        ("budget_exhausted", 429, 30, "ThrottlingException", True),  # a window: worth a retry
        ("anomaly", None, None, "AccessDeniedException", False),  # a retry would repeat it
        ("not_authorized", None, None, "AccessDeniedException", False),
        ("bad_request", None, None, "ValidationException", False),
        ("body_too_large", None, None, "ValidationException", False),
        ("shutting_down", None, None, "ServiceUnavailableException", True),
    ],
)
def test_bedrock_denials_are_client_errors_boto3_retries_only_when_it_should(
    reason: str, status: int | None, retry_after: int | None, code: str, retried: bool
) -> None:
    """boto3 reads Bedrock's error type from `x-amzn-ErrorType` and the message from the JSON
    body; its standard retry mode (boto3's default) decides on that code and the status."""
    import boto3

    made = denial("bedrock", reason, "drawdown: no", status=status, retry_after=retry_after)
    client = boto3.client(
        "bedrock-runtime", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b"
    )
    for name in ("Converse", "ConverseStream", "InvokeModel", "InvokeModelWithResponseStream"):
        _check_boto3_reading(client.meta.service_model.operation_model(name), made, code, retried)


def _check_boto3_reading(operation, made, code: str, retried: bool) -> None:
    from botocore.awsrequest import AWSResponse
    from botocore.parsers import create_parser
    from botocore.retries.standard import RetryContext, StandardRetryConditions

    headers = dict(made.headers)
    parsed = create_parser("rest-json").parse(
        {"status_code": made.status, "headers": headers, "body": made.body},
        operation.output_shape,
    )
    assert parsed["Error"] == {"Code": code, "Message": "drawdown: no"}
    context = RetryContext(
        attempt_number=1,
        operation_model=operation,
        parsed_response=parsed,
        http_response=AWSResponse("https://x", made.status, headers, None),
    )
    assert StandardRetryConditions().is_retryable(context) is retried
