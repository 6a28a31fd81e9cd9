"""`drawdown run --cpu-affinity`: each proxy process on one CPU, its ledger writer beside its loop.

Every request hands its reserve and its commit to the ledger's writer thread and waits for the
answer. Left to the scheduler, the writer is woken on whichever CPU is idle, and the event loop
is woken back there in turn: four cross-CPU wake-ups a request, each dear on a VM whose idle
vCPUs halt (a wake-up through the hypervisor). With the process on one CPU a hand-off is a
context switch on a warm CPU. Measured on a 2-vCPU VM (BENCHMARKS.md): a lone request's rate
rose from ~75 % of bare mitmdump's to ~85 %, and two workers' p99 at c=16 fell by a third.

It is an operator's choice, as nginx's `worker_cpu_affinity` is, not a default: a process held
to one CPU cannot move away from whatever else comes to run there. The tokenizer process, which
counts big prompts beside the loop, gets back every CPU the proxy was started with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# The CPUs a pinned proxy was started with, for the child processes it spawns (a spawned child
# inherits its parent's single CPU).
UNPINNED_ENV = "DRAWDOWN_UNPINNED_CPUS"


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
            f"--cpu-affinity: CPU {format_cpus(missing)} is not available to this process "
            f"(it may use {format_cpus(allowed)})"
        )
    return [cpus[i % len(cpus)] for i in range(workers)]


def pin_process(cpu: int) -> set[int]:
    """Hold every thread of this process, and every thread it starts later, to `cpu`.
    Returns the CPUs it could use before, also left in the environment for its children."""
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
