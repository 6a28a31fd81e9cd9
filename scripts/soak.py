"""Soak: one stand-in upstream, one `drawdown run`, N requests; memory and the ledger's books.

    ./scripts/soak                       # 100,000 requests (the figures in docs/guarantees.md)
    ./scripts/soak --requests 20000 --concurrency 24

A mix of JSON and streamed chat completions from several agents and runs, some of them denied
(runs that exhaust their budget: 402; an agent no rule lets in: 403). The proxy's RSS is
sampled every --sample-every requests. At the end: every request was answered, no hold is
active, exactly one decision row per request, the upstream saw exactly the allowed calls, and
`drawdown verify --settled` passes. Exit status 0 when all of that holds.

The stand-in runs in a child process (`--serve-standin`) so that it does not share the client's
interpreter lock; tests/e2e/test_soak.py runs a reduced soak through `soak()`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.support is the harness the e2e suite uses
    sys.path.insert(0, str(ROOT))

import httpx2  # noqa: E402

from tests.support.proxy import DrawdownProcess  # noqa: E402
from tests.support.standin import StandIn  # noqa: E402
from tests.support.tls import DEFAULT_NAMES, make_tls_material  # noqa: E402

AGENTS = 5
RUNS_PER_AGENT = 20
POLICY = """
identity:
  agent: [{{header: X-Drawdown-Agent}}]
  run: [{{header: X-Drawdown-Run}}]
actions:
  - {{kind: llm, provider: openai, match: {{host: api.openai.com}}}}
authority:
  default: allow
  rules:
    - {{scope: "agent:intruder", deny: [llm]}}
budgets:
  - {{scope: "agent:*/run:*", requests: {run_budget}, usd: 50}}
  - {{scope: "agent:*", usd: 1000}}
"""


def policy(total: int) -> str:
    """Each run's budget is 90% of its share of the traffic: its last calls are denied (402)."""
    share = total * 0.98 / (AGENTS * RUNS_PER_AGENT)
    return POLICY.format(run_budget=max(1, int(share * 0.9)))


URL = "https://api.openai.com/v1/chat/completions"


# --- the stand-in, in its own process -------------------------------------------------------------


def serve_standin(directory: Path) -> None:
    """Child process (`soak.py --serve-standin DIR`): print the addresses as one JSON line, then
    answer each "count" line on stdin with the requests served so far; stop at end of input."""
    tls = make_tls_material(directory)
    standin = StandIn(tls).start()
    served = 0
    lock = threading.Lock()
    stop = threading.Event()

    def forget() -> int:  # take and forget, so that a long soak keeps no request log
        nonlocal served
        with lock, standin._lock:
            served += len(standin._log)
            standin._log.clear()
            return served

    def trim() -> None:
        while not stop.wait(0.5):
            forget()

    threading.Thread(target=trim, daemon=True).start()
    try:
        print(
            json.dumps(
                {"tls": standin.host_port, "plain": standin.http_host_port, "ca": str(tls.ca_cert)}
            ),
            flush=True,
        )
        for line in sys.stdin:
            if line.strip() == "count":
                print(forget(), flush=True)
    finally:
        stop.set()
        standin.stop()


@contextmanager
def standin_process(directory: Path) -> Iterator[tuple[Path, str, str, Callable[[], int]]]:
    """A stand-in upstream in its own process (it must not share the client's interpreter lock)."""
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-standin", str(directory / "tls")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        ready = child.stdout.readline()
        if not ready:
            raise RuntimeError("the stand-in did not start")
        addresses = json.loads(ready)

        def served() -> int:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("count\n")
            child.stdin.flush()
            return int(child.stdout.readline())

        yield Path(addresses["ca"]), addresses["tls"], addresses["plain"], served
    finally:
        child.stdin.close()  # end of input: the child stops its server and exits
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# --- measurement ---------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Sample:
    requests: int
    seconds: float
    rss_kib: int


