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
    unread_request,
)
from drawdown.meter.config import DEFAULT_SAFETY_FACTORS
from drawdown.meter.images import anthropic_image_tokens
from drawdown.meter.prices import to_nanos
from drawdown.meter.tokens import count_texts
from drawdown.meter.types import MeterRequestError
from hypothesis import given, settings
from hypothesis import strategies as st
from meter_corpus import png as png_header

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
        # Every family billed per token: Bedrock reports the usage of any invoke body.
        ("POST", "/model/meta.llama3-8b-instruct-v1%3A0/invoke", "tokens"),
        ("POST", "/model/us.amazon.nova-pro-v1%3A0/invoke-with-response-stream", "tokens"),
        ("POST", "/model/amazon.titan-embed-text-v2%3A0/invoke", "tokens"),
        ("POST", "/model/cohere.command-r-plus-v1%3A0/invoke", "tokens"),
        ("POST", "/model/openai.gpt-oss-120b-1%3A0/invoke", "tokens"),
        (
            "POST",
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Aapplication-inference-profile%2Fab12/invoke",
            "tokens",
        ),
        # Image and video models bill per image or second: a step, $0.
        ("POST", "/model/stability.sd3-5-large-v1%3A0/invoke", "step"),
        ("POST", "/model/amazon.nova-canvas-v1%3A0/invoke", "step"),
        ("POST", "/model/amazon.titan-image-generator-v2%3A0/invoke", "step"),
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
    png = base64.b64encode(png_header(800, 600)).decode()
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


# --- InvokeModel for every family ---------------------------------------------------------------

LLAMA = "us.meta.llama3-2-11b-instruct-v1:0"
NOVA_LITE = "global.amazon.nova-2-lite-v1:0"
TITAN = "amazon.titan-text-express-v1"
GPT_OSS = "openai.gpt-oss-120b-1:0"
SYSTEM = "You are the board's analyst."


def invoke_path(model: str, stream: bool = False) -> str:
    return f"/model/{model.replace(':', '%3A')}/invoke" + (
        "-with-response-stream" if stream else ""
    )


