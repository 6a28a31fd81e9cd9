"""OpenAI speech to text metered: whisper-1, gpt-transcribe and Groq's whisper per second of
audio, gpt-4o-(mini-)transcribe per token. The reserve reads the upload's duration."""

from __future__ import annotations

import base64
import json
import math
import struct

import genai_prices
import pytest
from drawdown.meter import (
    MeterRequestError,
    charging,
    count_tokens,
    inspect_request,
    measure_body,
    open_stream_meter,
    unread_request,
)
from drawdown.meter.audio_duration import MIN_BYTES_PER_SECOND, duration_seconds
from drawdown.meter.multipart import MAX_PARTS
from drawdown.meter.openai_transcribe import (
    AUDIO_TOKENS_PER_SECOND,
    MAX_TRANSCRIPT_TOKENS,
    PROMPT_OVERHEAD,
    TRANSCRIPT_TOKENS_PER_SECOND,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meter_corpus import CONFIG, cut

from tests.support import wire

TRANSCRIBE = "/v1/audio/transcriptions"
TRANSLATE = "/v1/audio/translations"
OPENAI = "https://api.openai.com"
GROQ = "https://api.groq.com"


def _genai(model: str, provider: str = "openai", **usage: int) -> int:
    price = genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id=provider)
    return math.ceil(price.total_price * 1_000_000_000)


wav = wire.wav_audio  # a mono 16-bit WAV of silence lasting `seconds`


def form(fields: dict[str, str], audio: bytes | None, boundary: str = "b0und4ry") -> bytes:
    out = b""
    for key, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    if audio is not None:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '.encode()
        out += b'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n' + audio + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _request(model: str, audio: bytes, path: str = TRANSCRIBE, origin: str = OPENAI, **fields):
    body = form({"model": model, **fields}, audio)
    return inspect_request("openai", "POST", path, {}, body, CONFIG, origin=origin)


# --- which calls are metered ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "model", "charged"),
    [
        (TRANSCRIBE, "whisper-1", "tokens"),
        (TRANSLATE, "whisper-1", "tokens"),
        (TRANSCRIBE, "gpt-4o-transcribe", "tokens"),
        (TRANSCRIBE, "gpt-4o-mini-transcribe", "tokens"),
        (TRANSCRIBE, "gpt-transcribe", "tokens"),
        (TRANSCRIBE, "gpt-4o-transcribe-diarize", "tokens"),
        ("/openai/v1/audio/transcriptions", "whisper-large-v3-turbo", "tokens"),
        # A speech-to-text model genai-prices does not know yet: metered (fallback price).
        (TRANSCRIBE, "gpt-5-transcribe", "tokens"),
        # A compatible host's own model, not named as speech to text: a step at $0, as before.
        (TRANSCRIBE, "parakeet-tdt", "step"),
        ("/openai/deployments/whisper-1/audio/transcriptions", "", "tokens"),
    ],
)
def test_transcription_is_metered_for_speech_to_text_models(path, model, charged):
    fields = {"model": model} if model else {}
    body = form(fields, wav(1))
    r = inspect_request("openai", "POST", path, {}, body, CONFIG)
    assert (r.billable, r.step) == (charged == "tokens", charged == "step")
    assert r.endpoint == (
        "audio.translations" if "translations" in path else "audio.transcriptions"
    )
    # replay (`charging`, with the model the ledger records) agrees with the proxy
    assert charging("openai", "POST", path, r.model) == charged
    assert unread_request("openai", "POST", path).step  # unread: no model known, a step


def test_audio_the_host_fetches_by_url_is_a_step():
    """Groq takes a `url` instead of a file: its length is unknown before the call and its
    json answer does not report it, so it stays a $0 step (README known gaps)."""
    body = form({"model": "whisper-large-v3", "url": "https://example.com/a.mp3"}, None)
    r = inspect_request("openai", "POST", TRANSCRIBE, {}, body, CONFIG, origin=GROQ)
    assert (r.billable, r.step, r.model) == (False, True, "whisper-large-v3")


# --- the reserve --------------------------------------------------------------------------


