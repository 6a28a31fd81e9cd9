"""A fleet: several real `drawdown run` processes sharing one PostgreSQL ledger.

The budget's guarantees must hold across processes exactly as within one: 200 calls
racing through 4 proxies for a budget that fits 37 admit exactly 37; a proxy killed with
calls in flight strands their holds only until its lease lapses, and then a surviving
proxy's sweeper (two of them, sweeping at once) expires each hold exactly once.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import psycopg
import pytest

from tests.support.proxy import DrawdownProcess
from tests.support.standin import Reply, StandIn
from tests.support_pg import fresh_schema

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

Factory = Callable[..., DrawdownProcess]
MESSAGES = [{"role": "user", "content": "Say hello to the fleet."}]
# Matched by path: the action must not depend on the host name the proxy sees upstream.
POLICY = """
identity:
  agent: [{{header: X-Drawdown-Agent}}, {{value: anonymous}}]
  run: [{{header: X-Drawdown-Run}}, {{value: default}}]
actions:
  - {{kind: llm, provider: openai, match: {{path: "/v1/**"}}}}
budgets:
  - {{scope: "agent:*/run:*", requests: {requests}}}
holds: {{lease: {lease}}}
"""
HEADERS = {"X-Drawdown-Agent": "fleet", "X-Drawdown-Run": "r1"}


@pytest.fixture
def ledger_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with fresh_schema("fleet", node_id=request.node.nodeid) as url:
        yield url


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def wait_for(url: str, sql: str, expected: list[tuple[Any, ...]], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (found := query(url, sql)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{sql}: {found} != {expected}")
        time.sleep(0.1)


# Heartbeats, sweeps and TTL extensions every 0.5 s (the default is 5).
FAST_MAINTENANCE = ["--set", "drawdown_maintenance_interval=0.5"]


def start_fleet(factory: Factory, policy: str, db: str, n: int) -> list[DrawdownProcess]:
    """n proxies on one ledger, started side by side (each start waits for its readiness line)."""
    procs = [factory(policy, db=db, extra_args=FAST_MAINTENANCE, start=False) for _ in range(n)]
    procs[0].start()  # the first one writes the shared confdir's CA; the others read it
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda p: p.start(), procs[1:]))
    return procs


async def call(client: Any) -> int:
    try:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=16)
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def test_four_proxies_admit_exactly_what_fits(
    drawdown_proxy: Factory, standin: StandIn, ledger_url: str
) -> None:
    # Admitted calls keep their holds until every call has been decided: the 163 denials
    # are made against live reservations from all four proxies, not against settled spend.
    gate = threading.Event()
    standin.script(
        "POST", "/v1/chat/completions", lambda entry: _chat_reply(entry, gate), times=None
    )
    fleet = start_fleet(drawdown_proxy, POLICY.format(requests=37, lease=30), ledger_url, 4)

    async def race() -> list[int]:
        clients = [p.async_openai_client(default_headers=HEADERS, max_retries=0) for p in fleet]
        try:
            tasks = [asyncio.create_task(call(clients[i % 4])) for i in range(200)]
            deadline = time.monotonic() + 30
            while sum(t.done() for t in tasks) < 163 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            gate.set()
            return list(await asyncio.gather(*tasks))
        finally:
            gate.set()
            for client in clients:
                await client.close()

    statuses = asyncio.run(race())
    holds = "SELECT state, settle_reason, COUNT(*) FROM holds GROUP BY 1, 2"
    assert statuses.count(200) == 37 and statuses.count(402) == 163, query(ledger_url, holds)
    assert standin.count("/v1/chat/completions") == 37
    wait_for(
        ledger_url,
        "SELECT spent_requests, reserved_requests FROM budget_instances",
        [(37, 0)],
    )
    assert query(ledger_url, "SELECT state, COUNT(*) FROM holds GROUP BY state") == [
        ("committed", 37)
    ]
    assert query(
        ledger_url, "SELECT decision, COUNT(*) FROM decisions GROUP BY decision ORDER BY 1"
    ) == [("allow", 37), ("deny", 163)]
    assert query(ledger_url, "SELECT COUNT(*) FROM processes") == [(4,)]
    assert_verified(ledger_url)
    for proxy in fleet:
        assert not _trouble(proxy), _trouble(proxy)


def _chat_reply(entry: Any, gate: threading.Event) -> Reply:
    body = entry.json
    prompt = sum(len(m.get("content", "")) for m in body.get("messages", [])) // 4 + 1
    return Reply(
        hold_headers=gate,
        json={
            "id": "chatcmpl-fleet",
            "object": "chat.completion",
            "created": 1,
            "model": body.get("model", "gpt-4o-mini"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hello"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 2, "total_tokens": prompt + 2},
        },
    )


def test_a_killed_proxys_holds_are_expired_once_by_the_survivors(
    drawdown_proxy: Factory, standin: StandIn, ledger_url: str
) -> None:
    gate = threading.Event()
    standin.script(
        "POST", "/v1/chat/completions", lambda entry: _chat_reply(entry, gate), times=None
    )
    doomed, survivor, other = start_fleet(
        drawdown_proxy, POLICY.format(requests=5, lease=2), ledger_url, 3
    )
    statuses: list[Any] = []

    async def in_flight() -> None:
        async with doomed.async_openai_client(default_headers=HEADERS, max_retries=0) as client:
            statuses.extend(
                await asyncio.gather(*(call(client) for _ in range(5)), return_exceptions=True)
            )

    agent = threading.Thread(target=asyncio.run, args=(in_flight(),), daemon=True)
    agent.start()
    try:
        standin.wait_for("/v1/chat/completions", count=5, timeout=20)
        # The budget is fully held by the calls in flight on `doomed`: the others deny.
        with (
            survivor.openai_client(default_headers=HEADERS, max_retries=0) as client,
            pytest.raises(openai.APIStatusError) as denied,
        ):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert denied.value.status_code == 402
        doomed.kill()  # SIGKILL: no shutdown, no release; its five holds stay active
        assert query(ledger_url, "SELECT COUNT(*) FROM holds WHERE state = 'active'") == [(5,)]

        # Two survivors sweep every 0.5 s; once the dead proxy's 2 s lease lapses its holds
        # go — each exactly once, whichever sweeper takes it.
        wait_for(
            ledger_url,
            "SELECT state, settle_reason, COUNT(*) FROM holds GROUP BY 1, 2",
            [("expired", "proxy lease lapsed", 5)],
        )
        assert query(
            ledger_url, "SELECT reserved_requests, spent_requests FROM budget_instances"
        ) == [(0, 0)]
        assert _swept(survivor) + _swept(other) == 5, (survivor.log_text(), other.log_text())
        assert not _trouble(survivor) and not _trouble(other)
        # The budget is free again, through any proxy of the fleet.
        gate.set()
        with other.openai_client(default_headers=HEADERS, max_retries=0) as client:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        wait_for(
            ledger_url, "SELECT spent_requests, reserved_requests FROM budget_instances", [(1, 0)]
        )
    finally:
        gate.set()
        agent.join(30)
    assert 200 not in statuses  # the killed proxy never answered its calls
    assert_verified(ledger_url)


def assert_verified(url: str) -> None:
    """`drawdown verify --settled`: the ledger's own rows add up, and nothing is left held."""
    done = subprocess.run(
        [sys.executable, "-m", "drawdown", "verify", "--settled", "--db", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _trouble(proxy: DrawdownProcess) -> list[str]:
    """Log lines saying the ledger misbehaved (none expected: the fleet is healthy)."""
    words = ("ledger unavailable", "could not settle", "Traceback", "ledger maintenance failed")
    return [line for line in proxy.log_lines() if any(w in line for w in words)]


def _swept(proxy: DrawdownProcess) -> int:
    found = re.findall(r"sweeper released (\d+) expired hold", proxy.log_text())
    return sum(int(n) for n in found)


def test_proxies_on_one_postgres_ledger_keep_an_unnamed_agent_in_one_run(
    drawdown_proxy: Factory, standin: StandIn, ledger_url: str
) -> None:
    """An agent that names no run got one run from each proxy it reached (each minted its
    idle-split run in memory): the per-run budget, the loop and step guards multiplied by
    the fleet's size, unless drawdown_shared_runs was set by hand. On PostgreSQL, a fleet's
    ledger, runs are minted in the ledger by default."""
    answer_at_once = threading.Event()
    answer_at_once.set()
    standin.script(
        "POST", "/v1/chat/completions", lambda entry: _chat_reply(entry, answer_at_once),
        times=None,
    )  # fmt: skip
    policy = POLICY.format(requests=5, lease=30).replace(
        "run: [{header: X-Drawdown-Run}, {value: default}]", "run: [{idle_split: 300}]"
    )
    fleet = start_fleet(drawdown_proxy, policy, ledger_url, 2)
    clients = [p.openai_client(default_headers={"X-Drawdown-Agent": "roamer"}) for p in fleet]
    try:
        for turn in range(6):
            status = 200
            try:
                clients[turn % 2].chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
                )
            except openai.APIStatusError as exc:
                status = exc.status_code
            assert status == (200 if turn < 5 else 402), (turn, status)
    finally:
        for client in clients:
            client.close()
    runs = query(ledger_url, "SELECT DISTINCT scope FROM decisions")
    assert len(runs) == 1 and runs[0][0].startswith("tenant:default/agent:roamer/run:"), runs
