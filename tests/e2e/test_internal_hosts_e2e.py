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
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.8.9.10", "169.254.169.254"])
def test_an_internal_upstream_is_refused_in_shadow_mode_too_and_never_reached(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path, host: str
) -> None:
    """`deny`: the openai SDK gets a 403 in its own error shape, which it does not retry, and
    the upstream nothing; the refusal is the run's decision. Shadow mode refuses it as well:
    the policy has no say over what such an address means."""
    proxy = drawdown_proxy(POLICY, extra_args=["--set", "drawdown_internal_hosts=deny"])
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
