"""Image tokens priced as image tokens, and the OpenAI Images API metered per token."""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from decimal import Decimal

import genai_prices
import httpx2
import pytest
from drawdown.meter import (
    MeterRequestError,
    TokenUsage,
    charging,
    count_tokens,
    images,
    inspect_request,
    measure_body,
    open_stream_meter,
    price_usage,
    unread_request,
)
from drawdown.meter.openai_images import PROMPT_OVERHEAD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meter_corpus import CONFIG, cut

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


def _nanos(usd: Decimal) -> int:
    return math.ceil(usd * 1_000_000_000)


def _genai(model: str, provider_id: str, **usage: int) -> int:
    price = genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id=provider_id)
    return _nanos(price.total_price)


def _json(body: object) -> bytes:
    return json.dumps(body).encode()


def _image_request(body: dict | bytes, path: str = GENERATIONS):
    raw = body if isinstance(body, bytes) else _json(body)
    return inspect_request("openai", "POST", path, {}, raw, CONFIG)


def _multipart(fields: dict[str, str], images: int, mask: bool = False) -> bytes:
    """An edits form as httpx2 (the openai SDK's transport) encodes it."""
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    files = [("image[]", (f"in{i}.png", png, "image/png")) for i in range(images)]
    if mask:
        files.append(("mask", ("mask.png", b"\x89PNG\r\n\x1a\n" + bytes(32), "image/png")))
    request = httpx2.Request("POST", "https://api.openai.com" + EDITS, data=fields, files=files)
    return request.read()


# --- Gemini: image modality ----------------------------------------------------------------


def _gemini_image_answer(
    prompt: int = 9, image: int = 1290, prompt_image: int = 0, model: str = "gemini-2.5-flash-image"
) -> dict:
    details = [{"modality": "TEXT", "tokenCount": prompt - prompt_image}]
    if prompt_image:
        details.append({"modality": "IMAGE", "tokenCount": prompt_image})
    return {
        "candidates": [{"content": {"parts": [{"inlineData": {"data": "AAAA"}}]}}],
        "usageMetadata": {
            "promptTokenCount": prompt,
            "candidatesTokenCount": image,
            "totalTokenCount": prompt + image,
            "promptTokensDetails": details,
            "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": image}],
        },
        "modelVersion": model,
    }


def _gemini_request(model: str = "gemini-2.5-flash-image", stream: bool = False):
    action = "streamGenerateContent" if stream else "generateContent"
    body = _json({"contents": [{"parts": [{"text": "draw a cat"}]}]})
    return inspect_request(
        "gemini", "POST", f"/v1beta/models/{model}:{action}", {"alt": "sse"}, body, CONFIG
    )


def test_gemini_output_image_tokens_are_priced_as_image_tokens():
    """1290 image tokens at gemini-2.5-flash-image's $30/M, not its $2.50/M text price."""
    m = measure_body(_gemini_request(), 200, _json(_gemini_image_answer()), CONFIG)
    assert m.usage.output_image_tokens == 1290 and m.usage.output_tokens == 1290
    assert m.usd_nanos == _genai(
        "gemini-2.5-flash-image", "google", input_tokens=9, output_tokens=1290,
        output_image_tokens=1290,
    )  # fmt: skip
    assert m.usd_nanos == 38_702_700  # $0.0387027: 9 x $0.30/M + 1290 x $30/M


def test_gemini_image_tokens_in_a_stream_whole_and_rechunked():
    answer = _gemini_image_answer(20, 1120, 11, "gemini-3-pro-image-preview")
    first = {**answer, "usageMetadata": {"promptTokenCount": 20}}
    body = b"".join(b"data: " + _json(c) + b"\r\n\r\n" for c in (first, answer))
    request = _gemini_request("gemini-3-pro-image-preview", stream=True)
    expected = price_usage(
        "gemini",
        "gemini-3-pro-image-preview",
        TokenUsage(
            input_tokens=20, output_tokens=1120, input_image_tokens=11, output_image_tokens=1120
        ),
        CONFIG,
    )[0]
    for points in ([], [7], list(range(1, len(body), 13))):
        meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
        for chunk in cut(body, points):
            meter.feed(chunk)
        _, m = meter.finish()
        assert (m.usage.input_image_tokens, m.usage.output_image_tokens) == (11, 1120)
        assert m.usd_nanos == expected
    # At $120/M for image output, not $12/M for text.
    text_only = price_usage(
        "gemini",
        "gemini-3-pro-image-preview",
        TokenUsage(input_tokens=20, output_tokens=1120),
        CONFIG,
    )[0]
    assert expected > 9 * text_only


def test_cached_image_tokens_are_stated_to_genai_prices():
    """Cache reads and input images overlap: genai-prices refuses the two without their
    intersection, and the image breakdown was lost (priced as plain text)."""
    usage = TokenUsage(
        input_tokens=1000, output_tokens=4160, cache_read_tokens=400, input_image_tokens=600
    )
    nanos, priced = price_usage("openai", "gpt-image-1.5", usage, CONFIG)
    assert priced
    assert nanos == _genai(
        "gpt-image-1.5", "openai", input_tokens=1000, output_tokens=4160, cache_read_tokens=400,
        input_image_tokens=600, cache_image_read_tokens=0,
    )  # fmt: skip
    plain = price_usage(
        "openai", "gpt-image-1.5", TokenUsage(input_tokens=1000, output_tokens=4160), CONFIG
    )[0]
    assert nanos != plain


