"""Garbage, truncation and errors: the meter never raises and never invents usage."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import brotli
import pytest
from drawdown.meter import (
    TokenUsage,
    count_tokens,
    decode,
    inspect_request,
    measure_body,
    open_stream_meter,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from meter_corpus import CONFIG, MANIFEST, entry_id, expected, feed, request_for, response_bytes

CHAT_BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}],"max_tokens":50}'


def _requests():
    return {
        "chat-strip": inspect_request(
            "openai", "POST", "/v1/chat/completions", {}, CHAT_BODY, CONFIG
        ),
        "responses": inspect_request(
            "openai",
            "POST",
            "/v1/responses",
            {},
            b'{"model":"gpt-5","input":"hi","stream":true}',
            CONFIG,
        ),
        "anthropic": inspect_request(
            "anthropic",
            "POST",
            "/v1/messages",
            {},
            b'{"model":"claude-sonnet-4-5","max_tokens":9,"messages":[],"stream":true}',
            CONFIG,
        ),
        "gemini": inspect_request(
            "gemini",
            "POST",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            {},
            b'{"contents":[]}',
            CONFIG,
        ),
    }


REQUESTS = _requests()


@settings(max_examples=60, deadline=None)
@given(
    which=st.sampled_from(sorted(REQUESTS)),
    chunks=st.lists(st.binary(max_size=200), max_size=20),
    encoding=st.sampled_from([None, "gzip", "br", "zstd", "deflate", "compress"]),
    content_type=st.sampled_from(["text/event-stream", "application/json", ""]),
)
def test_garbage_never_raises(which, chunks, encoding, content_type):
    request = REQUESTS[which]
    meter = open_stream_meter(request, content_type, encoding, CONFIG)
    out = [meter.feed(c) for c in chunks]
    meter.partial()
    rest, measurement = meter.finish()
    assert isinstance(rest, bytes)
    assert measurement.usd_nanos >= 0
    assert measurement.source in ("usage", "counted", "estimate")
    if not meter.rewrites:
        assert all(o is c for o, c in zip(out, chunks, strict=True))


@settings(max_examples=40, deadline=None)
@given(events=st.lists(st.text(max_size=60), max_size=10))
def test_malformed_events_in_a_real_stream(events):
    entry = next(e for e in MANIFEST if entry_id(e) == "anthropic-messages-12")
    body = response_bytes(entry)
    junk = b"".join(
        b"data: " + e.replace("\n", " ").replace("\r", " ").encode() + b"\n\n" for e in events
    )
    half = body.index(b"event: message_delta")
    _, measurement = feed(request_for(entry), entry, [body[:half], junk, body[half:]])
    assert measurement.usage == expected(entry)[0]


def test_undecodable_gzip_is_forwarded_unchanged():
    entry = next(e for e in MANIFEST if entry_id(e) == "anthropic-messages-11")
    request = request_for(entry)
    junk = b"\x1f\x8b\x08\x00" + b"not really gzip" * 10
    meter = open_stream_meter(request, "text/event-stream", "gzip", CONFIG)
    assert meter.feed(junk) is junk
    assert meter.feed(b"more") == b"more"
    _, measurement = meter.finish()
    assert measurement.source == "estimate"
    assert measurement.usd_nanos == request.estimate_usd_nanos


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_streamed_bomb_is_decoded_no_further_than_a_chunks_bound(
    coding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host an agent runs could stream a few kB that decode to gigabytes: each chunk was
    decoded whole. Past the bound (1 MiB here, of 16) the meter stops reading the stream, its
    bytes flow on unchanged and it is charged its estimate."""
    from backports import zstd

    monkeypatch.setattr(decode, "MAX_CHUNK_OUTPUT", 1 << 20)
    entry = next(e for e in MANIFEST if entry_id(e) == "anthropic-messages-11")
    request = request_for(entry)
    zeros = bytes(16 << 20)
    bomb = {
        "gzip": lambda: gzip.compress(zeros, 9),
        "deflate": lambda: zlib.compress(zeros, 9),
        "br": lambda: brotli.compress(zeros, quality=5),
        "zstd": lambda: zstd.compress(zeros),
    }[coding]()
    meter = open_stream_meter(request, "text/event-stream", coding, CONFIG)
    tracemalloc.start()
    try:
        assert meter.feed(bomb) is bomb
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 << 20, peak
    _, measurement = meter.finish()
    assert measurement.source == "estimate"
    assert measurement.usd_nanos == request.estimate_usd_nanos


