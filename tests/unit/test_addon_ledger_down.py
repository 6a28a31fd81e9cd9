"""The addon's hooks when the ledger cannot answer, driven without a proxy (taddons, tflow)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from drawdown.addon import STATE, Drawdown
from drawdown.ledger.api import LedgerError
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

POLICY = """
mode: shadow
identity:
  agent: [{value: support}]
  run: [{value: r1}]
actions:
  - {kind: crm.read, match: {host: crm.example.com, method: GET}}
  - {kind: refund.issue, match: {host: crm.example.com, method: POST}}
authority:
  default: allow
  rules:
    - {scope: "*", action: refund.issue, requires: [crm.read]}
"""


def refund() -> http.HTTPFlow:
    request = tutils.treq(
        host="crm.example.com", port=443, scheme=b"https", method=b"POST", path=b"/refunds",
        headers=http.Headers(((b"content-type", b"application/json"),)), content=b'{"amount": 5}',
    )  # fmt: skip
    return tflow.tflow(req=request)


def test_a_request_forwarded_unaccounted_after_a_failed_lookup_is_not_reserved_too(
    tmp_path: Path,
) -> None:
    """`requires` looks the run's history up in the ledger. When that failed under shadow mode
    (or `on_ledger_error: allow`), the request was forwarded unaccounted, and yet went on to
    reserve: with the ledger back by then, it got a hold that nothing settled (the call counted
    as settled already), which lapsed uncharged at its TTL."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    asked: list[str] = []

    async def main() -> tuple[http.HTTPFlow, Drawdown]:
        addon = Drawdown()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(tmp_path / "l.db"))
            ledger = addon.ledger
            assert ledger is not None
            passed_on = ledger.call

            async def call(name: str, *args: Any) -> Any:
                asked.append(name)
                if name == "history":  # the lookup fails; the ledger is back right after
                    raise LedgerError("ledger unavailable: database is locked")
                return await passed_on(name, *args)

            ledger.call = call  # type: ignore[method-assign]
            flow = refund()
            addon.requestheaders(flow)
            await addon.request(flow)
            flow.response = tutils.tresp()
            await addon.response(flow)
            addon.done()
            return flow, addon

    flow, addon = asyncio.run(main())
    assert flow.response is not None and flow.response.status_code == 200  # forwarded
    assert asked == ["history"]  # nothing reserved behind the failed lookup
    assert flow.metadata[STATE].hold_id is None
    assert addon.inflight == {}
