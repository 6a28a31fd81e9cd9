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
  `{"batch": {"inputConfig": {"requests": {"requests": [{"request": {…}}]}}}}`, or names a
  file uploaded before (`inputConfig.fileName`, `files/{id}`), one `{"key", "request"}` a
  line. Its lines name no model, so they are counted as the file is uploaded (Files API's
  resumable upload: each chunk a request of its own, `POST /upload/v1beta/files?upload_id=…`,
  read as the upstream takes it, a line across two chunks joined: BatchFileUploads) and
  priced when the batch names the file and its model; remembered as OpenAI's are.
* OpenAI's Batch API names an input file uploaded before (`POST /v1/files`, purpose
  `batch`, one `{"custom_id", "method", "url", "body"}` a line): its lines are estimated
  as it is uploaded, the estimate is remembered by the file id the upload's answer names
  (BatchInputs, and the ledger for every proxy), and `POST /v1/batches` naming that file is
  held for it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace

from . import anthropic, batch_results, gemini, openai
from ._util import ParsedRequest, Prompt, dig, loads, parse_body, req_list
from .multipart import parse_form
from .types import (
    BatchEstimate,
    BatchFile,
    BatchInput,
    BatchProgress,
    CountedRequest,
    MeterRequestError,
)

ANTHROPIC_SUBMIT = "messages.batches"
OPENAI_SUBMIT = "batches"
OPENAI_UPLOAD = "files"
GEMINI_SUBMIT = "batchGenerateContent"
GEMINI_UPLOAD = "files.upload"
SUBMISSIONS = frozenset({ANTHROPIC_SUBMIT, OPENAI_SUBMIT, GEMINI_SUBMIT})

# How long each provider runs a batch before it expires (OpenAI's and Anthropic's 24 hours,
# Gemini's 48), and an hour past it for its last results to be written: the longest a
# submission's hold is kept if its results are never read through drawdown.
WINDOWS = {ANTHROPIC_SUBMIT: 24 * 3600, OPENAI_SUBMIT: 24 * 3600, GEMINI_SUBMIT: 48 * 3600}
PAST_WINDOW = 3600

_GEMINI_UPLOAD = re.compile(r"^/upload/v1(?:beta|alpha)?/files$")

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
    if provider == "gemini" and _GEMINI_UPLOAD.search(p):
        return GEMINI_UPLOAD
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


def gemini_input_file(body: bytes) -> str | None:
    """The uploaded file (`files/{id}`) a Gemini batch submission names as its input."""
    obj = loads(body)
    batch = (
        obj.get("batch") if isinstance(obj, dict) and isinstance(obj.get("batch"), dict) else obj
    )
    config = (
        batch.get("inputConfig", batch.get("input_config")) if isinstance(batch, dict) else None
    )
    name = config.get("fileName", config.get("file_name")) if isinstance(config, dict) else None
    return name if isinstance(name, str) and name else None


Counter = Callable[[ParsedRequest], tuple[int, int]]


def gemini_file_requests(content: bytes, count: Counter) -> Iterator[CountedRequest]:
    """The requests of whole lines of a Gemini batch input file, counted (`count`: prompt
    tokens to scale, exact tokens) before a model is known: an image at the larger of
    Gemini's rules. A line the API could not run bills nothing, so it is left out."""
    for line in content.splitlines():
        obj = loads(line) if line.strip() else None
        request = obj.get("request") if isinstance(obj, dict) else None
        if not isinstance(request, dict):
            continue
        try:
            parsed = gemini.parse_request("generateContent", None, request)
        except MeterRequestError:
            continue
        prompt_tokens, exact = count(parsed)
        yield prompt_tokens, exact, parsed.cap


def estimate_file(
    model: str | None, batch_file: BatchFile, estimate_one: Estimator
) -> BatchEstimate:
    """A Gemini batch input file's requests estimated as calls to the model its batch names:
    each kind of request once, times how many there are (as estimate() of every line)."""
    tokens_in = cap = nanos = 0
    priced = True
    for (tokens, exact, own_cap), n in batch_file.groups:
        request = ParsedRequest(
            "generateContent", model, prompt=Prompt(overhead=tokens, exact=exact), cap=own_cap
        )
        one_in, one_cap, one_nanos, one_priced = estimate_one(request)
        tokens_in, cap, nanos = tokens_in + n * one_in, cap + n * one_cap, nanos + n * one_nanos
        priced = priced and one_priced
    return BatchEstimate(tokens_in, cap, nanos, priced, model, batch_file.requests)


