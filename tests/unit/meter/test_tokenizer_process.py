"""The tokenizer process: big texts counted in a child, the same counts, nothing lost if it dies."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from drawdown.meter import tokenizer_process, tokens
from drawdown.meter.tokenizer_process import TokenizerProcess

from tests.support.procfs import alive, wait_until_gone


def fresh_text(words: int) -> str:
    """A text no earlier test has counted (the count cache would answer it without counting)."""
    return f"{uuid.uuid4()} " + " ".join(f"word{i % 97}" for i in range(words))


REAL_PATIENCE = tokenizer_process.OVERDUE_BASE_SECONDS


@pytest.fixture(autouse=True)
def patient_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers wait for the child as long as it takes, unless a test is about how long they
    wait: a busy CI machine would otherwise send a text to its caller now and then."""
    monkeypatch.setattr(tokenizer_process, "OVERDUE_BASE_SECONDS", 30.0)


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


def wait_for_backlog(process: TokenizerProcess, timeout: float = 30.0) -> None:
    """Until the child has counted every text handed to it, including those counted late."""
    deadline = time.monotonic() + timeout
    while process.queued_chars and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.queued_chars == 0


def test_a_killed_child_loses_no_count_and_is_replaced(offloaded: TokenizerProcess) -> None:
    encoding = tokens.load_encoding("o200k_base")
    first = offloaded.pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert wait_until_gone(first)

    text = fresh_text(5000)
    # Counted in this thread while a new child starts.
    assert tokens.count_texts([text], "gpt-4o") == len(encoding.encode_ordinary(text))
    assert (offloaded.counted, offloaded.starts) == (0, 2)
    second = wait_until_ready(offloaded)
    assert second != first
    again = fresh_text(5000)
    assert tokens.count_texts([again], "gpt-4o") == len(encoding.encode_ordinary(again))
    assert offloaded.counted == 1


def test_the_child_counts_at_idle_priority(child: TokenizerProcess) -> None:
    """SCHED_IDLE: the child takes only a CPU that the proxy's loop and writer leave idle."""
    pid = child.pid()
    assert pid is not None
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the proxy keeps its own


def test_a_text_the_child_does_not_count_in_time_is_counted_by_its_caller(
    offloaded: TokenizerProcess, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped child stands for one that gets no CPU on a machine busy on every CPU: a caller
    waits about twice what the texts queued in it should take, then counts its own; until the
    child has caught up, the next callers count theirs without waiting."""
    monkeypatch.setattr(tokenizer_process, "OVERDUE_BASE_SECONDS", REAL_PATIENCE)
    encoding = tokens.load_encoding("o200k_base")
    pid = offloaded.pid()
    assert pid is not None
    first, second = fresh_text(5000), fresh_text(5000)
    counts: list[int] = []

    def count_both() -> None:
        counts.extend(tokens.count_texts([text], "gpt-4o") for text in (first, second))

    os.kill(pid, signal.SIGSTOP)
    try:
        caller = threading.Thread(target=count_both, daemon=True)
        with caplog.at_level(logging.INFO):
            caller.start()
            caller.join(30)  # a caller that waited on the child for good would still be here
        assert not caller.is_alive(), "the callers waited for a child that gets no CPU"
        assert counts == [len(encoding.encode_ordinary(t)) for t in (first, second)]
        assert (offloaded.counted, offloaded.overdue) == (0, 2)
        # The child holds the first, whose caller gave up; the second never went to it.
        assert offloaded.queued_chars == len(first)
        said = [r.getMessage() for r in caplog.records if "has not counted" in r.getMessage()]
        assert len(said) == 1, said  # once a spell, not once a text
        assert "big prompts are counted in threads until it catches up" in said[0]
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for_backlog(offloaded)  # counted late, for nothing: the backlog is gone
    # The child is trusted again. A patient caller, so that a machine busy on every CPU (the
    # child counts at SCHED_IDLE) cannot make the third text overdue too.
    monkeypatch.setattr(tokenizer_process, "OVERDUE_BASE_SECONDS", 30.0)
    third = fresh_text(5000)
    assert tokens.count_texts([third], "gpt-4o") == len(encoding.encode_ordinary(third))
    assert (offloaded.counted, offloaded.overdue) == (1, 2)
    assert offloaded.pid() == pid  # the same child, not replaced


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


def wait_until_ready(process: TokenizerProcess, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = process.pid()
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise AssertionError("the tokenizer process did not start")


def test_the_child_starts_on_the_first_big_text_which_is_counted_meanwhile() -> None:
    process = tokenizer_process.use_tokenizer_process()
    try:
        assert process.starts == 0 and process.pid() is None  # nothing spawned at start-up
        encoding = tokens.load_encoding("o200k_base")
        first = "x " * tokenizer_process.OFFLOAD_CHARS + str(uuid.uuid4())
        assert tokens.count_texts([first], "gpt-4o") == len(encoding.encode_ordinary(first))
        assert (process.starts, process.counted) == (1, 0)  # counted here while it starts
        child = wait_until_ready(process)
        assert child != os.getpid()
        second = "y " * tokenizer_process.OFFLOAD_CHARS + str(uuid.uuid4())
        assert tokens.count_texts([second], "gpt-4o") == len(encoding.encode_ordinary(second))
        assert (process.starts, process.counted) == (1, 1)
    finally:
        tokenizer_process.stop_tokenizer_process()
    assert tokens._offload is None
    assert wait_until_gone(child)


def test_a_child_that_cannot_start_is_retried_later_and_counting_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("no /dev/shm")

    monkeypatch.setattr(tokenizer_process, "ProcessPoolExecutor", refuse)
    process = TokenizerProcess()
    with caplog.at_level(logging.WARNING):
        assert process.count("o200k_base", "hello world") is None
    assert "could not start (no /dev/shm); big prompts are counted in threads" in caplog.text
    assert process.count("o200k_base", "hello world") is None
    assert process.starts == 1  # not retried on every big text
    process._failed_at -= tokenizer_process.RETRY_SECONDS
    assert process.count("o200k_base", "hello world") is None
    assert process.starts == 2
    with pytest.raises(OSError):
        process.start(wait=True)


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


def test_a_child_ready_at_once_does_not_deadlock_its_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The start callback takes the lock: it must not be attached while start() holds it."""

    class Instant:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def submit(self, fn: object, *args: object) -> Future[int]:
            done: Future[int] = Future()
            done.set_result(4242)
            return done

        def shutdown(self, *args: object, **kwargs: object) -> None:
            pass

    monkeypatch.setattr(tokenizer_process, "ProcessPoolExecutor", Instant)
    process = TokenizerProcess()
    starter = threading.Thread(target=process.start, kwargs={"wait": False}, daemon=True)
    starter.start()
    starter.join(5)
    assert not starter.is_alive(), "start() deadlocked on its own lock"
    assert process.pid() == 4242
