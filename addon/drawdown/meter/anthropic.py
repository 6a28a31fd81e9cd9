"""Anthropic Messages API: request estimates and usage from JSON bodies and SSE streams.

Usage rules (see the corpus README):
* `input_tokens` excludes cache reads and writes; the billed input is the sum of the three.
* In streams `message_start.message.usage` comes first and `message_delta.usage` carries
  the final, cumulative figures; a field present in the delta replaces the start's value.
* `usage.iterations[]` (compaction, advisor tool) lists every sampling pass of the call.
  When present, it is what is billed: iterations without a `model` (or with the request's
  model) are summed into the call's usage (the top level covers only the last pass after a
  compaction); iterations on another model (the advisor) are billed at that model's price
  and reported in Measurement.other_models.
"""

from __future__ import annotations

import re
from typing import Any

from . import images
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
    opt_bool,
    opt_int,
    req_list,
)
from .prices import price_variant
from .types import MeterRequestError, TokenUsage

# Tokens Anthropic adds to the system prompt when tools are offered ("Tool use > Pricing":
# 346 for tool_choice auto/none, 313 for any/tool on current models). In Claude tokens.
TOOLS_SYSTEM_PROMPT_TOKENS = 346
# Framing per message (role markers) and per request, in tiktoken units; measured on the
# corpus, see ESTIMATION.md.
MESSAGE_OVERHEAD = 4
REQUEST_OVERHEAD = 6
# Hidden prompt tokens, in Claude tokens, measured on the recorded corpus (ESTIMATION.md):
# extended thinking (-07, -13, -14) and server tools' own instructions on the first pass
# (web_search -17, tool_search -12, advisor -09/-16). What a server tool fetches later
# (search results) is billed too but cannot be known before the call.
THINKING_TOKENS = 30
SERVER_TOOL_TOKENS = {"web_search_": 2300, "tool_search_tool_": 200, "advisor_": 750}
# Searches reserved for a web_search tool that sets no max_uses (the model decides how many).
WEB_SEARCHES_RESERVED = 5

_VERTEX = re.compile(r"/publishers/anthropic/models/([^/:]+):(streamRawPredict|rawPredict)$")


def route(method: str, path: str) -> tuple[str, str | None, bool]:
    """(endpoint, model from the path or None, stream implied by the path)."""
    p = path.rstrip("/")
    if method.upper() != "POST":
        return "other", None, False
    if p.endswith("/v1/messages"):
        return "messages", None, False
    if p.endswith("/v1/messages/count_tokens"):
        return "messages.count_tokens", None, False
    m = _VERTEX.search(p)  # Claude on Vertex AI: the model is in the path
    if m:
        return "messages", m.group(1), m.group(2) == "streamRawPredict"
    return "other", None, False


# --- requests ---------------------------------------------------------------------------


