"""`drawdown prune` beside a running proxy: a month-old run leaves the ledger and its report,
the budgets it spent stay spent, and `drawdown verify` still adds up."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.support.proxy import DrawdownProcess, assert_ledger_verifies

pytestmark = pytest.mark.e2e

POLICY = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*", requests: 5}
  - {scope: "agent:*/run:*", requests: 10}
"""
MONTH = 30 * 86400


def drawdown(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drawdown", *args], capture_output=True, text=True, timeout=120
    )


def ask(proxy: DrawdownProcess, run: str) -> int:
    headers = {"X-Drawdown-Agent": "researcher", "X-Drawdown-Run": run}
    with proxy.openai_client(default_headers=headers, max_retries=0) as client:
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20
            )
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code


def age_run(db: Path, run: str, seconds: float) -> None:
    """Move a run's calls `seconds` into the past, as if it had ended a month ago."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn, conn:
        ids = "SELECT request_id FROM decisions WHERE run = ?"
        conn.execute(
            f"UPDATE holds SET created_at = created_at - ?, settled_at = settled_at - ?, "
            f"expires_at = expires_at - ? WHERE request_id IN ({ids})",
            (seconds, seconds, seconds, run),
        )
        conn.execute(
            "UPDATE decisions SET ts = ts - ?, completed_at = completed_at - ? WHERE run = ?",
            (seconds, seconds, run),
        )


def test_a_month_old_run_is_pruned_beside_a_running_proxy_and_its_spend_stays(
    drawdown_proxy: Callable[..., DrawdownProcess], tmp_db: Path
) -> None:
    proxy = drawdown_proxy(POLICY)
    assert [ask(proxy, "old") for _ in range(3)] == [200, 200, 200]
    assert ask(proxy, "new") == 200
    proxy.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE completed_at IS NULL", until=lambda r: r[0][0] == 0
    )
    age_run(tmp_db, "old", MONTH)

    dry = drawdown("prune", "--db", str(tmp_db), "--older-than", "7d", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    counted = json.loads(dry.stdout)
    assert (counted["runs"], counted["decisions"], counted["carried"]["usd_nanos"]) == (1, 3, 0)
    assert proxy.query("SELECT COUNT(*) FROM decisions") == [(4,)]

    done = drawdown("prune", "--db", str(tmp_db), "--older-than", "7d")
    assert done.returncode == 0, done.stderr
    assert "pruned 1 run(s)" in done.stdout and "3 decision(s), 3 hold(s)" in done.stdout
    assert "3 requests carried" in done.stdout
    assert proxy.query("SELECT DISTINCT run FROM decisions") == [("new",)]
    assert_ledger_verifies(tmp_db)

    report = json.loads(drawdown("report", "--db", str(tmp_db), "--json").stdout)
    assert [r["run"] for r in report["runs"]] == ["new"]

    # The agent's lifetime budget of 5 requests still counts the pruned run's 3.
    assert [ask(proxy, "later") for _ in range(2)] == [200, 402]
    proxy.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE completed_at IS NULL AND decision <> 'deny'",
        until=lambda r: r[0][0] == 0,
    )
    assert_ledger_verifies(tmp_db)


def test_prune_refuses_a_cutoff_under_a_day_in_one_line(tmp_db: Path) -> None:
    tmp_db.write_bytes(b"")
    result = drawdown("prune", "--db", str(tmp_db), "--older-than", "2h")
    assert result.returncode == 2
    assert "--older-than 2h is under a day" in result.stderr
    assert "Traceback" not in result.stderr
    result = drawdown("prune", "--db", str(tmp_db / "missing"), "--older-than", "30d")
    assert result.returncode == 1 and "Traceback" not in result.stderr
