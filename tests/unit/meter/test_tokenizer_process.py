"""The tokenizer process: big texts counted in a child, the same counts, nothing lost if it dies."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import pytest
from drawdown.meter import tokenizer_process, tokens
from drawdown.meter.tokenizer_process import TokenizerProcess

from tests.support.procfs import alive, wait_until_gone


def fresh_text(words: int) -> str:
    """A text no earlier test has counted (the count cache would answer it without counting)."""
    return f"{uuid.uuid4()} " + " ".join(f"word{i % 97}" for i in range(words))


@pytest.fixture
def child() -> Iterator[TokenizerProcess]:
    process = TokenizerProcess()
    process.start()
    try:
        yield process
    finally:
        process.close()


@pytest.fixture
def offloaded(child: TokenizerProcess) -> Iterator[TokenizerProcess]:
    tokens.offload_big_texts(child.count, 2000)
    try:
        yield child
    finally:
        tokens.offload_big_texts(None)


def test_big_texts_are_counted_in_the_child_with_the_same_counts(
    offloaded: TokenizerProcess,
) -> None:
    encoding = tokens.load_encoding("o200k_base")
    big, small = fresh_text(5000), fresh_text(20)
    assert len(big) >= 2000 > len(small)

    assert tokens.count_texts([big], "gpt-4o") == len(encoding.encode_ordinary(big))
    assert offloaded.counted == 1
    assert tokens.count_texts([small], "gpt-4o") == len(encoding.encode_ordinary(small))
    assert offloaded.counted == 1  # short texts stay in this process
    # An older model's encoding loads in the child on first use.
    legacy = fresh_text(5000)
    expected = len(tokens.load_encoding("cl100k_base").encode_ordinary(legacy))
    assert tokens.count_texts([legacy], "gpt-4") == expected
    assert offloaded.counted == 2
    assert offloaded.pid() != os.getpid()


def test_a_killed_child_loses_no_count_and_is_replaced(offloaded: TokenizerProcess) -> None:
    encoding = tokens.load_encoding("o200k_base")
    first = offloaded.pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert wait_until_gone(first)

    text = fresh_text(5000)
    # Counted in this thread while a new child starts.
    assert tokens.count_texts([text], "gpt-4o") == len(encoding.encode_ordinary(text))
    assert offloaded.counted == 0
    second = offloaded.pid()
    assert second is not None and second != first
    again = fresh_text(5000)
    assert tokens.count_texts([again], "gpt-4o") == len(encoding.encode_ordinary(again))
    assert offloaded.counted == 1


def test_ctrl_c_is_left_to_the_proxy(child: TokenizerProcess) -> None:
    """SIGINT reaches the whole process group; the child must not die with a traceback."""
    pid = child.pid()
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    time.sleep(0.3)
    assert alive(pid)
    assert child.count("o200k_base", "hello world") == 2
    assert child.pid() == pid


def test_close_ends_the_child_and_counting_falls_back() -> None:
    process = TokenizerProcess()
    process.start()
    pid = process.pid()
    assert pid is not None
    process.close()
    assert wait_until_gone(pid)
    assert process.count("o200k_base", "hello world") is None  # the caller counts it itself
    process.start()  # a closed process is not restarted
    assert process.pid() is None


def test_the_module_wide_process_is_wired_into_count_texts() -> None:
    process = tokenizer_process.start_tokenizer_process()
    try:
        text = "x " * tokenizer_process.OFFLOAD_CHARS
        tokens.count_texts([text + str(uuid.uuid4())], "gpt-4o")
        assert process.counted == 1
    finally:
        tokenizer_process.stop_tokenizer_process()
    assert tokens._offload is None
    pid = process.pid()
    assert pid is None


def test_the_child_exits_when_its_parent_is_killed() -> None:
    """A proxy killed with SIGKILL must not leave its tokenizer process behind."""
    code = textwrap.dedent(
        """
        import sys, time
        from drawdown.meter.tokenizer_process import TokenizerProcess
        process = TokenizerProcess()
        process.start()
        print(process.pid(), flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None and parent.stderr is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), parent.stderr.read()
        child_pid = int(line)
        assert alive(child_pid)
        parent.kill()
        parent.wait(10)
        assert wait_until_gone(child_pid), "the tokenizer process outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_proxy_whose_tokenizer_process_cannot_start_counts_on_threads(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from drawdown.addon import Drawdown

    def refuse() -> TokenizerProcess:
        raise OSError("no /dev/shm")

    monkeypatch.setattr(tokenizer_process, "start_tokenizer_process", refuse)
    with caplog.at_level(logging.WARNING):
        asyncio.run(Drawdown()._start_tokenizer())
    assert tokens._offload is None
    assert "no tokenizer process (no /dev/shm); big prompts are counted in threads" in caplog.text
    text = fresh_text(5000)
    encoding = tokens.load_encoding("o200k_base")
    assert tokens.count_texts([text], "gpt-4o") == len(encoding.encode_ordinary(text))