def parse_request(body: dict[str, Any], path_model: str | None, path_stream: bool) -> ParsedRequest:
    model = body.get("model", path_model)
    if model is None:
        raise MeterRequestError("model is missing from the request body")
    if not isinstance(model, str) or not model.strip():
        raise MeterRequestError(f"model must be a non-empty string, not {kind(model)}")
    parsed = ParsedRequest(
        endpoint="messages", model=model, stream=opt_bool(body, "stream") or path_stream
    )
    # Fast mode (`speed: "fast"`) bills every token at its own, higher price.
    price_variant(parsed.price_context, "speed", body.get("speed"))
    prompt = parsed.prompt
    prompt.overhead += REQUEST_OVERHEAD
    system = body.get("system")
    if isinstance(system, list):
        _blocks(system, prompt, "system")
    elif system is not None and not isinstance(system, str):
        raise MeterRequestError(f"system must be a string or an array, not {kind(system)}")
    else:
        prompt.add(system)
    for i, msg in enumerate(req_list(body, "messages")):
        if not isinstance(msg, dict):
            raise MeterRequestError(f"messages[{i}] must be an object, not {kind(msg)}")
        prompt.overhead += MESSAGE_OVERHEAD
        content = msg.get("content")
        if isinstance(content, list):
            _blocks(content, prompt, f"messages[{i}].content")
        elif content is None or isinstance(content, str):
            prompt.add(content)
        else:
            raise MeterRequestError(
                f"messages[{i}].content must be a string or an array, not {kind(content)}"
            )
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise MeterRequestError(f"tools must be an array, not {kind(tools)}")
        prompt.add(tools)
        prompt.exact += TOOLS_SYSTEM_PROMPT_TOKENS
        for tool in tools:
            ttype = tool.get("type") if isinstance(tool, dict) else None
            for prefix, tokens in SERVER_TOOL_TOKENS.items():
                if isinstance(ttype, str) and ttype.startswith(prefix):
                    prompt.exact += tokens
            if isinstance(ttype, str) and ttype.startswith("web_search_"):
                # Billed per search ($10 per 1,000): up to max_uses, else a few.
                uses = opt_int(tool, "max_uses") or WEB_SEARCHES_RESERVED
                reserved = parsed.reserved_extras
                reserved["web_search_calls"] = reserved.get("web_search_calls", 0) + uses
    if dig(body, "thinking", "type") in ("enabled", "adaptive"):
        prompt.exact += THINKING_TOKENS
    fmt = dig(body, "output_format", "schema") or dig(body, "output_config", "format", "schema")
    if fmt:
        prompt.add(fmt)
    parsed.cap = opt_int(body, "max_tokens")
    return parsed


def _blocks(blocks: list[Any], prompt: Prompt, where: str) -> None:
    for block in blocks:
        if isinstance(block, str):
            prompt.add(block)
            continue
        if not isinstance(block, dict):
            continue
        btype = block.get("type")
        if btype == "text":
            prompt.add(block.get("text"))
        elif btype == "image":
            prompt.exact += _image(block.get("source"))
        elif btype == "document":
            _document(block, prompt)
        elif btype in ("tool_use", "server_tool_use"):
            prompt.add(block.get("name"))
            prompt.add(block.get("input"))
        elif btype == "tool_result":
            content = block.get("content")
            if isinstance(content, list):
                _blocks(content, prompt, where)
            else:
                prompt.add(content)
        elif btype == "thinking":
            prompt.add(block.get("thinking"))
        elif btype == "redacted_thinking":
            pass  # encrypted and dropped from earlier turns' context
        elif btype == "search_result":
            prompt.add(block.get("title"))
            prompt.add(block.get("source"))
            content = block.get("content")
            if isinstance(content, list):
                _blocks(content, prompt, where)
        else:
            # web_search_tool_result, web_fetch_tool_result, container_upload, ...
            prompt.add({k: v for k, v in block.items() if k not in ("cache_control", "citations")})


def _image(source: Any) -> int:
    size = None
    if isinstance(source, dict) and source.get("type") == "base64":
        data = source.get("data")
        if isinstance(data, str):
            size = images.size_from_b64(data)
    return images.anthropic_image_tokens(size)


def _document(block: dict[str, Any], prompt: Prompt) -> None:
    prompt.add(block.get("title"))
    prompt.add(block.get("context"))
    source = block.get("source")
    if not isinstance(source, dict):
        prompt.exact += images.UNKNOWN_MEDIA_TOKENS
        return
    stype = source.get("type")
    if stype == "text":
        prompt.add(source.get("data"))
    elif stype == "content":
        content = source.get("content")
        if isinstance(content, list):
            _blocks(content, prompt, "document")
        else:
            prompt.add(content)
    elif stype == "base64":
        data = source.get("data")
        prompt.exact += images.media_tokens(
            "anthropic",
            source.get("media_type") or "application/pdf",
            data if isinstance(data, str) else None,
            prompt.texts,
        )
    else:  # url, file
        prompt.exact += images.UNKNOWN_MEDIA_TOKENS


