"""Upstream addresses on the proxy's own host: what a client on another host may not reach.

Through a forward proxy, `http://127.0.0.1:6333` or `http://169.254.169.254/` means the proxy's
host, never the agent's: its local services, and in a cloud its instance metadata, which hands
out the machine's credentials. An agent that reaches the world only through drawdown would
reach those too. Egress proxies refuse them (Squid's default `to_localhost`, Stripe's
Smokescreen), and so does drawdown, by the option `drawdown_internal_hosts`:

- `local` (default): refused to clients on other hosts; a client on the proxy's own host could
  reach them without it, so it may through it (a stand-in on loopback, the demo).
- `deny`: refused to every client.
- `allow`: never refused.

"Internal" is the loopback, link-local (most clouds' metadata) and unspecified addresses, the
clouds' metadata addresses outside link-local, and the host's own addresses (its LAN address, a
container bridge's), as IPv4, IPv6 or IPv4-mapped IPv6; not private networks, whose hosts the
policy governs by name. A request naming one is refused before it is decided (`internal_host`,
403); a name that resolves to one is refused where mitmproxy connects, and the connection is
made to the address checked, so that a second lookup cannot answer otherwise (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket

from mitmproxy import connection

MODES = ("local", "deny", "allow")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def literal(host: str) -> IPAddress | None:
    """The address a host names itself, or None for a name (`[::1]` and `::1` alike)."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _unmapped(address: IPAddress) -> IPAddress:
    """`::ffff:127.0.0.1` as the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _address_of(endpoint: tuple[str, int] | None) -> IPAddress | None:
    """A connection end's address (a peername, a sockname), or None."""
    found = literal(str(endpoint[0])) if endpoint else None
    return None if found is None else _unmapped(found)


# Instance metadata (credentials, user data) at addresses outside link-local, whose
# 169.254.169.254 the other clouds use: AWS's and Google Cloud's over IPv6, Alibaba Cloud's,
# Azure's WireServer, Oracle Cloud Classic's.
CLOUD_METADATA = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "fd00:ec2::254",
        "fd20:ce::254",
        "100.100.100.200",
        "168.63.129.16",
        "192.0.0.192",
    )
)


def internal(address: IPAddress) -> str | None:
    """What keeps a connection to `address` on the host that makes it, whichever host that is
    (or takes it to its cloud's metadata), or None."""
    address = _unmapped(address)
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address in CLOUD_METADATA:
        return "its cloud's instance metadata"
    return None


# What connecting a UDP socket answers for an address no route leads to (or a broadcast one):
# none of this host's addresses.
_NO_ROUTE = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL,
     errno.EINVAL, errno.EACCES}
)  # fmt: skip


def on_this_host(address: IPAddress) -> bool:
    """One of this host's own addresses, whatever its interfaces: the kernel routes a datagram
    to such an address through loopback, from that same address (or from a loopback one: a
    local route given `src 127.0.0.1`), and a route leaving the host never has a loopback
    source. Connecting a UDP socket asks the routing table only; nothing is sent. When the
    question cannot be asked (no descriptor left, a UDP socket denied) the answer is yes:
    refused, never let through."""
    address = _unmapped(address)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        return exc.errno != errno.EAFNOSUPPORT  # no IPv6 here: none of its addresses
    with probe:
        try:
            probe.connect((str(address), 9))
            source = _address_of(probe.getsockname())
        except OSError as exc:
            return exc.errno not in _NO_ROUTE
    return source is not None and (source == address or source.is_loopback)


def internal_here(address: IPAddress) -> str | None:
    """`internal`, or one of this host's own addresses."""
    if (kind := internal(address)) is not None:
        return kind
    return "one of its own addresses" if on_this_host(address) else None


def named_address(host: str) -> IPAddress | None:
    """The address a host names without a lookup (`127.0.0.1`, `[::1]`, and `localhost`,
    which every resolver keeps on the machine asking), else None: a name."""
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761
        return ipaddress.IPv4Address("127.0.0.1")
    if not name[:1].isdigit() and ":" not in name:
        # A name (every request's, checked cheaply): what it resolves to is checked where
        # mitmproxy connects, as are the numbers getaddrinfo reads and ipaddress does not
        # (`127.1`, `0x7f000001`).
        return None
    return literal(name)  # `127.0.0.1.` too, which the ledger records as 127.0.0.1


def same_host(client: connection.Client) -> bool:
    """The client connected from this host: from a loopback address, or from the address it
    connected to (a connection to one of this host's own addresses comes from that address)."""
    peer = _address_of(client.peername)
    return peer is not None and (peer.is_loopback or peer == _address_of(client.sockname))


def guarded(mode: str, client: connection.Client) -> bool:
    """Whether this client's requests may not reach internal addresses."""
    return mode == "deny" or (mode == "local" and not same_host(client))


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses a connection to `host` would try (the system resolver, off the loop)."""
    if (address := literal(host)) is not None:
        return [address]
    found = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    addresses: list[IPAddress] = []
    for _, _, _, _, sockaddr in found:
        if (address := literal(str(sockaddr[0]))) is not None and address not in addresses:
            addresses.append(address)
    return addresses


def refusal(host: str, address: IPAddress, kind: str) -> str:
    """The refusal of `address` (`host` resolved), `kind` as `internal_here` found it: asked
    once, since whether an address is this host's own costs a routing query."""
    shown = host if literal(host) == address else f"{host} ({address})"
    return (
        f"drawdown: {shown} is an address on the proxy's own host ({kind}), which a client "
        "on another host may not reach through it (drawdown_internal_hosts)"
    )