def test_openai_chat_and_responses_image_token_details_are_kept():
    chat = inspect_request(
        "openai", "POST", "/v1/chat/completions", {},
        _json({"model": "gpt-realtime", "messages": [{"role": "user", "content": "hi"}]}), CONFIG,
    )  # fmt: skip
    answer = {
        "model": "gpt-realtime",
        "choices": [],
        "usage": {
            "prompt_tokens": 300,
            "completion_tokens": 5,
            "prompt_tokens_details": {"image_tokens": 250, "cached_tokens": 0},
        },
    }
    m = measure_body(chat, 200, _json(answer), CONFIG)
    assert m.usage.input_image_tokens == 250
    assert m.usd_nanos == _genai(
        "gpt-realtime", "openai", input_tokens=300, output_tokens=5, input_image_tokens=250
    )


# --- OpenAI Images API: routing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "charged", "model"),
    [
        (GENERATIONS, {"model": "gpt-image-1", "prompt": "a cat"}, "tokens", "gpt-image-1"),
        (GENERATIONS, {"model": "gpt-image-1-mini", "prompt": "x"}, "tokens", "gpt-image-1-mini"),
        (GENERATIONS, {"model": "gpt-image-1.5", "prompt": "x"}, "tokens", "gpt-image-1.5"),
        (GENERATIONS, {"model": "chatgpt-image-latest", "prompt": "x"}, "tokens", None),
        (GENERATIONS, {"model": "gpt-image-2", "prompt": "x"}, "tokens", "gpt-image-2"),
        # A GPT image model genai-prices does not know yet: metered at the fallback price.
        (GENERATIONS, {"model": "gpt-image-9", "prompt": "x"}, "tokens", None),
        (GENERATIONS, {"model": "dall-e-3", "prompt": "a cat"}, "step", "dall-e-3"),
        (GENERATIONS, {"model": "dall-e-2", "prompt": "a cat"}, "step", "dall-e-2"),
        (GENERATIONS, {"prompt": "a cat"}, "step", None),  # the API's default: dall-e-2
        ("/openai/deployments/gpt-image-1/images/generations", {"prompt": "x"}, "tokens", None),
        ("/openai/deployments/dalle3/images/generations", {"prompt": "x"}, "step", None),
        (
            EDITS,
            {"model": "gpt-image-1", "prompt": "x", "images": [{"file_id": "f"}]},
            "tokens",
            None,
        ),
    ],
)
def test_images_are_metered_for_models_priced_per_token(path, body, charged, model):
    r = _image_request(body, path)
    assert (r.billable, r.step) == (charged == "tokens", charged == "step")
    assert r.endpoint == ("images.edits" if "edits" in path else "images.generations")
    assert charging("openai", "POST", path, r.model) == charged
    if model is not None:
        assert r.model == model and r.priced
    # Unread (shadow mode, path only): no model known, a step as before.
    assert unread_request("openai", "POST", path).step


# --- OpenAI Images API: the estimate ---------------------------------------------------------

TABLE = [  # OpenAI's published output tokens per image for gpt-image-1
    ("low", "1024x1024", 272),
    ("medium", "1024x1024", 1056),
    ("high", "1024x1024", 4160),
    ("low", "1024x1536", 408),
    ("medium", "1024x1536", 1584),
    ("high", "1024x1536", 6240),
    ("low", "1536x1024", 400),
    ("medium", "1536x1024", 1568),
    ("high", "1536x1024", 6208),
    ("auto", "1024x1024", 4160),  # auto quality: the largest (high)
    ("low", "auto", 408),  # auto size: the largest for the quality
    ("auto", "auto", 6240),
    (None, None, 6240),  # both omitted: auto
]


@pytest.mark.parametrize(("quality", "size", "tokens"), TABLE)
def test_output_image_tokens_follow_openais_table(quality, size, tokens):
    body = {"model": "gpt-image-1", "prompt": "a red fox in the snow", "n": 3}
    if quality:
        body["quality"] = quality
    if size:
        body["size"] = size
    r = _image_request(body)
    assert r.max_output_tokens == 3 * tokens
    prompt = count_tokens(body["prompt"], "gpt-image-1") + PROMPT_OVERHEAD
    assert r.input_tokens == prompt
    assert r.estimate_usd_nanos == _genai(
        "gpt-image-1", "openai", input_tokens=prompt, output_tokens=3 * tokens
    )


def test_output_is_reserved_at_the_image_price():
    """gpt-image-1.5: $32/M for image output, $10/M for text output: the reserve uses the
    former, or a $0.20 image would reserve $0.06."""
    r = _image_request({"model": "gpt-image-1.5", "prompt": "x", "quality": "high"})
    assert r.estimate_usd_nanos == _genai(
        "gpt-image-1.5", "openai", input_tokens=r.input_tokens, output_tokens=6240,
        output_image_tokens=6240,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("quality", "size", "tokens"),
    [
        ("high", "1024x1024", 7024),  # OpenAI's cost calculator for gpt-image-2
        ("high", "1536x1024", 5488),
        ("auto", "1024x1024", 7024),
        ("xhigh", "1024x1024", 4 * 7024 + 0),  # unpublished: four times high
        ("high", "auto", 23719),  # the largest square the pixel limit allows
    ],
)
def test_gpt_image_2_sizes_are_free_form(quality, size, tokens):
    r = _image_request({"model": "gpt-image-2", "prompt": "x", "quality": quality, "size": size})
    assert r.max_output_tokens == tokens


