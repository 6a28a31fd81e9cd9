"""A batch's results, downloaded, are metered: every successful answer in the JSONL at
genai-prices' batch price, each line priced on its own. The answers are real recorded ones
(tests/fixtures/recorded), the expected price genai-prices' own: its `extract_usage` of
each answer, priced with `processing: batch`."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
from drawdown.meter import (
    BatchFileUploads,
    BatchInputs,
    BatchProgress,
    MeterConfig,
    MeterRequestError,
    batch_estimate_from_json,
    batch_estimate_json,
    batch_file_chunk,
    batch_file_upload,
    batch_file_uploaded,
    batch_input_named,
    batch_progress,
    charging,
    inspect_request,
    measure_body,
    open_stream_meter,
    uploaded_file_id,
)
from drawdown.meter.batch_results import (
    ANTHROPIC_BATCH_RESULTS,
    GEMINI_BATCH,
    GEMINI_FILE_DOWNLOAD,
    OPENAI_FILE_CONTENT,
    once_key,
    route,
)

from tests.support.recorded import load_recorded, recorded_names

CONFIG = MeterConfig()
BATCH = {"processing": "batch"}
OPENAI = "https://api.openai.com"
ANTHROPIC = "https://api.anthropic.com"


def _answers(provider: str, endpoint: str) -> list[dict[str, Any]]:
    """The recorded JSON (not streamed) answers of one endpoint that report usage."""
    found = []
    for name in recorded_names(provider, streamed=False):
        rec = load_recorded(name)
        if rec.manifest["endpoint"] == endpoint and rec.status == 200 and rec.usage:
            found.append(json.loads(rec.response_body))
    assert found, f"no recorded {provider} {endpoint} answers"
    return found


def _nanos(usd: Decimal) -> int:
    return math.ceil(usd * 1_000_000_000)


def _oracle(answers: list[dict[str, Any]], provider: str, flavor: str) -> int:
    """Each answer priced by genai-prices alone at its batch price, then summed. Its
    extract_usage leaves out two things billed all the same, added here: the Responses API's
    web searches (per call) and Anthropic's advisor iterations (on the advisor's model)."""
    total = Decimal(0)
    for body in answers:
        extracted = genai_prices.extract_usage(body, provider_id=provider, api_flavor=flavor)
        searches = sum(
            1 for item in body.get("output") or [] if item.get("type") == "web_search_call"
        )
        if searches:
            extracted.usage.web_searches = searches
        total += extracted.calc_price(price_context=BATCH).total_price
        for step in (body.get("usage") or {}).get("iterations") or []:
            if step.get("type") == "advisor_message":
                reads, writes = step["cache_read_input_tokens"], step["cache_creation_input_tokens"]
                usage = genai_prices.Usage(
                    input_tokens=step["input_tokens"] + reads + writes,
                    cache_read_tokens=reads,
                    cache_write_tokens=writes,
                    output_tokens=step["output_tokens"],
                )
                total += genai_prices.calc_price(
                    usage, step["model"], provider_id=provider, price_context=BATCH
                ).total_price
    return _nanos(total)


def _openai_file(answers: list[dict[str, Any]]) -> bytes:
    lines = [
        {
            "id": f"batch_req_{i}",
            "custom_id": f"request-{i}",
            "response": {"status_code": 200, "request_id": f"req_{i}", "body": body},
            "error": None,
        }
        for i, body in enumerate(answers)
    ]
    # What a batch bills nothing for: a request the API refused, one the batch never ran.
    lines.append(
        {
            "id": "batch_req_refused",
            "custom_id": "refused",
            "response": {
                "status_code": 400,
                "request_id": "req_x",
                "body": {"error": {"message": "bad", "type": "invalid_request_error"}},
            },
            "error": None,
        }
    )
    lines.append(
        {
            "id": "batch_req_expired",
            "custom_id": "expired",
            "response": None,
            "error": {"code": "batch_expired", "message": "This request could not be executed"},
        }
    )
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _anthropic_results(answers: list[dict[str, Any]]) -> bytes:
    lines: list[dict[str, Any]] = [
        {"custom_id": f"request-{i}", "result": {"type": "succeeded", "message": body}}
        for i, body in enumerate(answers)
    ]
    lines += [
        {
            "custom_id": "errored",
            "result": {
                "type": "errored",
                "error": {"type": "error", "error": {"type": "invalid_request_error"}},
            },
        },
        {"custom_id": "canceled", "result": {"type": "canceled"}},
        {"custom_id": "expired", "result": {"type": "expired"}},
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _download(provider: str, path: str, origin: str) -> Any:
    return inspect_request(provider, "GET", path, {}, b"", CONFIG, origin=origin)


def test_an_openai_output_file_is_charged_each_answer_at_the_batch_price() -> None:
    # The Batch API does not serve the audio models (their audio is priced apart: see
    # test_meter_prices), so their answers are left out of the file.
    chats = [a for a in _answers("openai", "chat-completions") if "audio" not in a["model"]]
    responses = _answers("openai", "responses")
    body = _openai_file(chats + responses)
    request = _download("openai", "/v1/files/file-abc123/content", OPENAI)
    assert (request.billable, request.estimate_usd_nanos, request.endpoint) == (
        True,
        0,
        OPENAI_FILE_CONTENT,
    )
    got = measure_body(request, 200, body, CONFIG)
    expected = _oracle(chats, "openai", "chat") + _oracle(responses, "openai", "responses")
    # Summed per line and rounded up once: within a nano-dollar a line of genai-prices' own.
    assert expected - len(chats + responses) <= got.usd_nanos <= expected
    assert got.answered == len(chats + responses)
    assert got.source == "usage" and got.priced
    standard = measure_body(request, 200, body, CONFIG).usd_nanos
    assert standard == got.usd_nanos  # deterministic
    assert got.usd_nanos > 0


def test_anthropic_batch_results_are_charged_each_answer_at_the_batch_price() -> None:
    answers = _answers("anthropic", "messages")
    request = _download("anthropic", "/v1/messages/batches/msgbatch_01abc/results", ANTHROPIC)
    assert request.endpoint == ANTHROPIC_BATCH_RESULTS
    got = measure_body(request, 200, _anthropic_results(answers), CONFIG)
    expected = _oracle(answers, "anthropic", "default")
    assert expected - len(answers) <= got.usd_nanos <= expected
    assert got.answered == len(answers)
    tokens_in = sum(
        genai_prices.extract_usage(a, provider_id="anthropic").usage.input_tokens or 0
        for a in answers
    )
    assert got.usage.input_tokens == tokens_in


def test_the_batch_price_is_half_the_standard_one() -> None:
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [],
        "usage": {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000, "total_tokens": 0},
    }
    request = _download("openai", "/v1/files/file-1/content", OPENAI)
    got = measure_body(request, 200, _openai_file([answer]), CONFIG)
    # gpt-4o-mini: $0.15 in, $0.60 out a million tokens; half in a batch.
    assert got.usd_nanos == 375_000_000
    assert got.model == "gpt-4o-mini-2024-07-18"


def test_each_answer_is_priced_alone_so_a_long_prompt_tier_applies_per_request() -> None:
    def answer(i: int) -> dict[str, Any]:
        return {
            "id": f"msg_{i}",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 150_000, "output_tokens": 1_000},
        }

    request = _download("anthropic", "/v1/messages/batches/msgbatch_2/results", ANTHROPIC)
    got = measure_body(request, 200, _anthropic_results([answer(1), answer(2)]), CONFIG)
    one = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=150_000, output_tokens=1_000),
        "claude-sonnet-4-5",
        provider_id="anthropic",
        price_context=BATCH,
    ).total_price
    both_as_one = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=300_000, output_tokens=2_000),
        "claude-sonnet-4-5",
        provider_id="anthropic",
        price_context=BATCH,
    ).total_price
    assert got.usd_nanos == _nanos(2 * one)
    assert both_as_one > 2 * one  # the tier a sum would wrongly reach


def test_results_re_chunked_through_a_stream_meter_cost_the_same() -> None:
    answers = _answers("anthropic", "messages")
    body = _anthropic_results(answers)
    request = _download("anthropic", "/v1/messages/batches/msgbatch_3/results", ANTHROPIC)
    whole = measure_body(request, 200, body, CONFIG)
    for size in (1, 7, 100, 4096):
        stream = open_stream_meter(request, "application/binary", None, CONFIG)
        for at in range(0, len(body), size):
            assert stream.feed(body[at : at + size]) == body[at : at + size]
        _, got = stream.finish()
        assert (got.usd_nanos, got.usage, got.answered) == (
            whole.usd_nanos,
            whole.usage,
            whole.answered,
        )
    cut = open_stream_meter(request, "application/binary", None, CONFIG)
    cut.feed(body[: len(body) // 2])
    assert cut.partial().usd_nanos == 0  # cut short: no line is charged, the key stays free


def _input_file(model: str) -> bytes:
    """A batch input file: three chat requests on `model`."""
    return b"".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
            }
        ).encode()
        + b"\n"
        for i in range(3)
    )


def test_a_file_that_is_no_batch_output_costs_nothing() -> None:
    uploaded = _input_file("gpt-4o-mini")
    request = _download("openai", "/v1/files/file-input/content", OPENAI)
    for status, body in ((200, uploaded), (200, b"\x89PNG\r\n binary"), (404, b"{}")):
        got = measure_body(request, status, body, CONFIG)
        assert (got.usd_nanos, got.answered) == (0, 0)


def test_a_range_of_the_file_is_not_charged() -> None:
    request = _download("openai", "/v1/files/file-1/content", OPENAI)
    body = _openai_file(_answers("openai", "chat-completions"))
    assert measure_body(request, 206, body, CONFIG).usd_nanos == 0
    assert measure_body(request, 200, body, CONFIG).usd_nanos > 0


@pytest.mark.parametrize(
    ("provider", "method", "path", "found"),
    [
        ("openai", "GET", "/v1/files/file-abc/content", (OPENAI_FILE_CONTENT, "file-abc")),
        ("openai", "GET", "/openai/files/file-az/content", (OPENAI_FILE_CONTENT, "file-az")),
        ("openai", "GET", "/v1/files/file-abc", None),  # the file's metadata
        ("openai", "POST", "/v1/files/file-abc/content", None),
        (
            "anthropic",
            "GET",
            "/v1/messages/batches/msgbatch_1/results",
            (ANTHROPIC_BATCH_RESULTS, "msgbatch_1"),
        ),
        ("anthropic", "GET", "/v1/messages/batches/msgbatch_1", None),  # its status
        ("anthropic", "GET", "/v1/files/file-abc/content", None),
        ("gemini", "GET", "/v1/files/file-abc/content", None),
        ("gemini", "GET", "/v1beta/batches/b-1", (GEMINI_BATCH, "b-1")),
        ("gemini", "GET", "/v1/batches/b-1", (GEMINI_BATCH, "b-1")),
        ("gemini", "GET", "/download/v1beta/files/f-1:download", (GEMINI_FILE_DOWNLOAD, "f-1")),
        # google-genai's files.download(): on the API's path, no /download prefix.
        ("gemini", "GET", "/v1/files/f-1:download", (GEMINI_FILE_DOWNLOAD, "f-1")),
        ("gemini", "GET", "/v1beta/files/f-1%3Adownload", (GEMINI_FILE_DOWNLOAD, "f-1")),
        ("gemini", "GET", "/v1beta/files/f-1", None),  # the file's metadata
        ("gemini", "GET", "/v1beta/batches", None),  # the list
        ("gemini", "POST", "/v1beta/batches/b-1:cancel", None),
    ],
)
def test_which_downloads_are_a_batchs_results(
    provider: str, method: str, path: str, found: tuple[str, str] | None
) -> None:
    assert route(provider, method, path) == found
    assert (charging(provider, method, path) == "tokens") == (found is not None)


def test_the_charge_is_keyed_by_the_upstream_and_the_id() -> None:
    a = _download("openai", "/v1/files/file-a/content", OPENAI)
    again = _download("openai", "/v1/files/file-a/content/", OPENAI)
    other = _download("openai", "/v1/files/file-b/content", OPENAI)
    azure = _download("openai", "/openai/files/file-a/content", "https://x.openai.azure.com")
    assert a.once_key == again.once_key == once_key(OPENAI, OPENAI_FILE_CONTENT, "file-a")
    assert len({a.once_key, other.once_key, azure.once_key}) == 3


# --- a batch submitted: held at its requests' estimate, at the batch price ------------------


def _batch_price(provider: str, model: str, input_tokens: int, output_tokens: int) -> int:
    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    price = genai_prices.calc_price(usage, model, provider_id=provider, price_context=BATCH)
    return _nanos(price.total_price)


def _live(provider: str, path: str, body: dict[str, Any]) -> Any:
    return inspect_request(provider, "POST", path, {}, json.dumps(body).encode(), CONFIG)


CLAUDE = [
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "messages": [{"role": "user", "content": "Summarise the ledger's guarantees."}],
    },
    {
        "model": "claude-haiku-4-5",
        "max_tokens": 50,
        "system": "Answer in one word.",
        "messages": [{"role": "user", "content": "Is a hold money spent?"}],
    },
]


def test_a_message_batch_is_held_at_each_requests_estimate_at_the_batch_price() -> None:
    body = {"requests": [{"custom_id": f"r{i}", "params": p} for i, p in enumerate(CLAUDE)]}
    got = _live("anthropic", "/v1/messages/batches", body)
    each = [_live("anthropic", "/v1/messages", params) for params in CLAUDE]
    assert (got.endpoint, got.billable, got.priced) == ("messages.batches", True, True)
    assert got.input_tokens == sum(e.input_tokens for e in each)
    assert got.max_output_tokens == 350
    expected = sum(
        _batch_price("anthropic", p["model"], e.input_tokens, e.max_output_tokens)
        for p, e in zip(CLAUDE, each, strict=True)
    )
    assert got.estimate_usd_nanos == expected
    assert got.estimate_usd_nanos * 2 <= sum(e.estimate_usd_nanos for e in each) + 2  # half
    # The submission itself bills nothing: its batch is charged when its results are read.
    assert (
        measure_body(got, 200, b'{"id": "msgbatch_1", "type": "message_batch"}', CONFIG).usd_nanos
        == 0
    )


def test_a_message_batch_the_api_would_refuse_is_refused_with_where() -> None:
    bad = {"requests": [{"custom_id": "a", "params": CLAUDE[0]}, {"custom_id": "b", "params": {}}]}
    with pytest.raises(MeterRequestError, match=r"requests\[1\]\.params: model is missing"):
        _live("anthropic", "/v1/messages/batches", bad)
    with pytest.raises(MeterRequestError, match=r"requests\[0\]\.params is missing"):
        _live("anthropic", "/v1/messages/batches", {"requests": [{"custom_id": "a"}]})


def _upload(purpose: str, content: bytes) -> tuple[bytes, str]:
    boundary = "drawdown-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


CHAT = {
    "model": "gpt-4o-mini",
    "max_tokens": 200,
    "messages": [{"role": "user", "content": "Name the three units a budget counts."}],
}
EMBED = {"model": "text-embedding-3-large", "input": "a ledger line"}


def _line(url: str, body: Any) -> bytes:
    return json.dumps({"custom_id": url, "method": "POST", "url": url, "body": body}).encode()


def test_an_openai_batch_is_held_at_its_input_files_estimate_learned_at_upload() -> None:
    lines = [
        _line("/v1/chat/completions", CHAT),
        _line("/v1/chat/completions", CHAT),
        _line("/v1/embeddings", EMBED),
        _line("/v1/moderations", {"input": "free"}),  # costs nothing
        _line("/v1/chat/completions", {"messages": []}),  # no model: the API fails it alone
        b"not json",
    ]
    body, ctype = _upload("batch", b"\n".join(lines) + b"\n")
    upload = inspect_request(
        "openai", "POST", "/v1/files", {}, body, CONFIG, origin=OPENAI, content_type=ctype
    )
    assert (upload.billable, upload.step, upload.estimate_usd_nanos) == (False, True, 0)
    chat = _live("openai", "/v1/chat/completions", CHAT)
    embed = _live("openai", "/v1/embeddings", EMBED)
    assert upload.batch is not None and upload.batch.requests == 3
    expected = 2 * _batch_price("openai", "gpt-4o-mini", chat.input_tokens, 200) + _batch_price(
        "openai", "text-embedding-3-large", embed.input_tokens, 0
    )
    assert upload.batch.usd_nanos == expected
    assert upload.batch.model == "gpt-4o-mini"

    inputs = BatchInputs()
    inputs.learn(OPENAI, "file-in1", upload.batch)
    submit = json.dumps({"input_file_id": "file-in1", "endpoint": "/v1/chat/completions"})
    held = inspect_request(
        "openai", "POST", "/v1/batches", {}, submit.encode(), CONFIG,
        origin=OPENAI, batch_inputs=inputs.of(OPENAI),
    )  # fmt: skip
    assert (held.endpoint, held.billable, held.estimate_usd_nanos) == ("batches", True, expected)
    assert held.input_tokens == upload.batch.input_tokens
    # A file this proxy did not see uploaded (another worker's, before a restart): held at $0.
    unseen = inspect_request(
        "openai", "POST", "/v1/batches", {}, submit.replace("file-in1", "file-x").encode(),
        CONFIG, origin=OPENAI, batch_inputs=inputs.of(OPENAI),
    )  # fmt: skip
    assert (unseen.billable, unseen.estimate_usd_nanos) == (True, 0)


def test_an_upload_for_another_purpose_carries_no_estimate() -> None:
    body, ctype = _upload("fine-tune", _line("/v1/chat/completions", CHAT) + b"\n")
    upload = inspect_request(
        "openai", "POST", "/v1/files", {}, body, CONFIG, origin=OPENAI, content_type=ctype
    )
    assert (upload.step, upload.batch) == (True, None)
    unreadable = inspect_request("openai", "POST", "/v1/files", {}, b"\xff", CONFIG)
    assert (unreadable.step, unreadable.batch) == (True, None)


def test_what_a_proxy_learns_of_uploaded_batch_inputs_is_bounded() -> None:
    inputs = BatchInputs()
    some = _live("anthropic", "/v1/messages/batches", {"requests": []}).batch
    assert some is not None
    for i in range(BatchInputs.LIMIT):
        inputs.learn(OPENAI, f"file-{i}", some)
    assert (inputs.of(OPENAI) or {}).get("file-0") is some
    inputs.learn(OPENAI, "file-next", some)  # past the bound: it starts again
    assert dict(inputs.of(OPENAI) or {}) == {"file-next": some}
    assert uploaded_file_id(b'{"id": "file-9", "object": "file"}') == "file-9"
    assert uploaded_file_id(b'{"error": {"message": "no"}}') is None


# --- Gemini's batch mode -------------------------------------------------------------------

GEMINI = "https://generativelanguage.googleapis.com"


def _gemini_answers() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name in recorded_names("gemini", streamed=False):
        rec = load_recorded(name)
        if rec.status == 200 and rec.usage:
            found.append((rec.manifest["model"], json.loads(rec.response_body)))
    assert found
    return found


def _gemini_oracle(answers: list[tuple[str, dict[str, Any]]]) -> int:
    """genai-prices' own batch price of each answer; its extract_usage leaves out Google
    Search grounding (billed per grounded prompt on Gemini 2.x), added here."""
    total = Decimal(0)
    for _, body in answers:
        extracted = genai_prices.extract_usage(body, provider_id="google")
        if any(c.get("groundingMetadata") for c in body.get("candidates") or []):
            extracted.usage.web_searches = 1
        total += extracted.calc_price(price_context=BATCH).total_price
    return _nanos(total)


def test_a_done_gemini_batch_is_charged_its_inlined_responses_at_the_batch_price() -> None:
    answers = _gemini_answers()
    request = _download("gemini", "/v1beta/batches/b-1", GEMINI)
    assert (request.endpoint, request.billable, request.estimate_usd_nanos) == (
        GEMINI_BATCH,
        True,
        0,
    )
    done = {
        "name": "batches/b-1",
        "metadata": {
            "model": "models/gemini-2.5-flash",
            "state": "BATCH_STATE_SUCCEEDED",
            "output": {
                "inlinedResponses": {
                    "inlinedResponses": [
                        {"response": body, "metadata": {"key": str(i)}}
                        for i, (_, body) in enumerate(answers)
                    ]
                    + [{"error": {"code": 3, "message": "bad request"}, "metadata": {"key": "x"}}]
                }
            },
        },
        "done": True,
    }
    got = measure_body(request, 200, json.dumps(done).encode(), CONFIG)
    expected = _gemini_oracle(answers)
    assert expected - len(answers) <= got.usd_nanos <= expected
    assert got.answered == len(answers)
    # Read while it runs, a batch holds no responses: nothing charged, no key taken.
    running = {"name": "batches/b-1", "metadata": {"state": "BATCH_STATE_RUNNING"}}
    pending = measure_body(request, 200, json.dumps(running).encode(), CONFIG)
    assert (pending.usd_nanos, pending.answered) == (0, 0)


def test_a_gemini_batchs_responses_file_is_charged_line_by_line() -> None:
    answers = _gemini_answers()
    lines = b"".join(
        json.dumps({"key": str(i), "response": body}).encode() + b"\n"
        for i, (_, body) in enumerate(answers)
    )
    request = _download("gemini", "/download/v1beta/files/f-1:download", GEMINI)
    got = measure_body(request, 200, lines, CONFIG)
    expected = _gemini_oracle(answers)
    assert expected - len(answers) <= got.usd_nanos <= expected


def test_a_gemini_batch_is_held_at_its_inline_requests_estimate() -> None:
    requests = [
        {
            "contents": [{"role": "user", "parts": [{"text": "Count the budgets."}]}],
            "generationConfig": {"maxOutputTokens": 100},
        },
        {
            "model": "models/gemini-2.5-pro",
            "contents": [{"role": "user", "parts": [{"text": "And the runs?"}]}],
            "generationConfig": {"maxOutputTokens": 50},
        },
    ]
    body = {
        "batch": {
            "displayName": "b",
            "inputConfig": {
                "requests": {
                    "requests": [{"request": r, "metadata": {"key": "k"}} for r in requests]
                }
            },
        }
    }
    got = _live("gemini", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", body)
    each = [
        _live("gemini", "/v1beta/models/gemini-2.5-flash:generateContent", requests[0]),
        _live(
            "gemini",
            "/v1beta/models/gemini-2.5-pro:generateContent",
            {k: v for k, v in requests[1].items() if k != "model"},
        ),
    ]
    assert (got.endpoint, got.billable, got.max_output_tokens) == (
        "batchGenerateContent",
        True,
        150,
    )
    expected = _batch_price("google", "gemini-2.5-flash", each[0].input_tokens, 100) + _batch_price(
        "google", "gemini-2.5-pro", each[1].input_tokens, 50
    )
    assert got.estimate_usd_nanos == expected
    # A batch whose input is a file no proxy saw uploaded: nothing to read, held at $0.
    by_file = {"batch": {"inputConfig": {"fileName": "files/abc"}}}
    assert (
        _live(
            "gemini", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", by_file
        ).estimate_usd_nanos
        == 0
    )
    with pytest.raises(MeterRequestError, match=r"requests\[0\]\.request is missing"):
        _live(
            "gemini",
            "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
            {"batch": {"inputConfig": {"requests": {"requests": [{}]}}}},
        )


# --- a Gemini batch input file, counted as it is uploaded -----------------------------------

GEMINI = "https://generativelanguage.googleapis.com"
GEMINI_BATCH_PATH = "/v1beta/models/gemini-2.5-flash:batchGenerateContent"
GEMINI_REQUESTS = [
    {
        "contents": [{"role": "user", "parts": [{"text": "Which budgets ran out this week?"}]}],
        "generationConfig": {"maxOutputTokens": 120},
    },
    {  # no cap of its own: the model's default, known only when the batch names the model
        "systemInstruction": {"parts": [{"text": "Answer in one line."}]},
        "contents": [{"role": "user", "parts": [{"text": "And which runs looped? " * 40}]}],
    },
    {
        "contents": [{"parts": [{"text": "Sum the holds."}]}],
        "generation_config": {"max_output_tokens": 30, "candidate_count": 2},
    },
]


def _gemini_file(requests: list[dict[str, Any]]) -> bytes:
    """A batch input file as Gemini's docs write one: `{"key", "request"}` a line, with a
    line the API could not run (no request) that bills nothing."""
    lines = [json.dumps({"key": f"r{i}", "request": r}) for i, r in enumerate(requests)]
    lines.insert(1, json.dumps({"key": "broken"}))
    return "\n".join(lines).encode() + b"\n"


def _upload_in_chunks(
    uploads: Any, data: bytes, size: int, upload_id: str = "u1", resend: int | None = None
) -> Any:
    """Each chunk of `data` as its upstream took it, the way the SDK sends them (`resend`: a
    chunk sent again after its answer was lost)."""
    upload = inspect_request(
        "gemini", "POST", "/upload/v1beta/files", {"upload_id": upload_id}, b"", CONFIG
    )
    assert batch_file_upload(upload) and not upload.billable and not upload.step
    found = None
    offsets = list(range(0, len(data), size))
    for n, offset in enumerate(offsets):
        status = "final" if n == len(offsets) - 1 else "active"
        chunk = data[offset : offset + size]
        for _ in range(2 if n == resend else 1):
            found = batch_file_chunk(
                uploads, upload, GEMINI, {"upload_id": upload_id}, str(offset), chunk, status
            )
    return found


def test_a_gemini_batch_file_is_counted_as_uploaded_and_priced_as_its_inline_twin() -> None:
    """Its lines name no model: each is counted as the chunks go by (a line across two
    chunks joined, a chunk sent twice read once) and priced when the batch names the file
    and its model, at what the same requests sent inline are held at."""
    inline = {"batch": {"inputConfig": {"requests": {"requests": [
        {"request": r} for r in GEMINI_REQUESTS
    ]}}}}  # fmt: skip
    expected = _live("gemini", GEMINI_BATCH_PATH, inline)
    data = _gemini_file(GEMINI_REQUESTS)
    whole = _upload_in_chunks(BatchFileUploads(), data, len(data))
    assert whole is not None and whole.complete and whole.requests == 3
    for size in (7, 64, 301):
        assert _upload_in_chunks(BatchFileUploads(), data, size, resend=2) == whole
    answer = json.dumps({"file": {"name": "files/in-1", "state": "ACTIVE"}}).encode()
    progress = batch_file_uploaded(GEMINI, whole, answer)
    assert progress == BatchProgress(f"{GEMINI} files files/in-1", input_estimate=whole)
    inputs = BatchInputs()
    inputs.learn(GEMINI, "files/in-1", whole)
    by_file = {"batch": {"displayName": "b", "inputConfig": {"fileName": "files/in-1"}}}
    got = inspect_request(
        "gemini", "POST", GEMINI_BATCH_PATH, {}, json.dumps(by_file).encode(), CONFIG,
        origin=GEMINI, batch_inputs=inputs.of(GEMINI),
    )  # fmt: skip
    assert got.batch is not None and got.batch.requests == 3
    assert (got.input_tokens, got.max_output_tokens) == (
        expected.input_tokens,
        expected.max_output_tokens,
    )
    assert got.estimate_usd_nanos == expected.estimate_usd_nanos > 0
    default_cap = CONFIG.output_cap("gemini", "gemini-2.5-flash")
    assert got.max_output_tokens == 120 + default_cap + 60
    # The same file named by a batch on a dearer model is priced at that model's prices.
    pro = inspect_request(
        "gemini", "POST", GEMINI_BATCH_PATH.replace("flash", "pro"), {},
        json.dumps(by_file).encode(), CONFIG, origin=GEMINI, batch_inputs=inputs.of(GEMINI),
    )  # fmt: skip
    assert pro.estimate_usd_nanos > got.estimate_usd_nanos


def test_a_gemini_upload_is_one_step_however_many_chunks_it_takes() -> None:
    """google-genai sends a file in 8 MiB chunks, each a request: the upload counts as a step
    when it starts, its chunks (`upload_id`) are free, live and in replay alike."""
    start = inspect_request(
        "gemini", "POST", "/upload/v1/files", {}, b'{"file": {"mime_type": "jsonl"}}', CONFIG
    )
    chunk = inspect_request(
        "gemini", "POST", "/upload/v1/files", {"upload_id": "u"}, b"{}\n", CONFIG
    )
    assert (start.billable, start.step) == (False, True)
    assert (chunk.billable, chunk.step) == (False, False)
    assert charging("gemini", "POST", "/upload/v1/files") == "step"
    assert charging("gemini", "POST", "/upload/v1/files", query={"upload_id": "u"}) == "free"
    # OpenAI's upload is one request, a step, whatever its query.
    assert charging("openai", "POST", "/v1/files", query={"upload_id": "u"}) == "step"


def test_a_gemini_upload_read_in_part_is_marked_incomplete() -> None:
    data = _gemini_file(GEMINI_REQUESTS)
    uploads = BatchFileUploads()
    upload = inspect_request(
        "gemini", "POST", "/upload/v1beta/files", {"upload_id": "u2"}, b"", CONFIG
    )
    half = len(data) // 2
    # The first half went through another proxy: this one reads the rest from its offset.
    rest = batch_file_chunk(
        uploads, upload, GEMINI, {"upload_id": "u2"}, str(half), data[half:], "final"
    )
    assert rest is not None and not rest.complete
    assert 0 < rest.requests < 3
    # A chunk the upstream did not take (no upload status: an error) is not read; nor the
    # request that starts an upload (no upload id yet).
    for status, query in (("", {"upload_id": "u3"}), ("final", {})):
        assert batch_file_chunk(uploads, upload, GEMINI, query, "0", data, status) is None
    assert _upload_in_chunks(uploads, data, len(data), upload_id="u3").complete


def test_a_gemini_upload_of_another_kind_of_file_is_not_read_for_lines() -> None:
    """The Files API takes images, audio, video and documents too: their bytes are not read
    as lines, and nothing is kept for them (no batch can run on them)."""
    upload = inspect_request(
        "gemini", "POST", "/upload/v1beta/files", {"upload_id": "v"}, b"", CONFIG
    )
    request_line = json.dumps({"key": "k", "request": GEMINI_REQUESTS[0]}).encode()
    # A video whose bytes happen to hold a batch line after its first chunk: not read.
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4
    trailing = b"\n" + request_line + b"\n"
    for uploads_file, chunks in (
        (video + trailing, [video, trailing]),
        (b'{"a": "JSON document, no batch lines"}', None),
    ):
        uploads = BatchFileUploads()
        parts = chunks or [uploads_file]
        offset, found = 0, None
        for n, part in enumerate(parts):
            status = "final" if n == len(parts) - 1 else "active"
            found = batch_file_chunk(
                uploads, upload, GEMINI, {"upload_id": "v"}, str(offset), part, status
            )
            offset += len(part)
        assert found is None
    # A JSONL file's chunk from its middle, its start seen by another proxy, is read.
    uploads = BatchFileUploads()
    middle = b"...t of a line\n" + request_line + b"\n"
    found = batch_file_chunk(uploads, upload, GEMINI, {"upload_id": "m"}, "500", middle, "final")
    assert found is not None and not found.complete and found.requests == 1


def test_what_a_proxy_keeps_of_gemini_uploads_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    uploads = BatchFileUploads()
    monkeypatch.setattr(BatchFileUploads, "LIMIT", 2)
    monkeypatch.setattr(BatchFileUploads, "MAX_LINE", 100)
    upload = inspect_request(
        "gemini", "POST", "/upload/v1beta/files", {"upload_id": "a"}, b"", CONFIG
    )
    line = json.dumps({"key": "k", "request": GEMINI_REQUESTS[0]}).encode() + b"\n"
    for upload_id in ("a", "b", "c"):  # three started, two kept: "a" is forgotten
        batch_file_chunk(uploads, upload, GEMINI, {"upload_id": upload_id}, "0", line, "active")
    ended = {
        upload_id: batch_file_chunk(
            uploads, upload, GEMINI, {"upload_id": upload_id}, str(len(line)), line, "final"
        )
        for upload_id in ("a", "b", "c")
    }
    assert [f.requests for f in ended.values()] == [1, 2, 2]
    assert [f.complete for f in ended.values()] == [False, True, True]
    # A line longer than any request is dropped, not kept growing.
    long_line = json.dumps({"key": "k", "request": GEMINI_REQUESTS[1]}).encode()
    assert len(long_line) > 100
    batch_file_chunk(uploads, upload, GEMINI, {"upload_id": "d"}, "0", long_line, "active")
    found = batch_file_chunk(
        uploads, upload, GEMINI, {"upload_id": "d"}, str(len(long_line)), line, "final"
    )
    assert found is not None and not found.complete and found.requests == 1


def test_a_big_gemini_batch_file_is_kept_as_kinds_of_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file is kept as each kind of request and how many (a file of 50,000 lines the same
    shape is one kind). Past MAX_GROUPS kinds their counts are rounded up, to two significant
    figures then one: the hold stays at or above the requests' own, within twice."""
    monkeypatch.setattr(BatchFileUploads, "MAX_GROUPS", 4)
    same = {"contents": [{"parts": [{"text": "Hi"}]}], "generationConfig": {"maxOutputTokens": 64}}
    sizes = [
        {
            "contents": [{"parts": [{"text": "word " * (37 * k)}]}],
            "generationConfig": {"maxOutputTokens": 64},
        }
        for k in range(1, 11)
    ]
    requests = [same] * 10 + sizes
    counted = _upload_in_chunks(BatchFileUploads(), _gemini_file(requests), 333)
    assert counted.requests == 20 and len(counted.groups) < 11
    inline = {"batch": {"inputConfig": {"requests": {"requests": [
        {"request": r} for r in requests
    ]}}}}  # fmt: skip
    exact = _live("gemini", GEMINI_BATCH_PATH, inline)
    inputs = BatchInputs()
    inputs.learn(GEMINI, "files/big", counted)
    by_file = {"batch": {"inputConfig": {"fileName": "files/big"}}}
    got = inspect_request(
        "gemini", "POST", GEMINI_BATCH_PATH, {}, json.dumps(by_file).encode(), CONFIG,
        origin=GEMINI, batch_inputs=inputs.of(GEMINI),
    )  # fmt: skip
    assert exact.estimate_usd_nanos <= got.estimate_usd_nanos <= 2 * exact.estimate_usd_nanos
    assert exact.input_tokens <= got.input_tokens <= 2 * exact.input_tokens
    # Unrounded, a file of one kind of request is one group however long.
    one_kind = _upload_in_chunks(BatchFileUploads(), _gemini_file([same] * 500), 4096)
    assert one_kind.groups == ((one_kind.groups[0][0], 500),)
    # What a proxy remembers of uploaded files counts each kind of request.
    monkeypatch.setattr(BatchInputs, "LIMIT", len(counted.groups) + 1)
    inputs = BatchInputs()
    inputs.learn(GEMINI, "files/big", counted)
    inputs.learn(GEMINI, "files/one", one_kind)
    inputs.learn(GEMINI, "files/two", one_kind)  # past the bound: it starts again
    assert dict(inputs.of(GEMINI) or {}) == {"files/two": one_kind}


