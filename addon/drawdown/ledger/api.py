"""The ledger's interface, shared by the SQLite and PostgreSQL backends.

Amounts are integers: nano-dollars, tokens, requests. A request gets exactly one
decision row; a forwarded request gets exactly one hold, which ends exactly once
(committed, released or expired).
"""

from __future__ import annotations

import operator
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..money import exact_usd, format_usd

UNITS = ("usd", "tokens", "requests")
SCHEMA_VERSION = 8


# One statement on both backends: keep the run while the agent is busy, mint after silence.
IDLE_RUN_SQL = (
    "INSERT INTO idle_runs (key, run, last_seen) VALUES (%s, %s, %s) "
    "ON CONFLICT (key) DO UPDATE SET "
    "run = CASE WHEN %s - idle_runs.last_seen >= %s THEN excluded.run ELSE idle_runs.run END, "
    "last_seen = excluded.last_seen RETURNING run"
)


# Refusals by the proxy's own state (stopping for a deploy, its ledger down, a bug), not by the
# agent's conduct: the SDK retries each, and the retry is the agent's step. The anomaly guards,
# the detectors and replay leave them out, so a deploy adds no step and no repeat to a run.
PROXY_REFUSALS = ("shutting_down", "ledger_unavailable", "internal_error")


def agents_own(reason_code: str = "reason_code") -> str:
    """SQL: the decision row is the agent's own step, not one of PROXY_REFUSALS."""
    return f"COALESCE({reason_code}, '') NOT IN ({', '.join(f"'{c}'" for c in PROXY_REFUSALS)})"


# An attempt its SDK retries is not a repeat or a step of its own. The official OpenAI and
# Anthropic SDKs re-send the identical request after a 408, 409, 429 or 5xx answer or a
# connection error (no answer: drawdown records a 502 when the upstream could not be reached
# or timed out, nothing when the client left first). Only forwarded requests qualify: a
# drawdown denial carries x-should-retry: false, and is the agent's own step. Only a finished
# attempt qualifies (one in flight may yet succeed, and concurrent identical requests must
# still count), and only a fingerprinted one (the forgiveness is bounded per fingerprint:
# the first `anomalies.loop.retries` failed attempts of a request in a run).
RETRIED_STATUSES = (408, 409, 429)


def failed_attempt(prefix: str = "") -> str:
    """SQL: the decision row is a finished, forwarded, fingerprinted request that failed
    retryably. Word for word the predicate of the ledger's idx_decisions_failed (schema v2),
    so the guards' queries read that small partial index, never the whole run."""
    p = prefix
    return (
        f"{p}decision <> 'deny' AND {p}fingerprint IS NOT NULL AND {p}completed_at IS NOT NULL "
        f"AND ({p}status IS NULL OR {p}status IN (408, 409, 429) OR {p}status >= 500)"
    )


def is_failed_attempt(
    decision: str | None, fingerprint: str | None, status: int | None, completed: bool
) -> bool:
    """failed_attempt(), for a row in hand."""
    return (
        decision != "deny"
        and bool(fingerprint)
        and completed
        and (status is None or status in RETRIED_STATUSES or status >= 500)
    )


# A budget window's refusal (429 with Retry-After) tells the agent when to come back, and an
# agent whose own code (or boto3) retries it does what it was told. Counted as a repeat, the
# agent that retried at once twice, then waited for the next window, was refused there for
# good as a loop. The loop guard forgives it as it forgives a failed attempt, within the same
# allowance (the first `anomalies.loop.retries` of a request in a run), counted in the capped
# walk over the request's rows, so one hammering the 429 is still a loop. It stays a step for
# step_count: forgiven per request, distinct requests refused at the agent's pace would never
# be stopped, and each reserve would read more of them.
WINDOW_REFUSAL = ("deny", "budget_exhausted", 429)  # (decision, reason_code, status)


