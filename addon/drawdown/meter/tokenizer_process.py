"""Big texts are counted in a separate process, so their encode shares no GIL with the proxy.

tiktoken holds the GIL for part of an encode (reading the text, building the list of token ids).
Beside a 240k-token encode on a worker thread, the event loop's 1 ms timers ran late by 5–9 ms;
with the encode in a child process they ran late by 0.4 ms at p99 (benchmarks/HISTORY.md). Every other
request in flight pays that lateness, so a proxy counts big prompts out of process.

The child counts at SCHED_IDLE (Linux): it takes a CPU nothing else wants and gives it up at once
to the proxy's event loop, its ledger writer or the agent's own processes. At the normal policy,
each ~15 ms encode took turns with them: beside five 100k-token prompts a second, small requests'
p99 rose 3.98 ms (bare mitmdump's 1.36; the same prompts forwarded uncounted, 1.70); at
SCHED_IDLE 2.24 (ten interleaved rounds, BENCHMARKS.md). On a machine busy on every CPU the
child gets almost nothing, so a text it has not counted in about twice the time the texts queued
before it and itself should take is counted by its caller, as if there were no child; and until
the child has caught up (it cannot drop a text once it holds it), so is every other text.

The child is a `concurrent.futures.ProcessPoolExecutor` of one spawned process (never forked: the
proxy runs threads), started on the first big text. It receives the text, returns an int. While
it starts, or if it is missing or dies, texts are counted in the calling thread (and a new child
is started): a request is never held up or dropped because of the tokenizer process. The child
ignores Ctrl-C (the proxy stops it) and exits with its parent, even one killed with SIGKILL.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor

from ..affinity import unpin_child
from . import tokens

log = logging.getLogger(__name__)

# Texts shorter than this are counted in the calling thread: a round trip to the child costs
# about 0.2 ms, an encode of 32k characters about 3 ms.
OFFLOAD_CHARS = 32 * 1024
# After a child failed to start, texts are counted in threads for this long before a retry.
RETRY_SECONDS = 60.0
# How long a caller waits for the child before counting the text itself: a base, and a time per
# character queued in the child (its own and earlier callers'): 2-4x an encode's own 25-55 ns a
# character on the VMs measured, so an idle CPU is found well in time. On a busy machine the
# first 100k-token prompt the child falls behind on waits ~65 ms for nothing; the next ones don't.
OVERDUE_BASE_SECONDS = 0.010
OVERDUE_SECONDS_PER_CHAR = 100e-9


def _child_pid() -> int:
    return os.getpid()


def _init_child(encodings: tuple[str, ...]) -> None:
    unpin_child()  # a proxy held to one CPU (--cpu-affinity) counts big prompts beside it
    # Ctrl-C reaches the whole process group: the proxy shuts the child down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The executor's queues hold both ends of their pipes in the child, so the child would not
    # notice a parent killed with SIGKILL: watch the parent's sentinel and exit with it.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    for name in encodings:
        tokens.load_encoding(name)
    # After the encodings have loaded (at the normal policy: start-up is not starved); on this,
    # the thread that counts. The watcher above sleeps for good.
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # a seccomp profile that refuses it: count at the normal policy
            pass


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


class TokenizerProcess:
    """One child process that counts texts; `count` is called from worker threads and blocks.

    Started on the first text that needs it (`count` answers None until the child is ready, so
    that text and any others meanwhile are counted by their caller): a proxy whose agents never
    send a big prompt spends neither the child's memory nor its start-up CPU.
    """

    # o200k_base alone takes ~77 MB in the child; cl100k_base (older models) loads on first use.
    def __init__(self, encodings: tuple[str, ...] = ("o200k_base",)) -> None:
        self._encodings = encodings
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._starting: Future[int] | None = None  # the child's first answer: ready when done
        self._failed_at = -RETRY_SECONDS
        self._closed = False
        self.counted = 0  # texts the child has counted, for tests and the bench
        self.starts = 0  # children spawned
        self.overdue = 0  # texts the child did not count in time, or was too far behind for
        self.queued_chars = 0  # characters submitted to the child and not yet counted
        self._abandoned: set[Future[int]] = set()  # in the child, their callers gone

    def start(self, wait: bool = True) -> None:
        """Spawn the child (unless there is one) and load its encodings: about a second, in the
        background unless `wait`. Raises, with `wait`, if the child could not start."""
        spawned = False
        with self._lock:
            if self._closed:
                return
            if self._executor is None:
                self.starts += 1
                try:
                    self._executor = ProcessPoolExecutor(
                        max_workers=1,
                        mp_context=multiprocessing.get_context("spawn"),
                        initializer=_init_child,
                        initargs=(self._encodings,),
                    )
                    self._starting = self._executor.submit(_child_pid)
                except Exception as exc:
                    self._executor, self._starting = None, None
                    self._failed(exc)
                    if wait:
                        raise
                    return
                spawned = True
            starting = self._starting
        if spawned and starting is not None:  # outside the lock: a done future calls back at once
            starting.add_done_callback(self._started)
        if wait and starting is not None:
            starting.result()

    def _started(self, future: Future[int]) -> None:
        exc = future.exception() if not future.cancelled() else None
        if future.cancelled() or exc is not None:
            with self._lock:
                executor = self._executor if self._starting is future else None
                if executor is not None:
                    self._executor, self._starting = None, None
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
                self._failed(exc)
            return
        with self._lock:
            if self._starting is not future:
                return  # a replaced child's
        log.info(
            "drawdown: tokenizer process %s counts prompt texts of %d characters or more",
            future.result(),
            OFFLOAD_CHARS,
        )

    def _failed(self, exc: BaseException | None) -> None:
        self._failed_at = time.monotonic()
        log.warning(
            "drawdown: the tokenizer process could not start (%s); big prompts are counted in "
            "threads, and it is tried again in %d s",
            exc,
            RETRY_SECONDS,
        )

    def _ready(self) -> ProcessPoolExecutor | None:
        """The executor, if its child has started and answered."""
        with self._lock:
            executor, starting = self._executor, self._starting
        if starting is None or not starting.done() or starting.cancelled():
            return None
        return executor if starting.exception() is None else None

    def pid(self) -> int | None:
        """The child's process id, or None when there is none (or it is not ready yet)."""
        executor = self._ready()
        if executor is None:
            return None
        try:
            return executor.submit(_child_pid).result()
        except Exception:
            return None

    def count(self, encoding: str, text: str) -> int | None:
        """The token count of `text`, or None if the child cannot give it now (count it here)."""
        executor = self._ready()
        if executor is None:
            with self._lock:
                idle = self._executor is None
            if idle and time.monotonic() - self._failed_at >= RETRY_SECONDS:
                self.start(wait=False)
            return None
        size = len(text)
        with self._lock:
            if self._abandoned:  # behind on texts nobody waits for: the CPUs are busy
                self.overdue += 1
                return None
            self.queued_chars += size
            patience = OVERDUE_BASE_SECONDS + OVERDUE_SECONDS_PER_CHAR * self.queued_chars
        try:
            future = executor.submit(tokens.count_encoded, encoding, text)
        except Exception as exc:
            self._settled(size, None)
            self._replace(executor, exc)
            return None
        # Once the child has counted it (even after its caller gave up), or it was dropped.
        future.add_done_callback(lambda done: self._settled(size, done))
        try:
            counted = future.result(timeout=patience)
        except TimeoutError:
            # Still queued: dropped. Already handed to the child: it will count it for nobody,
            # and until it has, callers count their own texts instead of queueing behind it.
            future.cancel()
            with self._lock:
                self.overdue += 1
                falls_behind = not self._abandoned and not future.done()
                if not future.done():
                    self._abandoned.add(future)
            if falls_behind:  # once a spell, not once a text
                log.info(
                    "drawdown: the tokenizer process has not counted a prompt text in %.0f ms "
                    "(no idle CPU, or an encoding loading): big prompts are counted in threads "
                    "until it catches up",
                    patience * 1000,
                )
            return None
        except Exception as exc:
            self._replace(executor, exc)
            return None
        with self._lock:
            self.counted += 1
        return counted

    def _settled(self, size: int, future: Future[int] | None) -> None:
        with self._lock:
            self.queued_chars -= size
            self._abandoned.discard(future)

    def _replace(self, broken: ProcessPoolExecutor, exc: BaseException) -> None:
        with self._lock:
            if self._executor is not broken or self._closed:
                return  # another thread replaced it already, or we are shutting down
            self._executor, self._starting = None, None
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


def use_tokenizer_process() -> TokenizerProcess:
    """Count texts of OFFLOAD_CHARS or more in a process-wide child, started on first need."""
    global _current
    if _current is None:
        _current = TokenizerProcess()
    tokens.offload_big_texts(_current.count, OFFLOAD_CHARS)
    return _current


def stop_tokenizer_process() -> None:
    global _current
    process, _current = _current, None
    tokens.offload_big_texts(None)
    if process is not None:
        process.close()