def test_partial_images_and_gif_frames_add_output():
    base = {"model": "gpt-image-1", "prompt": "x", "quality": "low", "size": "1024x1024"}
    assert _image_request({**base, "stream": True, "partial_images": 2}).max_output_tokens == (
        272 + 2 * 100
    )
    gif = {**base, "output_format": "gif", "frame_count": 4}
    assert _image_request(gif).max_output_tokens == 4 * 272
    assert _image_request({**gif, "frame_count": None}).max_output_tokens == 9 * 272


def test_edits_reserve_each_input_image_as_the_largest_image():
    form = {"model": "gpt-image-1", "prompt": "add a hat", "quality": "medium", "n": "2"}
    r = _image_request(_multipart(form, images=2, mask=True), EDITS)
    assert (r.billable, r.endpoint, r.model) == (True, "images.edits", "gpt-image-1")
    assert r.max_output_tokens == 2 * 1584
    prompt = count_tokens("add a hat", "gpt-image-1") + PROMPT_OVERHEAD
    assert r.input_tokens == prompt + 3 * 6240  # two images and a mask
    assert r.estimate_usd_nanos == _genai(
        "gpt-image-1", "openai", input_tokens=r.input_tokens, input_image_tokens=3 * 6240,
        output_tokens=2 * 1584,
    )  # fmt: skip
    dalle = _image_request(_multipart({"model": "dall-e-2", "prompt": "x"}, images=1), EDITS)
    assert (dalle.billable, dalle.step, dalle.model) == (False, True, "dall-e-2")


def test_an_edit_naming_its_model_twice_is_refused():
    """The meter reads the last model: gpt-image-1 then dall-e-2 read as DALL·E, a $0 step,
    while a host that takes the first bills GPT image tokens. As for transcriptions."""
    body = _multipart({"model": "gpt-image-1", "prompt": "add a hat"}, images=1)
    end = body.rindex(b"--", 0, len(body) - 4)  # the closing delimiter
    boundary = body[: body.index(b"\r\n")]
    twice = body[:end] + boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
    twice += b"dall-e-2\r\n" + body[end:]
    assert _image_request(body, EDITS).billable
    with pytest.raises(MeterRequestError, match="model is given more than once"):
        _image_request(twice, EDITS)


def test_a_multipart_form_with_bare_line_feeds_and_a_preamble_is_read():
    body = (
        b"\r\n--b0undary\n"
        b'Content-Disposition: form-data; name="model"\n\ngpt-image-1\n'
        b"--b0undary\n"
        b'Content-Disposition: form-data; name="prompt"\n\nhello\n'
        b"--b0undary  \n"
        b'Content-Disposition: form-data; name="image"; filename="a.png"\n'
        b"Content-Type: image/png\n\n\x89PNG\x00\xff\n"
        b"--b0undary--\n"
    )
    r = _image_request(body, EDITS)
    assert r.model == "gpt-image-1"
    assert r.input_tokens == count_tokens("hello", "gpt-image-1") + PROMPT_OVERHEAD + 6240


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        (GENERATIONS, b"not json", "JSON object"),
        (GENERATIONS, b"[1, 2]", "JSON object"),
        (GENERATIONS, b'{"model": "gpt-image-1"}', "prompt is missing"),
        (GENERATIONS, b'{"model": "gpt-image-1", "prompt": 7}', "prompt must be a string"),
        (GENERATIONS, b'{"model": "gpt-image-1", "prompt": "x", "n": "two"}', "n must be"),
        (GENERATIONS, b'{"model": "gpt-image-1", "prompt": "x", "size": 1024}', "size must"),
        (GENERATIONS, b'{"model": 5, "prompt": "x"}', "model must be a string"),
        (EDITS, b"", "boundary"),
        (EDITS, b"no boundary here", "boundary"),
        (EDITS, b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nx', "cut short"),
        (EDITS, b"--b\r\nno header block\r\n--b--\r\n", "no header block"),
        (EDITS, b"--b\r\nX-Other: 1\r\n\r\nvalue\r\n--b--\r\n", "Content-Disposition"),
        (EDITS, b'--b\r\nContent-Disposition: form-data; name="n"\r\n\r\nmany\r\n--b--', "n must"),
        (EDITS, b'--b\r\nContent-Disposition: form-data; name="n"\r\n\r\n-1\r\n--b--', "n must"),
        (
            EDITS,
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n\xff\r\n--b--',
            "UTF-8",
        ),
        (
            EDITS,
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nx\r\n--bxyz',
            "boundary",
        ),
    ],
)
def test_a_malformed_images_request_is_refused_in_plain_words(path, body, says):
    with pytest.raises(MeterRequestError, match=says):
        _image_request(body, path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_the_multipart_reader_never_crashes(noise, at):
    """Any bytes, or a real form with bytes spliced in: a reading or a MeterRequestError."""
    form = _multipart({"model": "gpt-image-1", "prompt": "a hat", "n": "1"}, images=1)
    for body in (noise, form[:at] + noise + form[at:], b"--x\r\n" + noise):
        try:
            r = _image_request(body, EDITS)
        except MeterRequestError:
            continue
        assert r.estimate_usd_nanos >= 0


# --- OpenAI Images API: measuring the answer ------------------------------------------------


def _usage(text: int, image: int, output: int, details: bool = True) -> dict:
    usage = {
        "input_tokens": text + image,
        "input_tokens_details": {"image_tokens": image, "text_tokens": text},
        "output_tokens": output,
        "total_tokens": text + image + output,
    }
    if details:
        usage["output_tokens_details"] = {"image_tokens": output, "text_tokens": 0}
    return usage


def _answer(usage: dict | None) -> bytes:
    body = {"created": 1, "data": [{"b64_json": "iVBORw0KGgo" * 500}], "quality": "high"}
    if usage is not None:
        body["usage"] = usage
    return _json(body)


def test_the_json_answers_usage_is_charged_at_genai_prices():
    r = _image_request({"model": "gpt-image-1", "prompt": "a cat", "quality": "high"})
    m = measure_body(r, 200, _answer(_usage(12, 0, 4160, details=False)), CONFIG)
    assert (m.source, m.priced, m.model) == ("usage", True, "gpt-image-1")
    assert m.usage.output_image_tokens == 4160  # no breakdown: every output token is an image's
    assert m.usd_nanos == _genai("gpt-image-1", "openai", input_tokens=12, output_tokens=4160)
    assert m.usd_nanos <= r.estimate_usd_nanos
    # gpt-image-1.5 prices image output apart ($32/M vs $10/M text): a text breakdown counts.
    r15 = _image_request({"model": "gpt-image-1.5", "prompt": "a cat"})
    usage = _usage(12, 500, 4200)
    usage["output_tokens_details"] = {"image_tokens": 4160, "text_tokens": 40}
    m15 = measure_body(r15, 200, _answer(usage), CONFIG)
    assert m15.usd_nanos == _genai(
        "gpt-image-1.5", "openai", input_tokens=512, input_image_tokens=500, output_tokens=4200,
        output_image_tokens=4160,
    )  # fmt: skip


def test_an_answer_without_usage_is_charged_its_estimate():
    r = _image_request({"model": "gpt-image-1", "prompt": "a cat"})
    m = measure_body(r, 200, _answer(None), CONFIG)
    assert (m.source, m.usd_nanos) == ("estimate", r.estimate_usd_nanos)
    refused = measure_body(r, 400, b'{"error": {"message": "no"}}', CONFIG)
    assert refused.usd_nanos == 0


def _stream(kind: str, usages: list[dict], partials: int = 2) -> bytes:
    events = []
    for usage in usages:
        for i in range(partials):
            data = {"type": f"{kind}.partial_image", "b64_json": "QUJD" * 3000, "index": i}
            events.append(f"event: {kind}.partial_image\ndata: {json.dumps(data)}\n\n")
        done = {"type": f"{kind}.completed", "b64_json": "QUJD" * 3000, "usage": usage}
        events.append(f"event: {kind}.completed\ndata: {json.dumps(done)}\n\n")
    return "".join(events).encode()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=60_000), max_size=12), st.booleans())