# --- responses --------------------------------------------------------------------------


# The counts a stream's message_delta overlays on message_start's.
_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


def usage_from(u: dict[str, Any]) -> TokenUsage | None:
    """One Anthropic usage object (top level, message_start, or an iteration); None when a
    count in it cannot be read."""
    c = Counts()
    fresh = c(u.get("input_tokens"))
    read = c(u.get("cache_read_input_tokens"))
    cc = u.get("cache_creation") if isinstance(u.get("cache_creation"), dict) else {}
    write_1h = c(cc.get("ephemeral_1h_input_tokens"))
    write = u.get("cache_creation_input_tokens")
    write = c(write) if write is not None else c(cc.get("ephemeral_5m_input_tokens")) + write_1h
    usage = TokenUsage(
        input_tokens=fresh + read + write,
        output_tokens=c(u.get("output_tokens")),
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=min(write_1h, write),
        reasoning_tokens=c(dig(u, "output_tokens_details", "thinking_tokens")),
    )
    return None if c.unreadable else usage


def billed(u: dict[str, Any], model: str | None) -> tuple[TokenUsage | None, dict[str, TokenUsage]]:
    """(usage billed on the call's model, usage billed on other models) per the module doc;
    (None, {}) when a count cannot be read: the next source is charged instead."""
    iterations = u.get("iterations")
    if not isinstance(iterations, list) or not any(isinstance(it, dict) for it in iterations):
        return usage_from(u), {}
    own = TokenUsage()
    other: dict[str, TokenUsage] = {}
    for it in iterations:
        if not isinstance(it, dict):
            continue
        one = usage_from(it)
        if one is None:
            return None, {}
        it_model = it.get("model")
        if isinstance(it_model, str) and it_model and it_model != model:
            other[it_model] = other.get(it_model, TokenUsage()) + one
        else:
            own = own + one
    # Thinking tokens are reported only at the top level; keep them as a subset.
    thinking = count(dig(u, "output_tokens_details", "thinking_tokens"))
    if thinking is None and dig(u, "output_tokens_details", "thinking_tokens") is not None:
        return None, {}
    reasoning = min(thinking or 0, own.output_tokens)
    own = TokenUsage(**{**own.__dict__, "reasoning_tokens": reasoning})
    return own, other


# usage.server_tool_use's counts -> the extras they are billed as, and the names of the
# server_tool_use content blocks each counts (one block, one request).
_SERVER_TOOLS = (
    ("web_search_requests", "web_search_calls", ("web_search",)),
    ("web_fetch_requests", "web_fetch_calls", ("web_fetch",)),
    (
        "code_execution_requests",
        "code_execution_calls",
        ("code_execution", "bash_code_execution", "text_editor_code_execution"),
    ),
)


def _server_tools(u: dict[str, Any], ex: Extracted, used: dict[str, int]) -> None:
    """usage.server_tool_use's requests as extras. A count that cannot be read is not 0:
    the answer's server_tool_use blocks of that tool are counted instead (`used`: name ->
    blocks)."""
    stu = u.get("server_tool_use")
    if not isinstance(stu, dict):
        return
    for src, dst, names in _SERVER_TOOLS:
        value = stu.get(src)
        n = count(value)
        if n is None and value is not None:
            n = sum(used.get(name, 0) for name in names)
        if n:
            ex.extras[dst] = n


def _tool_use(block: Any, used: dict[str, int]) -> None:
    """Count a server_tool_use content block by its tool's name."""
    if isinstance(block, dict) and block.get("type") == "server_tool_use":
        name = block.get("name")
        if isinstance(name, str):
            used[name] = used.get(name, 0) + 1


