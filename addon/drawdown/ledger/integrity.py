"""`drawdown verify`: check the ledger's invariants from its own rows (either backend).

1. Atomicity leftovers: each instance's `reserved` equals the estimates of its active holds.
2. Conservation: each instance's `spent` equals the actuals charged by the holds that matched it
   (those `drawdown prune` deleted carried in `budget_carried`);
   every hold is in one known state; a request has exactly one decision row, and a hold exactly one.
3. No stranded budget (with `settled=True`): no hold is still active but those kept for a
   batch job (api.BatchHold), which outlive every proxy until their batch ends.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .api import BATCH_HOLDER
from .reader import Reader

UNITS = ("usd", "tokens", "requests")
STATES = ("active", "committed", "released", "expired")


def verify(reader: Reader, *, settled: bool = False) -> list[str]:
    problems: list[str] = []
    instances = {row["id"]: row for row in reader.query("SELECT * FROM budget_instances")}
    holds = reader.query(
        "SELECT id, request_id, process_id, state, instance_ids, est_usd, est_tokens, est_requests, "
        "actual_usd, actual_tokens, actual_requests FROM holds"
    )
    reserved: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(UNITS, 0))
    spent: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(UNITS, 0))
    if reader.schema_version >= 8:  # what `drawdown prune` deleted holds had charged
        for row in reader.query("SELECT * FROM budget_carried"):
            if row["instance_id"] not in instances:
                problems.append(
                    f"pruned charges are carried for a budget instance {row['instance_id']} "
                    "that does not exist"
                )
            for unit in UNITS:
                spent[row["instance_id"]][unit] += row[unit]
    for hold in holds:
        if hold["state"] not in STATES:
            problems.append(f"hold {hold['id']} is in an unknown state {hold['state']!r}")
        if settled and hold["state"] == "active" and hold["process_id"] != BATCH_HOLDER:
            problems.append(f"hold {hold['id']} (request {hold['request_id']}) is still active")
        ids = [int(i) for i in (hold["instance_ids"] or "").split(",") if i]
        for instance_id in ids:
            if instance_id not in instances:
                problems.append(
                    f"hold {hold['id']} names a budget instance {instance_id} that does not exist"
                )
            for unit in UNITS:
                if hold["state"] == "active":
                    reserved[instance_id][unit] += hold[f"est_{unit}"] or 0
                spent[instance_id][unit] += hold[f"actual_{unit}"] or 0
    for instance_id, row in instances.items():
        for unit in UNITS:
            if row[f"reserved_{unit}"] != reserved[instance_id][unit]:
                problems.append(
                    f"budget {row['budget']} instance {row['scope']}: reserved {unit} {row[f'reserved_{unit}']} "
                    f"but its active holds add up to {reserved[instance_id][unit]}"
                )
            if row[f"spent_{unit}"] != spent[instance_id][unit]:
                problems.append(
                    f"budget {row['budget']} instance {row['scope']}: spent {unit} {row[f'spent_{unit}']} "
                    f"but its holds charged {spent[instance_id][unit]}"
                )
    for row in reader.query(
        "SELECT request_id, COUNT(*) AS n FROM decisions GROUP BY request_id HAVING COUNT(*) > 1"
    ):
        problems.append(f"request {row['request_id']} has {row['n']} decision rows")
    for row in reader.query(
        "SELECT h.request_id FROM holds h LEFT JOIN decisions d ON d.request_id = h.request_id WHERE d.id IS NULL"
    ):
        problems.append(f"hold for request {row['request_id']} has no decision row")
    return problems


def summary(reader: Reader) -> dict[str, Any]:
    counts = {
        row["state"]: row["n"]
        for row in reader.query("SELECT state, COUNT(*) AS n FROM holds GROUP BY state")
    }
    (decisions,) = reader.query("SELECT COUNT(*) AS n FROM decisions")
    return {"holds": counts, "decisions": decisions["n"]}