def test_a_streamed_image_is_metered_however_it_is_cut(points, edit):
    kind, path = ("image_edit", EDITS) if edit else ("image_generation", GENERATIONS)
    body = {"model": "gpt-image-1", "prompt": "a cat", "n": 2, "stream": True}
    if edit:
        body["images"] = [{"file_id": "file-1"}]
    r = _image_request(body, path)
    assert r.stream
    raw = _stream(kind, [_usage(7, 323, 4160), _usage(0, 0, 4160)])
    meter = open_stream_meter(r, "text/event-stream", None, CONFIG)
    for chunk in cut(raw, points):
        assert meter.feed(chunk) is chunk
    _, m = meter.finish()
    assert m.source == "usage"
    assert m.usage == TokenUsage(
        input_tokens=330, output_tokens=8320, input_image_tokens=323, output_image_tokens=8320
    )
    assert m.usd_nanos == _genai(
        "gpt-image-1", "openai", input_tokens=330, input_image_tokens=323, output_tokens=8320
    )
    # The same bytes buffered (measure_body) agree.
    assert measure_body(r, 200, raw, CONFIG) == m


def test_a_stream_cut_before_its_usage_is_charged_its_estimate():
    r = _image_request({"model": "gpt-image-1", "prompt": "a cat", "stream": True})
    raw = _stream("image_generation", [_usage(7, 0, 4160)])
    meter = open_stream_meter(r, "text/event-stream", None, CONFIG)
    meter.feed(raw[: raw.index(b"event: image_generation.completed")])
    m = meter.partial()
    assert (m.source, m.usd_nanos) == ("estimate", r.estimate_usd_nanos)


def test_svg_authoring_is_charged_on_its_own_model():
    r = _image_request({"model": "gpt-image-2", "prompt": "a logo", "output_format": "svg"})
    body = json.loads(_answer(_usage(5, 0, 7024)))
    body["svg_usage"] = {
        "model": "gpt-5-mini",
        "input_tokens": 900,
        "output_tokens": 2000,
        "reasoning_tokens": 1500,
        "total_tokens": 2900,
    }
    m = measure_body(r, 200, _json(body), CONFIG)
    assert dict(m.other_models) == {
        "gpt-5-mini": TokenUsage(input_tokens=900, output_tokens=2000, reasoning_tokens=1500)
    }
    own = _genai("gpt-image-2", "openai", input_tokens=5, output_tokens=7024)
    svg = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=900, output_tokens=2000, output_reasoning_tokens=1500),
        "gpt-5-mini",
        provider_id="openai",
    ).total_price
    assert m.usd_nanos == _nanos(
        genai_prices.calc_price(
            genai_prices.Usage(input_tokens=5, output_tokens=7024), "gpt-image-2",
            provider_id="openai",
        ).total_price + svg
    )  # fmt: skip
    assert m.usd_nanos > own


# --- the Responses API's image_generation tool ---------------------------------------------

RESPONSES = "/v1/responses"


