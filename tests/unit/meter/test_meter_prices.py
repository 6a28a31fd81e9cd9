"""Dollar figures: integer nano-dollars, computed independently with genai-prices."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import genai_prices
import pytest
from drawdown.meter import (
    MeterConfig,
    PricePerMillion,
    TokenUsage,
    inspect_request,
    measure_body,
    open_stream_meter,
    price_usage,
)
from meter_corpus import CONFIG, MANIFEST, entry_id, feed, request_for, response_bytes


def _nanos(usd: Decimal) -> int:
    return math.ceil(usd * 1_000_000_000)


def _entry(name: str):
    return next(e for e in MANIFEST if entry_id(e) == name)


def _measure(name: str):
    entry = _entry(name)
    request = request_for(entry)
    if entry["streamed"]:
        return feed(request, entry, [response_bytes(entry)])[1]
    return measure_body(request, entry["status"], response_bytes(entry), CONFIG)


# Each expected price is computed here from the manifest's raw usage, mapped by hand onto
# genai-prices' usage keys: a mapping bug in the meter (say, cached tokens charged at the
# full input price on top of the cache price) makes these differ.
CASES = {
    # OpenAI: cached_tokens is a subset of prompt_tokens.
    "openai-chat-completions-12": (
        "gpt-5.6-sol",
        "openai",
        genai_prices.Usage(input_tokens=4020, cache_read_tokens=4012, output_tokens=4),
    ),
    "openai-chat-completions-11": (
        "gpt-5.6-sol",
        "openai",
        genai_prices.Usage(input_tokens=4020, cache_write_tokens=4012, output_tokens=4),
    ),
    # Reasoning tokens are part of completion tokens.
    "openai-chat-completions-15": (
        "o3-mini-2025-01-31",
        "openai",
        genai_prices.Usage(input_tokens=11, output_tokens=809, output_reasoning_tokens=768),
    ),
    # Anthropic: input_tokens excludes cache reads and writes.
    "anthropic-messages-04": (
        "claude-sonnet-4-5-20250929",
        "anthropic",
        genai_prices.Usage(
            input_tokens=3 + 1111 + 418,
            cache_read_tokens=1111,
            cache_write_tokens=418,
            output_tokens=33,
        ),
    ),
    # Anthropic stream: input from message_delta (1591), not message_start (702).
    "anthropic-messages-12": (
        "claude-sonnet-4-6",
        "anthropic",
        genai_prices.Usage(input_tokens=1591, output_tokens=175),
    ),
    # Gemini: cached and audio tokens are subsets of the prompt, thoughts are output.
    "gemini-generateContent-04": (
        "gemini-2.5-flash",
        "google",
        genai_prices.Usage(
            input_tokens=17713,
            cache_read_tokens=17379,
            input_audio_tokens=1917,
            cache_audio_read_tokens=1881,
            output_tokens=68 + 821,
            output_reasoning_tokens=821,
        ),
    ),
    # Gemini: tool-use prompt tokens are input, grounding billed per grounded prompt.
    "gemini-generateContent-06": (
        "gemini-2.5-flash",
        "google",
        genai_prices.Usage(input_tokens=11 + 90, output_tokens=105 + 131, web_searches=1),
    ),
    # OpenAI Responses: a built-in web search, billed outside usage.
    "openai-responses-07": (
        "gpt-5-2025-08-07",
        "openai",
        genai_prices.Usage(
            input_tokens=9463,
            cache_read_tokens=8320,
            output_tokens=582,
            output_reasoning_tokens=512,
            web_searches=1,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cost_matches_genai_prices(name):
    model, provider_id, usage = CASES[name]
    price = genai_prices.calc_price(
        usage, model, provider_id=provider_id, price_context={"service_tier": "default"}
    )
    measurement = _measure(name)
    assert measurement.usd_nanos == _nanos(price.total_price)
    assert measurement.priced


def test_anthropic_list_price_by_hand():
    # claude-sonnet-4-5 at $3 in / $0.30 cache read / $3.75 cache write / $15 out per MTok:
    # 3*3 + 1111*0.3 + 418*3.75 + 33*15 = 2404.8 $/MTok -> $0.0024048
    assert _measure("anthropic-messages-04").usd_nanos == 2_404_800


def test_advisor_iterations_priced_on_their_own_model():
    measurement = _measure("anthropic-messages-09")
    own = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1128 + 1262, output_tokens=110 + 11),
        "claude-sonnet-5",
        provider_id="anthropic",
    ).total_price
    advisor = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=2518, output_tokens=22),
        "claude-opus-4-8",
        provider_id="anthropic",
    ).total_price
    assert measurement.usd_nanos == _nanos(own + advisor)
    assert dict(measurement.other_models) == {
        "claude-opus-4-8": TokenUsage(input_tokens=2518, output_tokens=22)
    }


def test_compaction_bills_every_iteration():
    measurement = _measure("anthropic-messages-15")
    # iterations: compaction (100 in + 55096 cache read, 83 out) + message (181 in, 8 out)
    assert measurement.usage == TokenUsage(
        input_tokens=100 + 55096 + 181, cache_read_tokens=55096, output_tokens=91
    )


def test_extras_reported():
    assert dict(_measure("openai-responses-06").extras) == {"web_search_calls": 1}
    assert dict(_measure("openai-responses-11").extras) == {"code_interpreter_calls": 3}
    assert dict(_measure("anthropic-messages-17").extras) == {"web_search_calls": 1}
    assert dict(_measure("anthropic-messages-08").extras) == {"web_search_calls": 1}
    assert dict(_measure("gemini-streamGenerateContent-05").extras) == {"web_search_calls": 1}
    # gpt-4o-mini-search-preview searches on every chat call
    assert dict(_measure("openai-chat-completions-06").extras) == {"web_search_calls": 1}
    assert dict(_measure("openai-chat-completions-01").extras) == {}


def test_unknown_model_uses_fallback_price():
    usage = TokenUsage(input_tokens=1000, output_tokens=100)
    nanos, priced = price_usage("openai", "no-such-model-9000", usage, CONFIG)
    assert not priced
    # default fallback: $15 in / $75 out per MTok
    assert nanos == 1000 * 15_000 + 100 * 75_000
    nanos, priced = price_usage("openai", None, usage, CONFIG)
    assert not priced and nanos > 0


def test_unknown_model_request_and_response():
    body = b'{"model": "acme-llm-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}'
    request = inspect_request("openai", "POST", "/v1/chat/completions", {}, body, CONFIG)
    assert not request.priced
    assert request.estimate_usd_nanos > 0
    response = b'{"model": "acme-llm-1", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}'
    m = measure_body(request, 200, response, CONFIG)
    assert not m.priced
    assert m.usd_nanos == 9 * 15_000 + 3 * 75_000


def test_audio_a_model_lists_no_price_for_is_charged_at_the_fallback_price():
    """gpt-4o-mini-audio-preview bills audio at $10/$20 per million, text at $0.15/$0.60, but
    genai-prices lists only the text prices: its audio tokens were charged as text, priced = 1
    (recorded -07: 12 audio tokens of 18 output). They are charged at the fallback price now,
    the text at genai-prices' price, unpriced; the tokens stay as reported."""
    m = _measure("openai-chat-completions-07")
    assert m.usage == TokenUsage(input_tokens=22, output_tokens=18, output_audio_tokens=12)
    text = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=22, output_tokens=6),
        "gpt-4o-mini-audio-preview",
        provider_id="openai",
    ).total_price
    fallback = 12 * CONFIG.fallback_price.output / 1_000_000
    assert (m.priced, m.usd_nanos) == (False, _nanos(text + fallback))
    # gpt-4o-audio-preview, its one input audio token (-08), likewise.
    m = _measure("openai-chat-completions-08")
    assert m.usage == TokenUsage(input_tokens=28, output_tokens=17, input_audio_tokens=1)
    text = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=27, output_tokens=17),
        "gpt-4o-audio-preview",
        provider_id="openai",
    ).total_price
    assert (m.priced, m.usd_nanos) == (False, _nanos(text + CONFIG.fallback_price.input / 10**6))


