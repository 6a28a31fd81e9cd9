"""Batch jobs, end to end: the official openai and anthropic SDKs submit a batch through a real
`drawdown run`, and download its results. A batch is billed upstream as it runs, at half the
standard rates; what passes through the proxy is the download, whose answers report the usage.
drawdown charges it there — once, however often the results are read — to the budgets of the
run that reads them. Expected figures are genai-prices' batch price of the usage the stand-in
reported for each request, computed here independently of drawdown's meter."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import anthropic
import genai_prices
import openai
import pytest
from google.genai import errors as genai_errors

from tests.support.proxy import DrawdownProcess
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

POLICY = """
identity:
  tenant: [{value: acme}]
  agent: [{value: batcher}]
  run: [{header: X-Drawdown-Run}, {value: unnamed}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: llm, provider: anthropic, match: {host: api.anthropic.com}}
budgets:
  - {scope: "run:*", usd: 1000}
"""

BATCH = {"processing": "batch"}
QUESTIONS = ["What is a ledger?", "Name three budgets.", "Why reserve before you spend?"]


def run_header(run: str) -> dict[str, str]:
    return {"X-Drawdown-Run": run}


def openai_batch_file(model: str = "gpt-4o-mini", max_tokens: int | None = 64) -> bytes:
    """A batch input file: one chat request a line, each asking one of QUESTIONS."""
    lines = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": question}],
                **({"max_tokens": max_tokens} if max_tokens is not None else {}),
            },
        }
        for i, question in enumerate(QUESTIONS)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def submit_openai_batch(client: openai.OpenAI, headers: dict[str, str]) -> Any:
    """Upload openai_batch_file() and create the batch that names it, as an agent does."""
    uploaded = client.files.create(
        file=("questions.jsonl", openai_batch_file()), purpose="batch", extra_headers=headers
    )
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers=headers,
    )


def batch_price(provider: str, usages: list[tuple[str, dict[str, Any]]]) -> tuple[int, int, int]:
    """(input tokens, output tokens, nano-dollars): each request at genai-prices' batch price."""
    total, tokens_in, tokens_out = Decimal(0), 0, 0
    for model, usage in usages:
        if provider == "openai":
            counts = {
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
            }
        else:
            counts = {
                "input_tokens": usage["input_tokens"],
                "output_tokens": usage["output_tokens"],
            }
        total += genai_prices.calc_price(
            genai_prices.Usage(**counts), model, provider_id=provider, price_context=BATCH
        ).total_price
        tokens_in += counts["input_tokens"]
        tokens_out += counts["output_tokens"]
    nanos = int((total * 1_000_000_000).to_integral_value(rounding=ROUND_CEILING))
    return tokens_in, tokens_out, nanos


def downloads(proxy: DrawdownProcess, path_like: str) -> list[tuple[Any, ...]]:
    return proxy.query(
        "SELECT request_id, decision, status, actual_usd, tokens_in, tokens_out, usage_source, "
        "note, model FROM decisions WHERE path LIKE ? ORDER BY ts, id",
        path_like,
    )


def run_spent(proxy: DrawdownProcess, run: str) -> tuple[int, int]:
    ((usd, requests),) = proxy.query(
        "SELECT spent_usd, spent_requests FROM budget_instances WHERE scope LIKE ?", f"%run:{run}"
    )
    return usd, requests


