"""Compiled matchers: globs, host and path patterns, scope patterns, field conditions.

Everything here is compiled once when a policy loads; matching a request is then
a handful of regex calls. Compile functions raise ValueError with a message meant
for the policy author; the schema turns it into `FILE:LINE: message`.
"""

from __future__ import annotations

import encodings.idna
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import re2

LEVELS = ("tenant", "workflow", "agent", "run")

_MISSING = object()


def glob_regex(pattern: str, *, separator: str | None = None) -> str:
    """Translate a glob to a regex body. `*` stops at `separator` (if any), `**` never does.

    `?` is one character, `[abc]` a class; everything else is literal.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append(f"[^{re.escape(separator)}]*" if separator else ".*")
        elif c == "?":
            out.append(f"[^{re.escape(separator)}]" if separator else ".")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                raise ValueError(f"unclosed '[' in pattern '{pattern}'")
            body = pattern[i + 1 : end]
            if not body:
                raise ValueError(f"empty '[]' in pattern '{pattern}'")
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_glob(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    flags = re.IGNORECASE if ignore_case else 0
    return re.compile(glob_regex(pattern) + r"\Z", flags)


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def canonical_host(host: str) -> str:
    """A host as DNS and certificates name it: lower-case, without the one trailing dot of a
    fully qualified name (`API.openai.com.` is api.openai.com to DNS and to the upstream's
    certificate; matched as written, it named no action and went through as an unknown host),
    an internationalized label in its ASCII form (mitmproxy decodes a CONNECT's `xn--` labels).
    Patterns are compiled the same way; a label holding a glob character is left as written."""
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if ":" in host:  # an IPv6 address, one way of writing it (`0:0::1` is ::1)
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return host
    if host.isascii():
        return host
    labels = host.split(".")
    for i, label in enumerate(labels):
        if not label.isascii() and not is_glob(label):
            try:
                labels[i] = encodings.idna.ToASCII(label).decode("ascii")
            except UnicodeError:  # not a name DNS could hold: left to match as written
                pass
    return ".".join(labels)


@dataclass(frozen=True)
class HostPattern:
    """`api.openai.com` (any port) or `localhost:8443` (that port only); globs allowed."""

    text: str
    host: re.Pattern[str]
    port: int | None
    glob: str = ""  # the host part, lower-case, as compiled into `host`

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        return self.host.match(host.lower()) is not None

    def covers(self, other: HostPattern | None) -> bool:
        """Whether this matches every host `other` does (None: any host). Decided only where
        it is certain (the same glob, `*`, or `other` one literal host); False when unsure."""
        if self.port is not None and (other is None or other.port != self.port):
            return False
        if self.glob and set(self.glob) == {"*"}:
            return True
        if other is None:
            return False
        return self.glob == other.glob or (
            not is_glob(other.glob) and self.host.match(other.glob) is not None
        )


# What a host name, an IPv4 or a bracketed IPv6 address may hold, besides letters and digits
# (any script: a client may send an IDN host undecoded) and glob characters.
_HOST_CHARS = frozenset("._-*?[]!:%")


def compile_host(text: str) -> HostPattern:
    if not text or any(c in text for c in "/ \t"):
        raise ValueError(
            f"host pattern '{text}' must be a host name or glob, optionally with :PORT"
        )
    host, port_text = text, None
    if text.startswith("[") and ":" in text.partition("]")[0]:
        # [::1] or [::1]:8443: requests carry an IPv6 host without its brackets.
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ValueError(f"host pattern '{text}': write an IPv6 address as [ADDRESS]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:  # host:port (an IPv6 address with a port must be bracketed)
        host, _, port_text = text.partition(":")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"host pattern '{text}' has an invalid port")
        port = int(port_text)
    if bad := sorted({c for c in host if not c.isalnum() and c not in _HOST_CHARS}):
        # `api.a.com,api.b.com` or `api.a.com;x`: no host holds these, it would never match.
        hint = " (list several hosts as host: [a.example, b.example])" if "," in bad else ""
        raise ValueError(
            f"host pattern '{text}' holds {', '.join(repr(c) for c in bad)}, which no host "
            f"name does{hint}"
        )
    host = canonical_host(host)  # as requests are read: `api.openai.com.` is api.openai.com
    if ":" not in host:  # a name or an IPv4 address (an IPv6 one holds no dots to check)
        labels = host.split(".")
        if "" in labels:  # `.openai.com`, NO_PROXY's spelling of a domain, or `api..openai.com`
            hint = (
                f" (for a domain and every host under it, write both: [{host[1:]}, '*{host}'])"
                if host.startswith(".") and host[1:]
                else ""
            )
            raise ValueError(f"host pattern '{text}' has an empty label: no host does{hint}")
        dotted_quad = len(labels) == 4 and all(label.isdigit() for label in labels)
        if dotted_quad and any(int(label) > 255 for label in labels):
            raise ValueError(f"host pattern '{text}' is no IPv4 address: a part is over 255")
    try:
        return HostPattern(text, compile_glob(host), port, host)
    except ValueError as exc:  # `api.anthropic.com[`: an unclosed glob class
        raise ValueError(f"host pattern '{text}' is not a valid glob: {exc}") from None


@dataclass(frozen=True)
class PathPattern:
    """A path glob: `*` one segment, `**` any number, `{name}` captures one segment."""

    text: str
    regex: re.Pattern[str]
    names: tuple[str, ...]
    folded: re.Pattern[str] | None = None  # the same, in any case

    def match(self, path: str, *, fold: bool = False) -> dict[str, str] | None:
        """Captures if `path` fits; `fold`: as a server that routes paths in any case reads it."""
        found = (self.folded if fold and self.folded else self.regex).match(path)
        return found.groupdict() if found else None

    def covers(self, other: PathPattern | None) -> bool:
        """Whether this matches every path `other` does (None: any path). Decided only where
        it is certain (`**`, the same pattern whatever its captures are named, or `other` a
        literal path: it matches that path and that path with a `/` added); False when unsure."""
        if set(self.text) == {"*"} and "**" in self.text:
            return True
        if other is None:
            return False
        if _CAPTURE.sub("{}", self.text) == _CAPTURE.sub("{}", other.text):
            return True
        literal = not other.names and not is_glob(other.text)
        return literal and all(self.regex.match(p) for p in (other.text, other.text + "/"))


_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# `?x=1` after a path: patterns match the path only, and `?` would be a one-character glob.
_QUERY = re.compile(r"\?[^/]*=")
_EXPRESS_CAPTURE = re.compile(r"(?:^|/)(:[A-Za-z_][A-Za-z0-9_]*)(?=/|$)")


def compile_path(text: str) -> PathPattern:
    if not text.startswith("/") and not text.startswith("*"):
        raise ValueError(f"path pattern '{text}' must start with '/'")
    if _QUERY.search(text):
        raise ValueError(
            f"path pattern '{text}' holds a query string, but paths are matched without it: "
            "put conditions on query parameters under match.query (query: {name: value})"
        )
    if found := _EXPRESS_CAPTURE.search(text):
        name = found.group(1)
        raise ValueError(
            f"path pattern '{text}': '{name}' would only match the text '{name}'; "
            f"a segment is captured as {{{name[1:]}}}"
        )
    parts: list[str] = []
    names: list[str] = []
    pos = 0
    for found in _CAPTURE.finditer(text):
        parts.append(glob_regex(text[pos : found.start()], separator="/"))
        name = found.group(1)
        if name in names:
            raise ValueError(f"path pattern '{text}' captures '{name}' twice")
        names.append(name)
        parts.append(f"(?P<{name}>[^/]+)")
        pos = found.end()
    rest = text[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"path pattern '{text}': captures look like {{name}} with a letter first")
    parts.append(glob_regex(rest, separator="/"))
    regex = "".join(parts) + r"/?\Z"
    return PathPattern(text, re.compile(regex), tuple(names), re.compile(regex, re.IGNORECASE))


# --- scope patterns -------------------------------------------------------------------


@dataclass(frozen=True)
class ScopePattern:
    """`tenant:acme/agent:*` — a glob per named level; levels not named are ignored.

    `*` alone (or an empty pattern) matches every scope and names no level.
    """

    text: str
    levels: tuple[tuple[str, re.Pattern[str]], ...]

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.levels)

    def matches(self, scope: Mapping[str, str]) -> bool:
        for level, glob in self.levels:
            value = scope.get(level)
            if value is None or glob.match(value) is None:
                return False
        return True

    def instance(self, scope: Mapping[str, str]) -> str:
        """The concrete budget instance this scope falls in: the named levels' values."""
        return "/".join(f"{level}:{scope[level]}" for level, _ in self.levels)


def compile_scope(text: str) -> ScopePattern:
    text = text.strip()
    if text in ("", "*", "**"):
        return ScopePattern(text or "*", ())
    levels: dict[str, re.Pattern[str]] = {}
    for segment in text.split("/"):
        level, sep, value = segment.partition(":")
        if not sep:
            raise ValueError(
                f"scope segment '{segment}' must look like LEVEL:VALUE with LEVEL one of {', '.join(LEVELS)}"
            )
        if level not in LEVELS:
            raise ValueError(f"unknown scope level '{level}' (expected one of {', '.join(LEVELS)})")
        if level in levels:
            raise ValueError(f"scope names level '{level}' twice")
        if not value:
            raise ValueError(f"scope level '{level}' has no value (use '{level}:*' for any)")
        _check_scope_value(text, level, value)
        levels[level] = compile_glob(value)
    ordered = tuple((level, levels[level]) for level in LEVELS if level in levels)
    return ScopePattern(text, ordered)


def _check_scope_value(text: str, level: str, value: str) -> None:
    """Identity values never hold ':', whitespace or control characters (identity.clean_value
    escapes them as %3A, %20…): a glob asking for one outside a `[…]` class matches no scope."""
    outside = re.sub(r"\[[^\]]*\]", "", value)
    if ":" in outside:
        what = "':'"
    elif any(c.isspace() or not c.isprintable() for c in outside):
        what = "a space"
    else:
        return
    raise ValueError(
        f"scope '{text}' can never match: its {level} value '{value}' holds {what}, which "
        "identity values never do (they are escaped); a scope is LEVEL:GLOB with nothing "
        "around the ':', levels joined by '/': agent:research/run:*"
    )


# --- conditions on request fields --------------------------------------------------------

OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "regex", "exists")

