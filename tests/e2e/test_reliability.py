"""Reliability end to end: upstream faults, ledger faults, a crash with calls in flight, a race of
four proxies on one ledger file. After each, `drawdown verify` must find the ledger consistent."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from tests.conftest import standin_resolve
from tests.support.proxy import DrawdownProcess
from tests.support.standin import Reply, StandIn
from tests.support.wire import openai_chat_json, openai_chat_sse, openai_chat_usage

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]
MESSAGES = [{"role": "user", "content": "Say hello."}]
USAGE = {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}
POLICY = """
mode: {mode}
holds: {{ttl: {ttl}, lease: 2}}
actions:
  - {{kind: llm, provider: openai, match: {{host: api.openai.com}}}}
  - {{kind: llm, provider: openai, match: {{host: api.untrusted-llm.test}}}}
budgets:
  - {{scope: "agent:*", requests: {requests}}}
"""


def policy(mode: str = "enforce", requests: int = 1000, ttl: int = 900) -> str:
    return POLICY.format(mode=mode, requests=requests, ttl=ttl)


def verify(db: Path | str, *, settled: bool = True) -> None:
    """The ledger's invariants hold (drawdown verify exits 0)."""
    args = [sys.executable, "-m", "drawdown", "verify", "--db", str(db)] + (
        ["--settled"] if settled else []
    )
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def chat(client: openai.OpenAI, **kw: object) -> object:
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **kw)


