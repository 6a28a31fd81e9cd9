"""The mitmproxy master behind `drawdown run`: mitmdump's addons, dispatched in a few groups.

mitmproxy's AddonManager delivers every event to every addon in its chain, each inside its
own `safecall` context manager and coroutine, and after each flow event makes a second pass
with an `update` event. With mitmdump's thirty-odd addons that dispatch was about a third of
drawdown's CPU per request (benchmarks/HISTORY.md), most of it on addons with nothing to do. Nested
addons (an addon's `addons` attribute, mitmproxy's own convention, as ScriptLoader uses it)
are found by one traversal inside their parent's single dispatch. So this master nests
mitmdump's addons under a few parents: every addon, option and command is still there, in
mitmdump's order, and an event costs five dispatches instead of thirty-seven.

A group's members never change, so the hooks each event reaches in it are looked up once
and kept (`GroupedAddonManager`): mitmproxy would otherwise walk the group and `getattr`
every member for each of the ~8 events of a request. And the `update` pass mitmproxy makes
after each flow event (four per request) is skipped while no addon has an `update` hook.

What a group gives up: a hook that raises skips the later members of its group for that
event (the error is logged as before). mitmproxy's own addons don't raise in normal
operation; user scripts might, so ScriptLoader keeps a chain entry of its own, and drawdown
heads its own group.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import addonmanager, ctx, flow, hooks, master, options
from mitmproxy import addons as mitmproxy_addons
from mitmproxy.addons import errorcheck, keepserving, readfile, termlog
from mitmproxy.addons.script import ScriptLoader


class AddonGroup:
    """A parent for addons that are dispatched together: one chain entry for all of them.

    Its members are fixed: none may have children of its own (ScriptLoader's change as
    scripts load, which is why it keeps its own chain entry), so their hooks can be cached."""

    def __init__(self, name: str, members: list[Any]) -> None:
        dynamic = [type(m).__name__ for m in members if hasattr(m, "addons")]
        if dynamic:
            raise ValueError(f"addons with children of their own cannot join a group: {dynamic}")
        self.name = name  # the AddonManager looks addons up by name; two groups need two
        self.addons = members
        self.hooks: dict[str, list[tuple[Any, Any]]] = {}


_UPDATE = hooks.UpdateHook([])


class GroupedAddonManager(addonmanager.AddonManager):
    """mitmproxy's AddonManager, with each group's hooks per event looked up once."""

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        """As mitmproxy's, less the `update` pass after a flow event when no addon has that hook
        (none of mitmdump's has; a user script may)."""
        message = event.args()[0]
        await self.trigger_event(event)
        if isinstance(message, flow.Flow) and self._anyone_has(_UPDATE):
            await self.trigger_event(hooks.UpdateHook([message]))

    def _anyone_has(self, event: hooks.Hook) -> bool:
        return any(True for entry in self.chain for _ in self._iter_hooks(entry, event))

    def _iter_hooks(self, addon: Any, event: hooks.Hook) -> Any:
        if not isinstance(addon, AddonGroup):
            return super()._iter_hooks(addon, event)
        found = addon.hooks.get(event.name)
        if found is None:
            found = addon.hooks[event.name] = list(super()._iter_hooks(addon, event))
        return found


class _ConnectionChatter(logging.Filter):
    """mitmproxy's lines for each connection opened and closed (two a connection), at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        return not isinstance(message, str) or not (
            message in ("client connect", "client disconnect")
            or message.startswith(("server connect ", "server disconnect "))
        )


_CHATTER = _ConnectionChatter()  # one for the process: the logger is the process's too


class TermLog(termlog.TermLog):
    """mitmproxy's terminal log, as `drawdown run` wants it for a service: without mitmproxy's
    "client connect", "server disconnect …" lines, so that at the default verbosity it shows
    what happened (drawdown's denials, reloads, ledger trouble; mitmproxy's warnings and failed
    connections) rather than burying it. termlog_verbosity=warn, the other way to be rid of
    them, hid every denial too. termlog_verbosity=debug brings them back."""

    name = "termlog"  # mitmdump's addon, in its place

    def load(self, loader: Any) -> None:
        super().load(loader)
        # At the default verbosity, which no configure event reports unless it is set.
        logging.getLogger("mitmproxy.proxy.server").addFilter(_CHATTER)

    def configure(self, updated: set[str]) -> None:
        super().configure(updated)
        if "termlog_verbosity" in updated:
            logger = logging.getLogger("mitmproxy.proxy.server")
            if ctx.options.termlog_verbosity == "debug":
                logger.removeFilter(_CHATTER)
            else:
                logger.addFilter(_CHATTER)

    def uninstall(self) -> None:
        logging.getLogger("mitmproxy.proxy.server").removeFilter(_CHATTER)
        super().uninstall()


class DrawdownMaster(master.Master):
    """mitmdump without its flow printer (drawdown logs its own lines) or its per-connection
    lines (TermLog), then `tail`."""

    def __init__(self, opts: options.Options, tail: list[Any]) -> None:
        super().__init__(opts, with_termlog=False)
        self.addons = GroupedAddonManager(self)  # before any addon registers with the manager
        self._termlog_addon = TermLog()
        self.addons.add(self._termlog_addon)
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
