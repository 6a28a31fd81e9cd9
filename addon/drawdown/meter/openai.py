"""OpenAI (and Azure OpenAI / OpenAI-compatible) chat completions, Responses, legacy
completions and embeddings: request estimates and usage from JSON bodies and SSE streams."""

from __future__ import annotations

import re
from typing import Any

from . import images, openai_audio, openai_images, openai_transcribe
from ._util import (
    Counts,
    Extracted,
    ParsedRequest,
    Prompt,
    compact,
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

# Framing tokens per chat message and for priming the reply (OpenAI cookbook,
# "How to count tokens with tiktoken").
MESSAGE_OVERHEAD = 3
REPLY_PRIMING = 3

# Reasoning models (gpt-5*, o-series) add a preamble of about this many tokens to chat
# requests that carry tools (measured: chat-completions-02/-03, see ESTIMATION.md).
REASONING_TOOLS_OVERHEAD = 70
_REASONING_PREFIXES = ("gpt-5", "o1", "o3", "o4")
# Reasoning items carried back in a tool-call loop are billed as input but sent back only
# in encrypted form; measured ~9.5 base64 characters per token (responses-10).
ENCRYPTED_CHARS_PER_TOKEN = 8

# The Responses API's image_generation tool draws with this model unless it names another.
IMAGE_TOOL_MODEL = "gpt-image-1"

_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/")

_TERMINAL_RESPONSE_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)
_RESPONSES_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
        "response.code_interpreter_call_code.delta",
        "response.output_audio_transcript.delta",
    }
)
# Responses output items billed per call, outside `usage`.
_TOOL_ITEMS = {
    "web_search_call": "web_search_calls",
    "file_search_call": "file_search_calls",
    "code_interpreter_call": "code_interpreter_calls",
    "image_generation_call": "image_generation_calls",
}


def route(method: str, path: str) -> tuple[str, str | None]:
    """(endpoint, Azure deployment or None) for a request path (no query string)."""
    p = path.rstrip("/")
    m = _AZURE_DEPLOYMENT.search(p + "/")
    deployment = m.group(1) if m else None
    if method.upper() != "POST":
        return "other", deployment
    if p.endswith("/chat/completions"):
        return "chat.completions", deployment
    if p.endswith("/completions"):
        return "completions", deployment
    if p.endswith("/responses"):
        return "responses", deployment
    if p.endswith("/embeddings"):
        return "embeddings", deployment
    endpoint = openai_images.route(p) or openai_audio.route(p) or openai_transcribe.route(p)
    return endpoint or "other", deployment


# --- requests ---------------------------------------------------------------------------


def parse_request(
    endpoint: str, body: dict[str, Any], deployment: str | None, raw: bytes
) -> ParsedRequest:
    model = body.get("model")
    if model is None and deployment:
        model = deployment  # Azure names the model by its deployment in the path
    if not isinstance(model, str) or not model.strip():
        if model is None:
            raise MeterRequestError("model is missing from the request body")
        raise MeterRequestError(f"model must be a non-empty string, not {kind(model)}")
    parsed = ParsedRequest(endpoint=endpoint, model=model, stream=opt_bool(body, "stream"))
    price_variant(parsed.price_context, "service_tier", body.get("service_tier"))
    if endpoint == "chat.completions":
        _chat_request(body, parsed, raw)
    elif endpoint == "responses":
        _responses_request(body, parsed)
    elif endpoint == "completions":
        _completions_request(body, parsed, raw)
    elif endpoint == "embeddings":
        _embeddings_request(body, parsed)
    return parsed


def _n(body: dict[str, Any], key: str = "n") -> int:
    return max(opt_int(body, key) or 1, 1)


