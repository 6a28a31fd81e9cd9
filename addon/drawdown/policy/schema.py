"""Validate policy documents and compile them into a `Policy`.

Every problem is reported with the file and line it comes from; nothing here
raises for a user's mistake except `PolicyInvalid` carrying all of them.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from decimal import Decimal
from typing import Any

from ..meter.config import DEFAULT_SAFETY_FACTORS, MeterConfig, PricePerMillion
from ..money import MAX_AMOUNT, MAX_USD, usd_to_nanos
from .match import (
    LEVELS,
    PathPattern,
    compile_condition,
    compile_glob,
    compile_host,
    compile_path,
    compile_scope,
    is_glob,
    missing,
)
from .match import holds as condition_holds
from .model import (
    DENIABLE,
    DETECTORS,
    MINIMUMS,
    MODES,
    RECORD_BODIES,
    UNITS,
    WINDOWS,
    Action,
    ActionMatch,
    AnomalySettings,
    Authority,
    Budget,
    Detector,
    FieldTest,
    HoldSettings,
    Limits,
    Policy,
    RecordSettings,
    RequestLimits,
    Requirement,
    Rule,
    Source,
    hostless_action,
)
from .source import UNREADABLE, LList, LMap, PolicyInvalid, Problem, line_of, lookalike_space
from .source import clip as _clip

DEFAULT_IDENTITY: dict[str, tuple[Source, ...]] = {
    "tenant": (Source("header", "X-Drawdown-Tenant"), Source("value", "default")),
    "workflow": (Source("header", "X-Drawdown-Workflow"),),
    "agent": (
        Source("proxy_user"),
        Source("header", "X-Drawdown-Agent"),
        Source("value", "anonymous"),
    ),
    "run": (
        Source("header", "X-Drawdown-Run"),
        Source("proxy_password"),
        Source("idle_split", 300),
    ),
}

PROVIDERS = ("openai", "anthropic", "gemini", "bedrock", "mcp")
LLM_PROVIDERS = ("openai", "anthropic", "gemini", "bedrock")
_KIND = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# HTTP methods (IANA's registry). Matching ignores case, so `get` works; anything else (`GTE`,
# `GET,POST`) matches no request an HTTP client sends.
HTTP_METHODS = (
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE", "QUERY",
    "ACL", "BASELINE-CONTROL", "BIND", "CHECKIN", "CHECKOUT", "COPY", "LABEL", "LINK", "LOCK",
    "MERGE", "MKACTIVITY", "MKCALENDAR", "MKCOL", "MKREDIRECTREF", "MKWORKSPACE", "MOVE",
    "ORDERPATCH", "PRI", "PROPFIND", "PROPPATCH", "REBIND", "REPORT", "SEARCH", "UNBIND",
    "UNCHECKOUT", "UNLINK", "UNLOCK", "UPDATE", "UPDATEREDIRECTREF", "VERSION-CONTROL",
)  # fmt: skip
# Headers that carry credentials. An identity level's value is kept in scope paths (the ledger,
# reports, 403 bodies), and SPEC §6 says these values are never stored.
CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "x-goog-api-key",
        "api-key",  # Azure OpenAI
        "cookie",
        "set-cookie",
    }
)


class _Checker:
    """Collects problems; each check returns None when the value is unusable."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        # (kind or glob, file, line) named by rules, requirements, budgets and detectors: checked
        # against the actions only once every file of a folder is compiled.
        self.kind_refs: list[tuple[str, str, int]] = []
        # Kinds the actions yield, noted even from an action with another mistake, so fixing
        # that one does not also bring a "names no action kind" for every rule naming it.
        self.kinds: set[str] = set()
        self.tool_prefixes: set[str] = set()  # `K.` of each MCP action: it yields `K.<tool>`

    def refer(self, parent: Any, key: str | int, index: int, text: str) -> None:
        """Note the action kind `text`, item `index` of `parent[key]` (text or a list of text)."""
        value = parent[key]
        line = line_of(value, index) if isinstance(value, LList) else line_of(parent, key)
        self.kind_refs.append((text, getattr(parent, "file", "?"), line))

    def error(self, container: Any, key: str | int | None, message: str) -> None:
        if key is not None and _unreadable(container, key):
            return  # reading the value already failed, and said why: not also "not null"
        self.problems.append(
            Problem(getattr(container, "file", "?"), line_of(container, key), message)
        )

    def mapping(self, parent: Any, key: str | int, what: str) -> LMap | None:
        value = parent[key]
        if not isinstance(value, LMap):
            # `host:\u00a0x.com` reads as one text, not `host: x.com`: name the character.
            odd = lookalike_space(value) if isinstance(value, str) else ""
            self.error(
                parent,
                key,
                f"{what} must be a mapping, not {_kind(value)}"
                + (f" (it holds {odd})" if odd else ""),
            )
            return None
        return value

    def sequence(self, parent: Any, key: str | int, what: str) -> LList | None:
        value = parent[key]
        if not isinstance(value, LList):
            self.error(parent, key, f"{what} must be a list, not {_kind(value)}")
            return None
        return value

    def keys(
        self, value: LMap, allowed: tuple[str, ...], what: str, required: tuple[str, ...] = ()
    ) -> bool:
        ok = True
        for key in value:
            if what == "the policy" and key.startswith("x-"):
                continue  # a place for YAML anchors (`x-base: &base {…}`), as compose files have
            if key not in allowed:
                hint = _closest(key, allowed)
                if _THOUSANDS_KEY.match(key):
                    # `{usd: 1,000}`: in a flow mapping the ',' ends the value, `000` is a key.
                    why = " (a number is written without thousands separators: 1000, not 1,000)"
                elif odd := lookalike_space(key):  # `{host:\u00a0x.com}` is one key
                    why = f" (it holds {odd})"
                elif what == "the policy" and key in _BELONGS_UNDER:
                    why = f" ('{key}' belongs under '{_BELONGS_UNDER[key]}:')"
                elif hint:
                    why = f" (did you mean '{hint}'?)"
                else:
                    why = f" (expected one of: {', '.join(allowed)})"
                self.error(value, key, f"unknown key '{_clip(key)}' in {what}{why}")
                ok = False
        for key in required:
            if key not in value:
                self.error(value, None, f"{what} needs '{key}'")
                ok = False
        return ok

    def text(self, parent: Any, key: str | int, what: str) -> str | None:
        value = parent[key]
        if not isinstance(value, str) or not value.strip():
            self.error(parent, key, f"{what} must be non-empty text, not {_kind(value)}")
            return None
        return value

    def choice(self, parent: Any, key: str, options: tuple[str, ...], what: str) -> str | None:
        value = parent[key]
        if value not in options:
            hint = _closest(value, options) if isinstance(value, str) else None
            self.error(
                parent,
                key,
                f"{what} must be one of {', '.join(options)}, not {_show(value)}"
                + (f" (did you mean '{hint}'?)" if hint else ""),
            )
            return None
        return value

    def integer(self, parent: Any, key: str | int, what: str, minimum: int = 0) -> int | None:
        value = parent[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            # YAML reads 1e6 or 2.0 as a float, whole or not: say how to write the number.
            whole = (
                isinstance(value, Decimal)
                and minimum <= value <= MAX_AMOUNT
                and value == value.to_integral()
            )
            hint = " (write it in digits, with no dot or exponent)" if whole else _separated(value)
            self.error(
                parent,
                key,
                f"{what} must be a whole number ≥ {minimum}, not {_show(value)}{hint}",
            )
            return None
        if value > MAX_AMOUNT:
            # Past this the ledger's 64-bit integers would fail every request at run time.
            self.error(parent, key, f"{what} must be at most 10^18, not {_show(value)}")
            return None
        return value

    def number(
        self,
        parent: Any,
        key: str | int,
        what: str,
        minimum: Decimal = Decimal(0),
        maximum: Decimal | None = None,
    ) -> Decimal | None:
        value = parent[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | Decimal)
            or Decimal(value) < minimum
        ):
            self.error(
                parent,
                key,
                f"{what} must be a number ≥ {minimum}, not {_show(value)}{_separated(value)}",
            )
            return None
        if maximum is not None and Decimal(value) > maximum:
            self.error(parent, key, f"{what} must be at most {maximum:,}, not {_show(value)}")
            return None
        return Decimal(value)

    def usd(self, parent: Any, key: str | int, what: str) -> int | None:
        # Dollars past MAX_USD are nano-dollars past what the ledger's integers hold.
        amount = self.number(parent, key, what, maximum=Decimal(MAX_USD))
        if amount is None:
            return None
        if amount and amount.adjusted() < -9:
            # Below a nano-dollar, as 1e-10 is; 1e-999999999 would underflow to $0 on the way.
            self.error(
                parent, key, f"{what}: {_show(amount)} USD is more precise than a nano-dollar"
            )
            return None
        try:
            return usd_to_nanos(amount, exact=True)
        except ValueError as exc:
            self.error(parent, key, f"{what}: {exc}")
            return None

    def strings(self, parent: Any, key: str, what: str) -> list[str] | None:
        """A string or a list of strings."""
        value = parent[key]
        if isinstance(value, str) and value:
            return [value]
        if isinstance(value, LList) and value and all(isinstance(v, str) and v for v in value):
            return list(value)
        if value == "":  # `host: ""`
            self.error(parent, key, f"{what} is empty: give it a value, or leave '{key}' out")
        elif isinstance(value, LList) and not value:  # `deny: []`
            self.error(parent, key, f"{what} is empty: list at least one, or leave '{key}' out")
        elif isinstance(value, LList) and "" in value:
            self.error(parent, key, f"{what} lists an empty text")
        else:
            self.error(parent, key, f"{what} must be text or a list of text")
        return None


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool):  # as YAML spells them, not Python
        return "null" if value is None else str(value).lower()
    if isinstance(value, Decimal):
        return _clip(str(value))
    if isinstance(value, LMap | LList):
        return _kind(value)
    return _clip(repr(value))


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, LMap):
        return "a mapping"
    if isinstance(value, LList):
        return "a list"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | Decimal):
        return f"the number {_show(value)}"
    if isinstance(value, str):
        return f"text {_show(value)}"
    return _show(value)


