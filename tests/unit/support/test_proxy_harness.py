"""The harness itself: SDK -> proxy process -> stand-in over TLS, which every e2e test uses.

Run against plain mitmdump with a throwaway addon (fake_drawdown_addon.py) that prints
drawdown's readiness line, so the harness is proven before the real proxy exists.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.proxy import DrawdownProcess, DrawdownStartupError
from tests.support.standin import StandIn
from tests.support.wire import DEFAULT_REPLY_TEXT

FAKE_ADDON = Path(__file__).with_name("fake_drawdown_addon.py")
POLICY = "mode: enforce\nactions: []\n"
REPLY_WORDS = len(DEFAULT_REPLY_TEXT.split())

Factory = Callable[..., DrawdownProcess]


@pytest.fixture
def fake_proxy(drawdown_proxy: Factory) -> Factory:
    def start(**kw: object) -> DrawdownProcess:
        return drawdown_proxy(POLICY, mode="mitmdump", mitm_script=FAKE_ADDON, **kw)

    return start


def test_openai_sdk_default_base_url_reaches_the_stand_in(
    fake_proxy: Factory, standin: StandIn
) -> None:
    proxy = fake_proxy()
    assert proxy.ca_path.exists()
    with proxy.openai_client() as client:  # https://api.openai.com/v1, redirected
        r = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello through proxy"}]
        )
    entry = standin.wait_for("/v1/chat/completions")
    assert entry.host == "api.openai.com"  # Host and SNI kept, only the socket moved
    assert r.usage.prompt_tokens == entry.usage["prompt_tokens"] == 3
    assert r.usage.completion_tokens == REPLY_WORDS
    # mitmproxy's own view is the production one: request.host is the provider's name.
    proxy.wait_for_log(
        r"fake-drawdown request POST https://api.openai.com/v1/chat/completions host=api.openai.com"
    )
    proxy.wait_for_log(r"server connect api\.openai\.com:443 \(127\.0\.0\.1:\d+\)")


def test_stream_through_proxy_is_intact(fake_proxy: Factory, standin: StandIn) -> None:
    proxy = fake_proxy()
    with proxy.openai_client() as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[-1].usage.completion_tokens == REPLY_WORDS


def test_anthropic_and_gemini_sdks_through_proxy(fake_proxy: Factory, standin: StandIn) -> None:
    proxy = fake_proxy()
    with proxy.anthropic_client() as client:
        with client.messages.stream(
            model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            final = stream.get_final_message()
        assert final.usage.output_tokens == REPLY_WORDS
    assert standin.wait_for("/v1/messages").host == "api.anthropic.com"
    with proxy.genai_client() as client:
        r = client.models.generate_content(model="gemini-2.5-flash", contents="one two")
    assert r.usage_metadata.total_token_count == 2 + REPLY_WORDS
    assert standin.wait_for("*:generateContent").host == "generativelanguage.googleapis.com"


def test_explicit_stand_in_url_through_proxy(fake_proxy: Factory, standin: StandIn) -> None:
    proxy = fake_proxy(resolve=None)  # no redirection: CONNECT 127.0.0.1:PORT directly
    with proxy.openai_client(standin.url + "/v1") as client:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert standin.wait_for("/v1/chat/completions").host == standin.host_port


def test_client_does_not_trust_the_upstream_ca(fake_proxy: Factory, standin: StandIn) -> None:
    import openai

    proxy = fake_proxy()
    # Through the proxy the client sees mitmproxy's certificate, never the stand-in's.
    with (
        proxy.openai_client(max_retries=0) as client,
        pytest.raises(openai.APIConnectionError),
    ):
        client.with_options(
            http_client=openai.DefaultHttpxClient(
                proxy=proxy.proxy_url, verify=standin.ssl_context(), trust_env=False
            )
        ).chat.completions.create(model="m", messages=[])
    assert standin.count() == 0


def test_tool_api_over_plain_http_and_https(fake_proxy: Factory, standin: StandIn) -> None:
    proxy = fake_proxy()
    with proxy.http_client() as http:
        assert http.get("https://crm.example.com/api/customers/7").json()["path"] == (
            "/api/customers/7"
        )
        refund = http.post("http://api.stripe.com/v1/refunds", json={"amount": 5})
    assert refund.json()["json"] == {"amount": 5}
    assert [r.scheme for r in standin.requests] == ["https", "http"]
    assert [r.host for r in standin.requests] == ["crm.example.com", "api.stripe.com"]


def test_proxy_auth_reaches_the_proxy(fake_proxy: Factory, standin: StandIn) -> None:
    proxy = fake_proxy(extra_args=["--set", "proxyauth=any"], proxy_auth=("research", "run-7f3a"))
    assert proxy.proxy_url.startswith("http://research:run-7f3a@127.0.0.1:")
    with proxy.openai_client() as client:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    with proxy.openai_client(proxy_auth=("support-1", "r2")) as client:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "y"}])
    proxy.wait_for_log(r"user=research$")
    proxy.wait_for_log(r"user=support-1$")
    assert all(r.header("proxy-authorization") is None for r in standin.requests)


def test_subprocess_agent_uses_client_env(fake_proxy: Factory, standin: StandIn) -> None:
    proxy = fake_proxy(proxy_auth=("agent", "run1"))
    env = proxy.client_env()
    env.pop("OPENAI_BASE_URL", None)
    assert env["HTTPS_PROXY"] == proxy.proxy_url and "NO_PROXY" not in env
    assert "BEGIN CERTIFICATE" in Path(env["SSL_CERT_FILE"]).read_text()
    agent = textwrap.dedent(
        """
        import openai
        client = openai.OpenAI(api_key="sk-test-agent")  # env-configured, as unmodified
        r = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "from a subprocess"}]
        )
        print(r.usage.prompt_tokens, r.usage.completion_tokens)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", agent], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", str(REPLY_WORDS)]
    assert standin.wait_for("/v1/chat/completions").host == "api.openai.com"


