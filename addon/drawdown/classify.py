"""What is being done: request → action kind (SPEC §3). The first action whose match fits wins."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, unquote

from .meter import charging
from .policy.match import canonical_host, dig, holds, missing
from .policy.model import Action, ActionMatch, FieldTest, Policy

_UNPARSED = object()

# RFC 3986 §2.3: a %-escape of an unreserved character is the character itself, to every server.
_UNRESERVED_ESCAPE = re.compile(
    r"%(4[1-9A-Fa-f]|5[0-9Aa]|6[1-9A-Fa-f]|7[0-9Aa]|3[0-9]|2[DdEe]|5[Ff]|7[Ee])"
)


def normalize_path(path: str) -> str:
    """The path as every server reads it: %-escapes of letters, digits and `-._~` decoded
    (`/docs/%6Dcp` is `/docs/mcp`). Matched raw, such a path missed the action naming it, and
    its tool calls ran under no rule at all."""
    if "%" not in path:
        return path
    return _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)


def _resolved(path: str) -> str | None:
    """The path as many servers route it, when that differs: every %-escape decoded (`%2F` a
    `/`) and dot segments removed (RFC 3986 §5.2.4). None when it reads the same."""
    if "%" not in path and "/." not in path:
        return None
    segments: list[str] = []
    for segment in unquote(path).split("/")[1:]:
        if segment == "..":
            if segments:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    trailing = path.endswith(("/.", "/..")) and bool(segments)
    resolved = "/" + "/".join(segments) + ("/" if trailing else "")
    return None if resolved == path else resolved


_FORM = "application/x-www-form-urlencoded"
# Why a parameter given more than once cannot be read for sure.
_REPEATS = "which servers read differently (Flask and Go the first, PHP and Rails the last)"


def first_values(pairs: Iterable[tuple[str, str]]) -> tuple[dict[str, str], frozenset[str]]:
    """Parameters (a query string's, a form's) by name, each name's first value as mitmproxy
    reads a query; and the names given more than once, which no condition may read."""
    values: dict[str, str] = {}
    repeated: set[str] = set()
    for name, value in pairs:
        if name in values:
            repeated.add(name)
        else:
            values[name] = value
    return values, frozenset(repeated)


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999: Python reads inf, Go refuses it, JavaScript Infinity
        raise ValueError(f"the number {text[:20]} is too large to be finite")
    return number


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is no JSON value")  # Python's reader takes NaN and Infinity


def _read_body(body: bytes, content_type: str) -> tuple[Any, str | None, frozenset[str]]:
    """The body as conditions read it: JSON, or a form-encoded one (Stripe-style APIs) as a
    flat mapping of strings; why it cannot be read as its upstream reads it (None: it can, or
    it is empty); and the form's names given more than once. A body that cannot be read is
    MISSING: conditions on it refuse the request (RequestView.unread) rather than guess."""
    if not body:
        return missing(), None, frozenset()
    media = content_type.split(";", 1)[0].strip().lower()
    if media == _FORM:
        if body.lstrip()[:1] in (b"{", b"["):
            # Read as a form it has no fields, as JSON (a server that ignores Content-Type) it has.
            why = f"the body looks like JSON, but its Content-Type says {_FORM}"
            why += ": servers read it either way"
            return missing(), why, frozenset()
        try:
            fields, repeated = first_values(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            return missing(), "the form body is not valid UTF-8", frozenset()
        return fields, None, repeated
    try:
        return json.loads(body, parse_constant=_not_json, parse_float=_finite), None, frozenset()
    except UnicodeDecodeError:
        return missing(), "the body is not valid UTF-8", frozenset()
    except RecursionError:  # `[[[[…` nested
        return missing(), "the body is nested too deeply to read", frozenset()
    except ValueError as exc:  # not JSON, or JSON only lenient readers take (NaN, `,}`, comments)
        shown = f" (Content-Type {media[:60]})" if media and "json" not in media else ""
        return missing(), f"the body{shown} is not valid JSON: {exc}", frozenset()


@dataclass
class RequestView:
    """The parts of a request that policies can look at. Headers must be case-insensitive."""

    method: str
    host: str
    port: int
    path: str  # without the query string
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    path_params: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None
    scheme: str = "https"  # the upstream's (genai-prices knows providers by URL)
    query_repeats: frozenset[str] = frozenset()  # query parameters given more than once
    # Why the body cannot be decoded as its upstream decodes it (its Content-Encoding): no
    # action's request may be read so (meter.decode.decode_body).
    undecodable: str | None = None
    # The IP address the request is sent to, when `host` is the name it gives instead, and why
    # it cannot be classified by one host (see `addressed`): `classify` decides on both.
    address: str | None = None
    host_error: str | None = None
    _json: Any = field(default=_UNPARSED, repr=False)
    _unreadable: str | None = field(default=None, repr=False)  # found parsing the body
    _fold: bool = field(default=False, repr=False)  # paths matched in any case (a reading)
    _form_repeats: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def json(self) -> Any:
        """The body as JSON (or form fields), parsed once on first use; MISSING if it is neither."""
        if self._json is _UNPARSED:
            if self.undecodable is not None:
                self._json = missing()
            else:
                self._json, self._unreadable, self._form_repeats = _read_body(
                    self.body, self.headers.get("content-type") or ""
                )
        return self._json

    @property
    def unreadable(self) -> str | None:
        """Why the body cannot be read as its upstream reads it (None: it can, or it is empty)."""
        if self.undecodable is not None:
            return self.undecodable
        self.json  # noqa: B018 (parsed once: that finds it)
        return self._unreadable

    def unread(self, name: str) -> str | None:
        """Why the value of field `name` cannot be known as the upstream will read it: a body
        that cannot be read, or a parameter given more than once. None: it can (present or not)."""
        prefix, _, rest = name.partition(".")
        if prefix == "json":
            if (problem := self.unreadable) is not None:
                return problem
            key = rest.split(".", 1)[0]
            if key in self._form_repeats:
                return f"the form field '{key}' is given more than once, {_REPEATS}"
        elif prefix == "query" and rest in self.query_repeats:
            return f"the query parameter '{rest}' is given more than once, {_REPEATS}"
        return None

    @property
    def repeated(self) -> list[str]:
        """The fields `unread` refuses as given more than once: `query.x`, and `json.x` of a
        form body once it is parsed."""
        return [f"query.{n}" for n in sorted(self.query_repeats)] + [
            f"json.{n}" for n in sorted(self._form_repeats)
        ]

    def unsure(self, tests: Iterable[FieldTest]) -> tuple[str, str] | None:
        """(field, why) of the first of `tests` on a field that cannot be read (`unread`), unless
        a test that can be read fails: then they fail whatever that field holds. None: decidable."""
        found, readable = None, []
        for test in tests:
            why = self.unread(test.field)
            if why is None:
                readable.append(test)
            elif found is None:
                found = (test.field, why)
        return found if found is not None and self.passes(tuple(readable)) else None

    def field(self, name: str) -> Any:
        """Value of a request field (`json.a.b`, `query.x`, `header.x`, `path.x`, `model`) or MISSING."""
        prefix, _, rest = name.partition(".")
        if prefix == "json":
            document = self.json
            return missing() if document is missing() else dig(document, rest)
        if prefix == "query":
            return self.query.get(rest, missing())
        if prefix == "header":
            value = self.headers.get(rest)
            return missing() if value is None else value
        if prefix == "path":
            return self.path_params.get(rest, missing())
        if name == "model":
            return missing() if self.model is None else self.model
        return missing()

    def passes(self, tests: tuple[FieldTest, ...]) -> bool:
        return all(holds(test.condition, self.field(test.field)) for test in tests)


def unmatched(view: RequestView, path: str | None = None) -> str:
    """Why a request has no action, in the words of `unknown_hosts: deny`'s answer: its host may
    well be named, by actions for other methods or paths. `path`: the view's, redacted (the
    reason is recorded)."""
    return f"no action matches {view.method} {view.host}{path or view.path} (unknown_hosts: deny)"


@dataclass(frozen=True)
class McpMessage:
    """One JSON-RPC message of an MCP request (streamable HTTP transport)."""

    method: str | None
    id: Any  # None for notifications
    tool: str | None = None  # for tools/call
    kind: str = ""
    document: Any = field(default=None, compare=False, repr=False)  # the message itself

    @property
    def is_request(self) -> bool:
        """A request (a method and an id), which its sender waits for an answer to; not a
        notification, nor a response the client sends back to one of the server's requests."""
        return self.method is not None and self.id is not None


