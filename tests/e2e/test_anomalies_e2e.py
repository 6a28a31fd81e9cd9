"""Structural anomalies, end to end: traffic through a real `drawdown run` (official openai SDK
for LLM calls, httpx for tool APIs) against the TLS stand-in; every anomaly kind is found with
the right evidence, normal runs of the same workflows raise none, and a loop detector set to
deny answers the sixth identical call with 429. The same ledger's HTML report is checked in
headless Chromium."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support import wire
from tests.support.proxy import DrawdownProcess
from tests.support.standin import LoggedRequest, Reply, StandIn
from tests.unit.test_report import CHROMIUM, dump_dom, parse

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

POLICY = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: crm.read, match: {host: crm.example.com, method: GET}, cost: {usd: 0.002}, cost_header: X-Cost}
  - {kind: search, match: {host: search.example.com}, cost: {usd: 0.001}}
anomalies:
  loop: {repeats: 5}
  step_count: {max: 12}
  fan_out: {max_runs_per_workflow: 4}
  handoff: {ratio: 3, min_steps: 10}
  under_commit: {ratio: 0.1, actions: [crm.read]}
  fast_commit: {latency_ms: 100, actions: [search]}
  drift: {ratio: 2.0}
  unpriced_model: {}
"""


class Agent:
    """One agent run: identity headers on every call, LLM through the SDK, tools through httpx."""

    def __init__(
        self, proxy: DrawdownProcess, agent: str, run: str, workflow: str | None = None
    ) -> None:
        self.headers = {"X-Drawdown-Agent": agent, "X-Drawdown-Run": run}
        if workflow:
            self.headers["X-Drawdown-Workflow"] = workflow
        self.llm = proxy.openai_client(default_headers=self.headers, max_retries=0)
        self.http = proxy.http_client(headers=self.headers)

    def ask(self, prompt: str, model: str = "gpt-4o-mini", **headers: str) -> Any:
        return self.llm.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            extra_headers=headers or None,
        )

    def get(self, url: str) -> int:
        return self.http.get(url).status_code

    def close(self) -> None:
        self.llm.close()
        self.http.close()


def thinking_llm(entry: LoggedRequest) -> Reply:
    """A chat completion that takes as long as a real model's does (the stand-in's own replies
    come back within a few milliseconds: exactly what fast_commit's defaults flag as fake)."""
    body = entry.json
    prompt = int(entry.header("x-standin-input-tokens") or 12)
    usage = wire.openai_chat_usage(prompt, 9)
    text = wire.openai_chat_json(
        id="chatcmpl-e2e", created=1, model=body["model"], text="Noted, working on it.", usage=usage
    )
    return Reply(body=text, content_type="application/json", usage=usage, delay_before_headers=0.03)


