"""The input estimate against what providers billed, on the recorded corpus."""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path

import pytest
from drawdown import meter
from drawdown.meter import DEFAULT_SAFETY_FACTORS, MeterConfig
from drawdown.meter.calibrate import collect, report
from meter_corpus import CORPUS

PROMPTS, OUTPUTS = collect(CORPUS)
ESTIMATION_MD = Path(meter.__file__).parent / "ESTIMATION.md"


@pytest.mark.parametrize("sample", [p for p in PROMPTS if not p.excluded], ids=lambda p: p.name)
def test_estimate_covers_actual(sample):
    assert sample.estimate >= sample.actual


def test_exclusions_are_few_and_explained():
    excluded = [p for p in PROMPTS if p.excluded]
    assert len(excluded) <= 8
    assert all(p.actual > p.estimate for p in excluded)  # each one really is server-side input


@pytest.mark.parametrize("family", ["claude", "gemini"])
def test_default_factor_follows_the_documented_rule(family):
    needed = max(
        max(p.needed_factor for p in PROMPTS if p.family == family and not p.excluded),
        max(o.ratio for o in OUTPUTS if o.family == family),
    )
    # the smallest multiple of 0.05 at or above what the corpus needs
    rule = Decimal(math.ceil(needed * 20)) / 20
    assert DEFAULT_SAFETY_FACTORS[family] == rule


def test_factor_is_what_makes_claude_safe():
    unscaled, _ = collect(
        CORPUS, MeterConfig(safety_factors={"claude": Decimal(1), "gemini": Decimal(1)})
    )
    assert any(p.estimate < p.actual for p in unscaled if p.family == "claude" and not p.excluded)


def test_estimation_md_tables_are_current():
    text = ESTIMATION_MD.read_text()
    generated = text.split("<!-- calibrate:begin -->\n", 1)[1].split("<!-- calibrate:end -->", 1)[0]
    assert generated.strip() == report(CORPUS).strip(), (
        "ESTIMATION.md is stale: regenerate with python -m drawdown.meter.calibrate tests/fixtures/recorded"
    )