def _image_tool_answer(tool_usage: dict, echo_model: str | None = "gpt-image-1-mini") -> dict:
    tools = [{"type": "image_generation", "quality": "medium"}]
    if echo_model:
        tools[0]["model"] = echo_model
    return {
        "object": "response",
        "model": "gpt-5-2025-08-07",
        "status": "completed",
        "output": [{"type": "image_generation_call", "status": "completed", "result": "QUJD"}],
        "tools": tools,
        "tool_usage": {"image_gen": tool_usage, "web_search": {"num_requests": 0}},
        "usage": {
            "input_tokens": 300,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 120,
            "output_tokens_details": {"reasoning_tokens": 64},
            "total_tokens": 420,
        },
    }


# The tool's usage in the shape OpenAI reports it (the Images API's usage).
_IMAGE_GEN = {
    "input_tokens": 350,
    "input_tokens_details": {"image_tokens": 300, "text_tokens": 50},
    "output_tokens": 1056,
    "output_tokens_details": {"image_tokens": 1056, "text_tokens": 0},
    "total_tokens": 1406,
}
_GPT5 = _genai("gpt-5", "openai", input_tokens=300, output_tokens=120, output_reasoning_tokens=64)
_MINI_IMAGE = _genai(
    "gpt-image-1-mini", "openai", input_tokens=350, input_image_tokens=300, output_tokens=1056,
    output_image_tokens=1056,
)  # fmt: skip


def _tool_request(tool: dict, stream: bool = False):
    body = {"model": "gpt-5", "input": "Draw a cat", "tools": [tool], "stream": stream}
    return inspect_request("openai", "POST", RESPONSES, {}, _json(body), CONFIG)


@pytest.mark.parametrize(
    ("tool", "model", "output"),
    [
        # one medium 1024x1536 image, and its two partial images at 100 tokens each
        (
            {"type": "image_generation", "model": "gpt-image-1-mini", "quality": "medium",
             "size": "1024x1536", "partial_images": 2},
            "gpt-image-1-mini", 1584 + 200,
        ),
        # no model, quality or size: gpt-image-1, and the largest image "auto" may pick
        ({"type": "image_generation"}, "gpt-image-1", 6240),
    ],
)  # fmt: skip
def test_the_image_tool_reserves_one_image_on_its_own_model(tool, model, output):
    r = _tool_request(tool)
    assert r.image_tool_model == model
    own = price_usage(
        "openai", "gpt-5", TokenUsage(input_tokens=r.input_tokens, output_tokens=r.max_output_tokens),
        CONFIG,
    )[0]  # fmt: skip
    # The image model's input is reserved as the call's own (it may see the conversation).
    image = _genai(
        model, "openai", input_tokens=r.input_tokens, output_tokens=output,
        output_image_tokens=output,
    )  # fmt: skip
    assert (r.estimate_usd_nanos, r.priced) == (own + image, True)


def test_the_image_tools_tokens_are_charged_on_the_image_model():
    r = _tool_request({"type": "image_generation", "model": "gpt-image-1-mini"})
    m = measure_body(r, 200, _json(_image_tool_answer(_IMAGE_GEN)), CONFIG)
    assert m.usage == TokenUsage(input_tokens=300, output_tokens=120, reasoning_tokens=64)
    assert dict(m.other_models) == {
        "gpt-image-1-mini": TokenUsage(
            input_tokens=350, output_tokens=1056, input_image_tokens=300, output_image_tokens=1056
        )
    }
    assert (m.usd_nanos, m.priced, m.source) == (_GPT5 + _MINI_IMAGE, True, "usage")
    assert m.extras["image_generation_calls"] == 1


def test_the_image_tool_model_comes_from_the_request_when_the_answer_does_not_echo_it():
    r = _tool_request({"type": "image_generation", "model": "gpt-image-1-mini"})
    m = measure_body(r, 200, _json(_image_tool_answer(_IMAGE_GEN, echo_model=None)), CONFIG)
    assert list(m.other_models) == ["gpt-image-1-mini"]
    assert m.usd_nanos == _GPT5 + _MINI_IMAGE


def test_an_unused_image_tool_charges_nothing_on_the_image_model():
    zeros = {**_IMAGE_GEN, "input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    zeros["input_tokens_details"] = {"image_tokens": 0, "text_tokens": 0}
    zeros["output_tokens_details"] = {"image_tokens": 0, "text_tokens": 0}
    r = _tool_request({"type": "image_generation"})
    m = measure_body(r, 200, _json(_image_tool_answer(zeros)), CONFIG)
    assert (dict(m.other_models), m.usd_nanos) == ({}, _GPT5)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=3000), max_size=8))
def test_the_image_tools_tokens_are_charged_from_the_stream_however_cut(points):
    r = _tool_request({"type": "image_generation", "model": "gpt-image-1-mini"}, stream=True)
    answer = _image_tool_answer(_IMAGE_GEN)
    events = [
        ("response.created", {"type": "response.created", "response": {**answer, "output": []}}),
        (
            "response.image_generation_call.partial_image",
            {"type": "response.image_generation_call.partial_image", "partial_image_b64": "QUJD"},
        ),
        ("response.output_item.done", {"type": "response.output_item.done",
                                       "item": answer["output"][0]}),
        ("response.completed", {"type": "response.completed", "response": answer}),
    ]  # fmt: skip
    raw = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events).encode()
    meter = open_stream_meter(r, "text/event-stream", None, CONFIG)
    for chunk in cut(raw, points):
        assert meter.feed(chunk) is chunk
    _, m = meter.finish()
    assert (m.usd_nanos, m.source) == (_GPT5 + _MINI_IMAGE, "usage")
    assert list(m.other_models) == ["gpt-image-1-mini"]
    assert measure_body(r, 200, raw, CONFIG) == m


