"""Gemini generateContent / streamGenerateContent (AI Studio and Vertex AI).

Usage rules (see the corpus README): `usageMetadata` is cumulative in every stream chunk
(take the last, never add); billed input = promptTokenCount (which includes
cachedContentTokenCount) + toolUsePromptTokenCount; billed output = candidatesTokenCount
(absent means 0) + thoughtsTokenCount.

Google Search grounding is billed outside tokens: per grounded prompt on Gemini 2.x, per
search query on Gemini 3. We report that billed unit as extras["web_search_calls"].
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
    dig,
    items,
    kind,
    loads,
    opt_int,
    overlay,
)
from .prices import price_variant
from .types import MeterRequestError, TokenUsage

# Framing per content turn and per request, in tiktoken units; measured on the corpus, see
# ESTIMATION.md.
CONTENT_OVERHEAD = 3
REQUEST_OVERHEAD = 2

# Built-in tools add prompt and tool-use tokens on Google's side; measured on the corpus
# (googleSearch: generateContent-06, streamGenerateContent-05; codeExecution:
# generateContent-07). In Gemini tokens.
BUILTIN_TOOL_TOKENS = {
    "googleSearch": 110,
    "google_search": 110,
    "codeExecution": 2000,
    "code_execution": 2000,
}

# A model (`/models/{m}`), an AI Studio tuned model (`/tunedModels/{m}`) or a Vertex endpoint a
# model is deployed to (`/projects/{p}/locations/{l}/endpoints/{id}`), then `:{action}`.
_SEARCH_TOOLS = (
    "googleSearch",
    "google_search",
    "googleSearchRetrieval",
    "google_search_retrieval",
)
_MODEL_ACTION = re.compile(r"/(models|tunedModels|endpoints)/([^/:]+):([A-Za-z]+)$")
_ENDPOINTS = {
    "generateContent": "generateContent",
    "streamGenerateContent": "streamGenerateContent",
    "countTokens": "countTokens",
    "embedContent": "embeddings",
    "batchEmbedContents": "embeddings",
}
# Vertex's `:predict` serves embeddings (gemini-embedding-001, text-embedding-005) and Imagen
# alike: only an embedding model's is metered (its answer counts its tokens).
_EMBEDDING_MODEL = re.compile(r"embedding", re.IGNORECASE)


def route(method: str, path: str) -> tuple[str, str | None]:
    """(endpoint, model) from `/v1beta/models/{model}:{action}`, the Vertex
    `/v1/projects/{p}/locations/{l}/publishers/google/models/{model}:{action}`, a tuned model
    `/v1beta/tunedModels/{model}:{action}` or a Vertex endpoint `…/endpoints/{id}:{action}`
    (its id stands for the model until the answer names it)."""
    m = _MODEL_ACTION.search(path.rstrip("/").replace("%3A", ":").replace("%3a", ":"))
    if not m or method.upper() != "POST":
        return "other", (m.group(2) if m else None)
    kind, model, action = m.groups()
    if action == "predict":
        metered = kind == "models" and _EMBEDDING_MODEL.search(model) is not None
        return ("embeddings" if metered else "other"), model
    return _ENDPOINTS.get(action, "other"), model


def _g(obj: dict[str, Any], camel: str, snake: str) -> Any:
    # The REST API accepts both spellings (protobuf JSON).
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


# --- requests ---------------------------------------------------------------------------


def parse_request(endpoint: str, model: str | None, body: dict[str, Any]) -> ParsedRequest:
    """`model`: None for a batch file's line, which names none (batch_submit)."""
    parsed = ParsedRequest(
        endpoint=endpoint, model=model, stream=endpoint == "streamGenerateContent"
    )
    prompt = parsed.prompt
    if endpoint == "embeddings":
        requests = body.get("requests") if isinstance(body.get("requests"), list) else [body]
        for req in requests:
            if isinstance(req, dict) and isinstance(req.get("content"), dict):
                _parts(req["content"].get("parts"), prompt, model, "content")
        for instance in items(body.get("instances")):  # Vertex's :predict
            if isinstance(instance, dict):
                prompt.add(instance.get("content"))
                prompt.add(instance.get("title"))
        parsed.cap = 0
        return parsed
    # Flex and priority bill every token at prices of their own.
    price_variant(parsed.price_context, "service_tier", body.get("serviceTier"))
    prompt.overhead += REQUEST_OVERHEAD
    contents = body.get("contents")
    if contents is None:
        raise MeterRequestError("contents is missing; expected an array of contents")
    if isinstance(contents, dict):
        contents = [contents]
    if not isinstance(contents, list):
        raise MeterRequestError(f"contents must be an array, not {kind(contents)}")
    for i, content in enumerate(contents):
        if not isinstance(content, dict):
            raise MeterRequestError(f"contents[{i}] must be an object, not {kind(content)}")
        prompt.overhead += CONTENT_OVERHEAD
        _parts(content.get("parts"), prompt, model, f"contents[{i}].parts")
    system = _g(body, "systemInstruction", "system_instruction")
    if isinstance(system, dict):
        _parts(system.get("parts"), prompt, model, "systemInstruction.parts")
    elif isinstance(system, str):
        prompt.add(system)
    for tool in items(body.get("tools")):
        if isinstance(tool, dict):
            decls = _g(tool, "functionDeclarations", "function_declarations")
            if decls:
                prompt.add(decls)
            for key, tokens in BUILTIN_TOOL_TOKENS.items():
                if key in tool:
                    prompt.exact += tokens
            if any(key in tool for key in _SEARCH_TOOLS):
                # Grounding is billed per grounded prompt (Gemini 2.x; per query on 3): one.
                parsed.reserved_extras["web_search_calls"] = 1
    config = _g(body, "generationConfig", "generation_config")
    if config is not None and not isinstance(config, dict):
        raise MeterRequestError(f"generationConfig must be an object, not {kind(config)}")
    config = config or {}
    schema = _g(config, "responseSchema", "response_schema") or _g(
        config, "responseJsonSchema", "response_json_schema"
    )
    if schema:
        prompt.add(schema)
    cap = opt_int(config, "maxOutputTokens", "generationConfig.")
    if cap is None:
        cap = opt_int(config, "max_output_tokens", "generationConfig.")
    count = opt_int(config, "candidateCount", "generationConfig.")
    if count is None:  # the API reads proto field names too, as for the cap
        count = opt_int(config, "candidate_count", "generationConfig.")
    parsed.choices = max(count or 1, 1)
    parsed.cap = None if cap is None else cap * parsed.choices
    return parsed


