"""A batch job, submitted: what its requests may cost, estimated before it is sent.

A batch is billed upstream as it runs, with no later call of the agent's to refuse; the one
moment drawdown can say no is its submission. Each of its requests is estimated as the proxy
estimates a live call (tiktoken, the output cap), priced at genai-prices' batch price, and
the sum must fit every budget of the submitting run. The hold outlives the submission: it is
kept under the key the batch's results will be charged under (`submitted`), until they are
read (batch_results), the batch ends without results, or its window passes — so a run cannot
submit batch after batch, each checked against the same room.

* Anthropic's Message Batches name every request inline: `POST /v1/messages/batches`,
  `{"requests": [{"custom_id", "params": {…a Messages request…}}]}`.
* Gemini's batch mode names them inline too: `POST …/models/{model}:batchGenerateContent`,
  `{"batch": {"inputConfig": {"requests": {"requests": [{"request": {…}}]}}}}` (a batch
  whose input is a file uploaded before is held at $0).
* OpenAI's Batch API names an input file uploaded before (`POST /v1/files`, purpose
  `batch`, one `{"custom_id", "method", "url", "body"}` a line): its lines are estimated
  as it is uploaded, the estimate is remembered by the file id the upload's answer names
  (BatchInputs, and the ledger for every proxy), and `POST /v1/batches` naming that file is
  held for it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace

from . import anthropic, batch_results, gemini, openai
from ._util import ParsedRequest, dig, loads, parse_body, req_list
from .multipart import parse_form
from .types import BatchEstimate, BatchProgress, MeterRequestError

ANTHROPIC_SUBMIT = "messages.batches"
OPENAI_SUBMIT = "batches"
OPENAI_UPLOAD = "files"
GEMINI_SUBMIT = "batchGenerateContent"
SUBMISSIONS = frozenset({ANTHROPIC_SUBMIT, OPENAI_SUBMIT, GEMINI_SUBMIT})

# How long each provider runs a batch before it expires (OpenAI's and Anthropic's 24 hours,
# Gemini's 48), and an hour past it for its last results to be written: the longest a
# submission's hold is kept if its results are never read through drawdown.
WINDOWS = {ANTHROPIC_SUBMIT: 24 * 3600, OPENAI_SUBMIT: 24 * 3600, GEMINI_SUBMIT: 48 * 3600}
PAST_WINDOW = 3600

# The endpoints an OpenAI batch may run that drawdown meters (moderations cost nothing).
_OPENAI_METERED = frozenset({"chat.completions", "responses", "completions", "embeddings"})


def route(provider: str, method: str, path: str) -> str | None:
    """The submission endpoint (or OpenAI's file upload) a request is, else None."""
    if method.upper() != "POST":
        return None
    p = path.split("?", 1)[0].rstrip("/")
    if provider == "anthropic" and p.endswith("/v1/messages/batches"):
        return ANTHROPIC_SUBMIT
    if provider == "openai" and p.endswith("/batches"):
        return OPENAI_SUBMIT
    if provider == "openai" and p.endswith("/files"):
        return OPENAI_UPLOAD
    if provider == "gemini" and gemini_model(p) is not None:
        return GEMINI_SUBMIT
    return None


def gemini_model(path: str) -> str | None:
    """The model a Gemini `…/models/{model}:batchGenerateContent` path names."""
    p = path.split("?", 1)[0].rstrip("/").replace("%3A", ":").replace("%3a", ":")
    if not p.endswith(":batchGenerateContent"):
        return None
    _, model = gemini.route("POST", p)
    return model


Estimator = Callable[[ParsedRequest], tuple[int, int, int, bool]]


def estimate(parsed: list[ParsedRequest], estimate_one: Estimator) -> BatchEstimate:
    """The sum of each request's estimate (input tokens, output cap, nano-dollars, priced)."""
    tokens_in = cap = nanos = 0
    priced = True
    models: dict[str, int] = {}
    for request in parsed:
        one_in, one_cap, one_nanos, one_priced = estimate_one(request)
        tokens_in, cap, nanos = tokens_in + one_in, cap + one_cap, nanos + one_nanos
        priced = priced and one_priced
        if request.model:
            models[request.model] = models.get(request.model, 0) + 1
    model = max(models, key=models.__getitem__) if models else None
    return BatchEstimate(tokens_in, cap, nanos, priced, model, len(parsed))


def anthropic_requests(body: bytes) -> list[ParsedRequest]:
    """Each request of a message batch, parsed as a Messages call; MeterRequestError for a
    batch the API would refuse whole (no `requests` array, a request with no params)."""
    found = []
    for i, request in enumerate(req_list(parse_body(body), "requests")):
        params = request.get("params") if isinstance(request, dict) else None
        if not isinstance(params, dict):
            raise MeterRequestError(f"requests[{i}].params is missing; expected an object")
        try:
            found.append(anthropic.parse_request(params, None, False))
        except MeterRequestError as exc:
            raise MeterRequestError(f"requests[{i}].params: {exc}") from None
    return found


def gemini_requests(path: str, body: bytes) -> list[ParsedRequest]:
    """Each inline request of a Gemini batch, parsed as a generateContent call on the model
    it names (else the path's); none for a batch whose input is a file."""
    obj = parse_body(body)
    batch = obj.get("batch") if isinstance(obj.get("batch"), dict) else obj
    config = batch.get("inputConfig", batch.get("input_config"))
    inline = dig(config, "requests", "requests")
    if inline is None:
        return []
    if not isinstance(inline, list):
        raise MeterRequestError("batch.inputConfig.requests.requests must be an array")
    default = gemini_model(path) or ""
    found = []
    for i, item in enumerate(inline):
        request = item.get("request") if isinstance(item, dict) else None
        if not isinstance(request, dict):
            raise MeterRequestError(f"requests[{i}].request is missing; expected an object")
        named = request.get("model")
        model = named.rsplit("/", 1)[-1] if isinstance(named, str) and named else default
        try:
            found.append(gemini.parse_request("generateContent", model, request))
        except MeterRequestError as exc:
            raise MeterRequestError(f"requests[{i}].request: {exc}") from None
    return found


def openai_input_file(body: bytes, boundary: str | None) -> list[ParsedRequest] | None:
    """The requests of a batch input file being uploaded, or None for an upload that is no
    batch input (another purpose, a form drawdown cannot read: passed on as a $0 step, as
    before). A line the API could not run bills nothing, so it is left out."""
    try:
        form = parse_form(body, frozenset({"file"}), boundary)
    except MeterRequestError:
        return None
    content = form.upload("file")
    if form.fields.get("purpose") != "batch" or content is None:
        return None
    return list(_openai_lines(content))


def _openai_lines(content: bytes) -> Iterator[ParsedRequest]:
    for line in content.splitlines():
        obj = loads(line) if line.strip() else None
        if not isinstance(obj, dict) or not isinstance(obj.get("body"), dict):
            continue
        url = obj.get("url")
        endpoint, _ = openai.route("POST", url.split("?", 1)[0] if isinstance(url, str) else "")
        if endpoint not in _OPENAI_METERED:
            continue
        try:
            yield openai.parse_request(endpoint, obj["body"], None, b"")
        except MeterRequestError:
            continue


def submitted(endpoint: str, origin: str, answer: bytes) -> BatchProgress | None:
    """A batch accepted: the key its results will be charged under (its hold is kept there),
    from the id its answer names; None for an answer that names none."""
    obj = loads(answer)
    if not isinstance(obj, dict):
        return None
    window = WINDOWS[endpoint] + PAST_WINDOW
    if endpoint == GEMINI_SUBMIT:  # an operation named `batches/{id}`
        name = obj.get("name")
        if not isinstance(name, str) or not name.startswith("batches/"):
            return None
        key = batch_results.once_key(origin, batch_results.GEMINI_BATCH, name.split("/", 1)[1])
        return BatchProgress(key, window=window)
    batch_id = obj.get("id")
    if not isinstance(batch_id, str) or not batch_id:
        return None
    if endpoint == ANTHROPIC_SUBMIT:
        key = batch_results.once_key(origin, batch_results.ANTHROPIC_BATCH_RESULTS, batch_id)
        return BatchProgress(key, window=window)
    key = batch_results.once_key(origin, batch_results.OPENAI_BATCH, batch_id)
    done = batch_results.openai_status(key, origin, answer)  # done already, its output named
    return replace(done, window=window) if done else BatchProgress(key, window=window)


def input_key(origin: str, file_id: str) -> str:
    """The key an OpenAI batch input file's estimate is remembered under in the ledger."""
    return batch_results.once_key(origin, OPENAI_UPLOAD, file_id)


def uploaded(origin: str, batch: BatchEstimate, answer: bytes) -> BatchProgress | None:
    """A batch input file uploaded: its estimate, under the key of the id its answer names."""
    file_id = uploaded_file_id(answer)
    return (
        None if file_id is None else BatchProgress(input_key(origin, file_id), input_estimate=batch)
    )


def estimate_to_json(batch: BatchEstimate) -> str:
    """An input file's estimate as the ledger keeps it (batch_inputs)."""
    return json.dumps(dataclasses.asdict(batch), separators=(",", ":"))


def estimate_from_json(text: str) -> BatchEstimate | None:
    """An estimate the ledger kept; None for one this drawdown cannot read (another version's)."""
    try:
        return BatchEstimate(**json.loads(text))
    except (TypeError, ValueError):
        return None


def openai_input_file_id(body: bytes) -> str | None:
    """The input file a `POST /v1/batches` names."""
    obj = loads(body)
    file_id = obj.get("input_file_id") if isinstance(obj, dict) else None
    return file_id if isinstance(file_id, str) else None


def uploaded_file_id(answer: bytes) -> str | None:
    """The id an upload's answer names (`{"id": "file-…", "object": "file", …}`)."""
    obj = loads(answer)
    if not isinstance(obj, dict) or obj.get("object") not in (None, "file"):
        return None
    file_id = obj.get("id")
    return file_id if isinstance(file_id, str) else None


class BatchInputs:
    """The estimates of the batch input files this proxy saw uploaded, by upstream and file
    id, for the batch that names one. Per proxy process, from its start; bounded (past LIMIT
    it starts again). The ledger keeps them too (`input_key`): a file uploaded through
    another worker, or before a restart, is read from there when a batch names it."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._by_origin: dict[str, dict[str, BatchEstimate]] = {}
        self._count = 0

    def of(self, origin: str) -> Mapping[str, BatchEstimate] | None:
        return self._by_origin.get(origin)

    def learn(self, origin: str, file_id: str, batch: BatchEstimate) -> None:
        if self._count >= self.LIMIT:
            self._by_origin, self._count = {}, 0
        self._count += 1
        self._by_origin.setdefault(origin, {})[file_id] = batch
