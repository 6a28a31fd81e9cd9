"""The metering facade the proxy calls: estimate a request, measure its response."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Protocol

from ..money import MAX_AMOUNT, MAX_USD, format_usd
from . import (
    anthropic,
    batch_results,
    batch_submit,
    bedrock,
    gemini,
    openai,
    openai_audio,
    openai_images,
    openai_realtime,
    openai_transcribe,
)
from ._util import Extracted, ParsedRequest, kind, loads, parse_body
from .config import MeterConfig, PricePerMillion, model_family
from .decode import Decoder, UnsupportedEncoding, make_decoder
from .multipart import boundary_of
from .prices import origin as upstream_origin
from .prices import price_answer, price_usage, to_nanos, url_provider
from .sse import SSEParser
from .tokens import count_texts, count_tokens
from .types import (
    BatchEstimate,
    BatchFile,
    BatchInput,
    BatchProgress,
    LLMRequest,
    Measurement,
    MeterRequestError,
    TokenUsage,
)

# A non-SSE body read through a StreamMeter is kept (decoded) up to this size for parsing.
MAX_BUFFERED_BODY = 64 * 1024 * 1024

_NO_EXTRAS: Mapping[str, int] = MappingProxyType({})


# --- before the call --------------------------------------------------------------------


# What a provider does not bill: token counting and moderation (helpers an SDK or a guardrail
# calls), cancelling a job, updating a stored completion's metadata, and anything but a POST,
# PUT or PATCH (listing models, reading a file or a batch).
_FREE_ENDPOINTS = frozenset({"messages.count_tokens", "countTokens"})
_FREE_PATH = re.compile(
    r"/(?:moderations|input_tokens|count_tokens)$"
    r"|[/:]cancel$"  # .../batches/{id}/cancel, Gemini's batches/{id}:cancel
    r"|/chat/completions/[^/]+$"  # POST /v1/chat/completions/{id}: metadata only
)
_WRITES = frozenset({"POST", "PUT", "PATCH"})


def _is_step(method: str, path: str, endpoint: str) -> bool:
    """An unmetered request the provider bills all the same (see LLMRequest.step)."""
    return (
        method.upper() in _WRITES
        and endpoint not in _FREE_ENDPOINTS
        and not _FREE_PATH.search(path.rstrip("/"))
    )


# Paths of a Google host that speak another provider's format: Gemini's OpenAI-compatible
# endpoint (AI Studio `/v1beta/openai/…`, Vertex `…/endpoints/openapi/…`) and Claude on Vertex
# (`…/publishers/anthropic/models/…`). A `provider: gemini` action names the host, not the format.
_GEMINI_AS_OPENAI = re.compile(r"/(?:openai|endpoints/openapi)/")
_GEMINI_AS_ANTHROPIC = re.compile(r"/publishers/anthropic/models/")


def wire_format(provider: str, path: str) -> str:
    """The format a request to an action of `provider` speaks, by its path: a gemini action's
    OpenAI-compatible path speaks "openai", its Claude on Vertex path "anthropic"; anything
    else its action's provider. The request is read, its answer parsed (and a denial shaped)
    by it; its price still follows its host (`url_provider`)."""
    provider = provider.lower()
    if provider == "gemini":
        path = path.split("?", 1)[0]
        if _GEMINI_AS_ANTHROPIC.search(path):
            return "anthropic"
        if _GEMINI_AS_OPENAI.search(path):
            return "openai"
    return provider


def _route(provider: str, method: str, path: str) -> tuple[str, str | None, bool, bool]:
    """(endpoint, model or deployment from the path, stream implied by it, metered per token)."""
    found = _provider_route(provider, method, path)
    if found[0] != "other":  # a call's own endpoint: no batch path is one (the hot path)
        return found
    results = batch_results.route(provider, method, path)
    if results is not None:  # a batch's results: the tokens it billed are in the download
        return results[0], None, False, True
    submitted = batch_submit.route(provider, method, path)
    if submitted is not None:  # a batch submitted (held at its estimate), an upload (a step)
        return submitted, None, False, submitted in batch_submit.SUBMISSIONS
    # An OpenAI batch's status read: free, but its answer says where its results are.
    if batch_results.status_route(provider, method, path) is not None:
        return batch_results.OPENAI_BATCH, None, False, False
    return found


def _provider_route(provider: str, method: str, path: str) -> tuple[str, str | None, bool, bool]:
    if provider == "openai":
        endpoint, model = openai.route(method, path)
        # The Images API, speech and transcription are metered only for a model priced (or
        # named like one): see _model_metered.
        metered = endpoint != "other" and not _metered_by_model(endpoint)
        return endpoint, model, False, metered
    if provider == "anthropic":
        endpoint, model, stream = anthropic.route(method, path)
        return endpoint, model, stream, endpoint == "messages"
    if provider == "gemini":
        endpoint, model = gemini.route(method, path)
        metered = endpoint not in ("other", "countTokens") and model is not None
        return endpoint, model, endpoint == "streamGenerateContent", metered
    if provider == "bedrock":
        endpoint, model, stream = bedrock.route(method, path)
        return endpoint, model, stream, bedrock.metered(endpoint, model)
    return "other", None, False, False


def batch_results_download(provider: str, method: str, path: str) -> bool:
    """A download of a batch job's results (batch_results): estimated at $0, charged the
    usage its answers report, once."""
    return batch_results.route(wire_format(provider, path), method, path) is not None


def batch_submission(provider: str, method: str, path: str) -> bool:
    """A batch job submitted (batch_submit): held at its requests' estimate, charging
    nothing itself."""
    return batch_submit.route(wire_format(provider, path), method, path) in batch_submit.SUBMISSIONS


def batch_progress(
    request: LLMRequest, origin: str, answer: bytes, measurement: Measurement | None
) -> BatchProgress | None:
    """What a successful answer tells of the batch job its request concerns — submitted (the
    key its hold is kept under), done (where its results are), ended — else None. `answer`:
    a submission's or a status read's (small); a download's is read by its `measurement`."""
    if request.once_key is not None:
        return (
            batch_results.progress(request.once_key, origin, measurement) if measurement else None
        )
    if request.batch_key is not None:
        return batch_results.openai_status(request.batch_key, origin, answer)
    if request.endpoint in batch_submit.SUBMISSIONS:
        return batch_submit.submitted(request.endpoint, origin, answer)
    if request.batch is not None:  # an OpenAI batch input file, uploaded
        return batch_submit.uploaded(origin, request.batch, answer)
    return None


