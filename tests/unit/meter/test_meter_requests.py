"""Request parsing and estimation, per provider and endpoint."""

from __future__ import annotations

import base64
import json
import math
import struct
import threading
from decimal import Decimal

import genai_prices
import pytest
from drawdown.meter import (
    MeterConfig,
    MeterRequestError,
    TokenUsage,
    charging,
    count_tokens,
    inspect_request,
    measure_body,
    price_usage,
    unread_request,
)
from drawdown.meter.anthropic import TOOLS_SYSTEM_PROMPT_TOKENS, WEB_SEARCHES_RESERVED
from drawdown.meter.tokens import count_texts
from hypothesis import given, settings
from hypothesis import strategies as st
from meter_corpus import CONFIG, png

UNSCALED = MeterConfig(safety_factors={"claude": Decimal(1), "gemini": Decimal(1)})


VERTEX = "/v1/projects/p/locations/us-central1"


def _req(provider, path, body, config=CONFIG, method="POST", query=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return inspect_request(provider, method, path, query or {}, raw, config)


# --- images ------------------------------------------------------------------------------


def jpeg(w: int, h: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    exif = b"\xff\xe1" + struct.pack(">H", 2 + 5000) + b"\x00" * 5000  # a big APP1 first
    sof = b"\xff\xc2" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x22\x00" * 3
    return b"\xff\xd8" + app0 + exif + sof + b"\xff\xd9"


def gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00"


def webp(w: int, h: int, kind: str) -> bytes:
    if kind == "VP8X":
        chunk = b"\x00" * 4 + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    elif kind == "VP8L":
        bits = (w - 1) | ((h - 1) << 14)
        chunk = b"\x2f" + bits.to_bytes(4, "little")
    else:
        chunk = b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", w, h)
    fourcc = kind.ljust(4).encode()
    body = b"WEBP" + fourcc + struct.pack("<I", len(chunk)) + chunk
    return b"RIFF" + struct.pack("<I", len(body)) + body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "data",
    [
        png(1234, 567),
        jpeg(1234, 567),
        gif(1234, 567),
        webp(1234, 567, "VP8X"),
        webp(1234, 567, "VP8L"),
        webp(1234, 567, "VP8 "),
    ],
    ids=["png", "jpeg", "gif", "webp-vp8x", "webp-vp8l", "webp-vp8"],
)
def test_image_sizes_from_base64(data):
    from drawdown.meter.images import size_from_b64

    assert size_from_b64(b64(data)) == (1234, 567)


def _openai_image(model, url, detail=None):
    part = {
        "type": "image_url",
        "image_url": {"url": url, **({"detail": detail} if detail else {})},
    }
    with_image = _req(
        "openai",
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": [part]}]},
    )
    without = _req(
        "openai",
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": []}]},
    )
    return with_image.input_tokens - without.input_tokens


def test_openai_image_rules():
    url = "data:image/png;base64," + b64(png(1024, 1024))
    # 1024x1024 -> 768x768 -> 2x2 tiles of 512: 85 + 4*170
    assert _openai_image("gpt-4o", url) == 85 + 4 * 170
    assert _openai_image("gpt-4o", url, "low") == 85
    assert _openai_image("gpt-4o-mini", url) == 2833 + 4 * 5667
    # patch models: 32px patches (1024/32)^2 = 1024, times 1.62
    assert _openai_image("gpt-4.1-mini", url) == math.ceil(1024 * 1.62)
    # 4000x1000 -> 2048x512 -> shortest side already < 768: 4x1 tiles
    wide = "data:image/jpeg;base64," + b64(jpeg(4000, 1000))
    assert _openai_image("gpt-4.1", wide) == 85 + 4 * 170
    # URL: unknown size, the worst case of the tile rule (2x4 tiles)
    assert _openai_image("gpt-4o", "https://example.com/cat.png") == 85 + 8 * 170


def test_anthropic_image_rules():
    def tokens(source):
        base = {"model": "claude-sonnet-4-5", "max_tokens": 10}
        a = _req(
            "anthropic",
            "/v1/messages",
            {
                **base,
                "messages": [{"role": "user", "content": [{"type": "image", "source": source}]}],
            },
        )
        b = _req(
            "anthropic", "/v1/messages", {**base, "messages": [{"role": "user", "content": []}]}
        )
        return a.input_tokens - b.input_tokens

    small = {"type": "base64", "media_type": "image/png", "data": b64(png(1000, 500))}
    assert tokens(small) == math.ceil(1000 * 500 / 750)
    big = {"type": "base64", "media_type": "image/gif", "data": b64(gif(3000, 3000))}
    assert tokens(big) == 1600  # scaled to 1568px, capped at ~1600 tokens
    assert tokens({"type": "url", "url": "https://example.com/x.png"}) == 1600


def test_gemini_image_rules():
    def tokens(model, part):
        path = f"/v1beta/models/{model}:generateContent"
        a = _req("gemini", path, {"contents": [{"role": "user", "parts": [part]}]})
        b = _req("gemini", path, {"contents": [{"role": "user", "parts": []}]})
        return a.input_tokens - b.input_tokens

    def inline(data, mime="image/png"):
        return {"inlineData": {"mimeType": mime, "data": b64(data)}}

    assert tokens("gemini-2.5-flash", inline(png(300, 300))) == 258
    assert tokens("gemini-2.5-flash", inline(png(1000, 800))) == 4 * 258  # 2x2 tiles of 768
    assert tokens("gemini-3-pro-preview", inline(png(300, 300))) == 1120
    assert (
        tokens(
            "gemini-2.5-flash",
            {"inline_data": {"mime_type": "image/webp", "data": b64(webp(100, 100, "VP8X"))}},
        )
        == 258
    )


def test_pdf_and_audio_rough_rules():
    pdf = b"%PDF-1.4\n" + b"1 0 obj << /Type /Pages /Count 3 >>\n" + b"<< /Type /Page >>\n" * 3
    doc = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": b64(pdf)},
    }
    base = {"model": "claude-sonnet-4-5", "max_tokens": 10}
    with_doc = _req(
        "anthropic", "/v1/messages", {**base, "messages": [{"role": "user", "content": [doc]}]}
    )
    without = _req(
        "anthropic", "/v1/messages", {**base, "messages": [{"role": "user", "content": []}]}
    )
    assert with_doc.input_tokens - without.input_tokens == 3 * 3000
    audio = {"type": "input_audio", "input_audio": {"data": b64(b"\0" * 32_000), "format": "wav"}}
    a = _req(
        "openai",
        "/v1/chat/completions",
        {"model": "gpt-4o-audio-preview", "messages": [{"role": "user", "content": [audio]}]},
    )
    b = _req(
        "openai",
        "/v1/chat/completions",
        {"model": "gpt-4o-audio-preview", "messages": [{"role": "user", "content": []}]},
    )
    # No container read: bounded at 1 kB/s (8 kbit/s, below any speech codec), 10 tokens/s.
    assert a.input_tokens - b.input_tokens == 32 * 10


