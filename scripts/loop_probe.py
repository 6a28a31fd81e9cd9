"""A mitmproxy addon for scripts/bench: how late the proxy's event loop runs a 1 ms timer.

Every hook of every flow runs on that loop, so its lateness is what each request in flight
waits beside whatever holds the GIL (a big prompt being parsed or tokenized, say). Loaded with
`-s` (mitmdump) or `--set scripts=` (drawdown run). The bench drives it through files in
$DRAWDOWN_BENCH_PROBE_DIR: creating `<pid>.reset` starts a new sample, `<pid>.dump` writes
`<pid>.json` with the lateness percentiles in ms, and `<pid>.collect` runs a full garbage
collection and writes what it collected and took. A process's first full collection comes
after its first thousand requests or so (bare mitmdump's: 26-57 ms over its start-up heap;
drawdown freezes its own); the bench runs it before the rounds that compare p99s.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from pathlib import Path

TIMER = 0.001


class LoopProbe:
    def __init__(self) -> None:
        self.lates: list[float] = []
        self.task: asyncio.Task[None] | None = None
        self.control = Path(os.environ.get("DRAWDOWN_BENCH_PROBE_DIR", "."))
        self.pid = os.getpid()

    def running(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.tick())

    async def tick(self) -> None:
        ticks = 0
        while True:
            started = time.perf_counter()
            await asyncio.sleep(TIMER)
            self.lates.append((time.perf_counter() - started - TIMER) * 1000)
            ticks += 1
            if ticks % 20 == 0:
                self.poll()

    def poll(self) -> None:
        reset, dump = self.control / f"{self.pid}.reset", self.control / f"{self.pid}.dump"
        if reset.exists():
            reset.unlink()
            self.lates = []
        if dump.exists():
            lates = sorted(self.lates)
            count = len(lates)
            figures = {"samples": count}
            if count:
                for name, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
                    figures[name] = lates[min(count - 1, int(count * q))]
                figures["max"] = lates[-1]
            (self.control / f"{self.pid}.json").write_text(json.dumps(figures))
            dump.unlink()
        collect = self.control / f"{self.pid}.collect"
        if collect.exists():
            started = time.perf_counter()
            collected = gc.collect()
            took = (time.perf_counter() - started) * 1000
            (self.control / f"{self.pid}.json").write_text(
                json.dumps({"collected": collected, "ms": took})
            )
            collect.unlink()


addons = [LoopProbe()]