def _unreadable(container: Any, key: str | int) -> bool:
    try:
        return container[key] is UNREADABLE
    except (KeyError, IndexError, TypeError):
        return False


_THOUSANDS_KEY = re.compile(r"^[0-9]{3}$")
_THOUSANDS = re.compile(r"^[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?$")


def _separated(value: Any) -> str:
    """A hint for `1,000` written in block style, where it stays text."""
    if isinstance(value, str) and _THOUSANDS.match(value.strip()):
        return f" (write it without thousands separators: {value.strip().replace(',', '')})"
    return ""


# Keys of a section written at the top level: said where they go, not "expected one of …".
_BELONGS_UNDER = {
    "rules": "authority",
    "default": "authority",
    "default_max_output_tokens": "meter",
    "max_output_tokens": "meter",
    "fallback_price": "meter",
    "safety_factor": "meter",
    "ttl": "holds",
    "lease": "holds",
    "bodies": "record",
    "max_body_bytes": "record",
    "max_request_bytes": "limits",
}


def _closest(word: str, options: tuple[str, ...]) -> str | None:
    """The option `word` likely meant: spelled in another case (`USD`, `LLM`), or close."""
    folded = [option for option in options if option.lower() == word.lower()]
    if folded:
        return folded[0]
    found = difflib.get_close_matches(word, options, n=1, cutoff=0.75)
    return found[0] if found else None


# --- sections ---------------------------------------------------------------------------

TOP_LEVEL = (
    "version",
    "mode",
    "unknown_hosts",
    "on_ledger_error",
    "identity",
    "actions",
    "budgets",
    "authority",
    "anomalies",
    "meter",
    "holds",
    "record",
    "limits",
)
SCALARS = ("version", "mode", "unknown_hosts", "on_ledger_error")


class _Partial:
    """What one file contributes; merged across the files of a folder."""

    def __init__(self) -> None:
        self.scalars: dict[str, tuple[Any, str]] = {}  # key -> (value, "file:line")
        self.identity: dict[str, tuple[tuple[Source, ...], str]] = {}
        self.actions: list[Action] = []
        self.budgets: list[Budget] = []
        self.authority_default: tuple[str, str] | None = None
        self.rules: list[Rule] = []
        self.anomalies: tuple[list[Detector], str] | None = None
        self.meter: tuple[dict[str, Any], str] | None = None
        self.holds: tuple[HoldSettings, str] | None = None
        self.record: tuple[RecordSettings, str] | None = None
        self.limits: tuple[RequestLimits, str] | None = None


def _check_document(check: _Checker, doc: Any, file: str) -> _Partial:
    part = _Partial()
    if doc is None:
        return part
    if not isinstance(doc, LMap):
        check.problems.append(
            Problem(file, getattr(doc, "line", 1), "a policy file must be a mapping of sections")
        )
        return part
    check.keys(doc, TOP_LEVEL, "the policy")
    where = lambda key: f"{file}:{line_of(doc, key)}"  # noqa: E731
    version = doc.get("version", 1)
    if isinstance(version, str) and version.strip() == "1":
        check.error(doc, "version", "version is a number: write `version: 1`, not the text '1'")
    elif version != 1 or isinstance(version, bool):
        check.error(
            doc, "version", f"unsupported policy version: {_kind(version)} (this drawdown reads 1)"
        )
    if "mode" in doc and (mode := check.choice(doc, "mode", MODES, "mode")):
        part.scalars["mode"] = (mode, where("mode"))
    if "unknown_hosts" in doc and (
        value := check.choice(
            doc, "unknown_hosts", ("allow", "deny", "passthrough"), "unknown_hosts"
        )
    ):
        part.scalars["unknown_hosts"] = (value, where("unknown_hosts"))
    if "on_ledger_error" in doc and (
        value := check.choice(doc, "on_ledger_error", ("deny", "allow"), "on_ledger_error")
    ):
        part.scalars["on_ledger_error"] = (value, where("on_ledger_error"))
    if "identity" in doc and (identity := check.mapping(doc, "identity", "identity")) is not None:
        for level, sources in _identity(check, identity).items():
            part.identity[level] = (sources, f"{file}:{line_of(identity, level)}")
    if "actions" in doc and (actions := check.sequence(doc, "actions", "actions")) is not None:
        part.actions = [
            a for i in range(len(actions)) if (a := _action(check, actions, i)) is not None
        ]
    if "budgets" in doc and (budgets := check.sequence(doc, "budgets", "budgets")) is not None:
        part.budgets = [
            b for i in range(len(budgets)) if (b := _budget(check, budgets, i)) is not None
        ]
    if (
        "authority" in doc
        and (authority := check.mapping(doc, "authority", "authority")) is not None
    ):
        check.keys(authority, ("default", "rules"), "authority")
        if "default" in authority and (
            default := check.choice(authority, "default", ("allow", "deny"), "authority.default")
        ):
            part.authority_default = (default, f"{file}:{line_of(authority, 'default')}")
        if (
            "rules" in authority
            and (rules := check.sequence(authority, "rules", "authority.rules")) is not None
        ):
            part.rules = [r for i in range(len(rules)) if (r := _rule(check, rules, i)) is not None]
    if (
        "anomalies" in doc
        and (anomalies := check.mapping(doc, "anomalies", "anomalies")) is not None
    ):
        part.anomalies = (_anomalies(check, anomalies), where("anomalies"))
    if "meter" in doc and (meter := check.mapping(doc, "meter", "meter")) is not None:
        part.meter = (_meter(check, meter), where("meter"))
    if "holds" in doc and (holds := check.mapping(doc, "holds", "holds")) is not None:
        part.holds = (_holds(check, holds), where("holds"))
    if "record" in doc and doc["record"] in RECORD_BODIES:  # `record: none`, as said aloud
        check.error(
            doc, "record", f"record is a mapping: write `record: {{bodies: {doc['record']}}}`"
        )
    elif "record" in doc and (record := check.mapping(doc, "record", "record")) is not None:
        part.record = (_record(check, record), where("record"))
    if "limits" in doc and (limits := check.mapping(doc, "limits", "limits")) is not None:
        part.limits = (_limits(check, limits), where("limits"))
    return part


