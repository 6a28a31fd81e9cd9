"""An SDK's retry of a failed call is not a loop, end to end: the official openai and anthropic
SDKs (their own retries on) through a real `drawdown run` in enforce mode with
`anomalies.loop.repeats: 1`. The stand-in fails the first attempt (500, 529, a reset
connection, a body lost after 200 headers): the SDK's retry goes through and the call succeeds;
the same call again is still a loop (429); and a request that keeps failing is stopped once
past `loop.retries`. A stream cut mid-way is not retried by the SDK, and stays a step."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import anthropic
import httpx2
import openai
import pytest

from tests.e2e.test_anomalies_e2e import report_json
from tests.support.proxy import DrawdownProcess
from tests.support.standin import Reply, StandIn
from tests.support.wire import openai_chat_sse

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


def test_an_answer_whose_body_was_lost_after_200_headers_is_a_failed_attempt(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """The upstream sent 200 headers, then reset the connection mid-body. mitmproxy buffers a
    non-streamed answer, so the agent got 502 Bad Gateway and its SDK retried: that attempt
    is a failed one, not a repeat, or the loop guard (repeats: 1) would refuse the retry."""
    proxy = drawdown_proxy(POLICY)
    headers = {"X-Drawdown-Agent": "support", "X-Drawdown-Run": "r4"}
    client = proxy.openai_client(default_headers=headers, max_retries=2)
    lost = {"id": "chatcmpl-lost", "object": "chat.completion", "choices": [], "usage": {}}
    try:
        # 20 bytes of the body, then (a moment later, so the headers are surely read before
        # the RST, which drops what the proxy has not read yet) the reset.
        cut = Reply(json=lost, chunks=[20], delay=0.3, reset_after_bytes=21)
        standin.script("POST", "/v1/chat/completions", cut)
        assert ask(client)  # the SDK's retry was let through and answered
        assert standin.count("/v1/chat/completions") == 2
        assert [r.outcome for r in standin.requests] == ["reset", "complete"]
        # The same call again is still a repeat of the one that succeeded.
        with pytest.raises(openai.RateLimitError) as caught:
            ask(client)
        assert caught.value.response.headers["x-drawdown-reason"] == "anomaly"
    finally:
        client.close()
    rows = proxy.query(
        "SELECT d.decision, d.status, h.state, d.actual_usd > 0, d.note FROM decisions d "
        "LEFT JOIN holds h ON h.id = d.hold_id ORDER BY d.ts"
    )
    # The broken attempt: the agent got 502; the upstream had billed it, so its estimate is
    # charged. Then the retry (200) and the refused repeat.
    assert [row[:4] for row in rows] == [
        ("allow", 502, "committed", 1),
        ("allow", 200, "committed", 1),
        ("deny", 429, None, None),
    ]
    assert rows[0][4].startswith("response cut short")
    data = report_json(proxy, "--policy", str(proxy.policy_path))
    (run,) = data["runs"]
    assert (run["requests"], run["steps"], run["retried"]) == (3, 2, 1)
    (loop,) = [a for a in data["anomalies"] if a["kind"] == "loop"]
    assert (
        "made 2 times in this run" in loop["detail"] and "not counting 1 failed" in loop["detail"]
    )


def test_a_stream_cut_mid_way_is_no_failed_attempt(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """The SDK handed the stream to the caller with its 200 headers, and does not retry it when
    the upstream breaks off mid-stream: the cut stream is an answered attempt and counts, so the
    caller asking again is a repeat (loop.repeats: 1)."""
    proxy = drawdown_proxy(POLICY)
    headers = {"X-Drawdown-Agent": "support", "X-Drawdown-Run": "r5"}
    client = proxy.openai_client(default_headers=headers, max_retries=2)
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    chat = openai_chat_sse(
        id="c1",
        created=1,
        model="gpt-4o-mini",
        deltas=[" a", " b", " c"],
        usage=usage,
        include_usage=True,
    )
    # The role chunk and a word reach the caller; once it has read them (the gate), the
    # upstream sends one more byte and resets the connection.
    gate = threading.Event()
    cut = Reply(
        body=b"".join(chat),
        content_type="text/event-stream",
        chunks=[*chat[:2], gate, *chat[2:]],
        reset_after_bytes=sum(len(e) for e in chat[:2]) + 1,
    )
    standin.script("POST", "/v1/chat/completions", cut)

    def stream() -> list[str]:
        words = []
        for chunk in client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "summarise the ticket"}],
            stream=True,
        ):
            words.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            if len(words) == 2:
                gate.set()
        return words

    try:
        with pytest.raises((httpx2.HTTPError, openai.APIError)):
            stream()
        assert standin.count("/v1/chat/completions") == 1  # the SDK did not retry it
        with pytest.raises(openai.RateLimitError) as caught:
            stream()
        assert caught.value.response.headers["x-drawdown-reason"] == "anomaly"
    finally:
        gate.set()
        client.close()
    statuses = proxy.query("SELECT decision, status FROM decisions ORDER BY ts")
    assert statuses == [("allow", 200), ("deny", 429)]
    (run,) = report_json(proxy, "--policy", str(proxy.policy_path))["runs"]
    assert (run["steps"], run["retried"]) == (2, 0)


def test_an_agent_whose_timeout_is_shorter_than_the_answer_cannot_outrun_its_budget(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """The openai SDK gives up after 0.5 s; the model answers after 2 s. The upstream had each
    request whole and bills it, so the agent's leaving early charges the estimate: the run's
    budget of 3 requests stops the 4th. Released instead, every call went through uncharged,
    however many the agent made."""
    policy = POLICY + 'budgets:\n  - {scope: "agent:*/run:*", requests: 3}\n'
    proxy = drawdown_proxy(policy)
    headers = {"X-Drawdown-Agent": "support", "X-Drawdown-Run": "r6"}
    # The connections up first (a certificate minted, the upstream's handshake), so each
    # timed-out request surely reached the upstream before the agent left.
    with proxy.openai_client(default_headers={"X-Drawdown-Run": "warm-up"}) as warm:
        assert ask(warm)
    client = proxy.openai_client(default_headers=headers, max_retries=0, timeout=0.5)
    slow = {"id": "c", "object": "chat.completion", "choices": [], "usage": {}}
    standin.script(
        "POST", "/v1/chat/completions", Reply(json=slow, delay_before_headers=2.0), times=None
    )
    try:
        for question in ("one", "two", "three"):
            with pytest.raises(openai.APITimeoutError):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": question}]
                )
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "four"}]
            )
        assert caught.value.status_code == 402
    finally:
        client.close()
    assert standin.count("/v1/chat/completions") == 1 + 3
    rows = proxy.query(
        "SELECT d.decision, d.status, h.state, d.actual_usd > 0, d.note FROM decisions d "
        "LEFT JOIN holds h ON h.id = d.hold_id WHERE d.run = 'r6' ORDER BY d.ts"
    )
    assert [row[:4] for row in rows] == [("allow", None, "committed", 1)] * 3 + [
        ("deny", 402, None, None)
    ]
    assert all(row[4].startswith("client left before the answer") for row in rows[:3])


WINDOWED = """
mode: enforce
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*/run:*", per: minute, requests: 1}
anomalies:
  loop: {repeats: 2, on_detect: deny}
