"""`RealtimeStandIn`: a local TLS WebSocket upstream speaking the OpenAI Realtime API.

Served by the `websockets` package (the openai SDK's own WebSocket library) on 127.0.0.1
from a background thread. A session is answered as api.openai.com answers one: first
`session.created` (naming the model the URL asked for), then, for every `response.create`
(and, as server voice activity detection does, every `input_audio_buffer.commit`),
`response.created`, a text delta and `response.done` carrying `usage` in the shape of the
SDK's RealtimeResponseUsage. The usage of each response is taken in turn from `usages`
(the last one repeats), so tests know the exact figures to price. Every client event is
logged, so tests can assert which ones drawdown forwarded and which it dropped.

    with RealtimeStandIn(tls_material) as upstream:
        upstream.usages = [realtime_usage(text_in=120, audio_out=300)]
        ... drawdown_proxy(policy, resolve={"tls": {"api.openai.com": upstream.host_port}})
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve

from .tls import TlsMaterial


def realtime_usage(
    *,
    text_in: int = 0,
    audio_in: int = 0,
    cached_text: int = 0,
    cached_audio: int = 0,
    text_out: int = 0,
    audio_out: int = 0,
) -> dict[str, Any]:
    """A RealtimeResponseUsage: cached tokens are a subset of the input tokens."""
    input_tokens = text_in + audio_in
    output_tokens = text_out + audio_out
    return {
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {
            "text_tokens": text_in,
            "audio_tokens": audio_in,
            "image_tokens": 0,
            "cached_tokens": cached_text + cached_audio,
            "cached_tokens_details": {
                "text_tokens": cached_text,
                "audio_tokens": cached_audio,
                "image_tokens": 0,
            },
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }


class RealtimeStandIn:
    def __init__(self, tls: TlsMaterial) -> None:
        self.tls = tls
        self.usages: list[dict[str, Any]] = [realtime_usage(text_in=100, text_out=20)]
        #: When set, each response.done waits for this event (a response under way).
        self.gate: threading.Event | None = None
        #: When set, every response.create is refused with an `error` of this code naming
        #: the create's event_id, as the API refuses one (e.g. a response already active).
        self.refuse_creates: str | None = None
        #: The usage of every transcription (a session with audio.input.transcription set).
        self.transcription_usage: dict[str, Any] = {
            "type": "tokens",
            "input_tokens": 500,
            "output_tokens": 40,
            "total_tokens": 540,
            "input_token_details": {"text_tokens": 20, "audio_tokens": 480},
        }
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._paths: list[str] = []
        self._ids = itertools.count(1)
        self._responses = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> RealtimeStandIn:
        started = threading.Event()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls.server_cert, self.tls.server_key)

        async def main() -> None:
            self._stop = asyncio.Event()
            async with serve(self._session, "127.0.0.1", 0, ssl=context) as server:
                self._port = next(iter(server.sockets)).getsockname()[1]
                started.set()
                await self._stop.wait()

        def run() -> None:
            with asyncio.Runner() as runner:
                self._loop = runner.get_loop()
                runner.run(main())

        self._thread = threading.Thread(target=run, name="realtime-standin", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the realtime stand-in did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(15)

    @property
    def host_port(self) -> str:
        assert self._port is not None
        return f"127.0.0.1:{self._port}"

    # ------------------------------------------------------------------ what it saw

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The client events received, in order (of one type, if given)."""
        with self._lock:
            return [e for e in self._events if kind is None or e.get("type") == kind]

    @property
    def paths(self) -> list[str]:
        """The request target of every session opened."""
        with self._lock:
            return list(self._paths)

    # ------------------------------------------------------------------ the protocol

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}"

    async def _session(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        with self._lock:
            self._paths.append(ws.request.path)
        model = parse_qs(urlsplit(ws.request.path).query).get("model", ["gpt-realtime"])[0]
        session = {"type": "realtime", "object": "realtime.session", "id": self._id("sess")}
        session["model"] = model
        await self._send(ws, "session.created", session=session)
        async for raw in ws:
            # Numbers read as Go, Node and Java read them: no digit limit (Python's is 4,300).
            event = json.loads(raw, parse_int=lambda text: int(text) if len(text) < 4000 else 0)
            with self._lock:
                self._events.append(event)
            if event.get("type") == "session.update":
                session = {**session, **event.get("session", {}), "model": model}
                await self._send(ws, "session.updated", session=session)
            elif event.get("type") == "response.create" and self.refuse_creates:
                error = {
                    "type": "invalid_request_error",
                    "code": self.refuse_creates,
                    "message": "Conversation already has an active response in progress.",
                    "param": None,
                    "event_id": event.get("event_id"),
                }
                await self._send(ws, "error", error=error)
            elif event.get("type") == "response.create":
                await self._respond(ws)
            elif event.get("type") == "input_audio_buffer.commit":
                # Server voice activity detection (the API's default turn detection): a
                # committed turn of audio is answered without a response.create; with
                # transcription on, the turn is transcribed first.
                item = self._id("item")
                await self._send(ws, "input_audio_buffer.committed", item_id=item)
                transcription = session.get("audio", {}).get("input", {}).get("transcription")
                if transcription:
                    await self._send(
                        ws,
                        "conversation.item.input_audio_transcription.completed",
                        item_id=item,
                        content_index=0,
                        transcript="Hello there.",
                        usage=self.transcription_usage,
                    )
                await self._respond(ws)

    async def _respond(self, ws: ServerConnection) -> None:
        with self._lock:
            usage = self.usages[min(self._responses, len(self.usages) - 1)]
            self._responses += 1
        response: dict[str, Any] = {
            "object": "realtime.response",
            "id": self._id("resp"),
            "status": "in_progress",
            "output": [],
            "usage": None,
        }
        await self._send(ws, "response.created", response=response)
        await self._send(
            ws,
            "response.output_text.delta",
            response_id=response["id"],
            item_id=self._id("item"),
            output_index=0,
            content_index=0,
            delta="Hello from the stand-in.",
        )
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 30)
        await self._send(
            ws, "response.done", response={**response, "status": "completed", "usage": usage}
        )

    async def _send(self, ws: ServerConnection, kind: str, **fields: Any) -> None:
        await ws.send(json.dumps({"type": kind, "event_id": self._id("event"), **fields}))
