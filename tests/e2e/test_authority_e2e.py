"""Authority end to end (SPEC §3, §5): who may do what, to which tool, in what order — decided before
the request leaves the proxy. Real `drawdown run`, the shipped example policies, TLS stand-ins."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import httpx2
import openai
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import standin_resolve
from tests.support.mcp_server import PATH as MCP_PATH
from tests.support.mcp_server import DocsMcpServer
from tests.support.proxy import DrawdownProcess
from tests.support.standin import StandIn
from tests.support.tls import TlsMaterial

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "policies" / "examples"


def headers(agent: str, run: str = "r1") -> dict[str, str]:
    return {"X-Drawdown-Agent": agent, "X-Drawdown-Run": run}


def decisions(proxy: DrawdownProcess) -> list[tuple]:
    return proxy.query(
        "SELECT agent, action, decision, reason_code, status FROM decisions ORDER BY id"
    )


# --- a support agent ---------------------------------------------------------------------


def test_support_agent_reads_and_refunds_only_within_its_authority(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(EXAMPLES / "support.yaml")
    with proxy.http_client(headers=headers("support-1")) as http:
        assert http.get("https://crm.example.com/api/customers/c-42").status_code == 200

        # Above the tier-1 limit ($50.00): refused before it reaches Stripe.
        big = http.post(
            "https://api.stripe.com/v1/refunds", data={"amount": "9000", "customer": "c-42"}
        )
        assert big.status_code == 403
        assert (
            big.headers["x-drawdown-reason"] == "not_authorized"
            and big.headers["x-should-retry"] == "false"
        )
        assert "no rule allows refund.issue" in big.json()["error"]["message"]

        # A customer this run never looked up: a fabricated id is refused.
        unread = http.post(
            "https://api.stripe.com/v1/refunds", data={"amount": "100", "customer": "c-77"}
        )
        assert unread.status_code == 403 and unread.headers["x-drawdown-reason"] == "requires_unmet"
        assert "crm.read" in unread.json()["error"]["message"]
        assert standin.count("/v1/refunds") == 0

        # The customer the run read, within the tier: allowed, and it reaches Stripe.
        ok = http.post(
            "https://api.stripe.com/v1/refunds", data={"amount": "100", "customer": "c-42"}
        )
        assert ok.status_code == 200
        assert standin.count("/v1/refunds") == 1

    # Another run of the same agent has not read c-42: its history is its own.
    with proxy.http_client(headers=headers("support-1", "r2")) as http:
        other = http.post(
            "https://api.stripe.com/v1/refunds", data={"amount": "100", "customer": "c-42"}
        )
        assert other.status_code == 403 and other.headers["x-drawdown-reason"] == "requires_unmet"

    # The lead may refund any amount, once the customer was read.
    with proxy.http_client(headers=headers("support-lead", "r9")) as http:
        http.get("https://crm.example.com/api/customers/c-42")
        assert (
            http.post(
                "https://api.stripe.com/v1/refunds", data={"amount": "9000", "customer": "c-42"}
            ).status_code
            == 200
        )
    assert standin.count("/v1/refunds") == 2
    assert [row[2:4] for row in decisions(proxy)] == [
        ("allow", None),
        ("deny", "not_authorized"),
        ("deny", "requires_unmet"),
        ("allow", None),
        ("deny", "requires_unmet"),
        ("allow", None),
        ("allow", None),
    ]


def test_per_action_cap_holds_like_any_budget(drawdown_proxy: Factory, standin: StandIn) -> None:
    proxy = drawdown_proxy(EXAMPLES / "support.yaml")
    with proxy.http_client(headers=headers("support-2")) as http:
        http.get("https://crm.example.com/api/customers/c-1")
        statuses = [
            http.post(
                "https://api.stripe.com/v1/refunds", data={"amount": "10", "customer": "c-1"}
            ).status_code
            for _ in range(4)
        ]
    assert statuses == [200, 200, 200, 402]  # at most 3 refunds per run
    assert standin.count("/v1/refunds") == 3


def test_a_failed_lookup_is_not_a_lookup(drawdown_proxy: Factory, standin: StandIn) -> None:
    from tests.support.standin import Reply

    standin.script("GET", "/api/customers/*", Reply(status=404, json={"error": "no such customer"}))
    proxy = drawdown_proxy(EXAMPLES / "support.yaml")
    with proxy.http_client(headers=headers("support-3")) as http:
        assert http.get("https://crm.example.com/api/customers/c-5").status_code == 404
        refused = http.post(
            "https://api.stripe.com/v1/refunds", data={"amount": "10", "customer": "c-5"}
        )
    assert refused.status_code == 403 and refused.headers["x-drawdown-reason"] == "requires_unmet"


def test_unknown_hosts_are_denied_by_the_support_policy(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(EXAMPLES / "support.yaml")
    with proxy.http_client(headers=headers("support-1")) as http:
        response = http.get("https://files.example.org/export.csv")
        # A named host, but no action for this method: the answer must not call it unknown.
        deleted = http.delete("https://crm.example.com/api/customers/c-42")
    assert response.status_code == 403 and response.headers["x-drawdown-reason"] == "unknown_host"
    assert response.json()["error"]["message"] == (
        "drawdown: no action matches GET files.example.org/export.csv (unknown_hosts: deny)"
    )
    assert deleted.status_code == 403 and deleted.json()["error"]["message"] == (
        "drawdown: no action matches DELETE crm.example.com/api/customers/c-42"
        " (unknown_hosts: deny)"
    )
    assert standin.count("/export.csv") == 0 and standin.count("/api/customers/c-42") == 0


def test_llm_denials_use_the_providers_error_shape(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(EXAMPLES / "support.yaml")
    with (
        proxy.openai_client(default_headers=headers("billing-bot")) as client,
        pytest.raises(openai.PermissionDeniedError) as caught,
    ):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.response.json()["error"]["code"] == "not_authorized"
    assert standin.count("/v1/chat/completions") == 0


def test_explain_shows_which_rule_decided(drawdown_proxy: Factory, standin: StandIn) -> None:
    proxy = drawdown_proxy(EXAMPLES / "support.yaml")
    with proxy.http_client(headers=headers("support-1", "rx")) as http:
        http.get("https://crm.example.com/api/customers/c-42")

    def explain(*extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "drawdown", "explain", "--policy", str(EXAMPLES / "support.yaml"),
             "--url", "https://api.stripe.com/v1/refunds", "--method", "POST",
             "--header", "X-Drawdown-Agent:support-1", "--header", "X-Drawdown-Run:rx",
             *extra],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return result.stdout

    over = explain("--json", '{"amount": 9000, "customer": "c-42"}')
    assert "rule 'tier-1-refunds'" in over and "its 'when' does not hold" in over
    assert "decision: deny — not_authorized (403)" in over
    read = explain("--json", '{"amount": 100, "customer": "c-42"}', "--db", str(proxy.db_path))
    assert "requirement met" in read and "decision: allow" in read
    unread = explain("--json", '{"amount": 100, "customer": "c-99"}', "--db", str(proxy.db_path))
    assert "requirement NOT met" in unread and "decision: deny — requires_unmet (403)" in unread


# --- a coding agent ----------------------------------------------------------------------


def test_coding_agent_may_not_touch_the_tests(drawdown_proxy: Factory, standin: StandIn) -> None:
    proxy = drawdown_proxy(EXAMPLES / "coding.yaml")
    put = {"message": "update", "content": "cHJpbnQoJ2hpJyk="}
    with proxy.http_client(headers=headers("coder-7")) as http:
        assert (
            http.get("https://api.github.com/repos/acme/app/contents/tests/test_api.py").status_code
            == 200
        )
        assert (
            http.put(
                "https://api.github.com/repos/acme/app/contents/src/api.py", json=put
            ).status_code
            == 200
        )
        denied = http.put(
            "https://api.github.com/repos/acme/app/contents/tests/unit/test_api.py", json=put
        )
        assert denied.status_code == 403
        assert "rule 'tests-are-read-only'" in denied.json()["error"]["message"]
        assert (
            http.delete(
                "https://api.github.com/repos/acme/app/contents/tests/conftest.py"
            ).status_code
            == 403
        )
        push = http.patch(
            "https://api.github.com/repos/acme/app/git/refs/heads/main", json={"sha": "abc"}
        )
        assert push.status_code == 403
    assert standin.count("/repos/acme/app/contents/tests/*") == 1  # only the read
    assert standin.count("/repos/acme/app/git/*") == 0
    # Another agent (a human's CI bot) is not bound by the coder's rules.
    with proxy.http_client(headers=headers("ci-bot")) as http:
        assert (
            http.put(
                "https://api.github.com/repos/acme/app/contents/tests/unit/test_api.py", json=put
            ).status_code
            == 200
        )


def test_shadow_rule_records_would_deny_without_blocking(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(EXAMPLES / "coding.yaml")
    with proxy.anthropic_client(default_headers=headers("coder-1")) as client:
        client.messages.create(
            model="claude-opus-4-8",
            max_tokens=50,
            messages=[{"role": "user", "content": "refactor"}],
        )
        client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=50,
            messages=[{"role": "user", "content": "refactor"}],
        )
    assert standin.count("/v1/messages") == 2
    rows = proxy.query("SELECT model, decision, reason_code FROM decisions ORDER BY id")
    assert rows == [
        ("claude-opus-4-8", "would_deny", "not_authorized"),
        ("claude-haiku-4-5", "allow", None),
    ]


# --- an MCP server -----------------------------------------------------------------------


@pytest.fixture
def mcp_docs(tls_material: TlsMaterial) -> Iterator[DocsMcpServer]:
    server = DocsMcpServer(tls_material).start()
    yield server
    server.stop()


def _mcp_proxy(
    drawdown_proxy: Factory, standin: StandIn, mcp_docs: DocsMcpServer
) -> DrawdownProcess:
    resolve = standin_resolve(standin)
    resolve["tls"] = {"mcp.example.com": mcp_docs.host_port, **resolve["tls"]}
    return drawdown_proxy(
        EXAMPLES / "research.yaml", resolve=resolve, proxy_auth=("research-1", "run-1")
    )


async def _mcp_session(proxy: DrawdownProcess, script: Callable[[ClientSession], object]) -> object:
    http = httpx2.AsyncClient(
        proxy=proxy.proxy_url, verify=proxy.ssl_context(), trust_env=False, timeout=30
    )
    async with (
        http,
        streamable_http_client(f"https://mcp.example.com{MCP_PATH}", http_client=http) as streams,
    ):
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await script(session)  # type: ignore[misc]


def test_mcp_tools_are_governed_per_tool(
    drawdown_proxy: Factory, standin: StandIn, mcp_docs: DocsMcpServer
) -> None:
    from mcp.shared.exceptions import MCPError as McpError

    proxy = _mcp_proxy(drawdown_proxy, standin, mcp_docs)

    async def script(session: ClientSession) -> dict:
        tools = await session.list_tools()
        found = await session.call_tool("search_docs", {"query": "budgets"})
        try:
            await session.call_tool("delete_page", {"page_id": "intro"})
            denied = None
        except McpError as exc:
            denied = exc.error
        # The session is still usable after a denial.
        page = await session.call_tool("get_page", {"page_id": "budgets"})
        return {
            "tools": sorted(t.name for t in tools.tools),
            "found": found,
            "denied": denied,
            "page": page,
        }

    result = asyncio.run(_mcp_session(proxy, script))
    assert result["tools"] == ["delete_page", "get_page", "search_docs"]
    assert "3 pages mention 'budgets'" in result["found"].content[0].text
    denied = result["denied"]
    assert denied is not None and "mcp.docs.delete_page is not allowed" in denied.message
    assert denied.data["reason"] == "not_authorized" and denied.data["status"] == 403
    assert "drawdown" in result["page"].content[0].text
    assert mcp_docs.tools_called() == [
        "search_docs",
        "get_page",
    ]  # the delete never reached the server
    actions = [row[1] for row in decisions(proxy)]
    assert (
        "mcp.docs.search_docs" in actions
        and "mcp.docs.delete_page" in actions
        and "mcp.docs" in actions
    )
    assert {row[0] for row in decisions(proxy)} == {
        "research-1"
    }  # the agent named itself in its proxy URL
    # Answered as a JSON-RPC error over HTTP 200, recorded as what it is: a 403.
    (refused,) = [row for row in decisions(proxy) if row[2] == "deny"]
    assert refused[1:] == ("mcp.docs.delete_page", "deny", "not_authorized", 403)


def test_mcp_per_tool_budget_and_loop_guard(
    drawdown_proxy: Factory, standin: StandIn, mcp_docs: DocsMcpServer
) -> None:
    from mcp.shared.exceptions import MCPError as McpError

    proxy = _mcp_proxy(drawdown_proxy, standin, mcp_docs)

    async def script(session: ClientSession) -> list[str]:
        outcomes = []
        for i in range(6):  # different queries: the per-run cap of 5 doc searches applies
            try:
                await session.call_tool("search_docs", {"query": f"topic {i}"})
                outcomes.append("ok")
            except McpError as exc:
                outcomes.append(f"{exc.error.data['status']} {exc.error.data['reason']}")
        for _ in range(6):  # the same call over and over: the loop guard stops the 6th
            try:
                await session.call_tool("get_page", {"page_id": "same"})
                outcomes.append("ok")
            except McpError as exc:
                outcomes.append(f"{exc.error.data['status']} {exc.error.data['reason']}")
        return outcomes

    outcomes = asyncio.run(_mcp_session(proxy, script))
    assert outcomes[:6] == ["ok"] * 5 + ["402 budget_exhausted"]
    assert outcomes[6:] == ["ok"] * 5 + ["429 anomaly"]
    assert (
        mcp_docs.tools_called().count("search_docs") == 5
        and mcp_docs.tools_called().count("get_page") == 5
    )


# --- proxy authentication ----------------------------------------------------------------


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()}"
        for user, pw in (("support-1", "s3cret-one"), ("support-lead", "s3cret-lead"))
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_authenticated_user_is_the_agent_and_headers_cannot_override_it(
    drawdown_proxy: Factory, standin: StandIn, htpasswd: Path
) -> None:
    proxy = drawdown_proxy(
        EXAMPLES / "support.yaml",
        extra_args=["--set", f"proxyauth=@{htpasswd}"],
        proxy_auth=("support-1", "s3cret-one"),
    )
    spoofed = {"X-Drawdown-Agent": "support-lead", "X-Drawdown-Run": "r1"}
    with proxy.http_client(headers=spoofed) as http:
        http.get("https://crm.example.com/api/customers/c-42")
        refund = http.post(
            "https://api.stripe.com/v1/refunds", data={"amount": "9000", "customer": "c-42"}
        )
    assert refund.status_code == 403  # support-1's tier applies, whatever the header claims
    assert {row[0] for row in decisions(proxy)} == {"support-1"}
    # The password is a secret here: it is never used as a run id, nor stored anywhere.
    assert not proxy.query(
        "SELECT 1 FROM decisions WHERE scope LIKE '%s3cret%' OR run LIKE '%s3cret%'"
    )
    for path in Path(proxy.db_path).parent.glob(
        Path(proxy.db_path).name + "*"
    ):  # the db, its WAL and shm
        assert b"s3cret-one" not in path.read_bytes()
    assert "s3cret-one" not in proxy.log_text()


def test_requests_without_valid_credentials_never_reach_an_upstream(
    drawdown_proxy: Factory, standin: StandIn, htpasswd: Path
) -> None:
    proxy = drawdown_proxy(
        EXAMPLES / "support.yaml",
        extra_args=["--set", f"proxyauth=@{htpasswd}"],
        proxy_auth=("support-1", "s3cret-one"),
    )
    for auth in (None, ("support-1", "wrong"), ("nobody", "x")):
        url = proxy.proxy_url_for(auth) if auth else proxy.proxy_url_for(None)
        with (
            httpx2.Client(proxy=url, verify=proxy.ssl_context(), trust_env=False) as http,
            pytest.raises(httpx2.ProxyError) as caught,
        ):
            http.get("https://crm.example.com/api/customers/c-42", headers=headers("support-lead"))
        assert "407" in str(caught.value)
    assert standin.count("*") == 0
    assert decisions(proxy) == []


def test_listening_beyond_loopback_is_allowed_once_credentials_are_configured(
    drawdown_proxy: Factory, standin: StandIn, htpasswd: Path, tmp_path: Path
) -> None:
    proxy = drawdown_proxy(
        EXAMPLES / "support.yaml",
        extra_args=["--set", f"proxyauth=@{htpasswd}", "--listen", "0.0.0.0:0"],
        proxy_auth=("support-1", "s3cret-one"),
    )
    assert proxy.is_running()


# --- hosts no action names ---------------------------------------------------------------


def test_passthrough_hosts_are_not_even_decrypted(
    drawdown_proxy: Factory, standin: StandIn, upstream_ca: Path
) -> None:
    policy = """
