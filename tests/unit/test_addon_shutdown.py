"""The addon's `done` hook with a reserve still queued for the ledger's writer (taddons, tflow)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

from drawdown.addon import Drawdown
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

POLICY = """
identity:
  agent: [{value: support}]
  run: [{value: r1}]
actions:
  - {kind: crm.read, match: {host: crm.example.com, method: GET}}
"""


def lookup() -> http.HTTPFlow:
    request = tutils.treq(
        host="crm.example.com", port=443, scheme=b"https", method=b"GET", path=b"/c/1"
    )
    return tflow.tflow(req=request)


def test_a_reserve_still_queued_at_shutdown_lands_before_the_holds_are_released(
    tmp_path: Path,
) -> None:
    """A drain that gives up leaves a reserve queued behind a busy writer. `done` released this
    process's holds straight away, beside the writer: the reserve then landed after the release,
    and its hold stayed active, to lapse with the lease instead of being released."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    db = tmp_path / "l.db"
    order: list[str] = []
    writer_busy = threading.Event()
    go_on = threading.Event()

    async def main() -> None:
        addon = Drawdown()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(db))
            assert addon.ledger is not None
            ledger = addon.ledger.ledger
            run_batch, release_mine = ledger.run_batch, ledger.release_mine

            def slow_batch(calls: Any) -> Any:
                names = [name for name, _ in calls]
                if "reserve" in names:
                    writer_busy.set()
                    go_on.wait(5)  # a writer held up (a long batch, a locked database)
                results = run_batch(calls)
                order.extend(names)
                return results

            def recorded_release(*args: Any) -> int:
                order.append("release_mine")
                return release_mine(*args)

            ledger.run_batch = slow_batch
            ledger.release_mine = recorded_release
            flow = lookup()
            addon.requestheaders(flow)
            deciding = asyncio.ensure_future(addon.request(flow))
            while not writer_busy.is_set():
                await asyncio.sleep(0.01)
            threading.Timer(0.3, go_on.set).start()  # the writer gets on while `done` runs
            addon.done()  # the drain gave up: the process stops with the reserve queued
            deciding.cancel()

    asyncio.run(main())
    assert order.index("reserve") < order.index("release_mine")
    with sqlite3.connect(db) as conn:
        states = [state for (state,) in conn.execute("SELECT state FROM holds")]
    assert states == ["released"]
