"""Seeded ledgers for the anomaly, report and replay unit tests: real SQLiteLedger writes
(reserve → commit/release, record), with the clock under the test's control."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drawdown.ledger.api import Amount, Claim, Completion, DecisionRow, Guards
from drawdown.ledger.sqlite import SQLiteLedger

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
LEVELS = ("tenant", "workflow", "agent", "run")


def scope_of(levels: dict[str, str]) -> str:
    return "/".join(f"{level}:{levels[level]}" for level in LEVELS if level in levels)


class Seeder:
    """`call()` leaves one decision row (and hold) per request, like the proxy does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ledger = SQLiteLedger(path)
        self.now = T0

    def close(self) -> None:
        self.ledger.close()

    def call(
        self,
        *,
        agent: str = "worker",
        run: str | None = "r1",
        workflow: str | None = None,
        tenant: str | None = "acme",
        action: str = "llm",
        provider: str | None = "openai",
        model: str | None = "gpt-4o-mini",
        body: str | None = None,
        est_usd: int = 2_000_000,
        est_tokens: int = 1000,
        actual_usd: int | None = 1_000_000,
        tokens: tuple[int, int] = (300, 100),
        status: int | None = 200,
        latency_ms: float = 800.0,
        upstream_ms: float | None = 750.0,
        claims: Sequence[Claim] = (),
        guards: Guards | None = None,
        took: float = 0.8,
        gap: float = 0.5,
        mode: str = "enforce",
        method: str = "POST",
        host: str = "api.openai.com",
        path: str = "/v1/chat/completions",
        features: dict[str, Any] | None = None,
        deny: tuple[str, str] | None = None,
        requests: int = 1,
        note: str | None = None,
    ) -> DecisionRow:
        """One request at the seeder's clock; the clock then moves on by `took` + `gap`.

        `actual_usd=None` releases the hold (an upstream error); `deny=(code, reason)` records
        a denial before budgets (authority)."""
        levels = {
            k: v
            for k, v in (("tenant", tenant), ("workflow", workflow), ("agent", agent), ("run", run))
            if v
        }
        fingerprint = hashlib.sha256(
            f"{action}\0{method}\0{path}\0{body or uuid.uuid4().hex}".encode()
        ).hexdigest()[:32]
        row = DecisionRow(
            request_id=uuid.uuid4().hex,
            ts=self.now,
            decision="allow",
            mode=mode,
            scope=scope_of(levels),
            tenant=tenant,
            workflow=workflow,
            agent=agent,
            run=run,
            action=action,
            provider=provider,
            model=model,
            method=method,
            host=host,
            path=path,
            fingerprint=fingerprint,
            **(features or {}),
        )
        if deny is not None:
            code, reason = deny
            row.fingerprint = None
            row.decision = "deny" if mode == "enforce" else "would_deny"
            row.reason_code, row.reason, row.status = code, reason, 403
            if mode == "enforce":
                self.ledger.record(row)
                self.now += gap
                return row
        estimate = Amount(usd=est_usd, tokens=est_tokens, requests=requests)
        row.est_usd, row.est_tokens = est_usd, est_tokens
        outcome = self.ledger.reserve(row, list(claims), estimate, self.now + 900, guards)
        if outcome.hold_id is None:
            self.now += gap
            return row
        done = self.now + took
        if actual_usd is None:
            self.ledger.release(
                row.request_id,
                outcome.hold_id,
                Completion(status=status, latency_ms=latency_ms),
                f"upstream answered {status}",
                done,
            )
        else:
            completion = Completion(
                actual=Amount(usd=actual_usd, tokens=sum(tokens), requests=requests),
                status=status,
                tokens_in=tokens[0],
                tokens_out=tokens[1],
                usage_source="usage",
                latency_ms=latency_ms,
                upstream_ms=upstream_ms,
                note=note,
            )
            self.ledger.commit(row.request_id, outcome.hold_id, completion, done)
        self.now = done + gap
        return row


def claim(
    scope: str,
    *,
    usd: int | None = None,
    requests: int | None = None,
    budget: str = "agent:*/run:*",
) -> Claim:
    return Claim(budget, scope, usd, None, requests)
