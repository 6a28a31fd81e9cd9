"""Bad input through a real proxy: malformed LLM requests and hostile identity values.

Every malformed request gets a clear 4xx in the provider's own error shape (400, or 413 above
`limits.max_request_bytes`), is never forwarded, leaves exactly one decision row and no
traceback in the proxy's log. Identity values built to forge or escape a scope (separators,
globs, 10 kB ids, control characters, look-alikes, header tricks) stay inside their own scope.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest
from drawdown import replay
from drawdown.identity import MAX_VALUE_LENGTH, clean_value
from drawdown.money import MAX_AMOUNT
from drawdown.policy import load_policy

from tests.support.proxy import DrawdownProcess
from tests.support.standin import Reply, StandIn
from tests.support.wire import openai_chat_json, openai_chat_usage

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]
LIMIT = 64 * 1024
POLICY = f"""
limits: {{max_request_bytes: {LIMIT}}}
identity:
  tenant: [{{header: X-Drawdown-Tenant}}, {{value: acme}}]
  agent: [{{header: X-Drawdown-Agent}}, {{value: anonymous}}]
  run: [{{header: X-Drawdown-Run}}, {{value: none}}]
actions:
  - {{kind: llm, provider: openai, match: {{host: api.openai.com}}}}
  - {{kind: llm, provider: anthropic, match: {{host: api.anthropic.com}}}}
  - {{kind: llm, provider: gemini, match: {{host: generativelanguage.googleapis.com}}}}
  - {{kind: refund.issue, match: {{host: api.stripe.com, method: POST, path: /v1/refunds}}, cost: {{usd: 0.01}}}}
authority:
  default: deny
  rules:
    - {{scope: "*", allow: [llm]}}
    - {{scope: "agent:support", allow: [refund.issue], when: {{json: {{amount: {{lte: 5000}}}}}}}}
budgets:
  - {{scope: "agent:*/run:*", requests: 2}}
  - {{scope: "agent:*", usd: 5}}