# --- OpenAI ------------------------------------------------------------------------------


def test_openai_chat_estimate():
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hello there"}], "name": "bob"},
        ],
    }
    r = _req("openai", "/v1/chat/completions", body)
    assert (r.provider, r.endpoint, r.model, r.stream, r.billable) == (
        "openai",
        "chat.completions",
        "gpt-4o",
        False,
        True,
    )
    # Each text is counted on its own (cached across turns), plus one token per newline between them.
    text = count_texts(["system", "You are terse.", "user", "bob", "Hello there"], "gpt-4o")
    assert r.input_tokens == text + 3 * 2 + 1 + 3  # per message, name, reply priming
    assert r.max_output_tokens == CONFIG.default_max_output_tokens
    assert r.safety_factor == 1
    nanos, priced = price_usage(
        "openai", "gpt-4o", TokenUsage(input_tokens=r.input_tokens, output_tokens=4096), CONFIG
    )
    assert (r.estimate_usd_nanos, r.priced) == (nanos, priced) and priced


def test_openai_output_caps():
    msgs = [{"role": "user", "content": "hi"}]
    assert (
        _req(
            "openai",
            "/v1/chat/completions",
            {"model": "gpt-4o", "messages": msgs, "max_tokens": 50},
        ).max_output_tokens
        == 50
    )
    both = {"model": "o3", "messages": msgs, "max_tokens": 50, "max_completion_tokens": 70, "n": 3}
    assert _req("openai", "/v1/chat/completions", both).max_output_tokens == 210
    config = MeterConfig(
        max_output_tokens=(("openai:gpt-4o*", 1000), ("openai:*", 2000)),
        default_max_output_tokens=3000,
    )
    assert (
        _req(
            "openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": msgs}, config
        ).max_output_tokens
        == 1000
    )
    assert (
        _req(
            "openai", "/v1/chat/completions", {"model": "o3", "messages": msgs}, config
        ).max_output_tokens
        == 2000
    )
    assert (
        _req(
            "anthropic", "/v1/messages", {"model": "claude-x", "messages": msgs}, config
        ).max_output_tokens
        == 3000
    )
    r = _req("openai", "/v1/responses", {"model": "gpt-5", "input": "hi", "max_output_tokens": 77})
    assert (r.endpoint, r.max_output_tokens) == ("responses", 77)
    r = _req(
        "openai",
        "/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 5, "n": 2, "best_of": 4},
    )
    assert (r.endpoint, r.max_output_tokens) == ("completions", 20)


def test_each_answer_asked_for_is_reserved_the_default_cap():
    """n (OpenAI chat), best_of (legacy completions) and candidateCount (Gemini) without a cap:
    every answer may run to the default cap (before: one answer's reserved for all of them)."""
    config = MeterConfig(default_max_output_tokens=1000)
    msgs = [{"role": "user", "content": "hi"}]
    chat = {"model": "gpt-4o", "messages": msgs, "n": 4}
    one = _req("openai", "/v1/chat/completions", {**chat, "n": 1}, config)
    four = _req("openai", "/v1/chat/completions", chat, config)
    assert (one.max_output_tokens, four.max_output_tokens) == (1000, 4000)
    assert (
        four.estimate_usd_nanos
        == price_usage("openai", "gpt-4o", TokenUsage(four.input_tokens, 4000), config)[0]
    )
    legacy = {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "n": 2, "best_of": 3}
    assert _req("openai", "/v1/completions", legacy, config).max_output_tokens == 3000
    contents = [{"role": "user", "parts": [{"text": "hi"}]}]
    for key in ("candidateCount", "candidate_count"):
        body = {"contents": contents, "generationConfig": {key: 3}}
        r = _req("gemini", "/v1beta/models/gemini-2.5-flash:generateContent", body, config)
        assert r.max_output_tokens == 3000


