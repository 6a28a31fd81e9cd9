"""HTTP/2 on both sides of the proxy: curl, Go and Rust clients speak HTTP/2 to any upstream
that offers it (api.openai.com does), and mitmproxy then speaks it to both the agent and the
upstream. The official openai SDK on an HTTP/2 client, through a real `drawdown run`, to the
stand-in served over TLS with ALPN h2 (hypercorn): JSON and streamed calls are metered exactly
as over HTTP/1.1, and a denial reaches the SDK as its own error."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator

import openai
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config

from tests.conftest import DEFAULT_NAMES
from tests.support.proxy import DrawdownProcess
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]
POLICY = """
identity:
  agent: [{header: X-Drawdown-Agent}]
  run: [{header: X-Drawdown-Run}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*/run:*", requests: 3}
"""
MESSAGES = [{"role": "user", "content": "Say hello over HTTP/2."}]


@pytest.fixture
def h2_upstream(standin: StandIn) -> Iterator[str]:
    """The stand-in's app, served over TLS offering h2 first; yields its host:port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket now
    config.certfile, config.keyfile = str(standin.tls.server_cert), str(standin.tls.server_key)
    config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = config.errorlog = None
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete,
        args=(serve(standin._asgi, config, shutdown_trigger=stop.wait),),  # type: ignore[arg-type]
        daemon=True,
    )
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_http2_both_sides_is_metered_and_enforced(
    drawdown_proxy: Factory, standin: StandIn, h2_upstream: str
) -> None:
    hosts = [n for n in DEFAULT_NAMES if n not in ("localhost", "127.0.0.1", "::1")]
    proxy = drawdown_proxy(POLICY, resolve={"tls": {h: h2_upstream for h in hosts}})
    headers = {"X-Drawdown-Agent": "go-agent", "X-Drawdown-Run": "h2"}
    with proxy.openai_client(max_retries=0, default_headers=headers, http2=True) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        assert raw.http_response.http_version == "HTTP/2"  # the agent's side
        completion = raw.parse()
        streamed = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
        assert "".join(pieces) == completion.choices[0].message.content
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError) as refused:  # the run's 3 requests are spent
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert refused.value.status_code == 402 and "agent:go-agent/run:h2" in refused.value.message
    # The upstream's side: mitmproxy offers the agent h2 only when the upstream chose it.
    assert [e.http_version for e in standin.requests] == ["2", "2", "2"]
    reported = [e.usage for e in standin.requests]
    committed = proxy.query(
        "SELECT tokens_in, tokens_out, usage_source FROM decisions WHERE decision = 'allow' ORDER BY ts"
    )
    assert committed == [(u["prompt_tokens"], u["completion_tokens"], "usage") for u in reported]
    assert proxy.query("SELECT COUNT(*) FROM holds WHERE state = 'active'") == [(0,)]