def test_whisper_reserves_the_seconds_of_its_upload_at_genai_prices_price():
    r = _request("whisper-1", wav(61.2), prompt="Acme, Drawdown")
    assert dict(r.expected_extras) == {"audio_seconds": 62}  # rounded up to whole seconds
    assert (r.input_tokens, r.max_output_tokens) == (0, 0)  # the prompt is not billed
    assert r.priced
    assert r.estimate_usd_nanos == _genai("whisper-1", audio_seconds=62) == 6_200_000
    translated = _request("whisper-1", wav(61.2), path=TRANSLATE)
    assert translated.estimate_usd_nanos == r.estimate_usd_nanos


def test_groq_whisper_is_priced_at_groq_s_price_with_its_ten_second_minimum():
    short = _request(
        "whisper-large-v3", wav(3), path="/openai/v1/audio/transcriptions", origin=GROQ
    )
    assert short.price_provider == "groq" and dict(short.expected_extras) == {"audio_seconds": 3}
    assert short.estimate_usd_nanos == _genai("whisper-large-v3", "groq", audio_seconds=10)
    # Groq bills at least 10 s: 3 s and 9 s cost as much as 10 s, 11 s more.
    costs = [_request("whisper-large-v3", wav(s), origin=GROQ).estimate_usd_nanos for s in (9, 11)]
    assert costs[0] == short.estimate_usd_nanos < costs[1]
    turbo = _request("whisper-large-v3-turbo", wav(90), origin=GROQ)
    assert turbo.estimate_usd_nanos == _genai("whisper-large-v3-turbo", "groq", audio_seconds=90)


def test_gpt_4o_transcribe_reserves_audio_tokens_the_prompt_and_the_transcript():
    prompt = "Speakers: Ada Lovelace and Charles Babbage."
    r = _request("gpt-4o-transcribe", wav(30), prompt=prompt)
    audio = 30 * AUDIO_TOKENS_PER_SECOND
    text = math.ceil(
        (count_tokens(prompt, "gpt-4o-transcribe") + PROMPT_OVERHEAD) * r.safety_factor
    )
    assert (r.input_tokens, r.input_audio_tokens) == (audio + text, audio)
    assert r.max_output_tokens == 30 * TRANSCRIPT_TOKENS_PER_SECOND + 1
    assert not r.expected_extras
    expected = _genai(
        "gpt-4o-transcribe",
        input_tokens=audio + text,
        input_audio_tokens=audio,
        output_tokens=r.max_output_tokens,
    )
    assert r.estimate_usd_nanos == expected
    # A long file: the transcript is reserved up to the models' 2,000 output tokens, no more.
    long = _request("gpt-4o-mini-transcribe", wav(600, rate=8000))
    assert long.max_output_tokens == MAX_TRANSCRIPT_TOKENS


def test_the_reserve_is_not_short_of_what_the_api_reports():
    """OpenAI bills about 10 audio tokens a second; the reserve's 20 covers it."""
    r = _request("gpt-4o-mini-transcribe", wav(45))
    reported = {"type": "tokens", "input_tokens": 450, "output_tokens": 200, "total_tokens": 650}
    reported["input_token_details"] = {"audio_tokens": 450, "text_tokens": 0}
    m = measure_body(r, 200, json.dumps({"text": "hi", "usage": reported}).encode(), CONFIG)
    assert 0 < m.usd_nanos <= r.estimate_usd_nanos


def test_a_whisper_model_genai_prices_does_not_know_is_not_free():
    """Seconds of audio have no per-token price: on the fallback price (or a `price:`
    override) each second counts as AUDIO_TOKENS_PER_SECOND input tokens, not $0."""
    r = _request("whisper-large-v9", wav(30), origin=GROQ)
    assert dict(r.expected_extras) == {"audio_seconds": 30} and not r.priced
    fallback = CONFIG.fallback_price.input * 30 * AUDIO_TOKENS_PER_SECOND / 1_000_000
    assert r.estimate_usd_nanos == math.ceil(fallback * 1_000_000_000) > 0
    answer = {"text": "hi", "usage": {"type": "duration", "seconds": 12}}
    m = measure_body(r, 200, json.dumps(answer).encode(), CONFIG)
    assert not m.priced and m.usd_nanos == math.ceil(fallback * 12 / 30 * 1_000_000_000)


# --- durations read from the container ----------------------------------------------------


def _mp3_frame(padding: int = 0) -> bytes:
    # MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, stereo: 417 bytes (418 padded), 1152 samples.
    header = bytes([0xFF, 0xFB, 0x90 | (padding << 1), 0x64])
    return header + bytes(417 + padding - 4)


