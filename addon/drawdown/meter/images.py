"""Input-token rules for images (and a rough rule for other media) in LLM requests.

Image sizes are read from the header of base64 data (PNG, JPEG, GIF, WebP) without
decoding pixels. Where the size is unknown (an image URL, an unknown format) a documented
default is used: the largest image the provider's rule can bill, so the estimate does not
fall short.
"""

from __future__ import annotations

import base64
import binascii
import math
import re

# --- image dimensions -------------------------------------------------------------------

_DATA_URL = re.compile(r"^data:([\w/+.-]+)?(;[^,]*)?,", re.IGNORECASE)


def decode_b64(data: str, limit: int | None = None) -> bytes:
    """Decode (a prefix of) base64 text, tolerating URL-safe alphabet and missing padding."""
    if limit is not None:
        data = data[: limit - limit % 4]
    data = data.strip()
    try:
        if "-" in data or "_" in data:
            return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        return base64.b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return b""


def split_data_url(url: str) -> tuple[str | None, str] | None:
    """("image/png", base64 payload) for a data: URL, else None."""
    m = _DATA_URL.match(url)
    if not m:
        return None
    return (m.group(1) or None), url[m.end() :]


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    i = 2
    n = len(b)
    while i + 9 < n:
        if b[i] != 0xFF:
            i += 1
            continue
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        seg_len = int.from_bytes(b[i + 2 : i + 4])
        # SOF0..SOF15 except DHT(C4), JPG(C8), DAC(CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h = int.from_bytes(b[i + 5 : i + 7])
            w = int.from_bytes(b[i + 7 : i + 9])
            return (w, h) if w and h else None
        i += 2 + seg_len
    return None


