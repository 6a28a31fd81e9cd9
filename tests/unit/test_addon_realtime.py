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


def holds_of(db: Path) -> list[tuple[str, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT state, settle_reason FROM holds ORDER BY id").fetchall()


def test_a_response_create_the_server_refuses_is_released_at_its_error(tmp_path: Path) -> None:
    """The SDK sends response.create without an event_id: drawdown names it, so the server's
    `error` for it (an active response already, a bad parameter) releases its hold, and the
    next response.done is charged to its own row, not to the refused create's."""

    async def steps(addon: Drawdown) -> None:
        flow = await session(addon)
        message = await send(addon, flow, {"type": "response.create"}, from_client=True)
        named = json.loads(message.content)
        assert named["type"] == "response.create" and isinstance(named["event_id"], str)
        kept = {"type": "response.create", "event_id": "evt_mine", "response": {}}
        message = await send(addon, flow, kept, from_client=True)
        assert json.loads(message.content) == kept  # the agent's own id is left as it is
        assert len(addon.inflight) == 2
        error = {
            "type": "error",
            "event_id": "event_srv_1",
            "error": {
                "type": "invalid_request_error",
                "code": "conversation_already_has_active_response",
                "message": "Conversation already has an active response in progress",
                "event_id": named["event_id"],
            },
        }
        await send(addon, flow, error, from_client=False)
        assert len(addon.inflight) == 1
        await send(
            addon, flow, {"type": "response.created", "response": {"id": "r1"}}, from_client=False
        )
        done = {"type": "response.done", "response": {"id": "r1", "usage": USAGE}}
        await send(addon, flow, done, from_client=False)
        assert not addon.inflight

    db = drive(tmp_path, POLICY.format(on_error="deny"), steps)
    assert holds_of(db) == [
        ("committed", None),
        ("released", "the upstream refused the response.create"),
        ("committed", None),
    ]


def test_a_response_the_server_starts_is_held_from_its_response_created(
    tmp_path: Path,
) -> None:
    """Server voice activity starts a response without a response.create: it is held from
    its response.created, so a stop waits for it and a closed socket releases it."""

    async def steps(addon: Drawdown) -> None:
        flow = await session(addon)
        created = {"type": "response.created", "response": {"id": "r1"}}
        await send(addon, flow, created, from_client=False)
        (held,) = addon.inflight.values()
        assert not held.listening  # a drain waits for it
        done = {"type": "response.done", "response": {"id": "r1", "usage": USAGE}}
        await send(addon, flow, done, from_client=False)
        assert not addon.inflight
        await send(addon, flow, {**created, "response": {"id": "r2"}}, from_client=False)
        await addon.websocket_end(flow)
        assert not addon.inflight

    db = drive(tmp_path, POLICY.format(on_error="deny"), steps)
    assert holds_of(db) == [
        ("committed", None),
        ("committed", None),
        ("released", "the session ended before the response was done"),
    ]


def test_responses_in_flight_together_are_each_charged_to_their_own_row(
    tmp_path: Path,
) -> None:
    """Out-of-band responses (`conversation: "none"`) run alongside the conversation's: each
    response.done is charged to the response.create that began it (by its response id)."""

    async def steps(addon: Drawdown) -> None:
        flow = await session(addon)
        oob = {"type": "response.create", "response": {"conversation": "none"}}
        await send(addon, flow, {"type": "response.create"}, from_client=True)
        await send(addon, flow, oob, from_client=True)
        for rid in ("r_first", "r_oob"):
            created = {"type": "response.created", "response": {"id": rid}}
            await send(addon, flow, created, from_client=False)
        small = {"input_tokens": 7, "output_tokens": 1}
        for rid, usage in (("r_oob", small), ("r_first", USAGE)):
            done = {"type": "response.done", "response": {"id": rid, "usage": usage}}
            await send(addon, flow, done, from_client=False)

    db = drive(tmp_path, POLICY.format(on_error="deny"), steps)
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT tokens_in FROM decisions WHERE status = 200 ORDER BY ts"
        ).fetchall()
    assert rows == [(100,), (7,)]


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


@pytest.mark.parametrize("host", ["api.openai.com", "chat.example.com"])
def test_a_websocket_is_never_compressed_and_keeps_only_the_message_at_hand(
    tmp_path: Path, host: str
) -> None:
    """mitmproxy inflates a permessage-deflate message without bound and holds it whole:
    0.5 MB on the wire became 2.8 GB in the proxy. The offer is taken out of every upgrade
    (a Realtime session's, or any other host's), so a message costs what it costs on the
    wire, and a WebSocket no action names no longer keeps every message it ever carried."""

    async def steps(addon: Drawdown) -> None:
        flow = tflow.twebsocketflow()
        flow.websocket.messages.clear()
        flow.request.host, flow.request.port, flow.request.scheme = host, 443, "https"
        flow.request.path = "/v1/realtime?model=gpt-realtime"
        flow.request.headers["Upgrade"] = "websocket"
        flow.request.headers["Sec-WebSocket-Extensions"] = (
            "permessage-deflate; client_max_window_bits"
        )
        response, flow.response = flow.response, None
        addon.requestheaders(flow)
        assert "Sec-WebSocket-Extensions" not in flow.request.headers
        await addon.request(flow)
        flow.response = response
        await addon.response(flow)
        for n in range(20):
            event = {"type": "input_audio_buffer.append", "audio": "AAAA", "n": n}
            await send(addon, flow, event, from_client=True)
        assert [json.loads(m.content)["n"] for m in flow.websocket.messages] == [19]

    drive(tmp_path, POLICY.format(on_error="deny"), steps)


def test_a_response_done_sent_twice_is_charged_once(tmp_path: Path) -> None:
    """A server that ended one response twice (the same id) had the second charged as a
    response no one asked for: the session paid for it twice."""

    async def steps(addon: Drawdown) -> None:
        flow = await session(addon)
        await send(addon, flow, {"type": "response.create"}, from_client=True)
        created = {"type": "response.created", "response": {"id": "resp_1"}}
        await send(addon, flow, created, from_client=False)
        done = {
            "type": "response.done",
            "response": {"id": "resp_1", "status": "completed", "usage": USAGE},
        }
        for _ in range(2):
            await send(addon, flow, done, from_client=False)
        await addon.websocket_end(flow)

    db = drive(tmp_path, POLICY.format(on_error="deny"), steps)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status, tokens_in FROM decisions ORDER BY ts").fetchall()
    assert rows == [(101, 0), (200, 100)]