# --- what is free --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "path"),
    [
        ("openai", "/v1/responses/resp_123/cancel"),
        ("openai", "/v1/batches/batch_123/cancel"),
        ("openai", "/v1/fine_tuning/jobs/ftjob-123/cancel"),
        ("openai", "/v1/chat/completions/chatcmpl-123"),  # stored completion metadata
        ("anthropic", "/v1/messages/batches/msgbatch_123/cancel"),
        ("gemini", "/v1beta/batches/123:cancel"),
    ],
)
def test_cancelling_or_updating_a_stored_object_is_free(provider, path):
    """Not a billed call: no step, so neither a `requests` budget nor the loop guard counts it."""
    assert charging(provider, "POST", path) == "free"
    r = inspect_request(provider, "POST", path, {}, b'{"metadata": {"k": "v"}}', CONFIG)
    assert (r.billable, r.step) == (False, False)
    assert not unread_request(provider, "POST", path).step


# --- inline media: PDF pages, audio and video durations -----------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _added_input(provider: str, path: str, body: dict, media: dict, key: str) -> int:
    """The input tokens `media` adds to a request whose first message's parts are `key`."""
    counts = []
    for parts in ([media, {"type": "text", "text": "x"}], [{"type": "text", "text": "x"}]):
        message = (
            {"parts": [p if "type" not in p else {"text": "x"} for p in parts]}
            if provider == "gemini"
            else {"role": "user", "content": parts}
        )
        raw = _json({**body, key: [message]})
        counts.append(inspect_request(provider, "POST", path, {}, raw, CONFIG).input_tokens)
    return counts[0] - counts[1]


def _objstm(number: int, objects: dict[int, bytes], keep: int | None = None) -> bytes:
    """A FlateDecode object stream (PDF 1.5+) holding `objects`, as pdfTeX, Chrome or qpdf
    write page objects; `keep`: only that many bytes of its compressed data (cut short)."""
    offsets, body = [], b""
    for n, obj in objects.items():
        offsets.append(b"%d %d" % (n, len(body)))
        body += obj + b"\n"
    first = b" ".join(offsets) + b"\n"
    data = zlib.compress(first + body)[:keep]
    head = b"<< /Type /ObjStm /N %d /First %d /Length %d /Filter /FlateDecode >>"
    head %= (len(objects), len(first), len(data))
    return b"%d 0 obj\n%s\nstream\n%s\nendstream\nendobj\n" % (number, head, data)


def _page_tree(pages: int, first: int = 3) -> dict[int, bytes]:
    """A catalog, the page tree's root (in qpdf's key order: /Count before /Type, inherited
    resources between) and its pages, as objects 1, 2 and `first`..."""
    ids = range(first, first + pages)
    kids = b" ".join(b"%d 0 R" % n for n in ids)
    root = b"<< /Count %d /Kids [%s] /Resources << /Font << /F1 9 0 R >> >> /Type /Pages >>"
    tree = {1: b"<< /Pages 2 0 R /Type /Catalog >>", 2: root % (pages, kids)}
    page = b"<< /Contents %d 0 R /MediaBox [0 0 612 792] /Parent 2 0 R /Type /Page >>"
    tree.update({n: page % (1000 + n % 3) for n in ids})
    return tree


def _pdf(*objects: bytes, version: bytes = b"1.5") -> bytes:
    """A PDF of `objects` after three compressed content streams (what its pages draw)."""
    out = b"%PDF-" + version + b"\n%\xe2\xe3\xcf\xd3\n"
    for n in range(3):
        text = zlib.compress(b"BT /F1 10 Tf 40 700 Td (page %d) Tj ET" % n)
        out += b"%d 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n" % (1000 + n, len(text))
        out += text + b"\nendstream\nendobj\n"
    return out + b"".join(objects) + b"startxref\n0\n%%EOF\n"


def _plain(objects: dict[int, bytes]) -> bytes:
    return b"".join(b"%d 0 obj\n%s\nendobj\n" % (n, obj) for n, obj in objects.items())


def _pdf_tokens(raw: bytes, provider: str = "anthropic") -> int:
    return images.media_tokens(provider, "application/pdf", _b64(raw), [])