# --- upstream faults ------------------------------------------------------------------------


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_connection_refused_gives_502_and_releases(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    resolve = {"tls": {"api.openai.com": f"127.0.0.1:{_closed_port()}"}, "plain": {}}
    proxy = drawdown_proxy(policy(), resolve=resolve)
    with (
        proxy.openai_client(max_retries=0) as client,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        chat(client)
    assert caught.value.status_code == 502
    assert proxy.query("SELECT state FROM holds") == [("released",)]
    assert proxy.query("SELECT status FROM decisions") == [(502,)]
    verify(tmp_db)


def test_tls_failure_gives_502_and_releases(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    resolve = standin_resolve(standin)
    resolve["tls"]["api.untrusted-llm.test"] = (
        standin.host_port
    )  # its certificate does not name this host
    proxy = drawdown_proxy(policy(), resolve=resolve)
    with (
        proxy.openai_client("https://api.untrusted-llm.test/v1", max_retries=0) as client,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        chat(client)
    assert caught.value.status_code == 502
    assert standin.count("*") == 0
    ((state, reason),) = proxy.query("SELECT state, settle_reason FROM holds")
    assert state == "released" and "certificate" in reason.lower()
    verify(tmp_db)


def test_reset_before_headers_and_5xx_release(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    standin.script("POST", "/v1/chat/completions", Reply(reset_before_headers=True))
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(status=503, json={"error": {"message": "overloaded", "type": "server_error"}}),
    )
    proxy = drawdown_proxy(policy())
    with proxy.openai_client(max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as first:
            chat(client)
        with pytest.raises(openai.APIStatusError) as second:
            chat(client)
        chat(client)  # the upstream recovers: charged normally
    assert (first.value.status_code, second.value.status_code) == (502, 503)
    assert proxy.query("SELECT state FROM holds ORDER BY id") == [
        ("released",),
        ("released",),
        ("committed",),
    ]
    assert proxy.query("SELECT spent_requests, reserved_requests FROM budget_instances") == [(1, 0)]
    verify(tmp_db)


def test_reset_mid_stream_commits_what_was_streamed(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    event = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"delta":{"content":"word %d "},"finish_reason":null}]}\n\n'
    )
    body = b"".join(event % i for i in range(20)) + b"data: [DONE]\n\n"
    standin.script(
        "POST", "/v1/chat/completions",
        Reply(body=body, content_type="text/event-stream", chunks="events", delay=0.1, reset_after_bytes=len(event) * 5),
    )  # fmt: skip
    proxy = drawdown_proxy(policy())
    with proxy.openai_client(max_retries=0) as client, pytest.raises(openai.APIConnectionError):
        list(chat(client, stream=True))
    rows = proxy.wait_for_query(
        "SELECT state, usage_source FROM holds", until=lambda r: r and r[0][0] != "active"
    )
    assert rows == [("committed", "counted")]
    verify(tmp_db)


def test_slow_trickle_keeps_its_hold_alive_and_commits(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    # The hold's TTL (2 s) is shorter than the stream (≈4 s): the proxy extends it while the call is in flight.
    standin.stream_delay = 0.4
    proxy = drawdown_proxy(policy(ttl=2), extra_args=["--set", "drawdown_maintenance_interval=0.5"])
    with proxy.openai_client(max_retries=0) as client:
        text = "".join(
            c.choices[0].delta.content or "" for c in chat(client, stream=True) if c.choices
        )
    assert text
    rows = proxy.wait_for_query(
        "SELECT state, usage_source FROM holds", until=lambda r: r and r[0][0] != "active"
    )
    assert rows == [("committed", "usage")]
    verify(tmp_db)


def test_silent_upstream_is_cut_by_tcp_timeout_and_released(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    gate = threading.Event()
    standin.script("POST", "/v1/chat/completions", Reply(hold_headers=gate))
    proxy = drawdown_proxy(policy(), extra_args=["--set", "tcp_timeout=2"])
    try:
        with proxy.openai_client(max_retries=0) as client, pytest.raises(openai.APIConnectionError):
            chat(client)
        rows = proxy.wait_for_query(
            "SELECT state, settle_reason FROM holds", until=lambda r: r and r[0][0] != "active"
        )
    finally:
        gate.set()
    # The upstream's silence, not the agent, named as the cause (mitmproxy reports the client
    # gone when it cuts both sides).
    assert rows == [("released", "upstream timeout: no response within tcp_timeout (2s)")]
    verify(tmp_db)


def test_upstream_timeout_answers_502_and_releases(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    gate = threading.Event()
    standin.script("POST", "/v1/chat/completions", Reply(hold_headers=gate))
    proxy = drawdown_proxy(policy(), extra_args=["--set", "drawdown_upstream_timeout=1"])
    try:
        # The client's own timeout (20 s) is only there so a regression fails rather than hangs.
        with proxy.openai_client(max_retries=0, timeout=20) as client:
            with pytest.raises(openai.APIStatusError) as caught:
                chat(client)
            # An answer, not a cut connection: the SDK reports a gateway error.
            assert caught.value.status_code == 502
            rows = proxy.wait_for_query(
                "SELECT state, settle_reason FROM holds", until=lambda r: r and r[0][0] != "active"
            )
            assert rows == [("released", "upstream timeout: no response within 1s")]
            assert proxy.wait_for_query("SELECT status FROM decisions") == [(502,)]
            proxy.wait_for_log("sent no response within 1s")
            # The next call (the script answered once) is served normally, on a new connection.
            assert chat(client).choices[0].message.content
    finally:
        gate.set()
    verify(tmp_db)


def test_a_slow_stream_is_not_cut_once_its_headers_arrived(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    # The timeout bounds the wait for the answer to begin, never the length of a stream.
    standin.stream_delay = 0.4  # ≈4 s of stream
    proxy = drawdown_proxy(policy(), extra_args=["--set", "drawdown_upstream_timeout=1"])
    with proxy.openai_client(max_retries=0) as client:
        text = "".join(
            c.choices[0].delta.content or "" for c in chat(client, stream=True) if c.choices
        )
    assert text
    rows = proxy.wait_for_query(
        "SELECT state FROM holds", until=lambda r: r and r[0][0] != "active"
    )
    assert rows == [("committed",)]
    verify(tmp_db)


# --- ledger faults --------------------------------------------------------------------------


def test_locked_ledger_is_answered_per_on_ledger_error(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    proxy = drawdown_proxy(policy(), extra_args=["--set", "drawdown_ledger_timeout=0.5"])
    with proxy.openai_client(max_retries=0) as client:
        chat(client)
        locker = sqlite3.connect(tmp_db, isolation_level=None)
        locker.execute(
            "BEGIN EXCLUSIVE"
        )  # another process holds the write lock for longer than the timeout
        try:
            with pytest.raises(openai.APIStatusError) as caught:
                chat(client)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert caught.value.status_code == 503
        assert caught.value.response.headers["x-drawdown-reason"] == "ledger_unavailable"
        chat(client)  # the lock is gone: business as usual
    proxy.wait_for_log("ledger unavailable")
    assert standin.count("/v1/chat/completions") == 2  # the 503 was not forwarded
    assert proxy.is_running()
    verify(tmp_db)


def test_a_commit_a_locked_ledger_refused_is_charged_once_the_lock_is_gone(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    """The lock comes while the call is upstream: its commit waits past the timeout and fails.
    The agent still gets its answer, and the commit lands at the next maintenance tick instead
    of the hold lapsing uncharged at its TTL (the provider billed the call)."""
    answer_now = threading.Event()
    standin.script(
        "POST", "/v1/chat/completions",
        Reply(json=json.loads(openai_chat_json(id="c1", created=1, model="gpt-4o-mini", text="Hi.",
              usage=openai_chat_usage(9, 8))), hold_headers=answer_now),
    )  # fmt: skip
    proxy = drawdown_proxy(
        policy(),
        extra_args=["--set", "drawdown_ledger_timeout=0.5",
                    "--set", "drawdown_maintenance_interval=0.3"],
    )  # fmt: skip
    with proxy.openai_client(max_retries=0) as client:
        calling = threading.Thread(target=chat, args=(client,))
        calling.start()
        proxy.wait_for_query("SELECT state FROM holds", until=lambda rows: rows == [("active",)])
        locker = sqlite3.connect(tmp_db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # another process takes the write lock
        try:
            answer_now.set()
            calling.join(30)
            assert not calling.is_alive()  # answered, the ledger notwithstanding
            proxy.wait_for_log("could not settle")
        finally:
            locker.execute("ROLLBACK")
            locker.close()
    proxy.wait_for_log("on a later attempt")
    rows = proxy.query("SELECT state, actual_usd FROM holds")
    assert [state for state, _ in rows] == ["committed"] and rows[0][1] > 0
    (requests,) = proxy.query("SELECT spent_requests FROM budget_instances")
    assert requests == (1,)
    verify(tmp_db)


def test_locked_ledger_in_shadow_mode_forwards_and_says_so(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    proxy = drawdown_proxy(
        policy(mode="shadow"), extra_args=["--set", "drawdown_ledger_timeout=0.5"]
    )
    with proxy.openai_client(max_retries=0) as client:
        chat(client)
        locker = sqlite3.connect(tmp_db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            chat(client)  # allowed, unaccounted
        finally:
            locker.execute("ROLLBACK")
            locker.close()
    proxy.wait_for_log("forwarding .* unaccounted")
    assert standin.count("/v1/chat/completions") == 2
    verify(tmp_db)


def test_disk_full_is_answered_per_on_ledger_error_and_nothing_committed_is_lost(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    proxy = drawdown_proxy(policy(), extra_args=["--set", "drawdown_ledger_timeout=0.5"])
    with proxy.openai_client(max_retries=0) as client:
        for _ in range(3):
            chat(client)
        committed = proxy.query("SELECT COUNT(*) FROM holds WHERE state = 'committed'")
        # Cap the proxy's file size (RLIMIT_FSIZE) at what its ledger files use now: the disk is "full".
        sizes = [p.stat().st_size for p in tmp_db.parent.glob(tmp_db.name + "*")]
        subprocess.run(
            ["prlimit", f"--pid={proxy.pid}", f"--fsize={max(sizes)}:unlimited"], check=True
        )
        try:
            statuses = []
            for _ in range(30):  # until the ledger needs a new page
                try:
                    chat(client)
                    statuses.append(200)
                except openai.APIStatusError as exc:
                    statuses.append(exc.status_code)
                    break
        finally:
            subprocess.run(
                ["prlimit", f"--pid={proxy.pid}", "--fsize=unlimited:unlimited"], check=True
            )
        assert statuses[-1] == 503 and proxy.is_running()
        chat(client)  # space is back
    proxy.wait_for_log("ledger unavailable")
    assert (
        proxy.query("SELECT COUNT(*) FROM holds WHERE state = 'committed'")[0][0]
        >= committed[0][0] + 1
    )
    proxy.stop()
    verify(tmp_db)


needs_chattr = pytest.mark.skipif(
    shutil.which("chattr") is None,
    reason="needs chattr (e2fsprogs) to make a file read-only for root",
)


@pytest.fixture
def written_ledger(drawdown_proxy: Factory, standin: StandIn, tmp_path: Path) -> Path:
    """A ledger in a folder of its own, one call recorded, its proxy stopped (checkpointed)."""
    db = tmp_path / "ro" / "ledger.db"
    db.parent.mkdir()
    proxy = drawdown_proxy(policy(), db=db)
    with proxy.openai_client() as client:
        chat(client)
    proxy.stop()
    return db


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    made: list[Path] = []

    def freeze(path: Path) -> None:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        made.append(path)

    yield freeze
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


@needs_chattr
def test_read_only_ledger_keeps_the_proxy_up_until_it_is_writable_again(
    drawdown_proxy: Factory, written_ledger: Path, immutable: Callable[[Path], None]
) -> None:
    db = written_ledger
    for path in db.parent.iterdir():
        immutable(path)
    immutable(db.parent)  # not even a -wal file can be created
    proxy = drawdown_proxy(
        policy(), db=db, extra_args=["--set", "drawdown_maintenance_interval=0.5"]
    )
    with proxy.openai_client(max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            chat(client)
        assert caught.value.status_code == 503
        proxy.wait_for_log("cannot open ledger|ledger unavailable")
        for path in [db.parent, *db.parent.iterdir()]:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        proxy.wait_for_log("is available again", timeout=20)
        chat(client)
    assert proxy.query("SELECT COUNT(*) FROM holds WHERE state = 'committed'") == [(2,)]


@needs_chattr
def test_a_ledger_in_a_folder_the_reader_cannot_write_is_still_read(
    written_ledger: Path, immutable: Callable[[Path], None]
) -> None:
    """`drawdown report` run by someone other than the proxy's user: SQLite could not make the
    WAL's -shm file beside the ledger, and every read failed."""
    db = written_ledger
    assert sorted(path.name for path in db.parent.iterdir()) == ["ledger.db"]  # checkpointed
    immutable(db)
    immutable(db.parent)
    for command in (["report", "--json"], ["budgets"], ["verify"]):
        result = subprocess.run(
            [sys.executable, "-m", "drawdown", *command, "--db", str(db)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, (command, result.stderr)
    assert '"allow": 1' in subprocess.run(
        [sys.executable, "-m", "drawdown", "report", "--json", "--db", str(db)],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip


def test_corrupted_ledger_keeps_the_proxy_up(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    db = tmp_path / "corrupt.db"
    db.write_bytes(b"this is not a sqlite database, it was overwritten by accident " * 200)
    proxy = drawdown_proxy(policy(), db=db)
    with (
        proxy.openai_client(max_retries=0) as client,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        chat(client)
    assert (
        caught.value.status_code == 503
        and "ledger unavailable" in caught.value.response.json()["error"]["message"]
    )
    proxy.wait_for_log("cannot open ledger")
    assert standin.count("*") == 0 and proxy.is_running()
    assert (
        b"overwritten by accident" in db.read_bytes()[:100]
    )  # drawdown never "repairs" a ledger by replacing it


def test_a_ledger_whose_folder_cannot_be_made_keeps_the_proxy_up(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """`--db` in a folder drawdown cannot make (a file in the way; or, for a user who is not
    root, /var/lib) ended `drawdown run` with mkdir's traceback; a ledger it cannot open
    otherwise keeps the proxy up, refusing per on_ledger_error until the ledger opens."""
    in_the_way = tmp_path / "ledgers"
    in_the_way.write_text("a file where the ledger's folder should be\n")
    proxy = drawdown_proxy(
        policy(),
        db=in_the_way / "drawdown.db",
        extra_args=["--set", "drawdown_maintenance_interval=0.2"],
    )
    with proxy.openai_client(max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            chat(client)
        assert caught.value.status_code == 503
        proxy.wait_for_log(
            re.escape(
                f"cannot open ledger {in_the_way / 'drawdown.db'}: its folder {in_the_way} cannot be made"
            )
        )
        assert standin.count("*") == 0 and "Traceback" not in proxy.log_text()
        in_the_way.unlink()  # the user makes room: the proxy opens the ledger by itself
        proxy.wait_for_log("is available again")
        chat(client)
    assert standin.count("/v1/chat/completions") == 1
    verify(in_the_way / "drawdown.db")


def test_a_ledger_deleted_under_the_proxy_is_said_so_and_never_made_anew(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """`rm ledger.db*` under a running proxy: calls went on getting 200, their spend written to
    the deleted file (another worker, `drawdown report` or a restart saw none of it) and
    nothing was logged. Now one error, 503 per on_ledger_error, /readyz not ready, and no
    fresh file with every budget unspent; the file put back is reopened."""
    db, kept = tmp_path / "ledger.db", tmp_path / "kept.db"
    proxy = drawdown_proxy(
        policy(), db=db, extra_args=["--set", "drawdown_maintenance_interval=0.2"]
    )
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    readyz = f"http://127.0.0.1:{proxy.address[1]}/readyz"
    with proxy.openai_client(max_retries=0) as client:
        chat(client)
        with sqlite3.connect(db) as source, sqlite3.connect(kept) as backup:
            source.backup(backup)  # an operator's backup
        source.close()
        backup.close()
        for path in tmp_path.glob("ledger.db*"):
            path.unlink()
        proxy.wait_for_log(f"ledger {re.escape(str(db))} was deleted under the running proxy")
        with pytest.raises(openai.APIStatusError) as caught:
            chat(client)
        assert caught.value.status_code == 503
        assert "was deleted" in caught.value.response.json()["error"]["message"]
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            direct.open(readyz, timeout=10)
        assert not_ready.value.code == 503
        assert not db.exists()  # never made anew: every budget would start unspent
        kept.rename(db)
        proxy.wait_for_log("is available again")
        chat(client)
        assert direct.open(readyz, timeout=10).status == 200
    assert standin.count("/v1/chat/completions") == 2
    assert len(re.findall("under the running proxy", proxy.log_text())) == 1
    proxy.stop()
    assert proxy.query("SELECT COUNT(*) FROM holds WHERE state = 'committed'") == [(2,)]
    verify(db)


# --- a crash with calls in flight -------------------------------------------------------------


def test_crash_with_calls_in_flight_strands_no_budget(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    gate = threading.Event()
    text = policy(requests=1000)
    proxy = drawdown_proxy(text)
    with proxy.openai_client(max_retries=0) as client:
        for _ in range(5):  # completed calls before the crash
            chat(client)
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(
            body=b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"partial "},"finish_reason":null}]}\n\n',
            content_type="text/event-stream",
            chunks=[
                b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"partial "},"finish_reason":null}]}\n\n',
                gate,
            ],
        ),
        times=None,
    )

    async def in_flight() -> None:
        async with proxy.async_openai_client(max_retries=0) as client:

            async def one() -> None:
                try:
                    stream = await client.chat.completions.create(
                        model="gpt-4o-mini", messages=MESSAGES, stream=True
                    )
                    async for _ in stream:
                        pass
                except (openai.APIError, httpx2.HTTPError):
                    pass

            tasks = [asyncio.create_task(one()) for _ in range(100)]
            deadline = asyncio.get_running_loop().time() + 60
            while proxy.query("SELECT COUNT(*) FROM holds WHERE state = 'active'")[0][0] < 100:
                assert asyncio.get_running_loop().time() < deadline, "the calls did not all start"
                await asyncio.sleep(0.2)
            proxy.kill()  # SIGKILL: no shutdown, no release
            await asyncio.gather(*tasks)

    try:
        asyncio.run(in_flight())
    finally:
        gate.set()
    assert proxy.query("SELECT COUNT(*) FROM holds WHERE state = 'active'") == [(100,)]
    # A new proxy on the same ledger: once the dead one's lease (2 s) lapses, its holds are returned.
    standin.reset()
    survivor = drawdown_proxy(text, extra_args=["--set", "drawdown_maintenance_interval=0.5"])
    survivor.wait_for_query(
        "SELECT COUNT(*) FROM holds WHERE state = 'active'",
        until=lambda r: r[0][0] == 0,
        timeout=30,
    )
    assert survivor.query("SELECT COUNT(*) FROM holds WHERE state = 'committed'") == [
        (5,)
    ]  # completed calls all recorded
    assert survivor.query("SELECT reserved_requests, spent_requests FROM budget_instances") == [
        (0, 5)
    ]
    survivor.stop()
    verify(tmp_db)


# --- four proxies, one ledger file --------------------------------------------------------------


def test_four_proxies_racing_for_37_admit_exactly_37(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    text = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*/run:*", requests: 37}
"""
    proxies = [drawdown_proxy(text) for _ in range(4)]

    async def race() -> list[int]:
        async def through(proxy: DrawdownProcess, n: int) -> list[int]:
            async with proxy.async_openai_client(
                default_headers={"X-Drawdown-Agent": "fleet", "X-Drawdown-Run": "r1"}, max_retries=0
            ) as client:

                async def one() -> int:
                    try:
                        await client.chat.completions.create(
                            model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
                        )
                        return 200
                    except openai.APIStatusError as exc:
                        return exc.status_code

                return await asyncio.gather(*(one() for _ in range(n)))

        results = await asyncio.gather(*(through(p, 50) for p in proxies))
        return [s for group in results for s in group]

    statuses = asyncio.run(race())
    assert statuses.count(200) == 37 and statuses.count(402) == 163
    assert standin.count("/v1/chat/completions") == 37
    assert proxies[0].query("SELECT spent_requests, reserved_requests FROM budget_instances") == [
        (37, 0)
    ]
    assert proxies[0].query("SELECT COUNT(*) FROM decisions") == [(200,)]
    for proxy in proxies:
        proxy.stop()
    verify(tmp_db)


def test_a_short_lease_is_heartbeaten_within_itself(
    drawdown_proxy: Factory, standin: StandIn, tmp_db: Path
) -> None:
    """Heartbeats came every drawdown_maintenance_interval (5 s) whatever the policy's lease:
    under `lease: 2`, a live proxy's lease lapsed between two of them, and another proxy on
    the ledger expired the hold of a call still streaming through it: the budget room it held
    was free for other calls while it ran, and its charge came as a late commit."""
    events = openai_chat_sse(
        id="c1", created=1, model="gpt-4o-mini", deltas=[" a", " b"], usage=USAGE,
        include_usage=True,
    )  # fmt: skip
    gate = threading.Event()
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(
            body=b"".join(events),
            content_type="text/event-stream",
            chunks=[events[0], gate, *events[1:]],
        ),
    )
    streaming = drawdown_proxy(policy())  # the default maintenance interval, 5 s
    sweeper = drawdown_proxy(policy(), extra_args=["--set", "drawdown_maintenance_interval=0.5"])
    try:
        with streaming.openai_client(max_retries=0) as client:
            chunks = iter(
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
            )
            next(chunks)
            time.sleep(6)  # three leases, and a heartbeat interval, while the sweeper sweeps
            assert sweeper.query("SELECT state FROM holds") == [("active",)]
            gate.set()
            rest = list(chunks)
        assert rest
    finally:
        gate.set()
    (row,) = streaming.wait_for_query(
        "SELECT state, actual_tokens FROM holds WHERE state != 'active'"
    )
    assert tuple(row) == ("committed", 17)
    assert "sweeper released" not in sweeper.log_text()