def batch_file_uploaded(origin: str, batch_file: BatchFile, answer: bytes) -> BatchProgress | None:
    """A Gemini batch input file uploaded whole: its counted requests, under the key of the
    file its final answer names (the ledger keeps them for every proxy)."""
    return batch_submit.uploaded(origin, batch_file, answer)


def batch_input_named(
    provider: str, method: str, path: str, origin: str, body: bytes
) -> tuple[str, str] | None:
    """(file id, the ledger's key for it) of the input file an OpenAI or Gemini batch
    submission names, whose estimate another proxy on the ledger may have remembered; None
    for anything else."""
    submitted = batch_submit.route(wire_format(provider, path), method, path)
    if submitted == batch_submit.OPENAI_SUBMIT:
        file_id = batch_submit.openai_input_file_id(body)
    elif submitted == batch_submit.GEMINI_SUBMIT:
        file_id = batch_submit.gemini_input_file(body)
    else:
        return None
    return None if file_id is None else (file_id, batch_submit.input_key(origin, file_id))


def batch_file_chunk(
    uploads: batch_submit.BatchFileUploads,
    request: LLMRequest,
    origin: str,
    query: Mapping[str, str],
    offset: str | None,
    chunk: bytes,
    upload_status: str | None,
) -> BatchFile | None:
    """A chunk of a Gemini Files API upload the upstream took (its answer's
    `X-Goog-Upload-Status` active or final), read for the batch input file it may be part
    of: the file's counted requests once the last is read, else None. Tokenizes the chunk:
    the proxy runs it off the event loop for a big one."""
    upload_id = batch_submit.gemini_upload_id(query)
    status = (upload_status or "").strip().lower()
    if request.endpoint != batch_submit.GEMINI_UPLOAD or upload_id is None:
        return None
    if status not in ("active", "final"):
        return None
    try:
        start = int(offset) if offset is not None else None
    except ValueError:
        start = None
    return uploads.read(origin, upload_id, start, chunk, status == "final", prompt_counts)


def batch_file_upload(request: LLMRequest) -> bool:
    """A request of a Gemini Files API upload (batch_file_chunk reads its chunk)."""
    return request.endpoint == batch_submit.GEMINI_UPLOAD


def batch_job(request: LLMRequest) -> bool:
    """A request batch_progress may find something in (the proxy reads its answer for it):
    a batch's submission or upload (`batch`), status read or results download."""
    return (
        request.once_key is not None or request.batch_key is not None or request.batch is not None
    )


def polled_until_done(request: LLMRequest) -> bool:
    """A read an agent repeats until a job is done, whose answer then carries the job's
    results (Gemini's batch): repeated, it is no loop, so it is not fingerprinted."""
    return request.endpoint == batch_results.GEMINI_BATCH


def _realtime_handshake(provider: str, method: str, path: str) -> bool:
    """The GET that opens an OpenAI Realtime session (a WebSocket upgrade)."""
    return provider == "openai" and method.upper() == "GET" and openai_realtime.is_realtime(path)


def _metered_by_model(endpoint: str) -> bool:
    """OpenAI endpoints metered or not depending on the model the body names."""
    return (
        openai_images.is_images(endpoint)
        or openai_audio.is_speech(endpoint)
        or openai_transcribe.is_transcription(endpoint)
    )


def _model_metered(endpoint: str, model: str | None) -> bool:
    if openai_audio.is_speech(endpoint):
        return openai_audio.metered(model)
    if openai_transcribe.is_transcription(endpoint):
        return openai_transcribe.metered(model)
    return openai_images.is_images(endpoint) and openai_images.metered(model)