def test_durations_are_read_exactly_from_common_containers():
    assert duration_seconds(wav(7.5)) == (7.5, True)
    assert duration_seconds(wav(2, rate=44_100)) == (2.0, True)
    id3 = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + bytes(10)  # a 10-byte tag to skip
    mp3 = id3 + _mp3_frame() * 383 + b"TAG" + bytes(125)  # 383 frames, an ID3v1 tag
    seconds, exact = duration_seconds(mp3)
    assert exact and seconds == pytest.approx(383 * 1152 / 44_100)
    # A VBR file: its Xing header counts the frames (the rest of the file is not walked).
    xing = bytearray(_mp3_frame())
    xing[4 + 32 : 4 + 32 + 12] = b"Xing" + struct.pack(">II", 1, 10_000)
    seconds, exact = duration_seconds(bytes(xing) + _mp3_frame() * 3)
    assert exact and seconds == pytest.approx(10_000 * 1152 / 44_100)
    # FLAC: STREAMINFO's sample rate and total samples.
    packed = (48_000 << 44) | (1 << 41) | (15 << 36) | 96_000
    flac = b"fLaC" + b"\x80\x00\x00\x22" + bytes(10) + packed.to_bytes(8, "big") + bytes(16)
    assert duration_seconds(flac) == (2.0, True)
    # Ogg Opus: the last page's granule position at 48 kHz.
    opus_head = b"OpusHead\x01\x01\x38\x01" + struct.pack("<I", 16_000) + bytes(3)
    first = b"OggS\x00\x02" + bytes(20) + b"\x01" + bytes([len(opus_head)]) + opus_head
    last = b"OggS\x00\x04" + struct.pack("<q", 48_000 * 5) + bytes(12) + b"\x01\x10" + bytes(16)
    assert duration_seconds(first + bytes(500) + last) == (5.0, True)
    # MP4/M4A: the movie header's duration over its timescale.
    mvhd = b"\x00" + bytes(3) + bytes(8) + struct.pack(">II", 1000, 12_345) + bytes(80)
    moov = struct.pack(">I", 8 + 8 + len(mvhd)) + b"moov" + struct.pack(">I", 8 + len(mvhd))
    mp4 = struct.pack(">I", 16) + b"ftypM4A " + bytes(4) + moov + b"mvhd" + mvhd
    assert duration_seconds(mp4) == (12.345, True)
    # WebM: the Segment Info's Duration (a float) in TimecodeScale units (1 ms by default).
    assert duration_seconds(_webm(info=_ebml(0x4489, struct.pack(">d", 8250.0)))) == (8.25, True)
    scaled = _ebml(0x2AD7B1, (10_000_000).to_bytes(3, "big")) + _ebml(
        0x4489, struct.pack(">f", 300)
    )
    assert duration_seconds(_webm(info=scaled)) == (3.0, True)


