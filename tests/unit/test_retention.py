"""`drawdown prune` (ledger/retention.py), on both backends: whole quiet runs leave the ledger,
budgets keep what they spent, and `drawdown verify` still adds up."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from drawdown.budgets import window
from drawdown.cli import main
from drawdown.ledger import retention
from drawdown.ledger.api import (
    Amount,
    BatchHold,
    Claim,
    Completion,
    DecisionRow,
    Fact,
    HistoryQuery,
    LedgerError,
)
from drawdown.ledger.integrity import verify
from drawdown.ledger.postgres import PostgresLedger
from drawdown.ledger.reader import Reader
from drawdown.ledger.retention import prune
from drawdown.ledger.sqlite import SQLiteLedger

from tests.support_pg import LedgerBackend

DAY = 86400.0
OLD = 1_700_000_000.0  # the quiet runs' calls
RECENT = OLD + 20 * DAY  # the run still going
CUTOFF = OLD + 10 * DAY
NOW = RECENT + DAY


def decision(run: str, ts: float, outcome: str = "allow") -> DecisionRow:
    """A request of agent `a` in `run` at `ts`, as the proxy would record it."""
    return DecisionRow(
        request_id=uuid.uuid4().hex,
        ts=ts,
        decision=outcome,
        mode="enforce",
        scope=f"agent:a/run:{run}",
        agent="a",
        run=run,
        action="llm",
    )


def call(ledger: Any, run: str, ts: float, claims: list[Claim], usd: int, **extra: Any) -> str:
    """An allowed call in `run` at `ts`, charged `usd` (one request) when it ends."""
    row = decision(run, ts)
    outcome = ledger.reserve(row, claims, Amount(usd=usd * 2, requests=1), ts + 900)
    assert outcome.decision == "allow", outcome
    done = Completion(actual=Amount(usd=usd, requests=1), status=200, **extra)
    ledger.commit(row.request_id, outcome.hold_id, done, ts + 1)
    return row.request_id


def refused(ledger: Any, run: str, ts: float) -> None:
    ledger.record(decision(run, ts, "deny"))


def agent_budget(limit: int) -> Claim:
    return Claim("agent", "agent:a", limit, None, None)


def daily(ts: float) -> Claim:
    start, end = window("day", ts)
    return Claim(
        "daily", "agent:a", 10_000, None, None, per="day", window_start=start, window_end=end
    )


def run_budget(run: str) -> Claim:
    return Claim("run", f"agent:a/run:{run}", 10_000, None, None)


@pytest.fixture
def ledger(backend: LedgerBackend) -> Iterator[Any]:
    db = backend.open()
    yield db
    db.close()


def problems(backend: LedgerBackend) -> list[str]:
    reader = Reader(backend.url)
    try:
        return verify(reader)
    finally:
        reader.close()


def spent(backend: LedgerBackend) -> dict[tuple[str, str, int], int]:
    return {
        (budget, scope, start): usd
        for budget, scope, start, usd in backend.rows(
            "SELECT budget, scope, window_start, spent_usd FROM budget_instances"
        )
    }


def fleet(ledger: Any) -> None:
    """old-1: three calls (one with a fact) and a refusal, long ago; old-2: one call long ago,
    its batch job still held; going: a call long ago and one recent."""
    for usd in (100, 200, 300):
        fact = (Fact("agent:a/run:old-1", "crm.read", "json.id", "c-1"),) if usd == 100 else ()
        call(
            ledger,
            "old-1",
            OLD + usd,
            [agent_budget(5000), daily(OLD), run_budget("old-1")],
            usd,
            facts=fact,
        )
    refused(ledger, "old-1", OLD + 400)
    row = decision("old-2", OLD)
    held = ledger.reserve(row, [run_budget("old-2")], Amount(usd=50, requests=1), OLD + 900)
    keep = Completion(
        actual=Amount(requests=1), status=200, batch=BatchHold("b", keep_until=NOW + DAY)
    )
    ledger.commit(row.request_id, held.hold_id, keep, OLD + 1)
    call(ledger, "going", OLD + 500, [agent_budget(5000), run_budget("going")], 400)
    call(ledger, "going", RECENT, [agent_budget(5000), daily(RECENT), run_budget("going")], 500)


def test_a_prune_deletes_whole_quiet_runs_and_budgets_keep_their_spend(
    backend: LedgerBackend, ledger: Any
) -> None:
    fleet(ledger)
    before = spent(backend)
    assert problems(backend) == []

    done = prune(backend.url, CUTOFF, batch=2, now=NOW)  # 2: every step is several transactions

    runs = backend.rows("SELECT run, COUNT(*) FROM decisions GROUP BY run ORDER BY run")
    assert runs == [("going", 2), ("old-2", 1)]  # old-2: its batch job is still held
    assert (done.runs, done.kept_runs, done.decisions, done.holds, done.facts) == (1, 1, 4, 3, 1)
    assert done.carried["usd"] == 600
    assert backend.scalar("SELECT COUNT(*) FROM facts") == 0
    # The old day window goes (ended, named by no kept hold); every lifetime instance stays,
    # old-1's too, with what it spent: a run id seen again finds its budget spent.
    old_day = ("daily", "agent:a", window("day", OLD)[0])
    after = spent(backend)
    assert old_day not in after and done.windows == 1
    assert after == {key: usd for key, usd in before.items() if key != old_day}
    assert after[("run", "agent:a/run:old-1", 0)] == 600
    assert problems(backend) == []  # spent = kept holds + carried, on every instance

    # The agent budget still refuses what its whole history no longer leaves room for.
    assert after[("agent", "agent:a", 0)] == 1500
    row = decision("new", NOW)
    outcome = ledger.reserve(row, [agent_budget(5000)], Amount(usd=3501, requests=1), NOW + 900)
    assert outcome.decision == "deny"


def test_a_run_still_going_keeps_its_old_calls_and_their_facts(
    backend: LedgerBackend, ledger: Any
) -> None:
    """Its guards read its whole history: step_count would hand back the steps pruned."""
    fact = (Fact("agent:a/run:going", "crm.read", "json.id", "c-9"),)
    call(ledger, "going", OLD, [run_budget("going"), daily(OLD)], 10, facts=fact)
    call(ledger, "going", RECENT, [run_budget("going")], 10)
    done = prune(backend.url, CUTOFF, now=NOW)
    assert (done.runs, done.decisions, done.windows) == (0, 0, 0)  # its hold names the day
    assert backend.scalar("SELECT COUNT(*) FROM decisions") == 2
    asks = [HistoryQuery("agent:a/run:going", ("crm.*",), "json.id", "c-9")]
    assert ledger.history(asks) == [True]


def test_a_dry_run_counts_and_changes_nothing(backend: LedgerBackend, ledger: Any) -> None:
    fleet(ledger)
    tables = ("decisions", "holds", "facts", "budget_instances", "budget_carried")
    counts = {t: backend.scalar(f"SELECT COUNT(*) FROM {t}") for t in tables}
    dry = prune(backend.url, CUTOFF, dry_run=True, now=NOW)
    assert {t: backend.scalar(f"SELECT COUNT(*) FROM {t}") for t in tables} == counts
    done = prune(backend.url, CUTOFF, now=NOW)
    assert (dry.runs, dry.decisions, dry.holds, dry.facts, dry.windows) == (
        done.runs,
        done.decisions,
        done.holds,
        done.facts,
        done.windows,
    )


def test_pruning_twice_carries_on_from_the_first(backend: LedgerBackend, ledger: Any) -> None:
    call(ledger, "r1", OLD, [agent_budget(5000)], 100)
    call(ledger, "live", RECENT, [], 1)  # the newest hold (SQLite keeps that one's run)
    prune(backend.url, CUTOFF, now=NOW)
    call(ledger, "r2", OLD + 15 * DAY, [agent_budget(5000)], 250)
    call(ledger, "live", RECENT + 1, [], 1)
    prune(backend.url, OLD + 18 * DAY, now=NOW)
    assert backend.rows("SELECT DISTINCT run FROM decisions") == [("live",)]
    assert backend.rows("SELECT usd, requests, holds FROM budget_carried") == [(350, 2, 2)]
    assert problems(backend) == []


def test_verify_counts_what_was_carried(backend: LedgerBackend, ledger: Any) -> None:
    """The conservation check reads budget_carried: a carried sum that is off is reported."""
    call(ledger, "r1", OLD, [agent_budget(5000)], 100)
    call(ledger, "live", RECENT, [], 1)
    prune(backend.url, CUTOFF, now=NOW)
    backend.execute("UPDATE budget_carried SET usd = usd + 1")
    assert [p for p in problems(backend) if "spent usd 100 but its holds charged 101" in p]


def test_a_cutoff_in_the_future_is_refused(backend: LedgerBackend, ledger: Any) -> None:
    with pytest.raises(ValueError, match="in the future"):
        prune(backend.url, NOW + 1, now=NOW)


def test_a_new_hold_never_takes_the_id_a_pruned_batch_still_names(
    backend: LedgerBackend, ledger: Any
) -> None:
    """SQLite numbers a hold MAX(id) + 1: with every old run pruned, a new call took the id of
    a pruned batch's hold, which the batch's kept key still named; downloading that batch's
    results again then settled the new call's hold, and its $4,000 were never charged."""
    agent = [agent_budget(10**9)]
    row = decision("old", OLD)
    held = ledger.reserve(row, agent, Amount(usd=1000, requests=1), OLD + 900)
    kept = BatchHold("batch:b1", keep_until=OLD + DAY)
    ledger.commit(
        row.request_id, held.hold_id, Completion(Amount(requests=1), 200, batch=kept), OLD + 1
    )
    results = Completion(
        Amount(usd=700, requests=1), 200, once="file:out1", batch=BatchHold("batch:b1", ended=True)
    )
    read = decision("old", OLD + 100)
    ledger.commit(
        read.request_id,
        ledger.reserve(read, agent, Amount(usd=10, requests=1), OLD + 900).hold_id,
        results,
        OLD + 101,
    )

    prune(backend.url, CUTOFF, now=NOW)

    new = decision("new", NOW)
    in_flight = ledger.reserve(new, agent, Amount(usd=5000, requests=1), NOW + 900).hold_id
    again = decision("other", NOW + 1)  # the old results, downloaded again
    ledger.commit(
        again.request_id,
        ledger.reserve(again, agent, Amount(usd=10, requests=1), NOW + 900).hold_id,
        results,
        NOW + 2,
    )
    settled = ledger.commit(
        new.request_id, in_flight, Completion(Amount(usd=4000, requests=1), 200), NOW + 3
    )
    assert settled.applied and settled.state == "committed"
    assert backend.scalar("SELECT spent_usd FROM budget_instances WHERE budget = 'agent'") == 4700
    assert problems(backend) == []


