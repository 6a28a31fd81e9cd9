"""The mitmproxy addon: a thin hook class wiring the pipeline's stages together.

    requestheaders  identify (scope path), strip identity headers
    request         classify → estimate → authorize → reserve (ledger, off the loop) → forward or deny
    responseheaders attach the stream meter to SSE responses (bytes pass through as they arrive)
    response        measure → commit (or release on an upstream error)
    error           commit what was streamed, or release
    websocket_message  a Realtime API session: reserve each response.create (or drop it and
                    tell the agent), commit each response.done's usage
    websocket_end   release the session's responses never done

Per-flow state lives in `flow.metadata["drawdown"]`; every stage below is a plain
function in its own module, testable without a proxy.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import gc
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import layer, mode_specs, server_hooks
from mitmproxy.websocket import WebSocketMessage

from . import destinations, health, meter, metrics, recording, tunnels
from .affinity import WriterPlacement
from .authority import evaluate, facts_of
from .budgets import claims_for
from .classify import (
    Classification,
    RequestView,
    addressed,
    classify,
    first_values,
    normalize_path,
    unmatched,
)
from .escape import printable
from .identity import Caller, Identity, IdleRuns, header_map, identify, identity_headers
from .ledger import open_ledger
from .ledger.api import (
    Amount,
    BatchHold,
    Completion,
    DecisionRow,
    Fact,
    Guards,
    HistoryQuery,
    LedgerError,
    LedgerTooNew,
    NotALedger,
    ReserveOutcome,
    new_request_id,
)
from .ledger.dsn import is_postgres, redact_dsn
from .ledger.worker import AsyncLedger
from .meter import openai_realtime, tokenizer_process
from .meter.decode import BodyTooLarge, UndecodableBody, compressed, decode_body
from .meter.prices import url_provider
from .money import MAX_AMOUNT, usd_to_nanos
from .policy import Policy, PolicyInvalid, load_policy, policy_fingerprint
from .policy.match import dig, glob_regex, missing
from .policy.model import JUDGING_KEY, Judging, hostless_action
from .policy.source import Problem
from .realtime import RealtimeSession, UnreadableEvent, error_event, named, parse_event
from .respond import denial

log = logging.getLogger("drawdown")
# How far an answer drawdown reads (usage, a tool's cost, a batch's results file) is decoded.
ANSWER_DECODE_LIMIT = 512 * 1024 * 1024


class _PrintableArgs(logging.Filter):
    """Values quoted in log lines (model names, upstream errors) come from requests and responses:
    their control characters are escaped, so no one can forge a log line or drive a terminal.
    An error's text too: a record stays one line for a line-based log collector."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                printable(str(a)) if isinstance(a, str | BaseException) else a for a in record.args
            )
        return True


log.addFilter(_PrintableArgs())

STATE = "drawdown"
# A scrape of GET /metrics addressed to the proxy itself, answered in the `request` hook.
SCRAPE = "drawdown.metrics"
PROBES_AND_METRICS = health.PATHS | {metrics.PATH}
# Prompts above this size are tokenized on a worker thread (tiktoken releases the GIL);
# smaller ones cost less than the thread hop.
INLINE_TOKENIZE_BYTES = 16 * 1024


DRAIN_DEFAULT = "20"  # under the 30 s a container platform (Kubernetes, ECS) allows after SIGTERM
SECONDS_OPTIONS = (
    ("drawdown_reload_interval", "1", "Seconds between checks of the policy files for edits."),
    (
        "drawdown_maintenance_interval",
        "5",
        "Seconds between ledger heartbeats, sweeps of expired holds and TTL extensions of "
        "in-flight calls; at most a third of the policy's holds.lease and holds.ttl.",
    ),
    (
        "drawdown_ledger_timeout",
        "5",
        "Seconds one ledger operation may wait for a lock before the request is answered per on_ledger_error.",
    ),
    (
        "drawdown_upstream_timeout",
        "590",
        "Seconds a forwarded call may wait for the upstream's response headers before drawdown "
        "closes that upstream connection, the agent gets a 502 and the hold is released. Kept "
        "below mitmproxy's tcp_timeout (600), which would otherwise cut the agent's connection "
        "without an answer.",
    ),
)


def _seconds(name: str, text: str, *, zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 if zero else value > 0) or value >= 86400:
        raise exceptions.OptionsError(
            f"{name} must be a number of seconds, e.g. 0.5 or 5; got {text!r}"
        )
    return value


def shares_runs(option: str, ledger_url: str | None) -> bool:
    """Whether idle-split runs are minted in the ledger (drawdown_shared_runs). `auto`: on
    PostgreSQL, the database a fleet of proxies shares (docker compose's two behind one name),
    so an agent whose connections reach both stays in one run, its per-run budget one budget;
    a SQLite ledger's proxy keeps them in memory, a ledger round trip fewer a request
    (`--workers` sets true for its processes)."""
    if option == "auto":
        return is_postgres(ledger_url)
    return option == "true"


def _check_upstream_trust(cafile: str | None, capath: str | None) -> None:
    """Refuse at start an upstream CA file or folder that cannot be loaded: mitmproxy loads it
    for each upstream connection, so each call got a 502 and a traceback in the log instead."""
    if cafile:
        reason = ""
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cafile)
        except ssl.SSLError:  # an OSError too: caught first
            reason = "no PEM certificate OpenSSL can read in it"
        except OSError as exc:
            reason = exc.strerror or str(exc)
        if reason:
            raise exceptions.OptionsError(
                f"ssl_verify_upstream_trusted_ca: cannot load certificates from {cafile} ({reason})"
            )
    if capath and not os.path.isdir(capath):
        raise exceptions.OptionsError(
            f"ssl_verify_upstream_trusted_confdir: {capath} is not a folder of certificates"
        )


@dataclass
class FlowState:
    """What drawdown knows about one request, kept in flow.metadata[STATE]."""

    identity: Identity
    started: float
    # The ledger's key for this request: time-ordered, so its indexes grow at one edge.
    request_id: str = field(default_factory=new_request_id)
    policy: Policy | None = None
    classification: Classification | None = None
    llm: meter.LLMRequest | None = None
    view: RequestView | None = None
    row: DecisionRow | None = None
    facts: tuple[Fact, ...] = ()
    # Shadow budgets (budget, scope) already short at the reserve: the call's `would deny`
    # line said so, and its commit taking them further over is no news.
    shadow_short: frozenset[tuple[str, str]] = frozenset()
    decision: str = "allow"
    hold_id: int | None = None
    estimate: Amount = field(default_factory=Amount)
    stream_meter: Any = None
    measurement: meter.Measurement | None = None
    streamed_bytes: int = 0
    # The upstream's response, once its headers came (its `stream`: forwarded as it comes).
    answer: http.Response | None = None
    settled: bool = False
    denied: bool = False
    upstream_timer: asyncio.TimerHandle | None = None  # drawdown_upstream_timeout, once forwarded
    upstream_timed_out: bool = False
    # When the request hook let it go: mitmproxy sends it on once its upstream connection is up.
    forwarded_at: float | None = None
    # An MCP call answered as an event stream, read as it passes for whether it succeeded.
    mcp_events: McpEventScanner | None = None
    # A GET event stream that is no LLM call (an MCP client's channel for server messages):
    # open as long as the client's session, so a stop does not wait for it.
    listening: bool = False
    # A Realtime API session (a WebSocket upgrade): its responses are decided and metered
    # on the socket (the websocket_message hook).
    realtime: RealtimeSession | None = None

    @property
    def answered(self) -> int | None:
        """The status of the upstream's response headers, once they came."""
        return None if self.answer is None else self.answer.status_code

    def billed_before_cut(self) -> bool:
        """Its 2xx headers came but not its whole body, and no meter counted what did: the
        upstream did the work and bills it, so a cut charges the estimate (its upper bound)."""
        return (
            _success(self.answered)
            and self.stream_meter is None
            and bool(self.estimate.usd or self.estimate.tokens)
        )

    def billed_though_abandoned(
        self, reason: str, upstream: connection.Server, idle_cut: float, now: float
    ) -> bool:
        """The upstream had the whole request and the agent left before its answer (an SDK's
        timeout): the provider does the work and bills it all the same, so leaving early must
        be no way around a budget. An upstream that failed, or whose connection was not up
        yet (mitmproxy sends the request the moment it is), never had it: released. So is a
        call silent for `idle_cut` seconds (tcp_timeout): mitmproxy itself cut the agent off,
        as drawdown_upstream_timeout does, and reports it as the client gone."""
        connected = upstream.timestamp_tcp_setup is not None and (
            upstream.tls is False or upstream.timestamp_tls_setup is not None
        )
        return (
            self.forwarded_at is not None
            and now - self.forwarded_at < idle_cut
            and self.answered is None
            and connected
            and "client" in reason.lower()
        )

    def stop_upstream_timer(self) -> None:
        if self.upstream_timer is not None:
            self.upstream_timer.cancel()
            self.upstream_timer = None


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def fingerprint(kind: str, view: RequestView, classification: Classification) -> str:
    """What makes two requests "the same" for loop detection: action, method, path, query and body.

    For MCP the JSON-RPC ids differ on every call, so only each message's method and params count.
    """
    body = view.body
    if classification.mcp:
        document = view.json
        items = document if isinstance(document, list) else [document]
        body = json.dumps(
            [[i.get("method"), i.get("params")] for i in items if isinstance(i, dict)],
            sort_keys=True,
        ).encode()
    query = "&".join(f"{k}={v}" for k, v in sorted(view.query.items()))
    return hashlib.sha256(
        b"\0".join((kind.encode(), view.method.encode(), view.path.encode(), query.encode(), body))
    ).hexdigest()[:32]


def _names_given(flow: http.HTTPFlow) -> list[tuple[str, str]]:
    """The names a request gives the host it is for, besides where it is sent (its CONNECT's or
    URI's host), which an upstream may act on instead (classify.addressed)."""
    request = flow.request
    # One pass over the raw fields: Headers.get_all scans them with a key conversion each.
    names = [
        ("Host header", value.decode("utf-8", "surrogateescape"))
        for name, value in request.headers.fields
        if name.lower() == b"host"
    ]
    if request.data.authority:  # HTTP/2's :authority, or an absolute-form URI inside a tunnel
        where = ":authority" if request.is_http2 or request.is_http3 else "request URI"
        names.append((where, request.authority))
    if request.scheme == "https":
        # The SNI the upstream gets: mitmproxy sends the client's (or a reverse proxy's target).
        server, client = flow.server_conn, flow.client_conn
        sni = (server.sni if server.tls else None) or (client.sni if client.tls else None)
        if sni:
            names.append(("TLS SNI", sni))
    return names


def _logged_path(flow: http.HTTPFlow, classification: Classification | None = None) -> str:
    """The request's path as the ledger and the log may show it (credentials redacted)."""
    action = classification.action if classification else None
    path = normalize_path(flow.request.path.split("?", 1)[0])
    return recording.redact_path(path, action.match.path if action else None)


async def _request_body(request: http.Request, limit: int) -> tuple[bytes, str | None, int | None]:
    """The body as its upstream decodes it, why it cannot be (then b""), and its decoded size:
    mitmproxy's own reading decodes any Python codec a client names, and falls back to the
    raw bytes. Decoding stops past `limit` (the size is then None, the body b""): a few
    compressed bytes can decode to gigabytes. A compressed body is decoded off the event
    loop, since its size says nothing of how long that takes."""
    raw = request.raw_content or b""
    coding = request.headers.get("content-encoding")
    try:
        if raw and compressed(coding):
            body = await asyncio.to_thread(decode_body, raw, coding, limit)
        else:  # as it came, or refused for its coding: nothing to decode
            body = decode_body(raw, coding, limit)
    except BodyTooLarge:
        return b"", None, None
    except UndecodableBody as exc:
        return b"", str(exc), len(raw)
    return body, None, len(body)


def guards_for(policy: Policy, kinds: str | Sequence[str]) -> Guards | None:
    """The anomaly detectors set to `on_detect: deny` that apply to this action, as reserve-time
    guards. A JSON-RPC batch exercises several kinds: a detector guards it if it covers any."""
    settings = policy.anomalies
    loop, steps, fan_out = (settings.denying(name) for name in ("loop", "step_count", "fan_out"))
    names = (kinds,) if isinstance(kinds, str) else tuple(kinds)

    def covers(detector: Any) -> bool:
        return bool(detector) and any(detector.covers(kind) for kind in names)

    guards = Guards(
        max_repeats=loop.param("repeats") if covers(loop) else None,
        max_steps=steps.param("max") if covers(steps) else None,
        max_runs_per_workflow=fan_out.param("max_runs_per_workflow") if covers(fan_out) else None,
        retries=settings.get("loop").param("retries", 0),
        shadow=policy.mode == "shadow",
    )
    return guards if guards.any else None


def allow_hosts_regex(pattern: Any) -> str:
    """An action's host pattern as mitmproxy matches allow_hosts: a regex searched in "host:port"."""
    # The host part as compiled (an IPv6 address without its brackets): stripping brackets off
    # the text broke a glob class at either end, `[ab]pi.example.com`.
    port = str(pattern.port) if pattern.port is not None else r"\d+"
    # `api.openai.com.:443` (a fully qualified name) is the same host: decrypted and decided.
    return f"^{glob_regex(pattern.glob)}\\.?:{port}$"


def _log_denial(
    row: DecisionRow, *, shadow: bool, kind: str | None = None, reason: str | None = None
) -> None:
    """The one log line of a denial (or, in shadow mode, of what would have been denied)."""
    log.info(
        "drawdown: %s %s %s %s: %s",
        "would deny" if shadow else "deny",
        row.scope,
        (row.action if kind is None else kind) or "(no action)",  # a host no action names
        row.request_id,
        row.reason if reason is None else reason,
    )


