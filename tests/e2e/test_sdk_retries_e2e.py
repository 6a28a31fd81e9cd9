"""An SDK's retry of a failed call is not a loop, end to end: the official openai and anthropic
SDKs (their own retries on) through a real `drawdown run` in enforce mode with
`anomalies.loop.repeats: 1`. The stand-in fails the first attempt (500, 529, a reset
connection): the SDK's retry goes through and the call succeeds; the same call again is still
a loop (429); and a request that keeps failing is stopped once past `loop.retries`."""

from __future__ import annotations

from collections.abc import Callable

import anthropic
import openai
import pytest

from tests.e2e.test_anomalies_e2e import report_json
from tests.support.proxy import DrawdownProcess
from tests.support.standin import Reply, StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

POLICY = """
mode: enforce
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: claude, provider: anthropic, match: {host: api.anthropic.com}}
anomalies:
  loop: {repeats: 1, on_detect: deny}
"""

# The SDKs wait ~0.5 s and more between attempts unless the answer says how long.
SOON = {"retry-after-ms": "10"}


def openai_failure(status: int) -> Reply:
    error = {"error": {"message": "upstream hiccup", "type": "server_error", "code": None}}
    return Reply(status=status, json=error, headers=SOON)


def ask(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "summarise the ticket"}]
    )
    return reply.choices[0].message.content or ""


def test_openai_sdk_retry_of_a_500_is_not_a_loop(drawdown_proxy: Factory, standin: StandIn) -> None:
    proxy = drawdown_proxy(POLICY)
    headers = {"X-Drawdown-Agent": "support", "X-Drawdown-Run": "r1"}
    client = proxy.openai_client(default_headers=headers, max_retries=2)
    try:
        standin.script("POST", "/v1/chat/completions", openai_failure(500))
        assert ask(client)  # the first attempt got 500; the SDK's retry was let through
        assert standin.count("/v1/chat/completions") == 2
        # The guard still works: the same call again is a repeat of the one that succeeded.
        with pytest.raises(openai.RateLimitError) as caught:
            ask(client)
        assert caught.value.response.headers["x-drawdown-reason"] == "anomaly"
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert "loop" in caught.value.response.json()["error"]["message"]
        assert standin.count("/v1/chat/completions") == 2  # denied, never forwarded
    finally:
        client.close()
    statuses = proxy.query("SELECT decision, status FROM decisions ORDER BY ts")
    assert statuses == [("allow", 500), ("allow", 200), ("deny", 429)]
    # The report's loop detector counts what the guard counted: two calls, one denied.
    data = report_json(proxy, "--policy", str(proxy.policy_path))
    (loop,) = [a for a in data["anomalies"] if a["kind"] == "loop"]
    assert loop["on_detect"] == "deny" and len(loop["denied"]) == 1
    assert (
        "made 2 times in this run (anomalies.loop.repeats: 1), not counting 1 failed"
        in (loop["detail"])
    )


def test_a_request_that_keeps_failing_is_stopped_past_loop_retries(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """loop.retries (2) failed attempts are forgiven, not the third: the SDK's fourth attempt
    (max_retries=3) is refused as a loop, and its 429 says not to retry."""
    proxy = drawdown_proxy(POLICY)
    headers = {"X-Drawdown-Agent": "support", "X-Drawdown-Run": "r2"}
    client = proxy.openai_client(default_headers=headers, max_retries=3)
    try:
        standin.script("POST", "/v1/chat/completions", openai_failure(500))
        standin.script("POST", "/v1/chat/completions", Reply(reset_before_headers=True))
        standin.script("POST", "/v1/chat/completions", openai_failure(503))
        with pytest.raises(openai.RateLimitError) as caught:
            ask(client)
        assert caught.value.response.headers["x-drawdown-reason"] == "anomaly"
        assert standin.count("/v1/chat/completions") == 3
    finally:
        client.close()
    statuses = proxy.query("SELECT decision, status FROM decisions ORDER BY ts")
    # The reset connection: drawdown answered (and recorded) 502 Bad Gateway.
    assert statuses == [("allow", 500), ("allow", 502), ("allow", 503), ("deny", 429)]


def test_anthropic_sdk_retry_of_an_overload_is_not_a_loop(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    headers = {"X-Drawdown-Agent": "writer", "X-Drawdown-Run": "r3"}
    client = proxy.anthropic_client(default_headers=headers, max_retries=2)
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    standin.script("POST", "/v1/messages", Reply(status=529, json=overloaded, headers=SOON))

    def ask_claude() -> str:
        reply = client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "draft the reply"}],
        )
        return reply.content[0].text  # type: ignore[union-attr]

    try:
        assert ask_claude()
        assert standin.count("/v1/messages") == 2
        with pytest.raises(anthropic.RateLimitError) as caught:
            ask_claude()
        assert caught.value.response.headers["x-drawdown-reason"] == "anomaly"
        assert standin.count("/v1/messages") == 2
    finally:
        client.close()