"""


def test_an_agent_that_waits_as_a_windows_429_tells_it_is_not_refused_as_a_loop(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """A budget window's 429 says when to come back (Retry-After). The agent retried at once,
    twice (its own code: the 429 says x-should-retry: false), then waited as told: its call
    in the next window was refused for good as a loop, the two refusals counted as repeats.
    The loop guard forgives them as failed attempts (loop.retries: 2); hammering on is still a
    loop."""
    proxy = drawdown_proxy(WINDOWED)
    if time.time() % 60 > 50:  # the three calls below must fall in one minute's window
        time.sleep(60.5 - time.time() % 60)
    headers = {"X-Drawdown-Agent": "digest", "X-Drawdown-Run": "nightly"}
    with proxy.openai_client(default_headers=headers, max_retries=0) as client:
        assert ask(client)
        waits = []
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as caught:
                ask(client)
            assert caught.value.response.headers["x-drawdown-reason"] == "budget_exhausted"
            waits.append(int(caught.value.response.headers["retry-after"]))
        time.sleep(waits[-1])
        assert ask(client)  # the next window: two repeats so far, the refusals forgiven
        with pytest.raises(openai.RateLimitError) as caught:
            ask(client)  # a third repeat: a loop, whatever the window holds
        assert caught.value.response.headers["x-drawdown-reason"] == "anomaly"
    assert standin.count("/v1/chat/completions") == 2
    rows = proxy.query(
        "SELECT request_id, decision, reason_code, status FROM decisions ORDER BY ts"
    )
    assert [r[1:] for r in rows] == [
        ("allow", None, 200),
        ("deny", "budget_exhausted", 429),
        ("deny", "budget_exhausted", 429),
        ("allow", None, 200),
        ("deny", "anomaly", 429),
    ]
    # The report's loop detector and replay count as the guard did.
    data = report_json(proxy, "--policy", str(proxy.policy_path))
    (loop,) = [a for a in data["anomalies"] if a["kind"] == "loop"]
    assert (
        "made 3 times in this run (anomalies.loop.repeats: 2), not counting 2 failed"
        in (loop["detail"])
    )
    replayed = subprocess.run(
        [sys.executable, "-m", "drawdown", "replay", "--policy", str(proxy.policy_path),
         "--db", proxy.db_path, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    blocked = {b["request_id"]: b["reason_code"] for b in json.loads(replayed.stdout)["blocked"]}
    assert blocked == {r[0]: r[2] for r in rows if r[1] == "deny"}