def _ebml(ident: int, body: bytes) -> bytes:
    """One EBML element: its id, its size as a 1- or 8-byte variable-length integer, its body."""
    size = bytes([0x80 | len(body)]) if len(body) < 127 else b"\x01" + len(body).to_bytes(7, "big")
    return ident.to_bytes((ident.bit_length() + 7) // 8, "big") + size + body


def _webm(info: bytes | None, media: int = 40_000) -> bytes:
    header = _ebml(0x1A45DFA3, _ebml(0x4282, b"webm"))
    children = (_ebml(0x1549A966, info) if info is not None else b"") + _ebml(
        0x1F43B675, bytes(media)
    )
    return header + _ebml(0x18538067, children)


def test_a_wav_of_countless_empty_chunks_is_not_walked_chunk_by_chunk():
    """25 MB of zero bytes after a RIFF header is three million empty chunks: walked in
    Python, seconds of CPU under the GIL, the event loop's too. A WAV has a few chunks; one
    past a thousand is bounded by its size."""
    real = wav(2)
    header, rest = real[:12], real[12:]
    padded = header + b"junk" + bytes(4) + b"junk" + bytes(4)  # two chunks: still read
    assert duration_seconds(padded + rest) == (2.0, True)
    hostile = header + (b"junk" + bytes(4)) * 5_000 + rest
    assert duration_seconds(hostile) == (len(hostile) / MIN_BYTES_PER_SECOND, False)


def test_an_unknown_container_is_bounded_by_its_size():
    # A browser's recording: WebM without a Duration (MediaRecorder writes none).
    webm = _webm(info=None, media=49_900)
    assert duration_seconds(webm) == (len(webm) / MIN_BYTES_PER_SECOND, False)
    # ...and reserved at that bound: a fleet's budget sees the worst case, usage settles it.
    r = _request("whisper-1", webm)
    assert dict(r.expected_extras) == {"audio_seconds": math.ceil(len(webm) / 1000)}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    prefix=st.sampled_from(
        [b"RIFF\xff\xff\xff\xffWAVE", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\x1a\x45\xdf\xa3"]
    ),
    rest=st.binary(max_size=600),
)
def test_hostile_audio_never_raises(prefix, rest):
    seconds, _ = duration_seconds(prefix + rest)
    assert seconds >= 0
    r = _request("gpt-4o-mini-transcribe", prefix + rest)
    assert r.billable and r.estimate_usd_nanos >= 0


def test_a_duration_too_large_to_hold_is_a_plain_error_never_a_crash():
    """A WebM whose Duration times its TimecodeScale overflows a float (infinity): a reader
    that returned it would crash the estimate (math.ceil(inf)); it gets the size bound."""
    huge = _ebml(0x2AD7B1, ((1 << 56) - 2).to_bytes(7, "big")) + _ebml(
        0x4489, struct.pack(">d", 1e300)
    )
    webm = _webm(info=huge)
    assert duration_seconds(webm) == (len(webm) / MIN_BYTES_PER_SECOND, False)
    r = _request("whisper-1", webm)
    assert dict(r.expected_extras) == {"audio_seconds": math.ceil(len(webm) / 1000)}
    # A finite claim of years past what a call may hold is refused in plain words, seconds named.
    mvhd = b"\x01" + bytes(3) + bytes(16) + struct.pack(">IQ", 1, 2**63) + bytes(80)
    moov = struct.pack(">I", 8 + 8 + len(mvhd)) + b"moov" + struct.pack(">I", 8 + len(mvhd))
    mp4 = struct.pack(">I", 16) + b"ftypM4A " + bytes(4) + moov + b"mvhd" + mvhd
    with pytest.raises(MeterRequestError, match=f"{2**63} seconds of audio"):
        _request("whisper-1", mp4)


# --- what is charged ----------------------------------------------------------------------


def test_whisper_is_charged_the_seconds_its_answer_reports():
    r = _request("whisper-1", wav(61.2))
    answer = {"text": "hello", "usage": {"type": "duration", "seconds": 61}}
    m = measure_body(r, 200, json.dumps(answer).encode(), CONFIG)
    assert (m.source, dict(m.extras), m.priced) == ("usage", {"audio_seconds": 61}, True)
    assert m.usd_nanos == _genai("whisper-1", audio_seconds=61)
    verbose = {"task": "transcribe", "duration": 12.2, "text": "hello", "segments": []}
    m = measure_body(r, 200, json.dumps(verbose).encode(), CONFIG)  # no usage: its duration
    assert (m.source, dict(m.extras)) == ("usage", {"audio_seconds": 13})
    assert m.usd_nanos == _genai("whisper-1", audio_seconds=13)


@pytest.mark.parametrize(
    "body", [b"hello there\n", b"1\n00:00:00,000 --> 00:00:01,000\nhello\n\n", b"42\n"]
)
def test_a_text_srt_or_vtt_answer_from_whisper_is_charged_the_seconds_of_the_file(body):
    r = _request("whisper-1", wav(9.5), response_format="text")
    m = measure_body(r, 200, body, CONFIG)
    assert (m.source, dict(m.extras)) == ("estimate", {"audio_seconds": 10})
    assert m.usd_nanos == r.estimate_usd_nanos == _genai("whisper-1", audio_seconds=10)


def test_gpt_4o_transcribe_is_charged_its_reported_tokens():
    r = _request("gpt-4o-transcribe", wav(12), prompt="Acme")
    usage = {"type": "tokens", "input_tokens": 125, "output_tokens": 30, "total_tokens": 155}
    usage["input_token_details"] = {"text_tokens": 5, "audio_tokens": 120}
    m = measure_body(r, 200, json.dumps({"text": "hi", "usage": usage}).encode(), CONFIG)
    assert (m.source, m.usage.input_tokens, m.usage.input_audio_tokens) == ("usage", 125, 120)
    assert m.usd_nanos == _genai(
        "gpt-4o-transcribe", input_tokens=125, input_audio_tokens=120, output_tokens=30
    )


def test_a_text_answer_from_gpt_4o_transcribe_is_charged_its_input_estimate_and_the_text():
    r = _request("gpt-4o-transcribe", wav(12), response_format="text")
    text = "The quick brown fox jumps over the lazy dog."
    m = measure_body(r, 200, text.encode() + b"\n", CONFIG)
    out = count_tokens(text, "gpt-4o-transcribe")
    assert m.source == "counted"
    assert (m.usage.input_tokens, m.usage.input_audio_tokens) == (
        r.input_tokens,
        r.input_audio_tokens,
    )
    assert m.usage.output_tokens >= out
    assert m.usd_nanos == _genai(
        "gpt-4o-transcribe",
        input_tokens=r.input_tokens,
        input_audio_tokens=r.input_audio_tokens,
        output_tokens=m.usage.output_tokens,
    )
    assert m.usd_nanos < r.estimate_usd_nanos  # the transcript is shorter than reserved


@pytest.mark.parametrize(
    "answer",
    [
        # diarized_json always has `duration`; its `usage` is optional (a host may leave it out)
        {"task": "transcribe", "duration": 30.0, "text": "Hello there, how are you?"},
        # usage is `tokens` or `duration` in every transcription type
        {"text": "Hello there, how are you?", "usage": {"type": "duration", "seconds": 30}},
    ],
)
def test_a_per_token_model_answering_in_seconds_is_not_charged_nothing(answer):
    """gpt-4o-transcribe(-diarize) has no per-second price in genai-prices: seconds alone
    would price at $0. It is charged its input estimate and its transcript, counted."""
    r = _request("gpt-4o-transcribe-diarize", wav(30), response_format="diarized_json")
    m = measure_body(r, 200, json.dumps(answer).encode(), CONFIG)
    assert m.source == "counted" and "audio_seconds" not in m.extras
    assert (m.usage.input_tokens, m.usage.input_audio_tokens) == (
        r.input_tokens,
        r.input_audio_tokens,
    )
    assert m.usage.output_tokens >= count_tokens(answer["text"], "gpt-4o-transcribe")
    assert m.usd_nanos == _genai(
        "gpt-4o-transcribe",
        input_tokens=r.input_tokens,
        input_audio_tokens=r.input_audio_tokens,
        output_tokens=m.usage.output_tokens,
    )
    # ...and the same streamed: a `transcript.text.done` whose usage is in seconds.
    r = _request("gpt-4o-transcribe", wav(30), stream="true")
    meter = open_stream_meter(r, "text/event-stream", None, CONFIG)
    meter.feed(_sse("Hello there", {"type": "duration", "seconds": 30}))
    _, m = meter.finish()
    assert m.source == "counted" and m.usage.input_audio_tokens == r.input_audio_tokens > 0
    assert m.usd_nanos > 0


def test_a_usage_of_another_shape_is_not_read_as_zero_tokens():
    """A compatible host's own usage names (Mistral's `prompt_audio_seconds`,
    `prompt_tokens`...) were read as 0 input and 0 output tokens: a transcription at $0. It is
    charged as an answer without usage: the input estimate and the transcript counted."""
    r = _request("gpt-4o-transcribe", wav(30))
    usage = {"prompt_audio_seconds": 30, "prompt_tokens": 4, "completion_tokens": 9}
    answer = {"text": "Hello there, how are you?", "usage": usage}
    m = measure_body(r, 200, json.dumps(answer).encode(), CONFIG)
    assert m.source == "counted" and m.usage.input_audio_tokens == r.input_audio_tokens
    assert m.usd_nanos > 0


def test_a_refused_transcription_costs_nothing():
    r = _request("whisper-1", wav(5))
    error = b'{"error": {"message": "Invalid file format.", "type": "invalid_request_error"}}'
    assert measure_body(r, 400, error, CONFIG).usd_nanos == 0


def _sse(text: str, usage: dict) -> bytes:
    events = [{"type": "transcript.text.delta", "delta": w + " "} for w in text.split()]
    events.append({"type": "transcript.text.done", "text": text, "usage": usage})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


TOKENS = {
    "type": "tokens",
    "input_tokens": 60,
    "input_token_details": {"text_tokens": 0, "audio_tokens": 60},
    "output_tokens": 9,
    "total_tokens": 69,
}


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(points=st.lists(st.integers(min_value=1, max_value=800), max_size=6))
def test_a_streamed_transcription_is_charged_its_usage_however_cut(points):
    r = _request("gpt-4o-mini-transcribe", wav(6), stream="true")
    assert r.stream
    body = _sse("one two three four five six seven", TOKENS)
    meter = open_stream_meter(r, "text/event-stream", None, CONFIG)
    forwarded = b"".join(meter.feed(piece) for piece in cut(body, points))
    tail, m = meter.finish()
    assert forwarded + tail == body  # passed on untouched
    assert (m.source, m.usage.input_audio_tokens, m.usage.output_tokens) == ("usage", 60, 9)
    assert m.usd_nanos == _genai(
        "gpt-4o-mini-transcribe", input_tokens=60, input_audio_tokens=60, output_tokens=9
    )


def test_a_stream_cut_before_its_usage_is_charged_the_input_estimate_and_the_text_so_far():
    r = _request("gpt-4o-mini-transcribe", wav(6), stream="true")
    body = _sse("one two three four five six seven", TOKENS)
    meter = open_stream_meter(r, "text/event-stream", None, CONFIG)
    meter.feed(body[: body.index(b"transcript.text.done")])
    m = meter.partial()
    assert m.source == "counted" and m.usage.input_audio_tokens == r.input_audio_tokens
    assert 0 < m.usage.output_tokens < r.max_output_tokens
    assert 0 < m.usd_nanos < r.estimate_usd_nanos


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (
            b'--b0und4ry\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1',
            "cut short",
        ),
        (b"model=whisper-1&file=x", "boundary line"),
        (form({"model": "whisper-1"}, None), "file is missing"),
        (form({"model": "whisper-1", "response_format": "mp3"}, wav(1)), "response_format"),
        (form({"model": "gpt-4o-transcribe", "stream": "yes"}, wav(1)), "stream must be"),
        (b'{"model": "whisper-1"}', "file is missing"),
    ],
)
def test_a_malformed_transcription_request_is_refused_in_plain_words(body, says):
    with pytest.raises(MeterRequestError, match=says):
        inspect_request("openai", "POST", TRANSCRIBE, {}, body, CONFIG)


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--b0und4ry\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


