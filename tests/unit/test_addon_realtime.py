"""The addon's Realtime hooks without a proxy: a WebSocket flow through requestheaders,
request and response, then its messages through websocket_message and websocket_end."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from drawdown import replay
from drawdown.addon import Drawdown
from mitmproxy import command, ctx, http
from mitmproxy import flow as mitmflow
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from tests.support.addon_harness import drive
from tests.support.policies import policy_from

POLICY = """
mode: enforce
on_ledger_error: {on_error}
identity:
  agent: [{{value: voice}}]
  run: [{{value: r1}}]
actions:
  - {{kind: llm, provider: openai, match: {{host: api.openai.com}}}}
budgets:
  - {{scope: "agent:*/run:*", usd: 5}}
"""

USAGE = {"input_tokens": 100, "output_tokens": 10}


class Injector:
    """Stands in for mitmproxy's proxyserver: what drawdown sends the agent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    @command.command("inject.websocket")
    def inject_websocket(
        self, flow: mitmflow.Flow, to_client: bool, message: bytes, is_text: bool = True
    ) -> None:
        assert to_client and is_text
        self.sent.append(json.loads(message))


async def session(addon: Drawdown) -> http.HTTPFlow:
    flow = tflow.twebsocketflow()
    flow.websocket.messages.clear()
    flow.request.host, flow.request.port, flow.request.scheme = "api.openai.com", 443, "https"
    flow.request.path = "/v1/realtime?model=gpt-realtime"
    response, flow.response = flow.response, None
    addon.requestheaders(flow)
    await addon.request(flow)
    assert flow.response is None  # decided: forwarded
    flow.response = response
    await addon.response(flow)
    return flow


async def send(
    addon: Drawdown, flow: http.HTTPFlow, event: dict[str, Any], *, from_client: bool
) -> WebSocketMessage:
    message = WebSocketMessage(Opcode.TEXT, from_client, json.dumps(event).encode())
    flow.websocket.messages.append(message)
    await addon.websocket_message(flow)
    return message


def test_a_session_keeps_only_the_message_at_hand(tmp_path: Path) -> None:
    async def steps(addon: Drawdown) -> None:
        flow = await session(addon)
        for _ in range(50):
            audio = {"type": "input_audio_buffer.append", "audio": "AAAA" * 1000}
            await send(addon, flow, audio, from_client=True)
        assert len(flow.websocket.messages) == 1
        await send(addon, flow, {"type": "response.create"}, from_client=True)
        done = {"type": "response.done", "response": {"status": "completed", "usage": USAGE}}
        await send(addon, flow, done, from_client=False)
        assert len(flow.websocket.messages) == 1

    db = drive(tmp_path, POLICY.format(on_error="deny"), steps)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status, tokens_in FROM decisions ORDER BY ts").fetchall()
    assert rows == [(101, 0), (200, 100)]


@pytest.mark.parametrize(("on_error", "refused"), [("deny", True), ("allow", False)])
def test_with_the_ledger_down_a_response_is_refused_or_let_through_per_on_ledger_error(
    tmp_path: Path, on_error: str, refused: bool
) -> None:
    injector = Injector()

    async def steps(addon: Drawdown) -> None:
        ctx.master.addons.add(injector)
        flow = await session(addon)
        assert addon.ledger is not None
        ledger, addon.ledger = addon.ledger, None  # unreachable from here on
        create = {"type": "response.create", "event_id": "evt_1"}
        message = await send(addon, flow, create, from_client=True)
        assert message.dropped is refused
        done = {"type": "response.done", "response": {"usage": USAGE}}
        await send(addon, flow, done, from_client=False)  # unaccounted, as logged
        await addon.websocket_end(flow)
        addon.ledger = ledger

    drive(tmp_path, POLICY.format(on_error=on_error), steps)
    codes = [(e["error"]["code"], e["error"]["event_id"]) for e in injector.sent]
    assert codes == ([("ledger_unavailable", "evt_1")] if refused else [])


def test_a_response_never_done_is_released_when_the_session_ends(tmp_path: Path) -> None:
    async def steps(addon: Drawdown) -> None:
        flow = await session(addon)
        await send(addon, flow, {"type": "response.create"}, from_client=True)
        assert len(addon.inflight) == 1
        await addon.websocket_end(flow)
        assert not addon.inflight

    db = drive(tmp_path, POLICY.format(on_error="deny"), steps)
    with sqlite3.connect(db) as conn:
        holds = conn.execute("SELECT state, settle_reason FROM holds ORDER BY id").fetchall()
    assert holds == [
        ("committed", None),
        ("released", "the session ended before the response was done"),
    ]


