"""Scripted replies: status, encodings, trickles, gates, resets, recorded replays."""

from __future__ import annotations

import json
import threading

import httpx2
import pytest

from tests.support import clients
from tests.support.recorded import load_recorded, recorded_names
from tests.support.standin import Reply, StandIn


@pytest.fixture
def http(standin: StandIn):
    with httpx2.Client(base_url=standin.url, verify=standin.ssl_context(), trust_env=False) as c:
        yield c


def test_script_status_headers_json_and_times(standin: StandIn, http: httpx2.Client) -> None:
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(status=503, json={"error": {"message": "overloaded"}}, headers={"retry-after": "7"}),
        times=2,
    )
    first = http.post("/v1/chat/completions", json={"model": "m", "messages": []})
    second = http.post("/v1/chat/completions", json={"model": "m", "messages": []})
    third = http.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert first.headers["retry-after"] == "7"
    assert first.json() == {"error": {"message": "overloaded"}}
    kinds = [r.reply_kind for r in standin.requests]
    assert kinds == ["scripted", "scripted", "synthetic"]
    assert standin.pending_scripts() == []


def test_script_method_and_glob_matching(standin: StandIn, http: httpx2.Client) -> None:
    standin.script("GET", "/api/customers/*", Reply(status=404, json={"error": "nope"}), None)
    assert http.get("/api/customers/7").status_code == 404
    assert http.get("/api/customers/8").status_code == 404  # times=None: every match
    assert http.post("/api/customers/9", json={}).status_code == 200  # other method
    assert len(standin.pending_scripts()) == 1


def test_script_callable_sees_the_request(standin: StandIn, http: httpx2.Client) -> None:
    standin.script(
        "*",
        "/rpc",
        lambda req: Reply(json={"jsonrpc": "2.0", "id": req.json["id"], "result": {}}),
    )
    assert http.post("/rpc", json={"jsonrpc": "2.0", "id": 41, "method": "x"}).json()["id"] == 41


def test_scripted_usage_defaults_to_json_usage(standin: StandIn, http: httpx2.Client) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 5000, "total_tokens": 6000}
    standin.script("POST", "/v1/chat/completions", Reply(json={"choices": [], "usage": usage}))
    http.post("/v1/chat/completions", json={})
    assert standin.last().usage == usage == standin.last_usage


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "deflate"])
@pytest.mark.parametrize("chunks", [None, 7])
def test_content_encoding(
    standin: StandIn, http: httpx2.Client, encoding: str, chunks: int | None
) -> None:
    payload = {"text": "x" * 500, "n": list(range(50))}
    standin.script("GET", "/enc", Reply(json=payload, content_encoding=encoding, chunks=chunks))
    r = http.get("/enc")
    assert r.headers["content-encoding"] == encoding
    assert r.json() == payload
    assert ("content-length" in r.headers) is (chunks is None)
    assert standin.last().response_body == json.dumps(payload).encode()


def test_chunks_gate_holds_the_body_until_released(standin: StandIn, http: httpx2.Client) -> None:
    gate = threading.Event()
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(chunks=[b"data: one\n\n", gate, b"data: two\n\n"], content_type="text/event-stream"),
    )
    with http.stream("POST", "/v1/chat/completions", json={}) as r:
        lines = r.iter_lines()
        assert next(lines) == "data: one"  # arrived while the gate is still closed
        entry = standin.wait_for("/v1/chat/completions")
        assert not entry.done.is_set()
        gate.set()
        assert list(lines) == ["", "data: two", ""]
    assert entry.wait_done() == "complete"


def test_hold_headers(standin: StandIn, http: httpx2.Client) -> None:
    gate = threading.Event()
    standin.script("GET", "/slow", Reply(json={"ok": 1}, hold_headers=gate))
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(http.get("/slow").status_code))
    t.start()
    try:
        entry = standin.wait_for("/slow")
        assert entry.status is None and not entry.done.is_set()  # no status line yet
    finally:
        gate.set()
        t.join(10)
    assert result == [200]
    assert entry.wait_done() == "complete" and entry.status == 200


def test_trickle_with_delay_and_delay_before_headers(standin: StandIn, http: httpx2.Client) -> None:
    body = b"".join(f"data: {i}\n\n".encode() for i in range(5))
    standin.script(
        "GET",
        "/trickle",
        Reply(body=body, chunks="events", delay=0.01, delay_before_headers=0.01),
    )
    assert http.get("/trickle").content == body


