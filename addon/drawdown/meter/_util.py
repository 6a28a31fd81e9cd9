"""Small helpers shared by the provider modules."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .types import MeterRequestError, TokenUsage


def count(value: Any) -> int | None:
    """A usage count as the provider billed it, or None when it cannot be read (null, bool,
    negative, NaN/Infinity, other text): the caller then uses its next source, never 0. A
    fractional count (12.5) is rounded up: providers bill whole tokens, and we never
    under-charge. Digits ("1000") read as the number they write."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        return math.ceil(value)
    if isinstance(value, str) and 0 < len(value) <= 19 and value.isascii() and value.isdigit():
        return int(value)
    return None


class Counts:
    """Reads the counts of one usage object: a missing (null) one is 0, as ever; one present
    but unreadable sets `unreadable`, and the caller drops the whole object (its other counts
    alone would charge that one's tokens as 0), as bedrock.header_usage does."""

    def __init__(self) -> None:
        self.unreadable = False

    def __call__(self, value: Any) -> int:
        n = count(value)
        if n is None:
            self.unreadable = self.unreadable or value is not None
            return 0
        return n


def overlay(
    earlier: dict[str, Any] | None, later: dict[str, Any], keys: tuple[str, ...]
) -> dict[str, Any]:
    """A stream's later (cumulative) usage object, each of its `keys` that cannot be read
    taken from `earlier`: a garbage value never replaces a good one."""
    if not earlier:
        return later
    kept = {
        k: earlier[k]
        for k in keys
        if later.get(k) is not None and count(later[k]) is None and k in earlier
    }
    return {**later, **kept} if kept else later


def items(value: Any) -> list[Any]:
    """`value` if it is a JSON array, else an empty list (never iterate a surprise type)."""
    return value if isinstance(value, list) else []


def dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def route_by_suffix(path: str, endpoints: dict[str, str]) -> str | None:
    """The endpoint whose path suffix `path` ends with (a trailing slash ignored), else None:
    the same API under any prefix (`/v1`, Azure's deployments, a compatible host's `/openai/v1`)."""
    p = path.rstrip("/")
    for suffix, endpoint in endpoints.items():
        if p.endswith(suffix):
            return endpoint
    return None


def loads(data: bytes | str) -> Any:
    """Parse JSON; None on any error (responses are metered best-effort, never raised on)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def compact(obj: Any) -> str:
    """A JSON rendering of a structure for the tokenizer (tool schemas, arguments...)."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return ""


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or MeterRequestError in plain words."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MeterRequestError(
            f"request body is not valid UTF-8 (bad byte at offset {exc.start})"
        ) from None
    if not text.strip():
        raise MeterRequestError("request body is empty; expected a JSON object")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MeterRequestError(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise MeterRequestError("request body is nested too deeply") from None
    except ValueError:  # valid JSON Python will not read: an integer past its digit limit
        raise MeterRequestError(
            f"request body holds a number longer than {sys.get_int_max_str_digits()} digits"
        ) from None
    if not isinstance(obj, dict):
        raise MeterRequestError(f"request body must be a JSON object, not {kind(obj)}")
    return obj


def kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def opt_int(obj: dict[str, Any], key: str, where: str = "") -> int | None:
    """An optional non-negative integer field; MeterRequestError when it has another type."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        if isinstance(value, float) and value.is_integer() and value >= 0:
            # As written: 1e26 is 10**26, not the binary float's 100000000000000004764729344.
            return int(Decimal(repr(value)))
        # A negative or fractional number is named by its value: "not a number" would puzzle.
        shown = (
            repr(value)
            if isinstance(value, int | float) and not isinstance(value, bool)
            else kind(value)
        )
        raise MeterRequestError(f"{where}{key} must be a non-negative integer, not {shown}")
    return value


def opt_bool(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MeterRequestError(f"{key} must be true or false, not {kind(value)}")
    return value


def req_list(obj: dict[str, Any], key: str, where: str = "") -> list[Any]:
    value = obj.get(key)
    if value is None:
        raise MeterRequestError(f"{where}{key} is missing; expected an array")
    if not isinstance(value, list):
        raise MeterRequestError(f"{where}{key} must be an array, not {kind(value)}")
    return value


@dataclass
class Prompt:
    """What a request bills as input, gathered by a provider module."""

    texts: list[str] = field(default_factory=list)  # tokenized (then x safety factor)
    overhead: int = 0  # message framing tokens, in tiktoken units (x safety factor)
    exact: int = 0  # tokens already in the provider's own units (images, tool prompts)

    def add(self, value: Any) -> None:
        if isinstance(value, str):
            if value:
                self.texts.append(value)
        elif value is not None:
            self.texts.append(compact(value))


@dataclass
class Extracted:
    """What a response (JSON body or stream so far) says about the call's usage."""

    usage: TokenUsage | None = None  # provider-reported and final
    # Provider-reported input side known but output not final (Anthropic message_start):
    # the meter adds counted output to it.
    early_usage: TokenUsage | None = None
    model: str | None = None
    extras: dict[str, int] = field(default_factory=dict)
    other_models: dict[str, TokenUsage] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # returned text, to count without usage
    price_context: dict[str, str] = field(default_factory=dict)
    seen: bool = False  # a well-formed response object (or stream event) was read


@dataclass
class ParsedRequest:
    endpoint: str
    model: str | None
    stream: bool = False
    billable: bool = True
    prompt: Prompt = field(default_factory=Prompt)
    cap: int | None = None  # the request's own output cap, already times n
    # How many answers the request asks for (OpenAI's n / best_of, Gemini's candidateCount):
    # the default cap, for a request that sets none, is reserved for each.
    choices: int = 1
    # Of the prompt's exact tokens and of the cap, those that are images (priced apart).
    input_image_tokens: int = 0
    output_image_tokens: int = 0
    # Of the prompt's exact tokens, those that are audio (a transcription's upload).
    input_audio_tokens: int = 0
    rewritten_body: bytes | None = None
    strip_usage_chunk: bool = False
    expected_extras: dict[str, int] = field(default_factory=dict)
    # Units billed per call that the request may spend (a server tool's searches): reserved
    # in the estimate only, since the answer reports what was spent (expected_extras are
    # charged even when it reports none).
    reserved_extras: dict[str, int] = field(default_factory=dict)
    price_context: dict[str, str] = field(default_factory=dict)
    # Other models the call may bill (the Responses API's image_generation tool): model ->
    # output image tokens reserved on it. Their input is reserved as the call's own input.
    tool_output_reserves: dict[str, int] = field(default_factory=dict)
