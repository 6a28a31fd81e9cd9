"""`drawdown explain` predicts what the proxy does with the same request.

Each test sends requests through the real addon (mitmproxy's test flows, its own ledger) and
asks explain about the same requests: the decision, the status and the scope must agree. The
cases are the gaps an audit of explain against a live proxy found: a JSON-RPC batch counted
as one request, `limits.max_request_bytes` ignored, `X-Drawdown-*` headers read by rules the
proxy strips them before, a repeated header read otherwise than mitmproxy folds it, the agent
an authenticated proxy user names, and a form-encoded body explain could not describe.
"""

from __future__ import annotations

import asyncio
import binascii
import gzip
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from drawdown.cli import main
from drawdown.explain import Explanation, explain

from tests.support.policies import policy_from

FORM = "application/x-www-form-urlencoded"


@dataclass
class Call:
    url: str
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    coding: str | None = None  # sent compressed so; explain is given the body decoded


@dataclass
class Live:
    status: int  # 200: forwarded (the stand-in upstream said yes)
    reason: str | None  # X-Drawdown-Reason of a refusal
    scope: str | None  # the decision row's, None when no row was written (a 407)


def _basic(user: str, password: str) -> str:
    return "Basic " + binascii.b2a_base64(f"{user}:{password}".encode(), newline=False).decode()


def live(tmp_path: Path, policy_text: str, calls: list[Call], proxyauth: str = "") -> list[Live]:
    """`calls` through the drawdown addon (and mitmproxy's ProxyAuth before it, as in `drawdown
    run`), each forwarded one answered 200 with `{}`."""
    from drawdown.addon import Drawdown
    from mitmproxy import http
    from mitmproxy.addons.proxyauth import ProxyAuth
    from mitmproxy.test import taddons, tflow, tutils

    policy = tmp_path / "live.yaml"
    policy.write_text(policy_text)
    db = tmp_path / "live.db"
    answers: list[tuple[int, str | None]] = []

    async def run() -> None:
        auth, addon = ProxyAuth(), Drawdown()
        with taddons.context(auth, addon) as tctx:
            if proxyauth:
                tctx.configure(auth, proxyauth=proxyauth)
            tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(db))
            for call in calls:
                scheme, _, rest = call.url.partition("://")
                host, _, path = rest.partition("/")
                body = call.body
                headers = [(k.encode(), v.encode()) for k, v in call.headers]
                if call.coding is not None:
                    body = gzip.compress(body)
                    headers.append((b"content-encoding", call.coding.encode()))
                request = tutils.treq(
                    host=host, port=443 if scheme == "https" else 80, scheme=scheme.encode(),
                    method=call.method.encode(), path=b"/" + path.encode(),
                    headers=http.Headers(headers), content=body,
                )  # fmt: skip
                flow = tflow.tflow(req=request)
                auth.requestheaders(flow)  # mitmproxy's own addons come before drawdown
                addon.requestheaders(flow)
                await addon.request(flow)
                if flow.response is None:
                    flow.response = tutils.tresp(status_code=200, content=b"{}")
                    addon.responseheaders(flow)
                    await addon.response(flow)
                answer = flow.response
                # An MCP client is refused in a JSON-RPC error (HTTP 200): its status rides along.
                status = int(answer.headers.get("x-drawdown-status", answer.status_code))
                answers.append((status, answer.headers.get("x-drawdown-reason")))
            addon.done()

    asyncio.run(run())
    with sqlite3.connect(db) as conn:
        scopes = [row[0] for row in conn.execute("SELECT scope FROM decisions ORDER BY ts, id")]
    found, rows = [], iter(scopes)
    for status, reason in answers:
        found.append(Live(status, reason, None if status == 407 else next(rows)))
    return found


def said(explained: Explanation) -> tuple[str, int | None]:
    """(decision, status) as explain words them: `deny` and the status in its reason."""
    status = None
    for word in explained.reason.replace("(", " ").replace(")", " ").split():
        if word.isdigit() and len(word) == 3:
            status = int(word)
            break
    return explained.decision, status


def agree(found: Live, explained: Explanation) -> None:
    decision, status = said(explained)
    if found.status == 200:
        assert decision == "allow", explained.text()
    else:
        assert (decision, status) == ("deny", found.status), (found, explained.text())
        if found.reason and found.reason != "budget_exhausted":  # explain names the budget
            assert explained.reason.startswith(found.reason), (found, explained.text())
    if found.scope is not None:
        assert explained.data["scope"] == found.scope, (found, explained.text())


