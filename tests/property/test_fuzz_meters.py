"""Fuzzing the meters: whatever an upstream sends back — garbage bytes, hostile JSON, usage with
wrong types, corrupt compression, any chunking — metering never raises, never reports negative
usage or cost, and (unless it must strip the usage chunk it asked for) passes the bytes on
exactly as they came. And whatever an agent sends, estimating a request raises nothing but
MeterRequestError (which the proxy answers as a 400).
"""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from dataclasses import fields
from decimal import Decimal
from typing import Any

import brotli
from drawdown.meter import (
    LLMRequest,
    Measurement,
    MeterConfig,
    MeterRequestError,
    PricePerMillion,
    inspect_request,
    measure_body,
    open_stream_meter,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

CONFIG = MeterConfig()
# Example counts keep this file near 30 s on a busy 2-core machine (see docs/guarantees.md).
EXAMPLES = {"stream": 800, "events": 500, "body": 600, "requests": 600}


def fuzz(examples: int) -> Any:
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


HI = [{"role": "user", "content": "hi"}]
# One request per metered endpoint of every provider, streamed and not.
SOURCES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "openai-chat": ("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": HI}),
    "openai-chat-stream": (
        "openai",
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": HI, "stream": True},
    ),
    "openai-chat-stream-usage": (
        "openai",
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": HI,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    "openai-azure": (
        "openai",
        "/openai/deployments/prod/chat/completions",
        {"messages": HI, "stream": True},
    ),
    "openai-responses": ("openai", "/v1/responses", {"model": "gpt-5", "input": "hi"}),
    "openai-responses-stream": (
        "openai",
        "/v1/responses",
        {"model": "gpt-5", "input": "hi", "stream": True},
    ),
    "openai-completions": (
        "openai",
        "/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": True},
    ),
    "openai-embeddings": (
        "openai",
        "/v1/embeddings",
        {"model": "text-embedding-3-small", "input": "hi"},
    ),
    "openai-unknown-model": (
        "openai",
        "/v1/chat/completions",
        {"model": "no-such-model", "messages": HI, "stream": True},
    ),
    "anthropic": (
        "anthropic",
        "/v1/messages",
        {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": HI},
    ),
    "anthropic-stream": (
        "anthropic",
        "/v1/messages",
        {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": HI, "stream": True},
    ),
    "anthropic-count": (
        "anthropic",
        "/v1/messages/count_tokens",
        {"model": "claude-haiku-4-5", "messages": HI},
    ),
    "gemini": (
        "gemini",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"contents": [{"parts": [{"text": "hi"}]}]},
    ),
    "gemini-stream": (
        "gemini",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        {"contents": [{"parts": [{"text": "hi"}]}]},
    ),
    "gemini-embed": (
        "gemini",
        "/v1beta/models/gemini-embedding-001:embedContent",
        {"content": {"parts": [{"text": "hi"}]}},
    ),
}


def _inspect(name: str) -> LLMRequest:
    provider, path, body = SOURCES[name]
    return inspect_request(provider, "POST", path, {}, json.dumps(body).encode(), CONFIG)


REQUESTS = {name: _inspect(name) for name in SOURCES}
OVERRIDE = PricePerMillion(input=Decimal("0.2"), output=Decimal("0.6"))

