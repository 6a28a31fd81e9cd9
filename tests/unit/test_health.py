"""health: which requests are probes of the proxy itself, and what they are answered."""

from __future__ import annotations

import json
import socket

from drawdown import health

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
