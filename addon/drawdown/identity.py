"""Who is calling: identity sources → the request's scope path (SPEC §2).

`tenant:acme/agent:research/run:7f3a` is built level by level, each level taking
the first of its sources that yields a value. Values are sanitised so no caller
can forge extra levels or escape its scope with `/`, `:` or control characters.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .policy.match import LEVELS
from .policy.model import Source

MAX_VALUE_LENGTH = 128
IDENTITY_HEADER_PREFIX = "x-drawdown-"
_ESCAPE = {"%": "%25", "/": "%2F", ":": "%3A"}


_ALREADY_CLEAN = re.compile(rf"[A-Za-z0-9._~@+=-]{{1,{MAX_VALUE_LENGTH}}}")


def clean_value(raw: str | None) -> str | None:
    """A value safe to put in a scope path: no separators, no control characters, bounded length."""
    if raw is None:
        return None
    if _ALREADY_CLEAN.fullmatch(raw):  # the usual agent or run name: nothing to strip or escape
        return raw
    text = "".join(ch for ch in raw.strip() if ch.isprintable())
    text = "".join(_ESCAPE.get(ch, "%20" if ch.isspace() else ch) for ch in text)
    if not text:
        return None
    if len(text) > MAX_VALUE_LENGTH:
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        text = f"{text[: MAX_VALUE_LENGTH - 13]}~{digest}"
    return text


@dataclass(frozen=True)
class Identity:
    levels: Mapping[str, str]  # level → value, only the levels that have one
    # level → where its value came from (for explain)
    sources: Mapping[str, str] = field(default_factory=dict)
    # An idle-split run still to be resolved in the shared ledger: (agent key, idle seconds).
    pending_idle: tuple[str, int] | None = None

    def with_run(self, run: str) -> Identity:
        """This identity with its idle-split run resolved."""
        assert self.pending_idle is not None
        levels = {**self.levels, "run": run}
        sources = {**self.sources, "run": f"idle_split {self.pending_idle[1]}s (shared ledger)"}
        return Identity(levels, sources)

    @property
    def path(self) -> str:
        return "/".join(f"{level}:{self.levels[level]}" for level in LEVELS if level in self.levels)

    def get(self, level: str) -> str | None:
        return self.levels.get(level)


@dataclass(frozen=True)
class Caller:
    """What the proxy knows about the caller of one request."""

    headers: Mapping[
        str, str
    ]  # case-insensitive lookup expected (mitmproxy Headers) or lower-case keys
    proxy_user: str | None = None
    proxy_password: str | None = None
    client_ip: str | None = None
    # Set when the proxy itself validated the credentials (mitmproxy's proxyauth): then the
    # agent IS this user, whatever the policy's source order or any header says.
    authenticated_user: str | None = None

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        if value is None and name.lower() != name:
            value = self.headers.get(name.lower())
        return value


def header_map(fields: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Raw header fields as {lower-case name: value}, a repeated header folded with ", " as
    mitmproxy's Headers.get folds it. Built once per request: the identity sources look up
    a dozen names, and each lookup on Headers scans and lower-cases every field."""
    found: dict[str, str] = {}
    for raw_name, raw_value in fields:
        name = raw_name.lower().decode("utf-8", "surrogateescape")
        value = raw_value.decode("utf-8", "surrogateescape")
        found[name] = f"{found[name]}, {value}" if name in found else value
    return found


class IdleRuns:
    """Mints run ids for agents that never name their runs: a new run after N idle seconds.

    This is how an unmodified agent gets per-run budgets. State is per process;
    entries idle for longer than their window are pruned so memory stays bounded.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._runs: OrderedDict[tuple[str, ...], tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def run_for(self, key: tuple[str, ...], idle_seconds: int, now: float) -> str:
        with self._lock:
            current = self._runs.pop(key, None)
            if current is None or now - current[1] >= idle_seconds:
                run = secrets.token_hex(4)
            else:
                run = current[0]
            self._runs[key] = (run, now)  # most recently used last
            if len(self._runs) > self._max_entries:
                self._runs.popitem(last=False)
            return run

    def __len__(self) -> int:
        return len(self._runs)


def identify(
    sources_by_level: Mapping[str, tuple[Source, ...]],
    caller: Caller,
    idle_runs: IdleRuns | None,
    now: float,
) -> Identity:
    """The caller's scope path. With `idle_runs` None, an idle-split run is left pending, to be
    resolved in the ledger (several proxy processes serving one agent must agree on its run)."""
    levels: dict[str, str] = {}
    origins: dict[str, str] = {}
    for level in LEVELS:
        if level == "agent" and (user := clean_value(caller.authenticated_user)) is not None:
            levels[level] = user
            origins[level] = "authenticated proxy user"
            continue
        for source in sources_by_level.get(level, ()):
            if source.kind == "idle_split":
                key = tuple(
                    f"{lvl}:{levels.get(lvl, '')}" for lvl in ("tenant", "workflow", "agent")
                )
                if idle_runs is None:
                    return Identity(levels, origins, ("/".join(key), int(source.arg or 300)))
                value: str | None = idle_runs.run_for(key, int(source.arg or 300), now)
            else:
                value = clean_value(_raw_value(source, caller))
            if value is not None:
                levels[level] = value
                origins[level] = _describe(source)
                break
    return Identity(levels, origins)


def _raw_value(source: Source, caller: Caller) -> str | None:
    match source.kind:
        case "header":
            return caller.header(str(source.arg))
        case "proxy_user":
            return caller.proxy_user
        case "proxy_password":
            return caller.proxy_password
        case "client_ip":
            return caller.client_ip
        case "value":
            return str(source.arg)
    return None


def _describe(source: Source) -> str:
    if source.kind == "header":
        return f"header {source.arg}"
    if source.kind == "value":
        return f"constant '{source.arg}'"
    if source.kind == "idle_split":
        return f"idle_split {source.arg}s (minted)"
    return source.kind.replace("_", " ")


def identity_headers(header_names: list[str]) -> list[str]:
    """The identity headers to strip before forwarding: every X-Drawdown-* header."""
    return [name for name in header_names if name.lower().startswith(IDENTITY_HEADER_PREFIX)]
