"""Structural anomaly detectors over seeded ledgers: each kind fires with the right evidence,
normal traffic of the same shape raises none, and flag agrees with the reserve-time guards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from drawdown import anomalies
from drawdown.ledger.api import Claim, Guards
from drawdown.ledger.reader import Reader
from drawdown.policy.model import JUDGING_KEY, Judging, Policy

from tests.support.policies import policy_from
from tests.unit.seeding import T0, Seeder


@pytest.fixture
def seed(tmp_path: Path) -> Seeder:
    seeder = Seeder(tmp_path / "ledger.db")
    yield seeder
    seeder.close()


policy = policy_from


def found(seed: Seeder, settings: Policy | None = None) -> list[dict[str, Any]]:
    reader = Reader(str(seed.path))
    try:
        result, _ = anomalies.find(reader, policy=settings)
        return result
    finally:
        reader.close()


def kinds(result: list[dict[str, Any]]) -> list[str]:
    return sorted(a["kind"] for a in result)


def normal_workflow(seed: Seeder, workflow: str, runs: int = 3) -> None:
    """A planner and two workers: LLM calls with varying prompts, tool reads, an upstream error."""
    for r in range(runs):
        for agent, steps in (("planner", 6), ("researcher", 8), ("writer", 7)):
            for i in range(steps):
                seed.call(agent=agent, run=f"{workflow}-{agent}-{r}", workflow=workflow, body=f"{agent} step {i} of {r}",
                          actual_usd=300_000 + 1000 * i, tokens=(200 + i, 50))  # fmt: skip
            seed.call(agent=agent, run=f"{workflow}-{agent}-{r}", workflow=workflow, action="crm.read",
                      provider=None, model=None, host="crm.example.com", method="GET", path=f"/customers/{r}",
                      est_usd=2_000_000, actual_usd=2_000_000, latency_ms=40, upstream_ms=35)  # fmt: skip
        seed.call(
            agent="writer",
            run=f"{workflow}-writer-{r}",
            workflow=workflow,
            actual_usd=None,
            status=503,
        )


def test_normal_runs_raise_no_anomaly_with_the_defaults(seed: Seeder) -> None:
    for w in range(4):
        normal_workflow(seed, f"wf{w}", runs=1)
    # The same polling GET a few times (≤ repeats) and an LLM reply far below its max_tokens hold.
    for _ in range(5):
        seed.call(agent="poller", run="p1", action="jobs.status", provider=None, model=None, method="GET",
                  host="jobs.example.com", path="/jobs/7", body="", est_usd=0, actual_usd=0, upstream_ms=20)  # fmt: skip
    seed.call(agent="poller", run="p1", est_usd=40_000_000, actual_usd=90_000)
    assert found(seed) == []


def test_loop_flags_the_sixth_identical_request_with_all_six_as_evidence(seed: Seeder) -> None:
    ids = [seed.call(run="looping", body="same prompt").request_id for _ in range(6)]
    five = [seed.call(run="fine", body="same prompt").request_id for _ in range(5)]
    (loop,) = found(seed)
    assert loop["kind"] == "loop" and loop["scope"] == "tenant:acme/agent:worker/run:looping"
    assert loop["run"] == "looping" and loop["evidence"] == ids and loop["on_detect"] == "flag"
    assert "6 times" in loop["detail"] and "repeats: 5" in loop["detail"]
    assert "(POST api.openai.com/v1/chat/completions, body #" in loop["detail"]
    assert not set(five) & set(loop["evidence"])


def test_a_loop_of_gets_is_named_by_its_request_not_a_body(seed: Seeder) -> None:
    """A GET has no body: its fingerprint is its method, path and query's."""
    for _ in range(6):
        seed.call(run="poll", action="jobs.status", provider=None, model=None, method="GET",
                  host="jobs.example.com", path="/jobs/7", body="query", est_usd=0, actual_usd=0)  # fmt: skip
    (loop,) = found(seed)
    assert "(GET jobs.example.com/jobs/7, request #" in loop["detail"]
    assert "body" not in loop["detail"]


def test_a_budget_windows_refusals_are_forgiven_as_the_guard_forgives_them(
    seed: Seeder, tmp_path: Path
) -> None:
    """As the guard counts (plan.Counts.window_refusals): a window's 429 says when to come back,
    and the first loop.retries (2) of its refusals of a request in a run are no repeats. They
    are steps still, as step_count counts them."""
    scope = "tenant:acme/agent:worker/run:r"
    per_minute = Claim("run", scope, None, None, 1, per="minute", window_end=int(T0) + 60)
    rows = [seed.call(run="r", body="again", claims=[per_minute]) for _ in range(7)]
    assert [(r.decision, r.status) for r in rows[1:]] == [("deny", 429)] * 6
    assert found(seed) == []  # seven made, two forgiven: five, as loop.repeats allows
    eighth = seed.call(run="r", body="again", claims=[per_minute])
    (loop,) = found(seed)
    assert loop["evidence"] == [r.request_id for r in [*rows, eighth]]
    assert loop["detail"].endswith(
        "made 6 times in this run (anomalies.loop.repeats: 5), not counting 2 failed attempt(s) "
        "its client retried, a budget window's refusals among them (anomalies.loop.retries: 2)"
    )
    settings = policy(tmp_path, "anomalies:\n  step_count: {max: 7}\n")
    assert {a["kind"] for a in found(seed, settings)} == {"loop", "step_count"}


