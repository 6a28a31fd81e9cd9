"""This machine's address beside loopback, for tests of what its own addresses mean."""

from __future__ import annotations

import ipaddress
import socket


def own_address() -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The source this machine would send from toward an address outside it (its LAN
    address), which the routing table answers without a packet sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # TEST-NET-2: routed, never reached
        found = ipaddress.ip_address(probe.getsockname()[0])
    assert not found.is_loopback, "these tests need a network interface beside loopback"
    return found
