"""OpenAI-compatible and cloud hosts are priced at their own models' prices: the genai-prices
provider whose api_pattern matches the upstream URL, then the action's family, then the
fallback. Expected figures come from genai-prices itself, asked by URL or by provider id."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import genai_prices
import pytest
from drawdown.meter import (
    MeterConfig,
    PricePerMillion,
    TokenUsage,
    inspect_request,
    measure_body,
    origin,
    price_providers,
    unread_request,
)
from drawdown.meter.prices import flat_price, url_provider

CONFIG = MeterConfig()
MESSAGES = [{"role": "user", "content": "Price me at my host's price."}]
MAX_TOKENS = 200


def _nanos(usd: Decimal) -> int:
    return math.ceil(usd * 1_000_000_000)


def _chat(model: str | None) -> bytes:
    body: dict[str, object] = {"messages": MESSAGES, "max_tokens": MAX_TOKENS}
    if model is not None:
        body["model"] = model
    return json.dumps(body).encode()


def _inspect(url: str, body: bytes, provider: str = "openai", **kw: object):
    scheme, rest = url.split("://", 1)
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    default = 443 if scheme == "https" else 80
    upstream = origin(scheme, host, int(port) if port else default)
    return inspect_request(provider, "POST", "/" + path, {}, body, CONFIG, origin=upstream, **kw)


def _answer(model: str, prompt: int, completion: int) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    ).encode()


def _by_url(url: str, model: str, input_tokens: int, output_tokens: int) -> int:
    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return _nanos(genai_prices.calc_price(usage, model, provider_api_url=url).total_price)


def _by_id(provider_id: str, model: str, input_tokens: int, output_tokens: int) -> int:
    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return _nanos(genai_prices.calc_price(usage, model, provider_id=provider_id).total_price)


# --- which provider -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "host", "port", "path", "provider"),
    [
        ("https", "api.groq.com", 443, "/openai/v1/chat/completions", "groq"),
        ("https", "api.deepseek.com", 443, "/chat/completions", "deepseek"),
        ("https", "openrouter.ai", 443, "/api/v1/chat/completions", "openrouter"),
        ("https", "API.X.AI", 443, "/v1/chat/completions", "x-ai"),  # hosts are case-blind
        (
            "https",
            "my-res.openai.azure.com",
            443,
            "/openai/deployments/d/chat/completions",
            "azure",
        ),
        ("https", "api.openai.com", 443, "/v1/chat/completions", "openai"),
        ("https", "api.anthropic.com", 443, "/v1/messages", "anthropic"),
        ("https", "us-east5-aiplatform.googleapis.com", 443, "/v1/projects/p/x", "google"),
        (
            "https",
            "router.huggingface.co",
            443,
            "/groq/openai/v1/chat/completions",
            "huggingface_groq",
        ),
        # A default port is no part of the URL a pattern sees (arcee's ends the host: `(?:/|$)`).
        ("https", "api.arcee.ai", 443, "/api/v1/chat/completions", "arcee"),
        ("https", "vllm.internal", 8000, "/v1/chat/completions", None),
        ("http", "localhost", 11434, "/v1/chat/completions", None),
        ("http", "api.groq.com", 80, "/openai/v1/chat/completions", None),  # its pattern is https
    ],
)
def test_the_upstream_url_names_the_provider(
    scheme: str, host: str, port: int, path: str, provider: str | None
) -> None:
    assert url_provider(origin(scheme, host, port), path) == provider


def test_origin_is_the_base_url_genai_prices_matches() -> None:
    assert origin("https", "Api.Groq.com", 443) == "https://api.groq.com"
    assert origin("http", "localhost", 80) == "http://localhost"
    assert origin("https", "gateway.corp", 8443) == "https://gateway.corp:8443"
    assert origin("http", "::1", 8000) == "http://[::1]:8000"


def test_the_host_provider_comes_before_the_family() -> None:
    assert price_providers("openai", "groq") == ("groq", "openai")
    assert price_providers("openai", "openai") == ("openai",)
    assert price_providers("openai", None) == ("openai",)
    assert price_providers("gemini", "google") == ("google",)
    assert price_providers("anthropic", "google") == ("google", "anthropic")  # Claude on Vertex


def test_resolution_is_cached_per_endpoint() -> None:
    upstream = origin("https", "api.groq.com", 443)
    url_provider(upstream, "/openai/v1/chat/completions")
    before = url_provider.cache_info()
    for _ in range(50):
        _inspect(
            "https://api.groq.com/openai/v1/chat/completions", _chat("llama-3.3-70b-versatile")
        )
    after = url_provider.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 50


# --- the estimate and the measured cost ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "model", "reported_model"),
    [
        ("https://api.groq.com/openai/v1/chat/completions", "llama-3.3-70b-versatile", None),
        ("https://api.groq.com/openai/v1/chat/completions", "openai/gpt-oss-120b", None),
        ("https://api.deepseek.com/chat/completions", "deepseek-chat", None),
        ("https://api.deepseek.com/v1/chat/completions", "deepseek-reasoner", None),
        # OpenRouter's "vendor/model" ids are its own, priced at its own prices.
        (
            "https://openrouter.ai/api/v1/chat/completions",
            "meta-llama/llama-3.3-70b-instruct",
            None,
        ),
        ("https://openrouter.ai/api/v1/chat/completions", "anthropic/claude-sonnet-4.5", None),
        ("https://api.x.ai/v1/chat/completions", "grok-4", None),
        ("https://api.mistral.ai/v1/chat/completions", "mistral-large-latest", None),
        (
            "https://api.together.xyz/v1/chat/completions",
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            None,
        ),
        ("https://api.cerebras.ai/v1/chat/completions", "llama-3.3-70b", None),
        # Azure: the deployment's own model name; the answer names the model it ran.
        (
            "https://my-res.openai.azure.com/openai/deployments/gpt-4o-mini/chat/completions",
            "gpt-4o-mini",
            "gpt-4o-mini-2024-07-18",
        ),
    ],
)
def test_estimate_and_cost_are_the_hosts_genai_prices(
    url: str, model: str, reported_model: str | None
) -> None:
    request = _inspect(url, _chat(model))
    assert request.priced and request.price_provider == url_provider(*_split(url))
    assert request.estimate_usd_nanos == _by_url(
        url, model, request.input_tokens, request.max_output_tokens
    )
    answered = reported_model or model
    measured = measure_body(request, 200, _answer(answered, 1234, 567), CONFIG)
    assert (measured.source, measured.priced) == ("usage", True)
    assert measured.usd_nanos == _by_url(url, answered, 1234, 567) > 0


def _split(url: str) -> tuple[str, str]:
    scheme, rest = url.split("://", 1)
    host, _, path = rest.partition("/")
    return f"{scheme}://{host}", "/" + path


def test_a_groq_model_was_unknown_to_the_openai_family() -> None:
    """Why it matters: priced as openai, Groq's models fell to the fallback price."""
    body = _chat("llama-3.3-70b-versatile")
    as_openai = inspect_request("openai", "POST", "/openai/v1/chat/completions", {}, body, CONFIG)
    as_groq = _inspect("https://api.groq.com/openai/v1/chat/completions", body)
    assert not as_openai.priced and as_groq.priced
    assert as_openai.estimate_usd_nanos > 20 * as_groq.estimate_usd_nanos