def test_an_openai_batchs_output_file_is_charged_once_at_the_batch_price(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    headers = run_header("nightly")
    with proxy.openai_client() as client:
        batch = submit_openai_batch(client, headers)
        assert batch.status == "validating" and batch.output_file_id is None
        done = client.batches.retrieve(batch.id, extra_headers=headers)
        assert done.status == "completed" and done.output_file_id is not None
        first = client.files.content(done.output_file_id, extra_headers=headers).content
        again = client.files.content(done.output_file_id, extra_headers=headers).content
    sent = standin.batches.content(done.output_file_id)
    assert first == again == sent  # the SDK got the file as the upstream sent it
    tokens_in, tokens_out, usd = batch_price("openai", standin.batches.batches[batch.id].usages)
    assert usd > 0
    charged, read_again = downloads(proxy, "%/content")
    assert charged[1:7] == ("allow", 200, usd, tokens_in, tokens_out, "usage")
    assert charged[7] is None and charged[8].startswith("gpt-4o-mini")
    assert read_again[1:7] == ("allow", 200, 0, 0, 0, "usage")
    assert read_again[7] == f"already charged by request {charged[0]}"
    # The upload, the batch and two downloads: four requests (reading its status is free),
    # one charge.
    assert run_spent(proxy, "nightly") == (usd, 4)
    # The batch was held at its input file's estimate, read as it was uploaded: more than
    # its answers cost (each request's output cap), and it charged nothing itself.
    ((held, spent),) = proxy.query(
        "SELECT est_usd, actual_usd FROM decisions WHERE path = '/v1/batches'"
    )
    assert held > usd and spent == 0
    # Half what the same answers cost live.
    live = sum(
        genai_prices.calc_price(
            genai_prices.Usage(
                input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"]
            ),
            model,
            provider_id="openai",
        ).total_price
        for model, u in standin.batches.batches[batch.id].usages
    )
    assert usd == pytest.approx(float(live) * 1e9 / 2, abs=2)


def test_anthropic_batch_results_are_charged_once_at_the_batch_price(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    headers = run_header("digest")
    requests = [
        {
            "custom_id": f"q{i}",
            "params": {
                "model": "claude-sonnet-4-5",
                "max_tokens": 128,
                "messages": [{"role": "user", "content": question}],
            },
        }
        for i, question in enumerate(QUESTIONS)
    ]
    with proxy.anthropic_client() as client:
        batch = client.messages.batches.create(requests=requests, extra_headers=headers)  # type: ignore[arg-type]
        assert run_held(proxy, "digest") > 0  # held while it runs
        # The SDK reads the batch for its results_url, then downloads the JSONL from there.
        results = list(client.messages.batches.results(batch.id, extra_headers=headers))
        assert run_held(proxy, "digest") == 0
        assert [r.result.type for r in results] == ["succeeded"] * len(QUESTIONS)
        assert [r.custom_id for r in results] == ["q0", "q1", "q2"]
        list(client.messages.batches.results(batch.id, extra_headers=headers))
    tokens_in, tokens_out, usd = batch_price("anthropic", standin.batches.batches[batch.id].usages)
    charged, read_again = downloads(proxy, "%/results")
    assert charged[1:7] == ("allow", 200, usd, tokens_in, tokens_out, "usage")
    assert read_again[3:6] == (0, 0, 0)
    assert read_again[7] == f"already charged by request {charged[0]}"
    # The batch and twice its results: three requests (reading its status, as each results()
    # does first, is free), one charge.
    assert run_spent(proxy, "digest") == (usd, 3)


def claude_batch(max_tokens: int = 128) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"q{i}",
            "params": {
                "model": "claude-sonnet-4-5",
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": question}],
            },
        }
        for i, question in enumerate(QUESTIONS)
    ]