SOURCE_KINDS = ("header", "proxy_user", "proxy_password", "client_ip", "value", "idle_split")
# A header is a credential when a word of its name is one replay and the run's history redact
# (recording.secret_word: `secret`, `password`, `csrftoken`, `apikey`…), but for these words,
# which also name people and runs (X-Auth-Request-User from oauth2-proxy, X-Session-Id): they
# count only as the last word of a name (X-Auth, X-Api-Auth, X-Auth-Token, X-Otp, X-Session,
# Ocp-Apim-Subscription-Key, X-Api-Key2). `sessionid` never does: X-SessionId names a run as
# X-Session-Id does.
_NOT_ALONE = frozenset(
    {"auth", "key", "otp", "pass", "private", "session", "sessionid", "sig", "signature", "token"}
)


def credential_header(name: str) -> bool:
    """Whether a header named so carries a credential (an API key, a cookie, a bearer token)."""
    from ..recording import secret_word  # not at import time: recording imports this package

    lowered = name.lower()
    if lowered in CREDENTIAL_HEADERS:
        return True
    # Trailing digits dropped, as recording.secret_word drops them (X-Api-Key2).
    words = [w for word in re.split(r"[^a-z0-9]+", lowered) if (w := word.rstrip("0123456789"))]
    return any(secret_word(word) for word in words if word not in _NOT_ALONE) or (
        bool(words) and words[-1] != "sessionid" and secret_word(words[-1])
    )


def _identity(check: _Checker, identity: LMap) -> dict[str, tuple[Source, ...]]:
    check.keys(identity, LEVELS, "identity")
    result: dict[str, tuple[Source, ...]] = {}
    for level in LEVELS:
        if level not in identity:
            continue
        sources_list = check.sequence(identity, level, f"identity.{level}")
        if sources_list is None:
            continue
        sources: list[Source] = []
        always: str | None = None  # a source before this one that always gives a value
        for index, item in enumerate(sources_list):
            if always is not None:
                # Tried in order, the first value found wins: `[{value: bot}, {header: X}]`
                # never reads the header.
                check.error(
                    sources_list,
                    index,
                    f"identity.{level}: this source is never read: {always} always gives a "
                    "value first (sources are tried in order: put it last)",
                )
                break
            if isinstance(item, LMap) and len(item) == 1:
                ((kind, arg),) = item.items()
                if kind in ("value", "idle_split", "client_ip"):
                    always = f"{{{kind}: {_clip(str(arg)) if kind != 'client_ip' else 'true'}}} at line {line_of(sources_list, index)}"
            if not isinstance(item, LMap) or len(item) != 1:
                check.error(
                    sources_list,
                    index,
                    f"each identity source is one of {{{': …}, {'.join(SOURCE_KINDS)}: …}}",
                )
                continue
            ((kind, arg),) = item.items()
            if kind not in SOURCE_KINDS:
                check.keys(item, SOURCE_KINDS, f"identity.{level} source")
                continue
            if kind == "header":
                name = check.text(item, kind, "header")
                if name is not None and not _HEADER.match(name):
                    check.error(item, kind, f"'{_clip(name)}' is not a valid header name")
                elif name is not None and credential_header(name):
                    check.error(
                        item,
                        kind,
                        f"identity.{level}: header '{name}' carries a credential, and an identity "
                        "value is kept in scope paths (the ledger, reports, 403 bodies); name the "
                        "caller with an X-Drawdown-* header, proxy_user or a value",
                    )
                elif name is not None:
                    sources.append(Source("header", name))
            elif kind in ("proxy_user", "proxy_password", "client_ip"):
                if arg is not True:
                    check.error(item, kind, f"{kind} takes true")
                else:
                    sources.append(Source(kind))
            elif kind == "value":
                if isinstance(arg, bool) or not isinstance(arg, str | int) or str(arg) == "":
                    check.error(item, kind, "value takes non-empty text")
                else:
                    sources.append(Source("value", str(arg)))
            else:  # idle_split
                if level != "run":
                    check.error(item, kind, "idle_split only applies to the run level")
                elif (seconds := check.integer(item, kind, "idle_split seconds", 1)) is not None:
                    sources.append(Source("idle_split", seconds))
        result[level] = tuple(sources)
    return result


ACTION_KEYS = (
    "kind",
    "provider",
    "match",
    "cost",
    "cost_header",
    "cost_json",
    "price",
    "stream_usage",
    "tools",
)
MATCH_KEYS = ("host", "method", "path", "query", "json", "header")


def _action(check: _Checker, actions: LList, index: int) -> Action | None:
    item = actions[index]
    if not isinstance(item, LMap):
        check.error(actions, index, f"each action must be a mapping, not {_kind(item)}")
        return None
    ok = check.keys(item, ACTION_KEYS, "action", required=("kind", "match"))
    kind = check.text(item, "kind", "kind") if "kind" in item else None
    if kind is not None and not _KIND.match(kind):
        check.error(
            item, "kind", f"action kind '{kind}' may hold letters, digits, '_', '-' and '.' only"
        )
        ok = False
    provider = None
    if "provider" in item:
        provider = check.choice(item, "provider", PROVIDERS, "provider")
        ok = ok and provider is not None
    if kind is not None:
        check.kinds.add(kind)
        if provider == "mcp":
            check.tool_prefixes.add(f"{kind}.")
    match = _match(check, item) if "match" in item else None
    cost = None
    cost_map = None
    if "cost" in item and _amount_like(item["cost"]):  # `cost: 0.002`: say how to write it
        shown = _clip(str(item["cost"]))
        check.error(
            item,
            "cost",
            f"cost is a mapping {{usd: AMOUNT}}, not {_kind(item['cost'])} "
            f"(write cost: {{usd: {shown}}})",
        )
        ok = False
    elif "cost" in item:
        cost_map = check.mapping(item, "cost", "cost")
    if cost_map is not None and check.keys(cost_map, ("usd",), "cost", required=("usd",)):
        cost = check.usd(cost_map, "usd", "cost.usd")
    if "cost" in item and provider in ("openai", "anthropic", "gemini", "bedrock"):
        check.error(
            item, "cost", "an LLM action is priced from its tokens; 'cost' is for tool actions"
        )
        ok = False
    cost_header = check.text(item, "cost_header", "cost_header") if "cost_header" in item else None
    if cost_header is not None and not _HEADER.match(cost_header):
        check.error(item, "cost_header", f"'{_clip(cost_header)}' is not a valid header name")
        ok = False
    cost_json = check.text(item, "cost_json", "cost_json") if "cost_json" in item else None
    if cost_json is not None and ("" in cost_json.split(".") or "*" in cost_json.split(".")):
        # Read as a key named "" (or a list of values): no response would ever carry the cost.
        check.error(
            item,
            "cost_json",
            f"cost_json '{cost_json}' must be a dotted path to one value, such as usage.cost_usd",
        )
        ok = False
    price = None
    if "price" in item:
        if provider not in ("openai", "anthropic", "gemini", "bedrock"):
            check.error(item, "price", "'price' (per million tokens) applies to LLM actions only")
            ok = False
        elif (price_map := check.mapping(item, "price", "price")) is not None:
            price = _price(check, price_map, "price")
    stream_usage = True
    if "stream_usage" in item:
        if provider != "openai":
            check.error(
                item,
                "stream_usage",
                "'stream_usage' (ask for usage in OpenAI chat and completions streams) applies to provider: openai actions only",
            )
            ok = False
        elif not isinstance(item["stream_usage"], bool):
            check.error(
                item,
                "stream_usage",
                f"stream_usage must be true or false, not {_show(item['stream_usage'])}",
            )
            ok = False
        else:
            stream_usage = item["stream_usage"]
    tools: list[tuple[Any, str]] = []
    if "tools" in item:
        if provider != "mcp":
            check.error(
                item,
                "tools",
                "'tools' (tool name → action kind) applies to provider: mcp actions only",
            )
            ok = False
        elif (tool_map := check.mapping(item, "tools", "tools")) is not None:
            for tool, mapped in tool_map.items():
                if not isinstance(mapped, str) or not _KIND.match(mapped):
                    check.error(tool_map, tool, f"tools['{tool}'] must be an action kind")
                    ok = False
                else:
                    tools.append((compile_glob(tool), mapped))
                    check.kinds.add(mapped)
    if not ok or kind is None or match is None:
        return None
    return Action(
        tools=tuple(tools),
        kind=kind,
        match=match,
        provider=provider,
        cost_usd_nanos=cost,
        cost_header=cost_header,
        cost_json=cost_json,
        price=price,
        stream_usage=stream_usage,
        file=item.file,
        line=item.line,
    )