def test_an_agent_back_within_its_idle_split_is_still_in_its_spent_run(
    backend: LedgerBackend, ledger: Any
) -> None:
    """Prune deleted the idle_runs rows: an agent back two days later under a 7-day
    idle_split got a new run, and with it a fresh run budget."""
    week = 7 * DAY
    first = ledger.idle_run("agent:a", week, "run-1", OLD)
    call(ledger, first, OLD, [Claim("run", f"agent:a/run:{first}", 1000, None, None)], 500)
    back = OLD + 2 * DAY
    prune(backend.url, back - DAY, now=back)
    assert ledger.idle_run("agent:a", week, "run-2", back) == "run-1"


def test_prune_says_why_it_kept_a_quiet_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run kept for holding SQLite's newest hold was said kept "with a batch job still
    held", in a ledger with no batch job at all."""
    db = tmp_path / "ledger.db"
    ledger = SQLiteLedger(db)
    call(ledger, "old-1", OLD, [run_budget("old-1")], 100)
    call(ledger, "old-2", OLD + 100, [run_budget("old-2")], 100)  # the newest hold
    ledger.close()
    assert main(["prune", "--db", str(db), "--older-than", "1d"]) == 0
    out = capsys.readouterr().out
    assert "pruned 1 run(s)" in out and "batch job" not in out
    assert out.endswith(
        "  kept 1 quiet run(s) holding the ledger's newest hold "
        "(SQLite numbers a new hold after it)\n"
    )
    assert main(["prune", "--db", str(db), "--older-than", "1d", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert (done["runs"], done["kept_runs"], done["kept_newest"]) == (0, 1, 1)


def test_prune_gives_examples_of_durations_it_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--older-than abc` was told "a duration like 30m, 24h or 7d", and 30m is refused."""
    db = tmp_path / "ledger.db"
    SQLiteLedger(db).close()
    assert main(["prune", "--db", str(db), "--older-than", "abc"]) == 2
    err = capsys.readouterr().err
    found = re.fullmatch(r"drawdown: --older-than wants a duration like (.+); got 'abc'\n", err)
    assert found, err
    for example in re.split(r", | or ", found.group(1)):
        assert main(["prune", "--db", str(db), "--older-than", example, "--dry-run"]) == 0, example
    capsys.readouterr()


def test_a_run_that_speaks_again_while_it_is_pruned_is_kept_whole(
    backend: LedgerBackend, ledger: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found quiet, then calling again before its rows were deleted: its old calls went, and
    its guards lost the history they count."""
    for i in range(5):
        call(ledger, "long", OLD + i, [], 1)
    found_quiet = retention._quiet_runs

    def quiet_then_resume(*args: Any) -> Any:
        out = found_quiet(*args)
        call(ledger, "long", NOW, [], 1)
        return out

    monkeypatch.setattr(retention, "_quiet_runs", quiet_then_resume)
    done = prune(backend.url, CUTOFF, now=NOW)
    assert done.decisions == 0
    assert backend.scalar("SELECT COUNT(*) FROM decisions WHERE run = 'long'") == 6


def test_a_dry_run_reads_only_and_a_file_that_is_no_ledger_is_refused(
    backend: LedgerBackend, ledger: Any, tmp_path: Path
) -> None:
    """A dry run migrated a v7 ledger to v8 (an older proxy then refused it); an empty file
    was made a ledger."""
    call(ledger, "r1", OLD, [], 1)
    call(ledger, "live", RECENT, [], 1)
    backend.execute("DROP TABLE budget_carried")
    backend.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    assert prune(backend.url, CUTOFF, dry_run=True, now=NOW).decisions == 1
    assert backend.scalar("SELECT value FROM meta WHERE key = 'schema_version'") == "7"
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    for dry_run in (True, False):
        with pytest.raises(LedgerError):
            prune(str(empty), CUTOFF, dry_run=dry_run, now=NOW)
    assert empty.read_bytes() == b""


@pytest.mark.postgres
def test_two_prunes_at_once_carry_each_hold_once(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two crons pruning one PostgreSQL ledger at the same moment both read the same holds:
    each carried their charges, one deleted them, and spent no longer equalled kept + carried.
    A transaction carries what its own DELETE removed."""
    ledger = PostgresLedger(pg_url)
    call(ledger, "old", OLD, [agent_budget(5000)], 100)
    call(ledger, "live", RECENT, [], 1)
    ledger.close()
    both = threading.Barrier(2, timeout=3)
    carry = retention._carry

    def carry_together(*args: Any) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            both.wait()  # the other prune gets as far as it can meanwhile
        carry(*args)

    monkeypatch.setattr(retention, "_carry", carry_together)
    crons = [
        threading.Thread(target=prune, args=(pg_url, CUTOFF), kwargs={"now": NOW}) for _ in range(2)
    ]
    for cron in crons:
        cron.start()
    for cron in crons:
        cron.join(30)
    reader = Reader(pg_url)
    try:
        assert verify(reader) == []
        assert reader.query("SELECT usd, holds FROM budget_carried") == [{"usd": 100, "holds": 1}]
    finally:
        reader.close()


@pytest.mark.postgres
def test_a_database_user_without_delete_is_told_so_in_one_line(pg_url: str) -> None:
    """The README says prune needs DELETE; a user without it got psycopg's traceback."""
    ledger = PostgresLedger(pg_url)
    call(ledger, "old", OLD, [], 1)
    call(ledger, "live", RECENT, [], 1)
    ledger.close()
    role = f"prune_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
        conn.execute(f'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA "{schema}" TO {role}')
    parts = urlsplit(pg_url)
    as_role = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
    try:
        with pytest.raises(LedgerError, match="ledger refused the prune: permission denied"):
            prune(as_role, CUTOFF, now=NOW)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{schema}" FROM {role}')
            conn.execute(f'REVOKE ALL ON SCHEMA "{schema}" FROM {role}')
            conn.execute(f"DROP ROLE {role}")