def test_a_batch_past_the_runs_room_is_refused_before_it_is_sent(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """A batch is billed upstream as it runs: its submission is the one moment to refuse it.
    Each request estimated as a live call is, at the batch price, summed: past the run's room,
    the batch never reaches the provider."""
    proxy = drawdown_proxy(POLICY.replace("usd: 1000}", "usd: 0.01}"))
    headers = run_header("too-big")
    # 3 × up to 4,096 output tokens at $7.50 a million: ≈ $0.09.
    with (
        proxy.anthropic_client(max_retries=0) as claude,
        pytest.raises(anthropic.APIStatusError) as refused,
    ):
        claude.messages.batches.create(requests=claude_batch(4096), extra_headers=headers)  # type: ignore[arg-type]
    assert refused.value.status_code == 402
    assert "budget run:too-big usd 0.01 is less than this call needs (≈0.0923)" in str(
        refused.value
    )  # no budget of $0.01 takes it, spent or not
    assert standin.count("/v1/messages/batches", "POST") == 0
    data = openai_batch_file("gpt-4o", max_tokens=None)
    with proxy.openai_client(max_retries=0) as client:
        # Uploading costs nothing; the batch naming the file is held at its lines' estimate
        # (3 × 4,096 default output tokens on gpt-4o at $5 a million: ≈ $0.06).
        uploaded = client.files.create(
            file=("q.jsonl", data), purpose="batch", extra_headers=headers
        )
        with pytest.raises(openai.APIStatusError) as refused_too:
            client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                extra_headers=headers,
            )
    assert refused_too.value.status_code == 402
    assert standin.count("/v1/files", "POST") == 1 and standin.count("/v1/batches") == 0
    ((est,),) = proxy.query("SELECT est_usd FROM decisions WHERE path = '/v1/batches'")
    assert 50_000_000 < est < 70_000_000


def replay_blocked(policy: Path, db: Path) -> list[dict[str, Any]]:
    """What `drawdown replay --json` of the ledger `db` under `policy` blocks."""
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", "replay", "--policy", str(policy), "--db", str(db), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    blocked: list[dict[str, Any]] = json.loads(result.stdout)["blocked"]
    return blocked


def run_held(proxy: DrawdownProcess, run: str) -> int:
    ((usd,),) = proxy.query(
        "SELECT reserved_usd FROM budget_instances WHERE scope LIKE ?", f"%run:{run}"
    )
    return usd


