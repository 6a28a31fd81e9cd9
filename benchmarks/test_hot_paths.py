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


# --- off the hot path: `drawdown report` ------------------------------------------------------

FLEET_RUNS = 600  # ≈ 6,000 decisions: built in a few seconds, reported in well under one


@pytest.fixture(scope="module")
def fleet_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, float]:
    """A small fleet's ledger, written as the proxy writes it (reserves, then their commits,
    batched): 3 tenants, workflows of a few runs, ~10 steps a run, per-run and per-tenant-day
    budgets, some 503s retried, a loop, drifting estimates, authority and budget denials.
    Returns (its path, a `now` just after its last call)."""
    import hashlib
    import random

    from drawdown.budgets import window
    from drawdown.ledger.api import Claim

    rnd = random.Random(7)
    path = tmp_path_factory.mktemp("fleet") / "fleet.db"
    ledger = open_sqlite(str(path))
    start = 1_796_000_000.0
    calls: list[tuple[float, dict[str, Any]]] = []
    for n in range(FLEET_RUNS):
        # Workflows of 3 runs, the first ten of 8 (fan_out's default allows 5); some runs alone.
        job = n // 8 if n < 80 else n // 3
        tenant, workflow = ("acme", "globex", "initech")[job % 3], f"job-{job}" if n % 5 else None
        run, agent = f"r{n:05d}", ("research", "support", "writer")[rnd.randrange(3)]
        t = start + n * 60 + rnd.random() * 30
        looping = n % 50 == 7
        for step in range(rnd.randint(3, 18) + (8 if looping else 0)):
            body = "same" if looping and step >= 4 else f"{run}-{step}"
            # Now and then a 503, and the same request again (as an SDK retries it).
            for fails in [True, False] if rnd.random() < 0.02 else [False]:
                took = rnd.uniform(0.3, 3.0)
                calls.append(
                    (t, dict(tenant=tenant, workflow=workflow, agent=agent, run=run, body=body,
                             took=took, fails=fails, deny=rnd.random() < 0.01,
                             drift=rnd.random() < 0.01))
                )  # fmt: skip
                t += took + rnd.uniform(0.5, 10)
    calls.sort(key=lambda c: c[0])
    for at in range(0, len(calls), 500):
        batch, reserves = calls[at : at + 500], []
        for ts, c in batch:
            levels = [("tenant", c["tenant"]), ("workflow", c["workflow"]), ("agent", c["agent"]),
                      ("run", c["run"])]  # fmt: skip
            row = DecisionRow(
                request_id=new_request_id(), ts=ts, decision="allow", mode="enforce",
                scope="/".join(f"{k}:{v}" for k, v in levels if v), tenant=c["tenant"],
                workflow=c["workflow"], agent=c["agent"], run=c["run"], action="llm",
                provider="openai", model="gpt-4o-mini", method="POST", host="api.openai.com",
                path="/v1/chat/completions", est_usd=3_000_000, est_tokens=1_500,
                fingerprint=hashlib.sha256(c["body"].encode()).hexdigest()[:32],
            )  # fmt: skip
            if c["deny"]:
                row.decision, row.reason_code, row.status = "deny", "not_authorized", 403
                row.reason, row.fingerprint = "llm is not allowed here", None
                reserves.append(("record", (row,)))
                continue
            day = window("day", ts)
            claims = [
                Claim("run", f"agent:{c['agent']}/run:{c['run']}", 100_000_000, None, 15),
                Claim("tenant:*", f"tenant:{c['tenant']}", 40_000_000_000, None, None, "day", *day),
            ]  # fmt: skip
            reserves.append(("reserve", (row, claims, Amount(3_000_000, 1_500, 1), ts + 900)))
        settles = []
        for (ts, c), (name, args), outcome in zip(
            batch, reserves, ledger.run_batch(reserves), strict=True
        ):
            if name != "reserve" or outcome.hold_id is None:
                continue
            done, request_id = ts + c["took"], args[0].request_id
            if c["fails"]:
                failed = Completion(status=503, latency_ms=c["took"] * 1000)
                settles.append(("release", (request_id, outcome.hold_id, failed, "503", done)))
                continue
            usd = 9_000_000 if c["drift"] else rnd.randint(500_000, 2_000_000)
            answer = Completion(
                actual=Amount(usd, 900, 1), status=200, tokens_in=800, tokens_out=100,
                usage_source="usage", priced=True, latency_ms=c["took"] * 1000,
                upstream_ms=c["took"] * 1000 - 5,
            )  # fmt: skip
            settles.append(("commit", (request_id, outcome.hold_id, answer, done)))
        assert not any(isinstance(r, BaseException) for r in ledger.run_batch(settles))
    ledger.close()
    return str(path), calls[-1][0] + 60


def test_report_build(benchmark: Any, fleet_ledger: tuple[str, float]) -> None:
    """`drawdown report --json`'s data: one pass over the ledger for the runs and the
    detectors' counts, then the rows of the runs and workflows they may flag, the budgets and
    spend over time. A week of a fleet is 75 times this ledger."""
    from drawdown import report

    path, now = fleet_ledger
    data = benchmark(report.build, path, now=now)
    assert len(data["runs"]) == FLEET_RUNS
    assert sum(data["decisions"].values()) == sum(run["requests"] for run in data["runs"])
    kinds = {anomaly["kind"] for anomaly in data["anomalies"]}
    assert {"loop", "drift", "fan_out"} <= kinds, kinds
    assert {run["status"] for run in data["runs"]} >= {"normal", "denied", "budget_exhausted"}
    assert any(run["retried"] for run in data["runs"])  # a 503 its SDK retried: no step
