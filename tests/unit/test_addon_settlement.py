"""Every reserved call is settled, on the rarer paths too: a response that cannot be parsed, a
body cut after 2xx headers, a bug while settling, a priced tool answering as an event stream,
a request mitmproxy would stream before the decision. Driven without a proxy (taddons, tflow)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import sqlite3
import threading
import tracemalloc
from pathlib import Path

import pytest
from drawdown import addon as addon_module
from drawdown.addon import STATE, Drawdown
from mitmproxy import exceptions, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.flow import Error
from mitmproxy.test import taddons, tflow, tutils

from tests.support.addon_harness import drive

IDENTITY = """
identity:
  agent: [{value: support}]
  run: [{value: r1}]
budgets:
  - {scope: "agent:*/run:*", usd: 10}
"""
TOOLS = (
    IDENTITY
    + """
actions:
  - {kind: search, match: {host: tool.example.com, method: POST}, cost: {usd: 0.01}, cost_json: usage.cost_usd}
  - {kind: search.stream, match: {host: tool.example.com, method: GET}, cost: {usd: 0.05}}
  - {kind: mcp.listen, match: {host: mcp.example.com, method: GET}}
"""
)
LLM = (
    IDENTITY
    + """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
"""
)
JSON = ((b"content-type", b"application/json"),)
SSE = ((b"content-type", b"text/event-stream"),)


def tool_call() -> http.HTTPFlow:
    request = tutils.treq(
        host="tool.example.com", port=443, scheme=b"https", method=b"POST", path=b"/search",
        headers=http.Headers(JSON), content=b'{"q": 1}',
    )  # fmt: skip
    return tflow.tflow(req=request)


def get(host: str, path: bytes) -> http.HTTPFlow:
    request = tutils.treq(
        host=host, port=443, scheme=b"https", method=b"GET", path=path, content=b""
    )
    return tflow.tflow(req=request)


def chat() -> http.HTTPFlow:
    request = tutils.treq(
        host="api.openai.com", port=443, scheme=b"https", method=b"POST",
        path=b"/v1/chat/completions", headers=http.Headers(JSON),
        content=b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}',
    )  # fmt: skip
    return tflow.tflow(req=request)


def holds(db: Path) -> list[tuple[str, int | None, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT state, actual_usd, settle_reason FROM holds").fetchall()


def notes(db: Path) -> list[str | None]:
    with sqlite3.connect(db) as conn:
        return [note for (note,) in conn.execute("SELECT note FROM decisions")]


async def forwarded(addon: Drawdown, flow: http.HTTPFlow) -> http.HTTPFlow:
    addon.requestheaders(flow)
    await addon.request(flow)
    assert flow.response is None and flow.metadata[STATE].hold_id is not None
    return flow


def test_a_tool_answer_nested_too_deeply_to_parse_still_settles(tmp_path: Path) -> None:
    """json.loads raises RecursionError on it, which was not caught: the hook raised, the hold
    stayed in flight (its TTL renewed, every drain waiting for it) and went uncharged."""
    in_flight: list[int] = []

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, tool_call())
        flow.response = tutils.tresp(
            content=b"[" * 100_000 + b"]" * 100_000, headers=http.Headers(JSON)
        )
        await addon.response(flow)
        in_flight.append(len(addon.inflight))

    db = drive(tmp_path, TOOLS, steps)
    assert in_flight == [0]
    assert holds(db) == [("committed", 10_000_000, None)]  # its fixed cost, $0.01 in nanos


def test_a_bug_while_settling_a_response_charges_the_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answered 2xx, the upstream billed the call: a bug in metering its answer must neither
    leave the hold in flight nor release it."""

    def broken(*args: object) -> None:
        raise RuntimeError("a bug in the meter")

    monkeypatch.setattr(addon_module.meter, "measure_body", broken)
    estimates: list[int] = []

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        estimates.append(flow.metadata[STATE].estimate.usd)
        flow.response = tutils.tresp(content=b'{"usage": {}}', headers=http.Headers(JSON))
        await addon.response(flow)
        assert addon.inflight == {}

    db = drive(tmp_path, LLM, steps)
    assert estimates[0] > 0
    assert holds(db) == [("committed", estimates[0], None)]
    assert notes(db) == ["internal error metering the response"]


