"""OpenAI speech to text: `POST /v1/audio/transcriptions` and `/v1/audio/translations` (and
Azure's deployments, and OpenAI-compatible hosts such as Groq's `/openai/v1/audio/...`).

Two ways of billing, both priced by genai-prices:
- per second of audio (whisper-1, gpt-transcribe, Groq's whisper-large-v3(-turbo), which
  bill at least 10 s): the answer's `usage` is `{"type": "duration", "seconds": N}`
  (`verbose_json` also has `duration`), recorded as the extra `audio_seconds`;
- per token (gpt-4o-transcribe, gpt-4o-mini-transcribe): `usage` is `{"type": "tokens", ...}`
  with input audio and text (prompt) tokens and output (transcript) tokens.

Estimate: the uploaded file's duration (audio_duration: exact for WAV, MP3, FLAC, Ogg, MP4,
WebM with a Duration, else a bound from its size), rounded up to whole seconds; for the per-token models
AUDIO_TOKENS_PER_SECOND input audio tokens per second plus the `prompt` field by tiktoken, and
TRANSCRIPT_TOKENS_PER_SECOND output tokens per second (at most the models' 2,000).
Measure: the `usage` of the JSON answer or of the stream's `transcript.text.done` event. A
text/srt/vtt answer has none: a per-second model is charged its estimate (the duration read
from the file), a per-token one the estimate of its input plus the transcript's tokens
counted (source "counted"), as for a stream cut short.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any
from urllib.parse import unquote_to_bytes

from ._util import Counts, Extracted, ParsedRequest, count, loads, parse_body, route_by_suffix
from .audio_duration import duration_seconds
from .multipart import Form, form_bool, parse_form
from .prices import TOKENS_PER_AUDIO_SECOND, genai_price, priced_per_token
from .types import MeterRequestError, TokenUsage

ENDPOINTS = {
    "/audio/transcriptions": "audio.transcriptions",
    "/audio/translations": "audio.translations",
}

# A model named like a speech-to-text model is metered even before genai-prices knows it
# (priced at the fallback price, flagged unpriced) rather than let through at $0.
_STT_NAME = re.compile(r"whisper|transcribe", re.IGNORECASE)
# Billed per second of audio even where genai-prices does not know the name (whisper models
# on any host).
_WHISPER = re.compile(r"whisper", re.IGNORECASE)

# Input audio tokens reserved per second of audio. OpenAI documents audio input as about 1
# token per 100 ms (the Realtime API's cost guide), and prices gpt-4o-transcribe at an
# estimated $0.006 a minute: 1,000 tokens at its $6 per million audio input, were it all
# audio (16.7 a second). 20 a second is above both, so the reserve does not fall short.
# (The same figure prices a second of audio at a per-token fallback or `price:`.)
AUDIO_TOKENS_PER_SECOND = TOKENS_PER_AUDIO_SECOND
# Transcript tokens reserved per second: fast speech is ~4 words a second, ~5.5 tokens in
# English and more in other scripts; 8, bounded by the models' 2,000 max output tokens.
TRANSCRIPT_TOKENS_PER_SECOND = 8
MAX_TRANSCRIPT_TOKENS = 2_000
# Framing around the prompt: OpenAI documents none; as for the Images API's prompt.
PROMPT_OVERHEAD = 32

_RESPONSE_FORMATS = frozenset({"json", "text", "srt", "verbose_json", "vtt", "diarized_json"})


def route(path: str) -> str | None:
    """ "audio.transcriptions" / "audio.translations" for such a path, else None."""
    return route_by_suffix(path, ENDPOINTS)


def is_transcription(endpoint: str) -> bool:
    return endpoint in _STT_ENDPOINTS


_STT_ENDPOINTS = frozenset(ENDPOINTS.values())


def per_duration(model: str) -> bool:
    """Whether the model bills per second of audio (else per token)."""
    if _WHISPER.search(model):
        return True
    hour = genai_price("openai", model, TokenUsage(), {"audio_seconds": 3600})
    return bool(hour and hour > 0)


def metered(model: str | None) -> bool:
    """Whether a transcription on `model` is metered (else a $0 step)."""
    if not model:
        return False
    return bool(_STT_NAME.search(model)) or priced_per_token("openai", model) or per_duration(model)


def read_request(body: bytes, boundary: str | None = None) -> Form:
    """The form of a transcription request: multipart/form-data, as the API takes it (a JSON
    object is read as its text fields, for a compatible host that accepts one). `boundary`:
    the one the request's Content-Type names."""
    if body[:64].lstrip().startswith(b"{"):
        obj = parse_body(body)
        lists = {
            k: [x for x in v if isinstance(x, str)] for k, v in obj.items() if isinstance(v, list)
        }
        return Form(fields={k: v for k, v in obj.items() if isinstance(v, str)}, lists=lists)
    form = parse_form(body, frozenset({"file"}), boundary)
    # The meter reads the last field and the first file; a host may read others. Two models
    # (one not speech to text: a $0 step) or two files (a second's reserve, ten minutes
    # transcribed) would let a call past its budget: the API takes each once.
    twice = sorted(form.repeated & _SINGLE_FIELDS)
    if twice:
        raise MeterRequestError(f"{twice[0]} is given more than once in the transcription form")
    return form