"""
OPENAI = "https://api.openai.com/v1/chat/completions"
IMAGES = "https://api.openai.com/v1/images/generations"
EDITS = "https://api.openai.com/v1/images/edits"
ANTHROPIC = "https://api.anthropic.com/v1/messages"
GEMINI = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
ANTHROPIC_BATCH = "https://api.anthropic.com/v1/messages/batches"
GEMINI_BATCH = (
    "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:batchGenerateContent"
)
HI = [{"role": "user", "content": "hi"}]


def verify(db: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", "verify", "--db", str(db), "--settled"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def assert_no_traceback(proxy: DrawdownProcess) -> None:
    log = proxy.log_text()
    assert "Traceback" not in log and "Addon error" not in log, log[-4000:]


# --- malformed LLM requests -----------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    name: str
    url: str
    body: bytes
    status: int = 400
    reason: str = "bad_request"
    says: str = ""  # a phrase the error message must contain
    headers: tuple[tuple[str, str], ...] = ()


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


BIG_PROMPT = "word " * (LIMIT // 4)
# fmt: off
BAD_REQUESTS = [
    # OpenAI
    Bad("openai invalid JSON", OPENAI, b'{"model": "gpt-4o-mini", "messages": [', says="not valid JSON"),
    Bad("openai messages not a list", OPENAI, _json({"model": "gpt-4o-mini", "messages": "hi"}), says="messages must be an array"),
    Bad("openai model a number", OPENAI, _json({"model": 4, "messages": HI}), says="model must be a non-empty string"),
    Bad("openai model missing", OPENAI, _json({"messages": HI}), says="model is missing"),
    Bad("openai non-UTF-8", OPENAI, b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}', says="not valid UTF-8"),
    Bad("openai empty body", OPENAI, b"", says="empty"),
    Bad("openai top-level array", OPENAI, b"[1, 2]", says="must be a JSON object"),
    Bad("openai max_tokens a string", OPENAI, _json({"model": "gpt-4o-mini", "messages": HI, "max_tokens": "lots"}), says="max_tokens"),
    Bad("openai max_tokens past the ledger's integers", OPENAI, _json({"model": "gpt-4o-mini", "messages": HI, "max_tokens": 10**26}), says="past what one call may hold"),
    Bad("openai deeply nested", OPENAI, b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", status=413, reason="body_too_large"),
    Bad("openai a number past Python's 4,300 digits", OPENAI, b'{"model": "gpt-4o-mini", "messages": [], "seed": ' + b"9" * 5000 + b"}", says="longer than 4300 digits"),
    Bad("openai nested within the limit", OPENAI, b'{"model": "gpt-4o-mini", "messages": [' + b"[" * 30_000 + b"]" * 30_000 + b"]}", says="nested too deeply"),
    Bad("openai too large", OPENAI, _json({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": BIG_PROMPT}]}), status=413, reason="body_too_large", says="max_request_bytes"),
    Bad(
        "openai gzip bomb (small on the wire, too large decoded)", OPENAI,
        gzip.compress(_json({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": BIG_PROMPT}]})),
        status=413, reason="body_too_large", headers=(("content-encoding", "gzip"),),
    ),
    Bad("openai image without a prompt", IMAGES, _json({"model": "gpt-image-1"}), says="prompt is missing"),
    Bad("openai image edit, a multipart form cut short", EDITS, b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1', says="cut short", headers=(("content-type", "multipart/form-data; boundary=b"),)),
    Bad("openai image edit, a part without a name", EDITS, b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n", says="Content-Disposition", headers=(("content-type", "multipart/form-data; boundary=b"),)),
    # Anthropic
    Bad("anthropic invalid JSON", ANTHROPIC, b'{"model": "claude-haiku-4-5",', says="not valid JSON"),
    Bad("anthropic messages not a list", ANTHROPIC, _json({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": {"role": "user"}}), says="messages must be an array"),
    Bad("anthropic model a number", ANTHROPIC, _json({"model": 3.5, "max_tokens": 5, "messages": HI}), says="model"),
    Bad("anthropic non-UTF-8", ANTHROPIC, b'{"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "\xc3\x28"}]}', says="UTF-8"),
    Bad("anthropic max_tokens past the ledger's integers", ANTHROPIC, _json({"model": "claude-haiku-4-5", "max_tokens": 10**19, "messages": HI}), says="past what one call may hold"),
    Bad("anthropic too large", ANTHROPIC, _json({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": BIG_PROMPT}]}), status=413, reason="body_too_large"),
    Bad("anthropic message batch with no requests array", ANTHROPIC_BATCH, _json({"requests": {"custom_id": "a"}}), says="requests must be an array"),
    Bad("anthropic message batch, a request with no model", ANTHROPIC_BATCH, _json({"requests": [{"custom_id": "a", "params": {"max_tokens": 5, "messages": HI}}]}), says="requests[0].params: model is missing"),
    Bad("anthropic message batch past the ledger's integers", ANTHROPIC_BATCH, _json({"requests": [{"custom_id": str(i), "params": {"model": "claude-haiku-4-5", "max_tokens": 10**18, "messages": HI}} for i in range(2)]}), says="past what one call may hold"),
    # Gemini (the model is in the path)
    Bad("gemini invalid JSON", GEMINI, b"{contents: [}", says="not valid JSON"),
    Bad("gemini contents not a list", GEMINI, _json({"contents": "hi"}), says="contents"),
    Bad("gemini non-UTF-8", GEMINI, b'{"contents": [{"parts": [{"text": "\xff"}]}]}', says="UTF-8"),
    Bad("gemini batch, a request that is not an object", GEMINI_BATCH, _json({"batch": {"inputConfig": {"requests": {"requests": ["hi"]}}}}), says="requests[0].request is missing"),
    Bad("gemini too large", GEMINI, _json({"contents": [{"parts": [{"text": BIG_PROMPT}]}]}), status=413, reason="body_too_large"),
]
# fmt: on


def error_message(url: str, body: dict) -> str:
    """The message of a provider-shaped error body; asserts the shape."""
    if url in (ANTHROPIC, ANTHROPIC_BATCH):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
        return body["error"]["message"]
    error = body["error"]
    if url in (GEMINI, GEMINI_BATCH):
        assert isinstance(error["code"], int) and error["status"] == "INVALID_ARGUMENT"
    else:
        assert error["type"] == "invalid_request_error" and "code" in error
    return error["message"]


def test_malformed_llm_requests_get_a_clear_4xx_and_are_never_forwarded(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    proxy = drawdown_proxy(POLICY)
    with proxy.http_client(timeout=60) as client:
        for i, bad in enumerate(BAD_REQUESTS):
            headers = {
                "content-type": "application/json",
                "x-drawdown-agent": "fuzzer",
                "x-drawdown-run": f"bad-{i}",
                **dict(bad.headers),
            }
            response = client.post(bad.url, content=bad.body, headers=headers)
            assert response.status_code == bad.status, (
                bad.name,
                response.status_code,
                response.text[:300],
            )
            assert response.headers["x-drawdown-reason"] == bad.reason, bad.name
            assert response.headers["x-should-retry"] == "false"
            message = error_message(bad.url, response.json())
            assert message.startswith("drawdown: ") and bad.says in message, (bad.name, message)
            assert "Traceback" not in response.text
    assert standin.count("*") == 0, [r.path for r in standin.requests]  # nothing was forwarded
    decisions = proxy.query("SELECT run, decision, reason_code, status FROM decisions ORDER BY ts")
    assert len(decisions) == len(BAD_REQUESTS)  # one row per request
    assert sorted(decisions) == sorted(
        (f"bad-{i}", "deny", b.reason, b.status) for i, b in enumerate(BAD_REQUESTS)
    )
    assert proxy.query("SELECT COUNT(*) FROM holds") == [(0,)]  # nothing was reserved
    assert_no_traceback(proxy)
    proxy.stop()
    verify(tmp_db)


def test_the_sdks_surface_a_malformed_request_as_their_own_error(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    with proxy.openai_client(max_retries=2) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages="hi")  # type: ignore[arg-type]
        assert "messages must be an array" in caught.value.message
        with pytest.raises(openai.APIStatusError) as too_big:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": BIG_PROMPT}]
            )
        assert too_big.value.status_code == 413
    with (
        proxy.anthropic_client(max_retries=2) as claude,
        pytest.raises(anthropic.BadRequestError) as caught_a,
    ):
        claude.messages.create(model="claude-haiku-4-5", max_tokens=5, messages={"role": "user"})  # type: ignore[arg-type]
    assert caught_a.value.body["error"]["type"] == "invalid_request_error"
    assert standin.count("*") == 0  # and no SDK retried a denial
    assert proxy.query("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM decisions") == [(3, 3)]
    assert_no_traceback(proxy)


def test_shadow_mode_charges_a_request_too_large_to_read_at_the_usage_it_reports(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    """Enforce answers 413; shadow forwards it, and its reported usage, streamed or not, is
    charged to the budgets that cover it, as `report` and `budgets` will show."""
    proxy = drawdown_proxy("mode: shadow\n" + POLICY)
    big = [{"role": "user", "content": BIG_PROMPT}]
    with proxy.openai_client(max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=big)
        chunks = client.chat.completions.create(
            model="gpt-4o-mini", messages=big, stream=True, stream_options={"include_usage": True}
        )
        assert [c for c in chunks if c.usage]
    assert standin.count("/v1/chat/completions") == 2
    assert (
        proxy.query("SELECT decision, reason_code FROM decisions")
        == [("would_deny", "body_too_large")] * 2
    )
    # The stream's commit lands after the SDK has read its last event: wait for it (a busy
    # machine made the read race it).
    charged = proxy.wait_for_query(
        "SELECT state, actual_usd, usage_source FROM holds",
        until=lambda rows: all(state != "active" for state, _, _ in rows),
    )
    assert [(state, source) for state, _, source in charged] == [("committed", "usage")] * 2
    assert all(usd > 0 for _, usd, _ in charged)
    total = sum(usd for _, usd, _ in charged)
    instances = proxy.query("SELECT spent_usd, spent_requests, reserved_usd FROM budget_instances")
    assert instances == [(total, 2, 0)] * 2  # agent:* (usd) and agent:*/run:* (requests)
    verify(tmp_db)
    assert_no_traceback(proxy)


UPSTREAM_FIGURES_POLICY = """
identity:
  agent: [{header: X-Drawdown-Agent}]
  run: [{header: X-Drawdown-Run}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: crm.read, match: {host: crm.example.com}, cost: {usd: 0.01}, cost_header: X-Cost}
