"""`drawdown run --cpu-affinity`: a real proxy held to one CPU, all its threads with it, while its
tokenizer process counts on every CPU; its ledger writer spreading out under load and coming
back; and `--workers 2` with one CPU each."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

import pytest

from tests.e2e.test_tokenizer_process_e2e import POLICY, send_prompt, tokenizer_child
from tests.support.procfs import children_of, threads_of
from tests.support.proxy import DrawdownProcess
from tests.support.scripts import load_script, stand_in

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
        reason="pinning is only observable with two CPUs or more to choose from",
    ),
]

Factory = Callable[..., DrawdownProcess]


def cpus_of_threads(pid: int) -> dict[int, set[int]]:
    return {tid: os.sched_getaffinity(tid) for tid in threads_of(pid)}


def test_a_pinned_proxy_keeps_every_thread_on_its_cpu_and_its_tokenizer_on_all(
    drawdown_proxy: Factory,
) -> None:
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    proxy = drawdown_proxy(POLICY, extra_args=["--cpu-affinity", str(cpu)])
    proxy.wait_for_log(rf"pinned to CPU {cpu} \(event loop and ledger writer; under load")
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


def test_under_load_the_writer_spreads_to_the_spare_cpu_and_the_loop_stays(
    drawdown_proxy: Factory,
) -> None:
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    bench = load_script("bench")  # its stand-in upstream and load generator, over plain HTTP
    with stand_in(bench) as up:
        proxy = drawdown_proxy(
            f"""
actions:
  - {{kind: llm, provider: openai, match: {{host: "127.0.0.1:{up}"}}}}
budgets:
  - {{scope: "agent:*", usd: 1000000}}
""",
            extra_args=["--cpu-affinity", str(cpu)],
        )
        port = proxy.address[1]
        body = bench.prompt_body(200)
        seen: list[dict[int, set[int]]] = []
        loaded = threading.Event()

        def watch() -> None:
            while not loaded.wait(0.05):
                seen.append(cpus_of_threads(proxy.pid))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            busy = asyncio.run(bench._python_load(port, up, body, 16, 3.0))
        finally:
            loaded.set()
            watcher.join()
        quiet = asyncio.run(bench._python_load(port, up, body, 1, 1.0))
        after = cpus_of_threads(proxy.pid)
    assert busy["errors"] == quiet["errors"] == 0
    assert all(threads[proxy.pid] == {cpu} for threads in seen)  # the event loop never moved
    spread = [tid for threads in seen for tid, cpus in threads.items() if cpus == allowed]
    assert spread, "no thread of the proxy spread out under load"
    assert all(cpus == {cpu} for cpus in after.values())  # lone requests: back beside the loop
