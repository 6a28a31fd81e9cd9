"""Amazon Bedrock Runtime: routing, request estimates, and usage from Converse JSON, ConverseStream
and InvokeModelWithResponseStream event streams (AWS's binary framing, cut anywhere)."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys

import genai_prices
import pytest
from drawdown.meter import (
    MeterConfig,
    TokenUsage,
    charging,
    inspect_request,
    measure_body,
    open_stream_meter,
)
from drawdown.meter.config import DEFAULT_SAFETY_FACTORS
from drawdown.meter.images import anthropic_image_tokens
from drawdown.meter.prices import to_nanos
from drawdown.meter.tokens import count_texts
from drawdown.meter.types import MeterRequestError
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import wire

CONFIG = MeterConfig()
CLAUDE = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
CLAUDE_PATH = "/model/us.anthropic.claude-3-5-haiku-20241022-v1%3A0"
NOVA = "amazon.nova-pro-v1:0"
NOVA_PATH = "/model/amazon.nova-pro-v1%3A0"
TEXT = "Summarise the quarterly report for the board in three short bullet points."
CONVERSE = {
    "messages": [{"role": "user", "content": [{"text": TEXT}]}],
    "inferenceConfig": {"maxTokens": 300},
}
EVENTSTREAM = wire.EVENTSTREAM_TYPE


def inspect(path: str, body: object, method: str = "POST"):
    raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
    return inspect_request("bedrock", method, path, {}, raw, CONFIG)


def aws_price(model: str, usage: TokenUsage) -> int:
    """genai-prices' own price for `aws`, in nano-dollars rounded up."""
    calc = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens or None,
            cache_write_tokens=usage.cache_write_tokens or None,
        ),
        model,
        provider_id="aws",
    )
    return to_nanos(calc.total_price)


# --- routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", f"{CLAUDE_PATH}/converse", "tokens"),
        ("POST", f"{NOVA_PATH}/converse-stream", "tokens"),
        ("POST", f"{CLAUDE_PATH}/invoke", "tokens"),
        ("POST", f"{CLAUDE_PATH}/invoke-with-response-stream", "tokens"),
        # Another family's invoke body is its own format: counted as a step, $0.
        ("POST", "/model/meta.llama3-8b-instruct-v1%3A0/invoke", "step"),
        ("POST", "/model/amazon.titan-embed-text-v2%3A0/invoke", "step"),
        ("POST", "/model/amazon.nova-sonic-v1%3A0/invoke-with-bidirectional-stream", "step"),
        ("POST", "/async-invoke", "step"),
        ("POST", "/guardrail/g1/version/1/apply", "step"),
        ("POST", f"{CLAUDE_PATH}/count-tokens", "free"),
        ("GET", "/async-invoke/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Aasync-invoke%2Fx", "free"),
    ],
)
def test_charging_by_route(method: str, path: str, expected: str) -> None:
    assert charging("bedrock", method, path) == expected


@pytest.mark.parametrize(
    ("path", "model"),
    [
        (f"{CLAUDE_PATH}/converse", CLAUDE),
        ("/model/global.anthropic.claude-sonnet-4-5-20250929-v1:0/converse", None),
        (
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
            "us.anthropic.claude-3-5-haiku-20241022-v1%3A0/converse",
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
            "us.anthropic.claude-3-5-haiku-20241022-v1:0",
        ),
    ],
)
def test_the_model_id_is_url_decoded_from_the_path(path: str, model: str | None) -> None:
    request = inspect(path, CONVERSE)
    assert request.model == (model or "global.anthropic.claude-sonnet-4-5-20250929-v1:0")
    assert request.billable and request.priced  # genai-prices knows each id (an ARN by its tail)
    assert request.endpoint == "converse" and not request.stream


def test_a_stream_is_told_by_the_path() -> None:
    assert inspect(f"{NOVA_PATH}/converse-stream", CONVERSE).stream
    invoke = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "messages": []}
    streamed = inspect(f"{CLAUDE_PATH}/invoke-with-response-stream", invoke)
    assert (streamed.endpoint, streamed.stream, streamed.model) == ("invoke", True, CLAUDE)