def _parts(parts: Any, prompt: Prompt, model: str | None, where: str) -> None:
    if parts is None:
        return
    if not isinstance(parts, list):
        raise MeterRequestError(f"{where} must be an array, not {kind(parts)}")
    for part in parts:
        if not isinstance(part, dict):
            continue
        if "text" in part:
            prompt.add(part.get("text"))
            continue
        inline = _g(part, "inlineData", "inline_data")
        if isinstance(inline, dict):
            mime = str(_g(inline, "mimeType", "mime_type") or "")
            data = inline.get("data")
            data = data if isinstance(data, str) else None
            if mime.startswith("image/"):
                size = images.size_from_b64(data) if data else None
                prompt.exact += images.gemini_image_tokens(size, model)
            else:
                prompt.exact += images.media_tokens("gemini", mime, data, prompt.texts)
            continue
        file_data = _g(part, "fileData", "file_data")
        if isinstance(file_data, dict):
            mime = str(_g(file_data, "mimeType", "mime_type") or "")
            if mime.startswith("image/"):
                prompt.exact += images.gemini_image_tokens(None, model)
            else:
                prompt.exact += images.UNKNOWN_MEDIA_TOKENS
            continue
        for camel, snake in (
            ("functionCall", "function_call"),
            ("functionResponse", "function_response"),
            ("executableCode", "executable_code"),
            ("codeExecutionResult", "code_execution_result"),
        ):
            value = _g(part, camel, snake)
            if value is not None:
                prompt.add(value)


# --- responses --------------------------------------------------------------------------


# The counts a later chunk's usageMetadata overlays on an earlier one's (it is cumulative).
_COUNTS = (
    "promptTokenCount",
    "toolUsePromptTokenCount",
    "thoughtsTokenCount",
    "candidatesTokenCount",
    "cachedContentTokenCount",
)


def _modality(details: Any, modality: str, c: Counts) -> int:
    total = 0
    for d in items(details):
        if isinstance(d, dict) and d.get("modality") == modality:
            total += c(d.get("tokenCount"))
    return total