@pytest.mark.parametrize(
    ("parts", "says"),
    [
        # The meter would read the last model (not speech to text: a $0 step) while a server
        # that takes the first transcribes ten minutes on whisper-1 for free.
        ([("model", b"whisper-1"), ("model", b"not-a-stt-model")], "model"),
        # The meter would reserve the first file's second while a server reads the other's
        # ten minutes (and a text answer would be charged that second).
        ([("model", b"whisper-1"), ("file", wav(1)), ("file", wav(600))], "file"),
        (
            [("model", b"whisper-1"), ("response_format", b"json"), ("response_format", b"text")],
            "response_format",
        ),
    ],
)
def test_a_field_a_transcription_takes_once_given_twice_is_refused(parts, says):
    body = b"".join(_part(n, v, "a.wav" if n == "file" else None) for n, v in parts)
    if not any(n == "file" for n, _ in parts):
        body += _part("file", wav(600), "a.wav")
    body += b"--b0und4ry--\r\n"
    with pytest.raises(MeterRequestError, match=f"{says} is given more than once"):
        inspect_request("openai", "POST", TRANSCRIBE, {}, body, CONFIG)


def test_array_fields_may_repeat():
    """The SDKs send a list as repeated `name[]` parts (include, timestamp_granularities,
    known_speaker_names): that is no duplicate."""
    body = b"".join(
        _part(n, v)
        for n, v in [
            ("model", b"gpt-4o-transcribe"),
            ("include[]", b"logprobs"),
            ("timestamp_granularities[]", b"word"),
            ("timestamp_granularities[]", b"segment"),
        ]
    )
    body += _part("file", wav(3), "a.wav") + b"--b0und4ry--\r\n"
    r = inspect_request("openai", "POST", TRANSCRIBE, {}, body, CONFIG)
    assert r.billable and r.input_audio_tokens == 3 * AUDIO_TOKENS_PER_SECOND


