"""Provider wire formats, byte-compatible with what the real APIs send.

Pure functions: they build response bodies (JSON bytes or raw SSE bytes) and hold the
stand-in's deterministic usage rules. Shapes follow the recorded corpus in
tests/fixtures/recorded/ (see its README for every quirk reproduced here):

* OpenAI JSON is pretty-printed (2-space indent); its SSE `data:` JSON is compact.
  Chat chunks carry `"usage": null` on every chunk plus one extra `choices: []`
  usage chunk only when `stream_options.include_usage` is true, and no `usage` key at
  all otherwise; every chunk has an `obfuscation` padding field; `data: [DONE]` ends it.
* Anthropic JSON is compact; SSE data is compact but padded with spaces before the
  closing brace, and `ping` uses `{"type": "ping"}` spacing. `message_delta.usage`
  repeats the (final) input and cache counts.
* Gemini JSON is pretty-printed; SSE chunks use `": "` after colons but no space after
  commas, `\\r\\n\\r\\n` separators, no `[DONE]`, and a cumulative `usageMetadata` in
  every chunk.

Usage rules (deterministic, so tests know the numbers before they send):

* input tokens = the number of whitespace-separated words in every string found
  (recursively) under the request's prompt fields, PROMPT_FIELDS below, ignoring the
  values of "role" and "type" keys; integers inside an embeddings `input` (token ids)
  count one each; never less than 1.
* output tokens = the number of words in the reply text (StandIn.reply_text, default
  DEFAULT_REPLY_TEXT), cut to the request's max output tokens when that is smaller
  (finish reason length / max_tokens / MAX_TOKENS / incomplete). Streams send one
  word per delta: "This", " is", " a", ...
* an override (StandIn.set_usage or the x-standin-input-tokens /
  x-standin-output-tokens request headers) is reported verbatim; an output override
  makes the reply exactly that many words (the reply text's words, cycled).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import struct
import wave
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_REPLY_TEXT = "This is a deterministic reply from the stand-in upstream."

#: API name -> request body fields whose text counts as prompt (input) tokens.
PROMPT_FIELDS: dict[str, tuple[str, ...]] = {
    "openai.chat": ("messages",),
    "openai.completions": ("prompt",),
    "openai.responses": ("instructions", "input"),
    "openai.embeddings": ("input",),
    "anthropic.messages": ("system", "messages"),
    "gemini.generate": ("systemInstruction", "contents"),
    "bedrock.converse": ("system", "messages"),
    "bedrock.nova": ("system", "messages"),
    "bedrock.llama": ("prompt",),
    "bedrock.titan": ("inputText",),
    "bedrock.mistral": ("prompt",),
}

#: API name -> request body field (dotted) that caps the output tokens.
MAX_OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "openai.chat": ("max_completion_tokens", "max_tokens"),
    "openai.completions": ("max_tokens",),
    "openai.responses": ("max_output_tokens",),
    "anthropic.messages": ("max_tokens",),
    "gemini.generate": ("generationConfig.maxOutputTokens",),
    "bedrock.converse": ("inferenceConfig.maxTokens",),
    "bedrock.nova": ("inferenceConfig.max_new_tokens",),
    "bedrock.llama": ("max_gen_len",),
    "bedrock.titan": ("textGenerationConfig.maxTokenCount",),
    "bedrock.mistral": ("max_tokens",),
}

_SKIP_KEYS = frozenset({"role", "type"})


def count_words(value: Any) -> int:
    """Whitespace-separated words in every string under `value` (skipping role/type values)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, Mapping):
        return sum(count_words(v) for k, v in value.items() if k not in _SKIP_KEYS)
    if isinstance(value, list | tuple):
        return sum(count_words(v) for v in value)
    return 0


def _dotted(body: Mapping[str, Any], path: str) -> Any:
    cur: Any = body
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def expected_input_tokens(api: str, body: Mapping[str, Any]) -> int:
    """The input token count the stand-in reports for `body` sent to `api` (see module doc)."""
    total = 0
    for field in PROMPT_FIELDS[api]:
        value = body.get(field)
        if api == "openai.embeddings":
            total += _embedding_input_tokens(value)
        else:
            total += count_words(value)
    return max(1, total)


