"""`./scripts/standin`, as the README's week tells a reader to use it: the lines it prints,
pasted into the shell that starts `drawdown run`, send the proxy's connections to it, and an
unmodified openai SDK call through the proxy is answered, metered and charged."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy import DrawdownProcess

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
POLICY = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*", usd: 1.00}
"""


@pytest.fixture
def standin_script() -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "standin")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:  # up to its last line of instructions
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C stops it"):
            break
    else:
        pytest.fail(f"scripts/standin exited: {lines}")
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)


def test_the_lines_scripts_standin_prints_run_a_proxy_against_it(
    standin_script: tuple[subprocess.Popen[str], list[str]], tmp_path: Path
) -> None:
    proc, lines = standin_script
    (export,) = [line.strip() for line in lines if line.strip().startswith("export ")]
    name, _, value = export.removeprefix("export ").partition("=")
    (run,) = [line.strip() for line in lines if line.strip().startswith("drawdown run … ")]
    flags = shlex.split(run.removeprefix("drawdown run … "))
    assert next(f for f in flags if f != "--set").startswith("scripts=")
    # As the reader's shell runs it: nothing of the tests' own stand-in or CA.
    proxy = DrawdownProcess(
        POLICY, tmp_path / "week.db", tmp_path / "conf", flags, env={name: shlex.split(value)[0]}
    )
    try:
        with proxy.openai_client(max_retries=0) as client:
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
            )
        assert answer.usage is not None and answer.usage.total_tokens > 0
        proxy.wait_for_query(
            "SELECT COUNT(*) FROM decisions WHERE completed_at IS NOT NULL",
            until=lambda rows: rows[0][0] == 1,
        )
        ((status, tokens_in, tokens_out, usd),) = proxy.query(
            "SELECT status, tokens_in, tokens_out, actual_usd FROM decisions"
        )
    finally:
        proxy.stop()
    assert (status, tokens_in, tokens_out) == (
        200, answer.usage.prompt_tokens, answer.usage.completion_tokens,
    ) and usd > 0  # fmt: skip
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert proc.stdout is not None
    assert re.search(r"stand-in stopped after 1 request\(s\)", proc.stdout.read())


@pytest.mark.parametrize(("args", "status"), [(["--help"], 0), (["--port", "5"], 2)])
def test_scripts_standin_reads_its_arguments_rather_than_starting_regardless(
    args: list[str], status: int
) -> None:
    """`--help` started the server, as did any argument at all."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "standin"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == status, done.stdout + done.stderr
    assert (
        done.stdout.startswith("usage: scripts/standin") or "usage: scripts/standin" in done.stderr
    )
    assert "stand-in upstream on" not in done.stdout
