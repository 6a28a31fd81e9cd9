"""Denials in the shape each API's own SDK understands (SPEC §6).

Every denial says `x-should-retry: false` (the official OpenAI and Anthropic SDKs
honour it, so they raise at once instead of retrying a denial), except a proxy that is
shutting down, whose 503 says `true`: the retry belongs elsewhere. Each carries
`X-Drawdown-Decision` / `X-Drawdown-Reason` for humans and tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# reason code → HTTP status (windowed budgets use 429 + Retry-After; see status_for)
STATUS = {
    "budget_exhausted": 402,
    "not_authorized": 403,
    "requires_unmet": 403,
    "unknown_host": 403,
    "internal_host": 403,
    "anomaly": 429,
    "ledger_unavailable": 503,
    "shutting_down": 503,
    "bad_request": 400,
    "body_too_large": 413,
}

_OPENAI_TYPE = {
    400: "invalid_request_error",
    402: "insufficient_quota",
    403: "permission_denied",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}
_ANTHROPIC_TYPE = {
    400: "invalid_request_error",
    402: "billing_error",
    403: "permission_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "api_error",
}
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    402: "RESOURCE_EXHAUSTED",
    403: "PERMISSION_DENIED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}

# Bedrock answers errors as `x-amzn-ErrorType: <Type>` + `{"message": ...}`; boto3 raises a
# ClientError with that code. Its standard retry mode (boto3's default) retries
# ThrottlingException, any 500/502/503/504, and a 429 whose code the operation does not model:
# a windowed budget's 429 is retried with backoff like Bedrock's own throttling; a budget's 402
# is raised at once, and so is a guard's 429 without Retry-After (a retry would only repeat the
# loop), as AccessDeniedException, which every Bedrock operation models as not retryable.
_BEDROCK_TYPE = {
    400: "ValidationException",
    402: "ServiceQuotaExceededException",
    403: "AccessDeniedException",
    413: "ValidationException",
    429: "ThrottlingException",
    503: "ServiceUnavailableException",
}


@dataclass(frozen=True)
class Denial:
    status: int
    headers: dict[str, str]
    body: bytes


def denial(
    provider: str | None,
    reason_code: str,
    message: str,
    *,
    status: int | None = None,
    retry_after: int | None = None,
    jsonrpc_ids: list[Any] | None = None,
    batch: bool = False,
    jsonrpc_code: int | None = None,
    retryable: bool = False,
) -> Denial:
    status = status or STATUS.get(reason_code, 403)
    headers = {
        "content-type": "application/json",
        "x-should-retry": "true" if retryable else "false",
        "x-drawdown-decision": "deny",
        "x-drawdown-reason": reason_code,
    }
    if retry_after is not None:
        headers["retry-after"] = str(max(1, retry_after))
    body: dict[str, Any]
    if provider == "openai":
        body = {
            "error": {
                "message": message,
                "type": _OPENAI_TYPE.get(status, "drawdown_denied"),
                "param": None,
                "code": reason_code,
            }
        }
    elif provider == "anthropic":
        body = {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPE.get(status, "api_error"), "message": message},
        }
    elif provider == "gemini":
        body = {
            "error": {
                "code": status,
                "message": message,
                "status": _GOOGLE_STATUS.get(status, "FAILED_PRECONDITION"),
            }
        }
    elif provider == "bedrock":
        error_type = _BEDROCK_TYPE.get(status, "AccessDeniedException")
        if status == 429 and retry_after is None:
            error_type = "AccessDeniedException"
        headers["x-amzn-errortype"] = error_type
        body = {"message": message}
    elif provider == "mcp" and jsonrpc_ids:
        # JSON-RPC errors the MCP client matches to its pending calls by id (one per call of a
        # batch), with HTTP 200 as the streamable HTTP transport expects for a JSON-RPC response.
        errors = [
            {
                "jsonrpc": "2.0",
                "id": rpc_id,
                "error": {
                    "code": -32001,
                    "message": message,
                    "data": {"reason": reason_code, "status": status},
                },
            }
            for rpc_id in jsonrpc_ids
        ]
        headers["x-drawdown-status"] = str(status)
        return Denial(
            200, headers, json.dumps(errors if batch else errors[0], ensure_ascii=False).encode()
        )
    elif provider == "mcp" and jsonrpc_code is not None:
        # A body that is no JSON-RPC request has no id to answer: the JSON-RPC error for it
        # (`id: null`, e.g. -32700 parse error) with the HTTP status, which the MCP client
        # raises for the request it sent.
        body = {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": jsonrpc_code,
                "message": message,
                "data": {"reason": reason_code, "status": status},
            },
        }
    else:
        body = {"error": {"code": reason_code, "message": message}}
    return Denial(status, headers, json.dumps(body, ensure_ascii=False).encode())
