"""How long an uploaded audio file plays, read from its container where that is cheap and
exact: WAV (RIFF header), FLAC (STREAMINFO), MP3 (Xing/Info/VBRI header, else its frames
walked), Ogg Vorbis/Opus/Speex (the last page's granule position), MP4/M4A/MOV (mvhd), WebM
and Matroska (the Segment Info's Duration).

Anything else (a WebM a browser recorded without a Duration, a format new to us, a file whose
header lies about itself) gets an upper bound from its size: no speech codec the transcription APIs accept encodes usable speech below
MIN_BYTES_PER_SECOND, so the file cannot play longer than size / that rate. Never raises:
hostile input yields a bound, not an error.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

# 8 kbit/s: below AMR-WB's and Opus' usual speech rates; Opus can go to 6 kbit/s, but Opus
# comes in Ogg (read exactly) or WebM (bounded here, and the answer's usage settles it).
MIN_BYTES_PER_SECOND = 1000


def duration_seconds(data: bytes) -> tuple[float, bool]:
    """(seconds the audio plays, exact). Not exact: the size bound."""
    try:
        for reader in (_wav, _flac, _ogg, _mp4, _webm, _mp3):
            seconds = reader(data)
            # A header's fields can multiply past a float (WebM's Duration times its scale):
            # infinity is no duration, the size bounds it instead.
            if seconds is not None and seconds >= 0 and math.isfinite(seconds):
                return seconds, True
    except (struct.error, IndexError, ValueError, ZeroDivisionError, OverflowError):
        pass
    return size_bound(len(data)), False


def size_bound(size: int) -> float:
    return size / MIN_BYTES_PER_SECOND


# --- WAV ----------------------------------------------------------------------------------


# A WAV has a handful of chunks (fmt, data, LIST, fact...): a walk gives up past this many,
# lest 25 MB of empty chunks (three million) be walked in Python under the GIL.
_MAX_WAV_CHUNKS = 1024


def _wav(data: bytes) -> float | None:
    if data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        return None
    pos, byte_rate = 12, 0
    for _ in range(_MAX_WAV_CHUNKS):
        if pos + 8 > len(data):
            break
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk == b"fmt " and size >= 16:
            byte_rate = struct.unpack_from("<I", data, body + 8)[0]
        elif chunk == b"data":
            if not byte_rate:
                return None
            # A streamed WAV leaves the size unset (0 or 0xFFFFFFFF): the data runs to the end.
            available = len(data) - body
            length = available if size in (0, 0xFFFFFFFF) else min(size, available)
            return length / byte_rate
        pos = body + size + (size & 1)  # chunks are padded to an even length
    return None


# --- FLAC ---------------------------------------------------------------------------------


def _skip_id3(data: bytes) -> int:
    """The offset past a leading ID3v2 tag (MP3, sometimes FLAC), else 0."""
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    size = 0
    for byte in data[6:10]:
        size = (size << 7) | (byte & 0x7F)  # syncsafe: 7 bits a byte
    return 10 + size + (10 if data[5] & 0x10 else 0)  # a footer doubles the header


def _flac(data: bytes) -> float | None:
    start = _skip_id3(data)
    if data[start : start + 4] != b"fLaC":
        return None
    info = start + 8  # the first block is STREAMINFO: 4-byte block header, then its fields
    if data[start + 4] & 0x7F != 0:
        return None
    packed = int.from_bytes(data[info + 10 : info + 18], "big")
    rate = packed >> 44  # 20 bits of sample rate, 3 of channels, 5 of depth, 36 of samples
    samples = packed & ((1 << 36) - 1)
    if not rate or not samples:  # a total left unknown by the encoder
        return None
    return samples / rate


# --- Ogg ----------------------------------------------------------------------------------

_OGG_TAIL = 256 * 1024  # the last complete page ends the file; a page is at most ~64 KiB


def _ogg(data: bytes) -> float | None:
    if data[:4] != b"OggS":
        return None
    payload = 27 + data[26]  # the header, its segment table
    head = data[payload : payload + 64]
    if head.startswith(b"OpusHead"):
        rate = 48_000  # Opus granules count 48 kHz samples whatever the input rate
    elif head.startswith(b"\x01vorbis"):
        rate = struct.unpack_from("<I", head, 12)[0]
    elif head.startswith(b"Speex   "):
        rate = struct.unpack_from("<I", head, 36)[0]
    else:
        return None
    if not rate:
        return None
    end = len(data)
    floor = max(0, end - _OGG_TAIL)
    while True:
        at = data.rfind(b"OggS", floor, end)
        if at < 0 or at + 14 > len(data):
            return None
        granule = struct.unpack_from("<q", data, at + 6)[0]
        if data[at + 4] == 0 and granule >= 0:  # -1: no packet ends on this page
            return granule / rate
        end = at


# --- MP4 / M4A / MOV ----------------------------------------------------------------------


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, body start, body end) of the boxes in data[start:end]."""
    out = []
    pos = start
    while pos + 8 <= end and len(out) < 4096:
        size, kind = struct.unpack_from(">I", data, pos)[0], data[pos + 4 : pos + 8]
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < header:
            break
        out.append((kind, pos + header, min(pos + size, end)))
        pos += size
    return out


