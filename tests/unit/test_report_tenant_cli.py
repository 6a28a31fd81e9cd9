"""`drawdown report --tenant ID --workflow ID` as a user runs it: a subprocess on either ledger
backend, every output format, and the usage errors (exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support_pg import LedgerBackend
from tests.unit.test_report import (
    BackendSeeder,
    dump_dom,
    parse,
    require_chromium,
    seed_fleet,
)


def drawdown(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drawdown", "report", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def fleet(backend: LedgerBackend) -> str:
    """The --db of a ledger holding seed_fleet's two tenants."""
    seed = BackendSeeder(backend)
    seed_fleet(seed)
    seed.close()
    return str(seed.path)


@pytest.mark.parametrize(("flag", "value"), [("--tenant", ""), ("--workflow", "  ")])
def test_an_empty_tenant_or_workflow_is_a_usage_error(
    tmp_path: Path, flag: str, value: str
) -> None:
    """`--tenant ''` (an unset shell variable) must not read as "every tenant"; said before the
    ledger is even opened."""
    result = drawdown("--db", str(tmp_path / "none.db"), flag, value, "--json")
    assert result.returncode == 2
    name = flag.removeprefix("--")
    assert result.stderr == f"drawdown: {flag} wants a {name} id; got an empty one\n"
    assert result.stdout == ""


def test_report_narrowed_to_a_tenant_and_workflow_in_every_format(
    fleet: str, tmp_path: Path
) -> None:
    narrowed = drawdown("--db", fleet, "--tenant", "acme", "--workflow", "ingest", "--json")
    assert narrowed.returncode == 0, narrowed.stderr
    data = json.loads(narrowed.stdout)
    assert data["filter"] == {"tenant": "acme", "workflow": "ingest", "run": None}
    assert [r["run"] for r in data["runs"]] == ["a1"]
    assert {b["scope"]: b["shared"] for b in data["budgets"]} == {
        "*": True,
        "agent:worker": True,
        "agent:worker/run:a1": False,
        "tenant:acme": True,
        "tenant:acme/workflow:ingest": False,
    }

    text = drawdown("--db", fleet, "--tenant", "acme")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == "report of tenant acme"
    assert "globex" not in text.stdout and "g1" not in text.stdout

    log = drawdown("--db", fleet, "--workflow", "ingest", "--jsonl")
    assert log.returncode == 0, log.stderr
    entries = [json.loads(line) for line in log.stdout.splitlines()]
    assert len(entries) == 15  # the fleet's 17 calls but a2's two (triage)
    assert {(e["tenant"], e["workflow"]) for e in entries} == {
        ("acme", "ingest"),
        ("globex", "ingest"),
    }

    # An unknown tenant: an empty report, exit 0 (a report, not an error).
    unknown = drawdown("--db", fleet, "--tenant", "initech", "--json")
    assert unknown.returncode == 0 and unknown.stderr == ""
    data = json.loads(unknown.stdout)
    assert data["runs"] == data["budgets"] == data["anomalies"] == []
    assert drawdown("--db", fleet, "--tenant", "initech", "--jsonl").stdout == ""

    page = tmp_path / "acme.html"
    html = drawdown("--db", fleet, "--tenant", "acme", "--html", str(page))
    assert html.returncode == 0, html.stderr
    assert html.stdout == f"drawdown: wrote {page} (2 runs, 1 anomaly)\n"
    if not fleet.endswith(".db"):
        return  # the page is the same on either backend: drawn once
    require_chromium()
    dom = parse(dump_dom(page, tmp_path))
    (meta,) = [e for e in dom.elements if e["attrs"].get("class") == "meta"]
    assert " · tenant acme · 2 runs" in meta["text"]
    shared = {e["attrs"]["data-scope"] for e in dom.find("tr", data_shared="1")}
    assert shared == {"*", "agent:worker"}
    (note,) = dom.find("p", id="budgets-shared")
    assert "outside tenant acme" in note["text"]


def test_a_run_of_another_tenant_is_reported_empty_and_says_so(fleet: str, tmp_path: Path) -> None:
    """`--run g1 --tenant acme`: g1 is globex's. Every format exits 1, as for a run the
    ledger does not hold, and says the run is there but not of that tenant."""
    page = tmp_path / "page.html"
    results = {}
    for form in ("text", "--json", "--jsonl", "--html"):
        args = {"text": [], "--html": ["--html", str(page)]}.get(form, [form])
        result = results[form] = drawdown("--db", fleet, "--run", "g1", "--tenant", "acme", *args)
        assert result.returncode == 1, form
        assert result.stderr.startswith("drawdown: run 'g1' is in "), form
        assert result.stderr.endswith(", but not of tenant 'acme': nothing to report\n"), form
    assert not page.exists()  # no page of 0 runs
    assert results["text"].stdout.splitlines()[0] == "report of tenant acme, run g1"
    assert "(no runs)" in results["text"].stdout
    data = json.loads(results["--json"].stdout)
    assert data["runs"] == data["budgets"] == [] and data["filter"]["run"] == "g1"
    assert results["--jsonl"].stdout == ""
    # A run of none at all still says so as before; one of that tenant is reported.
    nosuch = drawdown("--db", fleet, "--run", "zz", "--tenant", "acme")
    assert nosuch.returncode == 1 and nosuch.stderr.startswith("drawdown: no run 'zz' in ")
    mine = drawdown("--db", fleet, "--run", "g1", "--tenant", "globex", "--json")
    assert mine.returncode == 0 and [r["run"] for r in json.loads(mine.stdout)["runs"]] == ["g1"]
