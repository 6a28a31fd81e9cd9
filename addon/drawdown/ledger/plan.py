"""A batch's decisions, computed in Python on rows its backend holds exclusively.

Both backends run the hot operations (reserve, record, commit, release) of a batch the
same way: read every budget instance and hold the batch touches once — SQLite under its
single write lock, PostgreSQL under row locks — decide each operation in order on those
values (check every instance first, then apply to all or none), and write the result
back with one statement per kind. Only the reading and the writing differ per backend;
what is decided, and in which words, is this module's, so the two cannot drift apart.

The anomaly guards (loop, step_count, fan_out) work the same way: the backend reads
the counts the batch needs, and `Counts` keeps them current as each operation of the
batch adds its decision row, so every reserve sees the rows before it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .api import (
    BATCH_HOLDER,
    LOOP_HINT,
    PROXY_REFUSALS,
    UNITS,
    Amount,
    BatchHold,
    Claim,
    Completion,
    DecisionRow,
    Guards,
    LedgerError,
    ReserveOutcome,
    Settled,
    Shortfall,
    Tripped,
    deciding_first,
    decision_values,
    forgiven,
    is_failed_attempt,
    is_window_refusal,
)

# Operations decided by the planner; everything else (maintenance) runs as SQL of its own.
HOT = frozenset({"reserve", "record", "commit", "release", "history"})

INSTANCE_COLUMNS = (
    "id, budget, scope, window_start, limit_usd, limit_tokens, limit_requests, spent_usd, "
    "spent_tokens, spent_requests, reserved_usd, reserved_tokens, reserved_requests, updated_at"
)
HOLD_COLUMNS = (
    "id, request_id, process_id, state, expires_at, settled_at, settle_reason, instance_ids, "
    "est_usd, est_tokens, est_requests, actual_usd, actual_tokens, actual_requests, usage_source"
)
# The column order of Plan.new_holds (state is always 'active').
NEW_HOLD_FIELDS = (
    "id",
    "request_id",
    "process_id",
    "created_at",
    "expires_at",
    "instance_ids",
    "est_usd",
    "est_tokens",
    "est_requests",
)
# The column order of Plan.completions (the decision row a settlement completes).
COMPLETION_FIELDS = (
    "status",
    "actual_usd",
    "tokens_in",
    "tokens_out",
    "usage_source",
    "priced",
    "model",
    "latency_ms",
    "upstream_ms",
    "completed_at",
    "note",
    "request_id",
)


# The usual answer to a commit, made once: Settled is immutable.
COMMITTED = Settled(True, "committed")


def negate(values: Sequence[int]) -> tuple[int, int, int]:
    return (-values[0], -values[1], -values[2])


def amount(a: Amount) -> tuple[int, int, int]:
    return (a.usd, a.tokens, a.requests)


def guards_of(args: tuple[Any, ...]) -> Guards | None:
    """The guards of a `reserve` call's arguments, if it has any that apply."""
    guards = args[4] if len(args) > 4 else None
    return guards if guards is not None and guards.any else None


@dataclass(slots=True)  # slots: made and changed per operation of a batch
class Instance:
    id: int
    key: tuple[str, str, int]
    limits: list[int | None]  # usd, tokens, requests (UNITS order)
    spent: tuple[int, int, int]  # replaced, not changed in place: see Plan.apply
    reserved: tuple[int, int, int]
    updated_at: float | None
    dirty: bool = False

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> Instance:
        """A row of INSTANCE_COLUMNS."""
        return cls(r[0], (r[1], r[2], r[3]), list(r[4:7]), tuple(r[7:10]), tuple(r[10:13]), r[13])

    def has_room(self, needed: Sequence[int]) -> bool:
        """spent + reserved + needed ≤ limit, for every unit that has a limit."""
        (usd, tokens, requests), s, r = self.limits, self.spent, self.reserved
        return (
            (usd is None or s[0] + r[0] + needed[0] <= usd)
            and (tokens is None or s[1] + r[1] + needed[1] <= tokens)
            and (requests is None or s[2] + r[2] + needed[2] <= requests)
        )

    def values(self) -> tuple[Any, ...]:
        """id, limits, spent, reserved, updated_at: what a write of the instance sets."""
        return (self.id, *self.limits, *self.spent, *self.reserved, self.updated_at)


@dataclass(slots=True)  # slots: made and changed per operation of a batch
class Hold:
    id: int
    request_id: str
    process_id: str
    state: str
    expires_at: float | None
    settled_at: float | None
    settle_reason: str | None
    instance_ids: list[int]
    est: tuple[int, int, int]
    actual: list[int | None]
    usage_source: str | None
    was: str = ""  # the state read: the write is guarded by it
    dirty: bool = False

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> Hold:
        """A row of HOLD_COLUMNS."""
        # Unique, as reserve writes them (dict.fromkeys: a row from before it did, too).
        ids = list(dict.fromkeys(int(i) for i in r[7].split(","))) if r[7] else []
        return cls(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            r[6],
            ids,
            (r[8], r[9], r[10]),
            list(r[11:14]),
            r[14],
            was=r[3],
        )

    def values(self) -> tuple[Any, ...]:
        """id, the state read, then what a write of the hold sets."""
        return (
            self.id,
            self.was,
            self.state,
            self.settled_at,
            self.settle_reason,
            *self.actual,
            self.usage_source,
        )


