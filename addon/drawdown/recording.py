"""What the ledger keeps of a request so that `drawdown replay` can re-decide it under another policy.

Kept on the decision row (JSON text): the port, the query parameters, the body's JSON fields
that policies look at (`record.bodies: fields`, the default) or the whole JSON body
(`record.bodies: full`), and an MCP request's JSON-RPC methods and tool names. Never kept:
headers (API keys, cookies and Authorization live there), and any value whose name or
shape says it is a secret (`key=`, `api_key`, `access_token`, `sk-…`, `Bearer …`) is
replaced by REDACTED before it is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from .classify import Classification, RequestView
from .policy.match import missing
from .policy.model import Policy

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
# Values that are credentials whatever they are called.
_SECRET_VALUE = re.compile(
    r"^(?:sk-|sk_(?:live|test)_|rk_(?:live|test)_|ghp_|gho_|github_pat_|xox[abprs]-|glpat-"
    r"|AKIA[0-9A-Z]{12}|AIza[0-9A-Za-z_\-]{20}|(?:Bearer|Basic)\s|eyJ[A-Za-z0-9_\-]{8,}\.)"
)
MAX_FIELD_CHARS = 4096  # a referenced field bigger than this (a whole prompt) is left out


def secret_name(name: str) -> bool:
    return any(word.lower() in SECRET_WORDS for word in _WORDS.findall(name))


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


def features(policy: Policy, view: RequestView, classification: Classification) -> dict[str, Any]:
    """The replay columns of a decision row: port, query, body_fields, body, mcp (JSON text or None)."""
    settings = policy.record
    out: dict[str, Any] = {"port": view.port, "query": None, "body_fields": None, "body": None}
    if view.query:
        out["query"] = _dumps({k: redact(v, k) for k, v in view.query.items()})
    wanted = body_fields(policy)
    full = settings.bodies == "full" and len(view.body) <= 2 * settings.max_body_bytes
    # Parse the body only when something is kept from it (a big prompt costs time on the loop).
    if view.body and (full or (settings.bodies == "fields" and wanted)):
        document = view.json
        if document is not missing():
            kept: dict[str, Any] = {}
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
            out["body_fields"] = _dumps(kept) if kept else None
            if full:
                text = _redacted_dumps(document)
                if text is not None and len(text.encode()) <= settings.max_body_bytes:
                    out["body"] = text
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
