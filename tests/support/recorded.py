"""Access to the recorded corpus in tests/fixtures/recorded/ (real provider exchanges)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

RECORDED_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "recorded"


@dataclass(frozen=True)
class Recorded:
    """One recorded exchange: the request that was sent and the response bytes received."""

    name: str  # e.g. "openai-chat-completions-14"
    manifest: dict[str, Any]
    request_body: bytes
    response_body: bytes  # exact bytes of the .response.json / .response.sse file

    @property
    def request_json(self) -> Any:
        return json.loads(self.request_body)

    @property
    def method(self) -> str:
        return str(self.manifest["method"])

    @property
    def host(self) -> str:
        return str(self.manifest["host"])

    @property
    def path(self) -> str:
        """URL path without the query string (Gemini streams keep alt=sse in `query`)."""
        return urlsplit(self.manifest["url"]).path

    @property
    def query(self) -> str:
        return urlsplit(self.manifest["url"]).query

    @property
    def status(self) -> int:
        return int(self.manifest["status"])

    @property
    def content_type(self) -> str:
        return str(self.manifest["content_type"])

    @property
    def streamed(self) -> bool:
        return bool(self.manifest["streamed"])

    @property
    def usage(self) -> Any:
        """The usage the API reported, exactly as MANIFEST.json records it."""
        return self.manifest["usage"]


@functools.cache
def _manifest() -> dict[str, dict[str, Any]]:
    entries = json.loads((RECORDED_DIR / "MANIFEST.json").read_text())
    return {e["file"].split(".response.")[0]: e for e in entries}


def recorded_names(provider: str | None = None, *, streamed: bool | None = None) -> list[str]:
    """Names of recorded exchanges, optionally filtered by provider and streaming."""
    return sorted(
        name
        for name, e in _manifest().items()
        if (provider is None or e["provider"] == provider)
        and (streamed is None or bool(e["streamed"]) == streamed)
    )


def load_recorded(name: str) -> Recorded:
    """Load an exchange by name ("openai-chat-completions-14", file names also accepted)."""
    key = name.split(".response.")[0].split(".request.")[0]
    try:
        entry = _manifest()[key]
    except KeyError:
        raise KeyError(f"no recorded exchange {name!r} in {RECORDED_DIR}") from None
    return Recorded(
        name=key,
        manifest=entry,
        request_body=(RECORDED_DIR / entry["request_file"]).read_bytes(),
        response_body=(RECORDED_DIR / entry["file"]).read_bytes(),
    )
