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
        out = [self._obj.decompress(data)]
        # A new gzip member may follow the end of the previous one.
        while self._gzip and self._obj.eof and self._obj.unused_data:
            rest = self._obj.unused_data
            self._obj = self._new(rest)
            out.append(self._obj.decompress(rest))
        return b"".join(out)

    def flush(self) -> bytes:
        if self._obj is None:
            return b""
        return self._obj.flush()


class _Brotli:
    def __init__(self) -> None:
        self._obj = brotli.Decompressor()

    def decode(self, data: bytes) -> bytes:
        return self._obj.process(data)

    def flush(self) -> bytes:
        return b""


class _Zstd:
    def __init__(self) -> None:
        self._obj = zstd.ZstdDecompressor()

    def decode(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._obj.decompress(data))
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
