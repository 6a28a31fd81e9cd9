"""Metering, end to end: the official openai, anthropic and google-genai SDKs through a real
`drawdown run`, against the TLS stand-in and the recorded corpus of real provider exchanges.

For every call: the committed tokens (decision, hold, budget instance) are exactly the usage the
upstream reported, the committed cost is genai-prices' price for that usage (computed here, from
the provider's raw usage, independently of drawdown's meter), and the SDK's own parser sees the
same thing as when it talks to the stand-in directly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

import anthropic
import genai_prices
import httpx2
import openai
import pytest
from drawdown.meter import DEFAULT_FALLBACK_PRICE, count_tokens

from tests.support import clients
from tests.support.proxy import DrawdownProcess
from tests.support.recorded import load_recorded
from tests.support.standin import Reply, StandIn
from tests.support.wire import anthropic_sse, anthropic_usage, openai_chat_sse

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

# One budget instance per run: each call below gets a run of its own, so the instance's spend is
# that call's charge alone.
POLICY = """
identity:
  tenant: [{value: acme}]
  agent: [{value: metered}]
  run: [{header: X-Drawdown-Run}, {value: unnamed}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: llm, provider: anthropic, match: {host: api.anthropic.com}}
  - kind: llm
    provider: gemini
    match: {host: [generativelanguage.googleapis.com, aiplatform.googleapis.com]}
  - kind: llm.azure
    provider: openai
    match: {host: ["*.openai.azure.com", "*.cognitiveservices.azure.com"]}
  # OpenAI-compatible hosts (the stand-in's certificate covers *.example.com; Groq's real base
  # URL is https://api.groq.com/openai/v1, served here at the same path).
  - kind: llm.groq
    provider: openai
    match: {host: groq.example.com}
    price: {input: 0.59, output: 0.79}
  - kind: llm.strict
    provider: openai
    match: {host: strict.example.com}
    price: {input: 0.10, output: 0.40}
    stream_usage: false
budgets:
  - {scope: "run:*", usd: 1000}
"""

MESSAGES = [{"role": "user", "content": "Meter this call exactly, to the token."}]
PROMPT = "Meter this call exactly, to the token."
# Synthetic replies report this usage (with cache reads) instead of the word counts.
INPUT_TOKENS, CACHED_TOKENS = 1500, 1024

NANOS = Decimal(1_000_000_000)
MILLION = Decimal(1_000_000)
# What an SDK raises when the connection drops mid-stream.
CUT_SHORT = (httpx2.HTTPError, openai.APIError, anthropic.APIError)
ID_KEYS = frozenset({"id", "created", "created_at", "completed_at", "response_id", "item_id"})


# --- expected figures, from the provider's raw usage ---------------------------------------


@dataclass(frozen=True)
class Expected:
    tokens_in: int
    tokens_out: int
    usd_nanos: int


def billed_usage(api: str, usage: Mapping[str, Any]) -> dict[str, int]:
    """The provider's raw usage as genai-prices counts it (subsets included in their parents)."""
    if api == "openai.responses":
        ind = usage.get("input_tokens_details") or {}
        outd = usage.get("output_tokens_details") or {}
        counts = {
            "input_tokens": usage["input_tokens"],
            "output_tokens": usage["output_tokens"],
            "cache_read_tokens": ind.get("cached_tokens", 0),
            "cache_write_tokens": ind.get("cache_write_tokens", 0),
            "output_reasoning_tokens": outd.get("reasoning_tokens", 0),
        }
    elif api.startswith("openai"):  # chat, legacy completions, embeddings
        pd = usage.get("prompt_tokens_details") or {}
        cd = usage.get("completion_tokens_details") or {}
        counts = {
            "input_tokens": usage["prompt_tokens"],
            "output_tokens": usage.get("completion_tokens", 0),
            "cache_read_tokens": pd.get("cached_tokens", 0),
            "cache_write_tokens": pd.get("cache_write_tokens", 0),
            "input_audio_tokens": pd.get("audio_tokens", 0),
            "output_audio_tokens": cd.get("audio_tokens", 0),
            "output_reasoning_tokens": cd.get("reasoning_tokens", 0),
        }
    elif api == "anthropic":
        if "message_start" in usage:  # a stream: message_delta's figures are the final ones
            usage = {**usage["message_start"], **usage["message_delta"]}
        # Anthropic's input_tokens excludes cached tokens; genai-prices' includes them.
        read = usage.get("cache_read_input_tokens") or 0
        write = usage.get("cache_creation_input_tokens") or 0
        counts = {
            "input_tokens": usage["input_tokens"] + read + write,
            "output_tokens": usage["output_tokens"],
            "cache_read_tokens": read,
            "cache_write_tokens": write,
            "cache_write_1h_tokens": (usage.get("cache_creation") or {}).get(
                "ephemeral_1h_input_tokens", 0
            ),
        }
    elif api == "gemini":

        def modality(key: str, name: str) -> int:
            return sum(d["tokenCount"] for d in usage.get(key) or [] if d["modality"] == name)

        # Thoughts are billed as output; tool-use prompt tokens as input.
        thoughts = usage.get("thoughtsTokenCount", 0)
        counts = {
            "input_tokens": usage["promptTokenCount"] + usage.get("toolUsePromptTokenCount", 0),
            "output_tokens": usage.get("candidatesTokenCount", 0) + thoughts,
            "cache_read_tokens": usage.get("cachedContentTokenCount", 0),
            "output_reasoning_tokens": thoughts,
            "input_audio_tokens": modality("promptTokensDetails", "AUDIO"),
            "cache_audio_read_tokens": modality("cacheTokensDetails", "AUDIO"),
        }
    else:
        raise AssertionError(f"no usage rule for {api}")
    return {key: n for key, n in counts.items() if n}