unknown_hosts: passthrough
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
"""
    proxy = drawdown_proxy(policy)
    proxy.wait_for_log("drawdown listening")
    import ssl

    # Only the upstream's own CA is trusted: a decrypting proxy would present mitmproxy's certificate.
    upstream_only = ssl.create_default_context(cafile=str(upstream_ca))
    with httpx2.Client(proxy=proxy.proxy_url, verify=upstream_only, trust_env=False) as http:
        assert http.get("https://pinned.example.org/health").status_code == 200
    with proxy.openai_client() as client:  # the named host is still decrypted and metered
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    rows = proxy.query("SELECT host, action FROM decisions")
    assert rows == [
        ("api.openai.com", "llm")
    ]  # the passthrough request left no decision: drawdown never saw it
    assert standin.count("/health") == 1


def test_explain_finds_the_idle_split_run_an_unnamed_agent_is_in(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """An agent that names no run gets one by idle_split; explain --db once judged its refund
    against a brand-new run, and said the lookup the proxy had seen was missing."""
    proxy = drawdown_proxy(EXAMPLES / "support.yaml")
    with proxy.http_client(headers={"X-Drawdown-Agent": "support-7"}) as http:
        assert http.get("https://crm.example.com/api/customers/c-77").status_code == 200
    (run,) = {r for (r,) in proxy.query("SELECT run FROM decisions")}

    def explain(*extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "drawdown", "explain", "--policy", str(EXAMPLES / "support.yaml"),
             "--url", "https://api.stripe.com/v1/refunds", "--method", "POST",
             "--header", "X-Drawdown-Agent:support-7", "--json", '{"amount": 900, "customer": "c-77"}',
             *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    found = explain("--db", proxy.db_path)
    assert f"/run:{run}  (" in found and "the agent's current run in the ledger" in found
    assert "decision: allow" in found
    assert "(minted)" in explain()  # without the ledger there is no run to find
    with proxy.http_client(headers={"X-Drawdown-Agent": "support-7"}) as http:
        refund = http.post(
            "https://api.stripe.com/v1/refunds", data={"amount": "900", "customer": "c-77"}
        )
    assert refund.status_code == 200  # and the proxy agrees
