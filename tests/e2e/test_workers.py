"""`drawdown run --workers N`: several processes on one listen address, one ledger, one truth."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.procfs import children_of, threads_of
from tests.support.proxy import DrawdownProcess
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

POLICY = """
identity:
  agent: [{header: X-Drawdown-Agent}]
  run: [{idle_split: 300}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*/run:*", requests: 10}
"""


def test_workers_share_the_address_the_ledger_and_the_agents_run(
    drawdown_proxy: Callable[..., DrawdownProcess], standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY, extra_args=["--workers", "2"])
    statuses = []
    for _ in range(16):  # a fresh connection each time: the kernel spreads them over the workers
        with proxy.openai_client(
            default_headers={"X-Drawdown-Agent": "unmodified"}, max_retries=0
        ) as client:
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
    assert statuses.count(200) == 10 and statuses.count(402) == 6
    assert standin.count("/v1/chat/completions") == 10
    # Both workers served, yet the agent kept one idle-split run: it was minted in the ledger.
    assert proxy.query("SELECT COUNT(DISTINCT process_id) FROM holds") == [(2,)]
    assert len(proxy.query("SELECT DISTINCT run FROM decisions")) == 1
    proxy.stop()  # SIGTERM reaches every worker; all exit cleanly


def policies_of_threads(pid: int) -> dict[int, int]:
    return {tid: os.sched_getscheduler(tid) for tid in threads_of(pid)}


def writer_policies(pid: int) -> list[int]:
    """The scheduling policy of each thread but the main one (the event loop)."""
    policies = policies_of_threads(pid)
    assert policies.pop(pid) == os.SCHED_OTHER
    return list(policies.values())


def ask_once(proxy: DrawdownProcess) -> None:
    with proxy.openai_client(default_headers={"X-Drawdown-Agent": "a"}, max_retries=0) as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_workers_on_every_cpu_have_ledger_writers_that_wait_for_their_loops(
    drawdown_proxy: Callable[..., DrawdownProcess], standin: StandIn
) -> None:
    """A worker per CPU: each writer is woken beside a busy event loop, and preempting it cut
    its batches to 2–3 operations (ledger/worker.py). Each writer runs under SCHED_BATCH; the
    event loop, every other thread and the supervisor keep the normal policy."""
    workers = max(2, len(os.sched_getaffinity(0)))
    proxy = drawdown_proxy(POLICY, extra_args=["--workers", str(workers)])
    ask_once(proxy)
    pids = sorted(children_of(proxy.pid))
    assert len(pids) == workers
    for pid in pids:
        assert writer_policies(pid).count(os.SCHED_BATCH) == 1  # the one SQLite writer
    assert set(policies_of_threads(proxy.pid).values()) == {os.SCHED_OTHER}
    proxy.stop()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_a_user_can_keep_the_normal_policy_for_workers_on_every_cpu(
    drawdown_proxy: Callable[..., DrawdownProcess], standin: StandIn
) -> None:
    """The user's `--set drawdown_batch_writer=false` reaches the workers, and only it
    (mitmproxy refuses an option given twice: the workers would not start)."""
    workers = max(2, len(os.sched_getaffinity(0)))
    proxy = drawdown_proxy(
        POLICY, extra_args=["--workers", str(workers), "--set", "drawdown_batch_writer=false"]
    )
    ask_once(proxy)
    pids = sorted(children_of(proxy.pid))
    assert len(pids) == workers
    for pid in pids:
        assert set(writer_policies(pid)) == {os.SCHED_OTHER}
    proxy.stop()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_one_process_keeps_a_writer_that_preempts(
    drawdown_proxy: Callable[..., DrawdownProcess], standin: StandIn
) -> None:
    """With a CPU to spare the writer starts there at once; beside the tokenizer process or
    another program, it must preempt them for the requests it answers."""
    proxy = drawdown_proxy(POLICY)
    ask_once(proxy)
    assert set(writer_policies(proxy.pid)) == {os.SCHED_OTHER}
    proxy.stop()


@pytest.mark.parametrize("victim", [0, 1])
def test_a_worker_that_dies_stops_the_others_and_the_supervisor_fails(
    drawdown_proxy: Callable[..., DrawdownProcess], standin: StandIn, victim: int
) -> None:
    """Killing worker 2 once went unnoticed (the supervisor waited on worker 1 alone, which
    served on, half-staffed), and either death ended in exit status 0, which no service
    manager restarts."""
    proxy = drawdown_proxy(POLICY, extra_args=["--workers", "2"])
    ask_once(proxy)
    pids = sorted(children_of(proxy.pid))
    assert len(pids) == 2
    os.kill(pids[victim], signal.SIGKILL)
    proxy.wait_for_log(r"drawdown: worker \d was killed by SIGKILL; stopping the others")
    assert proxy.stop(check=False) == 128 + signal.SIGKILL
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def test_workers_stop_when_their_supervisor_is_killed(
    drawdown_proxy: Callable[..., DrawdownProcess], standin: StandIn
) -> None:
    """A supervisor killed with SIGKILL once left both workers holding the port, orphaned."""
    proxy = drawdown_proxy(POLICY, extra_args=["--workers", "2"])
    ask_once(proxy)
    pids = children_of(proxy.pid)
    assert len(pids) == 2
    proxy.kill()
    deadline = time.monotonic() + 30
    while [pid for pid in pids if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)]
    with socket.socket() as sock:  # and the port is free again
        sock.bind(proxy.address)


def _alive(pid: int) -> bool:
    """Running, not a zombie: the workers' parent is gone, so PID 1 reaps them."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_signalled_again_while_they_stop_still_exit_cleanly(
    drawdown_proxy: Callable[..., DrawdownProcess], standin: StandIn
) -> None:
    """A second SIGTERM reaching a worker after its event loop had closed (the signal handlers
    gone) killed it outright, and the supervisor exited 143. It happens whenever a stop signal
    reaches a worker twice: a service manager signalling the whole group, or Ctrl-C in a
    terminal (SIGINT to every process, then the supervisor's SIGTERM)."""
    proxy = drawdown_proxy(POLICY, extra_args=["--workers", "2"])
    ask_once(proxy)
    assert proxy.pid is not None
    workers = [os.pidfd_open(pid) for pid in children_of(proxy.pid)]  # pids that cannot be reused
    try:
        os.kill(proxy.pid, signal.SIGTERM)
        ended: set[int] = set()
        while len(ended) < len(workers):  # through the whole shutdown, to the last instant
            for pidfd in set(workers) - ended:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                except ProcessLookupError:
                    ended.add(pidfd)
            time.sleep(0.001)
        assert proxy.stop() == 0
    finally:
        for pidfd in workers:
            os.close(pidfd)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_workers_stopped_while_they_are_being_started_all_stop_with_their_supervisor(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    """A stop signal that came while the supervisor was still starting its workers found it
    without its handlers: SIGTERM killed it (status 143, its metrics folder left behind),
    Ctrl-C ended it at once, and either way the workers already started ran on without it."""
    supervisor = _start_supervisor(tmp_path, "--workers", "6")
    started: set[int] = set()
    while not started and supervisor.poll() is None:  # the first worker: the others are to come
        started = children_of(supervisor.pid)
    supervisor.send_signal(stop_signal)
    output, _ = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0, output
    assert "Traceback" not in output and "did not start" not in output, output
    assert started and not [pid for pid in started if _alive(pid)], output
    assert not list(tmp_path.glob("drawdown-metrics-*")), output


@pytest.mark.parametrize("held_to_one", ["by its affinity", "by --cpu-affinity"])
def test_more_workers_than_cpus_are_started_with_a_word_of_warning(
    tmp_path: Path, held_to_one: str
) -> None:
    """`--workers 1000` on two CPUs started a thousand event loops without a word."""
    one = min(os.sched_getaffinity(0))
    if held_to_one == "by its affinity":
        supervisor = _start_supervisor(
            tmp_path, "--workers", "2", preexec_fn=lambda: os.sched_setaffinity(0, {one})
        )
    else:
        supervisor = _start_supervisor(tmp_path, "--workers", "2", "--cpu-affinity", str(one))
    assert supervisor.stdout is not None
    said = [next(supervisor.stdout)]
    while not said[-1].startswith("drawdown listening on"):
        said.append(next(supervisor.stdout))
    supervisor.send_signal(signal.SIGTERM)
    output = "".join(said) + supervisor.communicate(timeout=60)[0]
    assert supervisor.returncode == 0, output
    assert said[0] == (
        "drawdown: 2 workers on 1 CPU: workers beyond one a CPU add contention, not throughput\n"
    ), output


def _start_supervisor(tmp_path: Path, *args: str, **popen: Any) -> subprocess.Popen[str]:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    return subprocess.Popen(
        [sys.executable, "-m", "drawdown", "run", "--policy", str(policy),
         "--db", str(tmp_path / "w.db"), "--confdir", str(tmp_path / "c"),
         "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # where its metrics folder goes
        **popen,
    )  # fmt: skip
