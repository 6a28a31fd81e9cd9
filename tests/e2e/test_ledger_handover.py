"""`drawdown run` drives its proxy on drawdown's EventLoop (eventloop.py), on which a loop
iteration's ledger operations reach the writer thread together, just before the loop polls.
A real proxy, concurrent official-SDK clients: every call reserved and committed once."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.proxy import DrawdownProcess

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

POLICY = """
identity:
  agent: [{header: X-Drawdown-Agent}, {value: anonymous}]
  run: [{header: X-Drawdown-Run}, {value: none}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*", usd: 100}
  - {scope: "agent:*/run:*", usd: 100, requests: 1000}
"""

# Loaded with --set scripts=: what the proxy's event loop is, and the batches its writer ran.
PROBE = """
import asyncio, json, os

from mitmproxy import ctx


class Probe:
    def __init__(self):
        self.batches = []

    def running(self):
        drawdown = ctx.master.addons.get("drawdown")
        backend = drawdown.ledger.ledger
        run_batch = backend.run_batch

        def recorded(calls):
            self.batches.append(len(calls))
            return run_batch(calls)

        backend.run_batch = recorded
        self.loop = type(asyncio.get_running_loop()).__name__

    def done(self):
        with open(os.environ["PROBE_OUT"], "w") as out:
            json.dump({"loop": self.loop, "batches": self.batches}, out)


addons = [Probe()]
"""


def test_the_proxy_hands_each_loop_iterations_operations_over_together(
    drawdown_proxy: Factory, tmp_path: Path
) -> None:
    script, out = tmp_path / "probe.py", tmp_path / "probe.json"
    script.write_text(PROBE)
    proxy = drawdown_proxy(
        POLICY, extra_args=["--set", f"scripts={script}"], env={"PROBE_OUT": str(out)}
    )
    headers = {"X-Drawdown-Agent": "a", "X-Drawdown-Run": "r"}

    def one(n: int) -> str:
        with proxy.openai_client(max_retries=0, default_headers=headers) as client:
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {n}"}]
            )
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(24)))
    assert len(answers) == 24
    proxy.stop()
    probe = json.loads(out.read_text())
    assert probe["loop"] == "EventLoop", probe
    # Every call's reserve and commit went through the writer, once each.
    assert sum(probe["batches"]) >= 48, probe
    rows = proxy.query("SELECT COUNT(*), SUM(state = 'committed') FROM holds")
    assert rows == [(24, 24)], rows
