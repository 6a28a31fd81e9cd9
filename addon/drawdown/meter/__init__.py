"""Metering of LLM API calls: estimate before forwarding, measure the actual usage after.

Pure Python (no mitmproxy, no network). The proxy uses only this facade:

* inspect_request(...) -> LLMRequest        before forwarding (may raise MeterRequestError)
* measure_body(...) -> Measurement          a complete response body
* open_stream_meter(...) -> StreamMeter     a streamed response: feed() / finish() / partial()
* charging(provider, method, path, model)   "tokens", "step" or "free" (replay asks it)
* wire_format(provider, path)              the format a request speaks: a gemini action's
                                           OpenAI-compatible and Claude on Vertex paths are
                                           read (and denied) as openai and anthropic
* batch_submission(provider, method, path) a batch submitted: held at its estimate, $0 itself
* polled_until_done(request)                a read repeated until a job is done (Gemini's
                                           batch): not fingerprinted, polling is no loop
* batch_results_download(provider, method, path)  a batch's results: estimated at $0,
                                           charged their answers' usage once (Completion.once)
* batch_job(request), batch_progress(...)   what an answer tells of a batch job: submitted
                                           (its hold kept), done, ended (Completion.batch)
* price_usage(...), count_tokens(...), encoding_for(...)
* origin(scheme, host, port)               the upstream, for inspect_request's `origin=`: a
                                           host genai-prices knows is priced at its prices
* price_providers(provider, matched)       the genai-prices providers a call is priced with
* ServedModels                             what an upstream's names (an Azure deployment)
                                           turn out to serve, for inspect_request's `served=`
* BatchInputs                              the OpenAI batch input files a proxy saw uploaded
                                           (their estimates), for `batch_inputs=`
* batch_input_named(...), batch_estimate_json(...), batch_estimate_from_json(...)
                                           an input file's estimate, kept in the ledger for
                                           every proxy (one uploaded through another worker)
* BatchFileUploads, batch_file_upload(request), batch_file_chunk(...), batch_file_uploaded(...)
                                           a Gemini batch input file, read chunk by chunk as
                                           the upstream takes it: its requests counted

Wiring a streamed response into mitmproxy (responseheaders hook)::

    meter = open_stream_meter(req, content_type, content_encoding, config, override,
                              status=flow.response.status_code)
    if meter.rewrites:  # decoded bytes, minus the usage chunk we asked for
        flow.response.headers.pop("content-encoding", None)
        flow.response.headers.pop("content-length", None)

    def stream(chunk: bytes) -> bytes | list[bytes]:
        if not chunk:  # mitmproxy calls with b"" at the end of the stream
            rest, measurement = meter.finish()
            ...  # commit measurement
            return rest
        out = meter.feed(chunk)
        return out or []  # never b"" mid-stream: HTTP/1.1 would send the last-chunk marker

    flow.response.stream = stream

and, when the flow dies before the end (error hook), commit `meter.partial()`.
"""

from .api import (
    ServedModels,
    StreamMeter,
    batch_file_chunk,
    batch_file_upload,
    batch_file_uploaded,
    batch_input_named,
    batch_job,
    batch_progress,
    batch_results_download,
    batch_submission,
    charging,
    inspect_request,
    measure_body,
    open_stream_meter,
    polled_until_done,
    unread_request,
    wire_format,
)
from .batch_submit import BatchFileUploads, BatchInputs, uploaded_file_id
from .batch_submit import estimate_from_json as batch_estimate_from_json
from .batch_submit import estimate_to_json as batch_estimate_json
from .config import DEFAULT_FALLBACK_PRICE, DEFAULT_SAFETY_FACTORS, MeterConfig, PricePerMillion
from .prices import origin, price_providers, price_usage
from .tokens import count_tokens, encoding_for
from .types import BatchFile, BatchProgress, LLMRequest, Measurement, MeterRequestError, TokenUsage


def warm_up(*, bedrock: bool = False) -> None:
    """Load the tiktoken encodings and genai-prices' price data now (hundreds of ms), so the
    first request does not pay for them on the proxy's event loop; with `bedrock`, botocore's
    event-stream parser too (its first stream would import it there)."""
    from .prices import url_provider
    from .tokens import encoding_name_for

    for model in ("gpt-4o", "gpt-4"):
        count_tokens("warm up", model)
        encoding_name_for(model)
    price_usage("openai", "gpt-4o-mini", TokenUsage(input_tokens=1, output_tokens=1), MeterConfig())
    url_provider(origin("https", "localhost", 443), "/")  # matches none: compiles every pattern
    if bedrock:
        import botocore.eventstream  # noqa: F401


__all__ = [
    "DEFAULT_FALLBACK_PRICE",
    "DEFAULT_SAFETY_FACTORS",
    "BatchFile",
    "BatchFileUploads",
    "BatchInputs",
    "BatchProgress",
    "LLMRequest",
    "Measurement",
    "MeterConfig",
    "MeterRequestError",
    "PricePerMillion",
    "ServedModels",
    "StreamMeter",
    "TokenUsage",
    "batch_estimate_from_json",
    "batch_estimate_json",
    "batch_file_chunk",
    "batch_file_upload",
    "batch_file_uploaded",
    "batch_input_named",
    "batch_job",
    "batch_progress",
    "batch_results_download",
    "batch_submission",
    "charging",
    "count_tokens",
    "encoding_for",
    "inspect_request",
    "measure_body",
    "open_stream_meter",
    "origin",
    "polled_until_done",
    "price_providers",
    "price_usage",
    "unread_request",
    "uploaded_file_id",
    "warm_up",
    "wire_format",
]