# (model, body, its prompt texts in the order read, message framing, output cap)
FAMILIES = {
    "nova": (
        NOVA,
        {
            "schemaVersion": "messages-v1",
            "system": [{"text": SYSTEM}],
            "messages": [{"role": "user", "content": [{"text": TEXT}]}],
            "inferenceConfig": {"max_new_tokens": 300, "temperature": 0.2},
        },
        [SYSTEM, TEXT],
        6 + 4,
        300,
    ),
    "llama": (LLAMA, {"prompt": TEXT, "max_gen_len": 256}, [TEXT], 0, 256),
    "titan": (
        TITAN,
        {"inputText": TEXT, "textGenerationConfig": {"maxTokenCount": 200, "topP": 0.9}},
        [TEXT],
        0,
        200,
    ),
    "mistral": (
        "mistral.mistral-7b-instruct-v0:2",
        {"prompt": f"<s>[INST] {TEXT} [/INST]", "max_tokens": 150},
        [f"<s>[INST] {TEXT} [/INST]"],
        0,
        150,
    ),
    "gpt-oss": (
        GPT_OSS,
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "text", "text": TEXT}]},
            ],
            "max_completion_tokens": 500,
        },
        [SYSTEM, TEXT],
        6 + 2 * 4,
        500,
    ),
    "deepseek": (
        "us.deepseek.r1-v1:0",
        {"prompt": TEXT, "max_tokens": 1000, "n": 2},
        [TEXT],
        0,
        2000,
    ),
    "titan-embed": (
        "amazon.titan-embed-text-v2:0",
        {"inputText": TEXT, "dimensions": 512},
        [TEXT],
        0,
        0,
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_an_invoke_body_is_estimated_by_its_familys_own_fields(family: str) -> None:
    model, body, texts, framing, cap = FAMILIES[family]
    request = inspect(invoke_path(model), body)
    assert (request.billable, request.endpoint, request.model, request.priced) == (
        True, "invoke", model, True,
    )  # fmt: skip
    assert request.input_tokens == count_texts(texts, model) + framing
    assert request.max_output_tokens == cap
    assert request.estimate_usd_nanos == aws_price(
        model, TokenUsage(input_tokens=request.input_tokens, output_tokens=cap)
    )
    assert request.rewritten_body is None  # signed: never rewritten


def test_cohere_chat_and_an_unknown_format_are_estimated_too() -> None:
    history = [
        {"role": "USER", "message": "Last quarter?"},
        {"role": "CHATBOT", "message": "Flat."},
    ]
    cohere = inspect(
        invoke_path("cohere.command-r-plus-v1:0"),
        {"message": TEXT, "chat_history": history, "preamble": SYSTEM, "max_tokens": 100},
    )
    texts = [TEXT, SYSTEM, json.dumps(history, separators=(",", ":"))]
    assert (cohere.input_tokens, cohere.max_output_tokens) == (count_texts(texts, None), 100)
    assert not cohere.priced  # genai-prices' aws lists no Cohere model: the fallback price
    # A format no field names: the whole body is counted, and the policy's default cap.
    body = {"instruction": TEXT, "config": {"length": "short"}}
    other = inspect(invoke_path("writer.palmyra-x5-v1:0"), body)
    assert other.input_tokens == count_texts([json.dumps(body, separators=(",", ":"))], None)
    assert other.max_output_tokens == CONFIG.default_max_output_tokens
    assert other.priced


def test_an_invoke_image_counts_by_its_size() -> None:
    png = base64.b64encode(png_header(800, 600)).decode()
    plain = inspect(invoke_path(LLAMA), {"prompt": TEXT, "max_gen_len": 10})
    with_image = inspect(invoke_path(LLAMA), {"prompt": TEXT, "images": [png], "max_gen_len": 10})
    assert with_image.input_tokens - plain.input_tokens == anthropic_image_tokens((800, 600))
    nova = FAMILIES["nova"][1]
    blocks = [{"text": TEXT}, {"image": {"format": "png", "source": {"bytes": png}}}]
    nova_image = {**nova, "messages": [{"role": "user", "content": blocks}]}
    assert inspect(invoke_path(NOVA), nova_image).input_tokens - inspect(
        invoke_path(NOVA), nova
    ).input_tokens == anthropic_image_tokens((800, 600))


def test_a_claude_body_on_an_application_profile_is_read_as_anthropic() -> None:
    """An application inference profile's ARN names no model: the body's anthropic_version
    says it is Claude's format; the call is priced at the fallback price."""
    arn = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/ab12cd"
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 70, "messages": []}
    request = inspect(f"/model/{arn.replace(':', '%3A').replace('/', '%2F')}/invoke", body)
    assert (request.model, request.max_output_tokens, request.priced) == (arn, 70, False)


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (LLAMA, {"prompt": TEXT, "max_gen_len": -1}),
        (LLAMA, {"prompt": TEXT, "max_gen_len": "long"}),
        (NOVA, {"messages": "hi"}),
        (NOVA, {"messages": ["hi"]}),
        (NOVA, {"messages": [], "inferenceConfig": [1]}),
        (TITAN, {"inputText": TEXT, "textGenerationConfig": {"maxTokenCount": 1.5}}),
        (GPT_OSS, {"messages": [], "n": "two"}),
        (LLAMA, b"not json"),
        (LLAMA, b"[1, 2]"),
    ],
)
def test_a_malformed_invoke_body_is_refused_in_plain_words(model: str, body: object) -> None:
    with pytest.raises(MeterRequestError) as refused:
        inspect(invoke_path(model), body)
    assert "Traceback" not in str(refused.value) and str(refused.value)


# Bedrock's own counts differ from the body's here only so that the tests can tell which was read.
HEADERS = wire.bedrock_token_headers(40, 12, cache_read=1000, cache_write=200)
FROM_HEADERS = TokenUsage(
    input_tokens=1240, output_tokens=12, cache_read_tokens=1000, cache_write_tokens=200
)