def charging(
    provider: str,
    method: str,
    path: str,
    model: str | None = None,
    query: Mapping[str, str] | None = None,
) -> str:
    """How the proxy charges a request to this provider path: "tokens" (metered), "step" (a
    call billed other than per token: counted, $0) or "free" (uncounted). `drawdown replay`
    asks it of recorded requests; the proxy learns the same from `inspect_request`. `model`
    (the request's, as the ledger records it) decides the OpenAI Images API (GPT image models
    bill per token, DALL·E per image), speech (metered for a speech model genai-prices
    prices, per token or per character) and transcription (per second of audio or per
    token). `query`: a chunk of a Gemini upload (its `upload_id`) is free, the upload having
    counted as a step when it started."""
    provider = wire_format(provider, path)
    if _realtime_handshake(provider, method, path):
        return "step"  # a Realtime session: its responses are metered on the socket
    endpoint, path_model, _, metered = _route(provider, method, path)
    if metered:
        return "tokens"
    if endpoint == batch_submit.GEMINI_UPLOAD and batch_submit.gemini_upload_id(query or {}):
        return "free"
    if provider == "openai" and _model_metered(endpoint, model or path_model):
        return "tokens"
    return "step" if _is_step(method, path, endpoint) else "free"


def _passthrough(
    provider: str, endpoint: str, model: str | None, method: str, path: str
) -> LLMRequest:
    return LLMRequest(
        provider=provider,
        endpoint=endpoint,
        model=model,
        stream=False,
        billable=False,
        input_tokens=0,
        max_output_tokens=0,
        estimate_usd_nanos=0,
        priced=True,
        rewritten_body=None,
        strip_usage_chunk=False,
        step=_is_step(method, path, endpoint),
    )


def _body_model(body: bytes) -> str | None:
    # An uncharged request's model still feeds `model` conditions and the ledger (count_tokens
    # for a model a rule allows must not be refused for having "no model").
    obj = loads(body) if body[:64].lstrip()[:1] == b"{" else None  # not a multipart upload
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) and model.strip() else None


def _form_model(fields: dict[str, Any], deployment: str | None) -> str | None:
    """The model a body's `model` field names, else the Azure deployment in its path."""
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise MeterRequestError(f"model must be a string, not {kind(model)}")
    return model if model and model.strip() else deployment


def _images(
    endpoint: str,
    deployment: str | None,
    method: str,
    path: str,
    body: bytes,
    boundary: str | None = None,
) -> ParsedRequest | LLMRequest:
    """An OpenAI Images API request: metered for a GPT image model, else a $0 step (DALL·E,
    or no model: the API's default is dall-e-2). A body we cannot read is refused (enforce)."""
    fields, input_images = openai_images.read_request(endpoint, body, boundary)
    model = _form_model(fields, deployment)
    if not openai_images.metered(model):
        return _passthrough("openai", endpoint, model, method, path)
    assert model is not None
    return openai_images.parse_request(endpoint, fields, input_images, model)


def _speech(
    deployment: str | None, method: str, path: str, body: bytes
) -> ParsedRequest | LLMRequest:
    """A speech request: metered for a priced speech model, else a $0 step."""
    fields = parse_body(body)
    model = _form_model(fields, deployment)
    if not openai_audio.metered(model):
        return _passthrough("openai", openai_audio.SPEECH, model, method, path)
    assert model is not None
    return openai_audio.parse_request(fields, model)


def _transcription(
    endpoint: str,
    deployment: str | None,
    method: str,
    path: str,
    body: bytes,
    boundary: str | None = None,
) -> ParsedRequest | LLMRequest:
    """A transcription or translation: metered for a speech-to-text model, else a $0 step (as
    is audio the host fetches by URL). A form we cannot read is refused (enforce), as for the
    Images API."""
    form = openai_transcribe.read_request(body, boundary)
    model = openai_transcribe.body_model(form) or deployment  # Azure: the deployment
    if not openai_transcribe.metered(model) or openai_transcribe.by_url(form):
        return _passthrough("openai", endpoint, model, method, path)
    assert model is not None
    return openai_transcribe.parse_request(endpoint, form, model)


def parse(
    provider: str, method: str, path: str, body: bytes, boundary: str | None = None
) -> ParsedRequest | LLMRequest:
    # One routing for the proxy, shadow mode's unread requests and replay (`charging`).
    # `boundary`: a multipart upload's, from its Content-Type (None: read from the body).
    provider = wire_format(provider, path)
    if _realtime_handshake(provider, method, path):
        # A Realtime session's handshake: nothing to estimate, but a step of the run (its
        # budgets and guards decide it); its responses are metered on the socket.
        return replace(
            _passthrough(provider, openai_realtime.REALTIME, None, method, path), step=True
        )
    endpoint, path_model, path_stream, metered = _route(provider, method, path)
    if endpoint in batch_results.ENDPOINTS:  # nothing to estimate: the batch is billed already
        return replace(
            _passthrough(provider, endpoint, None, method, path), billable=True, step=False
        )
    if endpoint in batch_submit.SUBMISSIONS or endpoint == batch_submit.OPENAI_UPLOAD:
        return _passthrough(provider, endpoint, None, method, path)  # see inspect_request
    if provider == "openai" and openai_images.is_images(endpoint):
        return _images(endpoint, path_model, method, path, body, boundary)
    if provider == "openai" and openai_audio.is_speech(endpoint):
        return _speech(path_model, method, path, body)
    if provider == "openai" and openai_transcribe.is_transcription(endpoint):
        return _transcription(endpoint, path_model, method, path, body, boundary)
    if not metered:
        if provider == "openai":  # the body names the model; an Azure deployment stands in
            model = _body_model(body) or path_model
        elif provider == "anthropic":  # Claude on Vertex AI names it in the path
            model = path_model or _body_model(body)
        else:
            model = path_model
        return _passthrough(provider, endpoint, model, method, path)
    if provider == "openai":
        return openai.parse_request(endpoint, parse_body(body), path_model, body)
    if provider == "anthropic":
        return anthropic.parse_request(parse_body(body), path_model, path_stream)
    if provider == "bedrock":
        assert path_model is not None  # a metered Bedrock call names its model in the path
        return bedrock.parse_request(endpoint, path_model, path_stream, parse_body(body))
    assert path_model is not None  # a metered Gemini call names its model in the path
    return gemini.parse_request(endpoint, path_model, parse_body(body))


