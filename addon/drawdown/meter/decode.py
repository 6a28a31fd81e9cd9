"""Incremental Content-Encoding decoders (gzip, deflate, br, zstd) for parsing streamed bodies.

mitmproxy decodes non-streamed bodies itself; a streamed body reaches the meter as wire
bytes, still compressed when the upstream compressed it.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli

try:  # Python 3.14+
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # mitmproxy depends on the backport below 3.14
    from backports import zstd  # type: ignore[no-redef]


# What one chunk of a stream may decode to. A host an agent runs could stream a few kB that
# decode to gigabytes; past this the meter stops reading the stream (its bytes flow on) and
# charges it as a stream it could not read. No real answer comes near it: event streams
# compress 5-10x, and a chunk is what one read returns.
MAX_CHUNK_OUTPUT = 64 * 1024 * 1024


class BodyTooLarge(ValueError):
    """A body (or a stream's chunk) whose decoded size passes the limit it was decoded under:
    decoding stops there, so a few bytes that decode to gigabytes cost no more than the limit."""


def _room(used: int) -> int:
    """Bytes one more decompress call on a chunk may return: one past what is left, so that
    passing the bound shows (_bounded keeps `used` within it, so this is never 0, which zlib
    reads as no bound)."""
    return MAX_CHUNK_OUTPUT - used + 1


def _bounded(out: bytes, used: int = 0) -> bytes:
    if used + len(out) > MAX_CHUNK_OUTPUT:
        raise BodyTooLarge(f"a chunk decodes to more than {MAX_CHUNK_OUTPUT} bytes")
    return out


class Decoder(Protocol):
    def decode(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Zlib:
    """gzip (possibly several members) or deflate (zlib-wrapped, or raw as some servers send)."""

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._obj: zlib._Decompress | None = None
        self._head = b""  # deflate: bytes held until we can tell zlib-wrapped from raw

    def _new(self, first: bytes) -> zlib._Decompress:
        if self._gzip:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # RFC 9110 "deflate" is zlib-wrapped; a raw stream fails the header checksum.
        wrapped = len(first) >= 2 and first[0] & 0x0F == 8 and int.from_bytes(first[:2]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def decode(self, data: bytes) -> bytes:
        if self._obj is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return b""
            self._head = b""
            self._obj = self._new(data)
        out = [_bounded(self._obj.decompress(data, _room(0)))]
        used = len(out[0])
        # A new gzip member may follow the end of the previous one.
        while self._gzip and self._obj.eof and self._obj.unused_data:
            rest = self._obj.unused_data
            self._obj = self._new(rest)
            out.append(_bounded(self._obj.decompress(rest, _room(used)), used))
            used += len(out[-1])
        return b"".join(out)

    def flush(self) -> bytes:
        if self._obj is None:
            return b""
        return self._obj.flush()


class _Brotli:
    def __init__(self) -> None:
        self._obj = brotli.Decompressor()

    def decode(self, data: bytes) -> bytes:
        return _bounded(self._obj.process(data, output_buffer_limit=_room(0)))

    def flush(self) -> bytes:
        return b""


class _Zstd:
    def __init__(self) -> None:
        self._obj = zstd.ZstdDecompressor()

    def decode(self, data: bytes) -> bytes:
        out: list[bytes] = []
        used = 0
        while data:
            out.append(_bounded(self._obj.decompress(data, max_length=_room(used)), used))
            used += len(out[-1])
            if not self._obj.eof:
                break
            # Frame finished: any remaining bytes start another frame.
            data = self._obj.unused_data
            self._obj = zstd.ZstdDecompressor()
        return b"".join(out)

    def flush(self) -> bytes:
        return b""


class _Chain:
    """`Content-Encoding: gzip, br` was applied left to right; undo it right to left."""

    def __init__(self, decoders: list[Decoder]) -> None:
        self._decoders = decoders

    def decode(self, data: bytes) -> bytes:
        for dec in self._decoders:
            data = dec.decode(data)
        return data

    def flush(self) -> bytes:
        out = b""
        for i, dec in enumerate(self._decoders):
            tail = dec.flush()
            for later in self._decoders[i + 1 :]:
                tail = later.decode(tail)
            out += tail
        return out


_FACTORIES = {
    "gzip": lambda: _Zlib(gzip=True),
    "x-gzip": lambda: _Zlib(gzip=True),
    "deflate": lambda: _Zlib(gzip=False),
    "br": _Brotli,
    "zstd": _Zstd,
}


class UnsupportedEncoding(ValueError):
    pass


def make_decoder(content_encoding: str | None) -> Decoder | None:
    """A decoder for the header value, None for identity. Raises UnsupportedEncoding."""
    names = [n.strip().lower() for n in (content_encoding or "").split(",")]
    names = [n for n in names if n and n != "identity"]
    if not names:
        return None
    decoders: list[Decoder] = []
    for name in reversed(names):
        factory = _FACTORIES.get(name)
        if factory is None:
            raise UnsupportedEncoding(name)
        decoders.append(factory())
    return decoders[0] if len(decoders) == 1 else _Chain(decoders)


# The content codings a request body may carry (RFC 9110 §8.4.1; x-gzip is gzip, §8.4.1.3).
REQUEST_CODINGS = ("gzip", "x-gzip", "deflate", "br", "zstd")


class UndecodableBody(ValueError):
    """A request body that cannot be read as its upstream reads it."""


def request_coding_problem(content_encoding: str | None) -> str | None:
    """Why a request body in this Content-Encoding cannot be read as its upstream reads it;
    None for identity or one of REQUEST_CODINGS. mitmproxy decodes any Python codec a client
    names (`quopri`, `base64`, `hex`, `bz2`…), which no upstream does: drawdown decided on
    bytes the upstream never saw. A stack (`gzip, gzip`) mitmproxy does not decode at all."""
    coding = (content_encoding or "").strip().lower()
    if coding in ("", "identity"):
        return None
    shown = repr(coding[:40])
    if "," in coding:
        return (
            f"Content-Encoding {shown} stacks several codings, which servers do not all "
            "undo alike; compress the body once"
        )
    if coding not in REQUEST_CODINGS:
        return (
            f"Content-Encoding {shown} is no HTTP content coding (gzip, deflate, br or zstd); "
            "send the body as the upstream should read it"
        )
    return None


def compressed(content_encoding: str | None) -> bool:
    """Whether a body comes in one of REQUEST_CODINGS (which decode_body undoes)."""
    return (content_encoding or "").strip().lower() in REQUEST_CODINGS


def _inflate(raw: bytes, gzip: bool, bound: int) -> tuple[bytes, zlib._Decompress]:
    """gzip data (only: mitmproxy's reader takes zlib data too), or deflate: zlib-wrapped,
    or raw as some clients send it. At most `bound` bytes out."""
    if gzip:
        obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
        return obj.decompress(raw, bound), obj
    try:
        obj = zlib.decompressobj(zlib.MAX_WBITS)
        return obj.decompress(raw, bound), obj
    except zlib.error:
        obj = zlib.decompressobj(-zlib.MAX_WBITS)
        return obj.decompress(raw, bound), obj


def decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """A request body as its upstream reads it (or an answer as its client does), decoded
    from its Content-Encoding.
    UndecodableBody for a coding no upstream undoes (request_coding_problem), and for data
    that is corrupt, cut short or followed by more (a second gzip member, which some
    servers read and others drop): what the upstream reads would be a guess. BodyTooLarge
    once more than `limit` bytes come out (decoding stops there)."""
    if (problem := request_coding_problem(content_encoding)) is not None:
        raise UndecodableBody(problem)
    coding = (content_encoding or "").strip().lower()
    if coding in ("", "identity") or not raw:
        return raw
    bound = limit + 1  # one byte past the limit tells "too large" from "exactly the limit"
    try:
        if coding == "br":
            brotli_obj = brotli.Decompressor()
            out = brotli_obj.process(raw, output_buffer_limit=bound)
            done, rest = brotli_obj.is_finished(), b""
        elif coding == "zstd":
            zstd_obj = zstd.ZstdDecompressor()
            out = zstd_obj.decompress(raw, max_length=bound)
            done, rest = zstd_obj.eof, zstd_obj.unused_data
        else:
            out, zlib_obj = _inflate(raw, "gzip" in coding, bound)
            done, rest = zlib_obj.eof, zlib_obj.unused_data
    except (zlib.error, brotli.error, zstd.ZstdError) as exc:
        raise UndecodableBody(f"the body is not valid {coding} data ({exc})") from None
    if len(out) > limit:
        raise BodyTooLarge(f"the body decodes to more than {limit} bytes")
    if not done:
        raise UndecodableBody(f"the body's {coding} data is cut short")
    if rest:
        raise UndecodableBody(f"more data follows the end of the body's {coding} data")
    return out
