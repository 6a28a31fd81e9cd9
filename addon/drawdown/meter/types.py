"""Value types shared by the metering modules and their callers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from types import MappingProxyType

_EMPTY: Mapping[str, int] = MappingProxyType({})
_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class TokenUsage:
    """Token counts normalised across providers (all integers).

    The subset fields are *included* in their parent, as genai-prices expects:
    cache reads/writes and input audio and images are part of `input_tokens`; reasoning and
    output audio and images are part of `output_tokens`; `cache_write_1h_tokens` is part of
    `cache_write_tokens`; `cache_audio_read_tokens` (`cache_image_read_tokens`) is part of
    both `cache_read_tokens` and `input_audio_tokens` (`input_image_tokens`).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    input_audio_tokens: int = 0
    cache_audio_read_tokens: int = 0
    output_audio_tokens: int = 0
    input_image_tokens: int = 0
    cache_image_read_tokens: int = 0
    output_image_tokens: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        if not isinstance(other, TokenUsage):
            return NotImplemented
        return TokenUsage(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class MeterRequestError(ValueError):
    """A malformed LLM request. The message is plain words meant for the agent."""


@dataclass(frozen=True)
class BatchEstimate:
    """What a batch job's requests may cost, at the batch price (batch_submit)."""

    input_tokens: int
    max_output_tokens: int
    usd_nanos: int
    priced: bool  # every request's model priced by genai-prices (or the action's price)
    model: str | None  # the model most of its requests name
    requests: int


# A request of a batch input file counted before the model it will run on is known: (prompt
# tokens in tiktoken units, to be scaled by that model's safety factor; tokens already in the
# provider's units; its own output cap, None for the model's default).
CountedRequest = tuple[int, int, int | None]


@dataclass(frozen=True)
class BatchFile:
    """A Gemini batch input file, counted as it was uploaded: its lines name no model (the
    batch that names the file does), so they are priced when the batch is submitted.
    `groups`: each kind of request counted, and how many of the file's requests are of it
    (past BatchFileUploads.MAX_GROUPS kinds, prompts are rounded up to fewer kinds).
    `complete`: False when a chunk of it went by unseen (through another proxy, or before
    this one started), so lines are missing and the estimate is a floor."""

    groups: tuple[tuple[CountedRequest, int], ...]
    complete: bool = True

    @property
    def requests(self) -> int:
        return sum(n for _, n in self.groups)


# What a batch input file is known by: an OpenAI file's estimate (its lines name their
# models) or a Gemini file's counted requests.
BatchInput = BatchEstimate | BatchFile


@dataclass(frozen=True)
class LLMRequest:
    provider: str  # "openai" | "anthropic" | "gemini"
    # "chat.completions" | "responses" | "completions" | "embeddings" | "messages" |
    # "messages.count_tokens" | "generateContent" | "streamGenerateContent" | "countTokens" |
    # "images.generations" | "images.edits" | "other"
    endpoint: str
    model: str | None
    stream: bool
    billable: bool  # False: no tokens to meter
    input_tokens: int  # estimate, after the safety factor
    max_output_tokens: int  # the request's own cap (times n), else the configured default
    estimate_usd_nanos: int  # integer nano-dollars, rounded up
    priced: bool  # False: model unknown to genai-prices, fallback_price used
    rewritten_body: bytes | None  # forward this instead of the original body, when set
    strip_usage_chunk: bool  # we injected include_usage: drop the usage-only chunk
    # Additions beyond the facade:
    safety_factor: Decimal = Decimal(1)  # the multiplier applied to the tiktoken count
    # Web searches etc. the request may trigger that are billed outside tokens, when known
    # before the call (e.g. OpenAI *-search-preview chat models search on every call).
    expected_extras: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    # Not billable, yet a call the agent makes that the provider bills some other way (an
    # image, speech, a file, a batch, a fine-tune): a step of the run, counted on `requests`
    # budgets and by the guards. False for what costs nothing: token counting, moderation,
    # listings and retrievals.
    step: bool = False
    # The genai-prices provider whose api_pattern matched the upstream URL (api.groq.com ->
    # "groq"), priced with before the family's; None when no pattern matched.
    price_provider: str | None = None
    # The Responses API's image_generation tool: the image model it names (else its default),
    # which bills the tool's tokens when the answer does not echo its tools.
    image_tool_model: str | None = None
    # The output cap the request set itself (times n), None without one: no answer runs past
    # it, so its text counted (tiktoken's count times the safety factor) is charged no more.
    own_output_cap: int | None = None
    # Of input_tokens, those reserved as input audio (a transcription's upload), priced apart.
    input_audio_tokens: int = 0
    # The model this request's name was estimated as, having turned out to serve it (an Azure
    # deployment's answers name their model; see ServedModels); None: estimated as named.
    served_as: str | None = None
    # A batch's results download (batch_results): the key its charge is made under, at most
    # once in the ledger however often the results are read; None for every other call.
    once_key: str | None = None
    # A batch job submitted (its requests' estimate, at the batch price), or an OpenAI batch
    # input file uploaded (the estimate the batch naming it is held at): batch_submit.
    batch: BatchEstimate | None = None
    # An OpenAI batch's status read: the key of the batch it reads (batch_results.progress).
    batch_key: str | None = None
    # The price variants the request asked for (service tier, speed): the answer's own say
    # wins, but one that says nothing is charged as asked.
    price_context: Mapping[str, str] = field(default_factory=lambda: _NO_CONTEXT)


@dataclass(frozen=True)
class Measurement:
    usage: TokenUsage
    usd_nanos: int  # integer nano-dollars, rounded up
    # "usage": provider reported; "counted": we counted returned text with tiktoken;
    # "estimate": nothing to go on, the request's estimate
    source: str
    priced: bool
    model: str | None  # model as billed (the response's model when present)
    # Built-in tools billed outside usage, e.g. {"web_search_calls": 2}
    extras: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    # Additions beyond the facade:
    # Usage billed on *other* models inside the same call (Anthropic advisor iterations),
    # already included in usd_nanos; keyed by model name.
    other_models: Mapping[str, TokenUsage] = field(default_factory=lambda: MappingProxyType({}))
    # A batch's results (batch_results): how many of its answers reported usage; whether the
    # batch is done (its results read here, or none to read); the file they are in instead
    # (a Gemini batch whose output is a file, read later).
    answered: int = 0
    batch_done: bool = False
    results_file: str | None = None


@dataclass(frozen=True)
class BatchProgress:
    """What an answer tells of a batch job, for the hold kept until it ends (the ledger's
    BatchHold): submitted, its results will be charged under `key`, the job running for at
    most `window` seconds; done, its results to be read under `results_key` instead; or
    `ended` (its results read, or none to read). Or an input file uploaded, whose batch is
    to come (`input_estimate`)."""

    key: str
    window: float | None = None
    results_key: str | None = None
    ended: bool = False
    # A batch input file uploaded: what the batch naming it may cost (OpenAI's), or its
    # requests counted (Gemini's), under `key`.
    input_estimate: BatchInput | None = None
