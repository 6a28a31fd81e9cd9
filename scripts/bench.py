#!/usr/bin/env python
"""drawdown vs bare mitmproxy, side by side on this machine (run it with ./scripts/bench).

Starts a fast local stand-in upstream (plain HTTP, so both proxies pay the same nothing for
upstream TLS), bare `mitmdump -q` and `drawdown run` (enforce mode, an OpenAI chat request with
a ~1,000-token prompt, 3 matching budget instances, tiktoken estimate, reserve, forward, commit),
drives each with the same load (wrk when installed, else a Python load generator), and prints
req/s and p50/p99 with the ratios, then the ledger, big-prompt, streaming, memory and worker
figures. Nothing here asserts anything: speed belongs in numbers, not in tests.

drawdown's throughput and latency, and its `--workers 2`, are measured twice: as it starts by
default and with `--cpu-affinity auto` (each process, its event loop and ledger writer, on one
CPU; addon/drawdown/affinity.py says why).

The scheduler places the proxies and the load. `--split` runs the throughput and latency rounds
with each proxy on one CPU and the load on the others, as a server is often benched on one
machine; the other figures always run on every CPU (drawdown's tokenizer process needs one).

    ./scripts/bench [--seconds 4] [--rounds 5] [--quick] [--split] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "scripts") not in sys.path:  # its sibling writer_probe.py, as a module
    sys.path.insert(0, str(ROOT / "scripts"))
BIN = Path(sys.executable).parent

RESPONSE = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1040, "completion_tokens": 2, "total_tokens": 1042},
    }
).encode()
SSE_EVENTS = 20


def prompt_body(words: int, max_tokens: int = 50) -> bytes:
    sentence = "The quick brown fox jumps over the lazy dog while the agent keeps on searching. "
    text = (sentence * (words // 15 + 1))[: words * 6]  # ≈ 1.07 tokens per "word" here
    return json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are a helpful agent."},
                {"role": "user", "content": text},
            ],
            "max_tokens": max_tokens,
        }
    ).encode()


# --- the stand-in upstream ----------------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1")
            length = (
                int(m.group(1)) if (m := re.search(r"(?im)^content-length:\s*(\d+)", head)) else 0
            )
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            if b'"stream": true' in body or b'"stream":true' in body:
                asyncio.get_running_loop().create_task(self._stream())
            else:
                self.transport.write(  # type: ignore[attr-defined]
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(RESPONSE), RESPONSE)
                )

    async def _stream(self) -> None:
        write = self.transport.write  # type: ignore[attr-defined]
        write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for i in range(SSE_EVENTS):
            chunk = (
                b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
                b'"choices":[{"index":0,"delta":{"content":"w%d "},"finish_reason":null}],"usage":null}\n\n'
                % i
            )
            write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await asyncio.sleep(0.005)
        tail = (
            b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],'
            b'"usage":{"prompt_tokens":1040,"completion_tokens":20,"total_tokens":1060}}\n\ndata: [DONE]\n\n'
        )
        write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))


_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def _unbound_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port() -> int:
    """A port free now and not handed out before by this bench. Proxies started side by side
    each take one and bind it only a second or more later (mitmproxy's import): the kernel
    could give a port one of them had not bound yet to another, which then refused it as in
    use (`drawdown run` exits 2)."""
    with _HANDED_OUT_LOCK:
        while True:
            port = _unbound_port()
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


def _serve_upstream(port: int) -> None:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(loop.create_server(_Upstream, "127.0.0.1", port, backlog=1024))
    loop.run_forever()


UPSTREAM_PIDS: list[int] = []  # the stand-in's process, for `cpus_apart`


@contextmanager
def upstream() -> Iterator[int]:
    """The stand-in in a process of its own, so it never competes with the bench for the GIL."""
    import multiprocessing

    port = free_port()
    proc = multiprocessing.get_context("fork").Process(
        target=_serve_upstream, args=(port,), daemon=True
    )
    proc.start()
    assert proc.pid is not None
    UPSTREAM_PIDS.append(proc.pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.05)
    try:
        yield port
    finally:
        UPSTREAM_PIDS.remove(proc.pid)
        proc.terminate()
        proc.join(5)


# --- where each side runs -----------------------------------------------------------------------


class Split:
    """The proxy under test on one CPU, the load (wrk or the Python generator, and the stand-in
    upstream) on the others, as a server is often benched on one machine. Left to the
    scheduler on two vCPUs, a proxy's threads land beside wrk in some rounds and not in others;
    this takes that placement out of a comparison (not the VM's own drift, benchmarks/HISTORY.md). It
    also puts drawdown's ledger writer on its loop's CPU, which helps c=1 and costs c=16."""

    def __init__(self) -> None:
        available = sorted(os.sched_getaffinity(0))
        self.proxy = available[:1]
        self.load = available[1:]

    @staticmethod
    def possible() -> bool:
        return len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None

    def describe(self) -> str:
        return (
            f"proxy on CPU {_cpu_list(self.proxy)}, load and upstream on CPU {_cpu_list(self.load)}"
        )


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def _pin_tree(pid: int, cpus: set[int]) -> None:
    """Every thread of a process (new threads inherit from the one that starts them)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


@contextmanager
def cpus_apart(split: Split | None) -> Iterator[None]:
    """Run the bench itself (its Python load generator, the wrk it starts) and the stand-in on the
    load's CPUs for the duration; everything back on every CPU afterwards."""
    if split is None:
        yield
        return
    everything = os.sched_getaffinity(0)
    for pid in (os.getpid(), *UPSTREAM_PIDS):
        _pin_tree(pid, set(split.load))
    try:
        yield
    finally:
        for pid in (os.getpid(), *UPSTREAM_PIDS):
            _pin_tree(pid, everything)


# --- the proxies ------------------------------------------------------------------------------


def proxy_command(
    kind: str, workdir: Path, upstream_port: int, port: int, extra: list[str] | None = None,
    processes: int = 1,
) -> tuple[list[str], list[int]]:  # fmt: skip
    """The command line of one proxy listening on `port`, and the listening sockets to wait
    for after each start (bare mitmdump as `processes` processes: one start each)."""
    if kind == "bare":
        cmd = [str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
               "--set", "connection_strategy=lazy", "--set", f"confdir={workdir / 'conf-bare'}",
               *(extra or [])]  # fmt: skip
        if processes > 1:  # mitmdump has no option for it: drawdown's workers bind the same way
            cmd[:1] = [sys.executable, "-c", BARE_REUSE_PORT]
        # One mitmdump after another, each waited for: 1 listening socket, then 2, ...
        listening = list(range(1, processes + 1))
    else:
        # drawdown's supervisor starts its --workers itself: wait for all of them to listen.
        listening = [
            int(extra[extra.index("--workers") + 1]) if extra and "--workers" in extra else 1
        ]
        policy = workdir / f"bench-{port}.yaml"  # one each: proxies may start side by side
        policy.write_text(
            f"""mode: enforce
actions:
  - {{kind: llm, provider: openai, match: {{host: "127.0.0.1:{upstream_port}"}}}}
budgets:
  - {{scope: "tenant:*", per: day, usd: 1000000}}
  - {{scope: "agent:*", usd: 1000000}}
  - {{scope: "agent:*/run:*", usd: 1000000, requests: 1000000000}}
"""
        )
        db = workdir / f"bench-{port}.db"
        cmd = [str(BIN / "drawdown"), "run", "--policy", str(policy), "--db", str(db),
               "--listen", f"127.0.0.1:{port}", "--confdir", str(workdir / "conf"),
               "--set", "termlog_verbosity=error", *(extra or [])]  # fmt: skip
    return cmd, listening


def _launch(
    kind: str,
    workdir: Path,
    upstream_port: int,
    extra: list[str] | None,
    cpus: list[int] | None,
    processes: int,
    procs: list[subprocess.Popen[bytes]],
) -> int:
    """Start one proxy, appending its processes to `procs` as they start (so a caller can stop
    them even when this fails), and wait until it listens: its port."""
    port = free_port()
    cmd, listening = proxy_command(kind, workdir, upstream_port, port, extra, processes)
    if cpus:  # from exec on, so every thread and child process starts there
        cmd = ["taskset", "--cpu-list", _cpu_list(cpus), *cmd]
    for sockets in listening:
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_listening(port, procs[-1], sockets)
    return port


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def pids(procs: Iterable[subprocess.Popen[bytes]]) -> list[int]:
    return [proc.pid for proc in procs]


def _ensure_cas(workdir: Path) -> None:
    """Both confdirs' CA, made before any proxy starts: two proxies starting side by side
    would otherwise each write it."""
    from drawdown.cacerts import ensure_ca

    for confdir in ("conf", "conf-bare"):
        ensure_ca(workdir / confdir)


@contextmanager
def proxy(
    kind: str,
    workdir: Path,
    upstream_port: int,
    extra: list[str] | None = None,
    cpus: list[int] | None = None,
    processes: int = 1,
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A proxy on a free port: bare mitmdump or drawdown. `processes` (bare only): that many
    mitmdumps on the one port, as drawdown's --workers (the first one's process is yielded)."""
    with proxies({kind: (kind, extra, processes)}, workdir, upstream_port, cpus) as started:
        port, procs = started[kind]
        yield port, procs[0]


# A proxy to start among others: (kind, extra arguments, processes), as proxy() takes them.
ProxySpec = tuple[str, list[str] | None, int]


@contextmanager
def proxies(
    specs: dict[str, ProxySpec],
    workdir: Path,
    upstream_port: int,
    cpus: list[int] | None = None,
) -> Iterator[dict[str, tuple[int, list[subprocess.Popen[bytes]]]]]:
    """Several proxies started side by side (each start is a second or so of one CPU importing
    mitmproxy; one after another they took a tenth of the bench's 5 minutes): by label, its
    port and its processes (a drawdown's workers and tokenizer are children of its first)."""
    from concurrent.futures import ThreadPoolExecutor

    _ensure_cas(workdir)
    procs: dict[str, list[subprocess.Popen[bytes]]] = {label: [] for label in specs}
    try:
        with ThreadPoolExecutor(len(specs)) as pool:
            starting = {
                label: pool.submit(
                    _launch, kind, workdir, upstream_port, extra, cpus, n, procs[label]
                )
                for label, (kind, extra, n) in specs.items()
            }
        ports = {label: future.result() for label, future in starting.items()}
        time.sleep(0.5)
        yield {label: (ports[label], procs[label]) for label in specs}
    finally:
        _stop([proc for started in procs.values() for proc in started])


# mitmdump with its listening sockets bound SO_REUSEPORT, as each `drawdown run --workers` worker.
BARE_REUSE_PORT = (
    "import sys; from drawdown.workers import enable_reuse_port; enable_reuse_port(); "
    "from mitmproxy.tools.main import mitmdump; sys.exit(mitmdump())"
)


def listening_sockets(port: int) -> int:
    """How many TCP sockets listen on 127.0.0.1:`port` (Linux's /proc/net/tcp: with
    SO_REUSEPORT each process has its own), or -1 where that table is not there."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return -1
    local, listen = f"0100007F:{port:04X}", "0A"
    rows = (line.split() for line in table)  # sl, local address, remote address, state, ...
    return sum(1 for row in rows if row[1:2] == [local] and row[3] == listen)


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], processes: int, seconds: float = 60
) -> None:
    """Until `processes` sockets listen on `port`, or (without /proc) one accepts a connection."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        listening = listening_sockets(port)
        if listening >= processes:
            return
        if listening < 0:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                pass
        time.sleep(0.2)
    raise SystemExit(f"bench: proxy process {processes} did not listen on port {port}")


# --- load ---------------------------------------------------------------------------------------


# The headers of the bench's request as wrk sends it (besides Host, the stand-in's address).
WRK_HEADERS = {
    "Content-Type": "application/json",
    "Authorization": "Bearer sk-bench-not-a-key",
    "X-Drawdown-Agent": "bench",
    "X-Drawdown-Run": "r1",
}


def wrk(
    proxy_port: int, upstream_port: int, body: bytes, connections: int, seconds: int, workdir: Path
) -> dict[str, float]:
    body_file = workdir / f"body-{len(body)}.json"
    body_file.write_bytes(body)
    script = workdir / "post.lua"
    headers = "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in WRK_HEADERS.items())
    script.write_text(
        f"""local f = io.open("{body_file}", "rb"); local body = f:read("*a"); f:close()
wrk.method = "POST"
wrk.body = body
{headers}wrk.headers["Host"] = "127.0.0.1:{upstream_port}"
function request() return wrk.format(nil, "http://127.0.0.1:{upstream_port}/v1/chat/completions") end
"""
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), f"http://127.0.0.1:{proxy_port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    def ms(label: str) -> float:
        found = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
        if not found:
            return float("nan")
        value, unit = float(found.group(1)), found.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        # Counted, not rps x seconds: wrk's run lasts a little longer than asked (2.1 s for 2).
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "p50": ms("50%"),
        "p99": ms("99%"),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


async def _python_load(
    proxy_port: int, upstream_port: int, body: bytes, connections: int, seconds: float
) -> dict[str, float]:
    request = (
        b"POST http://127.0.0.1:%d/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nX-Drawdown-Agent: bench\r\nX-Drawdown-Run: r1\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (upstream_port, upstream_port, len(body), body)
    )
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        while time.monotonic() < stop:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
        writer.close()

    began = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "requests": float(len(latencies)),
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": float(errors),
    }


def load(
    proxy_port: int, upstream_port: int, body: bytes, connections: int, seconds: int, workdir: Path
) -> dict[str, float]:
    if shutil.which("wrk"):
        return wrk(proxy_port, upstream_port, body, connections, seconds, workdir)
    return asyncio.run(_python_load(proxy_port, upstream_port, body, connections, seconds))


def one_request(
    proxy_port: int, upstream_port: int, body: bytes, stream: bool = False, host: str = "127.0.0.1"
) -> tuple[float, float]:
    """(seconds to the first body byte, seconds to the end) of one request through the proxy.
    `host` names the stand-in: drawdown's bench policy meters 127.0.0.1 and no other name."""
    if stream:
        body = body.replace(b'"max_tokens"', b'"stream": true, "max_tokens"')
    request = (
        b"POST http://%s:%d/v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\n"
        b"Content-Type: application/json\r\nX-Drawdown-Agent: bench\r\nX-Drawdown-Run: r1\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
        % (host.encode(), upstream_port, host.encode(), upstream_port, len(body), body)
    )
    with socket.create_connection(("127.0.0.1", proxy_port)) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        received = b""
        first = None
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            if first is None and b"data:" in received:
                first = time.perf_counter() - started
        end = time.perf_counter() - started
    if first is None:
        first = end
    return first, end


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """On-CPU seconds of a process's event loop (its main thread) and of its other threads.

    From the scheduler's own clock (schedstat, in ns) rather than the tick-sampled utime/stime:
    on an idle-heavy VM the ticks land unevenly on threads that sleep and wake a lot, such as
    drawdown's ledger writer."""
    main = others = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended (an ended thread's time is lost: none end mid-run)
        if task.name == str(pid):
            main += seconds
        else:
            others += seconds
    return main, others


def tree_cpu_seconds(roots: Iterable[int]) -> tuple[float, float]:
    """thread_cpu_seconds summed over processes and all their descendants: `drawdown run
    --workers N` is a supervisor and N worker processes (event loops: every process's main
    thread)."""
    main = others = 0.0
    seen: set[int] = set()
    pending = list(roots)
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            loop, rest = thread_cpu_seconds(pid)
        except OSError:
            continue  # gone
        main, others = main + loop, others + rest
        pending += children_of(pid)
    return main, others


def machine_busy_seconds(stat: Path = Path("/proc/stat")) -> float:
    """CPU-seconds the whole machine has spent busy (every CPU: user, nice, system, irq,
    softirq), from /proc/stat's clock ticks; NaN where there is no such file."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def measured(port: int, roots: Iterable[int], up: int, body: bytes, connections: int,
             seconds: int, workdir: Path) -> dict[str, float]:  # fmt: skip
    """A load run, with the proxy's CPU time per request served: all of it, then the part on
    its event loops' threads and the part on its other threads (drawdown's ledger writer), over
    the processes `roots` and their children; and how many of the machine's CPUs were busy."""
    roots = list(roots)
    loop_before, others_before = tree_cpu_seconds(roots)
    busy_before, started = machine_busy_seconds(), time.monotonic()
    result = load(port, up, body, connections, seconds, workdir)
    busy_after, ended = machine_busy_seconds(), time.monotonic()
    loop_after, others_after = tree_cpu_seconds(roots)
    result["machine_busy_cpus"] = (busy_after - busy_before) / (ended - started)
    served = result["requests"]
    if not served:
        result["cpu_ms"] = result["cpu_ms_loop"] = result["cpu_ms_threads"] = float("nan")
        return result
    result["cpu_ms_loop"] = (loop_after - loop_before) * 1000 / served
    result["cpu_ms_threads"] = (others_after - others_before) * 1000 / served
    result["cpu_ms"] = result["cpu_ms_loop"] + result["cpu_ms_threads"]
    return result


def _writer_probe() -> ModuleType:
    """scripts/writer_probe.py, the mitmproxy script the writer run loads, for its summary."""
    import writer_probe

    return writer_probe


def writer_batches(
    workdir: Path, upstream_port: int, body: bytes, connections: int, seconds: int
) -> dict[str, Any]:
    """One load run through a drawdown with scripts/writer_probe.py loaded: the summary of
    the batches its ledger writer ran (operations, wall and CPU ms, how many waited), and the
    requests the run served."""
    out = workdir / "writer-probe.json"
    out.unlink(missing_ok=True)
    os.environ["DRAWDOWN_WRITER_PROBE"] = str(out)
    try:
        extra = ["--set", f"scripts={ROOT / 'scripts' / 'writer_probe.py'}"]
        with proxy("drawdown", workdir, upstream_port, extra) as (port, _):
            run = load(port, upstream_port, body, connections, seconds, workdir)
    finally:
        del os.environ["DRAWDOWN_WRITER_PROBE"]
    figures = json.loads(out.read_text())  # written when the proxy stopped
    del figures["samples"]
    figures["requests"] = int(run["requests"])
    return figures


class Laps:
    """The wall time of each part of the bench, printed at its end: the whole must stay under
    5 minutes, and on a slow VM this says which part grew."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = self.last = clock()
        self.parts: dict[str, float] = {}

    def lap(self, part: str) -> None:
        now = self.clock()
        self.parts[part] = now - self.last
        self.last = now

    def total(self) -> float:
        return self.last - self.started

    def describe(self) -> str:
        whole = round(self.total())
        parts = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in self.parts.items())
        return f"{whole // 60} min {whole % 60:02d} s ({parts})"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# The throughput and latency rounds' proxies, by label: (kind, extra arguments, the suffix of
# their figures' JSON keys: c1, c16 for drawdown as it starts by default).
THROUGHPUT_PROXIES: dict[str, tuple[str, list[str] | None, str]] = {
    "bare": ("bare", None, ""),
    "drawdown": ("drawdown", None, ""),
    "drawdown --cpu-affinity auto": ("drawdown", ["--cpu-affinity", "auto"], "_cpu_affinity"),
}


def medians(pairs: list[tuple[dict[str, float], dict[str, float]]]) -> dict[str, float]:
    """The median round of (bare, drawdown) runs: drawdown's rate as a share of bare's, its
    added latency, and each one's CPU per request."""

    def median(figure: Any) -> float:
        return statistics.median(figure(bare, dd) for bare, dd in pairs)

    return {
        "ratio": median(lambda bare, dd: dd["rps"] / bare["rps"]),
        "added_p50": median(lambda bare, dd: dd["p50"] - bare["p50"]),
        "added_p99": median(lambda bare, dd: dd["p99"] - bare["p99"]),
        "cpu_ms_bare": median(lambda bare, _: bare["cpu_ms"]),
        "cpu_ms_drawdown": median(lambda _, dd: dd["cpu_ms"]),
        "cpu_ms_drawdown_loop": median(lambda _, dd: dd["cpu_ms_loop"]),
        "cpu_ms_drawdown_threads": median(lambda _, dd: dd["cpu_ms_threads"]),
    }


# --- the run ------------------------------------------------------------------------------------


def _single(label: str) -> str:
    """The one-process run a workers figure is a multiple of."""
    return "bare 1" if label.startswith("bare") else "1"


def scaling(turns: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Medians over the rounds of the workers' speed-ups, and of two workers against two bare
    mitmdump processes (each ratio taken within a round, where the machine's speed is one)."""

    def median(top: str, bottom: str) -> float:
        return statistics.median(turn[top]["rps"] / turn[bottom]["rps"] for turn in turns)

    return {
        "rounds": turns,
        "median_speedup": median("2", "1"),
        "median_speedup_cpu_affinity": median("2 --cpu-affinity auto", "1"),
        "median_speedup_bare": median("bare 2", "bare 1"),
        "median_two_vs_bare_two": median("2", "bare 2"),
        "median_two_cpu_affinity_vs_bare_two": median("2 --cpu-affinity auto", "bare 2"),
        # Each proxy's CPU per request and the machine's busy CPUs, medians over the rounds.
        "median_cpu": {
            label: {
                figure: statistics.median(turn[label][figure] for turn in turns)
                for figure in CPU_FIGURES
                if all(figure in turn[label] for turn in turns)
            }
            for label in turns[0]
        },
    }


CPU_FIGURES = ("cpu_ms", "cpu_ms_loop", "cpu_ms_threads", "machine_busy_cpus")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=4, help="per load run [4]")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds per comparison [5]"
    )
    parser.add_argument("--quick", action="store_true", help="3-second runs, fewer samples")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--split",
        action="store_true",
        help="throughput and latency runs with each proxy on one CPU and the load on the rest",
    )
    args = parser.parse_args()
    seconds = 3 if args.quick else args.seconds
    if args.quick:
        args.rounds = 1
    laps = Laps()
    figures: dict[str, Any] = {"machine": machine()}
    body = prompt_body(1000)
    big = prompt_body(94_000, max_tokens=50)  # ~100k tokens
    figures["idle"] = idle_policy()
    print(f"drawdown bench — {figures['machine']}")
    print(f"idle CPUs: {describe_idle(figures['idle'])}")
    if args.split and not Split.possible():
        parser.error("--split needs two CPUs and taskset (util-linux)")
    split = Split() if args.split else None
    figures["cpus"] = (
        {"proxy": split.proxy, "load": split.load} if split else "placed by the scheduler"
    )
    print(
        f"load: {'wrk' if shutil.which('wrk') else 'python'}; {seconds} s per run; request body {len(body)} bytes"
    )
    print(
        f"throughput and latency runs: {split.describe() if split else 'CPUs placed by the scheduler'}\n"
    )
    with tempfile.TemporaryDirectory(prefix="drawdown-bench-") as tmp, upstream() as up:
        workdir = Path(tmp)
        # The proxies stay up and take turns, round after round: on a shared VM the machine's
        # speed drifts by tens of percent within a minute, and alternating short rounds puts
        # the drift on every side. The median round is the figure. drawdown runs twice: as it
        # starts by default (threads placed by the scheduler) and with --cpu-affinity.
        rows: list[tuple[int, list[dict[str, dict[str, float]]]]] = []
        proxy_cpus = split.proxy if split else None
        specs = {label: (kind, extra, 1) for label, (kind, extra, _) in THROUGHPUT_PROXIES.items()}
        with proxies(specs, workdir, up, proxy_cpus) as started, cpus_apart(split):
            for connections in (1, 16):
                for port, _ in started.values():  # warm-up
                    load(port, up, body, connections, WARM_UP_SECONDS, workdir)
                rounds = [
                    {
                        label: measured(port, pids(procs), up, body, connections, seconds, workdir)
                        for label, (port, procs) in started.items()
                    }
                    for _ in range(args.rounds)
                ]
                rows.append((connections, rounds))
        laps.lap("throughput and latency")
        print(
            "throughput and latency (POST chat completion, ~1,000-token prompt, 3 budgets), "
            f"{_rounds(args.rounds)} of {seconds} s; "
            + (split.describe() if split else "CPUs placed by the scheduler")
        )
        for label, (kind, _, suffix) in THROUGHPUT_PROXIES.items():
            if kind == "bare":
                continue
            print(f"\nbare mitmdump → {label}")
            print(
                f"{'conc':>4}  {'round':>5}  {'bare req/s':>10}  {'drawdown req/s':>14}  {'ratio':>6}  {'bare p50/p99 ms':>16}  {'drawdown p50/p99 ms':>19}  {'added p50/p99':>14}  {'CPU ms/req bare → drawdown (loop + threads)':>42}"
            )
            for connections, rounds in rows:
                pairs = [(each["bare"], each[label]) for each in rounds]
                for number, (bare, dd) in enumerate(pairs, 1):
                    print(
                        f"{connections:>4}  {number:>5}  {bare['rps']:>10.0f}  {dd['rps']:>14.0f}  {dd['rps'] / bare['rps']:>6.0%}  "
                        f"{bare['p50']:>7.2f}/{bare['p99']:<8.2f}  {dd['p50']:>9.2f}/{dd['p99']:<9.2f}  "
                        f"{dd['p50'] - bare['p50']:>+6.2f}/{dd['p99'] - bare['p99']:<+7.2f}  "
                        f"{bare['cpu_ms']:>15.2f} → {dd['cpu_ms']:.2f} ({dd['cpu_ms_loop']:.2f} + {dd['cpu_ms_threads']:.2f})"
                    )
                median = medians(pairs)
                print(
                    f"{connections:>4}  {'median':>6} {'':>10}  {'':>14}  {median['ratio']:>6.0%}  {'':>16}  {'':>19}  "
                    f"{median['added_p50']:>+6.2f}/{median['added_p99']:<+7.2f}  "
                    f"{median['cpu_ms_bare']:>15.2f} → {median['cpu_ms_drawdown']:.2f} "
                    f"({median['cpu_ms_drawdown_loop']:.2f} + {median['cpu_ms_drawdown_threads']:.2f})"
                )
                figures[f"c{connections}{suffix}"] = {
                    "rounds": [{"bare": bare, "drawdown": dd} for bare, dd in pairs],
                    "median": median,
                }

        # Streaming: time to the first SSE event, bare vs drawdown, both up at once and taking
        # turns in rounds, so that a VM's slower minutes fall on both alike (one proxy's 30
        # requests after the other's once put 1 ms between two medians of the same build).
        # bare mitmproxy buffers event streams unless told to stream bodies; drawdown streams them
        streamers: dict[str, ProxySpec] = {
            "bare": ("bare", ["--set", "stream_large_bodies=1"], 1),
            "drawdown": ("drawdown", None, 1),
        }
        with proxies(streamers, workdir, up) as started:
            ports = {label: port for label, (port, _) in started.items()}
            for port in ports.values():
                one_request(port, up, body, stream=True)
            ttfb = first_event_times(ports, up, body, args.rounds)
        laps.lap("streaming")
        bare_ttfb, dd_ttfb = statistics.median(ttfb["bare"]), statistics.median(ttfb["drawdown"])
        per_round = added_per_round(ttfb["bare"], ttfb["drawdown"])
        print(
            f"\nstreaming: time to first SSE event ({_rounds(args.rounds)} of {TTFB_REQUESTS_PER_ROUND} requests each), "
            f"median ms: bare {bare_ttfb:.2f}, drawdown {dd_ttfb:.2f} ({dd_ttfb - bare_ttfb:+.2f}; "
            f"rounds {', '.join(f'{added:+.2f}' for added in per_round)})"
        )
        figures["ttfb_ms"] = {"bare": bare_ttfb, "drawdown": dd_ttfb, "rounds_added": per_round}

        # A 100k-token prompt: its own added latency, and the p99 of small requests while such
        # prompts go through. Bare mitmdump's own p99 rises under the same bodies, so all four
        # take turns: bare, drawdown (big prompts counted in its tokenizer process), drawdown
        # with `drawdown_tokenizer_process=false` (counted on a worker thread), and drawdown
        # sent the big prompts under a host name its policy does not meter (forwarded and
        # recorded, never counted: what forwarding them costs the others, counting aside). A
        # probe loaded into each (scripts/loop_probe.py) times how late their event loop runs.
        probe = ROOT / "scripts" / "loop_probe.py"
        metered, unmetered = "127.0.0.1", "localhost"
        varieties = {
            "bare": ("bare", ["-s", str(probe)], metered),
            "drawdown": ("drawdown", ["--set", f"scripts={probe}"], metered),
            "drawdown, thread": (
                "drawdown",
                ["--set", f"scripts={probe}", "--set", "drawdown_tokenizer_process=false"],
                metered,
            ),
            "drawdown, uncounted": ("drawdown", ["--set", f"scripts={probe}"], unmetered),
        }
        big_rounds = min(args.rounds, 3)
        probe_dir = workdir / "probe"
        probe_dir.mkdir()
        os.environ["DRAWDOWN_BENCH_PROBE_DIR"] = str(probe_dir)
        big_hosts = {label: host for label, (_, _, host) in varieties.items()}
        specs = {label: (kind, extra, 1) for label, (kind, extra, _) in varieties.items()}
        with proxies(specs, workdir, up) as started:
            ports = {label: port for label, (port, _) in started.items()}
            pid_of = {label: procs[0].pid for label, (_, procs) in started.items()}
            own: dict[str, float] = {}
            tokenizer_kib = 0
            lateness: dict[str, dict[str, float]] = {}
            # The small requests' p99 beside big prompts, for all but the thread variety: what
            # it shows is its loop running late, above; its p99 rounds would push the bench
            # past its 5 minutes.
            in_p99_rounds = [label for label in varieties if label != "drawdown, thread"]
            for label, port in ports.items():
                big_host = big_hosts[label]
                one_request(port, up, big, host=big_host)
                if (
                    label == "drawdown"
                ):  # that prompt started the tokenizer process (and its tracker)
                    children = wait_for_children(pid_of[label], 2)
                    tokenizer_kib = max(rss_kib(child) for child in children)
                varied = [
                    big.replace(b"quick", f"quick{label}{i}".encode(), 1) for i in range(13)
                ]  # no token-cache hits
                probe_command(probe_dir, pid_of[label], "reset")
                times = [one_request(port, up, v, host=big_host)[1] * 1000 for v in varied]
                lateness[label] = probe_command(probe_dir, pid_of[label], "dump")
                own[label] = statistics.median(times)
            p99s, big_sent = small_p99_rounds(
                {label: ports[label] for label in in_p99_rounds},
                big_hosts, up, body, big, seconds, workdir, big_rounds,
                collect=lambda label: probe_command(probe_dir, pid_of[label], "collect"),
            )  # fmt: skip
        laps.lap("big prompts")
        added_own = own["drawdown"] - own["bare"]
        print(
            f"\n100k-token prompt, own latency (median of 13): bare {own['bare']:.1f} ms, drawdown {own['drawdown']:.1f} ms "
            f"({added_own:+.1f} ms), drawdown counting on a thread {own['drawdown, thread']:.1f} ms, "
            f"drawdown not counting it {own['drawdown, uncounted']:.1f} ms"
        )
        print("event loop lateness of a 1 ms timer while those 13 prompts went through (ms):")
        for label, late in lateness.items():
            print(
                f"  {label:<19} p50 {late['p50']:.2f}  p99 {late['p99']:.2f}  p99.9 {late['p999']:.2f}  "
                f"max {late['max']:.2f}  ({late['samples']} timers)"
            )
        print(
            f"small requests' p99 alone → while {BIG_PROMPTS_PER_SECOND} 100k-token prompts/s go through, "
            f"{_rounds(big_rounds)}:"
        )
        figures["big_prompt"] = {"own_ms": own, "loop_lateness_ms": lateness}
        for label, pairs in p99s.items():
            rises = [busy - quiet for quiet, busy in pairs]
            print(
                f"  {label:<19} "
                + ", ".join(f"{quiet:.2f} → {busy:.2f}" for quiet, busy in pairs)
                + f" ms; median rise {statistics.median(rises):+.2f} ms"
                + f" (big prompts sent: {', '.join(map(str, big_sent[label]))})"
            )
            figures["big_prompt"][label] = {
                "p99_alone_busy": pairs,
                "median_rise_ms": statistics.median(rises),
                "big_prompts_sent": big_sent[label],
            }

        # Memory: RSS of one drawdown process before and after N requests.
        with proxy("drawdown", workdir, up) as (port, proc):
            load(port, up, body, 8, WARM_UP_SECONDS, workdir)
            before = rss_kib(proc.pid)
            run = load(port, up, body, 8, seconds, workdir)
            after = rss_kib(proc.pid)
        laps.lap("memory")
        served = int(run["requests"])
        print(
            f"memory: RSS {before / 1024:.1f} MiB after warm-up, {after / 1024:.1f} MiB after {served:,} more requests; "
            f"tokenizer process (started by the first big prompt) {tokenizer_kib / 1024:.1f} MiB"
        )
        figures["memory"] = {
            "rss_before_kib": before,
            "rss_after_kib": after,
            "requests": served,
            "tokenizer_process_kib": tokenizer_kib,
        }

        # The ledger writer under load: how many of its batches waited (in one process: for
        # the GIL, while the loop ran) rather than worked. benchmarks/HISTORY.md, run K, reads them.
        writer = writer_batches(workdir, up, body, 16, seconds)
        laps.lap("ledger writer")
        print(f"ledger writer at c=16, {_writer_probe().describe(writer)}")
        figures["writer_c16"] = writer

        # Workers: several processes on one listen address (SO_REUSEPORT), one ledger. One
        # worker, two, and two with one CPU each (--cpu-affinity auto) take turns with bare
        # mitmdump as one process and as two on one port: bare's own scaling is the ceiling on
        # this machine, where the load and the stand-in share the CPUs with the proxies.
        workers: dict[str, ProxySpec] = {
            "1": ("drawdown", ["--workers", "1"], 1),
            "2": ("drawdown", ["--workers", "2"], 1),
            "2 --cpu-affinity auto": ("drawdown", ["--workers", "2", "--cpu-affinity", "auto"], 1),
            "bare 1": ("bare", [], 1),
            "bare 2": ("bare", [], 2),
        }
        # Each proxy's processes: bare's second mitmdump is not a child of its first;
        # drawdown's workers are children of its supervisor.
        with proxies(workers, workdir, up) as started:
            for port, _ in started.values():
                load(port, up, body, 16, WARM_UP_SECONDS, workdir)
            turns = [
                {
                    label: measured(
                        port, pids(procs), up, body, 16, workers_seconds(seconds), workdir
                    )
                    for label, (port, procs) in started.items()
                }
                for _ in range(args.rounds)
            ]
        laps.lap("workers")
        figures["workers"] = scaling(turns)
        print(
            f"\nworkers (c=16), {_rounds(args.rounds)} of {workers_seconds(seconds)} s, "
            "req/s and p99 ms (× one worker; bare: × one bare process):"
        )
        for number, turn in enumerate(turns, 1):
            print(
                f"  {number}: "
                + ", ".join(
                    f"{label} → {run['rps']:.0f} ({run['rps'] / turn[_single(label)]['rps']:.2f}×, p99 {run['p99']:.1f})"
                    for label, run in turn.items()
                )
            )
        scaled = figures["workers"]
        print(
            f"  median: 2 → {scaled['median_speedup']:.2f}× one worker, "
            f"2 --cpu-affinity auto → {scaled['median_speedup_cpu_affinity']:.2f}×; "
            f"bare mitmdump, 2 processes → {scaled['median_speedup_bare']:.2f}× one; "
            f"drawdown's 2 workers serve {scaled['median_two_vs_bare_two']:.0%} of bare's 2 "
            f"({scaled['median_two_cpu_affinity_vs_bare_two']:.0%} pinned)"
        )
        # Whether the machine was saturated, and what each proxy spent per request: on a
        # saturated machine the CPU per request is what sets the speed-up.
        print(
            f"  medians: CPU ms per request (event loops + other threads); the machine's busy CPUs (of {os.cpu_count()})"
        )
        for label, cpu in scaled["median_cpu"].items():
            print(
                f"    {label:<22} {cpu['cpu_ms']:.2f} ({cpu['cpu_ms_loop']:.2f} + "
                f"{cpu['cpu_ms_threads']:.2f})   {cpu['machine_busy_cpus']:.2f}"
            )

    # The ledger alone.
    ledger = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_ledger.py"), "--backend", "both", "--json",
         "--lifecycles", "3000" if args.quick else "6000"],
        capture_output=True, text=True,
    )  # fmt: skip
    laps.lap("ledger alone")
    try:
        figures["ledger"] = json.loads(ledger.stdout)
        print("\nledger alone (reserve+commit, 3 budget instances each):")
        print(json.dumps(figures["ledger"], indent=2))
    except ValueError:
        print("\nledger bench failed:\n" + ledger.stdout + ledger.stderr)
    figures["seconds"] = {"total": laps.total(), **laps.parts}
    print(f"\nthe bench took {laps.describe()}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


TTFB_REQUESTS_PER_ROUND = 6  # streamed requests per proxy in each round of the first-event test


def first_event_times(
    ports: dict[str, int], upstream_port: int, body: bytes, rounds: int
) -> dict[str, list[float]]:
    """Milliseconds to the first SSE event through each proxy: in every round, each proxy in
    turn serves TTFB_REQUESTS_PER_ROUND streamed requests."""
    times: dict[str, list[float]] = {label: [] for label in ports}
    for _ in range(rounds):
        for label, port in ports.items():
            for _ in range(TTFB_REQUESTS_PER_ROUND):
                times[label].append(one_request(port, upstream_port, body, stream=True)[0] * 1000)
    return times


def added_per_round(bare: list[float], drawdown: list[float]) -> list[float]:
    """Each round's median first-event time through drawdown less bare's in the same round."""
    step = TTFB_REQUESTS_PER_ROUND
    return [
        statistics.median(drawdown[i : i + step]) - statistics.median(bare[i : i + step])
        for i in range(0, len(bare), step)
    ]


# Big prompts beside the small-request load arrive at this fixed rate, the same for every
# proxy. Sent back to back instead, a proxy that finishes them sooner is sent more of them
# (bare mitmdump, which counts nothing, got 2.3x drawdown's), so the proxies were not under
# the same load. 5/s is well within what each proxy sustains on the slowest VM measured.
BIG_PROMPTS_PER_SECOND = 5


def while_big_prompts(
    port: int,
    upstream_port: int,
    body: bytes,
    big: bytes,
    seconds: int,
    workdir: Path,
    tag: str,
    big_host: str = "127.0.0.1",
) -> dict[str, float]:
    """Small-request load while one client sends 100k-token prompts, BIG_PROMPTS_PER_SECOND,
    to `big_host` (see one_request). The result has `big_prompts`: how many were sent meanwhile."""
    stop = threading.Event()
    sent = 0

    def send() -> None:
        nonlocal sent
        due = time.monotonic()
        while not stop.is_set():  # a new text each time: no token-cache hits
            one_request(
                port,
                upstream_port,
                big.replace(b"quick", f"quick{tag}-{sent}".encode(), 1),
                host=big_host,
            )
            sent += 1
            due += 1 / BIG_PROMPTS_PER_SECOND
            stop.wait(max(0.0, due - time.monotonic()))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        result = load(port, upstream_port, body, 4, big_seconds(seconds), workdir)
    finally:
        stop.set()
        thread.join(60)
    result["big_prompts"] = sent
    return result


def small_p99_rounds(
    ports: dict[str, int],
    big_hosts: dict[str, str],
    upstream_port: int,
    body: bytes,
    big: bytes,
    seconds: int,
    workdir: Path,
    rounds: int,
    collect: Callable[[str], object] | None = None,
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[int]]]:
    """Each proxy's small-request p99 alone, then beside big prompts, the proxies taking turns
    round after round: (p99 alone, p99 beside) per round, and how many big prompts were sent.
    Each proxy is warmed up first, then `collect(label)` runs its full garbage collection: bare
    mitmdump's first (its start-up heap, 26-57 ms; drawdown freezes its own) otherwise comes
    ~1,100 small requests after the big prompts, lands in its first round alone, and passes for
    a p99 that big prompts then lower."""
    for label, port in ports.items():
        load(port, upstream_port, body, 4, WARM_UP_SECONDS, workdir)
        if collect is not None:
            collect(label)
    p99s: dict[str, list[tuple[float, float]]] = {label: [] for label in ports}
    sent: dict[str, list[int]] = {label: [] for label in ports}
    for number in range(rounds):
        for label, port in ports.items():
            quiet = load(port, upstream_port, body, 4, big_seconds(seconds), workdir)
            tag, host = f"{label}{number}", big_hosts[label]
            busy = while_big_prompts(port, upstream_port, body, big, seconds, workdir, tag, host)
            p99s[label].append((quiet["p99"], busy["p99"]))
            sent[label].append(int(busy["big_prompts"]))
    return p99s, sent


