"""A `provider: gemini` action names Google's hosts, not the format every path of them speaks:
Gemini's OpenAI-compatible endpoint (AI Studio `/v1beta/openai/…`, Vertex
`…/endpoints/openapi/…`) speaks OpenAI's, Claude on Vertex (`…/publishers/anthropic/…`)
Anthropic's. Each is read and metered in that format and priced at its host's prices (google,
then the format's family); before, all three were $0 steps. Expected figures come from
genai-prices itself."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import genai_prices
import pytest
from drawdown.meter import (
    MeterConfig,
    charging,
    inspect_request,
    measure_body,
    open_stream_meter,
    origin,
    unread_request,
    wire_format,
)

CONFIG = MeterConfig()
AI_STUDIO = "generativelanguage.googleapis.com"
VERTEX = "us-central1-aiplatform.googleapis.com"
VERTEX_OPENAPI = "/v1/projects/p/locations/us-central1/endpoints/openapi/chat/completions"
VERTEX_CLAUDE = (
    "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929"
)


def _nanos(usd: Decimal) -> int:
    return math.ceil(usd * 1_000_000_000)


def _google(model: str, **usage: int) -> int:
    price = genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id="google")
    return _nanos(price.total_price)


def _inspect(host: str, path: str, body: dict[str, object], provider: str = "gemini"):
    raw = json.dumps(body).encode()
    return inspect_request(
        provider, "POST", path, {}, raw, CONFIG, origin=origin("https", host, 443)
    )


@pytest.mark.parametrize(
    ("provider", "path", "spoken"),
    [
        ("gemini", "/v1beta/openai/chat/completions", "openai"),
        ("gemini", "/v1beta/openai/embeddings", "openai"),
        ("gemini", VERTEX_OPENAPI, "openai"),
        (
            "gemini",
            "/v1beta1/projects/p/locations/global/endpoints/openapi/chat/completions",
            "openai",
        ),
        ("gemini", VERTEX_CLAUDE + ":rawPredict", "anthropic"),
        ("GEMINI", VERTEX_CLAUDE + ":streamRawPredict?alt=sse", "anthropic"),
        ("gemini", "/v1beta/models/gemini-2.5-flash:generateContent", "gemini"),
        (
            "gemini",
            "/v1/projects/p/locations/l/publishers/google/models/g:generateContent",
            "gemini",
        ),
        ("gemini", "/v1beta/tunedModels/openai:generateContent", "gemini"),
        ("openai", "/v1/chat/completions", "openai"),
        ("openai", "/openai/deployments/d/chat/completions", "openai"),
        ("anthropic", "/v1/messages", "anthropic"),
    ],
)
def test_a_gemini_actions_paths_speak_the_format_they_name(
    provider: str, path: str, spoken: str
) -> None:
    assert wire_format(provider, path) == spoken


@pytest.mark.parametrize(
    ("host", "path", "model"),
    [
        (AI_STUDIO, "/v1beta/openai/chat/completions", "gemini-2.5-flash"),
        (VERTEX, VERTEX_OPENAPI, "google/gemini-2.5-flash"),
    ],
)
def test_geminis_openai_compatible_chat_is_charged_googles_price(
    host: str, path: str, model: str
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    request = _inspect(host, path, body)
    assert (request.provider, request.endpoint, request.billable) == (
        "openai",
        "chat.completions",
        True,
    )
    assert request.priced and request.price_provider == "google"
    assert request.safety_factor == CONFIG.safety_factors["gemini"]  # Gemini's tokenizer
    want_estimate = _google(
        "gemini-2.5-flash", input_tokens=request.input_tokens, output_tokens=100
    )
    assert request.estimate_usd_nanos == want_estimate
    answer = {
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 5000, "completion_tokens": 2000, "total_tokens": 7000},
    }
    m = measure_body(request, 200, json.dumps(answer).encode(), CONFIG)
    assert (m.source, m.priced) == ("usage", True)
    assert m.usd_nanos == _google("gemini-2.5-flash", input_tokens=5000, output_tokens=2000) > 0
    # The proxy's shadow path, and replay's question, route it the same way.
    assert charging("gemini", "POST", path) == "tokens"
    unread = unread_request("gemini", "POST", path, origin=origin("https", host, 443))
    assert (unread.provider, unread.billable, unread.step) == ("openai", True, False)


def test_a_gemini_compatible_stream_is_asked_for_its_usage_and_charged() -> None:
    body = {
        "model": "gemini-2.5-flash",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    request = _inspect(AI_STUDIO, "/v1beta/openai/chat/completions", body)
    assert request.stream and request.strip_usage_chunk
    assert json.loads(request.rewritten_body or b"")["stream_options"] == {"include_usage": True}
    events = [
        {"choices": [{"index": 0, "delta": {"content": "o"}}], "model": "gemini-2.5-flash"},
        {"choices": [{"index": 0, "delta": {"content": "k"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}},
    ]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
    shown = meter.feed(sse.encode())
    rest, m = meter.finish()
    assert b'"usage"' not in shown + rest  # the chunk the client did not ask for
    assert (m.source, m.usage.input_tokens, m.usage.output_tokens) == ("usage", 40, 9)
    assert m.usd_nanos == _google("gemini-2.5-flash", input_tokens=40, output_tokens=9)


def test_thinking_left_out_of_completion_tokens_is_charged_as_output() -> None:
    """Google's compatible endpoint may count thinking apart from completion_tokens (its
    total_tokens is prompt + completion + reasoning): the reasoning is billed as output."""
    request = _inspect(
        AI_STUDIO,
        "/v1beta/openai/chat/completions",
        {"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "think"}]},
    )
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 300,
        "total_tokens": 1512,
        "completion_tokens_details": {"reasoning_tokens": 1200},
    }
    answer = {"model": "gemini-2.5-flash", "choices": [], "usage": usage}
    m = measure_body(request, 200, json.dumps(answer).encode(), CONFIG)
    assert (m.usage.output_tokens, m.usage.reasoning_tokens) == (1500, 1200)
    assert m.usd_nanos == _google("gemini-2.5-flash", input_tokens=12, output_tokens=1500)
    # OpenAI's own usage counts reasoning inside completion_tokens: not added twice.
    inside = {**usage, "completion_tokens": 1500, "total_tokens": 1512}
    m = measure_body(request, 200, json.dumps({**answer, "usage": inside}).encode(), CONFIG)
    assert m.usage.output_tokens == 1500


@pytest.mark.parametrize("action", ["rawPredict", "streamRawPredict"])
def test_claude_on_vertex_under_a_gemini_action_is_charged_anthropics_price(action: str) -> None:
    body = {
        "anthropic_version": "vertex-2023-10-16",
        "max_tokens": 500,
        "messages": [{"role": "user", "content": "hi"}],
    }
    request = _inspect("us-east5-aiplatform.googleapis.com", f"{VERTEX_CLAUDE}:{action}", body)
    assert (request.provider, request.endpoint, request.model) == (
        "anthropic",
        "messages",
        "claude-sonnet-4-5@20250929",
    )
    assert request.billable and request.priced and request.estimate_usd_nanos > 0
    assert request.stream == (action == "streamRawPredict")
    usage = {"input_tokens": 500, "cache_read_input_tokens": 2000, "output_tokens": 80}
    answer = {
        "type": "message",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "ok"}],
        "usage": usage,
    }
    m = measure_body(request, 200, json.dumps(answer).encode(), CONFIG)
    want = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=2500, cache_read_tokens=2000, output_tokens=80),
        "claude-sonnet-4-5",
        provider_id="anthropic",
    )
    assert (m.source, m.priced, m.usd_nanos) == ("usage", True, _nanos(want.total_price))
    assert charging("gemini", "POST", f"{VERTEX_CLAUDE}:{action}") == "tokens"