def test_loop_denied_by_the_guard_is_the_same_anomaly(seed: Seeder, tmp_path: Path) -> None:
    settings = policy(tmp_path, "anomalies:\n  loop: {repeats: 5, on_detect: deny}\n")
    rows = [seed.call(run="r", body="again", guards=Guards(max_repeats=5)) for _ in range(7)]
    assert [r.decision for r in rows] == ["allow"] * 5 + ["deny"] * 2
    (loop,) = found(seed, settings)
    assert loop["on_detect"] == "deny" and loop["denied"] == [r.request_id for r in rows[5:]]
    assert loop["evidence"] == [r.request_id for r in rows]
    # A report made without the policy still shows what the guard did.
    (alone,) = found(seed)
    assert alone["kind"] == "loop" and alone["denied"] == [r.request_id for r in rows[5:]]


def test_a_loop_only_the_guard_saw_is_told_by_its_evidence(seed: Seeder) -> None:
    """Below the report's own threshold (the built-in 5 repeats) only the guard's refusals
    make the anomaly. Its detail was the first refusal's reason ("already made 2 times")
    beside five requests of evidence; it now says what the evidence holds."""
    rows = [seed.call(run="r", body="again", guards=Guards(max_repeats=2)) for _ in range(5)]
    assert [r.decision for r in rows] == ["allow"] * 2 + ["deny"] * 3
    (alone,) = found(seed)
    assert alone["evidence"] == [r.request_id for r in rows]
    assert alone["detail"].startswith("the same llm request (POST api.openai.com/v1/chat/")
    assert alone["detail"].endswith(
        "was made 5 times in this run; the loop guard refused 3 of them"
    ), alone["detail"]


def test_a_loop_of_gets_only_the_guard_saw_is_named_by_its_request(seed: Seeder) -> None:
    rows = [
        seed.call(run="poll", action="jobs.status", provider=None, model=None, method="GET",
                  host="jobs.example.com", path="/jobs/7", body="query", guards=Guards(max_repeats=2))
        for _ in range(4)
    ]  # fmt: skip
    assert [r.decision for r in rows] == ["allow"] * 2 + ["deny"] * 2
    (alone,) = found(seed)
    assert alone["detail"].startswith(
        "the same jobs.status request (GET jobs.example.com/jobs/7, request #"
    )


def test_two_loops_in_one_run_keep_their_own_denials(seed: Seeder) -> None:
    rows = [
        seed.call(run="r", body=f"prompt {i % 2}", guards=Guards(max_repeats=2)) for i in range(8)
    ]
    first, second = found(seed)
    assert first["detail"] != second["detail"]  # each names its own request
    for loop, parity in ((first, 0), (second, 1)):
        mine = [r for i, r in enumerate(rows) if i % 2 == parity]
        assert loop["evidence"] == [r.request_id for r in mine]
        assert loop["denied"] == [r.request_id for r in mine[2:]]


def test_a_shadow_guard_denies_nothing(seed: Seeder, tmp_path: Path) -> None:
    rows = [
        seed.call(run="r", body="same", mode="shadow", guards=Guards(max_repeats=2, shadow=True))
        for _ in range(4)
    ]
    assert [r.decision for r in rows] == ["allow", "allow", "would_deny", "would_deny"]
    (loop,) = found(
        seed, policy(tmp_path, "mode: shadow\nanomalies:\n  loop: {repeats: 2, on_detect: deny}\n")
    )
    assert loop["denied"] == [] and loop["evidence"] == [r.request_id for r in rows]


def test_step_count_above_max(seed: Seeder, tmp_path: Path) -> None:
    settings = policy(tmp_path, "anomalies:\n  step_count: {max: 10}\n")
    long = [seed.call(run="long", body=f"s{i}") for i in range(12)]
    for i in range(10):
        seed.call(run="exactly-ten", body=f"t{i}")
    (steps,) = found(seed, settings)
    assert steps["kind"] == "step_count" and steps["run"] == "long"
    assert steps["evidence"] == [r.request_id for r in long[10:]]
    assert "12 steps" in steps["detail"]
    assert found(seed) == []  # the default max (60) is far away


def test_the_proxys_own_refusals_are_no_steps_of_the_run(seed: Seeder, tmp_path: Path) -> None:
    """A request a stopping proxy turned away was retried by its SDK: one step, not two."""
    settings = policy(tmp_path, "anomalies:\n  step_count: {max: 10}\n")
    for i in range(10):
        seed.call(run="deployed-under", body=f"t{i}")
        if i % 3 == 0:
            seed.call(run="deployed-under", body=f"t{i}", deny=("shutting_down", "stopping"))
    assert found(seed, settings) == []
    seed.call(run="deployed-under", body="one too many", deny=("not_authorized", "no rule"))
    (steps,) = found(seed, settings)
    assert steps["kind"] == "step_count" and "11 steps" in steps["detail"]


