"""The ledger, on both backends: reserve is check-then-apply across every instance, settle exactly once.

Every test taking `backend` runs against SQLite and PostgreSQL (marked `postgres`; a
schema of its own per test). The PostgreSQL-only tests at the end cover what only a
networked database has: concurrent migrations, concurrent sweepers, retries, lost
connections and secrets in messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import multiprocessing
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from drawdown.ledger import open_ledger
from drawdown.ledger.api import (
    BATCH_HOLDER,
    SCHEMA_VERSION,
    Amount,
    BatchHold,
    Claim,
    Completion,
    DecisionRow,
    Fact,
    Guards,
    HistoryQuery,
    LeaseWatch,
    LedgerError,
    LedgerTooNew,
    ReserveOutcome,
)
from drawdown.ledger.dsn import redact_dsn
from drawdown.ledger.integrity import verify
from drawdown.ledger.plan import Counts, Plan
from drawdown.ledger.postgres import PostgresLedger
from drawdown.ledger.reader import Reader
from drawdown.ledger.sqlite import SQLiteLedger
from drawdown.ledger.worker import AsyncLedger

from tests.support_pg import LedgerBackend

NOW = 1_700_000_000.0


def row(request_id: str | None = None, decision: str = "allow") -> DecisionRow:
    return DecisionRow(
        request_id=request_id or uuid.uuid4().hex,
        ts=NOW,
        decision=decision,
        mode="enforce",
        scope="agent:a/run:r1",
        agent="a",
        run="r1",
        action="llm",
    )


def claim(
    budget: str = "run",
    scope: str = "agent:a/run:r1",
    usd: int | None = None,
    requests: int | None = None,
    tokens: int | None = None,
    shadow: bool = False,
    per: str | None = None,
    window_end: float | None = None,
) -> Claim:
    return Claim(
        budget, scope, usd, tokens, requests, per=per, shadow=shadow, window_end=window_end
    )


def instance(backend: LedgerBackend, budget: str, scope: str) -> dict[str, Any]:
    (found,) = backend.dicts(
        "SELECT * FROM budget_instances WHERE budget = ? AND scope = ?", budget, scope
    )
    return found


@pytest.fixture
def ledger(backend: LedgerBackend) -> Iterator[Any]:
    db = backend.open()
    yield db
    db.close()


def test_reserve_holds_on_every_matching_instance(backend: LedgerBackend, ledger: Any) -> None:
    claims = [
        claim("run", usd=1000),
        claim("agent", "agent:a", usd=5000),
        claim("tenant", "tenant:t", requests=10),
    ]
    outcome = ledger.reserve(row(), claims, Amount(usd=300, tokens=50, requests=1), NOW + 900)
    assert outcome.decision == "allow" and outcome.hold_id is not None
    for budget, scope in (("run", "agent:a/run:r1"), ("agent", "agent:a"), ("tenant", "tenant:t")):
        got = instance(backend, budget, scope)
        assert (got["reserved_usd"], got["reserved_tokens"], got["reserved_requests"]) == (
            300,
            50,
            1,
        )
        assert got["spent_usd"] == 0


def test_reserve_is_all_or_nothing(backend: LedgerBackend, ledger: Any) -> None:
    claims = [claim("run", usd=1000), claim("agent", "agent:a", usd=200)]
    r = row()
    outcome = ledger.reserve(r, claims, Amount(usd=300, requests=1), NOW + 900)
    assert outcome.decision == "deny" and outcome.hold_id is None
    (short,) = outcome.shortfalls
    assert (short.claim.budget, short.unit, short.limit, short.needed) == ("agent", "usd", 200, 300)
    # The run instance, which had room, holds nothing: the check came before any apply.
    assert instance(backend, "run", "agent:a/run:r1")["reserved_usd"] == 0
    assert backend.scalar("SELECT COUNT(*) FROM holds") == 0
    decision = backend.rows(
        "SELECT decision, reason_code, budget FROM decisions WHERE request_id = ?", r.request_id
    )
    assert decision == [("deny", "budget_exhausted", "agent:a")]
    assert r.decision == "deny" and "agent:a" in (r.reason or "")  # the caller's row says why


def test_a_refusal_says_the_limit_as_written_and_a_call_no_budget_could_take_as_such(
    ledger: Any,
) -> None:
    """A $0.015 limit read "usd 0.02 exhausted" (rounded to cents) while refusing a $0.016
    total; and a lifetime budget smaller than the call said "exhausted" with most of it left,
    as if spending were the reason."""
    spent = row()
    first = ledger.reserve(spent, [claim(usd=15_000_000)], Amount(usd=6_000_000), NOW + 900)
    ledger.commit(spent.request_id, first.hold_id, Completion(actual=Amount(usd=6_000_000)), NOW)
    refused = row()
    ledger.reserve(refused, [claim(usd=15_000_000)], Amount(usd=10_000_000), NOW + 900)
    assert refused.reason == (
        "budget agent:a/run:r1 usd 0.015 exhausted (spent 0.0060, this call needs ≈0.0100)"
    )
    too_big = row()
    ledger.reserve(too_big, [claim("agent", "agent:a", tokens=900)], Amount(tokens=4109), NOW)
    assert too_big.reason == "budget agent:a tokens 900 is less than this call needs (4109)"


def test_limit_is_inclusive_and_counts_holds(ledger: Any) -> None:
    claims = [claim(requests=2)]
    first = ledger.reserve(row(), claims, Amount(requests=1), NOW + 900)
    second = ledger.reserve(row(), claims, Amount(requests=1), NOW + 900)
    third = ledger.reserve(row(), claims, Amount(requests=1), NOW + 900)
    assert [first.decision, second.decision, third.decision] == ["allow", "allow", "deny"]
    assert third.shortfalls[0].reserved == 2  # held, not yet spent, still counts


def test_commit_charges_actual_and_releases_hold_exactly_once(
    backend: LedgerBackend, ledger: Any
) -> None:
    r = row()
    outcome = ledger.reserve(
        r,
        [claim(usd=1000, tokens=10_000, requests=5)],
        Amount(usd=400, tokens=900, requests=1),
        NOW + 900,
    )
    done = Completion(
        actual=Amount(usd=120, tokens=210, requests=1),
        status=200,
        tokens_in=200,
        tokens_out=10,
        usage_source="usage",
    )
    first = ledger.commit(r.request_id, outcome.hold_id, done, NOW + 1)
    again = ledger.commit(r.request_id, outcome.hold_id, done, NOW + 2)
    late_release = ledger.release(r.request_id, outcome.hold_id, Completion(), "late", NOW + 3)
    assert (first.applied, again.applied, late_release.applied) == (True, False, False)
    got = instance(backend, "run", "agent:a/run:r1")
    assert (got["spent_usd"], got["spent_tokens"], got["spent_requests"]) == (120, 210, 1)
    assert (got["reserved_usd"], got["reserved_tokens"], got["reserved_requests"]) == (0, 0, 0)
    decision = backend.rows(
        "SELECT status, actual_usd, tokens_in, tokens_out, usage_source FROM decisions "
        "WHERE request_id = ?",
        r.request_id,
    )
    assert decision == [(200, 120, 200, 10, "usage")]


def test_release_returns_the_estimate(backend: LedgerBackend, ledger: Any) -> None:
    r = row()
    outcome = ledger.reserve(r, [claim(usd=1000)], Amount(usd=700, requests=1), NOW + 900)
    assert (
        ledger.reserve(row(), [claim(usd=1000)], Amount(usd=700, requests=1), NOW + 900).decision
        == "deny"
    )
    assert ledger.release(
        r.request_id, outcome.hold_id, Completion(status=500), "upstream answered 500", NOW
    ).applied
    assert (
        ledger.reserve(row(), [claim(usd=1000)], Amount(usd=700, requests=1), NOW + 900).decision
        == "allow"
    )
    found = backend.rows("SELECT state, settle_reason FROM holds WHERE id = ?", outcome.hold_id)
    assert found == [("released", "upstream answered 500")]


def test_overage_is_charged_recorded_and_closes_the_instance(
    backend: LedgerBackend, ledger: Any
) -> None:
    r = row()
    outcome = ledger.reserve(r, [claim(usd=1000)], Amount(usd=600, requests=1), NOW + 900)
    settled = ledger.commit(
        r.request_id, outcome.hold_id, Completion(actual=Amount(usd=1500, requests=1)), NOW
    )
    assert settled.overage
    assert instance(backend, "run", "agent:a/run:r1")["spent_usd"] == 1500  # the money was spent
    assert backend.scalar("SELECT COUNT(*) FROM events WHERE kind = 'overage'") == 1
    zero_cost = ledger.reserve(row(), [claim(usd=1000)], Amount(usd=0, requests=1), NOW + 900)
    assert zero_cost.decision == "deny"  # over its limit: closed to new reserves


def test_shadow_claims_record_would_deny_and_still_hold(
    backend: LedgerBackend, ledger: Any
) -> None:
    outcome = ledger.reserve(
        row(), [claim(usd=100, shadow=True)], Amount(usd=300, requests=1), NOW + 900
    )
    assert outcome.decision == "would_deny" and outcome.hold_id is not None
    assert outcome.shadow_shortfalls[0].unit == "usd"
    assert instance(backend, "run", "agent:a/run:r1")["reserved_usd"] == 300


def test_enforced_shortfall_wins_over_shadow(ledger: Any) -> None:
    claims = [claim("shadow", usd=100, shadow=True), claim("hard", requests=0)]
    assert ledger.reserve(row(), claims, Amount(usd=300, requests=1), NOW + 900).decision == "deny"


def test_new_limits_from_a_reloaded_policy_apply(backend: LedgerBackend, ledger: Any) -> None:
    assert (
        ledger.reserve(row(), [claim(requests=1)], Amount(requests=1), NOW + 900).decision
        == "allow"
    )
    assert (
        ledger.reserve(row(), [claim(requests=1)], Amount(requests=1), NOW + 900).decision == "deny"
    )
    assert (
        ledger.reserve(row(), [claim(requests=3)], Amount(requests=1), NOW + 900).decision
        == "allow"
    )
    assert instance(backend, "run", "agent:a/run:r1")["limit_requests"] == 3


def test_two_claims_on_one_instance_hold_on_it_once(backend: LedgerBackend, ledger: Any) -> None:
    r = row()
    twice = [claim(requests=5), claim(requests=5)]
    held = ledger.reserve(r, twice, Amount(requests=2), NOW + 900)
    assert instance(backend, "run", "agent:a/run:r1")["reserved_requests"] == 2
    ledger.commit(r.request_id, held.hold_id, Completion(actual=Amount(requests=1)), NOW)
    got = instance(backend, "run", "agent:a/run:r1")
    assert (got["reserved_requests"], got["spent_requests"]) == (0, 1)
    assert backend.scalar("SELECT instance_ids FROM holds") == str(got["id"])


def test_windows_are_separate_instances(ledger: Any) -> None:
    hour1 = Claim("h", "agent:a", None, None, 1, per="hour", window_start=3600, window_end=7200)
    hour2 = Claim("h", "agent:a", None, None, 1, per="hour", window_start=7200, window_end=10800)
    assert ledger.reserve(row(), [hour1], Amount(requests=1), NOW + 900).decision == "allow"
    assert ledger.reserve(row(), [hour1], Amount(requests=1), NOW + 900).decision == "deny"
    assert ledger.reserve(row(), [hour2], Amount(requests=1), NOW + 900).decision == "allow"


def test_request_id_is_unique(backend: LedgerBackend, ledger: Any) -> None:
    r = row("same-id")
    ledger.reserve(r, [claim(requests=5)], Amount(requests=1), NOW + 900)
    with pytest.raises(LedgerError):
        ledger.reserve(row("same-id"), [claim(requests=5)], Amount(requests=1), NOW + 900)
    # The failed second reserve left nothing behind.
    assert instance(backend, "run", "agent:a/run:r1")["reserved_requests"] == 1


def test_every_commit_on_an_instance_over_its_limit_reports_it(
    backend: LedgerBackend, ledger: Any
) -> None:
    """Not only the commit that took the instance over: a later one that spent nothing, and a
    late commit of an expired hold, report it too (in one batch as in several), each once
    per instance of its hold, in instance order."""
    claims = [claim(usd=1000), claim("agent", "agent:a", usd=10**9)]
    first, free, late = row(), row(), row()
    held = [ledger.reserve(r, claims, Amount(usd=10, requests=1), NOW + 10) for r in (first, free)]
    gone = ledger.reserve(late, claims[:1], Amount(usd=10, requests=1), NOW + 5)
    assert ledger.sweep(NOW + 6, 30) == 1
    over = Completion(actual=Amount(usd=1500, requests=1))
    results = ledger.run_batch(
        [
            ("commit", (first.request_id, held[0].hold_id, over, NOW + 7)),
            ("commit", (free.request_id, held[1].hold_id, Completion(), NOW + 7)),
        ]
    )
    run = ("run", "agent:a/run:r1")
    assert [r.overage for r in results] == [(run,), (run,)]  # not the agent's: under its limit
    settled = ledger.commit(late.request_id, gone.hold_id, Completion(), NOW + 8)
    assert (settled.state, settled.overage) == ("expired", (run,))
    assert backend.scalar("SELECT COUNT(*) FROM events WHERE kind = 'overage'") == 3


def test_sweep_expires_holds_past_ttl_exactly_once(backend: LedgerBackend, ledger: Any) -> None:
    r = row()
    outcome = ledger.reserve(r, [claim(usd=1000)], Amount(usd=400, requests=1), NOW + 10)
    assert ledger.sweep(NOW + 5, 30) == 0
    assert ledger.sweep(NOW + 11, 30) == 1
    assert ledger.sweep(NOW + 12, 30) == 0
    assert instance(backend, "run", "agent:a/run:r1")["reserved_usd"] == 0
    # The call finished after all: a late commit charges what was spent, once.
    done = Completion(actual=Amount(usd=90, requests=1), status=200)
    assert ledger.commit(r.request_id, outcome.hold_id, done, NOW + 13).state == "expired"
    assert not ledger.commit(r.request_id, outcome.hold_id, done, NOW + 14).applied
    assert instance(backend, "run", "agent:a/run:r1")["spent_usd"] == 90
    assert backend.scalar("SELECT COUNT(*) FROM events WHERE kind = 'late_commit'") == 1


class SteppedClock:
    """A monotonic clock the test moves (LeaseWatch's)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_dead_process_holds_are_released_after_its_lease(backend: LedgerBackend) -> None:
    dead = backend.open(process_id="dead")
    dead.heartbeat(NOW)
    dead.reserve(row(), [claim(usd=1000)], Amount(usd=999, requests=1), NOW + 900)
    backend.crash(dead)  # no clean shutdown: its hold stays active
    clock = SteppedClock()
    alive = backend.open(process_id="alive", leases=LeaseWatch(clock))
    alive.heartbeat(NOW + 20)
    assert alive.sweep(NOW + 20, lease_seconds=30) == 0  # its heartbeat, first seen
    clock.now = 29
    assert alive.sweep(NOW + 49, lease_seconds=30) == 0  # lease still running, as measured here
    clock.now = 30
    assert alive.sweep(NOW + 50, lease_seconds=30) == 1
    assert instance(backend, "run", "agent:a/run:r1")["reserved_usd"] == 0
    assert backend.rows("SELECT state, settle_reason FROM holds") == [
        ("expired", "proxy lease lapsed")
    ]
    alive.close()


def test_a_live_proxys_holds_outlast_a_sweeper_whose_clock_is_ahead(
    backend: LedgerBackend,
) -> None:
    """Two hosts' clocks ten minutes apart (or one stepped forward): the sweeper ahead took
    the live proxy's heartbeat for a lapsed lease, released its in-flight hold, and the
    budget of one request let a second through. A lease is measured on the sweeper's own
    monotonic clock, from when it saw the heartbeat last change."""
    live = backend.open(process_id="live")
    live.heartbeat(NOW)
    held = live.reserve(row(), [claim(requests=1)], Amount(requests=1), NOW + 900)
    clock = SteppedClock()
    ahead = backend.open(process_id="ahead", leases=LeaseWatch(clock))
    for tick in range(5):
        live.heartbeat(NOW + tick * 10)
        clock.now = tick * 10.0
        assert ahead.sweep(NOW + 600 + tick * 10, lease_seconds=30) == 0
    assert (
        ahead.reserve(row(), [claim(requests=1)], Amount(requests=1), NOW + 1500).decision == "deny"
    )
    assert backend.scalar("SELECT state FROM holds WHERE id = ?", held.hold_id) == "active"
    backend.crash(live)  # and once it is gone, its lease lapses as before
    clock.now = 70.0
    assert ahead.sweep(NOW + 700, lease_seconds=30) == 1
    ahead.close()


def test_release_mine_on_shutdown(backend: LedgerBackend, ledger: Any) -> None:
    ledger.reserve(row(), [claim(usd=1000)], Amount(usd=10, requests=1), NOW + 900)
    ledger.reserve(row(), [claim(usd=1000)], Amount(usd=10, requests=1), NOW + 900)
    assert ledger.release_mine(NOW, "proxy shut down") == 2
    assert backend.scalar("SELECT COUNT(*) FROM holds WHERE state = 'active'") == 0
    assert instance(backend, "run", "agent:a/run:r1")["reserved_usd"] == 0


def test_extend_keeps_live_holds(ledger: Any) -> None:
    outcome = ledger.reserve(row(), [claim(usd=1000)], Amount(usd=10, requests=1), NOW + 10)
    ledger.extend([outcome.hold_id], NOW + 100)
    assert ledger.sweep(NOW + 50, 30) == 0


def test_facts_answer_history(ledger: Any) -> None:
    r = row()
    outcome = ledger.reserve(r, [], Amount(requests=1), NOW + 900)
    fact = Fact("agent:a/run:r1", "crm.read", "json.customer_id", "c-42")
    ledger.commit(r.request_id, outcome.hold_id, Completion(status=200, facts=(fact,)), NOW)
    asks = [
        HistoryQuery("agent:a/run:r1", ("crm.*",), "json.customer_id", "c-42"),
        HistoryQuery("agent:a/run:r1", ("crm.*",), "json.customer_id", "c-43"),
        HistoryQuery("agent:a/run:r2", ("crm.read",), "json.customer_id", "c-42"),
        HistoryQuery("agent:a/run:r1", ("crm_read",), "json.customer_id", "c-42"),  # _ is literal
    ]
    assert ledger.history(asks) == [True, False, False, False]


def _batch_results_commit(request_id: str, hold_id: int, key: str = "k") -> tuple[str, Any]:
    done = Completion(
        actual=Amount(usd=500, tokens=120, requests=1),
        status=200,
        tokens_in=100,
        tokens_out=20,
        usage_source="usage",
        once=key,
    )
    return ("commit", (request_id, hold_id, done, NOW))


def test_remember_keeps_the_first_value_beside_the_hot_operations(
    backend: LedgerBackend, ledger: Any
) -> None:
    """A policy's anomaly settings are recorded by every proxy and worker that runs it: the
    first is kept, the others change nothing, and a writer's batch with hot operations in it
    (as the AsyncLedger hands them over) applies each."""
    ledger.remember("anomalies:0123456789abcdef", '{"first": 1}')
    ledger.remember("anomalies:0123456789abcdef", '{"second": 2}')
    reserve = row()
    results = ledger.run_batch(
        [
            ("reserve", (reserve, [claim(usd=10_000)], Amount(requests=1), NOW + 900)),
            ("remember", ("anomalies:fedcba9876543210", '{"other": 3}')),
            ("remember", ("anomalies:0123456789abcdef", '{"third": 3}')),
        ]
    )
    assert results[0].hold_id is not None and results[1:] == [None, None]
    assert sorted(backend.rows("SELECT key, value FROM meta WHERE key LIKE ?", "anomalies:%")) == [
        ("anomalies:0123456789abcdef", '{"first": 1}'),
        ("anomalies:fedcba9876543210", '{"other": 3}'),
    ]


def test_a_charge_made_once_is_not_made_again(backend: LedgerBackend, ledger: Any) -> None:
    claims = [claim(usd=10_000), claim("tenant", "tenant:t", usd=10_000)]
    reads = [row() for _ in range(4)]
    holds = [ledger.reserve(r, claims, Amount(requests=1), NOW + 900).hold_id for r in reads]
    # A read released (the results were not ready: 404) takes nothing and leaves the key free.
    ledger.release(reads[0].request_id, holds[0], Completion(status=404), "upstream 404", NOW)
    settled = [ledger.commit(*_batch_results_commit(reads[1].request_id, holds[1])[1])]
    # Read again, once alone and twice in one batch of the writer's: charged nothing more.
    settled.append(ledger.commit(*_batch_results_commit(reads[2].request_id, holds[2])[1]))
    other = row()
    other_hold = ledger.reserve(other, claims, Amount(requests=1), NOW + 900).hold_id
    settled += ledger.run_batch(
        [
            _batch_results_commit(reads[3].request_id, holds[3]),
            _batch_results_commit(other.request_id, other_hold, key="k2"),
        ]
    )
    # Said to whoever counts what was charged (the metrics): the repeats charged nothing.
    assert [(s.applied, s.charged_before) for s in settled] == [
        (True, False), (True, True), (True, True), (True, False)
    ]  # fmt: skip
    for budget, scope in (("run", "agent:a/run:r1"), ("tenant", "tenant:t")):
        got = instance(backend, budget, scope)
        assert (got["spent_usd"], got["spent_tokens"], got["spent_requests"]) == (1000, 240, 4)
        assert (got["reserved_usd"], got["reserved_requests"]) == (0, 0)
    charged = {
        rid: (usd, tokens_in, note)
        for rid, usd, tokens_in, note in backend.rows(
            "SELECT request_id, actual_usd, tokens_in, note FROM decisions"
        )
    }
    first = reads[1].request_id
    assert charged[first] == (500, 100, None)
    assert charged[other.request_id] == (500, 100, None)
    for again in reads[2:]:
        assert charged[again.request_id] == (0, 0, f"already charged by request {first}")
    assert sorted(backend.rows("SELECT key, request_id FROM once_charges")) == [
        ("k", first),
        ("k2", other.request_id),
    ]


def test_commits_in_one_batch_under_one_key_charge_it_once(
    backend: LedgerBackend, ledger: Any
) -> None:
    reads = [row() for _ in range(3)]
    holds = [ledger.reserve(r, [claim(usd=10_000)], Amount(), NOW + 900).hold_id for r in reads]
    ledger.run_batch(
        [_batch_results_commit(r.request_id, h) for r, h in zip(reads, holds, strict=True)]
    )
    assert instance(backend, "run", "agent:a/run:r1")["spent_usd"] == 500
    assert backend.rows("SELECT key, request_id FROM once_charges") == [("k", reads[0].request_id)]


def _commit_once(kind: str, url: str, keys: list[str], out: Any) -> None:
    ledger = SQLiteLedger(url, busy_timeout=60) if kind == "sqlite" else PostgresLedger(url)
    for key in keys:
        r = row()
        hold = ledger.reserve(r, [claim(usd=10**9)], Amount(), NOW + 900).hold_id
        ledger.commit(*_batch_results_commit(r.request_id, hold, key)[1])
    ledger.close()
    out.put(len(keys))


def test_processes_reading_the_same_results_charge_them_once(backend: LedgerBackend) -> None:
    backend.open().close()
    ctx = multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()
    keys = [f"batch-{i}" for i in range(30)]
    procs = [
        ctx.Process(target=_commit_once, args=(backend.kind, backend.url, keys, out))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    assert sum(out.get(timeout=120) for _ in procs) == 90
    for p in procs:
        p.join(30)
    got = instance(backend, "run", "agent:a/run:r1")
    assert (got["spent_usd"], got["spent_requests"]) == (500 * 30, 90)
    assert backend.scalar("SELECT COUNT(*) FROM once_charges") == 30
    assert backend.scalar("SELECT COUNT(*) FROM decisions WHERE actual_usd = 500") == 30


DAY = 24 * 3600


def _submit_batch(ledger: Any, key: str, usd: int, claims: list[Claim]) -> ReserveOutcome:
    """A batch submitted: held at its estimate, its own request charged, the hold kept."""
    r = row()
    outcome = ledger.reserve(r, claims, Amount(usd=usd, requests=1), NOW + 900)
    assert outcome.decision == "allow", outcome
    kept = Completion(
        actual=Amount(requests=1), status=200, batch=BatchHold(key, keep_until=NOW + DAY)
    )
    settled = ledger.commit(r.request_id, outcome.hold_id, kept, NOW + 1)
    assert settled.applied and settled.state == "active"
    return outcome


def _read_batch(
    ledger: Any, claims: list[Claim], batch: BatchHold, *, usd: int = 0, once: str | None = None
) -> str:
    """A $0 read of a batch (its status, or its results charged `usd`), ending or moving it."""
    r = row()
    hold = ledger.reserve(r, claims, Amount(requests=1), NOW + 900).hold_id
    done = Completion(actual=Amount(usd=usd, requests=1), status=200, once=once, batch=batch)
    ledger.commit(r.request_id, hold, done, NOW + 2)
    return r.request_id


def _reader(backend: LedgerBackend) -> Reader:
    return Reader(backend.url if backend.kind == "postgres" else str(backend.url))


def test_a_batch_stays_held_until_its_results_are_read(backend: LedgerBackend) -> None:
    """Two batches that each fit the room left must not both be taken: the first is held
    until its results are read, past its request, its proxy's shutdown and lapsed lease."""
    claims = [claim(usd=1000), claim("tenant", "tenant:t", usd=5000)]
    submitter = backend.open(process_id="submitter")
    submitter.heartbeat(NOW)
    first = _submit_batch(submitter, "results-of-b1", 600, claims)
    second = row()
    refused = submitter.reserve(second, claims, Amount(usd=600, requests=1), NOW + 900)
    assert refused.decision == "deny" and refused.first.reserved == 600
    assert submitter.release_mine(NOW + 3, "proxy shut down") == 0
    # Its request is spent, no longer held: a requests budget counts it once.
    got = instance(backend, "run", "agent:a/run:r1")
    assert (got["reserved_requests"], got["spent_requests"]) == (0, 1)
    submitter.close()
    other = backend.open(process_id="other")
    other.heartbeat(NOW + DAY / 2)
    assert other.sweep(NOW + DAY / 2, lease_seconds=30) == 0  # the submitter's lease lapsed
    for budget, scope in (("run", "agent:a/run:r1"), ("tenant", "tenant:t")):
        got = instance(backend, budget, scope)
        assert (got["reserved_usd"], got["spent_usd"], got["spent_requests"]) == (600, 0, 1)
    assert backend.rows(
        "SELECT process_id, expires_at, state FROM holds WHERE id = ?", first.hold_id
    ) == [(BATCH_HOLDER, NOW + DAY, "active")]
    reader = _reader(backend)
    try:
        assert verify(reader, settled=True) == []  # a batch's hold is no stranded one
    finally:
        reader.close()
    # The results, read: charged at what they report, and the batch's hold released.
    read = _read_batch(
        other, claims, BatchHold("results-of-b1", ended=True), usd=300, once="results-of-b1"
    )
    for budget, scope in (("run", "agent:a/run:r1"), ("tenant", "tenant:t")):
        got = instance(backend, budget, scope)
        assert (got["reserved_usd"], got["spent_usd"], got["spent_requests"]) == (0, 300, 2)
    assert backend.rows(
        "SELECT state, settle_reason, actual_requests FROM holds WHERE id = ?", first.hold_id
    ) == [("released", f"batch ended (request {read})", 1)]
    assert other.reserve(row(), claims, Amount(usd=600, requests=1), NOW + 900).decision == "allow"
    # Read again: charged nothing more, and nothing released twice.
    _read_batch(
        other, claims, BatchHold("results-of-b1", ended=True), usd=300, once="results-of-b1"
    )
    assert instance(backend, "run", "agent:a/run:r1")["reserved_usd"] == 600
    assert instance(backend, "run", "agent:a/run:r1")["spent_usd"] == 300
    other.close()
    reader = _reader(backend)
    try:
        assert verify(reader) == []
    finally:
        reader.close()


def test_a_batch_hold_moves_to_its_output_file_and_ends_with_it(
    backend: LedgerBackend, ledger: Any
) -> None:
    """OpenAI's results are a file named once the batch is done: the status read that names it
    moves the hold there; reading the batch's status again changes nothing."""
    claims = [claim(usd=1000)]
    kept = _submit_batch(ledger, "batch b1", 700, claims)
    _read_batch(ledger, claims, BatchHold("batch b1"))  # in progress: nothing changes
    _read_batch(ledger, claims, BatchHold("batch b1", moved_to="file f1"))
    _read_batch(ledger, claims, BatchHold("batch b1", moved_to="file f1"))  # polled again
    _read_batch(ledger, claims, BatchHold("batch b1", ended=True))  # the old key: moved
    assert backend.rows("SELECT key, hold_id FROM batch_holds") == [("file f1", kept.hold_id)]
    assert instance(backend, "run", "agent:a/run:r1")["reserved_usd"] == 700
    _read_batch(ledger, claims, BatchHold("file f1", ended=True), usd=400, once="file f1")
    got = instance(backend, "run", "agent:a/run:r1")
    assert (got["reserved_usd"], got["spent_usd"]) == (0, 400)


def test_a_batch_done_without_results_releases_its_hold(
    backend: LedgerBackend, ledger: Any
) -> None:
    claims = [claim(usd=1000)]
    kept = _submit_batch(ledger, "batch failed", 800, claims)
    ledger.run_batch(  # one writer batch: the end and a reserve that needs the room after it
        [
            _read_batch_call(ledger, claims, BatchHold("batch failed", ended=True)),
            ("reserve", (row(), claims, Amount(usd=900, requests=1), NOW + 900)),
        ]
    )
    assert backend.scalar("SELECT state FROM holds WHERE id = ?", kept.hold_id) == "released"
    got = instance(backend, "run", "agent:a/run:r1")
    assert (got["reserved_usd"], got["spent_usd"]) == (900, 0)


def test_a_batch_over_when_submitted_or_submitted_twice_keeps_no_hold(
    backend: LedgerBackend, ledger: Any
) -> None:
    """A submission whose answer says the batch is over already keeps nothing; a batch id the
    upstream names a second time keeps its first hold, and the second's ends with its call."""
    claims = [claim(usd=1000)]
    r = row()
    hold = ledger.reserve(r, claims, Amount(usd=300, requests=1), NOW + 900).hold_id
    over = BatchHold("b-over", keep_until=NOW + DAY, ended=True)
    ledger.commit(r.request_id, hold, Completion(status=200, batch=over), NOW + 1)
    assert backend.rows("SELECT state, process_id FROM holds WHERE id = ?", hold) == [
        ("released", ledger.process_id)
    ]
    first = _submit_batch(ledger, "b-twice", 200, claims)
    r = row()
    again = ledger.reserve(r, claims, Amount(usd=100, requests=1), NOW + 900).hold_id
    twice = BatchHold("b-twice", keep_until=NOW + DAY)
    settled = ledger.commit(r.request_id, again, Completion(status=200, batch=twice), NOW + 2)
    assert settled.state == "committed"
    assert backend.rows("SELECT key, hold_id FROM batch_holds ORDER BY key") == [
        ("b-over", hold),
        ("b-twice", first.hold_id),
    ]
    assert instance(backend, "run", "agent:a/run:r1")["reserved_usd"] == 200
    reader = _reader(backend)
    try:
        assert verify(reader, settled=True) == []
    finally:
        reader.close()


def test_a_batch_input_files_estimate_is_kept_for_every_proxy(backend: LedgerBackend) -> None:
    """An OpenAI batch names an input file uploaded before, maybe through another proxy: the
    upload's commit keeps the file's estimate in the ledger, where any proxy reads it."""
    uploader = backend.open(process_id="uploader")
    r = row()
    hold = uploader.reserve(r, [claim(usd=1000)], Amount(requests=1), NOW + 900).hold_id
    learned = BatchHold("https://api.openai.com files file-1", input_estimate='{"usd_nanos": 7}')
    settled = uploader.commit(
        r.request_id, hold, Completion(actual=Amount(requests=1), status=200, batch=learned), NOW
    )
    assert settled.state == "committed"  # an upload holds nothing past its call
    uploader.close()
    other = backend.open(process_id="other")
    try:
        assert other.batch_input("https://api.openai.com files file-1") == '{"usd_nanos": 7}'
        assert other.batch_input("https://api.openai.com files file-2") is None
        assert other.run_batch([("batch_input", ("https://api.openai.com files file-1",))]) == [
            '{"usd_nanos": 7}'
        ]
    finally:
        other.close()
    assert backend.rows("SELECT key, request_id FROM batch_inputs") == [
        ("https://api.openai.com files file-1", r.request_id)
    ]
    assert backend.scalar("SELECT COUNT(*) FROM batch_holds") == 0


def _read_batch_call(ledger: Any, claims: list[Claim], batch: BatchHold) -> tuple[str, Any]:
    r = row()
    hold = ledger.reserve(r, claims, Amount(requests=1), NOW + 900).hold_id
    return ("commit", (r.request_id, hold, Completion(status=200, batch=batch), NOW + 2))


def test_a_batch_hold_ends_at_its_window(backend: LedgerBackend, ledger: Any) -> None:
    """Results never read through drawdown: the hold lasts the provider's window, no longer;
    results read later are still charged, and release nothing twice."""
    claims = [claim(usd=1000)]
    kept = _submit_batch(ledger, "k", 500, claims)
    assert ledger.sweep(NOW + DAY - 1, 30) == 0
    assert ledger.sweep(NOW + DAY + 1, 30) == 1
    assert backend.rows("SELECT state, settle_reason FROM holds WHERE id = ?", kept.hold_id) == [
        ("expired", "ttl expired")
    ]
    _read_batch(ledger, claims, BatchHold("k", ended=True), usd=250, once="k")
    got = instance(backend, "run", "agent:a/run:r1")
    assert (got["reserved_usd"], got["spent_usd"]) == (0, 250)


def reopened_from(backend: LedgerBackend, version: int) -> Any:
    """A ledger made as at `version` (its tables as the test left them), opened: a ledger
    brought to SCHEMA_VERSION."""
    backend.execute(f"UPDATE meta SET value = '{version}' WHERE key = 'schema_version'")
    ledger = backend.open()
    assert backend.scalar("SELECT value FROM meta WHERE key = 'schema_version'") == str(
        SCHEMA_VERSION
    )
    return ledger


def test_schema_v6_adds_the_batch_holds(backend: LedgerBackend) -> None:
    backend.open().close()
    backend.execute("DROP TABLE batch_holds")
    backend.execute("DROP TABLE batch_inputs")
    ledger = reopened_from(backend, 5)
    try:
        kept = _submit_batch(ledger, "k", 500, [claim(usd=1000)])
        assert backend.rows("SELECT key, hold_id FROM batch_holds") == [("k", kept.hold_id)]
        assert ledger.batch_input("k") is None  # the input files' table is there too
    finally:
        ledger.close()


def test_schema_v7_records_the_body_size_and_metering_for_replay(backend: LedgerBackend) -> None:
    """A v6 ledger, opened, gains the decision columns replay re-decides size limits and
    metering changes by; its old rows read None there, a new row what it was given."""
    backend.open().close()
    backend.execute("ALTER TABLE decisions DROP COLUMN body_bytes")  # SQLite 3.35+
    backend.execute("ALTER TABLE decisions DROP COLUMN metering")
    backend.execute("INSERT INTO decisions (request_id, ts, decision) VALUES ('old', 1, 'allow')")
    ledger = reopened_from(backend, 6)
    try:
        r = row("new")
        r.body_bytes, r.metering = 5_000, "abc123"
        ledger.reserve(r, [claim(requests=5)], Amount(requests=1), NOW + 900)
        assert backend.rows(
            "SELECT request_id, body_bytes, metering FROM decisions ORDER BY request_id"
        ) == [("new", 5_000, "abc123"), ("old", None, None)]
    finally:
        ledger.close()


def test_the_deciding_shortfall_is_a_lifetime_one_else_the_longest_window(
    backend: LedgerBackend, ledger: Any
) -> None:
    minute = claim("agent", "agent:a", requests=1, per="minute", window_end=NOW + 60)
    day = claim("tenant", "tenant:t", requests=1, per="day", window_end=NOW + 3600)
    run = claim(requests=1)
    ledger.reserve(row(), [minute, day, run], Amount(requests=1), NOW + 900)
    for claims, deciding in (([minute, day, run], run), ([minute, day], day), ([day, minute], day)):
        outcome = ledger.reserve(row(), claims, Amount(requests=1), NOW + 900)
        assert outcome.decision == "deny" and outcome.first.claim == deciding


def test_batch_isolates_a_failing_operation(backend: LedgerBackend, ledger: Any) -> None:
    good = row()
    results = ledger.run_batch(
        [
            ("reserve", (good, [claim(requests=5)], Amount(requests=1), NOW + 900)),
            ("commit", ("nope", 424242, Completion(), NOW)),
            ("reserve", (row(), [claim(requests=5)], Amount(requests=1), NOW + 900)),
            ("release", ("denied", None, Completion(), "no hold was made", NOW)),  # a caller's bug
        ]
    )
    assert (
        results[0].decision == "allow"
        and isinstance(results[1], LedgerError)
        and results[2].decision == "allow"
        and isinstance(results[3], LedgerError)
    )
    assert instance(backend, "run", "agent:a/run:r1")["reserved_requests"] == 2


def test_batch_isolates_a_failing_statement(backend: LedgerBackend, ledger: Any) -> None:
    ledger.reserve(row("taken"), [claim(requests=5)], Amount(requests=1), NOW + 900)
    first, second = row(), row()
    results = ledger.run_batch(
        [
            ("reserve", (first, [claim(requests=5)], Amount(requests=1), NOW + 900)),
            ("reserve", (row("taken"), [claim(requests=5)], Amount(requests=1), NOW + 900)),
            ("record", (row(decision="deny"),)),
            ("reserve", (second, [claim(requests=5)], Amount(requests=1), NOW + 900)),
            ("heartbeat", (NOW,)),
        ]
    )
    assert results[0].decision == "allow" and results[3].decision == "allow"
    assert isinstance(results[1], LedgerError) and results[2] is None and results[4] is None
    assert instance(backend, "run", "agent:a/run:r1")["reserved_requests"] == 3
    assert backend.scalar("SELECT COUNT(*) FROM decisions") == 4


def test_batch_isolates_an_amount_past_64_bits(backend: LedgerBackend, ledger: Any) -> None:
    """The policy and the meter keep amounts under 10^18; should one get past them, it fails
    alone, not with the requests that share its batch."""
    first, second = row(), row()
    results = ledger.run_batch(
        [
            ("reserve", (first, [claim(requests=5)], Amount(requests=1), NOW + 900)),
            (
                "reserve",
                (
                    row(),
                    [claim("agent", "agent:a", usd=10**20)],
                    Amount(usd=10**19, requests=1),
                    NOW + 900,
                ),
            ),
            ("reserve", (second, [claim(requests=5)], Amount(requests=1), NOW + 900)),
        ]
    )
    assert results[0].decision == "allow" and results[2].decision == "allow"
    assert isinstance(results[1], LedgerError)
    assert instance(backend, "run", "agent:a/run:r1")["reserved_requests"] == 2


def test_a_batch_decides_in_order_on_shared_instances(backend: LedgerBackend, ledger: Any) -> None:
    claims = [claim(requests=3), claim("agent", "agent:a", usd=1000)]
    results = ledger.run_batch(
        [("reserve", (row(), claims, Amount(usd=300, requests=1), NOW + 900)) for _ in range(5)]
    )
    assert [r.decision for r in results] == ["allow", "allow", "allow", "deny", "deny"]
    assert instance(backend, "agent", "agent:a")["reserved_usd"] == 900


def test_a_sqlite_batch_reads_and_writes_each_instance_once(tmp_path: Any) -> None:
    """The planner: 40 reserves and 40 commits on the same 3 instances cost 3 instance
    reads and 3 instance writes per batch, not 3 per operation."""
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    claims = [claim(requests=100), claim("agent", "agent:a", usd=10**9), claim("t", "tenant:t")]
    statements: list[str] = []
    ledger.conn.set_trace_callback(statements.append)  # once per statement run (per row)
    rows = [row() for _ in range(40)]
    held = ledger.run_batch(
        [("reserve", (r, claims, Amount(usd=5, requests=1), NOW + 900)) for r in rows]
    )
    assert [h.decision for h in held] == ["allow"] * 40
    settled = ledger.run_batch(
        [
            ("commit", (r.request_id, h.hold_id, Completion(actual=Amount(usd=3, requests=1)), NOW))
            for r, h in zip(rows, held, strict=True)
        ]
    )
    assert all(s.applied for s in settled)
    touching = [s for s in statements if "budget_instances" in s]
    reads = [s for s in touching if s.lstrip().startswith("SELECT")]
    writes = [s for s in touching if s.lstrip().startswith(("UPDATE", "INSERT"))]
    # Batch 1: 3 reads (creating the 3 instances: 3 inserts), 3 writes. Batch 2: no read (the
    # connection wrote them last, and no one else has since: see the next tests), 3 writes.
    assert (len(reads), len(writes)) == (3, 3 + 3 + 3), touching
    hold_reads = [s for s in statements if s.lstrip().startswith("SELECT") and "FROM holds" in s]
    assert len(hold_reads) == 1, hold_reads  # the top hold id, once; the commits read none
    # What it keeps stays the size of what is in flight: settled holds are let go.
    assert ledger._known is not None and not ledger._known.holds
    ledger.conn.set_trace_callback(None)
    assert ledger.conn.execute(
        "SELECT SUM(spent_usd), SUM(spent_requests), SUM(reserved_requests) FROM budget_instances"
    ).fetchone() == (3 * 40 * 3, 40 * 3, 0)
    ledger.close()


def _sqlite_reserved(ledger: SQLiteLedger) -> tuple[int, int]:
    """(reserved, spent) requests of the run instance, as the file has them."""
    return ledger.conn.execute(
        "SELECT reserved_requests, spent_requests FROM budget_instances WHERE budget = 'run'"
    ).fetchone()


def test_a_sqlite_ledger_reads_again_what_another_connection_changed(tmp_path: Any) -> None:
    """Rows a connection wrote last are reused only while no other connection has committed
    (PRAGMA data_version): what another proxy charged must count against the limit."""
    path = tmp_path / "ledger.db"
    first, second = SQLiteLedger(path, process_id="p1"), SQLiteLedger(path, process_id="p2")
    claims = [claim(usd=300)]
    r1 = row()
    held = first.reserve(r1, claims, Amount(usd=100, requests=1), NOW + 900)
    # Another proxy settles that hold, charging more than its estimate: spent 250, reserved 0.
    overage = Completion(actual=Amount(usd=250, requests=1))
    assert second.commit(r1.request_id, held.hold_id, overage, NOW).applied
    # first last wrote spent 0 / reserved 100: deciding on that would allow (0 + 100 + 100).
    assert first.reserve(row(), claims, Amount(usd=100), NOW + 900).decision == "deny"
    settled = first.commit(r1.request_id, held.hold_id, Completion(actual=Amount(usd=1)), NOW)
    assert (settled.applied, settled.state) == (False, "committed")  # not settled twice
    assert first.conn.execute(
        "SELECT spent_usd, reserved_usd FROM budget_instances WHERE budget = 'run'"
    ).fetchone() == (250, 0)
    # And another proxy's sweeper expiring this one's hold before its commit.
    hold_row = row()
    held = first.reserve(hold_row, [claim("agent", "agent:a")], Amount(requests=1), NOW + 1)
    assert second.sweep(NOW + 10, lease_seconds=60) == 1
    settled = first.commit(
        hold_row.request_id, held.hold_id, Completion(actual=Amount(requests=1)), NOW + 10
    )
    assert (settled.applied, settled.state) == (True, "expired")  # a late commit
    assert first.conn.execute(
        "SELECT reserved_requests, spent_requests FROM budget_instances WHERE budget = 'agent'"
    ).fetchone() == (0, 1)
    first.close()
    second.close()


def test_a_sqlite_ledger_reads_again_after_its_own_maintenance_writes(tmp_path: Any) -> None:
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    r = row()
    held = ledger.reserve(r, [claim(requests=5)], Amount(requests=2), NOW + 1)
    assert ledger.sweep(NOW + 10, lease_seconds=60) == 1  # the same connection returns the hold
    settled = ledger.commit(r.request_id, held.hold_id, Completion(actual=Amount(requests=1)), NOW)
    assert (settled.applied, settled.state) == (True, "expired")
    assert _sqlite_reserved(ledger) == (0, 1)
    # Queued through the writer thread as the proxy does: a sweep between two batches.
    r2 = row()
    worker = AsyncLedger(ledger)

    async def reserve_sweep_commit() -> Any:
        held = await worker.call("reserve", r2, [claim(requests=5)], Amount(requests=2), NOW + 1)
        assert await worker.call("sweep", NOW + 10, 60.0) == 1
        return await worker.call(
            "commit", r2.request_id, held.hold_id, Completion(actual=Amount(requests=1)), NOW
        )

    settled = asyncio.run(reserve_sweep_commit())
    worker.close()
    assert settled.state == "expired" and _sqlite_reserved(ledger) == (0, 2)
    ledger.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize("batch_scheduling", [True, False, None])
def test_a_batch_writer_thread_waits_for_its_cpu_rather_than_preempt(
    tmp_path: Any, batch_scheduling: bool | None
) -> None:
    """SCHED_BATCH on the writer thread only, when asked (worker.py says why and when); the
    caller's policy stays. None: the default, the normal policy."""
    options = {} if batch_scheduling is None else {"batch_scheduling": batch_scheduling}
    worker = AsyncLedger(SQLiteLedger(tmp_path / "ledger.db"), **options)
    try:
        asyncio.run(worker.call("heartbeat", NOW))  # the thread has started and run a batch
        writer = worker._threads[0].native_id
        assert writer is not None
        expected = os.SCHED_BATCH if batch_scheduling else os.SCHED_OTHER
        assert os.sched_getscheduler(writer) == expected
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
        worker.batch_scheduling = not batch_scheduling  # --set while the proxy runs
        expected = os.SCHED_OTHER if batch_scheduling else os.SCHED_BATCH
        assert os.sched_getscheduler(writer) == expected
    finally:
        worker.close()
        worker.ledger.close()


def test_a_failed_sqlite_batch_leaves_no_rows_known(tmp_path: Any) -> None:
    """A batch whose writes fail rolls back; the instances it had already decided on (in
    memory) must not be reused by the next batch, or a reservation the file never took counts."""
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    first = row()
    assert ledger.reserve(first, [claim(requests=5)], Amount(requests=1), NOW + 900).hold_id
    with pytest.raises(LedgerError):  # its request id is taken: the decision insert fails
        ledger.reserve(row(first.request_id), [claim(requests=5)], Amount(requests=1), NOW + 900)
    assert _sqlite_reserved(ledger) == (1, 0)
    assert ledger.reserve(row(), [claim(requests=5)], Amount(requests=1), NOW + 900).hold_id
    assert _sqlite_reserved(ledger) == (2, 0)
    ledger.close()


def test_reserve_outcomes_written_out_init_is_the_dataclasss() -> None:
    """ReserveOutcome writes its __init__ out (the generated one of a frozen dataclass is twice
    as slow): it must take the fields in order with their defaults, set every one, and leave
    the outcome frozen, equal and hashable as before."""
    params = list(inspect.signature(ReserveOutcome.__init__).parameters.values())[1:]
    assert [(p.name, p.default) for p in params] == [
        (f.name, inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(ReserveOutcome)
    ]
    outcome = ReserveOutcome("allow", 7)
    assert set(vars(outcome)) == {f.name for f in dataclasses.fields(ReserveOutcome)}
    assert outcome == ReserveOutcome("allow", 7, (), (), None)
    assert hash(outcome) == hash(ReserveOutcome("allow", 7))
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.hold_id = 8  # type: ignore[misc]


def test_a_rolled_back_batch_leaves_the_callers_rows_undecided(
    backend: LedgerBackend, ledger: Any
) -> None:
    ledger.reserve(row("taken"), [claim(requests=5)], Amount(requests=1), NOW + 900)
    # A shadow shortfall: deciding the reserve writes would_deny and its reason into the row.
    claims = [claim(requests=5), claim("cap", "agent:a", requests=0, shadow=True)]
    fresh, again = row(), row("taken")
    results = ledger.run_batch(
        [
            ("reserve", (fresh, claims, Amount(requests=1), NOW + 900)),
            ("reserve", (again, claims, Amount(requests=1), NOW + 900)),  # a duplicate id
        ]
    )
    assert results[0].decision == "would_deny" and fresh.decision == "would_deny"
    assert fresh.reason_code == "budget_exhausted" and fresh.budget == "agent:a"
    # The duplicate fails alone, and its row says nothing was decided.
    assert isinstance(results[1], LedgerError)
    assert (again.decision, again.reason_code, again.reason, again.budget) == (
        "allow", None, None, None,
    )  # fmt: skip
    assert instance(backend, "run", "agent:a/run:r1")["reserved_requests"] == 2


def guarded(
    fingerprint: str = "fp", scope: str = "agent:a/run:r1", workflow: str | None = None
) -> DecisionRow:
    r = row()
    r.fingerprint, r.scope, r.workflow, r.tenant = fingerprint, scope, workflow, "t"
    return r


@pytest.mark.parametrize(
    ("per", "needed", "status"),
    [(None, 1, 402), ("hour", 1, 429), ("hour", 2, 402)],  # 1 request per hour: 2 never fit
    ids=["lifetime", "window", "above-the-window"],
)
def test_a_budget_denial_is_recorded_with_its_own_code_and_the_status_answered(
    backend: LedgerBackend, ledger: Any, per: str | None, needed: int, status: int
) -> None:
    """A row a shadow rule had marked would_deny (not_authorized) kept that code when a budget
    then refused it, so the report called the run `denied` and its budget queries missed the
    denial; and a call above a window's whole limit, answered 402, was recorded 429."""
    budget = [claim(requests=1, per=per)]
    if needed == 1:  # the one request the budget takes, held
        assert ledger.reserve(row(), budget, Amount(requests=1), NOW + 900).hold_id
    shadowed = row(decision="would_deny")
    shadowed.reason_code, shadowed.reason = "not_authorized", "a shadow rule"
    outcome = ledger.reserve(shadowed, budget, Amount(requests=needed), NOW + 900)
    assert outcome.decision == "deny"
    assert (shadowed.decision, shadowed.reason_code, shadowed.status) == (
        "deny", "budget_exhausted", status,
    )  # fmt: skip
    (stored,) = backend.dicts(
        "SELECT reason_code, status FROM decisions WHERE request_id = ?", shadowed.request_id
    )
    assert (stored["reason_code"], stored["status"]) == ("budget_exhausted", status)


@pytest.mark.parametrize(
    ("claims", "guards"),
    [
        ([claim(requests=0)], None),  # a budget denies: decision, reason, budget, status
        ([claim(requests=0, per="day")], None),  # a window denies: 429
        ([claim(requests=5), claim("cap", "agent:a", requests=0, shadow=True)], None),
        ([claim(requests=5)], Guards(max_repeats=1)),  # a guard denies
        ([claim(requests=5)], Guards(max_repeats=1, shadow=True)),  # would have
    ],
    ids=["budget", "window", "shadow-budget", "guard", "shadow-guard"],
)
def test_a_rolled_back_reserve_leaves_its_row_exactly_as_the_caller_made_it(
    backend: LedgerBackend, ledger: Any, claims: list[Claim], guards: Guards | None
) -> None:
    """Each way of deciding writes into the row; the snapshot a failed transaction restores
    the row from keeps only the fields deciding writes (plan.DECIDED_FIELDS): every other
    field must come back untouched too."""
    first = guarded()
    assert ledger.reserve(first, [claim(requests=5)], Amount(requests=1), NOW + 900).hold_id
    again = guarded()
    again.request_id = first.request_id  # decided, then its insert fails: rolled back
    made = dataclasses.replace(again)  # a copy, every field
    with pytest.raises(LedgerError):
        ledger.reserve(again, claims, Amount(requests=1), NOW + 900, guards)
    assert again == made


def test_loop_guard_denies_the_request_after_n_repeats(backend: LedgerBackend, ledger: Any) -> None:
    guards = Guards(max_repeats=2)
    decisions = [
        ledger.reserve(guarded(), [claim(requests=10)], Amount(requests=1), NOW + 900, guards)
        for _ in range(3)
    ]
    assert [d.decision for d in decisions] == ["allow", "allow", "deny"]
    assert decisions[2].tripped is not None and decisions[2].tripped.detector == "loop"
    assert decisions[2].hold_id is None and decisions[2].shortfalls == ()
    # A different request body is not a repeat; the denied repeat still counts as a step.
    other = ledger.reserve(
        guarded("other"), [claim(requests=10)], Amount(requests=1), NOW + 900, guards
    )
    assert other.decision == "allow"
    assert instance(backend, "run", "agent:a/run:r1")["reserved_requests"] == 3
    assert backend.rows("SELECT reason_code FROM decisions WHERE decision = 'deny'") == [
        ("anomaly",)
    ]


def test_step_count_and_fan_out_guards(backend: LedgerBackend, ledger: Any) -> None:
    steps = Guards(max_steps=2)
    got = [
        ledger.reserve(guarded(f"f{i}"), [], Amount(requests=1), NOW + 900, steps).decision
        for i in range(3)
    ]
    assert got == ["allow", "allow", "deny"]
    fan = Guards(max_runs_per_workflow=2)
    runs = [
        ledger.reserve(
            guarded(scope=f"agent:a/run:w{i}", workflow="wf"), [], Amount(), NOW + 900, fan
        )
        for i in (1, 2, 3, 1)
    ]
    assert [r.decision for r in runs] == ["allow", "allow", "deny", "allow"]  # run w1 is known
    assert runs[2].tripped is not None and runs[2].tripped.detector == "fan_out"
    # A guard-denied reserve creates no budget instance (its claims are never looked at).
    denied = ledger.reserve(
        guarded(scope="agent:a/run:w4", workflow="wf"), [claim("x", "agent:a/run:w4", requests=1)],
        Amount(requests=1), NOW + 900, fan,
    )  # fmt: skip
    assert denied.decision == "deny"
    assert backend.scalar("SELECT COUNT(*) FROM budget_instances WHERE budget = 'x'") == 0


def sqlite_work(ledger: SQLiteLedger, operation: Any) -> tuple[Any, int]:
    """`operation`'s result, and the work SQLite did for it: its virtual machine's steps, in
    tens (a count that does not depend on the machine's speed, as time would)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    ledger.conn.set_progress_handler(count, 10)
    try:
        return operation(), steps
    finally:
        ledger.conn.set_progress_handler(None, 10)


def assert_level_as_refusals_grow(refuse: Any, work_of_one_reserve: Any) -> None:
    """The work of one more refused reserve after 200 refusals and after 4,200: level."""
    refuse(200)
    after_200 = work_of_one_reserve()
    refuse(4000)
    after_4200 = work_of_one_reserve()
    assert after_4200 < 1.5 * after_200, (after_200, after_4200)


def _counted_in(detail: str) -> int:
    """The count a guard's refusal states ("already made 5 times", "already took 9 steps")."""
    found = re.search(r"already (?:made|took|has) (?:at least )?(\d+)", detail)
    assert found is not None, detail
    return int(found.group(1))


@pytest.mark.parametrize("seed", range(4))
def test_capped_guard_counts_decide_as_counting_every_row_would(
    backend: LedgerBackend, ledger: Any, seed: int
) -> None:
    """The guards count a run's rows only up to what their limits need (GuardKeys). Checked
    against `drawdown explain`'s count of every row, request by request, over runs that go far
    past every limit, with failed attempts the guards forgive (retries) among them."""
    import random

    from drawdown.explain import _guard_counts

    rng = random.Random(seed)
    guards = Guards(max_repeats=3, max_steps=9, max_runs_per_workflow=3, retries=2)
    for n in range(160):
        r = guarded(
            fingerprint=rng.choice("abc"),
            scope=f"agent:a/run:r{rng.randrange(5)}",
            workflow=rng.choice(["wf", "other"]),
        )
        expected = _guard_counts(backend.url, r, guards).trip(r, guards)
        outcome = ledger.reserve(r, [], Amount(requests=1), NOW + 900, guards)
        assert (outcome.tripped is None) == (expected is None), (n, expected, outcome)
        if expected is not None:
            assert outcome.decision == "deny"
            assert outcome.tripped.detector == expected.detector, (n, expected, outcome)
            # What the refusal says is true: the full count, or "at least" what was counted.
            told = _counted_in(outcome.tripped.detail)
            if "at least" in outcome.tripped.detail:
                assert told <= _counted_in(expected.detail), (n, expected, outcome)
            else:
                assert outcome.tripped.detail == expected.detail, (n, expected, outcome)
        else:
            assert outcome.decision == "allow", (n, outcome)
            status = rng.choice([200, 200, 503, 429, None])  # failed attempts to forgive
            ledger.commit(r.request_id, outcome.hold_id, Completion(status=status), NOW)


def test_a_refused_agent_that_goes_on_calling_does_not_make_each_reserve_count_its_refusals(
    tmp_path: Path,
) -> None:
    """An agent stopped by a guard that calls on and on (the case drawdown is for) adds a
    refused row each time. Counted in full, each of its reserves read all of them on the one
    writer every request waits for: 55 ms a reserve after 50,000 on a 2-vCPU VM. Counted up to
    the guards' limits, the work of a reserve stays put; measured in SQLite's own VM steps
    (deterministic), not in time."""
    ledger = SQLiteLedger(str(tmp_path / "ledger.db"), process_id="p")
    guards = Guards(max_repeats=3, max_steps=10, retries=2)

    def refused_calls(count: int) -> None:
        calls = [
            ("reserve", (guarded(), [], Amount(requests=1), NOW + 900, guards))
            for _ in range(count)
        ]
        assert {o.decision for o in ledger.run_batch(calls)[3:]} == {"deny"}

    def steps_of_one_reserve() -> int:
        outcome, steps = sqlite_work(
            ledger, lambda: ledger.reserve(guarded(), [], Amount(requests=1), NOW + 900, guards)
        )
        assert outcome.decision == "deny" and outcome.tripped.detector == "loop"
        return steps

    # Counting every row, the second took ~20 times the first.
    assert_level_as_refusals_grow(refused_calls, steps_of_one_reserve)
    ledger.close()


def test_a_new_run_fan_out_refuses_is_refused_for_every_request_of_its_batch(
    backend: LedgerBackend, ledger: Any
) -> None:
    """The writer decides a batch of reserves together. A new run fan_out refused counted as a
    run of the workflow for the rest of the batch (its row still read "allow" when the next
    reserve was checked): the run's second concurrent request went through as a known run."""
    fan = Guards(max_runs_per_workflow=2)
    for run in ("w1", "w2"):
        first = guarded(scope=f"agent:a/run:{run}", workflow="wf")
        assert ledger.reserve(first, [], Amount(requests=1), NOW + 900, fan).decision == "allow"
    third = [
        ("reserve", (guarded(scope="agent:a/run:w3", workflow="wf"), [], Amount(), NOW + 900, fan))
        for _ in range(3)
    ]
    outcomes = ledger.run_batch(third)
    assert [o.decision for o in outcomes] == ["deny", "deny", "deny"]
    assert all(o.tripped is not None and o.tripped.detector == "fan_out" for o in outcomes)
    # The known runs of the workflow still pass in a batch, beside the refused one.
    mixed = [
        (
            "reserve",
            (guarded(scope=f"agent:a/run:{run}", workflow="wf"), [], Amount(), NOW + 900, fan),
        )
        for run in ("w3", "w1", "w3", "w2")
    ]
    assert [o.decision for o in ledger.run_batch(mixed)] == ["deny", "allow", "deny", "allow"]


@pytest.mark.parametrize("seed", range(6))
def test_a_batch_decides_as_its_operations_one_at_a_time_would(
    backend: LedgerBackend, ledger: Any, seed: int
) -> None:
    """Batching changes throughput, never outcomes. The same random operations, decided in
    the writer's batches and one at a time (two namespaces of one ledger): reserves under
    every guard (enforced, shadow, none) beside a run budget that refuses some new runs'
    first requests and a tenant's shared one, commits over their estimates and failed,
    releases, and recorded denials. The guards are decided before the budgets: a new run a
    budget then refused counted as a run of its workflow for the rest of its batch, so
    fan_out refused a new run it should have let through, and let the refused run's next
    request through as a known run."""
    import random

    rng = random.Random(seed)
    enforced = Guards(max_repeats=2, max_steps=7, max_runs_per_workflow=3, retries=1)
    # Agents of one workflow under other policies: shadow guards, none, other limits.
    policies = [
        enforced,
        enforced,
        dataclasses.replace(enforced, shadow=True),
        None,
        Guards(max_runs_per_workflow=2),
    ]
    held: list[dict[str, tuple[str, int]]] = []  # per namespace: (request id, hold id)

    def row_of(ns: str, where: tuple[str, int, str, str]) -> DecisionRow:
        fingerprint, run, workflow, tenant = where
        r = guarded(fingerprint, f"tenant:{tenant}/agent:a/run:{ns}{run}", f"{ns}{workflow}")
        r.tenant = tenant
        return r

    def operation() -> Any:
        """One operation, as a function of the namespace, so both get the same one."""
        kind = rng.choice(["reserve"] * 5 + ["settle", "record"])
        where = (rng.choice("xy"), rng.randrange(8), rng.choice("ab"), rng.choice("tu"))
        if kind == "settle" and held:
            hold = held.pop(rng.randrange(len(held)))
            status, usd = rng.choice([200, 503, 429, None]), rng.choice([0, 0, 1500])
            done = Completion(Amount(usd=usd, requests=1), status)
            if rng.random() < 0.7:
                return lambda ns: ("commit", (*hold[ns], done, NOW))
            return lambda ns: ("release", (*hold[ns], done, "test", NOW))
        if kind == "record":
            code = rng.choice(["not_authorized", "shutting_down"])

            def record(ns: str) -> Any:
                r = row_of(ns, where)
                r.decision, r.reason_code, r.status = "deny", code, 403
                return ("record", (r,))

            return record
        usd, guards = rng.choice([100, 300, 2000]), rng.choice(policies)

        def reserve(ns: str) -> Any:
            r = row_of(ns, where)
            claims = [claim("run", r.scope, usd=1000), claim("tenant", ns + r.tenant, requests=60)]
            return ("reserve", (r, claims, Amount(usd=usd, requests=1), NOW + 900, guards))

        return reserve

    def outcome(result: Any) -> Any:
        if isinstance(result, ReserveOutcome):
            tripped = result.tripped and result.tripped.detector
            return (result.decision, tripped, result.hold_id is None, len(result.shortfalls))
        if result is None:  # a record
            return None
        return (result.applied, result.state, len(result.overage))

    for step in range(30):
        operations = [operation() for _ in range(rng.randrange(1, 9))]
        calls = {ns: [op(ns) for op in operations] for ns in ("b", "s")}
        results = {
            "b": ledger.run_batch(calls["b"]),  # as the writer decides what was queued together
            "s": [ledger.run_batch([call])[0] for call in calls["s"]],
        }
        for i, (b, s) in enumerate(zip(results["b"], results["s"], strict=True)):
            assert outcome(b) == outcome(s), (seed, step, i, calls["s"][i])
            if isinstance(b, ReserveOutcome) and b.hold_id is not None:
                held.append(
                    {ns: (calls[ns][i][1][0].request_id, results[ns][i].hold_id) for ns in calls}
                )


def test_a_workflows_new_runs_cut_a_batch_only_near_its_fan_out_limit() -> None:
    """A cut costs the batch another transaction on PostgreSQL (its guards read again) and
    workflows start new runs all the time: cut at each one, the ledger bench with every guard
    on fell from ~14,000 to ~7,000 lifecycles/s. Only near the limit can a budget's refusal of
    a new run change what fan_out answers the reserves after it."""
    from drawdown.ledger.plan import Counts, Plan

    fan = Guards(max_runs_per_workflow=10)

    def new_runs(count: int) -> list[tuple[str, tuple[Any, ...]]]:
        rows = [guarded(scope=f"agent:a/run:r{i}", workflow="wf") for i in range(count)]
        return [
            ("reserve", (r, [claim(scope=r.scope, usd=10)], Amount(usd=1), NOW + 900, fan))
            for r in rows
        ]

    assert Plan("p").trip(new_runs(6), Counts(runs={("wf", "t"): 0})) is None
    # 8 runs: the first two new ones pass; the third is refused only if both are runs.
    plan = Plan("p")
    assert plan.trip(new_runs(6), Counts(runs={("wf", "t"): 8})) == 2
    assert plan.tripped == {0: None, 1: None}
    # With no budget to refuse them, the first two are runs whatever happens.
    no_budgets = [(name, (r, [], *rest)) for name, (r, _, *rest) in new_runs(6)]
    assert Plan("p").trip(no_budgets, Counts(runs={("wf", "t"): 8})) is None


def test_the_proxys_own_refusals_are_neither_steps_nor_repeats(
    backend: LedgerBackend, ledger: Any
) -> None:
    """A request turned away because the proxy was stopping (or its ledger down, or a bug) was
    retried by its SDK; counted, a deploy added a step and a repeat to every run in the air."""
    guards = Guards(max_repeats=1, max_steps=2)

    def refused(code: str) -> DecisionRow:
        r = guarded()
        r.decision, r.reason_code, r.status = "deny", code, 503
        return r

    ledger.record(refused("shutting_down"))
    ledger.record(refused("internal_error"))  # decided, so with its fingerprint
    first = ledger.reserve(guarded(), [], Amount(requests=1), NOW + 900, guards)
    # In one batch too: the planner counts the rows the batch records before each reserve.
    retry = ("reserve", (guarded("other"), [], Amount(requests=1), NOW + 900, guards))
    batch = ledger.run_batch([("record", (refused("ledger_unavailable"),)), retry])
    assert (first.decision, batch[1].decision) == ("allow", "allow")
    # The agent's own denials still count: the third step is one too many.
    ledger.record(refused("not_authorized"))
    third = ledger.reserve(guarded("third"), [], Amount(requests=1), NOW + 900, guards)
    assert third.decision == "deny" and third.tripped is not None
    assert third.tripped.detector == "step_count"


def test_shadow_guard_records_would_deny_and_holds(backend: LedgerBackend, ledger: Any) -> None:
    guards = Guards(max_repeats=1, shadow=True)
    first = ledger.reserve(guarded(), [claim(requests=10)], Amount(requests=1), NOW + 900, guards)
    second = ledger.reserve(guarded(), [claim(requests=10)], Amount(requests=1), NOW + 900, guards)
    assert (first.decision, second.decision) == ("allow", "would_deny")
    assert second.hold_id is not None and second.tripped is not None
    assert instance(backend, "run", "agent:a/run:r1")["reserved_requests"] == 2


def test_guards_count_earlier_requests_of_the_same_batch(
    backend: LedgerBackend, ledger: Any
) -> None:
    guards = Guards(max_repeats=2)
    again = ("reserve", (guarded(), [claim(requests=10)], Amount(requests=1), NOW + 900, guards))
    results = ledger.run_batch(
        [("record", (guarded(),)), again, (again[0], (guarded(), *again[1][1:])), again]
    )
    assert results[0] is None and isinstance(results[3], LedgerError)  # same request id twice
    assert [r.decision for r in results[1:3]] == ["allow", "deny"]


def attempt(
    ledger: Any, guards: Guards, status: int | None, fingerprint: str = "fp", *, ok: bool = False
) -> str:
    """One attempt of a request: reserved under `guards`, then settled as the addon settles it
    (a 2xx commits; an error answer, or none, releases). Returns the decision."""
    r = guarded(fingerprint)
    outcome = ledger.reserve(r, [claim(requests=100)], Amount(requests=1), NOW + 900, guards)
    if outcome.hold_id is not None:
        if ok:
            ledger.commit(r.request_id, outcome.hold_id, Completion(status=status), NOW + 1)
        else:
            ledger.release(
                r.request_id, outcome.hold_id, Completion(status=status), "failed", NOW + 1
            )
    return outcome.decision


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408, 409, None])
def test_an_sdks_retry_of_a_failed_attempt_is_not_a_repeat(
    backend: LedgerBackend, ledger: Any, status: int | None
) -> None:
    """The SDKs re-send the identical request after a retryable failure (None: no answer, the
    client left): denying the retry as a loop turned a provider hiccup into a hard failure."""
    guards = Guards(max_repeats=1, retries=2)
    assert attempt(ledger, guards, status) == "allow"
    assert attempt(ledger, guards, 200, ok=True) == "allow"  # the retry succeeds
    # The loop guard still works: the same request again, after a success, is a repeat.
    assert attempt(ledger, guards, 200, ok=True) == "deny"


@pytest.mark.parametrize("status", [400, 404, 200])
def test_a_failure_the_sdks_do_not_retry_still_counts(
    backend: LedgerBackend, ledger: Any, status: int
) -> None:
    guards = Guards(max_repeats=1, retries=2)
    assert attempt(ledger, guards, status, ok=status == 200) == "allow"
    assert attempt(ledger, guards, 200, ok=True) == "deny"


def test_only_the_first_retries_failed_attempts_are_forgiven(
    backend: LedgerBackend, ledger: Any
) -> None:
    """An agent hammering a failing endpoint is still stopped: per request and run, the first
    `retries` failed attempts are forgiven, the next count."""
    guards = Guards(max_repeats=1, retries=2)
    got = [attempt(ledger, guards, status) for status in (500, 502, None, 500)]
    assert got == ["allow", "allow", "allow", "deny"]  # 3 failed, 2 forgiven: 1 repeat
    # Another request of the run has its own allowance.
    assert attempt(ledger, guards, 500, "other") == "allow"
    assert attempt(ledger, guards, 200, "other", ok=True) == "allow"
    # retries: 0 counts every attempt, as before.
    strict = Guards(max_repeats=1, retries=0)
    assert attempt(ledger, strict, 500, "third") == "allow"
    assert attempt(ledger, strict, 200, "third", ok=True) == "deny"


def test_attempts_in_flight_and_drawdowns_own_denials_count(
    backend: LedgerBackend, ledger: Any
) -> None:
    guards = Guards(max_repeats=1, retries=2)
    # In flight: no status yet, it may still succeed; concurrent identical requests are a loop.
    first = ledger.reserve(guarded(), [], Amount(requests=1), NOW + 900, guards)
    again = ledger.reserve(guarded(), [], Amount(requests=1), NOW + 900, guards)
    assert (first.decision, again.decision) == ("allow", "deny")
    # A denial by drawdown carries x-should-retry: false: never forgiven (an anomaly's 429, a
    # lifetime budget's 402, a rule's 403), but for a budget window's (below).
    for status, code in ((429, "anomaly"), (402, "budget_exhausted"), (403, "not_authorized")):
        refused = guarded(code + str(status))
        refused.decision, refused.reason_code, refused.status = "deny", code, status
        ledger.record(refused)
        assert attempt(ledger, guards, 200, code + str(status), ok=True) == "deny"


def per_minute(window: int) -> Claim:
    """A budget of one request a minute, in the `window`-th minute from NOW."""
    made = claim(requests=1, per="minute", window_end=NOW + 60 * (window + 1))
    return dataclasses.replace(made, window_start=int(NOW) + 60 * window)


def test_a_budget_windows_refusals_are_forgiven_as_failed_attempts(
    backend: LedgerBackend, ledger: Any
) -> None:
    """A budget window's 429 says when to come back (Retry-After). Counted as repeats, the
    agent that retried at once twice, then waited as told, was refused for good as a loop in
    the window with room for its call. They are forgiven as an SDK's retried failures are:
    the first `retries` of a request in a run, so one hammering the 429 is still stopped."""
    guards = Guards(max_repeats=2, retries=2)

    def call(window: int) -> ReserveOutcome:
        request = guarded()
        outcome = ledger.reserve(
            request, [per_minute(window)], Amount(requests=1), NOW + 900, guards
        )
        if outcome.hold_id is not None:
            done = Completion(actual=Amount(requests=1), status=200)
            ledger.commit(request.request_id, outcome.hold_id, done, NOW)
        return outcome

    assert call(0).decision == "allow"
    refusals = [call(0) for _ in range(2)]  # the agent retried at once, twice: refused
    assert [(r.decision, r.tripped) for r in refusals] == [("deny", None)] * 2
    assert {s.claim.per for r in refusals for s in r.shortfalls} == {"minute"}
    # It waited for the next window: one repeat so far, the two refusals forgiven.
    assert call(1).decision == "allow"
    again = call(2)  # the third identical call: two repeats, now a loop
    assert again.decision == "deny" and again.tripped is not None
    assert again.tripped.detector == "loop"

    # One that hammers a window's 429 without waiting: past its `retries` forgiven refusals
    # and `repeats`, it is refused as a loop, not by the window again.
    hammered = [
        ledger.reserve(guarded("hammer"), [per_minute(3)], Amount(requests=1), NOW + 900, guards)
        for _ in range(7)
    ]
    outcomes = [(o.decision, o.tripped.detector if o.tripped else None) for o in hammered]
    assert outcomes == [("allow", None)] + [("deny", None)] * 3 + [("deny", "loop")] * 3


def test_a_budget_windows_refusals_are_steps_still(backend: LedgerBackend, ledger: Any) -> None:
    """step_count counts them: forgiven per request, distinct requests refused by a window at
    the agent's pace would never be stopped, and each reserve would read more of them."""
    guards = Guards(max_steps=3, retries=2)

    def call(fingerprint: str) -> ReserveOutcome:
        request = guarded(fingerprint)
        outcome = ledger.reserve(request, [per_minute(0)], Amount(requests=1), NOW + 900, guards)
        if outcome.hold_id is not None:
            done = Completion(actual=Amount(requests=1), status=200)
            ledger.commit(request.request_id, outcome.hold_id, done, NOW)
        return outcome

    outcomes = [call(f"item {i}") for i in range(5)]
    detectors = [(o.decision, o.tripped.detector if o.tripped else None) for o in outcomes]
    assert detectors == [("allow", None)] + [("deny", None)] * 2 + [("deny", "step_count")] * 2


def test_a_shadow_window_refuses_nothing_so_cuts_no_batch() -> None:
    """A guard tripped after a reserve a window may refuse waits for it (the batch is cut
    there); a shadow claim refuses nothing, so in shadow mode a looping agent's batch is
    decided whole, not cut at every reserve."""
    shadow = dataclasses.replace(per_minute(0), shadow=True)

    def cut(claims: list[Claim], guards: Guards, made: int = 0) -> int | None:
        calls = [
            ("reserve", (guarded(), claims, Amount(requests=1), NOW + 900, guards))
            for _ in range(10)
        ]
        counts = Counts(repeats={("agent:a/run:r1", "fp"): made}, failed={"agent:a/run:r1": {}})
        return Plan("p").trip(calls, counts)

    assert cut([per_minute(0)], Guards(max_repeats=1, retries=2)) == 1
    assert cut([shadow], Guards(max_repeats=1, retries=2, shadow=True)) is None
    assert cut([], Guards(max_repeats=1, retries=2)) is None
    # Nor where forgiving a refusal could not change the verdict (retries: 0), nor for a
    # request already looping: its refused reserves are no window's to refuse.
    assert cut([per_minute(0)], Guards(max_repeats=1, retries=0)) is None
    assert cut([per_minute(0)], Guards(max_repeats=1, retries=2), made=5) is None


def test_a_shadow_budgets_would_deny_is_no_window_refusal(
    backend: LedgerBackend, ledger: Any
) -> None:
    """Under a shadow budget nothing is refused: the call went to the upstream, and if that
    answered 429 it is a failed attempt, forgiven once, not once more as a window's refusal."""
    guards = Guards(max_repeats=2, retries=4)
    shadow = dataclasses.replace(per_minute(0), shadow=True)

    def call(status: int) -> ReserveOutcome:
        request = guarded()
        outcome = ledger.reserve(request, [shadow], Amount(requests=1), NOW + 900, guards)
        if outcome.hold_id is not None:
            done = Completion(actual=Amount(requests=1), status=status)
            if status == 200:
                ledger.commit(request.request_id, outcome.hold_id, done, NOW)
            else:
                ledger.release(request.request_id, outcome.hold_id, done, "failed", NOW)
        return outcome

    assert call(200).decision == "allow"
    assert [call(429).decision for _ in range(2)] == ["would_deny"] * 2  # the upstream's 429s
    assert call(200).decision == "would_deny"  # four made, the two failed forgiven: 2 repeats
    last = call(200)
    assert last.decision == "deny" and last.tripped is not None
    assert last.tripped.detector == "loop"


def test_a_window_refusal_decided_in_the_same_batch_is_forgiven_too(
    backend: LedgerBackend, ledger: Any
) -> None:
    """The writer decides a batch's guards before its budgets: a refusal by a window earlier
    in the batch counted as a repeat for the identical request after it, unforgiven."""
    guards = Guards(max_repeats=2, retries=2)
    first = guarded()
    held = ledger.reserve(first, [per_minute(0)], Amount(requests=1), NOW + 900, guards)
    ledger.commit(first.request_id, held.hold_id, Completion(Amount(requests=1), status=200), NOW)
    batch = [
        ("reserve", (guarded(), [per_minute(w)], Amount(requests=1), NOW + 900, guards))
        for w in (0, 1)  # refused by its window; then one in a window with room
    ]
    refused, allowed = ledger.run_batch(batch)
    assert (refused.decision, refused.tripped) == ("deny", None)
    assert (allowed.decision, allowed.tripped) == ("allow", None)
    # A window's refusal the proxy records (a session's later messages), then the request again.
    recorded = guarded("recorded")
    recorded.decision, recorded.reason_code, recorded.status = "deny", "budget_exhausted", 429
    again = ("reserve", (guarded("recorded"), [], Amount(requests=1), NOW + 900, guards))
    twice = ("reserve", (guarded("recorded"), [], Amount(requests=1), NOW + 900, guards))
    outcomes = ledger.run_batch([("record", (recorded,)), again, twice])
    assert [o.decision for o in outcomes[1:]] == ["allow", "allow"]  # 3 made, 1 forgiven


def test_failed_attempts_are_not_steps(backend: LedgerBackend, ledger: Any) -> None:
    guards = Guards(max_steps=2, retries=1)
    assert attempt(ledger, guards, 503, "a") == "allow"  # forgiven
    assert attempt(ledger, guards, 200, "a", ok=True) == "allow"  # step 1
    assert attempt(ledger, guards, 500, "b") == "allow"  # forgiven: its request's first failure
    assert attempt(ledger, guards, 500, "b") == "allow"  # step 2: b's second failure counts
    assert attempt(ledger, guards, 200, "c", ok=True) == "deny"


def test_a_failure_settled_in_the_batch_is_forgiven_by_the_next_reserve(
    backend: LedgerBackend, ledger: Any
) -> None:
    """The client left (its SDK timed out) and retried at once: the release and the retry's
    reserve share a batch, and the retry must see the attempt as failed, not in flight."""
    guards = Guards(max_repeats=1, max_steps=1, retries=2)
    first = guarded()
    outcome = ledger.reserve(first, [], Amount(requests=1), NOW + 900, guards)
    assert outcome.hold_id is not None
    retry = ("reserve", (guarded(), [], Amount(requests=1), NOW + 900, guards))
    gone = Completion(status=None, note="client disconnected")
    results = ledger.run_batch(
        [("release", (first.request_id, outcome.hold_id, gone, "client disconnected", NOW)), retry]
    )
    assert results[1].decision == "allow"
    # And a reserve of the batch settled in the same batch (the ledger's rows, not yet written).
    fresh = guarded("fresh")
    held = ledger.run_batch([("reserve", (fresh, [], Amount(requests=1), NOW + 900, guards))])
    assert held[0].decision == "deny"  # step_count: the retry above is the run's one step


def migrated_from(backend: LedgerBackend, version: int, index: str) -> None:
    """A ledger made as at `version` (without the `index` the next migration adds), opened:
    it is brought to SCHEMA_VERSION."""
    backend.open().close()
    backend.execute(f"DROP INDEX {index}")
    backend.execute(f"UPDATE meta SET value = '{version}' WHERE key = 'schema_version'")
    backend.open().close()
    assert backend.scalar("SELECT value FROM meta WHERE key = 'schema_version'") == str(
        SCHEMA_VERSION
    )


def test_the_failed_attempts_have_an_index_of_their_own(backend: LedgerBackend) -> None:
    """Schema v2 adds it (a v1 ledger is migrated), and the guard query reads it: counting a
    run's failed attempts must not walk the whole run."""
    migrated_from(backend, 1, "idx_decisions_failed")
    if backend.kind == "sqlite":
        from drawdown.ledger.sqlite import FAILED

        plan = " ".join(r[-1] for r in backend.rows(f"EXPLAIN QUERY PLAN {FAILED}", "s"))
        assert "idx_decisions_failed" in plan
    else:
        # This test's schema only: the server may hold other ledgers (a `drawdown run` on it).
        found = backend.rows(
            "SELECT indexdef FROM pg_indexes "
            "WHERE indexname = 'idx_decisions_failed' AND schemaname = current_schema()"
        )
        assert len(found) == 1 and "status >= 500" in found[0][0]
        from drawdown.ledger.pg_guards import FAILED

        backend.execute("SET enable_seqscan = off")  # an empty table: ask whether it *can*
        plan = " ".join(r[0] for r in backend.rows(f"EXPLAIN {FAILED}", ["s"]))
        assert "idx_decisions_failed" in plan


def _index_names(backend: LedgerBackend) -> set[str]:
    if backend.kind == "sqlite":
        return {r[0] for r in backend.rows("SELECT name FROM sqlite_master WHERE type = 'index'")}
    return {
        r[0]
        for r in backend.rows(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
        )
    }


def test_schema_v3_drops_the_indexes_no_query_reads(backend: LedgerBackend) -> None:
    """Every reserve paid for them; a v2 ledger (which has them) loses them when opened."""
    backend.open().close()
    assert not {"idx_holds_request_id", "idx_decisions_agent_run_ts"} & _index_names(backend)
    backend.execute("CREATE UNIQUE INDEX idx_holds_request_id ON holds (request_id)")
    backend.execute("CREATE INDEX idx_decisions_agent_run_ts ON decisions (agent, run, ts)")
    backend.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    backend.open().close()
    assert backend.scalar("SELECT value FROM meta WHERE key = 'schema_version'") == str(
        SCHEMA_VERSION
    )
    names = _index_names(backend)
    assert not {"idx_holds_request_id", "idx_decisions_agent_run_ts"} & names
    assert {"idx_decisions_request_id", "idx_holds_active", "idx_decisions_failed"} <= names


def test_schema_v4_indexes_the_runs_that_got_through_for_fan_out(backend: LedgerBackend) -> None:
    """A v3 ledger gains the partial index of the rows that got through under a workflow, and
    fan_out's two questions (is this run known, how many runs) read it, not the run's refusals."""
    migrated_from(backend, 3, "idx_decisions_runs")
    assert "idx_decisions_runs" in _index_names(backend)
    if backend.kind == "sqlite":
        from drawdown.ledger.sqlite import KNOWN, RUNS

        for sql, args in ((KNOWN, ("wf", "s")), (RUNS, ("wf", "", 5))):
            plan = " ".join(r[-1] for r in backend.rows(f"EXPLAIN QUERY PLAN {sql}", *args))
            assert "idx_decisions_runs" in plan, plan
    else:
        from drawdown.ledger.pg_guards import KNOWN

        backend.execute("SET enable_seqscan = off")  # an empty table: ask whether it *can*
        plan = " ".join(r[0] for r in backend.rows(f"EXPLAIN {KNOWN}", ["wf"], ["s"]))
        assert "idx_decisions_runs" in plan, plan


def test_schema_v5_adds_the_charges_made_once(backend: LedgerBackend) -> None:
    """A v4 ledger, opened, gains the table a batch's results are charged once by."""
    backend.open().close()
    backend.execute("DROP TABLE once_charges")
    backend.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    ledger = backend.open()
    try:
        assert backend.scalar("SELECT value FROM meta WHERE key = 'schema_version'") == str(
            SCHEMA_VERSION
        )
        r = row()
        hold = ledger.reserve(r, [claim(usd=10_000)], Amount(), NOW + 900).hold_id
        ledger.commit(*_batch_results_commit(r.request_id, hold)[1])
        assert backend.rows("SELECT key, request_id FROM once_charges") == [("k", r.request_id)]
    finally:
        ledger.close()


def test_a_run_fan_out_refused_that_goes_on_calling_is_not_read_on_each_reserve(
    tmp_path: Path,
) -> None:
    """A run fan_out refuses at its first request has no row that got through: asked whether it
    is a known run, the ledger read all its refusals, on every reserve (32 ms after 50,000 on
    a 2-vCPU VM). Measured in SQLite's VM steps, as above."""
    ledger = SQLiteLedger(str(tmp_path / "ledger.db"), process_id="p")
    fan = Guards(max_runs_per_workflow=2)

    def reserve(run: str) -> ReserveOutcome:
        r = guarded(fingerprint=uuid.uuid4().hex, scope=f"agent:a/run:{run}", workflow="wf")
        return ledger.reserve(r, [], Amount(requests=1), NOW + 900, fan)

    assert reserve("w1").decision == reserve("w2").decision == "allow"

    def refused_calls(count: int) -> None:
        calls = [
            ("reserve", (guarded(uuid.uuid4().hex, "agent:a/run:w3", "wf"), [], Amount(), NOW, fan))
            for _ in range(count)
        ]
        assert {o.decision for o in ledger.run_batch(calls)} == {"deny"}

    def steps_of_one_reserve() -> int:
        outcome, steps = sqlite_work(ledger, lambda: reserve("w3"))
        assert outcome.decision == "deny"
        return steps

    assert_level_as_refusals_grow(refused_calls, steps_of_one_reserve)  # 117 -> 2,118 before
    ledger.close()


def calls_of_known_runs(ledger: Any, fan: Guards, count: int) -> None:
    """`count` reserves spread over three runs of workflow wf (tenant t), every one allowed."""
    for run in ("a", "b", "c"):
        calls = [
            ("reserve", (guarded(uuid.uuid4().hex, f"tenant:t/workflow:wf/run:{run}", "wf"),
                         [], Amount(requests=1), NOW + 900, fan))
            for _ in range(count // 3)
        ]  # fmt: skip
        assert {o.decision for o in ledger.run_batch(calls)} == {"allow"}


def test_a_new_run_counts_its_workflows_runs_without_reading_their_rows(tmp_path: Path) -> None:
    """fan_out counts a workflow's runs when a new run starts in it. Walked one index seek a
    run, that does not grow with the rows the runs have: a DISTINCT over them read every one
    (17 ms for five runs of 20,000 rows on a 2-vCPU VM). Measured in SQLite's VM steps."""
    ledger = SQLiteLedger(str(tmp_path / "ledger.db"), process_id="p")
    fan = Guards(max_runs_per_workflow=4)
    fresh = iter(range(1_000_000))

    def reserve(run: str, tenant: str = "t") -> ReserveOutcome:
        r = guarded(uuid.uuid4().hex, f"tenant:{tenant}/workflow:wf/run:{run}", "wf")
        r.tenant = tenant
        return ledger.reserve(r, [], Amount(requests=1), NOW + 900, fan)

    def steps_of_a_new_runs_reserve() -> int:
        outcome, steps = sqlite_work(ledger, lambda: reserve(f"new{next(fresh)}", "other"))
        assert outcome.decision == "allow"  # another tenant's: its own count
        return steps

    assert_level_as_refusals_grow(
        lambda count: calls_of_known_runs(ledger, fan, count), steps_of_a_new_runs_reserve
    )
    # The walk counts a tenant's runs only, up to the limit: three known and one new run
    # pass, the fifth is refused; another tenant's runs under the same workflow do not count.
    assert reserve("d").decision == "allow"
    refused = reserve("e")
    assert refused.decision == "deny" and refused.tripped is not None
    assert refused.tripped.detector == "fan_out" and "already has 4 runs" in refused.tripped.detail
    ledger.close()


def _tuples_read(plan: dict[str, Any]) -> int:
    """The rows every scan of an EXPLAIN ANALYZE plan read: those it returned and those its
    filter removed, in each of its loops (a count that does not depend on the machine's speed)."""
    read = 0
    if plan["Node Type"].endswith("Scan") and "Relation Name" in plan:
        kept = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
        read += kept * plan["Actual Loops"]
    return read + sum(_tuples_read(child) for child in plan.get("Plans", ()))


@pytest.mark.postgres
def test_a_new_run_counts_its_workflows_runs_without_reading_their_rows_on_postgres(
    pg_url: str,
) -> None:
    """The PostgreSQL twin of the test above: fan_out's walk of a workflow's runs reads one
    row a run, however many rows the runs have (a DISTINCT over them read 28 ms for five runs
    of 20,000 rows). Measured in the rows its scans read, under EXPLAIN ANALYZE."""
    from drawdown.ledger.pg_guards import RUNS

    ledger = PostgresLedger(pg_url, process_id="p")
    backend = LedgerBackend("postgres", pg_url)
    fan = Guards(max_runs_per_workflow=4)

    def rows_a_count_of_runs_reads() -> int:
        backend.execute("ANALYZE decisions")  # the plan a ledger of this size gets
        ((plan,),) = backend.rows(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {RUNS}", ["wf", "wf"], ["t", "other"], [4, 4]
        )
        assert backend.rows(RUNS, ["wf", "wf"], ["t", "other"], [4, 4]) == [
            ("wf", "t", 3),  # three runs of tenant t
            ("wf", "other", 0),  # another tenant's are not its own
        ]
        return _tuples_read(plan[0]["Plan"])

    calls_of_known_runs(ledger, fan, 200)
    after_200 = rows_a_count_of_runs_reads()
    calls_of_known_runs(ledger, fan, 4000)
    after_4200 = rows_a_count_of_runs_reads()
    # Two walks of three runs each: a seek for each run and one past the last, each reading
    # one row. Counting every row would read 4,200 twice.
    assert after_4200 <= 16, (after_200, after_4200)
    assert after_4200 <= after_200 + 2, (after_200, after_4200)
    ledger.close()
    backend.close()


def test_a_request_id_holds_once_without_an_index_on_the_holds(
    backend: LedgerBackend, ledger: Any
) -> None:
    """The holds' own unique index is gone (v3): the decision row, inserted in the same
    transaction, refuses a second reserve of one request id, alone or in a batch."""
    claims = [claim(requests=5)]
    first = ledger.reserve(row("twice"), claims, Amount(requests=1), NOW + 900)
    assert first.hold_id is not None
    with pytest.raises(LedgerError):
        ledger.reserve(row("twice"), claims, Amount(requests=1), NOW + 900)
    results = ledger.run_batch(
        [("reserve", (row("twice"), claims, Amount(requests=1), NOW + 900))] * 2
    )
    assert all(isinstance(r, LedgerError) for r in results)
    assert backend.rows("SELECT request_id, state FROM holds") == [("twice", "active")]
    assert instance(backend, "run", "agent:a/run:r1")["reserved_requests"] == 1


def test_guards_hold_across_proxies(backend: LedgerBackend) -> None:
    backend.open().close()
    allowed: list[str] = []
    lock = threading.Lock()

    def proxy() -> None:
        ledger = backend.open(**({"busy_timeout": 30} if backend.kind == "sqlite" else {}))
        for i in range(10):
            r = guarded(f"f{threading.get_ident()}-{i}")
            outcome = ledger.reserve(r, [], Amount(requests=1), NOW + 900, Guards(max_steps=12))
            if outcome.decision == "allow":
                with lock:
                    allowed.append(r.request_id)
        ledger.close()

    threads = [threading.Thread(target=proxy) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 12
    assert backend.scalar("SELECT COUNT(*) FROM decisions") == 40


def test_refuses_a_newer_ledger(backend: LedgerBackend) -> None:
    backend.open().close()
    backend.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(LedgerTooNew):
        backend.open()


def test_async_ledger_batches_concurrent_calls(backend: LedgerBackend, ledger: Any) -> None:
    import asyncio

    async def main() -> list[Any]:
        worker = AsyncLedger(ledger)
        try:

            async def one() -> str:
                r = row()
                outcome = await worker.call(
                    "reserve", r, [claim(requests=30)], Amount(requests=1), NOW + 900
                )
                if outcome.hold_id is not None:
                    await worker.call(
                        "commit",
                        r.request_id,
                        outcome.hold_id,
                        Completion(actual=Amount(requests=1)),
                        NOW,
                    )
                return outcome.decision

            return await asyncio.gather(*(one() for _ in range(50)))
        finally:
            worker.close()

    decisions = asyncio.run(main())
    assert decisions.count("allow") == 30
    got = instance(backend, "run", "agent:a/run:r1")
    assert (got["spent_requests"], got["reserved_requests"]) == (30, 0)


def test_unopenable_file_is_a_ledger_error(tmp_path: Any) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError):
        SQLiteLedger(path)


def test_unreachable_server_is_a_ledger_error_without_the_password() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://drawdown:s3cr3t-pw@127.0.0.1:{port}/ledger"
    started = time.monotonic()
    with pytest.raises(LedgerError) as caught:
        open_ledger(url, connect_timeout=2)
    assert time.monotonic() - started < 10
    assert "s3cr3t" not in str(caught.value) and "drawdown:***@127.0.0.1" in str(caught.value)
    assert redact_dsn("postgresql://u@h/d?password=x&sslmode=require") == (
        "postgresql://u@h/d?password=***&sslmode=require"
    )


def test_the_read_commands_refuse_a_ledger_from_a_newer_drawdown(tmp_path: Path) -> None:
    """`run` refused it; report, budgets, replay and `verify` (which said its invariants held)
    read it as if they understood it."""
    db = tmp_path / "future.db"
    SQLiteLedger(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match="schema version 99, newer than this drawdown"):
        Reader(str(db))


@pytest.mark.parametrize("name", ["run#1.db", "q?x.db", "pct%41.db"])
def test_a_ledger_path_with_uri_syntax_is_read_not_a_stray_file_made(
    tmp_path: Path, name: str
) -> None:
    """The read-only URI was built unquoted: for `run#1.db` SQLite opened, and created, `run`."""
    SQLiteLedger(tmp_path / name).close()
    reader = Reader(str(tmp_path / name))
    assert reader.query("SELECT COUNT(*) AS n FROM decisions") == [{"n": 0}]
    reader.close()
    made = {path.name.removesuffix("-wal").removesuffix("-shm") for path in tmp_path.iterdir()}
    assert made == {name}


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://drawdown:s3cr3t-pw@[::1/ledger",  # malformed: psycopg quotes it whole
        "postgresql://drawdown:s3cr3t-pw@127.0.0.1:1/ledger",  # nobody listens on port 1
    ],
)
def test_the_read_commands_never_print_the_password_either(url: str) -> None:
    """`report`, `budgets`, `verify`, `replay` and `explain --db` read through Reader, which
    passed psycopg's message on as it was: for a malformed DSN, with the DSN in it."""
    with pytest.raises(LedgerError) as caught:
        Reader(url)
    assert "s3cr3t" not in str(caught.value) and "cannot open ledger" in str(caught.value)


