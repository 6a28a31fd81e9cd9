"""Drive the drawdown addon without a proxy (mitmproxy's taddons): configured with a policy and
its own SQLite ledger, the test's steps run against it, then its `done` hook."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from drawdown.addon import Drawdown
from mitmproxy.test import taddons


def drive(
    tmp_path: Path,
    policy_text: str,
    steps: Callable[[Drawdown], Awaitable[None]],
    **options: str,
) -> Path:
    """Run `steps` against a configured addon; return the ledger's path."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    db = tmp_path / "l.db"

    async def main() -> None:
        addon = Drawdown()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(db), **options)
            await steps(addon)
            addon.done()

    asyncio.run(main())
    return db