def window_refusal(prefix: str = "") -> str:
    """SQL: the decision row is a budget window's refusal (WINDOW_REFUSAL)."""
    p = prefix
    return f"({p}decision = 'deny' AND {p}reason_code = 'budget_exhausted' AND {p}status = 429)"


def window_refusals_counted(prefix: str = "") -> str:
    """SQL: an aggregate, how many of the rows are budget windows' refusals."""
    return f"COUNT(CASE WHEN {window_refusal(prefix)} THEN 1 END)"


def is_window_refusal(decision: str | None, reason_code: str | None, status: int | None) -> bool:
    """window_refusal(), for a row in hand."""
    return (decision, reason_code, status) == WINDOW_REFUSAL


def forgiven(failed: int, retries: int) -> int:
    """How many of a request's `failed` attempts in a run are not counted: the first `retries`."""
    return min(failed, max(retries, 0))


# Seeded from os.urandom once per process: os.urandom per id would drop the GIL on every
# request. A forked child seeds its own at the fork (as the random module does), so no id
# pays a getpid() system call to find out whether it runs in a fork.
_random = random.Random()


def _reseed_after_fork() -> None:
    global _random
    _random = random.Random()


os.register_at_fork(after_in_child=_reseed_after_fork)


def new_request_id() -> str:
    """A request's ledger key: a UUIDv7 (RFC 9562) — Unix milliseconds, then 74 random bits.
    Time-ordered keys land at the right edge of the request_id indexes, so a batch of
    inserts touches a few index pages instead of one random page per request."""
    ms = time.time_ns() // 1_000_000
    rand = _random.getrandbits(74)
    value = (ms & (1 << 48) - 1) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62
    h = f"{value | rand & (1 << 62) - 1:032x}"  # uuid.UUID's str, without its checks
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class LedgerError(Exception):
    """The ledger could not answer (locked, disk full, read-only, corrupt, unreachable)."""


class LedgerTooNew(LedgerError):
    """The ledger was written by a newer drawdown; refusing to touch it."""


class NotALedger(LedgerError):
    """The file is a database drawdown did not make: a --db pointing at an application's
    SQLite file would have had the ledger's tables added to it. (A file that is no database at
    all may be a ledger damaged: the proxy stays up on it, answering per on_ledger_error.)"""


def foreign_tables(tables: list[str], has_schema_version: Callable[[], bool]) -> str | None:
    """The tables to name (a few, sorted as given) when a database holding `tables` is another
    application's: tables, but neither drawdown's budgets nor a `meta` with a schema version
    (`meta` alone is common: every Chromium database has one); None when it may be a ledger."""
    if not tables or "budget_instances" in tables or ("meta" in tables and has_schema_version()):
        return None
    return ", ".join(tables[:3]) + (", …" if len(tables) > 3 else "")


def schema_version(value: object | None, *, has_tables: bool) -> int:
    """The ledger's schema version from its `meta` row (None: no row), refused (LedgerError)
    when it is not a number, when the ledger has tables but no version (not made by
    drawdown, or damaged: migrating it from 0 would fail on every start), or newer than this
    code."""
    if value is None:
        if has_tables:
            raise LedgerError(
                "this ledger has tables but no schema_version in its meta table: it was not "
                "made by drawdown, or was damaged; restore it from a backup"
            )
        return 0
    try:
        version = int(str(value))
    except ValueError:
        raise LedgerError(
            f"this ledger's schema_version is {str(value)[:40]!r}, not a number: it was not "
            "made by drawdown, or was damaged; restore it from a backup"
        ) from None
    refuse_newer(version)
    return version


def refuse_newer(version: int) -> None:
    """Raise LedgerTooNew for a schema this drawdown does not know: its reads could be wrong."""
    if version > SCHEMA_VERSION:
        raise LedgerTooNew(
            f"this ledger has schema version {version}, newer than this drawdown understands "
            f"({SCHEMA_VERSION}); upgrade drawdown"
        )


