"""`drawdown run`'s log, read as a service's: one line a record, drawdown's denials at the
default verbosity and mitmproxy's per-connection lines left out."""

from __future__ import annotations

import re
from collections.abc import Callable

import openai
import pytest

from tests.support.proxy import DrawdownProcess

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]
MESSAGES = [{"role": "user", "content": "Say hello."}]
POLICY = """
mode: enforce
actions:
  - {{kind: llm, provider: openai, match: {{host: api.openai.com}}}}
budgets:
  - {{scope: "agent:*", {limits}}}
"""
CONNECTION_LINE = re.compile(r"\] ?(client|server) (dis)?connect\b")


def test_the_log_holds_denials_and_single_line_rejections_without_connection_lines(
    drawdown_proxy: Factory,
) -> None:
    """Four "client connect"/"server disconnect …" lines a call buried the denials, and
    termlog_verbosity=warn, the way to be rid of them, hid the denials too. A rejected policy
    edit was one record of several lines ("…in force:\\n" and the problems), which a collector
    reading lines splits, the problems without the prefix."""
    proxy = drawdown_proxy(POLICY.format(limits="requests: 1"))
    with proxy.openai_client(max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    proxy.wait_for_log(r"\] drawdown: deny tenant:default/agent:\S+ llm \S+: ")
    proxy.reload_policy(POLICY.format(limits="requestz: 1, usdd: 3, per: dy"))  # three problems
    proxy.wait_for_log(r"per must be one of")
    lines = proxy.log_lines()
    assert [line for line in lines if CONNECTION_LINE.search(line)] == []
    rejected = [line for line in lines if "policy edit rejected" in line]
    path = re.escape(str(proxy.policy_path))
    assert len(rejected) == 3, rejected
    for line in rejected:
        assert re.search(
            rf"\] drawdown: policy edit rejected, the last good policy stays in force: {path}:6: ",
            line,
        ), line
    assert not any(line.startswith(str(proxy.policy_path)) for line in lines)  # no bare problem


def test_shadow_mode_logs_what_a_guard_would_have_refused(drawdown_proxy: Factory) -> None:
    """The log holds every denial, `would deny` in shadow mode: a budget's were logged, a
    guard's (a loop, a step count) were recorded in the ledger and left out of the log."""
    proxy = drawdown_proxy(
        """
mode: shadow
identity:
  agent: [{value: poller}]
  run: [{value: p1}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
anomalies:
  loop: {repeats: 2, on_detect: deny}
"""
    )
    with proxy.openai_client(max_retries=0) as client:
        for _ in range(4):  # shadow: every call goes through
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    refused = proxy.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE decision = 'would_deny' AND reason_code = 'anomaly'",
        until=lambda r: r[0][0] == 2,
    )
    assert refused == [(2,)]
    proxy.wait_for_log(r"\] drawdown: would deny tenant:default/agent:poller/run:p1 llm \S+: ")
    lines = [line for line in proxy.log_lines() if "would deny" in line]
    assert len(lines) == 2 and all("anomalies.loop.repeats: 2" in line for line in lines), lines


def test_a_shadow_budget_already_short_at_the_reserve_logs_its_would_deny_only(
    drawdown_proxy: Factory,
) -> None:
    """Each call past a shadow `requests` budget logged its `would deny`, then, as it
    committed, "went over … (actual above estimate; …)": no actual was above its estimate,
    and the line came again for every call."""
    proxy = drawdown_proxy(
        """
mode: shadow
identity:
  agent: [{value: writer}]
  run: [{value: w1}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*/run:*", requests: 1}
"""
    )
    with proxy.openai_client(max_retries=0) as client:
        for n in range(3):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"step {n}"}]
            )
    proxy.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE completed_at IS NOT NULL",
        until=lambda r: r[0][0] == 3,
    )
    proxy.wait_for_log(r"would deny .* requests 1 exhausted")
    lines = proxy.log_lines()
    assert len([line for line in lines if "would deny" in line]) == 2, lines
    assert [line for line in lines if "went over" in line] == []
