"""The OpenAI Realtime API over WebSocket, end to end: the official openai SDK's realtime client
(`client.realtime.connect`, on the `websockets` package, which honours HTTPS_PROXY) through a
real `drawdown run` to a TLS WebSocket stand-in for api.openai.com.

The handshake is decided like any call; every `response.done` is committed as its own
ledger entry at genai-prices' price; once a budget is spent the next `response.create` is
dropped and the agent gets a Realtime `error` event; a spent budget refuses the handshake."""

from __future__ import annotations

import asyncio
import decimal
import os
import signal
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import genai_prices
import openai
import pytest
import websockets

from tests.support.proxy import DrawdownProcess, assert_ledger_verifies
from tests.support.realtime_standin import RealtimeStandIn, realtime_usage
from tests.support.tls import TlsMaterial

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

POLICY = """
mode: {mode}
identity:
  agent: [{{proxy_user: true}}, {{value: anonymous}}]
  run: [{{proxy_password: true}}, {{idle_split: 300}}]
actions:
  - {{kind: llm, provider: openai, match: {{host: api.openai.com}}}}
budgets:
{budgets}
"""

SCOPE = "tenant:default/agent:voice/run:r1"
# One response of a voice turn: text and audio in (part of it cached), text and audio out.
USAGE = realtime_usage(
    text_in=1200, audio_in=800, cached_text=400, cached_audio=200, text_out=50, audio_out=300
)


def policy(budgets: str, mode: str = "enforce") -> str:
    return POLICY.format(mode=mode, budgets=textwrap.indent(budgets.strip(), "  "))


def genai_prices_nanos(model: str) -> int:
    """USAGE priced by genai-prices itself, in nano-dollars rounded up, as the ledger keeps it."""
    price = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=2000,
            cache_read_tokens=600,
            input_audio_tokens=800,
            cache_audio_read_tokens=200,
            output_tokens=350,
            output_audio_tokens=300,
        ),
        model,
        provider_id="openai",
    ).total_price
    return int((price * 1_000_000_000).to_integral_value(rounding=decimal.ROUND_CEILING))


@pytest.fixture
def upstream(tls_material: TlsMaterial) -> Iterator[RealtimeStandIn]:
    with RealtimeStandIn(tls_material) as standin:
        standin.usages = [USAGE]
        yield standin


def start(drawdown_proxy: Factory, upstream: RealtimeStandIn, text: str) -> DrawdownProcess:
    return drawdown_proxy(text, resolve={"tls": {"api.openai.com": upstream.host_port}})


@pytest.fixture
def agent_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[DrawdownProcess], None]:
    """Point this process's HTTPS_PROXY (agent `voice`, run `r1`) and trust at the proxy:
    the SDK's websockets connection finds the proxy the way an unmodified agent's does."""

    def apply(proxy: DrawdownProcess) -> None:
        for name, value in proxy.client_env(proxy_auth=("voice", "r1")).items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)

    return apply


async def next_of(connection: Any, *kinds: str) -> Any:
    """The next server event of one of `kinds` (others are skipped)."""
    while True:
        event = await asyncio.wait_for(connection.recv(), 30)
        if event.type in kinds:
            return event


async def converse(model: str, turns: int) -> list[Any]:
    """Open a session, ask for `turns` responses; the final event of each (done or error)."""
    client = openai.AsyncOpenAI(api_key="sk-test-realtime")
    ends = []
    async with client.realtime.connect(model=model) as connection:
        await next_of(connection, "session.created")
        for _ in range(turns):
            await connection.response.create()
            ends.append(await next_of(connection, "response.done", "error"))
    return ends


def response_rows(proxy: DrawdownProcess, count: int) -> list[tuple]:
    """The responses' decision rows (the handshake's has status 101), once `count` are complete."""
    return proxy.wait_for_query(
        "SELECT d.decision, d.reason_code, d.actual_usd, d.tokens_in, d.tokens_out, d.model, "
        "d.scope, d.usage_source, h.state FROM decisions d LEFT JOIN holds h "
        "ON h.request_id = d.request_id WHERE d.status IS NOT 101 ORDER BY d.ts",
        until=lambda rows: len(rows) >= count and all(r[8] != "active" for r in rows),
    )