def _within_ledger(completion: Completion, request_id: str) -> Completion:
    """Usage an upstream reports past the ledger's 64-bit range (no real call comes near
    10^18 tokens or $10^9) is charged at that bound, with a warning: the commit, and the
    batch it shares with other requests' operations, must not fail on it."""
    actual = completion.actual
    if max(actual.usd, actual.tokens, completion.tokens_in, completion.tokens_out) <= MAX_AMOUNT:
        return completion
    log.warning(
        "drawdown: %s: the upstream reported usage past what the ledger holds "
        "(%d nano-dollars, %d tokens); charged at 10^18 of each",
        request_id,
        actual.usd,
        actual.tokens,
    )
    return replace(
        completion,
        actual=Amount(
            usd=min(actual.usd, MAX_AMOUNT),
            tokens=min(actual.tokens, MAX_AMOUNT),
            requests=actual.requests,
        ),
        tokens_in=min(completion.tokens_in, MAX_AMOUNT),
        tokens_out=min(completion.tokens_out, MAX_AMOUNT),
        note=completion.note or "usage past the ledger's range, charged at its bound",
    )


def _cut_short(state: FlowState, reason: str, status: int | None) -> Completion:
    """A stream that ended after the upstream began answering: the provider bills what it
    generated, so the charge is what was streamed so far (counted) plus the prompt. A stream
    whose end had already passed was not cut: the client left (or the stop came) between its
    last byte and mitmproxy's closing the flow, and the charge is the whole answer's."""
    if state.measurement is not None:
        return _measured(state.measurement, status)
    return _measured(state.stream_meter.partial(), status, note=f"{recording.STREAM_CUT}{reason}")


def _status_the_agent_got(response: http.Response | None, reason: str) -> int | None:
    """The status a flow that ended in an error is recorded with: the one its agent got, since
    whether the agent's SDK retries it (and the guards forgive it: ledger.api.failed_attempt)
    depends on that. An answer forwarded as it came (a stream) had its headers sent on: the
    agent got them and part of the body, and no SDK retries a stream it was handed. A buffered
    answer reached the agent not at all, even when the upstream's 2xx headers had come before
    its body was lost: mitmproxy answers the agent 502 Bad Gateway, or nothing when the agent
    left first (or the flow was killed), and the SDK retries either."""
    if response is not None and response.stream:
        return response.status_code
    lowered = reason.lower()
    return None if "client" in lowered or "killed" in lowered else 502


def _success(status: int | None) -> bool:
    return status is not None and 200 <= status < 300


def _the_estimate(state: FlowState, status: int | None, note: str) -> Completion:
    """What a call whose answer was lost after the upstream billed it is charged: its estimate."""
    return Completion(actual=state.estimate, status=status, usage_source="estimate", note=note)


def _measured(
    measurement: meter.Measurement, status: int | None, note: str | None = None
) -> Completion:
    """What an LLM call is charged: the usage its meter found, priced."""
    usage = measurement.usage
    return Completion(
        actual=Amount(
            usd=measurement.usd_nanos,
            tokens=usage.input_tokens + usage.output_tokens,
            requests=1,
        ),
        status=status,
        tokens_in=usage.input_tokens,
        tokens_out=usage.output_tokens,
        usage_source=measurement.source,
        priced=measurement.priced,
        model=measurement.model,
        note=note,
    )


def _failed_answer(item: Any) -> bool:
    """A JSON-RPC response saying its call did not succeed: an error, or a tool result marked
    `isError` (MCP's "tool execution error": the tool ran and failed)."""
    if not isinstance(item, dict) or "method" in item:  # a server's request or notification
        return False
    result = item.get("result")
    return "error" in item or (isinstance(result, dict) and result.get("isError") is True)


class McpEventScanner:
    """An MCP answer streamed as server-sent events (the default of the official SDK's
    servers), read as it passes through untouched: did each call it answers succeed?"""

    # The mcp SDK client's own bound on one event: past it the client fails the call.
    MAX_EVENT_BYTES = 1 << 20

    def __init__(self) -> None:
        self.pending = b""
        self.answered = False
        self.failed = False

    def feed(self, data: bytes) -> None:
        if self.failed or not data:
            return
        edge = self.pending[-3:] + data
        self.pending += data
        if b"\n\n" not in edge and b"\r\r" not in edge and b"\r\n\r\n" not in edge:
            if len(self.pending) > self.MAX_EVENT_BYTES:
                self.failed = True
            return
        text, held = self.pending, b""
        if text.endswith(b"\r"):  # maybe the first half of a CRLF
            text, held = text[:-1], b"\r"
        *events, rest = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n")
        self.pending = rest + held
        for event in events:
            self._event(event)
        if len(self.pending) > self.MAX_EVENT_BYTES:
            self.failed = True

    def _event(self, event: bytes) -> None:
        kind, data = "message", []
        for line in event.split(b"\n"):
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"event":
                kind = value.decode("utf-8", "replace")
            elif name == b"data":
                data.append(value)
        if kind != "message" or not data or not any(data):
            return  # another event type, or a priming event (an id, no data)
        try:
            document = json.loads(b"\n".join(data))
        except (ValueError, RecursionError):  # the client cannot read it either: the call fails
            self.failed = True
            return
        for item in document if isinstance(document, list) else [document]:
            if isinstance(item, dict) and "method" not in item and "id" in item:
                self.answered = True
                self.failed = self.failed or _failed_answer(item)

    @property
    def succeeded(self) -> bool:
        return self.answered and not self.failed


def _mcp_calls(state: FlowState) -> bool:
    """The request holds an MCP call (not only a session's housekeeping)."""
    classification = state.classification
    return bool(classification and classification.mcp and not classification.mcp_housekeeping)


def _failed_json_answer(content: bytes) -> bool:
    try:
        document = json.loads(content or b"null")
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        return True
    items = document if isinstance(document, list) else [document]
    return any(_failed_answer(item) for item in items)


async def _mcp_call_failed(state: FlowState, response: http.Response) -> bool:
    """An MCP call answered 200 with a JSON-RPC error, or a tool result marked `isError`, did
    not succeed (no fact for `requires`; noted for replay's), whether answered as JSON or as
    an event stream. A big JSON answer is parsed off the event loop."""
    if not _mcp_calls(state):
        return False
    if state.mcp_events is not None:
        return not state.mcp_events.succeeded
    if not response.headers.get("content-type", "").startswith("application/json"):
        return False
    content = await _read_answer(response)
    if len(content) > INLINE_TOKENIZE_BYTES:
        return await asyncio.to_thread(_failed_json_answer, content)
    return _failed_json_answer(content)


def _answer(response: http.Response, limit: int | None = None) -> bytes:
    """An answer's body as its Content-Encoding decodes it, else as it came. An HTTP coding is
    decoded no further than ANSWER_DECODE_LIMIT: a host an agent runs (a catch-all action's)
    could answer a few kB that decode to gigabytes; past it the answer is read as none (its
    call charged its estimate or fixed cost). mitmproxy hands any other coding to Python's
    codecs, where `rot13` or `hex` fail with errors its non-strict reading does not catch.
    A smaller `limit` raises BodyTooLarge past it (_read_answer's inline try)."""
    raw = response.raw_content or b""
    coding = response.headers.get("content-encoding")
    if raw and compressed(coding):
        try:
            return decode_body(raw, coding, ANSWER_DECODE_LIMIT if limit is None else limit)
        except BodyTooLarge:
            if limit is not None:
                raise
            log.warning(
                "drawdown: an answer decodes to over %d bytes: not read (the call is charged "
                "its estimate or fixed cost)",
                ANSWER_DECODE_LIMIT,
            )
            return b""
        except UndecodableBody:  # corrupt, cut short, followed by more: as it came
            return raw
    try:
        return response.get_content(strict=False) or b""
    except Exception:
        return raw


async def _read_answer(response: http.Response) -> bytes:
    """_answer, with a compressed answer decoded off the event loop once it decodes past
    INLINE_TOKENIZE_BYTES: 0.2 MB of gzip that decodes to 256 MB stalled every agent 12 s.
    The usual small answer is still decoded here, without a thread's hop."""
    try:
        return _answer(response, INLINE_TOKENIZE_BYTES)
    except BodyTooLarge:
        return await asyncio.to_thread(_answer, response)


def _basic_credentials(value: str) -> tuple[str, str] | None:
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = (
            binascii.a2b_base64(encoded.strip()).decode("utf-8", "replace").partition(":")
        )
    except (binascii.Error, ValueError):
        return None
    return user, password


