"""`drawdown run --workers N`: N proxy processes on one listen address, one ledger.

mitmproxy serves from one event loop in one process. To use more cores, the supervisor
starts N `drawdown run` workers that all bind the same HOST:PORT with SO_REUSEPORT (the
kernel spreads connections over them) and share the ledger, whose reserve is atomic across
processes. Idle-split runs are minted in the ledger (drawdown_shared_runs) so an agent whose
connections land on different workers keeps one run. The supervisor prints the usual
`drawdown listening on …` line once every worker accepts connections, relays their logs, and
passes SIGTERM/SIGINT/SIGHUP on (as SIGTERM); a second one, as STOP_NOW.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .affinity import writer_environment
from .metrics import MULTIPROCESS_ENV

REUSE_PORT_ENV = "DRAWDOWN_REUSE_PORT"
# A worker's cue from its supervisor that the user will not wait for the drain. Not a second
# SIGTERM: a service manager that signals every process of the service (systemd's default
# KillMode=control-group) reaches each worker directly as well as through the supervisor, and
# two SIGTERMs would cut the calls in flight the drain is there to let finish.
STOP_NOW = signal.SIGUSR2


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops `drawdown run`, a worker or the supervisor cleanly. SIGHUP too: a closed
    terminal's hangup killed the proxy outright, its holds left to lapse and the streams it cut
    uncharged (policy edits need no signal: they are watched). Unless it is ignored, as under
    `nohup`, whose whole point is to outlive the terminal."""
    wanted = [signal.SIGINT, signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        wanted.append(hangup)
    return tuple(wanted)


def exit_with_supervisor(supervisor_pid: int) -> None:
    """In a worker: get SIGTERM (a clean stop, holds released) when the supervisor dies, even
    by SIGKILL; an orphaned worker would hold the port with no one to stop it (Linux only)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor_pid:  # it died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def enable_reuse_port() -> None:
    """In a worker: make mitmproxy's listening sockets SO_REUSEPORT (mitmproxy has no option for it)."""
    import asyncio

    start_server = asyncio.start_server

    async def reusing(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("reuse_port", True)
        return await start_server(*args, **kwargs)

    asyncio.start_server = reusing  # type: ignore[assignment]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share)."""
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ) or 1


def takes_every_cpu(workers: int, available: int | None = None) -> bool:
    """Whether `workers` event loops keep every CPU this process may use busy. Then each ledger
    writer is woken beside a busy loop and runs under SCHED_BATCH (ledger/worker.py says why);
    with a CPU to spare it starts there at once, and keeps the normal policy."""
    return workers >= (usable_cpus() if available is None else available)


def worker_command(worker_args: Sequence[str], workers: int, listen: str) -> list[str]:
    """One worker's command line: the user's arguments, what every worker must have, and the
    batch writer where the workers take every CPU, unless the user set it (mitmproxy refuses an
    option given twice)."""
    user_sets = {
        value.split("=", 1)[0].strip()
        for flag, value in itertools.pairwise(worker_args)
        if flag == "--set"
    }
    batch = takes_every_cpu(workers) and "drawdown_batch_writer" not in user_sets
    return [
        sys.executable, "-m", "drawdown", "run", *worker_args,
        "--listen", listen, "--set", "drawdown_shared_runs=true",
        *(["--set", "drawdown_batch_writer=true"] if batch else []),
    ]  # fmt: skip


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def supervise(
    worker_args: Sequence[str],
    workers: int,
    host: str,
    port: int,
    confdir: str,
    cpus: Sequence[int] | None = None,
) -> int:
    """Run `workers` copies of `drawdown run <worker_args> --listen host:port` until signalled;
    with `cpus`, worker i is pinned to cpus[i] (`--cpu-affinity`)."""
    # With --cpu-affinity, the CPUs they are pinned to (fewer than the workers: they share)
    available = len(set(cpus)) if cpus else usable_cpus()
    if workers > available:
        # Accepted (a share of CPUs can grow under a running proxy), but said: a worker is one
        # event loop, busy on one CPU under load; more loops than CPUs take turns on them.
        print(
            f"drawdown: {workers} workers on {available} CPU{'s' if available > 1 else ''}: "
            "workers beyond one a CPU add contention, not throughput",
            file=sys.stderr,
            flush=True,
        )
    # The workers' metrics, in files any of them reads for a scrape; theirs alone, and gone
    # with them (counters restart with the proxy, as one process's do).
    remove_orphaned_metrics()
    metrics_dir = tempfile.mkdtemp(prefix=METRICS_PREFIX)
    with open(os.path.join(metrics_dir, METRICS_LOCK), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while the folder is in use
        try:
            return _supervise(worker_args, workers, host, port, cpus, metrics_dir)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)


METRICS_PREFIX = "drawdown-metrics-"
METRICS_LOCK = ".supervisor.lock"
# A folder this young may be another supervisor's that has not taken its lock yet.
ORPHAN_AFTER_SECONDS = 60.0


def remove_orphaned_metrics(folder: str | None = None) -> None:
    """The metrics folders of supervisors killed before they could remove theirs (SIGKILL,
    the OOM killer): those whose lock no process holds. A lock, not a pid: a /tmp shared
    between containers sees other namespaces' supervisors as pids that do not exist."""
    now = time.time()
    for path in Path(folder or tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*"):
        try:
            if now - path.stat().st_mtime < ORPHAN_AFTER_SECONDS:
                continue
            with open(path / METRICS_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # held (alive), another user's, or gone meanwhile
            continue


def _supervise(
    worker_args: Sequence[str],
    workers: int,
    host: str,
    port: int,
    cpus: Sequence[int] | None,
    metrics_dir: str,
) -> int:
    port = port or _free_port(host)
    shown = f"[{host}]" if ":" in host else host
    command = worker_command(worker_args, workers, f"{shown}:{port}")
    env = {
        **os.environ,
        REUSE_PORT_ENV: str(os.getpid()),  # the supervisor, for its workers
        MULTIPROCESS_ENV: metrics_dir,
    }

    def spawn(i: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*command, *(["--cpu-affinity", str(cpus[i])] if cpus else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**env, **writer_environment(cpus[i], cpus)} if cpus else env,
            # Out of the terminal's process group: Ctrl-C reaches the supervisor alone, which
            # relays it, so a worker counts one stop request, not two (a second one means "now").
            process_group=0,
        )

    # The stop signals are ours before the first worker starts: stopped while starting them, the
    # supervisor died of SIGTERM (or Ctrl-C) leaving those started orphaned, its metrics
    # folder behind, and starts no more.
    procs: list[subprocess.Popen[str]] = []
    signalled: set[int] = set()

    def stop(*_: object) -> None:
        # Once each (a worker drains once however often it is told to stop; STOP_NOW ends it).
        for proc in procs:
            if proc.pid not in signalled and proc.poll() is None:
                signalled.add(proc.pid)
                proc.send_signal(signal.SIGTERM)

    asked_to_stop = threading.Event()

    def on_signal(*_: object) -> None:
        if not asked_to_stop.is_set():
            asked_to_stop.set()
            stop()
            return
        for proc in procs:  # asked again: the user will not wait for the drain
            if proc.poll() is None:
                proc.send_signal(STOP_NOW)

    handled = stop_signals()
    for sig in handled:
        signal.signal(sig, on_signal)

    for i in range(workers):
        if asked_to_stop.is_set():
            break
        procs.append(spawn(i))
    if asked_to_stop.is_set():
        stop()  # a signal that came while a worker was being started did not find it in `procs`
    ready = threading.Semaphore(0)
    announced = threading.Event()

    def relay(index: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("drawdown listening on "):
                ready.release()
                continue
            print(f"[worker {index}] {line}", end="", flush=True)

    threads = [
        threading.Thread(target=relay, args=(i + 1, p), daemon=True) for i, p in enumerate(procs)
    ]
    for thread in threads:
        thread.start()

    def announce() -> None:
        for _ in procs:
            ready.acquire()
        announced.set()
        print(f"drawdown listening on http://{shown}:{port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    # Whichever worker ends first (crash, kill, or our SIGTERM), stop the others rather than
    # serve half-staffed. Waiting on one in particular would miss the others' deaths.
    one_ended = threading.Event()
    for proc in procs:
        threading.Thread(target=lambda p=proc: (p.wait(), one_ended.set()), daemon=True).start()
    while procs and not one_ended.wait(0.5):  # a timeout, so signal handlers run promptly
        pass
    if not asked_to_stop.is_set():
        for index, proc in enumerate(procs, 1):
            if proc.poll() is not None:
                print(
                    f"drawdown: worker {index} {_ended(proc.returncode)}; stopping the others",
                    file=sys.stderr,
                    flush=True,
                )
    stop()
    codes = [proc.wait() for proc in procs]
    for sig in handled:  # stopped: a late signal must not kill us now
        signal.signal(sig, signal.SIG_IGN)
    for thread in threads:
        thread.join(5)
    if not announced.is_set() and not asked_to_stop.is_set():
        print("drawdown: the workers did not start", file=sys.stderr)
    # A second stop signal can reach a worker after its loop closed: by then its holds are
    # released and its ledger closed, so dying of it is a clean stop, not a failure.
    ended_by_stop = {-signal.SIGTERM, -signal.SIGINT, -STOP_NOW}
    failed = [
        code
        for proc, code in zip(procs, codes, strict=True)
        if code != 0 and not (proc.pid in signalled and code in ended_by_stop)
    ]
    if not failed and not asked_to_stop.is_set():
        return 1  # a worker ended on its own: never a clean stop for a service manager
    # A worker killed by signal N exits 128 + N, as a shell reports it.
    return 0 if not failed else (128 - failed[0] if failed[0] < 0 else failed[0])


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