@pytest.mark.parametrize(
    ("family", "answer", "from_body"),
    [
        (
            "nova",
            wire.nova_invoke_json(
                text="Up.", usage=wire.nova_usage(39, 11, cache_read=5), stop_reason="end_turn"
            ),
            TokenUsage(input_tokens=44, output_tokens=11, cache_read_tokens=5),
        ),
        (
            "llama",
            wire.llama_invoke_json(
                text="Up.", input_tokens=39, output_tokens=11, stop_reason="stop"
            ),
            TokenUsage(input_tokens=39, output_tokens=11),
        ),
        (
            "titan",
            wire.titan_invoke_json(text="Up.", input_tokens=39, output_tokens=11, reason="FINISH"),
            TokenUsage(input_tokens=39, output_tokens=11),
        ),
        (
            "gpt-oss",
            json.dumps(
                {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Up."}}],
                    "usage": {"prompt_tokens": 39, "completion_tokens": 11, "total_tokens": 50},
                }
            ).encode(),
            TokenUsage(input_tokens=39, output_tokens=11),
        ),
    ],
)
def test_an_invoke_answer_is_charged_bedrocks_header_counts_else_its_bodys(
    family: str, answer: bytes, from_body: TokenUsage
) -> None:
    model, body = FAMILIES[family][:2]
    request = inspect(invoke_path(model), body)
    m = measure_body(request, 200, answer, CONFIG, headers=HEADERS)
    assert (m.source, m.usage, m.model) == ("usage", FROM_HEADERS, model)
    assert m.usd_nanos == aws_price(model, FROM_HEADERS)
    lowered = {k.lower(): v for k, v in HEADERS.items()}  # header names are case-insensitive
    assert measure_body(request, 200, answer, CONFIG, headers=lowered) == m
    fallback = measure_body(request, 200, answer, CONFIG)
    assert (fallback.source, fallback.usage) == ("usage", from_body)
    assert fallback.usd_nanos == aws_price(model, from_body)


def test_an_invoke_answer_without_any_usage_is_counted() -> None:
    model, body = FAMILIES["mistral"][:2]
    request = inspect(invoke_path(model), body)
    answer = json.dumps({"outputs": [{"text": "Revenue rose.", "stop_reason": "stop"}]}).encode()
    m = measure_body(request, 200, answer, CONFIG)
    assert m.source == "counted"
    assert m.usage == TokenUsage(
        input_tokens=request.input_tokens, output_tokens=count_texts(["Revenue rose."], model)
    )
    no_counts = {"X-Amzn-Bedrock-Input-Token-Count": "", "x-amzn-requestid": "r1"}
    assert measure_body(request, 200, answer, CONFIG, headers=no_counts) == m


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Amzn-Bedrock-Input-Token-Count", "12x"),
        ("X-Amzn-Bedrock-Input-Token-Count", "-40"),
        ("X-Amzn-Bedrock-Cache-Read-Input-Token-Count", "1e3"),
        ("X-Amzn-Bedrock-Output-Token-Count", "9" * 5000),  # past int()'s digit limit
    ],
)
def test_a_token_count_header_that_is_not_a_number_is_not_trusted(header: str, value: str) -> None:
    """One count unreadable: the others alone would charge its tokens as 0 (an input count of
    "12x" read as no input). The answer's own fields are charged instead."""
    model, body = FAMILIES["llama"][:2]
    request = inspect(invoke_path(model), body)
    answer = wire.llama_invoke_json(text="Up.", input_tokens=39, output_tokens=11, stop_reason="s")
    m = measure_body(request, 200, answer, CONFIG, headers={**HEADERS, header: value})
    assert (m.source, m.usage) == ("usage", TokenUsage(input_tokens=39, output_tokens=11))
    assert m == measure_body(request, 200, answer, CONFIG)


def test_claudes_own_usage_comes_before_the_headers() -> None:
    """Anthropic's usage splits the 1 h cache writes, which the headers do not: it is read
    first; the headers stand in when the body has none."""
    request = inspect(
        f"{CLAUDE_PATH}/invoke",
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "messages": []},
    )
    usage = wire.anthropic_usage(30, 12)
    answer = wire.anthropic_message_json(
        id="msg_bdrk_1", model="claude-3-5-haiku-20241022", text="hi", usage=usage, stop_reason="x"
    )
    m = measure_body(request, 200, answer, CONFIG, headers=HEADERS)
    assert m.usage == TokenUsage(input_tokens=30, output_tokens=12)
    bare = json.loads(answer)
    del bare["usage"]
    m = measure_body(request, 200, json.dumps(bare).encode(), CONFIG, headers=HEADERS)
    assert (m.source, m.usage) == ("usage", FROM_HEADERS)
    assert m.usd_nanos == aws_price(CLAUDE, FROM_HEADERS)


DELTAS_WORDS = ["Revenue", " rose", " nine", " percent."]
METRICS = wire.bedrock_invocation_metrics(50, 4, cache_read=64)
FROM_METRICS = TokenUsage(input_tokens=114, output_tokens=4, cache_read_tokens=64)


def family_chunks(family: str) -> list[dict]:
    if family == "nova":
        usage = wire.nova_usage(49, 4)
        return wire.nova_invoke_chunks(deltas=DELTAS_WORDS, usage=usage, stop_reason="end_turn")
    if family == "llama":
        return wire.llama_invoke_chunks(deltas=DELTAS_WORDS, input_tokens=49, stop_reason="stop")
    return wire.titan_invoke_chunks(deltas=DELTAS_WORDS, input_tokens=49, reason="FINISH")


