"""What a CONNECT tunnel may carry: TLS or HTTP, which drawdown reads, and nothing else.

mitmproxy relays byte for byte (its `rawtcp` option, on by default) a connection whose first
bytes read as neither TLS nor HTTP: a ClientHello whose first byte comes alone or whose record
version is past TLS 1.2's (TLS servers take both), or any other protocol. Every call inside
such a tunnel would pass drawdown unseen: its budgets, its rules, `unknown_hosts: deny`. So
the addon turns rawtcp off, and decides here, before mitmproxy's HTTP reading takes bytes that
can never be HTTP (it would wait for a request line for ever):

- the start of a TLS record: no decision yet, the next read asks again;
- bytes that cannot begin an HTTP request line: refused with a 400, the tunnel closed;
- anything else: mitmproxy's decision stands.

Hosts a user names in mitmproxy's `tcp_hosts`, and those `ignore_hosts`/`allow_hosts` (or
`unknown_hosts: passthrough`) leave alone, are relayed as mitmproxy relays them.
"""

from __future__ import annotations

import logging
import re

from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers.http import HTTPMode

log = logging.getLogger("drawdown")

# A TLS handshake record: content type 22, then a 3.x version.
TLS_RECORD_START = b"\x16\x03"
# An HTTP/1 request line begins with its method, a token (RFC 9110 tchar), then a space; the
# HTTP/2 preface with "PRI ". `$`: the bytes so far may still become one.
_REQUEST_LINE_START = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}(?: |\Z)")
_WHY = b"drawdown: this tunnel carries neither TLS nor HTTP; only what drawdown reads passes\n"
REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_WHY), _WHY)
)


class RefusedTunnel(layer.Layer):
    """Answers the 400 and closes: nothing is opened upstream."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.SendData(self.context.client, REFUSAL)
            yield commands.CloseConnection(self.context.client)


def decide(nextlayer: layer.NextLayer) -> None:
    """The `next_layer` hook's work, after mitmproxy's own decision (see the module's words)."""
    data = nextlayer.data_client()
    if 0 < len(data) < 3 and TLS_RECORD_START.startswith(data):
        nextlayer.layer = None
        return
    chosen = nextlayer.layer
    inside_tunnel = isinstance(chosen, layers.HttpLayer) and chosen.mode is HTTPMode.transparent
    if inside_tunnel and data and not _REQUEST_LINE_START.match(data):
        server = nextlayer.context.server.address
        log.warning(
            "drawdown: refused a tunnel to %s: its first bytes are neither TLS nor HTTP",
            f"{server[0]}:{server[1]}" if server else "an unknown address",
        )
        nextlayer.layer = RefusedTunnel(nextlayer.context)
