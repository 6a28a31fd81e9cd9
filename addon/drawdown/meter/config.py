"""Metering configuration: built by the policy compiler from a policy's `meter:` section."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fnmatch import fnmatchcase
from types import MappingProxyType


@dataclass(frozen=True)
class PricePerMillion:
    """USD per one million tokens, as exact Decimals."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None  # None: same as input
    cache_write: Decimal | None = None  # None: same as input


# Used for models genai-prices does not know. Deliberately at the top of the market
# (Claude Opus 3 list price) so that an unknown model is over- rather than under-reserved.
DEFAULT_FALLBACK_PRICE = PricePerMillion(input=Decimal("15"), output=Decimal("75"))

# Multipliers on the tiktoken (o200k_base) count of a prompt for model families whose
# tokenizer tiktoken does not ship. Measured on the recorded corpus: see ESTIMATION.md
# (regenerate with `python -m drawdown.meter.calibrate`).
DEFAULT_SAFETY_FACTORS: Mapping[str, Decimal] = MappingProxyType(
    {"claude": Decimal("1.40"), "gemini": Decimal("1.40")}
)


@dataclass(frozen=True)
class MeterConfig:
    default_max_output_tokens: int = 4096
    # (glob over "provider:model", tokens); first match wins; used when the request has no cap.
    max_output_tokens: tuple[tuple[str, int], ...] = ()
    fallback_price: PricePerMillion = DEFAULT_FALLBACK_PRICE
    safety_factors: Mapping[str, Decimal] = field(default_factory=lambda: DEFAULT_SAFETY_FACTORS)

    def output_cap(self, provider: str, model: str | None) -> int:
        """The output-token cap to assume for a request that sets none."""
        key = f"{provider}:{model or ''}"
        for pattern, tokens in self.max_output_tokens:
            if fnmatchcase(key, pattern):
                return tokens
        return self.default_max_output_tokens

    def safety_factor(self, provider: str, model: str | None) -> Decimal:
        """The family's factor; a family the mapping leaves out keeps its default (so a
        policy setting only `claude` does not silently drop Gemini's margin)."""
        family = model_family(provider, model)
        if family is None:
            return Decimal(1)
        factor = self.safety_factors.get(family)
        return DEFAULT_SAFETY_FACTORS.get(family, Decimal(1)) if factor is None else factor


def model_family(provider: str, model: str | None) -> str | None:
    """ "claude" / "gemini" for the families tiktoken does not tokenize exactly, else None."""
    name = (model or "").lower()
    if provider == "anthropic" or "claude" in name:
        return "claude"
    if provider == "gemini" or "gemini" in name or "gemma" in name:
        return "gemini"
    return None
