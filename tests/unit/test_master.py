"""DrawdownMaster: every mitmdump addon, option and command, dispatched in a few groups."""

from __future__ import annotations

import asyncio
from typing import Any

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
