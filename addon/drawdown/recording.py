"""What the ledger keeps of a request so that `drawdown replay` can re-decide it under another policy.

Kept on the decision row (JSON text): the port, the query parameters, the body's JSON fields
that policies look at (`record.bodies: fields`, the default) or the whole JSON body
(`record.bodies: full`), an MCP request's JSON-RPC methods and tool names, and what the proxy
could not read (why the body could not be, the fields given more than once). Never kept:
headers (API keys, cookies and Authorization live there), and any value whose name or
shape says it is a secret (`key=`, `api_key`, `access_token`, `sk-…`, `Bearer …`) is
replaced by REDACTED before it is written. The request's path is kept with the credentials
in it redacted too (`redact_path`: a Telegram bot token, a Slack or Discord webhook's
secret, a credential-shaped segment, what a secret-named `{capture}` took).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from .classify import Classification, RequestView
from .policy.match import PathPattern, missing
from .policy.model import Action, Policy

REDACTED = "[redacted]"
# A name is secret when one of its words (split on non-letters and camelCase) is one of these.
SECRET_WORDS = frozenset(
    {
        "apikey",
        "auth",
        "authorization",
        "bearer",
        "cookie",
        "credential",
        "credentials",
        "jwt",
        "key",
        "otp",
        "pass",
        "passphrase",
        "passwd",
        "password",
        "private",
        "pwd",
        "secret",
        "session",
        "sessionid",
        "sig",
        "signature",
        "token",
    }
)
_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# Values that are credentials whatever they are called (a Telegram bot token: 123456:AA…,
# as its API's URLs carry it, `bot123456:AA…`).
_SHAPES = (
    r"sk-|sk_(?:live|test)_|rk_(?:live|test)_|ghp_|gho_|github_pat_|xox[abprs]-|glpat-"
    r"|AKIA[0-9A-Z]{12}|AIza[0-9A-Za-z_\-]{20}|(?:Bearer|Basic)\s|eyJ[A-Za-z0-9_\-]{8,}\."
    r"|(?:bot)?[0-9]{5,}:[A-Za-z0-9_\-]{35,}"
)
_SECRET_VALUE = re.compile(rf"^(?:{_SHAPES})")
# Credentials that real APIs carry in the URL path. Each alternative names the one group that
# is the secret; the text around it is kept, so the redacted path keeps its segments (replay's
# `*` and `{name}` globs still match it) and what the policy itself spells out. The webhook
# shapes are recognized by path, whatever the host: a Slack or Discord URL is as secret sent
# through a relay, a regional or GovSlack host or a test stand-in, and these shapes (Slack's
# T…/B… ids, Discord's numeric webhook id) are specific enough to leave other APIs' paths be.
_PATH_SECRET = re.compile(
    # Telegram: /bot<id>:<token>/sendMessage and /file/bot<id>:<token>/…; `bot` stays, so a
    # policy's `/bot*/sendMessage` or `/bot{token}/sendMessage` still matches it.
    r"/bot(?P<telegram>[0-9]{5,}:[A-Za-z0-9_\-]{35,}[^/]*)"
    # Any segment that starts like a credential (a raw path spells a space %20 or +).
    rf"|/(?P<shape>(?:{_SHAPES.replace(r'\s', r'(?:\s|%20|[+])')})[^/]*)"
    # Slack incoming webhooks: /services/T…/B…/<secret>, all three segments.
    r"|/services/(?P<slack>T[A-Z0-9]+/B[A-Z0-9]+/[^/]+)"
    # Discord webhooks: /api[/v10]/webhooks/<id>/<token>[/…].
    r"|/api/(?:v[0-9]+/)?webhooks/[0-9]+/(?P<discord>[^/]+)"
    # Microsoft Teams (Office 365 connector) webhooks: …/IncomingWebhook/<hex>/<guid>.
    r"|/IncomingWebhook/(?P<teams>[^/]+/[^/]+)"
)


def _redact_match(found: re.Match[str]) -> str:
    """The match with its secret group's segments each replaced by REDACTED."""
    name = found.lastgroup
    assert name is not None
    start, end = found.span(name)
    redacted = "/".join([REDACTED] * (found.string.count("/", start, end) + 1))
    return found.string[found.start() : start] + redacted + found.string[end : found.end()]