def nanos(usd: Decimal) -> int:
    return int((usd * NANOS).to_integral_value(rounding=ROUND_CEILING))


def expected(
    api: str, usage: Mapping[str, Any], model: str, service_tier: str | None = None
) -> Expected:
    """Tokens as reported, cost at genai-prices' price for exactly that usage (and OpenAI tier)."""
    counts = billed_usage(api, usage)
    provider = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}[api.split(".")[0]]
    price = genai_prices.calc_price(
        genai_prices.Usage(**counts),
        model,
        provider_id=provider,
        price_context={"service_tier": service_tier} if service_tier else None,
    )
    return Expected(
        counts.get("input_tokens", 0), counts.get("output_tokens", 0), nanos(price.total_price)
    )


def flat(tokens_in: int, tokens_out: int, input_usd: str, output_usd: str) -> Expected:
    """Tokens at a per-million price (a policy's price override or the fallback price)."""
    usd = (tokens_in * Decimal(input_usd) + tokens_out * Decimal(output_usd)) / MILLION
    return Expected(tokens_in, tokens_out, nanos(usd))


# --- what the ledger committed ------------------------------------------------------------


@dataclass(frozen=True)
class Committed:
    decision: str
    status: int | None
    tokens_in: int | None
    tokens_out: int | None
    usd: int | None
    source: str | None
    priced: int | None
    note: str | None
    hold_state: str
    hold_usd: int | None
    hold_tokens: int | None
    hold_source: str | None
    settle_reason: str | None
    instance: tuple[int, ...] | None  # spent usd/tokens/requests, reserved usd/tokens/requests


def committed(proxy: DrawdownProcess, run: str) -> Committed:
    """The settled decision of the one call made in `run` (waits: a stream settles after the SDK
    has returned)."""
    (row,) = proxy.wait_for_query(
        "SELECT d.decision, d.status, d.tokens_in, d.tokens_out, d.actual_usd, d.usage_source,"
        " d.priced, d.note, h.state, h.actual_usd, h.actual_tokens, h.usage_source,"
        " h.settle_reason FROM decisions d JOIN holds h ON h.id = d.hold_id"
        " WHERE d.run = ? AND h.state != 'active'",
        run,
    )
    instances = proxy.query(
        "SELECT spent_usd, spent_tokens, spent_requests, reserved_usd, reserved_tokens,"
        " reserved_requests FROM budget_instances WHERE scope = ?",
        f"run:{run}",
    )
    assert len(instances) <= 1
    return Committed(*row, instance=instances[0] if instances else None)


def assert_charged(
    proxy: DrawdownProcess,
    run: str,
    want: Expected,
    *,
    source: str = "usage",
    priced: int = 1,
) -> Committed:
    """The call of `run` committed exactly `want`, on its decision, its hold and its budget."""
    got = committed(proxy, run)
    assert (got.decision, got.status, got.source, got.priced) == ("allow", 200, source, priced), got
    assert (got.tokens_in, got.tokens_out, got.usd) == (
        want.tokens_in,
        want.tokens_out,
        want.usd_nanos,
    ), f"{run}: committed {got}, expected {want}"
    tokens = want.tokens_in + want.tokens_out
    assert (got.hold_state, got.hold_usd, got.hold_tokens, got.hold_source) == (
        "committed",
        want.usd_nanos,
        tokens,
        source,
    ), got
    assert got.instance == (want.usd_nanos, tokens, 1, 0, 0, 0), got
    return got


def counted_usage(got: Committed) -> dict[str, int]:
    """A counted commit's tokens in OpenAI's usage shape (to price them independently)."""
    return {"prompt_tokens": got.tokens_in or 0, "completion_tokens": got.tokens_out or 0}


def assert_released(proxy: DrawdownProcess, run: str, status: int) -> None:
    got = committed(proxy, run)
    assert (got.hold_state, got.settle_reason, got.status) == (
        "released",
        f"upstream answered {status}",
        status,
    ), got
    assert (got.usd, got.hold_usd, got.hold_tokens) == (0, 0, 0), got
    assert got.instance == (0, 0, 0, 0, 0, 0), got


# --- comparing what an SDK saw ------------------------------------------------------------


