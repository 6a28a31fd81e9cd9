"""`--cpu-affinity`: CPU lists, one CPU per worker, pinning a process but not its tokenizer, and
its ledger writer following its batches."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from drawdown.affinity import (
    WRITER_CPUS_ENV,
    AffinityError,
    WriterPlacement,
    format_cpus,
    parse_cpus,
    spare_cpus,
    worker_cpus,
)
from drawdown.cli import main
from drawdown.ledger.worker import AsyncLedger


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", [0]), ("0,2-3", [0, 2, 3]), (" 3 , 1", [3, 1]), ("1,0-2", [1, 0, 2]), ("4-4", [4])],
)
def test_a_cpu_list_reads_as_linux_writes_it_in_the_order_given(text: str, cpus: list[int]) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize(
    ("text", "says"),
    [("", "wants auto or a list"), ("x", "got 'x'"), ("1-", "wants auto"), ("-1", "wants auto"),
     ("0,,1", "wants auto"), ("3-1", "'3-1' runs backwards")],
)  # fmt: skip
def test_a_bad_cpu_list_is_named_in_the_error(text: str, says: str) -> None:
    with pytest.raises(AffinityError, match=says):
        parse_cpus(text)


def test_cpu_sets_are_written_short() -> None:
    assert format_cpus({5, 0, 1, 2}) == "0-2,5"
    assert format_cpus([7]) == "7"
    assert format_cpus([]) == ""


def test_each_worker_takes_the_next_cpu_and_they_start_over_when_there_are_more_workers() -> None:
    assert worker_cpus("auto", 3, {0, 1}) == [0, 1, 0]
    assert worker_cpus("auto", 1, {2, 3}) == [2]  # the CPUs this process may use, not 0
    assert worker_cpus("3,1", 2, {0, 1, 2, 3}) == [3, 1]
    assert worker_cpus("1", 2, {0, 1}) == [1, 1]


def test_a_cpu_the_process_may_not_use_is_refused() -> None:
    with pytest.raises(
        AffinityError, match=r"CPUs 4-5 are not available to this process \(it may use 0-1\)"
    ):
        worker_cpus("0,4-5", 2, {0, 1})
    with pytest.raises(AffinityError, match=r": CPU 7 is not available to this process"):
        worker_cpus("0,7", 2, {0, 1})


def test_drawdown_run_refuses_a_bad_affinity_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("actions: []\n")
    common = ["run", "--policy", str(policy), "--db", str(tmp_path / "d.db")]
    assert main([*common, "--cpu-affinity", "0-x"]) == 2
    assert "--cpu-affinity wants auto or a list of CPUs" in capsys.readouterr().err
    assert main([*common, "--cpu-affinity", "4096", "--workers", "2"]) == 2
    assert "CPU 4096 is not available" in capsys.readouterr().err
    assert not (tmp_path / "d.db").exists()  # refused before anything started


PINNED = textwrap.dedent(
    """
    import json, multiprocessing, os, sys, threading
    from pathlib import Path
    from drawdown.affinity import pin_process, unpin_child

    def child_cpus():
        unpin_child()
        return sorted(os.sched_getaffinity(0))

    if __name__ == "__main__":
        cpu = int(sys.argv[1])
        started = threading.Event()
        before = threading.Thread(target=started.wait)  # a thread running before the pin
        before.start()
        before_pin = sorted(pin_process(cpu))
        after = threading.Thread(target=started.wait)  # and one started after it
        after.start()
        threads = {
            t.name: sorted(os.sched_getaffinity(int(t.name)))
            for t in Path("/proc/self/task").iterdir()
        }
        started.set()
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            child = pool.apply(child_cpus)
        print(json.dumps({"before": before_pin, "threads": threads, "child": child}))
    """
)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pinning is only observable with two CPUs or more to choose from",
)
def test_a_pinned_process_holds_every_thread_to_its_cpu_and_its_children_get_them_all_back(
    tmp_path: Path,
) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    script = tmp_path / "pinned.py"
    script.write_text(PINNED)
    env = {k: v for k, v in os.environ.items() if k != "DRAWDOWN_UNPINNED_CPUS"}
    out = subprocess.run(
        [sys.executable, str(script), str(allowed[-1])],
        capture_output=True, text=True, check=True, env=env, timeout=60,
    ).stdout  # fmt: skip
    seen = json.loads(out)
    assert seen["before"] == allowed
    assert len(seen["threads"]) >= 3
    assert set(map(tuple, seen["threads"].values())) == {(allowed[-1],)}
    assert seen["child"] == allowed


def test_the_writer_stays_home_for_lone_operations_and_spreads_while_batches_are_big() -> None:
    placed: list[frozenset[int]] = []
    placement = WriterPlacement(home=frozenset({0}), spread=frozenset({0, 1}))
    after_batch = placement.follower(placed.append)
    assert placed == [{0}]  # the thread is put at home first, whatever it inherited
    for _ in range(100):
        after_batch(1)  # one agent, one call at a time
    after_batch(12)
    assert placed == [{0}]  # one big batch among lone ones is not a load
    for _ in range(100):
        after_batch(2)  # a light load in between: no flapping
    assert placed == [{0}]
    after_batch(12)
    assert placed == [{0}, {0, 1}]
    for _ in range(100):
        after_batch(2)
        after_batch(12)
    assert placed == [{0}, {0, 1}]
    for _ in range(100):
        after_batch(1)
    assert placed == [{0}, {0, 1}, {0}]


def test_only_a_pinned_proxy_with_a_spare_cpu_places_its_writer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(WRITER_CPUS_ENV, raising=False)
    assert WriterPlacement.from_environment() is None  # not pinned
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {1})
    monkeypatch.setenv(WRITER_CPUS_ENV, "0-1")
    assert WriterPlacement.from_environment() == WriterPlacement(frozenset({1}), frozenset({0, 1}))
    monkeypatch.setenv(WRITER_CPUS_ENV, "1")  # every CPU has its worker
    assert WriterPlacement.from_environment() is None
    assert spare_cpus(1, [0, 1], {0, 1, 2, 3}) == {1, 2, 3}
    assert spare_cpus(0, [0], {0, 1}) == {0, 1}


class SlowBackend:
    """A ledger whose batches take 3 ms: operations queue up behind them, as under load."""

    def run_batch(self, calls: list[tuple[str, tuple[int, ...]]]) -> list[int]:
        time.sleep(0.003)
        return [args[0] for _, args in calls]


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="placement is only observable with two CPUs or more to choose from",
)
def test_a_real_writer_thread_moves_with_its_batches() -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    home = frozenset({min(allowed)})
    ledger = AsyncLedger(SlowBackend(), placement=WriterPlacement(home, allowed))
    writer = ledger._threads[0].native_id
    assert writer is not None

    async def one_at_a_time(count: int) -> None:
        for i in range(count):
            assert await ledger.call("echo", i) == i

    async def sixteen_at_once(rounds: int) -> None:
        for _ in range(rounds):
            await asyncio.gather(*(ledger.call("echo", i) for i in range(16)))

    try:
        asyncio.run(one_at_a_time(5))
        assert os.sched_getaffinity(writer) == home
        asyncio.run(sixteen_at_once(5))
        assert os.sched_getaffinity(writer) == allowed
        asyncio.run(one_at_a_time(30))
        assert os.sched_getaffinity(writer) == home
    finally:
        ledger.close()