def test_each_response_is_committed_at_genai_prices_price(
    drawdown_proxy: Factory, upstream: RealtimeStandIn, agent_env: Callable[..., None]
) -> None:
    proxy = start(drawdown_proxy, upstream, policy('- {scope: "agent:*/run:*", usd: 5.00}'))
    agent_env(proxy)
    ends = asyncio.run(converse("gpt-realtime", 2))
    assert [e.type for e in ends] == ["response.done", "response.done"]
    assert ends[0].response.usage.output_token_details.audio_tokens == 300
    nanos = genai_prices_nanos("gpt-realtime")
    assert nanos > 0
    rows = response_rows(proxy, 2)
    assert (
        rows == [("allow", None, nanos, 2000, 350, "gpt-realtime", SCOPE, "usage", "committed")] * 2
    )
    # The handshake: one decision of its own, $0, the socket's 101.
    ((decision, usd, path),) = proxy.query(
        "SELECT decision, actual_usd, path FROM decisions WHERE status = 101"
    )
    assert (decision, usd, path) == ("allow", 0, "/v1/realtime")
    # The budget's instance holds the two responses, nothing else.
    ((spent, requests),) = proxy.query("SELECT spent_usd, spent_requests FROM budget_instances")
    assert (spent, requests) == (2 * nanos, 2)
    proxy.stop()
    assert_ledger_verifies(proxy.db_path)


def test_a_spent_budget_stops_the_next_response_and_refuses_the_next_session(
    drawdown_proxy: Factory, upstream: RealtimeStandIn, agent_env: Callable[..., None]
) -> None:
    # One response costs ≈$0.05 at gpt-realtime's prices: the first takes the budget over.
    proxy = start(drawdown_proxy, upstream, policy('- {scope: "agent:*/run:*", usd: 0.01}'))
    agent_env(proxy)
    ends = asyncio.run(converse("gpt-realtime", 2))
    assert ends[0].type == "response.done"
    assert ends[1].type == "error"
    assert ends[1].error.code == "budget_exhausted"
    assert "agent:voice/run:r1" in ends[1].error.message
    # The second response.create never reached the upstream.
    assert len(upstream.events("response.create")) == 1
    rows = response_rows(proxy, 2)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("allow", None, genai_prices_nanos("gpt-realtime")),
        ("deny", "budget_exhausted", None),
    ]
    # A new session of the spent run is refused at its handshake, before a socket opens.
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        asyncio.run(converse("gpt-realtime", 1))
    assert refused.value.response.status_code == 402
    assert b"budget_exhausted" in refused.value.response.body
    assert len(upstream.paths) == 1


def test_an_event_drawdown_cannot_read_is_not_forwarded(
    drawdown_proxy: Factory, upstream: RealtimeStandIn, agent_env: Callable[..., None]
) -> None:
    """A response.create carrying a 5,000-digit number is valid JSON that servers read and
    Python does not: forwarded unread, each such event spent past the spent budget (the
    audit's run ended at $0.096 of $0.01). It is dropped, and the agent told."""
    proxy = start(drawdown_proxy, upstream, policy('- {scope: "agent:*/run:*", usd: 0.01}'))
    agent_env(proxy)
    huge = "9" * 5000
    unreadable = '{"type": "response.create", "response": {"metadata": {"n": ' + huge + "}}}"

    async def session() -> list[Any]:
        client = openai.AsyncOpenAI(api_key="sk-test-realtime")
        async with client.realtime.connect(model="gpt-realtime") as connection:
            await next_of(connection, "session.created")
            await connection.response.create()
            ends = [await next_of(connection, "response.done", "error")]
            for _ in range(2):
                await connection.send_raw(unreadable)
                ends.append(await next_of(connection, "response.done", "error"))
            return ends

    ends = asyncio.run(session())
    assert [end.type for end in ends] == ["response.done", "error", "error"]
    assert {end.error.code for end in ends[1:]} == {"bad_request"}
    assert "cannot read" in ends[1].error.message
    assert len(upstream.events("response.create")) == 1


