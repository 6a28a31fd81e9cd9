"""scripts/_env.sh: the venv every script shares is installed once per pyproject and extras."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_script_wanting_fewer_extras_than_are_installed_installs_nothing(tmp_path: Path) -> None:
    """./scripts/run after ./scripts/test or ./scripts/demo once reinstalled the project."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    python = venv / "bin" / "python"
    # Stands in for the venv's Python: any version check passes, pip installs are logged.
    python.write_text(
        f'#!/bin/sh\ncase "$*" in *"pip install --quiet -e"*) echo "$*" >> {log};; esac\nexit 0\n'
    )
    python.chmod(0o755)

    def ensure(*extras: str) -> None:
        calls = " && ".join(f"ensure_venv {extra}" for extra in extras)
        subprocess.run(
            ["bash", "-c", f"source {ROOT / 'scripts' / '_env.sh'} && {calls}"],
            env={"PATH": "/usr/bin:/bin", "DRAWDOWN_VENV": str(venv)},
            check=True,
            capture_output=True,
        )

    def installed() -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.rsplit(" ", 1)[-1].removeprefix(str(ROOT)) or "." for line in lines]

    ensure("test", "''", "test")
    assert installed() == ["[test]"]
    ensure("demo", "''", "test", "demo")
    assert installed() == ["[test]", "[test,demo]"]  # the union: no reinstall back and forth
    (venv / ".drawdown-installed").write_text("an-older-pyproject+test,demo\n")
    ensure("''")
    assert installed() == ["[test]", "[test,demo]", "."]  # pyproject changed: installed again