# slots (here, on Claim and on Completion): a dataclass field with a default is otherwise also
# a class attribute, and CPython (3.13) cannot specialise reading an instance attribute that
# shadows one: every read takes the slow generic path. The ledger's writer thread reads these
# fields for every operation of a batch.
@dataclass(frozen=True, slots=True)
class Amount:
    usd: int = 0  # nano-dollars
    tokens: int = 0
    requests: int = 0

    def get(self, unit: str) -> int:
        return getattr(self, unit)


@dataclass(frozen=True, slots=True)  # slots: see Amount
class Claim:
    """One budget instance a request must fit into (SPEC §4)."""

    budget: str  # the budget's key
    scope: str  # the instance, e.g. agent:research/run:7f3a
    limit_usd: int | None
    limit_tokens: int | None
    limit_requests: int | None
    per: str | None = None
    window_start: int = 0  # epoch seconds of the window's start; 0 for lifetime budgets
    window_end: int | None = None
    shadow: bool = False  # a shadow claim never denies; its shortfall is recorded as would_deny

    def limit(self, unit: str) -> int | None:
        return getattr(self, f"limit_{unit}")


@dataclass(frozen=True)
class Shortfall:
    """Why a claim cannot take a request's estimate."""

    claim: Claim
    unit: str
    limit: int
    spent: int
    reserved: int
    needed: int

    @property
    def waits(self) -> bool:
        """Whether a later window takes the call (429 + Retry-After). Not for a lifetime
        budget, nor for a call above a window's whole limit: no wait will help (402)."""
        return self.claim.per is not None and self.needed <= self.limit

    def head(self, limit: str | None = None) -> str:
        """`budget SCOPE UNIT LIMIT[ per P]`, how every refusal by this claim begins (the
        report finds the refusing instance by it). `limit`: as spelt otherwise than now; a
        limit is shown as its author wrote it (rounded to cents, $0.015 read "0.02", and a
        refusal of $0.016 looked wrong)."""
        if limit is None:
            limit = exact_usd(self.limit, 2) if self.unit == "usd" else str(self.limit)
        window = f" per {self.claim.per}" if self.claim.per else ""
        return f"budget {self.claim.scope} {self.unit} {limit}{window}"

    def describe(self) -> str:
        if self.needed > self.limit:  # "exhausted (used 0…)" would say the budget was spent
            show = format_usd if self.unit == "usd" else str
            return (
                f"{self.head()} {TOO_BIG} ({'≈' if self.unit == 'usd' else ''}"
                f"{show(self.needed)})" + (": no window will take it" if self.claim.per else "")
            )
        if self.unit == "usd":
            amounts = (
                f"(spent {format_usd(self.spent)}"
                + (f", held {format_usd(self.reserved)}" if self.reserved else "")
                + f", this call needs ≈{format_usd(self.needed)})"
            )
        else:
            amounts = (
                f"(used {self.spent}"
                + (f", held {self.reserved}" if self.reserved else "")
                + f", this call needs {self.needed})"
            )
        return f"{self.head()} {EXHAUSTED} {amounts}"


# How a refusal goes on after Shortfall.head: the budget spent, or smaller than the call.
EXHAUSTED = "exhausted"
TOO_BIG = "is less than this call needs"


def deciding_order(claim: Claim, waits: bool | None = None) -> tuple[bool, float]:
    """Which exhausted budget decides the answer: one waiting will not help first (402: a
    lifetime budget, or a window whose whole limit is below the call), else the window that
    ends last (429, with the Retry-After after which every exhausted window has reset).
    Sorting by it keeps the policy's order among ties."""
    return (claim.per is not None if waits is None else waits, -(claim.window_end or 0))


def deciding_first(shortfalls: list[Shortfall]) -> list[Shortfall]:
    return sorted(shortfalls, key=lambda s: deciding_order(s.claim, s.waits))