budgets:
  - {scope: "agent:*", usd: 5}
"""


def test_absurd_figures_from_an_upstream_are_charged_within_the_ledger(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    """Usage past the ledger's 64-bit integers once failed the commit (and every request
    batched with it) with a traceback; a negative tool cost once refunded the budget."""
    usage = openai_chat_usage(10**30, 5)
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(
            body=openai_chat_json(id="c", created=1, model="gpt-4o-mini", text="hi", usage=usage),
            content_type="application/json",
        ),
    )
    for cost in ("-5", "1e30", "0.25"):
        standin.script("GET", f"/customers/{cost}", Reply(json={"id": 1}, headers={"X-Cost": cost}))
    proxy = drawdown_proxy(UPSTREAM_FIGURES_POLICY)
    with proxy.http_client(headers={"X-Drawdown-Agent": "tools", "X-Drawdown-Run": "t"}) as http:
        for cost in ("-5", "1e30", "0.25"):
            assert http.get(f"https://crm.example.com/customers/{cost}").status_code == 200
    headers = {"X-Drawdown-Agent": "chat", "X-Drawdown-Run": "c"}
    with proxy.openai_client(max_retries=0, default_headers=headers) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
        with pytest.raises(openai.APIStatusError) as refused:  # the agent's $5 is spent
            client.chat.completions.create(model="gpt-4o-mini", messages=HI)
        assert refused.value.status_code == 402
    charged = proxy.query(
        "SELECT agent, actual_usd, tokens_in FROM decisions WHERE decision = 'allow' ORDER BY ts"
    )
    assert charged == [
        ("tools", 10_000_000, 0),  # -5: unreadable, its fixed cost
        ("tools", 10_000_000, 0),  # 1e30: unreadable, its fixed cost
        ("tools", 250_000_000, 0),
        ("chat", MAX_AMOUNT, MAX_AMOUNT),  # charged at the ledger's bound
    ]
    log = proxy.log_text()
    assert "reported an unreadable cost '-5'" in log and "past what the ledger holds" in log
    assert_no_traceback(proxy)
    proxy.stop()
    verify(tmp_db)


def test_hostile_json_values_in_a_tool_call_are_decided_not_crashed_on(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    """`amount: "NaN"` once made the condition raise — and an exception in a hook lets mitmproxy
    forward the request undecided. NaN, infinities, deep nesting and non-numbers are not numbers:
    each is refused by the `when` (403) and never sent. A bare NaN or Infinity, a number past
    any float and nesting too deep to read are JSON that servers read differently, or not at
    all: the `when` cannot be decided on them, and they are refused 400 `bad_request`."""
    proxy = drawdown_proxy(POLICY)
    values = [
        "NaN",
        "nan",
        "sNaN",
        "-NaN",
        "Infinity",
        "1e999999",
        [],
        {},
        None,
        True,
        "5000 ",
        "0x10",
    ]
    raw = [
        b'{"amount": NaN}',
        b'{"amount": Infinity}',
        b'{"amount": -Infinity}',
        b'{"amount": 1e99999}',
        b'{"amount": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        b'{"amount": ' + b"[" * 3_000 + b"]" * 3_000 + b"}",
    ]
    bodies = [_json({"amount": v}) for v in values] + raw
    with proxy.http_client(timeout=60) as client:
        statuses = [
            client.post(
                "https://api.stripe.com/v1/refunds",
                content=body,
                headers={"content-type": "application/json", "x-drawdown-agent": "support"},
            ).status_code
            for body in bodies
        ]
        allowed = client.post(
            "https://api.stripe.com/v1/refunds",
            json={"amount": "4999.5"},
            headers={"x-drawdown-agent": "support"},
        )
    expected = [403] * len(values) + [400] * 5 + [403]  # [[[…]]] 3,000 deep: read, a list
    expected[values.index("5000 ")] = 200  # a number in text is still the number 5000
    assert statuses == expected
    assert allowed.status_code == 200
    assert standin.count("/v1/refunds") == 2
    assert proxy.query("SELECT COUNT(*) FROM decisions") == [(len(bodies) + 1,)]
    assert_no_traceback(proxy)
    proxy.stop()
    verify(tmp_db)


# --- a body drawdown cannot read as the upstream reads it -------------------------------------

UNREAD = """
identity:
  agent: [{value: agent}]
  run: [{header: X-Drawdown-Run}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}, cost: {usd: 0.01}}
