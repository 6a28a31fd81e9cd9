"""`./scripts/demo` is the first thing a newcomer runs: `drawdown demo` end to end (a real proxy,
the official openai SDK as the runaway agent, the stand-in LLM over TLS), checked the way the
newcomer reads it — and against the ledger it leaves with --keep."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from drawdown.cacerts import ensure_ca

pytestmark = pytest.mark.e2e


def test_the_demo_stops_the_runaway_agent_at_its_run_budget() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "drawdown", "demo", "--keep"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    allowed = re.findall(r"^  step +(\d+)  ✓ ", out, re.MULTILINE)
    assert allowed == [str(n) for n in range(1, 13)], out
    assert re.search(r"^  step 13  ✗ HTTP 402 from the proxy: drawdown: budget ", out, re.M), out
    assert "agent stopped after 12 calls" in out
    assert "12 calls reached the LLM; the denied one never left the proxy." in out
    assert re.search(r"run:run-1 +budget_exhausted +13 +13 +12 +1 +0 ", out), out
    assert [line for line in out.splitlines() if line != line.rstrip()] == []

    kept = re.search(r"demo files kept in (\S+) \(ledger: (\S+)\)", out)
    assert kept is not None, out
    with sqlite3.connect(kept.group(2)) as db:
        rows = db.execute(
            "SELECT decision, status, actual_usd FROM decisions ORDER BY ts"
        ).fetchall()
    assert [r[0] for r in rows] == ["allow"] * 12 + ["deny"]
    assert all(status == 200 and usd > 0 for _, status, usd in rows[:12]), rows
    assert rows[12][1] == 402 and not rows[12][2], rows[12]
    shutil.rmtree(Path(kept.group(1)))


def test_the_demo_runs_in_a_shell_that_evaled_drawdown_env_for_another_proxy(
    tmp_path: Path,
) -> None:
    """The README has agents' shells run `eval "$(drawdown env)"`; the demo run from such a
    shell must reach its own proxy. Python's HTTP stack reads the lower-case `https_proxy`
    before `HTTPS_PROXY`: overriding only the upper-case names sent the demo's agent to the
    shell's proxy (here, nothing listening: a connection error and a traceback)."""
    with socket.socket() as closed:  # a port nothing listens on once this socket closes
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    ensure_ca(tmp_path)  # the other proxy's CA: `env` reads it, and never makes one
    python = shlex.quote(sys.executable)
    script = (
        f'eval "$({python} -m drawdown env --confdir {shlex.quote(str(tmp_path))} '
        f'--listen 127.0.0.1:{port})" && {python} -m drawdown demo'
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=180)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "12 calls reached the LLM; the denied one never left the proxy." in out
    assert "Traceback" not in done.stderr, done.stderr