# Keys every provider's usage parser looks at, so random JSON hits their branches.
USAGE_KEYS = [
    "usage",
    "usageMetadata",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cache_creation",
    "prompt_tokens_details",
    "completion_tokens_details",
    "cached_tokens",
    "reasoning_tokens",
    "cache_write_tokens",
    "audio_tokens",
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    "toolUsePromptTokenCount",
    "totalTokenCount",
    "promptTokensDetails",
    "type",
    "message",
    "delta",
    "response",
    "model",
    "modelVersion",
    "choices",
    "content",
    "text",
    "output",
    "candidates",
    "parts",
    "iterations",
    "server_tool_use",
    "web_search_requests",
    "input_tokens_details",
    "output_tokens_details",
    "service_tier",
    "index",
    "finish_reason",
]
TYPES = [
    "message_start",
    "message_delta",
    "message_stop",
    "content_block_delta",
    "response.completed",
    "response.incomplete",
    "response.failed",
    "response.output_text.delta",
    "response.created",
    "web_search_call",
    "message",
    "error",
    "ping",
]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.sampled_from([-1, 0, 1, 2**31, 2**63, 10**20]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [*TYPES, "", "gpt-4o-mini", "claude-haiku-4-5", "gemini-2.5-flash", "NaN", "-5"]
    ),
    st.text(max_size=10),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(USAGE_KEYS), st.text(max_size=6)), inner, max_size=6
        ),
    ),
    max_leaves=25,
)
event_names = st.one_of(st.none(), st.sampled_from(TYPES), st.text(max_size=8))
n = json_scalars  # a usage count: often a number, sometimes negative, huge or not a number at all
# Each provider's usage-bearing events, with every count drawn from `n`.
usage_events = st.one_of(
    st.builds(
        lambda a, b, c, d: {
            "choices": [],
            "usage": {
                "prompt_tokens": a,
                "completion_tokens": b,
                "prompt_tokens_details": {"cached_tokens": c, "cache_write_tokens": d},
                "completion_tokens_details": {"reasoning_tokens": d},
            },
        },
        n,
        n,
        n,
        n,
    ),
    st.builds(
        lambda t, a, b, c, d: {
            "type": t,
            "response": {
                "usage": {
                    "input_tokens": a,
                    "output_tokens": b,
                    "input_tokens_details": {"cached_tokens": c},
                    "output_tokens_details": {"reasoning_tokens": d},
                },
                "output": [{"type": "web_search_call"}, {"type": d}],
            },
        },
        st.sampled_from(["response.completed", "response.incomplete", "response.failed"]),
        n,
        n,
        n,
        n,
    ),
    st.builds(
        lambda m, a, b, c, d: {
            "type": "message_start",
            "message": {
                "model": m,
                "usage": {
                    "input_tokens": a,
                    "output_tokens": b,
                    "cache_read_input_tokens": c,
                    "cache_creation_input_tokens": d,
                    "cache_creation": {"ephemeral_1h_input_tokens": d},
                },
            },
        },
        json_scalars,
        n,
        n,
        n,
        n,
    ),
    st.builds(
        lambda a, b, c: {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {
                "output_tokens": b,
                "input_tokens": a,
                "server_tool_use": {"web_search_requests": c},
                "iterations": [{"model": "x", "input_tokens": c, "output_tokens": a}],
            },
        },
        n,
        n,
        n,
    ),
    st.builds(
        lambda a, b, c, d: {
            "candidates": [{"content": {"parts": [{"text": "hi"}]}}],
            "usageMetadata": {
                "promptTokenCount": a,
                "candidatesTokenCount": b,
                "thoughtsTokenCount": c,
                "cachedContentTokenCount": d,
                "toolUsePromptTokenCount": d,
            },
        },
        n,
        n,
        n,
        n,
    ),
)


def sse_event(name: str | None, data: Any, sep: bytes) -> bytes:
    head = f"event: {name}\n".encode() if name is not None else b""
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    return head + b"data: " + payload + sep


sse_bodies = st.lists(
    st.builds(
        sse_event,
        event_names,
        st.one_of(
            json_values,
            usage_events,
            st.sampled_from([b"[DONE]", b"{", b"", b"null", b"\xff\xfe"]),
            st.binary(max_size=20),
        ),
        st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n", b"\r\r"]),
    ),
    max_size=8,
).map(b"".join)
bodies = st.one_of(
    st.binary(max_size=400),
    sse_bodies,
    json_values.map(lambda v: json.dumps(v).encode()),
    usage_events.map(lambda v: json.dumps(v).encode()),
)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data)


ENCODERS = {
    None: lambda b: b,
    "identity": lambda b: b,
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": zlib.compress,
    "raw-deflate": lambda b: zlib.compress(b)[2:-4],
    "br": brotli.compress,
    "zstd": lambda b: zstd.compress(b),
    "gzip, br": lambda b: brotli.compress(gzip.compress(b)),
    "x-unknown": lambda b: b,
    "": lambda b: b,
}