def test_a_pdf_keeping_its_pages_in_object_streams_is_reserved_for_every_page():
    """PDF 1.5+ writers put page objects, and the page tree, in compressed object streams:
    no `/Type /Page` is in the file's bytes. 30 pages were counted as one (~50 kB a page)."""
    pdf = _pdf(_objstm(900, _page_tree(30)))
    assert b"/Type /Page" not in pdf
    assert images.pdf_pages(pdf) == 30
    assert _pdf_tokens(pdf) == 30 * 3000
    assert _pdf_tokens(pdf, "gemini") == 30 * 560
    doc = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf"}}
    doc["source"]["data"] = _b64(pdf)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10}
    assert _added_input("anthropic", "/v1/messages", body, doc, "messages") == 30 * 3000
    # A page tree of nodes over three streams, its leaves not all read: the root's /Count is
    # the total, the nodes' smaller counts do not lower it.
    nodes = {
        10 + i: b"<< /Type /Pages /Parent 2 0 R /Count 10 /Kids [%s] >>"
        % b" ".join(b"%d 0 R" % (100 + 10 * i + j) for j in range(10))
        for i in range(12)
    }
    root = b"<< /Type /Pages /Kids [%s] /Count 120 >>" % b" ".join(b"%d 0 R" % n for n in nodes)
    leaves = {n: b"<< /Type /Page /Parent %d 0 R >>" % (10 + (n - 100) // 10) for n in range(150)}
    tree = _pdf(_objstm(900, {2: root}), _objstm(901, nodes), _objstm(902, leaves))
    assert images.pdf_pages(tree) == 150  # 150 page objects seen: more than the tree says


def test_plain_page_objects_count_and_so_do_an_updates_object_streams():
    """An uncompressed file (PDF 1.4) has its page objects in plain sight; an incremental
    update by a PDF 1.5 writer may add pages in an object stream with a new page tree."""
    plain = _pdf(_plain(_page_tree(5)), version=b"1.4")
    assert images.pdf_pages(plain) == 5
    assert _pdf_tokens(plain, "openai") == 5 * 1600
    tree = _page_tree(9)
    update = _objstm(900, {2: tree[2]} | {n: tree[n] for n in range(8, 12)})
    assert images.pdf_pages(plain + update) == 9  # was 5: the new pages were not seen
    # A plain page tree's /Count with its page objects in a stream the meter cannot read
    # (another filter): the tree's count, not the ~50 kB a page rule.
    hidden = _objstm(900, {n: tree[n] for n in range(3, 12)}).replace(b"Flate", b"LZW")
    assert images.pdf_pages(_pdf(_plain({2: tree[2]}), hidden)) == 9


class _CountingInflate:
    """zlib.decompressobj, counting the streams opened and the bytes they give."""

    made = 0
    inflated = 0

    def __init__(self, *args):
        type(self).made += 1
        self.inner = _REAL_DECOMPRESSOBJ(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decompress(self, data, max_length=0):
        out = self.inner.decompress(data, max_length)
        type(self).inflated += len(out)
        return out


_REAL_DECOMPRESSOBJ = zlib.decompressobj


def test_a_hostile_pdf_is_counted_within_bounds(monkeypatch):
    tree = _page_tree(30)
    # An object stream cut short (the upload truncated) or corrupt after 20 pages (its deflate
    # data flushed there, an invalid block next): the pages that inflate are counted.
    pages = [tree[n] for n in range(3, 33)]
    squeeze = zlib.compressobj()
    data = b"".join(squeeze.compress(page + b"\n") for page in pages[:20])
    data += squeeze.flush(zlib.Z_SYNC_FLUSH)
    head = b"900 0 obj\n<< /Type /ObjStm /N 30 /First 0 /Filter /FlateDecode >>\nstream\n"
    assert images.pdf_pages(b"%PDF-1.5\n" + head + data) == 20
    assert images.pdf_pages(_pdf(head + data + b"\x07" + bytes(100) + b"\nendstream\n")) == 20
    # Cut after the page tree's root, which comes first: its /Count.
    squeeze = zlib.compressobj()
    data = squeeze.compress(tree[2] + b"\n" + pages[0]) + squeeze.flush(zlib.Z_SYNC_FLUSH)
    assert images.pdf_pages(b"%PDF-1.5\n" + head + data) == 30
    # An absurd /Count is held to the most pages any provider bills, not taken as is.
    for count in (b"1000000000000", b"9" * 5000):
        bogus = _pdf(b"2 0 obj\n<< /Type /Pages /Kids [] /Count %s >>\nendobj\n" % count)
        assert images.pdf_pages(bogus) == images.MAX_PDF_PAGES == 4000
    # An indirect /Count (`7 0 R`) and an outline's /Count are not page counts.
    odd = _pdf(b"<< /Type /Pages /Count 7 0 R >> << /Type /Outlines /Count 400 >>")
    assert images.pdf_pages(odd) == 1
    # A zlib bomb in an object stream (64 MiB of zeros in 64 kB) beside the real one: the
    # real one read, the bomb inflated only to the bound.
    squeeze = zlib.compressobj(9)
    bomb = squeeze.compress(bytes(64 << 20)) + squeeze.flush()
    bomb = b"901 0 obj\n<< /Type /ObjStm /N 1 /First 4 /Filter /FlateDecode >>\nstream\n" + bomb
    monkeypatch.setattr(images.zlib, "decompressobj", _CountingInflate)
    assert images.pdf_pages(_pdf(_objstm(900, tree), bomb)) == 30
    assert 4 << 20 >= _CountingInflate.inflated > 1 << 20
    # Thousands of streams that are not zlib, and a /Type /ObjStm without a stream: a bounded
    # number tried, none counted.
    junk = _pdf(b"<< /Type /ObjStm >>\nstream\nnot zlib\nendstream\n" * 3000, b"/Type /ObjStm")
    _CountingInflate.made = 0
    assert images.pdf_pages(junk) == len(junk) // 50_000 == 2  # the size rule
    assert 0 < _CountingInflate.made <= 256


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=3000))
def test_a_pdf_with_noise_spliced_in_never_raises(noise, at):
    """Noise in a file with object streams, the file cut, or noise alone: a count of pages."""
    pdf = _pdf(_objstm(900, _page_tree(12)))
    for raw in (noise, pdf[:at] + noise + pdf[at:], pdf[:at]):
        assert 1 <= images.pdf_pages(raw) <= images.MAX_PDF_PAGES
        assert _pdf_tokens(raw) >= 3000


# Low-bitrate audio as speech is sent, each ten seconds long: at the old guess (128 kbit/s)
# these sizes read as 2 or 3 seconds.


def _wav(byte_rate: int, seconds: int) -> bytes:
    """A WAV whose `fmt ` chunk states `byte_rate` (IMA ADPCM at 8 kHz: ~4 kB a second)."""
    fmt = struct.pack("<HHIIHH", 0x11, 1, 8000, byte_rate, 256, 4) + b"\x02\x00\xf9\x01"
    data = bytes(byte_rate * seconds)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _ogg_opus(kbps: int, seconds: int) -> bytes:
    """An Ogg Opus file: its first page's OpusHead, its last page's granule (48 kHz)."""
    head = b"OpusHead\x01\x01\x38\x01" + struct.pack("<I", 16_000) + bytes(3)
    first = b"OggS\x00\x02" + bytes(20) + b"\x01" + bytes([len(head)]) + head
    last = b"OggS\x00\x04" + struct.pack("<q", 48_000 * seconds) + bytes(12) + b"\x01\x10"
    return first + bytes(kbps * 125 * seconds) + last + bytes(16)


def _mp3(seconds: int) -> bytes:
    """A CBR MP3 without a Xing header (its frames are walked): MPEG-1 Layer III, 32 kbit/s,
    32 kHz, mono: 144-byte frames of 1152 samples (36 ms)."""
    frame = bytes([0xFF, 0xFB, 0x18, 0xC4]) + bytes(140)
    return frame * int(seconds / 0.036)


def _mp4(seconds: int, media: int, brand: bytes = b"isom", moov_last: bool = False) -> bytes:
    """An MP4 (M4A, MOV alike): `media` bytes in mdat, the duration in moov's mvhd."""
    mvhd = b"\x00" + bytes(3) + bytes(8) + struct.pack(">II", 1000, 1000 * seconds) + bytes(80)
    moov = struct.pack(">I", 16 + len(mvhd)) + b"moov" + struct.pack(">I", 8 + len(mvhd))
    moov += b"mvhd" + mvhd
    mdat = struct.pack(">I", 8 + media) + b"mdat" + bytes(media)
    ftyp = struct.pack(">I", 16) + b"ftyp" + brand + bytes(4)
    return ftyp + (mdat + moov if moov_last else moov + mdat)


def _ebml(ident: int, body: bytes) -> bytes:
    size = b"\x01" + len(body).to_bytes(7, "big")  # an 8-byte size
    return ident.to_bytes((ident.bit_length() + 7) // 8, "big") + size + body


def _webm(media: int, milliseconds: float | None) -> bytes:
    """A WebM: its Segment Info's Duration (none: a browser's recording), then the media."""
    info = b"" if milliseconds is None else _ebml(0x4489, struct.pack(">d", milliseconds))
    segment = (_ebml(0x1549A966, info) if info else b"") + _ebml(0x1F43B675, bytes(media))
    return _ebml(0x1A45DFA3, _ebml(0x4282, b"webm")) + _ebml(0x18538067, segment)


@pytest.mark.parametrize(
    ("mime", "audio"),
    [
        ("audio/wav", _wav(4055, 10)),  # 32 kbit/s ADPCM
        ("audio/ogg", _ogg_opus(16, 10)),  # 16 kbit/s Opus
        ("audio/mpeg", _mp3(10)),  # 32 kbit/s MP3
        ("audio/mp4", _mp4(10, 30_000, b"M4A ")),  # 24 kbit/s HE-AAC
        ("audio/webm", _webm(20_000, 10_000.0)),  # 16 kbit/s Opus in WebM
    ],
)
def test_low_bitrate_audio_is_reserved_for_how_long_it_plays(mime, audio):
    """Inline audio was guessed at 128 kbit/s: ten seconds of 16 kbit/s speech read as two."""
    assert images.media_tokens("gemini", mime, _b64(audio), []) == 10 * 32
    assert images.media_tokens("openai", mime, _b64(audio), []) == 10 * 10


def test_audio_whose_duration_is_unknown_is_bounded_at_8_kbit_s():
    """A browser's WebM recording (no Duration), an unknown format, bytes that are not
    base64: the size at 1 kB a second, which no speech codec goes below, not 16 kB."""
    for raw in (_webm(19_950, None), bytes(20_000)):
        seconds = math.ceil(len(raw) / 1000)
        assert seconds == 20
        assert images.media_tokens("gemini", "audio/webm", _b64(raw), []) == seconds * 32
    assert images.media_tokens("gemini", "audio/wav", "!" * 20_000, []) == 15 * 32


def test_inline_audio_in_a_chat_request_is_reserved_for_its_duration():
    audio = {"type": "input_audio", "input_audio": {"data": _b64(_mp3(10)), "format": "mp3"}}
    body = {"model": "gpt-4o-audio-preview"}
    assert _added_input("openai", "/v1/chat/completions", body, audio, "messages") == 10 * 10


@pytest.mark.parametrize(
    "video",
    [
        _mp4(8, 250_000),  # 250 kbit/s: the old guess (1 Mbit/s) read 3 s
        _mp4(8, 250_000, b"qt  ", moov_last=True),  # a camera's MOV: moov after the media
        _webm(100_000, 8000.0),  # 100 kbit/s VP9
    ],
)
def test_video_is_reserved_for_how_long_it_plays(video):
    assert images.media_tokens("gemini", "video/mp4", _b64(video), []) == 8 * 263
    part = {"inlineData": {"mimeType": "video/mp4", "data": _b64(video)}}
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    assert _added_input("gemini", path, {}, part, "contents") == 8 * 263


def test_video_whose_duration_is_unknown_is_bounded_at_100_kbit_s():
    """No duration in the container (a recording without one, a format not read): its size
    at 100 kbit/s, below what real video is encoded at, not 1 Mbit/s."""
    for raw in (_webm(124_950, None), bytes(125_000)):
        seconds = math.ceil(len(raw) / 12_500)
        assert seconds == 10
        assert images.media_tokens("gemini", "video/webm", _b64(raw), []) == seconds * 263