def test_loop_leaves_out_the_failed_attempts_the_sdk_retried(seed: Seeder, tmp_path: Path) -> None:
    """Five good calls and two failed attempts (a 500, one the client never got an answer to)
    are five repeats, not seven: the default loop.retries (2) forgives them, as the guard does."""
    fine = [seed.call(run="retried", body="same", actual_usd=None, status=s) for s in (500, None)]
    fine += [seed.call(run="retried", body="same") for _ in range(5)]
    assert found(seed) == []
    # A third failure is past the allowance: six counted, flagged.
    third = seed.call(run="retried", body="same", actual_usd=None, status=503)
    (loop,) = found(seed)
    assert loop["evidence"] == [r.request_id for r in [*fine, third]]
    assert loop["detail"].endswith(
        "made 6 times in this run (anomalies.loop.repeats: 5), not counting 2 failed attempt(s) "
        "its client retried (anomalies.loop.retries: 2)"
    )
    # retries: 0 counts every attempt; a failure the SDKs do not retry always counted.
    strict = policy(tmp_path, "anomalies:\n  loop: {retries: 0}\n")
    assert "made 8 times" in found(seed, strict)[0]["detail"]
    for _ in range(6):
        seed.call(run="bad-request", body="same", actual_usd=None, status=400)
    assert [a["run"] for a in found(seed)] == ["retried", "bad-request"]


def test_failed_attempts_the_sdk_retried_are_no_steps(seed: Seeder, tmp_path: Path) -> None:
    settings = policy(tmp_path, "anomalies:\n  step_count: {max: 10}\n  loop: {retries: 1}\n")
    for i in range(10):
        if i % 4 == 0:
            seed.call(run="flaky", body=f"t{i}", actual_usd=None, status=502)
        seed.call(run="flaky", body=f"t{i}")
    assert found(seed, settings) == []
    # A second failure of one request is past retries: 1, and a step.
    seed.call(run="flaky", body="t9", actual_usd=None, status=502)
    seed.call(run="flaky", body="t9", actual_usd=None, status=502)
    (steps,) = found(seed, settings)
    assert steps["kind"] == "step_count" and "11 steps" in steps["detail"]


def test_the_guard_and_the_detector_forgive_the_same_attempts(seed: Seeder, tmp_path: Path) -> None:
    settings = policy(tmp_path, "anomalies:\n  loop: {repeats: 2, on_detect: deny}\n")
    guards = Guards(max_repeats=2, retries=2)
    first = seed.call(run="r", body="again", guards=guards, actual_usd=None, status=429)
    rows = [first] + [seed.call(run="r", body="again", guards=guards) for _ in range(3)]
    assert [r.decision for r in rows] == ["allow", "allow", "allow", "deny"]
    (loop,) = found(seed, settings)
    assert loop["on_detect"] == "deny" and loop["denied"] == [rows[3].request_id]
    assert (
        "made 3 times in this run (anomalies.loop.repeats: 2), not counting 1 failed"
        in (loop["detail"])
    )


def test_step_count_against_the_agents_history(seed: Seeder) -> None:
    for r in range(25):
        for i in range(10):
            seed.call(agent="etl", run=f"h{r}", body=f"{r}-{i}")
    for i in range(19):
        seed.call(agent="etl", run="busy-but-normal", body=f"b{i}")
    assert found(seed) == []  # 19 ≤ 2 × p99 (10)
    for i in range(45):
        seed.call(agent="etl", run="runaway", body=f"x{i}")
    (steps,) = found(seed)
    # p99 of the 26 earlier runs is the busy one's 19 steps: flagged above 38.
    assert steps["run"] == "runaway" and "last 26 runs took 19" in steps["detail"]
    assert len(steps["evidence"]) == 45 - 38


def test_a_rule_the_guard_does_not_enforce_is_never_reported_as_denying(
    seed: Seeder, tmp_path: Path
) -> None:
    """With step_count set to deny, the history rule's anomaly read `"on_detect": "deny"`,
    though the guard only ever enforces `max`; so did fan_out's agents."""
    for r in range(25):
        for i in range(3):
            seed.call(agent="etl", run=f"h{r}", body=f"{r}-{i}")
    for i in range(10):
        seed.call(agent="etl", run="big", body=f"b{i}")
    for agent in ("a", "b", "c"):
        seed.call(agent=agent, run=f"w-{agent}", workflow="w")
    settings = policy(
        tmp_path,
        "anomalies:\n  step_count: {max: 60, on_detect: deny}\n"
        "  fan_out: {max_agents_per_workflow: 2, on_detect: deny}\n",
    )
    flagged = {a["kind"]: a for a in found(seed, settings)}
    assert (
        flagged["step_count"]["on_detect"] == "flag"
        and "flagged only" in flagged["step_count"]["detail"]
    )
    assert (
        flagged["fan_out"]["on_detect"] == "flag" and "flagged only" in flagged["fan_out"]["detail"]
    )


