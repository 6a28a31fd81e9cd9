"""Amazon Bedrock Runtime: Converse / ConverseStream and InvokeModel(WithResponseStream) for every
model family billed per token. An invoke body is the family's own format: Claude's is Anthropic's
Messages (metered by anthropic.py); the others (Nova, Titan, Llama, Mistral, Cohere, AI21,
DeepSeek, gpt-oss, Qwen...) are read by the fields that hold their prompt and output cap.

Usage rules:
* Converse `usage.inputTokens` excludes cache reads and writes (`totalTokens` is their sum with
  the output); the billed input is inputTokens + cacheReadInputTokens + cacheWriteInputTokens.
  `cacheDetails[]` splits the writes by TTL ("5m", "1h": priced apart).
* ConverseStream reports that usage once, in its `metadata` event.
* Streams are AWS's binary event-stream framing (application/vnd.amazon.eventstream), parsed
  with botocore's CRC-checked EventStreamBuffer, imported when the first stream opens.
  InvokeModelWithResponseStream wraps each chunk of the family's own stream (for Claude, an
  Anthropic SSE event's JSON), base64, in a `chunk` event.
* An invoke's usage is what Bedrock itself counts, whatever the family: the
  X-Amzn-Bedrock-{Input,Output,Cache-Read-Input,Cache-Write-Input}-Token-Count response headers,
  and in a stream the last chunk's `amazon-bedrock-invocationMetrics` (inputTokenCount...). As
  in Converse, the input count leaves the cache reads and writes out. The family's own usage
  fields in the body (Nova `usage`, Llama `prompt_token_count`, Titan `inputTextTokenCount`,
  OpenAI-style `usage`) stand in when those are absent, or when one of Bedrock's counts is not
  a number (the others alone would charge its tokens as 0); for Claude, Anthropic's `usage`
  comes first (it alone splits the 1 h cache writes).
* Image and video models (Stability, Titan Image, Nova Canvas and Reel, Luma, TwelveLabs) bill
  per image or second, not per token: their invokes stay $0 steps.
* The call is priced on the path's modelId (what Bedrock bills: a `global.` inference profile
  costs less than a regional one), never on the model name a Claude response echoes.

A Bedrock request is SigV4-signed over its body and headers: it is only ever read.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

from . import anthropic, images
from ._util import (
    Counts,
    Extracted,
    ParsedRequest,
    Prompt,
    compact,
    count,
    dig,
    items,
    kind,
    loads,
    opt_int,
)
from .types import MeterRequestError, TokenUsage

EVENTSTREAM_TYPE = "application/vnd.amazon.eventstream"

# Framing per message and per request, in tiktoken units, as for Anthropic's own API (the
# Converse request becomes the model's native prompt on Bedrock's side).
MESSAGE_OVERHEAD = anthropic.MESSAGE_OVERHEAD
REQUEST_OVERHEAD = anthropic.REQUEST_OVERHEAD

# /model/{modelId}/{operation}: the modelId is URL-encoded (":" as %3A, an ARN's "/" as %2F)
_MODEL_OPERATION = re.compile(r"^/model/(?P<model>[^/]+(?:/[^/]+)*?)/(?P<op>[a-z-]+)$")
_OPERATIONS = {
    "converse": ("converse", False),
    "converse-stream": ("converse", True),
    "invoke": ("invoke", False),
    "invoke-with-response-stream": ("invoke", True),
    "count-tokens": ("countTokens", False),
}

# Documents by Converse `format` (what media_tokens knows by MIME type).
_DOCUMENT_MIME = {
    "pdf": "application/pdf",
    "txt": "text/plain",
    "md": "text/markdown",
    "csv": "text/csv",
    "html": "text/html",
}


def route(method: str, path: str) -> tuple[str, str | None, bool]:
    """(endpoint, modelId decoded, stream implied by the path)."""
    m = _MODEL_OPERATION.match(path.rstrip("/"))
    if m is None:
        return "other", None, False
    model = unquote(m.group("model"))
    endpoint, stream = _OPERATIONS.get(m.group("op"), ("other", False))
    if method.upper() != "POST":
        return "other", model, False
    return endpoint, model, stream


def is_claude(model: str | None) -> bool:
    """An Anthropic model id (or an inference profile or ARN naming one)."""
    name = (model or "").lower()
    return "anthropic." in name or "claude" in name


# Model ids (or their tails) of the families an invoke bills per image or per second of video.
_PER_ITEM_MODELS = (
    "stability.",
    "amazon.titan-image",
    "amazon.nova-canvas",
    "amazon.nova-reel",
    "luma.",
    "twelvelabs.",
)


def _name(model: str | None) -> str:
    """The model id's last segment, lower-cased (an ARN's resource after its "/")."""
    return (model or "").rsplit("/", 1)[-1].lower()


def per_item(model: str | None) -> bool:
    name = _name(model)
    return any(family in name for family in _PER_ITEM_MODELS)


def metered(endpoint: str, model: str | None) -> bool:
    """Converse speaks one format for every model; an invoke is metered for every family
    billed per token (Bedrock reports its usage whatever the body's format)."""
    return endpoint == "converse" or (endpoint == "invoke" and not per_item(model))


# --- requests ---------------------------------------------------------------------------


def parse_request(endpoint: str, model: str, stream: bool, body: dict[str, Any]) -> ParsedRequest:
    if endpoint == "invoke":
        if is_claude(model) or "anthropic_version" in body:  # an application profile's too
            # No `model` in the body: Bedrock names it in the path (and rejects the field).
            parsed = anthropic.parse_request({**body, "model": model}, model, stream)
            parsed.endpoint, parsed.stream = "invoke", stream
            return parsed
        return _parse_invoke(model, stream, body)
    return _parse_converse(model, stream, body)


# An invoke body's output cap, by family: (object path, key). The first one present is the cap.
_INVOKE_CAPS = (
    ((), "max_tokens"),  # Mistral, Cohere, DeepSeek, AI21 Jamba, OpenAI-style bodies
    ((), "max_completion_tokens"),  # gpt-oss and other OpenAI-style bodies
    ((), "max_gen_len"),  # Meta Llama
    ((), "maxTokens"),  # AI21 Jurassic-2
    ((), "max_new_tokens"),
    (("textGenerationConfig",), "maxTokenCount"),  # Amazon Titan Text
    (("inferenceConfig",), "max_new_tokens"),  # Amazon Nova
    (("inferenceConfig",), "maxTokens"),
)
# Fields holding prompt text, as a string or a structure tokenized whole: Llama, Mistral,
# DeepSeek and Cohere Command `prompt`, Titan `inputText`, Cohere Command R `message`,
# `preamble`, `chat_history`, `documents`, `tool_results`, Cohere Embed `texts`, tools.
_INVOKE_TEXT_FIELDS = (
    "prompt",
    "inputText",
    "message",
    "preamble",
    "chat_history",
    "documents",
    "tool_results",
    "texts",
    "tools",
    "toolConfig",
)


def _parse_invoke(model: str, stream: bool, body: dict[str, Any]) -> ParsedRequest:
    """Another family's invoke body: the text of the fields that hold its prompt, or, for a
    format none of them names, the whole body (an over-estimate, never an under-count)."""
    parsed = ParsedRequest(endpoint="invoke", model=model, stream=stream)
    prompt = parsed.prompt
    found = False
    system = body.get("system")
    if isinstance(system, list):  # Nova: content blocks
        _mixed_blocks(system, prompt)
        found = True
    elif system is not None:
        prompt.add(system)
        found = True
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            raise MeterRequestError(f"messages must be an array, not {kind(messages)}")
        found = True
        prompt.overhead += REQUEST_OVERHEAD
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise MeterRequestError(f"messages[{i}] must be an object, not {kind(msg)}")
            prompt.overhead += MESSAGE_OVERHEAD
            content = msg.get("content")
            if isinstance(content, list):  # Nova's blocks, or OpenAI-style typed parts
                _mixed_blocks(content, prompt)
            else:
                prompt.add(content)
            prompt.add(msg.get("tool_calls"))
    for field in _INVOKE_TEXT_FIELDS:
        if field in body:
            prompt.add(body[field])
            found = True
    for image in [*items(body.get("images")), body.get("inputImage")]:  # Llama 3.2, Titan
        if isinstance(image, str):
            prompt.exact += _image({"source": {"bytes": image}})
            found = True
    if not found:
        prompt.add(body)
    for config in ("inferenceConfig", "textGenerationConfig"):
        if body.get(config) is not None and not isinstance(body[config], dict):
            raise MeterRequestError(f"{config} must be an object, not {kind(body[config])}")
    for path, key in _INVOKE_CAPS:
        holder = dig(body, *path) if path else body
        if isinstance(holder, dict) and holder.get(key) is not None:
            where = "".join(f"{p}." for p in path)
            parsed.cap = opt_int(holder, key, where)
            break
    if parsed.cap is None and "embed" in _name(model):
        parsed.cap = 0  # an embedding model outputs no tokens
    n = opt_int(body, "n")
    if parsed.cap is not None and n is not None and n > 1:
        parsed.cap *= n
    return parsed


def _mixed_blocks(blocks: list[Any], prompt: Prompt) -> None:
    """Nova's Converse-style blocks ({"text": ...}, {"image": ...}) or OpenAI-style typed parts
    ({"type": "text", ...}, {"type": "image_url", ...}), as a family's body has them."""
    for block in blocks:
        if isinstance(block, dict) and isinstance(block.get("type"), str):
            if block["type"] == "text":
                prompt.add(block.get("text"))
            elif block["type"] == "image_url":
                url = dig(block, "image_url", "url")
                data = images.split_data_url(url) if isinstance(url, str) else None
                size = images.size_from_b64(data[1]) if data else None
                prompt.exact += images.anthropic_image_tokens(size)
            else:
                prompt.add(block)
        elif isinstance(block, dict):
            _blocks([block], prompt)
        else:
            prompt.add(block)


def _parse_converse(model: str, stream: bool, body: dict[str, Any]) -> ParsedRequest:
    parsed = ParsedRequest(endpoint="converse", model=model, stream=stream)
    prompt = parsed.prompt
    prompt.overhead += REQUEST_OVERHEAD
    claude = is_claude(model)
    messages = body.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise MeterRequestError(f"messages must be an array, not {kind(messages)}")
    for i, msg in enumerate(items(messages)):
        if not isinstance(msg, dict):
            raise MeterRequestError(f"messages[{i}] must be an object, not {kind(msg)}")
        prompt.overhead += MESSAGE_OVERHEAD
        content = msg.get("content")
        if content is not None and not isinstance(content, list):
            raise MeterRequestError(f"messages[{i}].content must be an array, not {kind(content)}")
        _blocks(items(content), prompt)
    system = body.get("system")
    if system is not None and not isinstance(system, list):
        raise MeterRequestError(f"system must be an array, not {kind(system)}")
    _blocks(items(system), prompt)
    tool_config = body.get("toolConfig")
    if tool_config is not None and not isinstance(tool_config, dict):
        raise MeterRequestError(f"toolConfig must be an object, not {kind(tool_config)}")
    tools = [t for t in items(dig(tool_config, "tools")) if isinstance(t, dict)]
    specs = [t.get("toolSpec") or t.get("systemTool") for t in tools]
    if any(specs):
        prompt.add([s for s in specs if s])
        if claude:  # Anthropic's hidden tool-use system prompt, as on its own API
            prompt.exact += anthropic.TOOLS_SYSTEM_PROMPT_TOKENS
    extra = body.get("additionalModelRequestFields")
    if claude and dig(extra, "thinking", "type") in ("enabled", "adaptive"):
        prompt.exact += anthropic.THINKING_TOKENS
    schema = dig(body, "outputConfig", "textFormat")
    if schema:
        prompt.add(schema)
    config = body.get("inferenceConfig")
    if config is not None and not isinstance(config, dict):
        raise MeterRequestError(f"inferenceConfig must be an object, not {kind(config)}")
    parsed.cap = opt_int(config or {}, "maxTokens", "inferenceConfig.")
    return parsed


def _blocks(blocks: list[Any], prompt: Prompt) -> None:
    """Converse content blocks: each an object with one member naming its type."""
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if "text" in block:
            prompt.add(block.get("text"))
        elif "image" in block:
            prompt.exact += _image(block.get("image"))
        elif "document" in block:
            _document(block.get("document"), prompt)
        elif "video" in block or "audio" in block:
            source = dig(block.get("video") or block.get("audio"), "source", "bytes")
            media = "video/mp4" if "video" in block else "audio/mpeg"
            prompt.exact += images.media_tokens(
                "anthropic", media, source if isinstance(source, str) else None, prompt.texts
            )
        elif "toolUse" in block:
            prompt.add(dig(block, "toolUse", "name"))
            prompt.add(dig(block, "toolUse", "input"))
        elif "toolResult" in block:
            _blocks(items(dig(block, "toolResult", "content")), prompt)
        elif "json" in block:  # inside a toolResult
            prompt.add(block.get("json"))
        elif "reasoningContent" in block:
            prompt.add(dig(block, "reasoningContent", "reasoningText", "text"))
        elif "guardContent" in block:
            prompt.add(dig(block, "guardContent", "text", "text"))
        elif "citationsContent" in block:
            _blocks(items(dig(block, "citationsContent", "content")), prompt)
        elif "searchResult" in block:
            result = block.get("searchResult")
            prompt.add(dig(result, "title"))
            prompt.add(dig(result, "source"))
            _blocks(items(dig(result, "content")), prompt)
        elif "cachePoint" in block:
            pass  # a marker, no tokens
        else:
            prompt.add(block)


def _image(image: Any) -> int:
    data = dig(image, "source", "bytes")  # base64 in the JSON body; S3 locations are unread
    size = images.size_from_b64(data) if isinstance(data, str) else None
    return images.anthropic_image_tokens(size)


def _document(document: Any, prompt: Prompt) -> None:
    if not isinstance(document, dict):
        return
    prompt.add(document.get("name"))
    prompt.add(document.get("context"))
    source = document.get("source")
    if not isinstance(source, dict):
        prompt.exact += images.UNKNOWN_MEDIA_TOKENS
    elif isinstance(source.get("text"), str):
        prompt.add(source["text"])
    elif isinstance(source.get("content"), list):
        _blocks(source["content"], prompt)
    elif isinstance(source.get("bytes"), str):
        fmt = str(document.get("format") or "").lower()
        # doc, docx, xls, xlsx: Bedrock extracts their text; their size is the best guess.
        mime = _DOCUMENT_MIME.get(
            fmt, "text/plain" if fmt in ("doc", "docx", "xls", "xlsx") else ""
        )
        prompt.exact += images.media_tokens("anthropic", mime, source["bytes"], prompt.texts)
    else:  # s3Location
        prompt.exact += images.UNKNOWN_MEDIA_TOKENS


# --- responses --------------------------------------------------------------------------


def usage_from(u: dict[str, Any]) -> TokenUsage | None:
    """A Converse TokenUsage object; None when a count in it cannot be read."""
    c = Counts()
    read = c(u.get("cacheReadInputTokens"))
    write = c(u.get("cacheWriteInputTokens"))
    write_1h = sum(
        c(d.get("inputTokens"))
        for d in items(u.get("cacheDetails"))
        if isinstance(d, dict) and d.get("ttl") == "1h"
    )
    usage = TokenUsage(
        input_tokens=c(u.get("inputTokens")) + read + write,
        output_tokens=c(u.get("outputTokens")),
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=min(write_1h, write),
    )
    return None if c.unreadable else usage


def _content_texts(content: Any, texts: list[str]) -> None:
    for block in items(content):
        if not isinstance(block, dict):
            continue
        text = block.get("text")
        if isinstance(text, str) and text:
            texts.append(text)
        reasoning = dig(block, "reasoningContent", "reasoningText", "text")
        if isinstance(reasoning, str) and reasoning:
            texts.append(reasoning)
        if isinstance(block.get("toolUse"), dict):
            texts.append(str(block["toolUse"].get("name") or ""))
            texts.append(compact(block["toolUse"].get("input")))


def extract_json(endpoint: str, obj: Any, headers: Mapping[str, str] | None = None) -> Extracted:
    if endpoint == "invoke":
        return _extract_invoke(obj, header_usage(headers))
    ex = Extracted()
    if not isinstance(obj, dict):
        return ex
    ex.seen = True
    u = obj.get("usage")
    if isinstance(u, dict):
        ex.usage = usage_from(u)
    _content_texts(dig(obj, "output", "message", "content"), ex.texts)
    return ex


# --- responses: InvokeModel ---------------------------------------------------------------

_HEADER = "x-amzn-bedrock-{}-token-count"


def _count(value: Any) -> int | None:
    text = value.strip() if isinstance(value, str) else ""
    # 18 digits hold any count a call may have (10^18) and stay within int()'s digit limit.
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def counts_usage(input_tokens: int, output_tokens: int, read: int, write: int) -> TokenUsage:
    """Bedrock's own counts (headers, invocation metrics): the input count leaves the cache
    reads and writes out, as Converse's does."""
    return TokenUsage(
        input_tokens=input_tokens + read + write,
        output_tokens=output_tokens,
        cache_read_tokens=read,
        cache_write_tokens=write,
    )


def header_usage(headers: Mapping[str, str] | None) -> TokenUsage | None:
    """The usage an InvokeModel answer's X-Amzn-Bedrock-*-Token-Count headers report, or None."""
    if not headers:
        return None
    lowered = {str(k).lower(): v for k, v in headers.items()}
    raw = {
        key: lowered.get(_HEADER.format(key))
        for key in ("input", "output", "cache-read-input", "cache-write-input")
    }
    found = {key: _count(value) for key, value in raw.items()}
    if found["input"] is None and found["output"] is None:
        return None
    if any(raw[key] is not None and found[key] is None for key in raw):
        # One count unreadable: the others alone would charge its tokens as 0. The body's
        # own fields (or the text counted) are charged instead.
        return None
    return counts_usage(*(found[k] or 0 for k in found))


def metrics_usage(metrics: Any) -> TokenUsage | None:
    """A stream's `amazon-bedrock-invocationMetrics` as usage, or None (a count in them that
    cannot be read: the others alone would charge its tokens as 0, as a header's)."""
    if not isinstance(metrics, dict) or all(
        metrics.get(k) is None for k in ("inputTokenCount", "outputTokenCount")
    ):
        return None
    c = Counts()
    usage = counts_usage(
        c(metrics.get("inputTokenCount")),
        c(metrics.get("outputTokenCount")),
        c(metrics.get("cacheReadInputTokenCount")),
        c(metrics.get("cacheWriteInputTokenCount")),
    )
    return None if c.unreadable else usage


def _is_anthropic(obj: dict[str, Any]) -> bool:
    """An Anthropic message or stream event (Claude's invoke answer, whatever its model id)."""
    etype = obj.get("type")
    return isinstance(etype, str) and (
        etype in ("message", "ping", "error") or etype.startswith(("message_", "content_block_"))
    )


def _extract_invoke(obj: Any, counted: TokenUsage | None) -> Extracted:
    if isinstance(obj, dict) and _is_anthropic(obj):
        ex = anthropic.extract_json(obj)
        if ex.usage is None:  # Anthropic's usage first: it alone splits the 1 h cache writes
            ex.usage = counted
    else:
        ex = Extracted()
        if isinstance(obj, dict):
            ex.seen = True
            _invoke_texts(obj, ex.texts)
            ex.usage = _body_usage(obj, final=True)
        ex.usage = counted or ex.usage  # what Bedrock counts, else the family's own fields
    ex.model = None  # priced on the path's modelId (see the module doc)
    return ex


def _body_usage(obj: dict[str, Any], *, final: bool) -> TokenUsage | None:
    """A family's own usage fields: Nova `usage` (Converse's names, or its invoke's
    `cache*InputTokenCount`), OpenAI-style `usage`, Llama's and Titan's counts, Cohere's
    billed units. Llama's and Titan's counts are final in a JSON answer (`final`). None when
    a count in them cannot be read: the reply is then counted."""
    c = Counts()
    usage = _family_usage(obj, final, c)
    return None if c.unreadable else usage


def _family_usage(obj: dict[str, Any], final: bool, c: Counts) -> TokenUsage | None:
    u = obj.get("usage")
    if isinstance(u, dict) and "inputTokens" in u:
        return counts_usage(
            c(u.get("inputTokens")),
            c(u.get("outputTokens")),
            c(u.get("cacheReadInputTokens", u.get("cacheReadInputTokenCount"))),
            c(u.get("cacheWriteInputTokens", u.get("cacheWriteInputTokenCount"))),
        )
    if isinstance(u, dict) and "prompt_tokens" in u:
        prompt = c(u.get("prompt_tokens"))  # includes its cached tokens, as OpenAI's
        cached = min(c(dig(u, "prompt_tokens_details", "cached_tokens")), prompt)
        return TokenUsage(
            input_tokens=prompt,
            output_tokens=c(u.get("completion_tokens")),
            cache_read_tokens=cached,
        )
    billed = dig(obj, "meta", "billed_units")
    if isinstance(billed, dict) and "input_tokens" in billed:
        return TokenUsage(
            input_tokens=c(billed.get("input_tokens")),
            output_tokens=c(billed.get("output_tokens")),
        )
    if final and isinstance(obj.get("prompt_token_count"), int):
        return TokenUsage(
            input_tokens=c(obj["prompt_token_count"]),
            output_tokens=c(obj.get("generation_token_count")),
        )
    if final and isinstance(obj.get("inputTextTokenCount"), int):
        results = [r for r in items(obj.get("results")) if isinstance(r, dict)]
        return TokenUsage(
            input_tokens=c(obj["inputTextTokenCount"]),
            output_tokens=sum(c(r.get("tokenCount")) for r in results),
        )
    return None


def _invoke_texts(obj: dict[str, Any], texts: list[str]) -> None:
    """The generated text of an invoke answer or stream chunk, whatever its family's shape."""
    _content_texts(dig(obj, "output", "message", "content"), texts)  # Nova
    delta = dig(obj, "contentBlockDelta", "delta")  # a Nova stream chunk
    for piece in (
        dig(delta, "text"),
        dig(delta, "toolUse", "input"),
        dig(delta, "reasoningContent", "text"),
        dig(obj, "contentBlockStart", "start", "toolUse", "name"),
        obj.get("generation"),  # Llama
        obj.get("outputText"),  # a Titan stream chunk
        obj.get("text"),  # Cohere Command R
    ):
        if isinstance(piece, str) and piece:
            texts.append(piece)
    for choice in items(obj.get("choices")):  # OpenAI-style (gpt-oss, Mistral, DeepSeek...)
        for part in (dig(choice, "message"), dig(choice, "delta")):
            if isinstance(part, dict):
                for key in ("content", "reasoning_content", "reasoning"):
                    if isinstance(part.get(key), str) and part[key]:
                        texts.append(part[key])
                for call in items(part.get("tool_calls")):
                    texts.append(compact(dig(call, "function")))
        if isinstance(dig(choice, "text"), str):  # completions-style
            texts.append(choice["text"])
    for key, path in (
        ("results", ("outputText",)),  # Titan
        ("outputs", ("text",)),  # Mistral's prompt format
        ("generations", ("text",)),  # Cohere Command
        ("completions", ("data", "text")),  # AI21 Jurassic-2
    ):
        for entry in items(obj.get(key)):
            piece = dig(entry, *path)
            if isinstance(piece, str) and piece:
                texts.append(piece)


class ConverseStream:
    """ConverseStream events by `:event-type`; usage in the `metadata` event."""

    def __init__(self) -> None:
        self._ex = Extracted()

    def on_event(self, event: str | None, data: bytes) -> bool:
        obj = loads(data)
        if not isinstance(obj, dict):
            return True
        ex = self._ex
        ex.seen = True
        if event == "contentBlockDelta":
            delta = obj.get("delta")
            for piece in (
                dig(delta, "text"),
                dig(delta, "toolUse", "input"),
                dig(delta, "reasoningContent", "text"),
            ):
                if isinstance(piece, str) and piece:
                    ex.texts.append(piece)
        elif event == "contentBlockStart":
            name = dig(obj, "start", "toolUse", "name")
            if isinstance(name, str):
                ex.texts.append(name)
        elif event == "metadata" and isinstance(obj.get("usage"), dict):
            ex.usage = usage_from(obj["usage"]) or ex.usage  # unreadable: the text counted
        return True

    def result(self) -> Extracted:
        return self._ex


class InvokeStream:
    """InvokeModelWithResponseStream: `chunk` events whose `bytes` (base64) is one JSON chunk of
    the family's own stream. Claude's are Anthropic stream events, fed to
    anthropic.MessagesStream; the others' text and usage fields are read as they come. The last
    chunk carries Bedrock's own counts (`amazon-bedrock-invocationMetrics`)."""

    def __init__(self) -> None:
        self._messages = anthropic.MessagesStream()
        self._claude = False
        self._ex = Extracted()
        self._metrics: TokenUsage | None = None
        self._usage: TokenUsage | None = None  # a family's final usage (Nova metadata...)
        self._input: int | None = None  # Llama's / Titan's running counts
        self._output = 0
        self._done = False

    def on_event(self, event: str | None, data: bytes) -> bool:
        if event != "chunk":
            return True
        encoded = dig(loads(data), "bytes")
        if not isinstance(encoded, str):
            return True
        try:
            decoded = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return True
        obj = loads(decoded)
        if not isinstance(obj, dict):
            return True
        self._metrics = metrics_usage(obj.get("amazon-bedrock-invocationMetrics")) or self._metrics
        if _is_anthropic(obj):
            self._claude = True
            return self._messages.on_event(None, decoded)
        self._ex.seen = True
        _invoke_texts(obj, self._ex.texts)
        usage = _body_usage(dig(obj, "metadata") or obj, final=False)
        if usage is not None:
            self._usage = usage
        for key_in, key_out, key_stop in (
            ("prompt_token_count", "generation_token_count", "stop_reason"),  # Llama
            ("inputTextTokenCount", "totalOutputTextTokenCount", "completionReason"),  # Titan
        ):
            # A count that cannot be read leaves the one read before (or none).
            n_in, n_out = count(obj.get(key_in)), count(obj.get(key_out))
            if isinstance(obj.get(key_in), int) and n_in is not None:
                self._input = n_in
            if isinstance(obj.get(key_out), int) and n_out is not None:
                self._output = max(self._output, n_out)  # cumulative
            if obj.get(key_stop) is not None and (key_in in obj or key_out in obj):
                self._done = True
        return True

    def result(self) -> Extracted:
        if self._claude:
            ex = self._messages.result()
            if ex.usage is None and self._metrics is not None:
                ex.usage, ex.early_usage = self._metrics, None
        else:
            ex = Extracted(seen=self._ex.seen, texts=list(self._ex.texts))
            ex.usage = self._metrics or self._usage
            if ex.usage is None and self._input is not None:
                counts = TokenUsage(input_tokens=self._input, output_tokens=self._output)
                if self._done:
                    ex.usage = counts
                else:  # cut short: the output streamed so far is counted too
                    ex.early_usage = counts
        ex.model = None  # priced on the path's modelId (see the module doc)
        return ex


class EventStreamReader:
    """Incremental reader of AWS event-stream messages: bytes in, as they arrive (cut
    anywhere), `on_event(:event-type, payload)` out for each complete event message. A bad
    CRC or length raises botocore's ParserError: the caller stops reading (the bytes still
    flow). Exception messages (`:message-type: exception`) carry no usage and are skipped.

    Messages are framed here, by their prelude's total length, and botocore parses one whole
    message at a time: its buffer appends by copying (`bytes +=`) and slices what is left after
    each message, so a message trickled in 1 KiB pieces, or a chunk of thousands of tiny
    messages, cost time that grew with the square of its size, on the event loop (an upstream
    sending 24 MB so stalled every agent for 85 s)."""

    def __init__(self, on_event: Callable[[str | None, bytes], bool]) -> None:
        from botocore.eventstream import EventStreamBuffer  # ~20 ms: only once a stream opens

        self._buffer = EventStreamBuffer()  # given one whole message at a time
        self._pending = bytearray()  # the bytes of messages not yet whole
        self._on_event = on_event
        self.events = 0

    def feed(self, data: bytes) -> None:
        from botocore.eventstream import InvalidPayloadLength

        self._pending += data
        while len(self._pending) >= _PRELUDE_BYTES:
            total = int.from_bytes(self._pending[:4], "big")
            if not _PRELUDE_BYTES + 4 <= total <= MAX_EVENT_MESSAGE:
                # Shorter than a prelude and a CRC, or past botocore's own limits: botocore
                # would consume another length than framed here (or wait for 4 GB).
                raise InvalidPayloadLength(total)
            if len(self._pending) < total:
                return  # the rest of this message is still to come
            message_bytes = bytes(self._pending[:total])
            del self._pending[:total]  # a bytearray drops its head without copying the rest
            self._buffer.add_data(message_bytes)
            for message in self._buffer:
                self._deliver(message)

    def _deliver(self, message: Any) -> None:
        headers = message.headers
        if headers.get(":message-type", "event") != "event":
            return
        event = headers.get(":event-type")
        self.events += 1
        try:
            self._on_event(event if isinstance(event, str) else None, message.payload)
        except Exception:  # a handler bug must never break the stream
            pass


# An event-stream message: a 12-byte prelude (total length, headers length, prelude CRC),
# headers (botocore allows 128 KiB), the payload (24 MiB), the message CRC.
_PRELUDE_BYTES = 12
MAX_EVENT_MESSAGE = 12 + 128 * 1024 + 24 * 1024 * 1024 + 4
