"""Image tokens priced as image tokens, and the OpenAI Images API metered per token."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import genai_prices
import httpx2
import pytest
from drawdown.meter import (
    MeterRequestError,
    TokenUsage,
    charging,
    count_tokens,
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
