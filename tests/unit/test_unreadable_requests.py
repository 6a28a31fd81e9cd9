"""A request drawdown cannot read as its upstream reads it is refused, never decided on a guess.

A `deny … when` on a field of a body drawdown could not read did not hold, and the request
went through: a Latin-1 byte, a trailing comma, a comment, NaN, JSON sent as a form, a form
field given twice, or a Content-Encoding mitmproxy decoded (any Python codec: `quopri`…) or
did not (`gzip, gzip`). Classification, authority, the proxy, replay and explain refuse such
a request alike (400 `bad_request`; shadow mode forwards it, `would_deny`).
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import tracemalloc
import zlib
from dataclasses import replace
from pathlib import Path

import brotli
import pytest
from backports import zstd
from drawdown import replay
from drawdown.authority import evaluate, facts_of
from drawdown.classify import RequestView, classify, first_values
from drawdown.explain import explain
from drawdown.meter.decode import BodyTooLarge, UndecodableBody, decode_body

from tests.support.policies import policy_from

FORM = "application/x-www-form-urlencoded"


def raw(body: bytes, content_type: str = "application/json", **kw: object) -> RequestView:
    view = RequestView(
        "POST", "api.stripe.com", 443, "/v1/refunds", {}, {"content-type": content_type}, body
    )
    return replace(view, **kw) if kw else view


# (body, Content-Type, what the reason says): bodies a server may read an amount from, which
# drawdown read as having none.
UNREADABLE = [
    (b'{"amount": 10000, "memo": "caf\xe9"}', "application/json", "not valid UTF-8"),
    (b'{"amount": 10000,}', "application/json", "not valid JSON"),
    (b'{"amount": 10000 /* c */}', "application/json", "not valid JSON"),
    (b'{"amount": NaN}', "application/json", "NaN is no JSON value"),
    (b'{"amount": -Infinity}', "application/json", "-Infinity is no JSON value"),
    (b'{"amount": 1e999}', "application/json", "too large to be finite"),
    (b"amount=10000", "application/json", "not valid JSON"),
    (b"amount=10000", "multipart/form-data; boundary=b", "(Content-Type multipart/form-data)"),
    (b'  {"amount": 10000}', FORM, "looks like JSON, but its Content-Type says"),
    (b"amount=10000&memo=caf\xe9", FORM, "form body is not valid UTF-8"),
    (b"amount=10000&amount=1", FORM, "'amount' is given more than once"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", "nested too deeply"),
]


# --- reading ------------------------------------------------------------------------------


def test_a_body_drawdown_cannot_read_is_unread_not_absent() -> None:
    for body, content_type, says in UNREADABLE:
        v = raw(body, content_type)
        why = v.unread("json.amount")
        assert why is not None and says in why, (body, why)
        assert v.unread("query.amount") is None and v.unread("model") is None
    # Readable, or nothing to read: known, whether the field is there or not.
    for body, content_type in [
        (b'{"amount": 10000, "memo": "caf\xc3\xa9"}', "application/json"),
        (b'{"amount": 1e300, "n": -0.5}', "application/json"),
        (b'{"amount": 10000}', ""),  # no Content-Type: read as JSON, as before
        (b"amount=10000&memo=caf%E9", FORM),  # an escape is decoded, as servers do
        (b"", FORM),
        (b"", "application/json"),
    ]:
        assert raw(body, content_type).unread("json.amount") is None, body
    assert raw(b"amount=10000&memo=x", FORM).json == {"amount": "10000", "memo": "x"}


def test_a_form_field_or_query_parameter_given_twice_is_unread() -> None:
    """Flask and Go read the first of `amount=10000&amount=1`, PHP and Rails the last:
    drawdown read the last (1), and a deny on amounts above 5000 let the refund through."""
    form = raw(b"amount=10000&amount=1&expand[]=a&expand[]=b&currency=usd", FORM)
    assert form.json["amount"] == "10000"  # the first, as mitmproxy reads a query
    assert form.unread("json.currency") is None and form.unread("json.expand[]") is not None
    assert form.repeated == ["json.amount", "json.expand[]"]
    query, repeats = first_values([("account", "ok"), ("page", "2"), ("account", "frozen")])
    assert query == {"account": "ok", "page": "2"} and repeats == {"account"}
    v = raw(b"", query=query, query_repeats=repeats)
    assert v.unread("query.page") is None
    why = v.unread("query.account")
    assert why is not None and "query parameter 'account' is given more than once" in why
    # JSON keys are left to Python's reader, which keeps the last (as most servers do).
    assert raw(b'{"amount": 10000, "amount": 1}').json == {"amount": 1}


def test_a_request_body_is_decoded_as_its_upstream_decodes_it_or_not_at_all() -> None:
    body = b'{"amount": 10000}'
    for coding, encoded in [
        (None, body),
        ("identity", body),
        ("gzip", gzip.compress(body)),
        ("x-gzip", gzip.compress(body)),  # RFC 9110: gzip; mitmproxy left it compressed
        (" GZIP ", gzip.compress(body)),
        ("deflate", zlib.compress(body)),
        ("deflate", zlib.compress(body)[2:-4]),  # raw deflate, as some clients send it
        ("br", brotli.compress(body)),
    ]:
        assert decode_body(encoded, coding, len(body)) == body, coding
    quopri = b'{"amount":10000,"pad":"=22,=22amount=22:1,=22z=22:=22","q":1}'
    for coding, encoded, says in [
        # mitmproxy decodes any Python codec a client names; no upstream does.
        ("quopri", quopri, "'quopri' is no HTTP content coding"),
        ("base64", b"eyJhbW91bnQiOjF9", "'base64' is no HTTP content coding"),
        ("bz2", b"BZh9", "no HTTP content coding"),
        ("utf-8", body, "no HTTP content coding"),
        ("gzip, gzip", gzip.compress(gzip.compress(body)), "stacks several codings"),
        ("gzip", zlib.compress(body), "not valid gzip data"),  # zlib data (mitmproxy took it)
        ("gzip", gzip.compress(body)[:-6], "cut short"),
        ("gzip", gzip.compress(b'{"amount": 1}') + gzip.compress(body), "more data follows"),
        ("br", brotli.compress(body) + b"x", "not valid br data"),
    ]:
        with pytest.raises(UndecodableBody) as refused:
            decode_body(encoded, coding, 1 << 20)
        assert says in str(refused.value), coding
    assert decode_body(b"", "gzip", 0) == b""


def _bombs(size: int) -> list[tuple[str, bytes]]:
    zeros = bytes(size)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return [
        ("gzip", gzip.compress(zeros, 9)),
        ("deflate", zlib.compress(zeros, 9)),
        ("deflate", deflate.compress(zeros) + deflate.flush()),  # raw deflate
        ("br", brotli.compress(zeros, quality=5)),
        ("zstd", zstd.compress(zeros)),
    ]


@pytest.mark.parametrize(("coding", "bomb"), _bombs(64 << 20))
def test_a_compressed_body_is_decoded_no_further_than_the_limit(coding: str, bomb: bytes) -> None:
    """64 MiB of zeros in a few hundred kB at most: decoding stops one byte past a 1 MiB
    limit, so what it holds is the limit, not the bomb (before: all of it, 2.3 GB for 1 GiB)."""
    assert len(bomb) < 300_000
    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLarge):
            decode_body(bomb, coding, 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    # The same data under a limit it fits is read whole, to the byte.
    small = dict(_bombs(1 << 20))[coding] if coding != "deflate" else zlib.compress(bytes(1 << 20))
    assert decode_body(small, coding, 1 << 20) == bytes(1 << 20)


# --- classification -----------------------------------------------------------------------

ACTIONS = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: refund.big, match: {host: api.stripe.com, method: POST, path: /v1/refunds, json: {amount: {gt: 5000}}}}
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}}
  - {kind: mcp.docs, provider: mcp, match: {host: docs.example.com}}
"""


