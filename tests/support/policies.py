"""A policy written to a test's folder and loaded as the proxy loads it."""

from __future__ import annotations

from pathlib import Path

from drawdown.policy import load_policy
from drawdown.policy.model import Policy


def policy_from(tmp_path: Path, text: str, name: str = "policy.yaml") -> Policy:
    path = tmp_path / name
    path.write_text(text)
    return load_policy(str(path))