def _content_texts(content: Any, texts: list[str]) -> None:
    for block in items(content):
        if not isinstance(block, dict):
            continue
        for key in ("text", "thinking"):
            v = block.get(key)
            if isinstance(v, str) and v:
                texts.append(v)
        if block.get("type") in ("tool_use", "server_tool_use"):
            texts.append(str(block.get("name") or ""))
            texts.append(compact(block.get("input")))


def extract_json(obj: Any) -> Extracted:
    ex = Extracted()
    if not isinstance(obj, dict):
        return ex
    ex.seen = True
    if isinstance(obj.get("model"), str):
        ex.model = obj["model"]
    u = obj.get("usage")
    if isinstance(u, dict):
        ex.usage, ex.other_models = billed(u, ex.model)
        used: dict[str, int] = {}
        for block in items(obj.get("content")):
            _tool_use(block, used)
        _server_tools(u, ex, used)
        price_variant(ex.price_context, "speed", u.get("speed"))
    _content_texts(obj.get("content"), ex.texts)
    return ex


class MessagesStream:
    """message_start (usage: input side + first output) ... message_delta (final usage)."""

    def __init__(self) -> None:
        self._ex = Extracted()
        self._start: dict[str, Any] | None = None
        self._delta: dict[str, Any] | None = None
        self._unread_output = False  # a delta's output_tokens could not be read
        self._used: dict[str, int] = {}  # server_tool_use blocks, by tool name

    def on_event(self, event: str | None, data: bytes) -> bool:
        obj = loads(data)
        if not isinstance(obj, dict):
            return True
        self._ex.seen = True
        etype = obj.get("type") or event
        ex = self._ex
        if etype == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "partial_json", "thinking", "content"):
                    v = delta.get(key)
                    if isinstance(v, str) and v:
                        ex.texts.append(v)
                        break
        elif etype == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, dict) and isinstance(block.get("name"), str):
                ex.texts.append(block["name"])
            _tool_use(block, self._used)
        elif etype == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                if isinstance(msg.get("model"), str):
                    ex.model = msg["model"]
                if isinstance(msg.get("usage"), dict):
                    self._start = msg["usage"]
        elif etype == "message_delta":
            u = obj.get("usage")
            if isinstance(u, dict):
                unread = u.get("output_tokens") is not None and count(u["output_tokens"]) is None
                self._unread_output = self._unread_output or unread
                # Cumulative: a later delta supersedes an earlier one field by field, but
                # a count it holds that cannot be read leaves the earlier (or the start's).
                self._delta = {
                    **(self._delta or {}),
                    **{
                        k: v
                        for k, v in u.items()
                        if v is not None and (k not in _COUNTS or count(v) is not None)
                    },
                }
        return True

    def result(self) -> Extracted:
        ex = self._ex
        ex.extras, ex.usage, ex.early_usage, ex.other_models = {}, None, None, {}
        if self._delta is not None:
            merged = {**(self._start or {}), **self._delta}
            if "cache_creation" not in self._delta and "cache_creation_input_tokens" in self._delta:
                # The split (5m/1h) is only in message_start; keep it within the final total.
                cc = merged.get("cache_creation")
                cc = dict(cc) if isinstance(cc, dict) else {}
                total = count(self._delta["cache_creation_input_tokens"]) or 0
                cc["ephemeral_1h_input_tokens"] = min(
                    count(cc.get("ephemeral_1h_input_tokens")) or 0, total
                )
                merged["cache_creation"] = cc
            if "output_tokens" in self._delta or not self._unread_output:
                ex.usage, ex.other_models = billed(merged, ex.model)
                _server_tools(merged, ex, self._used)
            else:  # message_start's output is not final: the input side, the text counted
                ex.early_usage = usage_from(merged)
        if ex.usage is None and ex.early_usage is None and self._start is not None:
            ex.early_usage = usage_from(self._start)
        usage = {**(self._start or {}), **(self._delta or {})}
        price_variant(ex.price_context, "speed", usage.get("speed"))
        return ex
