"""Byte-level checks of the stand-in's wire formats and its TLS certificate."""

from __future__ import annotations

import json
import socket
import ssl

import httpx2
import pytest

from tests.support.standin import StandIn
from tests.support.tls import TlsMaterial
from tests.support.wire import DEFAULT_REPLY_TEXT, split_sse_events

REPLY_WORDS = len(DEFAULT_REPLY_TEXT.split())


@pytest.fixture
def http(standin: StandIn):
    with httpx2.Client(base_url=standin.url, verify=standin.ssl_context(), trust_env=False) as c:
        yield c


def _data_events(body: bytes, sep: bytes = b"\n\n") -> list[str]:
    return [
        e.decode().removeprefix("data: ").strip()
        for e in body.split(sep)
        if e.strip().startswith(b"data: ")
    ]


def test_chat_stream_has_no_usage_key_without_include_usage(http: httpx2.Client) -> None:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    raw = http.post("/v1/chat/completions", json=body).content
    events = _data_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)
    assert all("obfuscation" in c for c in chunks)
    assert raw.endswith(b"data: [DONE]\n\n")


def test_chat_stream_with_include_usage_has_null_usage_then_usage_chunk(
    http: httpx2.Client,
) -> None:
    body = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi there"}],
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    chunks = [json.loads(e) for e in _data_events(r.content)[:-1]]
    *before, last = chunks
    assert all(c["usage"] is None and c["choices"] for c in before)
    assert before[-1]["choices"][0]["finish_reason"] == "stop"
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 2
    assert last["usage"]["completion_tokens"] == REPLY_WORDS
    assert b'"usage":null' in r.content  # compact JSON, like the real API


def test_openai_json_is_pretty_printed(http: httpx2.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert r.content.startswith(b'{\n  "id": "chatcmpl-')
    assert r.json()["usage"]["prompt_tokens"] == 1  # never less than 1


def test_anthropic_stream_event_sequence_and_padding(http: httpx2.Client) -> None:
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    raw = http.post("/v1/messages", json=body).content
    events = split_sse_events(raw)
    names = [e.split(b"\n")[0].decode().removeprefix("event: ") for e in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert names.count("content_block_delta") == REPLY_WORDS
    assert b'data: {"type": "ping"}\n\n' in raw
    assert b'data: {"type":"message_stop"    }\n\n' in raw
    start = json.loads(events[0].split(b"data: ", 1)[1])
    delta = json.loads(events[-2].split(b"data: ", 1)[1])
    assert start["message"]["usage"]["input_tokens"] == 1
    assert start["message"]["usage"]["output_tokens"] == 1
    assert delta["usage"] == {
        "input_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": REPLY_WORDS,
    }


def test_gemini_sse_framing(http: httpx2.Client) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "one two three"}]}]}
    r = http.post("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", json=body)
    assert r.headers["content-type"] == "text/event-stream"
    raw = r.content
    assert raw.endswith(b"\r\n\r\n") and b"[DONE]" not in raw
    assert b"\n\n" not in raw.replace(b"\r\n\r\n", b"")
    chunks = [json.loads(e) for e in _data_events(raw, b"\r\n\r\n")]
    assert [c["usageMetadata"]["candidatesTokenCount"] for c in chunks] == list(
        range(1, REPLY_WORDS + 1)
    )
    assert all(c["usageMetadata"]["promptTokenCount"] == 3 for c in chunks)
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert b'{"candidates": [{"content": {"parts": [{"text": "This"}],"role": "model"}' in raw


def test_gemini_stream_without_alt_sse_is_a_json_array(http: httpx2.Client) -> None:
    body = {"contents": [{"parts": [{"text": "one two"}]}]}
    r = http.post("/v1beta/models/gemini-2.5-pro:streamGenerateContent", json=body)
    chunks = r.json()
    assert isinstance(chunks, list) and len(chunks) == REPLY_WORDS
    assert chunks[-1]["usageMetadata"]["totalTokenCount"] == 2 + REPLY_WORDS


def test_vertex_path_and_max_output_tokens(http: httpx2.Client) -> None:
    body = {
        "contents": [{"parts": [{"text": "one"}]}],
        "generationConfig": {"maxOutputTokens": 2},
    }
    r = http.post(
        "/v1beta1/projects/p/locations/global/publishers/google/models/gemini-2.0-flash:generateContent",
        json=body,
    )
    data = r.json()
    assert data["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert data["usageMetadata"]["candidatesTokenCount"] == 2
    assert data["modelVersion"] == "gemini-2.0-flash"


def test_generic_tool_api_echoes(http: httpx2.Client, standin: StandIn) -> None:
    r = http.post("/v1/refunds?idempotent=1", json={"amount": 4200, "customer_id": "c1"})
    assert r.status_code == 200
    assert r.json() == {
        "ok": True,
        "method": "POST",
        "path": "/v1/refunds",
        "query": {"idempotent": "1"},
        "json": {"amount": 4200, "customer_id": "c1"},
    }
    assert http.get("/api/customers/42").json()["path"] == "/api/customers/42"
    assert standin.count("/api/customers/*", method="GET") == 1
    assert standin.count("/v1/refunds") == 1
    assert standin.matching("/v1/refunds")[0].reply_kind == "generic"


def test_plain_http_listener(standin: StandIn) -> None:
    with httpx2.Client(trust_env=False) as c:
        r = c.get(standin.http_url + "/repos/acme/app")
    assert r.json()["path"] == "/repos/acme/app"
    assert standin.last().scheme == "http"


def test_invalid_json_gets_provider_error(http: httpx2.Client) -> None:
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "x"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "name",
    ["api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com", "crm.example.com"],
)
def test_certificate_covers_provider_names(
    tls_material: TlsMaterial, standin: StandIn, name: str
) -> None:
    ctx = ssl.create_default_context(cafile=str(tls_material.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", standin.port)) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        assert tls.version() is not None


def test_certificate_rejects_other_names(tls_material: TlsMaterial, standin: StandIn) -> None:
    ctx = ssl.create_default_context(cafile=str(tls_material.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", standin.port)) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="evil.invalid")


def test_system_trust_does_not_accept_the_stand_in(standin: StandIn) -> None:
    with (
        httpx2.Client(verify=ssl.create_default_context(), trust_env=False) as c,
        pytest.raises(httpx2.ConnectError),
    ):
        c.get(standin.url + "/v1/models")
