"""Upstreams on the proxy's own host (drawdown_internal_hosts), through a real `drawdown run`.

Every client here is on the proxy's host (network tests stay on loopback), which the default
(`local`) lets through: `deny` stands for a client on another host, for which such an address
means the proxy's machine (its local services, its cloud metadata), never the client's own.
tests/unit/test_destinations.py decides clients on other hosts, and names that resolve to an
internal address, without a network.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.support.network import own_address
from tests.support.proxy import DrawdownProcess
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]
# Shadow mode with unknown hosts allowed: nothing in the policy refuses these calls.
POLICY = """
mode: shadow
identity:
  agent: [{value: research}]
  run: [{value: r1}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: local.llm, provider: openai, match: {host: ["127.0.0.1", localhost]}}
"""


# In `deny` the proxy looks a name up itself before it connects (and refuses it when that
# fails: there is no DNS here), then connects to the address it checked. The harness maps names
# below the proxy (tests/support/mitm_resolve.py), so under `deny` the provider's name resolves
# to an address on no one's own host, and the harness maps that address (only) to the stand-in:
# the call goes as in production, to the checked address, TLS naming the host (the stand-in's
# certificate carries the name, not the address), and never to the real provider.
STANDIN_ADDRESS = "198.51.100.7"  # TEST-NET-2
RESOLVER = f"""
import ipaddress
from drawdown import destinations
looked_up = destinations.resolve
async def resolve(host, port):
    if host.lower() == "api.openai.com":
        return [ipaddress.ip_address("{STANDIN_ADDRESS}")]
    return await looked_up(host, port)
destinations.resolve = resolve
"""


def deny_proxy(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path, *extra: str
) -> DrawdownProcess:
    script = tmp_path / "resolve_provider.py"
    script.write_text(RESOLVER)
    # The address only, not the name: a connection made to the name would miss the stand-in.
    resolve = {
        "tls": {STANDIN_ADDRESS: standin.host_port},
        "plain": {STANDIN_ADDRESS: standin.http_host_port},
    }
    sets = ["--set", "drawdown_internal_hosts=deny", "--set", f"scripts={script}", *extra]
    return drawdown_proxy(POLICY, resolve=resolve, extra_args=sets)


def decisions(db: Path) -> list[tuple[str, str | None, str, int | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT decision, reason_code, host, status FROM decisions ORDER BY ts"
        ).fetchall()


def test_a_client_on_the_proxys_host_reaches_a_local_upstream_by_default(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    """The default refuses internal upstreams only to clients on other hosts: an agent beside
    the proxy reaches its local model server through it, as it would without it."""
    proxy = drawdown_proxy(POLICY)
    local = f"http://127.0.0.1:{standin.http_port}/v1"
    with proxy.openai_client(base_url=local, max_retries=0) as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert standin.count("/v1/chat/completions") == 1
    assert decisions(tmp_db) == [("allow", None, "127.0.0.1", 200)]


# (`[::1]` is decided in the unit tests: the openai SDK's HTTP client writes its proxy request
# line without the brackets, which mitmproxy refuses before drawdown sees it.)
# (this machine's LAN address: through a proxy on another host, it reaches what the proxy's host
# serves on any address)
@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "127.8.9.10", "169.254.169.254", str(own_address())]
)
def test_an_internal_upstream_is_refused_in_shadow_mode_too_and_never_reached(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path, tmp_path: Path, host: str
) -> None:
    """`deny`: the openai SDK gets a 403 in its own error shape, which it does not retry, and
    the upstream nothing; the refusal is the run's decision. Shadow mode refuses it as well:
    the policy has no say over what such an address means."""
    proxy = deny_proxy(drawdown_proxy, standin, tmp_path)
    with (
        proxy.openai_client(base_url=f"http://{host}:{standin.http_port}/v1") as client,
        pytest.raises(openai.PermissionDeniedError) as refused,
    ):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.response.headers["x-drawdown-reason"] == "internal_host"
    assert "an address on the proxy's own host" in refused.value.message
    assert standin.count() == 0
    assert decisions(tmp_db) == [("deny", "internal_host", host, 403)]
    # The provider's own host is no internal address: still forwarded (and metered).
    with proxy.openai_client(max_retries=0) as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert standin.count("/v1/chat/completions") == 1
    # Replay (which sees no client address) refuses it again, under the same shadow policy.
    proxy.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE completed_at IS NULL", until=lambda r: r[0][0] == 0
    )
    policy = tmp_db.parent / "replayed.yaml"
    policy.write_text(POLICY)
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", "replay", "--policy", str(policy), "--db", str(tmp_db), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    blocked = [(b["reason_code"], b["status"]) for b in json.loads(result.stdout)["blocked"]]
    assert blocked == [("internal_host", 403)]


@pytest.mark.parametrize("strategy", ["lazy", "eager"])
def test_a_name_is_connected_to_at_the_address_checked_and_its_connection_reused(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path, tmp_path: Path, strategy: str
) -> None:
    """`deny` connects to the address it checked, not to the name (the harness maps only that
    address to the stand-in): TLS still names the host
    (the stand-in's certificate, verified, carries the name only), the request names it, and
    the connection, named by its host again once made, carries the next call as well (once
    left at the address: mitmproxy refused the renaming of an open connection)."""
    proxy = deny_proxy(
        drawdown_proxy, standin, tmp_path, "--set", f"connection_strategy={strategy}"
    )
    with proxy.openai_client(max_retries=0) as client:
        for _ in range(2):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
    first, second = standin.matching("/v1/chat/completions")
    assert first.header("host") == second.header("host") == "api.openai.com"
    assert first.client == second.client  # one upstream connection
    # Eager, the tunnel's own connection is the one pinned: its requests still name the host
    # (a request decided as one to 198.51.100.7 would match no action for api.openai.com).
    assert "Addon error" not in proxy.log_text()
    proxy.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE completed_at IS NULL", until=lambda r: r[0][0] == 0
    )
    assert [row[2] for row in decisions(tmp_db)] == ["api.openai.com", "api.openai.com"]


def test_the_operators_upstream_proxy_on_this_host_is_reached(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """`--mode upstream:http://127.0.0.1:PORT` (a second proxy beside this one): every
    request goes through it, and it resolves their names. Refused as a loopback upstream, it
    failed every call (502); a literal internal target is still refused (403)."""
    second = drawdown_proxy(POLICY, db=tmp_path / "second.db")
    proxy = deny_proxy(
        drawdown_proxy, standin, tmp_path, "--set", f"mode=upstream:http://127.0.0.1:{second.port}"
    )
    with proxy.openai_client(base_url="http://api.openai.com/v1", max_retries=0) as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert standin.count("/v1/chat/completions") == 1
    with (
        proxy.openai_client(base_url=f"http://127.0.0.1:{standin.http_port}/v1") as client,
        pytest.raises(openai.PermissionDeniedError),
    ):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert standin.count() == 1