@pytest.mark.parametrize(
    ("provider", "path", "body", "model", "searches"),
    [
        (
            "anthropic",
            "/v1/messages",
            {
                "model": "claude-haiku-4-5",
                "max_tokens": 300,
                "messages": [{"role": "user", "content": "news?"}],
                "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 7}],
            },
            "claude-haiku-4-5",
            7,
        ),
        (
            "anthropic",
            "/v1/messages",
            {
                "model": "claude-haiku-4-5",
                "max_tokens": 300,
                "messages": [{"role": "user", "content": "news?"}],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "claude-haiku-4-5",
            WEB_SEARCHES_RESERVED,
        ),
        (
            "openai",
            "/v1/responses",
            {"model": "gpt-4.1", "input": "news?", "tools": [{"type": "web_search"}]},
            "gpt-4.1",
            1,
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            {"contents": [{"parts": [{"text": "news?"}]}], "tools": [{"google_search": {}}]},
            "gemini-2.5-flash",
            1,
        ),
    ],
)
def test_a_server_search_tools_fee_is_reserved_not_charged_unspent(
    provider, path, body, model, searches
):
    """Anthropic's web_search (max_uses, else a few), the Responses API's web_search and
    Gemini's Google Search grounding bill per search: the estimate reserves them (before: $0
    reserved for them). An answer that reports none is charged none."""
    r = _req(provider, path, body)
    tokens = TokenUsage(r.input_tokens, r.max_output_tokens)
    with_fee = price_usage(provider, model, tokens, CONFIG, extras={"web_search_calls": searches})
    assert r.estimate_usd_nanos == with_fee[0] > price_usage(provider, model, tokens, CONFIG)[0]
    assert dict(r.expected_extras) == {}
    answers = {
        "anthropic": {
            "model": model,
            "content": [],
            "usage": {"input_tokens": 9, "output_tokens": 2},
        },
        "openai": {"model": model, "output": [], "usage": {"input_tokens": 9, "output_tokens": 2}},
        "gemini": {"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 2}},
    }
    m = measure_body(r, 200, json.dumps(answers[provider]).encode(), CONFIG)
    assert dict(m.extras) == {}
    assert m.usd_nanos == price_usage(provider, model, TokenUsage(9, 2), CONFIG)[0]


def test_openai_responses_input_forms():
    r = _req(
        "openai",
        "/v1/responses",
        {"model": "gpt-5", "instructions": "Be brief.", "input": "What is 2+2?"},
    )
    assert r.input_tokens == count_texts(["Be brief.", "What is 2+2?"], "gpt-5") + 3 + 3
    items = {
        "model": "gpt-5",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {
                "type": "function_call",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
                "call_id": "c1",
            },
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "reasoning", "summary": [], "encrypted_content": "A" * 800},
        ],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
    }
    r = _req("openai", "/v1/responses", items)
    assert (
        r.input_tokens > count_tokens("Weather? get_weather sunny", "gpt-5") + 100
    )  # + 800/8 reasoning


def test_openai_completions_and_embeddings():
    r = _req(
        "openai",
        "/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "prompt": [[1, 2, 3], [4, 5]]},
    )
    assert r.input_tokens == 5
    r = _req(
        "openai",
        "/v1/embeddings",
        {"model": "text-embedding-3-small", "input": ["hello world", "bye"]},
    )
    assert (r.endpoint, r.max_output_tokens) == ("embeddings", 0)
    assert r.input_tokens == count_tokens("hello world\nbye", "text-embedding-3-small")
    nanos, _ = price_usage(
        "openai", "text-embedding-3-small", TokenUsage(input_tokens=r.input_tokens), CONFIG
    )
    assert r.estimate_usd_nanos == nanos > 0


def test_openai_reasoning_models_with_tools_add_a_preamble():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "hi"}]
    plain = _req(
        "openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": msgs, "tools": tools}
    )
    reasoning = _req(
        "openai", "/v1/chat/completions", {"model": "gpt-5-nano", "messages": msgs, "tools": tools}
    )
    assert reasoning.input_tokens - plain.input_tokens == 70