def test_a_batch_stays_held_until_its_results_are_read(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """A batch is billed upstream as it runs, with no call left to refuse. Its estimate stays
    held until its results are read — past its request and past a restart of the proxy — so a
    second batch that fits the room the first left, but not beside it, is refused; once the
    first's results are read (charged what they cost, far under the estimate), it fits."""
    db = tmp_path / "held.db"
    policy = POLICY.replace("usd: 1000}", "usd: 0.004}")
    proxy = drawdown_proxy(policy, db=db)
    headers = run_header("overnight")
    # Each batch: 3 requests of up to 128 output tokens at $7.50 a million, ≈ $0.0029.
    with proxy.anthropic_client(max_retries=0) as client:
        first = client.messages.batches.create(requests=claude_batch(), extra_headers=headers)  # type: ignore[arg-type]
    held = run_held(proxy, "overnight")
    assert 2_000_000 < held <= 4_000_000  # room for one, not for two
    ((submitted_est,),) = proxy.query(
        "SELECT est_usd FROM decisions WHERE path = '/v1/messages/batches'"
    )
    assert held == submitted_est
    proxy.stop()
    proxy = drawdown_proxy(policy, db=db)  # a deploy: the batch is still running upstream
    with proxy.anthropic_client(max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as refused:
            client.messages.batches.create(requests=claude_batch(), extra_headers=headers)  # type: ignore[arg-type]
        assert refused.value.status_code == 402 and "held" in str(refused.value)
        assert standin.count("/v1/messages/batches", "POST") == 1  # the second never sent
        list(client.messages.batches.results(first.id, extra_headers=headers))
        usd = batch_price("anthropic", standin.batches.batches[first.id].usages)[2]
        assert run_spent(proxy, "overnight")[0] == usd < submitted_est / 4
        assert run_held(proxy, "overnight") == 0
        second = client.messages.batches.create(requests=claude_batch(), extra_headers=headers)  # type: ignore[arg-type]
    assert standin.count("/v1/messages/batches", "POST") == 2
    assert run_held(proxy, "overnight") == submitted_est  # the second's, until it is read
    ((reason,),) = proxy.query(
        "SELECT h.settle_reason FROM holds h JOIN decisions d ON d.hold_id = h.id "
        "WHERE d.path = '/v1/messages/batches' AND d.decision = 'allow' ORDER BY d.ts LIMIT 1"
    )
    assert reason.startswith("batch ended (request ")
    assert second.id in standin.batches.batches


def test_an_openai_batch_is_held_while_it_runs_and_released_when_it_fails(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """OpenAI names a batch's output file only once it is done: reads of its status while it
    runs keep its hold; a read that finds it failed, with no output to read, releases it."""
    proxy = drawdown_proxy(POLICY)
    headers = run_header("failing")
    standin.batches.openai_status = "in_progress"
    with proxy.openai_client() as client:
        batch = submit_openai_batch(client, headers)
        ((est,),) = proxy.query("SELECT est_usd FROM decisions WHERE path = '/v1/batches'")
        assert est > 0 and run_held(proxy, "failing") == est
        for _ in range(3):
            assert client.batches.retrieve(batch.id, extra_headers=headers).status == "in_progress"
        assert run_held(proxy, "failing") == est
        standin.batches.openai_status = "failed"
        assert client.batches.retrieve(batch.id, extra_headers=headers).status == "failed"
    assert run_held(proxy, "failing") == 0
    assert run_spent(proxy, "failing") == (0, 2)  # the upload and the batch: no charge


def test_an_openai_batch_is_held_at_a_file_uploaded_through_another_proxy(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """Under `--workers`, or across a restart, the input file may be uploaded through one
    proxy and the batch naming it created through another: the file's estimate is kept in the
    ledger, and the batch is held at it (before: at $0, and it ran unchecked)."""
    db = tmp_path / "shared.db"
    headers = run_header("handed-over")
    uploader = drawdown_proxy(POLICY, db=db)
    with uploader.openai_client() as client:
        uploaded = client.files.create(
            file=("q.jsonl", openai_batch_file()), purpose="batch", extra_headers=headers
        )
    uploader.stop()
    submitter = drawdown_proxy(POLICY, db=db)
    with submitter.openai_client() as client:
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_headers=headers,
        )
    ((kept,),) = submitter.query("SELECT estimate FROM batch_inputs")
    ((est,),) = submitter.query("SELECT est_usd FROM decisions WHERE path = '/v1/batches'")
    assert est == json.loads(kept)["usd_nanos"] > 0
    assert run_held(submitter, "handed-over") == est


def test_a_results_download_the_upstream_refuses_charges_nothing_and_leaves_the_key(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    headers = run_header("early")
    with proxy.openai_client(max_retries=0) as client:
        with pytest.raises(openai.NotFoundError):
            client.files.content("file-not-yet", extra_headers=headers)
        uploaded = client.files.create(
            file=(
                "q.jsonl",
                b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions",'
                b'"body":{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}}\n',
            ),
            purpose="batch",
            extra_headers=headers,
        )
        # The input file read back: no answers in it, nothing charged, nothing keyed.
        client.files.content(uploaded.id, extra_headers=headers)
    rows = downloads(proxy, "%/content")
    assert [(r[2], r[3]) for r in rows] == [(404, 0), (200, 0)]
    assert proxy.query("SELECT COUNT(*) FROM once_charges") == [(0,)]


def _batch_calls_results_call(proxy: DrawdownProcess) -> list[int]:
    """A run submits a batch, makes two calls, reads the batch's results, then calls once
    more: the status of each step."""
    headers = run_header("weekly")
    statuses = []
    with proxy.anthropic_client(max_retries=0) as client:

        def step(call: Callable[[], Any]) -> Any:
            try:
                found = call()
            except anthropic.APIStatusError as refused:
                statuses.append(refused.status_code)
                return None
            statuses.append(200)
            return found

        def one_call() -> Any:
            return client.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=128,
                messages=[{"role": "user", "content": "One more?"}],
                extra_headers=headers,
            )

        batch = step(
            lambda: client.messages.batches.create(requests=claude_batch(), extra_headers=headers)  # type: ignore[arg-type]
        )
        step(one_call)
        step(one_call)
        step(lambda: list(client.messages.batches.results(batch.id, extra_headers=headers)))
        step(one_call)
    return statuses


def test_replay_holds_a_batch_and_its_results_download_as_the_proxy_does(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """Replayed under a tight budget, the batch stays held until its results were read live
    (the call made while it ran is refused), its results download is let through (it holds
    no money) and charged, and the run's last call is refused — as the proxy decides under
    that policy. Replay ending the batch's hold with its submission let the second call
    through; holding the download at its actual cost refused the download itself."""
    standin.reply_text = " ".join(["word"] * 120)  # answers that use the output cap
    recording = tmp_path / "recorded.db"
    recorder = drawdown_proxy(POLICY, db=recording)
    assert _batch_calls_results_call(recorder) == [200] * 5
    recorder.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE completed_at IS NULL", until=lambda r: r[0][0] == 0
    )
    recorder.stop()
    # The steps (leaving out the batch's status, which results() reads first: free).
    steps = [
        (request_id, est, usd)
        for request_id, method, path, est, usd in recorder.query(
            "SELECT request_id, method, path, est_usd, actual_usd FROM decisions ORDER BY ts, id"
        )
        if not (method == "GET" and not path.endswith("/results"))
    ]
    order = [r[0] for r in steps]
    ests, costs = [r[1] for r in steps], [r[2] for r in steps]
    limit = 5_000_000
    # The premise: the first call fits beside the held batch, the second does not; the
    # results cost more than the room the first call left; the last call does not fit.
    assert ests[0] + ests[1] <= limit < ests[0] + costs[1] + ests[2]
    assert costs[0] == 0 and ests[3] == 0 and costs[3] > 0
    assert costs[1] + costs[3] + ests[4] > limit
    tight = tmp_path / "tight.yaml"
    tight.write_text(POLICY.replace("usd: 1000}", "usd: 0.005}"))
    blocked = [
        (order.index(b["request_id"]), b["reason_code"]) for b in replay_blocked(tight, recording)
    ]
    assert blocked == [(2, "budget_exhausted"), (4, "budget_exhausted")]
    # …as the proxy under that policy decides.
    standin.clear()
    live = drawdown_proxy(tight, db=tmp_path / "live.db")
    assert _batch_calls_results_call(live) == [200, 200, 402, 200, 402]


def test_a_gemini_batch_is_held_when_created_and_charged_once_when_read_done(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """google-genai's batch mode: the batch names its requests inline (held at their estimate
    at the batch price), and reading the batch once it is done returns their responses, each
    with its usage: charged the first time, $0 after."""
    policy = POLICY.replace(
        "budgets:",
        "  - kind: llm\n    provider: gemini\n    match: {host: generativelanguage.googleapis.com}\n"
        "budgets:",
    )
    proxy = drawdown_proxy(policy)
    headers = run_header("gem")
    from google.genai import types as genai_types

    options = genai_types.HttpOptions(headers=headers)
    with proxy.genai_client(headers=headers) as client:
        job = client.batches.create(
            model="gemini-2.5-flash",
            src=[
                {
                    "contents": [{"role": "user", "parts": [{"text": q}]}],
                    "config": {"max_output_tokens": 64},
                }
                for q in QUESTIONS
            ],
            config={"http_options": options},
        )
        assert job.name is not None and job.state is not None and job.state.name.endswith("PENDING")
        ((held,),) = proxy.query("SELECT est_usd FROM decisions WHERE path LIKE '%:batch%'")
        assert held > 0 and run_held(proxy, "gem") == held  # held while it runs
        done = client.batches.get(name=job.name, config={"http_options": options})
        assert run_held(proxy, "gem") == 0  # read done: its responses charged, the hold ended
        again = client.batches.get(name=job.name, config={"http_options": options})
    assert done.dest is not None and done.dest.inlined_responses is not None
    assert len(done.dest.inlined_responses) == len(QUESTIONS)
    assert again.dest is not None and again.dest.inlined_responses is not None
    usd = gemini_batch_price(standin.batches.batches[job.name.split("/")[-1]].usages)
    created, first, second = proxy.query(
        "SELECT est_usd, actual_usd, note FROM decisions WHERE path LIKE '%batch%' ORDER BY ts, id"
    )
    assert created[0] > usd and created[1] == 0  # held at its estimate, charging nothing
    assert first[1] == usd and first[2] is None
    assert second[1] == 0 and second[2].startswith("already charged by request")
    assert run_spent(proxy, "gem") == (usd, 3)


def gemini_batch_price(usages: list[tuple[str, dict[str, Any]]]) -> int:
    """Nano-dollars: each Gemini response's usage at genai-prices' batch price."""
    total = Decimal(0)
    for model, usage in usages:
        total += genai_prices.calc_price(
            genai_prices.Usage(
                input_tokens=usage["promptTokenCount"], output_tokens=usage["candidatesTokenCount"]
            ),
            model,
            provider_id="google",
            price_context=BATCH,
        ).total_price
    return int((total * 1_000_000_000).to_integral_value(rounding=ROUND_CEILING))


def test_polling_a_gemini_batch_is_no_loop(drawdown_proxy: Factory, standin: StandIn) -> None:
    """google-genai's batches.get is read again and again until the batch is done: under a
    loop guard that refuses a third identical request, the polls all pass (an identical call
    repeated is still refused), and the batch is charged once."""
    policy = POLICY.replace(
        "budgets:",
        "  - kind: llm\n    provider: gemini\n    match: {host: generativelanguage.googleapis.com}\n"
        "anomalies:\n  loop: {repeats: 2, retries: 0, on_detect: deny}\n"
        "budgets:",
    )
    proxy = drawdown_proxy(policy)
    from google.genai import errors as genai_errors
    from google.genai import types as genai_types

    options = genai_types.HttpOptions(headers=run_header("poller"))
    with proxy.genai_client(headers=run_header("poller")) as client:
        job = client.batches.create(
            model="gemini-2.5-flash",
            src=[{"contents": [{"role": "user", "parts": [{"text": q}]}]} for q in QUESTIONS],
            config={"http_options": options},
        )
        assert job.name is not None
        for _ in range(6):
            polled = client.batches.get(name=job.name, config={"http_options": options})
            assert polled.dest is not None and polled.dest.inlined_responses is not None
        for _ in range(2):
            client.models.generate_content(model="gemini-2.5-flash", contents="Same again?")
        with pytest.raises(genai_errors.APIError) as refused:
            client.models.generate_content(model="gemini-2.5-flash", contents="Same again?")
    assert refused.value.code == 429
    charged = proxy.query(
        "SELECT actual_usd FROM decisions WHERE method = 'GET' AND path LIKE '%/batches/%'"
    )
    assert len(charged) == 6 and sum(1 for (usd,) in charged if usd > 0) == 1


GEMINI_POLICY = POLICY.replace(
    "budgets:",
    "  - kind: llm\n    provider: gemini\n    match: {host: generativelanguage.googleapis.com}\n"
    "budgets:",
)


def gemini_batch_requests(max_tokens: int = 64) -> list[dict[str, Any]]:
    """One generateContent request a question, as a batch's lines carry them (no model)."""
    return [
        {
            "contents": [{"role": "user", "parts": [{"text": q}]}],
            "generationConfig": {"maxOutputTokens": max_tokens},
        }
        for q in QUESTIONS
    ]


def test_a_gemini_batch_naming_an_uploaded_file_is_held_at_its_lines_until_read(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """google-genai uploads a JSONL batch file with the Files API's resumable upload (here in
    100-byte chunks, so lines straddle them) through one proxy, and creates the batch naming
    it through another on the same ledger. Its lines name no model: counted as they went by
    and priced when the batch names its model, it is held at what the same requests sent
    inline are held at (before: $0, and it ran unchecked). A second batch naming the file,
    past the room beside the first, is refused before it is sent. Reading the first done
    moves its hold to its responses file, whose download is charged its usage and ends it."""
    from google.genai import _api_client
    from google.genai import types as genai_types

    monkeypatch.setattr(_api_client, "CHUNK_SIZE", 100)
    db = tmp_path / "gemini-file.db"
    policy = GEMINI_POLICY.replace("usd: 1000}", "usd: 0.0004}")
    requests = gemini_batch_requests()
    data = "".join(
        json.dumps({"key": f"q{i}", "request": r}) + "\n" for i, r in enumerate(requests)
    ).encode()
    uploader = drawdown_proxy(policy, db=db)
    with uploader.genai_client() as client:
        uploaded = client.files.upload(file=io.BytesIO(data), config={"mime_type": "jsonl"})
    assert uploaded.name is not None
    chunks = standin.matching("/upload/*", "POST")
    assert len(chunks) == 1 + -(-len(data) // 100)  # the start, then each chunk
    # One upload, one step: its start (google-genai sends its chunks without the client's
    # headers, so they are the identity rules' default run's too).
    assert run_spent(uploader, "unnamed") == (0, 1)
    uploader.stop()
    # Replayed under one request a run, the upload passes as it would live: one step.
    one_request = tmp_path / "one-request.yaml"
    one_request.write_text(GEMINI_POLICY.replace("usd: 1000}", "requests: 1}"))
    assert replay_blocked(one_request, db) == []

    proxy = drawdown_proxy(policy, db=db)  # another worker, or after a restart
    twin_options = genai_types.HttpOptions(headers=run_header("inline-twin"))
    options = genai_types.HttpOptions(headers=run_header("gem-file"))
    with proxy.genai_client() as client:
        client.batches.create(
            model="gemini-2.5-flash",
            src=[
                {"contents": r["contents"], "config": {"max_output_tokens": 64}} for r in requests
            ],
            config={"http_options": twin_options},
        )
        twin = run_held(proxy, "inline-twin")
        job = client.batches.create(
            model="gemini-2.5-flash", src=uploaded.name, config={"http_options": options}
        )
        held = run_held(proxy, "gem-file")
        assert held == twin > 0  # the same requests, the same hold
        # Room for one such batch, not two: the second is refused before it is sent.
        assert held <= 400_000 < 2 * held
        with pytest.raises(genai_errors.APIError) as refused:
            client.batches.create(
                model="gemini-2.5-flash", src=uploaded.name, config={"http_options": options}
            )
        assert refused.value.code == 402 and "held" in str(refused.value)
        assert standin.count("*:batchGenerateContent", "POST") == 2  # the twin and the first
        assert job.name is not None
        done = client.batches.get(name=job.name, config={"http_options": options})
        assert done.dest is not None and done.dest.file_name is not None
        assert run_held(proxy, "gem-file") == held  # moved to its responses file, still held
        results = client.files.download(file=done.dest.file_name, config={"http_options": options})
    answers = [json.loads(line) for line in results.splitlines()]
    assert [a["key"] for a in answers] == ["q0", "q1", "q2"]
    usd = gemini_batch_price(standin.batches.batches[job.name.split("/")[-1]].usages)
    assert 0 < usd < held
    assert run_held(proxy, "gem-file") == 0
    assert run_spent(proxy, "gem-file") == (usd, 3)  # the batch, its read and its download
    ((charged, note),) = proxy.query(
        "SELECT actual_usd, note FROM decisions WHERE path LIKE '%:download'"
    )
    assert (charged, note) == (usd, None)
