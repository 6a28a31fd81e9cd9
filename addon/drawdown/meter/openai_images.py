"""The OpenAI Images API (`/v1/images/generations`, `/v1/images/edits`, and Azure's
`/openai/deployments/<d>/images/...`) for the GPT image models, which bill per token: text
and image input tokens, image output tokens. DALL·E bills per image, which genai-prices does
not price, and a request naming no model is served by dall-e-2: those stay a step at $0.

Estimate: the prompt by tiktoken, plus n times the output image tokens the requested quality
and size bill, plus (edits) a conservative figure per input image. Measure: the `usage` of
the JSON answer, or the sum of the `usage` of the `*.completed` events of a stream.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ._util import (
    Counts,
    Extracted,
    ParsedRequest,
    kind,
    loads,
    opt_bool,
    opt_int,
    route_by_suffix,
)
from .multipart import form_bool, form_int, parse_form
from .prices import priced_per_token
from .types import MeterRequestError, TokenUsage

ENDPOINTS = {"/images/generations": "images.generations", "/images/edits": "images.edits"}

# A model named like a GPT image model is metered even before genai-prices knows it (priced
# at the fallback price, flagged unpriced) rather than let through at $0.
_GPT_IMAGE_NAME = re.compile(r"(?:^|/)(?:chatgpt-image|gpt-image)", re.IGNORECASE)

# Framing around the prompt: OpenAI documents none. 32 tokens ($0.00016 at $5 per million)
# so that an unknown template does not leave the reserve short.
PROMPT_OVERHEAD = 32


def route(path: str) -> str | None:
    """ "images.generations" / "images.edits" for an Images API path, else None."""
    return route_by_suffix(path, ENDPOINTS)


def metered(model: str | None) -> bool:
    """Whether an Images API call on `model` is metered per token (else a $0 step)."""
    if not model:
        return False  # the API defaults to dall-e-2, billed per image
    return bool(_GPT_IMAGE_NAME.search(model)) or priced_per_token("openai", model)


# --- output image tokens ----------------------------------------------------------------

# gpt-image-1, gpt-image-1-mini, gpt-image-1.5 and chatgpt-image-latest: OpenAI's table of
# output tokens per image by quality and size (image generation guide, "Cost and latency").
_FIXED_SIZE_PREFIXES = ("gpt-image-1", "chatgpt-image")
_FIXED_SIZE_TOKENS: dict[str, dict[tuple[int, int], int]] = {
    "low": {(1024, 1024): 272, (1024, 1536): 408, (1536, 1024): 400},
    "medium": {(1024, 1024): 1056, (1024, 1536): 1584, (1536, 1024): 1568},
    "high": {(1024, 1024): 4160, (1024, 1536): 6240, (1536, 1024): 6208},
}

# gpt-image-2 and later take any WIDTHxHEIGHT (16 px steps, up to 3840 px a side and
# 8,294,400 px). Their output tokens grow with the area and a per-quality factor on each
# axis; the rule below reproduces the figures of OpenAI's cost calculator (1024x1024 high:
# 7024 tokens, 1536x1024 high: 5488).
_AXIS_FACTORS = {"low": 16, "medium": 48, "high": 96}
# xhigh and max (gpt-image-2.5) have no published rule: twice the high factor on each axis,
# four times the high figure, so that the reserve errs high.
_UNPUBLISHED_AXIS_FACTOR = 2 * _AXIS_FACTORS["high"]
# "auto" size, or one we cannot read: the largest square the pixel limit allows (the rule
# bills a square most for its area).
_LARGEST = (2880, 2880)
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")

# Streaming with partial_images: each partial image adds 100 output image tokens.
PARTIAL_IMAGE_TOKENS = 100
# GIF output (frame_count frames, 9 when omitted): billed per frame as we assume, no rule is
# published; every frame is reserved as a full image.
DEFAULT_GIF_FRAMES = 9


def _size(value: Any) -> tuple[int, int] | None:
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m is None:
        return None
    w, h = int(m.group(1)), int(m.group(2))
    return (w, h) if w and h else None


def _area_rule(factor: int, width: int, height: int) -> int:
    long_edge, short_edge = max(width, height), min(width, height)
    # The short axis gets the factor scaled by the aspect ratio, rounded to nearest.
    short_factor = (2 * factor * short_edge + long_edge) // (2 * long_edge)
    return -(-factor * short_factor * (2_000_000 + width * height) // 4_000_000)


def output_tokens_per_image(model: str, quality: Any, size: Any) -> int:
    """Image output tokens one image bills at this quality and size, rounded up where the
    request leaves them to the API ("auto") or we have no rule."""
    name = model.lower().rsplit("/", 1)[-1]
    wanted = _size(size)
    if name.startswith(_FIXED_SIZE_PREFIXES):
        table = _FIXED_SIZE_TOKENS.get(quality if isinstance(quality, str) else "")
        table = table or _FIXED_SIZE_TOKENS["high"]  # auto (or unknown) may pick high
        if wanted in table:
            return table[wanted]
        return max(table.values())  # auto: the largest of the sizes
    factor = _AXIS_FACTORS.get(quality if isinstance(quality, str) else "")
    if factor is None:
        # auto (which may pick high), xhigh, max, or a quality new to us.
        factor = _AXIS_FACTORS["high"] if quality in (None, "auto") else _UNPUBLISHED_AXIS_FACTOR
    width, height = wanted or _LARGEST
    return _area_rule(factor, width, height)


def largest_image_tokens(model: str) -> int:
    """The most output tokens one image of this model can bill at high quality."""
    return output_tokens_per_image(model, "high", "auto")


# --- requests ---------------------------------------------------------------------------


def read_request(
    endpoint: str, body: bytes, boundary: str | None = None
) -> tuple[dict[str, Any], int]:
    """(the request's fields, number of input images) from a JSON body or a multipart form
    (edits upload their images as one, `boundary` the one its Content-Type names).
    MeterRequestError when neither can be read."""
    head = body[:64].lstrip()
    if head.startswith(b"{"):
        obj = loads(body)
        if not isinstance(obj, dict):
            raise MeterRequestError("request body is not a valid JSON object")
        images = obj.get("images")
        count = len(images) if isinstance(images, list) else 0
        count += sum(1 for key in ("mask", "markup") if obj.get(key))
        return obj, count
    if endpoint == "images.generations":
        raise MeterRequestError("request body must be a JSON object")
    form = parse_form(body, _IMAGE_PARTS, boundary)
    if "model" in form.repeated:  # read last here, maybe first by the host: a $0 DALL·E step
        raise MeterRequestError("model is given more than once in the form")
    fields = form.fields
    parsed: dict[str, Any] = dict(fields)
    for key in ("n", "partial_images", "frame_count"):
        parsed[key] = form_int(fields, key)
    parsed["stream"] = form_bool(fields, "stream")
    # Parts named image, image[], mask or markup: input images; other uploads are ignored.
    return parsed, sum(1 for name, _ in form.uploads if name in _IMAGE_PARTS)


def body_model(endpoint: str, body: bytes) -> str | None:
    """The model a request names (None: absent, or a body too malformed to say)."""
    try:
        fields, _ = read_request(endpoint, body)
    except MeterRequestError:
        return None
    model = fields.get("model")
    return model if isinstance(model, str) and model.strip() else None


def parse_request(
    endpoint: str, fields: dict[str, Any], input_images: int, model: str
) -> ParsedRequest:
    prompt_text = fields.get("prompt")
    if not isinstance(prompt_text, str):
        if prompt_text is None:
            raise MeterRequestError("prompt is missing from the request")
        raise MeterRequestError(f"prompt must be a string, not {kind(prompt_text)}")
    for key in ("quality", "size", "output_format"):
        value = fields.get(key)
        if value is not None and not isinstance(value, str):
            raise MeterRequestError(f"{key} must be a string, not {kind(value)}")
    n = max(opt_int(fields, "n") or 1, 1)
    partials = opt_int(fields, "partial_images") or 0
    per_image = output_tokens_per_image(model, fields.get("quality"), fields.get("size"))
    if fields.get("output_format") == "gif":
        per_image *= max(opt_int(fields, "frame_count") or DEFAULT_GIF_FRAMES, 1)
    parsed = ParsedRequest(endpoint=endpoint, model=model, stream=opt_bool(fields, "stream"))
    parsed.prompt.add(prompt_text)
    parsed.prompt.overhead += PROMPT_OVERHEAD
    # Edits: input images are billed as image tokens the API counts after resizing, by a rule
    # OpenAI does not publish (input_fidelity "high" bills more). None is ever encoded larger
    # than the largest image the model makes, so each is reserved as that many tokens at
    # high quality: the reserve cannot fall short, and the usage reported settles it.
    image_input = input_images * largest_image_tokens(model)
    parsed.prompt.exact += image_input
    parsed.input_image_tokens = image_input
    parsed.cap = n * (per_image + partials * PARTIAL_IMAGE_TOKENS)
    parsed.output_image_tokens = parsed.cap
    return parsed


# --- responses --------------------------------------------------------------------------


def images_usage(u: dict[str, Any]) -> TokenUsage | None:
    """An Images API `usage`: input text and image tokens, output (image) tokens; None when a
    count in it cannot be read (the call is then charged its estimate, as without usage)."""
    c = Counts()
    itd = u.get("input_tokens_details") if isinstance(u.get("input_tokens_details"), dict) else {}
    otd = u.get("output_tokens_details")
    output = c(u.get("output_tokens"))
    # Without a breakdown every output token is an image token (gpt-image-1's documented form).
    image_out = c(otd.get("image_tokens")) if isinstance(otd, dict) else output
    if isinstance(otd, dict) and "image_tokens" not in otd:
        image_out = output - c(otd.get("text_tokens"))
    usage = TokenUsage(
        input_tokens=c(u.get("input_tokens")),
        output_tokens=output,
        cache_read_tokens=c(itd.get("cached_tokens")),
        input_image_tokens=c(itd.get("image_tokens")),
        output_image_tokens=max(image_out, 0),
    )
    return None if c.unreadable else usage


def _svg_usage(obj: dict[str, Any], ex: Extracted) -> bool:
    """SVG output: the SVG author is another model, its tokens reported apart. False when a
    count of them cannot be read."""
    svg = obj.get("svg_usage")
    if isinstance(svg, dict) and isinstance(svg.get("model"), str) and svg["model"]:
        c = Counts()
        usage = TokenUsage(
            input_tokens=c(svg.get("input_tokens")),
            output_tokens=c(svg.get("output_tokens")),
            reasoning_tokens=c(svg.get("reasoning_tokens")),
        )
        if c.unreadable:
            return False
        ex.other_models[svg["model"]] = usage
    return True


def extract_json(obj: Any) -> Extracted:
    ex = Extracted()
    if not isinstance(obj, dict):
        return ex
    ex.seen = True
    u = obj.get("usage")
    if isinstance(u, dict):
        ex.usage = images_usage(u)
    if not _svg_usage(obj, ex):
        # The SVG author's tokens cannot be read: the answer's usage alone would charge them
        # as 0. The estimate is charged instead, as for a usage that cannot be read.
        ex.usage = None
    return ex


_USAGE_KEY = b'"usage"'
_MAX_USAGE_BYTES = 16 * 1024  # a usage object is a few hundred bytes
_DECODER = json.JSONDecoder()


def _event_usage(data: bytes) -> dict[str, Any] | None:
    """The `usage` object of an event, read without parsing the megabytes of base64 around
    it (a base64 payload holds no quote, so the key cannot appear inside one)."""
    at = data.rfind(_USAGE_KEY)
    if at < 0:
        return None
    rest = data[at + len(_USAGE_KEY) : at + len(_USAGE_KEY) + _MAX_USAGE_BYTES].lstrip()
    if not rest.startswith(b":"):
        return None
    try:
        value, _ = _DECODER.raw_decode(rest[1:].lstrip().decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class ImagesStream:
    """`stream: true`: `image_generation.partial_image` / `image_edit.partial_image` events,
    then one `*.completed` event per image carrying that image's `usage`. Usage is summed
    over the completed events (each reports its own image); one whose counts cannot be read
    leaves the stream without usage (charged its estimate), never that image at 0."""

    def __init__(self) -> None:
        self._ex = Extracted()
        self._unreadable = False

    def on_event(self, event: str | None, data: bytes) -> bool:
        if data[:64].lstrip()[:1] != b"{":  # never copy megabytes of base64
            return True
        self._ex.seen = True
        if event is not None and event.endswith(".partial_image"):
            return True  # a preview: no usage, only base64
        reported = _event_usage(data)
        if reported is None:
            return True
        usage = images_usage(reported)
        if usage is None:
            self._unreadable = True
        else:
            self._ex.usage = usage if self._ex.usage is None else self._ex.usage + usage
        return True

    def result(self) -> Extracted:
        if self._unreadable:
            return Extracted(seen=self._ex.seen)
        return self._ex


_IMAGE_PARTS = frozenset({"image", "image[]", "mask", "markup"})


def is_images(endpoint: str) -> bool:
    return endpoint in _IMAGE_ENDPOINTS


_IMAGE_ENDPOINTS = frozenset(ENDPOINTS.values())
