"""A usage count the meter cannot read (12.5 aside: rounded up) is absent, never 0: the answer
falls back to its next source (an earlier stream event, message_start, Bedrock's own counts,
or its text counted), as if the provider had reported no usage."""

from __future__ import annotations

import json
from typing import Any

import pytest
from drawdown.meter import TokenUsage, inspect_request, measure_body
from drawdown.meter.openai_realtime import measure_response, transcription_usage_of
from meter_corpus import CONFIG, streamed

from tests.support import wire

SSE = "text/event-stream"
NAN, INF = float("nan"), float("inf")


def _request(provider: str, path: str, body: dict[str, Any], **headers: str):
    return inspect_request(provider, "POST", path, {}, json.dumps(body).encode(), CONFIG)


def _json(request, answer: Any, headers: dict[str, str] | None = None):
    return measure_body(request, 200, json.dumps(answer).encode(), CONFIG, headers=headers)


def _stream(request, body: bytes, content_type: str = SSE):
    """The measurement of a stream fed whole, checked equal fed a byte at a time."""
    return streamed(request, body, content_type)


def _sse(events: list[tuple[str | None, dict[str, Any]]], sep: str = "\n\n") -> bytes:
    out = b""
    for event, data in events:
        head = f"event: {event}\n" if event else ""
        out += f"{head}data: {json.dumps(data)}{sep}".encode()
    return out


@pytest.mark.parametrize(
    ("value", "read"),
    [
        (1000, 1000),
        ("1000", 1000),
        (1000.0, 1000),
        (0, 0),
        (12.5, 13),  # providers bill whole tokens: never under-charge
        (0.1, 1),
        (None, None),
        (True, None),
        (False, None),
        (-5, None),
        (-0.5, None),
        (NAN, None),
        (INF, None),
        ("lots", None),
        ("-5", None),
        ("12.5", None),
        ([1], None),
    ],
)
def test_count_reads_a_count_or_says_it_cannot(value: Any, read: int | None) -> None:
    from drawdown.meter._util import count  # here: the other tests run without it

    assert count(value) == read


# --- OpenAI ---------------------------------------------------------------------------------

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
CHAT_TEXT = "Four, as two and two make four."


def _chat(usage: dict[str, Any] | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "choices": [{"message": {"role": "assistant", "content": CHAT_TEXT}}],
    }
    if usage is not None:
        answer["usage"] = usage
    return answer


def _chat_sse(*usages: dict[str, Any]) -> bytes:
    chunks: list[tuple[str | None, dict[str, Any]]] = [
        (None, {"model": "gpt-4o-mini", "choices": [{"delta": {"content": CHAT_TEXT}}]})
    ]
    chunks += [(None, {"model": "gpt-4o-mini", "choices": [], "usage": u}) for u in usages]
    return _sse(chunks) + b"data: [DONE]\n\n"


def test_openai_chat_fractional_counts_are_rounded_up() -> None:
    request = _request("openai", "/v1/chat/completions", CHAT)
    fractional = {"prompt_tokens": 12.5, "completion_tokens": 7.5, "total_tokens": 17}
    whole = {"prompt_tokens": 13, "completion_tokens": 8, "total_tokens": 21}
    m = _json(request, _chat(fractional))
    assert (m.source, m.usage) == ("usage", TokenUsage(input_tokens=13, output_tokens=8))
    assert m.usd_nanos == _json(request, _chat(whole)).usd_nanos == 6_750  # was 2,550
    streamed = _stream(
        _request("openai", "/v1/chat/completions", {**CHAT, "stream": True}),
        _chat_sse(fractional),
    )
    assert (streamed.usage, streamed.usd_nanos) == (m.usage, m.usd_nanos)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": INF, "completion_tokens": NAN, "total_tokens": INF},
        {"prompt_tokens": NAN, "completion_tokens": 7},
        {"prompt_tokens": 12, "completion_tokens": -7},
        {"prompt_tokens": True, "completion_tokens": False},
        {"prompt_tokens": 12, "completion_tokens": "seven"},
        {
            "prompt_tokens": 12,
            "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": -1},
        },
    ],
)
def test_openai_chat_usage_that_cannot_be_read_is_counted(usage: dict[str, Any]) -> None:
    request = _request("openai", "/v1/chat/completions", CHAT)
    counted = _json(request, _chat(None))
    assert counted.source == "counted" and counted.usd_nanos > 0
    m = _json(request, _chat(usage))
    assert (m.source, m.usage, m.usd_nanos) == ("counted", counted.usage, counted.usd_nanos)
    stream_request = _request("openai", "/v1/chat/completions", {**CHAT, "stream": True})
    streamed = _stream(stream_request, _chat_sse(usage))
    assert (streamed.source, streamed.usd_nanos) == ("counted", counted.usd_nanos)