@dataclass
class DecisionRow:
    """The one row a request leaves in the ledger. Never holds secrets: no headers; the path, and
    the query and body features kept for replay (drawdown.recording), are redacted before they
    get here."""

    request_id: str
    ts: float
    decision: str  # allow | deny | would_deny
    mode: str
    scope: str
    tenant: str | None = None
    workflow: str | None = None
    agent: str | None = None
    run: str | None = None
    action: str | None = None
    provider: str | None = None
    model: str | None = None
    method: str = ""
    host: str = ""
    path: str = ""  # credentials in it redacted (recording.redact_path)
    reason_code: str | None = None
    reason: str | None = None
    est_usd: int = 0
    est_tokens: int = 0
    stream: bool = False
    fingerprint: str | None = None  # hash of the request's action + body, for loop detection
    status: int | None = None  # set now for denials, at completion otherwise
    policy_digest: str = ""
    budget: str | None = None  # the budget instance that denied (or would have)
    # Request features for `drawdown replay` (JSON text, redacted; see drawdown.recording):
    port: int | None = None
    query: str | None = None  # {"name": "value"}, secret-looking names' values redacted
    # {"json.a.b": value} the policy references (record.bodies), and what could not be read:
    # `_unreadable`/`_undecodable` (why the body could not), `_repeated` (fields given twice).
    body_fields: str | None = None
    body: str | None = None  # the whole JSON body, redacted (record.bodies: full)
    mcp: str | None = None  # [[method, tool], …] of an MCP request's JSON-RPC messages
    body_bytes: int | None = None  # the body's size as limits.max_request_bytes measures it
    # An LLM call's metering settings (recording.metering_digest): replay re-estimates and
    # re-prices a call the new policy meters otherwise, and keeps the recorded figures else.
    metering: str | None = None


# The columns a new decision row is inserted with, in order (both backends):
# DECISION_INSERT_FIELDS. The row's own fields first, read in one C call (the writer thread
# builds one tuple per decision); then the three that are not the row's as it stands.
_ROW_FIELDS = (
    "request_id", "ts", "decision", "reason_code", "reason", "mode", "scope", "tenant",
    "workflow", "agent", "run", "action", "provider", "model", "method", "host", "path",
    "est_usd", "est_tokens", "fingerprint", "status", "budget", "policy_digest", "port",
    "query", "body_fields", "body", "mcp", "body_bytes", "metering",
)  # fmt: skip
DECISION_INSERT_FIELDS = (*_ROW_FIELDS, "stream", "hold_id", "completed_at")
_read_row_fields = operator.attrgetter(*_ROW_FIELDS)


def decision_values(row: DecisionRow, hold_id: int | None) -> tuple[Any, ...]:
    """A new decision row's values in DECISION_INSERT_FIELDS order."""
    completed_at = row.ts if row.decision == "deny" else None  # a denial is complete
    # Concatenated, not (*fields, …): that builds a list first, then copies it into a tuple.
    return _read_row_fields(row) + (int(row.stream), hold_id, completed_at)  # noqa: RUF005


# Said with every loop denial: raising `repeats` for everything is what the count alone
# suggests, and what a poller needs is to be left out.
LOOP_HINT = (
    "a call repeated on purpose, such as polling, is left out by naming only the guarded "
    "actions in anomalies.loop.actions"
)


@dataclass(frozen=True)
class Guards:
    """Structural checks made inside the reserve transaction (anomaly detectors set to deny).

    Counted over the decision rows already in the ledger, so they hold across proxies.
    """

    max_repeats: int | None = (
        None  # loop: at most N earlier identical requests (same fingerprint) in the run
    )
    max_steps: int | None = None  # step_count: at most N earlier requests in the run
    max_runs_per_workflow: int | None = None  # fan_out: at most N distinct runs under the workflow
    # loop and step_count leave out the first N failed attempts of each request in the run
    # (failed_attempt: what the SDKs retry); anomalies.loop.retries, 0 counts every attempt
    retries: int = 0
    shadow: bool = False  # record would_deny instead of denying

    @property
    def any(self) -> bool:
        return any(
            v is not None for v in (self.max_repeats, self.max_steps, self.max_runs_per_workflow)
        )


