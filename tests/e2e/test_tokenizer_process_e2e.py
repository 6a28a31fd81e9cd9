"""The tokenizer process, end to end: a real `drawdown run` counts a big prompt from the openai SDK
in its child process, charges exactly what counting on a thread charges, and the child ends with
the proxy, whether it is stopped or killed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.procfs import alive, children_of, wait_until_gone
from tests.support.proxy import DrawdownProcess

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

POLICY = """
identity:
  tenant: [{value: acme}]
  agent: [{value: reader}]
  run: [{header: X-Drawdown-Run}, {value: unnamed}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*", usd: 100}
"""
STARTED = r"tokenizer process (\d+) counts prompt texts of (\d+) characters or more"


def tokenizer_child(proxy: DrawdownProcess) -> tuple[int, int]:
    match = proxy.wait_for_log(STARTED, timeout=60)
    return int(match.group(1)), int(match.group(2))


def estimate_of(proxy: DrawdownProcess, run: str) -> tuple[int, int]:
    ((tokens, usd),) = proxy.wait_for_query(
        "SELECT est_tokens, est_usd FROM decisions WHERE run = ? AND status IS NOT NULL",
        run,
        until=lambda found: len(found) == 1,
    )
    return tokens, usd


def send_prompt(proxy: DrawdownProcess, run: str, size: int) -> None:
    text = " ".join(
        f"paragraph {i} of a long document the agent pasted." for i in range(size // 45)
    )
    assert len(text) >= size
    with proxy.openai_client(default_headers={"X-Drawdown-Run": run}) as client:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}], max_tokens=20
        )
    assert reply.choices


def test_a_big_prompt_is_charged_the_same_when_counted_in_the_tokenizer_process(
    drawdown_proxy: Factory, tmp_path: Path
) -> None:
    proxy = drawdown_proxy(POLICY)
    send_prompt(proxy, "small", 2000)
    assert not children_of(proxy.pid)  # no child until a prompt needs one
    send_prompt(proxy, "first", 40_000)  # counted on a thread while the child starts
    child, threshold = tokenizer_child(proxy)
    assert child in children_of(proxy.pid)
    send_prompt(proxy, "in-process", 4 * threshold)
    assert alive(child)  # it counted the prompt and is still there for the next one
    assert os.sched_getscheduler(child) == os.SCHED_IDLE  # on CPU time the proxy leaves idle

    threaded = drawdown_proxy(
        POLICY,
        db=tmp_path / "threaded.db",
        extra_args=["--set", "drawdown_tokenizer_process=false"],
    )
    send_prompt(threaded, "first", 40_000)
    send_prompt(threaded, "on-a-thread", 4 * threshold)
    assert "tokenizer process" not in threaded.log_text()
    assert not children_of(threaded.pid)

    counted_in_child = estimate_of(proxy, "in-process")
    assert counted_in_child[0] > threshold // 8  # a big prompt's tokens, not a fallback
    assert counted_in_child == estimate_of(threaded, "on-a-thread")

    proxy.stop()
    assert wait_until_gone(child), "the tokenizer process outlived a stopped proxy"


def test_a_killed_proxy_leaves_no_tokenizer_process(drawdown_proxy: Factory) -> None:
    proxy = drawdown_proxy(POLICY)
    send_prompt(proxy, "first", 40_000)
    child, _ = tokenizer_child(proxy)
    proxy.kill()
    assert wait_until_gone(child), "the tokenizer process outlived a killed proxy"
