#!/usr/bin/env python
"""Ledger throughput: reserve+commit lifecycles per second, SQLite vs PostgreSQL.

Each lifecycle reserves on 3 budget instances — the tenant's (one row every request
shares: the hot spot), its agent's (one of 4) and its run's — then commits the actual.
Two ways of driving the ledger:

  async   as the proxy does: AsyncLedger (writer thread(s) batching queued operations, and
          SQLite's checkpoint thread), CONCURRENCY requests in flight on one event loop
  direct  one caller, one operation per transaction (latency-bound)

    .venv/bin/python scripts/bench_ledger.py [--lifecycles N] [--concurrency C]
        [--pg DSN] [--writers W] [--backend sqlite|postgres|both] [--guards] [--json]

--guards makes each reserve check the loop, step_count and fan_out guards, as a policy whose
anomaly detectors deny does (limits no lifecycle reaches: the figure is what checking costs).
It applies to --instructions too.

--runaway times one guarded reserve of a looping agent the loop guard refuses and that calls
on, as its run grows to 50,000 rows: what it costs the writer every request waits for.

--instructions instead counts, with valgrind's callgrind, the CPU instructions one batched
SQLite lifecycle costs (batches of 100 reserves, then their 100 commits). Req/s on a shared
VM moves by ±20 % from one hour to the next; this count stays put to a few hundredths of a
percent, so a change to the ledger's code shows in it whatever the machine is doing.

--handoff instead measures what a lone request (concurrency 1 in the proxy) pays for the
writer thread: one lifecycle in flight through AsyncLedger, against the same transactions run
on the calling thread itself, with and without 1 ms of other work on the calling thread
between operations (the proxy's loop forwards the request and the response in between, while
the writer idles), and a ledger that does nothing (the hand-off alone). Each thread's on-CPU
time comes from the scheduler (schedstat).

PostgreSQL: DSN from --pg, else DRAWDOWN_PG_DSN, else postgresql://127.0.0.1:5432/test;
the run gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addon"))

from drawdown.ledger.api import Amount, Claim, Completion, DecisionRow, Guards, new_request_id
from drawdown.ledger.worker import AsyncLedger

ESTIMATE = Amount(usd=2_000_000, tokens=1_500, requests=1)  # ≈ $0.002
# What the proxy commits for a metered chat completion (its response hook's Completion).
ACTUAL = Completion(
    actual=Amount(usd=1_200_000, tokens=900, requests=1),
    status=200,
    tokens_in=850,
    tokens_out=50,
    usage_source="usage",
    priced=True,
    model="gpt-4o-mini-2024-07-18",
    latency_ms=212.4,
    upstream_ms=208.9,
)


TENANTS = 1  # --tenants: 1 = every lifecycle shares the tenant row (the worst case)
# --guards: the anomaly detectors an enforce policy sets to deny, checked inside each reserve
# (each counts decision rows: the run's repeats of the request, its steps, the workflow's runs).
# Generous limits: the benchmark measures what checking costs, not refusals.
GUARDS: Guards | None = None
GUARDED = ", loop, step_count and fan_out guards"
# fan_out counts a workflow's rows when a new run starts in it: a workflow is a task fanned
# out to a bounded number of runs (here 80: 20 runs of each of 4 agents), which is what its
# limit is for.
ALL_GUARDS = Guards(max_repeats=3, max_steps=1_000, max_runs_per_workflow=100, retries=2)


def claims_for(n: int) -> tuple[DecisionRow, list[Claim]]:
    tenant = f"t{n % TENANTS}"
    agent, run = f"{tenant}-a{n % 4}", f"r{n // 50}"  # a run of 50 calls
    scope = f"tenant:{tenant}/agent:{agent}/run:{run}"
    # Every column the proxy fills for a chat completion (addon.py's request hook): the
    # indexes a report, a guard or replay reads are written with keys of their real size.
    row = DecisionRow(
        request_id=new_request_id(),  # as the proxy makes them
        ts=time.time(),
        decision="allow",
        mode="enforce",
        scope=scope,
        tenant=tenant,
        workflow=f"{tenant}-w{n // 1000}",  # a task fanned out to 80 runs
        agent=agent,
        run=run,
        action="llm",
        provider="openai",
        model="gpt-4o-mini",
        method="POST",
        host="api.openai.com",
        path="/v1/chat/completions",
        est_usd=ESTIMATE.usd,
        est_tokens=ESTIMATE.tokens,
        fingerprint=uuid.uuid4().hex,  # a hash of the action and body: 32 hex digits, distinct
        policy_digest="3f9a6c1e0b7d2a54",
        port=443,
        body_bytes=4_310,  # the bench's ~1,000-token chat completion
        metering="5c2f0e9a41b7:8d03e6f2a9c4",  # recording.metering_digest's shape
    )
    big = 10**18  # the benchmark measures throughput, not denials
    return row, [
        Claim("tenant", f"tenant:{tenant}", big, big, big, per="day", window_start=0),
        Claim("agent", f"tenant:{tenant}/agent:{agent}", big, None, None),
        Claim("run", scope, big, None, big),
    ]


async def drive_async(ledger: Any, lifecycles: int, concurrency: int, writers: int | None) -> float:
    worker = AsyncLedger(ledger, writers=writers)
    # The requests' rows and claims are the proxy's work, made before it calls the ledger:
    # built before the clock starts, so the figure is the ledger's alone.
    pending = iter([claims_for(n) for n in range(lifecycles)])

    async def client() -> None:
        for row, claims in pending:
            outcome = await worker.call("reserve", row, claims, ESTIMATE, row.ts + 900, GUARDS)
            assert outcome.hold_id is not None, outcome
            await worker.call("commit", row.request_id, outcome.hold_id, ACTUAL, time.time())

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    worker.close()
    return lifecycles / elapsed


def drive_direct(ledger: Any, lifecycles: int) -> float:
    inputs = [claims_for(n) for n in range(lifecycles)]
    started = time.perf_counter()
    for row, claims in inputs:
        outcome = ledger.reserve(row, claims, ESTIMATE, row.ts + 900, GUARDS)
        ledger.commit(row.request_id, outcome.hold_id, ACTUAL, time.time())
    return lifecycles / (time.perf_counter() - started)


COUNTED_BATCH = 100  # lifecycles per batch in the instruction count


def run_batches(batches: int, built: int) -> None:
    """The instruction count's workload: `batches` batches of reserves, each followed by the
    batch of their commits, on a new SQLite ledger. `built` batches of requests are made
    first, whatever `batches` is, so two runs differ only in the ledger's work."""
    from drawdown.ledger.sqlite import SQLiteLedger

    inputs = [claims_for(n) for n in range(built * COUNTED_BATCH)]
    with tempfile.TemporaryDirectory() as folder:
        ledger = SQLiteLedger(Path(folder) / "count.db", process_id="count")
        drive_direct(ledger, 50)  # warm up: create the instances, prepare statements
        for b in range(batches):
            batch = inputs[b * COUNTED_BATCH : (b + 1) * COUNTED_BATCH]
            outcomes = ledger.run_batch(
                [
                    ("reserve", (row, claims, ESTIMATE, row.ts + 900, GUARDS))
                    for row, claims in batch
                ]
            )
            commits = [
                ("commit", (row.request_id, outcome.hold_id, ACTUAL, row.ts))
                for (row, _), outcome in zip(batch, outcomes, strict=True)
            ]
            assert all(settled.applied for settled in ledger.run_batch(commits))
        ledger.close()


