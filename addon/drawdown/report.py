"""`drawdown report`: runs, budgets, decisions and anomalies from the ledger (SPEC §8 JSON contract)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from .ledger.reader import Reader
from .money import format_usd, usd_float

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    found = _DURATION.match(text)
    if not found:
        raise ValueError(f"--since wants a duration like 30m, 24h or 7d; got {text!r}")
    return float(found.group(1)) * _SECONDS[found.group(2)]


def _iso(ts: float | None) -> str | None:
    return (
        None
        if not ts
        else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def build(
    db: str, *, run: str | None = None, since: float | None = None, now: float | None = None
) -> dict[str, Any]:
    reader = Reader(db)
    try:
        return _build(reader, run=run, since=since, now=now or time.time())
    finally:
        reader.close()


def _build(reader: Reader, *, run: str | None, since: float | None, now: float) -> dict[str, Any]:
    floor = now - since if since else 0.0
    where = "ts >= :floor" + (" AND run = :run" if run else "")
    params = {"floor": floor, "run": run}
    decisions = reader.query(
        f"SELECT decision, COUNT(*) AS n FROM decisions WHERE {where} GROUP BY decision", params
    )
    counts = {"allow": 0, "deny": 0, "would_deny": 0}
    for row in decisions:
        counts[row["decision"]] = row["n"]

    run_rows = reader.query(
        f"""SELECT scope, tenant, workflow, agent, run,
                   COUNT(*) AS requests,
                   SUM(CASE WHEN decision = 'allow' THEN 1 ELSE 0 END) AS allowed,
                   SUM(CASE WHEN decision = 'deny' THEN 1 ELSE 0 END) AS denied,
                   SUM(CASE WHEN decision = 'would_deny' THEN 1 ELSE 0 END) AS would_deny,
                   SUM(CASE WHEN decision = 'deny' AND reason_code = 'budget_exhausted' THEN 1 ELSE 0 END) AS budget_denials,
                   SUM(CASE WHEN decision = 'deny' AND reason_code <> 'budget_exhausted' THEN 1 ELSE 0 END) AS other_denials,
                   COALESCE(SUM(actual_usd), 0) AS usd,
                   COALESCE(SUM(tokens_in), 0) AS tokens_in,
                   COALESCE(SUM(tokens_out), 0) AS tokens_out,
                   MIN(ts) AS started, MAX(COALESCE(completed_at, ts)) AS ended
            FROM decisions WHERE {where} AND run IS NOT NULL
            GROUP BY scope, tenant, workflow, agent, run ORDER BY MIN(ts)""",
        params,
    )
    runs = []
    for row in run_rows:
        if row["budget_denials"]:
            status = "budget_exhausted"
        elif row["other_denials"]:
            status = "denied"
        else:
            status = "normal"
        runs.append(
            {
                "run": row["run"],
                "scope": row["scope"],
                "tenant": row["tenant"],
                "workflow": row["workflow"],
                "agent": row["agent"],
                "requests": row["requests"],
                "allowed": row["allowed"],
                "denied": row["denied"],
                "would_deny": row["would_deny"],
                "usd": usd_float(row["usd"]),
                "usd_nanos": row["usd"],
                "tokens_in": row["tokens_in"],
                "tokens_out": row["tokens_out"],
                "started": _iso(row["started"]),
                "ended": _iso(row["ended"]),
                "duration_s": round((row["ended"] or row["started"]) - row["started"], 3),
                "status": status,
                "anomalies": [],
            }
        )

    budget_where = "updated_at >= :floor" + (" AND scope LIKE :run_scope" if run else "")
    budget_rows = reader.query(
        f"SELECT * FROM budget_instances WHERE {budget_where} ORDER BY budget, scope, window_start",
        {"floor": floor, "run_scope": f"%run:{run}%"},
    )
    budgets = []
    for row in budget_rows:
        budgets.append(
            {
                "budget": row["budget"],
                "scope": row["scope"],
                "per": row["per"],
                "window_start": _iso(row["window_start"]) if row["window_start"] else None,
                "limit": {
                    "usd": usd_float(row["limit_usd"]),
                    "tokens": row["limit_tokens"],
                    "requests": row["limit_requests"],
                },
                "spent": {
                    "usd": usd_float(row["spent_usd"]),
                    "tokens": row["spent_tokens"],
                    "requests": row["spent_requests"],
                },
                "reserved": {
                    "usd": usd_float(row["reserved_usd"]),
                    "tokens": row["reserved_tokens"],
                    "requests": row["reserved_requests"],
                },
                "exhausted": any(
                    row[f"limit_{u}"] is not None
                    and row[f"spent_{u}"] + row[f"reserved_{u}"] >= row[f"limit_{u}"]
                    for u in ("usd", "tokens", "requests")
                ),
            }
        )
    return {
        "generated_at": _iso(now),
        "since": _iso(floor) if since else None,
        "budgets": budgets,
        "runs": runs,
        "decisions": counts,
        "anomalies": [],
    }


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(lines)


def _limit(value: Any) -> str:
    return "-" if value is None else str(value)


def render_text(data: dict[str, Any]) -> str:
    out = []
    d = data["decisions"]
    out.append(
        f"decisions: {d['allow']} allowed, {d['deny']} denied, {d['would_deny']} would be denied (shadow)"
    )
    out.append("")
    out.append("RUNS")
    out.append(
        _table(
            [
                "scope",
                "status",
                "requests",
                "allowed",
                "denied",
                "would_deny",
                "usd",
                "tokens in/out",
            ],
            [
                [
                    r["scope"],
                    r["status"],
                    str(r["requests"]),
                    str(r["allowed"]),
                    str(r["denied"]),
                    str(r["would_deny"]),
                    format_usd(r["usd_nanos"]),
                    f"{r['tokens_in']}/{r['tokens_out']}",
                ]
                for r in data["runs"]
            ],
        )
        if data["runs"]
        else "(no runs)"
    )
    out.append("")
    out.append("BUDGETS")
    rows = []
    for b in data["budgets"]:
        for unit in ("usd", "tokens", "requests"):
            limit = b["limit"][unit]
            if limit is None:
                continue
            rows.append(
                [
                    b["scope"],
                    (b["per"] or "lifetime")
                    + (f" from {b['window_start']}" if b["window_start"] else ""),
                    unit,
                    f"{b['spent'][unit]:.4f}" if unit == "usd" else str(b["spent"][unit]),
                    f"{b['reserved'][unit]:.4f}" if unit == "usd" else str(b["reserved"][unit]),
                    f"{limit:.4f}" if unit == "usd" else _limit(limit),
                ]
            )
    out.append(
        _table(["instance", "window", "unit", "spent", "held", "limit"], rows)
        if rows
        else "(no budgets)"
    )
    if data["anomalies"]:
        out.append("")
        out.append("ANOMALIES")
        out.extend(f"  {a['kind']:<14} {a['scope']}: {a['detail']}" for a in data["anomalies"])
    return "\n".join(out)
