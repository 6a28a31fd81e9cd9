"""A Realtime API session's state, and the events drawdown reads and writes on its socket.

The proxy decides the WebSocket handshake like any call; then, on the open socket, each
`response.create` the agent sends is one decision (a reserve of one request, budgets and
anomaly guards checked), and the `response.done` that answers it is committed with the
usage it reports. Once a budget or guard refuses, the events that would make the server
spend (`response.create`, `input_audio_buffer.commit` and `.append`) are dropped, and the
agent gets a Realtime `error` event in their place, as the API itself reports a refused
client event: the SDK hands it to the agent as an `error` event and the session stays open.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count(1)


@dataclass
class RealtimeSession:
    """What drawdown keeps of one open Realtime session (on its handshake's FlowState)."""

    model: str | None  # the model (Azure: deployment) the URL named
    matched: str | None = None  # the genai-prices provider of the upstream URL, if any
    reported_model: str | None = None  # the model session.created / session.updated named
    transcription_model: str | None = None  # the model its input audio is transcribed with
    # Responses reserved at their response.create and not begun yet, oldest first (the server
    # begins them in the order they were asked for): (the create's event_id, inflight key).
    asked: deque[tuple[str | None, str]] = field(default_factory=deque)
    # Responses under way, by the id their response.created gave them: inflight keys. Out-of-
    # band responses (`conversation: "none"`) run alongside others and end in any order.
    running: dict[str, str] = field(default_factory=dict)
    # Why the session may not spend any more (code, message), once a reserve was refused or
    # a response took a budget over; cleared by a later response.create that is allowed.
    stopped: tuple[str, str] | None = None
    told: bool = False  # the agent got an error for the audio dropped since the stop
    # The ids of the latest responses already charged (bounded): a server that sends one's
    # response.done twice must not have it charged twice, as a response no one asked for.
    done: deque[str] = field(default_factory=lambda: deque(maxlen=256))

    @property
    def models(self) -> tuple[str | None, ...]:
        return (self.reported_model, self.model)


class UnreadableEvent(ValueError):
    """A message that may be an event, in JSON the server may read and drawdown cannot: an
    integer past Python's digit limit, nesting past its recursion limit (other parsers go
    further). Forwarded unread, a `response.create` so written would spend past every budget."""


def parse_event(
    content: bytes, markers: tuple[bytes, ...], *, escaped: bool = False
) -> dict[str, Any] | None:
    """The event in a message, if it may be one of those `markers` name (else None, unparsed:
    most of a session's traffic is audio that drawdown has no need to read). `escaped`: a
    message with a JSON escape is parsed too (`"response\\u002ecreate"` is a response.create
    to the server, and names no marker); base64 audio holds no backslash."""
    if not any(marker in content for marker in markers) and not (escaped and b"\\u" in content):
        return None
    try:
        event = json.loads(content)
    except json.JSONDecodeError:  # not JSON: the server refuses it too
        return None
    except (ValueError, RecursionError) as exc:
        raise UnreadableEvent(str(exc)[:80]) from None
    if isinstance(event, dict) and isinstance(event.get("type"), str):
        return event
    return None


def error_event(code: str, message: str, event_id: Any = None) -> bytes:
    """A Realtime `error` server event (RealtimeErrorEvent), naming the client event it refuses."""
    return json.dumps(
        {
            "type": "error",
            "event_id": f"event_drawdown_{next(_ids)}",
            "error": {
                "type": "invalid_request_error",
                "code": code,
                "message": message,
                "param": None,
                "event_id": event_id if isinstance(event_id, str) else None,
            },
        }
    ).encode()


def named(content: bytes) -> tuple[bytes, str]:
    """The client event in `content` (a JSON object without an `event_id`) given one of
    drawdown's, and that id: the server's `error` for the event names it. Spliced in as the
    object's first member, so the agent's bytes are otherwise forwarded as they were."""
    event_id = f"event_drawdown_{next(_ids)}"
    brace = content.index(b"{")  # the object's own: only whitespace (or a BOM) precedes it
    member = b'"event_id":"' + event_id.encode() + b'",'
    return content[: brace + 1] + member + content[brace + 1 :], event_id
