"""OpenAI-compatible hosts, end to end: the official openai SDK pointed at Groq's and DeepSeek's
base URLs through a real `drawdown run`, against the TLS stand-in. The ledger charges
genai-prices' price *of that host* for the usage it reported (computed here by URL, from the
stand-in's raw usage), priced = 1: an enforced USD budget the fallback price would exhaust
with the first estimate lets every call through."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import genai_prices
import pytest
from drawdown.meter import DEFAULT_FALLBACK_PRICE

from tests.e2e.test_metering import Expected, assert_charged, billed_usage, committed, nanos
from tests.support.proxy import DrawdownProcess
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

BUDGET_USD = Decimal("0.05")
MAX_TOKENS = 1000
POLICY = f"""
mode: enforce
identity:
  tenant: [{{value: acme}}]
  agent: [{{value: fleet}}]
  run: [{{header: X-Drawdown-Run}}, {{value: unnamed}}]
actions:
  - {{kind: llm, provider: openai, match: {{host: [api.groq.com, api.deepseek.com]}}}}
budgets:
  - {{scope: "run:*", usd: {BUDGET_USD}}}
"""
MESSAGES = [{"role": "user", "content": "Price this call at my host's price."}]
HOSTS = [
    ("https://api.groq.com/openai/v1", "llama-3.3-70b-versatile"),
    ("https://api.deepseek.com/v1", "deepseek-chat"),
]


def hosts_price(url: str, usage: dict[str, int], model: str) -> Expected:
    """genai-prices' price for the reported usage at the provider `url` names."""
    counts = billed_usage("openai.chat", usage)
    price = genai_prices.calc_price(genai_prices.Usage(**counts), model, provider_api_url=url)
    return Expected(counts["input_tokens"], counts["output_tokens"], nanos(price.total_price))


def test_the_fallback_price_would_exhaust_the_budget() -> None:
    """The premise: one call's estimate at the fallback price is over the run's budget."""
    assert MAX_TOKENS * DEFAULT_FALLBACK_PRICE.output / 1_000_000 > BUDGET_USD


def test_a_compatible_host_is_charged_its_own_price(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    for base_url, model in HOSTS:
        host = base_url.split("/")[2]
        with proxy.openai_client(base_url) as client:
            for stream in (False, True):
                run = f"{host}-{'stream' if stream else 'json'}"
                answer = client.chat.completions.create(
                    model=model,
                    messages=MESSAGES,
                    max_tokens=MAX_TOKENS,
                    stream=stream,
                    extra_headers={"X-Drawdown-Run": run},
                )
                if stream:
                    assert all(chunk.choices for chunk in answer)  # the usage chunk stays hidden
                else:
                    assert answer.choices[0].message.content
                sent = standin.last("*/chat/completions")
                assert sent.host == host and sent.json["model"] == model
                url = f"https://{host}{sent.path}"
                assert_charged(proxy, run, hosts_price(url, sent.usage, model))


def test_an_unknown_model_names_the_providers_it_was_looked_for_in(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    with proxy.openai_client("https://api.groq.com/openai/v1") as client:
        client.chat.completions.create(
            model="no-such-model",
            messages=MESSAGES,
            max_tokens=10,  # at the fallback price, still under the budget
            extra_headers={"X-Drawdown-Run": "unknown"},
        )
    got = committed(proxy, "unknown")
    assert (got.decision, got.priced) == ("allow", 0), got
    proxy.wait_for_log(
        r"model no-such-model is unknown to genai-prices' groq and openai; [\w-]+ charged at "
        r"the fallback price"
    )
