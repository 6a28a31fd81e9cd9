"""pytest-benchmark suite for the functions every proxied request runs through.

Numbers, not assertions on speed: `./scripts/bench --hot` runs these with timing
(`pytest benchmarks --benchmark-enable`) and prints a table to compare across changes, e.g.
`--benchmark-autosave` then `--benchmark-compare`. In `./scripts/test` each runs once,
untimed, with its result checked, so a benchmark that stops measuring the real thing fails.

The request is the one `scripts/bench` sends: an OpenAI chat call with a ~1,000-token
prompt, classified by policies/example.yaml, whose budgets give it 4 instances to reserve on.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from drawdown import meter
from drawdown.budgets import claims_for
from drawdown.classify import RequestView, classify
from drawdown.identity import Caller, IdleRuns, identify
from drawdown.ledger.api import Amount, Completion, DecisionRow, new_request_id
from drawdown.ledger.sqlite import open_sqlite
from drawdown.policy import Policy, load_policy

ROOT = Path(__file__).resolve().parent.parent
PROMPT = " ".join(f"word{i % 97} of the agent's long context" for i in range(170))  # ≈1,000 tokens
BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "You are a research agent."},
            {"role": "user", "content": PROMPT},
        ],
    }
).encode()
HEADERS = {"x-drawdown-tenant": "acme", "x-drawdown-agent": "research", "x-drawdown-run": "r1"}
USAGE = {"prompt_tokens": 1012, "completion_tokens": 31, "total_tokens": 1043}
RESPONSE = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Here is what I found. " * 6},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
).encode()


def sse_chunks() -> list[bytes]:
    """A streamed answer of 40 content events and the usage chunk, cut into 512-byte pieces."""
    events = [
        {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
         "choices": [{"index": 0, "delta": {"content": f"token{i} "}}]}
        for i in range(40)
    ]  # fmt: skip
    events.append(
        {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [],
         "usage": USAGE}
    )  # fmt: skip
    text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    raw = text.encode()
    return [raw[i : i + 512] for i in range(0, len(raw), 512)]


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(str(ROOT / "policies" / "example.yaml"))


def view() -> RequestView:
    return RequestView("POST", "api.openai.com", 443, "/v1/chat/completions", {}, HEADERS, BODY)


def test_identify(benchmark: Any, policy: Policy) -> None:
    caller = Caller(headers=HEADERS)
    identity = benchmark(identify, policy.identity, caller, IdleRuns(), time.time())
    assert identity.path == "tenant:acme/agent:research/run:r1"


def test_classify(benchmark: Any, policy: Policy) -> None:
    classification = benchmark(classify, policy, view())
    assert classification.kind == "llm"


def test_claims_for(benchmark: Any, policy: Policy) -> None:
    identity = identify(policy.identity, Caller(headers=HEADERS), IdleRuns(), time.time())
    claims = benchmark(claims_for, policy, identity.levels, "llm", time.time())
    assert len(claims) == 4  # tenant per day, agent, run, and the shadow-trial budget


# As the proxy calls it: the upstream's origin names genai-prices' provider (a cached lookup).
UPSTREAM = meter.origin("https", "api.openai.com", 443)


def _estimate(policy: Policy) -> meter.LLMRequest:
    return meter.inspect_request(
        "openai", "POST", "/v1/chat/completions", {}, BODY, policy.meter, origin=UPSTREAM
    )


def test_estimate_repeated_prompt(benchmark: Any, policy: Policy) -> None:
    """The common case: an agent resends its conversation, whose texts were counted before."""
    _estimate(policy)  # counted once, as by the agent's previous turn
    llm = benchmark(_estimate, policy)
    assert llm.input_tokens > 900 and llm.max_output_tokens == 256 and llm.estimate_usd_nanos > 0


def test_estimate_new_prompt(benchmark: Any, policy: Policy) -> None:
    """A prompt never seen before: tokenized by tiktoken (a fresh text each round)."""

    def fresh() -> bytes:
        body = json.loads(BODY)
        body["messages"][1]["content"] = f"{uuid.uuid4().hex} {PROMPT}"
        return json.dumps(body).encode()

    llm = benchmark.pedantic(
        lambda body: meter.inspect_request(
            "openai", "POST", "/v1/chat/completions", {}, body, policy.meter, origin=UPSTREAM
        ),
        setup=lambda: ((fresh(),), {}),
        rounds=50,
    )
    assert llm.input_tokens > 900


def test_measure_json_response(benchmark: Any, policy: Policy) -> None:
    llm = _estimate(policy)
    measurement = benchmark(meter.measure_body, llm, 200, RESPONSE, policy.meter)
    assert measurement.source == "usage"
    assert (measurement.usage.input_tokens, measurement.usage.output_tokens) == (1012, 31)


def test_meter_sse_stream(benchmark: Any, policy: Policy) -> None:
    llm = _estimate(policy)
    chunks = sse_chunks()

    def stream() -> meter.Measurement:
        stream_meter = meter.open_stream_meter(llm, "text/event-stream", None, policy.meter)
        for chunk in chunks:
            stream_meter.feed(chunk)
        return stream_meter.finish()[1]

    measurement = benchmark(stream)
    assert measurement.source == "usage" and measurement.usage.output_tokens == 31


def test_reserve_and_commit_sqlite(benchmark: Any, policy: Policy, tmp_path: Path) -> None:
    """One reserve + commit lifecycle on the 4 instances, one transaction each (no batching)."""
    ledger = open_sqlite(str(tmp_path / "bench.db"))
    # Tiny amounts, so that the thousands of lifecycles a calibrated run makes fit the example
    # policy's budgets: the statements are the same whatever the figures.
    estimate = Amount(usd=2_000, tokens=1_300, requests=1)
    actual = Completion(actual=Amount(usd=1_000, tokens=1_043, requests=1), status=200)
    calls = iter(range(10**9))

    def lifecycle() -> int:
        now = time.time()
        run = f"r{next(calls) // 100}"  # a run of 100 calls (the example caps runs at 200 requests)
        headers = {**HEADERS, "x-drawdown-run": run}
        identity = identify(policy.identity, Caller(headers=headers), IdleRuns(), now)
        row = DecisionRow(
            request_id=new_request_id(), ts=now, decision="allow", mode="enforce",
            scope=identity.path, tenant="acme", agent="research", run=run, action="llm",
        )  # fmt: skip
        claims = claims_for(policy, identity.levels, "llm", now)
        outcome = ledger.reserve(row, claims, estimate, now + 900)
        assert outcome.hold_id is not None, outcome
        ledger.commit(row.request_id, outcome.hold_id, actual, time.time())
        return outcome.hold_id

    try:
        assert benchmark(lifecycle) >= 1
        (committed,) = ledger.conn.execute(
            "SELECT COUNT(*) FROM holds WHERE state = 'committed'"
        ).fetchone()
        assert committed >= 1
    finally:
        ledger.close()


def test_reserve_and_commit_batches_sqlite(benchmark: Any, policy: Policy, tmp_path: Path) -> None:
    """100 lifecycles as the writer thread runs them under load: 100 reserves in one batch
    (one transaction), then their 100 commits in another. Divide the time by 100."""
    ledger = open_sqlite(str(tmp_path / "bench.db"))
    # Tiny amounts: a calibrated run makes thousands of lifecycles within the example policy's
    # hourly token budget for the agent; the statements are the same whatever the figures.
    estimate = Amount(usd=20, tokens=13, requests=1)
    actual = Completion(actual=Amount(usd=10, tokens=10, requests=1), status=200)
    batches = iter(range(10**9))

    def hundred_lifecycles() -> int:
        now = time.time()
        run = f"b{next(batches)}"  # a run per batch (the example caps runs at 200 requests)
        identity = identify(
            policy.identity, Caller(headers={**HEADERS, "x-drawdown-run": run}), IdleRuns(), now
        )
        claims = claims_for(policy, identity.levels, "llm", now)
        fields = dict(
            ts=now, decision="allow", mode="enforce", scope=identity.path, tenant="acme",
            agent="research", run=run, action="llm",
        )  # fmt: skip
        rows = [DecisionRow(request_id=new_request_id(), **fields) for _ in range(100)]
        held = ledger.run_batch([("reserve", (r, claims, estimate, now + 900)) for r in rows])
        settled = ledger.run_batch(
            [
                ("commit", (r.request_id, h.hold_id, actual, time.time()))
                for r, h in zip(rows, held, strict=True)
            ]
        )
        return sum(1 for s in settled if s.applied)

    try:
        assert benchmark(hundred_lifecycles) == 100
    finally:
        ledger.close()


def test_dispatch_a_requests_events(benchmark: Any, tmp_path: Path) -> None:
    """mitmproxy's addon dispatch as `drawdown run` drives it (every mitmdump addon, grouped):
    a request's four flow events, each followed by mitmproxy's `update` pass when one is due."""
    import asyncio

    from drawdown.master import DrawdownMaster
    from mitmproxy import options
    from mitmproxy.proxy.layers import http as layers
    from mitmproxy.test import tflow

    reached: list[str] = []

    class Tail:  # stands in for drawdown's hooks, which the other benchmarks time
        def requestheaders(self, flow: Any) -> None:
            reached.append("requestheaders")

        def response(self, flow: Any) -> None:
            reached.append("response")

    loop = asyncio.new_event_loop()

    async def build() -> Any:
        return DrawdownMaster(options.Options(confdir=str(tmp_path)), tail=[Tail()])

    master = loop.run_until_complete(build())
    flow = tflow.tflow(resp=True)
    events = [
        layers.HttpRequestHeadersHook(flow),
        layers.HttpRequestHook(flow),
        layers.HttpResponseHeadersHook(flow),
        layers.HttpResponseHook(flow),
    ]

    async def dispatch() -> None:
        for event in events:
            await master.addons.handle_lifecycle(event)

    try:
        benchmark(lambda: loop.run_until_complete(dispatch()))
    finally:
        loop.close()
    assert reached[-2:] == ["requestheaders", "response"]


def test_requestheaders_hook(benchmark: Any, tmp_path: Path) -> None:
    """drawdown's first hook on every request: identity from headers and proxy credentials,
    identity headers stripped before forwarding."""
    from drawdown.addon import STATE, Drawdown
    from mitmproxy import http
    from mitmproxy.addons import proxyauth
    from mitmproxy.test import taddons, tflow

    fields = (
        (b"Host", b"api.openai.com"), (b"Content-Type", b"application/json"),
        (b"Authorization", b"Bearer sk-not-a-key"), (b"User-Agent", b"OpenAI/Python 1.99"),
        (b"X-Drawdown-Tenant", b"acme"), (b"X-Drawdown-Agent", b"research"),
        (b"X-Drawdown-Run", b"r1"), (b"Content-Length", b"%d" % len(BODY)),
    )  # fmt: skip
    addon = Drawdown()
    with taddons.context(proxyauth.ProxyAuth(), addon) as tctx:
        tctx.configure(
            addon,
            drawdown_policy=str(ROOT / "policies" / "example.yaml"),
            drawdown_db=str(tmp_path / "bench.db"),
            drawdown_tokenizer_process=False,
        )
        flow = tflow.tflow()

        def hook() -> Any:
            flow.request.headers = http.Headers(fields)
            flow.metadata.clear()
            addon.requestheaders(flow)
            return flow.metadata[STATE].identity

        try:
            identity = benchmark(hook)
        finally:
            addon.done()
    assert identity.path == "tenant:acme/agent:research/run:r1"
    assert not any(k.lower().startswith("x-drawdown-") for k in flow.request.headers)
