"""Which budget instances cover a request (SPEC §4): one per distinct value of a budget's named levels,
per window for windowed budgets."""

from __future__ import annotations

import calendar
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from .ledger.api import Claim
from .policy.model import Policy

_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


def window(per: str | None, now: float) -> tuple[int, int | None]:
    """Start and end (epoch seconds) of the tumbling UTC window holding `now`; (0, None) for lifetime."""
    if per is None:
        return 0, None
    if per in _SECONDS:
        size = _SECONDS[per]
        start = int(now // size) * size
        return start, start + size
    # Floored as the windows above are: fromtimestamp rounds, and 0.4 µs before midnight on
    # a month's last day gave the next month while the day window was still this one.
    moment = datetime.fromtimestamp(math.floor(now), UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    days = calendar.monthrange(moment.year, moment.month)[1]
    return int(start.timestamp()), int(start.timestamp()) + days * 86400


def claims_for(
    policy: Policy, levels: Mapping[str, str], kind: str | Sequence[str] | None, now: float
) -> list[Claim]:
    """The budget instances a request of `kind` is charged to. Several kinds (a JSON-RPC batch
    of calls to different MCP tools) are charged to every budget that covers any of them."""
    kinds = [kind] if kind is None or isinstance(kind, str) else list(kind)
    claims = []
    for budget in policy.budgets:
        if not any(budget.covers_action(k) for k in kinds) or not budget.scope.matches(levels):
            continue
        start, end = window(budget.per, now)
        claims.append(
            Claim(
                budget=budget.key,
                scope=budget.scope.instance(levels) or "*",
                limit_usd=budget.limits.usd_nanos,
                limit_tokens=budget.limits.tokens,
                limit_requests=budget.limits.requests,
                per=budget.per,
                window_start=start,
                window_end=end,
                shadow=policy.budget_mode(budget) == "shadow",
            )
        )
    return claims
