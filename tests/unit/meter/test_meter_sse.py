"""The incremental SSE parser, on its own."""

from __future__ import annotations

import pytest
from drawdown.meter import sse
from hypothesis import given, settings
from hypothesis import strategies as st


def parse(chunks: list[bytes], keep_raw: bool = False, drop=lambda e, d: False):
    events: list[tuple[str | None, bytes]] = []

    def on_event(event, data):
        events.append((event, data))
        return not drop(event, data)

    parser = sse.SSEParser(on_event, keep_raw=keep_raw)
    out = b"".join(parser.feed(c) for c in chunks) + parser.finish()
    return events, out


STREAM = (
    "\ufeff: keep-alive\n"
    "event: message_start\n"
    'data: {"a": "é€𝄞"}\n'
    "\n"
    "id: 7\nretry: 100\n"
    "data: line one\n"
    "data:line two\n"
    "data\n"
    "\n"
    "event: ping\n"
    "\n"
    "data: [DONE]\n"
    "\n"
)
EXPECTED = [
    ("message_start", '{"a": "é€𝄞"}'.encode()),
    (None, b"line one\nline two\n"),
    (None, b"[DONE]"),
]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_line_endings_comments_multiline_bom(newline):
    body = STREAM.replace("\n", newline).encode()
    events, out = parse([body])
    assert events == EXPECTED
    assert out == b""  # without keep_raw nothing is handed back


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_split_point(newline):
    body = STREAM.replace("\n", newline).encode()
    for i in range(len(body) + 1):
        for j in range(i, min(len(body), i + 9) + 1):  # two cuts close together too
            assert parse([body[:i], body[i:j], body[j:]])[0] == EXPECTED, (i, j)


@settings(max_examples=200, deadline=None)
@given(
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(0, 200), max_size=30),
)
def test_keep_raw_returns_the_exact_bytes(newline, cuts):
    body = STREAM.replace("\n", newline).encode()
    points = sorted({c for c in cuts if c < len(body)})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=False)]
    events, out = parse(chunks, keep_raw=True)
    assert events == EXPECTED
    assert out == body


def test_dropping_one_event_removes_exactly_its_bytes():
    body = b'data: {"x":1}\r\n\r\ndata: {"usage":1}\r\n\r\ndata: [DONE]\r\n\r\n'
    for i in range(len(body) + 1):
        _, out = parse([body[:i], body[i:]], keep_raw=True, drop=lambda e, d: b"usage" in d)
        assert out == b'data: {"x":1}\r\n\r\ndata: [DONE]\r\n\r\n', i


def test_unterminated_last_event_is_still_parsed():
    events, out = parse([b"data: one\n\ndata: two"], keep_raw=True)
    assert events == [(None, b"one"), (None, b"two")]
    assert out == b"data: one\n\ndata: two"


def test_cr_at_chunk_end_then_lf():
    events, out = parse([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"], keep_raw=True)
    assert events == [(None, b"a"), (None, b"b")]
    assert out == b"data: a\r\n\r\ndata: b\r\n\r\n"


def test_lone_cr_separators_across_chunks():
    events, _ = parse([b"data: a\r", b"\r", b"data: b\r", b"\r"])
    assert events == [(None, b"a"), (None, b"b")]


def test_overflow_stops_parsing_but_keeps_bytes(monkeypatch):
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 100)
    big = b"data: " + b"x" * 500 + b"\n\n"
    body = b"data: small\n\n" + big + b"data: after\n\n"
    for chunks in ([body], [body[i : i + 7] for i in range(0, len(body), 7)]):
        events, out = parse(chunks, keep_raw=True)
        assert events == [(None, b"small")]
        assert out == body


def test_binary_junk_does_not_raise():
    junk = bytes(range(256)) * 20
    _, out = parse([junk[i : i + 13] for i in range(0, len(junk), 13)], keep_raw=True)
    assert out == junk