def test_a_model_the_host_does_not_list_is_priced_by_the_family() -> None:
    """The same model name at the action's family is the same model: closer than the fallback."""
    url = "https://api.groq.com/openai/v1/chat/completions"
    with pytest.raises(LookupError):
        genai_prices.calc_price(
            genai_prices.Usage(input_tokens=1), "gpt-4o-mini", provider_id="groq"
        )
    request = _inspect(url, _chat("gpt-4o-mini"))
    assert request.priced and request.price_provider == "groq"
    assert request.estimate_usd_nanos == _by_id(
        "openai", "gpt-4o-mini", request.input_tokens, request.max_output_tokens
    )
    measured = measure_body(request, 200, _answer("gpt-4o-mini", 100, 10), CONFIG)
    assert measured.priced and measured.usd_nanos == _by_id("openai", "gpt-4o-mini", 100, 10)


def test_azure_deployment_named_otherwise_is_priced_by_the_model_it_answers_with() -> None:
    url = "https://my-res.openai.azure.com/openai/deployments/prod-chat/chat/completions"
    request = _inspect(url, _chat(None))
    assert (request.model, request.price_provider, request.priced) == ("prod-chat", "azure", False)
    measured = measure_body(request, 200, _answer("gpt-4o-mini-2024-07-18", 100, 10), CONFIG)
    assert measured.priced
    assert measured.usd_nanos == _by_url(url, "gpt-4o-mini-2024-07-18", 100, 10)