@dataclass(frozen=True)
class Tripped:
    """A guard that refused (or would have refused) a request."""

    detector: str  # loop | step_count | fan_out
    detail: str


@dataclass(frozen=True)
class ReserveOutcome:
    decision: str  # allow | deny | would_deny, as recorded
    hold_id: int | None  # None when denied
    shortfalls: tuple[Shortfall, ...] = ()  # enforced claims that could not take the estimate
    shadow_shortfalls: tuple[Shortfall, ...] = ()  # shadow claims that could not (hold made anyway)
    tripped: Tripped | None = None  # an anomaly guard that denied (or, shadow, would have)

    def __init__(
        self,
        decision: str,
        hold_id: int | None,
        shortfalls: tuple[Shortfall, ...] = (),
        shadow_shortfalls: tuple[Shortfall, ...] = (),
        tripped: Tripped | None = None,
    ) -> None:
        # Written out (dataclass keeps it): the generated one of a frozen class sets each field
        # through object.__setattr__, twice the cost, and one is made per reserve. The fields
        # and defaults above, in order (a test compares them).
        fields = self.__dict__
        fields["decision"] = decision
        fields["hold_id"] = hold_id
        fields["shortfalls"] = shortfalls
        fields["shadow_shortfalls"] = shadow_shortfalls
        fields["tripped"] = tripped

    @property
    def first(self) -> Shortfall | None:
        found = self.shortfalls or self.shadow_shortfalls
        return found[0] if found else None


@dataclass(frozen=True)
class Fact:
    """A successful action's field value, kept so later `requires … same:` rules can find it."""

    scope: str  # the run's scope path
    action: str
    field: str  # "" records only that the action succeeded
    value: str


@dataclass(frozen=True)
class HistoryQuery:
    """Did `scope` already succeed at an action matching one of `actions` (globs) with `field` == `value`?"""

    scope: str
    actions: tuple[str, ...]
    field: str
    value: str | None


@dataclass(frozen=True, slots=True)  # slots: see Amount
class Completion:
    """What is known when a forwarded request ends."""

    actual: Amount = field(default_factory=Amount)
    status: int | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    usage_source: str | None = None  # usage | counted | estimate
    # LLM calls: False when genai-prices did not know the model and the fallback price was
    # charged (never silent); None for anything the meter did not price.
    priced: bool | None = None
    model: str | None = None
    latency_ms: float | None = None
    upstream_ms: float | None = None
    note: str | None = None  # e.g. the upstream error
    facts: tuple[Fact, ...] = ()  # recorded on commit, for later `requires` checks
    # A key the commit charges under at most once in the ledger (a batch's results, which an
    # agent may download again): a later commit under the same key is recorded at $0 and no
    # tokens, its note naming the request that was charged. None: charged as it is.
    once: str | None = None
    # What the request tells of a batch job: its submission keeps the hold's estimate held
    # until the batch ends (BatchHold). None: nothing (nearly every request).
    batch: BatchHold | None = None


# The process id of a hold kept for a batch job (BatchHold.keep_until): no proxy's, so neither
# a lapsed lease nor a proxy's shutdown releases it; its results, its end or its TTL do.
BATCH_HOLDER = "batch job"


@dataclass(frozen=True, slots=True)  # slots: see Amount
class BatchHold:
    """A batch job's hold, as a request changes it. A batch is billed upstream as it runs,
    with no call left to refuse; the estimate held at its submission stays held, under `key`
    (the key its results will be charged under), until they are read or it ends without
    results, so a run cannot submit batch after batch each checked against the same room.

    - `keep_until` (a submission's commit): the hold is kept, past its request and its proxy,
      until then at most (epoch seconds; the provider's completion window).
    - `moved_to` (a status read): the batch is done, its results to be read under that key.
    - `ended` (its results read, or done with none to read): the kept hold is released.
    - `input_estimate` (a batch input file uploaded): what the batch that will name the file
      may cost (the meter's JSON; a Gemini file's requests, counted), remembered under `key` for every proxy on the
      ledger (`batch_input`); no hold is kept or changed."""

    key: str
    keep_until: float | None = None
    moved_to: str | None = None
    ended: bool = False
    input_estimate: str | None = None