def _match(check: _Checker, action: LMap) -> ActionMatch | None:
    spec = check.mapping(action, "match", "match")
    if spec is None:
        return None
    ok = check.keys(spec, MATCH_KEYS, "match")
    hosts = []
    if "host" in spec and (texts := check.strings(spec, "host", "match.host")) is not None:
        for text in texts:
            try:
                hosts.append(compile_host(text))
            except ValueError as exc:
                check.error(spec, "host", str(exc))
                ok = False
    methods: list[str] = []
    if "method" in spec and (texts := check.strings(spec, "method", "match.method")) is not None:
        methods = [m.upper() for m in texts]
        for text in texts:
            if (problem := _method_problem(text)) is not None:
                check.error(spec, "method", problem)
                ok = False
    path = None
    if "path" in spec and (text := check.text(spec, "path", "match.path")) is not None:
        try:
            path = compile_path(text)
        except ValueError as exc:
            check.error(spec, "path", str(exc))
            ok = False
    tests: list[FieldTest] = []
    for prefix in ("query", "json", "header"):
        if (
            prefix in spec
            and (conditions := check.mapping(spec, prefix, f"match.{prefix}")) is not None
        ):
            found = conditions_of(check, conditions, prefix)
            if found is None:
                ok = False
            else:
                tests.extend(found)
    if not ok:
        return None
    return ActionMatch(hosts=tuple(hosts), methods=tuple(methods), path=path, tests=tuple(tests))


def _amount_like(value: Any) -> bool:
    return (isinstance(value, int | Decimal) and not isinstance(value, bool)) or (
        isinstance(value, str) and bool(value.strip())
    )


_COMMON_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


def _method_problem(text: str) -> str | None:
    """Why `method: TEXT` matches no request (None if it is an HTTP method)."""
    if text.upper() in HTTP_METHODS:
        return None
    parts = [part for part in re.split(r"[\s,;|/]+", text) if part]
    if len(parts) > 1 and all(part.upper() in HTTP_METHODS for part in parts):
        listed = ", ".join(part.upper() for part in parts)
        return f"'{_clip(text)}' is several methods in one text: list them as method: [{listed}]"
    if text.strip() in ("*", "ANY", "any", "ALL", "all"):
        return f"'{text}' is not an HTTP method: leave 'method' out to match every method"
    upper = text.upper()
    hint = next((m for m in _COMMON_METHODS if sorted(m) == sorted(upper)), None) or next(
        iter(difflib.get_close_matches(upper, HTTP_METHODS, n=1, cutoff=0.6)), None
    )
    return f"'{_clip(text)}' is not an HTTP method" + (
        f" (did you mean '{hint}'?)"
        if hint
        else f" (expected one of {', '.join(_COMMON_METHODS)}…)"
    )


def stripped_header(name: str) -> bool:
    """Whether the proxy removes a header named so before any action or rule reads it: the
    identity headers it strips (identity.identity_headers) and the proxy's own credentials
    (Proxy-Authorization, Drawdown.requestheaders). A condition on one never holds."""
    from ..identity import identity_headers  # not at import time: identity imports this package

    return name.lower() == "proxy-authorization" or bool(identity_headers([name]))


def _stripped(name: str) -> str:
    what = (
        "the proxy's credentials" if name.lower() == "proxy-authorization" else "an identity header"
    )
    return (
        f"'{_clip(name)}' is {what}, which the proxy removes before any action or rule reads "
        "it: a condition on it never holds (send the value in another header)"
    )


def conditions_of(check: _Checker, conditions: LMap, prefix: str) -> list[FieldTest] | None:
    """`{amount: {gt: 5}, "metadata.tier": gold}` under `json`/`query`/`header` (or top-level fields)."""
    tests: list[FieldTest] = []
    ok = True
    if not conditions:  # `json: {}` names no field: a `when` would hold for every request
        check.error(
            conditions,
            None,
            f"{prefix}: {{}} holds no condition: name a field ({prefix}: {{NAME: CONDITION}}) "
            f"or leave '{prefix}' out",
        )
        return None
    for name, spec in conditions.items():
        field = f"{prefix}.{name.lower() if prefix == 'header' else name}" if prefix else name
        if prefix == "header" and not _HEADER.match(name):
            check.error(conditions, name, f"'{_clip(name)}' is not a valid header name")
            ok = False
            continue
        if prefix == "header" and stripped_header(name):
            check.error(conditions, name, _stripped(name))
            ok = False
            continue
        if (problem := _compared_with_a_collection(field, spec) or _gap_in(field)) is not None:
            check.error(conditions, name, problem)
            ok = False
            continue
        try:
            tests.append(FieldTest(field, compile_condition(spec), line_of(conditions, name)))
        except ValueError as exc:
            check.error(conditions, name, f"condition on '{field}': {exc}")
            ok = False
    return tests if ok else None


def _gap_in(field: str) -> str | None:
    """`json.a..b` or a `json:` key "": a key named "" no request has (as cost_json refuses)."""
    prefix, _, path = field.partition(".")
    if prefix == "json" and "" in path.split("."):
        return f"'{_clip(field)}' has an empty key: a dotted path names each (json.a.b)"
    return None


def _compared_with_a_collection(field: str, spec: Any) -> str | None:
    """A query parameter, header, path segment or model name is one piece of text: compared
    with a list or a mapping it is never equal, so `model: [gpt-4o, gpt-4o-mini]` (meant as
    `in: [...]`) never held and a deny written so never fired. JSON fields may hold lists."""
    if not (field == "model" or field.startswith(("query.", "header.", "path."))):
        return None
    compared = [("", spec)] if isinstance(spec, list) else []
    if isinstance(spec, dict):
        compared = [(op, spec[op]) for op in ("eq", "ne") if op in spec]
        compared += [
            (op, option)
            for op in ("in", "not_in")
            if isinstance(spec.get(op), list)
            for option in spec[op]
        ]
    for op, value in compared:
        if isinstance(value, list | dict):
            excludes = op in ("ne", "not_in")
            fix = f"{field}: {{{'not_in' if excludes else 'in'}: [A, B]}}"
            return (
                f"'{field}' is one piece of text and never equals {_kind(value)}, so this "
                f"condition {'always' if excludes else 'never'} holds (to "
                f"{'exclude' if excludes else 'match any of'} several values, write {fix})"
            )
    return None


BUDGET_KEYS = ("name", "scope", "per", "actions", "mode", *UNITS)


def _budget(check: _Checker, budgets: LList, index: int) -> Budget | None:
    item = budgets[index]
    if not isinstance(item, LMap):
        check.error(budgets, index, f"each budget must be a mapping, not {_kind(item)}")
        return None
    ok = check.keys(item, BUDGET_KEYS, "budget", required=("scope",))
    scope = None
    if "scope" in item and (text := check.text(item, "scope", "scope")) is not None:
        try:
            scope = compile_scope(text)
        except ValueError as exc:
            check.error(item, "scope", str(exc))
    per = None
    if "per" in item:
        per = check.choice(item, "per", WINDOWS, "per")
        ok = ok and per is not None
    if not any(unit in item for unit in UNITS):
        misspelt = any(_closest(key, UNITS) for key in item if key not in BUDGET_KEYS)
        if not misspelt:  # `USD: 5` is said once, as the unknown key it is
            check.error(item, None, "a budget needs at least one limit: usd, tokens or requests")
        ok = False
    usd = check.usd(item, "usd", "usd") if "usd" in item else None
    tokens = check.integer(item, "tokens", "tokens") if "tokens" in item else None
    requests = check.integer(item, "requests", "requests") if "requests" in item else None
    if any(
        unit in item and value is None
        for unit, value in zip(UNITS, (usd, tokens, requests), strict=True)
    ):
        ok = False
    actions: list[Any] = []
    action_texts: list[str] = []
    if "actions" in item:
        listed = _kind_globs(check, item, "actions")
        ok = ok and listed is not None
        action_texts = [text for text, _ in listed or []]
        actions = [glob for _, glob in listed or []]
    mode = None
    if "mode" in item:
        mode = check.choice(item, "mode", MODES, "mode")
        ok = ok and mode is not None
    name = check.text(item, "name", "name") if "name" in item else None
    if not ok or scope is None:
        return None
    key = name or _budget_key(scope.text, per, action_texts)
    return Budget(
        key=key,
        scope=scope,
        limits=Limits(usd, tokens, requests),
        per=per,
        actions=tuple(actions),
        action_texts=tuple(action_texts),
        mode=mode,
        file=item.file,
        line=item.line,
        mode_line=line_of(item, "mode"),
    )


