"""Incremental text/event-stream parser.

Chunks may be cut at any byte: mid-line, mid-UTF-8 sequence, between CR and LF. Lines end
with LF, CRLF or CR. Only `data:` and `event:` fields matter to the meter; comments
(`: keep-alive`), `id:` and `retry:` are skipped. Multi-line data is joined with LF as the
spec says. A UTF-8 BOM at the very start is ignored.

With `keep_raw`, the parser also hands back the exact bytes of each complete event (its
lines and the blank line ending it) unless the event callback rejects it: this is how the
meter removes the usage-only chunk it asked OpenAI for, without touching any other byte.
"""

from __future__ import annotations

from collections.abc import Callable

# Returns False to drop the event from the forwarded bytes (keep_raw mode only).
EventHandler = Callable[[str | None, bytes], bool]

_BOM = b"\xef\xbb\xbf"
# A single line or event larger than this stops parsing (bytes keep flowing unchanged):
# metering a pathological stream must not hold unbounded memory.
MAX_EVENT_BYTES = 32 * 1024 * 1024


class SSEParser:
    def __init__(self, on_event: EventHandler, *, keep_raw: bool = False) -> None:
        self._on_event = on_event
        self._keep_raw = keep_raw
        self._pending = bytearray()  # bytes after the last complete line
        self._event: str | None = None
        self._data: list[bytes] = []
        self._raw: list[bytes] = []  # raw lines of the event being read (keep_raw)
        self._size = 0  # bytes in the event being read
        self._first_line = True
        self.events = 0  # events dispatched
        self.overflowed = False  # gave up parsing (MAX_EVENT_BYTES)

    def feed(self, data: bytes) -> bytes:
        """Parse `data`. With keep_raw, return the bytes of the events it completed."""
        if self.overflowed:
            return data
        # A trailing CR might be the first half of CRLF: leave it for the next chunk.
        end = len(data) - 1 if data.endswith(b"\r") else len(data)
        cut = max(data.rfind(b"\n", 0, end), data.rfind(b"\r", 0, end)) + 1
        if cut == 0:
            self._pending += data
            if len(self._pending) + self._size > MAX_EVENT_BYTES:
                return self._overflow()
            return b""
        if self._pending:
            self._pending += data[:cut]
            block = bytes(self._pending)
            self._pending = bytearray(data[cut:])
        else:
            block = data[:cut] if cut < len(data) else data
            if cut < len(data):
                self._pending = bytearray(data[cut:])
        return self._lines(block)

    def finish(self) -> bytes:
        """End of stream: parse what is left, including an event missing its blank line."""
        if self.overflowed:
            return b""
        out = b""
        if self._pending:
            block = bytes(self._pending)
            self._pending.clear()
            out = self._lines(block)
        keep = self._dispatch() if self._data else True
        raw = b"".join(self._raw)
        self._raw.clear()
        return out + raw if keep else out

    def _overflow(self) -> bytes:
        self.overflowed = True
        held = b"".join(self._raw) + bytes(self._pending)
        self._raw.clear()
        self._pending.clear()
        self._data.clear()
        return held if self._keep_raw else b""

    def _dispatch(self) -> bool:
        data = b"\n".join(self._data)
        event = self._event
        self._data = []
        self._event = None
        self._size = 0
        self.events += 1
        try:
            return self._on_event(event, data)
        except Exception:  # a handler bug must never break the stream
            return True

    def _lines(self, block: bytes) -> bytes:
        keep_raw = self._keep_raw
        out: list[bytes] = []
        lines = block.splitlines(keep_raw)
        for i, raw in enumerate(lines):
            line = raw.rstrip(b"\r\n") if keep_raw else raw
            if self._first_line:
                self._first_line = False
                if line.startswith(_BOM):
                    line = line[3:]
            if keep_raw:
                self._raw.append(raw)
            if not line:  # blank line: end of event
                keep = self._dispatch() if self._data else True
                self._event = None
                self._size = 0
                if keep_raw:
                    if keep:
                        out.extend(self._raw)
                    self._raw.clear()
                continue
            self._size += len(raw)
            if self._size > MAX_EVENT_BYTES:
                # Give up parsing; with keep_raw the held event, the rest of this block and
                # the pending tail flow on unchanged, in order.
                pending = bytes(self._pending)
                self._pending.clear()
                out.append(self._overflow())
                if keep_raw:
                    out.extend(lines[i + 1 :])
                    out.append(pending)
                return b"".join(out)
            if line[0] == 0x3A:  # ":" comment
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
        return b"".join(out) if out else b""