# The MCP methods that do something an agent decides to do (the rest set a session up).
MCP_CALLS = frozenset({"tools/call", "resources/read", "prompts/get", "completion/complete"})


@dataclass(frozen=True)
class Classification:
    action: Action | None  # None: no action matched (an unknown host, handled by `unknown_hosts`)
    path_params: Mapping[str, str] = field(default_factory=dict)
    mcp: tuple[McpMessage, ...] = ()  # the JSON-RPC messages of an MCP request
    mcp_batch: bool = False
    # An MCP POST that is no JSON-RPC message: (JSON-RPC error code, what is wrong with it).
    mcp_error: tuple[int, str] | None = None
    # A path that reads as another action's (or none's) once its escapes and dot segments are
    # resolved as many servers resolve them (or its slashes merged, `;params` dropped, its
    # case ignored, its method overridden): refused, whichever way the upstream reads it.
    path_error: str | None = None
    # A request that names two hosts (a Host header, TLS SNI or URI other than where it is
    # sent), or is sent by IP address to one this policy classifies otherwise: refused alike.
    host_error: str | None = None
    # An action whose match conditions read a field that cannot be read (RequestView.unread):
    # this action's or a later one's, no one can tell. Refused.
    body_error: str | None = None

    @property
    def mcp_housekeeping(self) -> bool:
        """An MCP request that calls nothing: initialize, a listing, ping, a notification, the
        server's event stream (GET) or the session's end (DELETE). Identical in every session
        by nature, it is no loop: an agent opening its sixth session was refused as one."""
        if self.action is None or self.action.provider != "mcp":
            return False
        return not any(m.method in MCP_CALLS for m in self.mcp)

    @property
    def kind(self) -> str | None:
        """The action kind: an MCP tools/call is `<action kind>.<tool>` (the first call's, for a batch)."""
        for message in self.mcp:
            if message.tool is not None:
                return message.kind
        return self.action.kind if self.action else None

    @property
    def kinds(self) -> list[str]:
        """Every kind this request exercises (several for a batch of MCP tool calls)."""
        tools = [m.kind for m in self.mcp if m.tool is not None]
        if tools:
            return tools
        return [self.action.kind] if self.action else []

    @property
    def jsonrpc_ids(self) -> list[Any]:
        """The ids of the requests a denial answers (never those of responses the client sent)."""
        return [m.id for m in self.mcp if m.is_request]

    def authorizations(self, view: RequestView) -> list[tuple[str, RequestView]]:
        """Each kind this request exercises, with the request as that kind's rules read it.

        A JSON-RPC batch is several calls: each message is authorized on its own, its
        conditions (`json.params.arguments.*`) and `requires … same:` reading that message,
        not the batch, and its other messages (a `resources/read` beside a tool call) too."""
        if not self.mcp_batch:
            return [(kind, view) for kind in self.kinds]
        return [(m.kind, replace(view, _json=m.document)) for m in self.mcp]