def test_openai_paths():
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert _req("openai", "/v1/chat/completions/", body).endpoint == "chat.completions"
    assert (
        _req("openai", "/api/v1/chat/completions", body).endpoint == "chat.completions"
    )  # compatible hosts
    # Azure: the deployment names the model when the body does not
    azure = "/openai/deployments/my-gpt4o/chat/completions"
    r = _req("openai", azure, {"messages": body["messages"]}, query={"api-version": "2024-10-21"})
    assert (r.endpoint, r.model, r.billable) == ("chat.completions", "my-gpt4o", True)
    assert not r.priced  # a deployment name genai-prices cannot know: fallback price
    assert _req("openai", azure, body).model == "gpt-4o-mini"
    assert _req("openai", "/openai/deployments/emb/embeddings", {"input": "x"}).model == "emb"
    for method, path, endpoint in [
        ("GET", "/v1/models", "other"),
        ("GET", "/v1/responses/resp_1", "other"),
        ("POST", "/v1/files", "files"),  # an upload no batch input: a step (test_meter_batch.py)
    ]:
        r = _req("openai", path, b"\xff not json", method=method)
        assert not r.billable and r.estimate_usd_nanos == 0 and r.endpoint == endpoint


@pytest.mark.parametrize(
    ("provider", "method", "path", "charged"),
    [
        ("openai", "POST", "/v1/chat/completions", "tokens"),
        ("openai", "POST", "/v1/images/generations", "step"),
        ("openai", "POST", "/v1/audio/speech", "step"),  # a gemini model: not speech
        # Not a speech-to-text model: a step (whisper-1, gpt-4o-transcribe... are metered:
        # test_meter_transcribe.py).
        ("openai", "POST", "/v1/audio/transcriptions", "step"),
        ("openai", "POST", "/v1/files", "step"),
        ("openai", "POST", "/v1/fine_tuning/jobs", "step"),
        ("openai", "GET", "/v1/models", "free"),
        # A batch's output file: its answers' usage is charged (test_meter_batch.py).
        ("openai", "GET", "/v1/files/file-1/content", "tokens"),
        ("openai", "GET", "/v1/batches/batch_1", "free"),
        ("openai", "DELETE", "/v1/files/file-1", "free"),
        ("openai", "POST", "/v1/moderations", "free"),
        ("openai", "POST", "/v1/responses/input_tokens", "free"),
        ("openai", "GET", "/v1/realtime", "step"),  # a Realtime session: metered on its socket
        ("anthropic", "POST", "/v1/messages", "tokens"),
        ("anthropic", "POST", "/v1/messages/count_tokens", "free"),
        ("anthropic", "POST", "/v1/messages/batches", "tokens"),  # held at its estimate
        ("openai", "POST", "/v1/batches", "tokens"),
        ("anthropic", "GET", "/v1/messages/batches/msgbatch_1", "free"),
        ("anthropic", "GET", "/v1/messages/batches/msgbatch_1/results", "tokens"),
        ("anthropic", "GET", "/v1/models", "free"),
        ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:generateContent", "tokens"),
        ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:countTokens", "free"),
        ("gemini", "POST", "/v1beta/models/imagen-4.0-generate-001:predict", "step"),
        ("gemini", "POST", "/v1beta/tunedModels/my-tuned-1:generateContent", "tokens"),
        ("gemini", "POST", f"{VERTEX}/endpoints/1234567:streamGenerateContent", "tokens"),
        (
            "gemini",
            "POST",
            f"{VERTEX}/publishers/google/models/gemini-embedding-001:predict",
            "tokens",
        ),
        (
            "gemini",
            "POST",
            f"{VERTEX}/publishers/google/models/text-embedding-005:predict",
            "tokens",
        ),
        (
            "gemini",
            "POST",
            f"{VERTEX}/publishers/google/models/imagen-3.0-generate-002:predict",
            "step",
        ),
        ("gemini", "POST", f"{VERTEX}/endpoints/1234567:predict", "step"),  # a model of one's own
        ("gemini", "GET", "/v1beta/models", "free"),
        ("bedrock", "POST", "/model/amazon.nova-pro-v1%3A0/converse-stream", "tokens"),
        ("bedrock", "POST", "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke", "tokens"),
        ("bedrock", "POST", "/model/meta.llama3-8b-instruct-v1%3A0/invoke", "tokens"),
        ("bedrock", "POST", "/model/stability.sd3-5-large-v1%3A0/invoke", "step"),
        ("bedrock", "POST", "/model/amazon.nova-pro-v1%3A0/count-tokens", "free"),
        ("bedrock", "GET", "/async-invoke", "free"),
    ],
)
def test_what_a_call_the_meter_cannot_price_per_token_is_charged(provider, method, path, charged):
    """Billed other than per token (an image, speech, a file, a batch) is a step: counted on
    `requests` budgets and by the guards at $0. What costs nothing stays uncounted. `charging`
    (replay) and `inspect_request` (the proxy) agree."""
    assert charging(provider, method, path) == charged
    body = b'{"model": "gemini-2.5-flash", "contents": [], "messages": [], "requests": []}'
    r = inspect_request(provider, method, path, {}, body, CONFIG)
    assert (r.billable, r.step) == (charged == "tokens", charged == "step")
    shadowed = unread_request(provider, method, path)  # shadow mode, a body left unread
    assert (shadowed.billable, shadowed.step) == (charged == "tokens", charged == "step")