def test_an_action_matching_on_a_field_it_cannot_read_is_refused_not_passed_over(
    tmp_path: Path,
) -> None:
    """`refund.big` matches amounts above 5000: a body it could not read fell through to
    `refund.issue`, as if it named a small refund. Which action it is cannot be told."""
    policy = policy_from(tmp_path, ACTIONS)
    for body, content_type in [(b'{"amount": 9000,}', "application/json"),
                               (b"amount=9000&amount=1", FORM)]:  # fmt: skip
        found = classify(policy, raw(body, content_type))
        assert found.kind == "refund.big" and found.body_error is not None, body
        assert "(action refund.big matches on json.amount)" in found.body_error
    assert classify(policy, raw(b"amount=9000", FORM)).kind == "refund.big"
    small = classify(policy, raw(b"amount=90", FORM))
    assert small.kind == "refund.issue" and small.body_error is None
    # A test that can be read and fails decides it whatever the other holds.
    q = policy_from(
        tmp_path,
        "actions:\n"
        "  - {kind: big.live, match: {host: api.stripe.com, query: {mode: live},"
        " json: {amount: {gt: 5000}}}}\n"
        "  - {kind: refund, match: {host: api.stripe.com}}\n",
        "q.yaml",
    )
    found = classify(q, raw(b'{"amount": 9000,}', query={"mode": "test"}))
    assert found.kind == "refund" and found.body_error is None