def test_a_gemini_files_counted_requests_travel_through_the_ledger_as_json() -> None:
    data = _gemini_file(GEMINI_REQUESTS)
    counted = _upload_in_chunks(BatchFileUploads(), data, 50)
    assert batch_estimate_from_json(batch_estimate_json(counted)) == counted
    body = json.dumps({"batch": {"inputConfig": {"file_name": "files/in-1"}}}).encode()
    assert batch_input_named("gemini", "POST", GEMINI_BATCH_PATH, GEMINI, body) == (
        "files/in-1",
        f"{GEMINI} files files/in-1",
    )
    inline = json.dumps({"batch": {"inputConfig": {"requests": {"requests": []}}}}).encode()
    assert batch_input_named("gemini", "POST", GEMINI_BATCH_PATH, GEMINI, inline) is None


def test_an_image_in_a_gemini_batch_file_counts_at_the_larger_of_the_models_rules() -> None:
    """Gemini 3 counts an image at 1120 tokens, Gemini 2 by 768-pixel tiles: a line counted
    before the model is known takes the larger, so the hold is never the smaller."""
    import base64
    import struct
    import zlib

    def png(width: int, height: int) -> str:
        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + header
        ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        return base64.b64encode(b"\x89PNG\r\n\x1a\n" + ihdr).decode()

    for (width, height), tokens in (((300, 300), 1120), ((3000, 3000), 258 * 16)):
        image = {"inlineData": {"mimeType": "image/png", "data": png(width, height)}}
        request = {"contents": [{"parts": [image]}], "generationConfig": {"maxOutputTokens": 1}}
        counted = _upload_in_chunks(BatchFileUploads(), _gemini_file([request]), 1000)
        assert counted.groups[0][0][1] == tokens


