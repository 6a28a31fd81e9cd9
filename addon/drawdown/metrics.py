"""Prometheus metrics of the proxy, answered at `GET /metrics` on its own port.

What the ledger did is counted on the ledger's writer thread, once a batch's transaction is
over (`LedgerMetrics.observe`): off the event loop, and only what the ledger committed — a
decision is counted once its row is written, a charge once it is applied, and an operation
the ledger failed counts as a ledger error, nothing else. The money counters are floats for
graphs and alerts; the ledger's integers stay the account (`drawdown budgets`, `report`).

Labels are bounded and carry no identity: decisions, reason codes, the action kinds the policy
names (an MCP tool it does not name, whose kind the client's tool name completes, is counted
under the kind its server's action gives), providers. Tenants, agents and runs are the
report's, where their number is no cost.

`drawdown run --workers N` gives its workers one folder to write their values to
(prometheus_client's multiprocess mode, `PROMETHEUS_MULTIPROC_DIR`): whichever worker the
kernel hands a scrape answers for all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mitmproxy import version as mitmproxy_version
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder

from . import __version__

PATH = "/metrics"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
NANOS_PER_USD = 1_000_000_000

# `*_created` samples say when a label set was first seen, which no one graphs; multiprocess
# mode has none, so one process and N workers expose the same series.
disable_created_metrics()
REGISTRY = CollectorRegistry()
# The process's memory, CPU and open files (`process_*`), as prometheus_client's default
# registry has them: one process's only, so not under --workers, whose scrape is any worker's.
ProcessCollector(registry=REGISTRY)

DECISIONS = Counter(
    "drawdown_decisions",
    "Calls decided and recorded, by decision (allow, deny, would_deny), reason code and the "
    "policy's action kind",
    ["decision", "reason", "action"],
    registry=REGISTRY,
)
CHARGED_USD = Counter(
    "drawdown_charged_usd",
    "US dollars charged to budgets by settled calls (the ledger's nano-dollars, as a float)",
    ["provider", "action"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "drawdown_tokens",
    "Tokens charged by settled calls, input and output",
    ["provider", "direction"],
    registry=REGISTRY,
)
HOLDS_OPEN = Gauge(
    "drawdown_holds_open",
    "Reservations this proxy holds for calls in flight",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
LEDGER_ERRORS = Counter(
    "drawdown_ledger_errors",
    "Ledger operations that failed, each attempt: a call's reserve or record (the call "
    "answered per on_ledger_error), commit or release (retried each maintenance tick), and "
    "maintenance's own (heartbeat, sweep, extend)",
    ["operation"],
    registry=REGISTRY,
)
# The operations the help (and README) names, at 0 from the start: an alert on increase()
# sees the first error, not a series appearing.
LEDGER_OPERATIONS = ("reserve", "record", "commit", "release", "heartbeat", "sweep", "extend")
for _operation in LEDGER_OPERATIONS:
    LEDGER_ERRORS.labels(_operation)
LEDGER_SECONDS = Histogram(
    "drawdown_ledger_transaction_seconds",
    "How long each ledger transaction took on the writer thread (one batch of operations)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
DECISION_SECONDS = Histogram(
    "drawdown_decision_seconds",
    "drawdown's own time before a call is forwarded, from its whole request: classified, "
    "estimated, authorized and its reservation made",
    buckets=(0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)
UPSTREAM_SECONDS = Histogram(
    "drawdown_upstream_seconds",
    "How long settled calls' upstreams took to begin their answer once sent the request",
    ["provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "drawdown_build_info",
    "1, labelled with the drawdown and the mitmproxy this process runs: a fleet half upgraded "
    "shows as two label sets",
    ["version", "mitmproxy"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
BUILD_INFO.labels(__version__, mitmproxy_version.VERSION).set(1)
POLICY_RELOADS = Counter(
    "drawdown_policy_reloads",
    "Policy edits the watcher read: applied, or rejected (the last good policy stays)",
    ["result"],
    registry=REGISTRY,
)
POLICY_REJECTED = Gauge(
    "drawdown_policy_edit_rejected",
    "1 while the policy's files hold an edit that was rejected and the last good policy is "
    "in force, else 0",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)


class LedgerMetrics:
    """Counts what each ledger batch did; called by the writer thread (AsyncLedger)."""

    def __init__(self) -> None:
        # A hold's labels from its reserve until it is settled: a commit names its hold only.
        self._held: dict[int, tuple[str, str]] = {}
        # Each label set's child, looked up once (`labels()` takes a lock and builds a key).
        self._children: dict[tuple[Any, ...], Any] = {}
        # The action kinds the policy names (set by the addon): an MCP tool the policy does not
        # name is kind `<kind>.<tool>`, the tool's name the client's to choose. None: as is.
        self.kinds: frozenset[str] | None = None

    def _action(self, action: str | None) -> str:
        """A label a policy bounds: a kind it names, else the kind of the action it came under."""
        if not action or self.kinds is None or action in self.kinds:
            return action or ""
        head = action
        while "." in head:
            head = head.rsplit(".", 1)[0]
            if head in self.kinds:
                return head
        return "other"

    def forget_holds(self) -> None:
        """The ledger holding them is gone (lost, replaced): none of them will be settled."""
        held, self._held = self._held, {}
        if held:
            HOLDS_OPEN.dec(len(held))

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(
        self, batch: Sequence[tuple[str, tuple[Any, ...]]], results: Sequence[Any], seconds: float
    ) -> None:
        LEDGER_SECONDS.observe(seconds)
        held = 0
        for (name, args), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                self._child(LEDGER_ERRORS, name).inc()
            elif name == "reserve":
                row = args[0]
                action = self._action(row.action)
                self._child(DECISIONS, result.decision, row.reason_code or "", action).inc()
                if result.hold_id is not None:
                    self._held[result.hold_id] = (row.provider or "", action)
                    held += 1
            elif name == "record":
                row = args[0]
                action = self._action(row.action)
                self._child(DECISIONS, row.decision, row.reason_code or "", action).inc()
            elif name in ("commit", "release"):
                held -= self._settled(name, args, result)
        if held:
            HOLDS_OPEN.inc(held)

    def _settled(self, name: str, args: tuple[Any, ...], settled: Any) -> int:
        """Counts a settlement; 1 if it ended a hold this process counted as open."""
        labels = self._held.pop(args[1], None)
        provider, action = labels or ("", "")
        completion = args[2]
        if completion.upstream_ms is not None:
            upstream = self._child(UPSTREAM_SECONDS, provider)
            upstream.observe(completion.upstream_ms / 1000)
        if name == "commit" and settled.applied and not settled.charged_before:
            # (A release charges nothing; a repeat under a once key, its request alone.)
            if completion.actual.usd:
                usd = completion.actual.usd / NANOS_PER_USD
                self._child(CHARGED_USD, provider, action).inc(usd)
            if completion.tokens_in:
                self._child(TOKENS, provider, "input").inc(completion.tokens_in)
            if completion.tokens_out:
                self._child(TOKENS, provider, "output").inc(completion.tokens_out)
        return labels is not None


def kinds_of(policy: Any) -> frozenset[str]:
    """The action kinds a policy names: its actions' and their MCP `tools:` maps'."""
    kinds = {action.kind for action in policy.actions}
    kinds.update(kind for action in policy.actions for _, kind in action.tools)
    return frozenset(kinds)


def policy_reloaded(applied: bool) -> None:
    POLICY_RELOADS.labels("applied" if applied else "rejected").inc()
    POLICY_REJECTED.set(0 if applied else 1)


def exposition(accept: str = "") -> tuple[bytes, str]:
    """What a scrape gets, and its content type, in the format its Accept header asks for (as
    prometheus_client's own servers answer): this process's values, or every worker's under
    `--workers`, whose files it reads: call it off the event loop."""
    try:
        encode, content_type = choose_encoder(accept)
    except (TypeError, ValueError):  # a version it cannot read (`version=x.y`): the default
        encode, content_type = choose_encoder("")
    if os.environ.get(MULTIPROCESS_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return encode(registry), content_type
    return encode(REGISTRY), content_type
