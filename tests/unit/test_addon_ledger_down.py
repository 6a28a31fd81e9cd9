"""The addon's hooks when the ledger cannot answer, driven without a proxy (taddons, tflow)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from drawdown.addon import STATE, Drawdown
from drawdown.ledger import open_ledger
from drawdown.ledger.api import LeaseWatch, LedgerError
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


ENFORCED = """
mode: enforce
identity:
  agent: [{value: support}]
  run: [{value: r1}]
actions:
  - {kind: crm.read, match: {host: crm.example.com, method: GET}}
budgets:
  - {scope: "agent:*", requests: 100}
"""


def lookup() -> http.HTTPFlow:
    return tflow.tflow(req=tutils.treq(host="crm.example.com", port=443, scheme=b"https"))


def probe() -> http.HTTPFlow:
    """An orchestrator's /readyz, addressed to the proxy itself."""
    return tflow.tflow(req=tutils.treq(host="127.0.0.1", port=8080, path=b"/readyz"))


async def call(addon: Drawdown) -> http.HTTPFlow:
    flow = lookup()
    addon.requestheaders(flow)
    await addon.request(flow)
    if flow.response is None:  # forwarded: the upstream answers
        flow.response = tutils.tresp()
        await addon.response(flow)
    return flow


def _backup(db: Path, to: Path) -> None:
    with sqlite3.connect(db) as source, sqlite3.connect(to) as copy:
        source.backup(copy)
    copy.close()
    source.close()


def test_a_ledger_file_deleted_under_the_proxy_is_closed_and_never_made_anew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite goes on writing to the file it opened: with `ledger.db*` deleted, calls kept
    getting 200 with their spend written where no other worker, report or restart would see
    it, and nothing was logged. The maintenance tick now sees the path no longer names the
    open file: one error, the ledger closed, calls refused per on_ledger_error, /readyz not
    ready; nothing is made at the path (a new file would start every budget unspent), and the
    file put back is reopened."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(ENFORCED)
    db, kept = tmp_path / "l.db", tmp_path / "kept.db"

    async def main() -> None:
        addon = Drawdown()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(db))
            addon.own_addresses = frozenset({("127.0.0.1", 8080)})
            assert (await call(addon)).response.status_code == 200  # type: ignore[union-attr]
            ledger = addon.ledger
            assert ledger is not None
            assert not await addon._ledger_file_lost(ledger)  # still there: nothing happens
            _backup(db, kept)
            for path in tmp_path.glob("l.db*"):
                path.unlink()
            assert await addon._ledger_file_lost(ledger)
            assert addon.ledger is None
            refused = await call(addon)
            assert refused.response is not None and refused.response.status_code == 503
            assert f"ledger {db} was deleted" in refused.response.text
            ready = probe()
            addon.requestheaders(ready)
            assert ready.response is not None and ready.response.status_code == 503
            assert "was deleted under the proxy" in ready.response.text
            await asyncio.to_thread(addon._reopen_ledger)  # the next tick's attempt
            assert addon.ledger is None and not db.exists()
            kept.rename(db)  # the operator puts it back
            await asyncio.to_thread(addon._reopen_ledger)
            assert addon.ledger is not None and addon.ledger_lost is None
            assert (await call(addon)).response.status_code == 200  # type: ignore[union-attr]
            addon.done()

    with caplog.at_level(logging.INFO, logger="drawdown"):
        asyncio.run(main())
    lost = [r for r in caplog.records if "under the running proxy" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.ERROR
    assert "is available again (it was deleted" in caplog.text
    with sqlite3.connect(db) as ledger:  # the file put back has both calls, one refusal
        rows = ledger.execute("SELECT decision, COUNT(*) FROM decisions GROUP BY 1").fetchall()
    assert sorted(rows) == [("allow", 2)]


def test_a_ledger_file_replaced_under_the_proxy_is_closed_with_its_holds(tmp_path: Path) -> None:
    """Another file at the path (a second proxy made one after a delete, a restore): the
    holds of the calls in flight are in the old file, and their ids name other holds in the
    new one, so they are settled in neither."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(ENFORCED)
    db, other = tmp_path / "l.db", tmp_path / "other.db"

    async def main() -> None:
        addon = Drawdown()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(db))
            flow = lookup()
            addon.requestheaders(flow)
            await addon.request(flow)  # in flight: held, not yet answered
            assert flow.metadata[STATE].hold_id is not None
            _backup(db, other)
            other.replace(db)
            ledger = addon.ledger
            assert ledger is not None and await addon._ledger_file_lost(ledger)
            assert addon.ledger_lost == "replaced by another file"
            assert flow.metadata[STATE].hold_id is None
            await asyncio.to_thread(addon._reopen_ledger)  # a file is there: it is reopened
            assert addon.ledger is not None
            flow.response = tutils.tresp()
            await addon.response(flow)
            assert addon.inflight == {} and addon.unsettled == {}
            addon.done()

    asyncio.run(main())
    with sqlite3.connect(db) as ledger:  # the copy's hold of that call was never settled here
        states = ledger.execute("SELECT state FROM holds").fetchall()
    ledger.close()
    assert states == [("active",)]
    # ...but its lease, heartbeaten no more, lapses: any live proxy's sweeper returns it,
    # one lease after it first saw that heartbeat (measured on the sweeper's own clock).
    clock = [0.0]
    sweeper = open_ledger(str(db), leases=LeaseWatch(lambda: clock[0]))
    assert sweeper.sweep(time.time(), 30) == 0
    clock[0] = 30.0
    assert sweeper.sweep(time.time(), 30) == 1
    sweeper.close()


def test_a_ledger_that_comes_up_as_no_ledger_is_said_once_not_retried_in_silence(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger unreachable at start (its server not up yet, here its folder not there) is
    tried again each tick. When it comes up as another application's database, each attempt
    was refused in silence: 503s for ever, and no word why. It is said once, and still looked
    at each tick. (A folder stands at the path at start: SQLite cannot open it.)"""
    policy = tmp_path / "policy.yaml"
    policy.write_text(ENFORCED)
    db = tmp_path / "app.db"
    db.mkdir()

    async def main() -> None:
        addon = Drawdown()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(db))
            addon.own_addresses = frozenset({("127.0.0.1", 8080)})
            assert addon.ledger is None  # unavailable: the proxy stays up
            db.rmdir()
            with sqlite3.connect(db) as conn:
                conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
            conn.close()
            for _ in range(3):
                await asyncio.to_thread(addon._reopen_ledger)
            assert addon.ledger is None
            refused = await call(addon)
            assert refused.response is not None and refused.response.status_code == 503
            addon.done()

    with caplog.at_level(logging.INFO, logger="drawdown"):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if "is not a drawdown ledger" in r.getMessage()]
    assert len(said) == 1 and "(users)" in said[0] and said[0].endswith("until it is")
    with sqlite3.connect(db) as conn:  # left as it was
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]
    conn.close()