@pytest.mark.parametrize("family", ["nova", "llama", "titan"])
def test_invoke_streams_are_charged_bedrocks_metrics_at_every_split(family: str) -> None:
    model, body = FAMILIES[family][:2]
    request = inspect(invoke_path(model, stream=True), body)
    assert request.stream
    stream = b"".join(wire.bedrock_chunk_stream(family_chunks(family), METRICS))
    whole = feed(request, [stream])
    assert (whole.source, whole.usage, whole.model) == ("usage", FROM_METRICS, model)
    assert whole.usd_nanos == aws_price(model, FROM_METRICS)
    for i in range(1, len(stream)):
        assert feed(request, [stream[:i], stream[i:]]) == whole, i
    assert measure_body(request, 200, stream, CONFIG) == whole  # buffered after all


@settings(max_examples=30, deadline=None)
@given(points=st.lists(st.integers(1, 2000), max_size=40))
def test_a_llama_stream_random_chunkings(points: list[int]) -> None:
    request = inspect(invoke_path(LLAMA, stream=True), FAMILIES["llama"][1])
    body = b"".join(wire.bedrock_chunk_stream(family_chunks("llama"), METRICS))
    cuts = sorted({p % len(body) for p in points} - {0})
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert feed(request, chunks).usage == FROM_METRICS


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("nova", TokenUsage(input_tokens=49, output_tokens=4)),
        ("llama", TokenUsage(input_tokens=49, output_tokens=4)),
        ("titan", TokenUsage(input_tokens=49, output_tokens=4)),
    ],
)
def test_an_invoke_stream_without_metrics_is_charged_its_familys_counts(
    family: str, expected: TokenUsage
) -> None:
    model, body = FAMILIES[family][:2]
    request = inspect(invoke_path(model, stream=True), body)
    frames = wire.bedrock_chunk_stream([*family_chunks(family), {}], {"other": 1})
    m = feed(request, [b"".join(frames)])
    assert (m.source, m.usage) == ("usage", expected)


@pytest.mark.parametrize(
    "bad",
    [
        {"inputTokenCount": "fifty"},
        {"inputTokenCount": -50},
        {"outputTokenCount": True},
        {"cacheReadInputTokenCount": float("nan")},
        {"cacheWriteInputTokenCount": "-1"},
    ],
)
def test_invocation_metrics_with_a_count_that_is_not_a_number_are_not_trusted(bad: dict) -> None:
    """As for the headers: one unreadable count would be charged as 0 tokens; the family's
    own counts are charged instead."""
    model, body = FAMILIES["llama"][:2]
    request = inspect(invoke_path(model, stream=True), body)
    frames = wire.bedrock_chunk_stream(family_chunks("llama"), {**METRICS, **bad})
    m = feed(request, [b"".join(frames)])
    assert (m.source, m.usage) == ("usage", TokenUsage(input_tokens=49, output_tokens=4))


@pytest.mark.parametrize(
    "read",
    [{"inputTokenCount": "50"}, {"cacheReadInputTokenCount": 63.5}, {"inputTokenCount": 50.0}],
)
def test_invocation_metrics_written_as_digits_or_fractions_are_read(read: dict) -> None:
    """As every usage count: digits read as their number, a fraction rounded up."""
    model, body = FAMILIES["llama"][:2]
    request = inspect(invoke_path(model, stream=True), body)
    frames = wire.bedrock_chunk_stream(family_chunks("llama"), {**METRICS, **read})
    m = feed(request, [b"".join(frames)])
    assert (m.source, m.usage) == ("usage", FROM_METRICS)


def test_a_llama_stream_cut_short_counts_what_was_streamed() -> None:
    """Cut before the last chunk: the prompt count Llama sent first, and the output streamed
    so far (its running count, or the text counted, whichever is more)."""
    request = inspect(invoke_path(LLAMA, stream=True), FAMILIES["llama"][1])
    frames = wire.bedrock_chunk_stream(family_chunks("llama"), METRICS)
    m = feed(request, [b"".join(frames[:3]) + frames[3][:20]], finish=False)
    assert m.source == "counted"
    assert m.usage.input_tokens == 49
    assert m.usage.output_tokens == max(3, count_texts(["Revenue rose nine"], LLAMA))