def test_openai_chat_stream_keeps_a_good_usage_over_a_later_garbage_one() -> None:
    request = _request("openai", "/v1/chat/completions", {**CHAT, "stream": True})
    good = {"prompt_tokens": 13, "completion_tokens": 8}
    m = _stream(request, _chat_sse(good, {"prompt_tokens": -1, "completion_tokens": NAN}))
    assert (m.source, m.usage, m.usd_nanos) == (
        "usage",
        TokenUsage(input_tokens=13, output_tokens=8),
        6_750,
    )


RESPONSES = {"model": "gpt-5", "input": "hi", "max_output_tokens": 100}


def _response(usage: dict[str, Any] | None) -> dict[str, Any]:
    message = {
        "type": "message",
        "id": "msg_1",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": CHAT_TEXT}],
    }
    resp: dict[str, Any] = {"id": "resp_1", "model": "gpt-5", "output": [message]}
    if usage is not None:
        resp["usage"] = usage
    return resp


def _responses_sse(usage: dict[str, Any] | None) -> bytes:
    return _sse(
        [
            ("response.created", {"type": "response.created", "response": _response(None)}),
            (
                "response.output_text.delta",
                {"type": "response.output_text.delta", "delta": CHAT_TEXT},
            ),
            ("response.completed", {"type": "response.completed", "response": _response(usage)}),
        ]
    )


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": -1000, "output_tokens": 5.5},
        {"input_tokens": INF, "output_tokens": NAN},
        {"input_tokens": 1000, "output_tokens": "many"},
    ],
)
def test_openai_responses_usage_that_cannot_be_read_is_counted(usage: dict[str, Any]) -> None:
    request = _request("openai", "/v1/responses", RESPONSES)
    counted = _json(request, _response(None))
    assert counted.source == "counted" and counted.usd_nanos > 0
    m = _json(request, _response(usage))
    assert (m.source, m.usage, m.usd_nanos) == ("counted", counted.usage, counted.usd_nanos)
    streamed = _stream(
        _request("openai", "/v1/responses", {**RESPONSES, "stream": True}), _responses_sse(usage)
    )
    no_usage = _stream(
        _request("openai", "/v1/responses", {**RESPONSES, "stream": True}), _responses_sse(None)
    )
    assert (streamed.source, streamed.usd_nanos) == ("counted", no_usage.usd_nanos)


def test_openai_responses_fractional_counts_are_rounded_up() -> None:
    request = _request("openai", "/v1/responses", RESPONSES)
    m = _json(request, _response({"input_tokens": 999.5, "output_tokens": 5.5}))
    assert (m.source, m.usage) == ("usage", TokenUsage(input_tokens=1000, output_tokens=6))


# --- Anthropic ------------------------------------------------------------------------------

HAIKU = "claude-haiku-4-5"  # $1 / $5 per million
MESSAGES = {"model": HAIKU, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


def _message(usage: dict[str, Any] | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": HAIKU,
        "content": [{"type": "text", "text": CHAT_TEXT}],
        "stop_reason": "end_turn",
    }
    if usage is not None:
        answer["usage"] = usage
    return answer


def _anthropic_events(start: dict[str, Any], delta: dict[str, Any]) -> list[bytes]:
    events = [
        ("message_start", {"type": "message_start", "message": {**_message(start), "content": []}}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"text": CHAT_TEXT}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {}, "usage": delta}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return [_sse([e]) for e in events]


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": True, "output_tokens": True},
        {"input_tokens": 1000, "output_tokens": -50},
        {"input_tokens": "lots", "output_tokens": 50},
        {"input_tokens": 1000, "output_tokens": 50, "cache_read_input_tokens": NAN},
    ],
)
def test_anthropic_json_usage_that_cannot_be_read_is_counted(usage: dict[str, Any]) -> None:
    request = _request("anthropic", "/v1/messages", MESSAGES)
    counted = _json(request, _message(None))
    assert counted.source == "counted" and counted.usd_nanos > 0
    m = _json(request, _message(usage))
    assert (m.source, m.usage, m.usd_nanos) == ("counted", counted.usage, counted.usd_nanos)


