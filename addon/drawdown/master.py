"""The mitmproxy master behind `drawdown run`: mitmdump's addons, dispatched in a few groups.

mitmproxy's AddonManager delivers every event to every addon in its chain, each inside its
own `safecall` context manager and coroutine, and after each flow event makes a second pass
with an `update` event. With mitmdump's thirty-odd addons that dispatch was about a third of
drawdown's CPU per request (BENCHMARKS.md), most of it on addons with nothing to do. Nested
addons (an addon's `addons` attribute, mitmproxy's own convention, as ScriptLoader uses it)
are found by one traversal inside their parent's single dispatch. So this master nests
mitmdump's addons under a few parents: every addon, option and command is still there, in
mitmdump's order, and an event costs five dispatches instead of thirty-seven.

What a group gives up: a hook that raises skips the later members of its group for that
event (the error is logged as before). mitmproxy's own addons don't raise in normal
operation; user scripts might, so ScriptLoader keeps a chain entry of its own, and drawdown
heads its own group.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import addons as mitmproxy_addons
from mitmproxy import master, options
from mitmproxy.addons import errorcheck, keepserving, readfile
from mitmproxy.addons.script import ScriptLoader


class AddonGroup:
    """A parent for addons that are dispatched together: one chain entry for all of them."""

    def __init__(self, name: str, members: list[Any]) -> None:
        self.name = name  # the AddonManager looks addons up by name; two groups need two
        self.addons = members


class DrawdownMaster(master.Master):
    """mitmdump without its flow printer (drawdown logs its own lines), then `tail`."""

    def __init__(self, opts: options.Options, tail: list[Any]) -> None:
        super().__init__(opts, with_termlog=True)
        defaults = [
            *mitmproxy_addons.default_addons(),
            keepserving.KeepServing(),
            readfile.ReadFileStdin(),
            errorcheck.ErrorCheck(),
        ]
        at = next(i for i, addon in enumerate(defaults) if isinstance(addon, ScriptLoader))
        self.addons.add(
            AddonGroup("mitmproxy-core", defaults[:at]),
            defaults[at],
            AddonGroup("mitmproxy-more", defaults[at + 1 :]),
            AddonGroup("drawdown-group", tail),
        )
