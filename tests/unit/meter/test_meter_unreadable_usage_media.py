"""A usage count the meter cannot read is absent, never 0, for the Images API (and the
Responses API's image tool and SVG author), speech, transcription and a batch's result lines:
each falls back as it does without usage (its estimate, the text counted, the images drawn);
fractional counts are rounded up. See test_meter_unreadable_usage for the LLM meters."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
from drawdown.meter import (
    TokenUsage,
    count_tokens,
    inspect_request,
    measure_body,
)
from drawdown.meter.openai_images import output_tokens_per_image
from meter_corpus import CONFIG, streamed

from tests.support import wire

NAN, INF = float("nan"), float("inf")
BATCH = {"processing": "batch"}


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


def _stream(request, body: bytes, content_type: str = "text/event-stream"):
    """The measurement of a stream fed whole, checked equal fed in pieces of 97 bytes (an
    image's base64 a byte at a time would take minutes)."""
    return streamed(request, body, content_type, piece=97)


def _nanos(usd: Decimal) -> int:
    return math.ceil(usd * 1_000_000_000)


# --- the Images API -------------------------------------------------------------------------

GENERATIONS = "/v1/images/generations"


def _image_request(**fields: Any):
    body = {"model": "gpt-image-1", "prompt": "a cat", **fields}
    return inspect_request("openai", "POST", GENERATIONS, {}, _json(body), CONFIG)


def _image_usage(**counts: Any) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": 12,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 12},
        "output_tokens": 4160,
        "output_tokens_details": {"image_tokens": 4160, "text_tokens": 0},
        "total_tokens": 4172,
    }
    for key, value in counts.items():
        if key.startswith("in_"):
            usage["input_tokens_details"][key[3:]] = value
        elif key.startswith("out_"):
            usage["output_tokens_details"][key[4:]] = value
        else:
            usage[key] = value
    return usage


def _image_answer(usage: dict[str, Any] | None, **more: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"created": 1, "data": [{"b64_json": "iVBORw0KGgo"}], **more}
    if usage is not None:
        answer["usage"] = usage
    return answer


UNREADABLE_IMAGE_USAGES = [
    _image_usage(input_tokens=-12),
    _image_usage(output_tokens=NAN),
    _image_usage(output_tokens="lots"),
    _image_usage(input_tokens=True),
    _image_usage(in_image_tokens=-1),
    _image_usage(in_cached_tokens=INF),
    _image_usage(out_image_tokens="-4160"),
]


@pytest.mark.parametrize("usage", UNREADABLE_IMAGE_USAGES)
def test_an_images_answer_whose_usage_cannot_be_read_is_charged_its_estimate(
    usage: dict[str, Any],
) -> None:
    r = _image_request(quality="high")
    without = measure_body(r, 200, _json(_image_answer(None)), CONFIG)
    assert (without.source, without.usd_nanos) == ("estimate", r.estimate_usd_nanos)
    m = measure_body(r, 200, _json(_image_answer(usage)), CONFIG)
    assert (m.source, m.usage, m.usd_nanos) == (without.source, without.usage, without.usd_nanos)


def test_an_images_answers_fractional_counts_are_rounded_up() -> None:
    r = _image_request(quality="high")
    usage = {"input_tokens": 11.5, "output_tokens": 4159.2}  # no breakdown: all image tokens
    m = measure_body(r, 200, _json(_image_answer(usage)), CONFIG)
    assert (m.source, m.usage) == (
        "usage",
        TokenUsage(input_tokens=12, output_tokens=4160, output_image_tokens=4160),
    )


def _images_sse(usages: list[dict[str, Any]]) -> bytes:
    out = ""
    for usage in usages:
        done = {"type": "image_generation.completed", "b64_json": "QUJD" * 100, "usage": usage}
        out += f"event: image_generation.completed\ndata: {json.dumps(done)}\n\n"
    return out.encode()


@pytest.mark.parametrize("bad", UNREADABLE_IMAGE_USAGES[:4])
def test_an_images_stream_with_an_image_whose_usage_cannot_be_read_is_charged_its_estimate(
    bad: dict[str, Any],
) -> None:
    """Summed over the images, the unreadable one would be charged as 0."""
    r = _image_request(quality="high", n=2, stream=True)
    good = _stream(r, _images_sse([_image_usage(), _image_usage()]))
    assert good.source == "usage" and good.usage.output_tokens == 8320
    m = _stream(r, _images_sse([_image_usage(), bad]))
    assert (m.source, m.usd_nanos) == ("estimate", r.estimate_usd_nanos)
    assert measure_body(r, 200, _images_sse([_image_usage(), bad]), CONFIG) == m


