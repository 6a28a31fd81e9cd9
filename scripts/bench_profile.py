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

    ./scripts/bench --profile [--seconds 8] [--rate 250] [--connections 1,16] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
    result = bench.measured(port, [pid], up, body, connections, seconds, workdir)
    _, err = spy.communicate(timeout=seconds + 30)
    if spy.returncode != 0 or not out.exists():
        raise SystemExit(f"bench --profile: py-spy failed: {err.strip()[-300:]}")
    result["samples"] = parse_raw(out.read_text())
    return result


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
    for kind in sorted({kind for lab in runs for kind in others[lab]}):
        lines.append(row(f"thread {kind}", (others[lab].get(kind, 0.0) for lab in runs)))
    lines.append(row("req/s", (runs[lab]["rps"] for lab in runs), ".0f"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench --profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--connections", default="1,16", help="concurrencies, comma-separated")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.connections.split(",")]
    py_spy()
    body = bench.prompt_body(1000)
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
