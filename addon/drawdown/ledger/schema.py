"""The ledger's tables, one list of versioned migrations.

SQLite migrations are written with sqlite-utils; the PostgreSQL backend carries
the same tables as SQL (see postgres.py). A ledger newer than this code is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

from .api import SCHEMA_VERSION, schema_version

DECISION_COLUMNS: dict[str, type] = {
    "id": int,
    "request_id": str,
    "ts": float,
    "decision": str,
    "reason_code": str,
    "reason": str,
    "mode": str,
    "scope": str,
    "tenant": str,
    "workflow": str,
    "agent": str,
    "run": str,
    "action": str,
    "provider": str,
    "model": str,
    "method": str,
    "host": str,
    "path": str,
    "est_usd": int,
    "est_tokens": int,
    "actual_usd": int,
    "tokens_in": int,
    "tokens_out": int,
    "usage_source": str,
    "priced": int,  # 1 priced by genai-prices or the action's price; 0 fallback price; NULL n/a
    "status": int,
    "latency_ms": float,
    "upstream_ms": float,
    "stream": int,
    "fingerprint": str,
    "hold_id": int,
    "budget": str,
    "policy_digest": str,
    "completed_at": float,
    "note": str,
    # Request features for `drawdown replay` (JSON text, redacted; see drawdown.recording).
    "port": int,
    "query": str,
    "body_fields": str,
    "body": str,
    "mcp": str,
}


def _v1(db: sqlite_utils.Database) -> None:
    db["budget_instances"].create(
        {
            "id": int,
            "budget": str,
            "scope": str,
            "window_start": int,
            "per": str,
            "limit_usd": int,
            "limit_tokens": int,
            "limit_requests": int,
            "spent_usd": int,
            "spent_tokens": int,
            "spent_requests": int,
            "reserved_usd": int,
            "reserved_tokens": int,
            "reserved_requests": int,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
        not_null={"budget", "scope", "window_start"},
        defaults={
            "spent_usd": 0,
            "spent_tokens": 0,
            "spent_requests": 0,
            "reserved_usd": 0,
            "reserved_tokens": 0,
            "reserved_requests": 0,
        },
    )
    db["budget_instances"].create_index(["budget", "scope", "window_start"], unique=True)
    db["budget_instances"].create_index(["scope"])
    db["processes"].create(
        {
            "id": str,
            "pid": int,
            "host": str,
            "started_at": float,
            "heartbeat_at": float,
            "stopped_at": float,
        },
        pk="id",
    )
    db["holds"].create(
        {
            "id": int,
            "request_id": str,
            "process_id": str,
            "state": str,  # active | committed | released | expired
            "created_at": float,
            "expires_at": float,
            "settled_at": float,
            "settle_reason": str,
            "instance_ids": str,  # comma-separated budget_instances ids the estimate is held on
            "est_usd": int,
            "est_tokens": int,
            "est_requests": int,
            "actual_usd": int,
            "actual_tokens": int,
            "actual_requests": int,
            "usage_source": str,
        },
        pk="id",
        not_null={"request_id", "process_id", "state"},
    )
    db["holds"].create_index(["request_id"], unique=True)
    db.execute("CREATE INDEX idx_holds_active ON holds (expires_at) WHERE state = 'active'")
    db.execute("CREATE INDEX idx_holds_process_active ON holds (process_id) WHERE state = 'active'")
    db["decisions"].create(DECISION_COLUMNS, pk="id", not_null={"request_id", "ts", "decision"})
    db["decisions"].create_index(["request_id"], unique=True)
    db["decisions"].create_index(["ts"])
    db["decisions"].create_index(["agent", "run", "ts"])
    db["decisions"].create_index(["scope", "fingerprint"])
    db["decisions"].create_index(["workflow", "scope"])
    db["events"].create(
        {
            "id": int,
            "ts": float,
            "kind": str,
            "request_id": str,
            "hold_id": int,
            "instance_id": int,
            "detail": str,
        },
        pk="id",
    )
    db["events"].create_index(["kind", "ts"])
    db["facts"].create(
        {
            "id": int,
            "scope": str,
            "action": str,
            "field": str,
            "value": str,
            "request_id": str,
            "ts": float,
        },
        pk="id",
        not_null={"scope", "action", "field", "value"},
    )
    db["facts"].create_index(["scope", "field", "value"])
    # Runs minted by idle_split, shared by every proxy process on this ledger (--workers).
    db["idle_runs"].create({"key": str, "run": str, "last_seen": float}, pk="key")


def _v2(db: sqlite_utils.Database) -> None:
    # The failed attempts the loop and step_count guards forgive (api.failed_attempt, word
    # for word): few per run, so counting them never walks the run's whole history.
    db.execute(
        "CREATE INDEX idx_decisions_failed ON decisions (scope, fingerprint) "
        "WHERE decision <> 'deny' AND fingerprint IS NOT NULL AND completed_at IS NOT NULL "
        "AND (status IS NULL OR status IN (408, 409, 429) OR status >= 500)"
    )


def _v3(db: sqlite_utils.Database) -> None:
    # Two indexes every reserve paid for and no query needs (each ~3 % of a lifecycle):
    # - a hold's request id is unique already through its decision row, inserted in the
    #   same transaction under decisions' unique index;
    # - (agent, run, ts): no query filters on agent first (reports filter on run and ts).
    db.execute("DROP INDEX IF EXISTS idx_holds_request_id")
    db.execute("DROP INDEX IF EXISTS idx_decisions_agent_run_ts")


def _v4(db: sqlite_utils.Database) -> None:
    # The runs of a workflow that got a request through, for the fan_out guard: is this run
    # one of them, and how many are there. Refused rows left out, so a run refused at its
    # first request that calls on is not read again and again (RUNS_INDEX in sqlite.py).
    db.execute(
        "CREATE INDEX IF NOT EXISTS idx_decisions_runs ON decisions (workflow, scope) "
        "WHERE workflow IS NOT NULL AND decision <> 'deny'"
    )


def _v5(db: sqlite_utils.Database) -> None:
    # Charges made at most once (Completion.once): a batch's results, downloaded again, are
    # charged the first time only. The key names the upstream and the batch or file.
    db["once_charges"].create(
        {"key": str, "request_id": str, "ts": float},
        pk="key",
        not_null={"request_id"},
        if_not_exists=True,
    )


def _v6(db: sqlite_utils.Database) -> None:
    # Holds kept for a batch job until its results are read (api.BatchHold), by the key its
    # results are charged under: a status read may move it to the key of its output file.
    db["batch_holds"].create(
        {"key": str, "hold_id": int, "request_id": str, "ts": float},
        pk="key",
        not_null={"hold_id", "request_id"},
        if_not_exists=True,
    )
    # OpenAI batch input files' estimates, by upstream and file id (BatchHold.input_estimate):
    # the batch naming one may go through another worker, or a proxy started since.
    db["batch_inputs"].create(
        {"key": str, "estimate": str, "request_id": str, "ts": float},
        pk="key",
        not_null={"estimate"},
        if_not_exists=True,
    )


def _v7(db: sqlite_utils.Database) -> None:
    # Request features for replay (DecisionRow): the body's size, for limits.max_request_bytes;
    # an LLM call's metering settings, to tell whether the new policy meters it otherwise.
    columns = set(db["decisions"].columns_dict)
    if "body_bytes" not in columns:
        db["decisions"].add_column("body_bytes", int)
    if "metering" not in columns:
        db["decisions"].add_column("metering", str)


def _v8(db: sqlite_utils.Database) -> None:
    # What `drawdown prune` took out from under each budget instance (retention.py): the
    # charges of the settled holds it deleted, so spent = kept holds + carried still checks.
    db["budget_carried"].create(
        {
            "instance_id": int,
            "usd": int,
            "tokens": int,
            "requests": int,
            "holds": int,
            "pruned_at": float,
        },
        pk="instance_id",
        not_null={"usd", "tokens", "requests", "holds"},
        if_not_exists=True,
    )


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8,
]  # fmt: skip
assert len(MIGRATIONS) == SCHEMA_VERSION


def migrate(db: sqlite_utils.Database) -> int:
    """Bring the ledger to SCHEMA_VERSION. Call inside a write transaction. Returns the old version."""
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = schema_version(row[0] if row else None, has_tables=db["budget_instances"].exists())
    for number in range(version, SCHEMA_VERSION):
        MIGRATIONS[number](db)
    if version != SCHEMA_VERSION:
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [str(SCHEMA_VERSION)],
        )
    return version