def test_unsupported_encoding_meters_the_estimate():
    request = REQUESTS["anthropic"]
    meter = open_stream_meter(request, "text/event-stream", "compress", CONFIG)
    assert not meter.rewrites
    chunk = b"whatever"
    assert meter.feed(chunk) is chunk
    assert meter.finish()[1].source == "estimate"


def test_rewriting_with_broken_gzip_drops_undecodable_bytes():
    meter = open_stream_meter(REQUESTS["chat-strip"], "text/event-stream", "gzip", CONFIG)
    assert meter.rewrites
    good = gzip.compress(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n')
    out = meter.feed(good[:-8])  # without the gzip trailer: decodes fine
    assert out == b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    assert meter.feed(b"\x00garbage after the stream") == b""
    _, measurement = meter.finish()
    assert measurement.source == "counted"


def test_partial_openai_chat_counts_streamed_text():
    request = REQUESTS["chat-strip"]
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
    meter.feed(
        b'data: {"model":"gpt-4o-mini-2024-07-18","choices":[{"delta":{"content":"Hello brave new"}}]}\n\n'
    )
    meter.feed(b'data: {"choices":[{"delta":{"content":" world"}}]}\n\ndata: {"choi')
    m = meter.partial()
    assert m.source == "counted"
    assert m.usage == TokenUsage(
        input_tokens=request.input_tokens, output_tokens=count_tokens("Hello brave new world", None)
    )
    assert m.model == "gpt-4o-mini-2024-07-18"
    assert m.priced and m.usd_nanos > 0


def test_partial_anthropic_uses_message_start_input_and_counts_output():
    entry = next(e for e in MANIFEST if entry_id(e) == "anthropic-messages-13")
    request = request_for(entry)
    body = response_bytes(entry)
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
    meter.feed(body[: body.index(b"event: message_delta")])
    m = meter.partial()
    start = entry["usage"]["message_start"]
    assert m.source == "counted"
    assert m.usage.input_tokens == start["input_tokens"]
    assert m.usage.output_tokens > start["output_tokens"]  # the streamed thinking + text, counted
    meter.feed(body[body.index(b"event: message_delta") :])
    assert meter.partial().usage == expected(entry)[0]  # usage seen: provider's figures


def test_partial_gemini_takes_the_last_usage_so_far():
    entry = next(e for e in MANIFEST if entry_id(e) == "gemini-streamGenerateContent-02")
    request = request_for(entry)
    body = response_bytes(entry)
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
    meter.feed(body[: body.index(b"\r\n\r\n") + 4])  # first chunk only
    m = meter.partial()
    assert m.source == "usage"
    assert m.usage.output_tokens == 31 + 35  # candidates so far + thoughts


def test_partial_before_anything():
    request = REQUESTS["responses"]
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
    m = meter.partial()
    assert m.source == "counted"
    assert m.usage == TokenUsage(input_tokens=request.input_tokens)
    assert 0 < m.usd_nanos < request.estimate_usd_nanos
    # the same stream ending normally with nothing readable: the estimate
    meter.feed(b"<html>Bad gateway</html>")
    assert meter.finish()[1].source == "estimate"


def test_json_without_usage_is_counted():
    request = inspect_request(
        "openai",
        "POST",
        "/v1/chat/completions",
        {},
        CHAT_BODY.replace(b'"stream":true,', b""),
        CONFIG,
    )
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "choices": [{"message": {"role": "assistant", "content": "Four."}}],
        }
    ).encode()
    m = measure_body(request, 200, body, CONFIG)
    assert m.source == "counted"
    assert m.usage == TokenUsage(
        input_tokens=request.input_tokens, output_tokens=count_tokens("Four.", None)
    )


def test_usage_written_as_strings_of_digits_is_charged_as_numbers():
    """An OpenAI-compatible gateway writing `"prompt_tokens": "1000"`: the call was committed
    from its usage at $0. Digits are read as the number they write; other text cannot be read,
    so the answer is counted (its prompt estimated), never charged 0."""
    request = inspect_request(
        "openai", "POST", "/v1/chat/completions", {},
        CHAT_BODY.replace(b'"stream":true,', b""), CONFIG,
    )  # fmt: skip

    def charged(prompt: object, completion: object) -> tuple[str, TokenUsage]:
        usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        body = json.dumps({"model": "gpt-4o-mini", "usage": usage}).encode()
        m = measure_body(request, 200, body, CONFIG)
        return m.source, m.usage

    as_numbers = charged(1000, 2000)
    assert charged("1000", "2000") == as_numbers
    assert as_numbers[1].input_tokens == 1000 and as_numbers[1].output_tokens == 2000
    for odd in ("-5", "1e3", "١٠٠٠", " 1000", "9" * 20):  # sign, exponent, Arabic digits, too long
        source, usage = charged(odd, 0)
        assert (source, usage.input_tokens) == ("counted", request.input_tokens), odd