def _budget_key(scope: str, per: str | None, actions: list[str]) -> str:
    """Budgets are identified by what they cover, not their limits, so a raised limit keeps the spend."""
    key = scope
    if per:
        key += f" per {per}"
    if actions:
        key += f" [{','.join(actions)}]"
    return key


def _kind_globs(check: _Checker, item: LMap, key: str) -> list[tuple[str, Any]] | None:
    """The action kinds or globs listed at `item[key]`, each with its compiled glob and noted
    for the check against the actions; None after a mistake (reported)."""
    texts = check.strings(item, key, key)
    if texts is None:
        return None
    listed = []
    for i, text in enumerate(texts):
        if not _KIND.match(text.replace("*", "x").replace("?", "x")):
            check.error(item, key, f"'{text}' is not an action kind or glob")
        else:
            listed.append((text, compile_glob(text)))
            check.refer(item, key, i, text)
    return listed if len(listed) == len(texts) else None


RULE_KEYS = ("name", "scope", "allow", "deny", "action", "when", "requires", "mode")
WHEN_PREFIXES = ("json", "query", "header", "path")


def _rule(check: _Checker, rules: LList, index: int) -> Rule | None:
    item = rules[index]
    if not isinstance(item, LMap):
        check.error(rules, index, f"each rule must be a mapping, not {_kind(item)}")
        return None
    ok = check.keys(item, RULE_KEYS, "rule", required=("scope",))
    effects = [key for key in ("allow", "deny", "action") if key in item]
    if len(effects) != 1:
        check.error(
            item,
            None,
            "a rule names its actions with exactly one of allow: [...], deny: [...] or action: KIND",
        )
        return None
    effect_key = effects[0]
    scope = None
    if "scope" in item and (text := check.text(item, "scope", "scope")) is not None:
        try:
            scope = compile_scope(text)
        except ValueError as exc:
            check.error(item, "scope", str(exc))
    listed = _kind_globs(check, item, effect_key)
    texts = [text for text, _ in listed] if listed is not None else None
    globs = [glob for _, glob in listed or []]
    when: list[FieldTest] = []
    refused = False  # a `when:` or `requires:` was given but refused: its own error says why
    if "when" in item:
        conditions = check.mapping(item, "when", "when")
        if conditions is not None and not conditions:
            # An empty `when` would make a conditional allow an unconditional one.
            check.error(item, "when", "when: {} holds no condition: give one, or leave 'when' out")
            conditions = None
        found = _when(check, conditions) if conditions is not None else None
        refused = refused or found is None
        ok = ok and found is not None
        when = found or []
    requires: list[Requirement] = []
    if "requires" in item:
        if effect_key != "action":
            check.error(
                item,
                "requires",
                "'requires' goes with 'action: KIND' (a sequence rule), not allow/deny",
            )
            ok = False
        elif (items := check.sequence(item, "requires", "requires")) is not None:
            if not items:  # said here, not as a rule missing its `requires:`
                check.error(
                    item, "requires", "requires is empty: list the actions that must come first"
                )
                refused = True
            for i in range(len(items)):
                requirement = _requirement(check, items, i)
                ok = ok and requirement is not None
                refused = refused or requirement is None
                if requirement is not None:
                    requires.append(requirement)
        else:
            refused = True
    if effect_key == "action" and not requires and not when and not refused:
        check.error(
            item,
            None,
            "a rule with 'action:' needs 'requires:' or 'when:' (use allow/deny to grant or refuse)",
        )
        ok = False
    mode = None
    if "mode" in item:
        mode = check.choice(item, "mode", MODES, "mode")
        ok = ok and mode is not None
    name = check.text(item, "name", "name") if "name" in item else None
    if not ok or scope is None or texts is None:
        return None
    effect = effect_key if effect_key != "action" else ("require" if requires else "constrain")
    return Rule(
        effect=effect,
        scope=scope,
        actions=tuple(globs),
        action_texts=tuple(texts),
        when=tuple(when),
        requires=tuple(requires),
        mode=mode,
        name=name,
        file=item.file,
        line=item.line,
        mode_line=line_of(item, "mode"),
    )


def _when(check: _Checker, conditions: LMap) -> list[FieldTest] | None:
    """`when: {json: {amount: {lte: 5000}}, model: {in: [...]}}` — also `"json.amount": …` spelled flat."""
    tests: list[FieldTest] = []
    ok = True
    for key, spec in conditions.items():
        if key in WHEN_PREFIXES:
            if not isinstance(spec, LMap):
                check.error(conditions, key, f"when.{key} must map field names to conditions")
                ok = False
                continue
            found = conditions_of(check, spec, key)
        elif key == "model" or (key.split(".", 1)[0] in WHEN_PREFIXES and "." in key):
            found = None
            if key.startswith("header.") and not _HEADER.match(key.removeprefix("header.")):
                check.error(conditions, key, f"'{_clip(key)}' does not name a valid header")
                ok = False
                continue
            if key.startswith("header.") and stripped_header(key.removeprefix("header.")):
                check.error(conditions, key, _stripped(key.removeprefix("header.")))
                ok = False
                continue
            if (problem := _compared_with_a_collection(key, spec) or _gap_in(key)) is not None:
                check.error(conditions, key, problem)
                ok = False
                continue
            try:
                found = [FieldTest(key, compile_condition(spec), line_of(conditions, key))]
            except ValueError as exc:
                check.error(conditions, key, f"condition on '{key}': {exc}")
        else:
            check.error(
                conditions,
                key,
                f"unknown field '{key}' in when (expected json, query, header, path or model)",
            )
            found = None
        if found is None:
            ok = False
        else:
            tests.extend(found)
    return tests if ok else None


_FIELD = re.compile(r"^(model|(json|query|header|path)\.[^\s]+)$")


def _requirement(check: _Checker, items: LList, index: int) -> Requirement | None:
    item = items[index]
    if isinstance(item, str):
        check.refer(items, index, 0, item)
        return Requirement((item,))
    if not isinstance(item, LMap):
        check.error(items, index, "a requirement is an action kind or {action: KIND, same: FIELD}")
        return None
    if not check.keys(item, ("action", "same"), "requirement", required=("action",)):
        return None
    actions = check.strings(item, "action", "requirement action")
    if actions is None:
        return None
    for i, text in enumerate(actions):
        check.refer(item, "action", i, text)
    here = there = None
    if "same" in item:
        same = item["same"]
        if isinstance(same, str):
            here = there = same
        elif isinstance(same, LMap) and len(same) == 1:
            ((here, there),) = same.items()
        else:
            check.error(
                item, "same", "same: takes a field (json.customer_id) or {FIELD_HERE: FIELD_THERE}"
            )
            return None
        for field in (here, there):
            if not isinstance(field, str) or not _FIELD.match(field):
                check.error(
                    item,
                    "same",
                    f"'{field}' is not a request field (json.…, query.…, header.…, path.… or model)",
                )
                return None
            if field.startswith("header.") and stripped_header(field.removeprefix("header.")):
                check.error(item, "same", _stripped(field.removeprefix("header.")))
                return None
    return Requirement(tuple(actions), here, there, line_of(item, "same"))