authority:
  rules:
    - {scope: "*", deny: [refund.issue], when: {json: {amount: {gt: 5000}}}}
    - {scope: "*", deny: [refund.issue], when: {query: {account: acct_frozen}}}
    - {scope: "*", deny: [llm], when: {model: {in: [gpt-4o]}}}
"""
REFUNDS = "https://api.stripe.com/v1/refunds"
FORM = "application/x-www-form-urlencoded"
# Raw, valid JSON naming gpt-4o; decoded as quoted-printable (as mitmproxy did), gpt-4o-mini.
QUOPRI_CHAT = (b'{"model":"gpt-4o","pad":"=22,=22model=22:=22gpt-4o-mini=22,=22z=22:=22",'
               b'"messages":[{"role":"user","content":"qp"}],"max_tokens":10}')  # fmt: skip
# (url, body, Content-Type, Content-Encoding, status): each refused one went through before.
UNREAD_CALLS = [
    (REFUNDS, b'{"amount": 100}', "application/json", None, 200),
    (REFUNDS, b"amount=100&currency=usd", FORM, None, 200),
    (REFUNDS, gzip.compress(b'{"amount": 100}'), "application/json", "gzip", 200),
    (REFUNDS, gzip.compress(b'{"amount": 10000}'), "application/json", "x-gzip", 403),
    (REFUNDS, b'{"amount": 10000, "memo": "caf\xe9"}', "application/json", None, 400),
    (REFUNDS, b'{"amount": 10000,}', "application/json", None, 400),
    (REFUNDS, b'{"amount": 10000 /* c */}', "application/json", None, 400),
    (REFUNDS, b'{"amount": NaN}', "application/json", None, 400),
    (REFUNDS, b'{"amount": 1e999}', "application/json", None, 400),
    (REFUNDS, b'{"amount": 10000}', FORM, None, 400),
    (REFUNDS, b"amount=10000&amount=1", FORM, None, 400),
    (REFUNDS + "?account=acct_ok&account=acct_frozen", b'{"amount": 1}', "application/json", None, 400),
    (REFUNDS, b'{"amount":10000,"pad":"=22,=22amount=22:1,=22z=22:=22"}', "application/json", "quopri", 400),
    (REFUNDS, gzip.compress(gzip.compress(b'{"amount": 10000}')), "application/json", "gzip, gzip", 400),
    (REFUNDS, gzip.compress(b'{"amount": 1}') + gzip.compress(b""), "application/json", "gzip", 400),
    (OPENAI, QUOPRI_CHAT, "application/json", "quopri", 400),
]  # fmt: skip


def send_unread(proxy: DrawdownProcess) -> list[int]:
    statuses = []
    with proxy.http_client(timeout=60) as client:
        for i, (url, body, content_type, coding, _) in enumerate(UNREAD_CALLS):
            headers = {"content-type": content_type, "x-drawdown-run": f"u{i}"}
            if coding is not None:
                headers["content-encoding"] = coding
            response = client.post(url, content=body, headers=headers)
            statuses.append(response.status_code)
            if response.status_code == 400:
                assert response.headers["x-drawdown-reason"] == "bad_request"
                answer = response.json()
                # An LLM call's in its provider's shape; a tool call's, drawdown's own.
                message = (
                    error_message(url, answer) if url == OPENAI else answer["error"]["message"]
                )
                assert message.startswith("drawdown: ") and "as the upstream would" in message
    return statuses


def test_a_body_drawdown_cannot_read_as_the_upstream_would_is_refused_not_guessed(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path, tmp_db: Path
) -> None:
    """A `deny … when` on the amount of a refund drawdown could not read (a Latin-1 byte, a
    trailing comma, a comment, NaN, JSON sent as a form, `amount` given twice) did not hold,
    and the refund went through; mitmproxy decoded a `quopri` body the upstream gets raw (a
    denied model passed as another), and left `x-gzip` and `gzip, gzip` undecoded. Each is
    refused 400 in the provider's shape, never sent; shadow mode forwards them `would_deny`;
    replay decides the ledger as the proxy did."""
    proxy = drawdown_proxy(UNREAD)
    assert send_unread(proxy) == [c[4] for c in UNREAD_CALLS]
    sent = standin.matching("/v1/refunds")
    assert [(r.body, r.header("content-encoding")) for r in sent] == [
        (body, coding) for _, body, _, coding, status in UNREAD_CALLS if status == 200
    ]  # as the agent sent them: drawdown decodes a body only to read it
    assert standin.count("/v1/chat/completions") == 0
    rows = proxy.query("SELECT decision, reason_code, status FROM decisions ORDER BY ts, id")
    assert [s for *_, s in rows] == [c[4] for c in UNREAD_CALLS]
    assert {(d, r) for d, r, s in rows if s == 400} == {("deny", "bad_request")}
    assert_no_traceback(proxy)
    proxy.stop()
    verify(tmp_db)
    policy = tmp_path / "unread.yaml"
    policy.write_text(UNREAD)
    replayed = json.loads(
        subprocess.run(
            [sys.executable, "-m", "drawdown", "replay", "--policy", str(policy), "--db", str(tmp_db), "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    )  # fmt: skip
    assert replayed["changed"] == 0, replayed["blocked"]

    standin.clear()
    shadow = drawdown_proxy("mode: shadow\n" + UNREAD, db=tmp_path / "shadow.db")
    assert 400 not in send_unread(shadow)
    assert standin.count("*") == len(UNREAD_CALLS)  # forwarded, every one
    rows = shadow.query("SELECT decision, reason_code FROM decisions ORDER BY ts, id")
    assert [r for r, c in zip(rows, UNREAD_CALLS, strict=True) if c[4] == 400] == [
        ("would_deny", "bad_request")
    ] * sum(c[4] == 400 for c in UNREAD_CALLS)
    assert_no_traceback(shadow)


# --- hostile identity values ----------------------------------------------------------------

HOSTILE = [
    "a/run:evil",
    "run:x/agent:victim",
    "../../etc/passwd",
    "a:b",
    "tenant:acme",
    "*",
    "?",
    "agent:*",
    "[abc]",
    "%",
    "%2F",  # already "escaped": must not become a "/"
    "a%3Ab",
    "_",
    "' OR 1=1 --",
    "x" * 10_000,
    "x" * 9_999 + "y",  # same first 10 kB but one byte: a different run
    "ctl\x01\x02\x7fchars",
    "nul\x00byte",
    "tab\tand space",
    "\u202eevil",  # right-to-left override
    "\u200bvictim",  # zero-width space + victim
    "ｖｉｃｔｉｍ",  # fullwidth look-alike
    "vіctim",  # Cyrillic і
    "r1\u2028line",
    "é" * 200,
    "victim, r1",
]


def raw_request(proxy: DrawdownProcess, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    """A plain-HTTP request through the proxy, byte for byte (no client library in the way)."""
    host, port = proxy.address
    head = b"POST http://api.openai.com/v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    head += (
        b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % len(body)
    )
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(head + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return response.status


CHAT = _json({"model": "gpt-4o-mini", "messages": HI, "max_tokens": 5})


def test_hostile_identity_values_never_escape_their_scope(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    proxy = drawdown_proxy(POLICY)
    assert (
        raw_request(proxy, [(b"X-Drawdown-Agent", b"victim"), (b"X-Drawdown-Run", b"r1")], CHAT)
        == 200
    )
    outcomes: dict[str, list[int]] = {}
    for value in HOSTILE:
        encoded = value.encode("utf-8")
        # As a run of one agent: its own run budget (2 requests), shared with no other run.
        outcomes[value] = [
            raw_request(
                proxy, [(b"X-Drawdown-Agent", b"mallory"), (b"X-Drawdown-Run", encoded)], CHAT
            )
            for _ in range(3)
        ]
        # As an agent name and as a tenant: stored sanitised, in its own level.
        raw_request(proxy, [(b"X-Drawdown-Agent", encoded), (b"X-Drawdown-Run", b"probe")], CHAT)
        raw_request(
            proxy, [(b"X-Drawdown-Tenant", encoded), (b"X-Drawdown-Agent", b"tenant-probe")], CHAT
        )
    # Header tricks: a repeated identity header, a folded continuation line, the prefix in odd case.
    tricks = [
        [
            (b"X-Drawdown-Agent", b"mallory"),
            (b"X-Drawdown-Agent", b"victim"),
            (b"X-Drawdown-Run", b"r1"),
        ],
        [
            (b"X-Drawdown-Agent", b"mallory"),
            (b"X-Drawdown-Run", b"trick"),
            (b" X-Drawdown-Run", b"r1"),
        ],
        [(b"x-DRAWDOWN-agent", b"mallory2"), (b"X-Drawdown-Run", b"r1")],
    ]
    for headers in tricks:
        raw_request(proxy, headers, CHAT)

    for value, statuses in outcomes.items():
        assert statuses == [200, 200, 402], (value[:40], statuses)
    # Each hostile run is an instance of its own: no two values collapsed, none reached another run.
    runs = {
        r[0]
        for r in proxy.query(
            "SELECT scope FROM budget_instances WHERE scope LIKE 'agent:mallory/run:%'"
        )
    }
    assert {f"agent:mallory/run:{clean_value(v)}" for v in HOSTILE} <= runs
    assert len({clean_value(v) for v in HOSTILE}) == len(HOSTILE)
    for value in HOSTILE:
        ((spent,),) = proxy.query(
            "SELECT spent_requests FROM budget_instances WHERE scope = ?",
            f"agent:mallory/run:{clean_value(value)}",
        )
        assert spent == 2, value[:40]
    # The victim's run was charged by the victim's one request and by nothing else.
    assert proxy.query(
        "SELECT spent_requests FROM budget_instances WHERE scope = 'agent:victim/run:r1'"
    ) == [(1,)]
    assert proxy.query(
        "SELECT COUNT(*) FROM decisions WHERE scope = 'tenant:acme/agent:victim/run:r1'"
    ) == [(1,)]
    # Stored safely: every scope has exactly its three levels, in order; each value is the
    # sanitised header (bounded, printable, no separators) and matches its level column.
    for scope, tenant, agent, run in proxy.query("SELECT scope, tenant, agent, run FROM decisions"):
        levels = [segment.split(":") for segment in scope.split("/")]
        assert [level[0] for level in levels] == ["tenant", "agent", "run"] and all(
            len(level) == 2 for level in levels
        ), scope[:200]
        assert [level[1] for level in levels] == [tenant, agent, run]
        for value in (tenant, agent, run):
            assert (
                value.isprintable()
                and len(value) <= MAX_VALUE_LENGTH
                and not set(value) & set("/:")
            )
    agents = {a for (a,) in proxy.query("SELECT DISTINCT agent FROM decisions")}
    tenants = {t for (t,) in proxy.query("SELECT DISTINCT tenant FROM decisions")}
    assert {clean_value(v) for v in HOSTILE} <= agents and {
        clean_value(v) for v in HOSTILE
    } <= tenants
    # No header trick made the caller "victim" (an invisible character is dropped, so
    # "\u200bvictim" *is* "victim" — which a caller may claim by header anyway; with proxy
    # authentication the agent is the authenticated user and no header can claim it).
    assert proxy.query(
        "SELECT COUNT(*) FROM decisions WHERE agent = 'victim' AND run <> 'probe'"
    ) == [(1,)]
    assert not [
        h for r in standin.requests for h in r.headers if h[0].lower().startswith("x-drawdown")
    ]
    assert_no_traceback(proxy)
    proxy.stop()
    verify(tmp_db)


# --- a bug in drawdown fails closed ------------------------------------------------------------

FAULTS = '''
"""Test-only mitmproxy script: make drawdown's own code raise on request."""
import drawdown.addon as addon