_TOOL_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def mcp_messages(action: Action, document: Any) -> tuple[tuple[McpMessage, ...], bool]:
    """JSON-RPC messages of an MCP request; a `tools/call` of tool T is kind `<kind>.T` (or as `tools:` maps it)."""
    batch = isinstance(document, list)
    items = document if batch else [document]
    messages = []
    for item in items:
        if not isinstance(item, dict):
            continue
        method = item.get("method") if isinstance(item.get("method"), str) else None
        tool = None
        kind = action.kind
        if method == "tools/call":
            params = item.get("params") if isinstance(item.get("params"), dict) else {}
            name = params.get("name")
            tool = name if isinstance(name, str) and name else "unknown"
            kind = action.tool_kind(tool) or f"{action.kind}.{_TOOL_CHARS.sub('_', tool)}"
        messages.append(McpMessage(method, item.get("id"), tool, kind, item))
    return tuple(messages), batch


def mcp_problem(document: Any) -> tuple[int, str] | None:
    """Why a parsed MCP POST body is no JSON-RPC message or batch of them (None if it is one)."""
    if document is missing():
        return -32700, "the body is not JSON"
    if isinstance(document, dict):
        return None
    if isinstance(document, list) and document and all(isinstance(i, dict) for i in document):
        return None
    return -32600, "the body is neither a JSON-RPC message (an object) nor a batch of them"


