"""Pricing with genai-prices: integer nano-dollars, Decimal arithmetic, always rounded up."""

from __future__ import annotations

import decimal
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache

import genai_prices
from genai_prices import data_snapshot
from genai_prices.types import ModelPrice

from .config import MeterConfig, PricePerMillion
from .types import TokenUsage

log = logging.getLogger(__name__)

_NANOS_PER_USD = Decimal(1_000_000_000)
_MILLION = Decimal(1_000_000)
_CTX = decimal.Context(prec=60, rounding=decimal.ROUND_CEILING)

# drawdown provider name -> genai-prices provider id
PROVIDER_IDS = {"openai": "openai", "anthropic": "anthropic", "gemini": "google", "bedrock": "aws"}

# Measurement.extras keys that genai-prices can price, and the genai-prices usage key.
EXTRA_UNITS = {
    "web_search_calls": "web_searches",
    "file_search_calls": "storage_searches",
    "input_characters": "input_characters",  # tts-1 / tts-1-hd bill per character
    "audio_seconds": "audio_seconds",  # whisper-1, gpt-transcribe, Groq's whisper
}


# A second of audio as input tokens, where no genai-prices price per second applies (a
# speech-to-text model it does not know, a `price:` override per token): see
# openai_transcribe.AUDIO_TOKENS_PER_SECOND for the figure.
TOKENS_PER_AUDIO_SECOND = 20


@lru_cache(maxsize=1)
def _price_variants() -> frozenset[tuple[str, str]]:
    """Every (key, value) a genai-prices price variant is chosen by (`service_tier: flex`,
    `speed: fast`, …): a request or answer names its tier in the context only when a price
    depends on it, so an agent's made-up tiers neither grow the price caches nor reach them."""
    return frozenset(
        item
        for provider in data_snapshot.get_snapshot().providers
        for model in provider.models
        for variant in model.price_variants or ()
        for item in variant.when.items()
    )


def price_variant(context: dict[str, str], key: str, value: object) -> None:
    """Set `context[key]` to what a request or answer names (`value`, lowercased as the APIs'
    enums compare): itself where some genai-prices price depends on it, else "" (the standard
    price, and an answer saying so overrides what its request asked for)."""
    if isinstance(value, str):
        named = value.lower()
        context[key] = named if (key, named) in _price_variants() else ""


def to_nanos(usd: Decimal) -> int:
    """USD -> integer nano-dollars, rounded up (a reservation must never be short)."""
    return int(
        (usd * _NANOS_PER_USD).to_integral_value(rounding=decimal.ROUND_CEILING, context=_CTX)
    )


def origin(scheme: str, host: str, port: int) -> str:
    """scheme://host[:port] of an upstream, as genai-prices' `api_pattern`s spell a base URL:
    a default port is left out (a pattern may end the host with `(?:/|$)`)."""
    scheme, host = scheme.lower(), host.lower()
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    default = {"https": 443, "http": 80}.get(scheme)
    return f"{scheme}://{host}" if port == default else f"{scheme}://{host}:{port}"


@lru_cache(maxsize=4096)
def url_provider(upstream_origin: str, path: str) -> str | None:
    """The genai-prices provider whose `api_pattern` matches the upstream URL (first in its
    list, as genai-prices matches), or None: a host it does not know (a self-hosted server, a
    gateway). A few patterns name a path (Hugging Face's router, Cloudflare), hence the path;
    the metered paths of a host are few (an endpoint, a deployment, a model), so this scan of
    every pattern runs once per endpoint, never per request."""
    url = upstream_origin + path
    for provider in data_snapshot.get_snapshot().providers:
        if re.match(provider.api_pattern, url):
            return provider.id
    return None


def price_providers(provider: str, matched: str | None) -> tuple[str, ...]:
    """The genai-prices providers a call is priced with, in order: the one its URL matched,
    then its action's family (openai, anthropic, google)."""
    family = PROVIDER_IDS.get(provider, provider)
    return (matched, family) if matched and matched != family else (family,)


@lru_cache(maxsize=4096)
def _known(provider_id: str, model: str) -> bool:
    # genai-prices caches hits but not misses; an unknown model would be searched for (regex
    # over every model of the provider) on every call, so remember both answers.
    try:
        data_snapshot.get_snapshot().find_provider_model(model, None, provider_id, None)
    except LookupError:
        return False
    return True


