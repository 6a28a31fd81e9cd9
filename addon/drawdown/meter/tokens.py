"""tiktoken encodings, loaded lazily and once, from the files shipped as package data."""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import tiktoken

# tiktoken looks a cached encoding up by sha1(download URL); these two files are shipped in
# drawdown/data/tiktoken/ so that the proxy never downloads at start-up or at runtime.
_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tiktoken"
_CACHE_FILES = {
    "cl100k_base": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    "o200k_base": "fb374d419588a4632f3f557e76b4b70aebbca790",
}

_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}

# Prefixes of OpenAI models that predate o200k_base.
_CL100K_PREFIXES = (
    "gpt-4-",
    "gpt-4",  # exact "gpt-4" and "gpt-4-0613"...; gpt-4o/4.1/4.5 are caught first below
    "gpt-3.5",
    "gpt-35",  # Azure spelling
    "text-embedding-3",
    "text-embedding-ada",
    "davinci-002",
    "babbage-002",
)
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "chatgpt-4o")


def load_encoding(name: str) -> tiktoken.Encoding:
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    with _lock:
        enc = _encodings.get(name)
        if enc is None:
            if not (_DATA_DIR / _CACHE_FILES[name]).is_file():
                raise RuntimeError(f"tiktoken data for {name} missing from {_DATA_DIR}")
            os.environ["TIKTOKEN_CACHE_DIR"] = str(_DATA_DIR)
            enc = tiktoken.get_encoding(name)
            _encodings[name] = enc
    return enc


def encoding_name_for(model: str | None) -> str:
    name = (model or "").lower().rsplit("/", 1)[-1]
    if name.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if name.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"  # gpt-5, o-series, Claude/Gemini approximations and anything unknown


def encoding_for(model: str | None) -> tiktoken.Encoding:
    return load_encoding(encoding_name_for(model))


def count_encoded(encoding: str, text: str) -> int:
    """Tokens of `text` in the encoding named `encoding` (also what the tokenizer process runs)."""
    return len(load_encoding(encoding).encode_ordinary(text))


def count_tokens(text: str, model: str | None) -> int:
    """Number of tokens in `text` (special-token text counts as ordinary text)."""
    if not text:
        return 0
    return count_encoded(encoding_name_for(model), text)


# What an entry costs beyond its text (the key tuple, the ordered dict's slot and node, the
# count), measured with tracemalloc. Short texts are mostly this: a bound in characters alone
# let 16 M characters of 26-character texts take 120 MiB.
_ENTRY_OVERHEAD = 128


class _CountCache:
    """Token counts of recently seen texts, bounded by the memory they take (`max_bytes`).

    An agent resends its whole conversation on every turn: the system prompt, tool definitions
    and every earlier message come back unchanged, so counting each text once saves nearly all
    of the tokenizing. Thread-safe (prompts may be counted on worker threads).
    """

    def __init__(self, max_bytes: int = 16 * 1024 * 1024) -> None:
        self._counts: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    @staticmethod
    def _cost(text: str) -> int:
        return sys.getsizeof(text) + _ENTRY_OVERHEAD

    def count(self, encoding: str, text: str) -> int:
        key = (encoding, text)
        with self._lock:
            found = self._counts.get(key)
            if found is not None:
                self._counts.move_to_end(key)
                return found
        counted = None
        if _offload is not None and len(text) >= _offload_chars:
            counted = _offload(encoding, text)
        if counted is None:  # outside the lock: tiktoken releases the GIL for part of it
            counted = count_encoded(encoding, text)
        cost = self._cost(text)
        with self._lock:
            if key not in self._counts and cost <= self._max_bytes // 4:
                self._counts[key] = counted
                self._bytes += cost
                while self._bytes > self._max_bytes:
                    (_, old), _ = self._counts.popitem(last=False)
                    self._bytes -= self._cost(old)
        return counted

    def __len__(self) -> int:
        return len(self._counts)


_cache = _CountCache()

# Set by tokenizer_process: counts a big text in a child process, or None if it could not.
_offload: Callable[[str, str], int | None] | None = None
_offload_chars = 0


def offload_big_texts(count: Callable[[str, str], int | None] | None, min_chars: int = 0) -> None:
    """Count texts of `min_chars` or more with `count(encoding, text)` (None: in this process)."""
    global _offload, _offload_chars
    _offload, _offload_chars = count, min_chars


def count_texts(texts: Iterable[str], model: str | None, separator_tokens: int = 1) -> int:
    """Tokens of `texts` as if joined by a newline, counting each text once per cache lifetime.

    Each text is tokenized on its own (a BPE merge never spans two texts, so this is never below
    the joined count by more than the separators, which are added as `separator_tokens` each).
    """
    name = encoding_name_for(model)
    total = 0
    parts = 0
    for text in texts:
        parts += 1
        if not text:
            continue
        # Short texts too: tiktoken releases the GIL, and taking it back on the event loop
        # can wait for another thread's switch interval; an agent resends them every turn.
        total += _cache.count(name, text)
    return total + max(0, parts - 1) * separator_tokens
