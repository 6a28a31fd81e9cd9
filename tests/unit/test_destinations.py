"""Upstreams on the proxy's own host (destinations.py), and the addon's hooks that refuse them
to clients on other hosts, driven without a network (taddons, tflow; the resolver replaced).
tests/e2e/test_internal_hosts_e2e.py drives a real proxy with the openai SDK."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from drawdown import destinations
from drawdown.addon import Drawdown
from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import mode_specs, server_hooks
from mitmproxy.test import taddons, tflow, tutils

from tests.support.addon_harness import drive
from tests.support.network import own_address

POLICY = """
mode: shadow
identity:
  agent: [{value: research}]
  run: [{value: r1}]
actions:
  - {kind: tool, match: {host: "*"}}
"""
REMOTE = ("203.0.113.7", 51000)  # an agent on another host
PROXY = ("192.0.2.10", 8080)  # the proxy's own address it connected to


def named_internal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """As the proxy asks it of a guarded client's request (addon.py, `_decide`)."""
    address = destinations.named_address(host)
    return address if address is not None and destinations.internal_here(address) else None


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.8.9.10", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::",
     "::ffff:127.0.0.1", "::ffff:169.254.169.254",
     # the clouds' metadata outside link-local: AWS and Google Cloud over IPv6, Alibaba Cloud,
     # Azure's WireServer, Oracle Cloud Classic
     "fd00:ec2::254", "fd20:ce::254", "100.100.100.200", "::ffff:100.100.100.200",
     "168.63.129.16", "192.0.0.192"],
)  # fmt: skip
def test_internal_addresses(address: str) -> None:
    assert destinations.internal(ipaddress.ip_address(address))
    assert named_internal(address) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    "address", ["10.0.0.5", "192.168.1.1", "172.16.0.1", "8.8.8.8", "2001:db8::1", "fd00::1"]
)
def test_private_and_public_addresses_are_not_internal(address: str) -> None:
    """Private networks are the policy's to govern by name: an agent's internal API."""
    assert not destinations.internal(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("host", "named"),
    [("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"), ("localhost", "127.0.0.1"),
     ("LOCALHOST.", "127.0.0.1"), ("api.localhost", "127.0.0.1"), ("169.254.169.254", "169.254.169.254"),
     ("127.0.0.1.", "127.0.0.1"),  # as the ledger records it (classify strips the dot)
     ("api.openai.com", None), ("10.0.0.5", None), ("localhost.example.com", None),
     ("127.1", None), ("2130706433", None)],  # numbers only getaddrinfo reads: at the connect
)  # fmt: skip
def test_a_host_that_names_an_internal_address(host: str, named: str | None) -> None:
    found = named_internal(host)
    assert (str(found) if found else None) == named


def test_this_hosts_own_addresses_are_internal_to_it() -> None:
    """Through a proxy on another host, `http://10.0.0.5:8000/` (the proxy host's LAN address,
    a container bridge's) reaches the services it holds on any address, as loopback would.
    Found by asking the routing table, whatever the interfaces; others' addresses are not."""
    own = own_address()
    assert destinations.on_this_host(own)
    assert destinations.internal(own) is None  # on this host only: not a category of address
    assert destinations.internal_here(own) == "one of its own addresses"
    assert named_internal(str(own)) == own
    assert destinations.on_this_host(ipaddress.ip_address("127.0.0.1"))
    for other in ["198.51.100.7", "10.255.1.2", "2001:db8::7"]:
        assert not destinations.on_this_host(ipaddress.ip_address(other)), other
        assert named_internal(other) is None
    assert "(one of its own addresses)" in destinations.refusal(
        str(own), own, destinations.internal_here(own) or ""
    )


class RoutingAnswer:
    """A UDP socket whose connect the routing table answers as told (or refuses)."""

    def __init__(self, source: str | None = None, error: int | None = None) -> None:
        self.source, self.error = source, error

    def __call__(self, family: int, kind: int) -> RoutingAnswer:
        return self

    def __enter__(self) -> RoutingAnswer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def connect(self, address: tuple[str, int]) -> None:
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))

    def getsockname(self) -> tuple[str, int]:
        assert self.source is not None
        return (self.source, 40000)


