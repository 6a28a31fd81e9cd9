#!/usr/bin/env python
"""Where each proxy's time goes, per request: bare mitmdump and drawdown under the bench's load,
sampled with py-spy (run it with ./scripts/bench --profile).

For each concurrency, each proxy in turn gets the bench's load (a ~1,000-token chat completion,
3 budgets for drawdown) while py-spy samples its threads. Every sample of the event loop's
thread is put in one part of the work by its innermost frame that belongs to a known owner —
drawdown's meter, ledger hand-off, policy modules or hooks, mitmproxy's addon dispatch, its
addons, its proxy core — so the standard library's frames (json, asyncio, ssl) count for
whoever called them. Samples become milliseconds per request (samples / rate / requests
served), beside the scheduler's own count of the loop's CPU per request as a cross-check.
Other threads (drawdown's ledger writer, the thread pool) are listed by name.

py-spy samples without stopping the proxy (--nonblocking), so it costs the proxy little, and
counts only threads that are running (idle ones, waiting on epoll or a lock, are not samples).

With --instructions, each proxy instead runs under valgrind's callgrind and gets the same request
one at a time on one connection: the CPU instructions each of its threads executes per request,
exactly, whatever the machine. Beside the table above it tells work a proxy does from how fast
the machine does it (a thread that sleeps and wakes often runs its instructions slower).

    ./scripts/bench --profile [--seconds 8] [--rate 250] [--connections 1,16] [--json FILE]
    ./scripts/bench --profile --instructions [--requests 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/bench.py: the stand-in, the proxies, the load

# (part of the work, pattern on a frame's file): the first pattern a frame's file matches names
# its owner; frames of no owner (the standard library, native code) pass to their caller.
OWNERS: list[tuple[str, re.Pattern[str]]] = [
    ("drawdown: meter (tokens, prices, usage)", re.compile(r"drawdown/meter/")),
    ("drawdown: ledger hand-off (queue, wake-up)", re.compile(r"drawdown/ledger/")),
    (
        "drawdown: identity, classify, authority, budgets",
        re.compile(r"drawdown/(identity|classify|authority|budgets|money)\.py|drawdown/policy/"),
    ),
    (
        "addon dispatch (drawdown's master, mitmproxy's manager)",
        re.compile(r"drawdown/master\.py|mitmproxy/addonmanager\.py"),
    ),
    ("drawdown: hooks (addon.py and the rest)", re.compile(r"drawdown/")),
    ("mitmproxy's addons", re.compile(r"mitmproxy/addons/")),
    ("mitmproxy's proxy core (HTTP, connections, TLS)", re.compile(r"mitmproxy/")),
]
UNOWNED = "event loop and I/O (asyncio, sockets)"
# A sample whose innermost frame is the selector's: the loop was in epoll_wait and runnable, i.e.
# woken and not yet running Python (py-spy leaves out a thread that sleeps there).
SELECTOR = "woken in epoll_wait, not yet running"
# The frames that start the process and run the loop sit under every sample: owners of none.
ENTRY = re.compile(r"drawdown/(cli|__main__)\.py|mitmproxy/tools/|mitmproxy/master\.py")
LOOP_THREAD = "MainThread"

_FRAME_FILE = re.compile(r"\((.*?)(?::\d+)?\)$")


def owner(stack: Iterable[str]) -> str:
    """The part of the work a sample belongs to: its innermost frame (the stack runs from the
    thread's root to the leaf) whose file matches an owner."""
    frames = list(stack)
    files = [found.group(1) if (found := _FRAME_FILE.search(f)) else "" for f in frames]
    if files and files[-1].endswith("selectors.py"):
        return SELECTOR
    for file in reversed(files):
        if not file or ENTRY.search(file):
            continue
        for name, pattern in OWNERS:
            if pattern.search(file):
                return name
    return UNOWNED


def parse_raw(text: str) -> dict[str, Counter[str]]:
    """py-spy's `--format raw --threads` output (one `thread (tid): name;frame;…;frame count`
    line per distinct stack) as samples per part of the work, for each thread name (the loop's
    parts; the other threads' samples under their own names, numbers stripped)."""
    threads: dict[str, Counter[str]] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        name = thread.partition(": ")[2] or thread
        if name == LOOP_THREAD:
            threads.setdefault(name, Counter())[owner(frames)] += int(count)
        else:
            # drawdown-ledger-0, asyncio_3: one row per kind of thread, not per thread.
            kind = re.sub(r"[-_]\d+$", "", name)
            threads.setdefault("other threads", Counter())[kind] += int(count)
    return threads


def per_request(samples: Counter[str], rate: int, requests: float) -> dict[str, float]:
    """Samples of each part as milliseconds of that thread's time per request served."""
    return {part: count * 1000 / rate / requests for part, count in samples.items()}


def py_spy() -> str:
    found = shutil.which("py-spy") or str(bench.BIN / "py-spy")
    if not Path(found).exists():
        raise SystemExit("bench --profile: py-spy is not installed (pip install py-spy)")
    return found


def profiled(
    port: int, pid: int, up: int, body: bytes, connections: int, seconds: int, rate: int,
    workdir: Path,
) -> dict[str, Any]:  # fmt: skip
    """One load run of `seconds` while py-spy samples process `pid`: the run's figures and the
    samples per part of the work, per thread."""
    out = workdir / f"spy-{pid}-{connections}.txt"
    spy = subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--nonblocking", "--threads", "--format", "raw",
         "--rate", str(rate), "--duration", str(seconds + 1), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.5)  # py-spy attaches in well under a second; the load starts once it has
    before = loop_counters(pid)
    result = bench.measured(port, [pid], up, body, connections, seconds, workdir)
    after = loop_counters(pid)
    _, err = spy.communicate(timeout=seconds + 30)
    if spy.returncode != 0 or not out.exists():
        raise SystemExit(f"bench --profile: py-spy failed: {err.strip()[-300:]}")
    result["samples"] = parse_raw(out.read_text())
    served = max(result["requests"], 1)
    ms_per_tick = 1000 / os.sysconf("SC_CLK_TCK") / served
    result["loop_user_ms"] = (after[0] - before[0]) * ms_per_tick
    result["loop_kernel_ms"] = (after[1] - before[1]) * ms_per_tick
    result["loop_sleeps"] = (after[2] - before[2]) / served
    return result


