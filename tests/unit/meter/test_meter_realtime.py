"""The OpenAI Realtime API: each `response.done`'s usage read and priced with genai-prices,
and the events drawdown reads on (and writes to) a session's socket."""

from __future__ import annotations

import json

import genai_prices
import pytest
from drawdown.meter import TokenUsage
from drawdown.meter.openai_realtime import (
    CLIENT_MARKERS,
    SERVER_MARKERS,
    is_realtime,
    measure_response,
    measure_usage,
    session_model,
    transcription_model,
    transcription_seconds_of,
    transcription_usage_of,
    usage_of,
)
from drawdown.meter.prices import to_nanos
from drawdown.realtime import error_event, parse_event
from meter_corpus import CONFIG
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    RealtimeServerEvent,
    ResponseDoneEvent,
)
from openai.types.realtime.realtime_error_event import RealtimeErrorEvent
from pydantic import TypeAdapter


def _usage(
    text_in: int = 0,
    audio_in: int = 0,
    image_in: int = 0,
    cached_text: int = 0,
    cached_audio: int = 0,
    cached_image: int = 0,
    text_out: int = 0,
    audio_out: int = 0,
) -> dict:
    cached = cached_text + cached_audio + cached_image
    return {
        "total_tokens": text_in + audio_in + image_in + text_out + audio_out,
        "input_tokens": text_in + audio_in + image_in,
        "output_tokens": text_out + audio_out,
        "input_token_details": {
            "text_tokens": text_in,
            "audio_tokens": audio_in,
            "image_tokens": image_in,
            "cached_tokens": cached,
            "cached_tokens_details": {
                "text_tokens": cached_text,
                "audio_tokens": cached_audio,
                "image_tokens": cached_image,
            },
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }


def _done(usage: dict | None, status: str = "completed") -> dict:
    """A response.done event as the SDK's ResponseDoneEvent describes it."""
    event = {
        "type": "response.done",
        "event_id": "event_1",
        "response": {"object": "realtime.response", "id": "resp_1", "status": status},
    }
    if usage is not None:
        event["response"]["usage"] = usage
    ResponseDoneEvent.model_validate(event)  # the shape is the SDK's
    return event


def _genai(model: str, **usage: int) -> int:
    price = genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id="openai")
    return to_nanos(price.total_price)


@pytest.mark.parametrize("model", ["gpt-realtime", "gpt-realtime-mini", "gpt-4o-realtime-preview"])
def test_a_response_is_priced_by_genai_prices_text_audio_and_cached(model: str) -> None:
    event = _done(
        _usage(
            text_in=900, audio_in=600, cached_text=300, cached_audio=200, text_out=40, audio_out=500
        )
    )
    measured = measure_response(event["response"], (model,), CONFIG)
    expected = _genai(
        model,
        input_tokens=1500,
        cache_read_tokens=500,
        input_audio_tokens=600,
        cache_audio_read_tokens=200,
        output_tokens=540,
        output_audio_tokens=500,
    )
    assert (measured.usd_nanos, measured.priced, measured.model) == (expected, True, model)
    assert (measured.usage.input_tokens, measured.usage.output_tokens) == (1500, 540)
    assert measured.source == "usage"
    # Audio costs more than text: the breakdown is priced, not just the totals.
    plain = _genai(model, input_tokens=1500, cache_read_tokens=500, output_tokens=540)
    assert expected > plain


def test_image_input_is_priced_as_images() -> None:
    usage = usage_of({"usage": _usage(text_in=100, image_in=800, cached_image=100, text_out=10)})
    assert usage == TokenUsage(
        input_tokens=900,
        output_tokens=10,
        cache_read_tokens=100,
        input_image_tokens=800,
        cache_image_read_tokens=100,
    )
    measured = measure_response(
        {"usage": _usage(text_in=100, image_in=800, cached_image=100, text_out=10)},
        ("gpt-realtime",),
        CONFIG,
    )
    assert measured.usd_nanos == _genai(
        "gpt-realtime",
        input_tokens=900,
        cache_read_tokens=100,
        input_image_tokens=800,
        cache_image_read_tokens=100,
        output_tokens=10,
    )


def test_the_first_model_genai_prices_knows_prices_it() -> None:
    """The session's model (session.created) first, then the URL's (an Azure deployment)."""
    response = _done(_usage(text_in=1000, text_out=100))["response"]
    measured = measure_response(response, ("gpt-realtime-mini", "my-deployment"), CONFIG)
    assert measured.usd_nanos == _genai("gpt-realtime-mini", input_tokens=1000, output_tokens=100)
    measured = measure_response(response, (None, "my-deployment"), CONFIG)
    assert (measured.priced, measured.model) == (False, "my-deployment")  # the fallback price
    assert measured.usd_nanos > 0


def test_a_response_without_usage_costs_nothing_and_odd_fields_are_read_safely() -> None:
    assert usage_of(_done(None)["response"]) is None
    assert (
        measure_response(_done(None, "cancelled")["response"], ("gpt-realtime",), CONFIG).usd_nanos
        == 0
    )
    assert usage_of("nonsense") is None
    odd = {
        "usage": {
            "input_tokens": 10,
            "output_tokens": "five",  # digits ("5") would read as 5
            "input_token_details": [1],
            "output_token_details": {"audio_tokens": 99},
        }
    }
    # "five" cannot be read: its parts are (output_token_details), never 0.
    assert usage_of(odd) == TokenUsage(input_tokens=10, output_tokens=99, output_audio_tokens=99)
    # A subset larger than its parent is bounded by it (genai-prices refuses such usage).
    big = {
        "usage": {
            "input_tokens": 10,
            "output_tokens": 5,
            "input_token_details": {
                "cached_tokens": 50,
                "audio_tokens": 40,
                "cached_tokens_details": {"audio_tokens": 30},
            },
        }
    }
    assert usage_of(big) == TokenUsage(
        input_tokens=10,
        output_tokens=5,
        cache_read_tokens=10,
        input_audio_tokens=10,
        cache_audio_read_tokens=10,
    )
    measured = measure_response(big, ("gpt-realtime",), CONFIG)
    assert measured.priced and measured.usd_nanos == _genai(
        "gpt-realtime",
        input_tokens=10,
        cache_read_tokens=10,
        input_audio_tokens=10,
        cache_audio_read_tokens=10,
        output_tokens=5,
    )