def unread_request(
    provider: str, method: str, path: str, *, origin: str | None = None
) -> LLMRequest:
    """A request forwarded without being read (shadow mode lets through a body too large or
    malformed to estimate): no estimate, but billable, so the usage its answer reports is
    still metered and charged. Only its path (and `origin`, see inspect_request) is looked at."""
    provider = wire_format(provider, path)
    if _realtime_handshake(provider, method, path):
        parsed = parse(provider, method, path, b"")
        assert isinstance(parsed, LLMRequest)
        return parsed
    endpoint, model, stream, billable = _route(provider, method, path)
    request = _passthrough(provider, endpoint, model, method, path)
    if not billable:
        return request
    matched = url_provider(origin, path) if origin else None
    if endpoint in batch_results.ENDPOINTS:
        return _batch_results_request(provider, method, path, origin, matched)
    return replace(request, billable=True, stream=stream, step=False, price_provider=matched)


def prompt_counts(parsed: ParsedRequest) -> tuple[int, int]:
    """(tiktoken count plus framing, to be scaled by the safety factor; tokens already in the
    provider's units: images, hidden tool prompts)."""
    prompt = parsed.prompt
    raw = count_texts(prompt.texts, parsed.model) + prompt.overhead
    return raw, prompt.exact


def _estimate_parsed(
    provider: str,
    parsed: ParsedRequest,
    priced_as: str | None,
    factor: Decimal,
    config: MeterConfig,
    price_override: PricePerMillion | None,
    matched: str | None,
    batch: bool = False,
) -> tuple[int, int, int, bool, int]:
    """(input tokens, output cap, nano-dollars, priced, input audio tokens) of one request;
    `batch`: at genai-prices' batch price (a request of a batch job)."""
    raw, exact = prompt_counts(parsed)
    input_tokens = math.ceil(raw * factor) + exact
    if parsed.cap is not None:
        cap = parsed.cap
    else:  # each answer asked for may run to the default cap
        cap = config.output_cap(provider, priced_as) * parsed.choices
    usage = TokenUsage(
        input_tokens=input_tokens,
        output_tokens=cap,
        input_image_tokens=min(parsed.input_image_tokens, input_tokens),
        output_image_tokens=min(parsed.output_image_tokens, cap),
        input_audio_tokens=min(parsed.input_audio_tokens, input_tokens),
    )
    context = {**parsed.price_context, **batch_results.BATCH} if batch else parsed.price_context
    extras = dict(parsed.expected_extras)
    for key, n in parsed.reserved_extras.items():
        extras[key] = max(extras.get(key, 0), n)
    nanos, priced = price_usage(
        provider,
        priced_as,
        usage,
        config,
        price_override,
        extras=extras,
        price_context=context,
        matched=matched,
    )
    for tool_model, tool_output in parsed.tool_output_reserves.items():
        # The tool's image model may be handed the whole conversation: its input is reserved
        # as the call's own, the exact (image, file) part of it at the image input price.
        tool_usage = TokenUsage(
            input_tokens=input_tokens,
            input_image_tokens=min(exact, input_tokens),
            output_tokens=tool_output,
            output_image_tokens=tool_output,
        )
        tool_nanos, tool_priced = price_usage(
            provider,
            tool_model,
            tool_usage,
            config,
            price_override,
            price_context=batch_results.BATCH if batch else None,
            matched=matched,
        )
        nanos += tool_nanos
        priced = priced and tool_priced
    return input_tokens, cap, nanos, priced, usage.input_audio_tokens


def _too_much(input_tokens: int, cap: int, nanos: int, seconds: int | None = None) -> None:
    if input_tokens + cap > MAX_AMOUNT or nanos > MAX_AMOUNT:
        # e.g. max_tokens: 1e26: no provider serves it, and the ledger's integers cannot hold it.
        # A transcription's audio read as lasting years is named: its tokens may be 0.
        audio = f" and {seconds} seconds of audio" if seconds else ""
        raise MeterRequestError(
            f"it asks for {input_tokens} input + up to {cap} output tokens{audio} "
            f"(≈${format_usd(nanos, 2)}), past what one call may hold "
            f"(10^18 tokens or ${MAX_USD:,})"
        )