def drive(proxy: DrawdownProcess, standin: StandIn) -> None:
    """For each kind: an anomalous run and a normal run of the same shape."""
    standin.script("POST", "/v1/chat/completions", thinking_llm, times=None)

    agents: list[Agent] = []

    def agent(name: str, run: str, workflow: str | None = None) -> Agent:
        agents.append(Agent(proxy, name, run, workflow))
        return agents[-1]

    # loop: 6 identical CRM reads; the normal run reads 5 different customers.
    a = agent("crm-bot", "loop-bad")
    for _ in range(6):
        assert a.get("https://crm.example.com/customers/42") == 200
    b = agent("crm-bot", "loop-ok")
    for i in range(5):
        b.get(f"https://crm.example.com/customers/{i}")
    # under_commit: the CRM reports a cost far below what was reserved (a cached answer).
    standin.script(
        "GET", "/customers/cached", Reply(json={"id": "cached"}, headers={"X-Cost": "0.0001"})
    )
    a = agent("crm-bot", "cheap-bad")
    a.get("https://crm.example.com/customers/7")
    a.get("https://crm.example.com/customers/cached")
    standin.script(
        "GET", "/customers/full", Reply(json={"id": "full"}, headers={"X-Cost": "0.002"})
    )
    b = agent("crm-bot", "cheap-ok")
    b.get("https://crm.example.com/customers/7")
    b.get("https://crm.example.com/customers/full")
    # fast_commit: a search answered at once (shaped: real searches take a while).
    standin.script("GET", "/q", Reply(json={"hits": []}, delay_before_headers=0.3), times=None)
    a = agent("searcher", "fast-bad")
    a.get("https://search.example.com/q?term=a")  # opens the upstream connection first
    a.get("https://search.example.com/instant?term=b")
    b = agent("searcher", "fast-ok")
    b.get("https://search.example.com/q?term=a")
    b.get("https://search.example.com/q?term=b")
    # step_count: 14 steps against max 12; the normal run takes 8.
    a = agent("planner", "steps-bad")
    for i in range(14):
        a.ask(f"step {i} of a long task")
    b = agent("planner", "steps-ok")
    for i in range(8):
        b.ask(f"step {i} of a short task")
    # fan_out: 6 sub-agent runs under one workflow (max 4); the normal workflow starts 3.
    for workflow, runs in (("fan-bad", 6), ("fan-ok", 3)):
        for r in range(runs):
            agent(f"sub{r}", f"{workflow}-{r}", workflow).ask(f"subtask {r}")
    # handoff: the planner hands over after 2 steps and the executor takes 12; normal: 4 and 10.
    for workflow, (mine, theirs) in (("hand-bad", (2, 12)), ("hand-ok", (4, 10))):
        p, e = (
            agent("planner", f"{workflow}-p", workflow),
            agent("executor", f"{workflow}-e", workflow),
        )
        for i in range(mine):
            p.ask(f"plan {i}")
        for i in range(theirs):
            e.ask(f"execute {i}")
    # drift: the upstream bills far more input than the prompt's estimate.
    a = agent("writer", "drift-bad")
    a.ask("a short prompt", **{"x-standin-input-tokens": "200000"})
    b = agent("writer", "drift-ok")
    b.ask("a short prompt")
    # unpriced_model: a model genai-prices does not know, charged at the fallback price.
    agent("writer", "unpriced-bad").ask("hello", model="acme-private-llm-7")
    agent("writer", "unpriced-ok").ask("hello", model="gpt-4o-mini")
    for each in agents:
        each.close()


