"""The policy watcher of a running proxy, one look at a time, on a Kubernetes ConfigMap volume:
kubelet writes the new files into a folder of their own, points `..data` at it, and only then
removes the links of files the update dropped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from drawdown import metrics
from drawdown.addon import Drawdown
from mitmproxy.test import taddons

BASE = """
mode: {mode}
identity:
  agent: [{{value: support}}]
actions:
  - {{kind: search, match: {{host: tool.example.com}}}}
"""
BUDGETS = """
budgets:
  - {scope: "agent:*", requests: 5}
"""


def publish(volume: Path, version: str, files: dict[str, str]) -> None:
    """kubelet's first steps: the files in a new folder, then `..data` swapped onto it."""
    folder = volume / f"..{version}"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    (volume / "..data_tmp").symlink_to(folder.name)
    os.replace(volume / "..data_tmp", volume / "..data")
    for name in files:
        if not (volume / name).is_symlink():
            (volume / name).symlink_to(f"..data/{name}")


def drop_links(volume: Path, keep: set[str]) -> None:
    """kubelet's last step: the links of files no longer in the ConfigMap are removed."""
    for link in volume.glob("*.yaml"):
        if link.name not in keep:
            link.unlink()


def rejections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "policy edit rejected" in r.getMessage()]


def test_a_configmap_update_that_drops_a_file_is_reloaded_without_a_false_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Between the swap and the removal the dropped file's link points at nothing: the watcher
    logged "cannot read: a link to nothing" as a rejected edit, and the next look reloaded."""
    volume = tmp_path / "policy"
    volume.mkdir()
    publish(volume, "v1", {"base.yaml": BASE.format(mode="enforce"), "budgets.yaml": BUDGETS})

    async def main() -> list[str]:
        addon = Drawdown()
        modes = []
        with taddons.context(addon) as tctx:
            tctx.configure(addon, drawdown_policy=str(volume), drawdown_db=str(tmp_path / "l.db"))
            publish(volume, "v2", {"base.yaml": BASE.format(mode="shadow")})
            await addon._look_at_policy(str(volume))  # budgets.yaml: a link to nothing
            modes.append(addon.policy.mode)  # type: ignore[union-attr]
            drop_links(volume, {"base.yaml"})
            await addon._look_at_policy(str(volume))
            modes.append(addon.policy.mode)  # type: ignore[union-attr]
            addon.done()
        return modes

    with caplog.at_level(logging.INFO, logger="drawdown"):
        assert asyncio.run(main()) == ["enforce", "shadow"]
    assert rejections(caplog) == []
    assert "policy reloaded" in caplog.text


def test_a_link_to_nothing_that_stays_is_reported_at_the_second_look_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume = tmp_path / "policy"
    volume.mkdir()
    publish(volume, "v1", {"base.yaml": BASE.format(mode="enforce"), "budgets.yaml": BUDGETS})

    async def main() -> list[int]:
        addon = Drawdown()
        reported = []
        with taddons.context(addon) as tctx:
            tctx.configure(addon, drawdown_policy=str(volume), drawdown_db=str(tmp_path / "l.db"))
            publish(volume, "v2", {"base.yaml": BASE.format(mode="shadow")})
            for _ in range(3):
                await addon._look_at_policy(str(volume))
                reported.append(len(rejections(caplog)))
            assert addon.policy is not None and addon.policy.mode == "enforce"
            addon.done()
        return reported

    with caplog.at_level(logging.INFO, logger="drawdown"):
        assert asyncio.run(main()) == [0, 1, 1]
    [line] = rejections(caplog)
    assert line.endswith(f"{volume / 'budgets.yaml'}:0: cannot read: a link to nothing")


def test_a_reload_to_a_policy_with_no_actions_is_logged_as_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder left with its `version: 1` file only is a valid policy: the proxy took it in
    and every deny and budget was gone, with "policy reloaded" the only word of it. It logs
    what `drawdown check` warns."""
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "00-version.yaml").write_text("version: 1\n")
    (folder / "10-base.yaml").write_text(BASE.format(mode="enforce") + BUDGETS)

    async def main() -> int:
        addon = Drawdown()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, drawdown_policy=str(folder), drawdown_db=str(tmp_path / "l.db"))
            (folder / "10-base.yaml").rename(folder / "10-base.yaml.bak")
            await addon._look_at_policy(str(folder))
            actions = len(addon.policy.actions)  # type: ignore[union-attr]
            addon.done()
        return actions

    with caplog.at_level(logging.INFO, logger="drawdown"):
        assert asyncio.run(main()) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"drawdown: {folder / '00-version.yaml'}:1: warning: the policy defines no actions: "
        "no request is classified, so no budget, rule or anomaly check applies to any"
    ]
    assert "policy reloaded" in caplog.text