def scrub(value: Any) -> Any:
    """An SDK object as plain data, minus what differs between two identical calls (ids, times)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude={"sdk_http_response"})
    if isinstance(value, Mapping):
        return {k: scrub(v) for k, v in value.items() if k not in ID_KEYS}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def run_header(run: str) -> dict[str, str]:
    return {"X-Drawdown-Run": run}


def awkward(length: int) -> list[int]:
    """Piece lengths that cut events, lines, JSON and UTF-8 sequences anywhere."""
    sizes, total = [], 0
    for size in itertools.cycle((1, 3, 7, 2, 13, 5, 29, 1, 64)):
        if total >= length:
            return sizes
        sizes.append(size)
        total += size
    raise AssertionError("unreachable")


def inside_separators(body: bytes, separator: bytes = b"\r\n\r\n") -> list[int]:
    """Piece lengths that split every `separator` in its middle (and right after its first byte)."""
    cuts, start = [], 0
    while (found := body.find(separator, start)) >= 0:
        cuts += [found + 1, found + len(separator) // 2]
        start = found + len(separator)
    lengths, last = [], 0
    for cut in cuts:
        lengths.append(cut - last)
        last = cut
    return lengths


# --- OpenAI -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    api: str  # usage rule, see billed_usage
    path: str  # stand-in path of the call
    model: str
    sync: Callable[[Any, dict[str, str]], Any]
    aio: Callable[[Any, dict[str, str]], Any]

    @classmethod
    def of(
        cls,
        name: str,
        api: str,
        path: str,
        model: str,
        call: Callable[[Any, dict[str, str]], Any],
        stream: bool = False,
    ) -> Case:
        """`call(client, headers)`: the SDK call, the same on the sync and the async client;
        what each gets back is compared scrubbed (a stream: every item it yields)."""
        if stream:
            return cls(
                name,
                api,
                path,
                model,
                lambda c, h: [scrub(x) for x in call(c, h)],
                lambda c, h: _collect(call(c, h)),
            )
        return cls(name, api, path, model, lambda c, h: scrub(call(c, h)), call)


async def _collect(stream: Any) -> list[Any]:
    return [scrub(item) async for item in await stream]


OPENAI_CASES = [
    Case.of(
        "chat",
        "openai.chat",
        "/v1/chat/completions",
        "gpt-4o-mini",
        lambda c, h: c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=64, extra_headers=h
        ),
    ),
    Case.of(
        "chat-stream",  # no include_usage: drawdown asks for it and hides the usage chunk
        "openai.chat",
        "/v1/chat/completions",
        "gpt-4o-mini",
        lambda c, h: c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=h
        ),
        stream=True,
    ),
    Case.of(
        "chat-stream-usage",
        "openai.chat",
        "/v1/chat/completions",
        "gpt-4o",
        lambda c, h: c.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=h,
        ),
        stream=True,
    ),
    Case.of(
        "responses",
        "openai.responses",
        "/v1/responses",
        "gpt-4.1-mini",
        lambda c, h: c.responses.create(
            model="gpt-4.1-mini", input=PROMPT, max_output_tokens=64, extra_headers=h
        ),
    ),
    Case.of(
        "responses-stream",
        "openai.responses",
        "/v1/responses",
        "gpt-4.1-mini",
        lambda c, h: c.responses.create(
            model="gpt-4.1-mini", input=PROMPT, stream=True, extra_headers=h
        ),
        stream=True,
    ),
    Case.of(
        "embeddings",
        "openai.embeddings",
        "/v1/embeddings",
        "text-embedding-3-small",
        lambda c, h: c.embeddings.create(
            model="text-embedding-3-small", input=[PROMPT, "a second text"], extra_headers=h
        ),
    ),
    Case.of(
        "completions",
        "openai.completions",
        "/v1/completions",
        "gpt-3.5-turbo-instruct",
        lambda c, h: c.completions.create(
            model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=32, extra_headers=h
        ),
    ),
    Case.of(
        "completions-stream-unasked",  # as chat-stream: drawdown asks, and hides the chunk
        "openai.completions",
        "/v1/completions",
        "gpt-3.5-turbo-instruct",
        lambda c, h: c.completions.create(
            model="gpt-3.5-turbo-instruct", prompt=PROMPT, stream=True, extra_headers=h
        ),
        stream=True,
    ),
    Case.of(
        "completions-stream",
        "openai.completions",
        "/v1/completions",
        "gpt-3.5-turbo-instruct",
        lambda c, h: c.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=h,
        ),
        stream=True,
    ),
]


async def _scrubbed(result: Any) -> Any:
    value = await result
    return value if isinstance(value, list) else scrub(value)


def test_openai_sdk_calls_commit_exactly_the_reported_usage(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    standin.set_usage(input_tokens=INPUT_TOKENS, cached_tokens=CACHED_TOKENS)
    proxy = drawdown_proxy(POLICY)
    direct_ctx = standin.ssl_context()
    direct = clients.openai_client(f"{standin.url}/v1", verify=direct_ctx)
    via = proxy.openai_client()
    with direct, via:
        for case in OPENAI_CASES:
            run = f"sync-{case.name}"
            alone = case.sync(direct, {})
            seen = case.sync(via, run_header(run))
            assert seen == alone, f"{case.name}: the SDK saw something else through the proxy"
            upstream = standin.last(case.path)
            if case.name in ("chat-stream", "completions-stream-unasked"):
                # drawdown asked for the usage on the SDK's behalf (and the SDK never saw it:
                # every chunk it got has a choice and no usage).
                assert upstream.json["stream_options"] == {"include_usage": True}
                assert seen and all(c["choices"] and c["usage"] is None for c in seen)
            assert_charged(proxy, run, expected(case.api, upstream.usage, case.model))

    async def both_async() -> None:
        direct = clients.async_openai_client(f"{standin.url}/v1", verify=direct_ctx)
        via = proxy.async_openai_client()
        async with direct, via:
            for case in OPENAI_CASES:
                run = f"async-{case.name}"
                alone = await _scrubbed(case.aio(direct, {}))
                seen = await _scrubbed(case.aio(via, run_header(run)))
                assert seen == alone, f"async {case.name}: the SDK saw something else"
                upstream = standin.last(case.path)
                assert_charged(proxy, run, expected(case.api, upstream.usage, case.model))

    asyncio.run(both_async())


# --- Anthropic ----------------------------------------------------------------------------

CLAUDE = "claude-haiku-4-5"


def _claude_stream(client: anthropic.Anthropic, headers: dict[str, str]) -> dict[str, Any]:
    with client.messages.stream(
        model=CLAUDE, max_tokens=256, messages=MESSAGES, extra_headers=headers
    ) as stream:
        events = [scrub(e) for e in stream]
        final = stream.get_final_message()
    return {"events": events, "final": scrub(final)}


async def _claude_stream_async(
    client: anthropic.AsyncAnthropic, headers: dict[str, str]
) -> dict[str, Any]:
    async with client.messages.stream(
        model=CLAUDE, max_tokens=256, messages=MESSAGES, extra_headers=headers
    ) as stream:
        events = [scrub(e) async for e in stream]
        final = await stream.get_final_message()
    return {"events": events, "final": scrub(final)}


def test_anthropic_sdk_messages_commit_exactly_and_count_tokens_is_free(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    standin.set_usage(input_tokens=INPUT_TOKENS, cached_tokens=CACHED_TOKENS)
    proxy = drawdown_proxy(POLICY)
    direct_ctx = standin.ssl_context()

    def create(client: anthropic.Anthropic, headers: dict[str, str]) -> Any:
        return scrub(
            client.messages.create(
                model=CLAUDE, max_tokens=256, messages=MESSAGES, extra_headers=headers
            )
        )

    direct = clients.anthropic_client(standin.url, verify=direct_ctx)
    with direct, proxy.anthropic_client() as via:
        for name, call in (("json", create), ("stream", _claude_stream)):
            run = f"sync-{name}"
            alone = call(direct, {})
            assert call(via, run_header(run)) == alone, name
            upstream = standin.last("/v1/messages")
            assert_charged(proxy, run, expected("anthropic", upstream.usage, CLAUDE))
        # count_tokens passes through uncharged: a decision, a zero hold, no budget touched.
        counted = via.messages.count_tokens(
            model=CLAUDE, messages=MESSAGES, extra_headers=run_header("count")
        )
        assert (
            counted.input_tokens
            == direct.messages.count_tokens(model=CLAUDE, messages=MESSAGES).input_tokens
        )
    free = committed(proxy, "count")
    assert (free.decision, free.status, free.hold_state) == ("allow", 200, "committed"), free
    assert proxy.query("SELECT model FROM decisions WHERE run = 'count'") == [(CLAUDE,)]
    assert (free.usd, free.hold_usd, free.hold_tokens, free.instance) == (0, 0, 0, None), free

    async def both_async() -> None:
        async def create_async(client: anthropic.AsyncAnthropic, headers: dict[str, str]) -> Any:
            return scrub(
                await client.messages.create(
                    model=CLAUDE, max_tokens=256, messages=MESSAGES, extra_headers=headers
                )
            )

        direct = clients.async_anthropic_client(standin.url, verify=direct_ctx)
        via = proxy.async_anthropic_client()
        async with direct, via:
            for name, call in (("json", create_async), ("stream", _claude_stream_async)):
                run = f"async-{name}"
                alone = await call(direct, {})
                assert await call(via, run_header(run)) == alone, name
                upstream = standin.last("/v1/messages")
                assert_charged(proxy, run, expected("anthropic", upstream.usage, CLAUDE))

    asyncio.run(both_async())


# --- Gemini -------------------------------------------------------------------------------

GEMINI = "gemini-2.5-flash"


def test_gemini_sdk_generate_and_stream_commit_exactly(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    standin.set_usage(input_tokens=INPUT_TOKENS, cached_tokens=CACHED_TOKENS)
    proxy = drawdown_proxy(POLICY)
    direct = clients.genai_client(f"{standin.url}/", verify=standin.ssl_context())

    def generate(client: Any) -> Any:
        return scrub(client.models.generate_content(model=GEMINI, contents=PROMPT))

    def stream(client: Any) -> Any:
        return [
            scrub(c) for c in client.models.generate_content_stream(model=GEMINI, contents=PROMPT)
        ]

    async def generate_async(client: Any) -> Any:
        return scrub(await client.aio.models.generate_content(model=GEMINI, contents=PROMPT))

    async def stream_async(client: Any) -> Any:
        chunks = await client.aio.models.generate_content_stream(model=GEMINI, contents=PROMPT)
        return [scrub(c) async for c in chunks]

    for name, call in (("generate", generate), ("stream", stream)):
        alone = call(direct)
        via = proxy.genai_client(headers=run_header(name))
        assert call(via) == alone, name
        upstream = standin.last("*:*enerateContent")
        assert upstream.path.startswith("/v1/models/")  # the SDK's default API version
        assert_charged(proxy, name, expected("gemini", upstream.usage, GEMINI))

    async def both_async() -> None:
        for name, acall in (("generate-async", generate_async), ("stream-async", stream_async)):
            alone = await acall(
                clients.genai_client(f"{standin.url}/", verify=standin.ssl_context())
            )
            assert await acall(proxy.genai_client(headers=run_header(name))) == alone, name
            upstream = standin.last("*:*enerateContent")
            assert_charged(proxy, name, expected("gemini", upstream.usage, GEMINI))

    asyncio.run(both_async())
    assert standin.last("*:streamGenerateContent").query == "alt=sse"
    # countTokens is free too.
    counter = proxy.genai_client(headers=run_header("count"))
    counter.models.count_tokens(model=GEMINI, contents=PROMPT)
    free = committed(proxy, "count")
    assert (free.status, free.usd, free.hold_usd, free.instance) == (200, 0, 0, None), free


def test_a_gemini_tuned_model_is_charged_the_model_its_answer_names(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """google-genai's generate_content on `tunedModels/…`: charged genai-prices' price of the
    model its answer names (before: a $0 step)."""
    usage = {"promptTokenCount": 5000, "candidatesTokenCount": 400, "totalTokenCount": 5400}
    answer = {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": "ok"}]}, "finishReason": "STOP"}
        ],
        "usageMetadata": usage,
        "modelVersion": GEMINI,
    }
    standin.script("POST", "/v1*/tunedModels/my-tuned-1:generateContent", Reply(json=answer))
    proxy = drawdown_proxy(POLICY)
    client = proxy.genai_client(headers=run_header("tuned"))
    client.models.generate_content(model="tunedModels/my-tuned-1", contents=PROMPT)
    assert_charged(proxy, "tuned", expected("gemini", usage, GEMINI))


def _compat_chat(usage: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-g",
        "object": "chat.completion",
        "created": 1,
        "model": GEMINI,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


def test_geminis_openai_compatible_endpoint_is_charged_and_denied_as_openai(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """The openai SDK at Google's documented base URL hits the `provider: gemini` action: the
    call is read as OpenAI's chat, charged genai-prices' google price of its usage (thinking
    the endpoint counts apart from completion_tokens billed as output), and refused in the
    shape the openai SDK reads. Before, every such call was a $0 step."""
    path = "/v1beta/openai/chat/completions"
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 80,
        "total_tokens": 1680,
        "completion_tokens_details": {"reasoning_tokens": 400},
    }
    standin.script("POST", path, Reply(json=_compat_chat(usage)))
    events = [
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": GEMINI,
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}}]},
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": GEMINI,
         "choices": [],
         "usage": {"prompt_tokens": 900, "completion_tokens": 40, "total_tokens": 940}},
    ]  # fmt: skip
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    standin.script("POST", path, Reply(body=sse, content_type="text/event-stream"))
    broke = POLICY.replace("budgets:\n", 'budgets:\n  - {scope: "run:broke", usd: 0.000001}\n')
    proxy = drawdown_proxy(broke)
    base = "https://generativelanguage.googleapis.com/v1beta/openai/"
    with proxy.openai_client(base) as client:
        client.chat.completions.create(
            model=GEMINI, messages=MESSAGES, extra_headers=run_header("compat")
        )
        assert_charged(
            proxy,
            "compat",
            expected("gemini", {"promptTokenCount": 1200, "candidatesTokenCount": 480}, GEMINI),
        )
        chunks = list(
            client.chat.completions.create(
                model=GEMINI, messages=MESSAGES, stream=True, extra_headers=run_header("stream")
            )
        )
        assert chunks and all(c.choices for c in chunks)  # the usage asked for is not shown
        assert standin.last(path).json["stream_options"] == {"include_usage": True}
        assert_charged(
            proxy,
            "stream",
            expected("gemini", {"promptTokenCount": 900, "candidatesTokenCount": 40}, GEMINI),
        )
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(
                model=GEMINI, messages=MESSAGES, extra_headers=run_header("broke")
            )
    # OpenAI's error shape (the SDK's `code` and `type`), not Google's (`code`: 402).
    assert refused.value.status_code == 402
    assert isinstance(refused.value.code, str) and refused.value.type, refused.value.body
    assert standin.count(path) == 2


# --- the recorded corpus ------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    name: str
    chunks: Any = None  # as Reply.chunks; None: the whole body in one piece
    encoding: str | None = None


REPLAYS = [
    # OpenAI chat: explicit cache write, then its read; reasoning; audio; Azure; a stream.
    Replay("openai-chat-completions-11", encoding="gzip"),
    Replay("openai-chat-completions-12"),
    Replay("openai-chat-completions-01"),
    Replay("openai-chat-completions-07"),
    Replay("openai-chat-completions-09"),  # Azure deployment path on cognitiveservices.azure.com
    Replay("openai-chat-completions-05", chunks="awkward"),  # stream, reasoning only
    Replay("openai-chat-completions-14", chunks=1, encoding="gzip"),
    # OpenAI Responses: cache read (JSON); reasoning (SSE, usage on response.completed).
    Replay("openai-responses-09", encoding="gzip"),
    Replay("openai-responses-05", chunks="awkward", encoding="gzip"),
    # Anthropic: cache read + write (JSON); message_delta's input far above message_start's.
    Replay("anthropic-messages-04"),
    Replay("anthropic-messages-12", chunks="awkward"),
    Replay("anthropic-messages-14", chunks=5, encoding="gzip"),  # thinking
    # Gemini: cache read + thoughts; audio in the cache; Vertex AI; \r\n\r\n streams.
    Replay("gemini-generateContent-03", encoding="gzip"),
    Replay("gemini-generateContent-04"),
    Replay("gemini-generateContent-08"),
    Replay("gemini-streamGenerateContent-02", chunks="separators"),
    Replay("gemini-streamGenerateContent-04", chunks="awkward", encoding="gzip"),
]

API_OF = {
    "chat-completions": "openai.chat",
    "responses": "openai.responses",
    "messages": "anthropic",
    "generateContent": "gemini",
    "streamGenerateContent": "gemini",
}


def _send_recorded(
    client: httpx2.Client, standin: StandIn, replay: Replay, run: str
) -> tuple[Any, bytes]:
    rec = load_recorded(replay.name)
    chunks = replay.chunks
    if chunks == "awkward":
        chunks = awkward(len(rec.response_body))
    elif chunks == "separators":
        chunks = inside_separators(rec.response_body)
    standin.replay_recorded(replay.name, chunks=chunks, content_encoding=replay.encoding)
    url = f"https://{rec.host}{rec.path}" + (f"?{rec.query}" if rec.query else "")
    headers = {"content-type": "application/json", **run_header(run)}
    with client.stream("POST", url, content=rec.request_body, headers=headers) as response:
        assert response.status_code == rec.status, replay.name
        body = b"".join(response.iter_bytes())  # content-decoded, as an SDK reads it
    return rec, body


# gpt-4o-mini-audio-preview: genai-prices lists no audio price for it, so its audio tokens are
# charged at the fallback price (priced = 0), the rest at its text price.
AUDIO_AT_FALLBACK = frozenset({"openai-chat-completions-07"})


def audio_at_fallback(usage: Mapping[str, Any], model: str) -> Expected:
    audio_in = usage["prompt_tokens_details"].get("audio_tokens", 0)
    audio_out = usage["completion_tokens_details"].get("audio_tokens", 0)
    text = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage["prompt_tokens"] - audio_in,
            output_tokens=usage["completion_tokens"] - audio_out,
        ),
        model,
        provider_id="openai",
    ).total_price
    fallback = DEFAULT_FALLBACK_PRICE
    audio = (audio_in * fallback.input + audio_out * fallback.output) / MILLION
    return Expected(usage["prompt_tokens"], usage["completion_tokens"], nanos(text + audio))


def test_recorded_exchanges_commit_the_usage_they_report(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    with proxy.http_client(timeout=30) as client:
        for replay in REPLAYS:
            rec, body = _send_recorded(client, standin, replay, replay.name)
            # Bytes untouched: what the client decoded is the recorded body, byte for byte.
            assert body == rec.response_body, f"{replay.name}: body changed in transit"
            model = rec.manifest["response_model"] or rec.manifest["model"]
            tier = rec.request_json.get("service_tier")  # responses-05 ran on the flex tier
            if replay.name in AUDIO_AT_FALLBACK:
                assert_charged(proxy, replay.name, audio_at_fallback(rec.usage, model), priced=0)
                continue
            want = expected(API_OF[rec.manifest["endpoint"]], rec.usage, model, tier)
            assert_charged(proxy, replay.name, want)
        # Real error bodies: nothing billed, the hold released.
        for name in (
            "openai-chat-completions-10",
            "anthropic-messages-10",
            "gemini-generateContent-09",
        ):
            rec, _ = _send_recorded(client, standin, Replay(name), name)
            assert_released(proxy, name, rec.status)
        # A real stream without usage (the client did not ask): drawdown asked for it, the upstream
        # sent none anyway, so the text is counted. The client still gets the recorded bytes
        # (decoded: the meter re-emits the events it did not remove).
        rec, body = _send_recorded(
            client,
            standin,
            Replay("openai-chat-completions-04", chunks="awkward", encoding="gzip"),
            "no-usage",
        )
        assert body == rec.response_body
        assert standin.last("/v1/chat/completions").json["stream_options"] == {
            "include_usage": True
        }
        got = committed(proxy, "no-usage")
        assert (got.source, got.priced, got.hold_state) == ("counted", 1, "committed"), got
        assert got.tokens_out and got.usd and got.instance[0] == got.usd, got


def test_gemini_json_array_stream_is_forwarded_as_it_comes_and_metered(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """streamGenerateContent without alt=sse streams one JSON array: not SSE, still a stream."""
    rec = load_recorded("gemini-streamGenerateContent-02")
    events = rec.response_body.split(b"\r\n\r\n")
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events if e.strip()]
    pieces = [json.dumps(c, indent=2).encode() for c in chunks]
    first, rest = b"[" + pieces[0], b"".join(b",\r\n" + p for p in pieces[1:]) + b"]"
    gate = threading.Event()
    standin.script(
        "POST",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        Reply(body=first + rest, content_type="application/json", chunks=[first, gate, rest]),
    )
    proxy = drawdown_proxy(POLICY)
    url = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    received = b""
    try:
        with (
            proxy.http_client(timeout=10) as client,
            client.stream(
                "POST", url, content=rec.request_body, headers=run_header("json-array")
            ) as response,
        ):
            for data in response.iter_bytes():
                received += data
                gate.set()  # the first chunk arrived while the upstream held back the rest
    finally:
        gate.set()
    assert received == first + rest
    assert json.loads(received)[-1]["usageMetadata"] == rec.usage
    assert_charged(proxy, "json-array", expected("gemini", rec.usage, "gemini-2.5-flash"))


# --- unpriced models, missing usage, errors, resets ---------------------------------------


def test_unknown_model_is_charged_at_the_fallback_price_and_flagged(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    with proxy.openai_client() as client:
        reply = client.chat.completions.create(
            model="acme-private-7b", messages=MESSAGES, extra_headers=run_header("unknown")
        )
    fallback = DEFAULT_FALLBACK_PRICE
    want = flat(
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
        str(fallback.input),
        str(fallback.output),
    )
    got = assert_charged(proxy, "unknown", want, priced=0)
    assert got.usd > 0  # never $0
    proxy.wait_for_log(
        r"model acme-private-7b is unknown to genai-prices' openai; \S+ charged at the fallback "
        r"price"
    )


def test_success_without_usage_is_counted(drawdown_proxy: Factory, standin: StandIn) -> None:
    text = "Counted with tiktoken because the upstream reported no usage at all."
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(
            json={
                "id": "chatcmpl-nousage",
                "object": "chat.completion",
                "created": 1,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
            }
        ),
    )
    proxy = drawdown_proxy(POLICY)
    with proxy.openai_client() as client:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=run_header("no-usage")
        )
    assert reply.usage is None and reply.choices[0].message.content == text
    got = committed(proxy, "no-usage")
    assert (got.source, got.priced, got.hold_state, got.status) == ("counted", 1, "committed", 200)
    assert got.tokens_out == count_tokens(text, "gpt-4o-mini")
    assert got.tokens_in > 0
    assert got.usd == expected("openai.chat", counted_usage(got), "gpt-4o-mini").usd_nanos


def test_upstream_errors_release_the_hold(drawdown_proxy: Factory, standin: StandIn) -> None:
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(status=500, json={"error": {"message": "boom", "type": "server_error"}}),
    )
    standin.script(
        "POST",
        "/v1/messages",
        Reply(
            status=529,
            json={"type": "error", "error": {"type": "overloaded_error", "message": "x"}},
        ),
    )
    standin.script(
        "POST",
        "/v1/models/*",
        Reply(
            status=429,
            json={"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}},
        ),
    )
    proxy = drawdown_proxy(POLICY)
    with proxy.openai_client(max_retries=0) as client, pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=run_header("openai-500")
        )
    with proxy.anthropic_client(max_retries=0) as client, pytest.raises(anthropic.APIStatusError):
        client.messages.create(
            model=CLAUDE, max_tokens=64, messages=MESSAGES, extra_headers=run_header("claude-529")
        )
    gemini = proxy.genai_client(headers=run_header("gemini-429"))
    with pytest.raises(Exception, match="429"):
        gemini.models.generate_content(model=GEMINI, contents=PROMPT)
    assert_released(proxy, "openai-500", 500)
    assert_released(proxy, "claude-529", 529)
    assert_released(proxy, "gemini-429", 429)


def test_stream_reset_mid_way_commits_what_was_counted(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    words = [" one", " two", " three", " four", " five", " six", " seven", " eight"]
    usage = {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}
    chat = openai_chat_sse(
        id="c1", created=1, model="gpt-4o-mini", deltas=words, usage=usage, include_usage=True
    )
    # The role chunk and four words reach the client; once it has read them (the gate), the
    # upstream sends one more byte and resets the connection. (Resetting right away could make
    # the proxy's kernel drop bytes it had received but not yet read.)
    chat_gate = threading.Event()
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(
            body=b"".join(chat),
            content_type="text/event-stream",
            chunks=[*chat[:5], chat_gate, *chat[5:]],
            reset_after_bytes=sum(len(e) for e in chat[:5]) + 1,
        ),
    )
    claude = anthropic_sse(
        id="m1", model=CLAUDE, deltas=words, usage=anthropic_usage(1234, 8), stop_reason="end_turn"
    )
    claude_gate = threading.Event()  # after message_start, block start, ping and three words
    standin.script(
        "POST",
        "/v1/messages",
        Reply(
            body=b"".join(claude),
            content_type="text/event-stream",
            chunks=[*claude[:6], claude_gate, *claude[6:]],
            reset_after_bytes=sum(len(e) for e in claude[:6]) + 1,
        ),
    )
    proxy = drawdown_proxy(POLICY)
    seen: list[str] = []
    try:
        with proxy.openai_client(max_retries=0) as client, pytest.raises(CUT_SHORT):
            for chunk in client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                extra_headers=run_header("chat-reset"),
            ):
                seen.append(chunk.choices[0].delta.content or "")
                if len(seen) == 5:
                    chat_gate.set()
    finally:
        chat_gate.set()
    assert "".join(seen) == "".join(words[:4])  # forwarded as they came, up to the reset
    got = committed(proxy, "chat-reset")
    assert (got.source, got.hold_state, got.priced) == ("counted", "committed", 1), got
    assert got.tokens_out == count_tokens("".join(words[:4]), "gpt-4o-mini")
    assert got.note and got.note.startswith("stream cut short"), got
    assert got.instance[:3] == (got.usd, got.tokens_in + got.tokens_out, 1), got
    assert got.usd == expected("openai.chat", counted_usage(got), "gpt-4o-mini").usd_nanos

    text: list[str] = []
    try:
        client = proxy.anthropic_client(max_retries=0)
        with (
            client,
            pytest.raises(CUT_SHORT),
            client.messages.stream(
                model=CLAUDE,
                max_tokens=64,
                messages=MESSAGES,
                extra_headers=run_header("claude-reset"),
            ) as stream,
        ):
            for piece in stream.text_stream:
                text.append(piece)
                if len(text) == 3:
                    claude_gate.set()
    finally:
        claude_gate.set()
    assert "".join(text) == "".join(words[:3])
    got = committed(proxy, "claude-reset")
    # message_start reported the input exactly; the output is counted from what was streamed.
    assert (got.source, got.hold_state, got.tokens_in) == ("counted", "committed", 1234), got
    assert got.tokens_out >= 3 and got.instance[0] == got.usd, got
    claude_counted = {"input_tokens": got.tokens_in, "output_tokens": got.tokens_out}
    assert got.usd == expected("anthropic", claude_counted, CLAUDE).usd_nanos


# --- OpenAI-compatible hosts and Azure ----------------------------------------------------


def test_an_azure_deployment_named_otherwise_is_estimated_as_the_model_it_serves(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """A deployment named `prod-chat` was estimated at the fallback price on every call (~100×
    gpt-4o-mini's); its answers name the model it serves, and from the first one on drawdown
    estimates its calls as that model."""
    from drawdown.meter import MeterConfig, inspect_request, origin

    served = "gpt-4o-mini-2024-07-18"
    standin.deployments["prod-chat"] = served
    proxy = drawdown_proxy(POLICY)
    azure = openai.AzureOpenAI(
        azure_endpoint="https://drawdown-test.openai.azure.com",
        api_version="2024-10-21",
        api_key="azure-test-key",
        http_client=openai.DefaultHttpxClient(
            verify=proxy.ssl_context(), proxy=proxy.proxy_url, trust_env=False
        ),
    )
    with azure:
        for run in ("prod-1", "prod-2"):
            azure.chat.completions.create(
                model="prod-chat", messages=MESSAGES, max_tokens=64, extra_headers=run_header(run)
            )
            upstream = standin.last("/openai/deployments/*")
            assert upstream.path == "/openai/deployments/prod-chat/chat/completions"
            assert_charged(proxy, run, expected("openai.chat", upstream.usage, served))
    first, second = (
        proxy.query("SELECT est_usd FROM decisions WHERE run = ?", run)[0][0]
        for run in ("prod-1", "prod-2")
    )
    named = inspect_request(
        "openai",
        "POST",
        "/openai/deployments/prod-chat/chat/completions",
        {},
        json.dumps({"model": served, "messages": MESSAGES, "max_tokens": 64}).encode(),
        MeterConfig(),
        origin=origin("https", "drawdown-test.openai.azure.com", 443),
    )
    assert named.priced and second == named.estimate_usd_nanos
    assert second * 50 < first  # the first, at the fallback price


def test_openai_compatible_host_uses_the_policy_price_and_azure_paths_are_metered(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    ctx, url = proxy.ssl_context(), proxy.proxy_url
    # Groq-style host: chat JSON and a stream (usage asked for and hidden), at the policy's price.
    with proxy.openai_client("https://groq.example.com/openai/v1") as groq:
        groq.chat.completions.create(
            model="llama-3.3-70b-versatile", messages=MESSAGES, extra_headers=run_header("groq")
        )
        usage = standin.last("/openai/v1/chat/completions").usage
        assert_charged(
            proxy, "groq", flat(usage["prompt_tokens"], usage["completion_tokens"], "0.59", "0.79")
        )
        chunks = list(
            groq.chat.completions.create(
                model="llama-3.3-70b-versatile",
                messages=MESSAGES,
                stream=True,
                extra_headers=run_header("groq-stream"),
            )
        )
        assert all(c.choices for c in chunks)
        usage = standin.last("/openai/v1/chat/completions").usage
        assert_charged(
            proxy,
            "groq-stream",
            flat(usage["prompt_tokens"], usage["completion_tokens"], "0.59", "0.79"),
        )
    # stream_usage: false: the request goes out as the client wrote it; the stream is counted.
    with proxy.openai_client("https://strict.example.com/openai/v1") as strict:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in strict.chat.completions.create(
                model="local-model",
                messages=MESSAGES,
                stream=True,
                extra_headers=run_header("strict"),
            )
        )
    sent = standin.last("/openai/v1/chat/completions")
    assert "stream_options" not in sent.json and sent.usage is None
    got = committed(proxy, "strict")
    assert (got.source, got.priced, got.hold_state) == ("counted", 1, "committed"), got
    assert got.tokens_out == count_tokens(text, "local-model")
    assert got.usd == flat(got.tokens_in, got.tokens_out, "0.10", "0.40").usd_nanos
    # Azure OpenAI: the deployment in the path, api-version in the query.
    azure = openai.AzureOpenAI(
        azure_endpoint="https://drawdown-test.openai.azure.com",
        api_version="2024-10-21",
        api_key="azure-test-key",
        http_client=openai.DefaultHttpxClient(verify=ctx, proxy=url, trust_env=False),
    )
    with azure:
        azure.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=run_header("azure")
        )
        upstream = standin.last("/openai/deployments/*")
        assert upstream.path == "/openai/deployments/gpt-4o-mini/chat/completions"
        assert upstream.query == "api-version=2024-10-21"
        assert_charged(proxy, "azure", expected("openai.chat", upstream.usage, "gpt-4o-mini"))
        text = "".join(
            c.choices[0].delta.content or ""
            for c in azure.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                extra_headers=run_header("azure-stream"),
            )
            if c.choices
        )
        assert text
        upstream = standin.last("/openai/deployments/*")
        assert upstream.json["stream_options"] == {"include_usage": True}
        assert_charged(
            proxy, "azure-stream", expected("openai.chat", upstream.usage, "gpt-4o-mini")
        )
        azure.embeddings.create(
            model="text-embedding-3-small", input=PROMPT, extra_headers=run_header("azure-embed")
        )
        upstream = standin.last("/openai/deployments/*")
        assert_charged(
            proxy,
            "azure-embed",
            expected("openai.embeddings", upstream.usage, "text-embedding-3-small"),
        )
    assert json.loads(upstream.body)["input"] == PROMPT