def report_json(proxy: DrawdownProcess, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", "report", "--db", proxy.db_path, "--json", *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def evidence_of(proxy: DrawdownProcess, ids: list[str]) -> list[tuple[str, str, str]]:
    """(run, path, decision) of each evidence id, in the evidence's order."""
    rows = {r[0]: r[1:] for r in proxy.query(
        f"SELECT request_id, run, path, decision FROM decisions WHERE request_id IN ({','.join('?' * len(ids))})", *ids
    )}  # fmt: skip
    return [rows[i] for i in ids]


def test_every_anomaly_kind_is_found_and_normal_runs_raise_none(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    proxy = drawdown_proxy(POLICY)
    drive(proxy, standin)
    proxy.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE completed_at IS NULL", until=lambda r: r[0][0] == 0
    )
    policy_file = str(proxy.policy_path)
    data = report_json(proxy, "--policy", policy_file)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for anomaly in data["anomalies"]:
        by_kind.setdefault(anomaly["kind"], []).append(anomaly)
    assert sorted(by_kind) == [
        "drift",
        "fan_out",
        "fast_commit",
        "handoff",
        "loop",
        "step_count",
        "under_commit",
        "unpriced_model",
    ]
    assert all(len(found) == 1 for found in by_kind.values()), data["anomalies"]

    (loop,) = by_kind["loop"]
    assert (
        loop["run"] == "loop-bad"
        and evidence_of(proxy, loop["evidence"]) == [("loop-bad", "/customers/42", "allow")] * 6
    )
    (under,) = by_kind["under_commit"]
    assert evidence_of(proxy, under["evidence"]) == [("cheap-bad", "/customers/cached", "allow")]
    (fast,) = by_kind["fast_commit"]
    assert evidence_of(proxy, fast["evidence"]) == [("fast-bad", "/instant", "allow")]
    (steps,) = by_kind["step_count"]
    assert (
        steps["run"] == "steps-bad"
        and [e[0] for e in evidence_of(proxy, steps["evidence"])] == ["steps-bad"] * 2
    )
    (fan,) = by_kind["fan_out"]
    assert fan["workflow"] == "fan-bad" and [e[0] for e in evidence_of(proxy, fan["evidence"])] == [
        "fan-bad-4",
        "fan-bad-5",
    ]
    (handoff,) = by_kind["handoff"]
    assert handoff["workflow"] == "hand-bad" and sorted(
        {e[0] for e in evidence_of(proxy, handoff["evidence"])}
    ) == ["hand-bad-e", "hand-bad-p"]
    assert len(handoff["evidence"]) == 14
    (drift,) = by_kind["drift"]
    assert evidence_of(proxy, drift["evidence"]) == [("drift-bad", "/v1/chat/completions", "allow")]
    (unpriced,) = by_kind["unpriced_model"]
    assert unpriced["run"] == "unpriced-bad" and "acme-private-llm-7" in unpriced["detail"]

    runs = {r["run"]: r for r in data["runs"]}
    flagged = {scope for a in data["anomalies"] for scope in a["runs"]}
    for run in runs.values():
        bad = run["run"].endswith("-bad") or run["scope"] in flagged
        assert run["status"] == ("anomalous" if bad else "normal"), run
        if run["run"].endswith("-ok") or "-ok-" in run["run"]:
            assert run["anomalies"] == [], run
    assert runs["fan-bad-0"]["status"] == "normal"  # only the runs beyond the limit are flagged
    # Without --policy: the same report, judged by the settings the proxy recorded for the
    # policy it ran (the built-in ones would miss steps-bad at step_count's default max 60).
    (digest,) = {row[0] for row in proxy.query("SELECT DISTINCT policy_digest FROM decisions")}
    assert data["judged_by"] == {
        "source": "policy",
        "policy_digest": digest,
        "other_settings": 0,
        "unrecorded_policies": 0,
        "runs_by_policy": {digest: len(data["runs"])},
    }
    recorded = report_json(proxy)
    assert recorded["judged_by"] == {**data["judged_by"], "source": "ledger"}
    assert recorded["anomalies"] == data["anomalies"]
    # With the built-in defaults (a ledger that recorded none: an older proxy's), the normal
    # runs stay normal too (they are the same traffic).
    older = tmp_path / "older.db"
    with closing(sqlite3.connect(proxy.db_path)) as live, closing(sqlite3.connect(older)) as copy:
        live.backup(copy)
        with copy:
            copy.execute("DELETE FROM meta WHERE key LIKE 'anomalies:%'")
    defaults = report_json(proxy, "--db", str(older))
    assert defaults["judged_by"] == {**data["judged_by"], "source": "defaults", "policy_digest": None,
                                     "unrecorded_policies": 1, "runs_by_policy": {}}  # fmt: skip
    assert {a["run"] for a in defaults["anomalies"] if a["kind"] == "step_count"} == set()
    normal = {r["scope"] for r in data["runs"] if r["run"].endswith("-ok")}
    wrong = [
        (a["kind"], a["runs"], a["detail"])
        for a in defaults["anomalies"]
        if set(a["runs"]) & normal
    ]
    assert wrong == []

    # The same ledger as a page: it renders, and shows the JSON report's numbers.
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium; CI installs it)")
    page = tmp_path / "report.html"
    subprocess.run([sys.executable, "-m", "drawdown", "report", "--db", proxy.db_path, "--policy", policy_file,
                    "--html", str(page)], check=True, capture_output=True, timeout=60)  # fmt: skip
    dom = parse(dump_dom(page, tmp_path))
    assert dom.find("main", id="app")[0]["attrs"]["data-ready"] == "1"
    rows = dom.find("tr", **{"class": "run"})
    assert [r["attrs"]["data-status"] for r in rows] == [r["status"] for r in data["runs"]]
    assert [int(dom.cells(r)["steps"]["attrs"]["data-v"]) for r in rows] == [
        r["steps"] for r in data["runs"]
    ]
    assert len(dom.find("tr", **{"class": "anomaly"})) == len(data["anomalies"])
    (judged,) = dom.find("p", id="judged-by")
    assert judged["attrs"]["data-source"] == "policy"
    assert judged["text"] == f"Judged by the policy given (--policy, {digest})."


