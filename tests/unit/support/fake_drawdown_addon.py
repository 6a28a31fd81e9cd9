"""Throwaway mitmproxy addon standing in for drawdown in the harness self-test.

It declares the options `drawdown/mitm.py` takes, prints drawdown's readiness line from
the `running` hook, and prints the proxy-auth user of each request, so the harness can
be checked end to end (SDK -> proxy -> stand-in over TLS) before the real addon exists.
"""

from __future__ import annotations

from mitmproxy import ctx, http


class FakeDrawdown:
    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("drawdown_policy", str, "", "policy path (ignored)")
        loader.add_option("drawdown_db", str, "", "ledger path (ignored)")

    def running(self) -> None:
        host, port = ctx.master.addons.get("proxyserver").listen_addrs()[0][:2]
        print(f"drawdown listening on http://{host}:{port}", flush=True)

    def request(self, flow: http.HTTPFlow) -> None:
        auth = flow.metadata.get("proxyauth")
        user = auth[0] if auth else "-"
        print(
            f"fake-drawdown request {flow.request.method} {flow.request.pretty_url} "
            f"host={flow.request.host} user={user}",
            flush=True,
        )


addons = [FakeDrawdown()]
