"""Identity: scope paths from headers, proxy credentials, constants and idle-split runs."""

from __future__ import annotations

from drawdown.identity import Caller, IdleRuns, clean_value, identify, identity_headers
from drawdown.policy.model import Source
from drawdown.policy.schema import DEFAULT_IDENTITY
from hypothesis import given, settings
from hypothesis import strategies as st


def caller(headers: dict[str, str] | None = None, **kw: str) -> Caller:
    return Caller(headers={k.lower(): v for k, v in (headers or {}).items()}, **kw)


def test_default_identity_from_headers() -> None:
    ident = identify(
        DEFAULT_IDENTITY,
        caller(
            {"X-Drawdown-Tenant": "acme", "X-Drawdown-Agent": "research", "X-Drawdown-Run": "7f3a"}
        ),
        IdleRuns(),
        0,
    )
    assert ident.path == "tenant:acme/agent:research/run:7f3a"


def test_proxy_user_wins_over_header_and_constants_fill_in() -> None:
    ident = identify(
        DEFAULT_IDENTITY,
        caller({"X-Drawdown-Agent": "spoofed"}, proxy_user="research", proxy_password="r9"),
        IdleRuns(),
        0,
    )
    assert ident.path == "tenant:default/agent:research/run:r9"
    assert ident.sources["agent"] == "proxy user"


def test_levels_without_values_are_left_out() -> None:
    sources = {"tenant": (Source("header", "X-T"),), "agent": (Source("value", "bot"),)}
    assert identify(sources, caller(), IdleRuns(), 0).path == "agent:bot"


def test_client_ip_source() -> None:
    sources = {"agent": (Source("client_ip"),)}
    assert identify(sources, caller(client_ip="10.0.0.7"), IdleRuns(), 0).path == "agent:10.0.0.7"


def test_idle_split_mints_a_new_run_after_idle_time() -> None:
    runs = IdleRuns()
    sources = {"agent": (Source("value", "bot"),), "run": (Source("idle_split", 300),)}
    first = identify(sources, caller(), runs, 1000).get("run")
    assert identify(sources, caller(), runs, 1100).get("run") == first  # busy: same run
    assert identify(sources, caller(), runs, 1399).get("run") == first  # 299 s idle: same run
    later = identify(sources, caller(), runs, 1700).get("run")  # 301 s idle: new run
    assert later != first and len(later) == 8


def test_idle_split_is_per_agent() -> None:
    runs = IdleRuns()
    sources = {"agent": (Source("header", "X-A"),), "run": (Source("idle_split", 300),)}
    a = identify(sources, caller({"X-A": "a"}), runs, 0).get("run")
    b = identify(sources, caller({"X-A": "b"}), runs, 0).get("run")
    assert a != b


def test_idle_runs_memory_is_bounded() -> None:
    runs = IdleRuns(max_entries=10)
    for i in range(100):
        runs.run_for((f"agent:{i}",), 300, 0)
    assert len(runs) == 10


def test_hostile_values_cannot_escape_their_level() -> None:
    ident = identify(
        DEFAULT_IDENTITY,
        caller({"X-Drawdown-Agent": "evil/run:victim", "X-Drawdown-Run": "a:b\x00\n"}),
        IdleRuns(),
        0,
    )
    assert ident.path == "tenant:default/agent:evil%2Frun%3Avictim/run:a%3Ab"
    assert ident.path.count("/") == 2
    long = clean_value("x" * 10_000)
    assert long is not None and len(long) == 128
    assert (
        clean_value("x" * 10_000) == long and clean_value("x" * 9_999) != long
    )  # distinct ids stay distinct
    assert clean_value(" \t ") is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_value_comes_out_safe_for_a_scope_path(raw: str) -> None:
    value = clean_value(raw)
    if value is None:
        return
    assert 0 < len(value) <= 128
    assert "/" not in value and ":" not in value
    assert value.isprintable() and not any(ch.isspace() for ch in value)


def test_plain_values_pass_unchanged_up_to_the_length_bound() -> None:
    plain = "run-2026.11_26~a@b+c=d"
    assert clean_value(plain) == plain
    assert clean_value("r" * 128) == "r" * 128
    hashed = clean_value("r" * 129)  # one over the bound: shortened, with a digest
    assert hashed is not None and len(hashed) == 128 and hashed != "r" * 128
    assert clean_value("a b") == "a%20b" and clean_value(" ab ") == "ab"


def test_identity_headers_to_strip() -> None:
    assert identity_headers(
        ["X-Drawdown-Agent", "x-drawdown-run", "Authorization", "Content-Type"]
    ) == [
        "X-Drawdown-Agent",
        "x-drawdown-run",
    ]


def test_idle_split_can_be_left_to_the_shared_ledger() -> None:
    sources = {"agent": (Source("value", "bot"),), "run": (Source("idle_split", 120),)}
    pending = identify(sources, caller(), None, 0)
    assert pending.get("run") is None and pending.pending_idle == (
        "tenant:/workflow:/agent:bot",
        120,
    )
    resolved = pending.with_run("r7")
    assert resolved.path == "agent:bot/run:r7" and resolved.pending_idle is None


def test_header_map_looks_up_like_mitmproxy_headers() -> None:
    from drawdown.identity import header_map
    from mitmproxy.http import Headers

    fields = [
        (b"X-Drawdown-Agent", b"support"),
        (b"x-drawdown-agent", b"billing"),  # repeated, other case: folded like Headers.get
        (b"X-Drawdown-Run", "r\u00e9".encode()),
        (b"Host", b"api.openai.com"),
    ]
    mapped, headers = header_map(fields), Headers(fields)
    for name in ("x-drawdown-agent", "X-Drawdown-Run", "host", "x-drawdown-tenant"):
        assert Caller(headers=mapped).header(name) == headers.get(name)
    assert mapped["x-drawdown-agent"] == "support, billing"