def test_shadow_mode_records_would_deny_and_lets_every_response_through(
    drawdown_proxy: Factory, upstream: RealtimeStandIn, agent_env: Callable[..., None]
) -> None:
    budgets = '- {scope: "agent:*/run:*", usd: 0.01}'
    proxy = start(drawdown_proxy, upstream, policy(budgets, mode="shadow"))
    agent_env(proxy)
    ends = asyncio.run(converse("gpt-realtime-mini", 2))
    assert [e.type for e in ends] == ["response.done", "response.done"]
    ends = asyncio.run(converse("gpt-realtime-mini", 1))  # the handshake is let through too
    assert [e.type for e in ends] == ["response.done"]
    nanos = genai_prices_nanos("gpt-realtime-mini")
    rows = response_rows(proxy, 3)
    assert [(r[0], r[2], r[5]) for r in rows] == [
        ("allow", nanos, "gpt-realtime-mini"),
        ("would_deny", nanos, "gpt-realtime-mini"),
        ("would_deny", nanos, "gpt-realtime-mini"),
    ]
    assert len(upstream.events("response.create")) == 3
    assert proxy.query("SELECT decision FROM decisions WHERE status = 101") == [
        ("allow",),
        ("would_deny",),
    ]


def test_a_response_the_server_starts_on_its_own_is_charged_and_then_audio_is_held_back(
    drawdown_proxy: Factory, upstream: RealtimeStandIn, agent_env: Callable[..., None]
) -> None:
    """With voice activity detection the server answers a committed turn of audio without a
    response.create: that response is charged all the same, and once it has spent the budget
    the agent's audio (append, commit) goes no further, so no new turn can start one."""
    proxy = start(drawdown_proxy, upstream, policy('- {scope: "agent:*/run:*", usd: 0.01}'))
    agent_env(proxy)

    async def speak() -> list[Any]:
        client = openai.AsyncOpenAI(api_key="sk-test-realtime")
        seen = []
        async with client.realtime.connect(model="gpt-realtime") as connection:
            await next_of(connection, "session.created")
            await connection.input_audio_buffer.append(audio="AAAA")
            await connection.input_audio_buffer.commit()
            seen.append(await next_of(connection, "response.done", "error"))
            for _ in range(3):
                await connection.input_audio_buffer.append(audio="AAAA")
            await connection.input_audio_buffer.commit()
            # One error for the audio held back, one for the commit.
            seen.append(await next_of(connection, "response.done", "error"))
            seen.append(await next_of(connection, "response.done", "error"))
        return seen

    done, audio, commit = asyncio.run(speak())
    assert done.type == "response.done"
    assert (audio.type, audio.error.code) == ("error", "budget_exhausted")
    assert (commit.type, commit.error.code) == ("error", "budget_exhausted")
    assert len(upstream.events("input_audio_buffer.append")) == 1
    assert len(upstream.events("input_audio_buffer.commit")) == 1
    ((decision, _, usd, *_),) = response_rows(proxy, 1)
    assert (decision, usd) == ("allow", genai_prices_nanos("gpt-realtime"))


def test_a_guard_stops_a_response_as_it_stops_a_call(
    drawdown_proxy: Factory, upstream: RealtimeStandIn, agent_env: Callable[..., None]
) -> None:
    """step_count counts the session's handshake and each response as steps of the run."""
    text = policy('- {scope: "agent:*/run:*", usd: 5.00}')
    proxy = start(
        drawdown_proxy, upstream, text + "anomalies:\n  step_count: {max: 2, on_detect: deny}\n"
    )
    agent_env(proxy)
    ends = asyncio.run(converse("gpt-realtime", 2))
    assert [e.type for e in ends] == ["response.done", "error"]
    assert ends[1].error.code == "anomaly" and "step_count" in ends[1].error.message
    assert len(upstream.events("response.create")) == 1
    assert [(r[0], r[1]) for r in response_rows(proxy, 2)] == [("allow", None), ("deny", "anomaly")]