def loop_counters(pid: int) -> tuple[int, int, int]:
    """The event loop's thread (the main thread): clock ticks run in user mode and in the kernel
    (its system calls: sockets, epoll, futexes), and how many times it went to sleep (voluntary
    context switches: waiting on epoll, the GIL or a lock), from /proc/PID/task/PID."""
    task = Path(f"/proc/{pid}/task/{pid}")
    stat = (task / "stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    sleeps = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", (task / "status").read_text(), re.M)
    return int(fields[11]), int(fields[12]), int(sleeps.group(1)) if sleeps else 0


def table(runs: dict[str, dict[str, Any]], rate: int) -> list[str]:
    """Lines of the per-request table: one row per part of the work, one column per proxy."""
    per_thread = {
        label: {
            thread: per_request(run["samples"].get(thread, Counter()), rate, run["requests"])
            for thread in (LOOP_THREAD, "other threads")
        }
        for label, run in runs.items()
    }
    loops = {label: threads[LOOP_THREAD] for label, threads in per_thread.items()}
    others = {label: threads["other threads"] for label, threads in per_thread.items()}
    parts = [name for name, _ in OWNERS] + [UNOWNED, SELECTOR]
    width = max(len(p) for p in parts) + 2

    def row(name: str, values: Iterable[float], fmt: str = ".3f") -> str:
        return f"  {name:<{width}}" + "".join(f"{value:>12{fmt}}" for value in values)

    lines = [
        f"  {'event loop thread, ms per request':<{width}}" + "".join(f"{lab:>12}" for lab in runs)
    ]
    lines += [
        row(part, (loops[lab].get(part, 0.0) for lab in runs))
        for part in parts
        if any(loops[lab].get(part) for lab in runs)
    ]
    lines.append(row("all of the loop, sampled", (sum(loops[lab].values()) for lab in runs)))
    lines.append(row("the loop on a CPU (schedstat)", (runs[lab]["cpu_ms_loop"] for lab in runs)))
    for name, key in (
        ("  in user mode (ticks)", "loop_user_ms"),
        ("  in the kernel (ticks)", "loop_kernel_ms"),
    ):
        lines.append(row(name, (runs[lab][key] for lab in runs)))
    lines.append(row("  times it went to sleep", (runs[lab]["loop_sleeps"] for lab in runs), ".2f"))
    for kind in sorted({kind for lab in runs for kind in others[lab]}):
        lines.append(row(f"thread {kind}", (others[lab].get(kind, 0.0) for lab in runs)))
    lines.append(row("req/s", (runs[lab]["rps"] for lab in runs), ".0f"))
    return lines