def test_anthropic_json_fractional_counts_are_rounded_up() -> None:
    request = _request("anthropic", "/v1/messages", MESSAGES)
    m = _json(request, _message({"input_tokens": 1000.5, "output_tokens": 50.5}))
    assert (m.source, m.usage) == ("usage", TokenUsage(input_tokens=1001, output_tokens=51))
    assert m.usd_nanos == 1_256_000


@pytest.mark.parametrize(
    ("delta_input", "nanos"),
    [(-5, 1_250_000), ("lots", 1_250_000), (True, 1_250_000), (NAN, 1_250_000), (1000, 1_250_000)],
)
def test_anthropic_stream_delta_garbage_keeps_message_starts_input(
    delta_input: Any, nanos: int
) -> None:
    """The delta's input_tokens wins over message_start's, but only when it can be read."""
    request = _request("anthropic", "/v1/messages", {**MESSAGES, "stream": True})
    start = {"input_tokens": 1000, "output_tokens": 1}
    body = b"".join(_anthropic_events(start, {"input_tokens": delta_input, "output_tokens": 50}))
    m = _stream(request, body)
    assert (m.source, m.usage) == ("usage", TokenUsage(input_tokens=1000, output_tokens=50))
    assert m.usd_nanos == nanos  # was 250,000: the input dropped


def test_anthropic_stream_fractional_delta_is_rounded_up() -> None:
    request = _request("anthropic", "/v1/messages", {**MESSAGES, "stream": True})
    start = {"input_tokens": 1000, "output_tokens": 1}
    body = b"".join(_anthropic_events(start, {"input_tokens": 1000.5, "output_tokens": 50.5}))
    m = _stream(request, body)
    assert (m.usage, m.usd_nanos) == (TokenUsage(input_tokens=1001, output_tokens=51), 1_256_000)


def test_anthropic_stream_unreadable_output_counts_the_text_on_starts_input() -> None:
    request = _request("anthropic", "/v1/messages", {**MESSAGES, "stream": True})
    start = {"input_tokens": 1000, "output_tokens": 1}
    body = b"".join(_anthropic_events(start, {"output_tokens": -50}))
    m = _stream(request, body)
    # The delta's output cannot be read and message_start's (1) is not final: the text counted.
    assert m.source == "counted"
    assert m.usage.input_tokens == 1000 and m.usage.output_tokens > 1


SEARCH = {
    **MESSAGES,
    "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
}


def _searched(searches: Any, blocks: int = 2) -> dict[str, Any]:
    """An answer that searched `blocks` times, its usage reporting `searches`."""
    content: list[dict[str, Any]] = []
    for i in range(blocks):
        content.append(
            {
                "type": "server_tool_use",
                "id": f"srvtoolu_{i}",
                "name": "web_search",
                "input": {"query": f"query {i}"},
            }
        )
        content.append({"type": "web_search_tool_result", "tool_use_id": f"srvtoolu_{i}"})
    content.append({"type": "text", "text": CHAT_TEXT})
    usage = {"input_tokens": 1000, "output_tokens": 50, "server_tool_use": {}}
    usage["server_tool_use"]["web_search_requests"] = searches
    return {**_message(usage), "content": content}


def _searched_events(answer: dict[str, Any]) -> bytes:
    start = {"input_tokens": 1000, "output_tokens": 1}
    events: list[tuple[str | None, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {**_message(start), "content": []}}),
    ]
    for i, block in enumerate(answer["content"]):
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": i, "content_block": block},
            )
        )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": answer["usage"],
    }
    events += [("message_delta", delta), ("message_stop", {"type": "message_stop"})]
    return _sse(events)


