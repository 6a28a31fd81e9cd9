"""A stand-in for api.openai.com over TLS: chat completions that always ask for one more tool call.

It answers in OpenAI's real wire format (JSON, or SSE when `stream` is set), with
deterministic usage, so the demo's agent — the official SDK — loops forever unless
something stops it.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy.certs import CertStore


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1/localhost signed by it (mitmproxy's cert machinery)."""
    store = CertStore.from_store(folder, "demo-upstream", 2048)
    entry = store.get_cert(
        "localhost", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert, key = folder / "upstream-cert.pem", folder / "upstream-key.pem"
    cert.write_bytes(entry.cert.to_pem())
    key.write_bytes(
        entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return folder / "demo-upstream-ca-cert.pem", cert, key


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    calls = 0

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(
                404,
                {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}},
            )
            return
        type(self).calls += 1
        time.sleep(0.05)  # a real model takes time to answer; an instant one would look fabricated
        step = sum(1 for m in body.get("messages", []) if m.get("role") == "tool") + 1
        prompt_tokens = 60 + sum(len(json.dumps(m)) for m in body.get("messages", [])) // 4
        completion_tokens = 24
        call = {
            "id": f"call_{step:04d}",
            "type": "function",
            "function": {
                "name": "web_search",
                "arguments": json.dumps({"query": f"more sources, attempt {step}"}),
            },
        }
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        self._send(
            200,
            {
                "id": f"chatcmpl-demo{step:04d}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "gpt-4o-2024-08-06",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [call],
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": "tool_calls",
                    }
                ],
                "usage": usage,
                "system_fingerprint": "fp_demo",
            },
        )

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Upstream:
    def __init__(self, folder: Path) -> None:
        self.ca, cert, key = make_tls_files(folder)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def calls(self) -> int:
        return _Handler.calls

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