def test_the_agents_history_counts_steps_without_the_retried_failures(seed: Seeder) -> None:
    """Earlier runs of 10 steps, each with a provider hiccup on every step: their p99 is 10
    steps, not 20, so a run of 25 is far above it."""
    for r in range(20):
        for i in range(10):
            seed.call(agent="etl", run=f"h{r}", body=f"{r}-{i}", actual_usd=None, status=500)
            seed.call(agent="etl", run=f"h{r}", body=f"{r}-{i}")
    for i in range(25):
        seed.call(agent="etl", run="runaway", body=f"x{i}")
    (steps,) = found(seed)
    assert steps["run"] == "runaway" and "last 20 runs took 10" in steps["detail"]


def test_step_count_history_needs_enough_runs(seed: Seeder) -> None:
    for r in range(10):
        for i in range(3):
            seed.call(agent="etl", run=f"h{r}", body=f"{r}-{i}")
    for i in range(30):
        seed.call(agent="etl", run="long", body=f"x{i}")
    assert found(seed) == []  # 10 earlier runs < history_min_runs (20); 30 < max (60)


def test_fan_out_counts_runs_under_a_workflow(seed: Seeder) -> None:
    firsts = []
    for r in range(7):
        firsts.append(seed.call(agent=f"sub{r % 2}", run=f"f{r}", workflow="fan").request_id)
        seed.call(agent=f"sub{r % 2}", run=f"f{r}", workflow="fan")
    for r in range(5):
        seed.call(run=f"ok{r}", workflow="calm")
    (fan,) = found(seed)
    assert (
        fan["kind"] == "fan_out"
        and fan["scope"] == "tenant:acme/workflow:fan"
        and fan["run"] is None
    )
    assert fan["evidence"] == firsts[5:]
    assert fan["runs"] == [
        "tenant:acme/workflow:fan/agent:sub1/run:f5",
        "tenant:acme/workflow:fan/agent:sub0/run:f6",
    ]
    assert "7 runs" in fan["detail"]


def test_fan_out_counts_agents_too(seed: Seeder, tmp_path: Path) -> None:
    settings = policy(
        tmp_path, "anomalies:\n  fan_out: {max_agents_per_workflow: 2, max_runs_per_workflow: 50}\n"
    )
    ids = [seed.call(agent=f"a{i}", run="one", workflow="crowd").request_id for i in range(3)]
    (fan,) = found(seed, settings)
    assert "3 agents" in fan["detail"] and fan["evidence"] == ids[2:]


def test_fan_out_guard_keeps_refusing_a_refused_run(seed: Seeder) -> None:
    guard = Guards(max_runs_per_workflow=2)
    for r in range(2):
        assert seed.call(run=f"ok{r}", workflow="w", guards=guard).decision == "allow"
    third = [seed.call(run="third", workflow="w", guards=guard) for _ in range(2)]
    assert [r.decision for r in third] == ["deny", "deny"]
    assert (
        seed.call(run="ok0", workflow="w", guards=guard).decision == "allow"
    )  # a known run goes on
    (fan,) = found(seed)
    assert fan["denied"] == [r.request_id for r in third] and fan["on_detect"] == "deny"


def test_a_fan_out_says_how_many_runs_its_guard_refused(seed: Seeder, tmp_path: Path) -> None:
    """1,500 runs of which the guard refused 1,495 at their first request read "started 1500
    runs", as if all were at work."""
    guard = Guards(max_runs_per_workflow=2)
    for r in range(6):
        seed.call(run=f"r{r}", workflow="w", guards=guard)
    settings = policy(
        tmp_path, "anomalies:\n  fan_out: {max_runs_per_workflow: 2, on_detect: deny}\n"
    )
    (fan,) = found(seed, settings)
    assert fan["detail"].startswith("workflow w started 6 runs, 4 of them refused at their first")


def test_handoff_between_agents_of_one_workflow(seed: Seeder) -> None:
    quiet = [seed.call(agent="planner", run="p", workflow="hand", body=f"p{i}") for i in range(2)]
    busy = [seed.call(agent="executor", run="e", workflow="hand", body=f"e{i}") for i in range(12)]
    for i in range(5):
        seed.call(agent="planner", run="p", workflow="balanced", body=f"p{i}")
    for i in range(12):
        seed.call(agent="executor", run="e", workflow="balanced", body=f"e{i}")
    for i in range(8):  # far apart, but too small to matter (min_steps 10)
        seed.call(agent="executor", run="e", workflow="small", body=f"e{i}")
    seed.call(agent="planner", run="p", workflow="small")
    (handoff,) = found(seed)
    assert handoff["kind"] == "handoff" and handoff["workflow"] == "hand"
    assert set(handoff["evidence"]) == {r.request_id for r in quiet + busy}
    assert "executor took 12 steps" in handoff["detail"] and "planner 2" in handoff["detail"]
    assert sorted(handoff["runs"]) == [
        "tenant:acme/workflow:hand/agent:executor/run:e",
        "tenant:acme/workflow:hand/agent:planner/run:p",
    ]