def test_an_azure_deployment_is_priced_for_the_model_its_session_reports(
    drawdown_proxy: Factory, upstream: RealtimeStandIn, agent_env: Callable[..., None]
) -> None:
    """Azure names a deployment, not a model, in the URL (/openai/realtime?deployment=…):
    the session.created event names the model, and that is the price charged."""
    text = policy('- {scope: "agent:*/run:*", usd: 5.00}').replace(
        "host: api.openai.com", "host: voice.openai.azure.com"
    )
    proxy = drawdown_proxy(text, resolve={"tls": {"voice.openai.azure.com": upstream.host_port}})
    agent_env(proxy)

    async def once() -> Any:
        client = openai.AsyncAzureOpenAI(
            api_key="azure-test-key",
            api_version="2025-04-01-preview",
            azure_endpoint="https://voice.openai.azure.com",
        )
        async with client.realtime.connect(model="my-voice-deployment") as connection:
            await next_of(connection, "session.created")
            await connection.response.create()
            return await next_of(connection, "response.done", "error")

    assert asyncio.run(once()).type == "response.done"
    assert upstream.paths[0].startswith("/openai/realtime?")
    ((decision, _, usd, _, _, model, *_),) = response_rows(proxy, 1)
    # The stand-in's session.created reports gpt-realtime for a URL without `model`.
    assert (decision, usd, model) == ("allow", genai_prices_nanos("gpt-realtime"), "gpt-realtime")


@pytest.mark.parametrize(
    ("transcriber", "usage", "billed", "tokens"),
    [
        (
            "gpt-4o-transcribe",
            {
                "type": "tokens",
                "input_tokens": 500,
                "output_tokens": 40,
                "total_tokens": 540,
                "input_token_details": {"text_tokens": 20, "audio_tokens": 480},
            },
            genai_prices.Usage(input_tokens=500, input_audio_tokens=480, output_tokens=40),
            (500, 40),
        ),
        # whisper-1 bills seconds of audio (before, its transcriptions went uncharged)
        (
            "whisper-1",
            {"type": "duration", "seconds": 7.4},
            genai_prices.Usage(audio_seconds=8),
            (0, 0),
        ),
    ],
)
def test_input_audio_transcription_is_charged_at_its_own_models_price(
    drawdown_proxy: Factory,
    upstream: RealtimeStandIn,
    agent_env: Callable[..., None],
    transcriber: str,
    usage: dict[str, Any],
    billed: genai_prices.Usage,
    tokens: tuple[int, int],
) -> None:
    upstream.transcription_usage = usage
    proxy = start(drawdown_proxy, upstream, policy('- {scope: "agent:*/run:*", usd: 5.00}'))
    agent_env(proxy)

    async def speak() -> Any:
        client = openai.AsyncOpenAI(api_key="sk-test-realtime")
        async with client.realtime.connect(model="gpt-realtime") as connection:
            await next_of(connection, "session.created")
            await connection.session.update(
                session={
                    "type": "realtime",
                    "audio": {"input": {"transcription": {"model": transcriber}}},
                }
            )
            await next_of(connection, "session.updated")
            await connection.input_audio_buffer.append(audio="AAAA")
            await connection.input_audio_buffer.commit()
            return await next_of(connection, "response.done", "error")

    assert asyncio.run(speak()).type == "response.done"
    price = genai_prices.calc_price(billed, transcriber, provider_id="openai").total_price
    transcribed = int((price * 1_000_000_000).to_integral_value(rounding=decimal.ROUND_CEILING))
    assert transcribed > 0
    rows = response_rows(proxy, 2)
    assert [(r[0], r[2], r[3], r[4], r[5]) for r in rows] == [
        ("allow", transcribed, *tokens, transcriber),
        ("allow", genai_prices_nanos("gpt-realtime"), 2000, 350, "gpt-realtime"),
    ]


