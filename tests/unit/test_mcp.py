"""The MCP path (SPEC §3, §5, §6) without a proxy: JSON-RPC batches authorized and charged per
call, unreadable bodies refused with a JSON-RPC error, a failed call (JSON-RPC error or a
tool result marked isError, answered as JSON or as an event stream) meeting no `requires`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from drawdown import addon as addon_module
from drawdown.addon import STATE, Drawdown
from drawdown.classify import RequestView, classify
from drawdown.policy import load_policy
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from tests.support.addon_harness import drive as drive_addon

POLICY = """
identity:
  agent: [{value: research}]
  run: [{value: r1}]
actions:
  - {kind: mcp.docs, provider: mcp, match: {host: mcp.example.com, path: /docs/mcp}}
authority:
  default: allow
  rules:
    - {scope: "*", deny: [mcp.docs.get_page], when: {json: {params.arguments.page_id: {eq: secret}}}}
    - {scope: "*", deny: [mcp.docs], when: {json: {method: {eq: resources/read}}}}
    - {scope: "*", action: mcp.docs.delete_page,
       requires: [{action: mcp.docs.get_page, same: json.params.arguments.page_id}]}
budgets:
  - {scope: "agent:*/run:*", actions: [mcp.docs.search_docs], requests: 2}
"""
JSON = ((b"content-type", b"application/json"),)
SSE = ((b"content-type", b"text/event-stream"),)


def call(rpc_id: int, tool: str, **arguments: Any) -> dict[str, Any]:
    params = {"name": tool, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call", "params": params}


def post(body: Any) -> http.HTTPFlow:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = tutils.treq(
        host="mcp.example.com", port=443, scheme=b"https", method=b"POST", path=b"/docs/mcp",
        headers=http.Headers(JSON), content=content,
    )  # fmt: skip
    return tflow.tflow(req=request)


def drive(
    tmp_path: Path, steps: Callable[[Drawdown], Awaitable[None]], policy: str = POLICY
) -> Path:
    return drive_addon(tmp_path, policy, steps)


async def decide(addon: Drawdown, flow: http.HTTPFlow) -> http.HTTPFlow:
    addon.requestheaders(flow)
    await addon.request(flow)
    return flow


def decisions(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT action, decision, reason_code, status FROM decisions ORDER BY id"
        ).fetchall()


# --- batches ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch",
    [
        [call(1, "get_page", page_id="secret")],  # the condition reads the call, not the array
        [call(1, "search_docs", query="a"), call(2, "get_page", page_id="secret")],
        # A message beside a tool call is authorized too, as the kind it is (mcp.docs).
        [
            call(1, "search_docs", query="a"),
            {"jsonrpc": "2.0", "id": 2, "method": "resources/read"},
        ],
    ],
)
def test_each_message_of_a_jsonrpc_batch_is_authorized_on_its_own(
    tmp_path: Path, batch: list[dict[str, Any]]
) -> None:
    """A batch was authorized as a whole: `json.params.arguments.*` read the array (no such
    field), so a deny `when` on a tool's arguments, or any rule on a non-tool message beside
    a tool call, let the call through to a server that takes batches (MCP 2025-03-26)."""
    answers: list[http.Response | None] = []

    async def steps(addon: Drawdown) -> None:
        flow = await decide(addon, post(batch))
        answers.append(flow.response)

    db = drive(tmp_path, steps)
    (answer,) = answers
    assert answer is not None, "the batch was forwarded"
    errors = json.loads(answer.content)
    assert [e["id"] for e in errors] == [m["id"] for m in batch]  # every call gets its error
    assert {e["error"]["data"]["reason"] for e in errors} == {"not_authorized"}
    assert [row[1:] for row in decisions(db)] == [("deny", "not_authorized", 403)]


def test_a_batch_is_charged_to_the_budgets_of_every_tool_it_calls(tmp_path: Path) -> None:
    """Only the first tool call's kind was charged: three searches behind a get_page went
    past a search budget of 2 without touching it."""
    answers: list[http.Response | None] = []

    async def steps(addon: Drawdown) -> None:
        batch = [call(1, "get_page", page_id="p")] + [
            call(i, "search_docs", query=str(i)) for i in (2, 3, 4)
        ]
        flow = await decide(addon, post(batch))
        answers.append(flow.response)

    db = drive(tmp_path, steps)
    (answer,) = answers
    assert answer is not None, "the batch was forwarded"
    assert {e["error"]["data"]["reason"] for e in json.loads(answer.content)} == {
        "budget_exhausted"
    }
    assert [row[1:] for row in decisions(db)] == [("deny", "budget_exhausted", 402)]


def test_a_batch_leaves_a_fact_for_each_call_that_a_later_requires_can_find(
    tmp_path: Path,
) -> None:
    """The fact of a successful batch was its first call's, with fields read from the array:
    `same: json.params.arguments.page_id` found nothing, and a page the batch read did not
    count as read."""
    answers: list[http.Response | None] = []

    async def steps(addon: Drawdown) -> None:
        batch = [call(1, "search_docs", query="q"), call(2, "get_page", page_id="intro")]
        flow = await decide(addon, post(batch))
        assert flow.response is None
        results = [{"jsonrpc": "2.0", "id": i, "result": {"content": []}} for i in (1, 2)]
        flow.response = tutils.tresp(
            content=json.dumps(results).encode(), headers=http.Headers(JSON)
        )
        addon.responseheaders(flow)
        await addon.response(flow)
        delete = await decide(addon, post(call(3, "delete_page", page_id="intro")))
        answers.append(delete.response)

    drive(tmp_path, steps)
    assert answers == [None]  # the delete went on: the batch read that page


def test_the_loop_guard_sees_every_tool_of_a_batch(tmp_path: Path) -> None:
    """The guards were chosen by the batch's first kind: a loop guard on search_docs never
    looked at a batch that led with a get_page, however often it was sent."""
    unbudgeted = POLICY.split("budgets:")[0]  # its search budget would refuse the batch too
    guarded = (
        unbudgeted
        + "anomalies:\n  loop: {repeats: 1, on_detect: deny, actions: [mcp.docs.search_docs]}\n"
    )
    answers: list[http.Response | None] = []

    async def steps(addon: Drawdown) -> None:
        for _ in range(2):
            batch = [call(1, "get_page", page_id="p"), call(2, "search_docs", query="q")]
            answers.append((await decide(addon, post(batch))).response)

    db = drive(tmp_path, steps, guarded)
    assert answers[0] is None, "the first batch was forwarded"
    assert answers[1] is not None and answers[1].status_code == 200  # JSON-RPC errors, per call
    assert {e["error"]["data"]["reason"] for e in json.loads(answers[1].content)} == {"anomaly"}
    assert [row[1:3] for row in decisions(db)] == [("allow", None), ("deny", "anomaly")]


# --- bodies that are no JSON-RPC ------------------------------------------------------------

DEEP = (
    b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_page", '
    b'"arguments": {"page_id": "secret", "pad": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}}"
)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", -32700),
        (b"", -32700),
        (DEEP, -32700),  # too deep for Python's parser, not for every server's
        (b"42", -32600),
        (b"[]", -32600),
        (b'[1, {"jsonrpc": "2.0", "method": "notifications/initialized"}]', -32600),
    ],
)
def test_an_unreadable_mcp_body_is_refused_with_a_jsonrpc_error(
    tmp_path: Path, body: bytes, code: int
) -> None:
    """Such a body went on as the bare kind mcp.docs: a server that can read it (a tools/call
    nested deeper than Python parses) ran a tool no rule about that tool ever saw."""
    answers: list[http.Response | None] = []

    async def steps(addon: Drawdown) -> None:
        flow = await decide(addon, post(body))
        answers.append(flow.response)

    db = drive(tmp_path, steps)
    (answer,) = answers
    assert answer is not None, "the body was forwarded"
    assert answer.status_code == 400 and answer.headers["x-drawdown-reason"] == "bad_request"
    error = json.loads(answer.content)
    assert error["jsonrpc"] == "2.0" and error["id"] is None and error["error"]["code"] == code
    assert error["error"]["message"].startswith("drawdown: cannot read this MCP request")
    assert decisions(db) == [("mcp.docs", "deny", "bad_request", 400)]


def test_shadow_mode_forwards_an_unreadable_mcp_body_as_would_deny(tmp_path: Path) -> None:
    answers: list[http.Response | None] = []

    async def steps(addon: Drawdown) -> None:
        flow = await decide(addon, post(b"{not json"))
        answers.append(flow.response)
        flow.response = tutils.tresp(status_code=400, content=b"{}", headers=http.Headers(JSON))
        await addon.response(flow)

    db = drive(tmp_path, steps, "mode: shadow\n" + POLICY)
    assert answers == [None]
    assert decisions(db) == [("mcp.docs", "would_deny", "bad_request", 400)]


def test_a_response_the_client_sends_is_not_answered_as_an_error_for_its_id(
    tmp_path: Path,
) -> None:
    """A client's JSON-RPC response (to a server's sampling or elicitation request) carries
    the server's id: a denial of it was a JSON-RPC error with that id, which a client matches
    to a request of its own with the same id. It gets the plain HTTP error instead."""
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy(tmp_path / "p.yaml")

    def ids(message: dict[str, Any]) -> list[Any]:
        body = json.dumps(message).encode()
        view = RequestView("POST", "mcp.example.com", 443, "/docs/mcp", body=body)
        return classify(policy, view).jsonrpc_ids

    assert ids({"jsonrpc": "2.0", "id": 3, "result": {}}) == []
    assert ids({"jsonrpc": "2.0", "id": 3, "error": {"code": -1, "message": "declined"}}) == []
    assert ids({"jsonrpc": "2.0", "id": 4, "method": "ping"}) == [4]


# --- did the call succeed? ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "answer"),
    [
        (JSON, b'{"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": true}}'),
        (
            SSE,
            b'event: message\ndata: {"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "no"}}\n\n',
        ),
        (
            SSE,
            b'event: message\r\ndata: {"jsonrpc": "2.0", "id": 1, "result": {"isError": true}}\r\n\r\n',
        ),
        (SSE, b"event: message\ndata: \n\n"),  # the stream ended without an answer
    ],
)
def test_a_failed_lookup_meets_no_requirement(
    tmp_path: Path, content_type: tuple[tuple[bytes, bytes], ...], answer: bytes
) -> None:
    """Only a JSON answer was read for a JSON-RPC error; the official SDK's servers answer as
    event streams, and a tool's own failure (isError) was never looked at."""
    answers: list[http.Response | None] = []

    async def steps(addon: Drawdown) -> None:
        flow = await decide(addon, post(call(1, "get_page", page_id="missing")))
        assert flow.response is None
        flow.response = tutils.tresp(content=b"", headers=http.Headers(content_type))
        addon.responseheaders(flow)
        if callable(flow.response.stream):  # fed in awkward pieces, as a stream comes
            for i in range(0, len(answer), 7):
                assert flow.response.stream(answer[i : i + 7]) == answer[i : i + 7]
            flow.response.stream(b"")
        else:
            flow.response.content = answer
        await addon.response(flow)
        assert flow.metadata[STATE].settled
        delete = await decide(addon, post(call(2, "delete_page", page_id="missing")))
        answers.append(delete.response)

    db = drive(tmp_path, steps)
    (refusal,) = answers
    assert refusal is not None, "the delete went on after a failed lookup"
    assert json.loads(refusal.content)["error"]["data"]["reason"] == "requires_unmet"
    assert [row[1] for row in decisions(db)] == ["allow", "deny"]


def test_the_event_scanner_finds_the_answer_among_other_events() -> None:
    McpEventScanner = addon_module.McpEventScanner
    scanner = McpEventScanner()
    stream = (
        b"id: 1\ndata:\n\n"  # a priming event
        b'event: message\ndata: {"jsonrpc": "2.0", "method": "notifications/progress"}\n\n'
        b'event: message\ndata: {"jsonrpc": "2.0", "id": 9, "method": "elicitation/create"}\n\n'
        b'event: message\r\ndata: {"jsonrpc": "2.0", "id": 1,\r\ndata:  "result": {"content": []}}\r\n\r\n'
    )
    for i in range(len(stream)):  # a byte at a time: a CRLF split between chunks included
        scanner.feed(stream[i : i + 1])
    assert scanner.succeeded
    unreadable = McpEventScanner()
    unreadable.feed(b"data: {\n\n")
    assert not unreadable.succeeded
    huge = McpEventScanner()
    huge.feed(b"data: " + b"x" * (McpEventScanner.MAX_EVENT_BYTES + 1))
    assert huge.failed  # the SDK's client refuses such an event too
