"""A CONNECT tunnel drawdown cannot read is refused, not relayed.

mitmproxy relays byte for byte (its `rawtcp`, on by default) a connection whose first bytes
read as neither TLS nor HTTP. An agent that trusts the provider's own CA could shape its
ClientHello so (its first byte written alone, or a record version byte past TLS 1.2's: TLS
servers take both) and talk to the provider end to end, past every budget and rule. Through a
real `drawdown run`: both shapes, and another protocol, get drawdown's HTTP 400 and reach
nothing upstream; the same call sent plainly is refused by the policy."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable

import pytest

from tests.support.proxy import DrawdownProcess
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]
POLICY = """
identity:
  run: [{header: X-Drawdown-Run}, {value: none}]
unknown_hosts: deny
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
authority:
  default: allow
  rules:
    - {scope: "*", deny: [llm], when: {json: {model: gpt-4o}}}
"""
HOST = "api.openai.com"
BODY = json.dumps(
    {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
).encode()
REQUEST = (
    f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
    f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
).encode() + BODY


def _tunnel(proxy: DrawdownProcess) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=10)
    sock.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.split(b"\r\n")[0].split()[1] == b"200", head
    return sock


def _read_all(sock: socket.socket) -> bytes:
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return got


def _shaped_tls_call(proxy: DrawdownProcess, shape: str) -> bytes:
    """The call over TLS, the provider's CA trusted as well as drawdown's, the ClientHello's
    first record shaped as `shape` says; what came back, decrypted when TLS held."""
    sock = _tunnel(proxy)
    context = proxy.ssl_context(trust_upstream=True)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=HOST)
    first = True

    def flush() -> None:
        nonlocal first
        data = outgoing.read()
        if data and first:
            first = False
            if shape == "first byte alone":
                sock.sendall(data[:1])
                time.sleep(0.3)  # its own read on the proxy's side
                data = data[1:]
            else:  # "record version 0x0304": OpenSSL takes any 0x03xx on the first record
                data = data[:2] + b"\x04" + data[3:]
        if data:
            sock.sendall(data)

    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                chunk = sock.recv(65536)
                if not chunk:
                    return b""
                incoming.write(chunk)
        flush()
        tls.write(REQUEST)
        flush()
        answer = b""
        while True:
            try:
                if not (data := tls.read(65536)):
                    return answer  # the peer's close_notify
                answer += data
            except ssl.SSLWantReadError:
                chunk = sock.recv(65536)
                if not chunk:
                    return answer
                incoming.write(chunk)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return answer
    except ssl.SSLError as exc:  # the proxy's plain-text 400 is no TLS record
        return f"TLS failed: {exc}".encode() + _read_all(sock)
    finally:
        sock.close()


@pytest.mark.parametrize("shape", ["first byte alone", "record version 0x0304"])
def test_a_tls_handshake_mitmproxy_would_relay_raw_reaches_nothing(
    drawdown_proxy: Factory, standin: StandIn, shape: str
) -> None:
    proxy = drawdown_proxy(POLICY)
    with proxy.http_client() as client:  # the same call, sent plainly: the rule refuses it
        plain = client.post(
            f"https://{HOST}/v1/chat/completions",
            content=BODY,
            headers={"content-type": "application/json"},
        )
    assert plain.status_code == 403
    answer = _shaped_tls_call(proxy, shape)
    # Before: a TLS session with the stand-in itself, which answered the call (200, gpt-4o).
    assert b" 200 " not in answer and b"chat.completion" not in answer, answer[:300]
    assert not standin.requests
    decisions = [row[0] for row in proxy.query("SELECT decision FROM decisions")]
    if shape == "first byte alone":
        # TLS once its record header is whole: intercepted, and refused by the rule like the
        # plain call (before the wait, an HTTP reading of it hung).
        assert answer.startswith(b"HTTP/1.1 403"), answer[:300]
        assert decisions == ["deny", "deny"]
    else:  # no TLS mitmproxy takes, nor HTTP: refused with a plain-text 400, not a TLS record
        assert b"wrong version number" in answer, answer[:300]
        proxy.wait_for_log("refused a tunnel to api.openai.com:443: its first bytes are neither")
        assert decisions == ["deny"]


def test_another_protocol_in_a_tunnel_is_refused_not_relayed(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    sock = _tunnel(proxy)
    sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x00\x01\x0c\x0a\x14" + bytes(range(64)))
    answer = _read_all(sock)
    sock.close()
    # Refused at once (before: the bytes went to the upstream's TLS port, which closed on
    # them, and the tunnel said nothing).
    assert answer.startswith(b"HTTP/1.1 400") and b"neither TLS nor HTTP" in answer, answer
    assert not standin.requests
    assert proxy.query("SELECT COUNT(*) FROM decisions") == [(0,)]
