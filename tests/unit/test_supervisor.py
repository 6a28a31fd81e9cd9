"""The `--workers` supervisor's start-up duties, without starting a proxy."""

import fcntl
import os
import time
from pathlib import Path

import pytest
from drawdown.workers import (
    METRICS_LOCK,
    METRICS_PREFIX,
    remove_orphaned_metrics,
    takes_every_cpu,
    worker_command,
)


def test_workers_that_take_every_cpu_get_writers_that_wait_for_their_loops() -> None:
    assert takes_every_cpu(2, available=2) and takes_every_cpu(3, available=2)
    assert not takes_every_cpu(2, available=4)  # a writer wakes on a spare CPU at once
    assert not takes_every_cpu(1, available=2)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux's CPU sets")
def test_the_cpus_counted_are_the_ones_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {2, 3})  # a cpuset of 2 on a big host
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert takes_every_cpu(2) and not takes_every_cpu(1)


def test_a_user_can_keep_the_normal_policy_for_workers_on_every_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The supervisor adds its `--set` only where the user gave none: mitmproxy refuses an
    option given twice, and the worker would not start."""

    def sets(command: list[str]) -> list[str]:
        return [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    chosen = ["--policy", "p.yaml", "--set", "drawdown_batch_writer=false"]
    assert sets(worker_command(chosen, 2, "127.0.0.1:8080")) == [
        "drawdown_batch_writer=false",
        "drawdown_shared_runs=true",
    ]
    assert sets(worker_command(["--policy", "p.yaml"], 2, "127.0.0.1:8080")) == [
        "drawdown_shared_runs=true",
        "drawdown_batch_writer=true",
    ]
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    assert sets(worker_command([], 2, "127.0.0.1:8080")) == ["drawdown_shared_runs=true"]


def test_a_hangup_stops_the_proxy_unless_it_runs_under_nohup() -> None:
    """SIGHUP is a clean stop (a closed terminal killed the proxy outright); but `nohup`
    ignores it so that the proxy outlives the terminal, and that choice is kept."""
    import signal

    from drawdown.workers import stop_signals

    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert set(stop_signals()) == {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
        assert set(stop_signals()) == {signal.SIGINT, signal.SIGTERM}
    finally:
        signal.signal(signal.SIGHUP, before)


def test_metrics_folders_of_killed_supervisors_are_removed_and_live_ones_kept(
    tmp_path: Path,
) -> None:
    """A supervisor killed by SIGKILL leaves its workers' metrics folder behind: the next one
    removes the folders whose lock no process holds, old enough to have been locked."""

    def folder(name: str, age: float) -> Path:
        made = tmp_path / f"{METRICS_PREFIX}{name}"
        made.mkdir()
        (made / "counter_123.db").write_bytes(b"\0" * 16)
        (made / METRICS_LOCK).touch()
        then = time.time() - age
        os.utime(made, (then, then))
        return made

    orphan = folder("orphan", age=3600)
    live = folder("live", age=3600)
    young = folder("young", age=1)  # a supervisor's, between making it and locking it
    other = tmp_path / "someone-else"
    other.mkdir()
    with open(live / METRICS_LOCK) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # its supervisor runs
        remove_orphaned_metrics(str(tmp_path))
    assert not orphan.exists()
    assert live.exists() and young.exists() and other.exists()