def test_handoff_counts_the_steps_the_guards_count(seed: Seeder, tmp_path: Path) -> None:
    """The executor's provider answered 503 twice for each of its 6 calls, and its SDK retried:
    6 steps against the planner's 2 (3 × apart, not more), not 18 attempts. An agent that keeps
    failing past loop.retries is busier, and flagged."""
    for i in range(2):
        seed.call(agent="planner", run="p", workflow="flaky", body=f"p{i}")
    for i in range(6):
        for _ in range(2):
            seed.call(agent="executor", run="e", workflow="flaky", body=f"e{i}", actual_usd=None,
                      status=503)  # fmt: skip
        seed.call(agent="executor", run="e", workflow="flaky", body=f"e{i}")
    assert found(seed) == []
    strict = policy(tmp_path, "anomalies:\n  loop: {retries: 1}\n")
    (handoff,) = found(seed, strict)
    assert "executor took 12 steps and agent planner 2" in handoff["detail"]


def test_under_commit_on_a_costed_tool_call(seed: Seeder, tmp_path: Path) -> None:
    tool = {
        "action": "crm.read",
        "provider": None,
        "model": None,
        "host": "crm.example.com",
        "method": "GET",
        "upstream_ms": 30,
    }
    cheap = seed.call(run="r", est_usd=2_000_000, actual_usd=100_000, **tool)
    seed.call(run="r", est_usd=2_000_000, actual_usd=2_000_000, **tool)
    seed.call(
        run="r", est_usd=2_000_000, actual_usd=None, status=500, **tool
    )  # released: not a commit
    seed.call(run="r", est_usd=40_000_000, actual_usd=50_000)  # an LLM call: normal by default
    (under,) = found(seed)
    assert under["kind"] == "under_commit" and under["evidence"] == [cheap.request_id]
    assert "crm.read" in under["detail"] and "fabricated or cached" in under["detail"]
    llm_too = policy(tmp_path, "anomalies:\n  under_commit: {ratio: 0.1, actions: [llm]}\n")
    (under,) = found(seed, llm_too)
    assert "llm" in under["detail"] and len(under["evidence"]) == 1


def test_fast_commit_on_llm_calls(seed: Seeder, tmp_path: Path) -> None:
    fast = seed.call(run="r", upstream_ms=1.5, latency_ms=3.0)
    seed.call(run="r", upstream_ms=900)
    seed.call(
        run="r", action="cache.get", provider=None, model=None, upstream_ms=0.4
    )  # a tool: fast is fine
    (quick,) = found(seed)
    assert quick["kind"] == "fast_commit" and quick["evidence"] == [fast.request_id]
    assert "under 5 ms" in quick["detail"]
    tools = policy(tmp_path, "anomalies:\n  fast_commit: {latency_ms: 50, actions: ['cache.*']}\n")
    (quick,) = found(seed, tools)
    assert "cache.get" in quick["detail"]


def test_a_clock_stepped_back_mid_call_is_no_fast_commit(seed: Seeder) -> None:
    """mitmproxy's timestamps are wall-clock: minus an hour is a clock step, not a fast answer."""
    seed.call(run="r", upstream_ms=-3_595_160.0, latency_ms=-3_595_097.0)
    seed.call(run="r", upstream_ms=900)
    assert found(seed) == []


def test_a_batch_submission_is_no_fast_or_fabricated_answer(seed: Seeder, tmp_path: Path) -> None:
    """A batch's submission is held at its requests' estimate and answered at once with a
    receipt, charging nothing: no model answered it, so neither fast_commit nor under_commit
    reads anything into it; a results download (held at $0) neither."""
    for provider, model, host, path in (
        ("anthropic", "claude-haiku-4-5", "api.anthropic.com", "/v1/messages/batches"),
        ("openai", "gpt-4o-mini", "api.openai.com", "/v1/batches"),
        (
            "gemini",
            "gemini-2.5-flash",
            "generativelanguage.googleapis.com",
            "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        ),
    ):
        seed.call(
            run="b",
            provider=provider,
            model=model,
            host=host,
            path=path,
            est_usd=5_000_000,
            actual_usd=0,
            upstream_ms=1.0,
        )
    seed.call(
        run="b",
        method="GET",
        path="/v1/files/file-1/content",
        est_usd=0,
        actual_usd=900_000,
        upstream_ms=1.0,
    )
    every_llm_call = policy(tmp_path, "anomalies:\n  under_commit: {ratio: 0.1, actions: [llm]}\n")
    assert found(seed) == [] and found(seed, every_llm_call) == []
    fast = seed.call(run="c", upstream_ms=1.0, actual_usd=0)  # a live call: both flag it
    assert {a["kind"] for a in found(seed, every_llm_call)} == {"fast_commit", "under_commit"}
    assert all(a["evidence"] == [fast.request_id] for a in found(seed, every_llm_call))


def test_drift_when_actual_is_far_above_the_estimate(seed: Seeder) -> None:
    over = seed.call(run="r", est_usd=1_000_000, actual_usd=3_000_000)
    seed.call(run="r", est_usd=1_000_000, actual_usd=1_500_000)
    (drift,) = found(seed)
    assert drift["kind"] == "drift" and drift["evidence"] == [over.request_id]
    assert "2.0 × their estimate" in drift["detail"]


def test_unpriced_model(seed: Seeder, tmp_path: Path) -> None:
    odd = seed.call(run="r", model="acme-secret-model-9000")
    seed.call(run="r", model="gpt-4o-mini")
    seed.call(run="r", model="claude-haiku-4-5", provider="anthropic", host="api.anthropic.com")
    (unpriced,) = found(seed)
    assert unpriced["kind"] == "unpriced_model" and unpriced["evidence"] == [odd.request_id]
    assert "acme-secret-model-9000" in unpriced["detail"] and "fallback price" in unpriced["detail"]
    priced = policy(
        tmp_path,
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}, price: {input: 1, output: 2}}\n",
    )
    assert found(seed, priced) == []  # the policy prices that action itself


