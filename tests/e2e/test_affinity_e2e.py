"""`drawdown run --cpu-affinity`: a real proxy held to one CPU, all its threads with it, while its
tokenizer process counts on every CPU; and `--workers 2` with one CPU each."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.test_tokenizer_process_e2e import POLICY, send_prompt, tokenizer_child
from tests.support.procfs import children_of
from tests.support.proxy import DrawdownProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
        reason="pinning is only observable with two CPUs or more to choose from",
    ),
]

Factory = Callable[..., DrawdownProcess]


def cpus_of_threads(pid: int) -> dict[int, set[int]]:
    return {
        int(task.name): os.sched_getaffinity(int(task.name))
        for task in Path(f"/proc/{pid}/task").iterdir()
    }


def test_a_pinned_proxy_keeps_every_thread_on_its_cpu_and_its_tokenizer_on_all(
    drawdown_proxy: Factory,
) -> None:
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    proxy = drawdown_proxy(POLICY, extra_args=["--cpu-affinity", str(cpu)])
    proxy.wait_for_log(rf"pinned to CPU {cpu} \(event loop and ledger writer\)")
    send_prompt(proxy, "small", 2000)  # the ledger writer has reserved and committed
    threads = cpus_of_threads(proxy.pid)
    assert len(threads) >= 2 and all(cpus == {cpu} for cpus in threads.values())
    send_prompt(proxy, "big", 40_000)  # starts the tokenizer process
    child, _ = tokenizer_child(proxy)
    assert child in children_of(proxy.pid)
    assert all(cpus == allowed for cpus in cpus_of_threads(child).values())
    assert proxy.query("SELECT COUNT(*) FROM decisions WHERE status = 200") == [(2,)]


def test_workers_take_one_cpu_each(drawdown_proxy: Factory) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    proxy = drawdown_proxy(POLICY, extra_args=["--workers", "2", "--cpu-affinity", "auto"])
    workers = sorted(children_of(proxy.pid))
    assert len(workers) == 2
    placed = [{frozenset(cpus) for cpus in cpus_of_threads(pid).values()} for pid in workers]
    assert sorted(placed, key=lambda p: min(next(iter(p)))) == [
        {frozenset({allowed[0]})},
        {frozenset({allowed[1]})},
    ]
    for i in range(16):  # fresh connections: the kernel spreads them over both workers
        send_prompt(proxy, f"run-{i}", 500)
    assert proxy.query("SELECT COUNT(*) FROM decisions WHERE status = 200") == [(16,)]
    assert proxy.query("SELECT COUNT(DISTINCT process_id) FROM holds") == [(2,)]
    proxy.stop()
