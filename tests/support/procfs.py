"""Processes as Linux's /proc shows them: for tests that a child process ends with its parent."""

from __future__ import annotations

import time
from pathlib import Path


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return "State:\tZ" not in status.read()
    except FileNotFoundError:
        return False


def wait_until_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def threads_of(pid: int) -> list[int]:
    """The thread ids of `pid` (the first one, equal to `pid`, runs its main thread)."""
    return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for tid in threads_of(pid):
        found |= {
            int(child) for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        }
    return found