def test_a_report_without_policy_judges_by_the_settings_of_the_policy_reloaded(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """A shadow team tightens `loop` with the proxy running: `drawdown report` without --policy
    judges a run that went on after the reload by the reloaded policy's settings, which the
    proxy recorded in the ledger, and a run that ended before it by the settings it ran under;
    it says which judged how many runs."""
    shadow = POLICY + "mode: shadow\n"
    proxy = drawdown_proxy(shadow)
    agent, earlier = Agent(proxy, "poller", "p1"), Agent(proxy, "poller", "p0")
    for _ in range(3):
        agent.ask("is the export ready?")
        earlier.ask("is the export ready?")
    earlier.close()
    before = report_json(proxy)
    assert before["anomalies"] == [] and before["judged_by"]["source"] == "ledger"
    proxy.reload_policy(shadow.replace("loop: {repeats: 5}", "loop: {repeats: 2}"))
    proxy.wait_for_log("policy reloaded")
    agent.ask("and now?")
    agent.close()
    proxy.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE completed_at IS NULL", until=lambda r: r[0][0] == 0
    )
    digests = [row[0] for row in proxy.query("SELECT policy_digest FROM decisions ORDER BY ts")]
    assert digests[0] != digests[-1] and digests[-1] != before["judged_by"]["policy_digest"]
    after = report_json(proxy)
    assert after["judged_by"] == {
        "source": "ledger",
        "policy_digest": digests[-1],
        "other_settings": 1,
        "unrecorded_policies": 0,
        "runs_by_policy": {digests[-1]: 1, digests[0]: 1},
    }
    # p0's three repeats were no loop at the repeats: 5 it ran under; p1's are at its newest 2.
    (loop,) = after["anomalies"]
    assert loop["kind"] == "loop" and loop["run"] == "p1" and len(loop["evidence"]) == 3
    text = subprocess.run(
        [sys.executable, "-m", "drawdown", "report", "--db", proxy.db_path],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert (
        "anomalies judged by the settings the proxy recorded for each run's policy: "
        f"{min(digests[0], digests[-1])} (1 run), {max(digests[0], digests[-1])} (1 run)"
    ) in text
    # The page says it in the same words.
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium; CI installs it)")
    page = tmp_path / "report.html"
    subprocess.run([sys.executable, "-m", "drawdown", "report", "--db", proxy.db_path, "--html", str(page)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    (judged,) = parse(dump_dom(page, tmp_path)).find("p", id="judged-by")
    assert judged["attrs"]["data-source"] == "ledger"
    assert (
        judged["text"]
        == "Judged by " + text.split("anomalies judged by ", 1)[1].split("\n")[0] + "."
    )


def test_loop_set_to_deny_lets_five_through_and_the_sixth_gets_429(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(
        POLICY.replace("loop: {repeats: 5}", "loop: {repeats: 5, on_detect: deny}")
    )
    agent = Agent(proxy, "stuck", "r1")
    for _ in range(5):
        agent.ask("are we there yet?")
    with pytest.raises(openai.RateLimitError) as caught:
        agent.ask("are we there yet?")
    assert caught.value.status_code == 429
    assert caught.value.response.headers["x-drawdown-reason"] == "anomaly"
    assert caught.value.response.headers["x-should-retry"] == "false"
    message = caught.value.response.json()["error"]["message"]
    assert "loop" in message
    assert (
        "polling, is left out by naming only the guarded actions in anomalies.loop.actions"
        in message
    )
    assert standin.count("/v1/chat/completions") == 5
    agent.ask("something else")  # a different request is not a loop
    data = report_json(proxy, "--policy", str(proxy.policy_path))
    (loop,) = data["anomalies"]
    decisions = proxy.query("SELECT request_id, decision FROM decisions ORDER BY ts")
    assert loop["kind"] == "loop" and loop["on_detect"] == "deny"
    assert loop["denied"] == [decisions[5][0]] and loop["evidence"] == [d[0] for d in decisions[:6]]
    (run,) = data["runs"]
    assert run["status"] == "anomalous" and run["denied"] == 1 and run["allowed"] == 6
    agent.close()
    # explain --db counts the same history: the looping request is refused, another is not.
    looping = standin.requests[0].body.decode()
    explained = {}
    for body in (looping, looping.replace("are we", "were we")):
        result = subprocess.run(
            [sys.executable, "-m", "drawdown", "explain", "--policy", str(proxy.policy_path),
             "--db", proxy.db_path, "--url", "https://api.openai.com/v1/chat/completions",
             "--header", "X-Drawdown-Agent:stuck", "--header", "X-Drawdown-Run:r1",
             "--json", body, "--as-json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        explained[body] = json.loads(result.stdout)
    assert explained[looping]["decision"] == "deny"
    assert (
        "loop: this identical llm request was already made 6 times" in explained[looping]["reason"]
    )
    assert next(d for b, d in explained.items() if b != looping)["decision"] == "allow"
