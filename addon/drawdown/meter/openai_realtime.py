"""The OpenAI Realtime API over WebSocket (`wss://api.openai.com/v1/realtime?model=…`, and
Azure's `/openai/realtime?deployment=…`): one session, many billed responses.

The handshake (a GET upgrade) costs nothing; every response the model gives in the session
is billed, and its server event `response.done` reports the response's `usage` (text, audio,
image and cached input tokens; text and audio output tokens). Each is metered from that
usage and priced with genai-prices (gpt-realtime, gpt-realtime-mini, gpt-4o-realtime-preview…
have text, audio, cached and image prices). Nothing is estimated: the session's conversation
is held by the server, so a response's input is known only when it is done.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._util import count
from .config import MeterConfig, PricePerMillion
from .openai_transcribe import whole_seconds
from .prices import price_first_known, to_nanos
from .types import Measurement, TokenUsage

REALTIME = "realtime"

# Client events that make the server spend: a response, or a turn of input audio committed
# (transcribed, and with voice activity detection answered). `append` feeds the server's
# voice activity detection, which starts responses on its own.
SPENDING_CLIENT_EVENTS = frozenset(
    {"response.create", "input_audio_buffer.commit", "input_audio_buffer.append"}
)
# Substrings to look for before parsing a message: a session's audio flows as many small
# events, which are passed on unparsed. Base64 audio holds no '"', and JSON escapes those
# of a transcript, so only a JSON string equal to the name matches; the parsed type tells.
TRANSCRIBED = "conversation.item.input_audio_transcription.completed"
SERVER_MARKERS = (
    b'"response.created"',
    b'"response.done"',
    b'"session.created"',
    b'"session.updated"',
    b'"error"',  # the server refused a client event (a response.create: its hold is released)
    f'"{TRANSCRIBED}"'.encode(),
)
CLIENT_MARKERS = tuple(f'"{name}"'.encode() for name in sorted(SPENDING_CLIENT_EVENTS))
# While the session may spend, audio is not looked at: only what asks for a response or a turn.
ASKING_MARKERS = (b'"response.create"', b'"input_audio_buffer.commit"')


def is_realtime(path: str) -> bool:
    """A Realtime session's path (the query string left out): /v1/realtime, /openai/realtime."""
    return path.rstrip("/").endswith("/realtime")


def session_model(query: Mapping[str, str]) -> str | None:
    """The model a session is opened for: OpenAI's `model`, Azure's `deployment`."""
    for name in ("model", "deployment"):
        value = query.get(name)
        if value and value.strip():
            return value.strip()
    return None


def _total(usage: dict[str, Any], key: str, details: dict[str, Any]) -> int:
    """`usage[key]`, else, when it cannot be read, the sum of its parts in `details` (text,
    audio and image tokens), else 0: a Realtime response has no other source to fall back on."""
    n = count(usage.get(key))
    if n is not None:
        return n
    total = 0
    for part in ("text_tokens", "audio_tokens", "image_tokens"):
        if details.get(part) is not None:
            n = count(details[part])
            if n is None:
                return 0  # the parts are no better read
            total += n
    return total


def _part(value: Any) -> int:
    return count(value) or 0  # a subset that cannot be read: none (bounded by its parent)


def usage_of(response: Any) -> TokenUsage | None:
    """A `response.done` event's `response.usage` (RealtimeResponseUsage) as TokenUsage, or
    None when the response reports none. Subsets are included in their parents (cached and
    audio in input; audio in output), as genai-prices expects."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_token_details")
    details = details if isinstance(details, dict) else {}
    cached = details.get("cached_tokens_details")
    cached = cached if isinstance(cached, dict) else {}
    out = usage.get("output_token_details")
    out = out if isinstance(out, dict) else {}
    input_tokens = _total(usage, "input_tokens", details)
    output_tokens = _total(usage, "output_tokens", out)
    # A subset is never larger than its parent (genai-prices refuses such a breakdown).
    cache_read = min(_part(details.get("cached_tokens")), input_tokens)
    input_audio = min(_part(details.get("audio_tokens")), input_tokens)
    input_image = min(_part(details.get("image_tokens")), input_tokens)
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read,
        input_audio_tokens=input_audio,
        cache_audio_read_tokens=min(_part(cached.get("audio_tokens")), cache_read, input_audio),
        input_image_tokens=input_image,
        cache_image_read_tokens=min(_part(cached.get("image_tokens")), cache_read, input_image),
        output_audio_tokens=min(_part(out.get("audio_tokens")), output_tokens),
    )


def transcription_usage_of(event: Any) -> TokenUsage | None:
    """The token usage of a `conversation.item.input_audio_transcription.completed` event
    (gpt-4o-transcribe & co.: audio in, text out), or None: none reported, or billed by the
    second (whisper-1's `{"type": "duration"}`: transcription_seconds_of)."""
    usage = event.get("usage") if isinstance(event, dict) else None
    if not isinstance(usage, dict) or usage.get("type", "tokens") != "tokens":
        return None
    details = usage.get("input_token_details")
    details = details if isinstance(details, dict) else {}
    input_tokens = _total(usage, "input_tokens", details)
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=_total(usage, "output_tokens", {}),
        input_audio_tokens=min(_part(details.get("audio_tokens")), input_tokens),
    )


def transcription_seconds_of(event: Any) -> int | None:
    """The seconds of audio a transcription billed by the second reports (whisper-1's
    `"usage": {"type": "duration", "seconds": 3.2}`), rounded up to whole seconds as the
    transcriptions API's are; None when it reports none."""
    usage = event.get("usage") if isinstance(event, dict) else None
    if not isinstance(usage, dict) or usage.get("type") != "duration":
        return None
    return whole_seconds(usage.get("seconds"))


def transcription_model(session: Any) -> str | None:
    """The model a session transcribes its input audio with: `audio.input.transcription`
    (the GA session), else `input_audio_transcription` (the beta's); None when it does not."""
    if not isinstance(session, dict):
        return None
    audio = session.get("audio")
    heard = audio.get("input") if isinstance(audio, dict) else None
    transcription = heard.get("transcription") if isinstance(heard, dict) else None
    if not isinstance(transcription, dict):
        transcription = session.get("input_audio_transcription")
    model = transcription.get("model") if isinstance(transcription, dict) else None
    return model.strip() if isinstance(model, str) and model.strip() else None


def measure_response(
    response: Any,
    models: tuple[str | None, ...],
    config: MeterConfig,
    price_override: PricePerMillion | None = None,
    matched: str | None = None,
) -> Measurement:
    """What one response of a session is charged: its reported usage, priced for the first of
    `models` genai-prices knows (the session's, then the one the URL named), else the
    fallback price (priced=False). A response without usage is charged nothing."""
    return measure_usage(usage_of(response), models, config, price_override, matched)


def measure_usage(
    usage: TokenUsage | None,
    models: tuple[str | None, ...],
    config: MeterConfig,
    price_override: PricePerMillion | None = None,
    matched: str | None = None,
    extras: Mapping[str, int] | None = None,
) -> Measurement:
    """`usage` priced for the first of `models` genai-prices knows (see measure_response),
    with `extras` billed beside it (a transcription's `audio_seconds`)."""
    model = next((m for m in models if m), None)
    if usage is None:
        return Measurement(
            usage=TokenUsage(), usd_nanos=0, source="usage", priced=True, model=model
        )
    usd, priced = price_first_known(
        "openai", models, usage, config, price_override, extras=extras, matched=matched
    )
    return Measurement(
        usage=usage,
        usd_nanos=to_nanos(usd),
        source="usage",
        priced=priced,
        model=model,
        extras=extras or {},
    )