@pytest.mark.parametrize(
    ("provider", "model", "usage"),
    [
        # Audio priced apart by genai-prices: its own price.
        ("openai", "gpt-4o-realtime-preview", TokenUsage(100, 50, input_audio_tokens=80)),
        ("openai", "gpt-audio", TokenUsage(100, 50, input_audio_tokens=80, output_audio_tokens=40)),
        # Google lists no audio price where audio costs the text price (gemini-2.5-pro).
        ("gemini", "gemini-2.5-pro", TokenUsage(100, 50, input_audio_tokens=80)),
        # A speech model's output is all audio: its output price is audio's.
        ("openai", "gpt-4o-mini-tts", TokenUsage(100, 50, output_audio_tokens=50)),
        # Image tokens: billed as text by chat models (no rule here).
        ("openai", "gpt-4o", TokenUsage(1000, 50, input_image_tokens=765)),
    ],
)
def test_audio_with_its_own_price_or_priced_as_text_stays_priced(provider, model, usage):
    provider_id = {"gemini": "google"}.get(provider, provider)
    kept = {k: v for k, v in vars(usage).items() if v}
    want = genai_prices.calc_price(genai_prices.Usage(**kept), model, provider_id=provider_id)
    assert price_usage(provider, model, usage, CONFIG) == (_nanos(want.total_price), True)