def ask(tmp_path: Path, policy_text: str, call: Call, **more: Any) -> Explanation:
    policy = policy_from(tmp_path, policy_text, "explain.yaml")
    headers = list(call.headers) + ([("Content-Encoding", call.coding)] if call.coding else [])
    return explain(
        policy, url=call.url, method=call.method, headers=headers, body=call.body, **more
    )


# --- M1: a JSON-RPC batch is as many requests as it has calls --------------------------------

MCP = """
identity:
  agent: [{value: research}]
  run: [{header: X-Drawdown-Run}]
actions:
  - {kind: mcp.docs, provider: mcp, match: {host: mcp.example.com, path: /docs/mcp}, cost: {usd: 0.01}}
budgets:
  - {name: searches, scope: "agent:*/run:*", actions: [mcp.docs.search_docs], requests: 2}
"""


def _rpc(*tools: str) -> bytes:
    calls = [
        {"jsonrpc": "2.0", "id": i, "method": "tools/call",
         "params": {"name": tool, "arguments": {"query": "q"}}}
        for i, tool in enumerate(tools, 1)
    ]  # fmt: skip
    return json.dumps(calls).encode()


def test_explain_counts_each_call_of_a_json_rpc_batch_as_the_proxy_does(tmp_path: Path) -> None:
    """explain counted a batch of three search_docs calls as one request, and allowed it under a
    budget of two requests; the proxy reserves one request per call, and refuses it (402)."""
    headers = (("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream"))  # fmt: skip
    three = Call("https://mcp.example.com/docs/mcp", headers=(*headers, ("X-Drawdown-Run", "b1")),
                 body=_rpc("search_docs", "search_docs", "search_docs"))  # fmt: skip
    two = Call("https://mcp.example.com/docs/mcp", headers=(*headers, ("X-Drawdown-Run", "b2")),
               body=_rpc("search_docs", "search_docs"))  # fmt: skip
    found = live(tmp_path, MCP, [three, two])
    assert [f.status for f in found] == [402, 200]
    for call, result in zip((three, two), found, strict=True):
        explained = ask(tmp_path, MCP, call)
        agree(result, explained)
    assert ask(tmp_path, MCP, three).data["estimate"]["requests"] == 3


# --- M2: limits.max_request_bytes --------------------------------------------------------------

LIMITED = """
identity:
  agent: [{value: a}]
  run: [{value: r}]
unknown_hosts: allow
actions:
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}, cost: {usd: 0.01}}
limits:
  max_request_bytes: 400
"""


def test_explain_refuses_a_body_past_max_request_bytes_as_the_proxy_does(tmp_path: Path) -> None:
    """explain said allow for a body the proxy refuses with 413 body_too_large, compressed or
    not (a compressed body counts at its decoded size); a host no action names is no concern."""
    big = json.dumps({"amount": 1, "memo": "x" * 500}).encode()
    small = json.dumps({"amount": 1}).encode()
    json_type = (("Content-Type", "application/json"),)
    calls = [
        Call("https://api.stripe.com/v1/refunds", headers=json_type, body=big),
        Call("https://api.stripe.com/v1/refunds", headers=json_type, body=big, coding="gzip"),
        Call("https://api.stripe.com/v1/refunds", headers=json_type, body=small),
        Call("https://files.example.com/upload", headers=json_type, body=big),
    ]
    found = live(tmp_path, LIMITED, calls)
    assert [f.status for f in found] == [413, 413, 200, 200]
    for call, result in zip(calls, found, strict=True):
        agree(result, ask(tmp_path, LIMITED, call))
    plain, compressed = (ask(tmp_path, LIMITED, c) for c in calls[:2])
    assert ["body", f"the request body is {len(big)} bytes, more than this proxy accepts "
            "(limits.max_request_bytes: 400)"] in plain.as_dict()["steps"]  # fmt: skip
    assert any("decodes to over 400 bytes" in text for _, text in compressed.steps)
    shadow = ask(tmp_path, "mode: shadow\n" + LIMITED, calls[0])
    assert (shadow.decision, shadow.reason) == ("would_deny", "body_too_large (413)")


# --- M3 and L2: the headers rules read are the ones the proxy leaves ---------------------------