@functools.lru_cache(maxsize=256)
def _secret_captures(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name in names if secret_name(name))


def redact_path(path: str, pattern: PathPattern | None = None) -> str:
    """`path` as the ledger may keep it: credentials in it replaced by REDACTED, segment by segment.

    `pattern` is the matched action's path pattern: what its `{name}` captures named like a
    secret (`/bot{token}/…`, `/hooks/{secret}`) took is redacted whatever it looks like.
    Every other credential is found by its shape (`_PATH_SECRET`). Ordinary segments (`v1`,
    `gemini-2.0-flash:generateContent`, resource ids) are kept: replay and reports read them.
    """
    if pattern is not None and (names := _secret_captures(pattern.names)):
        found = pattern.regex.match(path)
        if found is not None:
            # Right to left, so the spans still to replace keep their offsets.
            for start, end in sorted((found.span(n) for n in names), reverse=True):
                if end > start:
                    path = path[:start] + REDACTED + path[end:]
    return _PATH_SECRET.sub(_redact_match, path)


MAX_FIELD_CHARS = 4096  # a referenced field bigger than this (a whole prompt) is left out


def secret_name(name: str) -> bool:
    return any(word.lower() in SECRET_WORDS for word in _WORDS.findall(name))


def is_secret(name: str, value: str) -> bool:
    """Whether a value is a secret by its name or its shape."""
    return secret_name(name) or _SECRET_VALUE.match(value) is not None


def redact(value: Any, name: str = "") -> Any:
    """`value` with every secret-looking entry (by its key or its shape) replaced by REDACTED."""
    if name and secret_name(name):
        return REDACTED
    if isinstance(value, str):
        return REDACTED if _SECRET_VALUE.match(value) else value
    if isinstance(value, Mapping):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


_FIELDS_CACHE: dict[int, tuple[Policy, frozenset[str]]] = {}


def body_fields(policy: Policy) -> frozenset[str]:
    """The json.* fields the policy reads (action matches, `when`, `requires … same`) plus record.fields."""
    cached = _FIELDS_CACHE.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
    names: set[str] = set(policy.record.fields)
    for action in policy.actions:
        names.update(test.field for test in action.match.tests)
    for rule in policy.authority.rules:
        names.update(test.field for test in rule.when)
        for requirement in rule.requires:
            names.update(f for f in (requirement.here, requirement.there) if f)
    found = frozenset(n for n in names if n.startswith("json."))
    if len(_FIELDS_CACHE) > 8:  # a policy lives until the next reload; keep the last few
        _FIELDS_CACHE.clear()
    _FIELDS_CACHE[id(policy)] = (policy, found)  # holding the policy keeps its id unique
    return found


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _redacted_dumps(value: Any, name: str = "") -> str | None:
    """`value` redacted, as JSON text; None when it is nested too deeply to walk (`[[[[…`)."""
    try:
        return _dumps(redact(value, name))
    except RecursionError:
        return None


# The note of an MCP call answered 200 that did not succeed (addon: a JSON-RPC error, or a tool
# result marked isError): replay's `requires` must not count it as a lookup made.
MCP_CALL_FAILED = "the MCP call failed: a JSON-RPC error, or a tool result marked isError"

# (policy digest, action kind, file, line) -> metering_digest: one policy's actions, by value.
_metering: dict[tuple[str, str, str, int], str] = {}


