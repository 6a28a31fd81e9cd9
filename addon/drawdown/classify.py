"""What is being done: request → action kind (SPEC §3). The first action whose match fits wins."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .policy.match import dig, holds, missing
from .policy.model import Action, ActionMatch, FieldTest, Policy

_UNPARSED = object()


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
    _json: Any = field(default=_UNPARSED, repr=False)

    @property
    def json(self) -> Any:
        """The body as JSON, parsed once on first use; MISSING if it is not JSON."""
        if self._json is _UNPARSED:
            try:
                self._json = json.loads(self.body) if self.body else missing()
            except (ValueError, UnicodeDecodeError):
                self._json = missing()
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


@dataclass(frozen=True)
class Classification:
    action: Action | None  # None: no action matched (an unknown host, handled by `unknown_hosts`)
    path_params: Mapping[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        return self.action.kind if self.action else None


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
    for action in policy.actions:
        params = match_action(action.match, view)
        if params is not None:
            view.path_params = params
            return Classification(action, params)
    return Classification(None)
