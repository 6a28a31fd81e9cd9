"""`pip install .` leaves out the demo's extra (`openai`): `drawdown demo` must then say so in
one line rather than start a proxy and show the agent's ModuleNotFoundError traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Imported at every interpreter's start (PYTHONPATH first on sys.path): `import openai` then
# fails as it does where openai was never installed, in this process and in its children.
NO_OPENAI = "import sys\nsys.modules['openai'] = None\n"


def test_the_demo_without_openai_says_which_extra_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_OPENAI)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(tmp_path), env.get("PYTHONPATH")) if part
    )
    blocked = subprocess.run(
        [sys.executable, "-c", "import openai"], env=env, capture_output=True, text=True
    )
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr  # the setup holds

    done = subprocess.run(
        [sys.executable, "-m", "drawdown", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("drawdown demo: ") and "openai" in lines[0]
    assert "'.[demo]'" in lines[0]
    assert "Traceback" not in done.stderr
