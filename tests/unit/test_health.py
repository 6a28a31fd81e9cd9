"""health: which requests are probes of the proxy itself (or scrapes of its metrics), and what
they are answered."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from drawdown import health
from drawdown.addon import SCRAPE, STATE, Drawdown
from mitmproxy.test import taddons, tflow, tutils

OWN = health.own_addresses([("127.0.0.1", 8080)])


def test_only_a_get_of_a_probe_path_naming_the_proxy_on_a_plain_connection_is_a_probe() -> None:
    assert health.addressed_to_proxy("GET", "127.0.0.1", 8080, "/healthz", False, OWN)
    assert health.addressed_to_proxy("HEAD", "LOCALHOST.", 8080, "/readyz?verbose=1", False, OWN)
    assert health.addressed_to_proxy("GET", "[::1]", 8080, "/readyz", False, OWN)
    # Calls to decide: another host or port, inside a CONNECT tunnel, a write, another path.
    assert not health.addressed_to_proxy("GET", "api.example.com", 8080, "/healthz", False, OWN)
    assert not health.addressed_to_proxy("GET", "127.0.0.1", 9090, "/healthz", False, OWN)
    assert not health.addressed_to_proxy("GET", "127.0.0.1", 8080, "/healthz", True, OWN)
    assert not health.addressed_to_proxy("POST", "127.0.0.1", 8080, "/healthz", False, OWN)
    assert not health.addressed_to_proxy("GET", "127.0.0.1", 8080, "/health", False, OWN)


def test_a_wildcard_listen_address_takes_the_machines_own_names() -> None:
    """A Kubernetes probe names the pod's IP (or its name) with the proxy's port."""
    own = health.own_addresses([("0.0.0.0", 8080)])
    name = socket.gethostname().lower()
    assert (name, 8080) in own
    assert health.addressed_to_proxy("GET", name, 8080, "/readyz", False, own)
    assert not health.addressed_to_proxy(
        "GET", name, 8080, "/readyz", False, health.own_addresses([("127.0.0.1", 8080)])
    )


def test_readiness_names_every_problem() -> None:
    assert health.answer("/readyz", health.Readiness(True, True, False)) == (
        200,
        b'{"status": "ready"}\n',
    )
    status, body = health.answer("/readyz", health.Readiness(False, False, True))
    assert status == 503
    assert json.loads(body)["problems"] == [
        "no policy in force",
        "the ledger is not open (calls are answered per on_ledger_error)",
        "shutting down",
    ]
    # Liveness: the process answers, whatever it can do.
    assert health.answer("/healthz", health.Readiness(False, False, True))[0] == 200


class ListeningServer:
    """mitmproxy's proxyserver addon, as far as the probes need it: where it listens."""

    name = "proxyserver"

    def listen_addrs(self) -> list[tuple[str, int]]:
        return [("0.0.0.0", 8080)]


def test_a_probe_or_scrape_at_once_after_start_is_answered_not_decided(tmp_path: Path) -> None:
    """The machine's names are resolved off the loop once running; a probe or a scrape that
    came first, to 127.0.0.1, was taken for an agent's call: decided, recorded, answered 502."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
    )
    seen: dict[str, object] = {}

    async def start_and_probe() -> None:
        addon = Drawdown()
        with taddons.context(addon) as tctx:
            tctx.master.addons.add(ListeningServer())
            tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(tmp_path / "l.db"))
            addon.running()  # no await after it: _warm_up has not run
            for path in ("/readyz", "/metrics"):
                flow = tflow.tflow(
                    req=tutils.treq(host="127.0.0.1", port=8080, path=path.encode(), method=b"GET")
                )
                flow.client_conn.tls = False
                addon.requestheaders(flow)
                seen[path] = (
                    flow.response.status_code if flow.response else flow.metadata.get(SCRAPE)
                )
                assert STATE not in flow.metadata, "taken for an agent's call"
            for task in addon.tasks:
                task.cancel()
            addon.done()

    asyncio.run(start_and_probe())
    assert seen == {"/readyz": 200, "/metrics": True}


def test_the_404_of_a_request_to_the_proxy_names_metrics_only_when_they_are_on(
    tmp_path: Path,
) -> None:
    """With drawdown_metrics=false, /metrics is answered 404 like any other path of the proxy,
    whose body said "GET /healthz, /readyz and /metrics answer here"."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
    )
    said: dict[bool, dict[str, str]] = {}

    async def ask(metrics_on: bool) -> None:
        addon = Drawdown()
        with taddons.context(addon) as tctx:
            tctx.master.addons.add(ListeningServer())
            tctx.configure(
                addon,
                drawdown_policy=str(policy),
                drawdown_db=str(tmp_path / "l.db"),
                drawdown_metrics=metrics_on,
            )
            addon.running()
            said[metrics_on] = {}
            for path in ("/", "/metrics"):
                flow = tflow.tflow(
                    req=tutils.treq(host="127.0.0.1", port=8080, path=path.encode(), method=b"GET")
                )
                flow.client_conn.tls = False
                addon.requestheaders(flow)
                if flow.response is not None:
                    assert flow.response.status_code == 404
                    said[metrics_on][path] = json.loads(flow.response.content)["error"]
            for task in addon.tasks:
                task.cancel()
            addon.done()

    for metrics_on in (True, False):
        asyncio.run(ask(metrics_on))
    assert said[True]["/"].endswith("; GET /healthz, /readyz and /metrics answer here")
    assert "/metrics" not in said[True]  # scraped
    for path in ("/", "/metrics"):
        assert said[False][path].endswith("; GET /healthz and /readyz answer here"), path