def match_action(spec: ActionMatch, view: RequestView) -> dict[str, str] | None:
    """Path captures if the request fits `spec`, else None."""
    if spec.hosts and not any(h.matches(view.host, view.port) for h in spec.hosts):
        return None
    if spec.methods and view.method.upper() not in spec.methods:
        return None
    params: dict[str, str] = {}
    if spec.path is not None:
        found = spec.path.match(view.path, fold=view._fold)
        if found is None:
            return None
        params = found
    if spec.tests:
        scoped = replace(view, path_params=params) if params else view
        if (unsure := scoped.unsure(spec.tests)) is not None:
            raise _Unsure(*unsure)
        if not scoped.passes(spec.tests):
            return None
        if scoped is not view:  # keep the parsed body for later stages
            view._json, view._unreadable = scoped._json, scoped._unreadable
            view._form_repeats = scoped._form_repeats
    return params


class _Unsure(Exception):
    """match_action cannot tell whether the request fits: (field, why), as RequestView.unsure."""


def classify(policy: Policy, view: RequestView) -> Classification:
    found = _first_match(policy, view)
    if view.host_error is not None:
        return replace(found, host_error=view.host_error)
    if view.address is not None and (error := _address_error(policy, view, found)):
        return replace(found, host_error=error)
    action = found.action
    for (path, fold), (shown, how) in _readings(view.path).items():
        other = _first_match(policy, replace(view, path=path, path_params={}, _fold=fold))
        # Refused when the reading is a path a path-naming action claims for itself (or
        # another kind of call): read so, the request would escape it. A reading no action
        # names by path (a catch-all, none) is no escape, and GitLab's API takes a project
        # as `group%2Fproject` in one segment, which servers like it never split. An LLM
        # call the meter would charge otherwise is (a %2F or `;x` can hide an endpoint),
        # though not for its case: providers route paths as written (`:generateContent`).
        claimed = other.action is not None and other.action.match.path is not None
        if (
            (claimed and (other.action is not action or other.kind != found.kind))
            or (not fold and action is not None and action.is_llm
                and _metered(action, view.method, view.path) != _metered(action, view.method, path))
        ):  # fmt: skip
            return replace(
                found,
                path_error=f"the path {view.path} reads as {shown} to a server that {how}, "
                "which this policy classifies otherwise; send the path as the upstream should "
                "read it",
            )
    for method, how in _overrides(policy, view, action):
        other = _first_match(policy, replace(view, method=method, path_params={}))
        # As for paths: an action that names the method claims it (DELETE, denied).
        claimed = other.action is not None and bool(other.action.match.methods)
        if (
            (claimed and (other.action is not action or other.kind != found.kind))
            or (action is not None and action.is_llm
                and _metered(action, view.method, view.path) != _metered(action, method, view.path))
        ):  # fmt: skip
            return replace(
                found,
                path_error=f"the method {view.method} reads as {method} to a server that honours "
                f"{how}, which this policy classifies otherwise; send the request with the "
                "method the upstream should run",
            )
    return found


_PARAMS = re.compile(r";[^/]*")  # `;jsessionid=…`: Spring and Tomcat drop it from a segment
_SLASHES = re.compile(r"//+")  # nginx (merge_slashes, its default) and others read one `/`