@pytest.mark.parametrize(
    ("answer", "own"),
    [
        (
            RoutingAnswer(source="127.0.0.1"),
            True,
        ),  # `ip route add local 10.88.0.0/24 dev lo src 127.0.0.1`
        (RoutingAnswer(source="192.0.2.2"), False),  # leaves the host from its LAN address
        (RoutingAnswer(error=errno.ENETUNREACH), False),  # no route: not here
        (RoutingAnswer(error=errno.EACCES), False),  # a broadcast address
        (RoutingAnswer(error=errno.EPERM), True),  # a UDP connect denied: cannot tell, refused
    ],
)
def test_what_the_routing_table_answers(
    monkeypatch: pytest.MonkeyPatch, answer: RoutingAnswer, own: bool
) -> None:
    """A local route whose source is loopback delivers to this host (it passed the check); a
    question the proxy cannot ask is answered yes (it was let through)."""
    monkeypatch.setattr(destinations.socket, "socket", answer)
    assert destinations.on_this_host(ipaddress.ip_address("10.88.0.9")) is own


@pytest.mark.parametrize(("error", "own"), [(errno.EMFILE, True), (errno.EAFNOSUPPORT, False)])
def test_no_socket_to_ask_with(monkeypatch: pytest.MonkeyPatch, error: int, own: bool) -> None:
    """Out of descriptors (a remote client can push the proxy there): refused, not let
    through. No IPv6 on this host: none of its addresses."""

    def no_socket(family: int, kind: int) -> None:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(destinations.socket, "socket", no_socket)
    assert destinations.on_this_host(ipaddress.ip_address("10.88.0.9")) is own


def client(peer: tuple[str, int], own: tuple[str, int]) -> connection.Client:
    made = tflow.tclient_conn()
    made.peername, made.sockname, made.sni = peer, own, None  # a plain-HTTP request's
    return made


@pytest.mark.parametrize(
    ("peer", "own", "same"),
    [(("127.0.0.1", 5000), ("127.0.0.1", 8080), True), (("::1", 5000), ("::1", 8080), True),
     (("::ffff:127.0.0.1", 5000), ("::ffff:127.0.0.1", 8080), True),
     (PROXY, PROXY, True),  # from this host, to one of its own addresses
     (REMOTE, PROXY, False), (("::ffff:203.0.113.7", 1), ("::ffff:192.0.2.10", 8080), False)],
)  # fmt: skip
def test_a_client_on_the_proxys_host(
    peer: tuple[str, int], own: tuple[str, int], same: bool
) -> None:
    assert destinations.same_host(client(peer, own)) is same
    assert destinations.guarded("local", client(peer, own)) is not same
    assert destinations.guarded("deny", client(peer, own))
    assert not destinations.guarded("allow", client(peer, own))


def run(tmp_path: Path, steps: Any, **options: str) -> Path:
    return drive(tmp_path, POLICY, steps, **options)


def request_to(host: str, peer: tuple[str, int]) -> http.HTTPFlow:
    flow = tflow.tflow(
        req=tutils.treq(host=host, port=80, scheme=b"http", method=b"GET", path=b"/x"),
        client_conn=client(peer, PROXY if peer == REMOTE else ("127.0.0.1", 8080)),
    )
    return flow


