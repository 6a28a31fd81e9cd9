"""Health probes on the proxy's own port, as an orchestrator sends them: a plain GET to the
proxy itself. Answered, never recorded, without proxy authentication; `/readyz` says whether
the proxy can decide calls."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from tests.support.proxy import DrawdownProcess

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

POLICY = """
mode: enforce
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
"""

# No proxy for the probe itself, whatever the environment says: it addresses the proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe(proxy: DrawdownProcess, path: str, host: str = "127.0.0.1") -> tuple[int, Any]:
    url = f"http://{host}:{proxy.address[1]}{path}"
    try:
        with _DIRECT.open(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read() or b"null")


def test_probes_are_answered_and_never_recorded(drawdown_proxy: Factory, tmp_path: Path) -> None:
    """Before, a probe was decided as a call (a decision row and an idle-split run of its own,
    a `loop` after ten) and answered 502 by mitmproxy, which would not connect to itself;
    behind `proxyauth` it got 407."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"agent:{bcrypt.hashpw(b'pw', bcrypt.gensalt(rounds=4)).decode()}\n")
    proxy = drawdown_proxy(
        POLICY, proxy_auth=("agent", "pw"), extra_args=["--set", f"proxyauth=@{htpasswd}"]
    )
    for _ in range(12):
        assert probe(proxy, "/healthz") == (200, {"status": "ok"})
        assert probe(proxy, "/readyz") == (200, {"status": "ready"})
    assert probe(proxy, "/readyz", host="localhost")[0] == 200
    assert proxy.query("SELECT COUNT(*) FROM decisions") == [(0,)]
    # A call through the proxy is still one: authenticated, decided and recorded.
    with proxy.openai_client(max_retries=0) as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert proxy.query("SELECT decision, agent FROM decisions") == [("allow", "agent")]


def test_other_requests_to_the_proxy_itself_are_answered_not_recorded(
    drawdown_proxy: Factory,
) -> None:
    """`curl http://127.0.0.1:8080/`, a POST to /healthz: no agent's call, yet each was decided
    and recorded as one (a run of its own, shown "+1 retried" in the report) and answered 502
    by mitmproxy, which will not connect to itself. Now 404, saying what the proxy is."""
    proxy = drawdown_proxy(POLICY)
    port = proxy.address[1]
    for method, path in [("GET", "/"), ("POST", "/healthz"), ("GET", "/v1/models")]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            _DIRECT.open(request, data=b"{}" if method == "POST" else None, timeout=10)
        assert refused.value.code == 404, (method, path)
        assert "this is a forward proxy" in json.loads(refused.value.read())["error"]
    assert probe(proxy, "/healthz") == (200, {"status": "ok"})
    assert proxy.query("SELECT COUNT(*) FROM decisions") == [(0,)]


def test_a_proxy_without_its_ledger_is_alive_but_not_ready(
    drawdown_proxy: Factory, tmp_path: Path
) -> None:
    """The ledger cannot be opened (its folder cannot be made): the proxy stays up answering
    calls 503 per on_ledger_error, and says so to an orchestrator, which keeps traffic away."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    proxy = drawdown_proxy(POLICY, db=blocker / "ledger.db")
    assert probe(proxy, "/healthz") == (200, {"status": "ok"})
    status, body = probe(proxy, "/readyz")
    assert status == 503
    assert body["status"] == "not ready"
    assert any("ledger is not open" in problem for problem in body["problems"])