def metering_digest(policy: Policy, action: Action) -> str:
    """What an LLM call's estimate and cost depend on besides the request itself, as
    "ESTIMATE:PRICE": a digest of the action's provider and the policy's `meter:` settings
    (the estimate's), then one of the action's `price:` and the fallback price. Recorded
    with the call, so that replay knows whether the new policy estimates or prices it as the
    recording one did (by value: the same settings in another file or order read the same)."""
    key = (policy.digest, action.kind, action.file, action.line)
    found = _metering.get(key)
    if found is None:
        meter = policy.meter
        estimate = (
            action.provider,
            meter.default_max_output_tokens,
            meter.max_output_tokens,
            meter.fallback_price,
            sorted(meter.safety_factors.items()),
        )
        price = (action.price, meter.fallback_price)  # what a committed usage is priced at
        found = f"{_digest(repr(estimate))}:{_digest(repr(price))}"
        if len(_metering) >= 1024:  # policies reloaded many times: start again
            _metering.clear()
        _metering[key] = found
    return found


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def features(policy: Policy, view: RequestView, classification: Classification) -> dict[str, Any]:
    """The replay columns of a decision row: port, query, body_fields, body, mcp (JSON text or None)."""
    settings = policy.record
    out: dict[str, Any] = {"port": view.port, "query": None, "body_fields": None, "body": None}
    if view.query:
        out["query"] = _dumps({k: redact(v, k) for k, v in view.query.items()})
    wanted = body_fields(policy)
    full = settings.bodies == "full" and len(view.body) <= 2 * settings.max_body_bytes
    # What replay cannot read again, noted beside the fields: why the body could not be
    # decoded or read, the fields given more than once (RequestView.unread refuses them).
    kept: dict[str, Any] = {}
    if view.undecodable is not None:
        kept["_undecodable"] = view.undecodable
    # Parse the body only when something is kept from it (a big prompt costs time on the loop).
    if view.body and (full or (settings.bodies == "fields" and wanted)):
        document = view.json
        if document is missing() and view.unreadable is not None:
            kept["_unreadable"] = view.unreadable
        if document is not missing():
            omitted = []
            for name in sorted(wanted):
                value = view.field(name)
                if value is missing():
                    continue
                text = _redacted_dumps(list(value) if isinstance(value, list) else value, name)
                if text is None or len(text) > MAX_FIELD_CHARS:
                    omitted.append(name)
                else:
                    kept[name] = json.loads(text)
            if omitted:
                kept["_omitted"] = omitted
            if full:
                text = _redacted_dumps(document)
                if text is not None and len(text.encode()) <= settings.max_body_bytes:
                    out["body"] = text
    if view.repeated:
        kept["_repeated"] = view.repeated
    out["body_fields"] = _dumps(kept) if kept else None
    calls = [[m.method, m.tool] for m in classification.mcp]
    out["mcp"] = _dumps({"batch": classification.mcp_batch, "calls": calls}) if calls else None
    return out


def _place(document: dict[str, Any], parts: list[str], value: Any) -> None:
    """Put `value` at a dotted path; a `*` segment spreads a list of values over list items."""
    head, rest = parts[0], parts[1:]
    if head == "*":
        return  # handled by the caller
    if not rest:
        document.setdefault(head, value)
        return
    if rest[0] == "*" and isinstance(value, list):
        items = document.setdefault(head, [])
        if not isinstance(items, list):
            return
        while len(items) < len(value):
            items.append({})
        for item, each in zip(items, value, strict=False):
            if isinstance(item, dict) and rest[1:]:
                _place(item, rest[1:], each)
        return
    child = document.setdefault(head, {})
    if isinstance(child, dict):
        _place(child, rest, value)


def rebuild_json(body: str | None, fields: str | None, mcp: str | None) -> Any:
    """The request's JSON body as well as the ledger knows it (MISSING when it knows nothing)."""
    if body:
        return json.loads(body)
    document: dict[str, Any] = {}
    for name, value in (json.loads(fields) if fields else {}).items():
        if name.startswith("json."):
            _place(document, name.removeprefix("json.").split("."), value)
    if mcp:
        recorded = json.loads(mcp)
        messages = [
            {"jsonrpc": "2.0", "method": method, **({"params": {"name": tool}} if tool else {})}
            for method, tool in recorded.get("calls", [])
        ]
        if recorded.get("batch"):
            return messages
        if messages:
            merged = {**document, **{k: v for k, v in messages[0].items() if k != "params"}}
            params = merged.setdefault("params", {})
            if isinstance(params, dict) and "params" in messages[0]:
                params.setdefault("name", messages[0]["params"]["name"])
            return merged
    return document if document else missing()


def omitted_fields(fields: str | None) -> list[str]:
    return list(json.loads(fields).get("_omitted", [])) if fields else []
