"""`drawdown run --workers N`: several processes on one listen address, one ledger, one truth."""

from __future__ import annotations

from collections.abc import Callable

import openai
import pytest

from tests.support.proxy import DrawdownProcess
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

POLICY = """
identity:
  agent: [{header: X-Drawdown-Agent}]
  run: [{idle_split: 300}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*/run:*", requests: 10}
"""


def test_workers_share_the_address_the_ledger_and_the_agents_run(
    drawdown_proxy: Callable[..., DrawdownProcess], standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY, extra_args=["--workers", "2"])
    statuses = []
    for _ in range(16):  # a fresh connection each time: the kernel spreads them over the workers
        with proxy.openai_client(
            default_headers={"X-Drawdown-Agent": "unmodified"}, max_retries=0
        ) as client:
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
    assert statuses.count(200) == 10 and statuses.count(402) == 6
    assert standin.count("/v1/chat/completions") == 10
    # Both workers served, yet the agent kept one idle-split run: it was minted in the ledger.
    assert proxy.query("SELECT COUNT(DISTINCT process_id) FROM holds") == [(2,)]
    assert len(proxy.query("SELECT DISTINCT run FROM decisions")) == 1
    proxy.stop()  # SIGTERM reaches every worker; all exit cleanly