def _genai_usage(usage: TokenUsage, extras: Mapping[str, int]) -> genai_prices.Usage:
    values: dict[str, int] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "output_reasoning_tokens": usage.reasoning_tokens,
        "input_audio_tokens": usage.input_audio_tokens,
        "cache_audio_read_tokens": usage.cache_audio_read_tokens,
        "output_audio_tokens": usage.output_audio_tokens,
        "input_image_tokens": usage.input_image_tokens,
        "cache_image_read_tokens": usage.cache_image_read_tokens,
        "output_image_tokens": usage.output_image_tokens,
    }
    for extra, unit in EXTRA_UNITS.items():
        if extras.get(extra):
            values[unit] = values.get(unit, 0) + int(extras[extra])
    if "audio_seconds" in values:
        # A transcription's seconds are input audio: genai-prices prices the input subset
        # (input_audio_seconds) at its own price where a model lists one, the rest at the
        # audio_seconds price, so both are stated.
        values["input_audio_seconds"] = values["audio_seconds"]
    # Zeros are left out: genai-prices treats a reported subset key as authoritative. But where
    # two reported subsets overlap (cache reads and input audio or images), genai-prices needs
    # their intersection stated, even a zero, or it refuses the usage and the breakdown is lost.
    kept = {k: v for k, v in values.items() if v > 0}
    for both, (a, b) in _INTERSECTIONS.items():
        if a in kept and b in kept:
            kept[both] = values[both]
    return genai_prices.Usage(**kept)


# genai-prices usage key -> the two subset keys it is the intersection of.
_INTERSECTIONS = {
    "cache_audio_read_tokens": ("cache_read_tokens", "input_audio_tokens"),
    "cache_image_read_tokens": ("cache_read_tokens", "input_image_tokens"),
}


def _plain(usage: TokenUsage) -> TokenUsage:
    # Only the top-level counts: a last resort when a provider's breakdown is inconsistent
    # (e.g. a subset larger than its parent) and genai-prices refuses it.
    return TokenUsage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)


