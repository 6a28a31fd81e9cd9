"""A request mitmproxy cannot parse: the bytes it quotes in the proxy log, at the default
verbosity, hold none of the client's secrets (README, Guarantees 5)."""

from __future__ import annotations

import secrets
import socket
import ssl
import time
from collections.abc import Callable

import pytest

from tests.support.proxy import DrawdownProcess

Factory = Callable[..., DrawdownProcess]
POLICY = """
unknown_hosts: allow
identity:
  agent: [{value: a1}]
  run: [{header: X-Drawdown-Run}, {value: r1}]
actions:
  - {kind: llm, provider: gemini, match: {host: generativelanguage.googleapis.com}}
  - {kind: crm.read, match: {host: crm.example.com, method: GET}, cost: {usd: 0.002}}
"""


def _send(proxy: DrawdownProcess, data: bytes, tls_host: str | None = None) -> bytes:
    sock: socket.socket = socket.create_connection(proxy.address, timeout=30)
    try:
        if tls_host:
            sock.sendall(
                f"CONNECT {tls_host}:443 HTTP/1.1\r\nHost: {tls_host}:443\r\n\r\n".encode()
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock = proxy.ssl_context().wrap_socket(sock, server_hostname=tls_host)
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer
    except (OSError, ssl.SSLError):
        return b""
    finally:
        sock.close()


@pytest.mark.parametrize("mode", ["run", "mitmdump"])
def test_a_request_mitmproxy_cannot_parse_leaves_no_secret_in_the_log(
    drawdown_proxy: Factory, mode: str
) -> None:
    secret = f"CNRY{secrets.token_hex(12)}"
    proxy = drawdown_proxy(POLICY, mode=mode)
    gemini = "generativelanguage.googleapis.com"
    sent = [
        (f"GET http://crm.example.com/api/c5?api_key={secret}1 x HTTP/1.1\r\n"
         "Host: crm.example.com\r\n\r\n", None),
        (f"GET /v1beta/models?key={secret}2 x HTTP/1.1\r\nHost: {gemini}\r\n\r\n", gemini),
        (f"GET http://u:{secret}3@crm.example.com/api/c6 HTTP/1.1\r\nHost: crm.example.com\r\n\r\n",
         None),
        (f"GET /v1beta/models HTTP/1.1\r\nHost: {gemini}\r\nx-goog-api-key: {secret}4\r\n"
         f"broken header {secret}5\r\n\r\n", gemini),
    ]  # fmt: skip
    for data, tls_host in sent:
        assert _send(proxy, data.encode(), tls_host).startswith(b"HTTP/1.1 400"), data
    deadline = time.monotonic() + 10

    def logged(log: str) -> bool:  # mitmproxy logs each as its connection ends, in any order
        return log.count("Bad HTTP request line") >= 3 and "Invalid header line" in log

    while not logged(proxy.log_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = proxy.log_text()
    assert log.count("Bad HTTP request line") == 3 and "Invalid header line" in log, log
    assert secret not in log and secret[-12:] not in log, log
    assert "b'GET /v1beta/models?key=[redacted] [redacted] HTTP/1.1'" in log, log
    assert "b'GET http://u:[redacted]@crm.example.com/api/c6 HTTP/1.1'" in log, log
    assert "Invalid header line: b'broken [redacted]'" in log, log