@pytest.mark.parametrize("searches", [-2, "two", NAN, True, "-2"])
def test_anthropic_unreadable_web_search_count_charges_the_searches_made(searches: Any) -> None:
    """The answer's server_tool_use blocks counted (was: no search charged)."""
    request = _request("anthropic", "/v1/messages", SEARCH)
    reported = _json(request, _searched(2))
    assert reported.extras["web_search_calls"] == 2
    unsearched = _json(request, _searched(0, blocks=2))
    assert "web_search_calls" not in unsearched.extras
    assert reported.usd_nanos > unsearched.usd_nanos
    m = _json(request, _searched(searches))
    assert (m.source, m.usage, dict(m.extras), m.usd_nanos) == (
        "usage",
        reported.usage,
        dict(reported.extras),
        reported.usd_nanos,
    )
    stream_request = _request("anthropic", "/v1/messages", {**SEARCH, "stream": True})
    streamed = _stream(stream_request, _searched_events(_searched(searches)))
    good = _stream(stream_request, _searched_events(_searched(2)))
    assert good.extras["web_search_calls"] == 2
    assert (streamed.extras.get("web_search_calls"), streamed.usd_nanos) == (2, good.usd_nanos)


def test_anthropic_fractional_web_search_count_is_rounded_up() -> None:
    request = _request("anthropic", "/v1/messages", SEARCH)
    assert _json(request, _searched(1.5, blocks=0)).extras["web_search_calls"] == 2


# --- Gemini ---------------------------------------------------------------------------------

FLASH_PATH = "/v1beta/models/gemini-2.5-flash"
GENERATE = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def _chunk(text: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}],
        "modelVersion": "gemini-2.5-flash",
    }
    if usage is not None:
        chunk["usageMetadata"] = usage
    return chunk


def test_gemini_fractional_counts_are_rounded_up() -> None:
    request = _request("gemini", f"{FLASH_PATH}:generateContent", GENERATE)
    m = _json(request, _chunk("Hi", {"promptTokenCount": 999.5, "candidatesTokenCount": 499.1}))
    assert (m.source, m.usage) == ("usage", TokenUsage(input_tokens=1000, output_tokens=500))
    assert m.usd_nanos == 1_550_000


@pytest.mark.parametrize(
    "usage",
    [
        {"promptTokenCount": -1000, "candidatesTokenCount": -500},
        {"promptTokenCount": True, "candidatesTokenCount": 500},
        {"promptTokenCount": 1000, "candidatesTokenCount": 500, "thoughtsTokenCount": INF},
    ],
)
def test_gemini_json_usage_that_cannot_be_read_is_counted(usage: dict[str, Any]) -> None:
    request = _request("gemini", f"{FLASH_PATH}:generateContent", GENERATE)
    counted = _json(request, _chunk(CHAT_TEXT, None))
    assert counted.source == "counted" and counted.usd_nanos > 0
    m = _json(request, _chunk(CHAT_TEXT, usage))
    assert (m.source, m.usage, m.usd_nanos) == ("counted", counted.usage, counted.usd_nanos)


@pytest.mark.parametrize(
    "last",
    [
        {"promptTokenCount": -1, "candidatesTokenCount": -1},
        {"promptTokenCount": 1000, "candidatesTokenCount": "x"},
        {"promptTokenCount": NAN, "candidatesTokenCount": 500},
    ],
)
def test_gemini_stream_last_garbage_keeps_the_earlier_usage(last: dict[str, Any]) -> None:
    request = _request("gemini", f"{FLASH_PATH}:streamGenerateContent", GENERATE)
    first = {"promptTokenCount": 1000, "candidatesTokenCount": 500}
    chunks = [_chunk("Hello", first), _chunk(" world", last)]
    body = _sse([(None, c) for c in chunks], sep="\r\n\r\n")
    m = _stream(request, body)
    assert (m.source, m.usage) == ("usage", TokenUsage(input_tokens=1000, output_tokens=500))
    assert m.usd_nanos == 1_550_000  # was 0
    # The JSON-array stream (no alt=sse) reads the same.
    array = _json(request, chunks)
    assert (array.usage, array.usd_nanos) == (m.usage, m.usd_nanos)