def genai_price(
    provider: str,
    model: str,
    usage: TokenUsage,
    extras: Mapping[str, int] | None = None,
    price_context: Mapping[str, str] | None = None,
) -> Decimal | None:
    """Exact USD price from genai-prices, or None when it does not know the model."""
    # genai-prices may price by date or time of day, so a remembered answer is kept for one
    # minute at most. A looping agent resends identical requests: those cost nothing to price.
    key = (
        provider,
        model,
        usage,
        tuple(sorted((extras or {}).items())),
        tuple(sorted((price_context or {}).items())),
        int(time.time() // 60),
    )
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    total = _genai_price(provider, model, usage, extras, price_context)
    with _memo_lock:
        _memo[key] = total
        if len(_memo) > 8192:
            _memo.pop(next(iter(_memo)))  # the oldest entry: dicts keep insertion order
    return total


_memo: dict[tuple[object, ...], Decimal | None] = {}
_memo_lock = threading.Lock()


def _genai_price(
    provider: str,
    model: str,
    usage: TokenUsage,
    extras: Mapping[str, int] | None = None,
    price_context: Mapping[str, str] | None = None,
) -> Decimal | None:
    provider_id = PROVIDER_IDS.get(provider, provider)
    if model and not _known(provider_id, model) and "/" in model:
        model = model.rsplit("/", 1)[-1]  # "models/gemini-2.5-flash", "openai/gpt-4o"
    if not model or not _known(provider_id, model):
        return None
    extras = extras or {}
    for attempt in (usage, _plain(usage)):
        try:
            calc = genai_prices.calc_price(
                _genai_usage(attempt, extras),
                model,
                provider_id=provider_id,
                price_context=dict(price_context) if price_context else None,
            )
        except (ValueError, LookupError, ArithmeticError):
            continue
        total = calc.total_price
        if total <= 0 and (usage.input_tokens or usage.output_tokens):
            return None  # a model listed without token prices: not a silent 0
        return total
    return None


def flat_price(usage: TokenUsage, price: PricePerMillion) -> Decimal:
    """USD for `usage` at a per-million price (policy override or fallback)."""
    cache_read = min(usage.cache_read_tokens, usage.input_tokens)
    cache_write = min(usage.cache_write_tokens, usage.input_tokens - cache_read)
    fresh = usage.input_tokens - cache_read - cache_write
    with decimal.localcontext(_CTX):
        total = (
            fresh * price.input
            + cache_read * (price.input if price.cache_read is None else price.cache_read)
            + cache_write * (price.input if price.cache_write is None else price.cache_write)
            + usage.output_tokens * price.output
        )
        return total / _MILLION


def price_first_known(
    provider: str,
    models: Iterable[str | None],
    usage: TokenUsage,
    config: MeterConfig,
    price_override: PricePerMillion | None = None,
    *,
    extras: Mapping[str, int] | None = None,
    price_context: Mapping[str, str] | None = None,
    matched: str | None = None,
) -> tuple[Decimal, bool]:
    """USD (exact) and priced flag: the `price:` override, else the first model name a
    provider of `price_providers` knows (the URL's provider first, every name in turn), else
    the fallback. The family's price stands in for a model the URL's provider does not list:
    the same name there is the same model (an Azure deployment named after it, a model a host
    serves before genai-prices lists it there), closer than the fallback guess."""
    if price_override is not None:
        return flat_price(_with_audio_seconds(usage, extras), price_override), True
    for provider_id in price_providers(provider, matched):
        for model in models:
            if model:
                total = genai_price(provider_id, model, usage, extras, price_context)
                if total is None:
                    continue
                audio = unpriced_audio(provider_id, model, usage, price_context)
                if audio is None:
                    return total, True
                # The model's text at its price, its audio tokens at the fallback price.
                text = genai_price(
                    provider_id, model, _without(usage, audio), extras, price_context
                )
                if text is not None:
                    return text + flat_price(audio, config.fallback_price), False
                return flat_price(_with_audio_seconds(usage, extras), config.fallback_price), False
    return flat_price(_with_audio_seconds(usage, extras), config.fallback_price), False


# Providers whose genai-prices data lists no audio price where audio costs what text does
# (Google's gemini-2.5-pro, gemini-3-pro-preview): there the text price is audio's price too.
_AUDIO_AS_TEXT = frozenset({"google"})


def unpriced_audio(
    provider_id: str,
    model: str,
    usage: TokenUsage,
    price_context: Mapping[str, str] | None = None,
) -> TokenUsage | None:
    """The audio tokens of `usage` genai-prices would price at the model's text price, having
    no audio price for it (gpt-4o-audio-preview: audio at $40/$80 per million, text $2.50/$10),
    as input, cache read and output tokens; None when every audio token has its price. Audio
    that is all of its direction (a speech model's output) is priced at that direction's price."""
    wants_in = 0 < usage.input_audio_tokens < usage.input_tokens
    wants_out = 0 < usage.output_audio_tokens < usage.output_tokens
    if provider_id in _AUDIO_AS_TEXT or not (wants_in or wants_out):
        return None
    prices = _model_prices(provider_id, model, tuple(sorted((price_context or {}).items())))
    if prices is None:
        return None
    missing_in = wants_in and getattr(prices, "input_audio_mtok", None) is None
    missing_out = wants_out and getattr(prices, "output_audio_mtok", None) is None
    if not (missing_in or missing_out):
        return None
    audio = TokenUsage(
        input_tokens=usage.input_audio_tokens if missing_in else 0,
        cache_read_tokens=usage.cache_audio_read_tokens if missing_in else 0,
        output_tokens=usage.output_audio_tokens if missing_out else 0,
    )
    _warn_unpriced_audio(provider_id, model, missing_in, missing_out)
    return audio


def _model_prices(
    provider_id: str, model: str, price_context: tuple[tuple[str, str], ...]
) -> ModelPrice | None:
    """genai-prices' prices of the model today (None: unknown), as _genai_price finds it."""
    if not _known(provider_id, model) and "/" in model:
        model = model.rsplit("/", 1)[-1]
    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider_id, None)
        return info.get_prices(datetime.now(UTC), dict(price_context) or None)
    except (LookupError, ValueError):
        return None


