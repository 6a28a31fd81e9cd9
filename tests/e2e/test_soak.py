"""A reduced soak (scripts/soak runs the full 100,000): 3,000 requests — JSON and streamed chat
completions from several agents and runs, with budget (402) and authority (403) denials —
through one proxy. The books must balance and memory must level off.

The memory bound is deliberately generous: over the second half of the run the proxy's RSS may
grow by at most MAX_GROWTH_KIB (3 MiB) per 1,000 requests. At this scale the ledger's SQLite page
cache is still filling up (≈0.5–1 MiB per 1,000 requests, measured); the full 100,000-request
soak levels off at ≈50 KiB per 10,000 (docs/guarantees.md). Keeping every request's flow —
request and response, headers, drawdown's per-flow state — costs more than 3 KiB a request,
and breaks the bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.scripts import load_script

pytestmark = pytest.mark.e2e

REQUESTS = 3_000
SAMPLE_EVERY = 500
MAX_GROWTH_KIB = 3_072  # per 1,000 requests over the second half: 3 KiB a request


def test_reduced_soak_balances_its_books_and_levels_off(tmp_path: Path) -> None:
    soak = load_script("soak")
    result = soak.soak(REQUESTS, concurrency=12, sample_every=SAMPLE_EVERY, directory=tmp_path)
    report = result.table(1_000)
    assert result.ok, (
        report
    )  # answered, one row each, no active hold, upstream = allowed, verify --settled
    assert set(result.statuses) == {200, 402, 403}, report  # the mix included both kinds of denial
    growth = result.growth_per(1_000)
    assert growth <= MAX_GROWTH_KIB, (
        f"RSS grew {growth:.0f} KiB per 1,000 requests over the second half\n{report}"
    )