def test_threads_with_separate_connections_never_overspend(backend: LedgerBackend) -> None:
    backend.open().close()
    admitted: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            ledger = backend.open(**({"busy_timeout": 30} if backend.kind == "sqlite" else {}))
            for _ in range(25):
                outcome = ledger.reserve(
                    row(),
                    [claim(usd=37 * 100), claim("agent", "agent:a", requests=1000)],
                    Amount(usd=100, requests=1),
                    NOW + 900,
                )
                if outcome.hold_id is not None:
                    with lock:
                        admitted.append(outcome.hold_id)
            ledger.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(admitted) == 37
    assert instance(backend, "run", "agent:a/run:r1")["reserved_usd"] == 3700
    assert instance(backend, "agent", "agent:a")["reserved_requests"] == 37


def _process_worker(kind: str, url: str, attempts: int, out: Any) -> None:
    ledger = SQLiteLedger(url, busy_timeout=60) if kind == "sqlite" else PostgresLedger(url)
    admitted = 0
    for _ in range(attempts):
        r = row()
        # Overlapping instances in different orders: lock ordering, not claim order, must rule.
        claims = [claim(usd=37 * 100), claim("agent", "agent:a", requests=1000)]
        outcome = ledger.reserve(
            r, claims if admitted % 2 else claims[::-1], Amount(usd=100, requests=1), NOW + 900
        )
        if outcome.hold_id is not None:
            admitted += 1
            ledger.commit(
                r.request_id, outcome.hold_id, Completion(actual=Amount(usd=100, requests=1)), NOW
            )
    ledger.close()
    out.put(admitted)