@dataclass
class SoakResult:
    requests: int
    seconds: float
    samples: list[Sample]
    statuses: Counter[int]
    failures: list[str]
    problems: list[str] = field(default_factory=list)
    decisions: int = 0
    upstream: int = 0
    verify_output: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures and not self.problems

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def growth_per(self, every: int, *, second_half: bool = True) -> float:
        """RSS growth in KiB per `every` requests, over the second half of the run (or all of it)."""
        samples = [s for s in self.samples if s.requests > 0]
        if second_half:
            half = self.requests / 2
            samples = [s for s in samples if s.requests >= half] or samples[-1:]
        first, last = samples[0], samples[-1]
        if last.requests == first.requests:
            return 0.0
        return (last.rss_kib - first.rss_kib) * every / (last.requests - first.requests)

    def table(self, every: int) -> str:
        mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
        rss = [s.rss_kib for s in self.samples]
        lines = [
            f"{'requests':>10}  {'elapsed s':>9}  {'req/s':>7}  {'RSS MiB':>8}",
            f"{'-' * 10}  {'-' * 9}  {'-' * 7}  {'-' * 8}",
        ]
        previous = Sample(0, 0.0, 0)
        for s in self.samples:
            window = s.seconds - previous.seconds
            rate = (s.requests - previous.requests) / window if window > 0 and s.requests else 0.0
            lines.append(f"{s.requests:>10,}  {s.seconds:>9.1f}  {rate:>7.1f}  {mib(s.rss_kib):>8}")
            previous = s
        statuses = ", ".join(f"{code}: {n:,}" for code, n in sorted(self.statuses.items()))
        lines += [
            "",
            f"requests         {self.requests:,} in {self.seconds:.1f} s = {self.rate:.1f} req/s",
            f"answers          {statuses}",
            f"decision rows    {self.decisions:,}; upstream calls {self.upstream:,}",
            f"RSS              start {mib(rss[0])} MiB, peak {mib(max(rss))} MiB, end {mib(rss[-1])} MiB",
            f"growth per {every:,}  {self.growth_per(every, second_half=False):+.0f} KiB overall, "
            f"{self.growth_per(every):+.0f} KiB over the second half",
            f"failures         {len(self.failures)}"
            + (f" (first: {self.failures[0]})" if self.failures else ""),
            f"ledger           {self.verify_output.strip().splitlines()[-1] if self.verify_output.strip() else '?'}",
        ]
        lines += [f"PROBLEM          {p}" for p in self.problems]
        return "\n".join(lines)


# --- traffic -------------------------------------------------------------------------------------


def _request(i: int) -> tuple[dict[str, str], dict[str, Any], bool]:
    """Request number i: who sends it, its body, whether it streams. Deterministic."""
    if i % 50 == 49:
        agent, run = "intruder", "r0"  # 2%: refused by an authority rule (403)
    else:
        agent = f"agent-{i % AGENTS}"
        run = f"r{(i // AGENTS) % RUNS_PER_AGENT}"  # every run's traffic is spread over the soak
    stream = i % 3 == 0
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"step {i}: summarise the findings so far"}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
        if i % 6 == 0:
            body["stream_options"] = {"include_usage": True}
    return {"X-Drawdown-Agent": agent, "X-Drawdown-Run": run}, body, stream


async def _drive(
    proxy: DrawdownProcess,
    total: int,
    concurrency: int,
    sample_every: int,
    progress: Callable[[str], None],
) -> tuple[list[Sample], Counter[int], list[str], float]:
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    samples = [Sample(0, 0.0, rss_kib(proxy.pid or 0))]
    next_index = 0
    done = 0
    started = time.monotonic()
    lock = asyncio.Lock()

    async def worker(client: httpx2.AsyncClient) -> None:
        nonlocal next_index, done
        while True:
            async with lock:
                if next_index >= total:
                    return
                i = next_index
                next_index += 1
            headers, body, stream = _request(i)
            try:
                if stream:
                    async with client.stream("POST", URL, json=body, headers=headers) as response:
                        async for _ in response.aiter_bytes():
                            pass
                else:
                    response = await client.post(URL, json=body, headers=headers)
                statuses[response.status_code] += 1
            except httpx2.HTTPError as exc:
                failures.append(f"request {i}: {exc!r}")
            done += 1
            if done % sample_every == 0:
                sample = Sample(done, time.monotonic() - started, rss_kib(proxy.pid or 0))
                samples.append(sample)
                progress(
                    f"  {done:>9,} requests  {sample.seconds:7.1f} s  RSS {sample.rss_kib / 1024:6.1f} MiB"
                )

    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(
        proxy=proxy.proxy_url, verify=proxy.ssl_context(), trust_env=False, timeout=120, limits=limits,
        headers={"authorization": "Bearer sk-soak-not-a-real-key"},
    ) as client:  # fmt: skip
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    if samples[-1].requests != done:
        samples.append(Sample(done, elapsed, rss_kib(proxy.pid or 0)))
    return samples, statuses, failures, elapsed