def _batch_submission(
    endpoint: str,
    provider: str,
    method: str,
    path: str,
    body: bytes,
    config: MeterConfig,
    price_override: PricePerMillion | None,
    origin: str | None,
    content_type: str | None,
    batch_inputs: Mapping[str, BatchInput] | None,
    query: Mapping[str, str],
) -> LLMRequest:
    """A batch submitted (held at its requests' estimate, at the batch price), or OpenAI's
    upload of a batch input file (a $0 step that carries the estimate of its lines)."""
    matched = url_provider(origin, path) if origin else None

    def one(parsed: ParsedRequest) -> tuple[int, int, int, bool]:
        factor = config.safety_factor(provider, parsed.model)
        found = _estimate_parsed(
            provider, parsed, parsed.model, factor, config, price_override, matched, batch=True
        )
        return found[:4]

    if endpoint == batch_submit.OPENAI_UPLOAD:
        upload = _passthrough(provider, endpoint, None, method, path)
        try:
            lines = batch_submit.openai_input_file(body, boundary_of(content_type))
        except MeterRequestError:  # two boundaries: not read, passed on as before
            return upload
        return upload if lines is None else replace(upload, batch=batch_submit.estimate(lines, one))
    if endpoint == batch_submit.GEMINI_UPLOAD:  # its chunks are read as the upstream takes them
        upload = _passthrough(provider, endpoint, None, method, path)
        # One upload is one step, counted when it starts: its chunks (each a request of its
        # own, 8 MiB apiece from google-genai) are free.
        return replace(upload, step=False) if batch_submit.gemini_upload_id(query) else upload
    if endpoint == batch_submit.ANTHROPIC_SUBMIT:
        batch = batch_submit.estimate(batch_submit.anthropic_requests(body), one)
    elif endpoint == batch_submit.GEMINI_SUBMIT:
        requests = batch_submit.gemini_requests(path, body)
        file_name = None if requests else batch_submit.gemini_input_file(body)
        counted = batch_inputs.get(file_name) if batch_inputs and file_name else None
        if isinstance(counted, BatchFile):  # a file this proxy (or the ledger) saw uploaded
            model = batch_submit.gemini_model(path)
            batch = batch_submit.estimate_file(model, counted, one)
        else:
            batch = batch_submit.estimate(requests, one)
    else:  # OpenAI's batch: the estimate of the input file it names, if this proxy saw it
        file_id = batch_submit.openai_input_file_id(body)
        known = batch_inputs.get(file_id) if batch_inputs and file_id else None
        batch = known if isinstance(known, BatchEstimate) else BatchEstimate(0, 0, 0, True, None, 0)
    _too_much(batch.input_tokens, batch.max_output_tokens, batch.usd_nanos)
    return replace(
        _passthrough(provider, endpoint, batch.model, method, path),
        billable=True,
        step=False,
        input_tokens=batch.input_tokens,
        max_output_tokens=batch.max_output_tokens,
        estimate_usd_nanos=batch.usd_nanos,
        priced=batch.priced,
        price_provider=matched,
        batch=batch,
    )


def inspect_request(
    provider: str,
    method: str,
    path: str,
    query: Mapping[str, str],
    body: bytes,
    config: MeterConfig,
    price_override: PricePerMillion | None = None,
    *,
    inject_include_usage: bool = True,
    origin: str | None = None,
    content_type: str | None = None,
    served: Mapping[str, str] | None = None,
    batch_inputs: Mapping[str, BatchInput] | None = None,
) -> LLMRequest:
    """Classify an LLM API request and estimate its cost before it is forwarded.

    Raises MeterRequestError for a malformed request to a billable endpoint. Thread-safe:
    the proxy may run it in a worker thread for big bodies (tiktoken releases the GIL).
    `inject_include_usage=False` leaves a streamed OpenAI chat request as sent (for an
    OpenAI-compatible host that rejects stream_options); its stream is then "counted".
    `origin` (prices.origin: scheme://host[:port]) is the upstream's: a host genai-prices
    knows (api.groq.com, openrouter.ai, Azure) is priced at its own models' prices.
    `content_type`: the request's header, whose boundary a multipart upload must use (the
    ledger keeps none: replay reads the boundary from the body). `served`: the models this
    upstream's names turned out to serve (ServedModels.of): a name there is estimated as the
    model it serves. `batch_inputs`: the batch input files this upstream was sent
    (BatchInputs.of), for the OpenAI batch that names one.
    `provider`: the action's; the request is read in the format its path speaks (wire_format).
    """
    path = path.split("?", 1)[0]
    provider = wire_format(provider, path)
    # Before the body is read as a call's: an upload's form is read leniently (see
    # _batch_submission), a batch's body as a batch.
    submitted = batch_submit.route(provider, method, path)
    if submitted is not None:
        return _batch_submission(
            submitted, provider, method, path, body, config, price_override, origin,
            content_type, batch_inputs, query,
        )  # fmt: skip
    parsed = parse(provider, method, path, body, boundary_of(content_type))
    if isinstance(parsed, LLMRequest):
        if parsed.endpoint in batch_results.ENDPOINTS:
            matched = url_provider(origin, path) if origin else None
            return _batch_results_request(provider, method, path, origin, matched)
        if parsed.endpoint == batch_results.OPENAI_BATCH and origin:
            batch_id = batch_results.status_route(provider, method, path)
            assert batch_id is not None
            key = batch_results.once_key(origin, batch_results.OPENAI_BATCH, batch_id)
            return replace(parsed, batch_key=key)
        return parsed
    if not inject_include_usage or provider == "bedrock":
        # Bedrock: the body is SigV4-signed, so it is never rewritten (nor a stream's bytes).
        parsed.rewritten_body, parsed.strip_usage_chunk = None, False
    model = parsed.model
    served_as = served.get(model) if served and model else None
    priced_as = served_as or model
    factor = config.safety_factor(provider, priced_as)
    matched = url_provider(origin, path) if origin else None
    input_tokens, cap, nanos, priced, input_audio = _estimate_parsed(
        provider, parsed, priced_as, factor, config, price_override, matched
    )
    _too_much(input_tokens, cap, nanos, parsed.expected_extras.get("audio_seconds"))
    return LLMRequest(
        provider=provider,
        endpoint=parsed.endpoint,
        model=model,
        stream=parsed.stream,
        billable=True,
        input_tokens=input_tokens,
        max_output_tokens=cap,
        own_output_cap=parsed.cap,
        estimate_usd_nanos=nanos,
        priced=priced,
        rewritten_body=parsed.rewritten_body,
        strip_usage_chunk=parsed.strip_usage_chunk,
        safety_factor=factor,
        expected_extras=MappingProxyType(dict(parsed.expected_extras)),
        price_provider=matched,
        # Only the image_generation tool reserves on another model (see ParsedRequest).
        image_tool_model=next(iter(parsed.tool_output_reserves), None),
        input_audio_tokens=input_audio,
        served_as=served_as,
        price_context=MappingProxyType(dict(parsed.price_context)),
    )