def test_replay_of_the_recording_policy_decides_a_session_as_live(tmp_path: Path) -> None:
    """Each response held room for one request and no money, then was charged its actual:
    replay holds the same, so the first response (which took the budget over) is let
    through and the next refused, as live; a looser budget lets both through."""
    text = POLICY.format(on_error="deny").replace("usd: 5", "usd: 0.0001")
    injector = Injector()

    async def steps(addon: Drawdown) -> None:
        ctx.master.addons.add(injector)
        flow = await session(addon)
        for _ in range(2):
            message = await send(addon, flow, {"type": "response.create"}, from_client=True)
            if not message.dropped:
                done = {"type": "response.done", "response": {"usage": USAGE}}
                await send(addon, flow, done, from_client=False)

    db = drive(tmp_path, text, steps)
    assert [e["error"]["code"] for e in injector.sent] == ["budget_exhausted"]
    data = replay.replay(policy_from(tmp_path, text, "same.yaml"), str(db))
    assert data["changed"] == 0, data["blocked"]
    assert data["decisions"] == {"allow": 2, "deny": 1, "would_deny": 0}
    looser = policy_from(tmp_path, text.replace("usd: 0.0001", "usd: 1"), "looser.yaml")
    assert replay.replay(looser, str(db))["decisions"]["allow"] == 3


async def send_raw(
    addon: Drawdown, flow: http.HTTPFlow, content: bytes, *, from_client: bool
) -> WebSocketMessage:
    message = WebSocketMessage(Opcode.TEXT, from_client, content)
    flow.websocket.messages.append(message)
    await addon.websocket_message(flow)
    return message


def test_a_shadow_budget_taken_over_does_not_stop_the_session(tmp_path: Path) -> None:
    """`mode: shadow` on one budget trials it: a response that takes it over is recorded,
    and the agent's audio still flows (an enforced budget over its limit would stop it)."""
    text = POLICY.format(on_error="deny").replace(
        "usd: 5}", 'usd: 5}\n  - {scope: "agent:*/run:*", usd: 0.000001, mode: shadow, name: trial}'
    )
    injector = Injector()

    async def steps(addon: Drawdown) -> None:
        ctx.master.addons.add(injector)
        flow = await session(addon)
        await send(addon, flow, {"type": "response.create"}, from_client=True)
        done = {"type": "response.done", "response": {"usage": USAGE}}
        await send(addon, flow, done, from_client=False)
        audio = {"type": "input_audio_buffer.append", "audio": "AAAA"}
        assert not (await send(addon, flow, audio, from_client=True)).dropped
        commit = {"type": "input_audio_buffer.commit"}
        assert not (await send(addon, flow, commit, from_client=True)).dropped

    db = drive(tmp_path, text, steps)
    assert injector.sent == []
    with sqlite3.connect(db) as conn:
        (overage,) = conn.execute("SELECT count(*) FROM events WHERE kind = 'overage'").fetchone()
    assert overage == 1


def test_a_response_create_spelled_with_json_escapes_is_decided_too(tmp_path: Path) -> None:
    r"""`{"type": "response\u002ecreate"}` is a response.create to the server's JSON parser:
    once a budget is spent it is dropped like any other, not let through unread."""
    text = POLICY.format(on_error="deny").replace("usd: 5", "usd: 0.0001")
    injector = Injector()

    async def steps(addon: Drawdown) -> None:
        ctx.master.addons.add(injector)
        flow = await session(addon)
        await send(addon, flow, {"type": "response.create"}, from_client=True)
        done = {"type": "response.done", "response": {"usage": USAGE}}
        await send(addon, flow, done, from_client=False)
        escaped = b'{"type": "response\\u002ecreate", "event_id": "evt_x"}'
        assert (await send_raw(addon, flow, escaped, from_client=True)).dropped
        audio = b'{"type": "input_audio_buffer\\u002eappend", "audio": "AAAA"}'
        assert (await send_raw(addon, flow, audio, from_client=True)).dropped

    drive(tmp_path, text, steps)
    assert [(e["error"]["code"], e["error"]["event_id"]) for e in injector.sent] == [
        ("budget_exhausted", "evt_x"),
        ("budget_exhausted", None),
    ]