def test_an_unknown_host_is_priced_by_the_family() -> None:
    request = _inspect("http://vllm.internal:8000/v1/chat/completions", _chat("gpt-4o-mini"))
    assert request.price_provider is None and request.priced
    assert request.estimate_usd_nanos == _by_id(
        "openai", "gpt-4o-mini", request.input_tokens, request.max_output_tokens
    )
    local = _inspect("http://vllm.internal:8000/v1/chat/completions", _chat("my-finetune-7b"))
    assert not local.priced  # then the fallback price
    assert local.estimate_usd_nanos == _nanos(
        flat_price(
            TokenUsage(input_tokens=local.input_tokens, output_tokens=MAX_TOKENS),
            CONFIG.fallback_price,
        )
    )


def test_an_unknown_model_on_a_known_host_takes_the_fallback() -> None:
    request = _inspect("https://api.groq.com/openai/v1/chat/completions", _chat("no-such-model"))
    assert not request.priced and request.price_provider == "groq"
    measured = measure_body(request, 200, _answer("no-such-model", 100, 10), CONFIG)
    assert not measured.priced
    assert measured.usd_nanos == _nanos(
        flat_price(TokenUsage(input_tokens=100, output_tokens=10), CONFIG.fallback_price)
    )


def test_the_actions_price_still_wins() -> None:
    price = PricePerMillion(input=Decimal("0.25"), output=Decimal("0.5"))
    url = "https://api.groq.com/openai/v1/chat/completions"
    request = _inspect(url, _chat("llama-3.3-70b-versatile"), price_override=price)
    assert request.priced
    assert request.estimate_usd_nanos == _nanos(
        flat_price(TokenUsage(input_tokens=request.input_tokens, output_tokens=MAX_TOKENS), price)
    )
    assert request.estimate_usd_nanos != _by_url(
        url, "llama-3.3-70b-versatile", request.input_tokens, MAX_TOKENS
    )
    measured = measure_body(
        request, 200, _answer("llama-3.3-70b-versatile", 100, 10), CONFIG, price
    )
    assert measured.usd_nanos == _nanos(
        flat_price(TokenUsage(input_tokens=100, output_tokens=10), price)
    )


def test_claude_on_vertex_is_priced_as_on_anthropics_api() -> None:
    path = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
    body = json.dumps(
        {"anthropic_version": "vertex-2023-10-16", "max_tokens": MAX_TOKENS, "messages": MESSAGES}
    ).encode()
    vertex = _inspect(f"https://us-east5-aiplatform.googleapis.com{path}", body, "anthropic")
    assert (vertex.price_provider, vertex.priced) == ("google", True)
    assert vertex.estimate_usd_nanos == _by_id(
        "anthropic", "claude-sonnet-4-5", vertex.input_tokens, vertex.max_output_tokens
    )
    direct = _inspect(
        "https://api.anthropic.com/v1/messages",
        json.dumps(
            {"model": "claude-sonnet-4-5", "max_tokens": MAX_TOKENS, "messages": MESSAGES}
        ).encode(),
        "anthropic",
    )
    assert direct.price_provider == "anthropic" and direct.priced


def test_gemini_on_vertex_is_priced_by_google() -> None:
    path = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"
    body = json.dumps(
        {
            "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "generationConfig": {"maxOutputTokens": MAX_TOKENS},
        }
    ).encode()
    request = _inspect(f"https://aiplatform.googleapis.com{path}", body, "gemini")
    assert (request.price_provider, request.priced) == ("google", True)
    assert request.estimate_usd_nanos == _by_id(
        "google", "gemini-2.5-flash", request.input_tokens, request.max_output_tokens
    )


