"""Big tokenizations on threads of their own, at a lower CPU priority than the proxy.

tiktoken releases the GIL, so tokenizing a 100k-token prompt on a thread never stalls the
event loop; but on a machine with few cores that thread still competes with the loop for a
CPU, and every other request's latency rises while it runs. Linux applies a nice value per
thread, so these threads run niced: the proxy's own work goes first and the big prompt takes
what CPU is left (all of it on an idle machine, so its own latency barely moves).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

NICE_INCREMENT = 10  # CFS weight 110 vs 1,024: ~10 % of a contended CPU, all of an idle one
THREAD_PREFIX = "drawdown-tokenize"


def _lower_priority() -> None:
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICE_INCREMENT)
    except (AttributeError, OSError):  # not Linux (the nice would be process-wide): as is
        pass


class Offload:
    """A small pool of niced threads; created on first use, shut down with the proxy."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.workers,
                thread_name_prefix=THREAD_PREFIX,
                initializer=_lower_priority,
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