def charged_through_a_stop(
    proxy: DrawdownProcess, upstream: RealtimeStandIn, begin: Callable[[Any], Awaitable[None]]
) -> None:
    """`begin` a response, SIGTERM the proxy once the model is answering, then let the
    answer finish: the drain must wait for its response.done, and charge it."""
    upstream.gate = threading.Event()

    async def answered_during_the_stop() -> Any:
        client = openai.AsyncOpenAI(api_key="sk-test-realtime")
        async with client.realtime.connect(model="gpt-realtime") as connection:
            await next_of(connection, "session.created")
            await begin(connection)
            await next_of(connection, "response.created")
            assert proxy.pid is not None
            os.kill(proxy.pid, signal.SIGTERM)
            await asyncio.to_thread(proxy.wait_for_log, r"1 call\(s\) in flight")
            upstream.gate.set()
            return await next_of(connection, "response.done", "error")

    assert asyncio.run(answered_during_the_stop()).type == "response.done"
    assert proxy.wait() == 0
    ((decision, _, usd, *_, hold),) = response_rows(proxy, 1)
    assert (decision, usd, hold) == ("allow", genai_prices_nanos("gpt-realtime"), "committed")


def test_a_stop_waits_for_a_response_under_way_and_charges_it(
    drawdown_proxy: Factory, upstream: RealtimeStandIn, agent_env: Callable[..., None]
) -> None:
    """SIGTERM while the model is answering: the drain waits for the response.done (a
    response asked for but not begun would not hold the stop up), and it is charged."""
    proxy = start(drawdown_proxy, upstream, policy('- {scope: "agent:*/run:*", usd: 5.00}'))
    agent_env(proxy)

    async def asked(connection: Any) -> None:
        await connection.response.create()

    charged_through_a_stop(proxy, upstream, asked)


def test_a_stop_waits_for_a_response_voice_activity_began_and_charges_it(
    drawdown_proxy: Factory, upstream: RealtimeStandIn, agent_env: Callable[..., None]
) -> None:
    """SIGTERM while the model answers a turn of audio (no response.create: server voice
    activity began it): it is held from its response.created, so the drain waits for it and
    its response.done is charged, as a response the agent asked for is."""
    proxy = start(drawdown_proxy, upstream, policy('- {scope: "agent:*/run:*", usd: 5.00}'))
    agent_env(proxy)

    async def spoken(connection: Any) -> None:
        await connection.input_audio_buffer.append(audio="AAAA")
        await connection.input_audio_buffer.commit()

    charged_through_a_stop(proxy, upstream, spoken)


def test_a_response_create_the_server_refuses_releases_its_hold(
    drawdown_proxy: Factory, upstream: RealtimeStandIn, agent_env: Callable[..., None]
) -> None:
    """The SDK's response.create carries no event_id: drawdown gives it one, the server's
    `error` names it, and the hold is released at once (not left to a later response.done,
    which is charged to its own row), while the agent still gets the server's error."""
    proxy = start(drawdown_proxy, upstream, policy('- {scope: "agent:*/run:*", usd: 5.00}'))
    agent_env(proxy)
    upstream.refuse_creates = "conversation_already_has_active_response"

    async def refused_then_spoken() -> list[Any]:
        client = openai.AsyncOpenAI(api_key="sk-test-realtime")
        async with client.realtime.connect(model="gpt-realtime") as connection:
            await next_of(connection, "session.created")
            await connection.response.create()
            error = await next_of(connection, "response.done", "error")
            await connection.input_audio_buffer.append(audio="AAAA")
            await connection.input_audio_buffer.commit()
            return [error, await next_of(connection, "response.done", "error")]

    error, done = asyncio.run(refused_then_spoken())
    assert (error.type, error.error.code) == ("error", "conversation_already_has_active_response")
    ((create),) = upstream.events("response.create")
    assert error.error.event_id == create["event_id"]
    assert done.type == "response.done"
    rows = response_rows(proxy, 2)
    assert [(r[0], r[2], r[8]) for r in rows] == [
        ("allow", 0, "released"),
        ("allow", genai_prices_nanos("gpt-realtime"), "committed"),
    ]
    proxy.stop()
    assert_ledger_verifies(proxy.db_path)
