"""`StandIn`: a local upstream that speaks the providers' real wire formats over TLS.

A Starlette app served by uvicorn on 127.0.0.1 (ephemeral ports, one TLS listener and
one plain-HTTP listener) from a background thread with its own event loop. Every
request is logged (thread-safe) before it is answered, so tests can assert what did or
did not reach the upstream. Replies are synthetic by default (see wire.py for the
deterministic usage rules), or scripted per test with `script()` / `replay_recorded()`.

Typical use (fixtures in tests/conftest.py):

    standin.script("POST", "/v1/chat/completions", Reply(status=500, json={...}))
    ... drive an SDK through the proxy ...
    assert standin.count("/v1/refunds") == 0
    entry = standin.wait_for("/v1/messages")
    assert entry.usage["output_tokens"] == entry.output_tokens
    assert entry.json["model"] == "claude-haiku-4-5"
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import fnmatch
import gzip
import hmac
import itertools
import json
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import brotli
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import wire
from .batches import (
    BatchStore,
    GeminiFile,
    UploadRefused,
    gemini_batch,
    gemini_file_object,
    gemini_upload_chunk,
    gemini_upload_start,
    run_gemini,
)
from .recorded import Recorded, load_recorded
from .tls import TlsMaterial

try:  # Python 3.14 has compression.zstd; 3.12/3.13 get the same API from the backport.
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the interpreter
    from backports import zstd  # type: ignore[import-not-found,no-redef]

_ENTRY = "standin.entry"
_UNSET: Any = object()
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

Outcome = Literal["complete", "client_disconnected", "reset", "stopped"]


# ---------------------------------------------------------------------------- replies


@dataclass
class Reply:
    """A response to serve, byte for byte.

    Body: `json=` (serialised with json.dumps) or `body=` (bytes/str, e.g. raw SSE), or
    `chunks=` as a list of byte pieces (the body is their concatenation).
    `chunks` splits the body on the wire (each piece is one write, sent with chunked
    transfer encoding): an int = pieces of that many bytes, "events" = one piece per
    SSE event, a list of ints = those piece lengths (the rest in a last piece), or a
    list of bytes. A `threading.Event` anywhere in the list pauses the body there until
    the test sets it. `delay` seconds pass between pieces (a slow trickle).
    `delay_before_headers` / `hold_headers` postpone the status line;
    `reset_before_headers` drops the connection without answering;
    `reset_after_bytes=N` sends N body bytes (after encoding) then aborts the TCP
    connection with an RST. `content_encoding` ("gzip", "br", "zstd", "deflate")
    compresses the body (per piece, flushed, so a trickle stays decodable) and sets the
    header. `usage` is what the test considers reported (defaults to the JSON body's
    `usage` / `usageMetadata`), recorded in the request log.
    """

    status: int = 200
    json: Any = _UNSET
    body: bytes | str | None = None
    content_type: str | None = None
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = ()
    chunks: int | str | Sequence[bytes | int | threading.Event] | None = None
    delay: float = 0.0
    delay_before_headers: float = 0.0
    hold_headers: threading.Event | None = None
    reset_before_headers: bool = False
    reset_after_bytes: int | None = None
    content_encoding: str | None = None
    usage: Any = _UNSET

    def raw_body(self) -> bytes:
        if self.json is not _UNSET:
            return json.dumps(self.json).encode()
        if isinstance(self.body, str):
            return self.body.encode()
        if self.body is not None:
            return self.body
        if isinstance(self.chunks, Sequence) and not isinstance(self.chunks, str | bytes):
            return b"".join(c for c in self.chunks if isinstance(c, bytes))
        return b""

    def reported_usage(self) -> Any:
        if self.usage is not _UNSET:
            return self.usage
        if isinstance(self.json, Mapping):
            return self.json.get("usage", self.json.get("usageMetadata"))
        return None

    def pieces(self) -> list[bytes | threading.Event]:
        """The unencoded body split as `chunks` asks."""
        body = self.raw_body()
        spec = self.chunks
        if spec is None:
            return [body] if body else []
        if isinstance(spec, int):
            return [body[i : i + spec] for i in range(0, len(body), spec)]
        if spec == "events":
            return list(wire.split_sse_events(body))
        if isinstance(spec, str):
            raise ValueError(f"unknown chunks spec {spec!r}")
        out: list[bytes | threading.Event] = []
        if any(isinstance(c, bytes) for c in spec):
            explicit = [c for c in spec if isinstance(c, bytes | threading.Event)]
            if (self.body is not None or self.json is not _UNSET) and body != b"".join(
                c for c in explicit if isinstance(c, bytes)
            ):
                raise ValueError("Reply: the byte chunks do not add up to the body")
            return explicit
        pos = 0
        for item in spec:
            if isinstance(item, threading.Event):
                out.append(item)
            else:
                out.append(body[pos : pos + int(item)])
                pos += int(item)
        if pos < len(body):
            out.append(body[pos:])
        return out


def _encoder(name: str) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
    """(encode-and-flush one piece, finish the stream) for a content-encoding."""
    if name in ("gzip", "deflate"):
        z = zlib.compressobj(wbits=31 if name == "gzip" else 15)
        return (lambda b: z.compress(b) + z.flush(zlib.Z_SYNC_FLUSH)), z.flush
    if name == "br":
        c = brotli.Compressor()
        return (lambda b: c.process(b) + c.flush()), c.finish
    if name == "zstd":
        zc = zstd.ZstdCompressor()
        return (
            lambda b: zc.compress(b, mode=zstd.ZstdCompressor.FLUSH_BLOCK),
            lambda: zc.flush(mode=zstd.ZstdCompressor.FLUSH_FRAME),
        )
    raise ValueError(f"unsupported content_encoding {name!r}")


def encode_whole(body: bytes, name: str) -> bytes:
    """Compress a whole body the way `Reply(content_encoding=name)` does without chunks."""
    if name == "gzip":
        return gzip.compress(body)
    step, finish = _encoder(name)
    return step(body) + finish()


@dataclass
class Script:
    """A queued reply for matching requests; `remaining` None means forever."""

    method: str
    path_glob: str
    reply: Reply | Callable[[LoggedRequest], Reply]
    remaining: int | None
    label: str = "scripted"

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method.upper())) and fnmatch.fnmatchcase(path, self.path_glob)


# ---------------------------------------------------------------------------- request log


@dataclass
class LoggedRequest:
    """One request as the stand-in received it, and what it answered."""

    index: int
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    time: float
    scheme: str
    client: tuple[str, int] | None
    status: int | None = None
    reply_kind: str = "synthetic"  # "synthetic", "scripted", "recorded:<name>", "generic"
    usage: Any = None  # the usage object the stand-in reported (None: no usage sent)
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int = 0
    response_body: bytes = b""  # unencoded body as sent
    http_version: str = "1.1"  # as the ASGI server saw it: "1.1", or "2" over h2
    outcome: Outcome | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), default)

    @property
    def host(self) -> str | None:
        return self.header("host")

    @property
    def json(self) -> Any:
        """The request body parsed as JSON (raises ValueError if it is not JSON)."""
        return json.loads(self.body)

    def wait_done(self, timeout: float = 10.0) -> Outcome:
        """Block until the response finished (or the connection ended); its outcome."""
        if not self.done.wait(timeout):
            raise AssertionError(f"stand-in response to {self.method} {self.path} never finished")
        assert self.outcome is not None
        return self.outcome


# ---------------------------------------------------------------------------- server


class _Server(uvicorn.Server):
    """uvicorn server that reports startup to a threading.Event instead of being polled."""

    def __init__(self, config: uvicorn.Config, started: threading.Event) -> None:
        super().__init__(config)
        self._started_event = started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._started_event.set()


class _ReplyResponse(Response):
    """Lets Starlette endpoints return a Reply served by StandIn._serve."""

    def __init__(self, standin: StandIn, reply: Reply) -> None:
        self._standin = standin
        self._reply = reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._standin._serve(self._reply, scope[_ENTRY], scope, receive, send)


class StandIn:
    """Stand-in upstream for OpenAI, Anthropic, Gemini and generic JSON tool APIs."""

    def __init__(self, tls: TlsMaterial, *, host: str = "127.0.0.1") -> None:
        self.tls = tls
        self.host = host
        #: Words of every synthetic reply (see wire.py for how usage follows from it).
        self.reply_text = wire.DEFAULT_REPLY_TEXT
        #: Seconds between the SSE events of synthetic streams.
        self.stream_delay = 0.0
        #: Compress synthetic JSON replies with this encoding when the client accepts it.
        self.json_encoding: str | None = None
        self.models = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        #: Azure: the model each deployment serves, which its answers name (as Azure's do);
        #: a deployment not here answers with its own name.
        self.deployments: dict[str, str] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._log: list[LoggedRequest] = []
        self._scripts: list[Script] = []
        self._usage_override: dict[str, int | None] = {}
        self._seq = itertools.count(1)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[_Server] = []
        self._sockets: list[socket.socket] = []
        #: Files and batches of the OpenAI Batch API, Anthropic's Message Batches and Gemini's
        #: batch mode (its Files API too).
        self.batches = BatchStore(self._next_id, lambda: self.reply_text)
        self._app = self._build_app()

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> StandIn:
        tls_sock = self._listen_socket()
        plain_sock = self._listen_socket()
        self._sockets = [tls_sock, plain_sock]
        started = [threading.Event(), threading.Event()]
        common = dict(
            app=self._asgi,
            interface="asgi3",
            proxy_headers=False,  # log the real peer, never X-Forwarded-For
            server_header=False,
            log_config=None,  # leave the test process's logging configuration alone
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            http="h11",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
        )
        self._servers = [
            _Server(
                uvicorn.Config(
                    **common,  # type: ignore[arg-type]
                    ssl_certfile=str(self.tls.server_cert),
                    ssl_keyfile=str(self.tls.server_key),
                ),
                started[0],
            ),
            _Server(uvicorn.Config(**common), started[1]),  # type: ignore[arg-type]
        ]
        errors: list[BaseException] = []

        async def main() -> None:
            await asyncio.gather(
                self._servers[0].serve(sockets=[tls_sock]),
                self._servers[1].serve(sockets=[plain_sock]),
            )

        def run() -> None:
            # asyncio.Runner cancels leftover request tasks before closing the loop.
            try:
                with asyncio.Runner() as runner:
                    self._loop = runner.get_loop()
                    runner.run(main())
            except BaseException as exc:  # surfaced by start()
                errors.append(exc)
                for ev in started:
                    ev.set()

        self._thread = threading.Thread(target=run, name="standin-upstream", daemon=True)
        self._thread.start()
        for ev in started:
            if not ev.wait(timeout):
                raise RuntimeError("stand-in upstream did not start")
        if errors:
            raise RuntimeError("stand-in upstream failed to start") from errors[0]
        return self

    def _listen_socket(self) -> socket.socket:
        # Bound before the thread starts, so the port is known without waiting.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(128)
        return sock

    def stop(self, timeout: float = 15.0) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        loop = self._loop

        def shutdown() -> None:
            for server in self._servers:
                server.should_exit = True
                server.force_exit = True
                # Open keep-alive and stalled streams would otherwise hold wait_closed().
                for conn in list(server.server_state.connections):
                    transport = getattr(conn, "transport", None)
                    if transport is not None:
                        transport.abort()

        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(shutdown)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("stand-in upstream thread did not stop")
        self._thread = None
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        return self._sockets[0].getsockname()[1]

    @property
    def http_port(self) -> int:
        return self._sockets[1].getsockname()[1]

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_host_port(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def url(self) -> str:
        return f"https://{self.host_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_host_port}"

    @property
    def ca_path(self) -> str:
        return str(self.tls.ca_cert)

    def ssl_context(self) -> ssl.SSLContext:
        """Client SSL context trusting the stand-in CA (for direct, proxy-less calls)."""
        return self.tls.client_context()

    # ------------------------------------------------------------------ test API

    @property
    def requests(self) -> list[LoggedRequest]:
        """Snapshot of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    def count(self, path_glob: str = "*", method: str | None = None) -> int:
        return len(self.matching(path_glob, method))

    def matching(self, path_glob: str = "*", method: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self._log if _entry_matches(r, path_glob, method)]

    def last(self, path_glob: str = "*", method: str | None = None) -> LoggedRequest:
        """The most recent request (matching `path_glob`/`method`); fails if there is none."""
        found = self.matching(path_glob, method)
        if not found:
            raise AssertionError(f"the stand-in has received no request matching {path_glob}")
        return found[-1]

    @property
    def last_usage(self) -> Any:
        """The usage object of the most recent request that reported one."""
        with self._lock:
            return next((r.usage for r in reversed(self._log) if r.usage is not None), None)

    def wait_for(
        self,
        path_glob: str = "*",
        *,
        method: str | None = None,
        count: int = 1,
        timeout: float = 10.0,
    ) -> LoggedRequest:
        """Block until `count` matching requests arrived; return the last of them.

        A request is logged once its body is in, before it is answered; use
        `entry.wait_done()` to wait for the reply to finish (or the connection to end).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [r for r in self._log if _entry_matches(r, path_glob, method)]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [f"{r.method} {r.path}" for r in self._log]
                    raise AssertionError(
                        f"stand-in: expected {count} request(s) matching {method or '*'} "
                        f"{path_glob}, got {len(found)}; log: {seen}"
                    )
                self._cond.wait(remaining)

    def clear(self) -> None:
        """Forget logged requests."""
        with self._lock:
            self._log.clear()

    def reset(self) -> None:
        """clear() plus drop scripts and overrides and restore default reply settings."""
        with self._lock:
            self._log.clear()
            self._scripts.clear()
            self._usage_override.clear()
        self.reply_text = wire.DEFAULT_REPLY_TEXT
        self.stream_delay = 0.0
        self.json_encoding = None
        self.deployments.clear()
        self.batches = BatchStore(self._next_id, lambda: self.reply_text)

    def script(
        self,
        method: str,
        path_glob: str,
        reply: Reply | Callable[[LoggedRequest], Reply],
        times: int | None = 1,
        *,
        label: str = "scripted",
    ) -> Script:
        """Queue `reply` for the next `times` requests matching (None: all of them).

        `method` "*" matches any; `path_glob` is an fnmatch pattern on the path (no query).
        `reply` may be a callable receiving the LoggedRequest. Scripts are consumed FIFO.
        """
        s = Script(method.upper(), path_glob, reply, times, label)
        with self._lock:
            self._scripts.append(s)
        return s

    def pending_scripts(self) -> list[Script]:
        with self._lock:
            return [s for s in self._scripts if s.remaining != 0]

    def replay_recorded(
        self,
        name: str,
        *,
        times: int | None = 1,
        chunks: int | str | Sequence[bytes | int | threading.Event] | None = _UNSET,
        delay: float = 0.0,
        method: str | None = None,
        path: str | None = None,
        **reply_fields: Any,
    ) -> Recorded:
        """Serve a recorded exchange byte for byte (status, content type, body).

        Matches the recorded method and path unless `path`/`method` are given. SSE bodies
        go out one event per piece by default (`chunks` as in Reply). Returns the
        Recorded exchange (its `request_json` to send, its `usage` to expect).
        """
        rec = load_recorded(name)
        if chunks is _UNSET:
            chunks = "events" if rec.streamed else None
        reply = Reply(
            status=rec.status,
            body=rec.response_body,
            content_type=rec.content_type,
            chunks=chunks,
            delay=delay,
            usage=rec.usage,
            **reply_fields,
        )
        self.script(
            method or rec.method, path or rec.path, reply, times, label=f"recorded:{rec.name}"
        )
        return rec

    def set_usage(
        self,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cached_tokens: int | None = None,
    ) -> None:
        """Report these numbers verbatim in synthetic replies until reset() (None: derive)."""
        with self._lock:
            self._usage_override = {
                "input": input_tokens,
                "output": output_tokens,
                "cached": cached_tokens,
            }

    # ------------------------------------------------------------------ ASGI plumbing

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        client = scope.get("client")
        entry = LoggedRequest(
            index=0,
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body=b"".join(chunks),
            time=time.time(),
            scheme=scope["scheme"],
            client=(client[0], client[1]) if client else None,
            http_version=scope.get("http_version", "1.1"),
        )
        with self._cond:
            entry.index = len(self._log)
            self._log.append(entry)
            script = next(
                (
                    s
                    for s in self._scripts
                    if s.remaining != 0 and s.matches(entry.method, entry.path)
                ),
                None,
            )
            if script is not None and script.remaining is not None:
                script.remaining -= 1
                if script.remaining == 0:
                    self._scripts.remove(script)
            self._cond.notify_all()
        scope[_ENTRY] = entry
        try:
            if script is not None:
                reply = script.reply if isinstance(script.reply, Reply) else script.reply(entry)
                entry.reply_kind = script.label
                entry.usage = reply.reported_usage()
                await self._serve(reply, entry, scope, receive, send)
            else:
                await self._app(scope, receive, send)
        finally:
            if entry.outcome is None:
                entry.outcome = "stopped" if self._stopping.is_set() else "complete"
            entry.done.set()

    async def _serve(
        self, reply: Reply, entry: LoggedRequest, scope: Scope, receive: Receive, send: Send
    ) -> None:
        disconnect = asyncio.ensure_future(receive())  # resolves when the client goes away
        try:
            await self._serve_inner(reply, entry, scope, send, disconnect)
        finally:
            if not disconnect.done():
                disconnect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await disconnect

    async def _serve_inner(
        self,
        reply: Reply,
        entry: LoggedRequest,
        scope: Scope,
        send: Send,
        disconnect: asyncio.Future[Any],
    ) -> None:
        async def pause(wait: float | threading.Event) -> bool:
            """Wait; False when the client disconnected or the stand-in is stopping."""
            if isinstance(wait, threading.Event):
                while not wait.is_set():
                    if disconnect.done() or self._stopping.is_set():
                        break
                    # Server-side wait for a test's Event; not test synchronisation.
                    await asyncio.sleep(0.01)
            elif wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(disconnect), wait)
            if self._stopping.is_set():
                entry.outcome = "stopped"
                return False
            if disconnect.done():
                entry.outcome = "client_disconnected"
                return False
            return True

        if reply.delay_before_headers and not await pause(reply.delay_before_headers):
            return
        if reply.hold_headers is not None and not await pause(reply.hold_headers):
            return
        if reply.reset_before_headers:
            await self._abort(scope, disconnect)
            entry.outcome = "reset"
            return

        pieces = reply.pieces()
        entry.response_body = b"".join(p for p in pieces if isinstance(p, bytes))
        streamed = reply.chunks is not None
        if reply.content_encoding:
            step, finish = _encoder(reply.content_encoding)
            if streamed:
                encoded: list[bytes | threading.Event] = [
                    step(p) if isinstance(p, bytes) else p for p in pieces
                ]
                encoded.append(finish())
            else:
                encoded = [encode_whole(entry.response_body, reply.content_encoding)]
            pieces = encoded

        headers: list[tuple[bytes, bytes]] = []
        if reply.content_type is not None:
            headers.append((b"content-type", reply.content_type.encode()))
        elif reply.json is not _UNSET:
            headers.append((b"content-type", b"application/json"))
        if reply.content_encoding:
            headers.append((b"content-encoding", reply.content_encoding.encode()))
        if not streamed:
            length = sum(len(p) for p in pieces if isinstance(p, bytes))
            headers.append((b"content-length", str(length).encode()))
        extra = reply.headers.items() if isinstance(reply.headers, Mapping) else reply.headers
        headers.extend((k.lower().encode(), v.encode()) for k, v in extra)

        entry.status = reply.status
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        sent = 0
        limit = reply.reset_after_bytes
        last_data = max((i for i, p in enumerate(pieces) if isinstance(p, bytes)), default=-1)
        for i, piece in enumerate(pieces):
            if isinstance(piece, threading.Event):
                if not await pause(piece):
                    return
                continue
            if limit is not None and sent + len(piece) >= limit:
                head = piece[: limit - sent]
                if head:
                    await send({"type": "http.response.body", "body": head, "more_body": True})
                await self._abort(scope, disconnect)
                entry.outcome = "reset"
                return
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent += len(piece)
            if disconnect.done():
                entry.outcome = "client_disconnected"
                return
            if reply.delay and i != last_data and not await pause(reply.delay):
                return
        if limit is not None:  # the limit is at or past the end: reset before completing
            await self._abort(scope, disconnect)
            entry.outcome = "reset"
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        entry.outcome = "complete"

    async def _abort(self, scope: Scope, disconnect: asyncio.Future[Any]) -> None:
        """Abort this request's TCP connection with an RST (SO_LINGER 0)."""
        client = scope.get("client")
        for server in self._servers:
            for conn in list(server.server_state.connections):
                if client and getattr(conn, "client", None) == (client[0], client[1]):
                    transport = conn.transport  # type: ignore[attr-defined]
                    sock = transport.get_extra_info("socket")
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                    transport.abort()
        # Let uvicorn notice the lost connection so it doesn't log an incomplete response.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(disconnect), 5)

    # ------------------------------------------------------------------ endpoints

    def _build_app(self) -> Starlette:
        post = ["POST"]
        gemini_versions = "{version:str}"
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._openai_chat, methods=post),
                Route("/openai/v1/chat/completions", self._openai_chat, methods=post),
                Route(
                    "/openai/deployments/{deployment}/chat/completions",
                    self._openai_chat,
                    methods=post,
                ),
                Route("/v1/completions", self._openai_completions, methods=post),
                Route("/v1/responses", self._openai_responses, methods=post),
                Route("/openai/v1/responses", self._openai_responses, methods=post),
                Route("/v1/embeddings", self._openai_embeddings, methods=post),
                Route(
                    "/openai/deployments/{deployment}/embeddings",
                    self._openai_embeddings,
                    methods=post,
                ),
                Route("/v1/images/{action}", self._openai_images, methods=post),
                Route(
                    "/openai/deployments/{deployment}/images/{action}",
                    self._openai_images,
                    methods=post,
                ),
                Route("/v1/audio/speech", self._openai_speech, methods=post),
                Route("/v1/audio/{action}", self._openai_transcription, methods=post),
                Route("/openai/v1/audio/{action}", self._openai_transcription, methods=post),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/files", self._openai_upload, methods=post),
                Route("/v1/files/{file_id}/content", self._openai_file_content, methods=["GET"]),
                Route("/v1/batches", self._openai_batch_create, methods=post),
                Route("/v1/batches/{batch_id}", self._openai_batch_get, methods=["GET"]),
                Route("/v1/messages/batches", self._anthropic_batch_create, methods=post),
                Route(
                    "/v1/messages/batches/{batch_id}", self._anthropic_batch_get, methods=["GET"]
                ),
                Route(
                    "/v1/messages/batches/{batch_id}/results",
                    self._anthropic_batch_results,
                    methods=["GET"],
                ),
                Route("/v1/messages", self._anthropic_messages, methods=post),
                Route("/v1/messages/count_tokens", self._anthropic_count_tokens, methods=post),
                Route(
                    f"/{gemini_versions}/models/{{model}}:{{action}}", self._gemini, methods=post
                ),
                Route(
                    f"/{gemini_versions}/projects/{{project}}/locations/{{location}}"
                    "/publishers/google/models/{model}:{action}",
                    self._gemini,
                    methods=post,
                ),
                Route(
                    f"/{gemini_versions}/batches/{{batch_id}}",
                    self._gemini_batch_get,
                    methods=["GET"],
                ),
                Route(f"/upload/{gemini_versions}/files", self._gemini_upload, methods=post),
                Route(
                    f"/download/{gemini_versions}/files/{{file_id}}:download",
                    self._gemini_file_download,
                    methods=["GET"],
                ),
                Route(
                    f"/{gemini_versions}/files/{{file_id}}:download",
                    self._gemini_file_download,
                    methods=["GET"],
                ),
                Route(
                    f"/{gemini_versions}/files/{{file_id}}", self._gemini_file_get, methods=["GET"]
                ),
                Route("/model/{model:path}/{operation}", self._bedrock, methods=post),
                Route("/{rest:path}", self._generic, methods=_ALL_METHODS),
            ]
        )

    # helpers

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._seq):024d}"

    def _plan(self, api: str, body: Mapping[str, Any], entry: LoggedRequest) -> wire.ReplyPlan:
        with self._lock:
            override = dict(self._usage_override)
        in_hdr = entry.header("x-standin-input-tokens")
        out_hdr = entry.header("x-standin-output-tokens")
        plan = wire.plan_reply(
            api,
            body,
            self.reply_text,
            input_override=int(in_hdr) if in_hdr else override.get("input"),
            output_override=int(out_hdr) if out_hdr else override.get("output"),
            cached_tokens=override.get("cached") or 0,
        )
        entry.input_tokens = plan.input_tokens
        entry.output_tokens = plan.output_tokens
        entry.cached_tokens = plan.cached_tokens
        return plan

    def _json_reply(
        self,
        entry: LoggedRequest,
        body: bytes,
        usage: Any,
        *,
        status: int = 200,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        entry.usage = usage
        encoding = self.json_encoding
        accept = entry.header("accept-encoding", "") or ""
        if encoding and encoding not in accept:
            encoding = None
        return _ReplyResponse(
            self,
            Reply(
                status=status,
                body=body,
                content_type=content_type,
                headers=headers or {},
                content_encoding=encoding,
            ),
        )

    def _sse_reply(
        self,
        entry: LoggedRequest,
        events: list[bytes],
        usage: Any,
        *,
        content_type: str = "text/event-stream; charset=utf-8",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        entry.usage = usage
        return _ReplyResponse(
            self,
            Reply(
                chunks=list(events),
                delay=self.stream_delay,
                content_type=content_type,
                headers={"cache-control": "no-cache", **(headers or {})},
            ),
        )

    @staticmethod
    def _body(entry: LoggedRequest) -> dict[str, Any] | None:
        try:
            value = json.loads(entry.body or b"{}")
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def _openai_bad_request(self, entry: LoggedRequest) -> Response:
        return self._json_reply(
            entry,
            wire.openai_error("We could not parse the JSON body of your request."),
            None,
            status=400,
        )

    # OpenAI

    async def _openai_chat(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        body = self._body(entry)
        if body is None:
            return self._openai_bad_request(entry)
        deployment = request.path_params.get("deployment")
        model = self.deployments.get(deployment) or body.get("model") or deployment or "gpt-4o-mini"
        plan = self._plan("openai.chat", body, entry)
        usage = wire.openai_chat_usage(plan.input_tokens, plan.output_tokens, plan.cached_tokens)
        finish = "length" if plan.truncated else "stop"
        ident, created = self._next_id("chatcmpl-"), int(time.time())
        headers = {"x-request-id": self._next_id("req_")}
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            events = wire.openai_chat_sse(
                id=ident,
                created=created,
                model=model,
                deltas=plan.deltas(),
                usage=usage,
                include_usage=include,
                finish_reason=finish,
            )
            return self._sse_reply(entry, events, usage if include else None, headers=headers)
        payload = wire.openai_chat_json(
            id=ident,
            created=created,
            model=model,
            text=plan.text,
            usage=usage,
            finish_reason=finish,
        )
        return self._json_reply(entry, payload, usage, headers=headers)

    async def _openai_completions(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        body = self._body(entry)
        if body is None:
            return self._openai_bad_request(entry)
        model = body.get("model") or "gpt-3.5-turbo-instruct"
        plan = self._plan("openai.completions", body, entry)
        usage = wire.openai_completion_usage(plan.input_tokens, plan.output_tokens)
        finish = "length" if plan.truncated else "stop"
        ident, created = self._next_id("cmpl-"), int(time.time())
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            events = wire.openai_completion_sse(
                id=ident,
                created=created,
                model=model,
                deltas=plan.deltas(),
                usage=usage,
                include_usage=include,
                finish_reason=finish,
            )
            return self._sse_reply(entry, events, usage if include else None)
        payload = wire.openai_completion_json(
            id=ident,
            created=created,
            model=model,
            text=plan.text,
            usage=usage,
            finish_reason=finish,
        )
        return self._json_reply(entry, payload, usage)

    async def _openai_responses(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        body = self._body(entry)
        if body is None:
            return self._openai_bad_request(entry)
        model = body.get("model") or "gpt-4o-mini"
        plan = self._plan("openai.responses", body, entry)
        usage = wire.openai_responses_usage(
            plan.input_tokens, plan.output_tokens, plan.cached_tokens
        )
        common = dict(
            id=self._next_id("resp_"),
            msg_id=self._next_id("msg_"),
            created=int(time.time()),
            model=model,
            usage=usage,
            truncated=plan.truncated,
            max_output=wire.max_output_tokens("openai.responses", body),
            instructions=body.get("instructions"),
            image_tool=wire.responses_image_tool(body),
        )
        if body.get("stream"):
            events = wire.openai_responses_sse(deltas=plan.deltas(), **common)  # type: ignore[arg-type]
            return self._sse_reply(entry, events, usage)
        payload = wire.openai_responses_json(text=plan.text, **common)  # type: ignore[arg-type]
        return self._json_reply(entry, payload, usage)

    async def _openai_embeddings(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        body = self._body(entry)
        if body is None:
            return self._openai_bad_request(entry)
        raw = body.get("input", "")
        # A list of strings or of token-id lists is a batch; a string or flat id list is one.
        if isinstance(raw, list) and raw and not all(isinstance(x, int) for x in raw):
            inputs = raw
        else:
            inputs = [raw]
        with self._lock:
            override = self._usage_override.get("input")
        header = entry.header("x-standin-input-tokens")
        tokens = (
            int(header)
            if header
            else override
            if override is not None
            else wire.expected_input_tokens("openai.embeddings", body)
        )
        entry.input_tokens, entry.output_tokens = tokens, 0
        model = body.get("model") or request.path_params.get("deployment") or "embedding"
        payload = wire.openai_embeddings_json(
            model=model,
            inputs=inputs,
            prompt_tokens=tokens,
            encoding_format=body.get("encoding_format") or "float",
            dimensions=int(body.get("dimensions") or 8),
        )
        return self._json_reply(entry, payload, {"prompt_tokens": tokens, "total_tokens": tokens})

    async def _openai_images(self, request: Request) -> Response:
        """generations (JSON) and edits (a multipart form, or JSON). The GPT image models report
        usage: prompt words as text tokens, IMAGE_INPUT_TOKENS per uploaded image, and
        image_output_tokens(quality) per image made (set_usage overrides the input and output
        totals); DALL·E answers URLs and no usage."""
        entry: LoggedRequest = request.scope[_ENTRY]
        action = request.path_params["action"]
        if action not in ("generations", "edits"):
            return await self._generic(request)
        fields, uploads = _image_request(entry)
        if fields is None:
            return self._openai_bad_request(entry)
        model = fields.get("model") or request.path_params.get("deployment") or "dall-e-2"
        n = int(fields.get("n") or 1)
        quality, size = str(fields.get("quality") or "auto"), str(fields.get("size") or "auto")
        created = int(time.time())
        if not str(model).startswith(("gpt-image", "chatgpt-image")):
            return self._json_reply(
                entry,
                wire.openai_images_json(
                    created=created, n=n, quality=quality, size=size, usage=None
                ),
                None,
            )
        with self._lock:
            override = dict(self._usage_override)
        text = max(1, wire.count_words(fields.get("prompt")))
        image_in = wire.IMAGE_INPUT_TOKENS * uploads
        if override.get("input") is not None:
            text, image_in = max(override["input"] - image_in, 0), min(image_in, override["input"])
        per_image = wire.image_output_tokens(quality)
        output = override["output"] if override.get("output") is not None else per_image * n
        usage = wire.openai_images_usage(text, image_in, output)
        entry.input_tokens, entry.output_tokens = text + image_in, output
        if str(fields.get("stream")).lower() == "true":
            # One completed event per image: the call's input on the first, each its image.
            usages = [
                wire.openai_images_usage(text if i == 0 else 0, image_in if i == 0 else 0, share)
                for i, share in enumerate(
                    [output // n + (1 if i < output % n else 0) for i in range(n)]
                )
            ]
            kind = "image_generation" if action == "generations" else "image_edit"
            events = wire.openai_images_sse(
                kind=kind,
                created=created,
                quality=quality,
                size=size,
                partial_images=int(fields.get("partial_images") or 0),
                usages=usages,
            )
            return self._sse_reply(entry, events, usage)
        payload = wire.openai_images_json(
            created=created, n=n, quality=quality, size=size, usage=usage
        )
        return self._json_reply(entry, payload, usage)

    async def _openai_speech(self, request: Request) -> Response:
        """Raw audio (no usage), or with `stream_format: "sse"` audio deltas and a
        `speech.audio.done` event whose usage gpt-4o-mini-tts reports."""
        entry: LoggedRequest = request.scope[_ENTRY]
        body = self._body(entry)
        if body is None or not isinstance(body.get("input"), str):
            return self._openai_bad_request(entry)
        text = body["input"]
        if body.get("stream_format") == "sse":
            usage = wire.openai_speech_usage(text, body.get("instructions"))
            entry.input_tokens, entry.output_tokens = usage["input_tokens"], usage["output_tokens"]
            return self._sse_reply(entry, wire.openai_speech_sse(text, usage), usage)
        audio = wire.openai_speech_audio(text)
        return self._json_reply(entry, audio, None, content_type="audio/mpeg")

    async def _openai_transcription(self, request: Request) -> Response:
        """transcriptions and translations: a multipart form with the audio as `file` (a WAV,
        timed by the standard library). The answer is `reply_text` in the requested format,
        with the usage the model reports (wire.openai_transcription_usage), or SSE deltas and
        `transcript.text.done` with `stream=true`. An unreadable form or file: a 400."""
        entry: LoggedRequest = request.scope[_ENTRY]
        if request.path_params["action"] not in ("transcriptions", "translations"):
            return await self._generic(request)
        fields, audio = _transcription_request(entry)
        seconds = wire.wav_seconds(audio) if audio is not None else None
        if fields is None or seconds is None or not fields.get("model"):
            return self._json_reply(
                entry, wire.openai_error("Invalid file format or missing model."), None, status=400
            )
        model, text = fields["model"], self.reply_text
        usage = wire.openai_transcription_usage(model, seconds, fields.get("prompt"), text)
        if usage["type"] == "tokens":
            entry.input_tokens, entry.output_tokens = usage["input_tokens"], usage["output_tokens"]
        if str(fields.get("stream")).lower() == "true" and "whisper" not in model:
            return self._sse_reply(entry, wire.openai_transcription_sse(text, usage), usage)
        fmt = fields.get("response_format") or "json"
        body, ctype = wire.openai_transcription_body(fmt, text, seconds, usage)
        reported = usage if ctype == "application/json" else None
        return self._json_reply(entry, body, reported, content_type=ctype)

    async def _models(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        if entry.header("anthropic-version"):
            data = [
                {
                    "type": "model",
                    "id": m,
                    "display_name": m,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for m in ("claude-haiku-4-5", "claude-sonnet-4-5")
            ]
            payload = json.dumps(
                {
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"],
                    "last_id": data[-1]["id"],
                },
                separators=(",", ":"),
            ).encode()
            return self._json_reply(entry, payload, None)
        return self._json_reply(entry, wire.openai_models_json(self.models, 1700000000), None)

    # Anthropic

    async def _anthropic_messages(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        body = self._body(entry)
        if body is None:
            return self._json_reply(
                entry,
                wire.anthropic_error("invalid_request_error", "invalid JSON body"),
                None,
                status=400,
            )
        model = body.get("model") or "claude-haiku-4-5"
        plan = self._plan("anthropic.messages", body, entry)
        usage = wire.anthropic_usage(plan.input_tokens, plan.output_tokens, plan.cached_tokens)
        stop = "max_tokens" if plan.truncated else "end_turn"
        ident = self._next_id("msg_")
        headers = {"request-id": self._next_id("req_")}
        if body.get("stream"):
            events = wire.anthropic_sse(
                id=ident, model=model, deltas=plan.deltas(), usage=usage, stop_reason=stop
            )
            return self._sse_reply(entry, events, usage, headers=headers)
        payload = wire.anthropic_message_json(
            id=ident, model=model, text=plan.text, usage=usage, stop_reason=stop
        )
        return self._json_reply(entry, payload, usage, headers=headers)

    async def _anthropic_count_tokens(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        body = self._body(entry) or {}
        tokens = wire.expected_input_tokens("anthropic.messages", body)
        entry.input_tokens, entry.output_tokens = tokens, 0
        payload = json.dumps({"input_tokens": tokens}, separators=(",", ":")).encode()
        return self._json_reply(entry, payload, None)

    # Gemini

    async def _gemini(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        model: str = request.path_params["model"]
        action: str = request.path_params["action"]
        body = self._body(entry)
        ctype = "application/json; charset=UTF-8"
        if body is None:
            err = wire.gemini_error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT")
            return self._json_reply(entry, err, None, status=400, content_type=ctype)
        if action == "countTokens":
            tokens = wire.expected_input_tokens(
                "gemini.generate", body.get("generateContentRequest", body)
            )
            entry.input_tokens, entry.output_tokens = tokens, 0
            payload = json.dumps(
                {
                    "totalTokens": tokens,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}],
                },
                indent=2,
            ).encode()
            return self._json_reply(entry, payload, None, content_type=ctype)
        if action == "batchGenerateContent":
            entry.reply_kind = "batch"
            found = run_gemini(self.batches, model, body)
            if found is None:  # its input file unknown
                err = wire.gemini_error(404, "Requested entity was not found.", "NOT_FOUND")
                return self._json_reply(entry, err, None, status=404, content_type=ctype)
            return self._json_reply(entry, json.dumps(found).encode(), None, content_type=ctype)
        if action not in ("generateContent", "streamGenerateContent"):
            err = wire.gemini_error(404, f"Method {action} not found.", "NOT_FOUND")
            return self._json_reply(entry, err, None, status=404, content_type=ctype)
        plan = self._plan("gemini.generate", body, entry)
        finish = "MAX_TOKENS" if plan.truncated else "STOP"
        response_id = self._next_id("standin")
        if action == "generateContent":
            usage = wire.gemini_usage(plan.input_tokens, plan.output_tokens, plan.cached_tokens)
            payload = wire.gemini_json(
                model=model,
                text=plan.text,
                usage=usage,
                finish_reason=finish,
                response_id=response_id,
            )
            return self._json_reply(entry, payload, usage, content_type=ctype)
        chunks = wire.gemini_chunks(
            model=model,
            deltas=plan.deltas(),
            prompt_tokens=plan.input_tokens,
            cached=plan.cached_tokens,
            finish_reason=finish,
            response_id=response_id,
        )
        usage = chunks[-1]["usageMetadata"]
        if request.query_params.get("alt") == "sse":
            return self._sse_reply(
                entry, wire.gemini_sse(chunks), usage, content_type="text/event-stream"
            )
        # Without alt=sse the API streams one JSON array.
        payload = json.dumps(chunks, indent=2, ensure_ascii=False).encode()
        return self._json_reply(entry, payload, usage, content_type=ctype)

    # Amazon Bedrock Runtime

    async def _bedrock(self, request: Request) -> Response:
        """Converse, ConverseStream, and InvokeModel(WithResponseStream) for Claude, Nova, Llama
        and Titan Text. Like Bedrock, it refuses a request whose SigV4 signature does not cover
        it as received: a proxy that changed one signed byte (body or header) is caught here."""
        entry: LoggedRequest = request.scope[_ENTRY]
        operation: str = request.path_params["operation"]
        bad_signature = _sigv4_problem(entry, request.scope.get("raw_path") or b"")
        if bad_signature is not None:
            return self._bedrock_error(entry, 403, "InvalidSignatureException", bad_signature)
        body = self._body(entry)
        if body is None:
            return self._bedrock_error(entry, 400, "ValidationException", "Malformed input request")
        ident = self._next_id("")
        headers = {"x-amzn-requestid": f"standin-{ident}"}
        if operation in ("converse", "converse-stream"):
            plan = self._plan("bedrock.converse", body, entry)
            usage = wire.bedrock_usage(plan.input_tokens, plan.output_tokens, plan.cached_tokens)
            stop = "max_tokens" if plan.truncated else "end_turn"
            if operation == "converse":
                payload = wire.bedrock_converse_json(text=plan.text, usage=usage, stop_reason=stop)
                return self._json_reply(entry, payload, usage, headers=headers)
            frames = wire.bedrock_converse_stream(
                deltas=plan.deltas(), usage=usage, stop_reason=stop
            )
            return self._sse_reply(
                entry, frames, usage, content_type=wire.EVENTSTREAM_TYPE, headers=headers
            )
        if operation not in ("invoke", "invoke-with-response-stream"):
            return self._bedrock_error(entry, 404, "UnknownOperationException", operation)
        if "anthropic_version" not in body:
            return self._bedrock_invoke(
                entry, request.path_params["model"], operation, body, headers
            )
        if not isinstance(body.get("anthropic_version"), str) or "model" in body:
            return self._bedrock_error(entry, 400, "ValidationException", "Malformed input request")
        plan = self._plan("anthropic.messages", body, entry)
        usage = wire.anthropic_usage(plan.input_tokens, plan.output_tokens, plan.cached_tokens)
        stop = "max_tokens" if plan.truncated else "end_turn"
        name = "claude-3-5-haiku-20241022"  # Bedrock's responses name the model without its id
        if operation == "invoke":
            payload = wire.anthropic_message_json(
                id=f"msg_bdrk_{ident}", model=name, text=plan.text, usage=usage, stop_reason=stop
            )
            headers.update(
                wire.bedrock_token_headers(
                    plan.input_tokens, plan.output_tokens, plan.cached_tokens
                )
            )
            return self._json_reply(entry, payload, usage, headers=headers)
        events = wire.anthropic_sse(
            id=f"msg_bdrk_{ident}", model=name, deltas=plan.deltas(), usage=usage, stop_reason=stop
        )
        frames = wire.bedrock_invoke_stream(events, plan.input_tokens, plan.output_tokens)
        return self._sse_reply(
            entry, frames, usage, content_type=wire.EVENTSTREAM_TYPE, headers=headers
        )

    def _bedrock_invoke(
        self,
        entry: LoggedRequest,
        model: str,
        operation: str,
        body: Mapping[str, Any],
        headers: dict[str, str],
    ) -> Response:
        """InvokeModel(WithResponseStream) for Amazon Nova, Meta Llama, Amazon Titan Text and
        Mistral (its prompt format), each in its own body format. Like Bedrock, the token counts are in the response headers (JSON)
        or in the last chunk's invocation metrics (stream), whatever the family."""
        family = next((f for key, f in _BEDROCK_FAMILIES.items() if key in model.lower()), None)
        if family is None or not isinstance(body.get(_BEDROCK_PROMPT[family]), str | list):
            return self._bedrock_error(entry, 400, "ValidationException", "Malformed input request")
        plan = self._plan(f"bedrock.{family}", body, entry)
        cached = plan.cached_tokens
        stream = operation == "invoke-with-response-stream"
        if family == "nova":
            usage: Any = wire.nova_usage(plan.input_tokens, plan.output_tokens, cached)
            stop = "max_tokens" if plan.truncated else "end_turn"
            payload = wire.nova_invoke_json(text=plan.text, usage=usage, stop_reason=stop)
            chunks = wire.nova_invoke_chunks(deltas=plan.deltas(), usage=usage, stop_reason=stop)
        elif family == "llama":
            usage = {
                "prompt_token_count": plan.input_tokens,
                "generation_token_count": plan.output_tokens,
            }
            stop = "length" if plan.truncated else "stop"
            payload = wire.llama_invoke_json(
                text=plan.text, input_tokens=plan.input_tokens, output_tokens=plan.output_tokens,
                stop_reason=stop,
            )  # fmt: skip
            chunks = wire.llama_invoke_chunks(
                deltas=plan.deltas(), input_tokens=plan.input_tokens, stop_reason=stop
            )
        elif family == "mistral":  # no usage in its body: only Bedrock's own counts say it
            usage = None
            stop = "length" if plan.truncated else "stop"
            payload = wire.mistral_invoke_json(text=plan.text, stop_reason=stop)
            chunks = wire.mistral_invoke_chunks(deltas=plan.deltas(), stop_reason=stop)
        else:
            usage = {"inputTextTokenCount": plan.input_tokens, "tokenCount": plan.output_tokens}
            reason = "LENGTH" if plan.truncated else "FINISH"
            payload = wire.titan_invoke_json(
                text=plan.text, input_tokens=plan.input_tokens, output_tokens=plan.output_tokens,
                reason=reason,
            )  # fmt: skip
            chunks = wire.titan_invoke_chunks(
                deltas=plan.deltas(), input_tokens=plan.input_tokens, reason=reason
            )
        if not stream:
            headers.update(
                wire.bedrock_token_headers(plan.input_tokens, plan.output_tokens, cached)
            )
            return self._json_reply(entry, payload, usage, headers=headers)
        metrics = wire.bedrock_invocation_metrics(plan.input_tokens, plan.output_tokens, cached)
        frames = wire.bedrock_chunk_stream(chunks, metrics)
        headers["X-Amzn-Bedrock-Content-Type"] = "application/json"
        return self._sse_reply(
            entry, frames, usage, content_type=wire.EVENTSTREAM_TYPE, headers=headers
        )

    def _bedrock_error(
        self, entry: LoggedRequest, status: int, error_type: str, message: str
    ) -> Response:
        return self._json_reply(
            entry,
            wire.bedrock_error(message),
            None,
            status=status,
            headers={"x-amzn-errortype": error_type},
        )

    # Generic tool APIs

    # --- batches (tests/support/batches.py) ---------------------------------------------

    def _object_reply(self, entry: LoggedRequest, found: Any, error: bytes) -> Response:
        entry.reply_kind = "batch"
        if found is None:
            return self._json_reply(entry, error, None, status=404)
        return self._json_reply(entry, json.dumps(found).encode(), None)

    async def _openai_upload(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        fields, content = _transcription_request(entry)  # a multipart form with a `file`
        if fields is None or content is None or fields.get("purpose") != "batch":
            error = wire.openai_error("expected a multipart form with a file and purpose=batch")
            return self._json_reply(entry, error, None, status=400)
        uploaded = self.batches.upload(fields.get("filename", "input.jsonl"), "batch", content)
        return self._object_reply(entry, uploaded, b"")

    async def _openai_batch_create(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        body = self._body(entry) or {}
        error = wire.openai_error("No such File object", code="not_found")
        return self._object_reply(entry, self.batches.run_openai(body), error)

    async def _openai_batch_get(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        if _gemini_client(entry):  # Gemini's /v1/batches/{id}
            return await self._gemini_batch_get(request)
        found = self.batches.openai_batch(request.path_params["batch_id"])
        return self._object_reply(
            entry, found, wire.openai_error("No such Batch", code="not_found")
        )

    async def _openai_file_content(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        entry.reply_kind = "batch"
        content = self.batches.content(request.path_params["file_id"])
        if content is None:
            error = wire.openai_error("No such File object", code="not_found")
            return self._json_reply(entry, error, None, status=404)
        return self._json_reply(entry, content, None, content_type="application/octet-stream")

    def _origin(self, entry: LoggedRequest) -> str:
        return f"{entry.scheme}://{entry.host}"

    async def _anthropic_batch_create(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        found = self.batches.run_anthropic(self._body(entry) or {}, self._origin(entry))
        return self._object_reply(entry, found, b"")

    async def _anthropic_batch_get(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        found = self.batches.anthropic_batch(request.path_params["batch_id"], self._origin(entry))
        error = wire.anthropic_error("not_found_error", "batch not found")
        return self._object_reply(entry, found, error)

    async def _anthropic_batch_results(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        entry.reply_kind = "batch"
        content = self.batches.results(request.path_params["batch_id"])
        if content is None:
            error = wire.anthropic_error("not_found_error", "batch not found")
            return self._json_reply(entry, error, None, status=404)
        return self._json_reply(entry, content, None, content_type="application/binary")

    async def _gemini_batch_get(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        found = gemini_batch(self.batches, request.path_params["batch_id"])
        error = wire.gemini_error(404, "Requested entity was not found.", "NOT_FOUND")
        return self._object_reply(entry, found, error)

    # Gemini's Files API: a batch's input uploaded, its responses file read and downloaded.

    async def _gemini_upload(self, request: Request) -> Response:
        """POST /upload/{version}/files, the resumable protocol google-genai's files.upload
        speaks: `X-Goog-Upload-Command: start` (the file's metadata as JSON) answers the URL
        to send the bytes to, on this request's own origin; then `upload` (a chunk at
        `X-Goog-Upload-Offset`) answers `active`, and `upload, finalize` (or `finalize`)
        answers `final` with the file object. `query` says how much was received. A refusal
        says `final` too, so the SDK gives up at once rather than retrying for seconds."""
        entry: LoggedRequest = request.scope[_ENTRY]
        entry.reply_kind = "batch"
        version: str = request.path_params["version"]
        ctype = "application/json; charset=UTF-8"
        commands = {
            c.strip().lower()
            for c in (entry.header("x-goog-upload-command") or "").split(",")
            if c.strip()
        }
        upload_id = request.query_params.get("upload_id")
        try:
            if upload_id is None:
                body = self._body(entry)
                if commands != {"start"} or body is None:
                    raise UploadRefused(
                        400, "Expected a resumable upload's start.", "INVALID_ARGUMENT"
                    )
                new_id = gemini_upload_start(
                    self.batches,
                    body,
                    entry.header("x-goog-upload-header-content-length"),
                    entry.header("x-goog-upload-header-content-type"),
                )
                url = (
                    f"{self._origin(entry)}/upload/{version}/files"
                    f"?upload_id={new_id}&upload_protocol=resumable"
                )
                headers = {
                    "X-Goog-Upload-Status": "active",
                    "X-Goog-Upload-URL": url,
                    "X-Goog-Upload-Control-URL": url,
                    "X-Goog-Upload-Chunk-Granularity": str(8 * 1024 * 1024),
                }
                return self._json_reply(
                    entry, b"", None, content_type="text/plain; charset=utf-8", headers=headers
                )
            if commands == {"query"}:
                found = self.batches.gemini_uploads.get(upload_id)
                if found is None:
                    raise UploadRefused(404, "Failed to find upload session.", "NOT_FOUND")
                headers = {
                    "X-Goog-Upload-Status": "active",
                    "X-Goog-Upload-Size-Received": str(len(found.received)),
                }
                return self._json_reply(
                    entry, b"", None, content_type="text/plain; charset=utf-8", headers=headers
                )
            if not commands or not commands <= {"upload", "finalize"}:
                raise UploadRefused(400, "Unknown X-Goog-Upload-Command.", "INVALID_ARGUMENT")
            file = gemini_upload_chunk(
                self.batches,
                upload_id,
                commands,
                entry.header("x-goog-upload-offset"),
                entry.body,
                self._origin(entry),
                version,
            )
        except UploadRefused as refused:
            err = wire.gemini_error(refused.status, str(refused), refused.grpc_status)
            return self._json_reply(
                entry,
                err,
                None,
                status=refused.status,
                content_type=ctype,
                headers={"X-Goog-Upload-Status": "final"},
            )
        if file is None:
            return self._json_reply(
                entry,
                b"",
                None,
                content_type="text/plain; charset=utf-8",
                headers={"X-Goog-Upload-Status": "active"},
            )
        payload = json.dumps({"file": file}, indent=2).encode()
        return self._json_reply(
            entry, payload, None, content_type=ctype, headers={"X-Goog-Upload-Status": "final"}
        )

    def _gemini_file_error(self, entry: LoggedRequest, file_id: str) -> Response:
        """An unknown file, as the API answers one (it tells no missing file from a file of
        another project's)."""
        err = wire.gemini_error(
            403,
            f"You do not have permission to access the File {file_id} or it may not exist.",
            "PERMISSION_DENIED",
        )
        return self._json_reply(
            entry, err, None, status=403, content_type="application/json; charset=UTF-8"
        )

    def _gemini_file_named(self, request: Request) -> tuple[LoggedRequest, GeminiFile | Response]:
        """The file a Gemini `/{version}/files/{id}…` request names, or the refusal to answer."""
        entry: LoggedRequest = request.scope[_ENTRY]
        entry.reply_kind = "batch"
        file_id: str = request.path_params["file_id"]
        found = self.batches.gemini_files.get(file_id)
        return entry, found if found is not None else self._gemini_file_error(entry, file_id)

    def _is_gemini(self, request: Request) -> bool:
        """Whether a `/{version}/files/…` path is Gemini's: its v1beta and v1alpha are, and its
        v1 (google-genai's default version) is told from OpenAI's by the client."""
        version = request.path_params.get("version")
        return version != "v1" or _gemini_client(request.scope[_ENTRY])

    async def _gemini_file_get(self, request: Request) -> Response:
        """GET /{version}/files/{id}: the file object (a generated one with its downloadUri)."""
        if not self._is_gemini(request):
            return await self._generic(request)
        entry, found = self._gemini_file_named(request)
        if not isinstance(found, GeminiFile):
            return found
        payload = gemini_file_object(found, self._origin(entry), request.path_params["version"])
        return self._json_reply(
            entry,
            json.dumps(payload, indent=2).encode(),
            None,
            content_type="application/json; charset=UTF-8",
        )

    async def _gemini_file_download(self, request: Request) -> Response:
        """GET [/download]/{version}/files/{id}:download?alt=media: a generated file's bytes
        (a batch's responses). google-genai's files.download asks without the `/download`
        prefix the file's downloadUri has; the API serves both. An uploaded file cannot be
        downloaded, as the API says."""
        if not self._is_gemini(request):
            return await self._generic(request)
        entry, found = self._gemini_file_named(request)
        if not isinstance(found, GeminiFile):
            return found
        if found.source != "GENERATED":
            err = wire.gemini_error(
                400, "Only generated files can be downloaded.", "INVALID_ARGUMENT"
            )
            return self._json_reply(
                entry, err, None, status=400, content_type="application/json; charset=UTF-8"
            )
        return self._json_reply(entry, found.content, None, content_type=found.mime_type)

    async def _generic(self, request: Request) -> Response:
        entry: LoggedRequest = request.scope[_ENTRY]
        entry.reply_kind = "generic"
        try:
            echoed = json.loads(entry.body) if entry.body else None
        except ValueError:
            echoed = None
        payload = {
            "ok": True,
            "method": entry.method,
            "path": entry.path,
            "query": dict(request.query_params),
            "json": echoed,
        }
        return self._json_reply(entry, json.dumps(payload).encode(), None)


def _gemini_client(entry: LoggedRequest) -> bool:
    """Whether a request on a path both OpenAI and Gemini use (`/v1/batches/{id}`,
    `/v1/files/{id}`) is Gemini's: sent to its host, or with its API key (google-genai's
    `x-goog-api-key` header, or `?key=`), where OpenAI's clients send a bearer token."""
    return (
        (entry.host or "").startswith("generativelanguage.")
        or entry.header("x-goog-api-key") is not None
        or any(part.startswith("key=") for part in entry.query.split("&"))
    )


def _image_request(entry: LoggedRequest) -> tuple[dict[str, Any] | None, int]:
    """(fields, number of uploaded images) of an Images API request; (None, 0) if unreadable.
    A multipart form is read with the standard library's MIME parser."""
    ctype = entry.header("content-type", "") or ""
    if ctype.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + entry.body
        )
        if not message.is_multipart():
            return None, 0
        fields: dict[str, Any] = {}
        uploads = 0
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name in ("image", "image[]", "mask", "markup"):
                uploads += 1
            elif isinstance(name, str):
                payload = part.get_payload(decode=True) or b""
                fields[name] = payload.decode("utf-8", "replace")
        return fields, uploads
    body = StandIn._body(entry)
    if body is None:
        return None, 0
    images = body.get("images")
    return body, (len(images) if isinstance(images, list) else 0) + (1 if body.get("mask") else 0)


def _transcription_request(entry: LoggedRequest) -> tuple[dict[str, str] | None, bytes | None]:
    """(text fields, the `file` upload) of a multipart transcription request; (None, None)
    if it is not one. Read with the standard library's MIME parser."""
    ctype = entry.header("content-type", "") or ""
    if not ctype.startswith("multipart/form-data"):
        return None, None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + entry.body
    )
    if not message.is_multipart():
        return None, None
    fields: dict[str, str] = {}
    audio = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "file":
            audio = payload
        elif isinstance(name, str):
            fields[name] = payload.decode("utf-8", "replace")
    return fields, audio


# InvokeModel families the stand-in answers: model id fragment -> family, and its prompt field.
_BEDROCK_FAMILIES = {
    "amazon.nova": "nova",
    "meta.llama": "llama",
    "amazon.titan-text": "titan",
    "mistral.": "mistral",
}
_BEDROCK_PROMPT = {"nova": "messages", "llama": "prompt", "titan": "inputText", "mistral": "prompt"}

_SIGV4 = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, ?SignedHeaders=(?P<signed>[^,]+), ?Signature=(?P<sig>[0-9a-f]+)"
)


def _sigv4_problem(entry: LoggedRequest, raw_path: bytes) -> str | None:
    """Why the request's SigV4 signature does not match it as received (None: it does),
    recomputed with botocore's signer from the headers the client signed."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    found = _SIGV4.fullmatch(entry.header("authorization") or "")
    if found is None:
        return "Missing or malformed Authorization header"
    if found["key"] != wire.AWS_ACCESS_KEY_ID:
        return "The security token included in the request is invalid."
    names = found["signed"].split(";")
    headers = {name: entry.header(name) or "" for name in names}
    query = f"?{entry.query}" if entry.query else ""
    signed = AWSRequest(
        method=entry.method,
        url=f"https://{headers.get('host', '')}{raw_path.decode('latin-1')}{query}",
        headers=headers,
        data=entry.body,
    )
    signed.context["timestamp"] = headers.get("x-amz-date", "")
    signer = SigV4Auth(
        Credentials(wire.AWS_ACCESS_KEY_ID, wire.AWS_SECRET_ACCESS_KEY),
        found["service"],
        found["region"],
    )
    expected = signer.signature(
        signer.string_to_sign(signed, signer.canonical_request(signed)), signed
    )
    if hmac.compare_digest(expected, found["sig"]):
        return None
    return (
        "The request signature we calculated does not match the signature you provided. "
        "Check your AWS Secret Access Key and signing method."
    )


def _entry_matches(entry: LoggedRequest, path_glob: str, method: str | None) -> bool:
    return (method is None or entry.method == method.upper()) and fnmatch.fnmatchcase(
        entry.path, path_glob
    )


@contextlib.contextmanager
def running_standin(tls: TlsMaterial) -> Iterator[StandIn]:
    """Start a StandIn for the duration of a with-block."""
    standin = StandIn(tls).start()
    try:
        yield standin
    finally:
        standin.stop()