def _anomalies(check: _Checker, section: LMap) -> list[Detector]:
    check.keys(section, tuple(DETECTORS), "anomalies")
    detectors = []
    for name, defaults in DETECTORS.items():
        if name not in section:
            detectors.append(Detector(name, params=tuple(defaults.items())))
            continue
        spec = section[name]
        if spec is None:
            spec = LMap()
            spec.file, spec.line, spec.key_lines = section.file, line_of(section, name), {}
        if not isinstance(spec, LMap):
            check.error(
                section, name, f"anomalies.{name} must be a mapping (or {{}} for the defaults)"
            )
            continue
        check.keys(spec, (*defaults, "on_detect", "actions"), f"anomalies.{name}")
        on_detect = "flag"
        if "on_detect" in spec:
            on_detect = (
                check.choice(spec, "on_detect", ("flag", "deny"), f"anomalies.{name}.on_detect")
                or "flag"
            )
            if on_detect == "deny" and name not in DENIABLE:
                check.error(
                    spec,
                    "on_detect",
                    f"anomalies.{name} is known only after a call completes, so it can flag but not deny "
                    f"(deny works for {', '.join(DENIABLE)})",
                )
        actions = (
            check.strings(spec, "actions", f"anomalies.{name}.actions") if "actions" in spec else []
        )
        for i, text in enumerate(actions or []):
            check.refer(spec, "actions", i, text)
        params = dict(defaults)
        for key, default in defaults.items():
            if key not in spec:
                continue
            if isinstance(default, Decimal):
                value = check.number(spec, key, f"anomalies.{name}.{key}")
            else:
                minimum = MINIMUMS.get((name, key), 1)
                value = check.integer(spec, key, f"anomalies.{name}.{key}", minimum)
            if value is not None:
                params[key] = value
        detectors.append(Detector(name, on_detect, tuple(actions or ()), tuple(params.items())))
    return detectors


METER_KEYS = ("default_max_output_tokens", "max_output_tokens", "fallback_price", "safety_factor")


def _meter(check: _Checker, meter: LMap) -> dict[str, Any]:
    check.keys(meter, METER_KEYS, "meter")
    result: dict[str, Any] = {}
    if "default_max_output_tokens" in meter:
        value = check.integer(meter, "default_max_output_tokens", "default_max_output_tokens", 1)
        if value is not None:
            result["default_max_output_tokens"] = value
    if "max_output_tokens" in meter and (
        caps := check.mapping(meter, "max_output_tokens", "max_output_tokens")
    ):
        pairs = []
        for pattern in caps:
            if (problem := _cap_key_problem(pattern)) is not None:
                check.error(caps, pattern, problem)
                continue
            value = check.integer(caps, pattern, f"max_output_tokens['{pattern}']", 1)
            if value is not None:
                pairs.append((pattern, value))
        result["max_output_tokens"] = tuple(pairs)
    if "fallback_price" in meter and (
        price := check.mapping(meter, "fallback_price", "fallback_price")
    ):
        fallback = _price(check, price, "fallback_price")
        if fallback is not None:
            result["fallback_price"] = fallback
    if "safety_factor" in meter and (
        factors := check.mapping(meter, "safety_factor", "safety_factor")
    ):
        values = {}
        for family in factors:
            if family not in FAMILIES:
                hint = _FAMILY_OF.get(family.lower()) or _closest(family, FAMILIES)
                check.error(
                    factors,
                    family,
                    f"unknown model family '{_clip(family)}' in safety_factor"
                    + (
                        f" (did you mean '{hint}'?)"
                        if hint
                        else f" (expected one of: {', '.join(FAMILIES)}; OpenAI models are "
                        "counted with their own tokenizer)"
                    ),
                )
                continue
            value = check.number(factors, family, f"safety_factor.{family}", Decimal(1))
            if value is not None:
                values[family] = value
        result["safety_factors"] = values
    return result


# The model families a safety factor applies to (meter.config.model_family); a key naming the
# provider is said which family it means.
FAMILIES = tuple(DEFAULT_SAFETY_FACTORS)
_FAMILY_OF = {"anthropic": "claude", "google": "gemini", "gemma": "gemini", "vertex": "gemini"}


def _cap_key_problem(pattern: str) -> str | None:
    """Why a max_output_tokens key matches no request (None if it may): keys are globs over
    `provider:model`, so the pattern must be able to begin with one of the LLM providers."""
    start = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    globbed = start != pattern
    if any(
        start.startswith(f"{p}:") or (globbed and f"{p}:".startswith(start)) for p in LLM_PROVIDERS
    ):
        return None
    head, colon, rest = pattern.partition(":")
    hint = _closest(head, LLM_PROVIDERS) if colon else None
    if hint:
        return (
            f"max_output_tokens key '{_clip(pattern)}' names no provider "
            f"(did you mean '{hint}:{_clip(rest)}'?)"
        )
    return (
        f"max_output_tokens key '{_clip(pattern)}' matches no request: keys are PROVIDER:MODEL "
        f"globs with PROVIDER one of {', '.join(LLM_PROVIDERS)} (e.g. 'anthropic:claude-opus-*', "
        "'*:gpt-4o*')"
    )


def _price(check: _Checker, price: LMap, what: str) -> PricePerMillion | None:
    if not check.keys(
        price, ("input", "output", "cache_read", "cache_write"), what, required=("input", "output")
    ):
        return None
    values = {
        key: check.number(
            price, key, f"{what}.{key} (USD per million tokens)", maximum=Decimal(MAX_USD)
        )
        for key in price
    }
    if any(v is None for v in values.values()):
        return None
    if what == "fallback_price":
        # It prices models nobody knows the price of: at $0 they would run uncounted.
        for key in ("input", "output"):
            if values[key] == 0:
                check.error(price, key, f"fallback_price.{key} must be above 0, not 0")
                return None
    return PricePerMillion(**values)  # type: ignore[arg-type]


def _holds(check: _Checker, holds: LMap) -> HoldSettings:
    check.keys(holds, ("ttl", "lease"), "holds")
    ttl = check.integer(holds, "ttl", "holds.ttl (seconds)", 1) if "ttl" in holds else None
    lease = check.integer(holds, "lease", "holds.lease (seconds)", 1) if "lease" in holds else None
    defaults = HoldSettings()
    return HoldSettings(
        ttl_seconds=ttl or defaults.ttl_seconds, lease_seconds=lease or defaults.lease_seconds
    )


def _record(check: _Checker, record: LMap) -> RecordSettings:
    """`record: {bodies: none | fields | full, fields: [json.…], max_body_bytes: N}` (for replay)."""
    check.keys(record, ("bodies", "fields", "max_body_bytes"), "record")
    defaults = RecordSettings()
    bodies = (
        check.choice(record, "bodies", RECORD_BODIES, "record.bodies")
        if "bodies" in record
        else None
    )
    fields: list[str] = []
    named = check.strings(record, "fields", "record.fields") if "fields" in record else None
    for name in named or []:
        if not name.startswith("json.") or not _FIELD.match(name):
            check.error(record, "fields", f"record.fields: '{name}' is not a json.<path> field")
        else:
            fields.append(name)
    limit = (
        check.integer(record, "max_body_bytes", "record.max_body_bytes", 1)
        if "max_body_bytes" in record
        else None
    )
    return RecordSettings(
        bodies=bodies or defaults.bodies,
        fields=tuple(fields),
        max_body_bytes=limit or defaults.max_body_bytes,
    )


def _limits(check: _Checker, limits: LMap) -> RequestLimits:
    """`limits: {max_request_bytes: N}` — larger request bodies are refused with 413."""
    check.keys(limits, ("max_request_bytes",), "limits")
    size = (
        check.integer(limits, "max_request_bytes", "limits.max_request_bytes", 1)
        if "max_request_bytes" in limits
        else None
    )
    return RequestLimits(max_request_bytes=size) if size else RequestLimits()


# --- merge ------------------------------------------------------------------------------


