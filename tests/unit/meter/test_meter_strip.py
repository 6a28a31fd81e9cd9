"""OpenAI chat (and legacy completions) streams: we ask for include_usage on the client's behalf, then remove the
usage-only chunk so the client sees exactly the stream it asked for."""

from __future__ import annotations

import gzip
import json
import random

import pytest
from drawdown.meter import inspect_request, open_stream_meter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meter_corpus import (
    CONFIG,
    CORPUS,
    MANIFEST,
    cut,
    entry_id,
    expected,
    feed,
    request_for,
    response_bytes,
)

# Streams recorded with include_usage: the chunk we would have to strip is in them.
WITH_USAGE = [e for e in MANIFEST if e["streamed"] and e.get("include_usage")]


def _client_request(entry):
    """The recorded request as a client that did not ask for usage would have sent it."""
    body = json.loads((CORPUS / entry["request_file"]).read_bytes())
    body.pop("stream_options", None)
    return request_for(entry, json.dumps(body).encode())


def _without_usage_event(body: bytes) -> bytes:
    """The recorded stream minus exactly the one usage-only event (independent of sse.py)."""
    events = body.split(b"\n\n")
    usage = [
        i
        for i, ev in enumerate(events)
        if ev.startswith(b"data: {")
        and json.loads(ev[6:])["choices"] == []
        and json.loads(ev[6:]).get("usage")
    ]
    assert len(usage) == 1
    del events[usage[0]]
    return b"\n\n".join(events)


def _sdk_chunks(data: bytes) -> list[dict]:
    """Parse with the official openai SDK's SSE decoder, as a client would."""
    from openai._streaming import SSEDecoder

    chunks = []
    for sse in SSEDecoder().iter_bytes(iter([data])):
        if sse.data.startswith("[DONE]"):
            break
        chunks.append(json.loads(sse.data))
    return chunks


def test_corpus_has_usage_streams():
    assert len(WITH_USAGE) >= 4


@pytest.mark.parametrize("entry", WITH_USAGE, ids=entry_id)
def test_injection(entry):
    request = _client_request(entry)
    assert request.strip_usage_chunk and request.stream
    sent = json.loads(request.rewritten_body)
    assert sent["stream_options"] == {"include_usage": True}
    original = json.loads((CORPUS / entry["request_file"]).read_bytes())
    original.pop("stream_options", None)
    sent.pop("stream_options")
    assert sent == original  # nothing else changed


@pytest.mark.parametrize("entry", WITH_USAGE, ids=entry_id)
def test_strip_every_split(entry):
    request = _client_request(entry)
    body = response_bytes(entry)
    want = _without_usage_event(body)
    usage, _ = expected(entry)
    for point in range(0, len(body) + 1, 1 if len(body) < 2000 else 7):
        out, measurement = feed(request, entry, cut(body, [point]))
        assert out == want, point
        assert measurement.usage == usage and measurement.source == "usage"


@pytest.mark.parametrize("entry", WITH_USAGE, ids=entry_id)
def test_strip_byte_by_byte_and_sdk_accepts(entry):
    request = _client_request(entry)
    body = response_bytes(entry)
    out, measurement = feed(request, entry, [body[i : i + 1] for i in range(len(body))])
    assert out == _without_usage_event(body)
    chunks = _sdk_chunks(out)
    assert chunks and all(chunk["choices"] for chunk in chunks)  # chunk.choices[0] is safe
    assert len(chunks) == len(_sdk_chunks(body)) - 1
    assert measurement.usage == expected(entry)[0]


@pytest.mark.parametrize("entry", WITH_USAGE, ids=entry_id)
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_strip_random_chunkings(entry, data):
    request = _client_request(entry)
    body = response_bytes(entry)
    points = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=80))
    out, _ = feed(request, entry, cut(body, points))
    assert out == _without_usage_event(body)


@pytest.mark.parametrize("entry", WITH_USAGE, ids=entry_id)
def test_strip_gzip_forwards_decoded(entry):
    request = _client_request(entry)
    body = response_bytes(entry)
    packed = gzip.compress(body)
    meter = open_stream_meter(request, "text/event-stream; charset=utf-8", "gzip", CONFIG)
    assert meter.rewrites  # the proxy must drop Content-Encoding and Content-Length
    rng = random.Random(entry["file"])
    out = b"".join(
        meter.feed(c) for c in cut(packed, [rng.randrange(len(packed)) for _ in range(30)])
    )
    rest, measurement = meter.finish()
    assert out + rest == _without_usage_event(body)
    assert measurement.usage == expected(entry)[0]


def test_events_are_forwarded_as_soon_as_complete():
    entry = WITH_USAGE[0]
    request = _client_request(entry)
    body = response_bytes(entry)
    first_end = body.index(b"\n\n") + 2
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
    assert meter.feed(body[: first_end - 1]) == b""  # incomplete event held back...
    assert meter.feed(body[first_end - 1 : first_end]) == body[:first_end]  # ...until complete


