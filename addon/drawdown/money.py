"""Money is integers: nano-dollars (1e-9 USD) in the ledger, Decimal at the edges, never floats.

A nano-dollar is fine enough that per-token prices (e.g. $0.075 per million tokens
= 75 nano-dollars per token) stay exact.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

NANOS_PER_USD = 1_000_000_000

# The most any one amount may be, in its unit (nano-dollars, tokens, requests): a budget's
# limit, a call's cost, estimate or usage. The ledger keeps 64-bit integers (SQLite and
# PostgreSQL alike: at most ~9.2 × 10^18); 10^18 leaves room for a budget's spent and held
# sums to pass its limit by an overage without leaving that range. In dollars: $1,000,000,000.
MAX_AMOUNT = 10**18
MAX_USD = MAX_AMOUNT // NANOS_PER_USD


def usd_to_nanos(amount: Decimal | int | str, *, exact: bool = False) -> int:
    """USD → nano-dollars. Rounds up (charges never round down) unless `exact` demands no rounding."""
    value = Decimal(amount) * NANOS_PER_USD
    rounded = value.to_integral_value(rounding=ROUND_CEILING)
    if exact and rounded != value:
        raise ValueError(f"{amount} USD is more precise than a nano-dollar")
    return int(rounded)


def nanos_to_usd(nanos: int) -> Decimal:
    return Decimal(nanos) / NANOS_PER_USD


def usd_float(nanos: int | None) -> float | None:
    """For JSON reports only: a float for display, never fed back into accounting."""
    return None if nanos is None else float(nanos_to_usd(nanos))


def exact_usd(nanos: int, places: int = 0) -> str:
    """Dollars exactly, from integer nano-dollars, trailing zeros trimmed to at least `places`
    decimals: `0.06076`, `0.000285`, `0.5`, `0`; `5.00`, `0.011` with 2 (format_usd rounds to
    its places: 0.06076 reads 0.0608, a limit of 0.015 read 0.02)."""
    whole, fraction = divmod(abs(nanos), NANOS_PER_USD)
    digits = f"{fraction:09d}".rstrip("0").ljust(places, "0")
    text = f"{whole}.{digits}" if digits else str(whole)
    return f"-{text}" if nanos < 0 else text


def format_usd(nanos: int, places: int = 4) -> str:
    """`0.4812` style; at least `places` decimals, more if the amount needs them to be non-zero."""
    value = nanos_to_usd(nanos)
    text = f"{value:.{places}f}"
    if nanos and Decimal(text) == 0:
        text = f"{value:.9f}".rstrip("0")
    return text