def compile_policy(
    documents: list[tuple[str, Any]], texts: list[bytes], problems: list[Problem]
) -> Policy:
    """Check every document, merge a folder's files, and compile; raise PolicyInvalid on any problem."""
    check = _Checker()
    check.problems.extend(problems)
    parts = [(file, _check_document(check, doc, file)) for file, doc in documents]

    scalars: dict[str, tuple[Any, str]] = {}
    identity = dict(DEFAULT_IDENTITY)
    identity_from: dict[str, str] = {}
    meter_from = holds_from = anomalies_from = record_from = None
    anomalies = AnomalySettings()
    meter_kwargs: dict[str, Any] = {}
    holds = HoldSettings()
    record = RecordSettings()
    limits, limits_from = RequestLimits(), None
    actions: list[Action] = []
    budgets: list[Budget] = []
    rules: list[Rule] = []
    authority_default, default_from = "allow", None
    for _file, part in parts:
        for key, (value, where) in part.scalars.items():
            _merge_once(check, key, where, scalars.get(key, (None, None))[1])
            scalars[key] = (value, where)
        for level, (sources, where) in part.identity.items():
            _merge_once(check, f"identity.{level}", where, identity_from.get(level))
            identity[level] = sources
            identity_from[level] = where
        if part.meter is not None:
            _merge_once(check, "meter", part.meter[1], meter_from)
            meter_kwargs, meter_from = part.meter
        if part.anomalies is not None:
            _merge_once(check, "anomalies", part.anomalies[1], anomalies_from)
            anomalies, anomalies_from = AnomalySettings(tuple(part.anomalies[0])), part.anomalies[1]
        if part.holds is not None:
            _merge_once(check, "holds", part.holds[1], holds_from)
            holds, holds_from = part.holds
        if part.record is not None:
            _merge_once(check, "record", part.record[1], record_from)
            record, record_from = part.record
        if part.limits is not None:
            _merge_once(check, "limits", part.limits[1], limits_from)
            limits, limits_from = part.limits
        if part.authority_default is not None:
            _merge_once(check, "authority.default", part.authority_default[1], default_from)
            authority_default, default_from = part.authority_default
        actions.extend(part.actions)
        budgets.extend(part.budgets)
        rules.extend(part.rules)

    seen: dict[str, Budget] = {}
    for budget in budgets:
        if budget.key in seen:
            first = seen[budget.key]
            check.problems.append(
                Problem(
                    budget.file,
                    budget.line,
                    f"budget '{budget.key}' is defined twice (first at {first.where}); give one a distinct name",
                )
            )
        seen[budget.key] = budget
    _check_kind_refs(check)
    _check_requirement_circles(check, rules, scalars.get("mode", ("enforce", ""))[0])
    _check_unreachable(check, actions)
    reach_warnings = _check_field_reach(check, actions, rules)
    named: dict[str, Rule] = {}
    for rule in rules:
        if rule.name is None:
            continue
        if (first := named.get(rule.name)) is not None:
            message = f"rule name '{rule.name}' is already used at {first.file}:{first.line}"
            check.problems.append(Problem(rule.file, rule.line, message))
        else:
            named[rule.name] = rule

    if check.problems:
        # Once each: a mapping written once and used twice (`*run`) says the same twice.
        unique = dict.fromkeys(check.problems)
        raise PolicyInvalid(sorted(unique, key=lambda p: (p.file, p.line)))
    unknown_hosts, unknown_hosts_from = scalars.get("unknown_hosts", ("allow", ""))
    return Policy(
        mode=scalars.get("mode", ("enforce", ""))[0],
        unknown_hosts=unknown_hosts,
        on_ledger_error=scalars.get("on_ledger_error", (None, ""))[0],
        identity=identity,
        actions=tuple(actions),
        budgets=tuple(budgets),
        authority=Authority(authority_default, tuple(rules)),
        anomalies=anomalies,
        meter=MeterConfig(**meter_kwargs),
        holds=holds,
        record=record,
        limits=limits,
        files=tuple(file for file, _ in documents),
        digest=hashlib.sha256(b"\0".join(texts)).hexdigest(),
        warnings=tuple(
            _warnings(unknown_hosts, unknown_hosts_from, actions, documents)
            + _enforced_in_shadow(scalars.get("mode", ("enforce", ""))[0], budgets, rules)
            + reach_warnings
        ),
    )


def _warnings(
    unknown_hosts: str, where: str, actions: list[Action], documents: list[tuple[str, Any]]
) -> list[Problem]:
    """What a valid policy does that its author likely did not mean: `drawdown check` prints
    these (the proxy logs the same when it loads the policy)."""
    found = []
    if not actions and documents:
        # A folder left with its `version: 1` file only (the others moved, renamed .yml.bak)
        # loads, and a running proxy took it in silently: every deny and budget gone.
        outcome = (
            "every request is refused (unknown_hosts: deny)"
            if unknown_hosts == "deny"
            else "no request is classified, so no budget, rule or anomaly check applies to any"
        )
        # At an `actions: []` if a file has one (where the actions go), else at line 1 of the
        # first file: the problem is the whole policy's, no line holds it.
        file, line = next(
            (
                (name, line_of(doc, "actions"))
                for name, doc in documents
                if isinstance(doc, LMap) and "actions" in doc
            ),
            (documents[0][0], 1),
        )
        found.append(Problem(file, line, f"warning: the policy defines no actions: {outcome}"))
    if unknown_hosts == "passthrough" and (hostless := hostless_action(actions)) is not None:
        file, _, line = where.rpartition(":")
        found.append(
            Problem(
                file,
                int(line),
                f"warning: unknown_hosts: passthrough has no effect: the action at "
                f"{hostless.where} matches every host",
            )
        )
    return found


def _enforced_in_shadow(mode: str, budgets: list[Budget], rules: list[Rule]) -> list[Problem]:
    """`mode: enforce` on a budget or rule of a shadow policy: shadow mode blocks nothing."""
    if mode != "shadow":
        return []
    return [
        Problem(
            item.file,
            item.mode_line or item.line,
            f"warning: mode: enforce on this {kind} has no effect: the policy is in shadow "
            "mode, which blocks nothing (set the policy's mode to enforce, and mode: shadow "
            "on what is still on trial)",
        )
        for kind, items in (("budget", budgets), ("rule", rules))
        for item in items
        if item.mode == "enforce"
    ]


def covers(first: ActionMatch, later: ActionMatch) -> bool:
    """Whether every request `later` matches, `first` matches too. Decided only where it is
    certain, never guessed: `first` has no json/query/header conditions, its methods include
    all of `later`'s, and its path and hosts each cover `later`'s (HostPattern.covers,
    PathPattern.covers). False when unsure."""
    if first.tests:
        return False
    if first.methods and not (later.methods and set(later.methods) <= set(first.methods)):
        return False
    if first.path is not None and not first.path.covers(later.path):
        return False
    if not first.hosts:
        return True
    if not later.hosts:
        return any(h.covers(None) for h in first.hosts)
    return all(any(h.covers(other) for h in first.hosts) for other in later.hosts)


def _literal_path(path: PathPattern) -> bool:
    return not path.names and not is_glob(path.text)


def _check_unreachable(check: _Checker, actions: list[Action]) -> None:
    """The first matching action names a request's kind (SPEC §3), so an action after one that
    matches every request it would never matches: its kind is never metered, classified or
    governed by the rules and budgets naming it. Run on the merged folder (files in name order).

    Each action is compared only with the earlier ones that could cover it: one whose hosts are
    all literal covers only an action whose first host is one of them, one with a literal path
    only an action with that very path (PathPattern.covers); the rest are compared with every
    later action. A policy of thousands of actions is checked in well under a second."""
    anywhere: list[int] = []
    by_host: dict[str, list[int]] = {}
    by_path: dict[str, list[int]] = {}
    budget = 300_000  # comparisons: past it (a contrived policy) the check stops, silent
    for index, action in enumerate(actions):
        match = action.match
        candidates = list(anywhere)
        if match.hosts:
            candidates += by_host.get(match.hosts[0].glob, [])
        if match.path is not None and _literal_path(match.path):
            candidates += by_path.get(match.path.text, [])
        budget -= len(candidates)
        if budget < 0:
            return
        first = next(
            (actions[i] for i in sorted(candidates) if covers(actions[i].match, match)), None
        )
        if not match.tests:  # an action with conditions never covers another: not indexed
            if match.hosts and not any(is_glob(h.glob) for h in match.hosts):
                for glob in {h.glob for h in match.hosts}:
                    by_host.setdefault(glob, []).append(index)
            elif match.path is not None and _literal_path(match.path):
                by_path.setdefault(match.path.text, []).append(index)
            else:
                anywhere.append(index)
        if first is None:
            continue
        if first.match == ActionMatch():
            reach = "matches every request first"
            fix = "put the catch-all last"
        else:
            reach = "matches every request this one would, first"
            fix = "put the narrower action first"
        if first.file != action.file:
            fix += "; a folder's files are read in name order"
        check.problems.append(
            Problem(
                action.file,
                action.line,
                f"action '{action.kind}' can never match: the action '{first.kind}' at "
                f"{first.where} {reach} (actions are tried in order: {fix})",
            )
        )