def _readings(path: str) -> dict[tuple[str, bool], tuple[str, str]]:
    """Other readings of `path` by servers: {(path, matched in any case): (as shown, how the
    server reads it)}, simplest first. Empty, at the cost of a few scans, for a path every
    server reads as sent: no `%`, dot segment, `//`, `;` or capital letter."""
    strip, merge = ";" in path, "//" in path
    fold = path != path.lower()  # Express and ASP.NET route paths in any case by default
    out: dict[tuple[str, bool], tuple[str, str]] = {}
    if not (strip or merge or fold or "%" in path or "/." in path):
        return out
    for stripped in (False, True) if strip else (False,):
        for merged in (False, True) if merge else (False,):
            read = _PARAMS.sub("", path) if stripped else path
            read = _SLASHES.sub("/", read) if merged else read
            resolved = _resolved(read)
            for folded in (False, True) if fold else (False,):
                hows = ["drops ;parameters"] if stripped else []
                hows += ["merges repeated slashes"] if merged else []
                hows += ["matches paths in any case"] if folded else []
                if hows:
                    out.setdefault((read, folded), (_shown(read, folded), " and ".join(hows)))
                if resolved is not None:
                    how = " and ".join(["decodes its escapes or dot segments", *hows])
                    out.setdefault((resolved, folded), (_shown(resolved, folded), how))
    return out


def _shown(path: str, folded: bool) -> str:
    return path.lower() if folded else path


# Where frameworks take a method override from: Google's APIs, ASP.NET Core, Express's
# method-override (headers); Rails, Laravel, Symfony, Spring, Express (a `_method` field).
_OVERRIDE_HEADERS = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
_OVERRIDE_NAMES = {name.lower().encode(): name for name in _OVERRIDE_HEADERS}


def _overrides(policy: Policy, view: RequestView, action: Action | None) -> list[tuple[str, str]]:
    """(method, what asks for it): each method other than the request's that a server honouring
    a method override runs it as. One pass over the headers; a POST body is searched only for
    a tool's call (an LLM's or MCP server's body is its API's own format), read only if it
    names one."""
    fields = getattr(view.headers, "fields", None)
    if fields is not None:  # mitmproxy's Headers: one pass, not a scan of them per name
        asked = [
            (value.decode("latin-1"), f"the {_OVERRIDE_NAMES[name.lower()]} header")
            for name, value in fields
            if name.lower() in _OVERRIDE_NAMES and value
        ]
    else:
        asked = [
            (value, f"the {name} header")
            for name in _OVERRIDE_HEADERS
            if (value := view.headers.get(name.lower()))
        ]
    if value := view.query.get("_method"):
        asked.append((value, "a _method query parameter"))
    if "_method" in view.query_repeats:  # Flask reads the first, PHP the last: any of them
        named = sorted({m for each in policy.actions for m in each.match.methods})
        asked += [(m, "a _method query parameter given more than once") for m in named]
    tool = action is None or action.provider is None
    if tool and view.method.upper() == "POST" and b"_method" in view.body:
        asked += [(value, "a _method form field") for value in _body_methods(view)]
    sent = view.method.upper()
    found: list[tuple[str, str]] = []
    for value, how in asked:
        for method in value.split(","):
            method = method.strip().upper()
            if method and method != sent and (method, how) not in found:
                found.append((method, how))
    return found


def _body_methods(view: RequestView) -> list[str]:
    """The `_method` values of a form body (each, as servers read the first or the last), or
    of a JSON object's."""
    if _FORM in (view.headers.get("content-type") or "").lower():
        pairs = parse_qsl(view.body.decode("utf-8", "replace"), keep_blank_values=True)
        return [value for name, value in pairs if name == "_method"]
    document = view.json
    value = document.get("_method") if isinstance(document, dict) else None
    return [value] if isinstance(value, str) else []


def unrecorded(reason: str | None) -> bool:
    """Whether a `bad_request` refusal was decided on what the ledger does not keep (the Host
    header, TLS SNI or address the request went to, a method-override header or form field):
    `drawdown replay` repeats it rather than decide anew on what it cannot see."""
    text = reason or ""
    if text.startswith(_SENT_TO):
        return True
    return text.startswith("the method ") and "honours a _method query parameter, " not in text