HEADERS = """
identity:
  agent: [{header: X-Drawdown-Agent}, {value: a}]
  run: [{value: r}]
actions:
  - {kind: crm.read, match: {host: crm.example.com, method: GET}, cost: {usd: 0.002}}
  - {kind: crm.write, match: {host: crm.example.com}, cost: {usd: 0.002}}
authority:
  rules:
    - {name: env, scope: "*", action: crm.write, when: {header: {X-Env: {eq: prod}}}}
"""


def test_explain_reads_no_x_drawdown_header_the_proxy_strips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy removes X-Drawdown-* headers (and Proxy-Authorization) before any rule reads
    them: a `when` on one never holds there, and explain said it held. `check` now refuses
    such a condition; to load the policy an older check accepted, that refusal is turned off
    here (the proxy and explain load it alike)."""
    from drawdown.policy import schema

    monkeypatch.setattr(schema, "stripped_header", lambda name: False, raising=False)
    policy = HEADERS.replace(
        "authority:\n  rules:\n",
        "authority:\n  rules:\n"
        '    - {name: tier, scope: "*", action: crm.read, when: {header: {X-Drawdown-Tier: {eq: gold}}}}\n'
        '    - {name: auth, scope: "*", action: crm.read, when: {header: {Proxy-Authorization: {regex: "."}}}}\n',
    )
    call = Call("https://crm.example.com/x", method="GET",
                headers=(("X-Drawdown-Agent", "bot"), ("X-Drawdown-Tier", "gold"),
                         ("Proxy-Authorization", _basic("bob", "pw"))))  # fmt: skip
    (found,) = live(tmp_path, policy, [call])
    assert found.status == 403
    assert found.scope == "tenant:default/agent:bot/run:r"  # the agent still named
    explained = ask(tmp_path, policy, call)
    agree(found, explained)
    assert "rule 'tier'" in explained.reason, explained.text()


@pytest.mark.parametrize("order", [("dev", "prod"), ("prod", "dev")])
def test_explain_folds_a_header_given_twice_as_the_proxy_does(
    tmp_path: Path, order: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """mitmproxy reads a header given twice as "dev, prod", which `eq: prod` refuses in either
    order; explain kept the last --header, so it allowed one order and refused the other."""
    call = Call("https://crm.example.com/x", body=b'{"a": 1}',
                headers=(("X-Env", order[0]), ("X-Env", order[1]),
                         ("Content-Type", "application/json")))  # fmt: skip
    (found,) = live(tmp_path, HEADERS, [call])
    assert found.status == 403
    agree(found, ask(tmp_path, HEADERS, call))
    policy = tmp_path / "cli.yaml"
    policy.write_text(HEADERS)
    args = ["explain", "--policy", str(policy), "--url", call.url, "--json", '{"a": 1}',
            "--header", f"X-Env:{order[0]}", "--header", f"X-Env:{order[1]}", "--as-json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision"] == "deny" and out["reason"].startswith("not_authorized (403)")


# --- M5: proxyauth: the authenticated user is the agent ----------------------------------------

PROXY_USER = """
identity:
  agent: [{header: X-Drawdown-Agent}, {proxy_user: true}, {value: anon}]
  run: [{header: X-Drawdown-Run}, {proxy_password: true}, {value: r}]
actions:
  - {kind: crm.read, match: {host: crm.example.com}, cost: {usd: 0.002}}
budgets:
  - {name: per-run, scope: "agent:*/run:*", requests: 2}
"""


@pytest.mark.parametrize(
    ("proxyauth", "flag", "scope"),
    [
        # Credentials checked: the user is the agent, whatever X-Drawdown-Agent says, and the
        # password is a secret, never a run id.
        ("bob:secret", ["--proxyauth"], "tenant:default/agent:bob/run:r"),
        # proxyauth=any: the user is still the agent; the password may name the run.
        ("any", ["--proxyauth", "any"], "tenant:default/agent:bob/run:secret"),
        # No proxyauth: the policy's order decides, and the header comes first.
        ("", [], "tenant:default/agent:evil/run:secret"),
    ],
)
def test_explain_takes_the_agent_from_the_authenticated_proxy_user(
    tmp_path: Path,
    proxyauth: str,
    flag: list[str],
    scope: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under proxyauth the proxy charged agent:bob; explain --proxy-user bob showed agent:evil
    from the header and allowed the third call the proxy refuses (402)."""
    call = Call("https://crm.example.com/1", method="GET",
                headers=(("X-Drawdown-Agent", "evil"),
                         ("Proxy-Authorization", _basic("bob", "secret"))))  # fmt: skip
    found = live(tmp_path, PROXY_USER, [call] * 3, proxyauth=proxyauth)
    assert [f.status for f in found] == [200, 200, 402]
    assert {f.scope for f in found} == {scope}
    policy = tmp_path / "cli.yaml"
    policy.write_text(PROXY_USER)
    args = ["explain", "--policy", str(policy), "--url", call.url, "--header",
            "X-Drawdown-Agent:evil", "--proxy-user", "bob", "--proxy-password", "secret",
            *flag, "--as-json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scope"] == scope and out["decision"] == "allow"
    if proxyauth:
        assert any("authenticated proxy user" in text for _, text in out["steps"])


