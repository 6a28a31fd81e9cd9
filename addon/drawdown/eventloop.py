"""The event loop `drawdown run` drives: asyncio's selector loop, with work run just before it polls.

The ledger's writer thread shares the proxy's GIL. Woken the moment a hook queues an operation,
it wakes while the loop is still running Python and waits for the GIL, and every system call
the loop makes meanwhile signals it again. Queued instead until the loop is about to poll
(`call_before_poll`), a loop iteration's operations reach the writer together, as the loop is
about to let go of the GIL in epoll_wait: under load, fewer wake-ups and GIL waits on both
threads, and a higher rate (measured in BENCHMARKS.md). The delay is the rest of one iteration.
"""

from __future__ import annotations

import asyncio
import logging
import selectors
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)


class _SelectorBeforePoll(selectors.BaseSelector):
    """A selector that runs `before_poll` and then polls the one it wraps."""

    def __init__(self, inner: selectors.BaseSelector, before_poll: Callable[[], None]) -> None:
        self._inner = inner
        self._before_poll = before_poll

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._before_poll()
        return self._inner.select(timeout)

    def close(self) -> None:
        self._inner.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()


class EventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector event loop, plus callbacks that run before each poll for I/O."""

    def __init__(self) -> None:
        self._before_poll: list[Callable[[], None]] = []
        super().__init__(_SelectorBeforePoll(selectors.DefaultSelector(), self._run_before_poll))

    def call_before_poll(self, callback: Callable[[], None]) -> None:
        """Run `callback` on this loop's thread before every poll, until removed. For work a
        loop iteration gathers and hands on once: it must be quick and must not raise."""
        self._before_poll.append(callback)

    def remove_before_poll(self, callback: Callable[[], None]) -> None:
        if callback in self._before_poll:
            self._before_poll.remove(callback)

    def _run_before_poll(self) -> None:
        for callback in self._before_poll:
            try:
                callback()
            except Exception:  # a bug: keep the loop polling, say where
                log.exception("drawdown: a before-poll callback failed")