def test_an_answer_in_a_coding_no_server_uses_is_metered_as_it_came(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`Content-Encoding: rot13` on a plain JSON answer: mitmproxy's reading raised TypeError
    inside Python's codecs, the settlement logged a traceback and charged the estimate. The
    body is read as it came: its usage is charged, quietly."""
    charged: list[tuple[int, int]] = []

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        usage = (
            b'{"model": "gpt-4o-mini", "usage": {"prompt_tokens": 1000, "completion_tokens": 0}}'
        )
        flow.response = tutils.tresp(
            content=b"", headers=http.Headers([*JSON, (b"content-encoding", b"rot13")])
        )
        flow.response.raw_content = usage
        await addon.response(flow)
        charged.append((flow.metadata[STATE].estimate.usd, len(addon.inflight)))

    db = drive(tmp_path, LLM, steps)
    ((estimate, inflight),) = charged
    ((state, actual, _),) = holds(db)
    assert (state, inflight) == ("committed", 0)
    assert 0 < actual < estimate  # 1,000 input tokens of gpt-4o-mini: $0.00015
    assert actual == 150_000
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text


def test_a_compressed_answer_is_decoded_no_further_than_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host an agent runs could answer a few kB of gzip that decode to gigabytes: mitmproxy's
    reading decoded all of it to meter it. Decoding stops past the limit (here 1 MiB, of 64):
    the answer is read as none, the call charged its estimate."""
    monkeypatch.setattr(addon_module, "ANSWER_DECODE_LIMIT", 1 << 20)
    bomb = gzip.compress(bytes(64 << 20), 9)
    peaks: list[tuple[int, int]] = []

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        flow.response = tutils.tresp(
            content=b"", headers=http.Headers([*JSON, (b"content-encoding", b"gzip")])
        )
        flow.response.raw_content = bomb
        tracemalloc.start()
        try:
            await addon.response(flow)
            peaks.append((tracemalloc.get_traced_memory()[1], flow.metadata[STATE].estimate.usd))
        finally:
            tracemalloc.stop()

    db = drive(tmp_path, LLM, steps)
    ((peak, estimate),) = peaks
    assert peak < 16 << 20, peak
    assert holds(db) == [("committed", estimate, None)]


def test_a_body_cut_after_2xx_headers_charges_the_estimate_not_nothing(tmp_path: Path) -> None:
    """A non-streamed call's 200 headers came (the provider has billed it), then the client
    went while mitmproxy buffered the body: mitmproxy calls `error`, which released the hold."""
    estimates: list[int] = []

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        estimates.append(flow.metadata[STATE].estimate.usd)
        flow.response = tutils.tresp(content=b"", headers=http.Headers(JSON))
        addon.responseheaders(flow)  # JSON, not streamed: buffered
        flow.error = Error("Client disconnected.")
        await addon.error(flow)

    db = drive(tmp_path, LLM, steps)
    assert holds(db) == [("committed", estimates[0], None)]
    assert notes(db) == ["response cut short: Client disconnected."]


def statuses(db: Path) -> list[int | None]:
    with sqlite3.connect(db) as conn:
        return [status for (status,) in conn.execute("SELECT status FROM decisions ORDER BY ts")]


@pytest.mark.parametrize(
    ("error", "status"),
    [("server closed connection", 502), ("Client disconnected.", None)],
    ids=["upstream reset", "client gone"],
)
def test_a_buffered_answer_lost_after_2xx_headers_is_recorded_as_the_agent_got_it(
    tmp_path: Path, error: str, status: int | None
) -> None:
    """The agent never saw the upstream's 200: mitmproxy buffers a non-streamed answer, and
    answers the agent 502 when the upstream breaks off (nothing when the agent left). Recorded
    as 200, the SDK's retry of it was a repeat for the loop guard; it is a failed attempt."""

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        flow.response = tutils.tresp(content=b"", headers=http.Headers(JSON))
        addon.responseheaders(flow)
        flow.error = Error(error)
        await addon.error(flow)

    db = drive(tmp_path, LLM, steps)
    assert statuses(db) == [status]
    assert [state for state, _, _ in holds(db)] == ["committed"]  # the upstream billed it


@pytest.mark.parametrize("streamed_bytes", [True, False], ids=["mid-stream", "before any event"])
def test_a_stream_cut_after_its_headers_keeps_the_status_the_agent_got(
    tmp_path: Path, streamed_bytes: bool
) -> None:
    """A stream's headers went on to the agent as they came, and its SDK handed the stream to
    the caller: no SDK retries it, so it stays an answered (counted) attempt."""

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        flow.response = tutils.tresp(content=b"", headers=http.Headers(SSE))
        addon.responseheaders(flow)
        assert callable(flow.response.stream)
        if streamed_bytes:
            flow.response.stream(b'data: {"choices":[{"delta":{"content":"hel"}}]}\n\n')
        flow.error = Error("server closed connection")
        await addon.error(flow)

    db = drive(tmp_path, LLM, steps)
    assert statuses(db) == [200]


def test_a_call_whose_upstream_fails_before_any_answer_is_still_released(tmp_path: Path) -> None:
    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        flow.error = Error("server closed connection")
        await addon.error(flow)

    db = drive(tmp_path, LLM, steps)
    assert holds(db) == [("released", 0, "server closed connection")]


def test_an_agent_that_leaves_before_the_answer_is_charged_the_estimate(tmp_path: Path) -> None:
    """An SDK whose timeout is shorter than the model's answer leaves after the upstream had
    the request: the provider still bills it. Released, such calls went through a budget
    uncharged, however many the agent made."""
    estimates: list[int] = []

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        estimates.append(flow.metadata[STATE].estimate.usd)
        flow.error = Error("Client disconnected.")
        await addon.error(flow)

    db = drive(tmp_path, LLM, steps)
    assert estimates[0] > 0
    assert holds(db) == [("committed", estimates[0], None)]
    assert notes(db) == ["client left before the answer: Client disconnected."]
    assert statuses(db) == [None]  # what the agent got: its SDK's retry is a failed attempt


def test_a_stream_cut_before_its_first_event_is_charged_its_prompt(tmp_path: Path) -> None:
    """200 event-stream headers, then the upstream reset: the provider billed the prompt, as a
    buffered answer cut after its headers is charged; released, it was charged nothing."""

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        flow.response = tutils.tresp(content=b"", headers=http.Headers(SSE))
        addon.responseheaders(flow)
        flow.error = Error("server closed connection")
        await addon.error(flow)

    db = drive(tmp_path, LLM, steps)
    [(state, actual, _)] = holds(db)
    assert state == "committed" and actual > 0
    assert notes(db) == ["stream cut short: server closed connection"]


def test_a_priced_tool_answering_as_an_event_stream_is_a_call_the_drain_waits_for(
    tmp_path: Path,
) -> None:
    """Only an unpriced GET stream (an MCP client listening for server messages) is left out
    of the drain's count; a priced one was too, so the stop released it uncharged."""
    listening: dict[str, bool] = {}

    async def steps(addon: Drawdown) -> None:
        for name, flow in (
            ("priced", get("tool.example.com", b"/search/stream?q=x")),
            ("unpriced", get("mcp.example.com", b"/mcp")),
        ):
            await forwarded(addon, flow)
            flow.response = tutils.tresp(content=b"", headers=http.Headers(SSE))
            addon.responseheaders(flow)
            listening[name] = flow.metadata[STATE].listening

    drive(tmp_path, TOOLS, steps)
    assert listening == {"priced": False, "unpriced": True}


def test_a_request_mitmproxy_would_stream_is_decided_on_its_whole_body(tmp_path: Path) -> None:
    """A request marked to stream (stream_large_bodies, another addon) before `requestheaders`
    would reach the upstream before the decision; and the option itself is refused."""
    streamed: list[object] = []

    async def steps(addon: Drawdown) -> None:
        flow = tool_call()
        flow.request.stream = True
        addon.requestheaders(flow)
        streamed.append(flow.request.stream)
        await addon.request(flow)
        flow.response = tutils.tresp(content=b"{}", headers=http.Headers(JSON))
        await addon.response(flow)

    drive(tmp_path, TOOLS, steps)
    assert streamed == [False]
    addon = Drawdown()
    with (
        taddons.context(addon, Proxyserver()) as tctx,
        pytest.raises(exceptions.OptionsError) as refused,
    ):
        tctx.configure(addon, stream_large_bodies="1k")
    assert "stream_large_bodies" in str(refused.value)


def test_rawtcp_is_turned_off_whoever_sets_it() -> None:
    """mitmproxy's rawtcp relays a tunnel it reads as neither TLS nor HTTP unread: the addon
    turns it off, under `drawdown run` and plain mitmdump alike (tests/e2e/test_tunnels_e2e.py)."""
    addon = Drawdown()
    with taddons.context(addon, Proxyserver()) as tctx:
        tctx.configure(addon, rawtcp=True)
        assert tctx.options.rawtcp is False


def test_the_policy_watcher_outlives_a_folder_it_cannot_read_for_a_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An OSError from the load (a folder unreadable during a deploy) killed the watcher's task:
    every later edit was silently ignored. It is reported, and the next edit still lands."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(TOOLS)
    real_load = addon_module.load_policy
    loads: list[str] = []

    def load_policy(path: str) -> object:
        loads.append(path)
        if len(loads) == 1:
            raise PermissionError(13, "Permission denied", path)
        return real_load(path)

    async def main() -> str:
        addon = Drawdown()
        with taddons.context(addon) as tctx:
            tctx.configure(
                addon,
                drawdown_policy=str(policy),
                drawdown_db=str(tmp_path / "l.db"),
                drawdown_reload_interval="0.05",
            )
            monkeypatch.setattr(addon_module, "load_policy", load_policy)
            watcher = asyncio.ensure_future(addon._watch_policy())
            policy.write_text(TOOLS + "mode: enforce\n")  # the look that fails
            while not loads:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            assert not watcher.done(), watcher.exception()
            policy.write_text(TOOLS + "mode: shadow\n")  # the next edit
            while len(loads) < 2:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            watcher.cancel()
            addon.done()
            assert addon.policy is not None
            return addon.policy.mode

    assert asyncio.run(main()) == "shadow"
    assert "policy edit rejected" in caplog.text and "Permission denied" in caplog.text


def test_an_answer_still_arriving_at_the_stop_is_charged_its_estimate(tmp_path: Path) -> None:
    """The stop cuts a non-streamed answer whose 200 headers came: the provider billed it, so it
    is charged as when its connection breaks, not released with the holds nothing answered."""
    estimates: list[int] = []

    async def steps(addon: Drawdown) -> None:
        answered = await forwarded(addon, chat())
        estimates.append(answered.metadata[STATE].estimate.usd)
        answered.response = tutils.tresp(content=b"", headers=http.Headers(JSON))
        addon.responseheaders(answered)  # the body is on its way when the stop comes
        await forwarded(addon, chat())  # no answer yet at all

    db = drive(tmp_path, LLM, steps)
    assert sorted(holds(db), key=str) == [
        ("committed", estimates[0], None),
        ("released", None, "proxy shut down"),
    ]
    # Neither reached the agent, whose SDK retries both: failed attempts, not answered ones.
    assert statuses(db) == [None, None]


def test_a_stream_cut_at_the_stop_keeps_the_status_the_agent_got(tmp_path: Path) -> None:
    """The stop cuts a stream the agent was reading: it got the 200 headers and its SDK does not
    retry, so the attempt is an answered one (it was recorded with no status: a failed one)."""

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        flow.response = tutils.tresp(content=b"", headers=http.Headers(SSE))
        addon.responseheaders(flow)
        assert callable(flow.response.stream)
        flow.response.stream(b'data: {"choices":[{"delta":{"content":"hel"}}]}\n\n')

    db = drive(tmp_path, LLM, steps)
    assert [state for state, _, _ in holds(db)] == ["committed"]
    assert notes(db) == ["stream cut short: proxy shut down"]
    assert statuses(db) == [200]


# --- a settlement the ledger refuses ----------------------------------------------------------


def spent(db: Path) -> list[tuple[int, int, int, int]]:
    """Each budget instance's spent and reserved dollars and requests."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT spent_usd, spent_requests, reserved_usd, reserved_requests "
            "FROM budget_instances"
        ).fetchall()


def refuse_commits(addon: Drawdown, times: int, *, after_writing: bool = False) -> list[int]:
    """Make the ledger's writer refuse the next `times` batches holding a commit, as a write lock
    held past drawdown_ledger_timeout does; `after_writing`: the commit lands but its answer is
    lost (a connection dropped after COMMIT), so the proxy sees the same error."""
    assert addon.ledger is not None
    backend = addon.ledger.ledger
    real = backend.run_batch
    refused: list[int] = []

    def run_batch(calls: list[tuple[str, tuple[object, ...]]]) -> list[object]:
        if len(refused) < times and any(name == "commit" for name, _ in calls):
            refused.append(len(calls))
            if after_writing:
                real(calls)
            raise addon_module.LedgerError("database is locked")
        return real(calls)

    backend.run_batch = run_batch  # type: ignore[method-assign]
    return refused


def answered(flow: http.HTTPFlow) -> http.HTTPFlow:
    flow.response = tutils.tresp(
        content=b'{"model": "gpt-4o-mini", "usage": {"prompt_tokens": 9, "completion_tokens": 8,'
        b' "total_tokens": 17}}',
        headers=http.Headers(JSON),
    )
    return flow


def test_a_commit_the_ledger_refused_lands_with_the_next_maintenance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock held past drawdown_ledger_timeout when the answer came: the commit was logged and
    dropped, and the hold lapsed uncharged at its TTL, though the provider billed the call."""
    caplog.set_level(logging.INFO)
    seen: dict[str, object] = {}

    async def steps(addon: Drawdown) -> None:
        refused = refuse_commits(addon, 1)
        flow = answered(await forwarded(addon, chat()))
        await addon.response(flow)  # the answer goes on to the agent
        seen["refused"], seen["pending"] = list(refused), list(addon.unsettled)
        seen["holds before"] = holds(db_path)
        maintenance = asyncio.ensure_future(addon._maintain())
        while addon.unsettled:
            await asyncio.sleep(0.01)
        maintenance.cancel()

    db_path = tmp_path / "l.db"
    drive(tmp_path, LLM, steps, drawdown_maintenance_interval="0.05")
    assert seen["refused"] == [1] and len(seen["pending"]) == 1  # type: ignore[arg-type]
    assert [state for state, _, _ in seen["holds before"]] == ["active"]  # type: ignore[union-attr]
    [(state, charged, _)] = holds(db_path)
    assert state == "committed" and charged and charged > 0
    assert spent(db_path) == [(charged, 1, 0, 0)]
    assert "could not settle" in caplog.text and "on a later attempt" in caplog.text


def test_a_commit_still_refused_at_the_stop_is_tried_before_the_holds_are_released(
    tmp_path: Path,
) -> None:
    pending: list[int] = []

    async def steps(addon: Drawdown) -> None:
        refuse_commits(addon, 1)
        await addon.response(answered(await forwarded(addon, chat())))
        pending.append(len(addon.unsettled))

    db = drive(tmp_path, LLM, steps)  # done() without a maintenance tick in between
    assert pending == [1]
    [(state, charged, _)] = holds(db)
    assert state == "committed" and charged and charged > 0
    assert spent(db) == [(charged, 1, 0, 0)]


def test_a_commit_that_landed_though_the_proxy_saw_an_error_is_charged_once(
    tmp_path: Path,
) -> None:
    """Trying again is safe: the ledger leaves a hold already committed as it is."""

    async def steps(addon: Drawdown) -> None:
        refuse_commits(addon, 1, after_writing=True)
        await addon.response(answered(await forwarded(addon, chat())))
        assert len(addon.unsettled) == 1
        await addon._retry_settlements()
        assert addon.unsettled == {}

    db = drive(tmp_path, LLM, steps)
    [(state, charged, _)] = holds(db)
    assert state == "committed" and charged
    assert spent(db) == [(charged, 1, 0, 0)]


# --- shadow mode: what enforce refuses unread is still metered ---------------------------------

SHADOW = "mode: shadow\nlimits: {max_request_bytes: 4096}\n" + LLM.replace(
    "usd: 10}", "usd: 10, requests: 100}"
)


def chat_with(body: bytes, path: bytes = b"/v1/chat/completions") -> http.HTTPFlow:
    request = tutils.treq(
        host="api.openai.com", port=443, scheme=b"https", method=b"POST", path=path,
        headers=http.Headers(JSON), content=body,
    )  # fmt: skip
    return tflow.tflow(req=request)


def decisions(db: Path) -> list[tuple[str, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT decision, reason_code FROM decisions").fetchall()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"model": "gpt-4o-mini", "messages": "hi"}', "bad_request"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
         + b"word " * 1000 + b'"}]}', "body_too_large"),
    ],
    ids=["unreadable", "too large"],
)  # fmt: skip
def test_shadow_mode_charges_what_an_unread_request_reports_it_used(
    tmp_path: Path, body: bytes, reason: str
) -> None:
    """Enforce refuses these before pricing them; shadow forwards them. They were recorded at
    $0 against no budget, so `report` showed none of what the provider billed."""

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat_with(body))
        await addon.response(answered(flow))

    db = drive(tmp_path, SHADOW, steps)
    assert decisions(db) == [("would_deny", reason)]
    [(state, charged, _)] = holds(db)
    assert state == "committed" and charged and charged > 0  # 9 + 8 tokens of gpt-4o-mini
    assert spent(db) == [(charged, 1, 0, 0)]


