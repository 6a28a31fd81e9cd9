"""Policies: YAML files → validated, compiled `Policy` objects (SPEC §2–§6)."""

from __future__ import annotations

import os
from pathlib import Path

from .model import Action, Budget, Policy
from .schema import compile_policy
from .source import PolicyInvalid, Problem, policy_files, read_documents

__all__ = [
    "Action",
    "Budget",
    "Policy",
    "PolicyInvalid",
    "Problem",
    "load_policy",
    "policy_fingerprint",
]


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load a policy file or folder; raises PolicyInvalid listing every `FILE:LINE: message`."""
    root = Path(path)
    documents, problems = read_documents(root)
    texts = []
    for file, _ in documents:
        try:
            texts.append(Path(file).read_bytes())
        except OSError:  # vanished between reads: the next reload will see it
            texts.append(b"")
    return compile_policy(documents, texts, problems)


def policy_fingerprint(path: str | os.PathLike[str]) -> tuple[tuple[str, int, int], ...]:
    """Cheap change detection for hot reload: names, sizes and mtimes of the policy's files."""
    root = Path(path)
    try:
        files = policy_files(root) if root.exists() else []
        return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    except OSError:
        return ()
