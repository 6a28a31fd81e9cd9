"""What the ledger keeps of a request so that `drawdown replay` can re-decide it under another policy.

Kept on the decision row (JSON text): the port, the query parameters, the body's JSON fields
that policies look at (`record.bodies: fields`, the default) or the whole JSON body
(`record.bodies: full`), an MCP request's JSON-RPC methods and tool names, and what the proxy
could not read (why the body could not be, the fields given more than once). Never kept:
headers (API keys, cookies and Authorization live there), and any value whose name or
shape says it is a secret (`key=`, `api_key`, `access_token`, `authtoken`, `sk-…`,
`Bearer …`) is replaced by REDACTED before it is written; so is a secret inside a text value
(a JSON document in a string, a URL's password, `Password=…` in a connection string, the
value of a `["X-Api-Key", …]` pair). The request's path is kept with the credentials
in it redacted too (`redact_path`: a Telegram bot token, a Slack or Discord webhook's
secret, a credential-shaped segment, what a secret-named `{capture}` took).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .classify import Classification, RequestView
from .policy.match import PathPattern, missing
from .policy.model import Action, Policy

REDACTED = "[redacted]"
# A name is secret when one of its words (split on non-letters and camelCase, trailing digits
# dropped) is one of these, or is a word run together with one (`secret_word`).
SECRET_WORDS = frozenset(
    {
        "apikey",
        "auth",
        "authentication",
        "authorization",
        "bearer",
        "cookie",
        "credential",
        "credentials",
        "jwt",
        "key",
        "otp",
        "pass",
        "passcode",
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
# A word holding one of these anywhere is secret (`clientsecret`, `adminpassword`, `apikeys`).
_SECRET_PARTS = (
    "apikey",
    "authentication",
    "authorization",
    "credential",
    "passcode",
    "passphrase",
    "passwd",
    "password",
    "privatekey",
    "secret",
)
# So is a word ending in `token` or `key` (`authtoken`, `csrftoken`, `accesskey`, `masterkey`),
# but not `tokens` (max_tokens, prompt_tokens, total_tokens: the usage fields metering, `when`
# conditions and replay read) nor these ordinary words.
_ORDINARY_WORDS = frozenset(
    {
        "donkey",
        "flunkey",
        "hickey",
        "hockey",
        "hokey",
        "hotkey",
        "jockey",
        "jokey",
        "lackey",
        "malarkey",
        "mickey",
        "monkey",
        "pokey",
        "smokey",
        "secretariat",
        "secretary",
        "turkey",
        "turnkey",
        "whiskey",
    }
)
# A query parameter named just `code` is a credential: an Azure Functions key, an OAuth
# authorization code on a redirect. In a JSON body `code` is mostly program text, an error's
# or a country's code, which policies read, so it is kept there.
_QUERY_SECRETS = frozenset({"code"})
# Values that are credentials whatever they are called (a Telegram bot token: 123456:AA…,
# as its API's URLs carry it, `bot123456:AA…`).
CREDENTIAL_SHAPES = (
    r"sk-|sk_(?:live|test)_|rk_(?:live|test)_|ghp_|gho_|github_pat_|xox[abprs]-|glpat-"
    r"|AKIA[0-9A-Z]{12}|AIza[0-9A-Za-z_\-]{20}|(?:Bearer|Basic)\s|eyJ[A-Za-z0-9_\-]{8,}\."
    r"|(?:bot)?[0-9]{5,}:[A-Za-z0-9_\-]{35,}"
)
_SECRET_VALUE = re.compile(rf"^(?:{CREDENTIAL_SHAPES})")
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
    rf"|/(?P<shape>(?:{CREDENTIAL_SHAPES.replace(r'\s', r'(?:\s|%20|[+])')})[^/]*)"
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


def secret_word(word: str) -> bool:
    """Whether one word of a name (`key`, `authtoken`, `clientsecret`, `key2`) says it holds a secret."""
    word = word.lower().rstrip("0123456789")
    if word in SECRET_WORDS:
        return True
    if not word or word in _ORDINARY_WORDS:
        return False
    return word.endswith(("token", "key")) or any(part in word for part in _SECRET_PARTS)


@functools.lru_cache(maxsize=4096)
def secret_name(name: str) -> bool:
    """Whether a field, query parameter or capture named so holds a secret (`api_key`,
    `authtoken`, `X-Amz-Security-Token`, `query.code`); not `max_tokens` or `keyword`."""
    lowered = name.lower()
    if lowered.startswith("query.") and lowered[6:] in _QUERY_SECRETS:
        return True
    return any(secret_word(word) for word in _WORDS.findall(name))


def secret_query(name: str) -> bool:
    """Whether a query parameter named so holds a secret (`secret_name`, or `code`)."""
    return name.lower() in _QUERY_SECRETS or secret_name(name)


def is_secret(name: str, value: str) -> bool:
    """Whether a value is a secret by its name or its shape."""
    return secret_name(name) or _SECRET_VALUE.match(value) is not None


# Secrets inside a text value. A URL's userinfo: `scheme://user:password@`, or a user alone
# that is a credential by its shape (`https://ghp_…@github.com`).
_USERINFO = re.compile(
    r"(?<![A-Za-z0-9+.\-])([A-Za-z][A-Za-z0-9+.\-]*://)([^\s/?#@:\"'<>]*)(:[^\s/?#\"'<>]*)?@"
)
# `name=value` or `name: value` (a connection string's `Password=…;`, a query string in a URL,
# `"token": "…"` in JSON text that does not parse); the value (`_VALUE`, read only after a
# secret name) is redacted. A `:` followed by `//` is a URL's scheme, not a pair. Only a name
# and its separator are consumed, so a pair inside a value is found too (`x: token=…`), and
# nothing is scanned twice: a long text costs one pass.
_ASSIGNED = re.compile(
    r"(?<![A-Za-z0-9_.\-])(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*+)[\"']?\s*(?:=|:(?!//))\s*[\"']?"
)
_VALUE = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[^-]*+(?:-----END [A-Z ]*PRIVATE KEY-----)?"
    r"|(?:(?:Bearer|Basic|Token|Digest)\s+)?[^\s\"',;&<>(){}\[\]]+"
)
# A PEM private key, whatever it is called (its body has spaces and line breaks in it).
_PEM_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[^-]*+(?:-----END [A-Z ]*PRIVATE KEY-----)?"
)
# Every secret name holds one of these (a test checks): a text without any has no pair to redact.
_NAME_STEMS = ("auth", "bearer", "cookie", "credential", "jwt", "key", "otp", "pass", "private")
_NAME_STEMS += ("pwd", "secret", "session", "sig", "token")
# A name that a 2-item list may pair with its value (`[["X-Api-Key", "…"]]`, header lists).
_PAIR_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
# A string is read as JSON (`tool_calls[].function.arguments`) up to this size and this many
# strings deep; past them it is searched as text only.
MAX_JSON_STRING_CHARS = 256 * 1024
MAX_JSON_STRING_DEPTH = 3


def _redact_userinfo(found: re.Match[str]) -> str:
    scheme, user, password = found.group(1, 2, 3)
    if password is not None:
        return f"{scheme}{user}:{REDACTED}@"
    return f"{scheme}{REDACTED}@" if _SECRET_VALUE.match(user) else found.group(0)


def _redact_assignments(text: str) -> str:
    """`text` with the value of each `secret_name=value` (or `: value`) pair redacted."""
    lowered = text.lower()
    if not any(stem in lowered for stem in _NAME_STEMS):
        return text
    pieces: list[str] = []
    kept = 0
    for found in _ASSIGNED.finditer(text):
        start = found.end()
        if start < kept or not secret_name(found["name"]):
            continue  # inside a value already redacted, or not a secret's name
        value = _VALUE.match(text, start)
        if value is not None:
            pieces += (text[kept:start], REDACTED)
            kept = value.end()
    return "".join(pieces) + text[kept:] if pieces else text


def _redact_text(text: str, depth: int) -> str:
    """A string value with the secrets inside it redacted: a JSON document in it (walked as
    `redact` walks a body, and written back compactly if anything in it was redacted), a URL's
    password, `secret_name=value` pairs. Unchanged, the very same string is returned."""
    if _SECRET_VALUE.match(text):
        return REDACTED
    stripped = text.lstrip()
    if (
        stripped[:1] in ("{", "[")
        and depth < MAX_JSON_STRING_DEPTH
        and len(text) <= MAX_JSON_STRING_CHARS
    ):
        try:
            document = json.loads(text)
            if isinstance(document, dict | list):
                redacted = redact(document, "", depth + 1)
                return text if redacted == document else _dumps(redacted)
        except (ValueError, RecursionError):
            pass  # not JSON, or nested too deeply to walk: searched as text below
    if "://" in text and "@" in text:
        text = _USERINFO.sub(_redact_userinfo, text)
    if "-----BEGIN" in text:
        text = _PEM_KEY.sub(REDACTED, text)
    if "=" in text or ":" in text:
        text = _redact_assignments(text)
    return text


def redact(value: Any, name: str = "", _depth: int = 0) -> Any:
    """`value` with every secret-looking entry (by its key or its shape) replaced by REDACTED,
    and the secrets inside its strings too (`_redact_text`)."""
    if name and secret_name(name):
        return REDACTED
    if isinstance(value, str):
        return _redact_text(value, _depth)
    if isinstance(value, Mapping):
        redacted = {str(k): redact(v, str(k), _depth) for k, v in value.items()}
        # A name/value pair spelled as an object (HAR's and Postman's header lists).
        label = value.get("name", value.get("key", value.get("header")))
        if "value" in redacted and isinstance(label, str) and secret_name(label):
            redacted["value"] = REDACTED
        return redacted
    if isinstance(value, list | tuple):
        # A [name, value] pair (a header list `[["X-Api-Key", "…"]]`): the value by its name.
        if (
            len(value) == 2
            and isinstance(value[0], str)
            and _PAIR_NAME.fullmatch(value[0])
            and secret_name(value[0])
        ):
            return [value[0], REDACTED]
        return [redact(v, "", _depth) for v in value]
    return value


_FIELDS_CACHE: dict[int, tuple[Policy, frozenset[str]]] = {}


def fields_read(policy: Policy, kinds: Iterable[str] | None = None) -> set[str]:
    """The request fields the policy reads: its actions' matches (they classify any request)
    and its rules' `when` and `requires … same`; with `kinds`, only the rules covering one."""
    names = {test.field for action in policy.actions for test in action.match.tests}
    wanted = None if kinds is None else set(kinds)
    for rule in policy.authority.rules:
        if wanted is None or any(rule.covers(kind) for kind in wanted):
            names.update(test.field for test in rule.when)
            for requirement in rule.requires:
                names.update(f for f in (requirement.here, requirement.there) if f)
    return names


