"""The SQLite ledger: reserve is check-then-apply across every instance, settle exactly once."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest

from drawdown.ledger.api import Amount, Claim, Completion, DecisionRow, LedgerError, LedgerTooNew
from drawdown.ledger.sqlite import SQLiteLedger

NOW = 1_700_000_000.0


def row(request_id: str | None = None, decision: str = "allow") -> DecisionRow:
    return DecisionRow(
        request_id=request_id or uuid.uuid4().hex, ts=NOW, decision=decision, mode="enforce", scope="agent:a/run:r1",
        agent="a", run="r1", action="llm",
    )


def claim(budget: str = "run", scope: str = "agent:a/run:r1", usd: int | None = None, requests: int | None = None,
          tokens: int | None = None, shadow: bool = False, per: str | None = None) -> Claim:
    return Claim(budget, scope, usd, tokens, requests, per=per, shadow=shadow)


def instance(ledger: SQLiteLedger, budget: str, scope: str) -> dict:
    cur = ledger.conn.execute("SELECT * FROM budget_instances WHERE budget = ? AND scope = ?", (budget, scope))
    names = [c[0] for c in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


@pytest.fixture
def ledger(tmp_path: Path) -> SQLiteLedger:
    db = SQLiteLedger(tmp_path / "ledger.db")
    yield db
    db.close()


def test_reserve_holds_on_every_matching_instance(ledger: SQLiteLedger) -> None:
    claims = [claim("run", usd=1000), claim("agent", "agent:a", usd=5000), claim("tenant", "tenant:t", requests=10)]
    outcome = ledger.reserve(row(), claims, Amount(usd=300, tokens=50, requests=1), NOW + 900)
    assert outcome.decision == "allow" and outcome.hold_id is not None
    for budget, scope in (("run", "agent:a/run:r1"), ("agent", "agent:a"), ("tenant", "tenant:t")):
        got = instance(ledger, budget, scope)
        assert (got["reserved_usd"], got["reserved_tokens"], got["reserved_requests"]) == (300, 50, 1)
        assert got["spent_usd"] == 0


def test_reserve_is_all_or_nothing(ledger: SQLiteLedger) -> None:
    claims = [claim("run", usd=1000), claim("agent", "agent:a", usd=200)]
    r = row()
    outcome = ledger.reserve(r, claims, Amount(usd=300, requests=1), NOW + 900)
    assert outcome.decision == "deny" and outcome.hold_id is None
    (short,) = outcome.shortfalls
    assert (short.claim.budget, short.unit, short.limit, short.needed) == ("agent", "usd", 200, 300)
    # The run instance, which had room, holds nothing: the check came before any apply.
    assert instance(ledger, "run", "agent:a/run:r1")["reserved_usd"] == 0
    assert ledger.conn.execute("SELECT COUNT(*) FROM holds").fetchone()[0] == 0
    decision = ledger.conn.execute("SELECT decision, reason_code, budget FROM decisions WHERE request_id = ?", (r.request_id,)).fetchone()
    assert decision == ("deny", "budget_exhausted", "agent:a")


def test_limit_is_inclusive_and_counts_holds(ledger: SQLiteLedger) -> None:
    claims = [claim(requests=2)]
    first = ledger.reserve(row(), claims, Amount(requests=1), NOW + 900)
    second = ledger.reserve(row(), claims, Amount(requests=1), NOW + 900)
    third = ledger.reserve(row(), claims, Amount(requests=1), NOW + 900)
    assert [first.decision, second.decision, third.decision] == ["allow", "allow", "deny"]
    assert third.shortfalls[0].reserved == 2  # held, not yet spent, still counts


def test_commit_charges_actual_and_releases_hold_exactly_once(ledger: SQLiteLedger) -> None:
    r = row()
    outcome = ledger.reserve(r, [claim(usd=1000, tokens=10_000, requests=5)], Amount(usd=400, tokens=900, requests=1), NOW + 900)
    done = Completion(actual=Amount(usd=120, tokens=210, requests=1), status=200, tokens_in=200, tokens_out=10, usage_source="usage")
    first = ledger.commit(r.request_id, outcome.hold_id, done, NOW + 1)
    again = ledger.commit(r.request_id, outcome.hold_id, done, NOW + 2)
    late_release = ledger.release(r.request_id, outcome.hold_id, Completion(), "late", NOW + 3)
    assert (first.applied, again.applied, late_release.applied) == (True, False, False)
    got = instance(ledger, "run", "agent:a/run:r1")
    assert (got["spent_usd"], got["spent_tokens"], got["spent_requests"]) == (120, 210, 1)
    assert (got["reserved_usd"], got["reserved_tokens"], got["reserved_requests"]) == (0, 0, 0)
    decision = ledger.conn.execute(
        "SELECT status, actual_usd, tokens_in, tokens_out, usage_source FROM decisions WHERE request_id = ?", (r.request_id,)
    ).fetchone()
    assert decision == (200, 120, 200, 10, "usage")


def test_release_returns_the_estimate(ledger: SQLiteLedger) -> None:
    r = row()
    outcome = ledger.reserve(r, [claim(usd=1000)], Amount(usd=700, requests=1), NOW + 900)
    assert ledger.reserve(row(), [claim(usd=1000)], Amount(usd=700, requests=1), NOW + 900).decision == "deny"
    assert ledger.release(r.request_id, outcome.hold_id, Completion(status=500), "upstream answered 500", NOW).applied
    assert ledger.reserve(row(), [claim(usd=1000)], Amount(usd=700, requests=1), NOW + 900).decision == "allow"
    state, reason = ledger.conn.execute("SELECT state, settle_reason FROM holds WHERE id = ?", (outcome.hold_id,)).fetchone()
    assert (state, reason) == ("released", "upstream answered 500")


def test_overage_is_charged_recorded_and_closes_the_instance(ledger: SQLiteLedger) -> None:
    r = row()
    outcome = ledger.reserve(r, [claim(usd=1000)], Amount(usd=600, requests=1), NOW + 900)
    settled = ledger.commit(r.request_id, outcome.hold_id, Completion(actual=Amount(usd=1500, requests=1)), NOW)
    assert settled.overage
    assert instance(ledger, "run", "agent:a/run:r1")["spent_usd"] == 1500  # the money was spent
    assert ledger.conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'overage'").fetchone()[0] == 1
    zero_cost = ledger.reserve(row(), [claim(usd=1000)], Amount(usd=0, requests=1), NOW + 900)
    assert zero_cost.decision == "deny"  # over its limit: closed to new reserves


def test_shadow_claims_record_would_deny_and_still_hold(ledger: SQLiteLedger) -> None:
    outcome = ledger.reserve(row(), [claim(usd=100, shadow=True)], Amount(usd=300, requests=1), NOW + 900)
    assert outcome.decision == "would_deny" and outcome.hold_id is not None
    assert outcome.shadow_shortfalls[0].unit == "usd"
    assert instance(ledger, "run", "agent:a/run:r1")["reserved_usd"] == 300


def test_enforced_shortfall_wins_over_shadow(ledger: SQLiteLedger) -> None:
    claims = [claim("shadow", usd=100, shadow=True), claim("hard", requests=0)]
    assert ledger.reserve(row(), claims, Amount(usd=300, requests=1), NOW + 900).decision == "deny"


def test_new_limits_from_a_reloaded_policy_apply(ledger: SQLiteLedger) -> None:
    assert ledger.reserve(row(), [claim(requests=1)], Amount(requests=1), NOW + 900).decision == "allow"
    assert ledger.reserve(row(), [claim(requests=1)], Amount(requests=1), NOW + 900).decision == "deny"
    assert ledger.reserve(row(), [claim(requests=3)], Amount(requests=1), NOW + 900).decision == "allow"
    assert instance(ledger, "run", "agent:a/run:r1")["limit_requests"] == 3


def test_windows_are_separate_instances(ledger: SQLiteLedger) -> None:
    hour1 = Claim("h", "agent:a", None, None, 1, per="hour", window_start=3600, window_end=7200)
    hour2 = Claim("h", "agent:a", None, None, 1, per="hour", window_start=7200, window_end=10800)
    assert ledger.reserve(row(), [hour1], Amount(requests=1), NOW + 900).decision == "allow"
    assert ledger.reserve(row(), [hour1], Amount(requests=1), NOW + 900).decision == "deny"
    assert ledger.reserve(row(), [hour2], Amount(requests=1), NOW + 900).decision == "allow"


def test_request_id_is_unique(ledger: SQLiteLedger) -> None:
    r = row("same-id")
    ledger.reserve(r, [claim(requests=5)], Amount(requests=1), NOW + 900)
    with pytest.raises(LedgerError):
        ledger.reserve(row("same-id"), [claim(requests=5)], Amount(requests=1), NOW + 900)
    # The failed second reserve left nothing behind.
    assert instance(ledger, "run", "agent:a/run:r1")["reserved_requests"] == 1


def test_sweep_expires_holds_past_ttl_exactly_once(ledger: SQLiteLedger) -> None:
    r = row()
    outcome = ledger.reserve(r, [claim(usd=1000)], Amount(usd=400, requests=1), NOW + 10)
    assert ledger.sweep(NOW + 5, 30) == 0
    assert ledger.sweep(NOW + 11, 30) == 1
    assert ledger.sweep(NOW + 12, 30) == 0
    assert instance(ledger, "run", "agent:a/run:r1")["reserved_usd"] == 0
    # The call finished after all: a late commit charges what was spent, once.
    done = Completion(actual=Amount(usd=90, requests=1), status=200)
    assert ledger.commit(r.request_id, outcome.hold_id, done, NOW + 13).state == "expired"
    assert not ledger.commit(r.request_id, outcome.hold_id, done, NOW + 14).applied
    assert instance(ledger, "run", "agent:a/run:r1")["spent_usd"] == 90


def test_dead_process_holds_are_released_after_its_lease(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    dead = SQLiteLedger(path, process_id="dead")
    dead.heartbeat(NOW)
    dead.reserve(row(), [claim(usd=1000)], Amount(usd=999, requests=1), NOW + 900)
    dead.conn.close()  # crashed: no clean shutdown, its hold stays active
    alive = SQLiteLedger(path, process_id="alive")
    alive.heartbeat(NOW + 20)
    assert alive.sweep(NOW + 20, lease_seconds=30) == 0  # lease still running
    assert alive.sweep(NOW + 31, lease_seconds=30) == 1
    assert instance(alive, "run", "agent:a/run:r1")["reserved_usd"] == 0
    alive.close()


def test_release_mine_on_shutdown(ledger: SQLiteLedger) -> None:
    ledger.reserve(row(), [claim(usd=1000)], Amount(usd=10, requests=1), NOW + 900)
    ledger.reserve(row(), [claim(usd=1000)], Amount(usd=10, requests=1), NOW + 900)
    assert ledger.release_mine(NOW, "proxy shut down") == 2
    assert ledger.conn.execute("SELECT COUNT(*) FROM holds WHERE state = 'active'").fetchone()[0] == 0


def test_extend_keeps_live_holds(ledger: SQLiteLedger) -> None:
    outcome = ledger.reserve(row(), [claim(usd=1000)], Amount(usd=10, requests=1), NOW + 10)
    ledger.extend([outcome.hold_id], NOW + 100)
    assert ledger.sweep(NOW + 50, 30) == 0


def test_batch_isolates_a_failing_operation(ledger: SQLiteLedger) -> None:
    good = row()
    results = ledger.run_batch(
        [
            ("reserve", (good, [claim(requests=5)], Amount(requests=1), NOW + 900)),
            ("commit", ("nope", 424242, Completion(), NOW)),
            ("reserve", (row(), [claim(requests=5)], Amount(requests=1), NOW + 900)),
        ]
    )
    assert results[0].decision == "allow" and isinstance(results[1], LedgerError) and results[2].decision == "allow"
    assert instance(ledger, "run", "agent:a/run:r1")["reserved_requests"] == 2


def test_refuses_a_newer_ledger(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    SQLiteLedger(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(LedgerTooNew):
        SQLiteLedger(path)


def test_unopenable_file_is_a_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError):
        SQLiteLedger(path)


def test_threads_with_separate_connections_never_overspend(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    SQLiteLedger(path).close()
    admitted: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        ledger = SQLiteLedger(path, busy_timeout=30)
        for _ in range(25):
            outcome = ledger.reserve(row(), [claim(usd=37 * 100), claim("agent", "agent:a", requests=1000)], Amount(usd=100, requests=1), NOW + 900)
            if outcome.hold_id is not None:
                with lock:
                    admitted.append(outcome.hold_id)
        ledger.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 37
    check = SQLiteLedger(path)
    assert instance(check, "run", "agent:a/run:r1")["reserved_usd"] == 3700
    assert instance(check, "agent", "agent:a")["reserved_requests"] == 37
    check.close()


def _process_worker(path: str, attempts: int, out: multiprocessing.Queue) -> None:
    ledger = SQLiteLedger(path, busy_timeout=60)
    admitted = 0
    for _ in range(attempts):
        r = row()
        outcome = ledger.reserve(r, [claim(usd=37 * 100)], Amount(usd=100, requests=1), NOW + 900)
        if outcome.hold_id is not None:
            admitted += 1
            ledger.commit(r.request_id, outcome.hold_id, Completion(actual=Amount(usd=100, requests=1)), NOW)
    ledger.close()
    out.put(admitted)


def test_processes_sharing_one_file_never_overspend(tmp_path: Path) -> None:
    path = str(tmp_path / "procs.db")
    SQLiteLedger(path).close()
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(path, 50, out)) for _ in range(4)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert total == 37
    check = SQLiteLedger(path)
    got = instance(check, "run", "agent:a/run:r1")
    assert (got["spent_usd"], got["reserved_usd"]) == (3700, 0)
    committed = check.conn.execute("SELECT COUNT(*), SUM(actual_usd) FROM holds WHERE state = 'committed'").fetchone()
    assert committed == (37, 3700)
    assert check.conn.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 200
    check.close()