def failing(completion: Completion) -> bool:
    """A settlement that makes its (forwarded, fingerprinted) decision row a failed attempt."""
    return isinstance(completion, Completion) and is_failed_attempt(
        "allow", "-", completion.status, True
    )


@dataclass
class Counts:
    """What the anomaly guards count, kept current as the batch adds decision rows."""

    repeats: dict[tuple[str, str], int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    # scope -> fingerprint -> the run's failed attempts of that request (api.failed_attempt),
    # for every scope the loop or step_count guards of the batch count
    failed: dict[str, dict[str, int]] = field(default_factory=dict)
    # (scope, fingerprint) -> a budget window's refusals among the rows `repeats` counted
    # (api.WINDOW_REFUSAL): the loop guard forgives them as failed attempts, within `retries`
    window_refusals: dict[tuple[str, str], int] = field(default_factory=dict)
    # request id -> (scope, fingerprint): counted rows still in flight that a settlement of
    # this batch may turn into failed attempts (read by the backend, or added by the batch)
    inflight: dict[str, tuple[str, str]] = field(default_factory=dict)
    runs: dict[tuple[str, str], int] = field(default_factory=dict)
    known: set[tuple[str, str]] = field(default_factory=set)  # (workflow, scope) seen
    # The repeats and steps whose count stopped at its cap (GuardKeys): there may be more,
    # so a refusal says "at least" rather than understate a loop as its cap.
    capped_repeats: set[tuple[str, str]] = field(default_factory=set)
    capped_steps: set[str] = field(default_factory=set)
    seen: set[tuple[str, str, str]] = field(default_factory=set)  # (workflow, tenant, scope)

    def add(self, row: DecisionRow, refused: bool = False) -> None:
        """A decision row the batch records (before the next reserve is checked). `refused`:
        a guard denies it, though its row still reads "allow" until the reserve is decided."""
        if row.reason_code in PROXY_REFUSALS:  # the proxy's state, not the agent's: not counted
            return
        key = (row.scope, row.fingerprint or "")
        if row.fingerprint and key in self.repeats:
            self.repeats[key] += 1
            if not refused and is_window_refusal(row.decision, row.reason_code, row.status):
                self.window_refusals[key] = self.window_refusals.get(key, 0) + 1
        if row.scope in self.steps:
            self.steps[row.scope] += 1
        if refused or row.decision == "deny":
            return  # neither in flight nor a run of its workflow
        if row.fingerprint and row.scope in self.failed:
            self.inflight[row.request_id] = (row.scope, row.fingerprint)
        # Only runs that got a request through count: a run refused at its first request
        # must not become "known" through its own denied row (nor let the batch's next
        # request of that run through as a known run).
        if row.workflow is not None:
            self.known.add((row.workflow, row.scope))
            run = (row.workflow, row.tenant or "", row.scope)
            if run not in self.seen:
                self.seen.add(run)
                if run[:2] in self.runs:
                    self.runs[run[:2]] += 1

    def settle(self, request_id: str, completion: Completion) -> None:
        """A commit or release of the batch: a row in flight that failed retryably is forgiven
        by the next reserve, as it will be once the batch is written."""
        where = self.inflight.pop(request_id, None)
        if where is not None and failing(completion):
            scope, fingerprint = where
            runs = self.failed[scope]
            runs[fingerprint] = runs.get(fingerprint, 0) + 1

    def forgiven(self, scope: str, fingerprint: str | None, retries: int) -> int:
        """The failed attempts of one request in `scope` the loop guard does not count: a
        budget window's refusals among them."""
        if not fingerprint:
            return 0
        failed = self.failed.get(scope, {}).get(fingerprint, 0)
        return forgiven(failed + self.window_refusals.get((scope, fingerprint), 0), retries)

    def forgiven_steps(self, scope: str, retries: int) -> int:
        """The failed attempts in `scope` the step count leaves out: up to `retries` per request."""
        return sum(forgiven(n, retries) for n in self.failed.get(scope, {}).values())

    def trip(self, row: DecisionRow, guards: Guards) -> Tripped | None:
        """The first guard this reserve would trip (drawdown replay asks the same questions)."""
        if guards.max_repeats is not None and row.fingerprint:
            repeats = self.repeats[row.scope, row.fingerprint] - self.forgiven(
                row.scope, row.fingerprint, guards.retries
            )
            if repeats >= guards.max_repeats:
                at_least = (
                    "at least " if (row.scope, row.fingerprint) in self.capped_repeats else ""
                )
                return Tripped(
                    "loop",
                    f"loop: this identical {row.action} request was already made {at_least}{repeats} times in "
                    f"{row.scope} (anomalies.loop.repeats: {guards.max_repeats}; {LOOP_HINT})",
                )
        if guards.max_steps is not None:
            steps = self.steps[row.scope] - self.forgiven_steps(row.scope, guards.retries)
            if steps >= guards.max_steps:
                at_least = "at least " if row.scope in self.capped_steps else ""
                return Tripped(
                    "step_count",
                    f"step_count: {row.scope} already took {at_least}{steps} steps (anomalies.step_count.max: {guards.max_steps})",
                )
        if (
            guards.max_runs_per_workflow is not None
            and row.workflow is not None
            and (row.workflow, row.scope) not in self.known  # a new run of the workflow
        ):
            runs = self.runs[row.workflow, row.tenant or ""]
            if runs >= guards.max_runs_per_workflow:
                return Tripped(
                    "fan_out",
                    f"fan_out: workflow {row.workflow} already has {runs} runs "
                    f"(anomalies.fan_out.max_runs_per_workflow: {guards.max_runs_per_workflow})",
                )
        return None


def fan_out_turns_on_budgets(
    row: DecisionRow, guards: Guards, counts: Counts, undecided: dict[tuple[str, str], set[str]]
) -> bool:
    """Whether fan_out would decide this reserve one way if the batch's new runs before it
    (`undecided`) pass their budgets and another if some do not. Counted as runs so far,
    each of them may still not be one; only near the limit does that matter."""
    limit = guards.max_runs_per_workflow
    if limit is None or row.workflow is None:
        return False
    workflow = (row.workflow, row.tenant or "")
    maybe = undecided.get(workflow)
    if not maybe:
        return False
    runs = counts.runs.get(workflow, 0)
    if row.scope in maybe:  # a known run, or, its first reserve refused, a new one
        return runs - 1 >= limit
    if (row.workflow, row.scope) in counts.known:
        return False
    return runs - len(maybe) < limit <= runs  # a new run: refused or not, as those decide


def step_cap(max_steps: int, retries: int, failed: dict[str, int], settling: int) -> int:
    """How far step_count must count a run's rows to decide as if it counted them all: past
    `max_steps` by every failed attempt it may forgive (`failed`: the run's, by fingerprint;
    `settling`: rows in flight the batch may turn into more). Past that, a run has tripped
    whatever the rest holds."""
    return max_steps + sum(forgiven(n, retries) for n in failed.values()) + settling


@dataclass(frozen=True)
class GuardKeys:
    """What a batch's guards must count, for the backend to read.

    Counts are capped: a guard only asks whether its limit is reached, so the backend
    stops counting past it (`repeat_caps`, step_cap() of `step_limits`, `run_caps`).
    Uncapped, an agent that goes on calling after it was refused would make every one of
    its reserves count all its refusals so far: 55 ms a reserve after 50,000, on the writer
    every proxy request waits for."""

    repeats: list[tuple[str, str]]  # (scope, fingerprint)
    steps: list[str]  # scopes
    runs: list[tuple[str, str]]  # (workflow, tenant or '')
    # The (workflow, scope) of every row of the batch under a workflow: is it a known run?
    pairs: list[tuple[str, str]]
    failed: list[str] = field(default_factory=list)  # scopes whose failed attempts are read
    # request ids the batch settles as failed attempts, whose rows may be in flight in the ledger
    settling: list[str] = field(default_factory=list)
    # loop: count each (scope, fingerprint) up to its max_repeats + retries (the most it forgives)
    repeat_caps: list[int] = field(default_factory=list)
    # step_count: (max_steps, retries) of each scope, for step_cap()
    step_limits: list[tuple[int, int]] = field(default_factory=list)
    run_caps: list[int] = field(default_factory=list)  # fan_out: max_runs_per_workflow
    # The scopes fan_out guards under each (workflow, tenant): its runs need counting only if
    # one of them is a new run (unknown), which happens once a run, not on every request.
    run_scopes: list[list[str]] = field(default_factory=list)

    def runs_to_count(self, known: set[tuple[str, str]]) -> list[int]:
        """The indexes in `runs` of the workflows a reserve of the batch may start a new run in."""
        return [
            i
            for i, ((workflow, _), scopes) in enumerate(
                zip(self.runs, self.run_scopes, strict=True)
            )
            if any((workflow, scope) not in known for scope in scopes)
        ]

    @classmethod
    def of(
        cls,
        guarded: list[tuple[DecisionRow, Guards]],
        rows: list[DecisionRow],
        calls: Sequence[tuple[str, tuple[Any, ...]]] = (),
    ) -> GuardKeys:
        fan = [r for r, g in guarded if g.max_runs_per_workflow is not None and r.workflow]
        # Each key's cap is the largest any guard of the batch needs (policies may differ).
        repeat_caps: dict[tuple[str, str], int] = {}
        step_limits: dict[str, tuple[int, int]] = {}
        run_caps: dict[tuple[str, str], int] = {}
        run_scopes: dict[tuple[str, str], set[str]] = {}
        for r, g in guarded:
            if g.max_repeats is not None and r.fingerprint:
                key = (r.scope, r.fingerprint)
                repeat_caps[key] = max(repeat_caps.get(key, 0), g.max_repeats + max(g.retries, 0))
            if g.max_steps is not None:
                most, retries = step_limits.get(r.scope, (0, 0))
                step_limits[r.scope] = (max(most, g.max_steps), max(retries, g.retries))
            if g.max_runs_per_workflow is not None and r.workflow:
                run = (r.workflow, r.tenant or "")
                run_caps[run] = max(run_caps.get(run, 0), g.max_runs_per_workflow)
                run_scopes.setdefault(run, set()).add(r.scope)
        repeats = sorted(repeat_caps)
        steps = sorted(step_limits)
        failed = sorted({s for s, _ in repeats} | set(steps))
        batch = {r.request_id for r in rows}
        settling = (
            sorted(
                {
                    args[0]
                    for name, args in calls
                    if name in ("commit", "release") and failing(args[2]) and args[0] not in batch
                }
            )
            if failed
            else []
        )
        runs = sorted(run_caps)
        return cls(
            repeats=repeats,
            steps=steps,
            runs=runs,
            pairs=sorted({(r.workflow, r.scope) for r in rows if r.workflow is not None})
            if fan
            else [],
            failed=failed,
            settling=settling,
            repeat_caps=[repeat_caps[key] for key in repeats],
            step_limits=[step_limits[scope] for scope in steps],
            run_caps=[run_caps[run] for run in runs],
            run_scopes=[sorted(run_scopes[run]) for run in runs],
        )


def guarded_reserves(
    calls: Sequence[tuple[str, tuple[Any, ...]]],
) -> list[tuple[DecisionRow, Guards]]:
    return [  # guards_of, inline: no call per reserve of the batch
        (args[0], guards)
        for name, args in calls
        if name == "reserve" and len(args) > 4 and (guards := args[4]) is not None and guards.any
    ]


def settled_hold_ids(calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[int]:
    """The holds the batch's commits and releases settle, in id order (the lock order). A
    malformed id is left out here and fails its own operation ("no hold") in `decide`."""
    return sorted(
        {args[1] for name, args in calls if name in ("commit", "release") and type(args[1]) is int}
    )


def commit_keys(calls: Sequence[tuple[str, tuple[Any, ...]]]) -> tuple[list[str], list[str]]:
    """The keys the batch's commits name, each list sorted (the order PostgreSQL locks them
    in): those they charge under at most once (Completion.once: a batch's results), and those
    of the batch holds they keep, move or end (Completion.batch), whose kept holds the backend
    reads. Nearly every batch has none: one pass, nothing built."""
    once: set[str] | None = None
    kept: set[str] | None = None
    for name, args in calls:
        if name != "commit":
            continue
        completion = args[2]
        if not isinstance(completion, Completion):
            continue
        if completion.once is not None:
            once = once or set()
            once.add(completion.once)
        batch = completion.batch
        if batch is not None and batch.input_estimate is None:  # an input file holds nothing
            kept = kept or set()
            kept.add(batch.key)
            if batch.moved_to is not None:
                kept.add(batch.moved_to)
    return (sorted(once) if once else [], sorted(kept) if kept else [])


def in_order(
    calls: Sequence[tuple[str, tuple[Any, ...]]],
    together: Callable[[list[tuple[str, tuple[Any, ...]]]], list[Any]],
    alone: Callable[[tuple[str, tuple[Any, ...]]], Any],
) -> list[Any]:
    """A batch's results (or exceptions) in call order: the hot operations decided together
    by `together` (which falls back as its backend sees fit), the rest each by `alone`."""
    hot = [i for i, (name, _) in enumerate(calls) if name in HOT]
    if hot and len(hot) == len(calls):  # the usual batch: nothing to sort out
        return together(list(calls))
    results: list[Any] = [None] * len(calls)
    if hot:
        for i, result in zip(hot, together([calls[i] for i in hot]), strict=True):
            results[i] = result
    for i, call in enumerate(calls):
        if call[0] not in HOT:
            results[i] = alone(call)
    return results


def decision_rows(calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[DecisionRow]:
    return [args[0] for name, args in calls if name in ("reserve", "record")]


# The only fields of a DecisionRow that deciding (Plan.reserve) writes: all snapshot keeps.
DECIDED_FIELDS = ("decision", "reason_code", "reason", "status", "budget")
_decided = operator.attrgetter(*DECIDED_FIELDS)


def snapshot(
    calls: Sequence[tuple[str, tuple[Any, ...]]],
) -> list[tuple[DecisionRow, tuple[Any, ...]]]:
    """The DecisionRows of the calls as the caller made them: deciding a reserve writes its
    decision into its row, and an attempt that is rolled back must not leave one behind.
    Five fields, not a copy of the row's __dict__: this runs for every batch."""
    return [(args[0], _decided(args[0])) for name, args in calls if name in ("reserve", "record")]


def restore(saved: list[tuple[DecisionRow, tuple[Any, ...]]]) -> None:
    for row, values in saved:
        row.decision, row.reason_code, row.reason, row.status, row.budget = values


@dataclass(slots=True)  # slots: a plan has one only when a commit names a batch
class BatchJobs:
    """What a plan's commits change of batch jobs (api.BatchHold): the hold kept under each key
    they name (read by the backend for commit_keys' keys, and kept as the plan changes them),
    and the writes that follow."""

    kept: dict[str, int] = field(default_factory=dict)  # key -> the hold kept under it
    kept_holds: list[tuple[Any, ...]] = field(default_factory=list)  # (process_id, expires_at, id)
    new: list[tuple[Any, ...]] = field(default_factory=list)  # (key, hold_id, request_id, ts)
    moved: list[tuple[Any, ...]] = field(default_factory=list)  # (new key, old key)
    inputs: list[tuple[Any, ...]] = field(default_factory=list)  # (key, estimate, request_id, ts)


@dataclass
class Plan:
    """The rows one transaction decides on, the decisions, and the writes they queue."""

    process_id: str
    instances: dict[int, Instance] = field(default_factory=dict)
    by_key: dict[tuple[str, str, int], Instance] = field(default_factory=dict)
    holds: dict[int, Hold] = field(default_factory=dict)
    hold_ids: list[int] = field(default_factory=list)  # new hold ids, handed out by pop()
    replayed: dict[str, tuple[str, int | None, str | None]] = field(default_factory=dict)
    tripped: dict[int, Tripped | None] = field(default_factory=dict)  # by the op's batch index
    skip: set[int] = field(default_factory=set)  # reserves a guard denies: no instances needed
    new_holds: list[tuple[Any, ...]] = field(default_factory=list)
    new_decisions: list[tuple[Any, ...]] = field(default_factory=list)
    completions: list[tuple[Any, ...]] = field(default_factory=list)
    expiries: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    facts: list[tuple[Any, ...]] = field(default_factory=list)
    # Completion.once keys already charged (by request id): read by the backend, and added to
    # as this plan charges under new ones (written out from once_charges).
    charged_once: dict[str, str] = field(default_factory=dict)
    once_charges: list[tuple[Any, ...]] = field(default_factory=list)
    # What the plan's commits change of batch jobs: None for nearly every plan (a field with
    # a default, not a factory: a Plan is made for every transaction).
    jobs: BatchJobs | None = None

    # --- what the backend reads in -------------------------------------------------------------

    def add_instances(self, rows: Iterable[Sequence[Any]]) -> None:
        for r in rows:
            self.use_instance(Instance.from_row(r))

    def add_holds(self, rows: Iterable[Sequence[Any]]) -> None:
        self.use_holds(Hold.from_row(r) for r in rows)

    def use_instance(self, inst: Instance) -> None:
        """A budget instance as read, or as the backend already knows it to stand."""
        self.instances[inst.id] = inst
        self.by_key[inst.key] = inst

    def use_holds(self, holds: Iterable[Hold]) -> None:
        for hold in holds:
            self.holds[hold.id] = hold

    def trip(self, calls: Sequence[tuple[str, tuple[Any, ...]]], counts: Counts) -> int | None:
        """Decide every guard of the batch, in order: each reserve sees the rows before it.

        Returns where the backend must cut the batch, if anywhere, to decide each part on its
        own (the part before a cut has none). The guards are decided before the budgets, and a
        new run whose first reserve a budget may yet refuse is, or is not, a run of its
        workflow: a fan_out-guarded reserve whose outcome turns on that waits for the batch
        before it to be written."""
        # (workflow, tenant) -> the new runs of the batch that a budget may still refuse
        undecided: dict[tuple[str, str], set[str]] = {}
        # The requests (scope, fingerprint) of the batch's reserves a budget window may yet
        # refuse: the loop guard forgives such a refusal (Counts.window_refusals), which here,
        # its row still "allow", would count as a repeat the written ledger does not.
        windowed: set[tuple[str, str]] = set()
        for i, (name, args) in enumerate(calls):
            if name in ("commit", "release"):
                counts.settle(args[0], args[2])
                continue
            if name not in ("reserve", "record"):
                continue
            row = args[0]
            if row.request_id in self.replayed:
                continue  # a replayed row is already decided and counted
            guards = guards_of(args) if name == "reserve" else None
            if guards is not None:
                if undecided and fan_out_turns_on_budgets(row, guards, counts, undecided):
                    return i
                tripped = counts.trip(row, guards)
                if (
                    tripped is not None
                    and tripped.detector == "loop"
                    and (row.scope, row.fingerprint) in windowed
                    and counts.forgiven(row.scope, row.fingerprint, guards.retries) < guards.retries
                ):
                    return i  # tripped perhaps only by a refusal before it: decided after it
                self.tripped[i] = tripped
                if tripped is not None and not guards.shadow:
                    self.skip.add(i)
            if (
                name == "reserve"
                and args[1]  # budgets that may refuse it
                and row.workflow is not None
                and i not in self.skip
                and row.decision != "deny"
                and (row.workflow, row.scope) not in counts.known
            ):
                undecided.setdefault((row.workflow, row.tenant or ""), set()).add(row.scope)
            if (
                name == "reserve"
                and row.fingerprint
                and i not in self.skip
                and any(c.per and not c.shadow for c in args[1])  # a shadow claim refuses nothing
            ):
                windowed.add((row.scope, row.fingerprint))
            counts.add(row, refused=i in self.skip)
        return None

    def claimed_keys(
        self, calls: Sequence[tuple[str, tuple[Any, ...]]]
    ) -> dict[tuple[str, str, int], tuple[Claim, float]]:
        """Every budget instance the batch's reserves need (by key, in first-claim order), with
        the claim and time to create it from if it does not exist yet."""
        keys: dict[tuple[str, str, int], tuple[Claim, float]] = {}
        for i, (name, args) in enumerate(calls):
            if name == "reserve" and i not in self.skip:
                for claim in args[1]:
                    key = (claim.budget, claim.scope, claim.window_start)
                    if key not in keys:  # not setdefault: most keys are there, no pair to build
                        keys[key] = (claim, args[0].ts)
        return keys

    def reserves(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> int:
        """How many new holds the batch may create."""
        return [name for name, _ in calls].count("reserve") - len(self.skip)  # no generator

    # --- deciding ----------------------------------------------------------------------------

    def decide(
        self, calls: Sequence[tuple[str, tuple[Any, ...]]], answers: list[bool]
    ) -> list[Any]:
        """Each operation's result (or exception), in order. `answers`: the batch's history
        queries, answered by the backend, in order."""
        results: list[Any] = []
        for i, (name, args) in enumerate(calls):
            try:
                if name == "history":
                    count = len(args[0])
                    results.append(answers[:count])
                    del answers[:count]
                elif name == "reserve":
                    # Named calls, not getattr: this runs for every operation of a batch.
                    tripped = self.tripped.get(i)
                    row, claims, estimate, expires_at = args[:4]
                    results.append(
                        self.reserve(
                            row,
                            claims,
                            estimate,
                            expires_at,
                            tripped=tripped,
                            guards=None if tripped is None else guards_of(args),
                        )
                    )
                elif name == "commit":
                    results.append(self.commit(*args))
                elif name == "release":
                    results.append(self.release(*args))
                else:  # record: the last of HOT
                    results.append(self.record(*args))
            except Exception as exc:  # e.g. no such hold: this op fails, the batch goes on
                results.append(exc)
        return results

    def apply(
        self,
        ids: Iterable[int],
        reserved: Sequence[int],
        spent: Sequence[int],
        now: float,
        over: list[int] | None = None,
    ) -> None:
        """Add `reserved` and `spent` to each instance of `ids`; `over` (a commit's) gets the
        ids of those then over a limit: checked here, on the values in hand."""
        instances = self.instances
        r0, r1, r2 = reserved
        s0, s1, s2 = spent
        holds, spends = r0 or r1 or r2, s0 or s1 or s2  # a reserve spends nothing, say
        # Unrolled, no method call per instance, and a new tuple rather than three list items
        # changed in place (half the interpreter's steps): this runs for every instance of
        # every operation in a batch.
        for instance_id in ids:  # each listed once: reserve and Hold.from_row see to it
            inst = instances[instance_id]
            if holds:
                ru, rt, rr = inst.reserved
                inst.reserved = (ru + r0, rt + r1, rr + r2)
            if spends:
                su, st, sr = inst.spent
                inst.spent = (su + s0, st + s1, sr + s2)
            inst.updated_at = now
            inst.dirty = True
            if over is not None:
                (lu, lt, lr), (su, st, sr) = inst.limits, inst.spent
                if (
                    (lu is not None and su > lu)
                    or (lt is not None and st > lt)
                    or (lr is not None and sr > lr)
                ):
                    over.append(instance_id)

    def event(
        self,
        kind: str,
        request_id: str | None,
        hold_id: int | None,
        instance_id: int | None,
        detail: str,
        now: float,
    ) -> None:
        self.events.append((now, kind, request_id, hold_id, instance_id, detail))

    def reserve(
        self,
        row: DecisionRow,
        claims: Sequence[Claim],
        estimate: Amount,
        expires_at: float,
        *,
        tripped: Tripped | None = None,
        guards: Guards | None = None,
    ) -> ReserveOutcome:
        earlier = self.replayed.get(row.request_id)
        if earlier is not None:
            # Our previous attempt committed before its connection dropped: that is the answer.
            if earlier[1] is None:  # a denial, whose reasons we no longer have
                raise LedgerError(
                    "the ledger connection dropped while this request's denial was committed"
                )
            row.decision = earlier[0]
            return ReserveOutcome(earlier[0], earlier[1])
        if tripped is not None and guards is not None:
            if not guards.shadow:
                row.decision, row.reason_code, row.reason = "deny", "anomaly", tripped.detail
                row.status = 429
                self.decision(row)
                return ReserveOutcome("deny", None, tripped=tripped)
            if row.decision == "allow":
                row.decision, row.reason_code, row.reason = "would_deny", "anomaly", tripped.detail
        instance_ids: list[int] = []
        shortfalls: list[Shortfall] = []
        shadow_shortfalls: list[Shortfall] = []
        needed = (estimate.usd, estimate.tokens, estimate.requests)  # amount(), inline
        # Check every instance first...
        for claim in claims:
            inst = self.by_key.get((claim.budget, claim.scope, claim.window_start))
            if inst is None:
                raise LedgerError(f"budget instance {claim.budget} {claim.scope} was not read")
            limits = [claim.limit_usd, claim.limit_tokens, claim.limit_requests]
            if inst.limits != limits:  # the policy changed this budget's limits: the new ones apply
                inst.limits = limits
                inst.dirty = True
            if inst.id not in instance_ids:  # two claims on one instance hold on it once
                instance_ids.append(inst.id)
            if inst.has_room(needed):
                continue  # the common case, decided without building anything
            for index, unit in enumerate(UNITS):
                limit = limits[index]
                if limit is None:
                    continue
                spent, reserved = inst.spent[index], inst.reserved[index]
                if spent + reserved + needed[index] > limit:
                    short = Shortfall(claim, unit, limit, spent, reserved, needed[index])
                    (shadow_shortfalls if claim.shadow else shortfalls).append(short)
        # ...then apply to all, or to none.
        if shortfalls:
            shortfalls = deciding_first(shortfalls)
            row.decision = "deny"
            # A shadow verdict's code (a would_deny rule) gives way: the budget refused it.
            row.reason_code = "budget_exhausted"
            row.reason = shortfalls[0].describe()
            row.budget = shortfalls[0].claim.scope
            row.status = 429 if shortfalls[0].waits else 402  # what the agent is answered
            self.decision(row)
            return ReserveOutcome("deny", None, tuple(shortfalls), tuple(shadow_shortfalls))
        if shadow_shortfalls and row.decision == "allow":
            row.decision = "would_deny"
            row.reason_code = "budget_exhausted"
            row.reason = shadow_shortfalls[0].describe()
            row.budget = shadow_shortfalls[0].claim.scope
        self.apply(instance_ids, needed, (0, 0, 0), row.ts)
        hold_id = self.hold_ids.pop()
        ids_text = ",".join(map(str, instance_ids))
        self.new_holds.append(
            (hold_id, row.request_id, self.process_id, row.ts, expires_at, ids_text, *needed)
        )
        self.holds[hold_id] = Hold(
            hold_id,
            row.request_id,
            self.process_id,
            "active",
            expires_at,
            None,
            None,
            instance_ids,
            needed,
            [None, None, None],
            None,
            "active",  # was: the state a write of the hold is guarded by
        )
        self.new_decisions.append(decision_values(row, hold_id))  # self.decision(), inline
        shadows = tuple(shadow_shortfalls) if shadow_shortfalls else ()
        return ReserveOutcome(row.decision, hold_id, (), shadows, tripped)

    def record(self, row: DecisionRow) -> None:
        if row.request_id not in self.replayed:  # else our attempt whose ack was lost recorded it
            self.decision(row)

    def decision(self, row: DecisionRow, hold_id: int | None = None) -> None:
        self.new_decisions.append(decision_values(row, hold_id))

    def hold(self, hold_id: int) -> Hold:
        hold = self.holds.get(hold_id)
        if hold is None:
            raise LedgerError(f"no hold {hold_id}")
        return hold

    def commit(self, request_id: str, hold_id: int, completion: Completion, now: float) -> Settled:
        hold = self.holds.get(hold_id)  # self.hold(), inline: this runs for every commit
        if hold is None:
            raise LedgerError(f"no hold {hold_id}")
        charged_before = False
        if completion.once is not None and (
            hold.state == "active" or (hold.state == "expired" and hold.actual[0] is None)
        ):
            charged = self.charge_once(request_id, completion, now)
            charged_before, completion = charged is not completion, charged
        spent = completion.actual
        actual = (spent.usd, spent.tokens, spent.requests)  # amount(), inline
        batch = completion.batch
        if hold.state == "active":
            over: list[int] = []
            if (
                batch is not None
                and batch.keep_until is not None
                and (self.jobs is None or batch.key not in self.jobs.kept)
            ):
                # A batch submitted: its request is charged, its money and tokens stay held.
                # (A batch id the upstream named twice keeps its first hold: this one ends.)
                self.apply(hold.instance_ids, (0, 0, -hold.est[2]), actual, now, over)
                self.keep(hold, batch, request_id, actual, completion.usage_source, now)
            else:
                self.apply(hold.instance_ids, negate(hold.est), actual, now, over)
                hold.state, hold.settled_at, hold.actual = "committed", now, list(actual)
                hold.usage_source, hold.dirty = completion.usage_source, True
            overage = self.note_overage(over, request_id, hold_id, now)
            self.complete(request_id, completion, now)
            if completion.facts:  # most have none: no generator made for them
                self.facts.extend(
                    (f.scope, f.action, f.field, f.value, request_id, now) for f in completion.facts
                )
            if batch is not None:
                self.batch_progress(batch, request_id, now)
            if hold.state == "active":  # kept for its batch
                return Settled(True, "active", overage, charged_before)
            if overage or charged_before:
                return Settled(True, "committed", overage, charged_before)
            return COMMITTED
        if hold.state == "expired" and hold.actual[0] is None:
            # The sweeper released this hold (its proxy looked dead or it outlived its TTL), but the
            # call did complete: the money was spent, so charge it without touching reservations.
            over = []
            self.apply(hold.instance_ids, (0, 0, 0), actual, now, over)
            hold.actual, hold.usage_source, hold.dirty = list(actual), completion.usage_source, True
            self.event(
                "late_commit",
                request_id,
                hold_id,
                None,
                f"hold had expired; charged {actual[0]} nano-USD",
                now,
            )
            overage = self.note_overage(over, request_id, hold_id, now)
            self.complete(request_id, completion, now)
            if batch is not None:
                self.batch_progress(batch, request_id, now)
            return Settled(True, "expired", overage, charged_before)
        return Settled(False, hold.state)

    def keep(
        self,
        hold: Hold,
        batch: BatchHold,
        request_id: str,
        actual: tuple[int, int, int],
        usage_source: str | None,
        now: float,
    ) -> None:
        """A batch's submission committed: its request is charged, and its hold stays active
        on its money and tokens (its request is no longer held) under the batch's key — no
        proxy's (BATCH_HOLDER), until `keep_until` at most."""
        assert batch.keep_until is not None
        hold.actual, hold.usage_source, hold.dirty = list(actual), usage_source, True
        hold.process_id, hold.expires_at = BATCH_HOLDER, batch.keep_until
        hold.est = (hold.est[0], hold.est[1], 0)
        jobs = self.batch_jobs()
        jobs.kept_holds.append((BATCH_HOLDER, batch.keep_until, hold.id))
        jobs.kept[batch.key] = hold.id
        jobs.new.append((batch.key, hold.id, request_id, now))

    def batch_jobs(self) -> BatchJobs:
        if self.jobs is None:
            self.jobs = BatchJobs()
        return self.jobs

    def batch_progress(self, batch: BatchHold, request_id: str, now: float) -> None:
        """A batch's status read or results download: move its kept hold to the key its results
        will be read under, or release it (read, or done with nothing to read). Or an input
        file's estimate, remembered for the batch that will name it."""
        jobs = self.batch_jobs()
        if batch.input_estimate is not None:
            jobs.inputs.append((batch.key, batch.input_estimate, request_id, now))
            return
        hold_id = jobs.kept.get(batch.key)
        if hold_id is None:  # submitted before drawdown kept holds, elsewhere, or ended already
            return
        if batch.moved_to is not None and batch.moved_to != batch.key:
            if batch.moved_to in jobs.kept:  # its results key is taken: leave it where it is
                return
            jobs.moved.append((batch.moved_to, batch.key))
            jobs.kept[batch.moved_to] = jobs.kept.pop(batch.key)
        if batch.ended:
            hold = self.holds.get(hold_id)
            if hold is not None and hold.state == "active":
                self.apply(hold.instance_ids, negate(hold.est), (0, 0, 0), now)
                hold.state, hold.settled_at, hold.dirty = "released", now, True
                hold.settle_reason = f"batch ended (request {request_id})"
                # Kept and ended by one commit (a batch its creation's answer says is over):
                # the hold ends here, so nothing hands it to BATCH_HOLDER.
                jobs.kept_holds = [k for k in jobs.kept_holds if k[2] != hold_id]

    def charge_once(self, request_id: str, completion: Completion, now: float) -> Completion:
        """The completion as charged under its once key: in full the first time, else its
        request alone (no money, no tokens), noting which request was charged."""
        key = completion.once
        assert key is not None
        first = self.charged_once.get(key)
        if first is None:
            self.charged_once[key] = request_id
            self.once_charges.append((key, request_id, now))
            return completion
        return replace(
            completion,
            actual=Amount(requests=completion.actual.requests),
            tokens_in=0,
            tokens_out=0,
            note=f"already charged by request {first}",
        )

    def release(
        self, request_id: str, hold_id: int, completion: Completion, reason: str, now: float
    ) -> Settled:
        hold = self.hold(hold_id)
        if hold.state != "active":
            return Settled(False, hold.state)
        self.apply(hold.instance_ids, negate(hold.est), (0, 0, 0), now)
        hold.state, hold.settled_at, hold.settle_reason = "released", now, reason
        hold.actual, hold.dirty = [0, 0, 0], True
        self.complete(request_id, completion, now, note=completion.note or reason)
        return Settled(True, "released")

    def expire(self, hold: Hold, state: str, reason: str, now: float) -> None:
        """End an active hold the sweeper (or shutdown) found: return its estimate."""
        self.apply(hold.instance_ids, negate(hold.est), (0, 0, 0), now)
        hold.state, hold.settled_at, hold.settle_reason, hold.dirty = state, now, reason, True
        self.holds[hold.id] = hold
        self.expiries.append((now, reason, hold.request_id))

    def note_overage(
        self, over_ids: list[int], request_id: str, hold_id: int, now: float
    ) -> tuple[tuple[str, str], ...]:
        """The instances a commit left over a limit (Plan.apply's `over`): events, and the
        (budget, scope) pairs the commit answers with."""
        if not over_ids:  # the common case: nothing to sort, no event, no tuple
            return ()
        over = [self.instances[i] for i in sorted(over_ids)]
        for inst in over:
            budget, scope, _ = inst.key
            self.event(
                "overage", request_id, hold_id, inst.id, f"{budget}: {scope} is over its limit", now
            )
        return tuple((inst.key[0], inst.key[1]) for inst in over)

    def complete(
        self, request_id: str, completion: Completion, now: float, note: str | None = None
    ) -> None:
        self.completions.append(
            (
                completion.status,
                completion.actual.usd,
                completion.tokens_in,
                completion.tokens_out,
                completion.usage_source,
                None if completion.priced is None else int(completion.priced),
                completion.model,
                completion.latency_ms,
                completion.upstream_ms,
                now,
                note or completion.note,
                request_id,
            )
        )

    # --- what the backend writes out ------------------------------------------------------------

    def dirty_holds(self) -> list[tuple[Any, ...]]:
        return [h.values() for h in self.holds.values() if h.dirty]

    def dirty_instances(self) -> list[tuple[Any, ...]]:
        return [i.values() for i in self.instances.values() if i.dirty]
