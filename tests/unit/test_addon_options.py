"""The addon's options, as mitmproxy's own addon tests check theirs (taddons)."""

from __future__ import annotations

from pathlib import Path

import pytest
from drawdown.addon import Drawdown
from mitmproxy import exceptions
from mitmproxy.test import taddons

POLICY = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
"""


@pytest.fixture
def configured(tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    addon = Drawdown()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, drawdown_policy=str(policy), drawdown_db=str(tmp_path / "l.db"))
        yield addon, tctx
        addon.done()


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "86400", ""])
def test_drain_refuses_what_is_not_seconds(configured, value: str) -> None:
    addon, tctx = configured
    with pytest.raises(exceptions.OptionsError, match="drawdown_drain must be a number of seconds"):
        tctx.configure(addon, drawdown_drain=value)


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("0.5", 0.5), ("45", 45.0)])
def test_drain_takes_seconds_or_zero(configured, value: str, seconds: float) -> None:
    addon, tctx = configured
    assert addon.seconds["drawdown_drain"] == 20.0  # the default, under a platform's 30 s
    tctx.configure(addon, drawdown_drain=value)
    assert addon.seconds["drawdown_drain"] == seconds


@pytest.mark.parametrize("name", ["drawdown_upstream_timeout", "drawdown_ledger_timeout"])
def test_other_durations_still_refuse_zero(configured, name: str) -> None:
    addon, tctx = configured
    with pytest.raises(exceptions.OptionsError, match=f"{name} must be a number of seconds"):
        tctx.configure(addon, **{name: "0"})


def test_passthrough_allow_hosts_keep_a_glob_class_and_an_ipv6_host_bare() -> None:
    """unknown_hosts: passthrough hands mitmproxy a regex per action host, searched in
    "host:port". Brackets were stripped off the pattern's text, which broke a glob class at
    either end of it; an IPv6 host is matched without its brackets, as requests carry it."""
    import re

    from drawdown.addon import allow_hosts_regex
    from drawdown.policy.match import compile_host

    api = re.compile(allow_hosts_regex(compile_host("[ab]pi.example.com")))
    assert api.search("api.example.com:443") and api.search("bpi.example.com:8443")
    assert not api.search("cpi.example.com:443")
    local = re.compile(allow_hosts_regex(compile_host("[::1]:8443")))
    assert local.search("::1:8443") and not local.search("::1:443")


def test_passthrough_decrypts_a_host_written_as_a_fully_qualified_name() -> None:
    """`CONNECT api.openai.com.:443` (SNI with the dot as well) matched no allow_hosts regex:
    under `unknown_hosts: passthrough` it went through undecrypted, never decided."""
    import re

    from drawdown.addon import allow_hosts_regex
    from drawdown.policy.match import compile_host

    api = re.compile(allow_hosts_regex(compile_host("api.openai.com")))
    assert api.search("api.openai.com.:443") and api.search("api.openai.com:443")
    assert not api.search("api.openai.com..:443") and not api.search("xapi.openai.com:443")


def test_a_db_that_is_not_a_ledger_is_refused_and_the_ledger_in_use_stays(
    configured, tmp_path: Path
) -> None:
    """Set at run time to an application's database, drawdown_db was refused, but the ledger
    in use had been closed first: every call then answered per on_ledger_error, and the
    maintenance task tried the refused file for ever."""
    import sqlite3

    addon, tctx = configured
    in_use, url = addon.ledger, addon.ledger_url
    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    with pytest.raises(exceptions.OptionsError, match="is not a drawdown ledger"):
        tctx.configure(addon, drawdown_db=str(foreign))
    assert addon.ledger is in_use and addon.ledger_url == url
    assert addon.ledger.call_sync("heartbeat", 1.0) is None  # still open


def test_shared_runs_follow_the_ledger_unless_set() -> None:
    """`auto`: a PostgreSQL ledger is a fleet's, whose proxies must agree on an unnamed
    agent's run; a SQLite ledger's proxy keeps its runs in memory (`--workers` sets true)."""
    from drawdown.addon import shares_runs

    assert shares_runs("auto", "postgresql://drawdown@db/drawdown")
    assert shares_runs("auto", "postgres://db/drawdown")
    assert not shares_runs("auto", "/var/lib/drawdown/ledger.db")
    assert shares_runs("true", "ledger.db") and not shares_runs("false", "postgresql://db/x")


def test_shared_runs_refuses_what_is_not_auto_true_or_false(configured) -> None:
    addon, tctx = configured
    with pytest.raises(exceptions.OptionsError, match="must be auto, true or false, not 'yes'"):
        tctx.configure(addon, drawdown_shared_runs="yes")