_SINGLE_FIELDS = frozenset({"file", "model", "url", "response_format", "stream", "prompt"})


def by_url(form: Form) -> bool:
    """Audio fetched by the host from a `url` field (Groq) rather than uploaded: its length
    cannot be known before the call, nor (a json or text answer) after it."""
    return form.upload("file") is None and bool(form.fields.get("url", "").strip())


def body_model(form: Form) -> str | None:
    model = form.fields.get("model")
    return model if model and model.strip() else None


def parse_request(endpoint: str, form: Form, model: str) -> ParsedRequest:
    audio = form.upload("file")
    if audio is None:
        raise MeterRequestError("file is missing from the transcription request")
    fmt = form.fields.get("response_format")
    if fmt is not None and fmt.strip() and fmt.strip() not in _RESPONSE_FORMATS:
        shown = ", ".join(sorted(_RESPONSE_FORMATS))
        raise MeterRequestError(f"response_format must be one of {shown}, not {fmt[:20]!r}")
    seconds, _ = duration_seconds(audio)
    # Speaker reference clips (diarization) are audio the model hears too.
    seconds += sum(_clip_seconds(clip) for clip in _speaker_references(form))
    whole = math.ceil(seconds)
    parsed = ParsedRequest(endpoint=endpoint, model=model, stream=form_bool(form.fields, "stream"))
    if per_duration(model):
        # The prompt and the transcript are not billed: only the audio's seconds.
        parsed.expected_extras["audio_seconds"] = whole
        parsed.cap = 0
        return parsed
    parsed.prompt.add(form.fields.get("prompt"))
    parsed.prompt.overhead += PROMPT_OVERHEAD
    audio_tokens = whole * AUDIO_TOKENS_PER_SECOND
    parsed.prompt.exact += audio_tokens
    parsed.input_audio_tokens = audio_tokens
    parsed.cap = min(whole * TRANSCRIPT_TOKENS_PER_SECOND + 1, MAX_TRANSCRIPT_TOKENS)
    return parsed


def _speaker_references(form: Form) -> list[str]:
    """`known_speaker_references[]` (as the SDKs send a list), or without the brackets."""
    return [
        *form.lists.get("known_speaker_references[]", []),
        *form.lists.get("known_speaker_references", []),
    ]


def _clip_seconds(url: str) -> float:
    """How long a data URL's audio plays (0 for anything else: the API takes only data URLs
    and refuses the call otherwise)."""
    head, sep, data = url.partition(",")
    if not sep or not head.strip().lower().startswith("data:"):
        return 0.0
    if head.strip().lower().endswith(";base64"):
        try:
            clip = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            return 0.0  # not base64: the API refuses it
    else:
        clip = unquote_to_bytes(data)
    return duration_seconds(clip)[0]


