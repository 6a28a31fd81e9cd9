"""Offload: big tokenizations run on threads niced below the event loop's."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest
from drawdown.meter.offload import NICE_INCREMENT, THREAD_PREFIX, Offload


def _where() -> tuple[str, int]:
    return threading.current_thread().name, os.getpriority(
        os.PRIO_PROCESS, threading.get_native_id()
    )


@pytest.mark.skipif(sys.platform != "linux", reason="a nice value per thread is Linux's")
def test_work_runs_on_a_niced_thread_while_the_caller_keeps_its_priority() -> None:
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    offload = Offload()

    async def main() -> tuple[str, int]:
        return await offload.run(_where)

    try:
        name, nice = asyncio.run(main())
    finally:
        offload.close()
    assert name.startswith(THREAD_PREFIX)
    assert nice == min(19, mine + NICE_INCREMENT)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_arguments_results_and_errors_pass_through() -> None:
    offload = Offload()

    def divide(a: int, b: int, *, scale: int = 1) -> float:
        return a / b * scale

    async def main() -> float:
        assert await offload.run(divide, 6, 3, scale=10) == 20
        return await offload.run(divide, 1, 0)

    try:
        with pytest.raises(ZeroDivisionError):
            asyncio.run(main())
    finally:
        offload.close()
