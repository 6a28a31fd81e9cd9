"""mitmproxy script for tests: connect to the stand-in instead of the real provider hosts.

Loaded into the proxy under test with `--set scripts=<this file>` (mitmproxy's script
loader). The mapping comes from the DRAWDOWN_TEST_RESOLVE environment variable, JSON:

    {"tls": {"api.openai.com": "127.0.0.1:4431", "*.example.com": "127.0.0.1:4431"},
     "plain": {"*.example.com": "127.0.0.1:8081"}}

Keys are case-insensitive globs on the host the client asked for. Port 80 uses the
"plain" map, every other port the "tls" map.

This works like a hosts file, below mitmproxy: only the TCP connect is redirected.
mitmproxy's view stays exactly as in production: the server connection's `address`,
`flow.request.host`, the Host header and the TLS SNI remain the provider's (so policies
match `host: api.openai.com`, upstream certificate verification checks that name,
which the stand-in's certificate carries, and connections are reused); only the
connection's `peername` shows the stand-in. (Changing `address` in a `server_connect`
hook instead would make requests inside CONNECT tunnels report host 127.0.0.1.)
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
from typing import Any

from mitmproxy.proxy import server as proxy_server

ENV_VAR = "DRAWDOWN_TEST_RESOLVE"


def _parse_target(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class _RedirectingAsyncio:
    """Stands in for the `asyncio` module inside mitmproxy.proxy.server."""

    def __init__(self, resolve: Resolve) -> None:
        self._resolve = resolve

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def open_connection(self, host: Any = None, port: Any = None, **kwargs: Any) -> Any:
        target = self._resolve.target(host, port)
        if target is not None:
            logging.info("test resolve: %s:%s -> %s:%s", host, port, *target)
            host, port = target
        return await asyncio.open_connection(host, port, **kwargs)


class Resolve:
    def __init__(self) -> None:
        raw = json.loads(os.environ.get(ENV_VAR) or "{}")
        self.tls = {k.lower(): _parse_target(v) for k, v in (raw.get("tls") or {}).items()}
        self.plain = {k.lower(): _parse_target(v) for k, v in (raw.get("plain") or {}).items()}

    def target(self, host: Any, port: Any) -> tuple[str, int] | None:
        if not isinstance(host, str) or port is None:
            return None
        table = self.plain if int(port) == 80 else self.tls
        for pattern, target in table.items():
            if fnmatch.fnmatchcase(host.lower(), pattern):
                return target
        return None

    def load(self, loader: Any) -> None:
        proxy_server.asyncio = _RedirectingAsyncio(self)  # type: ignore[assignment]

    def done(self) -> None:
        proxy_server.asyncio = asyncio  # type: ignore[assignment]


addons = [Resolve()]