def test_openai_search_models_expect_a_web_search():
    body = {
        "model": "gpt-4o-mini-search-preview",
        "messages": [{"role": "user", "content": "news?"}],
        "max_tokens": 10,
    }
    r = _req("openai", "/v1/chat/completions", body)
    assert dict(r.expected_extras) == {"web_search_calls": 1}
    plain = _req("openai", "/v1/chat/completions", {**body, "model": "gpt-4o-mini"})
    assert r.estimate_usd_nanos - plain.estimate_usd_nanos >= 10_000_000  # $10 / 1000 searches


# --- Anthropic ---------------------------------------------------------------------------


def test_anthropic_estimate_and_safety_factor():
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 321,
        "system": [{"type": "text", "text": "Be concise. " * 200}],
        "messages": [{"role": "user", "content": "Tell me about the sea. " * 100}],
    }
    scaled, unscaled = (
        _req("anthropic", "/v1/messages", body),
        _req("anthropic", "/v1/messages", body, UNSCALED),
    )
    assert scaled.endpoint == "messages" and scaled.max_output_tokens == 321
    assert scaled.safety_factor == Decimal("1.40")
    assert scaled.input_tokens == math.ceil(unscaled.input_tokens * Decimal("1.40"))
    custom = MeterConfig(safety_factors={"claude": Decimal("2")})
    assert _req("anthropic", "/v1/messages", body, custom).input_tokens == 2 * unscaled.input_tokens


def test_anthropic_tools_thinking_and_server_tools():
    base = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    plain = _req("anthropic", "/v1/messages", base, UNSCALED).input_tokens
    tool = {"name": "f", "description": "d", "input_schema": {"type": "object"}}
    with_tool = _req("anthropic", "/v1/messages", {**base, "tools": [tool]}, UNSCALED).input_tokens
    assert (
        with_tool - plain
        == count_tokens(json.dumps([tool], separators=(",", ":")), None)
        + 1
        + TOOLS_SYSTEM_PROMPT_TOKENS
    )
    thinking = _req(
        "anthropic",
        "/v1/messages",
        {**base, "thinking": {"type": "enabled", "budget_tokens": 1024}},
        UNSCALED,
    )
    assert thinking.input_tokens - plain == 30
    search = {"type": "web_search_20250305", "name": "web_search"}
    with_search = _req(
        "anthropic", "/v1/messages", {**base, "tools": [search]}, UNSCALED
    ).input_tokens
    assert with_search - plain > 2300


def test_anthropic_paths():
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    r = _req("anthropic", "/v1/messages/count_tokens", body)
    assert (r.endpoint, r.billable, r.estimate_usd_nanos) == ("messages.count_tokens", False, 0)
    # A message batch: held at its requests' estimate (test_meter_batch.py); one that is not
    # a batch (a Messages body posted there) is refused, as the API refuses it.
    batch = {"requests": [{"custom_id": "a", "params": body}]}
    r = _req("anthropic", "/v1/messages/batches", batch)
    assert (r.endpoint, r.billable, r.model) == ("messages.batches", True, "claude-haiku-4-5")
    with pytest.raises(MeterRequestError, match="requests is missing"):
        _req("anthropic", "/v1/messages/batches", body)
    vertex = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict"
    r = _req("anthropic", vertex, {k: v for k, v in body.items() if k != "model"})
    assert (r.endpoint, r.model, r.stream, r.billable) == (
        "messages",
        "claude-sonnet-4-5@20250929",
        True,
        True,
    )
    r = _req("anthropic", "/v1/messages", {**body, "stream": True})
    assert r.stream and not r.strip_usage_chunk and r.rewritten_body is None


# --- Gemini ------------------------------------------------------------------------------


def test_gemini_paths_and_caps():
    body = {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"maxOutputTokens": 100, "candidateCount": 2},
    }
    r = _req("gemini", "/v1beta/models/gemini-2.5-flash:generateContent", body)
    assert (r.endpoint, r.model, r.stream, r.max_output_tokens) == (
        "generateContent",
        "gemini-2.5-flash",
        False,
        200,
    )
    r = _req(
        "gemini",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        body,
        query={"alt": "sse"},
    )
    assert (r.endpoint, r.stream, r.strip_usage_chunk) == ("streamGenerateContent", True, False)
    vertex = "/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.0-flash-001:streamGenerateContent"
    r = _req(
        "gemini",
        vertex,
        {"contents": [{"parts": [{"text": "hi"}]}], "generation_config": {"max_output_tokens": 7}},
    )
    assert (r.model, r.stream, r.max_output_tokens, r.priced) == (
        "gemini-2.0-flash-001",
        True,
        7,
        True,
    )
    assert r.safety_factor == Decimal("1.40")
    r = _req("gemini", "/v1beta/models/gemini-2.5-flash:countTokens", b"garbage")
    assert (r.endpoint, r.billable) == ("countTokens", False)
    r = _req(
        "gemini",
        "/v1beta/models/text-embedding-004:embedContent",
        {"content": {"parts": [{"text": "hello"}]}},
    )
    assert (r.endpoint, r.billable, r.max_output_tokens) == ("embeddings", True, 0)
    assert not _req("gemini", "/v1beta/models", b"", method="GET").billable