def test_stop_is_clean_and_logs_are_kept(drawdown_proxy: Factory) -> None:
    proxy = drawdown_proxy(POLICY, mode="mitmdump", mitm_script=FAKE_ADDON)
    assert proxy.is_running()
    assert proxy.stop() == 0
    assert not proxy.is_running()
    assert f"drawdown listening on http://127.0.0.1:{proxy.port}" in proxy.log_text()
    assert proxy.stop() == 0  # idempotent; the fixture stops it again


def test_kill_then_teardown_does_not_fail(drawdown_proxy: Factory) -> None:
    proxy = drawdown_proxy(POLICY, mode="mitmdump", mitm_script=FAKE_ADDON)
    proxy.kill()
    assert proxy.returncode == -9
    assert not proxy.is_running()


def test_startup_failure_reports_output(tmp_path: Path, upstream_ca: Path) -> None:
    with pytest.raises(DrawdownStartupError, match=r"(?s)exited with code 1.*not an integer"):
        DrawdownProcess(
            POLICY,
            tmp_path / "d.db",
            tmp_path / "conf",
            ["--set", "listen_port=abc"],
            upstream_ca,
            mode="mitmdump",
            mitm_script=FAKE_ADDON,
        )


def test_missing_readiness_line_times_out(tmp_path: Path, upstream_ca: Path) -> None:
    class Silent(DrawdownProcess):
        @property
        def command(self) -> list[str]:
            return [sys.executable, "-c", "print('booting'); import time; time.sleep(60)"]

    with pytest.raises(
        DrawdownStartupError, match=r"(?s)printed no readiness line .* within 1 s.*booting"
    ):
        Silent(POLICY, tmp_path / "d.db", tmp_path / "conf", startup_timeout=1)


def test_mitmdump_mode_accepts_mitmproxys_own_listening_line(
    drawdown_proxy: Factory, tmp_path: Path
) -> None:
    silent = tmp_path / "silent.py"
    silent.write_text(
        "class Opts:\n"
        "    def load(self, loader):\n"
        "        loader.add_option('drawdown_policy', str, '', '')\n"
        "        loader.add_option('drawdown_db', str, '', '')\n"
        "addons = [Opts()]\n"
    )
    proxy = drawdown_proxy(POLICY, mode="mitmdump", mitm_script=silent, ready="mitmproxy")
    assert proxy.port is not None and proxy.port > 0
    assert "drawdown listening" not in proxy.log_text()


def test_run_mode_command_line(tmp_path: Path, upstream_ca: Path) -> None:
    proc = DrawdownProcess(
        "x: 1\n",
        tmp_path / "d.db",
        tmp_path / "conf",
        ["--mode", "shadow"],
        upstream_ca,
        resolve={"tls": {}},
        start=False,
    )
    cmd = proc.command
    assert cmd[:4] == [sys.executable, "-m", "drawdown", "run"]
    assert cmd[cmd.index("--listen") + 1] == "127.0.0.1:0"
    assert f"ssl_verify_upstream_trusted_ca={upstream_ca}" in cmd
    assert cmd[-2:] == ["--mode", "shadow"]
    assert proc.policy_path.read_text() == "x: 1\n"
    assert proc.policy_path.parent == tmp_path


def test_reload_policy_and_ledger(tmp_path: Path, upstream_ca: Path) -> None:
    db = tmp_path / "ledger.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("create table decisions (decision text)")
        conn.execute("insert into decisions values ('allow')")
    proc = DrawdownProcess(POLICY, db, tmp_path / "conf", upstream_ca=upstream_ca, start=False)
    before = proc.policy_path.stat().st_mtime_ns
    proc.reload_policy("mode: shadow\n")
    assert proc.policy_path.read_text() == "mode: shadow\n"
    assert proc.policy_path.stat().st_mtime_ns > before
    with proc.ledger() as ledger:
        assert ledger.execute("select decision from decisions").fetchall() == [("allow",)]
        with pytest.raises(sqlite3.OperationalError):
            ledger.execute("insert into decisions values ('deny')")
    with pytest.raises(sqlite3.ProgrammingError):  # the with-block closed it
        ledger.execute("select 1")
    assert proc.query("select count(*) from decisions") == [(1,)]
    assert proc.wait_for_query("select decision from decisions", until=lambda rows: len(rows) == 1)
    with pytest.raises(AssertionError, match="never satisfied"):
        proc.wait_for_query("select * from decisions where decision = ?", "deny", timeout=0.05)
