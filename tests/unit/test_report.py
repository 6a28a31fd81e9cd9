"""`drawdown report`: the JSON contract and its extensions, run status precedence, spend over
time, the JSON-lines decision log (redacted), and the HTML page rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import uuid
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from drawdown import report
from drawdown.budgets import window
from drawdown.cli import main
from drawdown.ledger.api import Amount, BatchHold, Claim, Completion, DecisionRow, Guards
from drawdown.policy.model import JUDGING_KEY, AnomalySettings, Judging

from tests.support.policies import policy_from
from tests.support_pg import LedgerBackend
from tests.unit.seeding import T0, Seeder, claim

NOW = T0 + 3 * 3600


@pytest.fixture
def seed(tmp_path: Path) -> Seeder:
    seeder = Seeder(tmp_path / "ledger.db")
    yield seeder
    seeder.close()


def four_runs(seed: Seeder) -> dict[str, str]:
    """One run of each status; returns status -> run id."""
    budget = claim("agent:worker/run:broke", usd=3_000_000)
    for _ in range(3):  # the third does not fit: 2 × 1.0 spent + 2.0 estimate > 3.0
        seed.call(run="broke", claims=[budget], est_usd=2_000_000, actual_usd=1_000_000)
    for _ in range(6):  # a loop as well: the budget denial still names the status
        seed.call(run="broke", body="again", claims=[budget], est_usd=1, actual_usd=0)
    seed.call(
        run="refused",
        action="refund.issue",
        provider=None,
        deny=("not_authorized", "refund.issue is not allowed"),
    )
    seed.call(run="refused", body="x")
    for _ in range(6):
        seed.call(run="loopy", body="same")
    for i in range(4):
        seed.call(run="fine", body=f"step {i}")
    return {
        "budget_exhausted": "broke",
        "denied": "refused",
        "anomalous": "loopy",
        "normal": "fine",
    }


def test_contract_fields_and_status_precedence(seed: Seeder) -> None:
    expected = four_runs(seed)
    data = report.build(str(seed.path), now=NOW)
    for key in ("budgets", "runs", "decisions", "anomalies", "spend", "denials"):
        assert key in data
    statuses = {r["run"]: r["status"] for r in data["runs"]}
    assert statuses == {run: status for status, run in expected.items()}
    broke = next(r for r in data["runs"] if r["run"] == "broke")
    assert broke["denied"] == 1 and {a["kind"] for a in broke["anomalies"]} == {"loop"}
    for run in data["runs"]:
        for key in ("run", "scope", "requests", "steps", "allowed", "denied", "would_deny", "usd", "tokens_in",
                    "tokens_out", "tokens", "duration_s", "status", "anomalies", "started", "ended"):  # fmt: skip
            assert key in run, key
        assert run["steps"] == run["requests"] == run["allowed"] + run["denied"] + run["would_deny"]
        assert run["tokens"] == run["tokens_in"] + run["tokens_out"]
    assert {a["kind"] for a in data["anomalies"]} == {"loop"}
    assert sorted(a["run"] for a in data["anomalies"]) == ["broke", "loopy"]
    fine = next(r for r in data["runs"] if r["run"] == "fine")
    assert fine["duration_s"] == pytest.approx(4 * 0.8 + 3 * 0.5)


def test_a_run_denied_only_by_an_anomaly_guard_is_anomalous(seed: Seeder) -> None:
    for _ in range(3):
        seed.call(run="guarded", body="same", guards=Guards(max_repeats=2))
    (run,) = report.build(str(seed.path), now=NOW)["runs"]
    assert run["denied"] == 1 and run["status"] == "anomalous"
    assert run["anomalies"][0]["denied"] and run["anomalies"][0]["on_detect"] == "deny"


def test_shadow_runs_say_what_enforcement_would_have_made_of_them(seed: Seeder) -> None:
    seed.call(
        run="s", mode="shadow", action="refund.issue", deny=("not_authorized", "not for interns")
    )
    seed.call(run="s", mode="shadow")
    seed.call(run="t", mode="shadow")
    runs = {r["run"]: r for r in report.build(str(seed.path), now=NOW)["runs"]}
    assert runs["s"]["status"] == "normal" and runs["s"]["would_status"] == "denied"
    assert runs["s"]["would_deny"] == 1 and runs["t"]["would_status"] is None
    assert "normal (shadow: denied)" in report.render_text(report.build(str(seed.path), now=NOW))


def test_the_page_filters_a_shadow_weeks_runs_to_those_enforcing_would_refuse(
    seed: Seeder, tmp_path: Path
) -> None:
    """Its chips filtered on `status` alone: in shadow mode every run is `normal`, and the runs
    enforcement would have refused (the reason to read a shadow week) could not be picked out."""
    seed.call(
        run="s", mode="shadow", action="refund.issue", deny=("not_authorized", "not for interns")
    )
    for run in ("t", "u"):
        seed.call(run=run, mode="shadow")
    page = tmp_path / "week.html"
    assert main(["report", "--db", str(seed.path), "--html", str(page)]) == 0
    require_chromium()
    dom = parse(dump_dom(page, tmp_path, "#status=shadow"))
    chips = {b["attrs"]["data-status"]: b for b in dom.find("button")}
    assert chips["shadow"]["text"] == "shadow: would be refused (1)"
    assert chips["shadow"]["attrs"]["class"] == "on" and chips["all"]["attrs"]["class"] == ""
    shown = dom.find("tr", **{"class": "run"})
    assert [r["attrs"]["data-scope"] for r in shown] == ["tenant:acme/agent:worker/run:s"]
    everything = parse(dump_dom(page, tmp_path)).find("tr", **{"class": "run"})
    assert len(everything) == 3


def test_spend_over_time_per_budget_instance(seed: Seeder) -> None:
    tenant = claim("tenant:acme", usd=10_000_000_000, budget="tenant:*")
    for i in range(10):
        seed.call(run=f"r{i % 2}", claims=[tenant], actual_usd=1_000_000 * (i + 1), gap=200)
    data = report.build(str(seed.path), now=NOW)
    spend = data["spend"]
    assert spend["bucket_seconds"] == 30  # ~35 minutes of traffic: at most 120 buckets
    total, instance = spend["series"]
    assert total["scope"] == "all spend" and total["budget"] is None
    assert instance["scope"] == "tenant:acme" and instance["limit"]["usd"] == 10.0
    assert total["usd"] == instance["usd"] == pytest.approx(0.055)
    assert sum(p["usd"] for p in total["points"]) == pytest.approx(0.055)
    assert total["points"][-1]["cum_usd"] == pytest.approx(0.055)
    assert all(p["t"] % 30 == 0 for p in total["points"])
    assert sum(r["usd"] for r in data["runs"]) == pytest.approx(total["usd"])
    # One run's report charts that run's holds alone (calls 1, 3, 5, 7 and 9 µ-dollars × 1,000).
    one_run = report.build(str(seed.path), now=NOW, run="r0")["spend"]["series"][0]
    assert one_run["usd"] == pytest.approx(0.025)


def test_spend_over_time_counts_a_batchs_request_when_it_was_submitted(
    backend: LedgerBackend,
) -> None:
    """A batch's submission is charged its request when it is sent, and its hold kept until
    the batch ends: released when its results are read, expired at its window, or still
    running. Each counts one request at its submission, with its budget's spent requests
    (before: a released one never, an expired one at its expiry)."""
    ledger = backend.open()
    claim_ = Claim("run:*", "agent:a/run:r", 10_000_000, None, None)

    def call(at: float, batch: BatchHold | None = None, usd: int = 0) -> None:
        row = DecisionRow(uuid.uuid4().hex, at, "allow", "enforce", "agent:a/run:r")
        row.agent, row.run = "a", "r"
        hold = ledger.reserve(row, [claim_], Amount(usd=2_000_000, requests=1), at + 900)
        done = Completion(actual=Amount(usd=usd, requests=1), status=200, batch=batch)
        ledger.commit(row.request_id, hold.hold_id, done, at + 1)

    for n, key in enumerate(("read", "expires", "running")):
        call(
            NOW - 3000 + n * 60,
            BatchHold(key, keep_until=NOW - 1000 if key == "expires" else NOW + 9000),
        )
    call(NOW - 2000, BatchHold("read", ended=True), usd=400_000)  # its results, charged
    assert ledger.sweep(NOW - 900, 30) == 1  # the second's window passed
    ledger.close()
    data = report.build(backend.url, now=NOW)
    ((budget,),) = [[b for b in data["budgets"] if b["scope"] == "agent:a/run:r"]]
    assert budget["spent"]["requests"] == 4
    for series in data["spend"]["series"]:
        assert sum(p["requests"] for p in series["points"]) == 4
        assert series["usd"] == pytest.approx(0.0004)
    # The first request counted is the first submission's, in its bucket (not the expiry's).
    total = data["spend"]["series"][0]
    first = min(p["t"] for p in total["points"])
    assert first <= NOW - 2999 < first + data["spend"]["bucket_seconds"]


def test_text_report_lists_anomalies(seed: Seeder) -> None:
    four_runs(seed)
    text = report.render_text(report.build(str(seed.path), now=NOW))
    assert "ANOMALIES" in text and "loop" in text and "budget_exhausted" in text


def test_text_tables_end_no_line_in_spaces(seed: Seeder) -> None:
    """The last column was padded like the others: every table line ended in spaces."""
    four_runs(seed)
    lines = report.render_text(report.build(str(seed.path), now=NOW)).splitlines()
    assert any(line.startswith("scope ") for line in lines)  # the runs table is there
    assert [line for line in lines if line != line.rstrip()] == []


def test_the_decisions_line_names_shadow_only_for_would_deny_decisions(seed: Seeder) -> None:
    """An enforce-only ledger's report said "0 would be denied (shadow)"."""
    seed.call(run="enforced")
    seed.call(run="enforced", deny=("not_authorized", "no"))
    first = report.render_text(report.build(str(seed.path), now=NOW)).splitlines()[0]
    assert first == "decisions: 1 allowed, 1 denied"
    seed.call(run="trial", mode="shadow", deny=("not_authorized", "no"))
    first = report.render_text(report.build(str(seed.path), now=NOW)).splitlines()[0]
    assert first == "decisions: 1 allowed, 1 denied, 1 would be denied (shadow)"