def _google_nanos(model: str, **usage: int) -> int:
    price = genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id="google")
    return math.ceil(price.total_price * 1_000_000_000)


def _fallback_nanos(input_tokens: int, output_tokens: int = 0) -> int:
    usd = input_tokens * CONFIG.fallback_price.input + output_tokens * CONFIG.fallback_price.output
    return math.ceil(usd * 1000)  # USD per million tokens -> nano-dollars


def test_gemini_tuned_models_and_vertex_endpoints_are_charged_the_model_they_answer_with():
    """A tuned model and a Vertex endpoint name no model genai-prices knows: they were $0
    steps. Metered now, priced on the answer's `modelVersion`, else at the fallback price."""
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    usage = {"promptTokenCount": 5000, "candidatesTokenCount": 2000}
    for path, model in [
        ("/v1beta/tunedModels/my-tuned-1:generateContent", "my-tuned-1"),
        (f"{VERTEX}/endpoints/1234567:generateContent", "1234567"),
    ]:
        r = _req("gemini", path, body)
        assert (r.endpoint, r.model, r.billable, r.priced) == (
            "generateContent",
            model,
            True,
            False,
        )
        assert r.safety_factor == Decimal("1.40")  # a Gemini model's tokens
        named = {"usageMetadata": usage, "modelVersion": "gemini-2.0-flash-001"}
        m = measure_body(r, 200, json.dumps(named).encode(), CONFIG)
        assert (m.model, m.priced) == ("gemini-2.0-flash-001", True)
        assert m.usd_nanos == _google_nanos(
            "gemini-2.0-flash", input_tokens=5000, output_tokens=2000
        )
        m = measure_body(r, 200, json.dumps({"usageMetadata": usage}).encode(), CONFIG)
        assert (m.model, m.priced, m.usd_nanos) == (model, False, _fallback_nanos(5000, 2000))


def test_vertex_embeddings_are_charged_the_tokens_their_predictions_count():
    body = {"instances": [{"content": "hello world " * 50}, {"content": "x", "title": "t"}]}
    answer = {
        "predictions": [
            {
                "embeddings": {
                    "values": [0.1],
                    "statistics": {"token_count": 100, "truncated": False},
                }
            },
            {"embeddings": {"values": [0.2], "statistics": {"token_count": 3.0}}},
        ]
    }
    path = f"{VERTEX}/publishers/google/models/gemini-embedding-001:predict"
    r = _req("gemini", path, body)
    assert (r.endpoint, r.billable, r.max_output_tokens, r.priced) == ("embeddings", True, 0, True)
    assert r.input_tokens > 100  # both instances counted, at Gemini's factor
    m = measure_body(r, 200, json.dumps(answer).encode(), CONFIG)
    assert (m.source, m.usage, m.priced) == ("usage", TokenUsage(input_tokens=103), True)
    assert m.usd_nanos == _google_nanos("gemini-embedding-001", input_tokens=103)
    # A model genai-prices does not know: the fallback price, never $0.
    r = _req("gemini", path.replace("gemini-embedding-001", "text-embedding-005"), body)
    m = measure_body(r, 200, json.dumps(answer).encode(), CONFIG)
    assert (m.priced, m.usd_nanos) == (False, _fallback_nanos(103))
    # No statistics: the input is counted.
    m = measure_body(r, 200, b'{"predictions": [{"embeddings": {"values": [0.1]}}]}', CONFIG)
    assert (m.source, m.usage.input_tokens) == ("counted", r.input_tokens)


def test_gemini_system_tools_and_schema_count():
    base = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    plain = _req("gemini", path, base, UNSCALED).input_tokens
    richer = {
        **base,
        "systemInstruction": {"parts": [{"text": "You are a pirate. " * 20}]},
        "tools": [
            {"functionDeclarations": [{"name": "f", "description": "does f " * 10}]},
            {"googleSearch": {}},
        ],
        "generationConfig": {
            "responseSchema": {"type": "OBJECT", "properties": {"a": {"type": "STRING"}}}
        },
    }
    assert _req("gemini", path, richer, UNSCALED).input_tokens > plain + 110 + 60