def test_configured_fallback_and_override():
    usage = TokenUsage(
        input_tokens=1_000, output_tokens=10, cache_read_tokens=400, cache_write_tokens=100
    )
    cheap = PricePerMillion(input=Decimal("1"), output=Decimal("2"), cache_read=Decimal("0.1"))
    config = MeterConfig(fallback_price=cheap)
    nanos, priced = price_usage("openai", "mystery", usage, config)
    # 500 fresh * 1 + 400 * 0.1 + 100 * 1 (cache_write defaults to input) + 10 * 2
    assert (nanos, priced) == (660_000, False)
    # An override prices even a known model, and counts as priced.
    nanos, priced = price_usage("openai", "gpt-4o-mini", usage, config, price_override=cheap)
    assert (nanos, priced) == (660_000, True)


def test_rounding_is_up_to_the_next_nano_dollar():
    price = PricePerMillion(input=Decimal("0.001"), output=Decimal("0.001"))
    nanos, _ = price_usage("openai", "x", TokenUsage(input_tokens=1), CONFIG, price_override=price)
    assert nanos == 1  # $0.000000001 exactly
    price = PricePerMillion(input=Decimal("0.0001"), output=Decimal("0"))
    nanos, _ = price_usage("openai", "x", TokenUsage(input_tokens=1), CONFIG, price_override=price)
    assert nanos == 1  # $1e-10 rounds up, never down to 0


def test_service_tier_from_the_response():
    entry = _entry("openai-chat-completions-01")  # gpt-5-nano, has a flex price
    request = request_for(entry)
    body = response_bytes(entry)
    assert b'"service_tier": "default"' in body
    default = measure_body(request, 200, body, CONFIG)
    flex = measure_body(
        request, 200, body.replace(b'"service_tier": "default"', b'"service_tier": "flex"'), CONFIG
    )
    assert flex.usd_nanos * 2 == default.usd_nanos  # gpt-5-nano flex is half price


