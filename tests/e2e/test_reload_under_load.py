"""Hot reload under load: the policy is edited several times (a budget raised, then lowered, a
deny rule added, one broken edit) while concurrent agents keep calling through the proxy. Every
request is answered, each leaves exactly one decision row, nothing is charged twice, and the
cut-over is clean: a request that starts after the "policy reloaded" line is decided by the
new policy (decisions.policy_digest), never the old one.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from drawdown.policy import load_policy

from tests.support.proxy import DrawdownProcess, assert_ledger_verifies
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]
AGENTS = ("free", "capped", "blocked")
WORKERS = 9
TAIL = 60  # requests sent after the last edit, so the final policy is seen under load too

BASE = """
identity:
  agent: [{{header: X-Drawdown-Agent}}]
  run: [{{header: X-Drawdown-Run}}]
actions:
  - {{kind: llm, provider: openai, match: {{host: api.openai.com}}}}
budgets:
  - {{scope: "agent:*/run:*", requests: 100000}}
  - {{scope: "agent:capped", requests: {capped}}}
{authority}
"""
DENY_BLOCKED = 'authority:\n  rules:\n    - {scope: "agent:blocked", deny: [llm]}\n'


def version(capped: int, deny: bool = False) -> str:
    return BASE.format(capped=capped, authority=DENY_BLOCKED if deny else "")


# (label, policy text, whether it is good)
EDITS = [
    ("raise the capped budget 40 → 80", version(80), True),
    ("lower it 80 → 50", version(50), True),
    ("add a deny rule for agent:blocked", version(50, deny=True), True),
    (
        "a broken edit (a typo'd key)",
        version(50, deny=True).replace("requests: 50", "requestz: 50"),
        False,
    ),
]


@dataclass
class Tally:
    sent: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # anything but an HTTP answer
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def agent_loop(proxy: DrawdownProcess, worker: int, tally: Tally) -> None:
    agent = AGENTS[worker % len(AGENTS)]
    headers = {"X-Drawdown-Agent": agent, "X-Drawdown-Run": f"w{worker}"}
    async with proxy.async_openai_client(
        default_headers=headers, max_retries=0, timeout=60
    ) as client:
        n = 0
        while not tally.stop.is_set():
            n += 1
            tally.sent += 1
            try:
                if n % 3 == 0:  # a third of the calls stream
                    stream = await client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": f"hi {n}"}],
                        max_tokens=8,
                        stream=True,
                    )
                    async for _ in stream:
                        pass
                else:
                    await client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": f"hi {n}"}],
                        max_tokens=8,
                    )
                tally.statuses[agent, 200] += 1
            except openai.APIStatusError as exc:
                tally.statuses[agent, exc.status_code] += 1
            except Exception as exc:
                tally.failures.append(f"{agent}: {exc!r}")


async def log_count(proxy: DrawdownProcess, pattern: str, n: int, timeout: float = 30) -> None:
    """Until `pattern` has matched n log lines (the proxy's log is a pipe we can only poll)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while sum(bool(regex.search(line)) for line in proxy.log_lines()) < n:
        assert time.monotonic() < deadline, f"no {n}th log line matching {pattern!r}"
        await asyncio.sleep(0.05)


def digest(text: str, tmp_path: Path) -> str:
    path = tmp_path / "digest-probe.yaml"
    path.write_text(text)
    return load_policy(path).digest[:16]


def test_hot_reload_under_concurrent_load(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path, tmp_db: Path
) -> None:
    first = version(40)
    proxy = drawdown_proxy(first, extra_args=["--set", "drawdown_reload_interval=0.2"])
    digests = [digest(first, tmp_path)]
    cutovers: list[
        tuple[float, int]
    ] = []  # (time the reload was seen, index of the digest now in force)
    tally = Tally()

    async def main() -> None:
        workers = [asyncio.create_task(agent_loop(proxy, w, tally)) for w in range(WORKERS)]
        await asyncio.sleep(0)  # the first requests are on their way before any edit
        await sent_at_least(tally, 30)
        reloads = rejects = 0
        for _label, text, good in EDITS:
            proxy.reload_policy(text)
            if good:
                reloads += 1
                await log_count(proxy, r"drawdown: policy reloaded", reloads)
                digests.append(digest(text, tmp_path))
                cutovers.append((time.time(), len(digests) - 1))
            else:
                rejects += 1
                await log_count(proxy, r"policy edit rejected", rejects)
            await sent_at_least(tally, tally.sent + 40)  # traffic between edits
        await sent_at_least(tally, tally.sent + TAIL)
        tally.stop.set()
        await asyncio.gather(*workers)

    asyncio.run(main())

    print(f"reload under load: {tally.sent} requests, {dict(tally.statuses)}")  # shown with -s
    # Every request was answered over HTTP, and the agent's SDK saw only allow/deny statuses.
    assert tally.failures == []
    answered = sum(tally.statuses.values())
    assert answered == tally.sent
    assert {status for _, status in tally.statuses} <= {200, 402, 403}
    # Exactly one decision row per request; the upstream saw exactly the allowed ones.
    proxy.wait_for_query(
        "SELECT COUNT(*) FROM holds WHERE state = 'active'", until=lambda r: r == [(0,)]
    )
    rows = proxy.query(
        "SELECT request_id, ts, agent, decision, reason_code, status, policy_digest FROM decisions"
    )
    assert len(rows) == answered and len({r[0] for r in rows}) == answered
    allowed = sum(n for (_, status), n in tally.statuses.items() if status == 200)
    assert standin.count("/v1/chat/completions") == allowed
    # Nothing charged twice: spend is what was allowed, and the ledger's own books balance.
    for agent in AGENTS:
        ((spent,),) = proxy.query(
            "SELECT COALESCE(SUM(spent_requests), 0) FROM budget_instances WHERE scope LIKE ?",
            f"agent:{agent}/%",
        )
        assert spent == tally.statuses[agent, 200], agent
    ((capped,),) = proxy.query(
        "SELECT spent_requests FROM budget_instances WHERE scope = 'agent:capped'"
    )
    assert capped == tally.statuses["capped", 200] <= 80
    assert proxy.query("SELECT SUM(actual_requests) FROM holds WHERE state = 'committed'") == [
        (allowed,)
    ]
    # The cut-over: every request that started after a reload was decided by that policy or a later one.
    index = {d: i for i, d in enumerate(digests)}
    assert {r[6] for r in rows} <= set(index), "a decision carries a digest of no policy we wrote"
    for seen_at, now_in_force in cutovers:
        stale = [r for r in rows if r[1] > seen_at and index[r[6]] < now_in_force]
        assert not stale, (
            f"{len(stale)} request(s) decided by an old policy after the reload to #{now_in_force}"
        )
    # Each good edit decided some traffic; the broken one decided none (its text never took effect).
    assert set(index.values()) == {index[r[6]] for r in rows}
    # The deny rule: agent:blocked is refused (403, not_authorized) from its cut-over on, and the
    # raise/lower of the capped budget showed as 402s only once its limit was reached.
    deny_at = cutovers[2][0]
    blocked_after = [r for r in rows if r[2] == "blocked" and r[1] > deny_at]
    assert blocked_after and all(r[3] == "deny" and r[4] == "not_authorized" for r in blocked_after)
    assert all(r[4] in (None, "budget_exhausted", "not_authorized") for r in rows)
    assert proxy.is_running()
    proxy.stop()
    assert_ledger_verifies(tmp_db)


async def sent_at_least(tally: Tally, n: int, timeout: float = 60) -> None:
    """Until the agents have sent n requests in all."""
    deadline = time.monotonic() + timeout
    while tally.sent < n:
        assert time.monotonic() < deadline, f"only {tally.sent} of {n} requests sent"
        await asyncio.sleep(0.02)