def test_processes_sharing_one_ledger_never_overspend(backend: LedgerBackend) -> None:
    backend.open().close()
    ctx = multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(backend.kind, backend.url, 50, out))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert total == 37
    got = instance(backend, "run", "agent:a/run:r1")
    assert (got["spent_usd"], got["reserved_usd"]) == (3700, 0)
    committed = backend.rows(
        "SELECT COUNT(*), SUM(actual_usd) FROM holds WHERE state = 'committed'"
    )
    assert [tuple(int(v) for v in r) for r in committed] == [(37, 3700)]
    assert backend.scalar("SELECT COUNT(*) FROM decisions") == 200


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("UPDATE meta SET value = 'abc' WHERE key = 'schema_version'", "'abc', not a number"),
        ("DELETE FROM meta", "has tables but no schema_version"),
    ],
)
def test_a_ledger_with_a_damaged_version_is_refused_in_one_line(
    backend: LedgerBackend, damage: str, said: str
) -> None:
    """A version that is not a number gave a ValueError traceback from every command; no
    version at all ran the first migration again on every start, failing each time."""
    backend.open().close()
    backend.execute(damage)
    with pytest.raises(LedgerError, match=said):
        backend.open()
    with pytest.raises(LedgerError, match=said):
        Reader(backend.url)