def test_detectors_can_be_limited_to_actions(seed: Seeder, tmp_path: Path) -> None:
    for _ in range(6):
        seed.call(run="r", body="same", action="search")
    only_llm = policy(tmp_path, "anomalies:\n  loop: {repeats: 5, actions: [llm]}\n")
    assert found(seed, only_llm) == []
    assert kinds(found(seed)) == ["loop"]


def test_every_anomaly_has_the_contract_fields(seed: Seeder) -> None:
    for _ in range(6):
        seed.call(run="r", body="same")
    seed.call(run="r", model="unknown-model-x")
    for anomaly in found(seed):
        assert {"kind", "scope", "run", "detail", "evidence"} <= set(anomaly)
        assert anomaly["detail"] and all(
            isinstance(i, str) and len(i) == 32 for i in anomaly["evidence"]
        )


def test_percentile_is_nearest_rank() -> None:
    assert anomalies.percentile([1, 2, 3, 4, 100], 99) == 100
    assert anomalies.percentile([5] * 30 + [9], 50) == 5
    assert anomalies.percentile([7], 99) == 7


def test_a_call_charged_after_its_hold_expired_is_still_checked(seed: Seeder) -> None:
    """The sweeper expired the hold of a call that outlived it, and the call's commit came
    late: it was charged all the same (a "late commit"), but the per-call detectors looked
    only at holds in state `committed` and missed its drift and its unknown model."""
    import uuid

    from drawdown.ledger.api import Amount, Completion, DecisionRow

    seed.call(run="r", body="first")
    row = DecisionRow(
        request_id=uuid.uuid4().hex, ts=seed.now, decision="allow", mode="enforce",
        scope="tenant:acme/agent:worker/run:r", tenant="acme", agent="worker", run="r",
        action="llm", provider="openai", model="acme-secret-model-9000", method="POST",
        host="api.openai.com", path="/v1/chat/completions", est_usd=1_000_000,
        fingerprint=uuid.uuid4().hex,
    )  # fmt: skip
    outcome = seed.ledger.reserve(row, [], Amount(usd=1_000_000, requests=1), seed.now + 60)
    assert seed.ledger.sweep(seed.now + 1000, 30) == 1  # its TTL ran out: expired
    completion = Completion(
        actual=Amount(usd=9_000_000, tokens=4000, requests=1), status=200, tokens_in=1000,
        tokens_out=3000, usage_source="usage", priced=False, latency_ms=1_100_000.0,
        upstream_ms=900.0,
    )  # fmt: skip
    settled = seed.ledger.commit(row.request_id, outcome.hold_id, completion, seed.now + 1100)
    assert (settled.applied, settled.state) == (True, "expired")
    result = found(seed)
    assert kinds(result) == ["drift", "unpriced_model"]
    assert all(a["evidence"] == [row.request_id] for a in result)
    # An expired hold whose call never came back was charged nothing: no anomaly of its own.
    lost = DecisionRow(**{**row.__dict__, "request_id": uuid.uuid4().hex, "ts": seed.now + 2000})
    seed.ledger.reserve(lost, [], Amount(usd=1_000_000, requests=1), seed.now + 2060)
    assert seed.ledger.sweep(seed.now + 3000, 30) == 1
    assert lost.request_id not in {i for a in found(seed) for i in a["evidence"]}


def test_a_shadow_guard_trip_is_reported_without_the_policy(seed: Seeder) -> None:
    """In shadow mode a guard set to deny records would_deny ("loop: …"). A report made with
    other settings (no --policy: the defaults) listed no anomaly for it, though the run's
    would_status said anomalous; an enforced denial in the same place stands alone."""
    shadow = Guards(max_repeats=2, shadow=True)
    rows = [seed.call(run="r", body="same", mode="shadow", guards=shadow) for _ in range(4)]
    steps = Guards(max_steps=3, shadow=True)
    long = [seed.call(run="long", body=f"s{i}", mode="shadow", guards=steps) for i in range(5)]
    assert [r.decision for r in rows] == ["allow", "allow", "would_deny", "would_deny"]
    assert [r.decision for r in long][3:] == ["would_deny", "would_deny"]
    loop, step = found(seed)
    assert (loop["kind"], loop["run"], step["kind"], step["run"]) == (
        "loop",
        "r",
        "step_count",
        "long",
    )
    assert loop["evidence"] == [r.request_id for r in rows] and loop["denied"] == []
    assert loop["would_deny"] == [r.request_id for r in rows[2:]]
    assert step["evidence"] == step["would_deny"] == [r.request_id for r in long[3:]]
    assert step["denied"] == [] and "step_count" in step["detail"]
    (run,) = [r for r in report_runs(seed) if r["run"] == "r"]
    assert run["would_status"] == "anomalous" and [a["kind"] for a in run["anomalies"]] == ["loop"]