def test_a_client_on_another_host_is_refused_an_internal_upstream(tmp_path: Path) -> None:
    """In shadow mode too, recorded as the run's denial; the same request from the proxy's
    own host, and a public host from the other, go on."""
    answered: dict[str, Any] = {}

    async def steps(addon: Drawdown) -> None:
        for name, flow in [
            ("remote metadata", request_to("169.254.169.254", REMOTE)),
            ("remote localhost", request_to("localhost", REMOTE)),
            ("remote own address", request_to(str(own_address()), REMOTE)),
            ("local localhost", request_to("localhost", ("127.0.0.1", 5000))),
            ("remote public", request_to("tool.example.com", REMOTE)),
        ]:
            addon.requestheaders(flow)
            await addon.request(flow)
            answered[name] = flow.response.status_code if flow.response else None

    db = run(tmp_path, steps)
    assert answered == {
        "remote metadata": 403,
        "remote localhost": 403,
        "remote own address": 403,
        "local localhost": None,  # forwarded
        "remote public": None,
    }
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT host, decision, reason_code FROM decisions ORDER BY ts")
        assert rows.fetchall() == [
            ("169.254.169.254", "deny", "internal_host"),
            ("localhost", "deny", "internal_host"),
            (str(own_address()), "deny", "internal_host"),
            ("localhost", "allow", None),
            ("tool.example.com", "allow", None),
        ]


def connect(host: str, peer: tuple[str, int]) -> server_hooks.ServerConnectionHookData:
    server = connection.Server(address=(host, 443))
    return server_hooks.ServerConnectionHookData(
        client=client(peer, PROXY if peer == REMOTE else ("127.0.0.1", 8080)), server=server
    )


def test_a_name_that_resolves_to_an_internal_address_is_refused_where_mitmproxy_connects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`metadata.internal` (a name no request check can judge) resolves to the metadata
    address: the connection is killed before it is made. A public name is connected to at
    the address checked (a second lookup could answer otherwise: DNS rebinding), TLS still
    naming the host, and is named by its host again once connected, so mitmproxy reuses it."""
    table = {
        "metadata.internal": ["169.254.169.254"],
        "rebinding.example": ["93.184.216.34", "127.0.0.1"],
        "api.example.com": ["93.184.216.34"],
        "lan.example": [str(own_address())],
        "imds6.example": ["fd00:ec2::254"],
    }

    async def resolve(host: str, port: int) -> list[Any]:
        if host not in table:
            raise OSError("no such name")
        return [ipaddress.ip_address(a) for a in table[host]]

    monkeypatch.setattr(destinations, "resolve", resolve)
    seen: dict[str, Any] = {}

    async def steps(addon: Drawdown) -> None:
        for name in [
            "metadata.internal", "rebinding.example", "unknown.example", "lan.example", "imds6.example"
        ]:  # fmt: skip
            data = connect(name, REMOTE)
            await addon.server_connect(data)
            seen[name] = data.server.error
        data = connect("metadata.internal", ("127.0.0.1", 5000))
        await addon.server_connect(data)
        seen["local"] = data.server.error, data.server.address
        data = connect("api.example.com", REMOTE)
        await addon.server_connect(data)
        seen["pinned"] = data.server.address, data.server.sni, data.server.error
        data.server.state = connection.ConnectionState.OPEN  # as mitmproxy has it by then
        addon.server_connected(data)
        seen["connected"] = data.server.address

    run(tmp_path, steps)
    assert "169.254.169.254" in seen["metadata.internal"]
    assert "an address on the proxy's own host" in seen["metadata.internal"]
    assert "127.0.0.1" in seen["rebinding.example"]  # any of its addresses
    assert "cannot resolve unknown.example" in seen["unknown.example"]  # not looked up again
    assert "(one of its own addresses)" in seen["lan.example"]
    assert (
        "(fd00:ec2::254) is an address on the proxy's own host (its cloud's instance"
        in (seen["imds6.example"])
    )
    assert seen["local"] == (None, ("metadata.internal", 443))  # untouched
    assert seen["pinned"] == (("93.184.216.34", 443), "api.example.com", None)
    assert seen["connected"] == ("api.example.com", 443)


def test_a_name_whose_lookup_fails_is_refused_not_looked_up_again_by_mitmproxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker's name server answers drawdown's lookup with SERVFAIL (or too slowly), then
    mitmproxy's own with 127.0.0.1: left to mitmproxy, the connection would reach the proxy's
    host unchecked. It is refused where drawdown's lookup fails."""
    answers = iter([OSError("Temporary failure in name resolution"), "127.0.0.1"])

    async def resolve(host: str, port: int) -> list[Any]:
        answer = next(answers)
        if isinstance(answer, OSError):
            raise answer
        return [ipaddress.ip_address(answer)]

    monkeypatch.setattr(destinations, "resolve", resolve)
    seen: dict[str, Any] = {}

    async def steps(addon: Drawdown) -> None:
        data = connect("rebind.attacker.example", REMOTE)
        await addon.server_connect(data)
        seen["error"], seen["address"] = data.server.error, data.server.address

    run(tmp_path, steps)
    assert seen["error"] is not None, "left to mitmproxy's own lookup"
    assert "cannot resolve rebind.attacker.example" in seen["error"]
    assert "Temporary failure" in seen["error"]
    assert seen["address"] == ("rebind.attacker.example", 443)