Condition = Callable[[Any], bool]  # takes the field value, or MISSING


def missing() -> Any:
    return _MISSING


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except ArithmeticError:
            return None
    else:
        return None
    # NaN and ±Infinity are no amounts: ordering NaN raises InvalidOperation, and an agent sending
    # "-Infinity" must not pass `lte: 5000`. (Decimal's own range covers any finite JSON number.)
    return number if number.is_finite() else None


def _equal(left: Any, right: Any) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right or (
            isinstance(left, bool) and isinstance(right, bool) and left == right
        )
    numeric = (int, float, Decimal)
    if isinstance(left, numeric) and isinstance(right, numeric):
        a, b = _number(left), _number(right)
        return a == b if a is not None and b is not None else left == right  # inf, nan
    if (isinstance(left, str) and isinstance(right, numeric)) or (
        isinstance(left, numeric) and isinstance(right, str)
    ):
        # Query parameters, headers and form bodies (Stripe's amount=4242) are always text:
        # as gt/lte do, compare them as numbers, or `deny … in: [4242]` would never fire.
        a, b = _number(left), _number(right)
        return a is not None and a == b
    return left == right


def compile_condition(spec: Any) -> Condition:
    """A condition is a value (equality) or a mapping of operators, all of which must hold."""
    if not isinstance(spec, Mapping):
        return lambda value: value is not _MISSING and _equal(value, spec)
    if not spec:  # all of no operators: it would hold for any value, and for none at all
        raise ValueError(
            "an empty condition {} always holds: give a value, or operators such as "
            "{gt: 5}, {in: [a, b]} or {exists: true}"
        )
    checks: list[Condition] = []
    for op, arg in spec.items():
        if op not in OPERATORS:
            raise ValueError(f"unknown operator '{op}' (expected one of {', '.join(OPERATORS)})")
        checks.append(_operator(op, arg))
    _refuse_contradiction(spec)
    return lambda value: all(check(value) for check in checks)