def test_inconsistent_usage_still_priced():
    # cache reads larger than the input: genai-prices refuses the breakdown; we fall back to
    # the top-level counts instead of failing or charging 0.
    usage = TokenUsage(input_tokens=10, output_tokens=5, cache_read_tokens=50)
    nanos, priced = price_usage("openai", "gpt-4o-mini", usage, CONFIG)
    assert priced and nanos == _nanos(
        genai_prices.calc_price(
            genai_prices.Usage(input_tokens=10, output_tokens=5),
            "gpt-4o-mini",
            provider_id="openai",
        ).total_price
    )


def _anthropic_request(stream: bool = False):
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if stream:
        body["stream"] = True
    return inspect_request(
        "anthropic", "POST", "/v1/messages", {}, json.dumps(body).encode(), CONFIG
    )


def test_anthropic_one_hour_cache_writes():
    usage = {
        "input_tokens": 10,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
        "output_tokens": 7,
    }
    body = {"model": "claude-sonnet-4-5-20250929", "content": [], "usage": usage}
    m = measure_body(_anthropic_request(), 200, json.dumps(body).encode(), CONFIG)
    assert m.usage == TokenUsage(
        input_tokens=3010, output_tokens=7, cache_write_tokens=3000, cache_write_1h_tokens=2000
    )
    price = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=3010, cache_write_tokens=3000, cache_write_1h_tokens=2000, output_tokens=7
        ),
        "claude-sonnet-4-5-20250929",
        provider_id="anthropic",
    )
    assert m.usd_nanos == _nanos(price.total_price)
    # by hand: 10*3 + 1000*3.75 + 2000*6 + 7*15 = 15885 $/MTok
    assert m.usd_nanos == 15_885_000


