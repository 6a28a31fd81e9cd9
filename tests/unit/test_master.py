"""DrawdownMaster: every mitmdump addon, option and command, dispatched in a few groups."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from drawdown.addon import Drawdown
from drawdown.cli import Announce
from drawdown.master import AddonGroup, DrawdownMaster
from mitmproxy import options
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster


def _in_loop(build: Any) -> Any:
    async def main() -> Any:
        return build()

    return asyncio.run(main())


def _names(master: Any) -> set[str]:
    return {
        name for name, addon in master.addons.lookup.items() if not isinstance(addon, AddonGroup)
    }


def test_it_has_every_addon_option_and_command_mitmdump_has() -> None:
    def build() -> tuple[Any, Any]:
        dump = DumpMaster(options.Options(), with_termlog=True, with_dumper=False)
        dump.addons.add(Drawdown(), Announce())
        ours = DrawdownMaster(options.Options(), tail=[Drawdown(), Announce()])
        return dump, ours

    dump, ours = _in_loop(build)
    assert _names(ours) == _names(dump)
    assert set(ours.options.keys()) == set(dump.options.keys())
    assert set(ours.commands.commands) == set(dump.commands.commands)
    # ... reached through five chain entries instead of one per addon
    assert len(dump.addons.chain) > 30
    assert len(ours.addons.chain) == 5


def test_nested_addons_still_see_flow_events_and_options(tmp_path: Any) -> None:
    seen: list[str] = []

    class Last:
        def requestheaders(self, flow: Any) -> None:
            seen.append(flow.request.headers.get("x-added", ""))

    async def main() -> Any:
        master = DrawdownMaster(options.Options(confdir=str(tmp_path)), tail=[Last()])
        master.options.update(modify_headers=["/~q/x-added/yes"])
        flow = tflow.tflow()
        await master.addons.handle_lifecycle(HttpRequestHeadersHook(flow))
        return flow

    flow = asyncio.run(main())
    # modifyheaders sits inside a group; its option took effect and its hook ran, before ours
    assert flow.request.headers["x-added"] == "yes"
    assert seen == ["yes"]


def test_a_failing_user_script_does_not_skip_mitmproxys_later_addons(tmp_path: Any) -> None:
    script = tmp_path / "broken.py"
    script.write_text("def requestheaders(flow):\n    raise RuntimeError('a user script bug')\n")

    async def main() -> Any:
        master = DrawdownMaster(options.Options(confdir=str(tmp_path)), tail=[])
        master.options.update(scripts=[str(script)], modify_headers=["/~q/x-added/yes"])
        loader = master.addons.get("scriptloader")
        for _ in range(200):  # mitmproxy loads scripts on a task of their own
            if loader.addons and loader.addons[0].ns is not None:
                break
            await asyncio.sleep(0.01)
        assert loader.addons[0].ns is not None, "the script never loaded"
        flow = tflow.tflow()
        await master.addons.handle_lifecycle(HttpRequestHeadersHook(flow))
        return flow

    flow = asyncio.run(main())
    # modifyheaders runs after ScriptLoader in mitmdump's order; the script has its own entry
    assert flow.request.headers["x-added"] == "yes"


def test_a_groups_hooks_are_looked_up_once_per_event(tmp_path: Any) -> None:
    lookups: list[str] = []
    ran: list[str] = []

    class Counted:
        def __getattribute__(self, name: str) -> Any:
            if name in ("requestheaders", "update"):
                lookups.append(name)
            return object.__getattribute__(self, name)

        def requestheaders(self, flow: Any) -> None:
            ran.append(flow.id)

    async def main() -> list[Any]:
        master = DrawdownMaster(options.Options(confdir=str(tmp_path)), tail=[Counted()])
        lookups.clear()  # registering it looked at it too
        flows = [tflow.tflow() for _ in range(3)]
        for flow in flows:
            await master.addons.handle_lifecycle(HttpRequestHeadersHook(flow))
        return flows

    flows = asyncio.run(main())
    assert ran == [flow.id for flow in flows]  # every event still reaches the hook ...
    # ... found once, and the `update` pass after each event once too (it reaches no one)
    assert lookups == ["requestheaders", "update"]


def test_grouped_dispatch_reaches_what_mitmproxys_own_lookup_finds(tmp_path: Any) -> None:
    from mitmproxy.proxy.layers import http as layers

    flow = tflow.tflow(resp=True)
    events = [
        layers.HttpRequestHeadersHook(flow),
        layers.HttpRequestHook(flow),
        layers.HttpResponseHeadersHook(flow),
        layers.HttpResponseHook(flow),
        layers.HttpErrorHook(flow),
    ]

    def build() -> Any:
        return DrawdownMaster(options.Options(confdir=str(tmp_path)), tail=[Drawdown()])

    master = _in_loop(build)
    groups = [a for a in master.addons.chain if isinstance(a, AddonGroup)]
    for event in events:
        for group in groups:
            cached = list(master.addons._iter_hooks(group, event))
            uncached = list(super(type(master.addons), master.addons)._iter_hooks(group, event))
            assert cached == uncached, event.name


def test_an_addon_with_children_of_its_own_cannot_join_a_group() -> None:
    from mitmproxy.addons.script import ScriptLoader

    with pytest.raises(ValueError, match="ScriptLoader"):
        AddonGroup("bad", [ScriptLoader()])


def test_the_update_pass_runs_only_when_some_addon_has_an_update_hook(tmp_path: Any) -> None:
    script = tmp_path / "updates.py"
    script.write_text("seen = []\ndef update(flows):\n    seen.extend(f.id for f in flows)\n")

    async def main() -> tuple[list[str], list[str], Any, Any]:
        master = DrawdownMaster(options.Options(confdir=str(tmp_path)), tail=[Drawdown()])
        passes: list[str] = []
        trigger = master.addons.trigger_event

        async def recorded(event: Any) -> None:
            passes.append(event.name)
            await trigger(event)

        master.addons.trigger_event = recorded  # type: ignore[method-assign]
        first = tflow.tflow()
        await master.addons.handle_lifecycle(HttpRequestHeadersHook(first))
        before = list(passes)

        master.options.update(scripts=[str(script)])
        loader = master.addons.get("scriptloader")
        for _ in range(200):  # mitmproxy loads scripts on a task of their own
            if loader.addons and loader.addons[0].ns is not None:
                break
            await asyncio.sleep(0.01)
        passes.clear()
        second = tflow.tflow()
        await master.addons.handle_lifecycle(HttpRequestHeadersHook(second))
        return before, passes, loader.addons[0].ns, second

    before, after, namespace, second = asyncio.run(main())
    assert before == ["requestheaders"]  # no addon of mitmdump's or drawdown's has `update`
    assert after == ["requestheaders", "update"]
    assert namespace.seen == [second.id]


def test_its_log_leaves_out_mitmproxys_connection_lines_unless_asked_for_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Four "client connect"/"server disconnect …" lines a call buried drawdown's own, and
    termlog_verbosity=warn, which hid them, hid every denial too."""
    server = logging.getLogger("mitmproxy.proxy.server")
    said = [
        "client connect",
        "server connect api.openai.com:443 (127.0.0.1:9)",
        "error establishing server connection: Connection refused",
        "server disconnect api.openai.com:443 (127.0.0.1:9)",
        "client disconnect",
    ]

    async def main() -> None:
        master = DrawdownMaster(options.Options(), tail=[Drawdown(), Announce()])
        try:
            for message in said:
                server.info(message)
            logging.getLogger("drawdown").info("drawdown: deny a b c: d")
            master.options.update(termlog_verbosity="debug")
            server.info("client connect")
        finally:
            master._termlog_addon.uninstall()

    caplog.set_level(logging.INFO)
    asyncio.run(main())
    assert [r.getMessage() for r in caplog.records] == [
        "error establishing server connection: Connection refused",
        "drawdown: deny a b c: d",
        "client connect",  # termlog_verbosity=debug
    ]