def soak(
    total: int,
    *,
    concurrency: int = 16,
    sample_every: int = 10_000,
    directory: Path | None = None,
    proxy_args: tuple[str, ...] = (),
    progress: Callable[[str], None] = lambda line: None,
) -> SoakResult:
    """Run one soak: a stand-in process, one proxy, `total` requests; returns the figures."""
    with tempfile.TemporaryDirectory(prefix="drawdown-soak-") as scratch:
        work = Path(directory or scratch)
        work.mkdir(parents=True, exist_ok=True)
        db = work / "soak.db"
        with standin_process(work) as (ca, tls_address, plain_address, served):
            hosts = [n for n in DEFAULT_NAMES if n not in ("localhost", "127.0.0.1", "::1")]
            resolve = {
                "tls": dict.fromkeys(hosts, tls_address),
                "plain": dict.fromkeys(hosts, plain_address),
            }
            proxy = DrawdownProcess(
                policy(total), db, work / "confdir", proxy_args, ca, resolve=resolve
            )
            try:
                progress(f"proxy pid {proxy.pid} on {proxy.proxy_url}; ledger {db}")
                samples, statuses, failures, elapsed = asyncio.run(
                    _drive(proxy, total, concurrency, sample_every, progress)
                )
                result = SoakResult(total, elapsed, samples, statuses, failures)
                _check(result, proxy, served)
            finally:
                proxy.stop()
            verify = subprocess.run(
                [sys.executable, "-m", "drawdown", "verify", "--db", str(db), "--settled"],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            result.verify_output = verify.stdout + verify.stderr
            if verify.returncode != 0:
                result.problems.append(f"drawdown verify --settled failed:\n{result.verify_output}")
            if "Traceback" in proxy.log_text():
                result.problems.append("the proxy logged a traceback")
    return result


def _check(result: SoakResult, proxy: DrawdownProcess, served: Callable[[], int]) -> None:
    """The books, while the proxy still runs: no hold active, one row per request, upstream = allowed."""
    rows = proxy.wait_for_query(
        "SELECT (SELECT COUNT(*) FROM holds WHERE state = 'active'), (SELECT COUNT(*) FROM decisions)",
        until=lambda r: r[0][0] == 0 and r[0][1] >= result.requests,
        timeout=120,
    )
    active, result.decisions = rows[0]
    result.upstream = served()
    allowed = result.statuses[200]
    answered = sum(result.statuses.values())
    if active:
        result.problems.append(f"{active} hold(s) still active")
    if answered != result.requests:
        result.problems.append(f"{result.requests - answered} request(s) got no HTTP answer")
    if result.decisions != result.requests:
        result.problems.append(f"{result.decisions} decision rows for {result.requests} requests")
    if result.upstream != allowed:
        result.problems.append(f"the upstream saw {result.upstream} calls, {allowed} were allowed")
    unexpected = set(result.statuses) - {200, 402, 403}
    if unexpected:
        result.problems.append(f"unexpected statuses {sorted(unexpected)}")
    ((spent, committed),) = proxy.query(
        "SELECT (SELECT SUM(spent_requests) FROM budget_instances WHERE scope LIKE 'agent:%/run:%'), "
        "(SELECT COUNT(*) FROM holds WHERE state = 'committed')"
    )
    if spent != allowed or committed != allowed:
        result.problems.append(
            f"spent {spent} / committed {committed} requests, but {allowed} were allowed"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample-every", type=int, default=10_000)
    parser.add_argument("--keep", metavar="DIR", help="keep the ledger and TLS material in DIR")
    parser.add_argument(
        "--json", dest="as_json", action="store_true", help="also print the figures as JSON"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="OPTION=VALUE", help="passed to drawdown run"
    )
    parser.add_argument("--cpu-affinity", metavar="CPUS", help="passed to drawdown run (e.g. auto)")
    parser.add_argument("--serve-standin", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_standin:
        serve_standin(Path(args.serve_standin))
        return 0
    print(
        f"drawdown soak: {args.requests:,} requests, {args.concurrency} concurrent, RSS every {args.sample_every:,}",
        flush=True,
    )
    result = soak(
        args.requests,
        concurrency=args.concurrency,
        sample_every=args.sample_every,
        directory=Path(args.keep) if args.keep else None,
        proxy_args=(
            *(a for option in args.set for a in ("--set", option)),
            *(("--cpu-affinity", args.cpu_affinity) if args.cpu_affinity else ()),
        ),
        progress=lambda line: print(line, flush=True),
    )
    print()
    print(result.table(args.sample_every))
    if args.as_json:
        print(json.dumps({
            "requests": result.requests, "seconds": round(result.seconds, 1), "rate": round(result.rate, 1),
            "statuses": dict(result.statuses), "rss_kib": [[s.requests, s.rss_kib] for s in result.samples],
            "growth_kib_per_sample_every_second_half": round(result.growth_per(args.sample_every), 1),
            "problems": result.problems, "failures": len(result.failures),
        }))  # fmt: skip
    print("\nsoak: OK" if result.ok else "\nsoak: FAILED")
    return 0 if result.ok else 1


if __name__ == "__main__":
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the proxy and stand-in are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
