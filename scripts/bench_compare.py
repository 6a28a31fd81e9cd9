#!/usr/bin/env python
"""Does a change to drawdown make it faster? Interleaved A/B rounds against bare mitmdump and
drawdown as it ships (run it with ./scripts/bench --compare).

Each variant is drawdown started with extra arguments: a `--set scripts=FILE` that patches one
behaviour for the experiment (benchmarks/experiments/ holds the ones BENCHMARKS.md cites), or
one of `drawdown run`'s own options. Every proxy stays up and they take turns, round after
round, on the bench's load (a ~1,000-token chat completion, 3 budgets): on a shared VM the
machine's speed drifts by tens of percent within a minute, and only a comparison made within
each round survives that. The figures are per-round ratios and their medians, and how many
rounds each variant beat drawdown as shipped in.

    ./scripts/bench --compare [--rounds 6] [--seconds 4] [--connections 1,16] [--json FILE] \\
        pinned="--cpu-affinity auto" \\
        adaptive="--set scripts=benchmarks/experiments/adaptive_pin.py"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/bench.py: the stand-in, the proxies, the load

BARE, SHIPPED = "bare", "drawdown"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`LABEL=ARGUMENTS` (shell-quoted, as typed after `drawdown run`) -> (label, arguments)."""
    label, equals, arguments = text.partition("=")
    label = label.strip()
    if not equals or not label:
        raise ValueError(
            f"a variant is LABEL=ARGUMENTS, e.g. pinned='--cpu-affinity auto'; got {text!r}"
        )
    if label in (BARE, SHIPPED):
        raise ValueError(f"{label!r} is already compared; name the variant otherwise")
    try:
        return label, shlex.split(arguments)
    except ValueError as exc:  # an unclosed quote
        raise ValueError(f"variant {label!r}: {exc}") from None


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per proxy, from rounds of {label: measured figures}: its rate over bare's and over
    shipped drawdown's in each round, their medians, its median added p50 over bare, and in
    how many rounds it served more than shipped drawdown."""
    summary: dict[str, dict[str, Any]] = {}
    for label in rounds[0]:
        to_bare = [r[label]["rps"] / r[BARE]["rps"] for r in rounds]
        to_shipped = [r[label]["rps"] / r[SHIPPED]["rps"] for r in rounds]
        summary[label] = {
            "rps": [r[label]["rps"] for r in rounds],
            "to_bare": to_bare,
            "to_bare_median": statistics.median(to_bare),
            "to_shipped_median": statistics.median(to_shipped),
            "added_p50_median": statistics.median(r[label]["p50"] - r[BARE]["p50"] for r in rounds),
            "beat_shipped": sum(r[label]["rps"] > r[SHIPPED]["rps"] for r in rounds),
            "rounds": len(rounds),
        }
    return summary


def describe(connections: int, summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        f"c={connections}: {'proxy':<20} {'× bare':>7} {'× shipped':>10} {'added p50':>10}  rounds × bare"
    ]
    for label, s in summary.items():
        beat = (
            ""
            if label in (BARE, SHIPPED)
            else f"  (beat shipped in {s['beat_shipped']} of {s['rounds']})"
        )
        rounds = ", ".join(f"{ratio:.0%}" for ratio in s["to_bare"])
        lines.append(
            f"      {label:<20} {s['to_bare_median']:>7.1%} {s['to_shipped_median']:>10.1%} "
            f"{s['added_p50_median']:>+9.2f}ms  {rounds}{beat}"
        )
    return lines


def compare(
    variants: dict[str, list[str]],
    rounds: int,
    seconds: int,
    connections: list[int],
    workdir: Path,
    upstream_port: int | None = None,
) -> dict[int, list[dict[str, dict[str, float]]]]:
    """Bare mitmdump, shipped drawdown and each variant, all up at once, taking turns: by
    connections, each round's figures by label (bench.measured's). `upstream_port`: a stand-in
    already serving (else the bench's own is started)."""
    specs: dict[str, bench.ProxySpec] = {BARE: ("bare", None, 1), SHIPPED: ("drawdown", None, 1)}
    specs.update({label: ("drawdown", args, 1) for label, args in variants.items()})
    body = bench.prompt_body(1000)
    results: dict[int, list[dict[str, dict[str, float]]]] = {}
    serving = bench.upstream() if upstream_port is None else contextlib.nullcontext(upstream_port)
    with serving as up, bench.proxies(specs, workdir, up) as started:
        for conns in connections:
            for port, _ in started.values():  # warm-up
                bench.load(port, up, body, conns, bench.WARM_UP_SECONDS, workdir)
            results[conns] = []
            for number in range(1, rounds + 1):
                figures = {
                    label: bench.measured(
                        port, bench.pids(procs), up, body, conns, seconds, workdir
                    )
                    for label, (port, procs) in started.items()
                }
                failed = {label: f["errors"] for label, f in figures.items() if f["errors"]}
                if failed:
                    raise RuntimeError(f"c={conns} round {number}: non-2xx answers {failed}")
                results[conns].append(figures)
                print(
                    f"c={conns} round {number}: "
                    + ", ".join(f"{label} {f['rps']:.0f}/s" for label, f in figures.items()),
                    flush=True,
                )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="*", metavar="LABEL=ARGUMENTS")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds [6]")
    parser.add_argument("--seconds", type=int, default=4, help="per load run [4]")
    parser.add_argument("--connections", default="1,16", help="concurrencies [1,16]")
    parser.add_argument("--json", metavar="FILE", help="also write every round's figures as JSON")
    args = parser.parse_args()
    try:
        variants = dict(parse_variant(text) for text in args.variants)
        connections = [int(c) for c in args.connections.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if args.rounds < 1 or args.seconds < 1 or not all(c > 0 for c in connections):
        parser.error("--rounds, --seconds and --connections must be positive")
    print(f"drawdown compare — {bench.machine()}; {args.rounds} rounds of {args.seconds} s")
    with tempfile.TemporaryDirectory(prefix="drawdown-compare-") as tmp:
        results = compare(variants, args.rounds, args.seconds, connections, Path(tmp))
    report: dict[str, Any] = {
        "machine": bench.machine(),
        "variants": variants,
        "by_connections": {},
    }
    print()
    for conns, rounds in results.items():
        summary = summarize(rounds)
        print("\n".join(describe(conns, summary)))
        report["by_connections"][str(conns)] = {"rounds": rounds, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
