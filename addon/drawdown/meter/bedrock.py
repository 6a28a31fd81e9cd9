"""Amazon Bedrock Runtime: Converse / ConverseStream for every model, InvokeModel(WithResponseStream)
for Anthropic Claude (whose body is Anthropic's Messages format, metered by anthropic.py).

Usage rules:
* Converse `usage.inputTokens` excludes cache reads and writes (`totalTokens` is their sum with
  the output); the billed input is inputTokens + cacheReadInputTokens + cacheWriteInputTokens.
  `cacheDetails[]` splits the writes by TTL ("5m", "1h": priced apart).
* ConverseStream reports that usage once, in its `metadata` event.
* Streams are AWS's binary event-stream framing (application/vnd.amazon.eventstream), parsed
  with botocore's CRC-checked EventStreamBuffer, imported when the first stream opens.
  InvokeModelWithResponseStream wraps each Anthropic SSE event, base64, in a `chunk` event.
* The call is priced on the path's modelId (what Bedrock bills: a `global.` inference profile
  costs less than a regional one), never on the model name a Claude response echoes.

A Bedrock request is SigV4-signed over its body and headers: it is only ever read.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from . import anthropic, images
from ._util import (
    Extracted,
    ParsedRequest,
    Prompt,
    as_int,
    compact,
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


def metered(endpoint: str, model: str | None) -> bool:
    """Converse speaks one format for every model; an InvokeModel body is the model family's
    own, and only Claude's (Anthropic Messages) is read. Other families' invokes are $0 steps."""
    return endpoint == "converse" or (endpoint == "invoke" and is_claude(model))


# --- requests ---------------------------------------------------------------------------


def parse_request(endpoint: str, model: str, stream: bool, body: dict[str, Any]) -> ParsedRequest:
    if endpoint == "invoke":
        # No `model` in the body: Bedrock names it in the path (and rejects the field).
        parsed = anthropic.parse_request({**body, "model": model}, model, stream)
        parsed.endpoint, parsed.stream = "invoke", stream
        return parsed
    return _parse_converse(model, stream, body)


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


def usage_from(u: dict[str, Any]) -> TokenUsage:
    """A Converse TokenUsage object."""
    read = as_int(u.get("cacheReadInputTokens"))
    write = as_int(u.get("cacheWriteInputTokens"))
    write_1h = sum(
        as_int(d.get("inputTokens"))
        for d in items(u.get("cacheDetails"))
        if isinstance(d, dict) and d.get("ttl") == "1h"
    )
    return TokenUsage(
        input_tokens=as_int(u.get("inputTokens")) + read + write,
        output_tokens=as_int(u.get("outputTokens")),
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=min(write_1h, write),
    )


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


def extract_json(endpoint: str, obj: Any) -> Extracted:
    if endpoint == "invoke":
        ex = anthropic.extract_json(obj)
        ex.model = None  # priced on the path's modelId (see the module doc)
        return ex
    ex = Extracted()
    if not isinstance(obj, dict):
        return ex
    ex.seen = True
    u = obj.get("usage")
    if isinstance(u, dict):
        ex.usage = usage_from(u)
    _content_texts(dig(obj, "output", "message", "content"), ex.texts)
    return ex


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
            ex.usage = usage_from(obj["usage"])
        return True

    def result(self) -> Extracted:
        return self._ex


class InvokeStream:
    """InvokeModelWithResponseStream for Claude: `chunk` events whose `bytes` (base64) is one
    Anthropic stream event, fed to anthropic.MessagesStream."""

    def __init__(self) -> None:
        self._messages = anthropic.MessagesStream()

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
        return self._messages.on_event(None, decoded)

    def result(self) -> Extracted:
        ex = self._messages.result()
        ex.model = None  # priced on the path's modelId (see the module doc)
        return ex


class EventStreamReader:
    """Incremental reader of AWS event-stream messages: bytes in, as they arrive (cut
    anywhere), `on_event(:event-type, payload)` out for each complete event message. A bad
    CRC or length raises botocore's ParserError: the caller stops reading (the bytes still
    flow). Exception messages (`:message-type: exception`) carry no usage and are skipped."""

    def __init__(self, on_event: Callable[[str | None, bytes], bool]) -> None:
        from botocore.eventstream import EventStreamBuffer  # ~20 ms: only once a stream opens

        self._buffer = EventStreamBuffer()
        self._on_event = on_event
        self.events = 0

    def feed(self, data: bytes) -> None:
        self._buffer.add_data(data)
        for message in self._buffer:
            headers = message.headers
            if headers.get(":message-type", "event") != "event":
                continue
            event = headers.get(":event-type")
            self.events += 1
            try:
                self._on_event(event if isinstance(event, str) else None, message.payload)
            except Exception:  # a handler bug must never break the stream
                pass