def body_fields(policy: Policy) -> frozenset[str]:
    """The json.* fields the policy reads (fields_read) plus record.fields."""
    cached = _FIELDS_CACHE.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
    names = fields_read(policy) | set(policy.record.fields)
    found = frozenset(n for n in names if n.startswith("json."))
    if len(_FIELDS_CACHE) > 8:  # a policy lives until the next reload; keep the last few
        _FIELDS_CACHE.clear()
    _FIELDS_CACHE[id(policy)] = (policy, found)  # holding the policy keeps its id unique
    return found


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _redacted_dumps(value: Any, name: str = "", limit: int | None = None) -> str | None:
    """`value` redacted, as JSON text; None when it is nested too deeply to walk (`[[[[…`) or,
    given a `limit`, when it is so far past it unredacted that redacting could not bring it
    under (searching a whole prompt's text for secrets costs time on the event loop)."""
    try:
        if limit is not None and len(_dumps(value)) > 16 * limit:
            return None
        return _dumps(redact(value, name))
    except RecursionError:
        return None


# The note of an MCP call answered 200 that did not succeed (addon: a JSON-RPC error, or a tool
# result marked isError): replay's `requires` must not count it as a lookup made.
MCP_CALL_FAILED = "the MCP call failed: a JSON-RPC error, or a tool result marked isError"
# The notes of a call charged though its answer never arrived whole (addon._settle_error): it
# wrote no facts, so replay counts it no success for a later `requires` either.
STREAM_CUT = "stream cut short: "
RESPONSE_CUT = "response cut short: "
CLIENT_LEFT = "client left before the answer: "
UNANSWERED_NOTES = (STREAM_CUT, RESPONSE_CUT, CLIENT_LEFT)

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
        out["query"] = _dumps(
            {k: REDACTED if secret_query(k) else redact(v) for k, v in view.query.items()}
        )
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
                value = list(value) if isinstance(value, list) else value
                text = _redacted_dumps(value, name, MAX_FIELD_CHARS)
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
