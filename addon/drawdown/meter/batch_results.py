"""A batch job's results, metered as the agent downloads them: the tokens the batch billed.

A batch is billed as it runs, upstream, with no call for a proxy to hold an estimate on; what
passes through the proxy is the download of its results, which carry each request's usage:

* OpenAI's Batch API (and Azure's): the output file, `GET …/files/{file_id}/content`, one
  line per request: `{"custom_id", "response": {"status_code", "body": {…, "usage"}}}`;
* Anthropic's Message Batches API: `GET …/v1/messages/batches/{id}/results`, one line per
  request: `{"custom_id", "result": {"type": "succeeded", "message": {…, "usage"}}}`;
* Gemini's batch mode: the batch itself, `GET /v1beta/batches/{id}` (read again and again
  until it is done), whose `metadata.output.inlinedResponses.inlinedResponses[]` hold each
  `response` with its `usageMetadata` once it is done; or, for a batch whose output is a
  file, `GET /download/v1beta/files/{id}:download` (google-genai's `files.download()`: `GET
  /v1/files/{id}:download`), one `{"key", "response"}` a line.

Each line is priced on its own at genai-prices' batch price (`processing: batch`, half the
standard rates) — a per-request price tier (a long prompt's) applies per line, never to the
sum. A successful answer whose usage is missing or cannot be read is charged its returned
text, counted as a live call's (its prompt is not in the results), never 0: the measurement's
source is then `counted`. A results file may be read again: the charge carries a key
(`once_key`) the ledger charges at most once. A file that is not a batch's output (an upload
read back) reports no usage and costs nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from . import anthropic, gemini, openai
from ._util import Extracted, dig, items, loads
from .config import MeterConfig, PricePerMillion, model_family
from .prices import price_answer, to_nanos
from .tokens import count_tokens
from .types import BatchProgress, LLMRequest, Measurement, TokenUsage

OPENAI_FILE_CONTENT = "files.content"
OPENAI_BATCH = "batches.retrieve"  # a status read, not a download: where the results will be
ANTHROPIC_BATCH_RESULTS = "messages.batches.results"
GEMINI_BATCH = "batches.get"
GEMINI_FILE_DOWNLOAD = "files.download"
ENDPOINTS = frozenset(
    {OPENAI_FILE_CONTENT, ANTHROPIC_BATCH_RESULTS, GEMINI_BATCH, GEMINI_FILE_DOWNLOAD}
)

BATCH = MappingProxyType({"processing": "batch"})

_OPENAI_FILE = re.compile(r"/files/([^/]+)/content$")
_ANTHROPIC_RESULTS = re.compile(r"/v1/messages/batches/([^/]+)/results$")
_GEMINI_BATCH = re.compile(r"^/v1(?:beta|alpha)?/batches/([^/:]+)$")
# The file's `downloadUri` has the /download prefix; google-genai's files.download() reads
# `/v1/files/{id}:download` on the API's own path.
_GEMINI_FILE = re.compile(r"^(?:/download)?/v1(?:beta|alpha)?/files/([^/:]+):download$")
_OPENAI_BATCH = re.compile(r"/batches/([^/]+)$")

# An OpenAI batch's statuses once it has stopped running: its output file (if any) is final.
_OPENAI_DONE = frozenset({"completed", "expired", "cancelled", "failed"})
# A Gemini batch's states once it has stopped running (BATCH_STATE_… or JOB_STATE_…).
_GEMINI_DONE = ("_SUCCEEDED", "_FAILED", "_CANCELLED", "_EXPIRED")

# The answer's "object" -> the endpoint whose meter reads it (the Batch API's endpoints).
_OPENAI_OBJECTS = {
    "chat.completion": "chat.completions",
    "text_completion": "completions",
    "response": "responses",
    "list": "embeddings",
}


def route(provider: str, method: str, path: str) -> tuple[str, str] | None:
    """(endpoint, the file or batch id) for a download of a batch's results, else None."""
    if method.upper() != "GET":
        return None
    p = path.split("?", 1)[0].rstrip("/")
    if provider == "openai":
        m = _OPENAI_FILE.search(p)
        return (OPENAI_FILE_CONTENT, m.group(1)) if m else None
    if provider == "anthropic":
        m = _ANTHROPIC_RESULTS.search(p)
        return (ANTHROPIC_BATCH_RESULTS, m.group(1)) if m else None
    if provider == "gemini":
        p = p.replace("%3A", ":").replace("%3a", ":")
        m = _GEMINI_BATCH.search(p)
        if m:
            return GEMINI_BATCH, m.group(1)
        m = _GEMINI_FILE.search(p)
        return (GEMINI_FILE_DOWNLOAD, m.group(1)) if m else None
    return None


def status_route(provider: str, method: str, path: str) -> str | None:
    """The batch an OpenAI status read (`GET …/batches/{id}`, Azure's too) names, else None.
    Anthropic's results say the batch ended; Gemini's status read is its results."""
    if provider != "openai" or method.upper() != "GET":
        return None
    m = _OPENAI_BATCH.search(path.split("?", 1)[0].rstrip("/"))
    return m.group(1) if m else None


def once_key(origin: str, endpoint: str, resource: str) -> str:
    """The key a batch's results are charged under once: the upstream, the kind, the id."""
    return f"{origin} {endpoint} {resource}"


def _lines(body: bytes) -> Iterator[Any]:
    for line in body.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line we cannot read bills nothing we can see