def _embedding_input_tokens(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return 1
    if isinstance(value, list):
        return sum(_embedding_input_tokens(v) for v in value)
    return count_words(value)


def max_output_tokens(api: str, body: Mapping[str, Any]) -> int | None:
    """The request's cap on output tokens, or None."""
    for path in MAX_OUTPUT_FIELDS.get(api, ()):
        value = _dotted(body, path)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


@dataclass(frozen=True)
class ReplyPlan:
    """What a synthetic reply will say and report."""

    words: tuple[str, ...]
    input_tokens: int
    cached_tokens: int
    truncated: bool

    @property
    def output_tokens(self) -> int:
        return len(self.words)

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def deltas(self) -> list[str]:
        """Streamed pieces: one word per delta, later words with a leading space."""
        return [w if i == 0 else " " + w for i, w in enumerate(self.words)]


def plan_reply(
    api: str,
    body: Mapping[str, Any],
    reply_text: str,
    *,
    input_override: int | None = None,
    output_override: int | None = None,
    cached_tokens: int = 0,
) -> ReplyPlan:
    """Decide the reply words and token counts for a synthetic response."""
    base = reply_text.split() or ["ok"]
    input_tokens = (
        input_override if input_override is not None else expected_input_tokens(api, body)
    )
    if output_override is not None:
        words = [base[i % len(base)] for i in range(output_override)]
        return ReplyPlan(tuple(words), input_tokens, cached_tokens, truncated=False)
    cap = max_output_tokens(api, body)
    truncated = cap is not None and cap < len(base)
    words = base[: max(cap, 0)] if truncated and cap is not None else base
    return ReplyPlan(tuple(words), input_tokens, cached_tokens, truncated)


# ---------------------------------------------------------------------------- helpers


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _pretty(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, ensure_ascii=False).encode()


def sse_event(data: str, event: str | None = None, *, sep: str = "\n\n") -> bytes:
    """One SSE event: optional `event:` line, one `data:` line, then the separator."""
    newline = "\r\n" if sep == "\r\n\r\n" else "\n"
    head = f"event: {event}{newline}" if event else ""
    return f"{head}data: {data}{sep}".encode()


def split_sse_events(body: bytes) -> list[bytes]:
    """Split a raw SSE body after each event separator (\\n\\n or \\r\\n\\r\\n)."""
    pieces: list[bytes] = []
    start = 0
    i = 0
    while i < len(body):
        if body.startswith(b"\r\n\r\n", i):
            pieces.append(body[start : i + 4])
            start = i = i + 4
        elif body.startswith(b"\n\n", i):
            pieces.append(body[start : i + 2])
            start = i = i + 2
        else:
            i += 1
    if start < len(body):
        pieces.append(body[start:])
    return pieces


def _obfuscation(i: int) -> str:
    # Real chunks carry random padding of varying length; deterministic here.
    return "standinpad"[: (i * 3) % 11]


# ---------------------------------------------------------------------------- OpenAI


def openai_chat_usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def openai_chat_json(
    *,
    id: str,
    created: int,
    model: str,
    text: str | None,
    usage: Mapping[str, Any],
    finish_reason: str = "stop",
    tool_calls: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = list(tool_calls)
    message["annotations"] = []
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": dict(usage),
        "service_tier": "default",
        "system_fingerprint": "fp_standin",
    }
    body.update(extra or {})
    return _pretty(body)


def openai_chat_sse(
    *,
    id: str,
    created: int,
    model: str,
    deltas: Iterable[str],
    usage: Mapping[str, Any],
    include_usage: bool,
    finish_reason: str = "stop",
) -> list[bytes]:
    """Chat completion chunks, one SSE event per list item, ending with `data: [DONE]`."""
    events: list[bytes] = []

    def chunk(choices: list[dict[str, Any]], usage_value: Any = None) -> None:
        obj: dict[str, Any] = {
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_standin",
            "choices": choices,
        }
        if include_usage:
            obj["usage"] = usage_value
        obj["obfuscation"] = _obfuscation(len(events))
        events.append(sse_event(_compact(obj)))

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    chunk([choice({"role": "assistant", "content": "", "refusal": None})])
    for piece in deltas:
        chunk([choice({"content": piece})])
    chunk([choice({}, finish_reason)])
    if include_usage:
        chunk([], dict(usage))
    events.append(b"data: [DONE]\n\n")
    return events


def openai_completion_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def openai_completion_json(
    *, id: str, created: int, model: str, text: str, usage: Mapping[str, Any], finish_reason: str
) -> bytes:
    return _pretty(
        {
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": dict(usage),
        }
    )


def openai_completion_sse(
    *,
    id: str,
    created: int,
    model: str,
    deltas: Iterable[str],
    usage: Mapping[str, Any],
    include_usage: bool,
    finish_reason: str,
) -> list[bytes]:
    events: list[bytes] = []

    def chunk(choices: list[dict[str, Any]], usage_value: Any = None) -> None:
        obj: dict[str, Any] = {
            "id": id,
            "object": "text_completion",
            "created": created,
            "choices": choices,
            "model": model,
        }
        if include_usage:
            obj["usage"] = usage_value
        events.append(sse_event(_compact(obj)))

    pieces = list(deltas)
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        chunk(
            [
                {
                    "text": piece,
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": finish_reason if last else None,
                }
            ]
        )
    if include_usage:
        chunk([], dict(usage))
    events.append(b"data: [DONE]\n\n")
    return events


def openai_responses_usage(input_tokens: int, output_tokens: int, cached: int = 0) -> dict:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _responses_object(
    *,
    id: str,
    created: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: Mapping[str, Any] | None,
    max_output: int | None,
    instructions: Any,
    image_tool: Mapping[str, Any] | None = None,
    image_usage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    tool_usage = dict(image_usage) if image_usage else openai_images_usage(0, 0, 0)
    return {
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "completed_at": created if status in ("completed", "incomplete") else None,
        "error": None,
        "frequency_penalty": 0.0,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": instructions,
        "max_output_tokens": max_output,
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "presence_penalty": 0.0,
        "previous_response_id": None,
        "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [dict(image_tool)] if image_tool else [],
        "tool_usage": {"image_gen": tool_usage, "web_search": {"num_requests": 0}},
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": dict(usage) if usage is not None else None,
        "user": None,
        "metadata": {},
    }


def _responses_message(msg_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "status": status,
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
        "role": "assistant",
    }


#: Text tokens the image_generation tool reports reading (the prompt the model wrote it).
IMAGE_TOOL_PROMPT_TOKENS = 40


def responses_image_tool(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """A request's image_generation tool as the answer echoes it (model and quality filled
    in: gpt-image-1, auto), or None without one."""
    for tool in body.get("tools") or []:
        if isinstance(tool, Mapping) and tool.get("type") == "image_generation":
            return {"model": "gpt-image-1", "quality": "auto", "size": "auto", **tool}
    return None


def responses_image_usage(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The tool's `tool_usage.image_gen` for one image at the tool's quality."""
    return openai_images_usage(IMAGE_TOOL_PROMPT_TOKENS, 0, image_output_tokens(tool["quality"]))


def _image_call(call_id: str, status: str) -> dict[str, Any]:
    result = TINY_PNG_B64 if status == "completed" else None
    return {"id": call_id, "type": "image_generation_call", "status": status, "result": result}


def openai_responses_json(
    *,
    id: str,
    msg_id: str,
    created: int,
    model: str,
    text: str,
    usage: Mapping[str, Any],
    truncated: bool,
    max_output: int | None,
    instructions: Any = None,
    image_tool: Mapping[str, Any] | None = None,
) -> bytes:
    """With `image_tool`, the model also draws one image with it: an image_generation_call
    item, and the tool's tokens in `tool_usage.image_gen`."""
    status = "incomplete" if truncated else "completed"
    output = [_responses_message(msg_id, text, status)]
    if image_tool:
        output.append(_image_call("ig_" + msg_id, "completed"))
    return _pretty(
        _responses_object(
            id=id,
            created=created,
            model=model,
            status=status,
            output=output,
            usage=usage,
            max_output=max_output,
            instructions=instructions,
            image_tool=image_tool,
            image_usage=responses_image_usage(image_tool) if image_tool else None,
        )
    )


def openai_responses_sse(
    *,
    id: str,
    msg_id: str,
    created: int,
    model: str,
    deltas: Sequence[str],
    usage: Mapping[str, Any],
    truncated: bool,
    max_output: int | None,
    instructions: Any = None,
    image_tool: Mapping[str, Any] | None = None,
) -> list[bytes]:
    """created, in_progress, item/part added, text deltas, done events, (with `image_tool` an
    image_generation_call item), completed/incomplete."""
    events: list[bytes] = []
    text = "".join(deltas)
    final_status = "incomplete" if truncated else "completed"

    def emit(kind: str, payload: dict[str, Any]) -> None:
        obj = {"type": kind, **payload, "sequence_number": len(events)}
        events.append(sse_event(_compact(obj), kind))

    def response(status: str, output: list[dict[str, Any]], with_usage: bool) -> dict:
        return _responses_object(
            id=id,
            created=created,
            model=model,
            status=status,
            output=output,
            usage=usage if with_usage else None,
            max_output=max_output,
            instructions=instructions,
            image_tool=image_tool,
            image_usage=responses_image_usage(image_tool) if image_tool and with_usage else None,
        )

    part_empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    part_full = {**part_empty, "text": text}
    emit("response.created", {"response": response("in_progress", [], False)})
    emit("response.in_progress", {"response": response("in_progress", [], False)})
    emit(
        "response.output_item.added",
        {
            "item": {
                "id": msg_id,
                "type": "message",
                "status": "in_progress",
                "content": [],
                "role": "assistant",
            },
            "output_index": 0,
        },
    )
    emit(
        "response.content_part.added",
        {"content_index": 0, "item_id": msg_id, "output_index": 0, "part": part_empty},
    )
    for i, piece in enumerate(deltas):
        emit(
            "response.output_text.delta",
            {
                "content_index": 0,
                "delta": piece,
                "item_id": msg_id,
                "logprobs": [],
                "obfuscation": _obfuscation(i),
                "output_index": 0,
            },
        )
    emit(
        "response.output_text.done",
        {"content_index": 0, "item_id": msg_id, "logprobs": [], "output_index": 0, "text": text},
    )
    emit(
        "response.content_part.done",
        {"content_index": 0, "item_id": msg_id, "output_index": 0, "part": part_full},
    )
    message = _responses_message(msg_id, text, final_status)
    emit("response.output_item.done", {"item": message, "output_index": 0})
    output = [message]
    if image_tool:
        call_id = "ig_" + msg_id
        emit(
            "response.output_item.added",
            {"item": _image_call(call_id, "in_progress"), "output_index": 1},
        )
        output.append(_image_call(call_id, "completed"))
        emit("response.output_item.done", {"item": output[-1], "output_index": 1})
    emit(f"response.{final_status}", {"response": response(final_status, output, True)})
    return events


def openai_embeddings_json(
    *,
    model: str,
    inputs: Sequence[Any],
    prompt_tokens: int,
    encoding_format: str,
    dimensions: int,
) -> bytes:
    data = []
    for i, item in enumerate(inputs):
        vector = embedding_vector(item, dimensions)
        embedding: Any
        if encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            embedding = vector
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return _pretty(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def embedding_vector(item: Any, dimensions: int) -> list[float]:
    """A deterministic unit-ish vector derived from the input item."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    raw = [(digest[i % len(digest)] - 128) / 128.0 for i in range(dimensions)]
    # float32 round trip so JSON floats equal decoded base64 floats.
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *raw)))


def openai_models_json(models: Sequence[str], created: int) -> bytes:
    return _pretty(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": created, "owned_by": "system"}
                for m in models
            ],
        }
    )


def openai_error(message: str, type: str = "invalid_request_error", code: Any = None) -> bytes:
    return _pretty({"error": {"message": message, "type": type, "param": None, "code": code}})


# ---------------------------------------------------------------------------- Anthropic


def anthropic_usage(input_tokens: int, output_tokens: int, cache_read: int = 0) -> dict:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def anthropic_message_json(
    *, id: str, model: str, text: str, usage: Mapping[str, Any], stop_reason: str
) -> bytes:
    return _compact(
        {
            "model": model,
            "id": id,
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": dict(usage),
        }
    ).encode()


def _anthropic_data(obj: Mapping[str, Any], pad: int) -> str:
    # The real API pads compact JSON with spaces before the closing brace.
    return _compact(obj)[:-1] + " " * pad + "}"


def anthropic_sse(
    *,
    id: str,
    model: str,
    deltas: Sequence[str],
    usage: Mapping[str, Any],
    stop_reason: str,
) -> list[bytes]:
    """message_start, content_block_start, ping, deltas, block stop, message_delta, stop."""
    start_usage = {
        "input_tokens": usage["input_tokens"],
        "cache_creation_input_tokens": usage.get("cache_creation_input_tokens", 0),
        "cache_read_input_tokens": usage.get("cache_read_input_tokens", 0),
        "cache_creation": usage.get(
            "cache_creation", {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}
        ),
        "output_tokens": min(1, usage["output_tokens"]),
        "service_tier": "standard",
    }
    delta_usage = {
        "input_tokens": usage["input_tokens"],
        "cache_creation_input_tokens": usage.get("cache_creation_input_tokens", 0),
        "cache_read_input_tokens": usage.get("cache_read_input_tokens", 0),
        "output_tokens": usage["output_tokens"],
    }
    message = {
        "model": model,
        "id": id,
        "type": "message",
        "role": "assistant",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    events = [
        sse_event(
            _anthropic_data({"type": "message_start", "message": message}, 12), "message_start"
        ),
        sse_event(
            _anthropic_data(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                8,
            ),
            "content_block_start",
        ),
        sse_event('{"type": "ping"}', "ping"),
    ]
    for piece in deltas:
        events.append(
            sse_event(
                _anthropic_data(
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                    6,
                ),
                "content_block_delta",
            )
        )
    events.append(
        sse_event(
            _anthropic_data({"type": "content_block_stop", "index": 0}, 8), "content_block_stop"
        )
    )
    events.append(
        sse_event(
            _anthropic_data(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": delta_usage,
                },
                7,
            ),
            "message_delta",
        )
    )
    events.append(sse_event(_anthropic_data({"type": "message_stop"}, 4), "message_stop"))
    return events


def anthropic_error(type: str, message: str) -> bytes:
    return _compact({"type": "error", "error": {"type": type, "message": message}}).encode()


# ---------------------------------------------------------------------------- Gemini


def _gemini_chunk_json(obj: Any) -> str:
    # Recorded Gemini chunks: a space after each colon, none after commas.
    return json.dumps(obj, separators=(",", ": "), ensure_ascii=False)


def gemini_usage(prompt: int, candidates: int | None, cached: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    if candidates is not None:
        usage["candidatesTokenCount"] = candidates
    usage["totalTokenCount"] = prompt + (candidates or 0)
    if cached:
        usage["cachedContentTokenCount"] = cached
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    return usage


def gemini_json(
    *, model: str, text: str, usage: Mapping[str, Any], finish_reason: str, response_id: str
) -> bytes:
    return _pretty(
        {
            "candidates": [
                {
                    "content": {"parts": [{"text": text}], "role": "model"},
                    "finishReason": finish_reason,
                    "index": 0,
                }
            ],
            "usageMetadata": dict(usage),
            "modelVersion": model,
            "responseId": response_id,
        }
    )


def gemini_chunks(
    *,
    model: str,
    deltas: Sequence[str],
    prompt_tokens: int,
    cached: int,
    finish_reason: str,
    response_id: str,
) -> list[dict[str, Any]]:
    """Stream chunk objects; usageMetadata is cumulative (candidates so far)."""
    chunks = []
    for i, piece in enumerate(deltas or [""]):
        last = i == max(len(deltas), 1) - 1
        candidate: dict[str, Any] = {"content": {"parts": [{"text": piece}], "role": "model"}}
        if last:
            candidate["finishReason"] = finish_reason
        chunks.append(
            {
                "candidates": [candidate],
                "usageMetadata": gemini_usage(prompt_tokens, min(i + 1, len(deltas)), cached),
                "modelVersion": model,
                "responseId": response_id,
            }
        )
    return chunks


def gemini_sse(chunks: Sequence[Mapping[str, Any]]) -> list[bytes]:
    return [sse_event(_gemini_chunk_json(c), sep="\r\n\r\n") for c in chunks]


def gemini_error(code: int, message: str, status: str) -> bytes:
    return _pretty({"error": {"code": code, "message": message, "status": status}})


# ---------------------------------------------------------------------------- OpenAI images

#: Image output tokens the stand-in reports per image, by requested quality (OpenAI's
#: 1024x1024 figures for the GPT image models; "auto" and anything else bill as "high").
IMAGE_OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160}
#: Input image tokens the stand-in reports per uploaded image (edits).
IMAGE_INPUT_TOKENS = 323
#: A 1x1 transparent PNG, the image every synthetic reply returns.
TINY_PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def image_output_tokens(quality: Any) -> int:
    return IMAGE_OUTPUT_TOKENS.get(quality if isinstance(quality, str) else "", 4160)


def openai_images_usage(text_tokens: int, image_tokens: int, output_tokens: int) -> dict:
    return {
        "input_tokens": text_tokens + image_tokens,
        "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": text_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"image_tokens": output_tokens, "text_tokens": 0},
        "total_tokens": text_tokens + image_tokens + output_tokens,
    }


def openai_images_json(
    *, created: int, n: int, quality: str, size: str, usage: Mapping[str, Any] | None
) -> bytes:
    """An ImagesResponse: base64 images and, for the GPT image models, `usage`. DALL·E
    (usage None) answers a URL per image and no usage."""
    if usage is None:
        data = [{"url": f"https://images.example/{created}-{i}.png"} for i in range(n)]
        return _pretty({"created": created, "data": data})
    return _pretty(
        {
            "created": created,
            "background": "opaque",
            "data": [{"b64_json": TINY_PNG_B64} for _ in range(n)],
            "output_format": "png",
            "quality": quality,
            "size": size,
            "usage": dict(usage),
        }
    )


def openai_images_sse(
    *,
    kind: str,
    created: int,
    quality: str,
    size: str,
    partial_images: int,
    usages: Sequence[Mapping[str, Any]],
) -> list[bytes]:
    """`stream: true`: per image, `partial_images` previews, then a `<kind>.completed` event
    carrying that image's usage (kind: image_generation or image_edit)."""
    common = {
        "background": "opaque",
        "created_at": created,
        "output_format": "png",
        "quality": quality,
        "size": size,
    }
    events = []
    for usage in usages:
        for i in range(partial_images):
            partial = {"type": f"{kind}.partial_image", "b64_json": TINY_PNG_B64, **common}
            events.append(
                sse_event(_compact({**partial, "partial_image_index": i}), f"{kind}.partial_image")
            )
        done = {"type": f"{kind}.completed", "b64_json": TINY_PNG_B64, **common, "usage": usage}
        events.append(sse_event(_compact(done), f"{kind}.completed"))
    return events


# ---------------------------------------------------------------------------- OpenAI speech

#: Output (audio) tokens the stand-in reports per input character for gpt-4o-mini-tts.
SPEECH_TOKENS_PER_CHARACTER = 1
#: An MP3 frame header: the start of every synthetic speech answer.
MP3_HEADER = b"\xff\xfb\x90\x64"


def openai_speech_usage(text: str, instructions: Any) -> dict[str, int]:
    """`speech.audio.done`'s usage: the words of the text and instructions as input tokens,
    SPEECH_TOKENS_PER_CHARACTER audio tokens per character of the text as output."""
    words = count_words(text) + count_words(instructions or "")
    output = len(text) * SPEECH_TOKENS_PER_CHARACTER
    return {"input_tokens": words, "output_tokens": output, "total_tokens": words + output}


def openai_speech_audio(text: str) -> bytes:
    """Raw "audio": an MP3 header and 64 bytes per character of the text."""
    return MP3_HEADER + bytes(64 * len(text))


def openai_speech_sse(text: str, usage: Mapping[str, Any]) -> list[bytes]:
    """`stream_format: "sse"`: base64 audio deltas, then `speech.audio.done` with usage."""
    audio = base64.b64encode(openai_speech_audio(text)).decode()
    half = len(audio) // 8 * 4
    events = [
        sse_event(_compact({"type": "speech.audio.delta", "audio": piece}))
        for piece in (audio[:half], audio[half:])
    ]
    events.append(sse_event(_compact({"type": "speech.audio.done", "usage": dict(usage)})))
    return events


# ---------------------------------------------------------------------------- OpenAI transcription

#: Audio tokens gpt-4o-*-transcribe report per second of audio (1 per 100 ms).
TRANSCRIBE_AUDIO_TOKENS_PER_SECOND = 10


def wav_audio(seconds: float, rate: int = 16_000) -> bytes:
    """A mono 16-bit WAV file of silence lasting `seconds`."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(2 * round(rate * seconds)))
    return out.getvalue()


def multipart_form(fields: Mapping[str, str], files: Mapping[str, bytes], boundary: str) -> bytes:
    """A multipart/form-data body, as the SDKs send one (CRLF lines, files after fields)."""
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    for name, content in files.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '.encode()
        out += f'filename="{name}.wav"\r\nContent-Type: audio/wav\r\n\r\n'.encode()
        out += content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def wav_seconds(data: bytes) -> float | None:
    """How long a WAV upload plays, by the standard library's reader (None: not a WAV)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            return w.getnframes() / w.getframerate()
    except (wave.Error, EOFError):
        return None


def openai_transcription_usage(model: str, seconds: float, prompt: str | None, text: str) -> dict:
    """whisper-1 and gpt-transcribe report the audio's seconds; gpt-4o-*-transcribe tokens:
    TRANSCRIBE_AUDIO_TOKENS_PER_SECOND audio tokens a second, the prompt's words as text
    tokens, the transcript's words as output tokens."""
    if "whisper" in model or model == "gpt-transcribe":
        return {"type": "duration", "seconds": seconds}
    audio = math.ceil(seconds * TRANSCRIBE_AUDIO_TOKENS_PER_SECOND)
    words = count_words(prompt or "")
    output = count_words(text)
    return {
        "type": "tokens",
        "input_tokens": audio + words,
        "input_token_details": {"text_tokens": words, "audio_tokens": audio},
        "output_tokens": output,
        "total_tokens": audio + words + output,
    }


def openai_transcription_body(
    fmt: str, text: str, seconds: float, usage: Mapping[str, Any]
) -> tuple[bytes, str]:
    """(body, content type) of an answer in `response_format`: json and verbose_json carry
    usage, text, srt and vtt are the bare transcript."""
    if fmt == "verbose_json":
        segment = {"id": 0, "start": 0.0, "end": seconds, "text": text}
        payload = {"task": "transcribe", "language": "english", "duration": seconds}
        payload |= {"text": text, "segments": [segment], "usage": dict(usage)}
        return _pretty(payload), "application/json"
    if fmt == "text":
        return (text + "\n").encode(), "text/plain; charset=utf-8"
    if fmt in ("srt", "vtt"):
        stamp = "00:00:00,000 --> 00:00:01,000" if fmt == "srt" else "00:00:00.000 --> 00:00:01.000"
        head = "1\n" if fmt == "srt" else "WEBVTT\n\n"
        return f"{head}{stamp}\n{text}\n\n".encode(), "text/plain; charset=utf-8"
    return _pretty({"text": text, "usage": dict(usage)}), "application/json"


def openai_transcription_sse(text: str, usage: Mapping[str, Any]) -> list[bytes]:
    """`stream: true`: a `transcript.text.delta` per word, then `transcript.text.done`."""
    words = text.split(" ")
    events = [
        sse_event(_compact({"type": "transcript.text.delta", "delta": w if i == 0 else " " + w}))
        for i, w in enumerate(words)
    ]
    done = {"type": "transcript.text.done", "text": text, "usage": dict(usage)}
    events.append(sse_event(_compact(done)))
    return events


# ---------------------------------------------------------------------------- Amazon Bedrock

#: The stand-in's AWS credentials: it checks each request's SigV4 signature with them.
AWS_ACCESS_KEY_ID = "test-access-key-id"
AWS_SECRET_ACCESS_KEY = "test-secret-access-key"
BEDROCK_HOST = "bedrock-runtime.us-east-1.amazonaws.com"
EVENTSTREAM_TYPE = "application/vnd.amazon.eventstream"


def aws_event_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One message of AWS's binary event-stream framing (string headers only): prelude (total
    and headers lengths, CRC32 of both), headers, payload, CRC32 of all that precedes it."""
    encoded = b""
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        encoded += struct.pack(">B", len(raw_name)) + raw_name
        encoded += struct.pack(">BH", 7, len(raw_value)) + raw_value  # 7: a string value
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def aws_event(event_type: str, payload: Mapping[str, Any]) -> bytes:
    return aws_event_message(
        {
            ":event-type": event_type,
            ":content-type": "application/json",
            ":message-type": "event",
        },
        _compact(payload).encode(),
    )


def _bedrock_pad(i: int) -> str:
    # Bedrock pads every stream event with a random "p" field; deterministic here.
    return "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"[: 4 + (i * 7) % 30]


def bedrock_usage(input_tokens: int, output_tokens: int, cache_read: int = 0) -> dict:
    """Converse usage: inputTokens leaves out the cache reads and writes; totalTokens holds all."""
    usage = {
        "inputTokens": input_tokens,
        "outputTokens": output_tokens,
        "totalTokens": input_tokens + cache_read + output_tokens,
    }
    if cache_read:
        usage.update({"cacheReadInputTokens": cache_read, "cacheWriteInputTokens": 0})
    return usage


def bedrock_converse_json(*, text: str, usage: Mapping[str, Any], stop_reason: str) -> bytes:
    return _compact(
        {
            "metrics": {"latencyMs": 412},
            "output": {"message": {"content": [{"text": text}], "role": "assistant"}},
            "stopReason": stop_reason,
            "usage": dict(usage),
        }
    ).encode()


def bedrock_converse_stream(
    *, deltas: Sequence[str], usage: Mapping[str, Any], stop_reason: str
) -> list[bytes]:
    """messageStart, one contentBlockDelta per piece, contentBlockStop, messageStop, metadata."""
    events = [("messageStart", {"role": "assistant"})]
    events += [
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": d}}) for d in deltas
    ]
    events += [
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("messageStop", {"stopReason": stop_reason}),
        ("metadata", {"metrics": {"latencyMs": 388}, "usage": dict(usage)}),
    ]
    return [
        aws_event(name, {**payload, "p": _bedrock_pad(i)})
        for i, (name, payload) in enumerate(events)
    ]


def bedrock_invoke_stream(
    sse_events: Sequence[bytes], input_tokens: int, output_tokens: int
) -> list[bytes]:
    """InvokeModelWithResponseStream for Claude: each Anthropic SSE event's JSON, base64, as the
    `bytes` of a `chunk` event (pings are not sent); the last adds Bedrock's invocation metrics."""
    messages = []
    for i, event in enumerate(sse_events):
        data = next(line[6:] for line in event.decode().splitlines() if line.startswith("data: "))
        obj = json.loads(data)
        if obj.get("type") == "ping":
            continue
        if obj.get("type") == "message_stop":
            obj["amazon-bedrock-invocationMetrics"] = {
                "inputTokenCount": input_tokens,
                "outputTokenCount": output_tokens,
                "invocationLatency": 512,
                "firstByteLatency": 101,
            }
        encoded = base64.b64encode(_compact(obj).encode()).decode()
        messages.append(aws_event("chunk", {"bytes": encoded, "p": _bedrock_pad(i)}))
    return messages


def bedrock_token_headers(
    input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0
) -> dict[str, str]:
    """What InvokeModel's answer reports, for every model family: the input count leaves the
    cache reads and writes out (as Converse's inputTokens does)."""
    return {
        "X-Amzn-Bedrock-Invocation-Latency": "431",
        "X-Amzn-Bedrock-Input-Token-Count": str(input_tokens),
        "X-Amzn-Bedrock-Output-Token-Count": str(output_tokens),
        "X-Amzn-Bedrock-Cache-Read-Input-Token-Count": str(cache_read),
        "X-Amzn-Bedrock-Cache-Write-Input-Token-Count": str(cache_write),
    }


def bedrock_invocation_metrics(
    input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0
) -> dict:
    """The `amazon-bedrock-invocationMetrics` the last chunk of an invoke stream carries."""
    return {
        "inputTokenCount": input_tokens,
        "outputTokenCount": output_tokens,
        "invocationLatency": 512,
        "firstByteLatency": 101,
        "cacheReadInputTokenCount": cache_read,
        "cacheWriteInputTokenCount": cache_write,
    }


def bedrock_chunk_stream(
    chunks: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]
) -> list[bytes]:
    """InvokeModelWithResponseStream: each chunk's JSON, base64, as the `bytes` of a `chunk`
    event; the last chunk also carries Bedrock's invocation metrics."""
    last = len(chunks) - 1
    return [
        aws_event(
            "chunk",
            {
                "bytes": base64.b64encode(
                    _compact(
                        {**c, "amazon-bedrock-invocationMetrics": dict(metrics)} if i == last else c
                    ).encode()
                ).decode(),
                "p": _bedrock_pad(i),
            },
        )
        for i, c in enumerate(chunks)
    ]


def nova_usage(input_tokens: int, output_tokens: int, cache_read: int = 0) -> dict:
    """Nova's invoke `usage`: Converse's names, but `cache*InputTokenCount` for the cache."""
    return {
        "inputTokens": input_tokens,
        "outputTokens": output_tokens,
        "totalTokens": input_tokens + cache_read + output_tokens,
        "cacheReadInputTokenCount": cache_read,
        "cacheWriteInputTokenCount": 0,
    }


def nova_invoke_json(*, text: str, usage: Mapping[str, Any], stop_reason: str) -> bytes:
    return _compact(
        {
            "output": {"message": {"content": [{"text": text}], "role": "assistant"}},
            "stopReason": stop_reason,
            "usage": dict(usage),
        }
    ).encode()


def nova_invoke_chunks(
    *, deltas: Sequence[str], usage: Mapping[str, Any], stop_reason: str
) -> list[dict]:
    """messageStart, a contentBlockDelta per piece, contentBlockStop, messageStop, metadata."""
    return [
        {"messageStart": {"role": "assistant"}},
        *({"contentBlockDelta": {"delta": {"text": d}, "contentBlockIndex": 0}} for d in deltas),
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": stop_reason}},
        {"metadata": {"usage": dict(usage), "metrics": {}, "trace": {}}},
    ]


def llama_invoke_json(
    *, text: str, input_tokens: int, output_tokens: int, stop_reason: str
) -> bytes:
    return _compact(
        {
            "generation": text,
            "prompt_token_count": input_tokens,
            "generation_token_count": output_tokens,
            "stop_reason": stop_reason,
        }
    ).encode()


def llama_invoke_chunks(
    *, deltas: Sequence[str], input_tokens: int, stop_reason: str
) -> list[dict]:
    """One chunk per piece (`prompt_token_count` in the first only, `generation_token_count`
    cumulative), then an empty generation with the stop reason."""
    chunks = [
        {
            "generation": d,
            "prompt_token_count": input_tokens if i == 0 else None,
            "generation_token_count": i + 1,
            "stop_reason": None,
        }
        for i, d in enumerate(deltas)
    ]
    chunks.append(
        {
            "generation": "",
            "prompt_token_count": None,
            "generation_token_count": len(deltas),
            "stop_reason": stop_reason,
        }
    )
    return chunks


def titan_invoke_json(*, text: str, input_tokens: int, output_tokens: int, reason: str) -> bytes:
    return _compact(
        {
            "inputTextTokenCount": input_tokens,
            "results": [
                {"tokenCount": output_tokens, "outputText": text, "completionReason": reason}
            ],
        }
    ).encode()


def titan_invoke_chunks(*, deltas: Sequence[str], input_tokens: int, reason: str) -> list[dict]:
    """One chunk per piece, the running output count in each, the reason in the last."""
    return [
        {
            "outputText": d,
            "index": 0,
            "totalOutputTextTokenCount": i + 1,
            "completionReason": reason if i == len(deltas) - 1 else None,
            "inputTextTokenCount": input_tokens,
        }
        for i, d in enumerate(deltas)
    ]


def mistral_invoke_json(*, text: str, stop_reason: str) -> bytes:
    """Mistral's prompt format answers its text alone: no usage in the body."""
    return _compact({"outputs": [{"text": text, "stop_reason": stop_reason}]}).encode()


def mistral_invoke_chunks(*, deltas: Sequence[str], stop_reason: str) -> list[dict]:
    return [
        {"outputs": [{"text": d, "stop_reason": stop_reason if i == len(deltas) - 1 else None}]}
        for i, d in enumerate(deltas)
    ]


def bedrock_error(message: str) -> bytes:
    return _compact({"message": message}).encode()
