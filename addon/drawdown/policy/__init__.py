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


def load_policy(path: str | os.PathLike[str], *, once: bool = False) -> Policy:
    """Load a policy file or folder; raises PolicyInvalid listing every `FILE:LINE: message`.
    `once`: for a command that reads it once, which may be given a pipe (`<(…)`, /dev/stdin)
    where a running proxy, which reads its policy again at each edit, may not."""
    documents, texts, problems = read_documents(Path(path), pipe=once)
    return compile_policy(documents, texts, problems)


def policy_fingerprint(path: str | os.PathLike[str]) -> tuple[tuple[str | int, ...], ...]:
    """Cheap change detection for hot reload: each policy file's name and what `stat` says of
    its content. Size and mtime alone miss a file replaced by one of the same size whose mtime
    was kept (`cp -p`, `rsync -a`, `install -p` and then `mv`); its inode and ctime do not."""
    root = Path(path)
    try:
        files = policy_files(root) if root.exists() else []
        found: list[tuple[str | int, ...]] = []
        for file in files:
            status = file.stat()
            found.append(
                (
                    str(file),
                    status.st_mtime_ns,
                    status.st_size,
                    status.st_ino,
                    status.st_dev,
                    status.st_ctime_ns,
                )
            )
        return tuple(found)
    except OSError:
        return ()