def encode(
    data: bytes, encoding: str | None, damage: str, position: int
) -> tuple[bytes, str | None]:
    header = "deflate" if encoding == "raw-deflate" else encoding
    wire = ENCODERS[encoding](data)
    if damage == "flip" and wire:
        i = position % len(wire)
        wire = wire[:i] + bytes([wire[i] ^ 0x5A]) + wire[i + 1 :]
    elif damage == "truncate" and wire:
        wire = wire[: position % len(wire)]
    elif damage == "garbage":
        wire = b"\x1f\x8b\x08\x00garbage, not a gzip member" + wire
    return wire, header


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def assert_sane(measurement: Measurement) -> None:
    usage = measurement.usage
    for f in fields(usage):
        value = getattr(usage, f.name)
        assert isinstance(value, int) and value >= 0, f"usage {f.name} = {value!r}"
    assert isinstance(measurement.usd_nanos, int) and measurement.usd_nanos >= 0
    assert measurement.source in ("usage", "counted", "estimate")
    for name, n in measurement.extras.items():
        assert isinstance(n, int) and n >= 0, f"extra {name} = {n!r}"


content_types = st.sampled_from(
    [
        "text/event-stream",
        "text/event-stream; charset=utf-8",
        "application/json",
        "text/plain",
        "",
        "TEXT/EVENT-STREAM",
        "application/x-ndjson",
    ]
)


@fuzz(EXAMPLES["stream"])
@given(
    which=st.sampled_from(sorted(REQUESTS)),
    body=bodies,
    encoding=st.sampled_from(list(ENCODERS)),
    damage=st.sampled_from(["none", "none", "flip", "truncate", "garbage"]),
    position=st.integers(0, 10_000),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    content_type=content_types,
    status=st.sampled_from([200, 200, 201, 400, 429, 500]),
    override=st.booleans(),
    cut_short=st.booleans(),
)
def test_stream_meter_survives_anything(
    which: str, body: bytes, encoding: str | None, damage: str, position: int, cuts: list[int],
    content_type: str, status: int, override: bool, cut_short: bool,
) -> None:  # fmt: skip
    request = REQUESTS[which]
    wire, header = encode(body, encoding, damage, position)
    meter = open_stream_meter(
        request, content_type, header, CONFIG, OVERRIDE if override else None, status=status
    )
    forwarded = []
    for piece in split(wire, cuts):
        out = meter.feed(piece)
        assert isinstance(out, bytes)
        forwarded.append(out)
        if not meter.rewrites:
            assert out == piece, "a stream the meter need not rewrite is passed on untouched"
        assert_sane(meter.partial())
    if cut_short:
        assert_sane(meter.partial())
    tail, measurement = meter.finish()
    assert isinstance(tail, bytes)
    if not meter.rewrites:
        assert b"".join(forwarded) + tail == wire or tail == b""
    assert_sane(measurement)
    assert meter.finish()[1] == measurement  # idempotent
    assert meter.feed(b"late") == b"late" or meter.rewrites


@fuzz(EXAMPLES["events"])
@given(
    which=st.sampled_from(sorted(n for n, r in REQUESTS.items() if r.stream)),
    events=st.lists(
        st.tuples(event_names, st.one_of(usage_events, usage_events, json_values)), max_size=10
    ),
    sep=st.sampled_from([b"\n\n", b"\r\n\r\n"]),
    chunk=st.integers(1, 64),
)
def test_usage_with_wrong_types_is_never_negative(
    which: str, events: list[tuple[str | None, Any]], sep: bytes, chunk: int
) -> None:
    """Well-formed SSE carrying hostile JSON (negative, huge, stringly typed usage fields)."""
    request = REQUESTS[which]
    body = b"".join(sse_event(name, data, sep) for name, data in events) + b"data: [DONE]" + sep
    meter = open_stream_meter(request, "text/event-stream", None, CONFIG)
    for i in range(0, len(body), chunk):
        meter.feed(body[i : i + chunk])
    _, measurement = meter.finish()
    assert_sane(measurement)