def test_a_claude_stream_without_anthropic_usage_takes_bedrocks_metrics() -> None:
    request = inspect(
        f"{CLAUDE_PATH}/invoke-with-response-stream",
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "messages": []},
    )
    chunks = [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a"}},
        {"type": "message_stop"},
    ]
    m = feed(request, [b"".join(wire.bedrock_chunk_stream(chunks, METRICS))])
    assert (m.source, m.usage) == ("usage", FROM_METRICS)
    assert m.usd_nanos == aws_price(CLAUDE, FROM_METRICS)


def test_an_unread_invoke_is_still_charged_what_bedrock_reports() -> None:
    """Shadow mode forwards a body too large to read: the headers price it all the same."""
    request = unread_request("bedrock", "POST", invoke_path(LLAMA))
    assert request.billable and request.model == LLAMA
    m = measure_body(request, 200, b'{"generation": "x"}', CONFIG, headers=HEADERS)
    assert (m.source, m.usage, m.usd_nanos) == (
        "usage",
        FROM_HEADERS,
        aws_price(LLAMA, FROM_HEADERS),
    )


def test_cross_region_profiles_are_priced_apart() -> None:
    """`global.` and `us.` Nova 2 Lite differ in genai-prices' aws table: each invoke is priced
    on the profile its path names."""
    body = FAMILIES["nova"][1]
    regional = "us.amazon.nova-2-lite-v1:0"
    prices = [
        measure_body(inspect(invoke_path(m), body), 200, b"{}", CONFIG, headers=HEADERS).usd_nanos
        for m in (NOVA_LITE, regional)
    ]
    assert prices == [aws_price(NOVA_LITE, FROM_HEADERS), aws_price(regional, FROM_HEADERS)]
    assert prices[0] < prices[1]


@pytest.mark.parametrize("shape", ["one big message in 1 KiB pieces", "tiny messages at once"])
def test_an_event_stream_is_framed_in_time_linear_in_its_bytes(
    monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    """botocore's buffer appends by copying and slices what is left after each message: a
    message trickled in 1 KiB pieces, or a chunk of thousands of tiny messages, cost work
    growing with the square of its size, on the event loop (24 MB from an upstream stalled
    every agent for 85 s). Counted in the bytes botocore's buffer holds each time it appends
    or moves past a message (not timed): now each message is handed over once, whole."""
    from botocore.eventstream import EventStreamBuffer

    held: list[int] = []
    add_data, advance = EventStreamBuffer.add_data, EventStreamBuffer._prepare_for_next_message

    def adding(self: EventStreamBuffer, data: bytes) -> None:
        add_data(self, data)
        held.append(len(self._data))

    def advancing(self: EventStreamBuffer) -> None:
        held.append(len(self._data))
        advance(self)

    monkeypatch.setattr(EventStreamBuffer, "add_data", adding)
    monkeypatch.setattr(EventStreamBuffer, "_prepare_for_next_message", advancing)
    request = inspect(f"{NOVA_PATH}/converse-stream", CONVERSE)
    tiny = shape == "tiny messages at once"
    deltas = [f"w{n}" for n in range(4000)] if tiny else ["x" * 1_000_000]  # ~100 B or ~1 MB
    body = b"".join(
        wire.bedrock_converse_stream(deltas=deltas, usage=STREAM_USAGE, stop_reason="x")
    )
    pieces = [body[i : i + 1024] for i in range(0, len(body), 1024)]
    chunks = [body] if tiny else pieces
    assert feed(request, chunks).usage == TokenUsage(input_tokens=21, output_tokens=9)
    assert sum(held) <= 3 * len(body), f"{sum(held):,} bytes held for a {len(body):,}-byte stream"


@pytest.mark.parametrize("total", [0, 15, (12 + 128 * 1024 + 24 * 1024 * 1024 + 4) + 1])
def test_an_event_message_of_an_impossible_length_stops_reading(total: int) -> None:
    """A prelude declaring fewer bytes than a prelude and CRC, or more than botocore allows
    (a 4 GB claim would be waited for): reading stops at once, the bytes still flow, and the
    call is counted as streamed so far."""
    request = inspect(f"{NOVA_PATH}/converse-stream", CONVERSE)
    frames = wire.bedrock_converse_stream(deltas=DELTAS, usage=STREAM_USAGE, stop_reason="x")
    bogus = total.to_bytes(4, "big") + b"\0" * 60
    m = feed(request, [frames[0], bogus, *frames[1:]])
    assert m.source == "counted"