def _round_up(value: int, digits: int) -> int:
    """`value` rounded up to `digits` significant figures (1,234 -> 1,300 at two)."""
    scale = 10 ** max(len(str(value)) - digits, 0)
    return -(-value // scale) * scale


def _coarsened(request: CountedRequest, digits: int | None) -> CountedRequest:
    if digits is None:
        return request
    tokens, exact, cap = request
    return (
        _round_up(tokens, digits),
        _round_up(exact, digits),
        None if cap is None else _round_up(cap, digits),
    )


def gemini_upload_id(query: Mapping[str, str]) -> str | None:
    """The resumable upload a Files API request carries a chunk of (its `upload_id`); None
    for the request that starts one."""
    upload_id = query.get("upload_id")
    return upload_id or None


@dataclasses.dataclass
class _Upload:
    received: int = 0  # bytes of the file the upstream took, by offset
    tail: bytes = b""  # the start of a line the last chunk ended in
    # Each kind of request read, and how many; past MAX_GROUPS kinds, counts are rounded up
    # to `digits` significant figures (never below what each request counted).
    groups: dict[CountedRequest, int] = dataclasses.field(default_factory=dict)
    digits: int | None = None
    complete: bool = True
    batch_file: bool | None = None  # None until a chunk tells (an image, a video…)

    def add(self, requests: Iterable[CountedRequest], most: int) -> None:
        groups = self.groups
        for request in requests:
            key = _coarsened(request, self.digits)
            groups[key] = groups.get(key, 0) + 1
            if len(groups) > most and self.digits != 1:
                self.digits = 2 if self.digits is None else 1
                coarse: dict[CountedRequest, int] = {}
                for old, n in groups.items():
                    new = _coarsened(old, self.digits)
                    coarse[new] = coarse.get(new, 0) + n
                self.groups = groups = coarse


def _looks_like_batch_file(chunk: bytes, from_start: bool) -> bool | None:
    """Whether an upload's first chunk seen here is JSONL: from the file's start, its first
    byte but whitespace opens an object (None: only whitespace yet, undecided); from its
    middle, it holds a whole `{"request": …}` line. The Files API takes images, audio and
    video too, whose bytes are not read for lines."""
    if from_start:
        head = chunk.lstrip()
        return head[:1] == b"{" if head else None
    for line in chunk.split(b"\n"):  # a part of a line is no whole `{"request": …}`
        if line.startswith(b"{"):
            obj = loads(line)
            if isinstance(obj, dict) and isinstance(obj.get("request"), dict):
                return True
    return False


class BatchFileUploads:
    """Gemini batch input files being uploaded through this proxy, by upstream and upload
    id: the requests of the lines read whole so far, and the start of the line a chunk ended
    in. A chunk is read once its upstream took it, at the offset it was sent at, so a chunk
    sent again is not read twice, and one that went by unseen (through another proxy, or
    before this one started) marks the file incomplete. Per proxy process; bounded: LIMIT
    uploads in progress (past it the oldest is forgotten), a line of at most MAX_LINE bytes
    (the API would refuse a longer request), MAX_GROUPS kinds of request a file (past them,
    token counts are rounded up to two significant figures, then one: an estimate up to 10 %,
    then up to 100 %, above the requests' own)."""

    LIMIT = 256
    MAX_LINE = 32 * 1024 * 1024
    MAX_GROUPS = 4096

    def __init__(self) -> None:
        self._uploads: dict[tuple[str, str], _Upload] = {}
        self._lock = threading.Lock()  # chunks of different uploads may be read in threads

    def read(
        self,
        origin: str,
        upload_id: str,
        offset: int | None,
        chunk: bytes,
        final: bool,
        count: Counter,
    ) -> BatchFile | None:
        """Reads a chunk the upstream took; the file's requests once it took the last one
        (None for a file with none: no batch input)."""
        key = (origin, upload_id)
        with self._lock:
            upload = self._uploads.pop(key, None) or _Upload()
        start = upload.received if offset is None else offset
        if upload.batch_file is None:  # a fresh upload, or only whitespace read from its start
            upload.batch_file = _looks_like_batch_file(chunk, start <= upload.received)
        if upload.batch_file is False:  # kept as not one, so its later chunks are not read
            return None if final else self._keep(key, upload)
        if start < upload.received:  # sent again from before what was read: read the rest
            chunk, start = chunk[upload.received - start :], upload.received
        elif start > upload.received:  # bytes that went by unseen: lines are missing
            upload.complete, upload.tail = False, b""
        upload.received = start + len(chunk)
        data = upload.tail + chunk
        cut = len(data) if final else data.rfind(b"\n") + 1
        upload.tail = data[cut:]
        if len(upload.tail) > self.MAX_LINE:  # no request is this long: not a batch file
            upload.complete, upload.tail = False, b""
        upload.add(gemini_file_requests(data[:cut], count), self.MAX_GROUPS)
        if final:
            groups = tuple(upload.groups.items())
            return BatchFile(groups, upload.complete) if groups else None
        return self._keep(key, upload)

    def _keep(self, key: tuple[str, str], upload: _Upload) -> None:
        with self._lock:
            self._uploads[key] = upload
            while len(self._uploads) > self.LIMIT:
                del self._uploads[next(iter(self._uploads))]


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


def uploaded(origin: str, batch: BatchInput, answer: bytes) -> BatchProgress | None:
    """A batch input file uploaded: its estimate, under the key of the id its answer names."""
    file_id = uploaded_file_id(answer)
    return (
        None if file_id is None else BatchProgress(input_key(origin, file_id), input_estimate=batch)
    )


def estimate_to_json(batch: BatchInput) -> str:
    """An input file's estimate (a Gemini file's counted requests) as the ledger keeps it
    (batch_inputs)."""
    return json.dumps(dataclasses.asdict(batch), separators=(",", ":"))


def estimate_from_json(text: str) -> BatchInput | None:
    """An estimate the ledger kept; None for one this drawdown cannot read (another version's)."""
    try:
        obj = json.loads(text)
        if isinstance(obj.get("groups"), list):  # a Gemini file's counted requests
            groups = tuple(
                ((int(p), int(e), None if c is None else int(c)), int(n))
                for (p, e, c), n in obj["groups"]
            )
            return BatchFile(groups, bool(obj.get("complete", True)))
        return BatchEstimate(**obj)
    except (TypeError, ValueError, AttributeError):
        return None


def openai_input_file_id(body: bytes) -> str | None:
    """The input file a `POST /v1/batches` names."""
    obj = loads(body)
    file_id = obj.get("input_file_id") if isinstance(obj, dict) else None
    return file_id if isinstance(file_id, str) else None


def uploaded_file_id(answer: bytes) -> str | None:
    """The id an upload's answer names (OpenAI's `{"id": "file-…", "object": "file", …}`,
    Gemini's `{"file": {"name": "files/…"}}`)."""
    obj = loads(answer)
    if not isinstance(obj, dict) or obj.get("object") not in (None, "file"):
        return None
    if "id" not in obj:  # Gemini's: a file named `files/{id}`
        name = dig(obj, "file", "name")
        return name if isinstance(name, str) and name.startswith("files/") else None
    file_id = obj.get("id")
    return file_id if isinstance(file_id, str) else None


class BatchInputs:
    """The estimates of the batch input files this proxy saw uploaded (a Gemini file's
    counted requests), by upstream and file id, for the batch that names one. Per proxy
    process, from its start; bounded (past LIMIT entries, a Gemini file's kinds of request
    counting one each, it starts again). The ledger keeps them too (`input_key`): a file
    uploaded through another worker, or before a restart, is read from there when a batch
    names it."""

    LIMIT = 65_536

    def __init__(self) -> None:
        self._by_origin: dict[str, dict[str, BatchInput]] = {}
        self._count = 0

    def of(self, origin: str) -> Mapping[str, BatchInput] | None:
        return self._by_origin.get(origin)

    def learn(self, origin: str, file_id: str, batch: BatchInput) -> None:
        weight = len(batch.groups) if isinstance(batch, BatchFile) else 1
        if self._count + weight > self.LIMIT:
            self._by_origin, self._count = {}, 0
        self._count += weight
        self._by_origin.setdefault(origin, {})[file_id] = batch