def test_session_paths_and_models() -> None:
    assert is_realtime("/v1/realtime") and is_realtime("/openai/realtime/")
    assert not is_realtime("/v1/realtime/client_secrets") and not is_realtime("/v1/realtime/calls")
    assert session_model({"model": "gpt-realtime"}) == "gpt-realtime"
    assert session_model({"api-version": "2025-04-01-preview", "deployment": "voice"}) == "voice"
    assert session_model({"model": " "}) is None


def test_only_the_events_drawdown_acts_on_are_parsed() -> None:
    done = json.dumps(_done(_usage(text_in=1))).encode()
    assert parse_event(done, SERVER_MARKERS)["type"] == "response.done"
    audio = json.dumps({"type": "response.output_audio.delta", "delta": "UklGRg=="}).encode()
    assert parse_event(audio, SERVER_MARKERS) is None
    # A transcript quoting an event's name has its quotes escaped: never taken for the event.
    said = json.dumps({"type": "response.output_text.delta", "delta": '"response.done"'}).encode()
    assert parse_event(said, SERVER_MARKERS) is None
    # Nor is an event whose type is another, though a field names the one looked for.
    named = json.dumps({"type": "conversation.item.added", "x": "response.done"}).encode()
    assert (
        b'"response.done"' in named
        and parse_event(named, SERVER_MARKERS)["type"] != "response.done"
    )
    create = b'{"event_id": "e1", "type": "response.create"}'
    assert parse_event(create, CLIENT_MARKERS) == {"event_id": "e1", "type": "response.create"}
    append = b'{"type": "input_audio_buffer.append", "audio": "AAAA"}'
    assert parse_event(append, CLIENT_MARKERS)["type"] == "input_audio_buffer.append"
    assert parse_event(b'{"type": "session.update"}', CLIENT_MARKERS) is None
    assert parse_event(b'"response.create" not json', CLIENT_MARKERS) is None
    assert parse_event(b'["response.create"]', CLIENT_MARKERS) is None


def test_the_error_event_is_one_the_sdk_reads() -> None:
    raw = error_event("budget_exhausted", "drawdown: budget agent:a exhausted", "evt_client_7")
    event = TypeAdapter(RealtimeServerEvent).validate_json(raw)
    assert isinstance(event, RealtimeErrorEvent)
    assert (event.error.type, event.error.code, event.error.event_id) == (
        "invalid_request_error",
        "budget_exhausted",
        "evt_client_7",
    )
    assert event.error.message == "drawdown: budget agent:a exhausted"
    assert json.loads(error_event("x", "y", 5))["error"]["event_id"] is None


def _transcribed(usage: dict) -> dict:
    event = {
        "type": "conversation.item.input_audio_transcription.completed",
        "event_id": "event_2",
        "item_id": "item_1",
        "content_index": 0,
        "transcript": "Hello.",
        "usage": usage,
    }
    ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(event)
    return event


def test_a_transcription_is_priced_for_its_own_model() -> None:
    tokens = {
        "type": "tokens",
        "input_tokens": 500,
        "output_tokens": 40,
        "total_tokens": 540,
        "input_token_details": {"text_tokens": 20, "audio_tokens": 480},
    }
    usage = transcription_usage_of(_transcribed(tokens))
    assert usage == TokenUsage(input_tokens=500, output_tokens=40, input_audio_tokens=480)
    measured = measure_usage(usage, ("gpt-4o-transcribe",), CONFIG)
    assert measured.usd_nanos == _genai(
        "gpt-4o-transcribe", input_tokens=500, input_audio_tokens=480, output_tokens=40
    )
    assert transcription_seconds_of(_transcribed(tokens)) is None
    assert transcription_usage_of({"type": "x"}) is None


def test_a_transcription_billed_by_the_second_is_charged_its_seconds() -> None:
    """whisper-1 reports seconds of audio, not tokens: before, its transcriptions went
    uncharged in a realtime session."""
    by_the_second = _transcribed({"type": "duration", "seconds": 3.2})
    assert transcription_usage_of(by_the_second) is None
    assert transcription_seconds_of(by_the_second) == 4  # whole seconds, as the API's are
    measured = measure_usage(TokenUsage(), ("whisper-1",), CONFIG, extras={"audio_seconds": 4})
    assert measured.usd_nanos == _genai("whisper-1", audio_seconds=4) == 400_000
    assert (measured.priced, measured.model) == (True, "whisper-1")
    for seconds in (None, "3", True, float("nan"), float("inf")):
        assert transcription_seconds_of({"usage": {"type": "duration", "seconds": seconds}}) is None


def test_the_transcription_model_is_read_from_the_ga_and_the_beta_session() -> None:
    ga = {"audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}}}
    assert transcription_model(ga) == "gpt-4o-mini-transcribe"
    beta = {"input_audio_transcription": {"model": "whisper-1"}}
    assert transcription_model(beta) == "whisper-1"
    assert transcription_model({"audio": {"input": {"transcription": None}}}) is None
    assert transcription_model({"audio": "x"}) is None and transcription_model(None) is None