_classify, _reserve = addon.classify, addon.Drawdown._reserve


def classify(policy, view):
    if view.headers.get("x-test-fault") == "classify":
        raise RuntimeError("injected fault before the reservation")
    return _classify(policy, view)


async def reserve_then_fail(self, flow, state, *args, **kwargs):
    await _reserve(self, flow, state, *args, **kwargs)
    if flow.request.headers.get("x-test-fault") == "after-reserve":
        raise RuntimeError("injected fault after the reservation")


addon.classify, addon.Drawdown._reserve = classify, reserve_then_fail
addons = []
'''


def test_an_internal_error_fails_closed(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path, tmp_db: Path
) -> None:
    """mitmproxy forwards a request whose hook raised; drawdown refuses it instead (500), records
    it and releases anything it had reserved."""
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    proxy = drawdown_proxy(POLICY, extra_args=["--set", f"scripts={script}"])
    statuses = []
    with proxy.openai_client(
        max_retries=0, default_headers={"X-Drawdown-Agent": "a", "X-Drawdown-Run": "r"}
    ) as client:
        for fault in ("classify", "after-reserve", None):
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=HI,
                    extra_headers={"x-test-fault": fault} if fault else None,
                )
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
                assert exc.response.headers["x-drawdown-reason"] == "internal_error"
    assert statuses == [500, 500, 200]
    assert standin.count("*") == 1
    decisions = proxy.wait_for_query(
        "SELECT decision, reason_code, status FROM decisions ORDER BY ts",
        until=lambda r: len(r) == 3 and all(s is not None for *_, s in r),
    )
    assert [(d, s) for d, _, s in decisions] == [("deny", 500), ("allow", 500), ("allow", 200)]
    assert proxy.query("SELECT state FROM holds ORDER BY id") == [("released",), ("committed",)]
    assert proxy.query(
        "SELECT reserved_requests, spent_requests FROM budget_instances WHERE scope = 'agent:a/run:r'"
    ) == [(0, 1)]
    assert proxy.log_text().count("internal error deciding") == 2
    proxy.stop()
    verify(tmp_db)


# --- a host, path or method the upstream reads otherwise -------------------------------------

READINGS = """
identity:
  agent: [{header: X-Drawdown-Agent}, {value: agent}]
  run: [{header: X-Drawdown-Run}, {value: r1}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}, cost: {usd: 0.01}}
  - {kind: crm.read, match: {host: crm.example.com, method: GET, path: "/api/customers/{id}"}, cost: {usd: 0.002}}
  - {kind: crm.delete, match: {host: crm.example.com, method: DELETE}}
authority:
  rules:
    - {scope: "*", deny: [llm], when: {model: {in: [gpt-4o]}}}
    - {scope: "*", deny: [refund.issue], when: {json: {amount: {gt: 5000}}}}
    - {scope: "*", deny: [crm.delete]}
"""


def tunneled(proxy: DrawdownProcess, target: str, sni: str, head: str, body: bytes = b"") -> int:
    """One request through a CONNECT tunnel, byte for byte: CONNECT `target`, TLS naming `sni`,
    then `head` (its request line and headers) and `body`. The status the client got."""
    with socket.create_connection(proxy.address, timeout=60) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        connected = http.client.HTTPResponse(sock, method="CONNECT")
        connected.begin()
        assert connected.status == 200, target
        with proxy.ssl_context().wrap_socket(sock, server_hostname=sni) as tls:
            end = f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            tls.sendall(f"{head}\r\n{end}".encode() + body)
            response = http.client.HTTPResponse(tls)
            response.begin()
            response.read()
            return response.status


def plain(proxy: DrawdownProcess, head: str, body: bytes = b"") -> int:
    """One plain-HTTP proxy request, byte for byte."""
    with socket.create_connection(proxy.address, timeout=60) as sock:
        end = f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        sock.sendall(f"{head}\r\n{end}".encode() + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return response.status


def chat_body(model: str) -> bytes:
    return _json({"model": model, "messages": HI, "max_tokens": 5})


def test_a_request_is_decided_by_the_host_the_upstream_sees(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path, tmp_db: Path
) -> None:
    """The policy matched the CONNECT target only. An unmodified curl to
    `https://api.openai.com./…` (a fully qualified name), a CONNECT to an IP address naming
    api.openai.com, went through as unknown hosts: unmetered, a denied model sent. A CONNECT
    to crm.example.com naming api.stripe.com (SNI, Host header, an absolute-form URI; or a
    plain-HTTP URL and Host header apart) took a denied refund to an upstream that acts on the
    name, recorded as crm.example.com. Now a host is read as DNS reads it, a request sent by
    IP address is decided by the name it gives, and one naming two hosts is refused (400),
    never forwarded; `drawdown replay` decides the ledger alike."""
    everything = {"tls": {"*": standin.host_port}, "plain": {"*": standin.http_host_port}}
    proxy = drawdown_proxy(READINGS, resolve=everything)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}

    def curl(url: str, model: str) -> int:
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "--proxy", proxy.proxy_url, "--cacert",
             str(proxy.ca_path), "-o", "/dev/null", "-w", "%{http_code}", url,
             "-H", "Content-Type: application/json", "--data-binary", chat_body(model).decode()],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    dotted = "https://api.openai.com./v1/chat/completions"
    assert [curl(dotted, "gpt-4o"), curl(dotted, "gpt-4o-mini")] == [403, 200]
    chat = "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json"
    by_ip = [tunneled(proxy, "10.9.8.7:443", "api.openai.com", chat, chat_body(m))
             for m in ("gpt-4o", "gpt-4o-mini")]  # fmt: skip
    assert by_ip == [403, 200]
    dot = tunneled(proxy, "api.openai.com.:443", "api.openai.com", chat, chat_body("gpt-4o"))
    assert dot == 403
    refund = _json({"amount": 10_000})
    json_type = "Content-Type: application/json"
    two_hosts = [
        tunneled(proxy, "crm.example.com:443", "api.stripe.com",
                 f"POST /v1/refunds HTTP/1.1\r\nHost: api.stripe.com\r\n{json_type}", refund),
        tunneled(proxy, "api.stripe.com:443", "api.stripe.com",
                 f"POST /v1/refunds HTTP/1.1\r\nHost: crm.example.com\r\n{json_type}", refund),
        tunneled(proxy, "api.stripe.com:443", "crm.example.com",
                 f"POST /v1/refunds HTTP/1.1\r\nHost: api.stripe.com\r\n{json_type}", refund),
        tunneled(proxy, "crm.example.com:443", "crm.example.com",
                 f"POST https://api.stripe.com/v1/refunds HTTP/1.1\r\nHost: crm.example.com\r\n{json_type}",
                 refund),
        plain(proxy, f"POST http://crm.example.com/v1/refunds HTTP/1.1\r\nHost: api.stripe.com\r\n{json_type}",
              refund),
        tunneled(proxy, "api.openai.com:443", "crm.example.com",
                 "DELETE /api/customers/1 HTTP/1.1\r\nHost: crm.example.com"),
    ]  # fmt: skip
    assert two_hosts == [400] * 6
    # One host, however written: decided as the action it names.
    small = _json({"amount": 100})
    head = f"POST /v1/refunds HTTP/1.1\r\nHost: API.Stripe.com.:443\r\n{json_type}"
    assert tunneled(proxy, "api.stripe.com:443", "api.stripe.com", head, small) == 200

    forwarded = [(r.method, r.path, r.host) for r in standin.requests]
    assert forwarded == [
        ("POST", "/v1/chat/completions", "api.openai.com."),
        ("POST", "/v1/chat/completions", "api.openai.com"),
        ("POST", "/v1/refunds", "API.Stripe.com.:443"),
    ]
    rows = proxy.wait_for_query(
        "SELECT host, action, decision, reason_code, status, actual_usd FROM decisions ORDER BY id",
        until=lambda r: len(r) == 12 and all(row[4] is not None for row in r),
    )
    assert {row[0] for row in rows} == {"api.openai.com", "crm.example.com", "api.stripe.com"}
    llm = [row for row in rows if row[1] == "llm" and row[2] == "allow"]
    assert len(llm) == 2 and all(row[5] > 0 for row in llm)  # metered
    refused = [row[3:5] for row in rows if row[2] == "deny"]
    assert refused.count(("bad_request", 400)) == 6 and len(refused) == 9
    log = proxy.log_text()
    assert log.count("which an upstream may act on instead") == 6
    assert "the request goes to api.stripe.com but its TLS SNI names crm.example.com" in log

    policy = tmp_path / "same.yaml"
    policy.write_text(READINGS)
    assert replay.replay(load_policy(policy), str(tmp_db))["changed"] == 0
    assert_no_traceback(proxy)


def test_a_path_or_method_a_server_reads_otherwise_is_refused(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path, tmp_db: Path
) -> None:
    """`POST /v1//refunds`, `//v1/refunds`, `/V1/Refunds`, `/v1/refunds;x=1` (nginx merges
    slashes, Express and ASP.NET route in any case, Spring drops `;params`) and a POST asking
    for a denied DELETE by X-HTTP-Method-Override, X-Method-Override, X-HTTP-Method or
    `?_method=` went through as unknown calls. Each is refused (400), never forwarded, through
    a real proxy; the refund and lookup as written still go through; replay decides alike."""
    proxy = drawdown_proxy(READINGS)
    refund = _json({"amount": 10_000})
    json_type = "Content-Type: application/json"
    stripe = [
        tunneled(proxy, "api.stripe.com:443", "api.stripe.com",
                 f"POST {path} HTTP/1.1\r\nHost: api.stripe.com\r\n{json_type}", refund)
        for path in ("/v1//refunds", "//v1/refunds", "/V1/Refunds", "/v1/refunds;x=1")
    ]  # fmt: skip
    assert stripe == [400] * 4
    crm = [
        tunneled(proxy, "crm.example.com:443", "crm.example.com",
                 f"POST {path} HTTP/1.1\r\nHost: crm.example.com{header}")
        for path, header in (
            ("/api/customers/1", "\r\nX-HTTP-Method-Override: DELETE"),
            ("/api/customers/1", "\r\nX-Method-Override: DELETE"),
            ("/api/customers/1", "\r\nX-HTTP-Method: delete"),
            ("/api/customers/1?_method=DELETE", ""),
        )
    ]  # fmt: skip
    assert crm == [400] * 4
    allowed = [
        tunneled(proxy, "api.stripe.com:443", "api.stripe.com",
                 f"POST /v1/refunds HTTP/1.1\r\nHost: api.stripe.com\r\n{json_type}", _json({"amount": 100})),
        tunneled(proxy, "crm.example.com:443", "crm.example.com",
                 "GET /api/customers/CUS-1 HTTP/1.1\r\nHost: crm.example.com"),
    ]  # fmt: skip
    assert allowed == [200, 200]
    assert [(r.method, r.path) for r in standin.requests] == [
        ("POST", "/v1/refunds"),
        ("GET", "/api/customers/CUS-1"),
    ]
    rows = proxy.wait_for_query(
        "SELECT reason_code, status, reason FROM decisions ORDER BY id",
        until=lambda r: len(r) == 10 and all(row[1] is not None for row in r),
    )
    assert [row[:2] for row in rows] == [("bad_request", 400)] * 8 + [(None, 200)] * 2
    assert "reads as /v1/refunds to a server that merges repeated slashes" in rows[0][2]
    assert "reads as DELETE to a server that honours the X-HTTP-Method header" in rows[6][2]
    policy = tmp_path / "same.yaml"
    policy.write_text(READINGS)
    assert replay.replay(load_policy(policy), str(tmp_db))["changed"] == 0
    assert_no_traceback(proxy)


# --- a user's mistake at start-up, under plain mitmdump ------------------------------------------


@pytest.mark.parametrize(
    ("policy_text", "said"),
    [
        (None, "drawdown_policy is not set: point it at a policy file or folder"),
        (
            "version: 1\nactions:\n  - {kind: llm, provider: opneai, match: {host: a.example}}\n",
            "p.yaml:3: provider must be one of openai, anthropic, gemini, bedrock, mcp, not "
            "'opneai' (did you mean 'openai'?)",
        ),
    ],
    ids=["no-policy", "broken-policy"],
)
def test_plain_mitmdump_says_a_start_up_mistake_without_a_traceback(
    tmp_path: Path, policy_text: str | None, said: str
) -> None:
    """mitmproxy logs a script's error at load with its traceback: a policy's `FILE:LINE:`
    lines came under six lines of Python. They are said alone now, and mitmdump still stops."""
    policy = tmp_path / "p.yaml"
    options = ["--set", f"confdir={tmp_path / 'c'}", "--set", f"drawdown_db={tmp_path / 'x.db'}"]
    if policy_text is not None:
        policy.write_text(policy_text)
        options += ["--set", f"drawdown_policy={policy}"]
    mitmdump = Path(sys.executable).with_name("mitmdump")
    addon = Path(__file__).resolve().parents[2] / "addon" / "drawdown" / "mitm.py"
    result = subprocess.run(
        [str(mitmdump), "-s", str(addon), "--listen-host", "127.0.0.1", "--listen-port", "0",
         *options],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert said in output, output
    assert "Traceback" not in output and "error in script" not in output, output