# An authority as a Host header, an HTTP/2 :authority or an absolute-form URI gives it: a
# host (an IPv6 address in brackets), maybe a port.
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:@/\\\s]+)(?::(\d{1,5}))?\Z")
_SENT_TO = "the request goes to "


def _ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def addressed(
    target: str, port: int, names: Iterable[tuple[str, str]]
) -> tuple[str, str | None, str | None]:
    """(the host a request is classified by, the IP address it is sent to if that is another,
    why it cannot be classified by one host): RequestView's `host`, `address`, `host_error`.

    `target`: where the proxy sends it (a CONNECT's host, a proxy request's URI host); `names`:
    (where, authority) it also gives, which an upstream may act on instead: its Host header,
    the TLS SNI, an absolute-form URI, an HTTP/2 :authority. Each must name the target, as
    canonical_host reads it (`API.openai.com.:443` is api.openai.com): a request sent to one
    host that names another would be decided as the one and acted on by the other. Except
    that a request sent to an IP address is classified by the one name it gives: the name
    the upstream's certificate is checked against, and the site a shared server serves it
    (a client that resolves names itself is no evasion; `_address_error` covers the rest)."""
    host = canonical_host(target)
    given: dict[str, str] = {}  # canonical name: where the request gives it
    for where, text in names:
        if not text:
            continue
        found = _AUTHORITY.match(text)
        if found is None:
            return host, None, _two_hosts(host, where, repr(text[:100]))
        name = canonical_host(found[1].strip("[]"))
        if found[2] is not None and int(found[2]) != port:
            return host, None, _two_hosts(host, where, f"{found[1].lower()}:{found[2]}")
        if name != host:
            given.setdefault(name, where)
    if not given:
        return host, None, None
    (name, where), *others = given.items()
    if not _ip(host) or _ip(name):
        return host, None, _two_hosts(host, where, name)
    if not others:
        return name, host, None
    return host, None, _two_hosts(f"{host} as {name} (its {where})", others[0][1], others[0][0])


def _two_hosts(host: str, where: str, name: str) -> str:
    return (
        f"{_SENT_TO}{host} but its {where} names {name}, which an upstream may act on instead; "
        "send it with one host name throughout"
    )


def _address_error(policy: Policy, view: RequestView, found: Classification) -> str | None:
    """Why a request sent to an IP address, classified by the name it gives, is refused: an
    action naming that address (not merely `*`) would classify it otherwise. A server that
    serves one site ignores the name, and the policy meant the address."""
    address = view.address
    assert address is not None
    other = _first_match(policy, replace(view, host=address, address=None, path_params={}))
    action = other.action
    named = action is not None and any(
        set(h.glob) != {"*"} and h.matches(address, view.port) for h in action.match.hosts
    )
    if not named or (action is found.action and other.kind == found.kind):
        return None
    return (
        f"{_SENT_TO}{address} by address but names {view.host}, which this policy classifies "
        "otherwise; send it to one host by one name"
    )


def _metered(action: Action, method: str, path: str) -> str:
    """How the meter charges an LLM action's call to `path` (a %2F can hide an endpoint)."""
    return charging(action.provider or "", method, path)


def _first_match(policy: Policy, view: RequestView) -> Classification:
    for action in policy.actions:
        try:
            params = match_action(action.match, view)
        except _Unsure as exc:
            name, why = exc.args
            return Classification(
                action, body_error=f"{why} (action {action.kind} matches on {name})"
            )
        if params is not None:
            view.path_params = params
            if action.provider == "mcp" and view.method.upper() == "POST":
                # A body drawdown cannot read is refused, not forwarded as the bare kind: an
                # upstream that reads it anyway (its parser nests deeper than Python's, say)
                # would run a tool call no rule about that tool ever saw.
                document = view.json
                problem = mcp_problem(document)
                if problem is not None:
                    reason = view.unreadable or problem[1]  # why it is not JSON, when known
                    return Classification(action, params, mcp_error=(problem[0], reason))
                messages, batch = mcp_messages(action, document)
                return Classification(action, params, messages, batch)
            return Classification(action, params)
    return Classification(None)