def _mp4(data: bytes) -> float | None:
    if data[4:8] != b"ftyp":
        return None
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind != b"moov":
            continue
        for inner, body, _ in _boxes(data, start, end):
            if inner != b"mvhd":
                continue
            if data[body] == 1:  # version 1: 64-bit times
                scale, length = struct.unpack_from(">IQ", data, body + 20)
            else:
                scale, length = struct.unpack_from(">II", data, body + 12)
            return length / scale if scale else None
    return None


# --- WebM / Matroska -----------------------------------------------------------------------

_EBML, _SEGMENT, _INFO, _CLUSTER = 0x1A45DFA3, 0x18538067, 0x1549A966, 0x1F43B675
_TIMECODE_SCALE, _DURATION = 0x2AD7B1, 0x4489


def _vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int, int, bool]:
    """(value, next offset, unknown size) of an EBML variable-length integer."""
    first = data[pos]
    length = 9 - first.bit_length()  # the leading zeros say how many bytes follow
    if not 1 <= length <= 8:
        raise ValueError("not an EBML integer")
    if pos + length > len(data):
        raise ValueError("cut short")
    value = int.from_bytes(data[pos : pos + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
    return value, pos + length, value == (1 << (7 * length)) - 1


def _elements(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(id, body start, body end) of the EBML elements in data[start:end]."""
    pos, seen = start, 0
    while pos < end and seen < 256:
        ident, pos, _ = _vint(data, pos, keep_marker=True)
        size, pos, unknown = _vint(data, pos, keep_marker=False)
        stop = end if unknown else min(pos + size, end)
        yield ident, pos, stop
        pos, seen = stop, seen + 1


def _webm(data: bytes) -> float | None:
    if int.from_bytes(data[:4], "big") != _EBML:
        return None
    for ident, start, end in _elements(data, 0, len(data)):
        if ident != _SEGMENT:
            continue
        for child, body, stop in _elements(data, start, end):
            if child == _CLUSTER:
                return None  # the media began and no Info came before it
            if child != _INFO:
                continue
            scale, duration = 1_000_000, None  # nanoseconds per timecode unit: 1 ms default
            for field, at, until in _elements(data, body, stop):
                if field == _TIMECODE_SCALE:
                    scale = int.from_bytes(data[at:until], "big")
                elif field == _DURATION and until - at in (4, 8):
                    duration = struct.unpack(">f" if until - at == 4 else ">d", data[at:until])[0]
            if duration is None or not duration >= 0 or duration == float("inf"):
                return None  # a live recording: no Duration written
            return duration * scale / 1e9
        return None
    return None


# --- MP3 ----------------------------------------------------------------------------------

_BITRATES = {  # kbit/s by (MPEG-1?, layer), index 1..14
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _frame(data: bytes, pos: int) -> tuple[int, int, int, bool, bool] | None:
    """(frame length, samples, sample rate, MPEG-1, mono) of an MPEG audio frame header."""
    if pos + 4 > len(data) or data[pos] != 0xFF or data[pos + 1] & 0xE0 != 0xE0:
        return None
    b1, b2, b3 = data[pos + 1], data[pos + 2], data[pos + 3]
    version, layer_bits = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_index, rate_index = b2 >> 4, (b2 >> 2) & 3
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    layer = 4 - layer_bits
    mpeg1 = version == 3
    bitrate = _BITRATES[(mpeg1, layer)][bitrate_index - 1] * 1000
    rate = _RATES[version][rate_index]
    padding = (b2 >> 1) & 1
    if layer == 1:
        samples, length = 384, (12 * bitrate // rate + padding) * 4
    else:
        samples = 1152 if mpeg1 or layer == 2 else 576
        length = samples // 8 * bitrate // rate + padding
    return length, samples, rate, mpeg1, (b3 >> 6) == 3


# A frame walk gives up after this many frames: 25 MB (the API's limit) of the smallest frames.
_MAX_FRAMES = 600_000
_MAX_MISSES = 4096


def _mp3(data: bytes) -> float | None:
    pos = _skip_id3(data)
    first = _frame(data, pos)
    if first is None:
        return None
    _, samples, rate, mpeg1, mono = first
    # A VBR file's first frame may be a Xing/Info or VBRI header counting the frames.
    side = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    xing = pos + 4 + side
    if data[xing : xing + 4] in (b"Xing", b"Info"):
        flags = struct.unpack_from(">I", data, xing + 4)[0]
        if flags & 1:
            return struct.unpack_from(">I", data, xing + 8)[0] * samples / rate
    vbri = pos + 36
    if data[vbri : vbri + 4] == b"VBRI":
        return struct.unpack_from(">I", data, vbri + 14)[0] * samples / rate
    # No header: walk the frames (CBR or not), resynchronising past a little junk; a file
    # that is mostly junk is not an MP3 worth walking (its size bounds it instead).
    seconds, frames, misses = 0.0, 0, 0
    while pos < len(data) and frames < _MAX_FRAMES:
        frame = _frame(data, pos)
        if frame is None or frame[0] <= 4:
            misses += 1
            nxt = data.find(b"\xff", pos + 1)
            if nxt < 0:
                break
            if misses > _MAX_MISSES:
                return None
            pos = nxt
            continue
        seconds += frame[1] / frame[2]
        frames += 1
        pos += frame[0]
    return seconds if frames else None