def keep_alive_requests(port: int, up: int, body: bytes, count: int) -> None:
    """The bench's request as wrk sends it, `count` times, one after another on one connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        for _ in range(count):
            url = f"http://127.0.0.1:{up}/v1/chat/completions"
            connection.request("POST", url, body, {**bench.WRK_HEADERS, "Host": f"127.0.0.1:{up}"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"bench --profile: the proxy answered {response.status}")
    finally:
        connection.close()


def callgrind_totals(out: Path, dump: int = 1) -> dict[int, int]:
    """Instructions by thread number (1: the main thread, the event loop) in callgrind's dump
    number `dump` of a run with --separate-threads (one file per thread: OUT.DUMP-THREAD)."""
    totals: dict[int, int] = {}
    for file in out.parent.glob(f"{out.name}.{dump}-*"):
        thread = int(file.name.rsplit("-", 1)[1])
        for line in file.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                totals[thread] = int(line.split()[1])
                break
    return totals


def wait_until_idle(pid: int, settle: float = 1.0, timeout: float = 120.0) -> None:
    """Until the process is idle (under 5 % of a CPU) for `settle` seconds: start-up work a
    proxy does on threads of its own (price data and encodings loading, ~10^8 instructions)
    may still run after the warm-up under callgrind on a slow VM (a CI run counted 28 million
    instructions a request on them, against ~1 million), and must not land in the count."""
    deadline = time.monotonic() + timeout
    before = sum(bench.thread_cpu_seconds(pid))
    while time.monotonic() < deadline:
        time.sleep(settle)
        now = sum(bench.thread_cpu_seconds(pid))
        if now - before < 0.05 * settle:  # timers and heartbeats only: idle
            return
        before = now


def counted(
    kind: str, workdir: Path, up: int, body: bytes, requests: int, warm_up: int
) -> dict[str, float]:
    """Instructions per request of one proxy's event loop and of its other threads: the proxy
    under callgrind, its counters zeroed after `warm_up` requests and dumped after `requests`
    more (so start-up, imports and first-request work are left out)."""
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise SystemExit("bench --profile --instructions: valgrind is not installed")
    port = bench.free_port()
    cmd, _ = bench.proxy_command(kind, workdir, up, port)
    out = workdir / f"callgrind-{kind}.out"
    proc = subprocess.Popen(
        [valgrind, "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
         sys.executable, *cmd],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        bench.wait_listening(port, proc, 1, seconds=600)  # imports run ~50× slower under valgrind
        keep_alive_requests(port, up, body, warm_up)
        wait_until_idle(proc.pid)
        subprocess.run([control, "--zero", str(proc.pid)], check=True, capture_output=True)
        keep_alive_requests(port, up, body, requests)
        subprocess.run([control, "--dump", str(proc.pid)], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while 1 not in (totals := callgrind_totals(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        bench._stop([proc])
    if 1 not in totals:
        raise SystemExit(f"bench --profile --instructions: callgrind wrote no dump for {kind}")
    loop = totals.pop(1)
    return {"loop": loop / requests, "other threads": sum(totals.values()) / requests}


def instructions_table(counts: dict[str, dict[str, float]]) -> list[str]:
    width = 28
    lines = [f"  {'instructions per request':<{width}}" + "".join(f"{lab:>14}" for lab in counts)]
    for part, name in (("loop", "event loop thread"), ("other threads", "other threads")):
        values = "".join(f"{counts[lab][part]:>14,.0f}" for lab in counts)
        lines.append(f"  {name:<{width}}" + values)
    return lines


def count_main(body: bytes, requests: int, json_file: str | None) -> int:
    warm_up = 100
    figures: dict[str, Any] = {"machine": bench.machine(), "requests": requests, "counts": {}}
    print(f"drawdown bench --profile --instructions — {figures['machine']}")
    print(f"callgrind, {requests} requests one at a time on one connection, after {warm_up}\n")
    with tempfile.TemporaryDirectory(prefix="drawdown-profile-") as tmp, bench.upstream() as up:
        workdir = Path(tmp)
        bench._ensure_cas(workdir)
        for kind in ("bare", "drawdown"):
            figures["counts"][kind] = counted(kind, workdir, up, body, requests, warm_up)
    print("\n".join(instructions_table(figures["counts"])))
    if json_file:
        Path(json_file).write_text(json.dumps(figures, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench --profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--connections", default="1,16", help="concurrencies, comma-separated")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per request (callgrind)"
    )
    parser.add_argument("--requests", type=int, default=300, help="counted, with --instructions")
    args = parser.parse_args(argv)
    body = bench.prompt_body(1000)
    if args.instructions:
        return count_main(body, args.requests, args.json)
    concurrencies = [int(c) for c in args.connections.split(",")]
    py_spy()
    figures: dict[str, Any] = {"machine": bench.machine(), "rate": args.rate, "runs": {}}
    print(f"drawdown bench --profile — {figures['machine']}")
    print(f"py-spy at {args.rate} Hz, {args.seconds} s per proxy and concurrency\n")
    with tempfile.TemporaryDirectory(prefix="drawdown-profile-") as tmp, bench.upstream() as up:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            proxies = {
                kind: stack.enter_context(bench.proxy(kind, workdir, up))
                for kind in ("bare", "drawdown")
            }
            for connections in concurrencies:
                for port, _ in proxies.values():
                    bench.load(port, up, body, connections, bench.WARM_UP_SECONDS, workdir)
                runs = {
                    kind: profiled(port, proc.pid, up, body, connections, args.seconds, args.rate, workdir)
                    for kind, (port, proc) in proxies.items()
                }  # fmt: skip
                print(f"c={connections}")
                print("\n".join(table(runs, args.rate)) + "\n")
                figures["runs"][f"c{connections}"] = runs
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