def test_usage_chunk_kept_when_client_asked_for_it():
    entry = WITH_USAGE[0]
    request = request_for(entry)  # the recorded request has include_usage: true
    assert not request.strip_usage_chunk and request.rewritten_body is None
    body = response_bytes(entry)
    out, _ = feed(request, entry, [body])
    assert out == body


def test_explicit_include_usage_false_is_rewritten():
    body = (
        b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":false},'
        b'"messages":[{"role":"user","content":"hi"}]}'
    )
    request = inspect_request("openai", "POST", "/v1/chat/completions", {}, body, CONFIG)
    assert request.strip_usage_chunk
    assert json.loads(request.rewritten_body)["stream_options"] == {"include_usage": True}


def test_splice_keeps_the_clients_bytes():
    body = b'  {"model": "gpt-4o-mini", "temperature": 1e-05, "stream": true, "messages": []}'
    request = inspect_request("openai", "POST", "/v1/chat/completions", {}, body, CONFIG)
    assert request.rewritten_body == (
        b'  {"stream_options":{"include_usage":true},"model": "gpt-4o-mini", "temperature": 1e-05,'
        b' "stream": true, "messages": []}'
    )


def test_azure_prompt_filter_chunk_is_not_stripped():
    # Azure opens streams with a choices: [] chunk carrying prompt_filter_results, usage null.
    stream = (
        b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[]}\n\n'
        b'data: {"choices":[{"delta":{"content":"Hi"},"index":0}],"model":"gpt-4o-mini","usage":null}\n\n'
        b'data: {"choices":[],"model":"gpt-4o-mini","usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    body = b'{"messages":[{"role":"user","content":"hi"}],"stream":true}'
    request = inspect_request(
        "openai", "POST", "/openai/deployments/gpt-4o-mini/chat/completions", {}, body, CONFIG
    )
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
    out = meter.feed(stream)
    rest, measurement = meter.finish()
    events = (out + rest).split(b"\n\n")
    assert len(events) == 4  # 3 events + trailing empty: only the usage chunk went
    assert b"prompt_filter_results" in events[0]
    assert measurement.usage.input_tokens == 5


def test_injection_can_be_turned_off_for_hosts_that_reject_stream_options():
    body = b'{"model":"llama-3","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    request = inspect_request(
        "openai", "POST", "/v1/chat/completions", {}, body, CONFIG, inject_include_usage=False
    )
    assert request.stream and not request.strip_usage_chunk and request.rewritten_body is None
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
    chunk = b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\ndata: [DONE]\n\n'
    assert not meter.rewrites and meter.feed(chunk) is chunk
    assert meter.finish()[1].source == "counted"


# Legacy completions stream as the API sends one with include_usage (its SDK's
# CompletionCreateParams takes stream_options): "usage": null on every chunk until the
# extra choices: [] chunk.
LEGACY_STREAM = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"choices":[{"text":"Hello",'
    b'"index":0,"logprobs":null,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct",'
    b'"usage":null}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"choices":[{"text":" there",'
    b'"index":0,"logprobs":null,"finish_reason":"stop"}],"model":"gpt-3.5-turbo-instruct",'
    b'"usage":null}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"choices":[],'
    b'"model":"gpt-3.5-turbo-instruct","usage":{"prompt_tokens":7,"completion_tokens":2,'
    b'"total_tokens":9}}\n\n'
    b"data: [DONE]\n\n"
)


def test_a_legacy_completions_stream_is_asked_for_its_usage_and_shown_without_it():
    """Before, a legacy completions stream whose client did not ask for usage was charged
    its counted tokens: the prompt by tiktoken, the reply by its text."""
    body = b'{"model":"gpt-3.5-turbo-instruct","prompt":"Say hello","stream":true}'
    request = inspect_request("openai", "POST", "/v1/completions", {}, body, CONFIG)
    assert request.strip_usage_chunk
    assert json.loads(request.rewritten_body)["stream_options"] == {"include_usage": True}
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
    out = meter.feed(LEGACY_STREAM)
    rest, measurement = meter.finish()
    chunks = _sdk_chunks(out + rest)
    assert [c["choices"][0]["text"] for c in chunks] == ["Hello", " there"]
    assert (measurement.source, measurement.usage.input_tokens) == ("usage", 7)
    assert measurement.usage.output_tokens == 2


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_that_asked_for_usage_or_a_host_that_rejects_the_option_is_left_as_sent(path):
    prompt = '"prompt":"hi"' if path == "/v1/completions" else '"messages":[]'
    asked = f'{{"model":"m","stream":true,"stream_options":{{"include_usage":true}},{prompt}}}'
    request = inspect_request("openai", "POST", path, {}, asked.encode(), CONFIG)
    assert request.rewritten_body is None and not request.strip_usage_chunk
    unasked = f'{{"model":"m","stream":true,{prompt}}}'.encode()
    request = inspect_request(
        "openai", "POST", path, {}, unasked, CONFIG, inject_include_usage=False
    )
    assert request.rewritten_body is None and not request.strip_usage_chunk