def test_jsonl_streams_every_decision_redacted(
    seed: Seeder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed.call(run="r", features={"query": json.dumps({"key": "[redacted]", "q": "shoes"}), "port": 443,
                                 "body_fields": json.dumps({"json.amount": 12})})  # fmt: skip
    # A row written by something that did not redact: the log redacts again on the way out.
    seed.call(run="r", features={"query": json.dumps({"api_key": "sk-live-leaked", "page": "2"})})
    for _ in range(3):
        seed.call(run="r2")
    assert main(["report", "--db", str(seed.path), "--jsonl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 5 and len({e["request_id"] for e in entries}) == 5
    assert entries[0]["query"] == {"key": "[redacted]", "q": "shoes"} and entries[0][
        "body_fields"
    ] == {"json.amount": 12}
    assert entries[1]["query"] == {"api_key": "[redacted]", "page": "2"}
    assert "sk-live-leaked" not in "\n".join(lines)
    first = entries[0]
    assert (
        first["decision"] == "allow"
        and first["time"].endswith("Z")
        and first["actual_usd"] == 0.001
    )
    assert (
        first["actual_usd_nanos"] == 1_000_000
        and first["scope"] == "tenant:acme/agent:worker/run:r"
    )


def test_jsonl_pages_through_a_long_log(seed: Seeder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "PAGE", 7)
    for i in range(23):
        seed.call(run="r", body=str(i), gap=0.01, took=0.01)
    entries = list(report.decision_log(str(seed.path)))
    assert len(entries) == 23 and [e["id"] for e in entries] == sorted(e["id"] for e in entries)


def test_cli_report_policy_supplies_the_anomaly_settings(
    seed: Seeder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(3):
        seed.call(run="r", body="same")
    assert main(["report", "--db", str(seed.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["anomalies"] == []
    strict = tmp_path / "strict.yaml"
    strict.write_text("anomalies:\n  loop: {repeats: 2}\n")
    assert main(["report", "--db", str(seed.path), "--json", "--policy", str(strict)]) == 0
    assert [a["kind"] for a in json.loads(capsys.readouterr().out)["anomalies"]] == ["loop"]


def recorded_policy(tmp_path: Path, seed: Seeder, text: str, name: str) -> str:
    """A policy as the proxy runs it: its anomaly settings kept in the ledger by its digest, as
    the addon records them. Returns the digest its decisions carry."""
    policy = policy_from(tmp_path, text, name)
    digest = policy.digest[:16]
    seed.ledger.remember(JUDGING_KEY + digest, Judging.of(policy).record())
    return digest


def test_a_report_without_policy_judges_by_the_settings_the_proxy_recorded(
    backend: LedgerBackend, tmp_path: Path
) -> None:
    """A team reading its shadow run's report without --policy saw the built-in thresholds'
    anomalies, not the ones its policy set: the report now judges by the settings the proxy
    recorded for the policy the decisions were made under (the newest's, when a reload changed
    them mid-way), says whose, and falls back to the built-in ones where none was recorded."""
    seed = BackendSeeder(backend)
    for _ in range(3):  # a loop at repeats 2; not at the built-in 5
        seed.call(run="r", body="same", features={"policy_digest": "0123456789abcdef"})
    db, now = str(seed.path), seed.now + 60

    unrecorded = report.build(db, now=now)  # an older proxy's decisions: nothing recorded
    assert unrecorded["anomalies"] == []
    assert unrecorded["judged_by"] == {
        "source": "defaults",
        "policy_digest": None,
        "other_settings": 0,
        "unrecorded_policies": 1,
        "runs_by_policy": {},
    }
    assert [run["judged_by"] for run in unrecorded["runs"]] == [None]
    assert (
        "anomalies judged by the built-in settings (see --policy); 1 policy of these decisions "
        "left no settings in the ledger (an older drawdown's)"
    ) in report.render_text(unrecorded)

    strict = recorded_policy(tmp_path, seed, "anomalies:\n  loop: {repeats: 2}\n", "strict.yaml")
    for _ in range(3):
        seed.call(run="s", body="same", features={"policy_digest": strict})
    now = seed.now + 60
    judged = report.build(db, now=now)
    assert judged["judged_by"] == {
        "source": "ledger",
        "policy_digest": strict,
        "other_settings": 0,
        "unrecorded_policies": 1,  # run r's
        "runs_by_policy": {strict: 2},
    }
    # Judged by repeats 2, every run alike: the older proxy's run too.
    assert sorted((a["kind"], a["run"]) for a in judged["anomalies"]) == [
        ("loop", "r"),
        ("loop", "s"),
    ]
    given = report.build(
        db, now=now, policy=policy_from(tmp_path, "anomalies:\n  loop: {repeats: 2}\n")
    )
    assert given["judged_by"]["source"] == "policy"
    assert given["anomalies"] == judged["anomalies"]
    # Run s alone: its own policy's settings, nothing else in its decisions.
    (only,) = report.build(db, now=now, run="s")["runs"]
    assert [a["kind"] for a in only["anomalies"]] == ["loop"]
    assert report.build(db, now=now, run="s")["judged_by"]["unrecorded_policies"] == 0

    # Reloaded to a laxer loop: each run is judged by the settings of its own policy (run s
    # still loops at repeats 2), one with none recorded by the newest (run r: no loop at 4),
    # and the report says which judged how many runs.
    lax = recorded_policy(
        tmp_path, seed, "anomalies:\n  loop: {repeats: 4}\n  step_count: {max: 200}\n", "lax.yaml"
    )
    seed.call(run="t", body="other", features={"policy_digest": lax})
    latest = report.build(db, now=seed.now + 60)
    assert latest["judged_by"] == {
        "source": "ledger",
        "policy_digest": lax,
        "other_settings": 1,
        "unrecorded_policies": 1,
        "runs_by_policy": {lax: 2, strict: 1},
    }
    assert [(a["kind"], a["run"]) for a in latest["anomalies"]] == [("loop", "s")]
    by_run = {run["run"]: run for run in latest["runs"]}
    assert [by_run[r]["status"] for r in "rst"] == ["normal", "anomalous", "normal"]
    assert [by_run[r]["judged_by"] for r in "rst"] == [lax, strict, lax]  # each run's own
    text = report.render_text(latest)
    assert (
        f"anomalies judged by the settings the proxy recorded for each run's policy: {lax} "
        f"(2 runs), {strict} (1 run); 1 policy of these decisions left no settings"
    ) in text
    # The reload's own runs alone: its settings only, and the line says so.
    alone = report.build(db, now=seed.now + 60, run="t")
    assert alone["judged_by"]["runs_by_policy"] == {lax: 1} and alone["anomalies"] == []
    assert f"anomalies judged by the settings of policy {lax}, the proxy's" in (
        report.render_text(alone)
    )

    # A period without decisions judges nothing: no line claims what was or was not recorded.
    quiet = report.build(db, now=seed.now + 3600, since=60)
    assert quiet["runs"] == [] and quiet["judged_by"]["source"] == "defaults"
    assert "anomalies judged" not in report.render_text(quiet)
    seed.close()


def test_the_recorded_settings_read_back_as_the_policy_wrote_them(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: llm.local, provider: openai, match: {host: llm.internal}, price: {input: 0.1, output: 0.4}}
anomalies:
  loop: {repeats: 3, retries: 0, on_detect: deny, actions: ["llm*"]}
  under_commit: {ratio: 0.05, actions: [llm.local]}
  handoff: {ratio: 2.5, min_steps: 4}
""",
    )
    recorded = Judging.of(policy)
    read = Judging.from_record(recorded.record(), "abc")
    assert read is not None
    assert read.settings == policy.anomalies  # Decimals exact, actions and on_detect kept
    assert read.priced == frozenset({"llm.local"}) and (read.source, read.digest) == (
        "ledger",
        "abc",
    )
    assert read.settings.get("under_commit").param("ratio") == Decimal("0.05")
    # A newer drawdown's detector or parameter is left out; one missing keeps its default.
    data = json.loads(recorded.record())
    data["detectors"] = [d for d in data["detectors"] if d["name"] != "fan_out"]
    data["detectors"][0]["params"]["someday"] = 7
    data["detectors"].append({"name": "someday", "on_detect": "flag", "actions": [], "params": {}})
    newer = Judging.from_record(json.dumps(data), "abc")
    assert newer is not None and newer.settings.get("loop") == policy.anomalies.get("loop")
    assert newer.settings.get("fan_out") == AnomalySettings().get("fan_out")
    assert "someday" not in {d.name for d in newer.settings.detectors}
    for broken in ("", "[]", '{"detectors": [{"name": "loop"}]}', '{"detectors": [], "priced": 3}',
                   '{"detectors": [{"name": "drift", "on_detect": "flag", "actions": [], '
                   '"params": {"ratio": "many"}}], "priced": []}'):  # fmt: skip
        assert Judging.from_record(broken, "abc") is None, broken


# --- the HTML page -----------------------------------------------------------------------------


CHROMIUM = (
    shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
)
NO_CHROMIUM = "headless Chromium is not installed (apt-get install chromium; CI installs it)"


def require_chromium() -> None:
    """Skip without a browser; but in CI (DRAWDOWN_REQUIRE_CHROMIUM=1) its absence is a failure,
    so a failed install cannot turn the browser checks into silent skips."""
    if CHROMIUM is not None:
        return
    if os.environ.get("DRAWDOWN_REQUIRE_CHROMIUM", "") not in ("", "0"):
        pytest.fail(f"{NO_CHROMIUM}; DRAWDOWN_REQUIRE_CHROMIUM=1 demands it", pytrace=False)
    pytest.skip(NO_CHROMIUM)


def dump_dom(page: Path, tmp_path: Path, fragment: str = "") -> str:
    """The page's DOM after its scripts ran, from headless Chromium (no network, no profile)."""
    assert CHROMIUM is not None
    profile = tmp_path / f"chromium-profile{len(list(tmp_path.glob('chromium-profile*')))}"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri() + fragment],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class DomIndex(HTMLParser):
    """Elements by tag with their attributes and text (enough to read tables back)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict[str, Any]] = []
        self._open: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = {
            "tag": tag,
            "attrs": dict(attrs),
            "text": "",
            "parent": self._open[-1] if self._open else None,
        }
        self.elements.append(node)
        if tag not in ("meta", "link", "br", "img", "input", "col", "line", "rect", "path"):
            self._open.append(node)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            node = self._open.pop()
            if node["tag"] == tag:
                break

    def handle_data(self, data: str) -> None:
        for node in self._open:
            node["text"] += data

    def find(self, tag: str | None = None, **attrs: str) -> list[dict[str, Any]]:
        return [
            e for e in self.elements
            if (tag is None or e["tag"] == tag)
            and all(e["attrs"].get(k.replace("_", "-")) == v or (v == "*" and k.replace("_", "-") in e["attrs"]) for k, v in attrs.items())
        ]  # fmt: skip

    def cells(self, row: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {
            e["attrs"]["data-k"]: e
            for e in self.elements
            if e["parent"] is row and "data-k" in e["attrs"]
        }


def parse(dom: str) -> DomIndex:
    index = DomIndex()
    index.feed(dom)
    return index


def shown_usd(text: str) -> Decimal:
    return Decimal(text.strip().removeprefix("$"))


def test_html_page_renders_the_same_numbers_as_the_json(seed: Seeder, tmp_path: Path) -> None:
    four_runs(seed)
    tenant = claim("tenant:acme", usd=10_000_000_000, budget="tenant:*")
    for i in range(5):
        seed.call(run="spender", claims=[tenant], actual_usd=3_000_000 * (i + 1), gap=120)
    data = report.build(str(seed.path), now=NOW)
    page = tmp_path / "report.html"
    assert main(["report", "--db", str(seed.path), "--html", str(page)]) == 0
    html = page.read_text()
    assert (
        "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    )
    require_chromium()
    dom = parse(dump_dom(page, tmp_path))
    (app,) = dom.find("main", id="app")
    assert app["attrs"]["data-ready"] == "1"  # the page's script ran to the end
    rows = dom.find("tr", **{"class": "run"})
    assert [r["attrs"]["data-scope"] for r in rows] == [r["scope"] for r in data["runs"]]
    for row, run in zip(rows, data["runs"], strict=True):
        cells = dom.cells(row)
        assert cells["status"]["attrs"]["data-v"] == run["status"]
        for key in ("steps", "allowed", "denied", "would_deny", "tokens"):
            assert int(cells[key]["attrs"]["data-v"]) == run[key]
            assert int(cells[key]["text"].replace(",", "")) == run[key]
        assert float(cells["usd"]["attrs"]["data-v"]) == run["usd"]
        places = 4 if run["usd"] >= 0.01 else 6
        assert (
            abs(shown_usd(cells["usd"]["text"]) - Decimal(str(run["usd"])))
            <= Decimal(1).scaleb(-places) / 2
        )
        assert int(cells["anomalies"]["attrs"]["data-v"]) == len(run["anomalies"])
    for card, value in (("card-allow", data["decisions"]["allow"]), ("card-deny", data["decisions"]["deny"]),
                        ("card-would", data["decisions"]["would_deny"]), ("card-runs", len(data["runs"])),
                        ("card-anomalies", len(data["anomalies"]))):  # fmt: skip
        (node,) = dom.find("div", id=card)
        assert int(node["attrs"]["data-v"]) == value and str(value) in node["text"]
    (spend_card,) = dom.find("div", id="card-spend")
    assert float(spend_card["attrs"]["data-v"]) == data["spend"]["series"][0]["usd"]
    assert len(dom.find("tr", **{"class": "anomaly"})) == len(data["anomalies"])
    assert len(dom.find("tr", **{"class": "denial"})) == len(data["denials"]) > 0
    assert len(dom.find("option")) == len(data["spend"]["series"])
    (chart,) = dom.find("div", id="spend-chart")
    assert any(e["tag"] == "svg" and e["parent"] is chart for e in dom.elements)
    assert len(dom.find("rect", **{"class": "bar"})) == len(data["spend"]["series"][0]["points"])
    budget_rows = dom.find("tr", **{"class": "budget"})
    assert len(budget_rows) == sum(
        1
        for b in data["budgets"]
        for u in ("usd", "tokens", "requests")
        if b["limit"][u] is not None
    )

    # With #all every run's timeline is drawn: one bar per step, anomaly evidence outlined.
    dom = parse(dump_dom(page, tmp_path, "#all"))
    details = dom.find("div", **{"class": "run-detail"})
    assert [d["attrs"]["data-scope"] for d in details] == [r["scope"] for r in data["runs"]]
    steps = [
        e
        for e in dom.elements
        if e["tag"] == "rect" and e["attrs"].get("class", "").startswith("step ")
    ]
    assert len(steps) == sum(r["steps"] for r in data["runs"])
    flagged = {e["attrs"]["data-request"] for e in steps if "flagged" in e["attrs"]["class"]}
    assert flagged == {i for a in data["anomalies"] for i in a["evidence"]}
    denied = [e for e in steps if e["attrs"]["class"].startswith("step deny")]
    assert len(denied) == data["decisions"]["deny"]


HOSTILE_AGENT = "\"><img src=x onerror=\"document.body.setAttribute('data-pwned','agent')\">"
HOSTILE_PATH = "/</script><script>document.body.setAttribute('data-pwned','path')</script>"


def test_html_page_escapes_hostile_names_paths_and_reasons(seed: Seeder, tmp_path: Path) -> None:
    require_chromium()
    for _ in range(6):  # a loop, so the hostile scope also appears among the anomalies
        seed.call(agent=HOSTILE_AGENT, run="<b>run</b>", path=HOSTILE_PATH, body="same")
    seed.call(
        agent=HOSTILE_AGENT,
        run="<b>run</b>",
        action="x",
        deny=("not_authorized", f"<svg onload=alert(1)> {HOSTILE_PATH}"),
    )
    data = report.build(str(seed.path), now=NOW, timelines=True)
    page = tmp_path / "hostile.html"
    page.write_text(report.render_html(data))
    html = page.read_text()
    assert html.count("</script") == 2  # the data cannot close its <script> element
    assert "<img src=x" not in html
    raw = dump_dom(page, tmp_path, "#all")
    assert "data-pwned" not in raw.split("<main", 1)[0] and "data-pwned=" not in raw
    dom = parse(raw)
    assert dom.find("main", id="app")[0]["attrs"]["data-ready"] == "1"
    assert len(dom.find("script")) == 2 and dom.find("img") == [] and dom.find("b") == []
    (row,) = [e for e in dom.find("tr") if "run" in e["attrs"].get("class", "").split()]
    assert HOSTILE_AGENT in row["attrs"]["data-scope"]  # shown as text, verbatim
    assert HOSTILE_AGENT in dom.cells(row)["scope"]["text"]
    assert any(HOSTILE_PATH in e["text"] for e in dom.find("td", **{"class": "mono"}))
    assert any(
        "<svg onload=alert(1)>" in e["text"] for e in dom.find("span", **{"class": "reason"})
    )


def test_a_run_is_found_by_the_id_the_agent_sent(seed: Seeder, capsys) -> None:
    """Identity stores `tkt/9` escaped as `tkt%2F9`; `--run tkt/9` found no run and exit 1."""
    seed.call(run="tkt%2F9")  # as identity stores the run `tkt/9`
    seed.call(run="other")
    for given in ("tkt/9", "tkt%2F9"):
        data = report.build(str(seed.path), run=given, now=NOW)
        assert [r["run"] for r in data["runs"]] == ["tkt%2F9"], given
        assert [e["run"] for e in report.decision_log(str(seed.path), run=given)] == ["tkt%2F9"]
    assert main(["report", "--db", str(seed.path), "--run", "tkt/9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["run"] == "tkt%2F9"
    assert main(["report", "--db", str(seed.path), "--run", "tkt/8", "--json"]) == 1


def test_text_report_names_the_budget_of_each_instance(seed: Seeder) -> None:
    """Two budgets on one scope (all calls, and refunds alone) gave two rows alike but for
    their limit: which limit was which could not be read off the table."""
    scope = "agent:worker/run:r1"
    every = claim(scope, usd=5_000_000)
    refunds = claim(scope, requests=3, budget="agent:*/run:* [refund.issue]")
    seed.call(claims=[every, refunds], action="refund.issue", provider=None)
    text = report.render_text(report.build(str(seed.path), now=NOW))
    table = text.split("BUDGETS\n", 1)[1].splitlines()
    assert table[0].split() == ["budget", "instance", "window", "unit", "spent", "held", "limit"]
    rows = [re.split(r"\s{2,}", line.strip()) for line in table[2:] if line.strip()]
    assert [row[:4] for row in rows] == [
        ["agent:*/run:*", scope, "lifetime", "usd"],
        ["agent:*/run:* [refund.issue]", scope, "lifetime", "requests"],
    ]


def test_an_instance_that_refused_a_call_bigger_than_itself_is_marked_exhausted(
    seed: Seeder,
) -> None:
    """Its refusal reads `… is less than this call needs`, not `… exhausted (`: the run said
    budget_exhausted and its budget did not. And a ledger written before limits were shown
    exactly (`usd 0.02` for a limit of $0.015) is read as it was."""
    small = claim("agent:worker/run:big", usd=1_000_000)
    seed.call(run="big", claims=[small], est_usd=2_000_000)
    exact = claim("agent:worker/run:old", usd=15_000_000)
    seed.call(run="old", claims=[exact], est_usd=10_000_000, actual_usd=10_000_000)
    refused = seed.call(run="old", claims=[exact], est_usd=10_000_000)
    data = report.build(str(seed.path), now=NOW)
    runs = {r["run"]: r["status"] for r in data["runs"]}
    assert runs == {"big": "budget_exhausted", "old": "budget_exhausted"}
    assert {b["scope"]: b["exhausted"] for b in data["budgets"]} == {
        "agent:worker/run:big": True,
        "agent:worker/run:old": True,
    }
    with sqlite3.connect(seed.path) as conn:  # as drawdown worded it before
        conn.execute(
            "UPDATE decisions SET reason = replace(reason, 'usd 0.015 ', 'usd 0.02 ') "
            "WHERE request_id = ?",
            (refused.request_id,),
        )
    again = report.build(str(seed.path), now=NOW)
    assert [b["exhausted"] for b in again["budgets"] if b["scope"].endswith("old")] == [True]


def test_text_report_marks_an_exhausted_instance_as_the_json_does(seed: Seeder) -> None:
    """An instance at 12 spent against a limit of 8 (a call that cost more than it was
    estimated) showed no sign of it in the text, while the JSON said `"exhausted": true`."""
    over = claim("agent:worker/run:r1", usd=8_000_000)
    room = claim("agent:worker/run:r2", usd=8_000_000)
    seed.call(run="r1", claims=[over], est_usd=2_000_000, actual_usd=12_000_000)
    seed.call(run="r2", claims=[room], est_usd=2_000_000, actual_usd=1_000_000)
    data = report.build(str(seed.path), now=NOW)
    assert {b["scope"]: b["exhausted"] for b in data["budgets"]} == {
        "agent:worker/run:r1": True,
        "agent:worker/run:r2": False,
    }
    table = report.render_text(data).split("BUDGETS\n", 1)[1].split("\n\n", 1)[0]
    rows = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[2:]]
    assert [row[1] for row in rows] == ["agent:worker/run:r1 (exhausted)", "agent:worker/run:r2"]
    assert rows[0][4:] == ["0.012", "0", "0.008"]


@pytest.mark.parametrize(
    "code",
    ["shutting_down", "ledger_unavailable", "internal_error", "bad_request", "body_too_large"],
)
def test_the_proxys_own_refusals_do_not_make_a_run_denied(seed: Seeder, code: str) -> None:
    """A deploy answers calls in the air 503 `shutting_down`: every run with one was reported
    `denied`, as if an authority rule had refused it. The refusal still counts as denied.
    So did a request the proxy could not read (400 `bad_request`) or would not take whole
    (413 `body_too_large`): `denied` says an authority denial happened (SPEC §8)."""
    seed.call(run="deployed-under")
    seed.call(run="deployed-under", deny=(code, "the proxy could not take the call"))
    seed.call(run="refused", deny=("not_authorized", "refund.issue is not allowed"))
    runs = {r["run"]: r for r in report.build(str(seed.path), now=NOW)["runs"]}
    assert (runs["deployed-under"]["status"], runs["deployed-under"]["denied"]) == ("normal", 1)
    assert runs["refused"]["status"] == "denied"


def test_a_budget_that_refused_a_reserve_is_exhausted(seed: Seeder) -> None:
    """The demo's run was `budget_exhausted` while its only budget said `exhausted: false`:
    $0.0409 spent of $0.05, and the call it refused needed ≈$0.0094. An instance that refused
    a reserve in its window is exhausted, as the proxy's refusal says; not another budget on
    the same instance scope, nor the instance of the next window."""
    from drawdown.budgets import window

    scope = "agent:worker/run:r1"
    every = claim(scope, usd=50_000_000)
    refunds = claim(scope, requests=100, budget="agent:*/run:* [refund.issue]")
    for _ in range(3):  # the third needs 0.02 more than 0.04 spent: refused under 0.05
        seed.call(claims=[every, refunds], est_usd=20_000_000, actual_usd=20_000_000)
    seed.call(run="calm", claims=[claim("agent:worker/run:calm", usd=50_000_000)])
    hour = ("agent:*/run:* hourly", "agent:worker/run:w", 50_000_000, None, None, "hour")
    first = Claim(*hour, *window("hour", seed.now))
    for _ in range(2):  # the second is refused
        seed.call(run="w", claims=[first], est_usd=40_000_000, actual_usd=40_000_000)
    seed.now = window("hour", seed.now)[1] + 60.0
    seed.call(run="w", claims=[Claim(*hour, *window("hour", seed.now))], est_usd=10_000_000)
    data = report.build(str(seed.path), now=seed.now + 60)
    runs = {r["run"]: r["status"] for r in data["runs"]}
    assert runs == {"r1": "budget_exhausted", "calm": "normal", "w": "budget_exhausted"}
    exhausted = {
        (b["budget"], b["scope"], b["window_start"]): b["exhausted"] for b in data["budgets"]
    }
    hours = sorted(k for k in exhausted if k[0] == "agent:*/run:* hourly")
    assert [exhausted[k] for k in hours] == [True, False]
    assert exhausted[("agent:*/run:*", scope, None)] is True
    assert exhausted[("agent:*/run:* [refund.issue]", scope, None)] is False
    assert exhausted[("agent:*/run:*", "agent:worker/run:calm", None)] is False
    (spent,) = [b for b in data["budgets"] if b["scope"] == scope and b["limit"]["usd"]]
    assert spent["usd_nanos"]["spent"] == 40_000_000  # below the limit: the refusal says so
    only_r1 = report.build(str(seed.path), now=seed.now + 60, run="r1")["budgets"]
    assert [b["exhausted"] for b in only_r1] == [True, False]


def test_budget_amounts_are_exact_decimals_of_the_nanos(seed: Seeder) -> None:
    """The BUDGETS table printed its usd through a float with 4 places: a run budget that had
    been charged $0.000035 in many small calls read `0.0000` spent (the RUNS table said
    0.000035), and $0.00015 read `0.0001` (the float under 0.00015) where RUNS said 0.0002.
    Then both rounded to 4 places: $0.06076 read 0.0608 and $0.000285 read 0.0003. Both tables
    now print the exact decimal of the nanos, trailing zeros trimmed."""
    small = claim("agent:worker/run:tiny", usd=50_000)
    for _ in range(7):
        seed.call(run="tiny", claims=[small], est_usd=5_000, actual_usd=5_000)
    half = claim("agent:worker/run:half", usd=1_000_000_000)
    seed.call(run="half", claims=[half], est_usd=150_000, actual_usd=150_000)
    data = report.build(str(seed.path), now=NOW)
    budgets = {b["scope"]: b for b in data["budgets"]}
    tiny = budgets["agent:worker/run:tiny"]
    assert tiny["usd_nanos"] == {"limit": 50_000, "spent": 35_000, "reserved": 0}
    assert tiny["spent"]["usd"] == 0.000035 and tiny["limit"]["usd"] == 0.00005
    text = report.render_text(data)
    runs = {line.split()[0]: line.split() for line in text.split("RUNS\n", 1)[1].splitlines()[2:4]}
    table = text.split("BUDGETS\n", 1)[1].splitlines()[2:]
    cells = {row[1]: row for row in (re.split(r"\s{2,}", line.strip()) for line in table)}
    assert cells["agent:worker/run:tiny"][4:] == ["0.000035", "0", "0.00005"]
    assert runs["tenant:acme/agent:worker/run:tiny"][7] == "0.000035"
    assert (
        cells["agent:worker/run:half"][4]
        == "0.00015"
        == runs["tenant:acme/agent:worker/run:half"][7]
    )
    assert cells["agent:worker/run:half"][6] == "1"
    for run, usd in (("a", 60_760_000), ("b", 285_000), ("c", 1)):
        limit = claim(f"agent:worker/run:{run}", usd=123_456_789_000)
        seed.call(run=run, claims=[limit], est_usd=usd, actual_usd=usd)
    text = report.render_text(report.build(str(seed.path), now=NOW))
    table = text.split("BUDGETS\n", 1)[1].splitlines()[2:]
    cells = {row[1]: row for row in (re.split(r"\s{2,}", line.strip()) for line in table)}
    runs = {line.split()[0]: line.split() for line in text.split("\n\n")[1].splitlines()[1:]}
    for run, exact in (("a", "0.06076"), ("b", "0.000285"), ("c", "0.000000001")):
        assert cells[f"agent:worker/run:{run}"][4:] == [exact, "0", "123.456789"]
        assert runs[f"tenant:acme/agent:worker/run:{run}"][7] == exact


def test_text_report_shows_a_newline_from_an_agent_escaped(
    seed: Seeder, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model name is whatever the agent put in its request body, and it reaches an anomaly's
    detail. The terminal view escaped control characters line by line, after splitting on
    newlines: a model name with a newline in it printed lines of its own (a forged entry)."""
    forged = "  loop           tenant:acme/agent:boss/run:r: all clear"
    seed.call(run="r", model=f"gpt-evil\n{forged}\n")
    data = report.build(str(seed.path), now=NOW)
    (anomaly,) = data["anomalies"]
    assert anomaly["kind"] == "unpriced_model" and "\n" in anomaly["detail"]  # the data as it is
    text = report.render_text(data)
    assert forged not in text.splitlines() and "gpt-evil\\n  loop" in text
    assert main(["report", "--db", str(seed.path)]) == 0
    out = capsys.readouterr().out
    assert forged not in out.splitlines() and len(out.splitlines()) == len(text.splitlines())


def test_since_lists_the_budget_refusing_calls_in_the_window(seed: Seeder) -> None:
    """A day budget used up before the window and refusing calls within it changed no row
    since: `--since 30m` listed no budget at all, beside a run reading `budget_exhausted`."""
    start, end = window("day", T0)
    daily = Claim(
        "daily", "agent:worker", None, None, 2, per="day", window_start=start, window_end=end
    )
    other = Claim(
        "other", "agent:else", None, None, 9, per="day", window_start=start, window_end=end
    )
    seed.call(agent="else", run="e1", claims=[other])  # quiet since: not listed
    for _ in range(2):
        seed.call(run="r1", claims=[daily])
    seed.now += 3600
    floor = seed.now
    for _ in range(2):
        seed.call(run="r2", claims=[daily])  # refused
    data = report.build(str(seed.path), since=seed.now + 60 - floor, now=seed.now + 60)
    assert [(b["budget"], b["exhausted"]) for b in data["budgets"]] == [("daily", True)]
    assert seed.now + 60 < end  # the day has not ended: its window is the one refusing


def test_since_reports_a_run_active_in_the_window_whole(seed: Seeder) -> None:
    """`--since` counted a run's requests and spend in the window only, while its status and
    anomalies judged the whole run: a loop of six identical calls showed beside "2 requests".
    The run is now reported whole, with the window's part beside it."""
    for _ in range(4):
        seed.call(run="long", body="same", actual_usd=1_000)
    seed.now += 3600
    floor = seed.now
    for _ in range(2):
        seed.call(run="long", body="same", actual_usd=1_000)
    seed.call(run="new", body="x", actual_usd=5_000)
    now = seed.now + 60
    data = report.build(str(seed.path), since=now - floor, now=now)
    runs = {r["run"]: r for r in data["runs"]}
    long = runs["long"]
    assert (long["requests"], long["usd_nanos"], long["status"]) == (6, 6_000, "anomalous")
    assert [a["kind"] for a in long["anomalies"]] == ["loop"]
    assert long["in_window"] == {"requests": 2, "usd": 2e-06, "usd_nanos": 2_000}
    assert runs["new"]["in_window"]["requests"] == runs["new"]["requests"] == 1
    assert data["decisions"]["allow"] == 3  # the totals stay the window's
    text = report.render_text(data)
    assert "6 (2 since)" in text and "are shown whole" in text
    whole = report.build(str(seed.path), now=now)
    assert all(r["in_window"] is None for r in whole["runs"])
    assert "since)" not in report.render_text(whole)


def test_a_runs_steps_are_the_guards_less_the_attempts_its_sdk_retried(
    seed: Seeder, tmp_path: Path
) -> None:
    """Two failed attempts the SDK retried (a 503, one never answered) and a refusal by a
    stopping proxy are requests of the run but no steps, as the guards count; the retried
    attempts are shown (`retried`), so a reader sees the provider's trouble."""
    for status in (503, None):
        seed.call(run="flaky", body="ask", actual_usd=None, status=status)
    seed.call(run="flaky", body="ask")
    for i in range(2):
        seed.call(run="flaky", body=f"tool {i}")
    seed.call(run="flaky", body="last", deny=("shutting_down", "drawdown is shutting down"))
    seed.call(run="flaky", body="last")
    (run,) = report.build(str(seed.path), now=NOW)["runs"]
    assert (run["requests"], run["steps"], run["retried"]) == (7, 4, 2)
    # anomalies.loop.retries: 0 counts every attempt as a step, as the guards then do.
    strict = policy_from(tmp_path, "anomalies:\n  loop: {retries: 0}\n")
    (run,) = report.build(str(seed.path), now=NOW, policy=strict)["runs"]
    assert (run["requests"], run["steps"], run["retried"]) == (7, 6, 0)

    data = report.build(str(seed.path), now=NOW, timelines=True)
    text = report.render_text(data)
    header, _, row = text.split("RUNS\n", 1)[1].splitlines()[:3]
    cells = dict(
        zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip()), strict=True)
    )
    assert (cells["requests"], cells["steps"]) == ("7", "4 (+2 retried)")

    require_chromium()
    page = tmp_path / "report.html"
    assert main(["report", "--db", str(seed.path), "--html", str(page)]) == 0
    dom = parse(dump_dom(page, tmp_path, "#all"))
    (row,) = dom.find("tr", **{"class": "run open"})  # #all opened it
    steps = dom.cells(row)["steps"]
    assert (steps["attrs"]["data-v"], steps["text"]) == ("4", "4 +2 retried")
    bars = [
        e for e in dom.elements if e["tag"] == "rect" and "step " in e["attrs"].get("class", "")
    ]
    assert len(bars) == 7  # every attempt is drawn; the retried ones marked
    assert [e["text"] for e in dom.find("summary")] == ["All 7 requests"]
    assert [b["attrs"]["class"].endswith(" retried") for b in bars] == [True, True] + [False] * 5


def test_a_run_and_its_workflow_are_judged_alike_in_a_narrowed_report(
    seed: Seeder, tmp_path: Path
) -> None:
    """A workflow is judged by its newest run's settings: `--run` of an older run of it saw
    only that run's decisions, judged the workflow by their settings and called the run normal
    where the whole report flagged it."""
    strict = recorded_policy(
        tmp_path, seed, "anomalies:\n  fan_out: {max_runs_per_workflow: 2}\n", "strict.yaml"
    )
    lax = recorded_policy(
        tmp_path, seed, "anomalies:\n  fan_out: {max_runs_per_workflow: 50}\n", "lax.yaml"
    )
    for r in range(3):
        seed.call(run=f"v{r}", workflow="v", features={"policy_digest": lax})
    seed.call(run="v3", workflow="v", features={"policy_digest": strict})
    whole = report.build(str(seed.path), now=NOW)
    ((kind, runs),) = [(a["kind"], a["runs"]) for a in whole["anomalies"]]
    assert kind == "fan_out" and [scope.rsplit(":", 1)[1] for scope in runs] == ["v2", "v3"]
    statuses = {run["run"]: run["status"] for run in whole["runs"]}
    assert statuses == {"v0": "normal", "v1": "normal", "v2": "anomalous", "v3": "anomalous"}
    for run in ("v2", "v0"):
        alone = report.build(str(seed.path), now=NOW, run=run)
        assert [a["kind"] for a in alone["anomalies"]] == ["fan_out"]
        assert [r["status"] for r in alone["runs"]] == [statuses[run]]
        assert alone["judged_by"]["runs_by_policy"] == {lax: 1}  # the run's own settings
    assert report.build(str(seed.path), now=NOW, workflow="v")["anomalies"] == whole["anomalies"]


def test_the_line_names_the_settings_that_judged_the_runs_listed(
    seed: Seeder, tmp_path: Path
) -> None:
    """The newest decision may be of no run (a scope without a run level): the line named its
    policy, which judged none of the runs listed; and a run reloaded part-way through counted
    an `other_settings` that judged nothing."""
    strict = recorded_policy(tmp_path, seed, "anomalies:\n  loop: {repeats: 2}\n", "strict.yaml")
    lax = recorded_policy(tmp_path, seed, "anomalies:\n  loop: {repeats: 5}\n", "lax.yaml")
    for _ in range(3):
        seed.call(run="x", body="same", features={"policy_digest": strict})
    seed.call(run=None, agent="cron", body="other", features={"policy_digest": lax})
    data = report.build(str(seed.path), now=NOW)
    assert [(a["kind"], a["run"]) for a in data["anomalies"]] == [("loop", "x")]
    assert data["judged_by"]["policy_digest"] == lax  # the newest decision's
    assert data["judged_by"]["runs_by_policy"] == {strict: 1}
    assert data["judged_by"]["other_settings"] == 1
    assert f"anomalies judged by the settings of policy {strict}, the proxy's" in (
        report.render_text(data)
    )
    seed.call(run="x", body="last", features={"policy_digest": lax})  # reloaded mid-run
    data = report.build(str(seed.path), now=NOW)
    assert data["anomalies"] == []  # judged by its newest decision's: repeats 5
    assert data["judged_by"]["runs_by_policy"] == {lax: 1}
    assert data["judged_by"]["other_settings"] == 0


def test_each_runs_steps_forgive_the_retries_of_its_own_policy(
    seed: Seeder, tmp_path: Path
) -> None:
    """Runs made under a policy with `loop: {retries: 0}` and one made after a reload to the
    default 2 count their failed attempts as their own guards counted them, in the table and
    on the page's timeline."""
    none = recorded_policy(tmp_path, seed, "anomalies:\n  loop: {retries: 0}\n", "none.yaml")
    default = recorded_policy(tmp_path, seed, "anomalies:\n  loop: {repeats: 5}\n", "two.yaml")
    for run, digest in (("before", none), ("after", default)):
        for status in (503, 200):
            seed.call(run=run, body="ask", actual_usd=None if status == 503 else 1_000_000,
                      status=status, features={"policy_digest": digest})  # fmt: skip
    data = report.build(str(seed.path), now=NOW, timelines=True)
    runs = {run["run"]: run for run in data["runs"]}
    assert (runs["before"]["steps"], runs["before"]["retried"]) == (2, 0)
    assert (runs["after"]["steps"], runs["after"]["retried"]) == (1, 1)
    marked = {
        run["run"]: [step.get("retried", False) for step in run["timeline"]] for run in data["runs"]
    }
    assert marked == {"before": [False, False], "after": [True, False]}


def test_a_report_reads_the_ledger_as_of_one_moment(
    backend: LedgerBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy commits calls while the report makes its dozen queries: each read alone, the
    decision totals counted calls the run table had not (767 rows apart on a busy ledger)."""
    from drawdown.ledger.reader import Reader

    ledger = backend.open()
    claim_ = Claim("run:*", "agent:a/run:r", 10_000_000, None, None)

    def call(at: float) -> None:
        row = DecisionRow(uuid.uuid4().hex, at, "allow", "enforce", "agent:a/run:r")
        row.agent, row.run = "a", "r"
        hold = ledger.reserve(row, [claim_], Amount(usd=1_000, requests=1), at + 900)
        ledger.commit(row.request_id, hold.hold_id, Completion(Amount(usd=1_000, requests=1)), at)

    call(NOW - 60)
    original = Reader.query

    def query_while_a_proxy_writes(self: Reader, sql: str, params: Any = None) -> Any:
        found = original(self, sql, params)
        if "schema_version" not in sql:
            call(NOW - 30)  # another call lands after each of the report's reads
        return found

    monkeypatch.setattr(Reader, "query", query_while_a_proxy_writes)
    data = report.build(backend.url, now=NOW)
    ledger.close()
    (run,) = data["runs"]
    assert run["allowed"] == data["decisions"]["allow"] == 1
    (budget,) = data["budgets"]
    assert budget["spent"]["requests"] == 1


def test_the_report_says_how_many_denials_it_left_out(
    seed: Seeder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the latest denials are listed; the page's heading said "Denials 500" of 1,597."""
    monkeypatch.setattr(report, "MAX_DENIALS", 2)
    for n in range(3):
        seed.call(run=f"d{n}", deny=("not_authorized", "a rule refused it"))
    data = report.build(str(seed.path), now=seed.now + 60)
    assert len(data["denials"]) == 2 and data["denials_total"] == 3
    page = tmp_path / "report.html"
    assert main(["report", "--db", str(seed.path), "--html", str(page)]) == 0
    require_chromium()
    dom = parse(dump_dom(page, tmp_path))
    (heading,) = [h for h in dom.find("h2") if "Denials" in h["text"]]
    assert "latest 2 of 3" in heading["text"]


def test_the_page_makes_the_rows_of_many_runs_a_thousand_at_a_time(
    seed: Seeder, tmp_path: Path
) -> None:
    """A week of a fleet made a runs table of 48,000 rows, most of a minute for Chromium to
    open. Rows are made as they are shown, a thousand at a time, with a button for more;
    `#all` (to print the page) still shows and expands every one."""
    for n in range(1_050):
        seed.call(run=f"r{n:04d}", gap=0.01, took=0.01)
    page = tmp_path / "runs.html"
    assert main(["report", "--db", str(seed.path), "--html", str(page)]) == 0
    require_chromium()
    dom = parse(dump_dom(page, tmp_path))
    assert len(dom.find("tr", **{"class": "run"})) == 1_000
    (more,) = dom.find("button", id="more-runs")
    assert more["text"] == "show 50 more (50 of 1,050 not shown yet)"
    every = parse(dump_dom(page, tmp_path, "#all"))
    assert len(every.find("tr", **{"class": "run open"})) == 1_050
    assert every.find("tr", **{"class": "more"}) == []


def test_the_page_embeds_a_budget_of_steps_flagged_runs_first(
    seed: Seeder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step of every run went into the page: a week of fleet traffic (481k decisions)
    made a 210 MB page Chromium took 85 s to draw. The page now holds TIMELINE_BUDGET steps,
    given first to the runs a reader opens (denied, over budget, anomalous), then the latest;
    `--run ID --html` still draws a run whole."""
    monkeypatch.setattr(report, "TIMELINE_BUDGET", 40)
    monkeypatch.setattr(report, "MAX_TIMELINE", 12)
    statuses = four_runs(seed)  # 9 + 2 + 6 + 4 steps; "fine" is normal
    flagged = [run for status, run in statuses.items() if status != "normal"]

    def quiet_runs(first: int, count: int) -> None:
        for n in range(first, first + count):
            for i in range(8):
                seed.call(run=f"q{n:02d}", body=f"step {i}")

    def page_of(path: Path, *run: str) -> tuple[dict[str, Any], int]:
        assert main(["report", "--db", str(seed.path), *run, "--html", str(path)]) == 0
        html = path.read_text()
        raw = html.split('id="drawdown-data">', 1)[1].split("</script>", 1)[0]
        return json.loads(raw), len(html.encode())

    quiet_runs(0, 10)
    data, size = page_of(tmp_path / "small.html")
    embedded = {r["run"]: len(r["timeline"]) for r in data["runs"] if not r["timeline_omitted"]}
    assert sum(embedded.values()) == data["timelines"]["steps"] <= 40
    assert data["timelines"]["runs_omitted"] == len(data["runs"]) - len(embedded) > 0
    assert set(flagged) <= set(embedded)  # 17 steps; then the latest: q09, q08 (8 each), and
    assert set(embedded) - set(flagged) == {"q09", "q08", "fine"}  # the 4 of "fine" still fit
    for r in data["runs"]:
        assert r["timeline_total"] == r["requests"]
        assert r["timeline"] == [] if r["timeline_omitted"] else len(r["timeline"]) == r["requests"]

    # Past the budget, more runs add their rows to the page, not their steps.
    quiet_runs(10, 10)
    bigger, bigger_size = page_of(tmp_path / "bigger.html")
    assert bigger["timelines"]["steps"] <= 40
    monkeypatch.setattr(report, "TIMELINE_BUDGET", 10**9)
    whole, whole_size = page_of(tmp_path / "whole.html")
    assert whole["timelines"]["runs_omitted"] == 0
    assert (bigger_size - size) * 2 < whole_size - size

    # The run a page left out, drawn whole by --run (past MAX_TIMELINE too).
    monkeypatch.setattr(report, "TIMELINE_BUDGET", 40)
    seed.now += 60
    for i in range(15):
        seed.call(run="long", body=f"step {i}")
    assert bigger["runs"][4]["run"] == "q00" and bigger["runs"][4]["timeline_omitted"]
    one, _ = page_of(tmp_path / "run.html", "--run", "q00")
    assert [(len(r["timeline"]), r["timeline_omitted"]) for r in one["runs"]] == [(8, False)]
    one, _ = page_of(tmp_path / "run.html", "--run", "long")
    assert [len(r["timeline"]) for r in one["runs"]] == [15]

    require_chromium()
    dom = parse(dump_dom(tmp_path / "bigger.html", tmp_path, "#all"))
    assert dom.find("main", id="app")[0]["attrs"]["data-ready"] == "1"
    (note,) = dom.find("p", id="timelines-omitted")
    assert f"{bigger['timelines']['runs_omitted']} of {len(bigger['runs'])} runs" in note["text"]
    left_out = dom.find("p", **{"class": "empty timeline-omitted"})
    assert len(left_out) == bigger["timelines"]["runs_omitted"]
    assert "drawdown report --run q00 --html run.html" in [e["text"] for e in dom.find("code")]
    bars = [e for e in dom.elements if "step " in e["attrs"].get("class", "")]
    assert len(bars) == bigger["timelines"]["steps"]
    omitted_rows = dom.find("tr", data_timeline="omitted")
    assert len(omitted_rows) == bigger["timelines"]["runs_omitted"]


def test_text_budgets_summarise_a_per_run_budgets_many_instances(
    seed: Seeder, capsys: pytest.CaptureFixture[str]
) -> None:
    """BUDGETS printed a line per unit of every run's instance: 96k of the 145k lines of a
    week of fleet traffic (48k runs). Past MAX_RUN_INSTANCES a per-run budget lists those
    exhausted or that spent most and one line counting them all; `--run` and the JSON still give every one."""
    tenant = claim("tenant:acme", usd=10_000_000_000, budget="tenant:*")

    def runs(first: int, count: int) -> None:
        for n in range(first, first + count):
            own = claim(f"agent:worker/run:r{n:02d}", usd=500_000_000, requests=4)
            for _ in range(2):
                seed.call(run=f"r{n:02d}", claims=[tenant, own], actual_usd=1_000_000 * (n + 1))

    runs(0, 12)
    stopped = claim("agent:worker/run:stopped", usd=500_000_000, requests=1)
    for _ in range(2):  # the second does not fit
        seed.call(run="stopped", claims=[tenant, stopped], actual_usd=1)

    def table(text: str) -> tuple[list[list[str]], list[str]]:
        lines = text.split("BUDGETS\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
        rows = [re.split(r"\s{2,}", line.strip()) for line in lines if not line.startswith("(")]
        return rows, [line for line in lines if line.startswith("(")]

    data = report.build(str(seed.path), now=NOW)
    assert len(data["budgets"]) == 14  # the JSON keeps every instance
    rows, notes = table(report.render_text(data))
    # The exhausted first (here the one that spent least), then those that spent most.
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("agent:*/run:*", "agent:worker/run:stopped (exhausted)", unit)
        for unit in ("usd", "requests")
    ] + [
        ("agent:*/run:*", f"agent:worker/run:r{n:02d}", unit)
        for n in (11, 10, 9, 8)
        for unit in ("usd", "requests")
    ] + [("tenant:*", "tenant:acme", "usd")]
    assert notes == [
        "(agent:*/run:*: 13 run instances, 1 exhausted, 0.156000001 spent and 0 held in "
        "all; listed: the 5 exhausted or that spent most (`--run ID` lists a run's own, `--json` "
        "all))"
    ]
    every, notes = table(report.render_text(data, every_instance=True))
    assert len(every) == 13 * 2 + 1 and notes == []

    runs(12, 20)  # more runs: as many lines
    more, _ = table(report.render_text(report.build(str(seed.path), now=NOW)))
    assert len(more) == len(rows) == 11

    assert main(["report", "--db", str(seed.path), "--run", "stopped"]) == 0
    rows, notes = table(capsys.readouterr().out)
    assert [(r[1], r[3], r[4]) for r in rows] == [
        ("agent:worker/run:stopped (exhausted)", "usd", "0.000000001"),
        ("agent:worker/run:stopped (exhausted)", "requests", "1"),
    ]
    assert notes == []


def test_a_budget_per_minute_lists_its_latest_windows_and_a_summary(
    seed: Seeder, tmp_path: Path
) -> None:
    """A `per: minute` budget makes 1,440 instances a day for each agent: the text report
    printed a line for every one. Past MAX_RUN_INSTANCES windows, the latest are listed and
    one line counts them all; the JSON keeps every one, and the page summarises alike."""
    for _ in range(14):
        start = int(seed.now // 60) * 60
        minute = Claim("agent:*", "agent:worker", None, None, 5, "minute", start, start + 60)
        seed.call(run="r1", claims=[minute], gap=60)
    data = report.build(str(seed.path), now=seed.now)
    assert len(data["budgets"]) == 14
    text = report.render_text(data)
    table = text.split("BUDGETS\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    starts = [b["window_start"] for b in data["budgets"]]
    listed = [line for line in table if line.startswith("agent:*")]
    assert [next(w for w in starts if w in line) for line in listed] == sorted(starts)[::-1][:5]
    assert [line for line in table if line.startswith("(")] == [
        "(agent:*: 14 windows, 0 exhausted, 0.014 spent and 0 held in all; listed: the 5 "
        "latest (`--json` lists all))"
    ]
    page = tmp_path / "page.html"
    assert main(["report", "--db", str(seed.path), "--html", str(page)]) == 0
    html = page.read_text()
    embedded = json.loads(html.split('id="drawdown-data">', 1)[1].split("</script>", 1)[0])
    assert [s["of"] for s in embedded["budget_summaries"]] == ["windows"]
    assert len(embedded["budgets"]) == 5
    require_chromium()
    dom = parse(dump_dom(page, tmp_path))
    (summary,) = dom.find("tr", **{"class": "budget-summary"})
    assert "14 windows, 0 exhausted" in summary["text"] and "5 latest" in summary["text"]


def test_the_page_summarises_a_per_run_budgets_many_instances(
    seed: Seeder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page embedded a budgets row per unit of every run's instance and a spend series per
    instance: 96k rows and 48k options for a week of fleet traffic (48k runs), 62 of the 94 s
    Chromium took to open it. Past MAX_RUN_INSTANCES it gets the TOP_INSTANCES exhausted or
    that spent most and a summary row, and their series only; `--run ID --html` and `--json` keep every one."""
    tenant = claim("tenant:acme", usd=10_000_000_000, budget="tenant:*")

    def runs(first: int, count: int) -> None:
        for n in range(first, first + count):
            own = claim(f"agent:worker/run:r{n:02d}", usd=500_000_000, requests=4)
            seed.call(run=f"r{n:02d}", claims=[tenant, own], actual_usd=1_000_000 * (n + 1))

    def page_of(path: Path, *run: str) -> tuple[dict[str, Any], int]:
        assert main(["report", "--db", str(seed.path), *run, "--html", str(path)]) == 0
        html = path.read_text()
        raw = html.split('id="drawdown-data">', 1)[1].split("</script>", 1)[0]
        return json.loads(raw), len(html.encode())

    runs(0, 30)
    stopped = claim("agent:worker/run:stopped", usd=500_000_000, requests=1)
    for _ in range(2):  # the second does not fit
        seed.call(run="stopped", claims=[tenant, stopped], actual_usd=1)
    page, size = page_of(tmp_path / "page.html")
    # The exhausted first (in a shadow week: stopped, had it been enforced), then the biggest.
    top = ["agent:worker/run:stopped"] + [f"agent:worker/run:r{n:02d}" for n in (29, 28, 27, 26)]
    assert [b["scope"] for b in page["budgets"]] == [*top, "tenant:acme"]
    assert page["budget_summaries"] == [
        {
            "budget": "agent:*/run:*",
            "of": "runs",
            "instances": 31,
            "exhausted": 1,
            "listed": 5,
            "usd": {"spent": 0.465000001, "reserved": 0.0},
            "usd_nanos": {"spent": 465_000_001, "reserved": 0},
        }
    ]
    scopes = [s["scope"] for s in page["spend"]["series"]]
    assert scopes == ["all spend", "tenant:acme", *top[1:], top[0]]  # series by spend
    assert page["spend"]["series_omitted"] == 26  # the 26 runs' that spent least

    runs(30, 30)  # twice the runs: as many rows and series, a summary counting them
    bigger, bigger_size = page_of(tmp_path / "bigger.html")
    assert len(bigger["budgets"]) == 6 and len(bigger["spend"]["series"]) == 7
    assert bigger["budget_summaries"][0]["instances"] == 61
    assert bigger["spend"]["series_omitted"] == 56
    capsys.readouterr()
    assert main(["report", "--db", str(seed.path), "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert len(whole["budgets"]) == 62 and len(whole["spend"]["series"]) == 63
    assert "budget_summaries" not in whole and "series_omitted" not in whole["spend"]
    with capsys.disabled():
        print(f"page bytes: {size} (31 run instances), {bigger_size} (61)")

    # A run with more than MAX_RUN_INSTANCES of its own (an hourly budget): its page has them all.
    for _ in range(12):
        start = int(seed.now // 3600) * 3600
        hourly = Claim(
            "agent:*/run:*", "agent:worker/run:hourly", 500_000_000, None, None, "hour",
            start, start + 3600,
        )  # fmt: skip
        seed.call(run="hourly", claims=[hourly], gap=3600)
    one, _ = page_of(tmp_path / "run.html", "--run", "hourly")
    assert [b["scope"] for b in one["budgets"]] == ["agent:worker/run:hourly"] * 12
    assert len(one["spend"]["series"]) == 13
    assert "budget_summaries" not in one and "series_omitted" not in one["spend"]

    require_chromium()
    dom = parse(dump_dom(tmp_path / "bigger.html", tmp_path))
    assert dom.find("main", id="app")[0]["attrs"]["data-ready"] == "1"
    rows = dom.find("tr", **{"class": "budget"})
    top = ["agent:worker/run:stopped"] + [f"agent:worker/run:r{n:02d}" for n in (59, 58, 57, 56)]
    assert [r["attrs"]["data-scope"] for r in rows] == [s for s in top for _ in (0, 1)] + [
        "tenant:acme"
    ]
    (summary,) = dom.find("tr", **{"class": "budget-summary"})
    assert summary["attrs"]["data-instances"] == "61"
    assert "61 run instances, 1 exhausted, $1.8300 spent" in summary["text"]
    assert len(dom.find("option")) == 7
    (note,) = dom.find("p", id="series-omitted")
    assert note["text"].startswith("56 budget instances")
    (budgets,) = dom.find("section", id="budgets")
    (count,) = [
        e for e in dom.find("span", **{"class": "count"}) if e["parent"]["parent"] is budgets
    ]
    assert count["text"] == "62"  # every instance counted


def test_a_report_reads_whole_rows_only_of_the_runs_it_flags_or_draws(
    seed: Seeder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every decision of every run was read with its 35 columns (paths and reasons redacted
    on the way): half the report's time over a week of fleet traffic. The detectors decide on
    fewer columns; whole rows are read for the runs they flag, and for the runs a page draws."""
    from drawdown.ledger.reader import Reader

    for _ in range(6):
        seed.call(run="loopy", body="same")
    seed.call(run="batch", path="/v1/batches", body="submit", latency_ms=2, upstream_ms=1)
    for n in range(20):
        for i in range(3):
            seed.call(run=f"q{n:02d}", body=f"step {i}")
    whole_rows: list[int] = []
    original = Reader.query

    def counting(self: Reader, sql: str, params: Any = None) -> Any:
        found = original(self, sql, params)
        whole_rows.append(sum("path" in row for row in found))
        return found

    monkeypatch.setattr(Reader, "query", counting)
    data = report.build(str(seed.path), now=NOW)
    assert [(a["kind"], a["run"]) for a in data["anomalies"]] == [("loop", "loopy")]
    assert "POST api.openai.com/v1/chat/completions" in data["anomalies"][0]["detail"]
    # fast_commit cannot tell the batch's receipt from a model's answer without its path: its
    # run is read whole too, and found no anomaly.
    assert sum(whole_rows) == 6 + 1 < 67

    whole_rows.clear()
    monkeypatch.setattr(report, "TIMELINE_BUDGET", 13)
    data = report.build(str(seed.path), now=NOW, timelines=True)
    drawn = [r for r in data["runs"] if not r["timeline_omitted"]]
    assert [r["run"] for r in drawn] == ["loopy", "batch", "q18", "q19"]  # 13 steps
    assert drawn[0]["timeline"][0]["request"] == "POST api.openai.com/v1/chat/completions"
    assert sum(whole_rows) == (6 + 1) + 13


# --- --tenant / --workflow -------------------------------------------------------------------


class BackendSeeder(Seeder):
    """Seeder on the `backend` fixture's ledger: SQLite or PostgreSQL."""

    def __init__(self, backend: LedgerBackend) -> None:
        self.path = backend.url  # type: ignore[assignment]  # a file path or a DSN
        self.ledger = backend.open()
        self.now = T0


def seed_fleet(seed: Seeder) -> float:
    """Two tenants with a workflow and an agent of the same names, under one fleet-wide budget:
    acme's `a1` (ingest, a loop) and `a2` (triage, one authority denial), globex's `g1`
    (ingest, a loop and a run budget's denial) and `g2`. Returns the time `a2` starts."""
    everyone = Claim("*", "*", 100_000_000_000, None, None)  # one instance for all tenants

    def claims(tenant: str, workflow: str, run: str, run_usd: int) -> list[Claim]:
        return [
            everyone,
            claim(f"tenant:{tenant}", usd=50_000_000_000, budget="tenant:*"),
            claim(f"tenant:{tenant}/workflow:{workflow}", usd=9_000_000_000,
                  budget="tenant:*/workflow:*"),
            claim("agent:worker", usd=90_000_000_000, budget="agent:*"),
            claim(f"agent:worker/run:{run}", usd=run_usd),
        ]  # fmt: skip

    a1 = claims("acme", "ingest", "a1", 1_000_000_000)
    for _ in range(6):
        seed.call(tenant="acme", workflow="ingest", run="a1", body="same", claims=a1)
    g1 = claims("globex", "ingest", "g1", 3_000_000)
    for _ in range(3):  # the third does not fit its run budget: budget_exhausted
        seed.call(tenant="globex", workflow="ingest", run="g1", body="again", claims=g1)
    for _ in range(4):
        seed.call(tenant="globex", workflow="ingest", run="g1", body="again", est_usd=1,
                  actual_usd=0, claims=g1)  # fmt: skip
    cut = seed.now
    a2 = claims("acme", "triage", "a2", 1_000_000_000)
    seed.call(tenant="acme", workflow="triage", run="a2", claims=a2)
    seed.call(tenant="acme", workflow="triage", run="a2", action="refund.issue",
              deny=("not_authorized", "refund.issue is not allowed"))  # fmt: skip
    for n in range(2):
        seed.call(tenant="globex", workflow="ingest", run="g2", body=str(n),
                  claims=claims("globex", "ingest", "g2", 1_000_000_000))  # fmt: skip
    return cut


def budget_sides(data: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(own, shared) instance scopes of a narrowed report."""
    own = {b["scope"] for b in data["budgets"] if not b["shared"]}
    return own, {b["scope"] for b in data["budgets"] if b["shared"]}


def test_tenant_and_workflow_narrow_every_section(backend: LedgerBackend) -> None:
    """A fleet's report narrowed to a tenant, a workflow, or both (with --run and --since too):
    runs, decisions, denials, anomalies, spend and the decision log are that part's alone;
    budgets the instances within it (its own, its workflows' and its runs'), and those its
    calls share with other tenants (`*`, `agent:worker`) marked `shared` and given no spend
    series; another tenant's instance never. An unknown tenant: an empty report."""
    seed = BackendSeeder(backend)
    cut = seed_fleet(seed)
    seed.close()
    db, now = str(seed.path), seed.now + 60
    whole = report.build(db, now=now)
    assert {r["run"] for r in whole["runs"]} == {"a1", "a2", "g1", "g2"}
    assert whole["filter"] == {"tenant": None, "workflow": None, "run": None}
    assert "shared" not in whole["budgets"][0]  # the whole fleet's report is as it was

    acme = report.build(db, now=now, tenant="acme")
    assert acme["filter"] == {"tenant": "acme", "workflow": None, "run": None}
    assert [r["run"] for r in acme["runs"]] == ["a1", "a2"]
    assert acme["decisions"] == {"allow": 7, "deny": 1, "would_deny": 0}
    assert [d["run"] for d in acme["denials"]] == ["a2"] and acme["denials_total"] == 1
    assert [(a["kind"], a["run"]) for a in acme["anomalies"]] == [("loop", "a1")]
    assert {r["run"]: r["status"] for r in acme["runs"]} == {"a1": "anomalous", "a2": "denied"}
    assert budget_sides(acme) == (
        {"tenant:acme", "tenant:acme/workflow:ingest", "tenant:acme/workflow:triage",
         "agent:worker/run:a1", "agent:worker/run:a2"},
        {"*", "agent:worker"},
    )  # fmt: skip
    everyone = next(b for b in acme["budgets"] if b["scope"] == "*")
    assert everyone["spent"]["requests"] == 15  # everyone's, as its limit is
    total, *series = acme["spend"]["series"]
    assert total["budget"] is None and total["usd"] == pytest.approx(0.007)  # acme's 7 calls
    assert {s["scope"] for s in series} == budget_sides(acme)[0]  # none for a shared one
    log = list(report.decision_log(db, now=now, tenant="acme"))
    assert len(log) == 8 and {e["tenant"] for e in log} == {"acme"}

    ingest = report.build(db, now=now, workflow="ingest")
    assert [r["run"] for r in ingest["runs"]] == ["a1", "g1", "g2"]  # both tenants' ingest
    assert {(a["tenant"], a["run"]) for a in ingest["anomalies"]} == {
        ("acme", "a1"),
        ("globex", "g1"),
    }
    assert budget_sides(ingest) == (
        {"tenant:acme/workflow:ingest", "tenant:globex/workflow:ingest", "agent:worker/run:a1",
         "agent:worker/run:g1", "agent:worker/run:g2"},
        {"*", "tenant:acme", "tenant:globex", "agent:worker"},
    )  # fmt: skip
    g1 = next(b for b in ingest["budgets"] if b["scope"] == "agent:worker/run:g1")
    assert g1["exhausted"] and ingest["decisions"]["deny"] == 1

    both = report.build(db, now=now, tenant="acme", workflow="ingest")
    assert [r["run"] for r in both["runs"]] == ["a1"] and both["denials"] == []
    assert budget_sides(both) == (
        {"tenant:acme/workflow:ingest", "agent:worker/run:a1"},
        {"*", "tenant:acme", "agent:worker"},
    )
    assert len(list(report.decision_log(db, now=now, tenant="acme", workflow="ingest"))) == 6

    # --since: acme's part of the window; instances last charged before it are left out.
    recent = report.build(db, now=now, tenant="acme", since=now - cut + 0.1)
    assert [r["run"] for r in recent["runs"]] == ["a2"] and recent["anomalies"] == []
    assert budget_sides(recent) == (
        {"tenant:acme", "tenant:acme/workflow:triage", "agent:worker/run:a2"},
        {"*", "agent:worker"},
    )

    # --run with a filter: the run's own, if it is of the tenant; else nothing.
    mine = report.build(db, now=now, tenant="acme", run="a1")
    assert [r["run"] for r in mine["runs"]] == ["a1"]
    assert budget_sides(mine) == ({"agent:worker/run:a1"}, set())
    for empty in (
        report.build(db, now=now, tenant="acme", run="g1"),
        report.build(db, now=now, tenant="initech"),
        report.build(db, now=now, tenant="acme", workflow="nosuch"),
    ):
        assert empty["runs"] == empty["budgets"] == empty["anomalies"] == empty["denials"] == []
        assert empty["decisions"] == {"allow": 0, "deny": 0, "would_deny": 0}
        assert empty["spend"]["series"] == []
    assert list(report.decision_log(db, now=now, tenant="initech")) == []


def test_a_narrowed_text_report_says_whose_it_is_and_marks_shared_budgets(seed: Seeder) -> None:
    """The text says which part of the fleet it shows first (an unknown tenant's report is
    empty, not a quiet fleet), and marks the instances shared with other tenants; a tenant
    given as the agent sent it (`big co`) is found as identity stored it (`big%20co`)."""
    seed_fleet(seed)
    seed.call(tenant="big%20co", run="b1", claims=[claim("agent:worker/run:b1", usd=10**9)])
    seed.call(tenant="acme-eu", run="e1")  # its scopes sort among acme's: not acme's
    db, now = str(seed.path), seed.now + 60
    lines = report.render_text(report.build(db, now=now, tenant="acme")).splitlines()
    assert lines[0] == "report of tenant acme"
    assert lines[1] == "decisions: 7 allowed, 1 denied"
    shared = [line for line in lines if "(shared)" in line]
    assert {line.split()[1] for line in shared} == {"*", "agent:worker"}
    assert any(line.startswith("(shared: ") for line in lines)
    assert not any("globex" in line or "acme-eu" in line for line in lines)
    assert [r["run"] for r in report.build(db, now=now, tenant="acme-eu")["runs"]] == ["e1"]
    empty = report.render_text(report.build(db, now=now, tenant="initech", workflow="w"))
    assert empty.splitlines()[0] == "report of tenant initech, workflow w"
    assert "(no runs)" in empty and "(no budgets)" in empty
    spaced = report.build(db, now=now, tenant="big co")
    assert [r["run"] for r in spaced["runs"]] == ["b1"]
    assert spaced["filter"]["tenant"] == "big%20co"
    assert [e["run"] for e in report.decision_log(db, tenant="big co")] == ["b1"]


def test_a_narrowed_report_reads_only_its_own_runs_for_anomalies(backend: LedgerBackend) -> None:
    """`--tenant` found anomalies over every run of the fleet and kept the tenant's: a team's
    report took as long as the whole fleet's. The runs read are the filter's now, and each
    anomaly found is the one the whole report finds (the agents' history is fleet-wide)."""
    from drawdown import anomalies
    from drawdown.ledger.reader import Reader

    seed = BackendSeeder(backend)
    seed_fleet(seed)
    seed.close()
    reader = Reader(str(seed.path))
    try:
        whole, whole_rows = anomalies.find(reader)
        acme, acme_rows = anomalies.find(reader, within={"tenant": "acme"})
        ingest, _ = anomalies.find(reader, within={"tenant": "globex", "workflow": "ingest"})
        with pytest.raises(ValueError, match="narrowed by tenant or workflow"):
            anomalies.find(reader, within={"scope = scope OR 1": "x"})
    finally:
        reader.close()
    assert {r["tenant"] for r in whole_rows} == {"acme", "globex"}
    assert {r["tenant"] for r in acme_rows} == {"acme"}
    assert acme == [a for a in whole if a["tenant"] == "acme"] != []
    assert ingest == [a for a in whole if a["tenant"] == "globex"] != []