def _without(usage: TokenUsage, audio: TokenUsage) -> TokenUsage:
    """`usage` less the audio tokens priced apart (and the subsets they were counted in)."""
    left_in = usage.input_tokens - audio.input_tokens
    left_out = usage.output_tokens - audio.output_tokens
    return replace(
        usage,
        input_tokens=left_in,
        output_tokens=left_out,
        cache_read_tokens=usage.cache_read_tokens - audio.cache_read_tokens,
        input_audio_tokens=usage.input_audio_tokens - audio.input_tokens,
        cache_audio_read_tokens=usage.cache_audio_read_tokens - audio.cache_read_tokens,
        output_audio_tokens=usage.output_audio_tokens - audio.output_tokens,
        reasoning_tokens=min(usage.reasoning_tokens, left_out),
        input_image_tokens=min(usage.input_image_tokens, left_in),
        output_image_tokens=min(usage.output_image_tokens, left_out),
    )


_warned: set[tuple[str, str, bool, bool]] = set()


def _warn_unpriced_audio(provider_id: str, model: str, inp: bool, out: bool) -> None:
    key = (provider_id, model, inp, out)
    if key in _warned or len(_warned) > 1024:  # once per model: estimates price it too
        return
    _warned.add(key)
    sides = " and ".join(side for side, missing in (("input", inp), ("output", out)) if missing)
    log.warning(
        "drawdown: genai-prices' %s lists no %s audio price for %s: its audio tokens are "
        "charged at the fallback price (priced = 0), not at its text price",
        provider_id,
        sides,
        model,
    )


def price_answer(
    provider: str,
    models: Iterable[str | None],
    usage: TokenUsage,
    config: MeterConfig,
    price_override: PricePerMillion | None = None,
    *,
    extras: Mapping[str, int] | None = None,
    price_context: Mapping[str, str] | None = None,
    other_models: Mapping[str, TokenUsage] | None = None,
    other_context: Mapping[str, str] | None = None,
    matched: str | None = None,
) -> tuple[Decimal, bool]:
    """USD (exact) and priced flag of one answer: its usage on the first model known
    (price_first_known), plus the usage it billed on other models (Anthropic's advisor), each
    on its own, with `other_context`."""
    total, priced = price_first_known(
        provider,
        models,
        usage,
        config,
        price_override,
        extras=extras,
        price_context=price_context,
        matched=matched,
    )
    for other_model, other_usage in (other_models or {}).items():
        other_usd, other_priced = price_first_known(
            provider,
            (other_model,),
            other_usage,
            config,
            price_override,
            price_context=other_context,
            matched=matched,
        )
        total += other_usd
        priced = priced and other_priced
    return total, priced


def _with_audio_seconds(usage: TokenUsage, extras: Mapping[str, int] | None) -> TokenUsage:
    """A per-token price cannot price seconds of audio: they are counted as input audio
    tokens, lest a transcription on a model genai-prices does not know cost $0."""
    seconds = int((extras or {}).get("audio_seconds", 0))
    if not seconds:
        return usage
    audio = seconds * TOKENS_PER_AUDIO_SECOND
    return usage + TokenUsage(input_tokens=audio, input_audio_tokens=audio)


def price_usage(
    provider: str,
    model: str | None,
    usage: TokenUsage,
    config: MeterConfig,
    price_override: PricePerMillion | None = None,
    *,
    extras: Mapping[str, int] | None = None,
    price_context: Mapping[str, str] | None = None,
    matched: str | None = None,
) -> tuple[int, bool]:
    """(usd_nanos rounded up, priced). Unknown model -> config.fallback_price, priced=False.
    `matched`: the genai-prices provider of the upstream URL (`url_provider`), if any."""
    usd, priced = price_first_known(
        provider,
        (model,),
        usage,
        config,
        price_override,
        extras=extras,
        price_context=price_context,
        matched=matched,
    )
    return to_nanos(usd), priced


def priced_per_token(provider: str, model: str | None) -> bool:
    """True when genai-prices has per-token prices for the model (the OpenAI Images API bills
    the GPT image models per token, DALL·E per image: only the former can be metered)."""
    if not model:
        return False
    return genai_price(provider, model, TokenUsage(input_tokens=1, output_tokens=1)) is not None
