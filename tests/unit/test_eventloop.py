"""drawdown's event loop (eventloop.py) and the ledger writer's hand-over on it (worker.py):
a loop iteration's operations reach the writer together, just before the loop polls."""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import pytest
from drawdown.eventloop import EventLoop
from drawdown.ledger import worker as worker_module
from drawdown.ledger.worker import AsyncLedger


class RecordingLedger:
    """Answers each operation with its own argument and records the batches it was given."""

    process_id = "test"

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, tuple[Any, ...]]]] = []

    def run_batch(self, operations: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        self.batches.append(list(operations))
        return [args[0] for _, args in operations]


class CountingQueue(queue.Queue):  # type: ignore[type-arg]
    """The writer's queue, counting the entries put on it (each put may wake the writer)."""

    puts = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        CountingQueue.puts += 1
        super().put(item, block, timeout)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine, loop_factory=EventLoop)


def eight_calls_in_one_iteration(worker: AsyncLedger) -> None:
    """Eight calls made in one loop iteration (gather starts them all before the next poll);
    each caller gets its own answer. Then the writer stops."""

    async def main() -> list[Any]:
        return await asyncio.gather(*(worker.call("op", n) for n in range(8)))

    try:
        assert run(main()) == list(range(8))
    finally:
        worker.close()


def test_callbacks_run_before_every_poll_until_removed() -> None:
    polls: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, EventLoop)
        callback = lambda: polls.append(1)  # noqa: E731
        loop.call_before_poll(callback)
        for _ in range(3):
            await asyncio.sleep(0)  # each one a loop iteration, each iteration one poll
        counted = len(polls)
        loop.remove_before_poll(callback)
        await asyncio.sleep(0)
        assert counted >= 3 and len(polls) == counted

    run(main())


def test_the_loop_still_serves_sockets_and_survives_a_failing_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The wrapped selector registers, polls and unregisters as asyncio's own does."""

    def broken() -> None:
        raise RuntimeError("a bug")

    async def main() -> bytes:
        asyncio.get_running_loop().call_before_poll(broken)  # type: ignore[attr-defined]

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping\n")
        line = await reader.readline()
        writer.close()
        server.close()
        await server.wait_closed()
        return line

    assert run(main()) == b"ping\n"
    assert "a before-poll callback failed" in caplog.text


def test_a_loop_iterations_operations_reach_the_writer_in_one_hand_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight calls made in one iteration: one put on the writer's queue (one wake-up), one
    batch, every caller its own answer. Queued one by one, that was eight puts."""
    monkeypatch.setattr(worker_module.queue, "SimpleQueue", CountingQueue)
    CountingQueue.puts = 0
    ledger = RecordingLedger()
    eight_calls_in_one_iteration(AsyncLedger(ledger))
    assert CountingQueue.puts == 1 + 1  # the operations, then the stop
    assert [len(batch) for batch in ledger.batches] == [8]


def test_a_hand_over_larger_than_a_batch_is_run_in_batches_of_the_limit() -> None:
    ledger = RecordingLedger()
    eight_calls_in_one_iteration(AsyncLedger(ledger, max_batch=3))
    assert [len(batch) for batch in ledger.batches] == [3, 3, 2]


def test_on_another_loop_each_call_is_queued_at_once() -> None:
    """asyncio's own loop (tests, `mitmdump -s`) has no before-poll hook: nothing waits for one."""
    ledger = RecordingLedger()
    worker = AsyncLedger(ledger)
    try:
        assert asyncio.run(worker.call("op", 7)) == 7
    finally:
        worker.close()
    assert ledger.batches == [[("op", (7,))]]


def test_closing_hands_over_what_the_iteration_gathered_and_leaves_the_loop() -> None:
    """The proxy's stop closes the writer from a hook: what that iteration queued must still be
    run (a commit) before the writer stops, and the closed writer no longer hooks the loop."""
    ledger = RecordingLedger()
    worker = AsyncLedger(ledger)

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(worker.call("commit", "r1"))
        # Runs after the task's first step in the same iteration: before any poll.
        loop.call_soon(worker.close)
        answer = await task
        assert not loop._before_poll  # type: ignore[attr-defined]
        return answer

    assert run(main()) == "r1"
    assert ledger.batches == [[("commit", ("r1",))]]
    assert not any(thread.is_alive() for thread in worker._threads)
