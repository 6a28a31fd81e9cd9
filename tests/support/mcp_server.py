"""A real MCP server (the official `mcp` SDK's MCPServer, streamable HTTP) over TLS, for e2e tests.

Serves a small documentation server at https://<host>:<port>/docs/mcp with tools
`search_docs`, `get_page` and `delete_page`; every tool call it actually executes is
logged in `calls`, so tests can prove a denied call never reached it. `get_page` fails
for page "missing" (a tool result with isError) and "withdrawn" (a JSON-RPC error).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from .tls import TlsMaterial

PATH = "/docs/mcp"


class DocsMcpServer:
    def __init__(self, tls: TlsMaterial) -> None:
        self.tls = tls
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        server = MCPServer("docs")

        @server.tool()
        def search_docs(query: str) -> str:
            """Search the documentation."""
            self._note("search_docs", {"query": query})
            return f"3 pages mention {query!r}: intro, budgets, policies"

        @server.tool()
        def get_page(page_id: str) -> str:
            """Read one page."""
            self._note("get_page", {"page_id": page_id})
            if page_id == "missing":  # a tool execution error: a result with isError
                raise ToolError(f"no page {page_id}")
            if page_id == "withdrawn":  # a protocol error: a JSON-RPC error response
                raise MCPError(code=INVALID_PARAMS, message=f"page {page_id} was withdrawn")
            return f"page {page_id}: drawdown reserves before and commits after every call."

        @server.tool()
        def delete_page(page_id: str) -> str:
            """Delete a page (an agent should never be allowed to)."""
            self._note("delete_page", {"page_id": page_id})
            return f"deleted {page_id}"

        # Behind the proxy the Host header is mcp.example.com, not the loopback address.
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        self.app = server.streamable_http_app(
            streamable_http_path=PATH, transport_security=security
        )
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                ssl_certfile=str(tls.server_cert),
                ssl_keyfile=str(tls.server_key),
                log_config=None,
                log_level="warning",
                access_log=False,
                lifespan="on",  # the SDK's session manager runs in the app's lifespan
                ws="none",
                timeout_graceful_shutdown=1,
            )
        )
        self._thread = threading.Thread(target=self._run, name="mcp-docs-server", daemon=True)

    def _note(self, tool: str, arguments: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append((tool, arguments))

    def tools_called(self) -> list[str]:
        with self._lock:
            return [tool for tool, _ in self.calls]

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self._sock.getsockname()[1]}"

    def start(self) -> DocsMcpServer:
        self._thread.start()
        for _ in range(300):
            if self._server.started:
                return self
            threading.Event().wait(0.05)
        raise RuntimeError("MCP server did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
