"""Health probes on the proxy's own port: `/healthz` (the process answers) and `/readyz`
(it can decide calls: a policy in force, its ledger open, no stop under way).

An orchestrator's HTTP probe is a plain request addressed to the proxy itself, not through it.
mitmproxy would take it for a request to forward, decide it as a call (a decision row, an
idle-split run of its own, a loop after ten probes) and then refuse to connect to itself. It
is answered here instead, before identity, authentication or the ledger see it.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass

PATHS = frozenset({"/healthz", "/readyz"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True)
class Readiness:
    policy_loaded: bool
    ledger_open: bool
    draining: bool
    # What became of the ledger's file ("deleted"…), when it was lost under the running proxy.
    ledger_lost: str | None = None

    @property
    def ready(self) -> bool:
        return self.policy_loaded and self.ledger_open and not self.draining

    def problems(self) -> list[str]:
        found = []
        if not self.policy_loaded:
            found.append("no policy in force")
        if not self.ledger_open and self.ledger_lost:
            found.append(
                f"the ledger's file was {self.ledger_lost} under the proxy (calls are answered "
                "per on_ledger_error until a ledger file is back at its path)"
            )
        elif not self.ledger_open:
            found.append("the ledger is not open (calls are answered per on_ledger_error)")
        if self.draining:
            found.append("shutting down")
        return found


def own_addresses(
    listen_addrs: Iterable[tuple[str, int]], *, machine: bool = True
) -> frozenset[tuple[str, int]]:
    """Every (host, port) a probe may address this proxy by. A wildcard listen address takes
    the machine's own names and addresses (a Kubernetes probe names the pod's IP), which a
    resolver may take its time to give: `machine=False` leaves them out."""
    found: set[tuple[str, int]] = set()
    for host, port in listen_addrs:
        hosts = {host.lower(), "localhost", "127.0.0.1", "::1"}
        if host in _WILDCARDS and machine:
            hosts |= _machine_addresses()
        found |= {(h, port) for h in hosts}
    return frozenset(found)


def _machine_addresses() -> set[str]:
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    addresses = set(names)
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None)
        except OSError:  # a host name its own resolver does not know
            continue
        addresses |= {str(info[4][0]) for info in infos}
    return addresses


def addressed_to_proxy(
    method: str,
    host: str,
    port: int,
    path: str,
    tunnelled: bool,
    own: frozenset[tuple[str, int]],
    paths: frozenset[str] = PATHS,
) -> bool:
    """A probe: a GET or HEAD of a probe path (or `/metrics`, in `paths`) on a plain
    connection, naming this proxy as its host. A request inside a CONNECT tunnel, or to any
    other host, is a call to decide."""
    if method.upper() not in ("GET", "HEAD") or path.split("?", 1)[0] not in paths:
        return False
    return to_proxy(host, port, tunnelled, own)


def to_proxy(host: str, port: int, tunnelled: bool, own: frozenset[tuple[str, int]]) -> bool:
    """A plain request naming this proxy as its host: for the proxy itself, not through it."""
    if tunnelled or all(port != own_port for _, own_port in own):  # every request asks
        return False
    host = host.lower().rstrip(".")
    try:
        host = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    return (host, port) in own


def answer(path: str, readiness: Readiness) -> tuple[int, bytes]:
    """(status, JSON body) for a probe path."""
    if path.split("?", 1)[0] == "/healthz":
        return 200, b'{"status": "ok"}\n'
    if readiness.ready:
        return 200, b'{"status": "ready"}\n'
    body = {"status": "not ready", "problems": readiness.problems()}
    return 503, (json.dumps(body) + "\n").encode()