@pytest.mark.parametrize("host", ["93.184.216.34%eth0", "[93.184.216.34]"])
def test_a_literal_the_resolver_reads_as_a_name_is_connected_to_at_the_address_checked(
    tmp_path: Path, host: str
) -> None:
    """`93.184.216.34%eth0` is checked as 93.184.216.34, but getaddrinfo reads it as a name,
    which a name server could answer with 127.0.0.1: the connection goes to the address
    checked, and is named as the client named it once connected."""
    seen: dict[str, Any] = {}

    async def steps(addon: Drawdown) -> None:
        data = connect(host, REMOTE)
        await addon.server_connect(data)
        seen["pinned"] = data.server.error, data.server.address
        data.server.state = connection.ConnectionState.OPEN
        addon.server_connected(data)
        seen["connected"] = data.server.address

    run(tmp_path, steps)
    assert seen["pinned"] == (None, ("93.184.216.34", 443))
    assert seen["connected"] == (host, 443)


def test_the_operators_upstream_proxy_is_no_internal_upstream(tmp_path: Path) -> None:
    """`--mode upstream:http://127.0.0.1:3128` (a Squid beside the proxy): every request goes
    through it, and it resolves their names; refusing it refused every request. Another
    loopback address is still refused under that mode."""
    errors: dict[str, Any] = {}

    async def steps(addon: Drawdown) -> None:
        ctx.options.update(drawdown_internal_hosts="deny")
        for name, address in [("upstream", 3128), ("other", 6333)]:
            data = connect("127.0.0.1", REMOTE)
            data.client.proxy_mode = mode_specs.ProxyMode.parse("upstream:http://127.0.0.1:3128")
            data.server.address = ("127.0.0.1", address)
            await addon.server_connect(data)
            errors[name] = data.server.error

    run(tmp_path, steps)
    assert errors["upstream"] is None
    assert errors["other"] is not None and "127.0.0.1" in errors["other"]


def test_allow_leaves_every_upstream_alone_and_deny_guards_local_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def resolve(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(destinations, "resolve", resolve)
    errors: dict[str, Any] = {}

    async def steps(addon: Drawdown) -> None:
        for mode, peer in [("allow", REMOTE), ("deny", ("127.0.0.1", 5000))]:
            ctx.options.update(drawdown_internal_hosts=mode)
            data = connect("db.internal", peer)
            await addon.server_connect(data)
            errors[mode] = data.server.error

    run(tmp_path, steps)
    assert errors["allow"] is None
    assert errors["deny"] is not None and "127.0.0.1" in errors["deny"]


def test_a_mode_that_is_not_one_is_refused(tmp_path: Path) -> None:
    addon = Drawdown()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(tmp_path / "l.db"))
        with pytest.raises(exceptions.OptionsError, match="must be one of local, deny, allow"):
            tctx.configure(addon, drawdown_internal_hosts="remote")
        addon.done()


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f000001", "localhost"])
def test_numbers_the_resolver_reads_as_loopback_are_found_at_the_connect(host: str) -> None:
    """glibc's getaddrinfo reads `127.1` and `2130706433` as 127.0.0.1, which ipaddress does
    not: the request's own check passes them, the connect's finds them (no network needed)."""
    found = asyncio.run(destinations.resolve(host, 80))
    assert found and all(destinations.internal(address) for address in found), found