def _refuse_contradiction(spec: Mapping[str, Any]) -> None:
    """`{gt: 1, lt: 0}` or `{eq: 1, ne: 1}` holds for no value: a deny that never fires, a
    requirement never met. Raised as the author's error, as a condition with no operator is."""
    if "eq" in spec and "ne" in spec and _equal(spec["eq"], spec["ne"]):
        raise ValueError("eq and ne name the same value: this condition never holds")
    lower = [(_number(spec[op]), op) for op in ("gt", "gte") if op in spec]
    upper = [(_number(spec[op]), op) for op in ("lt", "lte") if op in spec]
    for low, low_op in lower:
        for high, high_op in upper:
            if low is None or high is None:
                continue
            if low > high or (low == high and (low_op, high_op) != ("gte", "lte")):
                raise ValueError(
                    f"no value is both {low_op} {spec[low_op]} and {high_op} {spec[high_op]}: "
                    "this condition never holds"
                )


def _operator(op: str, arg: Any) -> Condition:
    if op == "exists":
        if not isinstance(arg, bool):
            raise ValueError("'exists' takes true or false")
        return lambda value: (value is not _MISSING and value is not None) is arg
    if op == "eq":
        return lambda value: value is not _MISSING and _equal(value, arg)
    if op == "ne":
        return lambda value: value is _MISSING or not _equal(value, arg)
    if op in ("in", "not_in"):
        if not isinstance(arg, list):
            raise ValueError(f"'{op}' takes a list")
        if not arg:  # `in: []` never holds, `not_in: []` always does: neither is meant
            raise ValueError(f"'{op}' takes a list of at least one value, not []")
        options = list(arg)
        if op == "in":
            return lambda value: value is not _MISSING and any(_equal(value, o) for o in options)
        return lambda value: value is _MISSING or not any(_equal(value, o) for o in options)
    if op == "regex":
        if not isinstance(arg, str):
            raise ValueError("'regex' takes a string")
        if not arg:
            raise ValueError("an empty regex matches every text: write {exists: true}")
        rx = compile_condition_regex(arg)
        return lambda value: isinstance(value, str) and _search(rx, value)
    bound = _number(arg)
    if bound is None:
        raise ValueError(f"'{op}' takes a number")
    compare = {
        "gt": lambda v: v > bound,
        "gte": lambda v: v >= bound,
        "lt": lambda v: v < bound,
        "lte": lambda v: v <= bound,
    }[op]

    def numeric(value: Any) -> bool:
        number = _number(value) if value is not _MISSING else None
        return number is not None and compare(number)

    return numeric


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the author's error, said as FILE:LINE
_RE2_OPTIONS.never_capture = True  # a condition only asks whether it matches