def test_an_mcp_call_sent_as_a_form_is_refused_as_unreadable(tmp_path: Path) -> None:
    """Read as a form, a tools/call sent with a form Content-Type was a message with no
    method: session housekeeping, forwarded with no rule about its tool applied."""
    policy = policy_from(tmp_path, ACTIONS)
    call = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete"}}'
    found = classify(policy, raw(call, FORM, host="docs.example.com"))
    assert found.mcp_error is not None and found.mcp_error[0] == -32700
    assert "looks like JSON" in found.mcp_error[1]
    assert classify(policy, raw(call, host="docs.example.com")).kind == "mcp.docs.delete"


# --- authority ----------------------------------------------------------------------------

RULES = """
authority:
  default: allow
  rules:
    - {scope: "*", deny: [refund.issue], when: {json: {amount: {gt: 5000}}}}
    - {scope: "*", deny: [refund.issue], when: {query: {account: acct_frozen}}}
    - {scope: "*", deny: [refund.issue], when: {query.mode: live, json.currency: {ne: usd}}}
    - {scope: "*", action: refund.issue, requires: [{action: crm.read, same: {json.customer: json.customer}}]}
"""


def decide(policy, view: RequestView, kind: str = "refund.issue", agent: str = "a"):
    evaluation = evaluate(policy.authority, {"agent": agent}, f"agent:{agent}", kind, view)
    return evaluation.finish([True] * len(evaluation.checks))


@pytest.mark.parametrize(("body", "content_type", "says"), UNREADABLE)
def test_a_deny_on_a_field_drawdown_cannot_read_refuses_the_request(
    tmp_path: Path, body: bytes, content_type: str, says: str
) -> None:
    policy = policy_from(tmp_path, RULES)
    verdict = decide(policy, raw(body, content_type))
    assert (verdict.decision, verdict.reason_code) == ("deny", "bad_request"), verdict
    assert "reads json.amount, which drawdown cannot read as the upstream would" in (
        verdict.reason or ""
    )
    assert says in (verdict.reason or "")


def test_a_rule_is_refused_only_where_its_field_cannot_be_read(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, RULES)
    ok = b'{"amount": 100, "customer": "c-1", "currency": "usd"}'
    assert decide(policy, raw(ok)).decision == "allow"
    assert decide(policy, raw(b'{"amount": 10000}')).reason_code == "not_authorized"
    assert decide(policy, raw(b"amount=100&customer=c-1&currency=usd", FORM)).decision == "allow"
    # A field given twice that no rule reads is no matter.
    both = b"amount=100&customer=c-1&expand[]=a&expand[]=b"
    assert decide(policy, raw(both, FORM)).decision == "allow"
    frozen = raw(ok, query={"account": "ok"}, query_repeats=frozenset({"account"}))
    verdict = decide(policy, frozen)
    assert verdict.reason_code == "bad_request" and "query.account" in (verdict.reason or "")
    # A readable condition that fails decides the rule whatever its other field holds.
    mode = b'{"amount": 100, "customer": "c-1", "currency": "usd", "currency": "eur"}'
    assert decide(policy, raw(mode, query={"mode": "test"})).decision == "allow"
    # Another kind's rules never read this body.
    assert decide(policy, raw(b'{"amount": 10000,}'), kind="llm").decision == "allow"