POLICY = (
    BASE.format(mode="enforce")
    + """authority:
  rules:
    - {scope: "agent:support", deny: [search]}
"""
    + BUDGETS
)


def reloads(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "policy reloaded" in r.getMessage()]


@contextlib.contextmanager
def watching(policy: Path, tmp_path: Path) -> Iterator[Drawdown]:
    """A proxy's addon configured with `policy`, its watcher's looks made by the test."""
    addon = Drawdown()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(tmp_path / "l.db"))
        yield addon
        addon.done()


def test_a_policy_being_written_is_loaded_once_it_has_stopped_changing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file saved in place is written in pieces: its first half, ending before the deny
    rule, parses and validates, and was installed, the rule off until the rest came."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    edited = POLICY.replace("requests: 5", "requests: 6")
    first_half = BASE.format(mode="enforce")  # complete YAML, a policy: no rule, no budget
    sleep = asyncio.sleep

    async def rest_written_meanwhile(seconds: float) -> None:
        if policy.read_text() != edited:
            policy.write_text(edited)
        await sleep(0)

    def in_force(addon: Drawdown) -> tuple[int, int | None]:
        assert addon.policy is not None
        return len(addon.policy.authority.rules), addon.policy.budgets[0].limits.requests

    async def main() -> list[tuple[int, int | None]]:
        seen = []
        with watching(policy, tmp_path) as addon:
            policy.write_text(first_half)
            monkeypatch.setattr(asyncio, "sleep", rest_written_meanwhile)
            await addon._look_at_policy(str(policy))
            seen.append(in_force(addon))
            await addon._look_at_policy(str(policy))
            seen.append(in_force(addon))
            monkeypatch.setattr(asyncio, "sleep", sleep)
        return seen

    with caplog.at_level(logging.INFO, logger="drawdown"):
        assert asyncio.run(main()) == [(1, 5), (1, 6)]
    assert len(reloads(caplog)) == 1
    assert rejections(caplog) == []


def test_files_touched_or_put_back_unchanged_are_not_reloaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`touch` logged "policy reloaded" with the same digest (and its warnings again); a
    broken edit undone said nothing after the rejection, leaving the reader to guess."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)

    async def main() -> None:
        with watching(policy, tmp_path) as addon:
            os.utime(policy, ns=(1, 10**18))
            await addon._look_at_policy(str(policy))
            policy.write_text(POLICY.replace("requests: 5", "requests: five"))
            await addon._look_at_policy(str(policy))
            rejected.append(metrics.REGISTRY.get_sample_value("drawdown_policy_edit_rejected"))
            policy.write_text(POLICY)
            await addon._look_at_policy(str(policy))
            rejected.append(metrics.REGISTRY.get_sample_value("drawdown_policy_edit_rejected"))

    rejected: list[float | None] = []
    with caplog.at_level(logging.INFO, logger="drawdown"):
        asyncio.run(main())
    assert rejected == [1, 0]  # drawdown_policy_edit_rejected, the alert's gauge
    assert reloads(caplog) == []
    assert len(rejections(caplog)) == 1
    [again] = [r.getMessage() for r in caplog.records if "valid again" in r.getMessage()]
    assert again.startswith(f"drawdown: {policy} is valid again: it is the policy in force")


def test_a_file_replaced_keeping_its_size_and_mtime_is_reloaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`cp -p new .tmp && mv .tmp policy.yaml`: `agent:support` → `agent:helpers` keeps the size,
    the copy keeps the mtime, and the edit went unseen until the next `touch`."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)

    async def main() -> str:
        with watching(policy, tmp_path) as addon:
            copy = tmp_path / ".policy.yaml.tmp"
            copy.write_text(POLICY.replace("agent:support", "agent:helpers"))
            status = policy.stat()
            os.utime(copy, ns=(status.st_atime_ns, status.st_mtime_ns))
            os.replace(copy, policy)
            await addon._look_at_policy(str(policy))
            return addon.policy.authority.rules[0].scope.text  # type: ignore[union-attr]

    with caplog.at_level(logging.INFO, logger="drawdown"):
        assert "agent:helpers" in asyncio.run(main())
    assert len(reloads(caplog)) == 1