def _smuggled() -> bytes:
    """A form read two ways: the server reads the parts of the boundary its Content-Type
    names (`real`); before them, as a preamble it ignores, a form of another boundary names a
    model that is not speech to text (a $0 step, never metered)."""
    fake = form({"model": "not-a-stt-model"}, wav(1), boundary="fake")
    return fake + form({"model": "whisper-1"}, wav(600), boundary="real")


def test_a_form_whose_boundary_is_not_its_content_types_is_refused():
    body = _smuggled()
    with pytest.raises(MeterRequestError, match="not the one its Content-Type names"):
        inspect_request(
            "openai", "POST", TRANSCRIBE, {}, body, CONFIG,
            content_type="multipart/form-data; boundary=real",
        )  # fmt: skip
    # A header naming two boundaries (or two headers joined): a host may take either.
    for content_type in (
        "multipart/form-data; boundary=fake; boundary=real",
        "multipart/form-data; boundary=fake, multipart/form-data; boundary=real",
    ):
        with pytest.raises(MeterRequestError, match="more than one boundary"):
            inspect_request(
                "openai", "POST", TRANSCRIBE, {}, body, CONFIG, content_type=content_type
            )
    # The boundary the header names, quoted or not, with other parameters: read as before.
    body = form({"model": "whisper-1"}, wav(600), boundary="real")
    for content_type in (
        "multipart/form-data; boundary=real",
        'Multipart/Form-Data; charset=utf-8; BOUNDARY="real"',
    ):
        r = inspect_request(
            "openai", "POST", TRANSCRIBE, {}, body, CONFIG, content_type=content_type
        )
        assert dict(r.expected_extras) == {"audio_seconds": 600}


