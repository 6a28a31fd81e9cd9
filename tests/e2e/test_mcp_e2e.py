"""MCP end to end (SPEC §3, §5): the official `mcp` SDK's client and server (streamable HTTP,
answering as event streams, its default) through a real `drawdown run`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import standin_resolve
from tests.support.mcp_server import PATH as MCP_PATH
from tests.support.mcp_server import DocsMcpServer
from tests.support.proxy import DrawdownProcess, assert_ledger_verifies
from tests.support.standin import StandIn
from tests.support.tls import TlsMaterial

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

# One agent's run r1, and the docs server's MCP endpoint as an action.
DOCS = """
version: 1
identity:
  agent: [{value: research}]
  run: [{value: r1}]
actions:
  - {kind: mcp.docs, provider: mcp, match: {host: mcp.example.com, path: /docs/mcp}}
"""
# delete_page only for a page this run read: the guard against acting on a fabricated id.
READ_BEFORE_DELETE = (
    DOCS
    + """
authority:
  default: allow
  rules:
    - {scope: "*", action: mcp.docs.delete_page,
       requires: [{action: mcp.docs.get_page, same: json.params.arguments.page_id}]}
budgets:
  - {scope: "agent:*/run:*", usd: 1}
"""
)


@pytest.fixture
def docs(tls_material: TlsMaterial) -> Iterator[DocsMcpServer]:
    server = DocsMcpServer(tls_material).start()
    yield server
    server.stop()


def _proxy(drawdown_proxy: Factory, standin: StandIn, docs: DocsMcpServer, policy: str):
    resolve = standin_resolve(standin)
    resolve["tls"] = {"mcp.example.com": docs.host_port, **resolve["tls"]}  # before *.example.com
    return drawdown_proxy(policy, resolve=resolve)


async def _session(proxy: DrawdownProcess, script: Callable[[ClientSession], object]) -> object:
    http = httpx2.AsyncClient(
        proxy=proxy.proxy_url, verify=proxy.ssl_context(), trust_env=False, timeout=30
    )
    url = f"https://mcp.example.com{MCP_PATH}"
    async with (
        http,
        streamable_http_client(url, http_client=http) as (read, write, *_),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return await script(session)  # type: ignore[misc]


def test_a_failed_mcp_lookup_does_not_meet_a_requirement(
    drawdown_proxy: Factory, standin: StandIn, docs: DocsMcpServer
) -> None:
    """The SDK's server answers a tools/call as an event stream. A lookup it answered with a
    JSON-RPC error, or with a tool result marked isError, did not succeed: it must not unlock
    the delete that `requires` it (it did: only a JSON answer was read for errors)."""
    proxy = _proxy(drawdown_proxy, standin, docs, READ_BEFORE_DELETE)

    async def script(session: ClientSession) -> dict[str, object]:
        outcomes: dict[str, object] = {}
        missing = await session.call_tool("get_page", {"page_id": "missing"})
        outcomes["get missing"] = "isError" if missing.is_error else "ok"
        try:
            await session.call_tool("get_page", {"page_id": "withdrawn"})
        except MCPError as exc:
            outcomes["get withdrawn"] = exc.error.message
        await session.call_tool("get_page", {"page_id": "intro"})
        for page in ("missing", "withdrawn", "intro"):
            try:
                done = await session.call_tool("delete_page", {"page_id": page})
                outcomes[f"delete {page}"] = done.content[0].text
            except MCPError as exc:
                outcomes[f"delete {page}"] = exc.error.data["reason"]
        return outcomes

    outcomes = asyncio.run(_session(proxy, script))
    assert outcomes == {
        "get missing": "isError",
        "get withdrawn": "page withdrawn was withdrawn",
        "delete missing": "requires_unmet",
        "delete withdrawn": "requires_unmet",
        "delete intro": "deleted intro",
    }
    assert docs.calls[-1] == ("delete_page", {"page_id": "intro"})  # the only delete it ran
    assert docs.tools_called().count("delete_page") == 1
    # One decision row per call; every hold settled; the ledger's invariants hold.
    calls = proxy.query(
        "SELECT action, decision, reason_code, status FROM decisions "
        "WHERE action LIKE 'mcp.docs.%' ORDER BY id"
    )
    assert calls == [
        ("mcp.docs.get_page", "allow", None, 200),
        ("mcp.docs.get_page", "allow", None, 200),
        ("mcp.docs.get_page", "allow", None, 200),
        ("mcp.docs.delete_page", "deny", "requires_unmet", 403),
        ("mcp.docs.delete_page", "deny", "requires_unmet", 403),
        ("mcp.docs.delete_page", "allow", None, 200),
    ]
    proxy.stop()
    assert_ledger_verifies(proxy.db_path)
    assert "Traceback" not in proxy.log_text()
    # Replayed under the same policy, the failed lookups unlock nothing either: replay took
    # every 200 for a lookup made, and let two of the deletes through.
    replayed = subprocess.run(
        [sys.executable, "-m", "drawdown", "replay", "--policy", str(proxy.policy_path),
         "--db", str(proxy.db_path), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    data = json.loads(replayed.stdout)
    assert data["changed"] == 0, data["blocked"]
    assert [b["reason_code"] for b in data["blocked"]] == ["requires_unmet"] * 2


LOOP_GUARDED = DOCS + "anomalies:\n  loop: {repeats: 3, on_detect: deny}\n"


def test_sessions_opened_again_are_no_loop_and_a_repeated_call_is(
    drawdown_proxy: Factory, standin: StandIn, docs: DocsMcpServer
) -> None:
    """Every session sends the same initialize, notifications, tools/list, event-stream GET
    and closing DELETE: the loop guard took the fourth session's initialize for a loop and
    refused it, before any tool was called. Only calls count as repeats."""
    proxy = _proxy(drawdown_proxy, standin, docs, LOOP_GUARDED)

    async def listed_and_read(page: str) -> object:
        async def script(session: ClientSession) -> object:
            await session.list_tools()
            await session.list_tools()
            return (await session.call_tool("get_page", {"page_id": page})).content[0].text

        return await _session(proxy, script)

    async def same_call_again(session: ClientSession) -> list[str]:
        outcomes = []
        for _ in range(4):
            try:
                await session.call_tool("get_page", {"page_id": "intro"})
                outcomes.append("ok")
            except MCPError as exc:
                outcomes.append(exc.error.data["reason"])
        return outcomes

    async def week() -> tuple[list[object], object]:
        pages = [await listed_and_read(f"p{n}") for n in range(6)]
        return pages, await _session(proxy, same_call_again)

    pages, repeated = asyncio.run(week())
    assert len(pages) == 6 and all("Traceback" not in str(p) for p in pages), pages
    assert repeated == ["ok", "ok", "ok", "anomaly"]
    refused = proxy.query("SELECT action, reason_code FROM decisions WHERE decision = 'deny'")
    assert refused == [("mcp.docs.get_page", "anomaly")]
    proxy.stop()
    assert "Traceback" not in proxy.log_text()