def test_a_request_forwarded_unread_is_priced_at_its_hosts_prices() -> None:
    """Shadow mode's unread requests: the answer's usage is still priced by the host."""
    url = "https://api.groq.com/openai/v1/chat/completions"
    upstream, path = _split(url)
    request = unread_request("openai", "POST", path, origin=upstream)
    assert request.billable and request.price_provider == "groq"
    measured = measure_body(request, 200, _answer("llama-3.3-70b-versatile", 100, 10), CONFIG)
    assert measured.priced
    assert measured.usd_nanos == _by_url(url, "llama-3.3-70b-versatile", 100, 10)


def test_a_deployment_named_otherwise_is_estimated_as_the_model_its_answers_name() -> None:
    """An Azure deployment named `prod-chat` was estimated at the fallback price ($15 in, $75
    out a million) on every call, ~100× what gpt-4o-mini costs: a budget near its limit
    refused calls it had room for. Once an answer names the model it serves, its next calls
    are estimated as that model."""
    from drawdown.meter import Measurement, ServedModels

    azure = origin("https", "acme.openai.azure.com", 443)
    path = "/openai/deployments/prod-chat/chat/completions"
    first = inspect_request("openai", "POST", path, {}, _chat(None), CONFIG, origin=azure)
    assert (first.model, first.priced, first.served_as) == ("prod-chat", False, None)
    served = ServedModels()

    def answered(model: str | None, priced: bool = True) -> Measurement:
        return Measurement(TokenUsage(input_tokens=9, output_tokens=3), 1, "usage", priced, model)

    # What teaches nothing: an answer at the fallback price, or naming no model.
    served.learn(
        first, answered("llama-in-house", priced=False), "https", "acme.openai.azure.com", 443
    )
    served.learn(first, answered(None), "https", "acme.openai.azure.com", 443)
    assert served.of(azure) is None
    served.learn(first, answered("gpt-4o-mini-2024-07-18"), "https", "acme.openai.azure.com", 443)
    later = inspect_request(
        "openai", "POST", path, {}, _chat(None), CONFIG, origin=azure, served=served.of(azure)
    )
    named = inspect_request(
        "openai", "POST", path, {}, _chat("gpt-4o-mini-2024-07-18"), CONFIG, origin=azure
    )
    assert (later.model, later.priced, later.served_as) == (
        "prod-chat",
        True,
        "gpt-4o-mini-2024-07-18",
    )
    assert later.estimate_usd_nanos == named.estimate_usd_nanos
    assert later.estimate_usd_nanos * 50 < first.estimate_usd_nanos
    # Another host's deployment of the same name is another deployment.
    elsewhere = origin("https", "other.openai.azure.com", 443)
    assert served.of(elsewhere) is None
    # Redeployed on another model: the next answer says so.
    served.learn(later, answered("gpt-4o-2024-08-06"), "https", "acme.openai.azure.com", 443)
    assert served.of(azure) == {"prod-chat": "gpt-4o-2024-08-06"}
    # A name genai-prices prices as it is is never learned.
    gpt = inspect_request("openai", "POST", path, {}, _chat("gpt-4o"), CONFIG, origin=azure)
    served.learn(gpt, answered("gpt-4o-2024-08-06"), "https", "acme.openai.azure.com", 443)
    assert "gpt-4o" not in (served.of(azure) or {})


def test_the_served_models_a_proxy_learns_are_bounded() -> None:
    from drawdown.meter import Measurement, ServedModels

    served = ServedModels()
    answered = Measurement(TokenUsage(), 1, "usage", True, "gpt-4o-mini")
    for i in range(ServedModels.LIMIT + 10):
        path = f"/openai/deployments/d{i}/chat/completions"
        request = inspect_request("openai", "POST", path, {}, _chat(None), CONFIG)
        served.learn(request, answered, "https", f"h{i % 7}.openai.azure.com", 443)
    learned = sum(
        len(served.of(origin("https", f"h{j}.openai.azure.com", 443)) or {}) for j in range(7)
    )
    assert 0 < learned <= ServedModels.LIMIT
