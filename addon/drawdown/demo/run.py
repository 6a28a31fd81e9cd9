"""Orchestrates the demo: stand-in LLM, a real `drawdown run` process, the agent, the run report."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..cacerts import ca_bundle
from ..cli import agent_environment
from ..report import build, render_text
from .upstream import Upstream

RUN_BUDGET_USD = "0.05"
POLICY = """\
# The demo's policy: one OpenAI-compatible host, and a $%(budget)s budget per agent run.
mode: enforce
identity:
  agent: [{proxy_user: true}, {value: anonymous}]
  run:   [{proxy_password: true}, {idle_split: 300}]
actions:
  - {kind: llm, provider: openai, match: {host: "127.0.0.1:%(port)d", path: "/v1/**"}}
budgets:
  - {scope: "agent:*/run:*", usd: %(budget)s}
"""


def _start_proxy(
    folder: Path, policy: Path, ca: Path
) -> tuple[subprocess.Popen[str], str, list[str]]:
    command = [
        sys.executable, "-m", "drawdown", "run",
        "--policy", str(policy), "--db", str(folder / "demo.db"),
        "--listen", "127.0.0.1:0", "--confdir", str(folder / "confdir"),
        "--set", f"ssl_verify_upstream_trusted_ca={ca}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("drawdown listening on "):
            url = line.split()[-1]
            threading.Thread(
                target=lambda: lines.extend(text.rstrip() for text in proc.stdout), daemon=True
            ).start()
            return proc, url, lines
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the proxy did not start:\n" + "\n".join(lines))


# The demo's agent is the official openai SDK, an extra (`drawdown[demo]`), not a dependency:
# `pip install .` alone leaves it out, and the agent would die on its import with a traceback.
MISSING_OPENAI = (
    "drawdown demo: the demo's agent is the official openai SDK, which is not installed; "
    "install the demo extra: pip install '.[demo]' from the checkout (or pip install openai)"
)


def run_demo(keep: bool = False) -> int:
    if importlib.util.find_spec("openai") is None:
        print(MISSING_OPENAI, file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="drawdown-demo-"))
    started = time.monotonic()
    try:
        print("drawdown demo — a runaway agent meets its run budget\n")
        with Upstream(folder) as upstream:
            policy = folder / "policy.yaml"
            policy.write_text(POLICY % {"port": upstream.port, "budget": RUN_BUDGET_USD})
            print(f"  stand-in LLM (OpenAI API format)  {upstream.url}")
            proxy, proxy_url, proxy_log = _start_proxy(folder, policy, upstream.ca)
            try:
                print(
                    f"  drawdown proxy                    {proxy_url}   (run budget ${RUN_BUDGET_USD})"
                )
                host_port = proxy_url.removeprefix("http://")
                bundle = ca_bundle(folder / "confdir")
                env = dict(os.environ)
                # What `eval "$(drawdown env --agent researcher --run run-1)"` sets, over what
                # the shell had (it may have eval'ed it for another proxy): nothing else changes.
                proxy_with_identity = f"http://researcher:run-1@{host_port}"
                env.update(agent_environment(proxy_with_identity, bundle))
                env.pop("NO_PROXY", None)
                env.pop("no_proxy", None)
                print(
                    "  agent: official openai SDK, HTTPS_PROXY → drawdown, looping on tool calls\n"
                )
                agent = subprocess.run(
                    [sys.executable, "-m", "drawdown.demo.agent", f"{upstream.url}/v1"],
                    env=env,
                    timeout=120,
                )
            finally:
                proxy.send_signal(signal.SIGTERM)
                try:
                    proxy.wait(20)
                except subprocess.TimeoutExpired:
                    proxy.kill()
            reached = upstream.calls
        report = build(str(folder / "demo.db"), run="run-1")
        print("\nThe run report (drawdown report --run run-1):\n")
        print("\n".join(f"  {line}" if line else "" for line in render_text(report).split("\n")))
        runs = report["runs"]
        stopped = agent.returncode == 0 and runs and runs[0]["status"] == "budget_exhausted"
        elapsed = f"({time.monotonic() - started:.1f} s)"
        if stopped:
            print(
                f"\n  {reached} calls reached the LLM; the denied one never left the proxy. {elapsed}"
            )
        else:
            print(f"\n  {reached} calls reached the LLM. {elapsed}")
        if keep:
            print(f"  demo files kept in {folder} (ledger: {folder / 'demo.db'})")
        if not stopped:
            print(
                "\nthe demo did not end as expected; proxy log:\n" + "\n".join(proxy_log),
                file=sys.stderr,
            )
            return 1
        return 0
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
