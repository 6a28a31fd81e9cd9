"""What is being done: request → action kind (SPEC §3). The first action whose match fits wins."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, unquote

from .meter import charging
from .policy.match import dig, holds, missing
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


def _parse_body(body: bytes, content_type: str) -> Any:
    """JSON bodies, and form-encoded ones (Stripe-style APIs) as a flat mapping of strings."""
    if not body:
        return missing()
    if content_type.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded":
        try:
            return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except (UnicodeDecodeError, ValueError):
            return missing()
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: `[[[[…` nested
        return missing()


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
    _json: Any = field(default=_UNPARSED, repr=False)

    @property
    def json(self) -> Any:
        """The body as JSON (or form fields), parsed once on first use; MISSING if it is neither."""
        if self._json is _UNPARSED:
            self._json = _parse_body(self.body, self.headers.get("content-type") or "")
        return self._json

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
    # resolved as many servers resolve them: refused, whichever way the upstream reads it.
    path_error: str | None = None

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
        found = spec.path.match(view.path)
        if found is None:
            return None
        params = found
    if spec.tests:
        scoped = replace(view, path_params=params) if params else view
        if not scoped.passes(spec.tests):
            return None
        if scoped is not view:  # keep the parsed body for later stages
            view._json = scoped._json
    return params


def classify(policy: Policy, view: RequestView) -> Classification:
    found = _first_match(policy, view)
    resolved = _resolved(view.path)
    if resolved is not None:
        other = _first_match(policy, replace(view, path=resolved, path_params={}))
        action = found.action
        # Refused when the resolved path is one a path-naming action claims for itself (or
        # another kind of call): read so, the request would escape it. Resolving to what no
        # action names by path (a catch-all, none) is no escape, and GitLab's API takes a
        # project as `group%2Fproject` in one segment, which servers like it never split.
        claimed = other.action is not None and other.action.match.path is not None
        if (
            (claimed and (other.action is not action or other.kind != found.kind))
            or (action is not None and action.is_llm and _metered(action, view.method, view.path)
                != _metered(action, view.method, resolved))
        ):  # fmt: skip
            return replace(
                found,
                path_error=f"the path {view.path} reads as {resolved} to a server that decodes "
                "its escapes or dot segments, which this policy classifies otherwise; send "
                "the path as the upstream should read it",
            )
    return found


def _metered(action: Action, method: str, path: str) -> str:
    """How the meter charges an LLM action's call to `path` (a %2F can hide an endpoint)."""
    return charging(action.provider or "", method, path)


def _first_match(policy: Policy, view: RequestView) -> Classification:
    for action in policy.actions:
        params = match_action(action.match, view)
        if params is not None:
            view.path_params = params
            if action.provider == "mcp" and view.method.upper() == "POST":
                # A body drawdown cannot read is refused, not forwarded as the bare kind: an
                # upstream that reads it anyway (its parser nests deeper than Python's, say)
                # would run a tool call no rule about that tool ever saw.
                document = view.json
                problem = mcp_problem(document)
                if problem is not None:
                    return Classification(action, params, mcp_error=problem)
                messages, batch = mcp_messages(action, document)
                return Classification(action, params, messages, batch)
            return Classification(action, params)
    return Classification(None)