def _gemini_batch(body: bytes) -> tuple[list[Any], str | None, bool, str | None]:
    """A Gemini batch's inlined responses (none until it is done), its model, whether it is
    done, and the file its responses are in instead (`files/{id}`: the id)."""
    batch = loads(body)
    metadata = dig(batch, "metadata")
    output = dig(metadata, "output") or dig(batch, "response")
    model = dig(metadata, "model")
    state = dig(metadata, "state")
    done = dig(batch, "done") is True or (isinstance(state, str) and state.endswith(_GEMINI_DONE))
    responses_file = dig(output, "responsesFile")
    return (
        items(dig(output, "inlinedResponses", "inlinedResponses")),
        model if isinstance(model, str) else None,
        done,
        responses_file.rsplit("/", 1)[-1]
        if done and isinstance(responses_file, str) and responses_file
        else None,
    )


def _answer(provider: str, line: Any, model: str | None = None) -> Extracted | None:
    """What one line's successful answer reports, else None (errored, canceled, expired)."""
    if not isinstance(line, dict):
        return None
    if provider == "openai":
        response = line.get("response")
        if not isinstance(response, dict) or response.get("status_code") != 200:
            return None
        body = response.get("body")
        if not isinstance(body, dict):
            return None
        endpoint = _OPENAI_OBJECTS.get(str(body.get("object")), "chat.completions")
        return openai.extract_json(endpoint, body)
    if provider == "gemini":  # an inlined response, or a line of the responses file
        response = line.get("response")
        if not isinstance(response, dict) or line.get("error") is not None:
            return None
        return gemini.extract_json(response, model)
    result = line.get("result")
    if not isinstance(result, dict) or result.get("type") != "succeeded":
        return None
    return anthropic.extract_json(result.get("message"))


def measure(
    request: LLMRequest,
    status: int,
    body: bytes,
    config: MeterConfig,
    price_override: PricePerMillion | None = None,
) -> Measurement:
    """The usage and batch-priced cost of every successful answer in a results file."""
    usage, total, priced, answered = TokenUsage(), Decimal(0), True, 0
    extras: dict[str, int] = {}
    models: dict[str, int] = {}
    lines: Iterable[Any] = ()
    model: str | None = None
    done, results_file = False, None
    if 200 <= status < 300 and status != 206:  # a range of the file: lines cut, not charged
        if request.endpoint == GEMINI_BATCH:
            lines, model, done, results_file = _gemini_batch(body)
            done = done and results_file is None  # its results are read from the file
        else:
            lines, done = _lines(body), True
    source = "usage"
    for line in lines:
        ex = _answer(request.provider, line, model)
        if ex is None:
            continue
        line_usage = ex.usage
        if line_usage is None:
            # An answer whose usage is missing or cannot be read: its text counted, never 0
            # (its prompt is not in the results: only its output is known).
            line_usage = _counted(request.provider, ex, model, config)
            if not line_usage.output_tokens:
                continue
            source = "counted"
        answered += 1
        usd, line_priced = price_answer(
            request.provider,
            (ex.model, model),
            line_usage,
            config,
            price_override,
            extras=ex.extras,
            price_context={**ex.price_context, **BATCH},
            other_models=ex.other_models,
            other_context=BATCH,
            matched=request.price_provider,
        )
        total += usd
        priced = priced and line_priced
        usage += line_usage  # as a call's own: its other models' tokens are priced only
        for name, n in ex.extras.items():
            extras[name] = extras.get(name, 0) + n
        if ex.model:
            models[ex.model] = models.get(ex.model, 0) + 1
    return Measurement(
        usage=usage,
        usd_nanos=to_nanos(total),
        source=source,
        priced=priced,
        model=_most_answered(models),
        extras=MappingProxyType(extras),
        answered=answered,
        batch_done=done,
        results_file=results_file,
    )


def _counted(provider: str, ex: Extracted, model: str | None, config: MeterConfig) -> TokenUsage:
    """An answer without readable usage: the text it returned, counted as a live call's is
    (tiktoken, times the family's safety factor)."""
    name = ex.model or model
    tokens = count_tokens("".join(ex.texts), name)
    if model_family(provider, name) is not None:
        tokens = math.ceil(tokens * config.safety_factor(provider, name))
    return TokenUsage(output_tokens=tokens)


def progress(key: str, origin: str, measurement: Measurement) -> BatchProgress | None:
    """What a results download (or a Gemini batch's read) tells of its batch: done, its
    results read here or none to read; or done with its results in a file, read later."""
    if measurement.results_file is not None:
        return BatchProgress(
            key, results_key=once_key(origin, GEMINI_FILE_DOWNLOAD, measurement.results_file)
        )
    return BatchProgress(key, ended=True) if measurement.batch_done else None


def openai_status(key: str, origin: str, answer: bytes) -> BatchProgress | None:
    """What an OpenAI batch object (a status read's answer, or its creation's) tells: done,
    its results to be read from its output file, or ended with none; else None (running)."""
    batch = loads(answer)
    if not isinstance(batch, dict) or batch.get("object") != "batch":
        return None
    if batch.get("status") not in _OPENAI_DONE:
        return None
    output = batch.get("output_file_id")
    if isinstance(output, str) and output:
        return BatchProgress(key, results_key=once_key(origin, OPENAI_FILE_CONTENT, output))
    return BatchProgress(key, ended=True)  # failed, or nothing answered: no output file


def _most_answered(models: Mapping[str, int]) -> str | None:
    return max(models, key=models.__getitem__) if models else None