def test_a_bedrock_request_is_never_rewritten() -> None:
    """SigV4 signs the body: a rewrite (OpenAI's stream_options injection) would void it."""
    for path in (f"{NOVA_PATH}/converse-stream", f"{CLAUDE_PATH}/invoke-with-response-stream"):
        body = {**CONVERSE, "stream": True, "anthropic_version": "bedrock-2023-05-31"}
        request = inspect(path, body)
        assert request.rewritten_body is None and not request.strip_usage_chunk


# --- estimates ----------------------------------------------------------------------------------


def test_a_converse_estimate_is_tiktoken_times_the_claude_factor_for_claude_only() -> None:
    claude, nova = (
        inspect(f"{CLAUDE_PATH}/converse", CONVERSE),
        inspect(f"{NOVA_PATH}/converse", CONVERSE),
    )
    raw = count_texts([TEXT], NOVA)
    assert nova.input_tokens > raw  # plus message framing
    framing = nova.input_tokens - raw
    assert claude.input_tokens == math.ceil((raw + framing) * DEFAULT_SAFETY_FACTORS["claude"])
    assert claude.max_output_tokens == nova.max_output_tokens == 300
    assert claude.estimate_usd_nanos == aws_price(
        CLAUDE, TokenUsage(input_tokens=claude.input_tokens, output_tokens=300)
    )


def test_converse_blocks_all_count() -> None:
    png = base64.b64encode(
        bytes.fromhex("89504e470d0a1a0a0000000d49484452")
        + (800).to_bytes(4, "big")
        + (600).to_bytes(4, "big")
        + b"\x08\x02\x00\x00\x00"
    ).decode()
    base = inspect(f"{NOVA_PATH}/converse", CONVERSE).input_tokens
    with_image = {
        **CONVERSE,
        "messages": [
            {
                "role": "user",
                "content": [{"text": TEXT}, {"image": {"format": "png", "source": {"bytes": png}}}],
            }
        ],
    }
    assert inspect(f"{NOVA_PATH}/converse", with_image).input_tokens == base + (
        anthropic_image_tokens((800, 600))
    )
    turns = {
        "system": [{"text": "You are the board's analyst."}, {"cachePoint": {"type": "default"}}],
        "messages": [
            *CONVERSE["messages"],
            {
                "role": "assistant",
                "content": [{"toolUse": {"toolUseId": "t1", "name": "fetch", "input": {"q": 1}}}],
            },
            {
                "role": "user",
                "content": [
                    {"toolResult": {"toolUseId": "t1", "content": [{"json": {"revenue": 12}}]}},
                    {"document": {"format": "txt", "name": "notes", "source": {"text": "Q3 up"}}},
                ],
            },
        ],
    }
    assert inspect(f"{NOVA_PATH}/converse", turns).input_tokens > base + 20
    tools = {
        **CONVERSE,
        "toolConfig": {
            "tools": [
                {
                    "toolSpec": {
                        "name": "fetch",
                        "inputSchema": {"json": {"type": "object"}},
                    }
                }
            ]
        },
    }
    # Claude's hidden tool-use system prompt is billed on Bedrock too; not Nova's.
    tools_claude = inspect(f"{CLAUDE_PATH}/converse", tools).input_tokens
    plain_claude = inspect(f"{CLAUDE_PATH}/converse", CONVERSE).input_tokens
    tools_nova = inspect(f"{NOVA_PATH}/converse", tools).input_tokens
    assert tools_claude - plain_claude > 346 > tools_nova - base > 0


def test_a_claude_invoke_is_estimated_as_anthropic_messages() -> None:
    messages = {"max_tokens": 120, "messages": [{"role": "user", "content": TEXT}]}
    invoke = inspect(
        f"{CLAUDE_PATH}/invoke", {**messages, "anthropic_version": "bedrock-2023-05-31"}
    )
    own = inspect_request(
        "anthropic",
        "POST",
        "/v1/messages",
        {},
        json.dumps({**messages, "model": "claude-3-5-haiku-20241022"}).encode(),
        CONFIG,
    )
    assert (invoke.input_tokens, invoke.max_output_tokens) == (own.input_tokens, 120)
    assert invoke.estimate_usd_nanos == aws_price(
        CLAUDE, TokenUsage(input_tokens=invoke.input_tokens, output_tokens=120)
    )