def usage_from(um: dict[str, Any]) -> TokenUsage | None:
    """One usageMetadata; None when a count in it cannot be read."""
    c = Counts()
    prompt = c(um.get("promptTokenCount"))
    tool = c(um.get("toolUsePromptTokenCount"))
    thoughts = c(um.get("thoughtsTokenCount"))
    usage = TokenUsage(
        input_tokens=prompt + tool,
        output_tokens=c(um.get("candidatesTokenCount")) + thoughts,
        cache_read_tokens=c(um.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
        input_audio_tokens=_modality(um.get("promptTokensDetails"), "AUDIO", c)
        + _modality(um.get("toolUsePromptTokensDetails"), "AUDIO", c),
        cache_audio_read_tokens=_modality(um.get("cacheTokensDetails"), "AUDIO", c),
        output_audio_tokens=_modality(um.get("candidatesTokensDetails"), "AUDIO", c),
        # Image models (gemini-2.5-flash-image...) price output images far above text.
        input_image_tokens=_modality(um.get("promptTokensDetails"), "IMAGE", c)
        + _modality(um.get("toolUsePromptTokensDetails"), "IMAGE", c),
        cache_image_read_tokens=_modality(um.get("cacheTokensDetails"), "IMAGE", c),
        output_image_tokens=_modality(um.get("candidatesTokensDetails"), "IMAGE", c),
    )
    return None if c.unreadable else usage


def _predicted_usage(predictions: list[Any]) -> TokenUsage | None:
    """Vertex `:predict` embeddings: each prediction's `embeddings.statistics.token_count`."""
    counts = [dig(p, "embeddings", "statistics", "token_count") for p in predictions]
    if not any(isinstance(c, int | float) for c in counts):
        return None  # no statistics: the input is counted
    c = Counts()
    usage = TokenUsage(input_tokens=sum(c(n) for n in counts))
    return None if c.unreadable else usage


def _candidates(obj: dict[str, Any], texts: list[str], queries: list[str]) -> None:
    for cand in items(obj.get("candidates")):
        if not isinstance(cand, dict):
            continue
        for part in items(dig(cand, "content", "parts")):
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str) and text:
                texts.append(text)
            for key in ("functionCall", "executableCode"):
                if part.get(key) is not None:
                    texts.append(compact(part[key]))
        grounding = cand.get("groundingMetadata")
        if isinstance(grounding, dict):
            for q in items(grounding.get("webSearchQueries")):
                if isinstance(q, str) and q not in queries:
                    queries.append(q)


def _search_extras(queries: list[str], model: str | None, ex: Extracted) -> None:
    if not queries:
        return
    per_query = (model or "").lower().startswith("gemini-3")
    ex.extras["web_search_calls"] = len(queries) if per_query else 1


def extract_json(obj: Any, request_model: str | None) -> Extracted:
    """A generateContent body, or the JSON array streamGenerateContent sends without alt=sse."""
    ex = Extracted()
    chunks = obj if isinstance(obj, list) else [obj]
    queries: list[str] = []
    last: dict[str, Any] | None = None
    for chunk in chunks:
        if not isinstance(chunk, dict):
            continue
        ex.seen = True
        if isinstance(chunk.get("modelVersion"), str):
            ex.model = chunk["modelVersion"]
        um = chunk.get("usageMetadata")
        if isinstance(um, dict):
            last = overlay(last, um, _COUNTS)
            # Cumulative: the last one wins, but an unreadable one never replaces a good one.
            ex.usage = usage_from(last) or ex.usage
            price_variant(ex.price_context, "service_tier", um.get("serviceTier"))
        elif isinstance(chunk.get("predictions"), list):
            ex.usage = _predicted_usage(chunk["predictions"])
        _candidates(chunk, ex.texts, queries)
    _search_extras(queries, ex.model or request_model, ex)
    return ex


class GenerateStream:
    """streamGenerateContent?alt=sse: `data: {chunk}` events, the last usageMetadata wins."""

    def __init__(self, request_model: str | None) -> None:
        self._ex = Extracted()
        self._queries: list[str] = []
        self._request_model = request_model
        self._last: dict[str, Any] | None = None  # the last usageMetadata, overlaid

    def on_event(self, event: str | None, data: bytes) -> bool:
        obj = loads(data)
        if not isinstance(obj, dict):
            return True
        self._ex.seen = True
        ex = self._ex
        if isinstance(obj.get("modelVersion"), str):
            ex.model = obj["modelVersion"]
        um = obj.get("usageMetadata")
        if isinstance(um, dict):
            self._last = overlay(self._last, um, _COUNTS)
            ex.usage = usage_from(self._last) or ex.usage  # a garbage one keeps the earlier
            price_variant(ex.price_context, "service_tier", um.get("serviceTier"))
        _candidates(obj, ex.texts, self._queries)
        return True

    def result(self) -> Extracted:
        ex = self._ex
        ex.extras = {}
        _search_extras(self._queries, ex.model or self._request_model, ex)
        return ex