def count_instructions(low: int = 2, high: int = 22, guards: bool = False) -> int:
    """Instructions per batched lifecycle: the same run with `high` and with `low` batches,
    each under callgrind, differenced, so start-up, imports and warm-up cancel out.
    `guards`: each reserve checks ALL_GUARDS."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("bench_ledger: --instructions needs valgrind (apt-get install valgrind)")

    def total(batches: int) -> int:
        command = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
                   sys.executable, __file__, "--run-batches", str(batches), str(high),
                   *(["--guards"] if guards else [])]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise SystemExit(f"bench_ledger: the counted run failed:\n{done.stderr[-2000:]}")
        return int(found.group(1))

    return (total(high) - total(low)) // ((high - low) * COUNTED_BATCH)


class _NullLedger:
    """Answers every operation at once: what is left is the hand-off itself."""

    process_id = "handoff"

    def run_batch(self, operations: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        return [None] * len(operations)


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _on_cpu_ns(native_id: int) -> int:
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0])


async def handoff_costs(
    ledger: Any, lifecycles: int, gap: float, on_writer: bool, first: int = 100
) -> dict[str, float]:
    """One lifecycle at a time: reserve, `gap` seconds of other work, commit, `gap` again. With
    `on_writer`, through AsyncLedger as the proxy does; otherwise run_batch on this thread.
    Per lifecycle, beyond the gaps: µs on-CPU of this thread and of the writer, and µs of
    wall time. The writer thread exists in both arrangements: idle, it should cost nothing."""
    worker = AsyncLedger(ledger)
    inputs = [claims_for(n) for n in range(first, first + lifecycles)]
    await asyncio.sleep(0.05)

    async def run(name: str, *args: Any) -> Any:
        if on_writer:
            return await worker.call(name, *args)
        return ledger.run_batch([(name, args)])[0]

    caller = threading.get_native_id()
    writers = [thread.native_id for thread in worker._threads if thread.native_id]
    caller_before = _on_cpu_ns(caller)
    writer_before = sum(map(_on_cpu_ns, writers))
    started = time.perf_counter()
    for row, claims in inputs:
        outcome = await run("reserve", row, claims, ESTIMATE, row.ts + 900)
        _busy(gap)  # the loop's other work (mitmproxy's) while the writer idles
        hold = outcome.hold_id if outcome is not None else None
        await run("commit", row.request_id, hold, ACTUAL, time.time())
        _busy(gap)
    wall = time.perf_counter() - started
    caller_ns = _on_cpu_ns(caller) - caller_before
    writer_ns = sum(map(_on_cpu_ns, writers)) - writer_before
    worker.close()
    return {
        "caller_us": caller_ns / lifecycles / 1000 - 2 * gap * 1e6,
        "writer_us": writer_ns / lifecycles / 1000,
        "wall_us": (wall / lifecycles - 2 * gap) * 1e6,
    }


def handoff_table(lifecycles: int, gaps: tuple[float, ...] = (0.0, 0.001)) -> list[dict[str, Any]]:
    from drawdown.ledger.sqlite import SQLiteLedger

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for gap in gaps:
            for label, on_writer in (("writer thread", True), ("calling thread", False)):
                path = str(Path(folder) / f"handoff-{gap}-{on_writer}.db")
                ledger = SQLiteLedger(path)
                drive_direct(ledger, 50)  # warm up: create the instances, prepare statements
                costs = asyncio.run(handoff_costs(ledger, lifecycles, gap, on_writer))
                ledger.close()
                check(path, "sqlite", lifecycles + 50)
                rows.append({"ledger": "sqlite", "gap_ms": gap * 1000, "on": label, **costs})
            costs = asyncio.run(handoff_costs(_NullLedger(), lifecycles, gap, True))
            rows.append({"ledger": "none", "gap_ms": gap * 1000, "on": "writer thread", **costs})
    return rows


class _TimedConnection:
    """The ledger's connection, timing each statement it runs (keyed by its first words)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.spent: dict[str, int] = {}  # ns

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def _timed(self, method: Any, sql: str, *args: Any) -> Any:
        started = time.perf_counter_ns()
        try:
            return method(sql, *args)
        finally:
            key = " ".join(sql.split()[:3])
            self.spent[key] = self.spent.get(key, 0) + time.perf_counter_ns() - started

    def execute(self, sql: str, *args: Any) -> Any:
        return self._timed(self.conn.execute, sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        return self._timed(self.conn.executemany, sql, *args)


def anatomy(lifecycles: int) -> dict[str, Any]:
    """A lone request's two transactions, as the proxy runs them (one operation per batch, the
    bench's one agent run, so the rows this connection wrote last are not read again): µs per
    transaction, per statement and in Python around them, and the pages each appends to the
    WAL (each page a 24-byte frame header and the page, two pwrite calls)."""
    from drawdown.ledger.sqlite import SQLiteLedger

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "anatomy.db"
        ledger = SQLiteLedger(str(path))
        drive_direct(ledger, 50)
        (page_size,) = ledger.conn.execute("PRAGMA page_size").fetchone()
        ledger.conn.execute("PRAGMA wal_autocheckpoint = 0")  # the WAL only grows while counted
        ledger.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        wal = Path(f"{path}-wal")
        inputs = [claims_for(200) for _ in range(lifecycles)]  # one run, new request ids
        figures: dict[str, Any] = {
            kind: {"us": 0.0, "statements_us": {}, "wal_pages": 0} for kind in ("reserve", "commit")
        }
        timed = ledger.conn = _TimedConnection(ledger.conn)  # type: ignore[assignment]

        def run(kind: str, args: tuple[Any, ...]) -> Any:
            before, spent_before = wal.stat().st_size, dict(timed.spent)
            started = time.perf_counter_ns()
            result = ledger.run_batch([(kind, args)])[0]
            figures[kind]["us"] += (time.perf_counter_ns() - started) / 1000
            grown = wal.stat().st_size - before
            figures[kind]["wal_pages"] += grown // (page_size + 24)
            statements = figures[kind]["statements_us"]
            for key, ns in timed.spent.items():
                statements[key] = statements.get(key, 0) + (ns - spent_before.get(key, 0)) / 1000
            return result

        for row, claims in inputs:
            outcome = run("reserve", (row, claims, ESTIMATE, row.ts + 900))
            run("commit", (row.request_id, outcome.hold_id, ACTUAL, time.time()))
        ledger.conn = timed.conn
        ledger.close()
        check(str(path), "sqlite", lifecycles + 50)
    for part in figures.values():
        part["us"] /= lifecycles
        part["wal_pages"] /= lifecycles
        part["statements_us"] = {
            key: us / lifecycles for key, us in part["statements_us"].items() if us
        }
        part["python_us"] = part["us"] - sum(part["statements_us"].values())
    return {"page_size": page_size, "lifecycles": lifecycles, **figures}


@contextlib.contextmanager
def pg_schema(dsn: str) -> Iterator[str]:
    import psycopg

    schema = f"drawdown_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        sep = "&" if "?" in dsn else "?"
        yield f"{dsn}{sep}options=-c%20search_path%3D{schema}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def check(ledger_url: str, kind: str, expected: int) -> None:
    """The sums must be exact after the run, or the figure means nothing."""
    if kind == "sqlite":
        import sqlite3

        with contextlib.closing(sqlite3.connect(ledger_url)) as conn:
            found = conn.execute(
                "SELECT SUM(spent_requests), SUM(reserved_requests) FROM budget_instances "
                "WHERE budget = 'tenant'"
            ).fetchone()
    else:
        import psycopg

        with psycopg.connect(ledger_url) as conn:
            found = conn.execute(
                "SELECT SUM(spent_requests), SUM(reserved_requests) FROM budget_instances "
                "WHERE budget = 'tenant'"
            ).fetchone()
    assert tuple(int(v) for v in found) == (expected, 0), (
        f"{kind}: ledger sums off: {found} != ({expected}, 0)"
    )


def bench(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"backend": kind, "guards": GUARDS is not None}
    with contextlib.ExitStack() as stack:
        for mode in ("async", "direct"):
            if kind == "sqlite":
                from drawdown.ledger.sqlite import SQLiteLedger

                folder = stack.enter_context(tempfile.TemporaryDirectory())
                url = str(Path(folder) / f"bench-{mode}.db")
                ledger: Any = SQLiteLedger(url)
            else:
                from drawdown.ledger.postgres import PostgresLedger

                url = stack.enter_context(pg_schema(args.pg))
                ledger = PostgresLedger(url, writers=args.writers or 1)
            count = args.lifecycles if mode == "async" else max(200, args.lifecycles // 10)
            drive_direct(ledger, 50)  # warm up: create the instances, prepare statements
            if mode == "async":
                rate = asyncio.run(drive_async(ledger, count, args.concurrency, args.writers))
            else:
                rate = drive_direct(ledger, count)
            ledger.close()
            check(url, kind, count + 50)
            result[mode] = round(rate)
    return result


RUNAWAY_STEPS = (100, 1_000, 10_000, 50_000)
RUNAWAY_TIMED = 20  # lone reserves timed at each step


def runaway(kind: str, dsn: str, steps: tuple[int, ...] = RUNAWAY_STEPS) -> list[dict[str, Any]]:
    """A looping agent the loop guard refuses, which calls on: the time of one more guarded
    reserve (alone in its transaction, as at concurrency 1) once the run holds each number of
    refused rows. The guards count the run's rows only as far as their limits need, so it
    should not grow with them; the writer every proxy request waits for runs these reserves."""
    import psycopg

    looping = uuid.uuid4().hex  # one fingerprint: the same request again and again

    def refused() -> DecisionRow:
        row, _ = claims_for(0)
        row.fingerprint, row.request_id = looping, new_request_id()
        return row

    _, claims = claims_for(0)
    figures = []
    with contextlib.ExitStack() as stack:
        if kind == "sqlite":
            from drawdown.ledger.sqlite import SQLiteLedger

            folder = stack.enter_context(tempfile.TemporaryDirectory())
            url = str(Path(folder) / "runaway.db")
            ledger: Any = SQLiteLedger(url)
        else:
            from drawdown.ledger.postgres import PostgresLedger

            url = stack.enter_context(pg_schema(dsn))
            ledger = PostgresLedger(url)
        made = 0
        for step in steps:
            while made < step:
                count = min(500, step - made)
                ledger.run_batch(
                    [
                        ("reserve", (refused(), claims, ESTIMATE, time.time() + 900, ALL_GUARDS))
                        for _ in range(count)
                    ]
                )
                made += count
            if kind == "postgres":  # as autovacuum would have by now: plans on current figures
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("ANALYZE decisions")
            started = time.perf_counter()
            for _ in range(RUNAWAY_TIMED):
                outcome = ledger.reserve(refused(), claims, ESTIMATE, time.time() + 900, ALL_GUARDS)
                assert outcome.decision == "deny", outcome
            took = (time.perf_counter() - started) / RUNAWAY_TIMED
            made += RUNAWAY_TIMED
            figures.append(
                {"backend": kind, "rows_in_run": made, "reserve_ms": round(took * 1000, 3)}
            )
        ledger.close()
    return figures


def print_runaway(rows: list[dict[str, Any]]) -> None:
    print(
        f"a refused looping agent that calls on: one more guarded reserve (mean of {RUNAWAY_TIMED})"
    )
    for row in rows:
        print(
            f"  {row['backend']:<9} after {row['rows_in_run']:>6,} of its rows  {row['reserve_ms']:>7.2f} ms"
        )


def _emit(figures: Any, show: Any, as_json: bool) -> int:
    if as_json:
        print(json.dumps(figures, indent=2))
    else:
        show(figures)
    return 0


def print_handoff(rows: list[dict[str, Any]]) -> None:
    print("one reserve+commit lifecycle in flight, SQLite, µs per lifecycle (schedstat):")
    print(
        f"  {'ledger':<7} {'gap':>6}  {'run on':<15} {'caller CPU':>10} {'writer CPU':>10} {'wall':>7}"
    )
    for row in rows:
        print(
            f"  {row['ledger']:<7} {row['gap_ms']:>4.1f}ms  {row['on']:<15} "
            f"{row['caller_us']:>10.0f} {row['writer_us']:>10.0f} {row['wall_us']:>7.0f}"
        )


def print_anatomy(parts: dict[str, Any]) -> None:
    print(
        f"one operation per transaction, SQLite, {parts['page_size']}-byte pages, "
        f"µs per transaction ({parts['lifecycles']} lifecycles):"
    )
    for kind in ("reserve", "commit"):
        part = parts[kind]
        print(
            f"  {kind}: {part['us']:.0f} µs, {part['wal_pages']:.1f} pages to the WAL; "
            f"Python around the statements {part['python_us']:.0f} µs"
        )
        for key, us in sorted(part["statements_us"].items(), key=lambda item: -item[1]):
            print(f"    {us:>6.1f}  {key}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lifecycles", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument(
        "--pg", default=os.environ.get("DRAWDOWN_PG_DSN") or "postgresql://127.0.0.1:5432/test"
    )
    parser.add_argument("--writers", type=int, default=None, help="AsyncLedger writer threads")
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument(
        "--tenants", type=int, default=1, help="1: all share one hot row (worst case) [1]"
    )
    parser.add_argument(
        "--guards",
        action="store_true",
        help="check the loop, step_count and fan_out guards in each reserve, as an enforce "
        "policy that denies on them does",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per lifecycle (valgrind)"
    )
    parser.add_argument(
        "--handoff", action="store_true", help="one lifecycle in flight: the writer thread's cost"
    )
    parser.add_argument(
        "--anatomy", action="store_true", help="a lone lifecycle's statements and WAL pages"
    )
    parser.add_argument(
        "--runaway",
        action="store_true",
        help="a refused looping agent that calls on: a guarded reserve as its run grows to 50,000 rows",
    )
    parser.add_argument("--run-batches", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global TENANTS, GUARDS
    TENANTS = max(1, args.tenants)
    GUARDS = ALL_GUARDS if args.guards else None
    if args.run_batches:  # the counted run itself, under callgrind
        run_batches(*args.run_batches)
        return 0
    if args.runaway:
        kinds = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
        return _emit(
            [f for kind in kinds for f in runaway(kind, args.pg)], print_runaway, args.json
        )
    if args.handoff:
        return _emit(handoff_table(min(args.lifecycles, 3000)), print_handoff, args.json)
    if args.anatomy:
        return _emit(anatomy(min(args.lifecycles, 2000)), print_anatomy, args.json)
    if args.instructions:
        count = count_instructions(guards=args.guards)
        if args.json:
            print(
                json.dumps(
                    {
                        "backend": "sqlite",
                        "guards": args.guards,
                        "instructions_per_lifecycle": count,
                    }
                )
            )
        else:
            print(
                f"reserve+commit, 3 budget instances{GUARDED if args.guards else ''}, "
                f"batches of {COUNTED_BATCH}, SQLite: {count:,} instructions per lifecycle (callgrind)"
            )
        return 0
    kinds = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    results = [bench(kind, args) for kind in kinds]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"reserve+commit lifecycles/s, 3 budget instances each{GUARDED if args.guards else ''} "
            f"({args.lifecycles} lifecycles, {args.concurrency} in flight, {args.tenants} tenant(s), "
            f"{os.cpu_count()} CPUs)"
        )
        for r in results:
            print(
                f"  {r['backend']:<9} async (proxy path) {r['async']:>7}/s   direct {r['direct']:>6}/s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