def _chat_request(body: dict[str, Any], parsed: ParsedRequest, raw: bytes) -> None:
    prompt = parsed.prompt
    messages = req_list(body, "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise MeterRequestError(f"messages[{i}] must be an object, not {kind(msg)}")
        prompt.overhead += MESSAGE_OVERHEAD
        prompt.add(msg.get("role"))
        if msg.get("name"):
            prompt.add(msg.get("name"))
            prompt.overhead += 1
        _chat_content(msg.get("content"), prompt, parsed.model, i)
        prompt.add(msg.get("refusal"))
        prompt.add(msg.get("reasoning_content"))  # OpenAI-compatible hosts (DeepSeek...)
        for call in items(msg.get("tool_calls")):
            if isinstance(call, dict):
                fn = call.get("function") or call.get("custom") or {}
                prompt.add(dig(fn, "name"))
                prompt.add(dig(fn, "arguments") or dig(fn, "input"))
                prompt.overhead += MESSAGE_OVERHEAD
        fc = msg.get("function_call")
        if isinstance(fc, dict):
            prompt.add(fc.get("name"))
            prompt.add(fc.get("arguments"))
    prompt.overhead += REPLY_PRIMING
    for key in ("tools", "functions"):
        if body.get(key):
            prompt.add(body[key])
            if parsed.model.lower().startswith(_REASONING_PREFIXES):
                prompt.overhead += REASONING_TOOLS_OVERHEAD
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("json_schema"):
        prompt.add(rf["json_schema"])
    cap = opt_int(body, "max_completion_tokens")
    if cap is None:
        cap = opt_int(body, "max_tokens")
    parsed.choices = _n(body)
    parsed.cap = None if cap is None else cap * parsed.choices
    if body.get("web_search_options") is not None or "search" in (parsed.model or "").lower():
        # The chat search models run a web search on every call, billed per call.
        parsed.expected_extras["web_search_calls"] = 1
    _ask_for_stream_usage(body, parsed, raw)


def _ask_for_stream_usage(body: dict[str, Any], parsed: ParsedRequest, raw: bytes) -> None:
    """A chat or legacy completions stream reports its usage only when asked: ask on the
    client's behalf, and have the stream meter remove the usage chunk it did not ask for."""
    if not parsed.stream:
        return
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise MeterRequestError(f"stream_options must be an object, not {kind(opts)}")
    if not (opts or {}).get("include_usage"):
        parsed.rewritten_body = _with_include_usage(raw, body)
        parsed.strip_usage_chunk = True


def _with_include_usage(raw: bytes, body: dict[str, Any]) -> bytes:
    """The request body with stream_options.include_usage = true.

    Without stream_options we splice the key in after the opening brace, leaving every
    other byte as the client sent it; otherwise the body is re-serialised.
    """
    if "stream_options" not in body:
        start = raw.index(b"{") + 1
        rest = raw[start:]
        sep = b"" if rest.lstrip().startswith(b"}") else b","
        return raw[:start] + b'"stream_options":{"include_usage":true}' + sep + rest
    new = dict(body)
    new["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    try:
        return compact(new).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
        import json

        return json.dumps(new, separators=(",", ":")).encode("ascii")


def _chat_content(content: Any, prompt: Prompt, model: str | None, i: int) -> None:
    if content is None or isinstance(content, str):
        prompt.add(content)
        return
    if not isinstance(content, list):
        raise MeterRequestError(
            f"messages[{i}].content must be a string or an array, not {kind(content)}"
        )
    for part in content:
        if isinstance(part, str):
            prompt.add(part)
            continue
        if not isinstance(part, dict):
            continue
        ptype = part.get("type")
        if ptype in ("text", "input_text", "output_text", "refusal"):
            prompt.add(part.get("text") or part.get("refusal"))
        elif ptype in ("image_url", "input_image"):
            img = part.get("image_url")
            url = img.get("url") if isinstance(img, dict) else img
            detail = (img.get("detail") if isinstance(img, dict) else None) or part.get("detail")
            prompt.exact += _image_tokens(url if isinstance(url, str) else None, detail, model)
        elif ptype == "input_audio":
            audio = part.get("input_audio") or {}
            fmt = audio.get("format") if isinstance(audio, dict) else None
            data = audio.get("data") if isinstance(audio, dict) else None
            prompt.exact += images.media_tokens(
                "openai",
                f"audio/{fmt or 'wav'}",
                data if isinstance(data, str) else None,
                prompt.texts,
            )
        elif ptype in ("file", "input_file"):
            f = part.get("file") if isinstance(part.get("file"), dict) else part
            _file_tokens(f, prompt)
        else:
            prompt.add(part)


def _image_tokens(url: str | None, detail: Any, model: str | None) -> int:
    size = None
    if url:
        data = images.split_data_url(url)
        if data is not None:
            size = images.size_from_b64(data[1])
    return images.openai_image_tokens(size, detail if isinstance(detail, str) else None, model)


def _file_tokens(f: dict[str, Any], prompt: Prompt) -> None:
    data = f.get("file_data")
    if isinstance(data, str):
        split = images.split_data_url(data)
        mime, b64 = split if split else ("application/pdf", data)
        prompt.exact += images.media_tokens("openai", mime, b64, prompt.texts)
    else:
        prompt.exact += images.UNKNOWN_MEDIA_TOKENS


def _responses_request(body: dict[str, Any], parsed: ParsedRequest) -> None:
    prompt = parsed.prompt
    prompt.add(body.get("instructions") if isinstance(body.get("instructions"), str) else None)
    inp = body.get("input")
    if isinstance(inp, str):
        prompt.add(inp)
        prompt.overhead += MESSAGE_OVERHEAD
    elif isinstance(inp, list):
        for i, item in enumerate(inp):
            if isinstance(item, dict):
                _responses_item(item, prompt, parsed.model, i)
            elif isinstance(item, str):
                prompt.add(item)
    elif inp is not None:
        raise MeterRequestError(f"input must be a string or an array, not {kind(inp)}")
    prompt.overhead += REPLY_PRIMING
    if body.get("tools"):
        prompt.add(body["tools"])
        _image_tool_reserve(body["tools"], parsed)
        if any(
            isinstance(t, dict) and str(t.get("type", "")).startswith("web_search")
            for t in items(body["tools"])
        ):
            parsed.reserved_extras["web_search_calls"] = 1  # billed per call: one reserved
    fmt = dig(body, "text", "format")
    if isinstance(fmt, dict) and fmt.get("schema"):
        prompt.add(fmt["schema"])
    cap = opt_int(body, "max_output_tokens")
    parsed.cap = cap


def image_tool_model(tools: Any, default: str | None = IMAGE_TOOL_MODEL) -> str | None:
    """The model of the first image_generation tool in `tools` (`default` when it names
    none), or None without one."""
    for tool in items(tools):
        if isinstance(tool, dict) and tool.get("type") == "image_generation":
            model = tool.get("model")
            return model if isinstance(model, str) and model.strip() else default
    return None


def _image_tool_reserve(tools: Any, parsed: ParsedRequest) -> None:
    """Reserve the image_generation tool's output on its own image model.

    How many images the model will make is unknown before the call (none, one, or one per
    tool call it decides on): we reserve ONE image of the requested quality and size, as
    the Images API estimate reckons it (plus its partial images), so a call that draws more
    is charged its reported usage after the fact."""
    for tool in items(tools):
        if not isinstance(tool, dict) or tool.get("type") != "image_generation":
            continue
        model = image_tool_model([tool])
        assert model is not None
        for key in ("quality", "size"):
            value = tool.get(key)
            if value is not None and not isinstance(value, str):
                raise MeterRequestError(
                    f"image_generation {key} must be a string, not {kind(value)}"
                )
        partials = opt_int(tool, "partial_images") or 0
        tokens = openai_images.output_tokens_per_image(model, tool.get("quality"), tool.get("size"))
        tokens += partials * openai_images.PARTIAL_IMAGE_TOKENS
        reserves = parsed.tool_output_reserves
        reserves[model] = reserves.get(model, 0) + tokens


def _responses_item(item: dict[str, Any], prompt: Prompt, model: str | None, i: int) -> None:
    itype = item.get("type") or "message"
    prompt.overhead += MESSAGE_OVERHEAD
    if itype == "message":
        prompt.add(item.get("role"))
        _chat_content(item.get("content"), prompt, model, i)
    elif itype in ("function_call", "custom_tool_call"):
        prompt.add(item.get("name"))
        prompt.add(item.get("arguments") or item.get("input"))
    elif itype in ("function_call_output", "custom_tool_call_output"):
        out = item.get("output")
        if isinstance(out, list):
            _chat_content(out, prompt, model, i)
        else:
            prompt.add(out)
    elif itype == "reasoning":
        for s in items(item.get("summary")):
            prompt.add(dig(s, "text"))
        for c in items(item.get("content")):
            prompt.add(dig(c, "text"))
        enc = item.get("encrypted_content")
        if isinstance(enc, str):
            prompt.exact += len(enc) // ENCRYPTED_CHARS_PER_TOKEN
    elif itype == "item_reference":
        pass  # server-side item: its size is unknown here
    else:
        # web_search_call, computer_call(_output), mcp_*...: tokenize the JSON, a fair upper bound
        prompt.add({k: v for k, v in item.items() if k not in ("id", "status")})


def _completions_request(body: dict[str, Any], parsed: ParsedRequest, raw: bytes) -> None:
    prompt = parsed.prompt
    _strings_or_tokens(body.get("prompt"), prompt, "prompt")
    prompt.add(body.get("suffix") if isinstance(body.get("suffix"), str) else None)
    cap = opt_int(body, "max_tokens")
    parsed.choices = max(_n(body), _n(body, "best_of"))
    parsed.cap = None if cap is None else cap * parsed.choices
    _ask_for_stream_usage(body, parsed, raw)


def _embeddings_request(body: dict[str, Any], parsed: ParsedRequest) -> None:
    if body.get("input") is None:
        raise MeterRequestError("input is missing from the embeddings request")
    _strings_or_tokens(body.get("input"), parsed.prompt, "input")
    parsed.cap = 0


def _strings_or_tokens(value: Any, prompt: Prompt, key: str) -> None:
    """A prompt given as a string, strings, token ids, or lists of token ids."""
    if value is None or isinstance(value, str):
        prompt.add(value)
        return
    if not isinstance(value, list):
        raise MeterRequestError(f"{key} must be a string or an array, not {kind(value)}")
    for item in value:
        if isinstance(item, str):
            prompt.add(item)
        elif isinstance(item, int):
            prompt.exact += 1
        elif isinstance(item, list):
            prompt.exact += len(item)


# --- responses --------------------------------------------------------------------------


def chat_usage(u: dict[str, Any]) -> TokenUsage | None:
    """Chat / legacy completions / embeddings `usage` (cached and audio are subsets); None
    when a count in it cannot be read (the answer is then counted)."""
    c = Counts()
    ptd = u.get("prompt_tokens_details") or {}
    ctd = u.get("completion_tokens_details") or {}
    prompt = c(u.get("prompt_tokens"))
    completion = c(u.get("completion_tokens"))
    total = c(u.get("total_tokens"))
    if not prompt and not completion and total:
        prompt = total
    # DeepSeek and some compatible hosts report cache hits at the top level.
    cache_read = c(dig(ptd, "cached_tokens")) or c(u.get("prompt_cache_hit_tokens"))
    reasoning = c(dig(ctd, "reasoning_tokens"))
    if reasoning and total >= prompt + completion + reasoning:
        # Gemini's OpenAI-compatible endpoint leaves thinking out of completion_tokens (its
        # total counts it apart); OpenAI's own completion_tokens include the reasoning.
        completion += reasoning
    usage = TokenUsage(
        input_tokens=prompt,
        output_tokens=completion,
        cache_read_tokens=cache_read,
        cache_write_tokens=c(dig(ptd, "cache_write_tokens")),
        reasoning_tokens=reasoning,
        input_audio_tokens=c(dig(ptd, "audio_tokens")),
        output_audio_tokens=c(dig(ctd, "audio_tokens")),
        input_image_tokens=c(dig(ptd, "image_tokens")),
        output_image_tokens=c(dig(ctd, "image_tokens")),
    )
    return None if c.unreadable else usage


def responses_usage(u: dict[str, Any]) -> TokenUsage | None:
    """The Responses API's `usage`; None when a count in it cannot be read."""
    c = Counts()
    itd = u.get("input_tokens_details") or {}
    otd = u.get("output_tokens_details") or {}
    usage = TokenUsage(
        input_tokens=c(u.get("input_tokens")),
        output_tokens=c(u.get("output_tokens")),
        cache_read_tokens=c(dig(itd, "cached_tokens")),
        cache_write_tokens=c(dig(itd, "cache_write_tokens")),
        reasoning_tokens=c(dig(otd, "reasoning_tokens")),
        input_image_tokens=c(dig(itd, "image_tokens")),
        output_image_tokens=c(dig(otd, "image_tokens")),
    )
    return None if c.unreadable else usage


def _tier(obj: dict[str, Any], ex: Extracted) -> None:
    price_variant(ex.price_context, "service_tier", obj.get("service_tier"))


def _chat_choice_texts(choice: Any, texts: list[str]) -> None:
    if not isinstance(choice, dict):
        return
    msg = choice.get("message") or choice.get("delta")
    if isinstance(msg, dict):
        for key in ("content", "refusal", "reasoning_content"):
            v = msg.get(key)
            if isinstance(v, str) and v:
                texts.append(v)
        transcript = dig(msg, "audio", "transcript")
        if isinstance(transcript, str):
            texts.append(transcript)
        for call in items(msg.get("tool_calls")):
            fn = dig(call, "function") or {}
            for key in ("name", "arguments"):
                v = dig(fn, key)
                if isinstance(v, str) and v:
                    texts.append(v)
    text = choice.get("text")  # legacy completions
    if isinstance(text, str) and text:
        texts.append(text)


def _responses_output(output: Any, ex: Extracted) -> None:
    counts: dict[str, int] = {}
    texts: list[str] = []
    for item in items(output):
        if not isinstance(item, dict):
            continue
        itype = item.get("type")
        if itype in _TOOL_ITEMS:
            counts[_TOOL_ITEMS[itype]] = counts.get(_TOOL_ITEMS[itype], 0) + 1
        if itype == "message":
            for c in items(item.get("content")):
                v = dig(c, "text") or dig(c, "refusal")
                if isinstance(v, str):
                    texts.append(v)
        elif itype in ("function_call", "custom_tool_call"):
            for key in ("name", "arguments", "input"):
                v = item.get(key)
                if isinstance(v, str):
                    texts.append(v)
        elif itype == "reasoning":
            for s in items(item.get("summary")):
                v = dig(s, "text")
                if isinstance(v, str):
                    texts.append(v)
        elif itype == "code_interpreter_call":
            v = item.get("code")
            if isinstance(v, str):
                texts.append(v)
    ex.extras.update(counts)
    ex.texts = texts


def _image_tool_usage(resp: dict[str, Any], ex: Extracted, request_model: str | None) -> None:
    """The image_generation tool's tokens, which the answer reports apart from `usage` (in
    `tool_usage.image_gen`, the Images API's usage shape): billed on the tool's image model,
    as echoed in the answer's `tools`, else as the request named it."""
    reported = dig(resp, "tool_usage", "image_gen")
    if not isinstance(reported, dict):
        return
    model = image_tool_model(resp.get("tools"), None) or request_model or IMAGE_TOOL_MODEL
    usage = openai_images.images_usage(reported)
    if usage is None:  # a count that cannot be read: the images drawn, counted as reserved
        usage = _image_calls_usage(resp, model, ex.usage)
    if not usage.total_tokens:
        return  # the tool was offered but not used: nothing billed on the image model
    ex.other_models = {model: usage}


def _image_calls_usage(resp: dict[str, Any], model: str, own: TokenUsage | None) -> TokenUsage:
    """The image tool's usage when what the answer reports cannot be read: each
    image_generation_call in its output one image of the tool's quality and size (as the
    reserve reckons it), its input the call's own (the image model may see it all)."""
    tool: dict[str, Any] = next(
        (
            t
            for t in items(resp.get("tools"))
            if isinstance(t, dict) and t.get("type") == "image_generation"
        ),
        {},
    )
    output = 0
    for item in items(resp.get("output")):
        if isinstance(item, dict) and item.get("type") == "image_generation_call":
            quality = item.get("quality") or tool.get("quality")
            size = item.get("size") or tool.get("size")
            output += openai_images.output_tokens_per_image(model, quality, size)
    if not output:
        return TokenUsage()
    return TokenUsage(
        input_tokens=own.input_tokens if own is not None else 0,
        output_tokens=output,
        output_image_tokens=output,
    )


def extract_json(endpoint: str, obj: Any, image_model: str | None = None) -> Extracted:
    """What a JSON answer reports; `image_model` is the request's image_generation tool
    model, for an answer that does not echo its tools."""
    ex = Extracted()
    if not isinstance(obj, dict):
        return ex
    ex.seen = True
    model = obj.get("model")
    ex.model = model if isinstance(model, str) else None
    _tier(obj, ex)
    u = obj.get("usage")
    if endpoint == "responses":
        if isinstance(u, dict):
            ex.usage = responses_usage(u)
        _image_tool_usage(obj, ex, image_model)
        _responses_output(obj.get("output"), ex)
        return ex
    if isinstance(u, dict):
        ex.usage = chat_usage(u)
    for choice in items(obj.get("choices")):
        _chat_choice_texts(choice, ex.texts)
    return ex


class ChatStream:
    """Chat completions / legacy completions SSE: `data: {chunk}` ... `data: [DONE]`."""

    def __init__(self, strip_usage_chunk: bool) -> None:
        self._strip = strip_usage_chunk
        self._ex = Extracted()

    def on_event(self, event: str | None, data: bytes) -> bool:
        if data[:6] == b"[DONE]":
            return True
        obj = loads(data)
        if not isinstance(obj, dict):
            return True
        self._ex.seen = True
        ex = self._ex
        if ex.model is None and isinstance(obj.get("model"), str):
            ex.model = obj["model"]
        if "service_tier" in obj:
            _tier(obj, ex)
        choices = obj.get("choices")
        for choice in items(choices):
            _chat_choice_texts(choice, ex.texts)
        u = obj.get("usage")
        if isinstance(u, dict):
            # An unreadable usage never replaces one read from an earlier chunk.
            ex.usage = chat_usage(u) or ex.usage
            # The usage-only chunk we asked for on the client's behalf: not for its eyes.
            if self._strip and choices == []:
                return False
        return True

    def result(self) -> Extracted:
        return self._ex


class ResponsesStream:
    """Responses API SSE: typed events; usage only on the terminal response.* event."""

    def __init__(self, image_model: str | None = None) -> None:
        self._ex = Extracted()
        self._image_model = image_model

    def on_event(self, event: str | None, data: bytes) -> bool:
        obj = loads(data)
        if not isinstance(obj, dict):
            return True
        self._ex.seen = True
        etype = obj.get("type") or event
        ex = self._ex
        if etype in _RESPONSES_TEXT_DELTAS:
            delta = obj.get("delta")
            if isinstance(delta, str):
                ex.texts.append(delta)
        elif etype == "response.output_item.done":
            itype = dig(obj, "item", "type")
            if itype in _TOOL_ITEMS:
                key = _TOOL_ITEMS[itype]
                ex.extras[key] = ex.extras.get(key, 0) + 1
        elif isinstance(obj.get("response"), dict):
            resp = obj["response"]
            if isinstance(resp.get("model"), str):
                ex.model = resp["model"]
            _tier(resp, ex)
            if etype in _TERMINAL_RESPONSE_EVENTS:
                u = resp.get("usage")
                if isinstance(u, dict):
                    ex.usage = responses_usage(u) or ex.usage
                _image_tool_usage(resp, ex, self._image_model)
                if isinstance(resp.get("output"), list) and resp["output"]:
                    streamed = ex.texts
                    ex.extras = {}
                    _responses_output(resp["output"], ex)
                    if not ex.texts:
                        ex.texts = streamed
        return True

    def result(self) -> Extracted:
        return self._ex