# --- PostgreSQL only ------------------------------------------------------------------------


@pytest.mark.postgres
def test_proxies_starting_together_migrate_once(pg_url: str) -> None:
    opened: list[PostgresLedger] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        try:
            barrier.wait()
            opened.append(PostgresLedger(pg_url))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len(opened) == 6
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]
        assert conn.execute("SELECT COUNT(*) FROM processes").fetchone() == (6,)
    for ledger in opened:
        ledger.close()


@pytest.mark.postgres
def test_a_migration_never_queues_long_behind_a_long_read(pg_url: str) -> None:
    """ALTER TABLE waits behind an open read of its table, and every proxy on the old code
    then waits behind the ALTER: with the session's lock timeout a long report stalled the
    old proxies at each attempt. The migration gives up at once and says why."""
    PostgresLedger(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # a ledger as v6 left it
        conn.execute("ALTER TABLE decisions DROP COLUMN body_bytes, DROP COLUMN metering")
        conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    with psycopg.connect(pg_url) as report:
        report.execute("SELECT COUNT(*) FROM decisions")  # its transaction stays open
        with pytest.raises(LedgerError, match="migration to schema version 7 waits for a table"):
            PostgresLedger(pg_url, lock_timeout=60)
        report.rollback()
    PostgresLedger(pg_url).close()  # the read over, it migrates
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]


