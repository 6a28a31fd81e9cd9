"""The ledger as a state machine, on both backends: random interleavings of reserve,
commit (actual below, equal to and above the estimate), release, settling twice, TTL
extension, the clock moving on with sweeps, and a proxy process that dies and whose lease
lapses — across overlapping budget instances in all three units.

A plain-Python model predicts every decision and every settle; after each step the
ledger's own tables must agree with it and with these invariants:

1. for every instance and unit, `reserved` is the sum of the estimates of the active holds
   on it, and `spent + reserved ≤ limit` unless a commit above its estimate (or a late
   commit) pushed the instance over;
2. every hold ends exactly once (active → committed | released | expired, never again),
   each instance's `spent` is the sum of the actuals charged by the holds on it, and every
   request has exactly one decision row;
3. after a sweep past every TTL nothing is active.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from drawdown.ledger.api import UNITS, Amount, Claim, Completion, DecisionRow, LeaseWatch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from tests.support_pg import LedgerBackend, fresh_schema

LEASE = 30.0
_TABLES = "budget_instances, processes, holds, decisions, events, facts"

# Two runs of one agent under one tenant: every request is charged to its run, the agent
# and the tenant (overlapping instances), and trialled against a shadow token budget.
LIMITS: dict[tuple[str, str], tuple[int | None, int | None, int | None]] = {
    ("run", "agent:a/run:r1"): (1_000, 500, 6),
    ("run", "agent:a/run:r2"): (800, None, 4),
    ("agent", "agent:a"): (2_500, None, None),
    ("tenant", "tenant:t"): (None, 1_500, 9),
    ("shadow", "agent:a"): (None, 300, None),
}
SHADOW = {("shadow", "agent:a")}


def claims_for(run: str) -> list[Claim]:
    keys = [("run", f"agent:a/run:{run}"), ("agent", "agent:a"), ("tenant", "tenant:t")]
    keys.append(("shadow", "agent:a"))
    return [Claim(b, s, *LIMITS[b, s], shadow=(b, s) in SHADOW) for b, s in keys]


@dataclass
class ModelHold:
    owner: str
    keys: list[tuple[str, str]]
    est: tuple[int, int, int]
    expires_at: float
    state: str = "active"
    charged: tuple[int, int, int] | None = None  # what it charged (commit or late commit)
    history: list[str] = field(default_factory=lambda: ["active"])


@dataclass
class ModelInstance:
    limits: tuple[int | None, int | None, int | None]
    spent: list[int] = field(default_factory=lambda: [0, 0, 0])
    reserved: list[int] = field(default_factory=lambda: [0, 0, 0])
    overage: bool = False  # a commit above its estimate (or a late commit) may exceed the limit


amounts = st.tuples(
    st.integers(0, 400), st.integers(0, 300), st.integers(0, 2)
)  # usd (nano-USD), tokens, requests


class LedgerMachine(RuleBasedStateMachine):
    """`fresh()` gives each example an empty ledger location (a LedgerBackend)."""

    fresh: Any = None
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.backend: LedgerBackend = type(self).fresh()
        self.now = float(int(time.time())) + 1  # processes register with the real clock
        # Each sweeper measures the others' leases on its own clock (LeaseWatch): here, the
        # machine's. A lease lapses once the sweeper has seen a heartbeat unchanged for LEASE.
        self.procs: dict[str, Any] = {
            name: self.backend.open(process_id=name, leases=LeaseWatch(clock=lambda: self.now))
            for name in ("A", "B")
        }
        # The model of each sweeper's watch: owner -> (heartbeat seen, unchanged since).
        self.watched: dict[str, dict[str, tuple[float, float]]] = {"A": {}, "B": {}}
        self.alive = {"A": True, "B": True}
        self.heartbeats = {"A": self.now, "B": self.now}
        for name in ("A", "B"):
            self.procs[name].heartbeat(self.now)
        self.instances: dict[tuple[str, str], ModelInstance] = {}
        self.model_holds: dict[int, ModelHold] = {}
        self.requests = 0
        self.snapshot: dict[int, str] = {}

    @initialize()
    def nothing_yet(self) -> None:
        assert self.backend.scalar("SELECT COUNT(*) FROM holds") == 0

    # --- rules ---------------------------------------------------------------------------

    @rule(
        target=holds,
        proc=st.sampled_from(["A", "B"]),
        run=st.sampled_from(["r1", "r2"]),
        estimate=amounts,
        ttl=st.sampled_from([5.0, 60.0, 900.0]),
    )
    def reserve(self, proc: str, run: str, estimate: tuple[int, int, int], ttl: float) -> Any:
        if not self.alive[proc]:
            proc = "A"
        claims = claims_for(run)
        expected = self._decide(claims, estimate)
        row = DecisionRow(
            request_id=uuid.uuid4().hex,
            ts=self.now,
            decision="allow",
            mode="enforce",
            scope=f"tenant:t/agent:a/run:{run}",
            agent="a",
            run=run,
            action="llm",
        )
        outcome = self.procs[proc].reserve(row, claims, Amount(*estimate), self.now + ttl)
        self.requests += 1
        assert outcome.decision == expected == row.decision
        if expected == "deny":
            assert outcome.hold_id is None and outcome.shortfalls
            return multiple()
        keys = [(c.budget, c.scope) for c in claims]
        for key in keys:
            inst = self._instance(key)
            for u in range(3):
                inst.reserved[u] += estimate[u]
        self._check_fits(claims)
        assert outcome.hold_id not in self.model_holds
        self.model_holds[outcome.hold_id] = ModelHold(proc, keys, estimate, self.now + ttl)
        return outcome.hold_id

    @rule(hold=holds, how=st.sampled_from(["below", "equal", "above"]))
    def commit(self, hold: int, how: str) -> None:
        h = self.model_holds[hold]
        actual = tuple({"below": e // 2, "equal": e, "above": e * 2 + 1}[how] for e in h.est)
        settled = self._settler(h).commit(
            "unused", hold, Completion(actual=Amount(*actual), status=200), self.now
        )
        if h.state == "active":
            self._apply(h, [-e for e in h.est], actual, overage=how == "above")
            h.state, h.charged = "committed", actual  # type: ignore[assignment]
            h.history.append("committed")
            assert (settled.applied, settled.state) == (True, "committed")
            over = any(self._instance(k).limits[u] is not None and self._instance(k).spent[u] > self._instance(k).limits[u] for k in h.keys for u in range(3))  # fmt: skip
            assert bool(settled.overage) == over
        elif h.state == "expired" and h.charged is None:
            self._apply(h, [0, 0, 0], actual, overage=True)  # late commit: the money was spent
            h.charged = actual  # type: ignore[assignment]
            assert (settled.applied, settled.state) == (True, "expired")
        else:
            assert (settled.applied, settled.state) == (False, h.state)

    @rule(
        hold=holds,
        how=st.sampled_from(["below", "above"]),
        then=st.sampled_from(["commit", "release"]),
    )
    def settle_twice(self, hold: int, how: str, then: str) -> None:
        """A retried settle (or commit racing release) never applies twice."""
        self.commit(hold, how)
        if then == "commit":
            self.commit(hold, how)
        else:
            self.release(hold)

    @rule(hold=holds)
    def release(self, hold: int) -> None:
        h = self.model_holds[hold]
        settled = self._settler(h).release("unused", hold, Completion(), "released", self.now)
        if h.state == "active":
            self._apply(h, [-e for e in h.est], (0, 0, 0))
            h.state = "released"
            h.history.append("released")
            assert (settled.applied, settled.state) == (True, "released")
        else:
            assert (settled.applied, settled.state) == (False, h.state)

    @rule(hold=holds, more=st.sampled_from([10.0, 600.0]))
    def extend(self, hold: int, more: float) -> None:
        h = self.model_holds[hold]
        self._settler(h).extend([hold], self.now + more)
        if h.state == "active":
            h.expires_at = max(h.expires_at, self.now + more)

    @rule(seconds=st.sampled_from([1.0, 10.0, 31.0, 120.0]), sweeper=st.sampled_from(["A", "B"]))
    def advance_and_sweep(self, seconds: float, sweeper: str) -> None:
        self.now += seconds
        for name, alive in self.alive.items():
            if alive:
                self.procs[name].heartbeat(self.now)
                self.heartbeats[name] = self.now
        self._sweep("A" if not self.alive[sweeper] else sweeper)

    @rule()
    def b_dies(self) -> None:
        if self.alive["B"]:
            LedgerBackend.crash(self.procs["B"])  # no clean shutdown: its holds stay active
            self.alive["B"] = False

    @rule()
    def sweep_past_every_ttl(self) -> None:
        last = max((h.expires_at for h in self.model_holds.values()), default=self.now)
        self.now = max(self.now, last) + 1
        self.procs["A"].heartbeat(self.now)
        self.heartbeats["A"] = self.now
        if self.alive["B"]:
            self.procs["B"].heartbeat(self.now)
            self.heartbeats["B"] = self.now
        self._sweep("A")
        assert self.backend.scalar("SELECT COUNT(*) FROM holds WHERE state = 'active'") == 0

    # --- the model ---------------------------------------------------------------------------

    def _instance(self, key: tuple[str, str]) -> ModelInstance:
        if key not in self.instances:
            self.instances[key] = ModelInstance(LIMITS[key])
        return self.instances[key]

    def _decide(self, claims: list[Claim], estimate: tuple[int, int, int]) -> str:
        enforced = shadow = False
        for c in claims:
            inst = self._instance((c.budget, c.scope))
            for u in range(3):
                limit = inst.limits[u]
                if limit is not None and inst.spent[u] + inst.reserved[u] + estimate[u] > limit:
                    shadow |= c.shadow
                    enforced |= not c.shadow
        return "deny" if enforced else "would_deny" if shadow else "allow"

    def _check_fits(self, claims: list[Claim]) -> None:
        """Right after an admitted reserve, every enforced instance it holds on fits its limit."""
        for c in claims:
            inst = self._instance((c.budget, c.scope))
            for u, limit in enumerate(inst.limits):
                if limit is not None and not c.shadow:
                    assert inst.spent[u] + inst.reserved[u] <= limit or inst.overage

    def _apply(
        self, h: ModelHold, reserved: list[int], spent: tuple[int, ...], overage: bool = False
    ) -> None:
        for key in h.keys:
            inst = self._instance(key)
            inst.overage |= overage
            for u in range(3):
                inst.reserved[u] += reserved[u]
                inst.spent[u] += spent[u]

    def _settler(self, h: ModelHold) -> Any:
        return self.procs[h.owner] if self.alive[h.owner] else self.procs["A"]

    def _sweep(self, sweeper: str) -> None:
        def active() -> list[ModelHold]:
            return [h for h in self.model_holds.values() if h.state == "active"]

        def holders() -> set[str]:
            return {h.owner for h in active() if h.owner != sweeper}

        # The proxies whose heartbeats the sweeper reads: those holding something. PostgreSQL
        # reads them before the TTLs expire holds (one statement ends both), SQLite after.
        watched = holders() if self.backend.kind == "postgres" else None
        expired = [h for h in active() if h.expires_at < self.now]
        self._expire(expired)
        seen, now_seen = self.watched[sweeper], {}
        for owner in holders() if watched is None else watched:
            beat = self.heartbeats[owner]
            before = seen.get(owner)
            since = before[1] if before is not None and before[0] == beat else self.now
            now_seen[owner] = (beat, since)
        self.watched[sweeper] = now_seen
        dead = {owner for owner, (_, since) in now_seen.items() if self.now - since >= LEASE}
        lapsed = [h for h in active() if h.owner in dead]
        self._expire(lapsed)
        assert self.procs[sweeper].sweep(self.now, LEASE) == len(expired) + len(lapsed)

    def _expire(self, holds: list[ModelHold]) -> None:
        for h in holds:
            self._apply(h, [-e for e in h.est], (0, 0, 0))
            h.state = "expired"
            h.history.append("expired")

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def ledger_matches_the_model_and_its_invariants(self) -> None:
        holds = {
            r["id"]: r
            for r in self.backend.dicts(
                "SELECT id, state, instance_ids, est_usd, est_tokens, est_requests, actual_usd, "
                "actual_tokens, actual_requests FROM holds"
            )
        }
        assert set(holds) == set(self.model_holds)
        # (2) each hold moved at most once, from active to an end state.
        for hold_id, h in self.model_holds.items():
            state = holds[hold_id]["state"]
            assert state == h.state
            previous = self.snapshot.get(hold_id, "active")
            assert state == previous or (previous == "active" and state != "active")
            assert h.history in (["active"], ["active", state])
        self.snapshot = {i: r["state"] for i, r in holds.items()}
        instances = self.backend.dicts("SELECT * FROM budget_instances")
        assert len(instances) == len(self.instances)
        for row in instances:
            inst = self.instances[row["budget"], row["scope"]]
            spent = [row[f"spent_{u}"] for u in UNITS]
            reserved = [row[f"reserved_{u}"] for u in UNITS]
            assert (spent, reserved) == (inst.spent, inst.reserved)
            ids = [
                h
                for h, r in holds.items()
                if str(row["id"]) in (r["instance_ids"] or "").split(",")
            ]
            for u, unit in enumerate(UNITS):
                # (1) held = the estimates of the active holds on it
                assert reserved[u] == sum(
                    holds[h][f"est_{unit}"] for h in ids if holds[h]["state"] == "active"
                )
                # (2) spent = the actuals its holds charged
                assert spent[u] == sum(holds[h][f"actual_{unit}"] or 0 for h in ids)
                limit = row[f"limit_{unit}"]
                if limit is not None and (row["budget"], row["scope"]) not in SHADOW:
                    assert spent[u] + reserved[u] <= limit or inst.overage
        # (2) exactly one decision row per request
        assert self.backend.scalar("SELECT COUNT(*) FROM decisions") == self.requests
        assert (
            self.backend.scalar("SELECT COUNT(DISTINCT request_id) FROM decisions") == self.requests
        )

    def teardown(self) -> None:
        for name, proc in self.procs.items():
            if self.alive[name]:
                proc.close()
        self.backend.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """How to get an empty ledger for each example, and how many examples to run."""
    if request.param == "sqlite":
        counter = iter(range(10**6))
        yield "sqlite", lambda: LedgerBackend("sqlite", str(tmp_path / f"l{next(counter)}.db"))
        return
    with fresh_schema("prop", node_id=request.node.nodeid) as url:
        shared = LedgerBackend("postgres", url)
        shared.open().close()  # create the tables once; each example starts from empty ones

        def empty() -> LedgerBackend:
            shared.execute(f"TRUNCATE {_TABLES} RESTART IDENTITY")
            return LedgerBackend("postgres", url)

        yield "postgres", empty
        shared.close()


def test_ledger_state_machine(location: tuple[str, Any]) -> None:
    kind, fresh = location
    machine = type(f"LedgerMachine_{kind}", (LedgerMachine,), {"fresh": staticmethod(fresh)})
    # PostgreSQL: fewer, shorter runs keep the suite fast; the rules are the same.
    examples, steps = (50, 40) if kind == "sqlite" else (12, 30)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