def _check_kind_refs(check: _Checker) -> None:
    """A rule, requirement, budget or detector naming a kind no action yields never matches: a
    typo in `deny: [refund.isue]` would silently deny nothing. Run on the merged folder, since
    any of its files may define the action."""
    if not check.kinds:  # no actions: nothing is classified (an anomalies-only policy for report)
        return
    kinds = tuple(sorted(check.kinds))
    prefixes = check.tool_prefixes
    for text, file, line in check.kind_refs:
        if is_glob(text):
            # Accepted if it matches a kind, or its literal start could begin some `K.<tool>`.
            start = re.split(r"[*?\[]", text, maxsplit=1)[0]
            pattern = compile_glob(text)
            if any(pattern.match(kind) for kind in kinds) or any(
                start.startswith(p) or p.startswith(start) for p in prefixes
            ):
                continue
            message = f"'{text}' matches no action kind of this policy"
        elif text in kinds or any(text.startswith(p) and len(text) > len(p) for p in prefixes):
            continue
        else:
            message = f"'{text}' names no action kind of this policy"
        hint = _closest(text, kinds)
        message += f" (did you mean '{hint}'?)" if hint else f" (its kinds: {', '.join(kinds)})"
        check.problems.append(Problem(file, line, message))


def _check_requirement_circles(check: _Checker, rules: list[Rule], mode: str) -> None:
    """`crm.write` requiring `crm.write`, or `a` requiring `b` requiring `a`: no run can make
    the first of them, so every such call is refused, as surely as by a deny the author did not
    write. Judged per rule scope, with the rules of scope `*` that apply to it too, and only
    where certain: unconditional requirements, on the policy's own kinds (an MCP tool's kind,
    `K.<tool>`, is not known before the call)."""
    kinds = check.kinds
    # A rule in shadow mode refuses nothing: the call goes, and meets the next requirement.
    unconditional = [r for r in rules if r.requires and not r.when and r.mode != "shadow"]
    prefixes = tuple(check.tool_prefixes)

    def kinds_of(texts: tuple[str, ...]) -> set[str] | None:
        """The policy's kinds these name, or None when they may name one it cannot list (or
        none: a typo, which _check_kind_refs reports)."""
        found: set[str] = set()
        for text in texts:
            if text.startswith(prefixes) or (is_glob(text) and prefixes):
                return None
            pattern = compile_glob(text)
            named = {kind for kind in kinds if pattern.match(kind)}
            if not named:
                return None
            found |= named
        return found

    said: set[tuple[int, str]] = set()  # a rule of scope `*` is judged with every scope's
    for scope in sorted({rule.scope.text for rule in unconditional}):  # `*` (and "") first
        needs: dict[str, list[tuple[Requirement, Rule, set[str] | None]]] = {}
        for rule in unconditional:
            if rule.scope.text not in (scope, "*", ""):
                continue
            for kind in kinds_of(rule.action_texts) or ():
                for requirement in rule.requires:
                    earlier = kinds_of(requirement.actions)
                    needs.setdefault(kind, []).append((requirement, rule, earlier))
        # Legal at some point of a run: needing nothing, or something that is legal itself.
        legal = kinds - set(needs)
        grown = True
        while grown:
            grown = False
            for kind, required in needs.items():
                if kind not in legal and all(e is None or e & legal for _, _, e in required):
                    legal.add(kind)
                    grown = True
        for kind in sorted(set(needs) - legal):
            requirement, rule, earlier = next(
                n for n in needs[kind] if n[2] is not None and not n[2] & legal
            )
            what = " or ".join(requirement.actions)
            why = (
                "so no run can make the first"
                if earlier == {kind}
                else "which can never come first either (the requirements go round in a circle)"
            )
            where = "" if scope in ("*", "") else f" for {scope}"
            if (id(requirement), kind) in said:
                continue
            said.add((id(requirement), kind))
            check.problems.append(
                Problem(
                    rule.file,
                    requirement.line or rule.line,
                    f"'{kind}' can never be allowed{where}"
                    + (" once the policy enforces" if mode == "shadow" else "")
                    + ": it requires an earlier successful "
                    f"{what} in the same run, {why}",
                )
            )


def _check_field_reach(check: _Checker, actions: list[Action], rules: list[Rule]) -> list[Problem]:
    """A field the requests of a rule's actions never carry: a condition on it that needs a
    value never holds (a deny never fires), and a requirement on it is never met (every call
    refused). Errors, as `check.problems`: `path.X` with no `{X}` in any of the actions' paths
    (`same: {json.customer_id: path.id}` beside `/customers/{cid}`), and `model` on actions
    that are no LLM calls. Returned as warnings: `json.X` on actions matching GET or HEAD
    only, whose requests carry no body as a rule (some APIs read one all the same)."""
    warnings: list[Problem] = []

    def applying(texts: tuple[str, ...]) -> list[Action]:
        if not texts:
            return list(actions)
        found = []
        for action in actions:
            for text in texts:
                start = re.split(r"[*?\[]", text, maxsplit=1)[0]
                tool_of_it = action.provider == "mcp" and (
                    text.startswith(f"{action.kind}.")
                    or (is_glob(text) and f"{action.kind}.".startswith(start))
                )
                if compile_glob(text).match(action.kind) or tool_of_it:
                    found.append(action)
                    break
        return found

    def shown(candidates: list[Action], what: Any) -> str:
        listed = sorted({f"{a.kind}: {what(a)}" for a in candidates})
        return "; ".join(listed[:3]) + ("; …" if len(listed) > 3 else "")

    def report(
        field: str | None, texts: tuple[str, ...], file: str, line: int, outcome: str
    ) -> None:
        if field is None:
            return
        candidates = applying(texts)
        if not candidates:
            return  # no action at all is the kind-reference check's to report
        if field.startswith("path."):
            name = field.removeprefix("path.")
            if any(a.match.path is not None and name in a.match.path.names for a in candidates):
                return
            paths = shown(candidates, lambda a: a.match.path.text if a.match.path else "any path")
            check.problems.append(
                Problem(
                    file,
                    line,
                    f"'{field}' is captured by no action it applies to ({paths}): name a "
                    f"{{{name}}} segment in the action's path pattern",
                )
            )
        elif field == "model":
            if any(a.provider in LLM_PROVIDERS for a in candidates):
                return
            kinds = shown(
                candidates, lambda a: f"provider {a.provider}" if a.provider else "no provider"
            )
            check.problems.append(
                Problem(
                    file,
                    line,
                    f"'model' is known for LLM calls only, and no action this applies to is "
                    f"one ({kinds}): {outcome}",
                )
            )
        elif field.startswith("json."):
            bodiless = ("GET", "HEAD")
            if not all(
                a.match.methods and set(a.match.methods) <= set(bodiless) for a in candidates
            ):
                return
            if any(a.match.needs_body for a in candidates):
                return  # its author matches a body on it: this API takes one
            methods = shown(candidates, lambda a: " or ".join(a.match.methods))
            warnings.append(
                Problem(
                    file,
                    line,
                    f"warning: '{field}' is read from the request's body, but every action this "
                    f"applies to matches GET or HEAD only ({methods}), which carry no body as "
                    f"a rule: unless this API reads one on them, {outcome}",
                )
            )

    for rule in rules:
        for test in rule.when:
            # `ne`, `not_in` and `exists: false` hold for a field a request lacks
            always = condition_holds(test.condition, missing())
            outcome = f"this condition {'always' if always else 'never'} holds"
            report(test.field, rule.action_texts, rule.file, test.line or rule.line, outcome)
        for requirement in rule.requires:
            never_met = "this requirement is never met, and every call it covers is refused"
            line = requirement.line or rule.line
            report(requirement.here, rule.action_texts, rule.file, line, never_met)
            if requirement.there != requirement.here or requirement.actions != rule.action_texts:
                report(requirement.there, requirement.actions, rule.file, line, never_met)
    return warnings


def _merge_once(check: _Checker, key: str, where: str, earlier: str | None) -> None:
    """A folder's files may each add actions and budgets, but a setting is made in one place only."""
    if earlier is not None:
        file, _, line = where.rpartition(":")
        check.problems.append(Problem(file, int(line), f"'{key}' is already set at {earlier}"))