def test_a_shadow_rule_on_a_field_it_cannot_read_only_reports_it(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        "authority:\n  rules:\n    - {scope: '*', deny: [refund.issue], mode: shadow,"
        " when: {json: {amount: {gt: 5000}}}}\n",
    )
    verdict = decide(policy, raw(b'{"amount": NaN}'))
    assert (verdict.decision, verdict.reason_code) == ("would_deny", "bad_request")


def test_requires_same_on_a_field_it_cannot_read_refuses_and_keeps_no_fact(tmp_path: Path) -> None:
    """A lookup of `customer=c-1&customer=c-2` must leave no fact a later refund of either
    could match: which customer the server looked up cannot be told."""
    policy = policy_from(tmp_path, RULES)
    twice = raw(b"customer=c-1&customer=c-2", FORM)
    assert facts_of(policy.authority, "crm.read", twice) == []
    assert facts_of(policy.authority, "crm.read", raw(b"customer=c-1", FORM)) == [
        ("json.customer", "c-1")
    ]
    verdict = decide(policy, raw(b"amount=1&customer=c-1&customer=c-2", FORM))
    assert verdict.reason_code == "bad_request" and "json.customer" in (verdict.reason or "")


# --- the proxy, replay and explain decide alike -------------------------------------------

AGENT = "identity:\n  agent: [{value: support-1}]\n  run: [{header: X-Run}]\n"
POLICY = (
    "".join(line for line in ACTIONS.splitlines(keepends=True) if "refund.big" not in line)
    + AGENT
    + """
authority:
  rules:
    - {scope: "*", deny: [refund.issue], when: {json: {amount: {gt: 5000}}}}
    - {scope: "*", deny: [refund.issue], when: {query: {account: acct_frozen}}}
    - {scope: "*", deny: [llm], when: {model: {in: [gpt-4o]}}}
"""
)
JSON = "application/json"
QP_CHAT = (b'{"model":"gpt-4o","pad":"=22,=22model=22:=22gpt-4o-mini=22,=22z=22:=22",'
           b'"messages":[{"role":"user","content":"qp"}],"max_tokens":10}')  # fmt: skip