@pytest.mark.parametrize(
    "svg",
    [
        {"input_tokens": -900, "output_tokens": 2000},
        {"input_tokens": 900, "output_tokens": NAN},
        {"input_tokens": 900, "output_tokens": 2000, "reasoning_tokens": "lots"},
    ],
)
def test_an_svg_authors_usage_that_cannot_be_read_is_not_charged_as_0(
    svg: dict[str, Any],
) -> None:
    r = _image_request(model="gpt-image-2", output_format="svg")
    answer = _image_answer(_image_usage(), svg_usage={"model": "gpt-5-mini", **svg})
    m = measure_body(r, 200, _json(answer), CONFIG)
    assert (m.source, m.usd_nanos, dict(m.other_models)) == (
        "estimate",
        r.estimate_usd_nanos,
        {},
    )


# --- the Responses API's image_generation tool ----------------------------------------------

_GPT5_USAGE = {
    "input_tokens": 300,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 120,
    "output_tokens_details": {"reasoning_tokens": 64},
    "total_tokens": 420,
}


def _tool_answer(image_gen: dict[str, Any], drawn: int = 1) -> dict[str, Any]:
    call = {"type": "image_generation_call", "status": "completed", "result": "QUJD"}
    return {
        "object": "response",
        "model": "gpt-5-2025-08-07",
        "status": "completed",
        "output": [dict(call, id=f"ig_{i}") for i in range(drawn)],
        "tools": [{"type": "image_generation", "model": "gpt-image-1-mini", "quality": "medium"}],
        "tool_usage": {"image_gen": image_gen},
        "usage": _GPT5_USAGE,
    }


def _tool_request(stream: bool = False):
    tool = {"type": "image_generation", "model": "gpt-image-1-mini", "quality": "medium"}
    body = {"model": "gpt-5", "input": "Draw a cat", "tools": [tool], "stream": stream}
    return inspect_request("openai", "POST", "/v1/responses", {}, _json(body), CONFIG)


@pytest.mark.parametrize(
    "image_gen",
    [
        {"input_tokens": 350, "output_tokens": -1056},
        {"input_tokens": 350, "output_tokens": NAN},
        {"input_tokens": "lots", "output_tokens": 1056},
        {"input_tokens": 350, "output_tokens": True},
    ],
)
def test_an_image_tools_usage_that_cannot_be_read_charges_the_images_drawn(
    image_gen: dict[str, Any],
) -> None:
    """Each image_generation_call is one image of the tool's quality, as reserved, the input
    the call's own, once. (Before: its input alone, or nothing, on the image model.)"""
    per_image = output_tokens_per_image("gpt-image-1-mini", "medium", None)
    expected = TokenUsage(input_tokens=300, output_tokens=per_image, output_image_tokens=per_image)
    r = _tool_request()
    m = measure_body(r, 200, _json(_tool_answer(image_gen)), CONFIG)
    assert (m.source, m.usage.input_tokens) == ("usage", 300)
    assert dict(m.other_models) == {"gpt-image-1-mini": expected}
    two = measure_body(r, 200, _json(_tool_answer(image_gen, drawn=2)), CONFIG)
    assert dict(two.other_models) == {
        "gpt-image-1-mini": TokenUsage(
            input_tokens=300, output_tokens=2 * per_image, output_image_tokens=2 * per_image
        )
    }
    assert two.usd_nanos > m.usd_nanos
    none = measure_body(r, 200, _json(_tool_answer(image_gen, drawn=0)), CONFIG)
    assert dict(none.other_models) == {}
    # Streamed: the same.
    answer = _tool_answer(image_gen)
    events = [
        ("response.created", {"type": "response.created", "response": {**answer, "output": []}}),
        ("response.completed", {"type": "response.completed", "response": answer}),
    ]
    raw = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events).encode()
    streamed = _stream(_tool_request(stream=True), raw)
    assert (dict(streamed.other_models), streamed.usd_nanos) == (dict(m.other_models), m.usd_nanos)


# --- speech ---------------------------------------------------------------------------------

TEXT = "The quick brown fox jumps over the lazy dog, twice, and then rests in the shade."


def _speech_request():
    body = {"model": "gpt-4o-mini-tts", "input": TEXT, "voice": "alloy", "stream_format": "sse"}
    return inspect_request("openai", "POST", "/v1/audio/speech", {}, _json(body), CONFIG)