# --- what an answer tells of a batch job: the hold kept until it ends ---------------------


def _progress(request: Any, origin: str, answer: dict[str, Any] | bytes, status: int = 200) -> Any:
    body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    measured = measure_body(request, status, body, CONFIG) if request.billable else None
    return batch_progress(request, origin, body, measured)


def test_a_submission_keeps_its_hold_under_the_key_its_results_are_charged_under() -> None:
    claude = _live("anthropic", "/v1/messages/batches", {"requests": []})
    held = _progress(claude, ANTHROPIC, {"id": "msgbatch_1", "type": "message_batch"})
    results = _download("anthropic", "/v1/messages/batches/msgbatch_1/results", ANTHROPIC)
    assert held == BatchProgress(results.once_key, window=25 * 3600)
    gemini = _live("gemini", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", {})
    pending = {"name": "batches/b-7", "metadata": {"state": "BATCH_STATE_PENDING"}}
    read = _download("gemini", "/v1beta/batches/b-7", GEMINI)
    assert _progress(gemini, GEMINI, pending) == BatchProgress(read.once_key, window=49 * 3600)
    # An answer that names no batch keeps nothing (its hold ends with it, as any call's).
    assert _progress(claude, ANTHROPIC, {"type": "error"}) is None
    assert _progress(gemini, GEMINI, b"not json") is None


def test_an_openai_batch_is_kept_by_its_id_and_moved_to_its_output_file_when_done() -> None:
    submit = _live("openai", "/v1/batches", {"input_file_id": "file-in"})
    status = _download("openai", "/v1/batches/batch_1", OPENAI)
    assert (status.endpoint, status.billable, status.step) == ("batches.retrieve", False, False)
    assert status.batch_key == once_key(OPENAI, "batches.retrieve", "batch_1")
    created = {"id": "batch_1", "object": "batch", "status": "validating", "output_file_id": None}
    assert _progress(submit, OPENAI, created) == BatchProgress(status.batch_key, window=25 * 3600)
    for running in ("validating", "in_progress", "finalizing", "cancelling"):
        assert _progress(status, OPENAI, {**created, "status": running}) is None
    done = {**created, "status": "completed", "output_file_id": "file-out"}
    output = _download("openai", "/v1/files/file-out/content", OPENAI)
    assert _progress(status, OPENAI, done) == BatchProgress(
        status.batch_key, results_key=output.once_key
    )
    for ended in ("failed", "expired", "cancelled"):  # nothing answered: no output file
        assert _progress(status, OPENAI, {**created, "status": ended}) == BatchProgress(
            status.batch_key, ended=True
        )
    # Expired or cancelled with part of it answered: its output file holds those.
    partial = {**created, "status": "expired", "output_file_id": "file-out"}
    assert _progress(status, OPENAI, partial).results_key == output.once_key
    assert _progress(status, OPENAI, {"object": "list", "data": []}) is None
    # Done at its creation already (a stand-in that runs at once): kept, and moved.
    assert _progress(submit, OPENAI, done) == BatchProgress(
        status.batch_key, window=25 * 3600, results_key=output.once_key
    )


def test_a_results_download_ends_its_batch_whatever_its_answers() -> None:
    """Read whole, a batch's results end its hold — even when none of its answers succeeded
    (each errored, canceled or expired line costs nothing, and takes no once key)."""
    errored = b'{"custom_id": "x", "result": {"type": "errored"}}\n'
    results = _download("anthropic", "/v1/messages/batches/msgbatch_1/results", ANTHROPIC)
    assert _progress(results, ANTHROPIC, errored) == BatchProgress(results.once_key, ended=True)
    output = _download("openai", "/v1/files/file-out/content", OPENAI)
    body = _openai_file(_answers("openai", "chat-completions"))
    assert _progress(output, OPENAI, body) == BatchProgress(output.once_key, ended=True)
    # A range of the file, or an answer refused, is no end of it.
    assert _progress(output, OPENAI, body, status=206) is None


def test_a_gemini_batch_ends_when_done_or_moves_to_its_responses_file() -> None:
    read = _download("gemini", "/v1beta/batches/b-1", GEMINI)
    running = {"name": "batches/b-1", "metadata": {"state": "BATCH_STATE_RUNNING"}}
    assert _progress(read, GEMINI, running) is None
    for state in ("BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "JOB_STATE_EXPIRED"):
        ended = {"name": "batches/b-1", "metadata": {"state": state}}
        assert _progress(read, GEMINI, ended) == BatchProgress(read.once_key, ended=True)
    filed = {
        "name": "batches/b-1",
        "metadata": {"state": "BATCH_STATE_SUCCEEDED", "output": {"responsesFile": "files/f-9"}},
        "done": True,
    }
    download = _download("gemini", "/download/v1beta/files/f-9:download", GEMINI)
    assert _progress(read, GEMINI, filed) == BatchProgress(
        read.once_key, results_key=download.once_key
    )
    inline = {
        "name": "batches/b-1",
        "metadata": {
            "state": "BATCH_STATE_SUCCEEDED",
            "output": {"inlinedResponses": {"inlinedResponses": []}},
        },
        "done": True,
    }
    assert _progress(read, GEMINI, inline) == BatchProgress(read.once_key, ended=True)


def test_an_input_files_estimate_is_kept_under_the_id_its_upload_was_answered_with() -> None:
    """Uploaded through one proxy, named by a batch sent through another: the estimate travels
    through the ledger as JSON, under a key of the upstream and the file id."""
    data = _input_file("gpt-4o")
    boundary = "xyz"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    upload = inspect_request(
        "openai", "POST", "/v1/files", {}, form, CONFIG, origin=OPENAI,
        content_type=f"multipart/form-data; boundary={boundary}",
    )  # fmt: skip
    assert upload.batch is not None and upload.batch.requests == 3
    answer = json.dumps({"id": "file-9", "object": "file", "purpose": "batch"}).encode()
    progress = batch_progress(upload, OPENAI, answer, None)
    assert progress == BatchProgress(f"{OPENAI} files file-9", input_estimate=upload.batch)
    assert batch_estimate_from_json(batch_estimate_json(upload.batch)) == upload.batch
    assert batch_estimate_from_json('{"another": "version"}') is None
    body = json.dumps({"input_file_id": "file-9", "endpoint": "/v1/chat/completions"}).encode()
    assert batch_input_named("openai", "POST", "/v1/batches", OPENAI, body) == (
        "file-9",
        progress.key,
    )
    assert batch_input_named("openai", "GET", "/v1/batches/b-1", OPENAI, b"") is None
    assert batch_input_named("openai", "POST", "/v1/chat/completions", OPENAI, body) is None
    # An upload's answer that names no file (an error body) keeps nothing.
    assert batch_progress(upload, OPENAI, b'{"error": {}}', None) is None
