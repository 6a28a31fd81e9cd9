"""Run a synchronous ledger off the event loop: writer threads, awaited futures.

mitmproxy runs every hook on one asyncio loop, so the loop never touches the
database. Operations queued while the writer is busy are applied together in one
transaction (one lock, one WAL commit) — each keeps its own savepoint, result and
decision, so batching changes throughput, never outcomes. On drawdown's own event loop
(eventloop.py) a loop iteration's operations reach the writer together, just before the loop
polls, rather than one by one as hooks queue them.

SQLite gets one writer (it has one write lock anyway). A ledger may ask for more with a
`writers` attribute (PostgreSQL: row locks, so batches on different budgets overlap).

With `batch_scheduling` (Linux) the writers run under SCHED_BATCH: a woken writer does not
preempt the thread on its CPU, it runs when that thread blocks, its slice ends or another CPU
is idle. `drawdown run --workers` asks for it when its workers take every CPU: then a writer
is always woken beside a busy event loop, and each preemption cut a batch short (two workers
on two CPUs: 2–3 operations a transaction, each writer's CPU a request doubled). Left to wait,
a batch gathers what the loop queued meanwhile; same weight, same share of the CPU, only the
moment it starts changes. Not the default: beside a CPU-bound neighbour that is not its own
loop (another program; the tokenizer process before it ran at SCHED_IDLE), a writer that
cannot preempt makes every request wait out the neighbour's slice (one process: small
requests' p99 rose 9–11 ms more than bare mitmdump's while big prompts were counted), and one
process on a machine with CPUs to spare gains nothing from it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..affinity import WriterPlacement
from ..eventloop import EventLoop
from .api import LedgerError

log = logging.getLogger(__name__)

_STOP = object()


def _resolve(settled: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in settled:
        if future.cancelled():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _observe(observer: Callable[..., None], calls: Any, results: Any, started: float) -> None:
    try:
        observer(calls, results, time.perf_counter() - started)
    except Exception:
        log.exception("drawdown: counting a ledger batch for the metrics failed")


class AsyncLedger:
    def __init__(
        self,
        ledger: Any,
        *,
        max_batch: int = 128,
        writers: int | None = None,
        placement: WriterPlacement | None = None,
        batch_scheduling: bool = False,
        checkpoints: bool = True,
        observer: Callable[[list[Any], list[Any], float], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.max_batch = max_batch
        self.placement = placement  # --cpu-affinity: where each writer thread runs
        # Told what each batch did, on the writer thread once its waiters were woken (metrics).
        self.observer: Callable[[list[Any], list[Any], float], None] | None = observer
        # Each entry is a list of operations (name, args, future, loop), or _STOP.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Per drawdown EventLoop: the operations its current iteration queued, and the
        # before-poll callback that hands them over.
        self._gathering: dict[EventLoop, tuple[list[Any], Any]] = {}
        count = max(1, writers or getattr(ledger, "writers", 1))
        self._threads = [
            threading.Thread(target=self._run, name=f"drawdown-ledger-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()
        self._batch_scheduling = False
        self.batch_scheduling = batch_scheduling
        # SQLite: its WAL is copied into the database by a thread of its own, never the writer.
        self._checkpointing = checkpoints and hasattr(ledger, "start_checkpoints")
        if self._checkpointing:
            ledger.start_checkpoints()

    @property
    def batch_scheduling(self) -> bool:
        """Whether the writer threads run under SCHED_BATCH (see above); settable while they run."""
        return self._batch_scheduling

    @batch_scheduling.setter
    def batch_scheduling(self, wanted: bool) -> None:
        if wanted == self._batch_scheduling or not hasattr(os, "SCHED_BATCH"):
            return
        policy = os.SCHED_BATCH if wanted else os.SCHED_OTHER
        try:
            for thread in self._threads:
                if thread.native_id is not None:
                    os.sched_setscheduler(thread.native_id, policy, os.sched_param(0))
        except OSError as exc:  # a seccomp profile that refuses it: the writers run as before
            log.warning("drawdown: the ledger writer keeps its scheduling policy: %s", exc)
            return
        self._batch_scheduling = wanted

    @property
    def process_id(self) -> str:
        return self.ledger.process_id

    async def call(self, name: str, *args: Any) -> Any:
        """Queue `ledger.<name>(*args)` for the writer thread and await its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        operation = (name, args, future, loop)
        if isinstance(loop, EventLoop):
            gathering = self._gathering.get(loop)
            if gathering is None:
                gathering = self._gathering[loop] = ([], lambda: self._hand_over(loop))
                loop.call_before_poll(gathering[1])
            gathering[0].append(operation)
        else:
            self._queue.put([operation])
        return await future

    def _hand_over(self, loop: EventLoop) -> None:
        """Before `loop` polls: what its iteration queued goes to the writer, in one put."""
        operations, hand_over = self._gathering[loop]
        if operations:
            self._gathering[loop] = ([], hand_over)
            self._queue.put(operations)

    def call_sync(self, name: str, *args: Any) -> Any:
        """For callers outside the event loop (shutdown, CLI): run directly, under the ledger's lock."""
        return getattr(self.ledger, name)(*args)

    def _run(self) -> None:
        after_batch = self.placement.follower() if self.placement else None
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = item  # a list no one else holds: the loop hands over a new one each time
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._queue.put(_STOP)  # finish this batch, then stop
                    break
                batch += more
            # One loop iteration may hand over more than a batch: a transaction stays bounded.
            for first in range(0, len(batch), self.max_batch):
                self._run_batch(batch[first : first + self.max_batch], after_batch)

    def _run_batch(self, batch: list[Any], after_batch: Callable[[int], None] | None) -> None:
        calls = [(name, args) for name, args, _, _ in batch]
        started = time.perf_counter()
        try:
            results = self.ledger.run_batch(calls)
        except LedgerError as exc:
            results = [exc] * len(batch)
        except Exception as exc:  # a bug, not a ledger fault: surface it to every waiter
            log.exception("ledger batch failed")
            results = [LedgerError(f"ledger failure: {exc}")] * len(batch)
        if after_batch is not None:
            after_batch(len(batch))
        observer = self.observer
        # Several writers: a caller woken now may have its next operation (the commit of a hold
        # this batch made) counted by another writer before this one counted the hold.
        early = observer is not None and len(self._threads) > 1
        if early:
            _observe(observer, calls, results, started)
        # One wake-up per event loop for the whole batch, not one per operation.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for (_, _, future, loop), result in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((future, result))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, settled)
            except RuntimeError:  # the loop has closed; nobody is waiting any more
                pass
        if observer is not None and not early:  # after the waiters were woken: off their path
            _observe(observer, calls, results, started)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the writers once they have run everything queued (on the loop's thread: what
        its current iteration gathered is handed over first)."""
        self._hand_over_all()
        self._stop(timeout)

    async def aclose(self, timeout: float = 10.0) -> None:
        """`close` from a coroutine: the writers are joined off the event loop."""
        self._hand_over_all()
        await asyncio.to_thread(self._stop, timeout)

    def _hand_over_all(self) -> None:
        for loop, (_, hand_over) in list(self._gathering.items()):
            self._hand_over(loop)
            loop.remove_before_poll(hand_over)
        self._gathering.clear()

    def _stop(self, timeout: float) -> None:
        if self._checkpointing:
            self.ledger.stop_checkpoints()
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