def report_runs(seed: Seeder) -> list[dict[str, Any]]:
    from drawdown import report

    return report.build(str(seed.path), now=seed.now + 60)["runs"]


class CountingRow(dict[str, Any]):
    """A ledger row that counts how often each field is read: the work a detector does, without
    a clock."""

    reads: ClassVar[dict[str, int]] = {}

    def __getitem__(self, key: str) -> Any:
        CountingRow.reads[key] = CountingRow.reads.get(key, 0) + 1
        return super().__getitem__(key)


def decision_row(n: int, run: str, **fields: Any) -> CountingRow:
    return CountingRow(
        {"id": n, "request_id": f"req-{n}", "ts": float(n), "decision": "allow",
         "reason_code": None, "reason": None, "scope": f"tenant:acme/agent:etl/run:{run}",
         "tenant": "acme", "workflow": None, "agent": "etl", "run": run, "action": "llm",
         "est_usd": 1000, "actual_usd": 1000, "status": 200, "latency_ms": 900.0,
         "upstream_ms": 800.0, "fingerprint": f"body-{n}", "hold_state": "committed",
         "priced": 1, **fields}
    )  # fmt: skip


def test_the_agents_history_is_read_once_not_once_per_run() -> None:
    """step_count compares each run with the agent's earlier runs: it sorted them all for every
    run, so 2,000 runs of one agent read their start times 6 million times, and `drawdown report`
    on a ledger of 90,000 requests (22,500 runs) took 43 s instead of 6."""
    runs = 2000
    rows = [decision_row(n, f"r{n}") for n in range(runs)]
    history = [
        CountingRow({"tenant": "acme", "agent": "etl", "scope": r["scope"], "steps": 1,
                     "started": r["ts"]})
        for r in rows
    ]  # fmt: skip
    CountingRow.reads = {}
    assert anomalies.detect(rows, history=history) == []
    assert CountingRow.reads["started"] <= 3 * runs  # was 5,999,000


def test_refused_requests_find_their_anomaly_without_scanning_every_other() -> None:
    """Each request a guard refused is matched with the anomaly that explains it: every
    anomaly's evidence was searched for each one: 2,000 guarded runs, 4 million reads."""
    rows = []
    for run in range(2000):
        reason = "loop: this identical llm request was already made 5 times"
        for k in range(7):  # 5 pass, the sixth is refused: the loop flags all seven
            rows.append(decision_row(len(rows), f"r{run}", fingerprint=f"same-{run}",
                                     **({"decision": "deny", "reason_code": "anomaly",
                                         "reason": reason} if k >= 5 else {})))  # fmt: skip
    CountingRow.reads = {}
    found = anomalies.detect(rows)
    assert len(found) == 2000 and all(len(a["denied"]) == 2 for a in found)
    assert CountingRow.reads["request_id"] <= 2 * len(rows)  # was 4,028,000


def test_a_wide_fan_out_grows_the_report_with_its_runs_not_their_square(
    tmp_path: Path,
) -> None:
    """A workflow that maps over documents, one run each: its fan_out anomaly named every run
    past the limit, and each such run carried the whole anomaly, so 3,000 runs made 633 MB of
    JSON. Each run now lists it without the lists the report's `anomalies` keeps."""
    import json

    from drawdown import report

    sizes = {}
    for documents in (150, 300):
        seeder = Seeder(tmp_path / f"fan{documents}.db")
        try:
            for d in range(documents):
                seeder.call(agent="mapper", run=f"doc{d}", workflow="map", body=str(d))
            data = report.build(str(seeder.path), now=seeder.now + 60)
        finally:
            seeder.close()
        (fan,) = data["anomalies"]
        assert fan["kind"] == "fan_out" and fan["runs_total"] == documents - 5
        assert len(fan["runs"]) == min(documents - 5, anomalies.MAX_EVIDENCE)
        flagged = [r for r in data["runs"] if r["anomalies"]]
        assert len(flagged) == documents - 5  # every run past the limit still says so
        assert all(r["status"] == "anomalous" for r in flagged)
        (listed,) = flagged[-1]["anomalies"]
        assert "runs" not in listed and listed["evidence"] == [] and listed["runs_total"] > 1
        assert listed["detail"] == fan["detail"]
        sizes[documents] = len(json.dumps(data))
    assert sizes[300] < 2.5 * sizes[150]  # linear: about 2; with each run's copy about 4


def recorded(seed: Seeder, tmp_path: Path, text: str, name: str) -> str:
    """A policy's anomaly settings kept in the ledger as the proxy keeps them; its digest."""
    settings = policy(tmp_path, text, name)
    digest = settings.digest[:16]
    seed.ledger.remember(JUDGING_KEY + digest, Judging.of(settings).record())
    return digest


def judged_each_by_own(seed: Seeder) -> tuple[list[dict[str, Any]], anomalies.RunJudgings]:
    """find() as a report without --policy calls it: each run by its own recorded settings."""
    reader = Reader(str(seed.path))
    try:
        where, params = anomalies.active_where()
        judgings = anomalies.judging_of(reader, where, params)
        result, _ = anomalies.find(reader, judging=judgings)
        return result, judgings
    finally:
        reader.close()


