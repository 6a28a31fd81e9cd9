"""Shared helpers for the meter tests: the recorded corpus and an independent usage oracle."""

from __future__ import annotations

import itertools
import json
import struct
import urllib.parse
import zlib
from pathlib import Path
from typing import Any

import pytest
from drawdown.meter import (
    LLMRequest,
    MeterConfig,
    TokenUsage,
    inspect_request,
    open_stream_meter,
    origin,
)

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "recorded"
MANIFEST: list[dict[str, Any]] = json.loads((CORPUS / "MANIFEST.json").read_text())
CONFIG = MeterConfig()


def entry_id(entry: dict[str, Any]) -> str:
    return entry["file"].rsplit(".", 2)[0]


def entries(streamed: bool | None = None) -> list[Any]:
    chosen = [e for e in MANIFEST if streamed is None or e["streamed"] == streamed]
    return [pytest.param(e, id=entry_id(e)) for e in chosen]


def request_for(entry: dict[str, Any], body: bytes | None = None) -> LLMRequest:
    url = urllib.parse.urlsplit(entry["url"])
    query = dict(urllib.parse.parse_qsl(url.query))
    if body is None:
        body = (CORPUS / entry["request_file"]).read_bytes()
    # From its recorded host, as the proxy prices it (Azure at azure's prices, Vertex at google's).
    upstream = origin(url.scheme, url.hostname or "", url.port or 443)
    return inspect_request(
        entry["provider"], entry["method"], url.path, query, body, CONFIG, origin=upstream
    )


def response_bytes(entry: dict[str, Any]) -> bytes:
    return (CORPUS / entry["file"]).read_bytes()


def feed(
    request: LLMRequest, entry: dict[str, Any], chunks: list[bytes], encoding: str | None = None
):
    """Run chunks through a StreamMeter; (forwarded bytes, measurement)."""
    meter = open_stream_meter(request, entry["content_type"], encoding, CONFIG)
    out = bytearray()
    for chunk in chunks:
        forwarded = meter.feed(chunk)
        if not meter.rewrites:
            assert forwarded is chunk  # zero copy on the hot path
        out += forwarded
    rest, measurement = meter.finish()
    out += rest
    return bytes(out), measurement


def streamed(request: LLMRequest, body: bytes, content_type: str, piece: int = 1):
    """The measurement of a stream fed whole, checked equal fed in pieces of `piece` bytes."""

    def run(chunks: list[bytes]):
        meter = open_stream_meter(request, content_type, None, CONFIG)
        for chunk in chunks:
            meter.feed(chunk)
        return meter.finish()[1]

    whole = run([body])
    assert run([body[i : i + piece] for i in range(0, len(body), piece)]) == whole
    return whole


def cut(body: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p for p in points if 0 < p < len(body)})
    bounds = [0, *points, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


# --- the oracle: manifest usage -> TokenUsage, written independently of the meter ---------


def _n(d: Any, *path: str) -> int:
    for key in path:
        d = (d or {}).get(key)
    return int(d or 0)


def _anthropic(u: dict[str, Any]) -> TokenUsage:
    fresh, read, write = (
        _n(u, "input_tokens"),
        _n(u, "cache_read_input_tokens"),
        _n(u, "cache_creation_input_tokens"),
    )
    return TokenUsage(
        input_tokens=fresh + read + write,
        output_tokens=_n(u, "output_tokens"),
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=_n(u, "cache_creation", "ephemeral_1h_input_tokens"),
        reasoning_tokens=_n(u, "output_tokens_details", "thinking_tokens"),
    )


def _modality(details: Any, name: str) -> int:
    return sum(d["tokenCount"] for d in details or [] if d["modality"] == name)


def expected(entry: dict[str, Any]) -> tuple[TokenUsage, dict[str, TokenUsage]]:
    """(usage billed on the call's model, usage billed on other models) from the manifest."""
    u = entry["usage"]
    provider, endpoint = entry["provider"], entry["endpoint"]
    if provider == "openai" and endpoint == "chat-completions":
        return TokenUsage(
            input_tokens=u["prompt_tokens"],
            output_tokens=u["completion_tokens"],
            cache_read_tokens=_n(u, "prompt_tokens_details", "cached_tokens"),
            cache_write_tokens=_n(u, "prompt_tokens_details", "cache_write_tokens"),
            reasoning_tokens=_n(u, "completion_tokens_details", "reasoning_tokens"),
            input_audio_tokens=_n(u, "prompt_tokens_details", "audio_tokens"),
            output_audio_tokens=_n(u, "completion_tokens_details", "audio_tokens"),
            input_image_tokens=_n(u, "prompt_tokens_details", "image_tokens"),
            output_image_tokens=_n(u, "completion_tokens_details", "image_tokens"),
        ), {}
    if provider == "openai":
        return TokenUsage(
            input_tokens=u["input_tokens"],
            output_tokens=u["output_tokens"],
            cache_read_tokens=_n(u, "input_tokens_details", "cached_tokens"),
            cache_write_tokens=_n(u, "input_tokens_details", "cache_write_tokens"),
            reasoning_tokens=_n(u, "output_tokens_details", "reasoning_tokens"),
            input_image_tokens=_n(u, "input_tokens_details", "image_tokens"),
            output_image_tokens=_n(u, "output_tokens_details", "image_tokens"),
        ), {}
    if provider == "anthropic":
        # Streams: the final figures are message_delta's values where present.
        final = {**u["message_start"], **u["message_delta"]} if entry["streamed"] else u
        iterations = final.get("iterations")
        if not iterations:
            return _anthropic(final), {}
        # Documented decision (meter/anthropic.py): the iterations are what is billed;
        # those on another model (the advisor) at that model's price.
        own, other = TokenUsage(), {}
        for it in iterations:
            if it.get("model") and it["model"] != entry["response_model"]:
                other[it["model"]] = other.get(it["model"], TokenUsage()) + _anthropic(it)
            else:
                own = own + _anthropic(it)
        thinking = _n(final, "output_tokens_details", "thinking_tokens")
        return TokenUsage(**{**own.__dict__, "reasoning_tokens": thinking}), other
    # gemini
    return TokenUsage(
        input_tokens=_n(u, "promptTokenCount") + _n(u, "toolUsePromptTokenCount"),
        output_tokens=_n(u, "candidatesTokenCount") + _n(u, "thoughtsTokenCount"),
        cache_read_tokens=_n(u, "cachedContentTokenCount"),
        reasoning_tokens=_n(u, "thoughtsTokenCount"),
        input_audio_tokens=_modality(u.get("promptTokensDetails"), "AUDIO"),
        cache_audio_read_tokens=_modality(u.get("cacheTokensDetails"), "AUDIO"),
        output_audio_tokens=_modality(u.get("candidatesTokensDetails"), "AUDIO"),
        input_image_tokens=_modality(u.get("promptTokensDetails"), "IMAGE")
        + _modality(u.get("toolUsePromptTokensDetails"), "IMAGE"),
        cache_image_read_tokens=_modality(u.get("cacheTokensDetails"), "IMAGE"),
        output_image_tokens=_modality(u.get("candidatesTokensDetails"), "IMAGE"),
    ), {}


def png(w: int, h: int) -> bytes:
    """The start of a PNG `w` × `h` pixels: its signature and IHDR chunk, all the meter reads."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
