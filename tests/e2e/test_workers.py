"""`drawdown run --workers N`: several processes on one listen address, one ledger, one truth."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.support.procfs import children_of
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


def policies_of_threads(pid: int) -> dict[int, int]:
    return {
        int(task.name): os.sched_getscheduler(int(task.name))
        for task in Path(f"/proc/{pid}/task").iterdir()
    }


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_each_workers_ledger_writer_waits_for_its_cpu_and_its_event_loop_does_not(
    drawdown_proxy: Callable[..., DrawdownProcess], standin: StandIn
) -> None:
    """Two workers on two CPUs: a writer that preempted its loop on every wake-up cut its
    batches to 2–3 operations (ledger/worker.py). Each writer runs under SCHED_BATCH; the
    event loop and every other thread keep the normal policy."""
    proxy = drawdown_proxy(POLICY, extra_args=["--workers", "2"])
    with proxy.openai_client(default_headers={"X-Drawdown-Agent": "a"}, max_retries=0) as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    workers = sorted(children_of(proxy.pid))
    assert len(workers) == 2
    for worker in workers:
        policies = policies_of_threads(worker)
        assert policies[worker] == os.SCHED_OTHER  # the main thread: the event loop
        assert list(policies.values()).count(os.SCHED_BATCH) == 1  # the one SQLite writer
    assert set(policies_of_threads(proxy.pid).values()) == {os.SCHED_OTHER}  # the supervisor
    proxy.stop()