def _rounds(count: int) -> str:
    return "one round" if count == 1 else f"{count} interleaved rounds"


WARM_UP_SECONDS = 1  # a thousand requests or so: connections open, caches and SQLite pages warm


def workers_seconds(seconds: int) -> int:
    """Each workers run: five proxies x rounds of them must fit the bench's 5 minutes too."""
    return max(2, seconds * 3 // 4)


def big_seconds(seconds: int) -> int:
    """Each small-request load beside big prompts: three proxies x rounds x (alone, busy) of
    them must fit the bench's 5 minutes."""
    return max(2, seconds // 3)


def probe_command(probe_dir: Path, pid: int, command: str) -> dict[str, float]:
    """Tell a proxy's loop_probe.py to reset or dump its sample, or collect garbage (it polls
    every ~20 ms); what it answers to a dump or a collection."""
    (probe_dir / f"{pid}.{command}").touch()
    deadline = time.monotonic() + 10
    while (probe_dir / f"{pid}.{command}").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: the loop probe in pid {pid} did not answer")
        time.sleep(0.02)
    if command == "reset":
        return {}
    return json.loads((probe_dir / f"{pid}.json").read_text())


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def wait_for_children(pid: int, count: int, timeout: float = 30) -> list[int]:
    """The proxy's child processes once there are `count` of them (its tokenizer process starts
    on the first big prompt)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = children_of(pid)
        if len(children) >= count:
            time.sleep(1.5)  # the child loads its encoding after it appears
            return children
        time.sleep(0.1)
    raise SystemExit(f"bench: drawdown (pid {pid}) started no tokenizer process in {timeout:.0f} s")


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPU ({cpu}), Python {sys.version.split()[0]}"


def idle_policy(sys_root: Path = Path("/sys")) -> dict[str, Any]:
    """How this machine's idle CPUs wait: the cpuidle driver and governor, and under the
    haltpoll driver (KVM guests) how long an idle vCPU polls before it halts. A halted vCPU
    takes a trip through the hypervisor to wake, and drawdown wakes its ledger writer and is
    woken back twice per request: at c=1 this is worth several points of the ratio to bare
    (BENCHMARKS.md). Empty where the kernel does not say."""
    policy: dict[str, Any] = {}
    cpuidle = sys_root / "devices/system/cpu/cpuidle"
    for name, path in (
        ("driver", cpuidle / "current_driver"),
        ("governor", cpuidle / "current_governor_ro"),
        ("governor", cpuidle / "current_governor"),
        ("halt_poll_ns", sys_root / "module/haltpoll/parameters/guest_halt_poll_ns"),
    ):
        if name in policy:
            continue
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        policy[name] = int(value) if name == "halt_poll_ns" and value.isdigit() else value
    return policy


def describe_idle(policy: dict[str, Any]) -> str:
    if not policy:
        return "not reported by the kernel"
    driver = policy.get("driver", "?")
    text = f"cpuidle {driver}/{policy.get('governor', '?')}"
    if driver == "none":
        # No cpuidle driver: the kernel's default idle, HLT, whatever haltpoll's module says;
        # how soon a halted vCPU runs again is then up to the hypervisor.
        return text + " (an idle vCPU halts; the hypervisor decides how soon it wakes)"
    if "halt_poll_ns" in policy and driver == "haltpoll":
        ns = policy["halt_poll_ns"]
        text += (
            ", guest halt polling off (an idle vCPU halts at once)"
            if ns == 0
            else f", an idle vCPU polls {ns / 1000:g} µs before it halts"
        )
    return text


if __name__ == "__main__":
    sys.exit(main())