@dataclass(frozen=True)
class Settled:
    applied: bool  # False: the hold had already ended; nothing changed (or, for a late commit, charged only)
    state: str  # the hold's state afterwards
    # The (budget, scope) of each budget instance the commit left over its limit (shadow
    # budgets' too: whoever acts on it tells them apart).
    overage: tuple[tuple[str, str], ...] = ()
    # Its once key (Completion.once) was charged already: this commit charged its request
    # alone, no money or tokens.
    charged_before: bool = False


class LeaseWatch:
    """Which other proxies' leases have lapsed, by this process's own monotonic clock.

    A proxy is dead when its heartbeat has not changed for `lease` seconds *as this sweeper
    measured them*, never by comparing the heartbeat's wall-clock time with ours: with two
    hosts' clocks apart by more than the lease (a PostgreSQL fleet), or a clock stepped
    forward on one machine, the live proxy's in-flight holds were released, and its budget
    let through past its limit. `clock` is for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: dict[str, tuple[float | None, float]] = {}  # id → (heartbeat, unchanged since)

    def lapsed(self, heartbeats: Iterable[Sequence[Any]], lease_seconds: float) -> list[str]:
        """The ids among `(id, heartbeat_at)` whose heartbeat stood still for the lease.
        Processes not listed again are forgotten (they hold nothing any more)."""
        now = self.clock()
        seen: dict[str, tuple[float | None, float]] = {}
        dead = []
        for process_id, beat in heartbeats:
            before = self._seen.get(process_id)
            since = before[1] if before is not None and before[0] == beat else now
            seen[process_id] = (beat, since)
            if now - since >= lease_seconds:
                dead.append(process_id)
        self._seen = seen
        return dead


# The other proxies holding something, and their heartbeats: what LeaseWatch.lapsed reads.
# (`holds.process_id` of an active hold is indexed: idx_holds_process_active.)
HOLDERS = (
    "SELECT id, heartbeat_at FROM processes WHERE id <> {mark} "
    "AND id IN (SELECT process_id FROM holds WHERE state = 'active')"
)


class Ledger(Protocol):
    """Both backends implement this synchronously; `AsyncLedger` runs it off the event loop."""

    process_id: str

    def reserve(
        self,
        row: DecisionRow,
        claims: Sequence[Claim],
        estimate: Amount,
        expires_at: float,
        guards: Guards | None = None,
    ) -> ReserveOutcome: ...

    def record(self, row: DecisionRow) -> None: ...

    def commit(
        self, request_id: str, hold_id: int, completion: Completion, now: float
    ) -> Settled: ...

    def release(
        self, request_id: str, hold_id: int, completion: Completion, reason: str, now: float
    ) -> Settled: ...

    def history(self, queries: Sequence[HistoryQuery]) -> list[bool]: ...

    def idle_run(self, key: str, idle_seconds: float, candidate: str, now: float) -> str: ...

    def extend(self, hold_ids: Sequence[int], expires_at: float) -> None: ...

    def batch_input(self, key: str) -> str | None:
        """The estimate remembered for a batch input file (BatchHold.input_estimate), if any."""
        ...

    def remember(self, key: str, value: str) -> None:
        """Keep `value` under `key` in the ledger's `meta` table unless a value is kept there
        already (the anomaly settings of a policy, by its digest: policy.model.JUDGING_KEY)."""
        ...

    def heartbeat(self, now: float) -> None: ...

    def sweep(self, now: float, lease_seconds: float) -> int: ...

    def release_mine(self, now: float, reason: str) -> int: ...

    def close(self) -> None: ...