# --- malformed requests ------------------------------------------------------------------

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("provider", "path", "body", "message"),
    [
        ("openai", CHAT, b"{not json", "not valid JSON"),
        ("openai", CHAT, b"", "empty"),
        ("openai", CHAT, b"[1, 2]", "must be a JSON object, not an array"),
        ("openai", CHAT, b'"hello"', "must be a JSON object, not a string"),
        (
            "openai",
            CHAT,
            b'{"model": "gpt-4o", "messages": "hi"}',
            "messages must be an array, not a string",
        ),
        ("openai", CHAT, b'{"model": "gpt-4o"}', "messages is missing"),
        (
            "openai",
            CHAT,
            b'{"model": "gpt-4o", "messages": ["hi"]}',
            "messages[0] must be an object",
        ),
        (
            "openai",
            CHAT,
            b'{"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]}',
            "messages[0].content",
        ),
        ("openai", CHAT, b'{"messages": []}', "model is missing"),
        ("openai", CHAT, b'{"model": 4, "messages": []}', "model must be a non-empty string"),
        (
            "openai",
            CHAT,
            b'{"model": "gpt-4o", "messages": [], "max_tokens": "10"}',
            "max_tokens must be a non-negative integer",
        ),
        (
            "openai",
            CHAT,
            b'{"model": "gpt-4o", "messages": [], "max_tokens": -1}',
            "max_tokens must be a non-negative integer",
        ),
        (
            "openai",
            CHAT,
            b'{"model": "gpt-4o", "messages": [], "max_tokens": true}',
            "max_tokens must be a non-negative integer",
        ),
        (
            "openai",
            CHAT,
            b'{"model": "gpt-4o", "messages": [], "stream": "yes"}',
            "stream must be true or false",
        ),
        (
            "openai",
            CHAT,
            b'{"model": "gpt-4o", "messages": [], "stream": true, "stream_options": 1}',
            "stream_options must be an object",
        ),
        (
            "openai",
            CHAT,
            '{"model": "gpt-4o", "messages": [{"role": "user", "content": "café"}]}'.encode(
                "latin-1"
            ),
            "not valid UTF-8",
        ),
        ("openai", CHAT, b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (
            "openai",
            "/v1/responses",
            b'{"model": "gpt-5", "input": 5}',
            "input must be a string or an array",
        ),
        ("openai", "/v1/embeddings", b'{"model": "text-embedding-3-small"}', "input is missing"),
        ("anthropic", "/v1/messages", b'{"max_tokens": 5, "messages": []}', "model is missing"),
        (
            "anthropic",
            "/v1/messages",
            b'{"model": "claude-x", "messages": {}}',
            "messages must be an array, not an object",
        ),
        (
            "anthropic",
            "/v1/messages",
            b'{"model": "claude-x", "messages": [], "system": 3}',
            "system must be a string or an array",
        ),
        (
            "anthropic",
            "/v1/messages",
            b'{"model": "claude-x", "messages": [], "max_tokens": 1.5}',
            "max_tokens must be a non-negative integer",
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            b'{"generationConfig": {}}',
            "contents is missing",
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            b'{"contents": "hi"}',
            "contents must be an array",
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            b'{"contents": [], "generationConfig": []}',
            "generationConfig must be an object",
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            b'{"contents": [{"parts": {}}]}',
            "contents[0].parts must be an array",
        ),
    ],
)
def test_malformed_requests(provider, path, body, message):
    with pytest.raises(MeterRequestError) as err:
        inspect_request(provider, "POST", path, {}, body, CONFIG)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("value", "shown"), [("-5", "-5"), ("2.5", "2.5"), ('"5"', "a string"), ("true", "a boolean")]
)
def test_a_bad_max_tokens_is_named_by_its_value(value, shown):
    body = b'{"model": "gpt-4o-mini", "messages": [], "max_tokens": %s}' % value.encode()
    with pytest.raises(MeterRequestError) as err:
        inspect_request("openai", "POST", "/v1/chat/completions", {}, body, CONFIG)
    assert str(err.value) == f"max_tokens must be a non-negative integer, not {shown}"


@pytest.mark.parametrize(
    ("body", "asked"),
    [
        # more tokens than the ledger's integers can hold, named as written (10**26, not the
        # binary float's 100000000000000004764729344)
        (
            b'{"model": "gpt-4o-mini", "messages": [], "max_tokens": 1e26}',
            "up to 100000000000000000000000000 output tokens (≈$60000000000000000000.00)",
        ),
        # a cap within range whose price is not: 10^17 × 20 choices × $0.60 per million
        (
            b'{"model": "gpt-4o-mini", "messages": [], "max_tokens": 100000000000000000, "n": 20}',
            "up to 2000000000000000000 output",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": [], "max_tokens": 10000000000000000}',
            "(≈$6000000000.00)",
        ),
    ],
)
def test_an_estimate_past_what_the_ledger_holds_is_a_malformed_request(body, asked):
    """Denied as bad_request (forwarded in shadow mode) rather than failing in the ledger."""
    with pytest.raises(MeterRequestError) as err:
        inspect_request("openai", "POST", "/v1/chat/completions", {}, body, CONFIG)
    assert asked in str(err.value) and "past what one call may hold" in str(err.value)
    ok = inspect_request(
        "openai",
        "POST",
        "/v1/chat/completions",
        {},
        b'{"model": "gpt-4o-mini", "messages": [], "max_tokens": 1000000000000}',
        CONFIG,
    )
    assert ok.max_output_tokens == 10**12  # large, but within range: estimated as asked


def test_unknown_provider_passes_through():
    r = inspect_request("mistral", "POST", "/v1/chat/completions", {}, b"{}", CONFIG)
    assert not r.billable and r.endpoint == "other"