def image_size(b: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, GIF or WebP file."""
    if b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) >= 24:
        return int.from_bytes(b[16:20]), int.from_bytes(b[20:24])
    if b[:6] in (b"GIF87a", b"GIF89a") and len(b) >= 10:
        return int.from_bytes(b[6:8], "little"), int.from_bytes(b[8:10], "little")
    if b.startswith(b"\xff\xd8"):
        return _jpeg_size(b)
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        kind = b[12:16]
        if kind == b"VP8 " and len(b) >= 30:
            return int.from_bytes(b[26:28], "little") & 0x3FFF, int.from_bytes(
                b[28:30], "little"
            ) & 0x3FFF
        if kind == b"VP8L" and len(b) >= 25:
            bits = int.from_bytes(b[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8X" and len(b) >= 30:
            return int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1
    return None


def size_from_b64(data: str) -> tuple[int, int] | None:
    head = decode_b64(data, 128)
    if head.startswith(b"\xff\xd8"):  # JPEG: the frame header may follow big EXIF blocks
        return _jpeg_size(decode_b64(data))
    return image_size(head)


# --- per-provider image rules -----------------------------------------------------------

# OpenAI, "Images and vision > Calculating costs". Tile models: scale to fit 2048x2048,
# then (only down) to a 768px shortest side, count 512px tiles. Patch models: 32px patches,
# at most 1536, times a per-model multiplier.
_OPENAI_TILES = (  # (model prefix, base tokens, tokens per tile); first match wins
    ("gpt-4o-mini", 2833, 5667),
    ("gpt-5-chat", 70, 140),
    ("gpt-5", 70, 140),
    ("o1", 75, 150),
    ("o3", 75, 150),
    ("computer-use", 65, 129),
)
_OPENAI_PATCHES = (  # (model prefix, multiplier)
    ("gpt-4.1-mini", 1.62),
    ("gpt-4.1-nano", 2.46),
    ("gpt-5-mini", 1.62),
    ("gpt-5-nano", 2.46),
    ("o4-mini", 1.72),
)
# Unknown size: the worst case of the tile rule (768x2048 after scaling: 2x4 tiles).
UNKNOWN_SIZE = (768, 2048)


def openai_image_tokens(size: tuple[int, int] | None, detail: str | None, model: str | None) -> int:
    name = (model or "").lower()
    w, h = size or UNKNOWN_SIZE
    for prefix, mult in _OPENAI_PATCHES:
        if name.startswith(prefix):
            patches = math.ceil(w / 32) * math.ceil(h / 32)
            if patches > 1536:  # scaled down to fit 1536 patches
                scale = math.sqrt(1536 * 32 * 32 / (w * h))
                patches = min(1536, math.ceil(w * scale / 32) * math.ceil(h * scale / 32))
            return math.ceil(patches * mult)
    base, tile = 85, 170
    for prefix, b, t in _OPENAI_TILES:
        if name.startswith(prefix):
            base, tile = b, t
            break
    if detail == "low":
        return base
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    return base + tile * math.ceil(w / 512) * math.ceil(h / 512)


# Anthropic, "Vision": tokens = width*height/750 after scaling the long edge to <= 1568px;
# about 1600 tokens at most.
ANTHROPIC_MAX_IMAGE_TOKENS = 1600


def anthropic_image_tokens(size: tuple[int, int] | None) -> int:
    if size is None:
        return ANTHROPIC_MAX_IMAGE_TOKENS
    w, h = size
    if max(w, h) > 1568:
        scale = 1568 / max(w, h)
        w, h = w * scale, h * scale
    return min(ANTHROPIC_MAX_IMAGE_TOKENS, math.ceil(w * h / 750))


# Gemini, "Token counting": an image with both sides <= 384px is 258 tokens; a larger one
# is cut into 768x768 tiles of 258 tokens each. Gemini 3 bills images by media_resolution
# instead (default "high": 1120 tokens). Unknown size: 1120, the larger of the two defaults.
GEMINI_TILE_TOKENS = 258
GEMINI3_IMAGE_TOKENS = 1120


def gemini_image_tokens(size: tuple[int, int] | None, model: str | None) -> int:
    """`model` None: not known yet (a batch file's line), so the larger of the two rules."""
    if model is None and size is not None:
        return max(GEMINI3_IMAGE_TOKENS, gemini_image_tokens(size, ""))
    if model is None or model.lower().startswith("gemini-3") or size is None:
        return GEMINI3_IMAGE_TOKENS
    w, h = size
    if w <= 384 and h <= 384:
        return GEMINI_TILE_TOKENS
    return GEMINI_TILE_TOKENS * math.ceil(w / 768) * math.ceil(h / 768)


# --- other media ------------------------------------------------------------------------

# Rough, documented rules for inline media whose token count depends on content we do not
# decode. Audio/video durations are guessed from the byte size at a low bitrate (so the
# guess errs long); PDFs count their page objects.
AUDIO_BYTES_PER_SECOND = 16_000  # 128 kbit/s
VIDEO_BYTES_PER_SECOND = 125_000  # 1 Mbit/s
AUDIO_TOKENS_PER_SECOND = {"openai": 10, "anthropic": 10, "gemini": 32}
GEMINI_VIDEO_TOKENS_PER_SECOND = 263  # 258 per frame at 1 fps + 32 audio, rounded down
PDF_TOKENS_PER_PAGE = {"openai": 1600, "anthropic": 3000, "gemini": 560}
# A medium we cannot size at all (a URL to audio, video or a document).
UNKNOWN_MEDIA_TOKENS = 2000

_PDF_PAGE = re.compile(rb"/Type\s*/Page(?!s)")


def pdf_pages(raw: bytes) -> int:
    pages = len(_PDF_PAGE.findall(raw))
    # Compressed object streams hide page objects: fall back to ~50 kB per page.
    return pages or max(1, len(raw) // 50_000)


def media_tokens(provider: str, mime: str | None, b64: str | None, texts: list[str]) -> int:
    """Input tokens for inline non-image media given its MIME type and base64 payload.

    Text documents are decoded and appended to `texts` for the tokenizer instead (0 returned).
    """
    mime = (mime or "").lower()
    if b64 is None:
        return UNKNOWN_MEDIA_TOKENS
    nbytes = len(b64.strip().rstrip("=")) * 3 // 4
    if mime == "application/pdf":
        return pdf_pages(decode_b64(b64)) * PDF_TOKENS_PER_PAGE.get(provider, 3000)
    if mime.startswith("audio/"):
        seconds = math.ceil(nbytes / AUDIO_BYTES_PER_SECOND)
        return max(1, seconds) * AUDIO_TOKENS_PER_SECOND.get(provider, 32)
    if mime.startswith("video/"):
        seconds = math.ceil(nbytes / VIDEO_BYTES_PER_SECOND)
        return max(1, seconds) * GEMINI_VIDEO_TOKENS_PER_SECOND
    if mime.startswith("text/") or mime in ("application/json", "application/xml"):
        texts.append(decode_b64(b64).decode("utf-8", "replace"))
        return 0
    return UNKNOWN_MEDIA_TOKENS
