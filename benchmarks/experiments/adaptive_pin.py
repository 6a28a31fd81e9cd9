"""Experiment, not shipped (BENCHMARKS.md, the twenty-second run): the event loop and the
ledger writer joined on one CPU while the writer's batches are small, apart once they grow.

`--cpu-affinity auto` pins the loop for good and moves only the writer. This tried the same
without the operator's choice: while a lone agent's calls come one at a time, both threads sit
on the CPU the loop last ran on (a hand-off is then a context switch, not a halted vCPU woken
through the hypervisor); under load both go back to every CPU. Load it into `drawdown run`
with `--set scripts=benchmarks/experiments/adaptive_pin.py`, e.g. as a `./scripts/bench
--compare` variant.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from drawdown.ledger import worker

# As affinity.WriterPlacement: smoothed operations a batch, apart so a load between does not flap.
SMOOTHING, JOIN_BELOW, PART_ABOVE = 0.1, 1.5, 2.5
EVERY_CPU = frozenset(os.sched_getaffinity(0))
state: dict[str, Any] = {"loop": None, "ops": 1.0, "joined": False}
shipped_run_batch = worker.AsyncLedger._run_batch


def _cpu_of(thread_id: int) -> int:
    with open(f"/proc/self/task/{thread_id}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[36])  # field 39: the CPU it last ran on


def _run_batch(self: worker.AsyncLedger, batch: list[Any], after_batch: Any) -> None:
    shipped_run_batch(self, batch, after_batch)
    loop = state["loop"]
    if loop is None:
        return
    state["ops"] += (len(batch) - state["ops"]) * SMOOTHING
    try:
        if not state["joined"] and state["ops"] < JOIN_BELOW:
            cpu = _cpu_of(loop)
            os.sched_setaffinity(loop, {cpu})
            os.sched_setaffinity(0, {cpu})  # this writer thread
            state["joined"] = True
        elif state["joined"] and state["ops"] > PART_ABOVE:
            os.sched_setaffinity(loop, EVERY_CPU)
            os.sched_setaffinity(0, EVERY_CPU)
            state["joined"] = False
    except OSError:
        pass  # a CPU taken away: leave the threads where they are


worker.AsyncLedger._run_batch = _run_batch  # type: ignore[method-assign]


def running() -> None:
    state["loop"] = threading.get_native_id()  # mitmproxy runs this hook on the loop's thread