def test_gemini_stream_later_readable_counts_still_win() -> None:
    request = _request("gemini", f"{FLASH_PATH}:streamGenerateContent", GENERATE)
    chunks = [
        _chunk("Hello", {"promptTokenCount": 1000, "candidatesTokenCount": 200}),
        _chunk(" world", {"promptTokenCount": -1, "candidatesTokenCount": 500}),
    ]
    m = _stream(request, _sse([(None, c) for c in chunks], sep="\r\n\r\n"))
    assert m.usage == TokenUsage(input_tokens=1000, output_tokens=500)


# --- Bedrock --------------------------------------------------------------------------------

NOVA_PATH = "/model/amazon.nova-pro-v1%3A0"
CONVERSE = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
CLAUDE_PATH = "/model/us.anthropic.claude-3-5-haiku-20241022-v1%3A0"  # $0.80 / $4 per million
CLAUDE_INVOKE = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "messages": []}


def _converse(usage: dict[str, Any] | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "output": {"message": {"role": "assistant", "content": [{"text": CHAT_TEXT}]}},
        "stopReason": "end_turn",
    }
    if usage is not None:
        answer["usage"] = usage
    return answer


def _converse_stream(usage: dict[str, Any]) -> bytes:
    return b"".join(
        wire.bedrock_converse_stream(deltas=[CHAT_TEXT], usage=usage, stop_reason="end_turn")
    )


@pytest.mark.parametrize(
    "usage",
    [
        {"inputTokens": True, "outputTokens": False},
        {"inputTokens": -20, "outputTokens": -8, "totalTokens": -28},
        {"inputTokens": 20, "outputTokens": 8, "cacheReadInputTokens": "some"},
    ],
)
def test_bedrock_converse_usage_that_cannot_be_read_is_counted(usage: dict[str, Any]) -> None:
    request = _request("bedrock", f"{NOVA_PATH}/converse", CONVERSE)
    counted = _json(request, _converse(None))
    assert counted.source == "counted" and counted.usd_nanos > 0
    m = _json(request, _converse(usage))
    assert (m.source, m.usage, m.usd_nanos) == ("counted", counted.usage, counted.usd_nanos)
    stream_request = _request("bedrock", f"{NOVA_PATH}/converse-stream", CONVERSE)
    streamed = _stream(stream_request, _converse_stream(usage), wire.EVENTSTREAM_TYPE)
    assert (streamed.source, streamed.usage.input_tokens) == ("counted", counted.usage.input_tokens)


def test_bedrock_converse_fractional_counts_are_rounded_up() -> None:
    usage = {"inputTokens": 20.5, "outputTokens": 7.2}
    expected = TokenUsage(input_tokens=21, output_tokens=8)
    m = _json(_request("bedrock", f"{NOVA_PATH}/converse", CONVERSE), _converse(usage))
    assert (m.source, m.usage) == ("usage", expected)
    stream_request = _request("bedrock", f"{NOVA_PATH}/converse-stream", CONVERSE)
    streamed = _stream(stream_request, _converse_stream(usage), wire.EVENTSTREAM_TYPE)
    assert (streamed.source, streamed.usage, streamed.usd_nanos) == ("usage", expected, m.usd_nanos)


GARBAGE_ANTHROPIC = [
    {"input_tokens": 20.0, "output_tokens": True},
    {"input_tokens": -20, "output_tokens": -8},
    {"input_tokens": "lots", "output_tokens": NAN},
]


@pytest.mark.parametrize("usage", GARBAGE_ANTHROPIC)
def test_bedrock_claude_invoke_falls_back_on_bedrocks_own_counts(usage: dict[str, Any]) -> None:
    expected = TokenUsage(input_tokens=20, output_tokens=8)
    request = _request("bedrock", f"{CLAUDE_PATH}/invoke", CLAUDE_INVOKE)
    m = _json(request, _message(usage), headers=wire.bedrock_token_headers(20, 8))
    assert (m.source, m.usage, m.usd_nanos) == ("usage", expected, 48_000)  # was 0
    stream_request = _request(
        "bedrock", f"{CLAUDE_PATH}/invoke-with-response-stream", CLAUDE_INVOKE
    )
    body = b"".join(wire.bedrock_invoke_stream(_anthropic_events(usage, usage), 20, 8))
    streamed = _stream(stream_request, body, wire.EVENTSTREAM_TYPE)
    assert (streamed.source, streamed.usage, streamed.usd_nanos) == ("usage", expected, 48_000)


