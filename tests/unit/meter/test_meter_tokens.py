"""tiktoken: shipped encodings, loaded once, offline, thread-safe."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import drawdown
import pytest
from drawdown.meter import count_tokens, encoding_for
from drawdown.meter.tokens import encoding_name_for

DATA_DIR = Path(drawdown.__file__).parent / "data" / "tiktoken"


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-5-nano-2025-08-07", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("claude-sonnet-4-5", "o200k_base"),
        ("gemini-2.5-pro", "o200k_base"),
        (None, "o200k_base"),
    ],
)
def test_encoding_by_model(model, name):
    assert encoding_name_for(model) == name
    assert encoding_for(model).name == name


def test_count_tokens_is_encode_ordinary():
    assert count_tokens("", None) == 0
    assert count_tokens("hello world", "gpt-4o") == 2
    # special-token text is ordinary text, never an error
    assert count_tokens("<|endoftext|>", "gpt-4") > 1
    assert count_tokens("lone \ud800 surrogate", None) > 0


def test_first_load_is_offline_and_thread_safe():
    code = textwrap.dedent(
        """
        import json, os, socket, threading
        def refuse(*args, **kwargs):
            raise OSError("network is disabled in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        from drawdown.meter import tokens
        results, errors = [], []
        def work(model):
            try:
                results.append((model, tokens.count_tokens("hello world " * 2000, model)))
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=work, args=(m,)) for m in ["gpt-4o", "gpt-4"] * 6]
        for t in threads: t.start()
        for t in threads: t.join()
        print(json.dumps({
            "errors": errors,
            "counts": sorted(set(results)),
            "cache_dir": os.environ.get("TIKTOKEN_CACHE_DIR"),
            "loaded": sorted(tokens._encodings),
        }))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["errors"] == []
    assert len(report["counts"]) == 2  # one answer per encoding, whatever the thread
    assert Path(report["cache_dir"]) == DATA_DIR.resolve()
    assert report["loaded"] == ["cl100k_base", "o200k_base"]


def test_encoding_files_are_package_data():
    names = {p.name for p in DATA_DIR.iterdir()}
    assert {
        "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
        "fb374d419588a4632f3f557e76b4b70aebbca790",
    } <= names


def test_meter_package_is_pure():
    code = "import sys, drawdown.meter; print(sorted(m for m in sys.modules if m.split('.')[0] in ('mitmproxy', 'requests', 'httpx')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_short_texts_are_counted_once_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent resends its short messages every turn; tokenizing them again would release the
    GIL on the event loop each time (tiktoken does), so they are cached like long ones."""
    from drawdown.meter import tokens

    encoding = tokens.load_encoding("o200k_base")
    calls: list[str] = []

    class Counting:
        def encode_ordinary(self, text: str) -> list[int]:
            calls.append(text)
            return encoding.encode_ordinary(text)

    monkeypatch.setattr(tokens, "load_encoding", lambda name: Counting())
    monkeypatch.setattr(tokens, "_cache", tokens._CountCache())
    texts = ["system", "You are terse.", "user", "What is 2+2? " * 40]  # short ones and a long one
    first = tokens.count_texts(texts, "gpt-4o")
    assert tokens.count_texts(texts, "gpt-4o") == first
    assert sorted(calls) == sorted(texts)  # each text tokenized once, on its first sighting


def test_the_count_cache_stays_within_its_memory_bound_for_many_short_texts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Short texts are mostly per-entry overhead: bounding the cache by characters alone let it
    grow to ~8x its bound. Filled with 100k distinct short texts, the cache's memory (traced)
    must stay near max_bytes."""
    import tracemalloc

    from drawdown.meter import tokens

    class Fixed:
        def encode_ordinary(self, text: str) -> list[int]:
            return [0] * 5

    monkeypatch.setattr(tokens, "load_encoding", lambda name: Fixed())
    bound = 2 * 1024 * 1024
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        cache = tokens._CountCache(max_bytes=bound)
        for n in range(100_000):
            cache.count("o200k_base", f"short message number {n}")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < len(cache) < 100_000  # the oldest were evicted
    assert held - before <= bound * 1.25, f"{(held - before) / 2**20:.1f} MiB for a 2 MiB bound"
    assert cache.count("o200k_base", "short message number 99999") == 5  # the newest are kept
