"""Input-token rules for images (and for other inline media: PDFs, audio, video) in LLM
requests.

Image sizes are read from the header of base64 data (PNG, JPEG, GIF, WebP) without
decoding pixels. Where the size is unknown (an image URL, an unknown format) a documented
default is used: the largest image the provider's rule can bill, so the estimate does not
fall short. PDFs are counted in pages, audio and video in seconds (see "other media").
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import zlib

from . import audio_duration

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

# Rules for inline media whose token count depends on content we do not decode. Audio and
# video last as long as their container says (audio_duration: WAV, FLAC, MP3, Ogg, MP4/MOV,
# WebM/Matroska); where it says nothing reliable, the size over a bitrate floor bounds the
# duration from above, so the guess errs long. PDFs count their pages (see pdf_pages).
AUDIO_TOKENS_PER_SECOND = {"openai": 10, "anthropic": 10, "gemini": 32}
GEMINI_VIDEO_TOKENS_PER_SECOND = 263  # 258 per frame at 1 fps + 32 audio, rounded down
# Video of unknown duration is bounded by its size at 100 kbit/s. A video is billed per
# second whatever its bitrate, so the floor must sit below what real video is encoded at:
# common encoders spend a few hundred kbit/s even on small, low-motion video (a 240p or
# 360p clip, a video call's lowest layer), so nearly every real file plays no longer than
# size / this rate. A file below it (a slideshow of stills) is under-reserved; its usage
# settles the charge. Audio of unknown duration gets audio_duration's own bound (8 kbit/s).
VIDEO_MIN_BYTES_PER_SECOND = 12_500  # 100 kbit/s
PDF_TOKENS_PER_PAGE = {"openai": 1600, "anthropic": 3000, "gemini": 560}
# A medium we cannot size at all (a URL to audio, video or a document).
UNKNOWN_MEDIA_TOKENS = 2000

# --- PDF pages ----------------------------------------------------------------------------

_PDF_PAGE = re.compile(rb"/Type\s*/Page(?!s)")
# The tokens of the page tree's dictionaries: their brackets, a /Type /Pages entry, a direct
# /Count (not an indirect `/Count 7 0 R`), of which 20 digits are read (more is absurd anyway).
_PDF_TREE = re.compile(rb"<<|>>|/Type\s*/Pages(?![\w#.-])|/Count\s+(?>(\d{1,20})\d*)(?!\s+\d+\s+R)")
_PDF_OBJSTM = re.compile(rb"/Type\s*/ObjStm(?![\w#.-])")
_PDF_STREAM = re.compile(rb"(?<!end)stream(?:\r\n|\n|\r)")
# The input is hostile (a zlib bomb, thousands of streams, megabytes of `<<`): what is
# inflated, and how many tokens of the page tree are walked in Python, are bounded. A real
# document's object streams hold its small objects (pages, fonts, annotations): a few
# hundred kB even for a thousand pages.
_PDF_MAX_STREAMS = 256
_PDF_MAX_INFLATED = 4 * 1024 * 1024  # bytes decompressed in all, across the streams
_PDF_MAX_DEFLATED = 4 * 1024 * 1024  # compressed bytes fed to zlib in all
_PDF_CHUNK = 64 * 1024
_PDF_MAX_TREE_TOKENS = 100_000
_PDF_MAX_DEPTH = 64
# No provider bills more pages than this: even at the cheapest per-page rule (Gemini's 560)
# they are past the largest context window (2M tokens); Claude takes at most 100 pages a
# request. A larger count (a bogus /Count 10**12) is held to it, erring long.
MAX_PDF_PAGES = 4000


def _pages_counts(buf: bytes, budget: list[int]) -> int:
    """The largest /Count of a /Type /Pages dictionary in `buf` (0: none). The root of the page
    tree counts every page; `budget` ([tokens left]) is shared by every call for one PDF."""
    best = 0
    frames: list[list[int]] = []  # an open dictionary: [is a /Pages node, its /Count]
    deeper = 0  # dictionaries opened past _PDF_MAX_DEPTH, not tracked
    for m in _PDF_TREE.finditer(buf):
        budget[0] -= 1
        if budget[0] < 0:
            break
        token = m.group()
        if token == b"<<":
            if len(frames) < _PDF_MAX_DEPTH:
                frames.append([0, 0])
            else:
                deeper += 1
        elif token == b">>":
            if deeper:
                deeper -= 1
            elif frames:  # a stray `>>` (in binary stream data) closes nothing
                pages, count = frames.pop()
                if pages and count > best:
                    best = count
        elif frames and not deeper:
            if m.group(1) is not None:
                frames[-1][1] = int(m.group(1))
            else:
                frames[-1][0] = 1
    return best


def _inflate(view: memoryview, pos: int, room: int, feed: int) -> tuple[bytes, int]:
    """(What the zlib stream at view[pos:] inflates to, at most `room` bytes; how much input it
    took, at most `feed`). Fed a chunk at a time, so zlib copies no more than a chunk of what
    follows the stream. Corrupt data ends it, and what inflates before it is kept: the chunk
    that failed is searched by halves for where it fails (a few more calls, not a byte each)."""
    inflate = zlib.decompressobj()
    out: list[bytes] = []
    used = 0
    bad = 0  # once a chunk failed: where the input known to hold the error ends
    while room > 0 and not inflate.eof:
        start = pos + used
        if bad:
            if bad - start <= 1:
                break
            end = start + (bad - start) // 2
        else:
            end = pos + min(used + _PDF_CHUNK, feed)
        chunk = view[start:end]
        if not chunk:
            break
        saved = inflate.copy()
        try:
            data = inflate.decompress(chunk, room)  # (room > 0: a max_length of 0 is no limit)
        except zlib.error:
            inflate, bad = saved, end
            continue
        out.append(data)
        room -= len(data)
        # What zlib took: not what follows the stream's end, nor what the output's bound left.
        used += len(chunk) - len(inflate.unused_data) - len(inflate.unconsumed_tail)
        if inflate.unconsumed_tail:
            break
    return b"".join(out), used


def _object_streams(raw: bytes) -> list[bytes]:
    """The decompressed contents of the FlateDecode object streams (`/Type /ObjStm`) in a PDF,
    within the bounds above; a stream that does not inflate is skipped, or cut short."""
    out: list[bytes] = []
    inflated = deflated = 0
    view = memoryview(raw)
    for n, m in enumerate(_PDF_OBJSTM.finditer(raw)):
        if n >= _PDF_MAX_STREAMS or inflated >= _PDF_MAX_INFLATED or deflated >= _PDF_MAX_DEFLATED:
            break
        # The stream's data follows its dictionary (which /Type /ObjStm is in).
        s = _PDF_STREAM.search(raw, m.end(), m.end() + 4096)
        if s is None:
            continue
        data, used = _inflate(
            view, s.end(), _PDF_MAX_INFLATED - inflated, _PDF_MAX_DEFLATED - deflated
        )
        inflated, deflated = inflated + len(data), deflated + used
        if data:
            out.append(data)
    return out


def pdf_pages(raw: bytes) -> int:
    """How many pages a PDF has, erring high: its page objects, or its page tree's /Count,
    whichever is larger, read in the file and in its compressed object streams (where PDF 1.5+
    writers put both). Neither found: ~50 kB a page. Never raises."""
    seen = len(_PDF_PAGE.findall(raw))
    budget = [_PDF_MAX_TREE_TOKENS]
    count = _pages_counts(raw, budget) if b"/Pages" in raw else 0
    for stream in _object_streams(raw):
        seen += len(_PDF_PAGE.findall(stream))
        if b"/Pages" in stream:
            count = max(count, _pages_counts(stream, budget))
    pages = max(seen, count)
    if not pages:
        return max(1, min(MAX_PDF_PAGES, len(raw) // 50_000))
    return min(MAX_PDF_PAGES, pages)


def _media_seconds(raw: bytes, nbytes: int, video: bool) -> float:
    """How long inline audio or video plays: its container's word (audio_duration), else the
    size over a bitrate floor (an upper bound). `nbytes` is the payload's size by its base64
    length, so a payload that does not decode is still bounded by its size."""
    seconds, exact = audio_duration.duration_seconds(raw)
    if exact:
        return seconds
    return nbytes / (VIDEO_MIN_BYTES_PER_SECOND if video else audio_duration.MIN_BYTES_PER_SECOND)


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
        seconds = math.ceil(_media_seconds(decode_b64(b64), nbytes, video=False))
        return max(1, seconds) * AUDIO_TOKENS_PER_SECOND.get(provider, 32)
    if mime.startswith("video/"):
        seconds = math.ceil(_media_seconds(decode_b64(b64), nbytes, video=True))
        return max(1, seconds) * GEMINI_VIDEO_TOKENS_PER_SECOND
    if mime.startswith("text/") or mime in ("application/json", "application/xml"):
        texts.append(decode_b64(b64).decode("utf-8", "replace"))
        return 0
    return UNKNOWN_MEDIA_TOKENS
