"""The addon's options, as mitmproxy's own addon tests check theirs (taddons)."""

from __future__ import annotations

from pathlib import Path

import pytest
from drawdown.addon import Drawdown
from mitmproxy import exceptions
from mitmproxy.test import taddons

POLICY = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
"""


@pytest.fixture
def configured(tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    addon = Drawdown()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(tmp_path / "l.db"))
        yield addon, tctx
        addon.done()


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "86400", ""])
def test_drain_refuses_what_is_not_seconds(configured, value: str) -> None:
    addon, tctx = configured
    with pytest.raises(exceptions.OptionsError, match="drawdown_drain must be a number of seconds"):
        tctx.configure(addon, drawdown_drain=value)


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("0.5", 0.5), ("45", 45.0)])
def test_drain_takes_seconds_or_zero(configured, value: str, seconds: float) -> None:
    addon, tctx = configured
    assert addon.seconds["drawdown_drain"] == 20.0  # the default, under a platform's 30 s
    tctx.configure(addon, drawdown_drain=value)
    assert addon.seconds["drawdown_drain"] == seconds


@pytest.mark.parametrize("name", ["drawdown_upstream_timeout", "drawdown_ledger_timeout"])
def test_other_durations_still_refuse_zero(configured, name: str) -> None:
    addon, tctx = configured
    with pytest.raises(exceptions.OptionsError, match=f"{name} must be a number of seconds"):
        tctx.configure(addon, **{name: "0"})