def _speech_sse(usage: dict[str, Any]) -> bytes:
    events = [
        {"type": "speech.audio.delta", "audio": "UklGRg" * 100},
        {"type": "speech.audio.done", "usage": usage},
    ]
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": 21, "output_tokens": -412},
        {"input_tokens": NAN, "output_tokens": 412},
        {"input_tokens": 21, "output_tokens": "lots"},
        {"input_tokens": True, "output_tokens": 412},
    ],
)
def test_a_speech_usage_that_cannot_be_read_is_charged_the_estimate(usage: dict[str, Any]) -> None:
    r = _speech_request()
    m = _stream(r, _speech_sse(usage))
    assert (m.source, m.usd_nanos) == ("estimate", r.estimate_usd_nanos)
    assert measure_body(r, 200, _speech_sse(usage), CONFIG) == m


def test_a_speech_usages_fractional_counts_are_rounded_up() -> None:
    m = _stream(_speech_request(), _speech_sse({"input_tokens": 20.5, "output_tokens": 411.1}))
    assert (m.source, m.usage) == ("usage", TokenUsage(input_tokens=21, output_tokens=412))


# --- transcription --------------------------------------------------------------------------


def _form(fields: dict[str, str], audio: bytes) -> bytes:
    out = b""
    for key, value in fields.items():
        out += f'--b0und4ry\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    out += b'--b0und4ry\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
    return out + b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n--b0und4ry--\r\n"


def _transcription(model: str, seconds: float, **fields: str):
    body = _form({"model": model, **fields}, wire.wav_audio(seconds))
    return inspect_request("openai", "POST", "/v1/audio/transcriptions", {}, body, CONFIG)


TRANSCRIPT = "Hello there, how are you?"


def _tokens(**counts: Any) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "type": "tokens",
        "input_tokens": 125,
        "input_token_details": {"text_tokens": 5, "audio_tokens": 120},
        "output_tokens": 30,
        "total_tokens": 155,
    }
    for key, value in counts.items():
        if key == "audio_tokens":
            usage["input_token_details"][key] = value
        else:
            usage[key] = value
    return usage


@pytest.mark.parametrize(
    "usage",
    [
        _tokens(input_tokens=-125),
        _tokens(output_tokens=NAN),
        _tokens(input_tokens="lots"),
        _tokens(output_tokens=False),
        _tokens(audio_tokens=-120),
    ],
)
def test_a_transcriptions_token_usage_that_cannot_be_read_is_counted(
    usage: dict[str, Any],
) -> None:
    """As a text answer: the input estimate and the transcript counted."""
    r = _transcription("gpt-4o-transcribe", 12)
    m = measure_body(r, 200, _json({"text": TRANSCRIPT, "usage": usage}), CONFIG)
    assert m.source == "counted"
    assert (m.usage.input_tokens, m.usage.input_audio_tokens) == (
        r.input_tokens,
        r.input_audio_tokens,
    )
    assert m.usage.output_tokens >= count_tokens(TRANSCRIPT, "gpt-4o-transcribe")
    streamed_request = _transcription("gpt-4o-transcribe", 12, stream="true")
    done = {"type": "transcript.text.done", "text": TRANSCRIPT, "usage": usage}
    streamed = _stream(streamed_request, f"data: {json.dumps(done)}\n\n".encode())
    assert (streamed.source, streamed.usage.input_audio_tokens) == (
        "counted",
        r.input_audio_tokens,
    )


def test_a_transcriptions_fractional_token_counts_are_rounded_up() -> None:
    r = _transcription("gpt-4o-transcribe", 12)
    usage = _tokens(input_tokens=124.5, output_tokens=29.5, audio_tokens=119.5)
    m = measure_body(r, 200, _json({"text": TRANSCRIPT, "usage": usage}), CONFIG)
    assert (m.source, m.usage) == (
        "usage",
        TokenUsage(input_tokens=125, output_tokens=30, input_audio_tokens=120),
    )


@pytest.mark.parametrize(
    "answer",
    [
        {"text": TRANSCRIPT, "usage": {"type": "duration", "seconds": -61}},
        {"text": TRANSCRIPT, "usage": {"type": "duration", "seconds": -0.5}},
        {"task": "transcribe", "duration": -61.2, "text": TRANSCRIPT, "segments": []},
        {"text": TRANSCRIPT, "usage": {"type": "duration", "seconds": NAN}},
        {"text": TRANSCRIPT, "usage": {"type": "duration", "seconds": True}},
    ],
)
def test_seconds_that_cannot_be_read_are_charged_the_files_duration(
    answer: dict[str, Any],
) -> None:
    """A negative duration was charged as 0 seconds ($0); the estimate reads the file's."""
    r = _transcription("whisper-1", 61.2)
    m = measure_body(r, 200, _json(answer), CONFIG)
    assert (m.source, dict(m.extras)) == ("estimate", {"audio_seconds": 62})
    assert m.usd_nanos == r.estimate_usd_nanos > 0