@pytest.mark.postgres
def test_concurrent_sweepers_expire_each_hold_once(pg_url: str) -> None:
    maker = PostgresLedger(pg_url, process_id="crashed")
    claims = [claim(usd=10**9), claim("agent", "agent:a", requests=10**6)]
    for _ in range(300):
        maker.reserve(row(), claims, Amount(usd=7, requests=1), NOW + 10)
    LedgerBackend.crash(maker)
    sweepers = [PostgresLedger(pg_url, process_id=f"sweeper-{i}") for i in range(4)]
    counts: list[int] = []
    barrier = threading.Barrier(len(sweepers))

    def sweep(ledger: PostgresLedger) -> None:
        barrier.wait()
        counts.append(sum(ledger.sweep(NOW + 60, 30) for _ in range(3)))

    threads = [threading.Thread(target=sweep, args=(s,)) for s in sweepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 300
    backend = LedgerBackend("postgres", pg_url)
    assert backend.rows("SELECT state, COUNT(*) FROM holds GROUP BY state") == [("expired", 300)]
    assert instance(backend, "run", "agent:a/run:r1")["reserved_usd"] == 0
    assert instance(backend, "agent", "agent:a")["reserved_requests"] == 0
    backend.close()
    for s in sweepers:
        s.close()


@pytest.mark.postgres
def test_conflicts_are_retried(pg_url: str) -> None:
    ledger = PostgresLedger(pg_url)
    failures = [psycopg.errors.SerializationFailure("x"), psycopg.errors.DeadlockDetected("y")]

    def flaky(conn: Any, replay: bool) -> int:
        if failures:
            raise failures.pop(0)
        return conn.execute("SELECT 7").fetchone()[0]

    assert ledger._transaction(flaky) == 7 and not failures
    ledger.close()


@pytest.mark.postgres
def test_lost_connections_are_retried_and_a_lost_ack_is_not_applied_twice(pg_url: str) -> None:
    ledger = PostgresLedger(pg_url)
    backend = LedgerBackend("postgres", pg_url)
    ledger.reserve(row(), [claim(requests=10)], Amount(requests=1), NOW + 900)
    # The server drops every session of this ledger: the next call reconnects.
    killed = backend.rows(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ?",
        f"drawdown {ledger.process_id}"[:63],
    )
    assert killed and all(ok for (ok,) in killed)
    assert ledger.reserve(row(), [claim(requests=10)], Amount(requests=1), NOW + 900).hold_id

    # COMMIT reaches the server but its acknowledgement is lost: the retry must find the
    # reserve already made (same hold), not fail as a duplicate nor hold twice.
    real_getconn = ledger.pool.getconn
    lose = [True]

    def getconn(timeout: float | None = None) -> Any:
        conn = real_getconn(timeout)
        if lose:
            lose.pop()

            def commit() -> None:
                type(conn).commit(conn)
                del conn.commit
                conn.close()  # as if the network dropped right after the server committed
                raise psycopg.OperationalError("server closed the connection unexpectedly")

            conn.commit = commit
        return conn

    ledger.pool.getconn = getconn  # type: ignore[method-assign]
    r = row()
    outcome = ledger.reserve(r, [claim(requests=10)], Amount(requests=1), NOW + 900)
    assert outcome.decision == "allow" and outcome.hold_id is not None and not lose
    assert backend.rows("SELECT id FROM holds WHERE request_id = ?", r.request_id) == [
        (outcome.hold_id,)
    ]
    assert instance(backend, "run", "agent:a/run:r1")["reserved_requests"] == 3
    backend.close()
    ledger.close()


class _Relay:
    """A TCP relay to the PostgreSQL server that can be cut (the database 'goes away')."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up.clear()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.socks.clear()

    def close(self) -> None:
        self.cut()
        self.server.close()


@pytest.mark.postgres
def test_unreachable_database_raises_then_recovers_without_losing_commits(pg_url: str) -> None:
    info = psycopg.conninfo.conninfo_to_dict(pg_url)
    relay = _Relay((str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)))
    via_relay = pg_url.replace(f":{info.get('port') or 5432}/", f":{relay.port}/", 1)
    assert via_relay != pg_url
    ledger = PostgresLedger(via_relay, retry_seconds=1.0, connect_timeout=1)
    r = row()
    outcome = ledger.reserve(r, [claim(requests=10)], Amount(requests=1), NOW + 900)
    ledger.commit(r.request_id, outcome.hold_id, Completion(actual=Amount(requests=1)), NOW)
    relay.cut()
    started = time.monotonic()
    with pytest.raises(LedgerError, match="unavailable"):
        ledger.reserve(row(), [claim(requests=10)], Amount(requests=1), NOW + 900)
    assert time.monotonic() - started < 8
    relay.up.set()  # the database is back
    assert ledger.reserve(row(), [claim(requests=10)], Amount(requests=1), NOW + 900).hold_id
    backend = LedgerBackend("postgres", pg_url)
    got = instance(backend, "run", "agent:a/run:r1")
    assert (got["spent_requests"], got["reserved_requests"]) == (1, 1)  # nothing committed lost
    backend.close()
    ledger.close()
    relay.close()


def test_request_ids_are_time_ordered_uuid7s() -> None:
    from drawdown.ledger.api import new_request_id

    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert {(u.version, u.variant) for u in parsed} == {(7, uuid.RFC_4122)}
    assert abs((parsed[0].int >> 80) - time.time() * 1000) < 5_000  # Unix milliseconds
    first = new_request_id()
    time.sleep(0.002)
    assert new_request_id() > first  # a later millisecond sorts later: index inserts append


def test_a_request_id_makes_no_system_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """One id per request on the event loop: a getpid() per id (to notice a fork) was a system
    call on every request; the fork is handled when it happens instead (test below)."""
    import os

    from drawdown.ledger.api import new_request_id

    def no_getpid() -> int:
        raise AssertionError("new_request_id called os.getpid()")

    monkeypatch.setattr(os, "getpid", no_getpid)
    monkeypatch.setattr(os, "urandom", lambda n: pytest.fail("new_request_id read os.urandom"))
    assert len({new_request_id() for _ in range(100)}) == 100


# The child only writes one id to a pipe and exits: no lock of another thread is involved.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_worker_does_not_repeat_the_parents_request_ids() -> None:
    import os

    from drawdown.ledger.api import new_request_id

    new_request_id()  # the parent's generator exists before the fork
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its next id, then leave without pytest's clean-up
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    ours = new_request_id()
    with os.fdopen(read) as pipe:
        theirs = pipe.read()
    os.waitpid(child, 0)
    random_bits = (1 << 74) - 1  # compare the random parts: the milliseconds may coincide
    assert uuid.UUID(ours).int & random_bits != uuid.UUID(theirs).int & random_bits


def test_closing_waits_for_a_checkpoint_in_progress(tmp_path: Any) -> None:
    """The proxy checkpoints from a thread every second; shutdown closes the ledger from the
    event loop. A checkpoint must never run on a connection being closed (a crash, SIGSEGV)."""
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    ledger.reserve(row(), [claim(requests=5)], Amount(requests=1), NOW + 900)
    stop, errors, runs = threading.Event(), [], [0]

    def checkpoints() -> None:
        while not stop.is_set():
            try:
                ledger.checkpoint()
                runs[0] += 1
            except LedgerError as exc:
                errors.append(str(exc))
                return

    thread = threading.Thread(target=checkpoints)
    thread.start()
    while runs[0] < 20:
        time.sleep(0.001)
    ledger.close()
    thread.join(5)
    stop.set()
    assert errors and "is closed" in errors[0]
    with pytest.raises(LedgerError, match="is closed"):
        ledger.checkpoint()


def _spy_checkpoints(ledger: SQLiteLedger) -> tuple[list[str], threading.Event]:
    """The threads ledger.checkpoint ran on, and an event set at each run."""
    threads: list[str] = []
    ran = threading.Event()
    real = ledger.checkpoint

    def checkpoint() -> None:
        threads.append(threading.current_thread().name)
        real()
        ran.set()

    ledger.checkpoint = checkpoint  # type: ignore[method-assign]
    return threads, ran


def test_the_writer_wakes_the_checkpoint_thread_after_enough_rows(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the ledger's full rate a checkpoint a second let the WAL reach wal_autocheckpoint
    several times a second, and the writer copied it itself. The writer wakes the thread
    instead, long before that; the WAL's frames are then in the database."""
    import drawdown.ledger.sqlite as sqlite_ledger

    monkeypatch.setattr(sqlite_ledger, "CHECKPOINT_CHANGES", 40)
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    threads, ran = _spy_checkpoints(ledger)
    ledger.start_checkpoints(every=3600)  # never on the clock here: only when woken
    for _ in range(3):  # 3 rows each (decision, hold, instance): not yet 40
        ledger.reserve(row(), [claim(requests=100)], Amount(requests=1), NOW + 900)
    assert not ran.wait(0.2) and threads == []
    for _ in range(12):
        ledger.reserve(row(), [claim(requests=100)], Amount(requests=1), NOW + 900)
    assert ran.wait(10)
    assert threads[0] == "drawdown-checkpoint"
    busy, frames, copied = ledger.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert (busy, copied) == (0, frames)
    ledger.close()


def test_checkpoints_run_every_interval_and_stop_with_the_ledger(tmp_path: Any) -> None:
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    threads, ran = _spy_checkpoints(ledger)
    ledger.start_checkpoints(every=0.01)
    ledger.start_checkpoints(every=0.01)  # once is enough: still one thread
    assert ran.wait(10)
    running = [t for t in threading.enumerate() if t.name == "drawdown-checkpoint"]
    assert len(running) == 1
    ledger.close()
    assert not running[0].is_alive()
    assert set(threads) == {"drawdown-checkpoint"}


def test_the_async_ledger_checkpoints_its_sqlite_ledger_until_closed(tmp_path: Any) -> None:
    """The proxy's writer (AsyncLedger) starts the ledger's checkpoint thread and stops it when
    it is closed (a reconfigured --db must not leave one running on the old file)."""
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    worker = AsyncLedger(ledger)
    (thread,) = [t for t in threading.enumerate() if t.name == "drawdown-checkpoint"]
    worker.close()
    assert not thread.is_alive()
    AsyncLedger(ledger, checkpoints=False).close()
    assert not [t for t in threading.enumerate() if t.name == "drawdown-checkpoint"]
    ledger.close()


def test_a_writer_polls_for_the_lock_another_process_holds(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's busy handler backs off to 100 ms sleeps, so a proxy kept losing the lock to
    another proxy's busy writer (a 0.7 s p99 with --workers 2). The ledger polls in short,
    jittered steps instead, and gives up only after its busy timeout."""
    import sqlite3

    from drawdown.ledger import sqlite as sqlite_module

    ledger = SQLiteLedger(tmp_path / "ledger.db")
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's writer, mid-batch
    sleeps: list[float] = []
    polled = threading.Event()
    real_sleep = time.sleep

    def recorded(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) >= 5:
            polled.set()
        real_sleep(seconds)

    monkeypatch.setattr(sqlite_module.time, "sleep", recorded)
    outcome: list[Any] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(
            ledger.reserve(row(), [claim(requests=5)], Amount(requests=1), NOW + 900)
        )
    )
    waiter.start()
    polled.wait(5)  # without polling nothing is recorded: the lock is let go after 5 s
    other.execute("COMMIT")
    waiter.join(10)
    assert outcome and outcome[0].decision == "allow"
    assert len(sleeps) >= 5 and max(sleeps) <= 0.0004, sleeps[:10]

    # Held for longer than the busy timeout: a LedgerError (the proxy answers per on_ledger_error).
    impatient = SQLiteLedger(tmp_path / "ledger.db", busy_timeout=0.05)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(LedgerError, match="database is locked"):
        impatient.reserve(row(), [claim(requests=5)], Amount(requests=1), NOW + 900)
    other.execute("COMMIT")
    other.close()
    impatient.close()
    ledger.close()


def test_an_application_database_is_refused_without_a_descriptor_left_open(
    tmp_path: Any,
) -> None:
    """A foreign database swapped in under the proxy is looked at again every maintenance
    tick (create=False): each refusal must close what it opened."""
    import sqlite3

    from drawdown.ledger.api import NotALedger

    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(NotALedger, match="tables drawdown does not make \\(users\\)"):
            SQLiteLedger(foreign, create=False)
    assert len(os.listdir("/proc/self/fd")) <= before + 2  # not one a try


def test_a_new_sqlite_ledger_uses_small_pages_and_an_old_one_keeps_its_own(tmp_path: Any) -> None:
    import sqlite3

    fresh = SQLiteLedger(tmp_path / "new.db")
    assert fresh.conn.execute("PRAGMA page_size").fetchone() == (1024,)
    fresh.close()
    # A ledger made before small pages: its page size, once it has content, is its own.
    SQLiteLedger(tmp_path / "old.db").close()
    old = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    old.execute("PRAGMA journal_mode = DELETE")  # a WAL file's page size cannot change
    old.execute("PRAGMA page_size = 4096")
    old.execute("VACUUM")
    old.close()
    kept = SQLiteLedger(tmp_path / "old.db")
    assert kept.conn.execute("PRAGMA page_size").fetchone() == (4096,)
    kept.reserve(row(), [claim(requests=5)], Amount(requests=1), NOW + 900)
    kept.close()


def _open_fresh(path: str, barrier: Any, out: Any) -> None:
    barrier.wait()  # every process opens the new file at the same moment
    try:
        SQLiteLedger(path).close()
        out.put("ok")
    except LedgerError as exc:
        out.put(str(exc))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_proxies_opening_a_new_ledger_file_together_all_open_it(tmp_path: Any) -> None:
    """`drawdown run --workers N` starts N processes on one new file. Switching it to WAL
    could fail at once with 'database is locked' (SQLite does not call its busy handler
    there): one worker then answered 503 until it reopened the ledger."""
    ctx = multiprocessing.get_context("fork")  # the children only open and close a ledger
    outcomes = []
    for round_ in range(12):
        path = str(tmp_path / f"ledger-{round_}.db")
        barrier, out = ctx.Barrier(4), ctx.Queue()
        processes = [ctx.Process(target=_open_fresh, args=(path, barrier, out)) for _ in range(4)]
        for p in processes:
            p.start()
        outcomes += [out.get(timeout=60) for _ in processes]
        for p in processes:
            p.join(60)
    assert outcomes == ["ok"] * 48, [o for o in outcomes if o != "ok"]


def test_a_reader_opens_a_ledger_as_immutable_only_when_no_process_has_it_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where SQLite cannot make the -shm file, the reader falls back to an immutable open; with
    a -wal or -shm beside the ledger a writer may hold pages the file lacks, so it does not."""
    from drawdown.ledger import reader as reader_module

    db = tmp_path / "ledger.db"
    SQLiteLedger(db).close()
    opened: list[str] = []
    real_connect = reader_module._connect

    def connect(uri: str) -> sqlite3.Connection:
        opened.append(uri.rsplit("?", 1)[1])
        if "immutable" not in uri:
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(uri)

    monkeypatch.setattr(reader_module, "_connect", connect)
    reader_module.Reader(str(db)).close()
    assert opened == ["mode=ro", "mode=ro&immutable=1"]
    (tmp_path / "ledger.db-wal").write_bytes(b"")
    opened.clear()
    with pytest.raises(LedgerError, match="unable to open database file"):
        reader_module.Reader(str(db))
    assert opened == ["mode=ro"]