def test_unreadable_2xx_body_is_the_estimate():
    request = REQUESTS["anthropic"]
    for body in (b"", b"<html>oops</html>", b"\x00\xff" * 10):
        m = measure_body(request, 200, body, CONFIG)
        assert m.source == "estimate"
        assert m.usage == TokenUsage(
            input_tokens=request.input_tokens, output_tokens=request.max_output_tokens
        )
        assert m.usd_nanos == request.estimate_usd_nanos


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 529])
def test_errors_cost_nothing(status):
    for request in REQUESTS.values():
        m = measure_body(request, status, b'{"error": {"message": "nope"}}', CONFIG)
        assert (m.usage, m.usd_nanos, m.source) == (TokenUsage(), 0, "usage")
        meter = open_stream_meter(request, "application/json", None, CONFIG, status=status)
        meter.feed(b'{"type":"error","error":{"type":"overloaded_error"}}')
        assert meter.finish()[1].usd_nanos == 0


def test_non_billable_requests_meter_nothing():
    request = inspect_request("anthropic", "POST", "/v1/messages/count_tokens", {}, b"{}", CONFIG)
    m = measure_body(request, 200, b'{"input_tokens": 12}', CONFIG)
    assert (m.usage, m.usd_nanos) == (TokenUsage(), 0)
    meter = open_stream_meter(request, "text/event-stream", "gzip", CONFIG)
    chunk = b"anything"
    assert not meter.rewrites and meter.feed(chunk) is chunk
    assert meter.finish()[1].usd_nanos == 0


def test_finish_is_idempotent_and_feed_after_finish_passes_through():
    meter = open_stream_meter(REQUESTS["chat-strip"], "text/event-stream", None, CONFIG)
    meter.feed(
        b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    )
    first = meter.finish()
    assert meter.finish() == (b"", first[1])
    assert meter.partial() == first[1]
    assert meter.feed(b"late") == b"late"


def test_stream_usage_on_error_status_is_kept():
    # An SSE body that reports usage is billed even under a non-2xx status.
    request = REQUESTS["chat-strip"]
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG, status=500)
    meter.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n')
    assert meter.finish()[1].usage == TokenUsage(input_tokens=3, output_tokens=1)


@pytest.mark.parametrize(
    ("provider", "path", "body", "answer"),
    [
        (
            "openai",
            "/v1/chat/completions",
            {"model": "gpt-4o-mini", "max_tokens": 20, "n": 2, "messages": [{"role": "user", "content": "hi"}]},
            {"choices": [{"message": {"content": "word " * 300}}, {"message": {"content": "word " * 300}}]},
        ),
        (
            "anthropic",
            "/v1/messages",
            {"model": "claude-3-5-haiku-latest", "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]},
            {"type": "message", "content": [{"type": "text", "text": "word " * 300}]},
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.0-flash:generateContent",
            {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 30}},
            {"candidates": [{"content": {"parts": [{"text": "word " * 300}]}}]},
        ),
    ],
)  # fmt: skip
def test_counted_output_is_never_more_than_the_requests_own_cap(
    provider: str, path: str, body: dict[str, object], answer: dict[str, object]
) -> None:
    """An answer without usage is charged its text counted (tiktoken, times the family's
    safety factor), which may come to more tokens than the provider's own count: never past
    the cap the request set (times n), where the provider stopped and billed no more."""
    request = inspect_request(provider, "POST", path, {}, json.dumps(body).encode(), CONFIG)
    assert request.own_output_cap is not None
    m = measure_body(request, 200, json.dumps(answer).encode(), CONFIG)
    assert m.source == "counted"
    assert m.usage.output_tokens == request.own_output_cap == request.max_output_tokens
    without_cap = dict(body)
    without_cap.pop("max_tokens", None)
    without_cap.pop("generationConfig", None)
    request = inspect_request(provider, "POST", path, {}, json.dumps(without_cap).encode(), CONFIG)
    if request.own_output_cap is None:  # Anthropic requires max_tokens: its cap is always its own
        assert (
            measure_body(request, 200, json.dumps(answer).encode(), CONFIG).usage.output_tokens
            > 300
        )