def _batch_results_request(
    provider: str, method: str, path: str, origin: str | None, matched: str | None
) -> LLMRequest:
    """A download of a batch's results, its charge keyed by the upstream and the id."""
    found = batch_results.route(provider, method, path)
    assert found is not None
    endpoint, resource = found
    return replace(
        _passthrough(provider, endpoint, None, method, path),
        billable=True,
        step=False,
        price_provider=matched,
        # None where the upstream is not known (replay reads what was charged live).
        once_key=batch_results.once_key(origin, endpoint, resource) if origin else None,
    )


class ServedModels:
    """What the names an upstream is called by turn out to serve, by the model its answers name:
    an Azure deployment (`prod-chat` → gpt-4o-mini-2024-07-18), a gateway's alias. Learned for a
    name genai-prices does not price, so that its next calls are estimated at the served
    model's price rather than the fallback's, which reserved ~100× too much on every call to a
    deployment named otherwise than its model (the cost is measured at the answer's model
    either way). Per proxy process, from its start; bounded, so a flood of names cannot grow
    it (past LIMIT it starts again)."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._by_origin: dict[str, dict[str, str]] = {}
        self._count = 0

    def of(self, origin: str) -> Mapping[str, str] | None:
        """The names `origin` (scheme://host[:port]) is known to serve other models by."""
        return self._by_origin.get(origin)

    def learn(
        self, request: LLMRequest, answered: Measurement, scheme: str, host: str, port: int
    ) -> None:
        """After a call to scheme://host:port: the model its answer names, when genai-prices
        priced that and not the name the request used (or the answer names another model than
        the last one did)."""
        if request.priced and request.served_as is None:  # the name is priced as it is
            return
        name, served = request.model, answered.model
        if not name or not served or served == name or not answered.priced:
            return
        origin = upstream_origin(scheme, host, port)
        known = self._by_origin.get(origin, {})
        if known.get(name) == served:
            return
        if name not in known:
            if self._count >= self.LIMIT:
                self._by_origin, self._count = {}, 0
            self._count += 1
        self._by_origin.setdefault(origin, {})[name] = served


# --- after the call ---------------------------------------------------------------------


def _counted_output(request: LLMRequest, texts: list[str], config: MeterConfig) -> int:
    tokens = count_tokens("".join(texts), request.model)
    if model_family(request.provider, request.model) is not None:
        tokens = math.ceil(tokens * config.safety_factor(request.provider, request.model))
    if request.own_output_cap is not None:  # the provider stops there, and bills no more
        tokens = min(tokens, request.own_output_cap)
    return tokens


def _zero(request: LLMRequest, model: str | None = None) -> Measurement:
    return Measurement(
        usage=TokenUsage(),
        usd_nanos=0,
        source="usage",
        priced=True,
        model=model or request.model,
        extras=_NO_EXTRAS,
    )


def _estimate(request: LLMRequest) -> Measurement:
    return Measurement(
        usage=TokenUsage(
            input_tokens=request.input_tokens,
            output_tokens=request.max_output_tokens,
            input_audio_tokens=request.input_audio_tokens,
        ),
        usd_nanos=request.estimate_usd_nanos,
        source="estimate",
        priced=request.priced,
        model=request.model,
        extras=MappingProxyType(dict(request.expected_extras)),
    )


def _measurement(
    request: LLMRequest,
    ex: Extracted,
    status: int,
    config: MeterConfig,
    price_override: PricePerMillion | None,
    cut_short: bool = False,
) -> Measurement:
    if not request.billable:
        return _zero(request, ex.model)
    ok = 200 <= status < 300
    if ex.usage is not None:
        usage, source = ex.usage, "usage"
    elif not ok:
        # Providers do not bill a request they refused or failed (4xx/5xx without usage).
        return _zero(request, ex.model)
    elif openai_images.is_images(request.endpoint) or openai_audio.is_speech(request.endpoint):
        # An image or speech answered (or cut short) without usage: its image or audio tokens
        # cannot be counted from the bytes (tts-1's estimate is exact: its characters).
        return _estimate(request)
    elif openai_transcribe.is_transcription(request.endpoint) and (
        request.expected_extras or not (ex.seen or cut_short)
    ):
        # A text/srt/vtt answer reports no usage. Billed per second: the seconds read from
        # the file (the estimate). Billed per token: the input estimate, the text counted.
        return _estimate(request)
    elif ex.early_usage is not None:
        # Input side reported (Anthropic message_start), output cut short: count it.
        out = max(ex.early_usage.output_tokens, _counted_output(request, ex.texts, config))
        usage = TokenUsage(**{**ex.early_usage.__dict__, "output_tokens": out})
        source = "counted"
    elif ex.seen or cut_short:
        # No usage: the prompt estimate plus the text returned (or streamed before the cut).
        usage = TokenUsage(
            input_tokens=request.input_tokens,
            output_tokens=_counted_output(request, ex.texts, config),
            input_audio_tokens=request.input_audio_tokens,  # a transcription's upload
        )
        source = "counted"
    else:
        return _estimate(request)
    extras = dict(ex.extras)
    if source != "usage":
        for key, n in request.expected_extras.items():
            extras.setdefault(key, n)
    elif request.expected_extras and not extras:
        extras.update(request.expected_extras)
    total, priced = price_answer(
        request.provider,
        (ex.model, request.model),
        usage,
        config,
        price_override,
        extras=extras,
        price_context={**request.price_context, **ex.price_context},
        other_models=ex.other_models,
        matched=request.price_provider,
    )
    return Measurement(
        usage=usage,
        usd_nanos=to_nanos(total),
        source=source,
        priced=priced,
        model=ex.model or request.model,
        extras=MappingProxyType(extras),
        other_models=MappingProxyType(dict(ex.other_models)),
    )


def _per_second(request: LLMRequest) -> bool:
    """A transcription reserved in seconds of audio (its model bills them), not in tokens."""
    return "audio_seconds" in request.expected_extras


def _extract_json(
    request: LLMRequest,
    obj: object,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
) -> Extracted:
    if request.provider == "openai":
        if openai_transcribe.is_transcription(request.endpoint):
            # text, srt and vtt are not JSON
            return openai_transcribe.extract(obj, body, _per_second(request))
        if openai_images.is_images(request.endpoint):
            return openai_images.extract_json(obj)
        return openai.extract_json(request.endpoint, obj, request.image_tool_model)
    if request.provider == "anthropic":
        return anthropic.extract_json(obj)
    if request.provider == "gemini":
        return gemini.extract_json(obj, request.model)
    if request.provider == "bedrock":
        return bedrock.extract_json(request.endpoint, obj, headers)
    return Extracted()


def _looks_like_sse(body: bytes) -> bool:
    head = body[:64].lstrip()
    return head.startswith((b"data:", b"event:", b":", b"id:"))


def measure_body(
    request: LLMRequest,
    status: int,
    body: bytes,
    config: MeterConfig,
    price_override: PricePerMillion | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> Measurement:
    """Meter a complete (content-decoded) response body.

    2xx with usage -> source "usage"; 2xx without usage -> the returned text counted,
    source "counted"; unreadable 2xx body -> the request's estimate, source "estimate";
    non-2xx without usage -> zero cost (providers do not bill refused or failed calls).
    `headers`: the response's, where a provider reports usage in them (Bedrock's InvokeModel).
    """
    if not request.billable:
        return _zero(request)
    if request.endpoint in batch_results.ENDPOINTS:  # JSON lines, one answer each
        return batch_results.measure(request, status, body, config, price_override)
    if request.endpoint in batch_submit.SUBMISSIONS:  # charged when its results are read
        return _zero(request)
    obj = loads(body) if body else None
    if obj is None and body and (_looks_like_sse(body) or _is_bedrock_stream(request)):
        # A streamed response the proxy buffered after all.
        ctype = bedrock.EVENTSTREAM_TYPE if _is_bedrock_stream(request) else "text/event-stream"
        meter = StreamMeter(request, ctype, None, config, price_override, status)
        meter.feed(body)
        return meter.finish()[1]
    extracted = _extract_json(request, obj, headers, body)
    return _measurement(request, extracted, status, config, price_override)


class _StreamState(Protocol):
    def on_event(self, event: str | None, data: bytes) -> bool: ...
    def result(self) -> Extracted: ...


def _is_bedrock_stream(request: LLMRequest) -> bool:
    return request.provider == "bedrock" and request.stream


def _stream_state(request: LLMRequest) -> _StreamState:
    if request.provider == "anthropic":
        return anthropic.MessagesStream()
    if request.provider == "bedrock":
        return bedrock.InvokeStream() if request.endpoint == "invoke" else bedrock.ConverseStream()
    if request.provider == "gemini":
        return gemini.GenerateStream(request.model)
    if request.endpoint == "responses":
        return openai.ResponsesStream(request.image_tool_model)
    if openai_images.is_images(request.endpoint):
        return openai_images.ImagesStream()
    if openai_audio.is_speech(request.endpoint):
        return openai_audio.SpeechStream()
    if openai_transcribe.is_transcription(request.endpoint):
        return openai_transcribe.TranscriptionStream(_per_second(request))
    return openai.ChatStream(request.strip_usage_chunk)


class StreamMeter:
    """Meters a streamed response chunk by chunk, passing the bytes on as they arrive.

    `rewrites` is True only when we must remove the usage chunk we asked OpenAI for; then
    the bytes returned are the decoded stream minus that one event, and the proxy must drop
    Content-Encoding / Content-Length. Otherwise feed() returns its argument unchanged.
    feed(), finish() and partial() never raise.
    """

    def __init__(
        self,
        request: LLMRequest,
        content_type: str,
        content_encoding: str | None,
        config: MeterConfig,
        price_override: PricePerMillion | None = None,
        status: int = 200,
    ) -> None:
        self.request = request
        self._config = config
        self._override = price_override
        self._status = status
        self._broken = False  # undecodable: stop parsing, keep forwarding
        self._result: tuple[bytes, Measurement] | None = None
        self._decoder: Decoder | None = None
        try:
            self._decoder = make_decoder(content_encoding)
        except UnsupportedEncoding:
            self._broken = True
        self._sse = "event-stream" in (content_type or "").lower()
        self._state = _stream_state(request) if request.billable else None
        self.rewrites = bool(
            self._sse and request.strip_usage_chunk and self._state is not None and not self._broken
        )
        self._parser: SSEParser | None = None
        self._frames: bedrock.EventStreamReader | None = None
        self._body: bytearray | None = None
        if self._state is not None and not self._broken:
            if self._sse:
                self._parser = SSEParser(self._state.on_event, keep_raw=self.rewrites)
            elif bedrock.EVENTSTREAM_TYPE in (content_type or "").lower():
                self._frames = bedrock.EventStreamReader(self._state.on_event)
            elif not openai_audio.is_speech(request.endpoint):
                self._body = bytearray()  # raw speech audio holds no usage: not kept

    def feed(self, chunk: bytes) -> bytes:
        if self._broken:
            # Rewriting, the client was promised decoded bytes; undecodable ones are useless.
            return b"" if self.rewrites and self._decoder is not None else chunk
        if self._result is not None or (
            self._parser is None and self._frames is None and self._body is None
        ):
            return chunk
        try:
            data = self._decoder.decode(chunk) if self._decoder is not None else chunk
        except Exception:
            self._broken = True
            return b"" if self.rewrites and self._decoder is not None else chunk
        try:
            if self._parser is not None:
                out = self._parser.feed(data)
                return out if self.rewrites else chunk
            if self._frames is not None:
                self._frames.feed(data)  # a bad CRC raises: parsing stops, bytes flow on
                return chunk
            if self._body is not None:
                if len(self._body) + len(data) <= MAX_BUFFERED_BODY:
                    self._body += data
                else:
                    self._broken = True
        except Exception:
            self._broken = True
            return data if self.rewrites else chunk
        return chunk

    def finish(self) -> tuple[bytes, Measurement]:
        """End of stream: (bytes still to forward, the measurement)."""
        if self._result is not None:
            return b"", self._result[1]
        out = b""
        try:
            if not self._broken:
                tail = self._decoder.flush() if self._decoder is not None else b""
                if self._parser is not None:
                    out = (self._parser.feed(tail) if tail else b"") + self._parser.finish()
                elif self._frames is not None:
                    if tail:
                        self._frames.feed(tail)
                elif self._body is not None:
                    self._body += tail
        except Exception:
            self._broken = True
        if not self.rewrites:
            out = b""
        self._result = (out, self._measure(cut_short=False))
        return self._result

    def partial(self) -> Measurement:
        """The stream was cut short (client abort, upstream reset): the provider's usage if
        already seen, else the prompt estimate plus the text streamed so far, "counted"."""
        if self._result is not None:
            return self._result[1]
        return self._measure(cut_short=not self._broken)

    def _measure(self, cut_short: bool) -> Measurement:
        try:
            if self.request.endpoint in batch_submit.SUBMISSIONS:
                return _zero(self.request)  # charged when its results are read
            if self.request.endpoint in batch_results.ENDPOINTS:  # a batch's results, whole
                if self._body is None or self._broken or cut_short:
                    return _estimate(self.request)  # $0: cut lines are not charged
                return batch_results.measure(
                    self.request, self._status, bytes(self._body), self._config, self._override
                )
            return _measurement(
                self.request,
                self._extracted(),
                self._status,
                self._config,
                self._override,
                cut_short,
            )
        except Exception:
            return _estimate(self.request)

    def _extracted(self) -> Extracted:
        if self._state is None:
            return Extracted()
        if self._body is not None:
            body = bytes(self._body)
            obj = loads(body) if body and not self._broken else None
            if obj is None and _looks_like_sse(body):
                state = _stream_state(self.request)  # fresh: partial() may run more than once
                parser = SSEParser(state.on_event)
                parser.feed(body)
                parser.finish()
                return state.result()
            return _extract_json(self.request, obj, body=body)
        return self._state.result()


def open_stream_meter(
    request: LLMRequest,
    content_type: str,
    content_encoding: str | None,
    config: MeterConfig,
    price_override: PricePerMillion | None = None,
    *,
    status: int = 200,
) -> StreamMeter:
    """A StreamMeter for one streamed response (any content type; SSE is parsed as it comes,
    anything else is collected for parsing at the end)."""
    return StreamMeter(request, content_type, content_encoding, config, price_override, status)
