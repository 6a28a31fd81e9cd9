"""The project's scripts/*.py, imported as modules so tests can drive their parts, and the
bench's stand-in upstream run on a thread of the test process."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as the module `drawdown_<name>`."""
    spec = importlib.util.spec_from_file_location(f"drawdown_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def stand_in(bench: ModuleType) -> Iterator[int]:
    """The bench's stand-in upstream on a thread: its own upstream() forks, which is unsafe
    from pytest's threaded process (the bench forks before it starts any thread)."""
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(bench._Upstream, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        loop.close()
