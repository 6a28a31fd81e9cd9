"""OpenAI text to speech (`POST /v1/audio/speech`, and Azure's deployments).

gpt-4o-mini-tts bills per token: the input text, and the audio it speaks as output tokens.
The answer is raw audio without usage, except with `stream_format: "sse"`, whose
`speech.audio.done` event reports `usage`. tts-1 and tts-1-hd bill per input character,
known exactly before the call from `input`.

Estimate: gpt-4o-mini-tts's input by tiktoken (the text and `instructions`), its output as
AUDIO_TOKENS_PER_CHARACTER per input character, divided by `speed`; tts-1(-hd) the
characters of `input`. Measure: the usage of `speech.audio.done`, else the estimate (the
audio's length in tokens cannot be read from its bytes).

Transcriptions and translations: see openai_transcribe.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ._util import Counts, Extracted, ParsedRequest, kind
from .prices import genai_price, priced_per_token
from .types import MeterRequestError, TokenUsage

SPEECH = "audio.speech"

# The speech models genai-prices prices per input character, not per token.
_PER_CHARACTER = re.compile(r"(?:^|/)tts-1(?:-hd)?(?:-\d{4})?$", re.IGNORECASE)
# A model named like a speech model is metered even before genai-prices knows it (priced at
# the fallback price, flagged unpriced) rather than let through at $0.
_SPEECH_NAME = re.compile(r"(?:^|/)(?:tts-|gpt-[\w.-]*-tts)", re.IGNORECASE)

# Output audio tokens reserved per input character at speed 1. OpenAI's own estimate for
# gpt-4o-mini-tts is $0.015 a minute of audio, 1,250 output tokens at $12 per million;
# speech runs ~150 words (~900 characters) a minute, so ~1.4 tokens a character. Twice
# that, rounded up, covers slow voices and instructions asking for a slow delivery.
AUDIO_TOKENS_PER_CHARACTER = 3
# Framing around the text: OpenAI documents none; as for the Images API's prompt.
PROMPT_OVERHEAD = 32
_MIN_SPEED, _MAX_SPEED = 0.25, 4.0


def route(path: str) -> str | None:
    """ "audio.speech" for a speech path, else None."""
    return SPEECH if path.rstrip("/").endswith("/audio/speech") else None


def is_speech(endpoint: str) -> bool:
    return endpoint == SPEECH


def metered(model: str | None) -> bool:
    """Whether a speech call on `model` is metered (else a $0 step)."""
    if not model:
        return False
    if _SPEECH_NAME.search(model) or priced_per_token("openai", model):
        return True
    per_character_price = genai_price("openai", model, TokenUsage(), {"input_characters": 1})
    return bool(per_character_price and per_character_price > 0)


def per_character(model: str) -> bool:
    return bool(_PER_CHARACTER.search(model))


def parse_request(body: dict[str, Any], model: str) -> ParsedRequest:
    text = body.get("input")
    if not isinstance(text, str):
        if text is None:
            raise MeterRequestError("input is missing from the speech request")
        raise MeterRequestError(f"input must be a string, not {kind(text)}")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise MeterRequestError(f"instructions must be a string, not {kind(instructions)}")
    speed = body.get("speed")
    if speed is None:
        speed = 1.0
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not math.isfinite(speed):
        raise MeterRequestError(f"speed must be a number, not {kind(speed)}")
    fmt = body.get("stream_format")
    if fmt is not None and fmt not in ("sse", "audio"):
        raise MeterRequestError(f'stream_format must be "sse" or "audio", not {fmt!r}'[:120])
    # The answer is audio played as it arrives (or SSE): forwarded as it comes, never buffered.
    parsed = ParsedRequest(endpoint=SPEECH, model=model, stream=True)
    if per_character(model):
        # Billed per character of `input`: exact before the call, no tokens.
        parsed.expected_extras["input_characters"] = len(text)
        parsed.cap = 0
        return parsed
    parsed.prompt.add(text)
    parsed.prompt.add(instructions)
    parsed.prompt.overhead += PROMPT_OVERHEAD
    # A speed out of range is refused by OpenAI; clamped here so the reserve stays finite.
    slowest = min(max(float(speed), _MIN_SPEED), _MAX_SPEED)
    parsed.cap = math.ceil(len(text) * AUDIO_TOKENS_PER_CHARACTER / slowest)
    return parsed


def speech_usage(u: dict[str, Any]) -> TokenUsage | None:
    """`speech.audio.done`'s usage: input (text) tokens, output (audio) tokens; None when a
    count in it cannot be read (the call is then charged its estimate, as without usage)."""
    c = Counts()
    usage = TokenUsage(
        input_tokens=c(u.get("input_tokens")), output_tokens=c(u.get("output_tokens"))
    )
    return None if c.unreadable else usage


_DONE = b'"speech.audio.done"'
_DECODER = json.JSONDecoder()


class SpeechStream:
    """`stream_format: "sse"`: `speech.audio.delta` events (base64 audio, skipped unparsed),
    then `speech.audio.done` with the call's usage. Raw audio is not read at all."""

    def __init__(self) -> None:
        self._ex = Extracted()

    def on_event(self, event: str | None, data: bytes) -> bool:
        if _DONE not in data[:256] and event != "speech.audio.done":
            return True  # audio: never parse megabytes of base64
        try:
            obj = _DECODER.decode(data.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            return True
        if isinstance(obj, dict):
            self._ex.seen = True
            u = obj.get("usage")
            if isinstance(u, dict):
                self._ex.usage = speech_usage(u) or self._ex.usage
        return True

    def result(self) -> Extracted:
        return self._ex