def test_chunk_lengths(standin: StandIn) -> None:
    reply = Reply(body=b"abcdefghij", chunks=[3, 4])
    assert reply.pieces() == [b"abc", b"defg", b"hij"]
    assert Reply(body=b"a\n\nb\r\n\r\nc", chunks="events").pieces() == [
        b"a\n\n",
        b"b\r\n\r\n",
        b"c",
    ]
    assert Reply(json={"a": 1}, chunks=4).pieces() == [b'{"a"', b": 1}"]
    gate = threading.Event()
    assert Reply(body=b"ab", chunks=[b"a", gate, b"b"]).pieces() == [b"a", gate, b"b"]
    with pytest.raises(ValueError, match="do not add up"):
        Reply(body=b"abc", chunks=[b"a", b"b"]).pieces()


@pytest.mark.parametrize("chunks", [None, 5])
def test_reset_after_bytes(standin: StandIn, http: httpx2.Client, chunks: int | None) -> None:
    body = b"data: " + b"x" * 100 + b"\n\n"
    standin.script("POST", "/v1/messages", Reply(body=body, chunks=chunks, reset_after_bytes=20))
    received = bytearray()
    with (
        pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)),
        http.stream("POST", "/v1/messages", json={}) as r,
    ):
        for part in r.iter_raw():
            received += part
    assert bytes(received) == body[: len(received)]
    assert len(received) <= 20
    assert standin.last().wait_done() == "reset"


def test_reset_before_headers(standin: StandIn, http: httpx2.Client) -> None:
    standin.script("POST", "/v1/messages", Reply(reset_before_headers=True))
    with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.ConnectError)):
        http.post("/v1/messages", json={})
    assert standin.last().wait_done() == "reset"
    assert http.post("/v1/messages", json={"max_tokens": 5}).status_code == 200


def test_client_disconnect_is_recorded(standin: StandIn, http: httpx2.Client) -> None:
    gate = threading.Event()
    standin.script("GET", "/stream", Reply(chunks=[b"first\n", gate, b"second\n"]))
    with http.stream("GET", "/stream") as r:
        assert next(r.iter_raw()) == b"first\n"
    http.close()  # drop the pooled connection: the client is gone
    assert standin.last().wait_done() == "client_disconnected"
    gate.set()


def test_wait_for_reports_what_arrived(standin: StandIn, http: httpx2.Client) -> None:
    http.get("/api/a")
    with pytest.raises(AssertionError, match=r"GET /api/a"):
        standin.wait_for("/api/b", timeout=0.05)


# ---------------------------------------------------------------------------- recorded


@pytest.mark.parametrize("name", recorded_names())
def test_replay_recorded_is_byte_exact(standin: StandIn, http: httpx2.Client, name: str) -> None:
    rec = standin.replay_recorded(name)
    url = rec.path + (f"?{rec.query}" if rec.query else "")
    r = http.request(rec.method, url, content=rec.request_body)
    assert r.status_code == rec.status
    assert r.headers["content-type"] == rec.content_type
    assert r.content == rec.response_body
    entry = standin.last()
    assert entry.reply_kind == f"recorded:{rec.name}"
    assert entry.usage == rec.usage
    assert entry.body == rec.request_body


def test_replay_recorded_openai_stream_through_sdk(standin: StandIn) -> None:
    rec = standin.replay_recorded("openai-chat-completions-14", chunks=64)
    client = clients.openai_client(standin.url + "/v1", verify=standin.ssl_context())
    with client:
        chunks = list(client.chat.completions.create(**rec.request_json))
    assert chunks[-1].usage.model_dump(exclude_none=True) == rec.usage


def test_replay_recorded_anthropic_stream_through_sdk(standin: StandIn) -> None:
    rec = standin.replay_recorded("anthropic-messages-12")
    client = clients.anthropic_client(standin.url, verify=standin.ssl_context())
    body = rec.request_json
    body.pop("stream")
    with client, client.messages.stream(**body) as stream:
        final = stream.get_final_message()
    # The SDK takes message_delta's final input_tokens (server tools: 702 -> 1591).
    assert final.usage.input_tokens == rec.usage["message_delta"]["input_tokens"] == 1591


def test_replay_recorded_gemini_stream_through_sdk(standin: StandIn) -> None:
    rec = load_recorded("gemini-streamGenerateContent-01")
    # Scripted on any model path: the SDK builds the path from its own model argument.
    standin.replay_recorded(rec.name, path="/*/models/*:streamGenerateContent")
    client = clients.genai_client(standin.url, verify=standin.ssl_context())
    with client:
        chunks = list(
            client.models.generate_content_stream(
                model="gemini-2.0-flash-exp", contents="What is the capital of France?"
            )
        )
    last = chunks[-1].usage_metadata
    assert (last.prompt_token_count, last.candidates_token_count) == (13, 8)
    assert rec.usage["candidatesTokenCount"] == 8