def test_each_run_is_judged_by_its_own_policys_settings_and_a_workflow_by_its_newest_runs(
    seed: Seeder, tmp_path: Path
) -> None:
    """A reload to laxer settings had a report judge every run by the newest: the runs made
    under the strict policy lost the loops and fan-outs it was set to flag."""
    strict = recorded(
        seed,
        tmp_path,
        "anomalies:\n  loop: {repeats: 2}\n  fan_out: {max_runs_per_workflow: 2}\n",
        "strict.yaml",
    )
    lax = recorded(seed, tmp_path,
        "anomalies:\n  loop: {repeats: 5}\n  fan_out: {max_runs_per_workflow: 50}\n", "lax.yaml")  # fmt: skip

    def under(digest: str, **call: Any) -> str:
        return seed.call(**call, features={"policy_digest": digest}).request_id

    looped = [under(strict, run="x", body="same") for _ in range(3)]  # a loop at repeats 2
    for r in range(3):  # workflow w: three runs under strict, then its newest under lax
        under(strict, run=f"w{r}", workflow="w")
    under(lax, run="w3", workflow="w")
    for r in range(3):  # workflow v: three runs under lax, then its newest under strict
        under(lax, run=f"v{r}", workflow="v")
    under(strict, run="v3", workflow="v")
    for _ in range(3):  # the newest decisions: lax, three repeats
        under(lax, run="y", body="again")

    result, judgings = judged_each_by_own(seed)
    assert judgings.newest.digest == lax and judgings.newest.others == 1
    assert sorted((a["kind"], a["scope"].rsplit("/", 1)[-1]) for a in result) == [
        ("fan_out", "workflow:v"),
        ("loop", "run:x"),
    ]
    (loop,) = [a for a in result if a["kind"] == "loop"]
    assert loop["evidence"] == looped


def test_a_fan_out_guards_refusals_join_its_workflows_anomaly_across_settings(
    seed: Seeder, tmp_path: Path
) -> None:
    """A run the fan_out guard refused under one policy, in a workflow whose newest run was
    made under another: judged apart, its refusals made a second fan_out anomaly of their own
    beside the workflow's."""
    first = recorded(
        seed,
        tmp_path,
        "anomalies:\n  fan_out: {max_runs_per_workflow: 2, on_detect: deny}\n",
        "first.yaml",
    )
    second = recorded(seed, tmp_path,
        "anomalies:\n  fan_out: {max_runs_per_workflow: 2, on_detect: deny}\n"
        "  loop: {repeats: 3}\n", "second.yaml")  # fmt: skip
    guard = Guards(max_runs_per_workflow=2)
    for r in range(2):
        seed.call(run=f"g{r}", workflow="g", guards=guard, features={"policy_digest": first})
    refused = [
        seed.call(run="g2", workflow="g", guards=guard, features={"policy_digest": first})
        for _ in range(2)
    ]
    assert [row.decision for row in refused] == ["deny", "deny"]
    seed.call(run="g0", workflow="g", features={"policy_digest": second})  # the newest run's

    result, judgings = judged_each_by_own(seed)
    assert judgings.newest.digest == second and judgings.newest.others == 1
    (fan,) = result
    assert fan["kind"] == "fan_out" and fan["scope"] == "tenant:acme/workflow:g"
    assert fan["on_detect"] == "deny" and fan["denied"] == [row.request_id for row in refused]
    assert set(fan["denied"]) <= set(fan["evidence"])


def test_refusals_judged_apart_join_the_workflows_runs_fan_out_not_its_agents(
    seed: Seeder, tmp_path: Path
) -> None:
    """A workflow over both fan_out limits has two anomalies: too many runs (which the guard
    enforces) and too many agents (only flagged). A run's refusals judged apart joined the
    last of them, the agents' one, which then read `deny` with the refusals."""
    text = (
        "anomalies:\n  fan_out: {max_runs_per_workflow: 2, max_agents_per_workflow: 1, "
        "on_detect: deny}\n"
    )
    first = recorded(seed, tmp_path, text, "first.yaml")
    second = recorded(seed, tmp_path, text + "  loop: {repeats: 3}\n", "second.yaml")
    guard = Guards(max_runs_per_workflow=2)
    for r in range(2):
        seed.call(run=f"g{r}", workflow="g", guards=guard, features={"policy_digest": first})
    refused = [
        seed.call(agent="other", run="g2", workflow="g", guards=guard,
                  features={"policy_digest": first})
        for _ in range(2)
    ]  # fmt: skip
    assert [row.decision for row in refused] == ["deny", "deny"]
    seed.call(run="g0", workflow="g", features={"policy_digest": second})
    result, _ = judged_each_by_own(seed)
    (runs,) = [a for a in result if "runs" in a["detail"].split(":")[0]]
    (agents,) = [a for a in result if "agents" in a["detail"].split(":")[0]]
    assert runs["denied"] == [row.request_id for row in refused] and runs["on_detect"] == "deny"
    assert agents["denied"] == [] and agents["on_detect"] == "flag"