def test_anthropic_stream_delta_without_cache_fields_keeps_the_start_figures():
    stream = (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-sonnet-4-5",'
        b'"usage":{"input_tokens":5,"cache_read_input_tokens":100,"cache_creation_input_tokens":0,'
        b'"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":{"output_tokens":42}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    meter = open_stream_meter(_anthropic_request(stream=True), "text/event-stream", None, CONFIG)
    meter.feed(stream)
    _, m = meter.finish()
    assert m.source == "usage"
    assert m.usage == TokenUsage(input_tokens=105, output_tokens=42, cache_read_tokens=100)


def _tier_price(model: str, provider_id: str, usage: genai_prices.Usage, **context: str) -> int:
    return _nanos(
        genai_prices.calc_price(
            usage, model, provider_id=provider_id, price_context=context or None
        ).total_price
    )


def _sse(*events: dict) -> bytes:
    return b"".join(
        f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events
    )


def test_anthropic_fast_mode_is_reserved_and_charged_at_its_own_price():
    body = {"model": "claude-opus-4-8", "max_tokens": 20_000, "speed": "fast",
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    fast = inspect_request(
        "anthropic", "POST", "/v1/messages", {}, json.dumps(body).encode(), CONFIG
    )
    standard = inspect_request(
        "anthropic", "POST", "/v1/messages", {},
        json.dumps({**body, "speed": "standard"}).encode(), CONFIG,
    )  # fmt: skip
    reserved = genai_prices.Usage(input_tokens=fast.input_tokens, output_tokens=20_000)
    assert fast.estimate_usd_nanos == _tier_price(
        "claude-opus-4-8", "anthropic", reserved, speed="fast"
    )
    assert standard.estimate_usd_nanos == _tier_price("claude-opus-4-8", "anthropic", reserved)
    assert fast.estimate_usd_nanos > standard.estimate_usd_nanos
    usage = {"input_tokens": 100_000, "output_tokens": 20_000, "speed": "fast"}
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4-8",
              "content": [{"type": "text", "text": "ok"}], "usage": usage}  # fmt: skip
    charged = genai_prices.Usage(input_tokens=100_000, output_tokens=20_000)
    expected = _tier_price("claude-opus-4-8", "anthropic", charged, speed="fast")
    # The answer says fast: charged fast, whatever the request asked.
    assert measure_body(standard, 200, json.dumps(answer).encode(), CONFIG).usd_nanos == expected
    # Streamed: the usage of message_start and message_delta.
    stream = open_stream_meter(standard, "text/event-stream", None, CONFIG)
    stream.feed(
        _sse(
            {"type": "message_start", "message": {**answer, "content": [], "usage": {
                "input_tokens": 100_000, "output_tokens": 1, "speed": "fast"}}},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": 20_000}},
            {"type": "message_stop"},
        )
    )  # fmt: skip
    assert stream.finish()[1].usd_nanos == expected
    # An answer that does not say is charged as the request asked.
    del usage["speed"]
    assert measure_body(fast, 200, json.dumps(answer).encode(), CONFIG).usd_nanos == expected
    assert measure_body(standard, 200, json.dumps(answer).encode(), CONFIG).usd_nanos == (
        _tier_price("claude-opus-4-8", "anthropic", charged)
    )


@pytest.mark.parametrize("tier", ["flex", "priority", "PRIORITY"])
def test_a_gemini_service_tier_is_reserved_and_charged_at_its_own_price(tier: str):
    path = "/v1beta/models/gemini-4-neon:generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "generationConfig": {"maxOutputTokens": 20_000}}  # fmt: skip
    asked = inspect_request(
        "gemini", "POST", path, {}, json.dumps({**body, "serviceTier": tier}).encode(), CONFIG
    )
    plain = inspect_request("gemini", "POST", path, {}, json.dumps(body).encode(), CONFIG)
    reserved = genai_prices.Usage(input_tokens=asked.input_tokens, output_tokens=20_000)
    context = {"service_tier": tier.lower()}
    assert asked.estimate_usd_nanos == _tier_price("gemini-4-neon", "google", reserved, **context)
    assert plain.estimate_usd_nanos == _tier_price("gemini-4-neon", "google", reserved)
    assert asked.estimate_usd_nanos != plain.estimate_usd_nanos
    metadata = {"promptTokenCount": 100_000, "candidatesTokenCount": 20_000,
                "totalTokenCount": 120_000, "serviceTier": tier}  # fmt: skip
    answer = {"candidates": [{"content": {"parts": [{"text": "ok"}], "role": "model"}}],
              "usageMetadata": metadata, "modelVersion": "gemini-4-neon"}  # fmt: skip
    charged = genai_prices.Usage(input_tokens=100_000, output_tokens=20_000)
    expected = _tier_price("gemini-4-neon", "google", charged, **context)
    assert measure_body(plain, 200, json.dumps(answer).encode(), CONFIG).usd_nanos == expected
    stream = open_stream_meter(plain, "text/event-stream", None, CONFIG)
    stream.feed(f"data: {json.dumps(answer)}\r\n\r\n".encode())
    assert stream.finish()[1].usd_nanos == expected
    # The answer's own tier wins over the request's.
    metadata["serviceTier"] = "standard"
    assert measure_body(asked, 200, json.dumps(answer).encode(), CONFIG).usd_nanos == (
        _tier_price("gemini-4-neon", "google", charged)
    )


def test_an_openai_fast_tier_is_reserved_at_its_price_and_unknown_tiers_are_ignored():
    body = {"model": "gpt-5", "max_tokens": 1_000, "messages": [{"role": "user", "content": "hi"}]}

    def estimate(tier: str | None) -> int:
        asked = body if tier is None else {**body, "service_tier": tier}
        request = inspect_request(
            "openai", "POST", "/v1/chat/completions", {}, json.dumps(asked).encode(), CONFIG
        )
        usage = genai_prices.Usage(input_tokens=request.input_tokens, output_tokens=1_000)
        assert request.estimate_usd_nanos == _tier_price(
            "gpt-5", "openai", usage, **({"service_tier": tier} if tier in ("fast", "flex") else {})
        )
        return request.estimate_usd_nanos

    assert estimate("fast") > estimate(None) > estimate("flex")
    assert estimate("auto") == estimate("made-up") == estimate(None)