# --- a batch's result lines -----------------------------------------------------------------

GOOD_CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010},
}
ANSWER_TEXT = "Four, as two and two make four, and four and four make eight."


def _openai_line(body: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        "id": f"batch_req_{i}",
        "custom_id": f"request-{i}",
        "response": {"status_code": 200, "request_id": f"req_{i}", "body": body},
        "error": None,
    }


def _lines(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(_json(line) + b"\n" for line in lines)


def _batch_price(model: str, provider: str, **usage: int) -> Decimal:
    return genai_prices.calc_price(
        genai_prices.Usage(**usage), model, provider_id=provider, price_context=BATCH
    ).total_price


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1000, "completion_tokens": 14},
        {"prompt_tokens": 1000, "completion_tokens": NAN},
        {"prompt_tokens": "lots", "completion_tokens": 14},
        {"prompt_tokens": True, "completion_tokens": True},
    ],
)
def test_an_openai_batch_line_whose_usage_cannot_be_read_is_charged_its_text_counted(
    usage: dict[str, Any],
) -> None:
    bad = {
        **GOOD_CHAT,
        "id": "chatcmpl-2",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER_TEXT}}],
        "usage": usage,
    }
    request = inspect_request(
        "openai",
        "GET",
        "/v1/files/file-1/content",
        {},
        b"",
        CONFIG,
        origin="https://api.openai.com",
    )
    good = measure_body(request, 200, _lines([_openai_line(GOOD_CHAT, 0)]), CONFIG)
    got = measure_body(
        request, 200, _lines([_openai_line(GOOD_CHAT, 0), _openai_line(bad, 1)]), CONFIG
    )
    counted = count_tokens(ANSWER_TEXT, "gpt-4o-mini")
    assert counted > 0
    assert (got.source, got.answered) == ("counted", 2)  # was ("usage", 1): the line at $0
    assert got.usage == TokenUsage(input_tokens=1000, output_tokens=10 + counted)
    model = "gpt-4o-mini-2024-07-18"
    expected = _batch_price(model, "openai", input_tokens=1000, output_tokens=10) + _batch_price(
        model, "openai", output_tokens=counted
    )
    assert _nanos(expected) - 2 <= got.usd_nanos <= _nanos(expected)
    assert got.usd_nanos > good.usd_nanos


def test_an_anthropic_batch_line_whose_usage_cannot_be_read_is_charged_its_text_counted() -> None:
    def message(usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": ANSWER_TEXT}],
            "stop_reason": "end_turn",
            "usage": usage,
        }

    def results(usage: dict[str, Any]) -> bytes:
        line = {"custom_id": "r-0", "result": {"type": "succeeded", "message": message(usage)}}
        return _lines([line])

    request = inspect_request(
        "anthropic",
        "GET",
        "/v1/messages/batches/msgbatch_1/results",
        {},
        b"",
        CONFIG,
        origin="https://api.anthropic.com",
    )
    got = measure_body(request, 200, results({"input_tokens": 1000, "output_tokens": -50}), CONFIG)
    assert (got.source, got.answered, got.usage.input_tokens) == ("counted", 1, 0)
    # Claude's text counted with tiktoken, times its safety factor: never below tiktoken's.
    assert got.usage.output_tokens >= count_tokens(ANSWER_TEXT, "claude-haiku-4-5") > 0
    assert got.usd_nanos > 0  # was 0, the line dropped
    fine = measure_body(request, 200, results({"input_tokens": 1000, "output_tokens": 50}), CONFIG)
    assert (fine.source, fine.usage) == ("usage", TokenUsage(input_tokens=1000, output_tokens=50))


def test_a_gemini_batch_response_whose_usage_cannot_be_read_is_charged_its_text_counted() -> None:
    response = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": ANSWER_TEXT}]}}],
        "modelVersion": "gemini-2.5-flash",
        "usageMetadata": {"promptTokenCount": -1000, "candidatesTokenCount": 50},
    }
    request = inspect_request(
        "gemini",
        "GET",
        "/download/v1beta/files/f-1:download",
        {},
        b"",
        CONFIG,
        origin="https://generativelanguage.googleapis.com",
    )
    got = measure_body(request, 200, _lines([{"key": "0", "response": response}]), CONFIG)
    assert (got.source, got.answered, got.usage.input_tokens) == ("counted", 1, 0)
    assert got.usage.output_tokens >= count_tokens(ANSWER_TEXT, "gemini-2.5-flash") > 0
    assert got.usd_nanos > 0
