"""Big texts are counted in a separate process, so their encode shares no GIL with the proxy.

tiktoken holds the GIL for part of an encode (reading the text, building the list of token ids).
Beside a 240k-token encode on a worker thread, the event loop's 1 ms timers ran late by 5–9 ms;
with the encode in a child process they ran late by 0.4 ms at p99 (BENCHMARKS.md). Every other
request in flight pays that lateness, so a proxy counts big prompts out of process.

The child is a `concurrent.futures.ProcessPoolExecutor` of one spawned process (never forked: the
proxy runs threads). It receives the text, returns an int. If it is missing or dies, the text is
counted in the calling thread and a new child is started for the next one: a request is never
held up or dropped because the tokenizer process is gone. A child whose parent dies exits when
its end of the pipe closes.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor

from . import tokens

log = logging.getLogger(__name__)

# Texts shorter than this are counted in the calling thread: a round trip to the child costs
# about 0.2 ms, an encode of 32k characters about 3 ms.
OFFLOAD_CHARS = 32 * 1024


def _count_in_child(encoding: str, text: str) -> int:
    return len(tokens.load_encoding(encoding).encode_ordinary(text))


def _child_pid() -> int:
    return os.getpid()


def _init_child(encodings: tuple[str, ...]) -> None:
    # Ctrl-C reaches the whole process group: the proxy shuts the child down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The executor's queues hold both ends of their pipes in the child, so the child would not
    # notice a parent killed with SIGKILL: watch the parent's sentinel and exit with it.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    for name in encodings:
        tokens.load_encoding(name)


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


class TokenizerProcess:
    """One child process that counts texts; `count` is called from worker threads and blocks."""

    # o200k_base alone takes ~77 MB in the child; cl100k_base (older models) loads on first use.
    def __init__(self, encodings: tuple[str, ...] = ("o200k_base",)) -> None:
        self._encodings = encodings
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False
        self.counted = 0  # texts the child has counted, for tests and the bench

    def start(self, wait: bool = True) -> None:
        """Spawn the child and load its encodings (about a second; call it off the event loop)."""
        with self._lock:
            if self._closed:
                return
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_child,
                    initargs=(self._encodings,),
                )
            warmed = self._executor.submit(_child_pid)
        if wait:
            warmed.result()

    def pid(self) -> int | None:
        """The child's process id, or None when there is none."""
        with self._lock:
            executor = self._executor
        if executor is None:
            return None
        try:
            return executor.submit(_child_pid).result()
        except Exception:
            return None

    def count(self, encoding: str, text: str) -> int | None:
        """The token count of `text`, or None if the child could not give it (count it here)."""
        with self._lock:
            executor = self._executor
        if executor is None:
            return None
        try:
            counted = executor.submit(_count_in_child, encoding, text).result()
        except Exception as exc:
            self._replace(executor, exc)
            return None
        with self._lock:
            self.counted += 1
        return counted

    def _replace(self, broken: ProcessPoolExecutor, exc: BaseException) -> None:
        with self._lock:
            if self._executor is not broken or self._closed:
                return  # another thread replaced it already, or we are shutting down
            self._executor = None
        log.warning("drawdown: the tokenizer process failed (%s); starting a new one", exc)
        broken.shutdown(wait=False, cancel_futures=True)
        self.start(wait=False)  # spawned in the background while this text is counted here

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


_current: TokenizerProcess | None = None


def start_tokenizer_process() -> TokenizerProcess:
    """Start the process-wide tokenizer child and count texts of OFFLOAD_CHARS or more in it."""
    global _current
    if _current is None:
        _current = TokenizerProcess()
    _current.start()
    tokens.offload_big_texts(_current.count, OFFLOAD_CHARS)
    return _current


def stop_tokenizer_process() -> None:
    global _current
    process, _current = _current, None
    tokens.offload_big_texts(None)
    if process is not None:
        process.close()