def test_known_speaker_references_are_reserved_and_charged_as_audio_too():
    """gpt-4o-transcribe-diarize takes up to 4 reference clips (2 to 10 s each) as data URLs
    in `known_speaker_references[]`: audio the model hears besides the file. A 1-second file
    with two 10-second clips is 21 seconds of audio, not 1 (and a text answer, charged its
    input estimate, would stay short)."""
    clip = "data:audio/wav;base64," + base64.b64encode(wav(10)).decode()
    parts = [
        ("model", b"gpt-4o-transcribe-diarize"),
        ("response_format", b"text"),
        ("chunking_strategy", b"auto"),
        ("known_speaker_names[]", b"agent"),
        ("known_speaker_names[]", b"customer"),
        ("known_speaker_references[]", clip.encode()),
        ("known_speaker_references[]", clip.encode()),
    ]
    body = b"".join(_part(n, v) for n, v in parts)
    body += _part("file", wav(1), "a.wav") + b"--b0und4ry--\r\n"
    r = inspect_request("openai", "POST", TRANSCRIBE, {}, body, CONFIG)
    assert r.input_audio_tokens == 21 * AUDIO_TOKENS_PER_SECOND
    assert r.max_output_tokens == 21 * TRANSCRIPT_TOKENS_PER_SECOND + 1
    m = measure_body(r, 200, b"A: hello\n", CONFIG)
    assert m.source == "counted" and m.usage.input_audio_tokens == 21 * AUDIO_TOKENS_PER_SECOND
    # A clip that is not a readable data URL adds nothing; the call is still read.
    body = body.replace(b"data:audio/wav;base64,", b"data:audio/wav;base64,!!", 1)
    body = body.replace(b"data:audio/wav;base64,U", b"https://example.com/x.wav#", 1)
    r = inspect_request("openai", "POST", TRANSCRIBE, {}, body, CONFIG)
    assert AUDIO_TOKENS_PER_SECOND <= r.input_audio_tokens <= 21 * AUDIO_TOKENS_PER_SECOND


def test_a_form_of_countless_parts_is_refused_before_they_are_read():
    """Each part is read in Python (its headers, its name): 300,000 tiny parts in 17 MB were
    seconds under the GIL. A transcription or an image edit has a few dozen at most."""
    parts = b"".join(_part(f"f{i}", b"v") for i in range(MAX_PARTS))
    body = _part("model", b"whisper-1") + parts + _part("file", wav(1), "a.wav")
    with pytest.raises(MeterRequestError, match=f"more than {MAX_PARTS} parts"):
        inspect_request("openai", "POST", TRANSCRIBE, {}, body + b"--b0und4ry--\r\n", CONFIG)
    # As many as allowed are read.
    body = _part("model", b"whisper-1")
    body += b"".join(_part(f"f{i}", b"v") for i in range(MAX_PARTS - 2))
    body += _part("file", wav(1), "a.wav") + b"--b0und4ry--\r\n"
    r = inspect_request("openai", "POST", TRANSCRIBE, {}, body, CONFIG)
    assert dict(r.expected_extras) == {"audio_seconds": 1}