def test_shadow_mode_meters_an_unread_streamed_answer_too(tmp_path: Path) -> None:
    sse = (
        b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[]'
        b',"usage":{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}}\n\n'
        b"data: [DONE]\n\n"
    )

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat_with(b'{"model": "gpt-4o-mini", "stream": true'))
        flow.response = tutils.tresp(content=b"", headers=http.Headers(SSE))
        addon.responseheaders(flow)
        assert callable(flow.response.stream)
        flow.response.stream(sse)
        flow.response.stream(b"")
        await addon.response(flow)

    db = drive(tmp_path, SHADOW, steps)
    [(state, charged, _)] = holds(db)
    assert state == "committed" and charged and charged > 0


def test_shadow_mode_leaves_an_unread_call_to_an_uncharged_endpoint_uncharged(
    tmp_path: Path,
) -> None:
    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat_with(b"x" * 5000, path=b"/v1/files"))
        await addon.response(answered(flow))

    db = drive(tmp_path, SHADOW, steps)
    assert holds(db) == [("committed", 0, None)]


def test_a_ledger_still_refusing_at_the_stop_is_tried_once_not_once_a_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each try may wait out drawdown_ledger_timeout (5 s): a hundred refused commits would have
    held the stop for minutes."""
    tries_at_stop: list[str] = []

    async def steps(addon: Drawdown) -> None:
        refuse_commits(addon, 2)
        for _ in range(2):
            await addon.response(answered(await forwarded(addon, chat())))
        assert len(addon.unsettled) == 2
        backend = addon.ledger.ledger  # type: ignore[union-attr]

        def commit(request_id: str, *args: object) -> None:
            tries_at_stop.append(request_id)
            raise addon_module.LedgerError("database is locked")

        backend.commit = commit  # the stop calls the backend directly

    db = drive(tmp_path, LLM, steps)
    assert len(tries_at_stop) == 1
    assert "could not settle 2 call(s) at shutdown" in caplog.text
    assert [state for state, _, _ in holds(db)] == ["released", "released"]


def test_a_client_that_leaves_after_the_streams_end_is_charged_the_whole_answer(
    tmp_path: Path,
) -> None:
    """The last event went through, then the client closed its connection before mitmproxy
    closed the flow, which then calls `error`: that stream was not cut short, and its ledger
    row must not say so (the e2e stop test with two workers caught it, once)."""
    sse = (
        b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":'
        b'[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'
        b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[]'
        b',"usage":{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}}\n\n'
        b"data: [DONE]\n\n"
    )

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, chat())
        flow.response = tutils.tresp(content=b"", headers=http.Headers(SSE))
        addon.responseheaders(flow)
        assert callable(flow.response.stream)
        flow.response.stream(sse)
        flow.response.stream(b"")  # the stream's end
        flow.error = Error("Client disconnected.")
        await addon.error(flow)

    db = drive(tmp_path, LLM, steps)
    [(state, charged, _)] = holds(db)
    assert state == "committed" and charged and charged > 0
    assert notes(db) == [None]


@pytest.mark.parametrize(
    ("budget_mode", "policy_mode", "denied"),
    [("", "", True), (", mode: shadow", "", False), ("", "mode: shadow\n", False)],
    ids=["enforced", "shadow budget", "shadow policy"],
)
def test_a_call_over_its_budget_says_whether_further_calls_will_be_denied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, budget_mode: str, policy_mode: str,
    denied: bool,
) -> None:  # fmt: skip
    """A tool that reports $5 against a $1 budget: the warning names the budget, and says
    "further calls will be denied" only where they will be (a shadow budget only records)."""
    caplog.set_level(logging.INFO)
    policy = policy_mode + TOOLS.replace("usd: 10}", f"usd: 1{budget_mode}}}")

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, tool_call())
        flow.response = tutils.tresp(
            content=b'{"usage": {"cost_usd": 5}}', headers=http.Headers(JSON)
        )
        await addon.response(flow)

    drive(tmp_path, policy, steps)
    [line] = [r.getMessage() for r in caplog.records if "actual above estimate" in r.getMessage()]
    assert "went over agent:*/run:* at agent:support/run:r1 (" in line, line
    assert ("further calls will be denied" in line) is denied, line
    assert ("recorded as would_deny" in line) is not denied, line


def test_a_refused_unknown_host_is_logged_without_a_python_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The denial's log line names the action kind; a host no action names has none, and
    the line read `deny tenant:…/run:r None <id>`."""

    async def steps(addon: Drawdown) -> None:
        request = tutils.treq(host="elsewhere.example.com", port=443, scheme=b"https")
        flow = tflow.tflow(req=request)
        addon.requestheaders(flow)
        await addon.request(flow)
        assert flow.response is not None and flow.response.status_code == 403

    with caplog.at_level(logging.INFO, logger="drawdown"):
        drive(tmp_path, LLM + "unknown_hosts: deny\n", steps)
    (line,) = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("drawdown: deny")
    ]
    assert " (no action) " in line and " None " not in line, line