# (url, body, Content-Type, Content-Encoding, the status enforce answers)
CALLS = [
    ("api.stripe.com/v1/refunds", b'{"amount": 100}', JSON, None, 200),
    ("api.stripe.com/v1/refunds", b'{"amount": 10000}', JSON, None, 403),
    ("api.stripe.com/v1/refunds", b'{"amount": 10000, "memo": "caf\xe9"}', JSON, None, 400),
    ("api.stripe.com/v1/refunds", b'{"amount": 10000,}', JSON, None, 400),
    ("api.stripe.com/v1/refunds", b'{"amount": NaN}', JSON, None, 400),
    ("api.stripe.com/v1/refunds", b'{"amount": 10000}', FORM, None, 400),
    ("api.stripe.com/v1/refunds", b"amount=10000&amount=1", FORM, None, 400),
    ("api.stripe.com/v1/refunds?account=ok&account=acct_frozen", b'{"amount": 1}', JSON, None, 400),
    ("api.stripe.com/v1/refunds", gzip.compress(b'{"amount": 10000}'), JSON, "x-gzip", 403),
    ("api.stripe.com/v1/refunds", gzip.compress(b'{"amount": 100}'), JSON, "gzip", 200),
    ("api.stripe.com/v1/refunds", b'{"amount": 10000}', JSON, "quopri", 400),
    ("api.stripe.com/v1/refunds", gzip.compress(gzip.compress(b"{}")), JSON, "gzip, gzip", 400),
    ("api.openai.com/v1/chat/completions", QP_CHAT, JSON, "quopri", 400),
]
ANSWER = json.dumps(
    {"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                  "finish_reason": "stop"}],
     "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}
).encode()  # fmt: skip


def record(tmp_path: Path, policy_text: str) -> tuple[Path, list[int], list[bytes]]:
    """CALLS through the real addon, each forwarded one answered 200; the ledger, the status
    each got and the bodies forwarded."""
    from drawdown.addon import Drawdown
    from mitmproxy import http
    from mitmproxy.test import tflow, tutils

    from tests.support.addon_harness import drive

    statuses: list[int] = []
    forwarded: list[bytes] = []

    async def steps(addon: Drawdown) -> None:
        for i, (url, body, content_type, coding, _) in enumerate(CALLS):
            host, _, path = url.partition("/")
            headers = [(b"content-type", content_type.encode()), (b"x-run", f"r{i}".encode())]
            if coding is not None:
                headers.append((b"content-encoding", coding.encode()))
            request = tutils.treq(
                host=host, port=443, scheme=b"https", method=b"POST", path=b"/" + path.encode(),
                headers=http.Headers(headers), content=body,
            )  # fmt: skip
            flow = tflow.tflow(req=request)
            addon.requestheaders(flow)
            await addon.request(flow)
            if flow.response is None:  # forwarded: the upstream says yes
                forwarded.append(flow.request.raw_content or b"")
                flow.response = tutils.tresp(status_code=200, content=ANSWER)
                addon.responseheaders(flow)
                await addon.response(flow)
            statuses.append(flow.response.status_code)

    return drive(tmp_path, policy_text, steps), statuses, forwarded


def test_the_proxy_replay_and_explain_refuse_what_cannot_be_read_alike(tmp_path: Path) -> None:
    db, statuses, forwarded = record(tmp_path, POLICY)
    assert statuses == [c[4] for c in CALLS]
    assert forwarded == [CALLS[0][1], CALLS[9][1]]  # as sent: drawdown decodes only to read
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT reason_code, reason FROM decisions ORDER BY ts, id").fetchall()
    refused = [reason for code, reason in rows if code == "bad_request"]
    assert len(refused) == sum(c[4] == 400 for c in CALLS) == 9
    assert "'quopri' is no HTTP content coding" in refused[-1]  # the LLM call's
    same = replay.replay(policy_from(tmp_path, POLICY, "same.yaml"), str(db))
    assert same["changed"] == 0, same["blocked"]
    # Without the rules that read the body, only what could not be decoded stays refused.
    lenient = POLICY.split("authority:")[0]
    data = replay.replay(policy_from(tmp_path, lenient, "lenient.yaml"), str(db))
    undecodable = [r for r in refused if "Content-Encoding" in r]
    assert [b["reason"] for b in data["blocked"]] == undecodable and len(undecodable) == 3
    # explain, given the same requests (its body in the clear), says the same.
    policy = policy_from(tmp_path, POLICY, "explain.yaml")
    for url, body, content_type, coding, status in CALLS:
        if coding in ("gzip", "x-gzip"):
            continue  # explain takes a body decoded
        headers = [("Content-Type", content_type)] + (
            [("Content-Encoding", coding)] if coding else []
        )
        out = explain(policy, url=url, method="POST", headers=headers, body=body)
        assert out.decision == ("allow" if status == 200 else "deny"), (url, body, out.text())
        assert (status == 400) == out.reason.startswith("bad_request (400)"), out.text()


def test_shadow_mode_forwards_what_it_cannot_read_and_replay_knows_it(tmp_path: Path) -> None:
    db, statuses, forwarded = record(tmp_path, "mode: shadow\n" + POLICY)
    assert statuses == [200] * len(CALLS) and len(forwarded) == len(CALLS)
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT decision, reason_code FROM decisions ORDER BY ts, id"
        ).fetchall()
    assert [r for r in rows if r[1] == "bad_request"] == [("would_deny", "bad_request")] * 9
    # Replayed under the policy enforced, the shadow ledger is refused where enforce refuses.
    data = replay.replay(policy_from(tmp_path, POLICY, "enforce.yaml"), str(db))
    assert [b["status"] for b in data["blocked"]] == [c[4] for c in CALLS if c[4] != 200]