_SURROGATE = re.compile("[\ud800-\udfff]")


def _search(rx: Any, text: str) -> bool:
    """RE2 reads UTF-8: a lone surrogate (a Latin-1 header or `%e9` in a query, decoded with
    surrogateescape; half an emoji escaped in JSON) cannot be encoded, and raised on every
    such request. It is searched for as U+FFFD, the replacement character, instead."""
    try:
        return rx.search(text) is not None
    except UnicodeEncodeError:
        return rx.search(_SURROGATE.sub("\ufffd", text)) is not None


def compile_condition_regex(pattern: str) -> Any:
    """A `regex:` condition's pattern, compiled by RE2. It runs on what agents send, on the
    event loop every request passes through: Python's backtracking `re` would take minutes
    on `^(a+)+$` against 30 a's and a `!`, stalling every agent at once. RE2 matches in time
    linear in the text, and so refuses what needs backtracking (backreferences, lookaround),
    as Envoy's and OPA's matchers do."""
    if found := re.search(r"\{,[0-9]+\}", pattern):  # RE2 reads it as text, Python as {0,n}
        raise ValueError(
            f"invalid regex '{pattern}': write {found.group()} as {{0{found.group()[1:]}"
        )
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        hint = ""
        if re.search(r"perl operator: \(\?(?:<?[=!]|P$)|escape sequence: \\[1-9]", str(reason)):
            hint = " (patterns run on RE2, in linear time: no lookaround or backreferences)"
        elif str(reason).endswith("escape sequence: \\Z"):
            hint = " (RE2 writes the end of the text as \\z)"
        raise ValueError(f"invalid regex '{pattern}': {reason}{hint}") from None


def dig(document: Any, dotted: str) -> Any:
    """Value at a dotted path into nested objects and arrays (`items.0.sku`), or MISSING.

    A `*` segment fans out over a list's items and yields a list of the found values.
    """
    current = document
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        if part == "*":
            if not isinstance(current, list):
                return _MISSING
            rest = ".".join(parts[index + 1 :])
            found = [dig(item, rest) if rest else item for item in current]
            return _AnyOf([v for v in found if v is not _MISSING])
        if isinstance(current, Mapping):
            if part not in current:
                return _MISSING
            current = current[part]
        elif isinstance(current, list) and (
            part.isdigit() or (part.startswith("-") and part[1:].isdigit())
        ):
            position = int(part)
            if not -len(current) <= position < len(current):
                return _MISSING
            current = current[position]
        else:
            return _MISSING
    return current


class _AnyOf(list):
    """Values fanned out by `*`: a condition holds if it holds for any of them."""


def holds(condition: Condition, value: Any) -> bool:
    if isinstance(value, _AnyOf):
        return any(condition(v) for v in value)
    return condition(value)