@pytest.mark.parametrize(
    "body",
    [
        {"messages": "hi"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [], "inferenceConfig": {"maxTokens": -1}},
        {"messages": [], "system": "be brief"},
        b"not json",
    ],
)
def test_a_malformed_converse_body_is_refused_in_plain_words(body: object) -> None:
    with pytest.raises(MeterRequestError):
        inspect(f"{NOVA_PATH}/converse", body)


# --- responses: JSON ----------------------------------------------------------------------------


def test_converse_json_usage_with_cache_is_priced_by_genai_prices() -> None:
    request = inspect(f"{CLAUDE_PATH}/converse", CONVERSE)
    body = wire.bedrock_converse_json(
        text="Revenue up.",
        usage={
            "inputTokens": 40,
            "outputTokens": 25,
            "totalTokens": 1265,
            "cacheReadInputTokens": 1000,
            "cacheWriteInputTokens": 200,
        },
        stop_reason="end_turn",
    )
    m = measure_body(request, 200, body, CONFIG)
    usage = TokenUsage(
        input_tokens=1240, output_tokens=25, cache_read_tokens=1000, cache_write_tokens=200
    )
    assert (m.source, m.usage, m.model, m.priced) == ("usage", usage, CLAUDE, True)
    assert m.usd_nanos == aws_price(CLAUDE, usage)


def test_one_hour_cache_writes_are_told_apart() -> None:
    request = inspect(f"{CLAUDE_PATH}/converse", CONVERSE)
    usage = {
        "inputTokens": 10,
        "outputTokens": 5,
        "totalTokens": 315,
        "cacheWriteInputTokens": 300,
        "cacheDetails": [{"ttl": "1h", "inputTokens": 200}, {"ttl": "5m", "inputTokens": 100}],
    }
    body = wire.bedrock_converse_json(text="ok", usage=usage, stop_reason="end_turn")
    m = measure_body(request, 200, body, CONFIG)
    assert (m.usage.cache_write_tokens, m.usage.cache_write_1h_tokens) == (300, 200)


def test_a_claude_invoke_answer_is_priced_on_the_paths_model_id() -> None:
    """Bedrock's answer names `claude-3-5-haiku-20241022`; Bedrock bills the inference
    profile the path names (a global profile costs less than a regional one)."""
    model = "global.anthropic.claude-sonnet-4-5-20250929-v1:0"
    request = inspect(
        f"/model/{model}/invoke",
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "messages": []},
    )
    usage = wire.anthropic_usage(30, 12)
    body = wire.anthropic_message_json(
        id="msg_bdrk_1", model="claude-sonnet-4-5-20250929", text="hi", usage=usage, stop_reason="x"
    )
    m = measure_body(request, 200, body, CONFIG)
    assert (m.source, m.model) == ("usage", model)
    assert m.usd_nanos == aws_price(model, TokenUsage(input_tokens=30, output_tokens=12))
    assert m.usd_nanos < aws_price(
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0", m.usage
    )  # not the regional price


# --- responses: event streams -------------------------------------------------------------------

STREAM_USAGE = {"inputTokens": 21, "outputTokens": 9, "totalTokens": 30}
DELTAS = ["Revenue", " rose", " nine", " percent."]


def converse_stream() -> bytes:
    return b"".join(
        wire.bedrock_converse_stream(deltas=DELTAS, usage=STREAM_USAGE, stop_reason="end_turn")
    )


def feed(request, chunks: list[bytes], *, finish: bool = True):
    meter = open_stream_meter(request, EVENTSTREAM, None, CONFIG)
    out = [meter.feed(c) for c in chunks]
    assert out == chunks  # forwarded unchanged
    return meter.finish()[1] if finish else meter.partial()


def test_converse_stream_whole_and_at_every_split() -> None:
    request = inspect(f"{NOVA_PATH}/converse-stream", CONVERSE)
    body = converse_stream()
    whole = feed(request, [body])
    expected = TokenUsage(input_tokens=21, output_tokens=9)
    assert (whole.source, whole.usage) == ("usage", expected)
    assert whole.usd_nanos == aws_price(NOVA, expected)
    assert feed(request, [body[i : i + 1] for i in range(len(body))]) == whole
    for i in range(1, len(body)):
        assert feed(request, [body[:i], body[i:]]) == whole, i


