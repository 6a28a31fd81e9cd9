"""Every recorded exchange: the meter reproduces the usage the provider reported, exactly,
however the stream is cut or compressed."""

from __future__ import annotations

import gzip
import random
import zlib

import brotli
import pytest
from drawdown.meter import TokenUsage, measure_body
from drawdown.meter.decode import zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meter_corpus import (
    CONFIG,
    MANIFEST,
    cut,
    entries,
    entry_id,
    expected,
    feed,
    request_for,
    response_bytes,
)

SSE = [e for e in MANIFEST if e["streamed"]]
# Audio on a model genai-prices lists no audio price for (gpt-4o(-mini)-audio-preview): its
# audio tokens are charged at the fallback price, unpriced (test_meter_prices).
AUDIO_AT_FALLBACK = frozenset({"openai-chat-completions-07", "openai-chat-completions-08"})


def _check(entry, measurement) -> None:
    if entry["usage"] is None:
        if entry["status"] >= 400:
            # An error: nothing billed, nothing invented.
            assert measurement.usage == TokenUsage()
            assert measurement.usd_nanos == 0
            assert measurement.source == "usage"
        else:
            # A stream without usage (OpenAI chat without include_usage): text counted.
            assert measurement.source == "counted"
            assert measurement.usage.output_tokens > 0
            assert measurement.usd_nanos > 0
        return
    usage, other = expected(entry)
    assert measurement.source == "usage"
    assert measurement.usage == usage
    assert dict(measurement.other_models) == other
    assert measurement.priced == (entry_id(entry) not in AUDIO_AT_FALLBACK)
    assert measurement.usd_nanos > 0
    assert measurement.model == entry["response_model"]


@pytest.mark.parametrize("entry", entries(streamed=False))
def test_json_bodies(entry):
    request = request_for(entry)
    _check(entry, measure_body(request, entry["status"], response_bytes(entry), CONFIG))


@pytest.mark.parametrize("entry", entries(streamed=True))
def test_sse_whole_and_byte_by_byte(entry):
    request = request_for(entry)
    body = response_bytes(entry)
    whole_out, whole = feed(request, entry, [body])
    _check(entry, whole)
    bytes_out, by_byte = feed(request, entry, [body[i : i + 1] for i in range(len(body))])
    assert by_byte == whole
    assert whole_out == bytes_out == body  # nothing to strip in the recorded requests


@pytest.mark.parametrize("entry", entries(streamed=True))
def test_sse_split_in_two(entry):
    request = request_for(entry)
    body = response_bytes(entry)
    _, reference = feed(request, entry, [body])
    if len(body) <= 2600:
        points = range(1, len(body))
    else:  # a dense stride, plus every cut around the first line ends
        ends = [i for i, b in enumerate(body[:4096]) if b in b"\r\n"][:40]
        stride = max(97, len(body) // 300)
        points = sorted(
            {*range(1, len(body), stride), *(e + d for e in ends for d in (-1, 0, 1, 2))}
        )
    for point in points:
        out, measurement = feed(request, entry, cut(body, [point]))
        assert measurement == reference, point
        assert out == body


@pytest.mark.parametrize("entry", entries(streamed=True))
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_sse_random_chunkings(entry, data):
    request = request_for(entry)
    body = response_bytes(entry)
    points = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=60))
    out, measurement = feed(request, entry, cut(body, points))
    assert out == body
    _check(entry, measurement)


def _deflate_raw(body: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(body) + c.flush()


COMPRESSORS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,  # RFC 9110 deflate: zlib-wrapped
    "deflate-raw": _deflate_raw,  # what some servers send as "deflate"
    "br": brotli.compress,
    "zstd": zstd.compress,
}


@pytest.mark.parametrize("encoding", sorted(COMPRESSORS))
@pytest.mark.parametrize("entry", entries(streamed=True))
def test_sse_compressed(entry, encoding):
    request = request_for(entry)
    body = response_bytes(entry)
    packed = COMPRESSORS[encoding](body)
    header = "deflate" if encoding == "deflate-raw" else encoding
    rng = random.Random(f"{entry['file']}-{encoding}")
    chunkings = [
        [packed],
        [packed[i : i + 1] for i in range(len(packed))],
        cut(packed, [rng.randrange(1, len(packed)) for _ in range(20)]),
    ]
    for chunks in chunkings:
        out, measurement = feed(request, entry, chunks, encoding=header)
        _check(entry, measurement)
        if request.strip_usage_chunk:
            assert out == body  # rewriting: forwarded decoded (nothing to strip here)
        else:
            assert out == packed  # forwarded as received, still compressed


def test_multi_member_gzip_and_multi_frame_zstd():
    entry = next(e for e in SSE if e["file"].startswith("anthropic-messages-13"))
    request = request_for(entry)
    body = response_bytes(entry)
    half = len(body) // 2
    _, reference = feed(request, entry, [body])
    for encoding, pack in (("gzip", gzip.compress), ("zstd", zstd.compress)):
        packed = pack(body[:half]) + pack(body[half:])
        _, measurement = feed(
            request, entry, cut(packed, list(range(0, len(packed), 50))), encoding
        )
        assert measurement == reference


def test_chained_content_encodings():
    entry = next(e for e in SSE if e["file"].startswith("gemini-streamGenerateContent-04"))
    request = request_for(entry)
    body = response_bytes(entry)
    _, reference = feed(request, entry, [body])
    packed = brotli.compress(gzip.compress(body))  # "gzip, br": gzip first, then br
    _, measurement = feed(request, entry, cut(packed, list(range(0, len(packed), 33))), "gzip, br")
    assert measurement == reference


def test_sse_body_given_to_measure_body():
    """A streamed response the proxy buffered is metered from its SSE text."""
    for entry in SSE:
        request = request_for(entry)
        _check(entry, measure_body(request, 200, response_bytes(entry), CONFIG))


def test_gemini_stream_without_alt_sse_is_a_json_array():
    entry = next(e for e in SSE if e["file"].startswith("gemini-streamGenerateContent-02"))
    request = request_for(entry)
    chunks = [
        line[len(b"data: ") :]
        for line in response_bytes(entry).split(b"\r\n\r\n")
        if line.startswith(b"data: ")
    ]
    array = b"[" + b",\r\n".join(chunks) + b"]"
    meter_entry = {**entry, "content_type": "application/json"}
    out, measurement = feed(request, meter_entry, cut(array, list(range(0, len(array), 10))))
    assert out == array
    _check(entry, measurement)
    _check(entry, measure_body(request, 200, array, CONFIG))