@fuzz(EXAMPLES["body"])
@given(
    which=st.sampled_from(sorted(REQUESTS)),
    body=st.one_of(json_values, usage_events).map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
    | sse_bodies,
    status=st.sampled_from([200, 204, 400, 401, 404, 429, 500, 529]),
    override=st.booleans(),
)
def test_measure_body_survives_any_response(
    which: str, body: bytes, status: int, override: bool
) -> None:
    measurement = measure_body(
        REQUESTS[which], status, body, CONFIG, OVERRIDE if override else None
    )
    assert_sane(measurement)
    if not 200 <= status < 300 and measurement.source != "usage":
        assert measurement.usd_nanos == 0  # a refused call without usage costs nothing


request_bodies = st.one_of(
    st.binary(max_size=100),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "model": json_scalars,
            "messages": st.one_of(
                json_values,
                st.lists(
                    st.dictionaries(
                        st.sampled_from(["role", "content", "name", "tool_calls"]),
                        json_values,
                        max_size=3,
                    ),
                    max_size=3,
                ),
            ),
            "max_tokens": json_scalars,
            "max_completion_tokens": json_scalars,
            "max_output_tokens": json_scalars,
            "stream": json_scalars,
            "stream_options": json_values,
            "n": json_scalars,
            "input": json_values,
            "prompt": json_values,
            "tools": json_values,
            "system": json_values,
            "contents": json_values,
            "generationConfig": json_values,
        },
    ).map(lambda d: json.dumps(d).encode()),
)


@fuzz(EXAMPLES["requests"])
@given(which=st.sampled_from(sorted(SOURCES)), body=request_bodies)
def test_estimating_any_request_raises_only_meter_request_error(which: str, body: bytes) -> None:
    provider, path, _ = SOURCES[which]
    try:
        request = inspect_request(provider, "POST", path, {}, body, CONFIG)
    except MeterRequestError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert request.input_tokens >= 0 and request.max_output_tokens >= 0
    assert request.estimate_usd_nanos >= 0


# --- a Gemini batch input file, read chunk by chunk -------------------------------------------

_GEMINI_LINES = st.lists(
    st.one_of(
        st.builds(
            lambda text, cap: json.dumps(
                {
                    "key": "k",
                    "request": {
                        "contents": [{"parts": [{"text": text}]}],
                        **({"generationConfig": {"maxOutputTokens": cap}} if cap else {}),
                    },
                }
            ),
            st.text(max_size=60),
            st.one_of(st.none(), st.integers(1, 5000)),
        ),
        st.just('{"key": "no request"}'),
        st.text(max_size=20).filter(lambda t: "\n" not in t and "\r" not in t),  # not JSON
    ),
    min_size=1,
    max_size=12,
)


@fuzz(EXAMPLES["body"])
@given(
    lines=_GEMINI_LINES,
    cuts=st.lists(st.integers(0, 2000), max_size=8),
    resend=st.one_of(st.none(), st.integers(0, 8)),
    trailing_newline=st.booleans(),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_a_gemini_batch_file_reads_the_same_however_it_is_chunked(
    lines: list[str], cuts: list[int], resend: int | None, trailing_newline: bool, newline: str
) -> None:
    """Cut anywhere (through a line, a UTF-8 character, a CRLF), a chunk sent twice: the file's
    counted requests are those of the file read whole, and reading never raises."""
    from drawdown.meter import BatchFileUploads, batch_file_chunk

    data = (newline.join(lines) + (newline if trailing_newline else "")).encode()
    upload = inspect_request("gemini", "POST", "/upload/v1beta/files", {}, b"", CONFIG)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [(a, data[a:b]) for a, b in itertools.pairwise(bounds)] or [(0, b"")]

    def read(parts: list[tuple[int, bytes]], again: int | None) -> Any:
        uploads, found = BatchFileUploads(), None
        for n, (offset, chunk) in enumerate(parts):
            status = "final" if n == len(parts) - 1 else "active"
            # A chunk is sent again when its answer was lost (the last one's, answered
            # `final`, ends the upload: the SDK sends nothing more).
            for _ in range(2 if n == again and status == "active" else 1):
                found = batch_file_chunk(
                    uploads, upload, "https://g", {"upload_id": "u"}, str(offset), chunk, status
                )
        return found

    whole = read([(0, data)], None)
    assert read(chunks, resend) == whole
    if whole is not None:
        assert whole.complete and whole.requests == sum(
            1 for line in lines if line.startswith('{"key": "k", "request"')
        )
