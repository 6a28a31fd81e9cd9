"""Prometheus metrics (metrics.py): counted on the ledger's writer thread from what a real
SQLite ledger decided and charged. tests/e2e/test_metrics_e2e.py scrapes a real proxy."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from drawdown import metrics
from drawdown.ledger.api import (
    Amount,
    Claim,
    Completion,
    DecisionRow,
    LedgerError,
    ReserveOutcome,
)
from drawdown.ledger.sqlite import SQLiteLedger
from drawdown.ledger.worker import AsyncLedger
from drawdown.policy import load_policy
from prometheus_client.parser import text_string_to_metric_families

NOW = 1_700_000_000.0


def row(
    action: str = "llm", provider: str | None = "openai", decision: str = "allow", **fields: Any
) -> DecisionRow:
    return DecisionRow(
        request_id=uuid.uuid4().hex, ts=NOW, decision=decision, mode="enforce",
        scope="agent:a/run:r1", agent="a", run="r1", action=action, provider=provider, **fields,
    )  # fmt: skip


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class Counted:
    """Every sample's value now, to compare with later: the counters are the process's own,
    and other tests' proxies count in them too."""

    def __init__(self) -> None:
        self.before = self._all()

    @staticmethod
    def _all() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in metrics.REGISTRY.collect()
            for sample in family.samples
        }

    def change(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self._all().get(key, 0.0) - self.before.get(key, 0.0)


def run_through_writer(ledger: Any, steps: Any) -> None:
    """Run `steps(worker)` through an AsyncLedger counting for the metrics; closed after, so
    the writer has counted every batch (it counts once its waiters are woken)."""
    worker = AsyncLedger(ledger, observer=metrics.LedgerMetrics().observe)

    async def go() -> None:
        try:
            await steps(worker)
        finally:
            await worker.aclose()

    asyncio.run(go())


def test_the_writer_counts_what_the_ledger_recorded_and_charged(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    budget = [Claim("run", "agent:a/run:r1", 1_000_000, None, None)]  # $0.001
    counted = Counted()

    async def steps(worker: AsyncLedger) -> None:
        first = row()
        held = await worker.call("reserve", first, budget, Amount(usd=600_000), NOW + 60)
        done = Completion(
            actual=Amount(usd=250_000, tokens=130, requests=1), status=200, tokens_in=100,
            tokens_out=30, usage_source="usage", upstream_ms=120.0,
        )  # fmt: skip
        await worker.call("commit", first.request_id, held.hold_id, done, NOW)
        # $0.00075 left: an estimate of $0.0008 is refused.
        refused = await worker.call("reserve", row(), budget, Amount(usd=800_000), NOW + 60)
        assert refused.decision == "deny"
        # An authority refusal, recorded without a hold.
        denied = row("crm.write", None, reason_code="not_authorized", decision="deny")
        await worker.call("record", denied)
        # A call released (its upstream failed): its hold ends, nothing is charged.
        failed = row()
        held = await worker.call("reserve", failed, budget, Amount(usd=100_000), NOW + 60)
        gone = Completion(actual=Amount(usd=100_000), status=502, upstream_ms=3000.0)
        await worker.call("release", failed.request_id, held.hold_id, gone, "upstream 502", NOW)
        # A batch's results read twice: charged once (the second is its request alone).
        for _ in range(2):
            read = row("batch.results")
            held = await worker.call("reserve", read, budget, Amount(), NOW + 60)
            results = Completion(
                actual=Amount(usd=50_000, tokens=20, requests=1), status=200, tokens_in=15,
                tokens_out=5, once="batch b1",
            )  # fmt: skip
            await worker.call("commit", read.request_id, held.hold_id, results, NOW)
        # One still in flight when counted.
        await worker.call("reserve", row(), budget, Amount(usd=1_000), NOW + 60)

    run_through_writer(ledger, steps)
    decisions = "drawdown_decisions_total"
    assert counted.change(decisions, decision="allow", reason="", action="llm") == 3
    assert counted.change(decisions, decision="allow", reason="", action="batch.results") == 2
    assert counted.change(decisions, decision="deny", reason="budget_exhausted", action="llm") == 1
    assert (
        counted.change(decisions, decision="deny", reason="not_authorized", action="crm.write") == 1
    )
    # Exactly what the ledger charged, in dollars: $0.00025 + one $0.00005 of the two reads.
    charged = "drawdown_charged_usd_total"
    assert round(counted.change(charged, provider="openai", action="llm") * 1e9) == 250_000
    assert round(counted.change(charged, provider="openai", action="batch.results") * 1e9) == (
        50_000
    )
    (spent,) = ledger.conn.execute("SELECT spent_usd FROM budget_instances").fetchone()
    assert spent == 300_000  # as the budget was charged
    tokens = "drawdown_tokens_total"
    assert counted.change(tokens, provider="openai", direction="input") == 115
    assert counted.change(tokens, provider="openai", direction="output") == 35
    assert counted.change("drawdown_holds_open") == 1
    # How long the upstreams took to answer: the committed call's 120 ms, the released one's 3 s.
    upstream = "drawdown_upstream_seconds_bucket"
    assert counted.change(upstream, provider="openai", le="0.1") == 0
    assert counted.change(upstream, provider="openai", le="0.25") == 1
    assert counted.change(upstream, provider="openai", le="5.0") == 2
    assert counted.change("drawdown_upstream_seconds_sum", provider="openai") == pytest.approx(3.12)
    assert counted.change("drawdown_ledger_errors_total", operation="reserve") == 0
    assert counted.change("drawdown_ledger_transaction_seconds_count") >= 9
    ledger.close()


class BrokenLedger:
    """A ledger whose every transaction fails (a disk full, a lock held too long)."""

    process_id = "broken"

    def run_batch(self, calls: Any) -> list[Any]:
        raise LedgerError("database or disk is full")


def test_a_failed_transaction_counts_ledger_errors_and_no_decision() -> None:
    counted = Counted()

    async def steps(worker: AsyncLedger) -> None:
        with pytest.raises(LedgerError):
            await worker.call("reserve", row(), [], Amount(), NOW + 60)
        with pytest.raises(LedgerError):
            await worker.call("record", row(decision="deny", reason_code="not_authorized"))

    run_through_writer(BrokenLedger(), steps)
    assert counted.change("drawdown_ledger_errors_total", operation="reserve") == 1
    assert counted.change("drawdown_ledger_errors_total", operation="record") == 1
    assert (
        counted.change("drawdown_decisions_total", decision="allow", reason="", action="llm") == 0
    )
    assert counted.change("drawdown_holds_open") == 0


def test_a_rejected_policy_edit_shows_until_a_good_one_is_applied() -> None:
    counted = Counted()
    metrics.policy_reloaded(applied=False)
    assert value("drawdown_policy_edit_rejected") == 1
    metrics.policy_reloaded(applied=True)
    assert value("drawdown_policy_edit_rejected") == 0
    assert counted.change("drawdown_policy_reloads_total", result="rejected") == 1
    assert counted.change("drawdown_policy_reloads_total", result="applied") == 1


def test_the_exposition_is_prometheus_text_without_created_samples() -> None:
    metrics.DECISIONS.labels("allow", "", "llm").inc(0)
    text, content_type = metrics.exposition()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"  # what every scraper reads
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert families["drawdown_decisions"].type == "counter"
    assert families["drawdown_ledger_transaction_seconds"].type == "histogram"
    assert families["drawdown_holds_open"].type == "gauge"
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)


def test_an_mcp_tool_the_policy_does_not_name_is_counted_under_its_servers_action(
    tmp_path: Path,
) -> None:
    """An unmapped tool's kind is `<action>.<tool>`, the tool named by the client: one series
    each would grow without bound. Counted under the kind the policy names."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "actions:\n"
        "  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
        "  - kind: mcp.docs\n"
        "    provider: mcp\n"
        "    match: {host: docs.example.com}\n"
        "    tools: {search: docs.search}\n"
    )
    counting = metrics.LedgerMetrics()
    counting.kinds = metrics.kinds_of(load_policy(str(policy)))
    assert counting.kinds == {"llm", "mcp.docs", "docs.search"}
    counted = Counted()
    rows = [row(kind, None) for kind in ("mcp.docs.tool_9f3a", "mcp.docs.a.b", "docs.search")]
    rows.append(row("elsewhere.x", None))  # a kind no longer named (the policy was edited)
    counting.observe(
        [("reserve", (r,)) for r in rows], [ReserveOutcome("allow", None)] * len(rows), 0.001
    )
    decisions = "drawdown_decisions_total"
    assert counted.change(decisions, decision="allow", reason="", action="mcp.docs") == 2
    assert counted.change(decisions, decision="allow", reason="", action="docs.search") == 1
    assert counted.change(decisions, decision="allow", reason="", action="other") == 1
    assert counted.change(decisions, decision="allow", reason="", action="mcp.docs.tool_9f3a") == 0


def test_holds_of_a_ledger_lost_or_replaced_are_no_longer_open(tmp_path: Path) -> None:
    """A ledger deleted under the proxy, or another one configured: the holds in it will never
    be settled by this process, which must not show them open for ever."""
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    counting = metrics.LedgerMetrics()
    counted = Counted()
    worker = AsyncLedger(ledger, observer=counting.observe)

    async def reserve_two() -> None:
        for _ in range(2):
            await worker.call("reserve", row(), [], Amount(requests=1), NOW + 60)
        await worker.aclose()

    asyncio.run(reserve_two())
    assert counted.change("drawdown_holds_open") == 2
    counting.forget_holds()
    assert counted.change("drawdown_holds_open") == 0
    ledger.close()


def test_ledger_error_series_exist_before_the_first_error() -> None:
    """An alert on increase() needs the series at 0 before the first error, not appearing
    with it."""
    samples = Counted().before
    operations = ("reserve", "record", "commit", "release", "heartbeat", "sweep", "extend")
    for operation in operations:  # README's: a call's, settlement's and maintenance's own
        assert ("drawdown_ledger_errors_total", (("operation", operation),)) in samples
