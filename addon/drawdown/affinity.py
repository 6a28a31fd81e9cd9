"""`drawdown run --cpu-affinity`: each proxy process on one CPU, its ledger writer beside its loop.

Every request hands its reserve and its commit to the ledger's writer thread and waits for the
answer. Left to the scheduler, the writer is woken on whichever CPU is idle, and the event loop
is woken back there in turn: four cross-CPU wake-ups a request, each dear on a VM whose idle
vCPUs halt (a wake-up through the hypervisor). Pinned, a hand-off is a context switch on a warm
CPU. Under load the writer batches a dozen operations at a time and wakes rarely; then its
SQLite work is better run beside the loop's, on a spare CPU. So the writer follows its batches:
it stays on the loop's CPU while it hands off one or two operations at a time, and spreads to
the CPUs no other worker holds once its batches grow (WriterPlacement).

Measured on a 2-vCPU VM (benchmarks/HISTORY.md, fifth run): a lone request's rate rose from 72–80 % of bare
mitmdump's to 80–87 % over full bench runs (93–97 % in shorter interleaved ones), with c=16
unchanged and two workers' p99 7–8 ms lower. It is an operator's choice, as nginx's
`worker_cpu_affinity` is, not a default: a pinned event loop cannot move away from whatever
else comes to run on its CPU. The tokenizer process, which counts big prompts beside the loop,
gets back every CPU the proxy was started with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The CPUs a pinned proxy was started with, for the child processes it spawns (a spawned child
# inherits its parent's single CPU).
UNPINNED_ENV = "DRAWDOWN_UNPINNED_CPUS"
# The CPUs a pinned proxy's ledger writer may spread to under load: its own and the spare ones.
WRITER_CPUS_ENV = "DRAWDOWN_WRITER_CPUS"


class AffinityError(ValueError):
    """A --cpu-affinity this machine cannot honour; the message is for the user."""


def supported() -> bool:
    return hasattr(os, "sched_setaffinity") and Path("/proc/self/task").is_dir()


def parse_cpus(text: str) -> list[int]:
    """A CPU list as Linux writes one (`0`, `0,2`, `0-3,8`), in the order given."""
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise AffinityError(
                f"--cpu-affinity wants auto or a list of CPUs such as 0,2-3; got {text!r}"
            )
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise AffinityError(f"--cpu-affinity: the range {part.strip()!r} runs backwards")
        cpus += [cpu for cpu in range(low, high + 1) if cpu not in cpus]
    return cpus


def format_cpus(cpus: Iterable[int]) -> str:
    """The short form of a CPU set: {0, 1, 2, 5} -> '0-2,5'."""
    ranges: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def worker_cpus(spec: str, workers: int, allowed: set[int]) -> list[int]:
    """The CPU of each worker: the i-th of the list (or, for `auto`, of the CPUs this process
    may use), starting over when there are more workers than CPUs."""
    cpus = sorted(allowed) if spec.strip() == "auto" else parse_cpus(spec)
    missing = [cpu for cpu in cpus if cpu not in allowed]
    if missing:
        raise AffinityError(
            f"--cpu-affinity: {'CPUs' if len(missing) > 1 else 'CPU'} {format_cpus(missing)} "
            f"{'are' if len(missing) > 1 else 'is'} not available to this process "
            f"(it may use {format_cpus(allowed)})"
        )
    return [cpus[i % len(cpus)] for i in range(workers)]


def spare_cpus(cpu: int, workers: Sequence[int], allowed: set[int]) -> set[int]:
    """The CPUs the writer of the worker on `cpu` may spread to: its own, and those that no
    worker is pinned to (a lone proxy: every CPU it may use)."""
    return {cpu} | (allowed - set(workers))


def writer_environment(cpu: int, workers: Sequence[int]) -> dict[str, str]:
    """The environment that tells the proxy pinned to `cpu` where its ledger writer may spread
    (WriterPlacement.from_environment reads it), given every worker's CPU."""
    return {WRITER_CPUS_ENV: format_cpus(spare_cpus(cpu, workers, os.sched_getaffinity(0)))}


def pin_process(cpu: int) -> set[int]:
    """Hold every thread of this process, and every thread it starts later, to `cpu`. Returns
    the CPUs it could use before, also left in the environment for its children."""
    allowed = os.sched_getaffinity(0)
    os.environ.setdefault(UNPINNED_ENV, format_cpus(allowed))
    for task in Path("/proc/self/task").iterdir():  # Linux applies affinity per thread
        try:
            os.sched_setaffinity(int(task.name), {cpu})
        except ProcessLookupError:
            pass  # a thread that ended meanwhile
    return allowed


def unpin_child() -> None:
    """In a child process of a pinned proxy: back on every CPU the proxy was started with."""
    cpus = os.environ.get(UNPINNED_ENV)
    if not cpus or not supported():
        return
    try:
        os.sched_setaffinity(0, set(parse_cpus(cpus)) or os.sched_getaffinity(0))
    except (AffinityError, OSError):
        pass  # those CPUs are gone (a cpuset changed): stay where the parent was


# The writer's batches, smoothed: above WIDEN_ABOVE operations a batch it spreads out, below
# NARROW_BELOW it comes back beside the loop. Apart, so that a load in between does not make
# it flap: a lone agent's calls come one at a time (1.0), sixteen at once a dozen a batch.
SMOOTHING = 0.1
WIDEN_ABOVE = 2.5
NARROW_BELOW = 1.5


@dataclass(frozen=True)
class WriterPlacement:
    """Where a pinned proxy's ledger writer runs: `home` (the event loop's CPU) while it hands
    off an operation or two at a time, `spread` (home and the spare CPUs) once batches grow."""

    home: frozenset[int]
    spread: frozenset[int]

    @classmethod
    def from_environment(cls) -> WriterPlacement | None:
        """In a process pinned by --cpu-affinity with a spare CPU for its writer; else None."""
        cpus = os.environ.get(WRITER_CPUS_ENV)
        if not cpus or not supported():
            return None
        try:
            home, spread = frozenset(os.sched_getaffinity(0)), frozenset(parse_cpus(cpus))
        except (AffinityError, OSError):
            return None
        return cls(home, spread) if spread - home else None

    def follower(
        self, place: Callable[[frozenset[int]], None] | None = None
    ) -> Callable[[int], None]:
        """For one writer thread, called on it: puts the thread at home, and returns the
        function to call after each batch with its number of operations."""
        place = place or _place_this_thread
        place(self.home)
        ops, wide = 1.0, False

        def after_batch(size: int) -> None:
            nonlocal ops, wide
            ops += (size - ops) * SMOOTHING
            if not wide and ops > WIDEN_ABOVE:
                place(self.spread)
                wide = True
            elif wide and ops < NARROW_BELOW:
                place(self.home)
                wide = False

        return after_batch


def _place_this_thread(cpus: frozenset[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)  # on Linux, 0 is the calling thread
    except OSError as exc:  # a CPU taken away (cpuset changed): stay where the thread is
        log.debug("drawdown: ledger writer stays put: %s", exc)
