"""A mitmproxy script for `drawdown run`: how long the ledger writer's batches take, and how
much of that the writer thread spent on a CPU.

    drawdown run … --set scripts=scripts/writer_probe.py     # DRAWDOWN_WRITER_PROBE=out.json

Each batch the writer thread hands the ledger is timed twice: wall clock, and the writer's own
CPU time (`time.thread_time`). A batch whose wall time is far above its CPU time waited — for
the GIL while the event loop ran Python, or for another process's write lock — not for SQLite's
work. When the proxy stops, the summary is logged and, if DRAWDOWN_WRITER_PROBE names a file,
written there as JSON with every batch's (operations, wall ms, CPU ms). benchmarks/HISTORY.md shows
what it found under load.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A batch "waited" when its wall time exceeds its CPU time by this much and by half again.
WAITED_MS = 1.0


def timed(
    run_batch: Callable[[Sequence[Any]], list[Any]], samples: list[tuple[int, float, float]]
) -> Callable[[Sequence[Any]], list[Any]]:
    """`run_batch`, recording (operations, wall ms, writer CPU ms) of each call into `samples`."""

    def run(calls: Sequence[Any]) -> list[Any]:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return run_batch(calls)
        finally:
            samples.append(
                (
                    len(calls),
                    (time.perf_counter() - wall) * 1000,
                    (time.thread_time() - cpu) * 1000,
                )
            )

    return run


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def summarize(samples: Sequence[tuple[int, float, float]]) -> dict[str, Any]:
    if not samples:
        return {"batches": 0}
    walls = sorted(wall for _, wall, _ in samples)
    cpus = sorted(cpu for _, _, cpu in samples)
    waited = [s for s in samples if s[1] - s[2] > WAITED_MS and s[1] > 1.5 * s[2]]
    figures: dict[str, Any] = {
        "batches": len(samples),
        "operations": sum(ops for ops, _, _ in samples),
        "waited": len(waited),
        "waited_ms": sum(wall - cpu for _, wall, cpu in waited),
        "wall_ms_total": sum(walls),
        "cpu_ms_total": sum(cpus),
    }
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        figures[f"wall_ms_{name}"] = _quantile(walls, q)
        figures[f"cpu_ms_{name}"] = _quantile(cpus, q)
    return figures


def describe(figures: dict[str, Any]) -> str:
    if not figures["batches"]:
        return "writer probe: no batch ran"
    return (
        "writer probe: {batches} batches, {per:.1f} operations each; wall p50/p90/p99 "
        "{wall_ms_p50:.2f}/{wall_ms_p90:.2f}/{wall_ms_p99:.2f} ms, CPU {cpu_ms_p50:.2f}/"
        "{cpu_ms_p90:.2f}/{cpu_ms_p99:.2f} ms; {waited} batches ({share:.0%}) waited, "
        "{waited_ms:.0f} ms in all"
    ).format(
        per=figures["operations"] / figures["batches"],
        share=figures["waited"] / figures["batches"],
        **figures,
    )


class WriterProbe:
    def __init__(self) -> None:
        self.samples: list[tuple[int, float, float]] = []

    def watch(self, async_ledger: Any) -> None:
        """Time the batches `async_ledger` (an AsyncLedger) hands its ledger from now on."""
        backend = async_ledger.ledger
        backend.run_batch = timed(backend.run_batch, self.samples)

    def running(self) -> None:
        from mitmproxy import ctx

        drawdown = ctx.master.addons.get("drawdown")
        if drawdown is None or drawdown.ledger is None:
            log.warning("writer probe: no drawdown ledger to watch")
            return
        self.watch(drawdown.ledger)

    def done(self) -> None:
        figures = summarize(self.samples)
        log.info(describe(figures))
        if out := os.environ.get("DRAWDOWN_WRITER_PROBE"):
            Path(out).write_text(json.dumps({**figures, "samples": self.samples}))


addons = [WriterProbe()]