NOVA_INVOKE = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
LLAMA_PATH = "/model/meta.llama3-70b-instruct-v1%3A0"
LLAMA_INVOKE = {"prompt": "hi", "max_gen_len": 256}


@pytest.mark.parametrize(
    "usage", [{"inputTokens": -20, "outputTokens": 8}, {"inputTokens": 20, "outputTokens": NAN}]
)
def test_bedrock_family_usage_that_cannot_be_read_is_counted(usage: dict[str, Any]) -> None:
    """Without Bedrock's headers, a Nova invoke's own usage; unreadable, the reply counted."""
    request = _request("bedrock", f"{NOVA_PATH}/invoke", NOVA_INVOKE)
    counted = _json(request, _converse(None))
    assert counted.source == "counted" and counted.usd_nanos > 0
    m = _json(request, _converse(usage))
    assert (m.source, m.usage, m.usd_nanos) == ("counted", counted.usage, counted.usd_nanos)
    chunks = wire.nova_invoke_chunks(deltas=[CHAT_TEXT], usage=usage, stop_reason="end_turn")
    stream_request = _request("bedrock", f"{NOVA_PATH}/invoke-with-response-stream", NOVA_INVOKE)
    body = b"".join(wire.bedrock_chunk_stream(chunks, {}))
    streamed = _stream(stream_request, body, wire.EVENTSTREAM_TYPE)
    assert (streamed.source, streamed.usage.input_tokens) == ("counted", counted.usage.input_tokens)


def test_bedrock_llama_unreadable_counts_are_not_read_as_0() -> None:
    request = _request("bedrock", f"{LLAMA_PATH}/invoke", LLAMA_INVOKE)
    answer = {"generation": CHAT_TEXT, "prompt_token_count": -39, "generation_token_count": 11}
    m = _json(request, {**answer, "stop_reason": "stop"})
    assert m.source == "counted" and m.usage.input_tokens == request.input_tokens
    # In a stream, a later garbage count leaves the one read before.
    chunks = wire.llama_invoke_chunks(deltas=["Up", "."], input_tokens=39, stop_reason="stop")
    chunks[1]["prompt_token_count"] = -1
    chunks[2]["generation_token_count"] = -1
    stream_request = _request("bedrock", f"{LLAMA_PATH}/invoke-with-response-stream", LLAMA_INVOKE)
    body = b"".join(wire.bedrock_chunk_stream(chunks, {}))
    streamed = _stream(stream_request, body, wire.EVENTSTREAM_TYPE)
    assert (streamed.source, streamed.usage) == ("usage", TokenUsage(39, 2))


# --- OpenAI Realtime ------------------------------------------------------------------------


def _realtime(usage: dict[str, Any]) -> int:
    return measure_response({"usage": usage}, ("gpt-realtime",), CONFIG).usd_nanos


def _rt_usage(input_tokens: Any, output_tokens: Any, text_in: Any = 100, text_out: Any = 20):
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {"text_tokens": text_in, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": text_out, "audio_tokens": 0},
    }


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens"),
    [(-5, 20), (True, 20), (NAN, 20), ("lots", 20), (100, -1), (100, False), (-5, INF)],
)
def test_realtime_unreadable_counts_are_read_from_their_parts(
    input_tokens: Any, output_tokens: Any
) -> None:
    """A response.done has no other source: its details' text + audio + image tokens."""
    assert _realtime(_rt_usage(input_tokens, output_tokens)) == 720_000  # -5 in: was 320,000


def test_realtime_fractional_counts_are_rounded_up() -> None:
    assert _realtime(_rt_usage(99.5, 19.5, 99.5, 19.5)) == 720_000
    usage = transcription_usage_of(
        {"usage": {"type": "tokens", "input_tokens": 99.5, "output_tokens": 19.5}}
    )
    assert usage == TokenUsage(input_tokens=100, output_tokens=20)


def test_realtime_transcription_unreadable_input_is_read_from_its_parts() -> None:
    event = {
        "usage": {
            "type": "tokens",
            "input_tokens": -1,
            "output_tokens": 20,
            "input_token_details": {"text_tokens": 10, "audio_tokens": 90},
        }
    }
    assert transcription_usage_of(event) == TokenUsage(
        input_tokens=100, output_tokens=20, input_audio_tokens=90
    )