@settings(max_examples=40, deadline=None)
@given(points=st.lists(st.integers(1, 400), max_size=30))
def test_converse_stream_random_chunkings(points: list[int]) -> None:
    request = inspect(f"{NOVA_PATH}/converse-stream", CONVERSE)
    body = converse_stream()
    cuts = sorted({p % len(body) for p in points} - {0})
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert feed(request, chunks).usage == TokenUsage(input_tokens=21, output_tokens=9)


def test_a_stream_cut_mid_frame_counts_what_was_streamed() -> None:
    request = inspect(f"{NOVA_PATH}/converse-stream", CONVERSE)
    frames = wire.bedrock_converse_stream(deltas=DELTAS, usage=STREAM_USAGE, stop_reason="x")
    # Up to the middle of the third delta: two words streamed, the usage never came.
    body = b"".join(frames[:3]) + frames[3][: len(frames[3]) // 2]
    m = feed(request, [body], finish=False)
    assert m.source == "counted"
    assert m.usage.input_tokens == request.input_tokens
    assert m.usage.output_tokens == count_texts(["Revenue rose"], NOVA)


def test_a_bad_crc_stops_reading_and_is_not_trusted() -> None:
    """A corrupted frame (here the one carrying usage) is not believed: the meter falls back
    to counting, and the bytes still flow to the client, whose SDK will raise."""
    request = inspect(f"{NOVA_PATH}/converse-stream", CONVERSE)
    frames = wire.bedrock_converse_stream(deltas=DELTAS, usage=STREAM_USAGE, stop_reason="x")
    last = bytearray(frames[-1])
    at = last.index(b'"inputTokens":21') + len('"inputTokens":2')
    last[at] = ord("9")  # 21 -> 29, the CRC no longer matches
    body = b"".join(frames[:-1]) + bytes(last)
    m = feed(request, [body])
    assert m.source == "counted"
    assert m.usage.input_tokens == request.input_tokens != 29


def test_a_frame_of_another_message_type_carries_no_usage() -> None:
    request = inspect(f"{NOVA_PATH}/converse-stream", CONVERSE)
    exception = wire.aws_event_message(
        {
            ":exception-type": "throttlingException",
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        json.dumps({"message": "slow down", "usage": STREAM_USAGE}).encode(),
    )
    m = feed(request, [exception])
    assert m.source != "usage"


def test_invoke_stream_unwraps_anthropic_events() -> None:
    model = "global.anthropic.claude-sonnet-4-5-20250929-v1:0"
    request = inspect(
        f"/model/{model}/invoke-with-response-stream",
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "messages": []},
    )
    usage = wire.anthropic_usage(33, 7, cache_read=100)
    events = wire.anthropic_sse(
        id="msg_bdrk_1",
        model="claude-sonnet-4-5-20250929",
        deltas=["a", " b"],
        usage=usage,
        stop_reason="end_turn",
    )
    body = b"".join(wire.bedrock_invoke_stream(events, 133, 7))
    m = feed(request, [body])
    expected = TokenUsage(input_tokens=133, output_tokens=7, cache_read_tokens=100)
    assert (m.source, m.usage, m.model) == ("usage", expected, model)
    assert m.usd_nanos == aws_price(model, expected)
    assert feed(request, [body[i : i + 1] for i in range(len(body))]) == m


def test_a_buffered_event_stream_is_measured_too() -> None:
    request = inspect(f"{NOVA_PATH}/converse-stream", CONVERSE)
    m = measure_body(request, 200, converse_stream(), CONFIG)
    assert (m.source, m.usage) == ("usage", TokenUsage(input_tokens=21, output_tokens=9))


def test_a_refused_call_costs_nothing() -> None:
    request = inspect(f"{NOVA_PATH}/converse", CONVERSE)
    m = measure_body(request, 429, wire.bedrock_error("Too many requests"), CONFIG)
    assert (m.usd_nanos, m.usage) == (0, TokenUsage())


def test_botocore_is_loaded_off_the_start_up_path() -> None:
    """The proxy imports no botocore as it starts; its warm-up thread loads the event-stream
    parser when the policy meters Bedrock, so no stream imports it on the event loop."""
    script = (
        "import sys, drawdown.addon, drawdown.meter as m\n"
        "print('botocore' in sys.modules)\n"
        "m.warm_up()\n"
        "print('botocore.eventstream' in sys.modules)\n"
        "m.warm_up(bedrock=True)\n"
        "print('botocore.eventstream' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False", "True"]
