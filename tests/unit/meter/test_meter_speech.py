"""OpenAI text to speech metered: gpt-4o-mini-tts per token, tts-1 / tts-1-hd per character."""

from __future__ import annotations

import json
import math

import genai_prices
import pytest
from drawdown.meter import (
    MeterRequestError,
    TokenUsage,
    charging,
    count_tokens,
    inspect_request,
    measure_body,
    open_stream_meter,
    unread_request,
)
from drawdown.meter.openai_audio import AUDIO_TOKENS_PER_CHARACTER, PROMPT_OVERHEAD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meter_corpus import CONFIG, cut

SPEECH = "/v1/audio/speech"
TEXT = "The quick brown fox jumps over the lazy dog, twice, and then rests in the shade."


def _genai(model: str, **usage: int) -> int:
    price = genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id="openai")
    return math.ceil(price.total_price * 1_000_000_000)


def _speech(body: dict, path: str = SPEECH):
    return inspect_request("openai", "POST", path, {}, json.dumps(body).encode(), CONFIG)


@pytest.mark.parametrize(
    ("path", "body", "charged"),
    [
        (SPEECH, {"model": "gpt-4o-mini-tts", "input": "hi", "voice": "alloy"}, "tokens"),
        (SPEECH, {"model": "tts-1", "input": "hi", "voice": "alloy"}, "tokens"),
        (SPEECH, {"model": "tts-1-hd", "input": "hi", "voice": "alloy"}, "tokens"),
        # A speech model genai-prices does not know yet: metered at the fallback price.
        (SPEECH, {"model": "gpt-5-mini-tts", "input": "hi", "voice": "alloy"}, "tokens"),
        # Not a speech model (an OpenAI-compatible host's own): a step at $0, as before.
        (SPEECH, {"model": "kokoro", "input": "hi", "voice": "af"}, "step"),
        ("/openai/deployments/tts-1-hd/audio/speech", {"input": "hi", "voice": "alloy"}, "tokens"),
    ],
)
def test_speech_is_metered_for_speech_models(path, body, charged):
    r = _speech(body, path)
    assert (r.billable, r.step) == (charged == "tokens", charged == "step")
    assert r.endpoint == "audio.speech"
    # replay (`charging`, with the model the ledger records) agrees with the proxy
    assert charging("openai", "POST", path, r.model) == charged
    assert unread_request("openai", "POST", path).step  # unread: no model known, a step


def test_tts_1_is_charged_its_characters_exactly_before_the_call():
    for model, per_million in (("tts-1", 15), ("tts-1-hd", 30)):
        r = _speech({"model": model, "input": TEXT, "voice": "alloy"})
        assert (r.input_tokens, r.max_output_tokens) == (0, 0)
        assert dict(r.expected_extras) == {"input_characters": len(TEXT)}
        assert r.estimate_usd_nanos == _genai(model, input_characters=len(TEXT))
        assert r.estimate_usd_nanos == math.ceil(len(TEXT) * per_million * 1000)
        m = measure_body(r, 200, b"ID3\x04" + bytes(4000), CONFIG)  # raw mp3
        assert (m.usd_nanos, m.source, m.priced) == (r.estimate_usd_nanos, "estimate", True)


def test_gpt_4o_mini_tts_reserves_its_text_and_audio_per_character():
    body = {"model": "gpt-4o-mini-tts", "input": TEXT, "voice": "coral", "instructions": "Calm."}
    r = _speech(body)
    # the text and the instructions, tokenized apart, and a separator between them
    words = count_tokens(TEXT, "gpt-4o-mini-tts") + count_tokens("Calm.", "gpt-4o-mini-tts") + 1
    factor = CONFIG.safety_factor("openai", "gpt-4o-mini-tts")
    assert r.input_tokens == math.ceil((words + PROMPT_OVERHEAD) * factor)
    assert r.max_output_tokens == len(TEXT) * AUDIO_TOKENS_PER_CHARACTER
    assert r.estimate_usd_nanos == _genai(
        "gpt-4o-mini-tts", input_tokens=r.input_tokens, output_tokens=r.max_output_tokens
    )
    # Slower speech is longer audio: speed 0.5 reserves twice the output.
    slow = _speech({**body, "speed": 0.5})
    assert slow.max_output_tokens == 2 * r.max_output_tokens
    assert r.stream  # audio is forwarded as it arrives, never buffered


def test_raw_audio_is_charged_the_estimate_and_not_kept():
    r = _speech({"model": "gpt-4o-mini-tts", "input": TEXT, "voice": "alloy"})
    meter = open_stream_meter(r, "audio/mpeg", None, CONFIG)
    chunk = b"\xff\xfb" + bytes(50_000)
    assert meter.feed(chunk) is chunk
    _, m = meter.finish()
    assert (m.source, m.usd_nanos) == ("estimate", r.estimate_usd_nanos)
    assert meter._body is None  # raw audio holds no usage: never buffered for parsing


def _sse(usage: dict | None, deltas: int = 3) -> bytes:
    events = [{"type": "speech.audio.delta", "audio": "UklGRg" * 4000} for _ in range(deltas)]
    done: dict = {"type": "speech.audio.done"}
    if usage is not None:
        done["usage"] = usage
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in [*events, done])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=100_000), max_size=10))
def test_an_sse_speech_stream_is_charged_its_usage_however_cut(points):
    r = _speech(
        {"model": "gpt-4o-mini-tts", "input": TEXT, "voice": "alloy", "stream_format": "sse"}
    )
    raw = _sse({"input_tokens": 21, "output_tokens": 412, "total_tokens": 433})
    meter = open_stream_meter(r, "text/event-stream", None, CONFIG)
    for chunk in cut(raw, points):
        assert meter.feed(chunk) is chunk
    _, m = meter.finish()
    assert m.usage == TokenUsage(input_tokens=21, output_tokens=412)
    assert (m.source, m.priced) == ("usage", True)
    assert m.usd_nanos == _genai("gpt-4o-mini-tts", input_tokens=21, output_tokens=412)
    assert measure_body(r, 200, raw, CONFIG) == m


def test_an_sse_speech_stream_cut_before_its_usage_is_charged_the_estimate():
    r = _speech(
        {"model": "gpt-4o-mini-tts", "input": TEXT, "voice": "alloy", "stream_format": "sse"}
    )
    raw = _sse({"input_tokens": 21, "output_tokens": 412, "total_tokens": 433})
    meter = open_stream_meter(r, "text/event-stream", None, CONFIG)
    meter.feed(raw[: raw.index(b'{"type": "speech.audio.done"')])
    m = meter.partial()
    assert (m.source, m.usd_nanos) == ("estimate", r.estimate_usd_nanos)
    refused = measure_body(r, 400, b'{"error": {"message": "no"}}', CONFIG)
    assert refused.usd_nanos == 0


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "gpt-4o-mini-tts", "voice": "alloy"}, "input is missing"),
        ({"model": "tts-1", "input": 3, "voice": "alloy"}, "input must be a string"),
        ({"model": "gpt-4o-mini-tts", "input": "x", "speed": "fast"}, "speed must be a number"),
        ({"model": "gpt-4o-mini-tts", "input": "x", "instructions": 1}, "instructions must be"),
        ({"model": "gpt-4o-mini-tts", "input": "x", "stream_format": "ws"}, "stream_format"),
    ],
)
def test_a_malformed_speech_request_is_refused_in_plain_words(body, says):
    with pytest.raises(MeterRequestError, match=says):
        _speech(body)