@pytest.mark.parametrize("kind", ["tool", "llm"])
def test_a_big_compressed_answer_is_decoded_and_parsed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A tool's `cost_json` answer, or an LLM's, gzipped: decoded and parsed on the event loop,
    0.2 MB that decoded to 256 MB stalled every agent 12 s. Past INLINE_TOKENIZE_BYTES decoded,
    the decoding and the parse run on a worker thread (seen by the thread that ran them, not
    timed); the cost the tool reported is still charged, the LLM's usage still read."""
    threads: dict[str, set[str]] = {"decode": set(), "parse": set()}
    answer, loads = addon_module._answer, addon_module.json.loads

    def decoding(response: http.Response, *limit: int) -> bytes:
        if not limit:  # decoded whole, not the inline attempt bounded at 16 KiB
            threads["decode"].add(threading.current_thread().name)
        return answer(response, *limit)

    def parsing(text: bytes | str) -> object:
        threads["parse"].add(threading.current_thread().name)
        return loads(text)

    monkeypatch.setattr(addon_module, "_answer", decoding)
    if kind == "tool":
        body = json.dumps({"pad": "x" * 1_000_000, "usage": {"cost_usd": "0.02"}}).encode()
    else:
        usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        body = json.dumps({"model": "gpt-4o-mini", "pad": "x" * 1_000_000, "usage": usage,
                           "choices": [{"message": {"content": "ok"}}]}).encode()  # fmt: skip
    charged: list[tuple[str, str | None]] = []

    async def steps(addon: Drawdown) -> None:
        flow = await forwarded(addon, tool_call() if kind == "tool" else chat())
        flow.response = tutils.tresp(
            content=b"", headers=http.Headers([*JSON, (b"content-encoding", b"gzip")])
        )
        flow.response.raw_content = gzip.compress(body)
        monkeypatch.setattr(addon_module.json, "loads", parsing)
        try:
            await addon.response(flow)
        finally:
            monkeypatch.setattr(addon_module.json, "loads", loads)
        loop = threading.current_thread().name
        charged.append((loop, None))

    db = drive(tmp_path, TOOLS if kind == "tool" else LLM, steps)
    ((loop, _),) = charged
    assert threads["decode"] and loop not in threads["decode"], threads
    if kind == "tool":
        assert threads["parse"] and loop not in threads["parse"], threads
        assert holds(db) == [("committed", 20_000_000, None)]  # the $0.02 the tool reported
    else:
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT tokens_in, tokens_out FROM decisions").fetchone() == (9, 3)