class Drawdown:
    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.ledger: AsyncLedger | None = None
        self.ledger_url: str | None = None
        # What became of the ledger's file when it was deleted or replaced under the running
        # proxy (SQLite): closed, and reopened only once a file is back at its path.
        self.ledger_lost: str | None = None
        # Why the ledger's URL, once reachable, is no ledger drawdown may use: logged once.
        self._reopen_refused: str | None = None
        self.idle_runs = IdleRuns()
        # Credentials an agent sent on its CONNECT, for every request of that tunnel.
        self.tunnel_credentials: weakref.WeakKeyDictionary[connection.Client, tuple[str, str]] = (
            weakref.WeakKeyDictionary()
        )
        self.inflight: dict[str, FlowState] = {}
        # The model each upstream's deployment names serve, learned from their answers.
        self.served = meter.ServedModels()
        self.batch_inputs = meter.BatchInputs()
        self.batch_file_uploads = meter.BatchFileUploads()
        # Commits and releases the ledger refused (a lock held past drawdown_ledger_timeout, a
        # full disk), by request id: tried again on every maintenance tick and at the stop.
        self.unsettled: dict[str, tuple[str, tuple[Any, ...]]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self._policy_seen: tuple[Any, ...] = ()
        # The last look met a link to nothing: the next looks again, changed or not.
        self._policy_recheck = False
        self._policy_rejected = False  # the last look at the policy's files reported errors
        # The ledger and the key under which it has the policy's anomaly settings
        # (_record_judging): done once per ledger opened and policy installed.
        self._judging_recorded: tuple[AsyncLedger, str] | None = None
        self.seconds: dict[str, float] = {
            name: float(default) for name, default, _ in SECONDS_OPTIONS
        }
        self.seconds["drawdown_drain"] = float(DRAIN_DEFAULT)
        self.draining = False  # `drain` began: no new call is taken
        # `drain` ended: the process stops within a few turns of the loop, too soon for an
        # answer decided now to be written, though its decision row would land (`done`).
        self.drained = False
        # Where a health probe may address this proxy (health.own_addresses), once running.
        self.own_addresses: frozenset[tuple[str, int]] = frozenset()
        self._deciding = 0  # requests between their headers and their reserve
        # Client connections told `Connection: close` during a drain, not yet closed: the
        # answer (a call's, or a `shutting_down` refusal) is written before mitmproxy closes
        # them, so a drain that stopped before they closed cut answers already decided.
        self._closing_clients: set[str] = set()
        # Flows answered during a drain on a connection that cannot be told to close (HTTP/2),
        # until their `response` (or `error`) hook is over.
        self._answering: set[str] = set()
        # Upstream connections made to the address their name was checked at (server_connect):
        # server id -> the (host, port) they are named by again once connected.
        self._pinned: dict[str, tuple[str, int]] = {}
        # What we set allow_hosts to for `unknown_hosts: passthrough` (never a user's own value).
        self._managed_allow_hosts: list[str] = []
        self._running = False
        # Option values every request needs, kept as configure sees them change.
        self._secret_password = False
        self._shared_runs = False
        self._internal_hosts = "local"
        self._metrics = True
        self.ledger_metrics = metrics.LedgerMetrics()

    # --- mitmproxy lifecycle -------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "drawdown_policy", str, "", "drawdown policy: a YAML file or a folder of *.yaml files."
        )
        loader.add_option(
            "drawdown_db",
            str,
            "drawdown.db",
            "drawdown ledger: PATH, sqlite:///PATH or postgresql://…",
        )
        loader.add_option(
            "drawdown_mode",
            str,
            "",
            "Override the policy's mode: 'enforce' or 'shadow' (empty: as the policy says).",
        )
        # Durations are text (mitmproxy's --set parses no floats): seconds, decimals allowed.
        for name, default, help_text in SECONDS_OPTIONS:
            loader.add_option(name, str, default, help_text)
        loader.add_option(
            "drawdown_drain",
            str,
            DRAIN_DEFAULT,
            "On SIGTERM/SIGINT (drawdown run): seconds the calls in flight, streams included, get "
            "to finish before the proxy stops. It stops taking connections at once and answers "
            "a new request on an open one 503, to be retried elsewhere; a call still streaming "
            "at the end is charged for what it streamed. 0, or a second signal: stop at once.",
        )
        loader.add_option(
            "drawdown_shared_runs",
            str,
            "auto",
            "Mint idle-split runs in the ledger rather than in this process, so that several proxy "
            "processes serving one agent agree on its run: true (set by drawdown run --workers), "
            "false, or auto: true on a PostgreSQL ledger, a fleet's, else false.",
            choices=["auto", "true", "false"],
        )
        loader.add_option(
            "drawdown_batch_writer",
            bool,
            False,
            "Run the ledger writer under SCHED_BATCH (Linux): woken beside a busy event loop, it "
            "waits for the loop rather than preempt it, and carries more operations a transaction "
            "(set by drawdown run --workers when the workers take every CPU).",
        )
        loader.add_option(
            "drawdown_internal_hosts",
            str,
            "local",
            "Upstreams on the proxy's own host (loopback, link-local, unspecified, its own "
            "addresses, the clouds' metadata addresses): 'local' refuses them to clients on "
            "other hosts, 'deny' to every client, 'allow' to none.",
            choices=destinations.MODES,
        )
        loader.add_option(
            "drawdown_metrics",
            bool,
            True,
            "Answer GET /metrics on the proxy's own port with Prometheus metrics (decisions, "
            "charges, holds, ledger errors and latency, policy reloads), counted on the ledger's "
            "writer thread. Off: nothing is counted and /metrics is answered 404.",
        )
        loader.add_option(
            "drawdown_tokenizer_process",
            bool,
            True,
            "Count big prompt texts (32k characters or more) in a child process, so that their "
            "encode does not hold the GIL the event loop needs. Off: a worker thread counts them.",
        )

    def configure(self, updated: set[str]) -> None:
        for name, _, _ in SECONDS_OPTIONS:
            if name in updated:
                self.seconds[name] = _seconds(name, getattr(ctx.options, name))
        if "drawdown_drain" in updated:
            self.seconds["drawdown_drain"] = _seconds(
                "drawdown_drain", ctx.options.drawdown_drain, zero=True
            )
        if "rawtcp" in updated and ctx.options.rawtcp:
            # mitmproxy would relay byte for byte a tunnel drawdown cannot read: every call
            # inside would pass unseen (tunnels.py). `tcp_hosts`, set by hand, still relays.
            log.info("drawdown: rawtcp is off: a tunnel that is neither TLS nor HTTP is refused")
            ctx.options.update(rawtcp=False)
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            # mitmproxy would send a large request upstream as it comes in, before the `request`
            # hook: undecided, unreserved. (Event streams are never buffered in any case.)
            raise exceptions.OptionsError(
                "stream_large_bodies cannot be used with drawdown: it forwards large requests "
                "before drawdown has decided on them (event streams are streamed regardless)"
            )
        if updated & {"ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir"}:
            _check_upstream_trust(
                ctx.options.ssl_verify_upstream_trusted_ca,
                ctx.options.ssl_verify_upstream_trusted_confdir,
            )
        if "drawdown_mode" in updated and ctx.options.drawdown_mode not in (
            "",
            "enforce",
            "shadow",
        ):
            raise exceptions.OptionsError("drawdown_mode must be 'enforce' or 'shadow'")
        if updated & {"drawdown_policy", "drawdown_mode"}:
            if not ctx.options.drawdown_policy:
                raise exceptions.OptionsError(
                    "drawdown_policy is not set: point it at a policy file or folder"
                )
            try:
                self._install_policy(load_policy(ctx.options.drawdown_policy))
            except PolicyInvalid as exc:
                raise exceptions.OptionsError(f"invalid drawdown policy:\n{exc}") from None
            self._policy_seen = policy_fingerprint(ctx.options.drawdown_policy)
        if (
            "drawdown_internal_hosts" in updated
            and ctx.options.drawdown_internal_hosts not in destinations.MODES
        ):
            raise exceptions.OptionsError(
                f"drawdown_internal_hosts must be one of {', '.join(destinations.MODES)}, not "
                f"{ctx.options.drawdown_internal_hosts!r}"
            )
        if "drawdown_internal_hosts" in updated:
            self._internal_hosts = ctx.options.drawdown_internal_hosts
        if "drawdown_metrics" in updated:
            self._metrics = ctx.options.drawdown_metrics
            if self.ledger is not None:
                self.ledger.observer = self._ledger_observer()
            if not self._metrics:  # their settlements go uncounted: open no longer
                self.ledger_metrics.forget_holds()
        if "drawdown_db" in updated and ctx.options.drawdown_db != self.ledger_url:
            self._open_ledger(ctx.options.drawdown_db)
        if "drawdown_tokenizer_process" in updated and self._running:
            if ctx.options.drawdown_tokenizer_process:
                tokenizer_process.use_tokenizer_process()
            else:  # joining the child is blocking
                self._spawn(asyncio.to_thread(tokenizer_process.stop_tokenizer_process))
        if "proxyauth" in updated:
            # With real credentials (htpasswd, user:pass) the password is a secret.
            auth = ctx.options.proxyauth
            self._secret_password = bool(auth) and auth != "any"
        if "drawdown_shared_runs" in updated and ctx.options.drawdown_shared_runs not in (
            "auto",
            "true",
            "false",
        ):
            raise exceptions.OptionsError(
                "drawdown_shared_runs must be auto, true or false, not "
                f"{ctx.options.drawdown_shared_runs!r}"
            )
        if updated & {"drawdown_shared_runs", "drawdown_db"}:
            self._shared_runs = shares_runs(
                ctx.options.drawdown_shared_runs, ctx.options.drawdown_db
            )
        if "drawdown_batch_writer" in updated and self.ledger is not None:
            self.ledger.batch_scheduling = ctx.options.drawdown_batch_writer
        if updated & {"listen_host", "proxyauth"}:
            host = ctx.options.listen_host
            if not _loopback(host) and not ctx.options.proxyauth:
                raise exceptions.OptionsError(
                    f"refusing to listen on {host or 'all interfaces'} without proxy authentication: "
                    "anyone who can reach the proxy could claim any agent identity. Listen on 127.0.0.1, "
                    "or configure credentials with --set proxyauth=@/path/to/htpasswd."
                )

    def running(self) -> None:
        self._running = True
        # A probe or scrape may come at once, before the machine's names are resolved (in
        # _warm_up): taken for an agent's call, it was decided, recorded and answered 502.
        self.own_addresses = health.own_addresses(self._listening(), machine=False)
        if ctx.options.drawdown_tokenizer_process:
            tokenizer_process.use_tokenizer_process()  # its child starts on the first big text
        self._spawn(self._warm_up())
        self._spawn(self._record_judging())
        self._spawn(self._maintain())
        self._spawn(self._watch_policy())

    def _listening(self) -> list[tuple[str, int]]:
        server = ctx.master.addons.get("proxyserver")  # absent in a test's bare master
        return [(host, port) for host, port, *_ in server.listen_addrs()] if server else []

    async def _warm_up(self) -> None:
        # The machine's own names are resolved off the loop: a resolver may take its time.
        self.own_addresses = await asyncio.to_thread(health.own_addresses, self._listening())
        bedrock = self.policy is not None and any(
            action.provider == "bedrock" for action in self.policy.actions
        )
        await asyncio.to_thread(meter.warm_up, bedrock=bedrock)
        # Everything loaded so far (mitmproxy, price data, policies) lives as long as the process:
        # freezing it keeps the garbage collector's full passes from rescanning it while traffic
        # flows (they paused the loop ~80 ms each).
        gc.freeze()

    def done(self) -> None:
        self._running = False
        for task in self.tasks:
            task.cancel()
        tokenizer_process.stop_tokenizer_process()
        if self.ledger is not None:
            # The writer first: what it still has queued (a reserve past the drain's deadline, a
            # commit) lands before the holds are released, not after, which would leave that
            # hold to lapse uncharged with the lease. Then the ledger is only called from here.
            self.ledger.close()
            self._settle_unsettled_at_stop()
            self._charge_cut_streams()
            try:
                released = self.ledger.call_sync("release_mine", time.time(), "proxy shut down")
                if released:
                    log.info(
                        "drawdown: released %d hold(s) of in-flight requests at shutdown", released
                    )
            except LedgerError as exc:
                log.warning(
                    "drawdown: could not release holds at shutdown (%s); they lapse with this proxy's lease",
                    exc,
                )
            try:
                self.ledger.ledger.close()
            except LedgerError:
                pass
            self.ledger = None

    def _settle_unsettled_at_stop(self) -> None:
        """A last try for what the ledger refused, before the stop releases this proxy's holds:
        released first, a commit that lands later would find its hold gone and charge nothing."""
        assert self.ledger is not None
        for request_id, (name, args) in list(self.unsettled.items()):
            try:
                self.ledger.call_sync(name, *args)
            except LedgerError as exc:
                # Each try may wait out drawdown_ledger_timeout: one refusal speaks for the rest.
                log.error(
                    "drawdown: could not settle %d call(s) at shutdown either (%s); their holds "
                    "are released with this proxy's others: %s",
                    len(self.unsettled),
                    exc,
                    ", ".join(self.unsettled),
                )
                return
            del self.unsettled[request_id]
            log.info("drawdown: settled %s at shutdown, on a later attempt", request_id)

    def _charge_cut_streams(self) -> None:
        """At shutdown: a stream that had begun answering is charged for what it streamed (the
        provider bills it), and an answer whose 2xx headers came its estimate, as when their
        connection breaks; the other holds are released."""
        assert self.ledger is not None
        for state in list(self.inflight.values()):
            if state.settled or state.hold_id is None:
                continue
            # The stop closes the agent's connection: it got the headers of an answer forwarded
            # as it came (a stream, which no SDK retries), else no answer (which it retries).
            forwarded = state.answer is not None and bool(state.answer.stream)
            status = state.answered if forwarded else None
            if state.stream_meter is not None and state.streamed_bytes:
                completion = _cut_short(state, "proxy shut down", status)
            elif state.billed_before_cut():
                completion = _the_estimate(
                    state, status, f"{recording.RESPONSE_CUT}proxy shut down"
                )
            else:
                continue
            state.settled = True
            try:
                self.ledger.call_sync(
                    "commit",
                    state.request_id,
                    state.hold_id,
                    _within_ledger(completion, state.request_id),
                    time.time(),
                )
            except LedgerError as exc:
                log.warning(
                    "drawdown: could not charge %s, cut short at shutdown (%s); its hold is "
                    "released",
                    state.request_id,
                    exc,
                )

    async def drain(self) -> None:
        """Stop taking calls, then give those in flight up to drawdown_drain seconds to finish.

        `drawdown run` awaits this on SIGTERM/SIGINT before it shuts mitmproxy down: a deploy
        or a scale-down would otherwise cut every stream in flight."""
        if self.draining:
            return
        self.draining = True
        ctx.options.update(server=False)  # closes the listening sockets; open connections go on
        seconds = self.seconds["drawdown_drain"]

        def calls() -> int:
            in_flight = sum(not s.listening for s in self.inflight.values())
            return self._deciding + in_flight + len(self._closing_clients) + len(self._answering)

        if not calls() or not seconds:
            self.drained = True
            return
        log.info(
            "drawdown: stopping; %d call(s) in flight get up to %gs to finish "
            "(a second signal stops at once)",
            calls(),
            seconds,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while calls() and (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(0.05, left))  # shutdown only: a poll costs nothing
        self.drained = True  # no await since calls() was last read
        if unfinished := calls():
            log.warning(
                "drawdown: %d call(s) still in flight after %gs; stopping anyway",
                unfinished,
                seconds,
            )
        else:
            log.info("drawdown: every call in flight finished")

    # --- policy and ledger ---------------------------------------------------------------

    def _install_policy(self, policy: Policy) -> None:
        mode = ctx.options.drawdown_mode
        if mode:
            policy = replace(policy, mode=mode)
        self.policy = policy
        self.ledger_metrics.kinds = metrics.kinds_of(policy)
        # As `drawdown check` prints them: a reload to a policy with no actions took every deny
        # and budget away without a word.
        for warning in policy.warnings:
            log.warning("drawdown: %s", str(warning))
        self._apply_passthrough(policy)

    def _apply_passthrough(self, policy: Policy) -> None:
        """`unknown_hosts: passthrough`: only the hosts actions name are decrypted (mitmproxy's allow_hosts)."""
        wanted: list[str] = []
        # With an action for every host there is nothing to pass through: Policy.warnings
        # says so, logged as the policy is installed.
        if policy.unknown_hosts == "passthrough" and hostless_action(policy.actions) is None:
            wanted = sorted({allow_hosts_regex(h) for a in policy.actions for h in a.match.hosts})
        current = list(ctx.options.allow_hosts)
        if current == self._managed_allow_hosts and current != wanted:
            ctx.options.update(allow_hosts=wanted)
            self._managed_allow_hosts = wanted
        elif current != self._managed_allow_hosts and wanted:
            log.warning(
                "drawdown: allow_hosts is set by hand; unknown_hosts: passthrough leaves it as it is"
            )

    def _open_ledger(self, url: str) -> None:
        unavailable: LedgerError | None = None
        try:
            backend = open_ledger(url, timeout=self.seconds["drawdown_ledger_timeout"])
        except (LedgerTooNew, NotALedger) as exc:
            # No waiting makes either a ledger: the option is refused (mitmproxy restores the
            # old value) and the ledger in use, if any, stays in use.
            raise exceptions.OptionsError(str(exc)) from None
        except LedgerError as exc:
            unavailable = exc
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
            self.ledger_metrics.forget_holds()
        self.ledger_url = url
        self.ledger_lost = None
        if unavailable is not None:
            # Stay up: requests are answered per on_ledger_error until the ledger can be opened.
            # (A warning, not an error: mitmproxy exits on errors logged during start-up.)
            log.warning(
                "drawdown: %s — answering requests per on_ledger_error until it can be opened",
                unavailable,
            )
            return
        self.ledger = self._async_ledger(backend)
        lease = self.policy.holds.lease_seconds if self.policy else 30
        swept = backend.sweep(time.time(), lease)
        if swept:
            log.info("drawdown: start-up sweep released %d hold(s) left by stopped proxies", swept)

    def _async_ledger(self, backend: Any) -> AsyncLedger:
        return AsyncLedger(
            backend,
            placement=WriterPlacement.from_environment(),
            batch_scheduling=ctx.options.drawdown_batch_writer,
            observer=self._ledger_observer(),
        )

    def _ledger_observer(self) -> Callable[[list[Any], list[Any], float], None] | None:
        return self.ledger_metrics.observe if self._metrics else None

    async def _maintain(self) -> None:
        """Heartbeat this proxy's lease, sweep expired holds, keep in-flight calls' holds alive."""
        while True:
            await asyncio.sleep(self._maintenance_every())
            if self.ledger is None:
                if self.ledger_url:
                    await asyncio.to_thread(self._reopen_ledger)
                continue
            if await self._ledger_file_lost(self.ledger):
                continue
            policy = self.policy
            now = time.time()
            await self._retry_settlements()
            await self._record_judging()  # if the ledger could not take it before
            try:
                await self.ledger.call("heartbeat", now)
                live = [
                    s.hold_id
                    for s in self.inflight.values()
                    if s.hold_id is not None and not s.settled
                ]
                if live and policy:
                    await self.ledger.call("extend", live, now + policy.holds.ttl_seconds)
                if policy:
                    swept = await self.ledger.call("sweep", now, policy.holds.lease_seconds)
                    if swept:
                        log.info("drawdown: sweeper released %d expired hold(s)", swept)
            except LedgerError as exc:
                log.warning("drawdown: ledger maintenance failed: %s", exc)

    async def _record_judging(self) -> None:
        """Keep the policy's anomaly settings in the ledger, by the digest its decisions
        carry, so that `drawdown report` without --policy judges them by these, not by the
        built-in ones. Once per ledger and policy; a failure is tried again at the next tick."""
        ledger, policy = self.ledger, self.policy
        if ledger is None or policy is None or not policy.digest:
            return
        key = JUDGING_KEY + policy.digest[:16]
        done = self._judging_recorded
        if done is not None and done[0] is ledger and done[1] == key:
            return
        try:
            await ledger.call("remember", key, Judging.of(policy).record())
        except LedgerError as exc:
            log.debug("drawdown: policy settings not recorded yet: %s", exc)
            return
        self._judging_recorded = (ledger, key)

    async def _ledger_file_lost(self, ledger: AsyncLedger) -> bool:
        """Whether the ledger's file was deleted or replaced under the proxy (then it is closed).

        SQLite goes on writing to the file it opened, deleted or not: calls kept getting 200
        while their spend went where no other worker, report or restart would see it. An
        unavailable ledger is said so, and answered per on_ledger_error, instead."""
        lost = getattr(ledger.ledger, "lost", None)  # PostgreSQL has no file to lose
        if lost is None:
            return False
        what = await asyncio.to_thread(lost)  # a stat: disk I/O, off the loop
        if what is None or self.ledger is not ledger:
            return False
        self.ledger, self.ledger_lost = None, what
        # Their holds were in the lost file: the same ids name other holds (or none) in any
        # file reopened later, so nothing of theirs is settled anywhere.
        uncharged = len(self.unsettled) + sum(
            s.hold_id is not None and not s.settled for s in self.inflight.values()
        )
        self.unsettled.clear()
        for state in self.inflight.values():
            state.hold_id = None
        log.error(
            "drawdown: ledger %s was %s under the running proxy; it is closed, calls are "
            "answered per on_ledger_error and /readyz is not ready until a ledger file is back "
            "at that path (put the file back; or restart the proxy, which starts a new, empty "
            "ledger: every budget starts unspent)%s",
            redact_dsn(self.ledger_url or ""),
            what,
            f"; {uncharged} call(s) held in it go uncharged" if uncharged else "",
        )
        await ledger.aclose()
        self.ledger_metrics.forget_holds()  # settled in no ledger: no longer open here
        try:
            await asyncio.to_thread(ledger.ledger.close)
        except LedgerError:
            pass
        return True

    async def _retry_settlements(self) -> None:
        """Try again what the ledger refused. Trying twice never charges twice: a hold already
        settled is left as it is, and a commit whose hold the sweeper expired meanwhile is still
        charged (a `late_commit`), so the call's spend is not lost with its hold's TTL."""
        if self.ledger is None or not self.unsettled:
            return
        pending = list(self.unsettled.items())
        # Queued together, so the writer takes them in one batch; one still refused (the next
        # tick tries it again) does not hold the others back.
        outcomes = await asyncio.gather(
            *(self.ledger.call(name, *args) for _, (name, args) in pending),
            return_exceptions=True,
        )
        for (request_id, _), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, LedgerError):
                continue
            self.unsettled.pop(request_id, None)
            if isinstance(outcome, BaseException):  # a bug, not the ledger: trying again won't help
                log.error(
                    "drawdown: settling %s failed; its hold expires with its TTL",
                    request_id,
                    exc_info=outcome,
                )
                continue
            log.info("drawdown: settled %s on a later attempt", request_id)

    def _maintenance_every(self) -> float:
        """drawdown_maintenance_interval, or less: three heartbeats and TTL extensions within
        the policy's lease and TTL. At one every 5 s under `lease: 2`, this proxy's lease lapsed
        between heartbeats and another proxy released the holds of its calls still in flight."""
        every = self.seconds["drawdown_maintenance_interval"]
        if self.policy is not None:
            holds = self.policy.holds
            every = min(every, holds.lease_seconds / 3, holds.ttl_seconds / 3)
        return every

    def _reopen_ledger(self) -> None:
        lost = self.ledger_lost
        try:
            backend = open_ledger(
                self.ledger_url or "",
                timeout=self.seconds["drawdown_ledger_timeout"],
                # A lost file is reopened once one is back, never made anew with empty budgets.
                **({"create": False} if lost else {}),
            )
        except (LedgerTooNew, NotALedger) as exc:
            # Reachable at last, and no ledger to use (an application's schema, a newer
            # drawdown's): said once, where it was silent 503s, and looked at again each tick.
            if str(exc) != self._reopen_refused:
                self._reopen_refused = str(exc)
                log.warning("drawdown: %s; answering per on_ledger_error until it is", exc)
            return
        except LedgerError:
            return
        self._reopen_refused = None
        self.ledger_lost = None
        self.ledger = self._async_ledger(backend)
        log.info(
            "drawdown: ledger %s is available again%s",
            redact_dsn(self.ledger_url or ""),
            f" (it was {lost}: the budgets are those of the file now there)" if lost else "",
        )

    async def _watch_policy(self) -> None:
        """Hot reload: a good edit takes over for new requests; a broken one is reported and ignored."""
        path = ctx.options.drawdown_policy
        while True:
            await asyncio.sleep(self.seconds["drawdown_reload_interval"])
            await self._look_at_policy(path)

    async def _look_at_policy(self, path: str) -> None:
        """One look of the watcher at the policy's files: reloaded when they changed."""
        seen = await asyncio.to_thread(policy_fingerprint, path)
        if seen == self._policy_seen and not self._policy_recheck:
            return
        # A write in progress (a file saved in place, a copy of several files) can leave a
        # policy that parses and validates without its end, a deny rule or a budget short: it
        # is loaded once its files have stayed the same for one interval.
        await asyncio.sleep(self.seconds["drawdown_reload_interval"])
        if await asyncio.to_thread(policy_fingerprint, path) != seen:
            return  # still being written: looked at again next time
        self._policy_seen = seen  # a broken edit is reported once, not at every look
        # Whatever the load meets (a folder unreadable for a moment, a bug), the watcher
        # reports it and goes on: dead, it would silently ignore every later edit.
        try:
            policy = await asyncio.to_thread(load_policy, path)
        except (PolicyInvalid, OSError) as exc:
            problems = (isinstance(exc, PolicyInvalid) and exc.problems) or [exc]
            if not self._policy_recheck and any(
                isinstance(p, Problem) and p.link_to_nothing for p in problems
            ):
                # A ConfigMap update: kubelet points `..data` at the new files before it
                # removes the links of those it dropped. Looked at again next time: gone by
                # then (a reload), or reported.
                self._policy_recheck = True
                return
            self._policy_recheck = False
            # One record a problem, each `FILE:LINE: message`: a collector reading lines
            # would split a record of several, and the later lines lose the prefix.
            for problem in problems:
                log.error(
                    "drawdown: policy edit rejected, the last good policy stays in force: %s",
                    str(problem),
                )
            self._policy_rejected = True
            metrics.policy_reloaded(applied=False)
            return
        except Exception:
            self._policy_recheck = False
            log.exception("drawdown: could not reload %s; the last good policy stays", path)
            self._policy_rejected = True
            metrics.policy_reloaded(applied=False)
            return
        self._policy_recheck = False
        rejected, self._policy_rejected = self._policy_rejected, False
        if self.policy is not None and policy.digest == self.policy.digest:
            # Files touched, saved unchanged, or put back as they were after a broken edit:
            # nothing to reload, said only when a rejection was the last word on them.
            if rejected:
                log.info(
                    "drawdown: %s is valid again: it is the policy in force (policy %s)",
                    path,
                    policy.digest[:16],
                )
                metrics.POLICY_REJECTED.set(0)  # no edit rejected stands: no reload either
            return
        self._install_policy(policy)
        self._spawn(self._record_judging())
        metrics.policy_reloaded(applied=True)
        # The digest its decisions carry, as a report names the policy it judged by.
        log.info("drawdown: policy reloaded from %s (policy %s)", path, policy.digest[:16])
        override = ctx.options.drawdown_mode
        if override and policy.mode != override:
            # A team switching to enforce edits the file; the flag would silently win.
            log.warning(
                "drawdown: %s is in %s mode (its `mode:`, enforce where it names none), but "
                "--mode %s overrides it until the proxy restarts without --mode",
                path,
                policy.mode,
                override,
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- hooks ---------------------------------------------------------------------------

    def _answer_probe(self, flow: http.HTTPFlow) -> bool:
        """An orchestrator's /healthz or /readyz, addressed to the proxy itself: answered here,
        unrecorded, without proxy authentication (a probe carries none; it learns nothing
        but whether this process can take calls)."""
        request = flow.request
        if flow.error or not health.to_proxy(
            request.host, request.port, flow.client_conn.tls, self.own_addresses
        ):
            return False
        paths = PROBES_AND_METRICS if self._metrics else health.PATHS
        if not health.addressed_to_proxy(
            request.method,
            request.host,
            request.port,
            request.path,
            False,
            self.own_addresses,
            paths,
        ):
            # Any other request to the proxy itself (`curl http://127.0.0.1:8080/`) is no call
            # of an agent's: it was decided and recorded as one (a run of its own, a failed
            # attempt), then answered 502 by mitmproxy, which will not connect to itself.
            answering = (  # with drawdown_metrics=false, /metrics is no path of the proxy's
                b"/healthz, /readyz and /metrics" if self._metrics else b"/healthz and /readyz"
            )
            flow.response = http.Response.make(
                404,
                b'{"error": "drawdown: this is a forward proxy: send requests through it '
                b"(HTTPS_PROXY), not to it; GET " + answering + b' answer here"}\n',
                {"content-type": "application/json", "cache-control": "no-store"},
            )
            return True
        if request.path.split("?", 1)[0] == metrics.PATH:
            # Answered in `request`: workers' values are files. Without credentials, as the
            # probes: mitmproxy's ProxyAuth ran first and answered it 407.
            flow.response = None
            flow.metadata[SCRAPE] = True
            return True
        readiness = health.Readiness(
            policy_loaded=self.policy is not None,
            ledger_open=self.ledger is not None,
            draining=self.draining,
            ledger_lost=self.ledger_lost,
        )
        status, body = health.answer(request.path, readiness)
        flow.response = http.Response.make(
            status,
            b"" if request.method.upper() == "HEAD" else body,
            {"content-type": "application/json", "cache-control": "no-store"},
        )
        return True

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """A name that resolves to an address on this host, or does not resolve, is refused
        where mitmproxy connects (a literal one was refused with the request: `_decide`), and
        the connection goes to the address checked, so that a second lookup cannot answer
        otherwise."""
        server = data.server
        mode = self._internal_hosts
        proxy_mode = data.client.proxy_mode
        if (
            mode == "allow"
            or server.error
            or not server.address
            # The upstream proxy the operator named (`--mode upstream:…`), which every request
            # goes through and which resolves their names (server.via is on the request's
            # connection, never on the one opened).
            or (
                isinstance(proxy_mode, mode_specs.UpstreamMode)
                and server.address == proxy_mode.address
            )
            or not destinations.guarded(mode, data.client)
        ):
            return
        host, port = server.address
        try:
            addresses = await destinations.resolve(host, port)
        except OSError as exc:
            # Refused, not left to mitmproxy's own lookup, which may answer otherwise: a name
            # whose first lookup fails, then resolves to 127.0.0.1, would pass unchecked.
            server.error = f"drawdown: cannot resolve {host}: {exc}"
            return
        for address in addresses:
            if kind := destinations.internal_here(address):
                server.error = destinations.refusal(host, address, kind)
                return
        if addresses and str(addresses[0]) != host:
            # A literal the resolver would read otherwise too (`8.8.8.8%x`, checked as 8.8.8.8,
            # is a name to getaddrinfo): the connection goes to the address checked.
            # TLS still names the host (as mitmproxy would: the client's SNI, else the host).
            server.sni = server.sni or data.client.sni or host
            self._pinned[server.id] = server.address
            server.address = (str(addresses[0]), port)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        # Named again by its host: mitmproxy reuses a connection for the requests whose
        # host and port it has as its address, and a tunnel's requests take their host from
        # it. mitmproxy refuses `server.address = …` on an open connection (it would no longer
        # say where the connection goes; an Addon error, the IP left): this one goes where its
        # name resolved, so it is set beneath that guard.
        if (address := self._pinned.pop(data.server.id, None)) is not None:
            object.__setattr__(data.server, "address", address)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        if (address := self._pinned.pop(data.server.id, None)) is not None:
            data.server.address = address

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # An unmodified agent names itself in HTTPS_PROXY=http://AGENT:RUN@host:port; the
        # credentials arrive once, on the CONNECT, and apply to every request in the tunnel.
        if flow.response or flow.error:
            return
        if "proxyauth" in flow.metadata:  # mitmproxy's own ProxyAuth validated them
            self.tunnel_credentials[flow.client_conn] = flow.metadata["proxyauth"]
            return
        value = flow.request.headers.get("proxy-authorization")
        if value and (credentials := _basic_credentials(value)):
            self.tunnel_credentials[flow.client_conn] = credentials

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """A tunnel carries TLS or HTTP, or nothing (tunnels.py)."""
        tunnels.decide(nextlayer)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self._answer_probe(flow):
            return
        if flow.response or flow.error or self.policy is None:
            return
        validated = flow.metadata.get(
            "proxyauth"
        )  # set by mitmproxy's ProxyAuth when it checked them
        credentials = validated or self.tunnel_credentials.get(flow.client_conn)
        if credentials is None and (value := flow.request.headers.get("proxy-authorization")):
            credentials = _basic_credentials(value)
        headers = header_map(flow.request.headers.fields)
        caller = Caller(
            headers=headers,
            proxy_user=credentials[0] if credentials else None,
            # A password that is a real secret must never become a run id in the ledger.
            proxy_password=credentials[1] if credentials and not self._secret_password else None,
            client_ip=flow.client_conn.peername[0] if flow.client_conn.peername else None,
            authenticated_user=validated[0] if validated else None,
        )
        now = time.time()
        idle_runs = None if self._shared_runs else self.idle_runs
        identity = identify(self.policy.identity, caller, idle_runs, now)
        # Names from the map built above: Headers.keys() looks every name up again, a scan each.
        for name in identity_headers(list(headers)):
            del flow.request.headers[name]
        if "proxy-authorization" in headers:
            del flow.request.headers["proxy-authorization"]
        if "sec-websocket-extensions" in headers:
            # No permessage-deflate on a WebSocket through drawdown: mitmproxy inflates a
            # message without bound and holds it whole, so 0.5 MB from an agent (or a server)
            # became 2.8 GB in the proxy and stalled every agent 12 s. Uncompressed, what a
            # message costs here is what it costs on the wire; both ends speak it (RFC 7692:
            # the extension is only ever offered).
            del flow.request.headers["sec-websocket-extensions"]
        if flow.request.stream:
            # Set by stream_large_bodies: mitmproxy would send the body upstream as it comes,
            # before the `request` hook, so before this proxy has decided and reserved. A
            # request is decided on its whole body; body_size_limit still bounds it.
            flow.request.stream = False
        flow.metadata[STATE] = FlowState(identity=identity, started=now)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(SCRAPE) and not (flow.response or flow.error):
            accept = flow.request.headers.get("accept", "")
            try:
                text, content_type = await asyncio.to_thread(metrics.exposition, accept)
                status = 200
            except Exception:  # never left to mitmproxy, which would forward it to itself
                log.exception("drawdown: could not answer a scrape of %s", metrics.PATH)
                text, content_type, status = b"drawdown: metrics unavailable\n", "text/plain", 500
            flow.response = http.Response.make(
                status,
                b"" if flow.request.method.upper() == "HEAD" else text,
                {"content-type": content_type, "cache-control": "no-store"},
            )
            return
        started = time.perf_counter()
        self._deciding += 1  # not yet in self.inflight: a drain must wait for it too
        try:
            await self._decide(flow)
        except Exception:
            # Fail closed: after an exception in this hook mitmproxy would log it and forward the
            # request undecided and unaccounted. A bug in drawdown must never do that.
            log.exception("drawdown: internal error deciding %s; refused, not forwarded", flow.id)
            try:
                await self._refuse_after_internal_error(flow)
            finally:
                if flow.response is None:
                    flow.response = http.Response.make(500, b"drawdown: internal error")
            return
        finally:
            self._deciding -= 1
        state: FlowState | None = flow.metadata.get(STATE)
        if state is not None and state.hold_id is not None and flow.response is None:
            state.forwarded_at = time.time()
            if self._metrics:
                metrics.DECISION_SECONDS.observe(time.perf_counter() - started)
            # Forwarded: wait no longer than drawdown_upstream_timeout for its response headers.
            state.upstream_timer = asyncio.get_running_loop().call_later(
                self.seconds["drawdown_upstream_timeout"], self._upstream_silent, flow
            )

    def _upstream_silent(self, flow: http.HTTPFlow) -> None:
        """The upstream has not begun to answer in time: close its connection.

        mitmproxy then reports "server closed connection" to the flow (our `error` hook releases
        the hold) and answers the agent 502 Bad Gateway, which its SDK reports (and may retry)
        like any gateway error. Without this, only tcp_timeout would end the wait, by closing
        the agent's connection without any answer.
        """
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or flow.response is not None or flow.error is not None or not flow.live:
            return
        if flow.server_conn.alpn == b"h2":
            # Other calls share an HTTP/2 connection: closing it would cut them too. tcp_timeout
            # remains the bound for this one.
            return
        proxyserver = ctx.master.addons.get("proxyserver")
        for handler in list(getattr(proxyserver, "connections", {}).values()):
            if handler.client is not flow.client_conn:
                continue
            io = handler.transports.get(flow.server_conn)
            if io is not None and io.writer is not None:
                state.upstream_timed_out = True
                log.warning(
                    "drawdown: %s %s sent no response within %gs; closing the upstream connection",
                    flow.request.host,
                    state.row.path if state.row else _logged_path(flow),
                    self.seconds["drawdown_upstream_timeout"],
                )
                io.writer.close()
            else:  # still connecting: the OS's connect timeout ends it, with a 502
                log.info(
                    "drawdown: %s still connecting after %gs; left to the connect timeout",
                    flow.request.host,
                    self.seconds["drawdown_upstream_timeout"],
                )
            return

    async def _refuse_after_internal_error(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None:
            state = flow.metadata[STATE] = FlowState(identity=Identity({}), started=time.time())
        answered = flow.response is not None  # a denial was already made (and recorded)
        if not answered:
            message = "drawdown: internal error, request not forwarded"
            self._respond(flow, state, "internal_error", message, 500)
        if state.hold_id is not None:  # reserved: release it; that completes its decision row
            state.settled = False
            await self._settle(flow, state, None, 500, "internal error")
        elif not answered:  # one decision row per request, even this one
            await self._record_refusal(
                flow, state, "internal_error", "internal error, request not forwarded", 500
            )

    async def _record_refusal(
        self, flow: http.HTTPFlow, state: FlowState, code: str, reason: str, status: int
    ) -> None:
        """The decision row of a request refused before it was decided."""
        policy, identity = state.policy or self.policy, state.identity
        row = state.row or DecisionRow(
            request_id=state.request_id,
            ts=state.started,
            decision="deny",
            mode=policy.mode if policy else "enforce",
            scope=identity.path,
            tenant=identity.get("tenant"),
            workflow=identity.get("workflow"),
            agent=identity.get("agent"),
            run=identity.get("run"),
            method=flow.request.method,
            host=flow.request.host,
            path=_logged_path(flow, state.classification),
            policy_digest=policy.digest[:16] if policy else "",
        )
        row.decision, row.reason_code, row.status = "deny", code, status
        row.reason = reason.removeprefix("drawdown: ")
        try:
            await self._ledger().call("record", row)
        except Exception as exc:  # the refusal stands even if it cannot be recorded
            log.warning("drawdown: could not record the refusal of %s: %s", state.request_id, exc)

    async def _shared_run(self, identity: Identity, now: float) -> Identity:
        """Resolve an idle-split run in the ledger, which every proxy process sharing it agrees on."""
        assert identity.pending_idle is not None
        key, seconds = identity.pending_idle
        try:
            run = await self._ledger().call("idle_run", key, seconds, secrets.token_hex(4), now)
        except LedgerError as exc:
            log.warning(
                "drawdown: shared idle-split run unavailable (%s); minting it in this process", exc
            )
            run = self.idle_runs.run_for((key,), seconds, now)
        return identity.with_run(run)

    async def _decide(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None:
            return
        # One policy object for the whole life of the flow: a reload mid-flight never mixes two.
        policy = state.policy = self.policy
        assert policy is not None
        if self.draining:  # a new request on a connection opened before the stop began
            if self.drained or ctx.master.should_exit.is_set():
                # Too late to answer: the process stops before mitmproxy would write a 503,
                # and a refusal recorded but never sent (under load, several at once) told the
                # ledger otherwise than the agent. Unrecorded, its connection closes, as a new
                # connection's does, and the SDK retries it.
                flow.kill()
                return
            message = "drawdown: this proxy is shutting down; retry the request"
            self._respond(flow, state, "shutting_down", message, retryable=True)
            await self._record_refusal(flow, state, "shutting_down", message, 503)
            return
        if state.identity.pending_idle is not None:
            state.identity = await self._shared_run(state.identity, state.started)
        # Decided on the name the upstream sees; a request naming two hosts is refused.
        host, address, host_error = addressed(
            flow.request.host, flow.request.port, _names_given(flow)
        )
        view = state.view = RequestView(
            method=flow.request.method,
            scheme=flow.request.scheme,
            host=host,
            port=flow.request.port,
            address=address,
            host_error=host_error,
            # As every server reads it (classify.normalize_path): the upstream gets it as sent.
            path=normalize_path(flow.request.path.split("?", 1)[0]),
            headers=flow.request.headers,
        )
        # Parsing an absent query string still builds a MultiDictView: skip it.
        if "?" in flow.request.path:
            view.query, view.query_repeats = first_values(flow.request.query.fields)
        limit = policy.limits.max_request_bytes
        view.body, view.undecodable, decoded_size = await _request_body(flow.request, limit)
        classification = state.classification = classify(policy, view)
        action = classification.action
        row = state.row = DecisionRow(
            request_id=state.request_id,
            ts=state.started,
            decision="allow",
            mode=policy.mode,
            scope=state.identity.path,
            tenant=state.identity.get("tenant"),
            workflow=state.identity.get("workflow"),
            agent=state.identity.get("agent"),
            run=state.identity.get("run"),
            action=classification.kind,
            provider=action.provider if action else None,
            method=view.method,
            host=view.host,
            # Never the raw path: Telegram, Slack and Discord carry credentials in it.
            path=recording.redact_path(view.path, action.match.path if action else None),
            policy_digest=policy.digest[:16],
        )
        # limits.max_request_bytes: refused before it is parsed for replay, tokenized or forwarded
        # (raw or decoded size: a small gzip bomb counts at its decoded size).
        raw_size = len(flow.request.raw_content or b"")
        # A body past the limit once decoded was not decoded further: its size is unknown.
        size = row.body_bytes = max(limit + 1 if decoded_size is None else decoded_size, raw_size)
        if action is not None and size > limit:
            told = f"decodes to over {limit} bytes" if decoded_size is None else f"is {size} bytes"
            message = (
                f"drawdown: the request body {told}, more than this proxy accepts "
                f"(limits.max_request_bytes: {limit})"
            )
            if not await self._deny_before_budgets(flow, state, "body_too_large", message):
                await self._forward_unread(flow, state, policy, classification)
            return

        # What `drawdown replay` needs to re-decide this request later (redacted, no headers).
        # A big body recorded whole is searched for secrets inside its text: off the loop.
        if len(view.body) <= INLINE_TOKENIZE_BYTES:
            found = recording.features(policy, view, classification)
        else:
            found = await asyncio.to_thread(recording.features, policy, view, classification)
        for name, value in found.items():
            setattr(row, name, value)

        if classification.host_error is not None and await self._deny_before_budgets(
            flow, state, "bad_request", f"drawdown: {classification.host_error}"
        ):
            return  # (shadow: recorded as would_deny, and decided on by where it is sent)
        if classification.path_error is not None and await self._deny_before_budgets(
            flow, state, "bad_request", f"drawdown: {classification.path_error}"
        ):
            return  # (shadow: recorded as would_deny, and decided on as sent)
        mode = self._internal_hosts
        if (
            mode != "allow"
            and (named := destinations.named_address(flow.request.host)) is not None
            and destinations.guarded(mode, flow.client_conn)
            and (kind := destinations.internal_here(named))  # a routing query: guarded only
        ):
            # No policy's to waive: such a request never means what its client meant.
            message = destinations.refusal(flow.request.host, named, kind)
            await self._deny_before_budgets(flow, state, "internal_host", message, always=True)
            return
        if action is None:
            # No guard applies to a host no action names, but replay needs the fingerprint to
            # re-decide its calls under a policy that names it (a loop among them).
            row.fingerprint = await self._fingerprint("", view, classification)
            if policy.unknown_hosts == "deny":
                message = f"drawdown: {unmatched(view, row.path)}"
                if await self._deny_before_budgets(flow, state, "unknown_host", message):
                    return
            await self._reserve(flow, state, [], Amount())
            return
        if (problem := view.undecodable or classification.body_error) is not None:
            # Read otherwise than the upstream reads it, it would be decided on a guess.
            message = f"drawdown: cannot read this request as the upstream would: {problem}"
            if not await self._deny_before_budgets(flow, state, "bad_request", message):
                await self._forward_unread(flow, state, policy, classification)
            return
        if classification.mcp_error is not None:
            message = f"drawdown: cannot read this MCP request: {classification.mcp_error[1]}"
            if not await self._deny_before_budgets(flow, state, "bad_request", message):
                await self._forward_unread(flow, state, policy, classification)
            return

        estimate = Amount(
            usd=action.cost_usd_nanos or 0, requests=max(1, len(classification.kinds))
        )
        if action.is_llm:
            row.metering = recording.metering_digest(policy, action)
            try:
                llm = await self._inspect(policy, action, view)
            except meter.MeterRequestError as exc:
                message = f"drawdown: cannot read this {action.provider} request: {exc}"
                if not await self._deny_before_budgets(flow, state, "bad_request", message):
                    await self._forward_unread(flow, state, policy, classification)
                return
            if llm.endpoint == openai_realtime.REALTIME:
                llm = self._realtime_handshake(flow, state, llm, view)
            state.llm = llm
            view.model = row.model = llm.model
            row.stream = llm.stream
            estimate = Amount(
                usd=llm.estimate_usd_nanos,
                tokens=llm.input_tokens + llm.max_output_tokens,
                requests=1,
            )

        kind = classification.kind
        assert kind is not None
        # count_tokens, a model listing: no step of the agent's, uncharged and unguarded. An
        # image or a speech the meter cannot price per token is a step all the same (llm.step).
        free = state.llm is not None and not state.llm.billable and not state.llm.step
        # A Gemini batch read until it is done (its results come with it): polling is no loop.
        polled = state.llm is not None and meter.polled_until_done(state.llm)
        if not free and not polled and not classification.mcp_housekeeping:
            # Before authority: a call denied again and again is a loop too, and replay
            # needs the fingerprint to re-decide it under a policy that would allow it.
            row.fingerprint = await self._fingerprint(kind, view, classification)
        governed = policy.authority.rules or policy.authority.default == "deny"
        if governed and not await self._authorize(flow, state, policy, classification, view):
            return
        if state.settled:  # a history lookup failed and on_ledger_error let it go unaccounted
            return
        state.facts = tuple(
            dict.fromkeys(
                Fact(state.identity.path, each, name, value)
                for each, seen in classification.authorizations(view)
                for name, value in facts_of(policy.authority, each, seen)
            )
        )
        if free:
            await self._reserve(flow, state, [], Amount())
            return
        claims = claims_for(policy, state.identity.levels, classification.kinds, state.started)
        await self._reserve(
            flow, state, claims, estimate, guards_for(policy, classification.kinds or kind)
        )
        if not state.denied and state.llm is not None and state.llm.rewritten_body is not None:
            flow.request.content = state.llm.rewritten_body

    async def _forward_unread(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        policy: Policy,
        classification: Classification,
    ) -> None:
        """Shadow mode lets through a request enforce would refuse unread (too large, or an LLM
        body the meter cannot parse). Nothing to estimate, but its budgets are claimed at zero
        and, for an LLM call, its answer metered: the spend it reports is charged to them, not
        recorded at $0 where no budget (nor `report`) would see it."""
        action, kind = classification.action, classification.kind
        assert action is not None and kind is not None
        view = state.view
        assert view is not None
        if action.is_llm:
            state.llm = meter.unread_request(
                action.provider,
                view.method,
                view.path,
                origin=meter.origin(view.scheme, view.host, view.port),
            )
        claims = claims_for(policy, state.identity.levels, kind, state.started)
        requests = max(1, len(classification.kinds))
        await self._reserve(flow, state, claims, Amount(requests=requests))

    @staticmethod
    async def _fingerprint(kind: str, view: RequestView, classification: Classification) -> str:
        """fingerprint(), a big body's hashed off the event loop (an upload to a host no
        action names has no size limit; hashlib lets go of the GIL)."""
        if len(view.body) <= INLINE_TOKENIZE_BYTES:
            return fingerprint(kind, view, classification)
        return await asyncio.to_thread(fingerprint, kind, view, classification)

    async def _inspect(self, policy: Policy, action: Any, view: RequestView) -> meter.LLMRequest:
        args = (
            action.provider,
            view.method,
            view.path,
            view.query,
            view.body,
            policy.meter,
            action.price,
        )
        # `stream_usage: false`: the host rejects stream_options, so its streams are counted.
        inject = action.stream_usage
        upstream = meter.origin(view.scheme, view.host, view.port)  # priced at its host's prices
        # A batch naming an input file (rare: a check is cheap): estimated from the file.
        names_file = False
        if "/batches" in view.path or "batchGenerateContent" in view.path:
            names_file = await self._recall_batch_input(action.provider, upstream, view)
        inspect = functools.partial(
            meter.inspect_request,
            *args,
            inject_include_usage=inject,
            origin=upstream,
            # An upload is read by the boundary the host reads it by.
            content_type=view.headers.get("content-type"),
            served=self.served.of(upstream),
            batch_inputs=self.batch_inputs.of(upstream),
        )
        # Big prompts are tokenized off the event loop, a Gemini batch file's lines priced off it.
        if len(view.body) > INLINE_TOKENIZE_BYTES or names_file:
            return await asyncio.to_thread(inspect)
        return inspect()

    async def _authorize(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        policy: Policy,
        classification: Classification,
        view: RequestView,
    ) -> bool:
        """Rules, conditions and `requires` for every kind the request exercises; False if it was denied."""
        row = state.row
        assert row is not None
        for kind, seen in classification.authorizations(view):
            evaluation = evaluate(
                policy.authority, state.identity.levels, state.identity.path, kind, seen
            )
            present: list[bool] = []
            if evaluation.checks:
                queries = [
                    HistoryQuery(
                        state.identity.path,
                        c.requirement.actions,
                        c.requirement.there or "",
                        c.value,
                    )
                    for c in evaluation.checks
                ]
                try:
                    present = await self._ledger().call("history", queries)
                except LedgerError as exc:
                    return await self._ledger_down(flow, state, str(exc))
            verdict = evaluation.finish(present)
            if verdict.decision == "deny":
                message = f"drawdown: {verdict.reason}"
                return not await self._deny_before_budgets(
                    flow, state, verdict.reason_code or "not_authorized", message
                )
            if verdict.decision == "would_deny" and row.decision == "allow":
                row.decision, row.reason_code, row.reason = (
                    "would_deny",
                    verdict.reason_code,
                    verdict.reason,
                )
                _log_denial(row, shadow=True, kind=kind, reason=verdict.reason)
        return True

    def _ledger(self) -> AsyncLedger:
        if self.ledger is None:
            state = f"was {self.ledger_lost}" if self.ledger_lost else "is not open"
            raise LedgerError(f"ledger {redact_dsn(self.ledger_url or '')} {state}")
        return self.ledger

    async def _reserve_in_ledger(self, *args: Any) -> ReserveOutcome:
        """The ledger's reserve. A ledger lost while it waited (`_ledger_file_lost`) made its
        hold in a file no one else sees: unavailable, as for the calls after it."""
        ledger = self._ledger()
        outcome: ReserveOutcome = await ledger.call("reserve", *args)
        if ledger is not self.ledger:
            self._ledger()  # raises, naming what became of it
            raise LedgerError("ledger reopened while reserving")  # within a tick: unlikely
        return outcome

    async def _reserve(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        claims: list[Any],
        estimate: Amount,
        guards: Guards | None = None,
    ) -> None:
        policy, row = state.policy, state.row
        assert policy is not None and row is not None
        row.est_usd, row.est_tokens = estimate.usd, estimate.tokens
        state.estimate = estimate
        try:
            outcome = await self._reserve_in_ledger(
                row, claims, estimate, state.started + policy.holds.ttl_seconds, guards
            )
        except LedgerError as exc:
            await self._ledger_down(flow, state, str(exc))
            return
        state.decision = outcome.decision
        if outcome.decision == "deny" and outcome.tripped is not None:
            _log_denial(row, shadow=False)
            self._respond(flow, state, "anomaly", f"drawdown: {row.reason}", 429)
            return
        if outcome.decision == "deny":
            short = outcome.first
            assert short is not None
            status, retry_after = 402, None
            if short.waits and short.claim.window_end is not None:
                status, retry_after = 429, int(short.claim.window_end - time.time()) + 1
            _log_denial(row, shadow=False)
            self._respond(
                flow, state, "budget_exhausted", f"drawdown: {row.reason}", status, retry_after
            )
            return
        state.hold_id = outcome.hold_id
        self.inflight[flow.id] = state
        if outcome.decision == "would_deny" and (
            outcome.shadow_shortfalls or outcome.tripped is not None
        ):  # a budget short, or a guard (loop, step_count, fan_out) that would have refused
            _log_denial(row, shadow=True)
            state.shadow_short = frozenset(
                (s.claim.budget, s.claim.scope) for s in outcome.shadow_shortfalls
            )

    async def _ledger_down(self, flow: http.HTTPFlow, state: FlowState, error: str) -> bool:
        """Answer per `on_ledger_error`; True if the request goes on (unaccounted)."""
        policy = state.policy
        assert policy is not None
        if policy.ledger_error_allows:
            log.warning(
                "drawdown: ledger unavailable (%s); forwarding %s unaccounted (on_ledger_error: allow)",
                error,
                state.request_id,
            )
            state.settled = True  # nothing held, nothing to settle
            self.inflight[flow.id] = state  # but a call in flight, which a drain waits for
            return True
        log.error(
            "drawdown: ledger unavailable (%s); denying %s (on_ledger_error: deny)",
            error,
            state.request_id,
        )
        self._respond(
            flow,
            state,
            "ledger_unavailable",
            f"drawdown: ledger unavailable, request not forwarded ({error})",
        )
        return False

    async def _deny_before_budgets(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        code: str,
        message: str,
        *,
        always: bool = False,
    ) -> bool:
        """A denial by authority or classification. Enforce mode: record, answer, True. Shadow:
        would_deny, False; `always`: refused in shadow mode too (not the policy's to decide)."""
        policy, row = state.policy, state.row
        assert policy is not None and row is not None
        row.reason_code, row.reason = code, message.removeprefix("drawdown: ")
        if policy.mode == "shadow" and not always:
            row.decision = "would_deny"
            _log_denial(row, shadow=True)
            return False
        row.decision = "deny"
        response = self._respond(flow, state, code, message)
        # The refusal's own status, as for a budget's: an MCP client gets it in a JSON-RPC error
        # (HTTP 200), but the ledger and reports must not show a refused call as a 200.
        row.status = int(response.headers.get("x-drawdown-status", response.status_code))
        try:
            await self._ledger().call("record", row)
        except LedgerError as exc:
            log.warning("drawdown: could not record the denial of %s: %s", row.request_id, exc)
        _log_denial(row, shadow=False)
        return True

    def _respond(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        code: str,
        message: str,
        status: int | None = None,
        retry_after: int | None = None,
        retryable: bool = False,
    ) -> http.Response:
        """Answer in the shape the caller's SDK understands; the request never reaches the upstream."""
        classification = state.classification
        provider = (
            classification.action.provider if classification and classification.action else None
        )
        if provider and state.view is not None:  # the SDK speaking (Gemini's OpenAI endpoint)
            provider = meter.wire_format(provider, state.view.path)
        jsonrpc_ids: list[Any] = classification.jsonrpc_ids if classification else []
        made = denial(
            provider,
            code,
            message,
            status=status,
            retry_after=retry_after,
            jsonrpc_ids=jsonrpc_ids,
            batch=bool(classification and classification.mcp_batch),
            jsonrpc_code=classification.mcp_error[0]
            if classification and classification.mcp_error
            else None,
            retryable=retryable,
        )
        state.denied = state.settled = True
        state.decision = "deny"
        flow.response = http.Response.make(made.status, made.body, made.headers)
        self._close_when_draining(flow, flow.response)
        return flow.response

    def _close_when_draining(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """While the proxy stops, an HTTP/1 client must not send its next request on this
        connection: `Connection: close` makes mitmproxy close it after this response, and the
        client reconnects, to another worker or the restarted proxy."""
        if not self.draining:
            return
        if (
            flow.request.http_version.startswith("HTTP/1")
            # A 101's `Connection: upgrade` makes the WebSocket: its session is a call in flight.
            and response.status_code != 101
        ):
            response.headers["connection"] = "close"
            if flow.client_conn.timestamp_end is None:  # closed already: nothing to wait for
                self._closing_clients.add(flow.client_conn.id)
        else:
            # An HTTP/2 connection cannot be told to close: its answer is written as the
            # `response` hook (this addon's is the last) returns, so the drain waits for that.
            self._answering.add(flow.id)

    def client_disconnected(self, client: connection.Client) -> None:
        self._closing_clients.discard(client.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        response = flow.response
        assert response is not None
        if state is not None:
            state.stop_upstream_timer()  # the upstream is answering; streams may take their time
            state.answer = response
        self._close_when_draining(flow, response)
        is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
        if (
            state is not None
            and is_sse
            and state.llm is None
            and flow.request.method == "GET"
            and not state.estimate.usd
        ):
            # An MCP client's stream for server messages: no call, so a drain does not wait
            # for it. A priced tool answering as a stream is a call, and is waited for.
            state.listening = True
        # Bedrock streams in AWS's binary event-stream framing: an event stream all the same.
        is_stream = is_sse or response.headers.get("content-type", "").startswith(
            "application/vnd.amazon.eventstream"
        )
        if state is None or state.denied or state.settled:
            if is_stream:
                response.stream = True  # never buffer an event stream
            return
        if is_sse and _mcp_calls(state):
            # An MCP call: its facts count for a later `requires` (now, or replayed) only if
            # it succeeded, which the JSON-RPC response in the stream tells.
            scanner = state.mcp_events = McpEventScanner()

            def scan(data: bytes) -> bytes:
                scanner.feed(data)
                return data

            response.stream = scan
            return
        # A streamed call answered in another format (Gemini without alt=sse streams one JSON
        # array) is still a stream: forwarded as it comes and metered at its end, never buffered.
        if not is_stream and not (state.llm is not None and state.llm.stream):
            return
        if state.llm is None or not state.llm.billable or not 200 <= response.status_code < 300:
            response.stream = True
            return
        stream_meter = meter.open_stream_meter(
            state.llm,
            response.headers.get("content-type", ""),
            response.headers.get("content-encoding"),
            state.policy.meter,
            state.classification.action.price,
        )
        state.stream_meter = stream_meter
        if stream_meter.rewrites:
            response.headers.pop("content-encoding", None)
            response.headers.pop("content-length", None)

        def on_chunk(data: bytes) -> bytes | list[bytes]:
            if data:
                state.streamed_bytes += len(data)
                # Never b"" mid-stream: mitmproxy's HTTP/1 layer would send it as the last chunk.
                return stream_meter.feed(data) or []
            tail, state.measurement = stream_meter.finish()
            return tail

        response.stream = on_chunk

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            await self._settle_guarded(self._settle_response, flow)
        finally:
            self._answering.discard(flow.id)

    async def _settle_guarded(
        self, settle: Callable[[http.HTTPFlow], Awaitable[None]], flow: http.HTTPFlow
    ) -> None:
        """`response` and `error`: whatever goes wrong while settling, the hold still ends."""
        try:
            await settle(flow)
        except Exception:
            log.exception("drawdown: internal error settling %s", flow.id)
            await self._settle_after_internal_error(flow)

    async def _settle_after_internal_error(self, flow: http.HTTPFlow) -> None:
        """A bug in `response` or `error` must not leave the hold to nothing: it would stay in
        flight (its TTL renewed, every drain waiting for it) and lapse uncharged at the stop.
        Answered 2xx, the upstream billed it: the estimate is charged; otherwise released."""
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or state.settled or state.hold_id is None:
            self.inflight.pop(flow.id, None)
            return
        status = flow.response.status_code if flow.response else None
        if status is not None and 200 <= status < 300:
            completion = _the_estimate(state, status, "internal error metering the response")
            await self._settle(flow, state, completion, status, None)
        else:
            await self._settle(flow, state, None, status, "internal error")

    async def _settle_response(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is not None:
            state.stop_upstream_timer()  # e.g. answered by another addon, with no headers hook
            if state.hold_id is None:  # forwarded unaccounted (the ledger was down): it is over
                self.inflight.pop(flow.id, None)
        if state is None or state.settled or state.hold_id is None:
            return
        response = flow.response
        assert response is not None
        status = response.status_code
        if status >= 400:
            await self._settle(flow, state, None, status, f"upstream answered {status}")
            return
        action = state.classification.action if state.classification else None
        measurement: meter.Measurement | None = None
        if state.realtime is not None:
            # The handshake costs nothing: it was decided (room for one response, the
            # guards), and each response is charged on its own as the session goes on.
            completion = Completion(status=status, model=state.llm.model if state.llm else None)
        elif state.llm is not None and state.llm.billable:
            measurement = state.measurement
            if measurement is None and state.stream_meter is not None:
                _, measurement = state.stream_meter.finish()
            if measurement is None:
                body = await _read_answer(response)
                measure = functools.partial(
                    meter.measure_body,
                    state.llm,
                    status,
                    body,
                    state.policy.meter,
                    action.price if action else None,
                    # Bedrock's InvokeModel reports its usage in the response headers.
                    headers=response.headers if state.llm.provider == "bedrock" else None,
                )
                if len(body) > INLINE_TOKENIZE_BYTES:
                    measurement = await asyncio.to_thread(measure)
                else:
                    measurement = measure()
            if state.view is not None:
                view = state.view
                self.served.learn(state.llm, measurement, view.scheme, view.host, view.port)
            completion = _measured(measurement, status)
            if state.llm.once_key is not None and measurement.answered:
                # A batch's results: charged the first time they are read, never again.
                completion = replace(completion, once=state.llm.once_key)
        elif action is not None:
            if state.llm is not None and state.llm.batch is not None and status < 300:
                self._learn_batch_input(state, response)
            completion = Completion(
                actual=Amount(
                    usd=await self._tool_cost(action, response),
                    requests=state.estimate.requests,
                ),
                status=status,
                usage_source="estimate" if action.cost_usd_nanos else None,
            )
            if state.llm is not None and meter.batch_file_upload(state.llm) and status < 300:
                uploaded = await self._read_batch_file_chunk(flow, state)
                if uploaded is not None:
                    completion = replace(completion, batch=uploaded)
        else:
            completion = Completion(status=status)
        failed = 200 <= status < 300 and await _mcp_call_failed(state, response)
        if failed:
            completion = replace(completion, note=recording.MCP_CALL_FAILED)
        if state.facts and 200 <= status < 300 and not failed:
            completion = replace(completion, facts=state.facts)
        if state.llm is not None and status < 300 and meter.batch_job(state.llm):
            completion = replace(completion, batch=self._batch_hold(state, response, measurement))
        await self._settle(flow, state, completion, status, None)

    def _batch_hold(
        self, state: FlowState, response: http.Response, measurement: meter.Measurement | None
    ) -> BatchHold | None:
        """What a batch job's answer changes of the hold kept for it: kept from its submission,
        moved to where its results are, released once they are read (or it ends without)."""
        llm, view = state.llm, state.view
        if llm is None or view is None:
            return None
        origin = meter.origin(view.scheme, view.host, view.port)
        # A download's answer is read by its measurement; a submission's or a status read's
        # is a small JSON object.
        answer = b"" if llm.once_key is not None else _answer(response)
        progress = meter.batch_progress(llm, origin, answer, measurement)
        if progress is None:
            return None
        return BatchHold(
            progress.key,
            keep_until=None if progress.window is None else time.time() + progress.window,
            moved_to=progress.results_key,
            ended=progress.ended,
            input_estimate=None
            if progress.input_estimate is None
            else meter.batch_estimate_json(progress.input_estimate),
        )

    async def _recall_batch_input(self, provider: str, upstream: str, view: RequestView) -> bool:
        """A batch naming an input file this proxy did not see uploaded (it went through
        another worker, or before a restart): its estimate, if the ledger kept it. True for
        a batch that names a file."""
        named = meter.batch_input_named(provider, view.method, view.path, upstream, view.body)
        if named is None:
            return False
        file_id, key = named
        known = self.batch_inputs.of(upstream)
        if (known is not None and file_id in known) or self.ledger is None:
            return True
        try:
            kept = await self._ledger().call("batch_input", key)
        except LedgerError as exc:  # held at $0, as a file no proxy saw; its results still charged
            log.warning("drawdown: could not read batch input %s from the ledger: %s", key, exc)
            return True
        if kept is None:
            return True
        if len(kept) > INLINE_TOKENIZE_BYTES:  # a big Gemini file's counts: parsed off the loop
            estimate = await asyncio.to_thread(meter.batch_estimate_from_json, kept)
        else:
            estimate = meter.batch_estimate_from_json(kept)
        if estimate is not None:
            self.batch_inputs.learn(upstream, file_id, estimate)
        return True

    async def _read_batch_file_chunk(
        self, flow: http.HTTPFlow, state: FlowState
    ) -> BatchHold | None:
        """A chunk of a Gemini Files API upload its upstream took, read for the batch input
        file it may be part of; once the last is read, the file's requests, counted, are
        kept here and in the ledger for the batch that will name it."""
        llm, view, response = state.llm, state.view, flow.response
        if llm is None or view is None or response is None:
            return None
        origin = meter.origin(view.scheme, view.host, view.port)
        chunk = view.body  # as it was decided on (mitmproxy's reading decodes any codec)
        status = response.headers.get("x-goog-upload-status")
        read = functools.partial(
            meter.batch_file_chunk,
            self.batch_file_uploads,
            llm,
            origin,
            view.query,
            flow.request.headers.get("x-goog-upload-offset"),
            chunk,
            status,
        )

        def read_chunk() -> tuple[meter.BatchFile | None, str | None]:
            found = read()
            return found, None if found is None else meter.batch_estimate_json(found)

        # A big chunk is tokenized, and a whole file's counts written out, off the event loop.
        final = (status or "").strip().lower() == "final"
        if len(chunk) > INLINE_TOKENIZE_BYTES or final:
            batch_file, counted = await asyncio.to_thread(read_chunk)
        else:
            batch_file, counted = read_chunk()
        if batch_file is None:
            return None
        answer = _answer(response)
        progress = meter.batch_file_uploaded(origin, batch_file, answer)
        file_id = meter.uploaded_file_id(answer)
        if progress is None or file_id is None:
            return None
        if not batch_file.complete:
            log.warning(
                "drawdown: part of the upload of %s went by another proxy; a batch naming it is "
                "held for the %d requests read here",
                file_id,
                batch_file.requests,
            )
        self.batch_inputs.learn(origin, file_id, batch_file)
        return BatchHold(progress.key, input_estimate=counted)

    def _learn_batch_input(self, state: FlowState, response: http.Response) -> None:
        """An OpenAI batch input file uploaded: its estimate, by the id its answer names, for
        the batch that will name it."""
        file_id = meter.uploaded_file_id(_answer(response))
        view = state.view
        if file_id is not None and view is not None and state.llm is not None:
            upstream = meter.origin(view.scheme, view.host, view.port)
            self.batch_inputs.learn(upstream, file_id, state.llm.batch)

    async def _tool_cost(self, action: Any, response: http.Response) -> int:
        """A tool's actual cost: reported in a header or JSON field when the policy says where,
        else the fixed cost. A big answer is decoded and parsed off the event loop (a 300 MB
        answer parsed here stalled every agent 5.6 s)."""
        reported: Any = None
        if action.cost_header:
            reported = response.headers.get(action.cost_header)
        if reported is None and action.cost_json:
            answer = await _read_answer(response) or b"null"
            try:
                if len(answer) > INLINE_TOKENIZE_BYTES:
                    document = await asyncio.to_thread(json.loads, answer)
                else:
                    document = json.loads(answer)
                reported = dig(document, action.cost_json)
            except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
                reported = None
            if reported is missing():
                reported = None
        if reported is not None:
            try:
                cost = usd_to_nanos(str(reported).strip())
                if not 0 <= cost <= MAX_AMOUNT:  # a negative cost would refund the budget
                    raise ValueError(cost)
                return cost
            except (ArithmeticError, ValueError):
                log.warning(
                    "drawdown: %s reported an unreadable cost %r; charging its fixed cost",
                    action.kind,
                    reported,
                )
        return action.cost_usd_nanos or 0

    async def error(self, flow: http.HTTPFlow) -> None:
        try:
            await self._settle_guarded(self._settle_error, flow)
        finally:
            self._answering.discard(flow.id)

    async def _settle_error(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is not None:
            state.stop_upstream_timer()
            if state.hold_id is None:  # forwarded unaccounted (the ledger was down): it is over
                self.inflight.pop(flow.id, None)
        if state is None or state.settled or state.hold_id is None:
            return
        reason = flow.error.msg if flow.error else "connection failed"
        if state.upstream_timed_out:
            seconds = self.seconds["drawdown_upstream_timeout"]
            reason = f"upstream timeout: no response within {seconds:g}s"
        status = _status_the_agent_got(flow.response, reason)
        if state.stream_meter is not None and (state.streamed_bytes or _success(state.answered)):
            # A 2xx stream cut before its first event still billed its prompt.
            await self._settle(flow, state, _cut_short(state, reason, status), status, None)
            return
        if state.billed_before_cut():  # client gone, upstream reset, body_size_limit
            note = f"{recording.RESPONSE_CUT}{reason}"
            await self._settle(flow, state, _the_estimate(state, status, note), status, None)
            return
        idle_cut = float(ctx.options.tcp_timeout)
        now = time.time()
        if state.billed_though_abandoned(reason, flow.server_conn, idle_cut, now):
            note = f"{recording.CLIENT_LEFT}{reason}"
            await self._settle(flow, state, _the_estimate(state, status, note), status, None)
            return
        if (
            state.forwarded_at is not None
            and state.answered is None
            and now - state.forwarded_at >= idle_cut
        ):
            # mitmproxy cut both sides after tcp_timeout of silence and reports the client gone:
            # the upstream's silence is the cause, as drawdown_upstream_timeout would say.
            reason = f"upstream timeout: no response within tcp_timeout ({idle_cut:g}s)"
        await self._settle(flow, state, None, status, reason)

    async def _settle(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        completion: Completion | None,
        status: int | None,
        release_reason: str | None,
    ) -> None:
        """Commit or release the hold, exactly once."""
        if state.settled:
            return
        state.settled = True
        try:
            await self._write_settlement(flow, state, completion, status, release_reason)
        finally:
            # In flight until the ledger has it: a drain that stopped on an empty `inflight`
            # while this commit was queued released the hold, and the call went uncharged.
            self.inflight.pop(flow.id, None)

    async def _write_settlement(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        completion: Completion | None,
        status: int | None,
        release_reason: str | None,
    ) -> None:
        now = time.time()
        latency = (
            (now - flow.request.timestamp_start) * 1000 if flow.request.timestamp_start else None
        )
        upstream = None
        if flow.response and flow.response.timestamp_start and flow.request.timestamp_end:
            upstream = (flow.response.timestamp_start - flow.request.timestamp_end) * 1000
        # mitmproxy's timestamps are wall-clock: a clock stepped back mid-call gave minus an
        # hour, and fast_commit took it for an answer faster than any real call. Unknown, then.
        latency = None if latency is not None and latency < 0 else latency
        upstream = None if upstream is not None and upstream < 0 else upstream
        if self.ledger is None or state.hold_id is None:
            return
        operation: tuple[str, tuple[Any, ...]]
        if completion is not None:
            completion = replace(
                _within_ledger(completion, state.request_id),
                latency_ms=latency,
                upstream_ms=upstream,
            )
            operation = ("commit", (state.request_id, state.hold_id, completion, now))
        else:
            completion = Completion(
                status=status, latency_ms=latency, upstream_ms=upstream, note=release_reason
            )
            reason = release_reason or "released"
            operation = ("release", (state.request_id, state.hold_id, completion, reason, now))
        settled = await self._send_settlement(state.request_id, operation)
        if settled is None or operation[0] != "commit":
            return
        self._warn_if_fallback_priced(state, completion)
        overage = [o for o in settled.overage if o not in state.shadow_short]
        if overage:
            # Name the budgets, and say what follows: a shadow budget over its limit only
            # records the calls it would refuse.
            enforced = self._enforced(state, state.policy) if state.policy is not None else set()
            over = ", ".join(f"{budget} at {scope}" for budget, scope in overage)
            if enforced & set(overage):
                log.warning(
                    "drawdown: %s went over %s (actual above estimate): further calls will be "
                    "denied",
                    state.identity.path,
                    over,
                )
            else:
                log.info(
                    "drawdown: %s went over %s (actual above estimate; shadow: further calls "
                    "are recorded as would_deny, not denied)",
                    state.identity.path,
                    over,
                )

    async def _send_settlement(
        self, request_id: str, operation: tuple[str, tuple[Any, ...]]
    ) -> Any:
        """Hand a commit or release to the ledger: what it answers, or None when it refused.
        A refused one is kept for the maintenance task to write: the answer goes on to the
        agent meanwhile, and the ledger gets the settlement when it takes it."""
        if operation[1][1] is None:  # its hold was in a ledger file since lost
            return None
        try:
            return await self._ledger().call(operation[0], *operation[1])
        except LedgerError as exc:
            self.unsettled[request_id] = operation
            log.error(
                "drawdown: could not settle %s (%s); trying again with the ledger's maintenance",
                request_id,
                exc,
            )
            return None

    @staticmethod
    def _warn_if_fallback_priced(state: FlowState, completion: Completion) -> None:
        if completion.priced is False:  # never silent: the fallback price is a guess
            looked_in = (
                meter.price_providers(state.llm.provider, state.llm.price_provider)
                if state.llm is not None
                else ()
            )
            log.warning(
                "drawdown: model %s is unknown to genai-prices' %s; %s charged at the "
                "fallback price",
                completion.model,
                " and ".join(looked_in) or "providers",
                state.request_id,
            )

    # --- the Realtime API (WebSocket) ----------------------------------------------------

    def _realtime_handshake(
        self, flow: http.HTTPFlow, state: FlowState, llm: meter.LLMRequest, view: RequestView
    ) -> meter.LLMRequest:
        """A GET to a Realtime path: a session when it asks for a WebSocket upgrade, decided
        like a call that needs room for one request; anything else is not metered."""
        if flow.request.headers.get("upgrade", "").lower() != "websocket":
            return replace(llm, step=False)
        model = openai_realtime.session_model(view.query)
        upstream = meter.origin(view.scheme, view.host, view.port)
        state.realtime = RealtimeSession(model=model, matched=url_provider(upstream, view.path))
        return replace(llm, model=model)

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            return
        # mitmproxy keeps every message of a flow: a voice session's audio is ~230 MB an hour,
        # and any other WebSocket through the proxy grows alike. Nothing here looks back at
        # earlier ones, so only the one at hand is kept.
        del flow.websocket.messages[:-1]
        state: FlowState | None = flow.metadata.get(STATE)
        session = state.realtime if state is not None else None
        if state is None or session is None:
            return
        message = flow.websocket.messages[-1]
        if message.injected:  # our own error events
            return
        if not message.from_client:
            markers = openai_realtime.SERVER_MARKERS
        elif session.stopped is None:  # audio flows unread while the session may spend
            markers = openai_realtime.ASKING_MARKERS
        else:
            markers = openai_realtime.CLIENT_MARKERS
        content = message.content
        # The agent's events are read whatever their spelling; the server's as it writes them.
        parse = functools.partial(parse_event, escaped=message.from_client)
        try:
            if len(content) > INLINE_TOKENIZE_BYTES:  # a big event is parsed off the event loop
                event = await asyncio.to_thread(parse, content, markers)
            else:
                event = parse(content, markers)
        except UnreadableEvent:
            if message.from_client:  # it may spend, and would pass unheld: not forwarded
                message.drop()
                text = "drawdown: an event drawdown cannot read (a number too long, nesting too deep) is not forwarded"
                self._tell_realtime_client(flow, session, {}, "bad_request", text)
            return  # the server's: what it says is read as far as it can be, as any other
        if event is None:
            return
        try:
            if message.from_client:
                refusal = await self._realtime_client_event(state, session, event, message)
                if refusal is not None:
                    message.drop()
                    self._tell_realtime_client(flow, session, event, *refusal)
            else:
                await self._realtime_server_event(state, session, event)
        except Exception:
            log.exception("drawdown: internal error on realtime session %s", flow.id)
            if message.from_client:  # fail closed: a bug never lets spending through unheld
                message.drop()
                text = "drawdown: internal error, event not forwarded"
                self._tell_realtime_client(flow, session, event, "internal_error", text)

    def _tell_realtime_client(
        self,
        flow: http.HTTPFlow,
        session: RealtimeSession,
        event: dict[str, Any],
        code: str,
        message: str,
    ) -> None:
        """The agent's event was dropped: a Realtime `error` event says why. Audio is sent as
        a stream of `append` events: one error for them until an event is allowed again."""
        if event.get("type") == "input_audio_buffer.append":
            if session.told:
                return
            session.told = True
        payload = error_event(code, message, event.get("event_id"))
        ctx.master.commands.call("inject.websocket", flow, True, payload, True)

    async def _realtime_client_event(
        self,
        state: FlowState,
        session: RealtimeSession,
        event: dict[str, Any],
        message: WebSocketMessage,
    ) -> tuple[str, str] | None:
        """(code, message) when the agent's event must not reach the upstream, else None."""
        kind = event["type"]
        if kind not in openai_realtime.SPENDING_CLIENT_EVENTS:
            return None
        if self.draining:
            return "shutting_down", "drawdown: this proxy is shutting down; reconnect"
        if kind == "response.create":
            refusal, held = await self._realtime_reserve(state, session)
            if held is not None:
                # The server's `error` for a create names its event_id (the SDK sends none):
                # that error releases the hold, which no response.done would otherwise end.
                event_id = event.get("event_id")
                if "event_id" not in event:
                    message.content, event_id = named(message.content)
                asked = event_id if isinstance(event_id, str) else None
                session.asked.append((asked, held.request_id))
            return refusal
        return session.stopped  # input audio: refused once the session may not spend

    def _realtime_row(
        self, state: FlowState, session: RealtimeSession, now: float, model: str | None
    ) -> DecisionRow:
        """A response's decision row: the session's scope, action and path, a request of its own."""
        assert state.row is not None
        return replace(
            state.row,
            request_id=new_request_id(),
            ts=now,
            decision="allow",
            reason_code=None,
            reason=None,
            est_usd=0,
            est_tokens=0,
            stream=True,
            # A voice agent's every turn sends the same bare response.create: no loop.
            fingerprint=None,
            status=None,
            budget=None,
            model=model,
            body_fields=None,
            body=None,
        )

    async def _realtime_reserve(
        self,
        state: FlowState,
        session: RealtimeSession,
        *,
        unasked: bool = False,
        model: str | None = None,
    ) -> tuple[tuple[str, str] | None, FlowState | None]:
        """Reserve one response of the session (a request, no estimate: the conversation is the
        server's, the price is known at response.done): (the refusal, or None; the state of
        its hold, None when refused or unaccounted). `unasked`: spend the server began on its
        own (a response to voice activity, a transcription): it is running, so it is held
        whatever the budgets say."""
        policy = self.policy or state.policy
        assert policy is not None and state.classification is not None
        kind = state.classification.kind
        assert kind is not None
        kinds = state.classification.kinds or kind
        now = time.time()
        row = self._realtime_row(
            state, session, now, model or session.reported_model or session.model
        )
        claims = claims_for(policy, state.identity.levels, kinds, now)
        enforced = {(c.budget, c.scope) for c in claims if not c.shadow}
        guards = None if unasked else guards_for(policy, kinds)
        if unasked:
            claims = [replace(c, shadow=True) for c in claims]
        estimate = Amount(requests=1)
        try:
            outcome = await self._reserve_in_ledger(
                row, claims, estimate, now + policy.holds.ttl_seconds, guards
            )
        except LedgerError as exc:
            if policy.ledger_error_allows or unasked:
                log.warning(
                    "drawdown: ledger unavailable (%s); realtime response %s goes unaccounted",
                    exc,
                    row.request_id,
                )
                return None, None
            log.error("drawdown: ledger unavailable (%s); denying %s", exc, row.request_id)
            refusal = (
                "ledger_unavailable",
                f"drawdown: ledger unavailable, response not created ({exc})",
            )
            return refusal, None
        if outcome.decision == "deny":
            _log_denial(row, shadow=False)
            session.stopped = (row.reason_code or "budget_exhausted", f"drawdown: {row.reason}")
            return session.stopped, None
        response_state = FlowState(
            identity=state.identity,
            started=now,
            request_id=row.request_id,
            policy=policy,
            classification=state.classification,
            row=row,
            decision=outcome.decision,
            hold_id=outcome.hold_id,
            estimate=estimate,
            # Not waited for by a drain until the server says it began (response.created): a
            # response.create the server refused leaves a hold no response.done will end.
            listening=not unasked,
        )
        self.inflight[row.request_id] = response_state
        if outcome.decision == "would_deny":
            _log_denial(row, shadow=True)
        short = [
            s for s in outcome.shadow_shortfalls if (s.claim.budget, s.claim.scope) in enforced
        ]
        if unasked and short and policy.mode != "shadow":
            session.stopped = ("budget_exhausted", f"drawdown: {short[0].describe()}")
        elif not unasked:
            session.stopped, session.told = None, False
        return None, response_state

    async def _realtime_server_event(
        self, state: FlowState, session: RealtimeSession, event: dict[str, Any]
    ) -> None:
        """Track the session's models; charge each response.done and transcription."""
        kind = event["type"]
        if kind in ("session.created", "session.updated"):
            described = event.get("session")
            model = described.get("model") if isinstance(described, dict) else None
            if isinstance(model, str) and model.strip():
                session.reported_model = model.strip()
            # A session.update that leaves transcription out keeps it as it was.
            transcriber = openai_realtime.transcription_model(described)
            session.transcription_model = transcriber or session.transcription_model
            return
        if kind == "error":
            await self._realtime_refused(session, event.get("error"))
            return
        if kind == "response.created":
            await self._realtime_begun(state, session, event.get("response"))
            return
        action = state.classification.action if state.classification else None
        price = action.price if action else None
        held: FlowState | None
        if kind == openai_realtime.TRANSCRIBED:
            usage = openai_realtime.transcription_usage_of(event)
            seconds = openai_realtime.transcription_seconds_of(event)  # whisper-1 bills seconds
            if usage is None and seconds is None:  # none reported: nothing to charge
                return
            model = session.transcription_model
            _, held = await self._realtime_reserve(state, session, unasked=True, model=model)
            if held is None:  # the ledger was down: unaccounted, as logged
                return
            policy = held.policy
            assert policy is not None
            measurement = openai_realtime.measure_usage(
                usage or meter.TokenUsage(),
                (model,),
                policy.meter,
                price,
                session.matched,
                extras=None if seconds is None else {"audio_seconds": seconds},
            )
            note = "input audio transcription"
        elif kind == "response.done":
            response = event.get("response")
            response_id = response.get("id") if isinstance(response, dict) else None
            if isinstance(response_id, str) and response_id in session.done:
                log.warning(
                    "drawdown: the Realtime server ended response %s twice; charged once",
                    response_id[:64],
                )
                return
            if isinstance(response_id, str):
                session.done.append(response_id)
            key = self._realtime_running(session, response)
            if key is not None:
                held = self.inflight.get(key)
            else:  # its response.created found the ledger down: held as it ends
                _, held = await self._realtime_reserve(state, session, unasked=True)
            if held is None or held.hold_id is None:  # the ledger was down: unaccounted
                return
            policy = held.policy
            assert policy is not None
            measurement = openai_realtime.measure_response(
                response, session.models, policy.meter, price, session.matched
            )
            outcome = response.get("status") if isinstance(response, dict) else None
            note = None if outcome in (None, "completed") else f"response {outcome}"
        else:
            return
        completion = replace(
            _measured(measurement, 200),
            latency_ms=(time.time() - held.started) * 1000,
            note=note,
        )
        settled = await self._realtime_settle(held, completion, None)
        # Only a budget that is enforced stops the session: a shadow one is being trialled.
        if settled is not None and set(settled.overage) & self._enforced(state, policy):
            session.stopped = (
                "budget_exhausted",
                "drawdown: this session's last response took a budget over its limit",
            )

    async def _realtime_refused(self, session: RealtimeSession, error: Any) -> None:
        """The server's `error` event: a response.create it names never begins a response, so
        its hold is released (an error for any other event, or naming none, changes nothing)."""
        refused = error.get("event_id") if isinstance(error, dict) else None
        if not isinstance(refused, str):
            return
        for asked in session.asked:
            if asked[0] == refused:
                session.asked.remove(asked)
                held = self.inflight.get(asked[1])
                if held is None or held.settled or held.hold_id is None:
                    return
                code = error.get("code") if isinstance(error, dict) else None
                reason = "the upstream refused the response.create"
                note = f"{reason} ({code})" if isinstance(code, str) else reason
                await self._realtime_settle(held, Completion(note=note), reason)
                return

    async def _realtime_begun(
        self, state: FlowState, session: RealtimeSession, response: Any
    ) -> None:
        """response.created: the oldest response asked for is under way (a drain waits for it);
        with none asked, the server began it on its own (voice activity) and it is held now."""
        if session.asked:
            _, key = session.asked.popleft()
            held = self.inflight.get(key)
            if held is not None:
                held.listening = False
        else:
            _, held = await self._realtime_reserve(state, session, unasked=True)
            if held is None:  # the ledger was down: tried again at its response.done
                return
            key = held.request_id
        response_id = response.get("id") if isinstance(response, dict) else None
        session.running[response_id if isinstance(response_id, str) else key] = key

    @staticmethod
    def _realtime_running(session: RealtimeSession, response: Any) -> str | None:
        """The hold of the response a response.done ends: by its id, else (a response without
        one) the oldest under way, else (no response.created came) the oldest asked for; None
        when none holds it."""
        response_id = response.get("id") if isinstance(response, dict) else None
        if isinstance(response_id, str) and response_id in session.running:
            return session.running.pop(response_id)
        if not isinstance(response_id, str) and session.running:
            return session.running.pop(next(iter(session.running)))
        if session.asked:
            return session.asked.popleft()[1]
        return None

    def _enforced(self, state: FlowState, policy: Policy) -> set[tuple[str, str]]:
        """The (budget, scope) of the enforced budgets a response of the session is charged to."""
        assert state.classification is not None
        kinds = state.classification.kinds or state.classification.kind
        claims = claims_for(policy, state.identity.levels, kinds, time.time())
        return {(c.budget, c.scope) for c in claims if not c.shadow}

    async def _realtime_settle(
        self, state: FlowState, completion: Completion, release_reason: str | None
    ) -> Any:
        """Commit (or release) one response's hold, as the HTTP calls' settlement does."""
        now = time.time()
        state.settled = True
        operation: tuple[str, tuple[Any, ...]]
        if release_reason is None:
            completion = _within_ledger(completion, state.request_id)
            operation = ("commit", (state.request_id, state.hold_id, completion, now))
        else:
            operation = (
                "release",
                (state.request_id, state.hold_id, completion, release_reason, now),
            )
        try:
            return await self._send_settlement(state.request_id, operation)
        finally:
            self.inflight.pop(state.request_id, None)
            self._warn_if_fallback_priced(state, completion)

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        """The session is over: a response still going is released (no usage came for it)."""
        state: FlowState | None = flow.metadata.get(STATE)
        session = state.realtime if state is not None else None
        if session is None:
            return
        keys = [*session.running.values(), *(key for _, key in session.asked)]
        session.running.clear()
        session.asked.clear()
        for key in keys:
            pending = self.inflight.get(key)
            if pending is None or pending.settled or pending.hold_id is None:
                continue
            note = "the session ended before the response was done"
            await self._realtime_settle(pending, Completion(note=note), note)
