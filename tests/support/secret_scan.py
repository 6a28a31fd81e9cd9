"""Search what a proxy leaves behind for secrets: its ledger files and its log."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.support.proxy import DrawdownProcess


def scan_ledger_and_log(
    proxy: DrawdownProcess, db: Path, assert_clean: Callable[[str, bytes | str], None]
) -> set[str]:
    """Check every file of the ledger (db, -wal, -shm) while the proxy runs, when the WAL holds
    the recent rows, and again after the checkpoint at its shutdown; then its log. Returns the
    names of the files seen while it ran."""

    def ledger_files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in db.parent.glob(db.name + "*")}

    running = ledger_files()
    for name, blob in running.items():
        assert_clean(f"ledger file {name}", blob)
    proxy.stop()
    for name, blob in ledger_files().items():
        assert_clean(f"ledger file {name}", blob)
    assert_clean("the proxy log", proxy.log_text())
    return set(running)