def test_explain_under_proxyauth_without_credentials_says_407(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mitmproxy answers 407 to a request without proxy credentials under proxyauth, before
    drawdown sees it (even in shadow mode)."""
    call = Call("https://crm.example.com/1", method="GET")
    (found,) = live(tmp_path, "mode: shadow\n" + PROXY_USER, [call], proxyauth="bob:secret")
    assert found.status == 407
    policy = tmp_path / "cli.yaml"
    policy.write_text("mode: shadow\n" + PROXY_USER)
    args = ["explain", "--policy", str(policy), "--url", call.url, "--proxyauth", "--as-json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision"] == "deny" and out["reason"].startswith("proxy_auth_required (407)")


# --- M6: a form-encoded body -------------------------------------------------------------------

STRIPE = """
identity:
  agent: [{value: a}]
  run: [{value: r}]
actions:
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}, cost: {usd: 0.01}}
authority:
  rules:
    - {name: small, scope: "*", action: refund.issue, when: {json: {amount: {lte: 5000}}}}
"""


@pytest.mark.parametrize(("amount", "status"), [(9000, 403), (100, 200)])
def test_explain_takes_a_form_encoded_body_as_curl_d_sends_it(
    tmp_path: Path, amount: int, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stripe's API takes form-encoded bodies, which the proxy reads for `json.*` conditions;
    explain could only build JSON or a multipart form (400 bad_request either way)."""
    data = f"amount={amount}&currency=usd"
    call = Call("https://api.stripe.com/v1/refunds", headers=(("Content-Type", FORM),),
                body=data.encode())  # fmt: skip
    (found,) = live(tmp_path, STRIPE, [call])
    assert found.status == status
    policy = tmp_path / "cli.yaml"
    policy.write_text(STRIPE)
    args = ["explain", "--policy", str(policy), "--url", call.url, "--data", data, "--as-json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision"] == ("allow" if status == 200 else "deny"), out
    assert status == 200 or out["reason"].startswith("not_authorized (403)")
    # A --header Content-Type wins, as with curl -d: JSON sent as a form is unreadable (400).
    assert main([*args, "--header", "Content-Type:application/json"]) == 0
    assert json.loads(capsys.readouterr().out)["reason"].startswith("bad_request (400)")
    assert main([*args, "--json", "{}"]) == 2
    assert "two kinds of body" in capsys.readouterr().err


# --- a shadow policy blocks nothing, whatever a budget's own mode says ---------------------

SHADOW_BUDGET = """
mode: shadow
identity:
  agent: [{value: a}]
  run: [{value: r}]
actions:
  - {kind: crm.read, match: {host: crm.example.com}, cost: {usd: 0.01}}
budgets:
  - {scope: "agent:*/run:*", requests: 1, mode: enforce}
"""


def test_a_shadow_policy_blocks_nothing_though_a_budget_says_enforce(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The budget's `mode: enforce` refused the second call (402) under a shadow policy and
    under `--mode shadow`, while a rule so marked only recorded would_deny, and explain said
    would_deny: shadow mode blocks nothing. `check` says the budget's mode has no effect."""
    call = Call("https://crm.example.com/1", method="GET")
    found = live(tmp_path, SHADOW_BUDGET, [call, call])
    assert [f.status for f in found] == [200, 200]
    with sqlite3.connect(tmp_path / "live.db") as conn:
        rows = conn.execute("SELECT decision FROM decisions ORDER BY ts, id").fetchall()
    assert rows == [("allow",), ("would_deny",)]
    policy = tmp_path / "check.yaml"
    policy.write_text(SHADOW_BUDGET)
    assert main(["check", str(policy)]) == 0
    out = capsys.readouterr()
    assert f"{policy}:9: warning: mode: enforce on this budget has no effect" in out.out + out.err