# --- responses --------------------------------------------------------------------------


def transcription_usage(u: dict[str, Any], ex: Extracted) -> None:
    """A transcription `usage`, by its type: seconds of audio, or tokens."""
    if u.get("type") == "duration" or ("seconds" in u and "input_tokens" not in u):
        _seconds(u.get("seconds"), ex)
        return
    if "input_tokens" not in u and "output_tokens" not in u:
        return  # another shape (a compatible host's names): no usage, not zero tokens
    c = Counts()
    details = u.get("input_token_details")
    audio = c(details.get("audio_tokens")) if isinstance(details, dict) else 0
    usage = TokenUsage(
        input_tokens=c(u.get("input_tokens")),
        output_tokens=c(u.get("output_tokens")),
        input_audio_tokens=audio,
    )
    # A count that cannot be read: no usage (the input estimate and the text counted), not 0.
    if not c.unreadable:
        ex.usage = usage


def whole_seconds(value: Any) -> int | None:
    """Seconds of audio as billed, from a reported duration; None when it cannot be read
    (null, a bool, negative, NaN/Infinity, text: a duration is a JSON number), never 0.
    Fractions of a second are rounded up: never short, at most a second over."""
    return None if isinstance(value, str) else count(value)


def _seconds(value: Any, ex: Extracted) -> None:
    seconds = whole_seconds(value)
    if seconds is not None:
        ex.usage = TokenUsage()
        ex.extras["audio_seconds"] = seconds


def _tokens_only(ex: Extracted, per_second: bool) -> Extracted:
    """A per-token model's answer that reports only seconds (diarized_json's `duration`, a
    `duration` usage) has no usage it can be priced by: genai-prices has no per-second price
    for it, so the seconds would cost $0. It is left without usage, to be counted."""
    if not per_second and "audio_seconds" in ex.extras:
        ex.usage = None
        del ex.extras["audio_seconds"]
    return ex


def extract(obj: Any, body: bytes, per_second: bool = True) -> Extracted:
    """What an answer reports: a JSON object (json, verbose_json, diarized_json) or the bare
    transcript (text, srt, vtt), whose text is kept to be counted. `per_second`: whether the
    request's model bills seconds of audio (its reserve holds `audio_seconds`)."""
    ex = Extracted()
    if isinstance(obj, dict):
        ex.seen = True
        u = obj.get("usage")
        if isinstance(u, dict):
            transcription_usage(u, ex)
        elif "duration" in obj:  # verbose_json without usage: the duration it billed
            _seconds(obj.get("duration"), ex)
        text = obj.get("text")
        if isinstance(text, str) and text:
            ex.texts.append(text)
        return _tokens_only(ex, per_second)
    text = body.decode("utf-8", "replace").strip()
    if text:
        ex.seen = True
        ex.texts.append(text)
    return ex


class TranscriptionStream:
    """`stream: true` (gpt-4o-*-transcribe, gpt-transcribe): `transcript.text.delta` events,
    then `transcript.text.done` with the whole text and the call's usage."""

    def __init__(self, per_second: bool = True) -> None:
        self._ex = Extracted()
        self._per_second = per_second

    def on_event(self, event: str | None, data: bytes) -> bool:
        obj = loads(data)
        if not isinstance(obj, dict):
            return True
        ex = self._ex
        ex.seen = True
        etype = obj.get("type") or event
        if etype == "transcript.text.delta":
            delta = obj.get("delta")
            if isinstance(delta, str):
                ex.texts.append(delta)
        elif etype == "transcript.text.done":
            u = obj.get("usage")
            if isinstance(u, dict):
                transcription_usage(u, ex)
            text = obj.get("text")
            if isinstance(text, str) and text:
                ex.texts = [text]
        return True

    def result(self) -> Extracted:
        return _tokens_only(self._ex, self._per_second)