def test_inspect_request_is_thread_safe():
    body = json.dumps(
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "lorem ipsum dolor " * 20_000}],
        }
    ).encode()
    expected = inspect_request("anthropic", "POST", "/v1/messages", {}, body, CONFIG)
    results, errors = [], []

    def work():
        try:
            results.append(inspect_request("anthropic", "POST", "/v1/messages", {}, body, CONFIG))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [expected] * 8


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = {
    ("openai", "/v1/chat/completions"): [
        "model",
        "messages",
        "tools",
        "max_tokens",
        "n",
        "stream",
        "stream_options",
        "response_format",
    ],
    ("openai", "/v1/responses"): [
        "model",
        "input",
        "instructions",
        "tools",
        "text",
        "max_output_tokens",
    ],
    ("openai", "/v1/completions"): ["model", "prompt", "suffix", "best_of", "n"],
    ("openai", "/v1/embeddings"): ["model", "input"],
    ("anthropic", "/v1/messages"): [
        "model",
        "messages",
        "system",
        "tools",
        "thinking",
        "max_tokens",
        "output_format",
    ],
    ("gemini", "/v1beta/models/gemini-2.5-flash:generateContent"): [
        "contents",
        "systemInstruction",
        "tools",
        "generationConfig",
        "system_instruction",
    ],
}
SHAPES = {
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": JSON,
                "content": JSON
                | st.lists(
                    st.dictionaries(
                        st.sampled_from(
                            [
                                "type",
                                "text",
                                "image_url",
                                "source",
                                "input",
                                "content",
                                "input_audio",
                                "file",
                            ]
                        ),
                        JSON,
                        max_size=4,
                    ),
                    max_size=3,
                ),
            }
        ),
        max_size=3,
    ),
    "contents": st.lists(
        st.fixed_dictionaries(
            {
                "parts": st.lists(
                    st.dictionaries(
                        st.sampled_from(
                            ["text", "inlineData", "fileData", "functionCall", "thought"]
                        ),
                        JSON,
                        max_size=3,
                    ),
                    max_size=3,
                )
                | JSON
            }
        ),
        max_size=3,
    ),
    "input": JSON
    | st.lists(
        st.dictionaries(
            st.sampled_from(["type", "role", "content", "summary", "output", "encrypted_content"]),
            JSON,
            max_size=4,
        ),
        max_size=3,
    ),
}


@settings(max_examples=300, deadline=None)
@given(data=st.data(), target=st.sampled_from(sorted(KEYS)))
def test_fuzzed_bodies_raise_only_meter_request_errors(data, target):
    provider, path = target
    body = {}
    for key in KEYS[target]:
        if data.draw(st.booleans()):
            body[key] = data.draw(SHAPES.get(key, JSON))
    if data.draw(st.booleans()):
        body["model"] = "gpt-4o" if provider == "openai" else "claude-sonnet-4-5"
    try:
        request = inspect_request(provider, "POST", path, {}, json.dumps(body).encode(), CONFIG)
    except MeterRequestError:
        return
    assert request.billable and request.input_tokens >= 0 and request.estimate_usd_nanos >= 0


def test_a_family_left_out_of_the_config_keeps_its_default():
    config = MeterConfig(safety_factors={"claude": Decimal("2")})
    assert config.safety_factor("anthropic", "claude-x") == 2
    assert config.safety_factor("gemini", "gemini-2.5-pro") == Decimal("1.40")
    assert config.safety_factor("openai", "gpt-4o") == 1
    # OpenAI-compatible hosts serving Claude or Gemini models get the family's factor
    assert config.safety_factor("openai", "anthropic/claude-sonnet-4.5") == 2


def test_model_names_with_a_path_prefix_and_encoded_colons():
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    r = _req("gemini", "/v1beta/models/gemini-2.5-flash%3AgenerateContent", body)
    assert (r.endpoint, r.model, r.priced) == ("generateContent", "gemini-2.5-flash", True)
    nanos, priced = price_usage(
        "gemini", "models/gemini-2.5-flash", TokenUsage(input_tokens=10), CONFIG
    )
    assert (
        priced
        and nanos
        == price_usage("gemini", "gemini-2.5-flash", TokenUsage(input_tokens=10), CONFIG)[0]
    )


# --- a request forwarded unread (shadow mode) ---------------------------------------------


@pytest.mark.parametrize(
    ("provider", "method", "path", "expected"),
    [
        ("openai", "POST", "/v1/chat/completions", ("chat.completions", None, False, True)),
        ("openai", "POST", "/v1/files", ("files", None, False, False)),
        ("anthropic", "POST", "/v1/messages", ("messages", None, False, True)),
        ("anthropic", "POST", "/v1/messages/count_tokens", ("messages.count_tokens", None, False, False)),
        ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
         ("streamGenerateContent", "gemini-2.5-flash", True, True)),
        ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:countTokens",
         ("countTokens", "gemini-2.5-flash", False, False)),
    ],
)  # fmt: skip
def test_an_unread_request_is_metered_by_its_path_alone(
    provider: str, method: str, path: str, expected: tuple[str, str | None, bool, bool]
) -> None:
    from drawdown.meter import unread_request

    request = unread_request(provider, method, path)
    assert (request.endpoint, request.model, request.stream, request.billable) == expected
    assert request.estimate_usd_nanos == 0 and request.input_tokens == 0
