"""Credentials in URL paths are never stored: a Telegram bot token (`/bot<id>:<token>/…`), a
Slack or Discord webhook, and a path segment a policy captures under a secret name go through
a real `drawdown run` to the upstream, but neither the ledger files nor `drawdown report`
hold them, and `drawdown replay` re-decides the redacted requests as the proxy decided them."""

from __future__ import annotations

import json
import secrets
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.proxy import DrawdownProcess
from tests.support.secret_scan import scan_ledger_and_log
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

_TOKEN_CHARS = string.ascii_letters + string.digits + "-_"


def _random(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


# Shaped like the real thing; random per test run so a match can only be a leak.
BOT_TOKEN = f"{_random(10, string.digits)}:AA{_random(33, _TOKEN_CHARS)}"
OTHER_BOT_TOKEN = f"{_random(10, string.digits)}:AA{_random(33, _TOKEN_CHARS)}"
SLACK_HOOK = (
    f"T{_random(10, string.ascii_uppercase)}/B{_random(10, string.ascii_uppercase)}/{_random(24)}"
)
DISCORD_ID = _random(18, string.digits)
DISCORD_TOKEN = _random(68, _TOKEN_CHARS)
LINK_SECRET = _random(32, "0123456789abcdef")  # no known shape: only its capture's name says so
SECRETS = {
    "bot token": BOT_TOKEN,
    "other bot token": OTHER_BOT_TOKEN,
    "slack webhook": SLACK_HOOK,
    "slack secret": SLACK_HOOK.rsplit("/", 1)[1],
    "discord token": DISCORD_TOKEN,
    "link secret": LINK_SECRET,
}

POLICY = """
unknown_hosts: deny
record: {bodies: full}
actions:
  - {kind: telegram.send, match: {host: api.telegram.org, method: POST, path: "/bot{token}/sendMessage"}, cost: {usd: 0.001}}
  - {kind: telegram.read, match: {host: api.telegram.org, method: GET, path: "/bot*/getMe"}}
  - {kind: slack.notify, match: {host: hooks.slack.com, method: POST, path: "/services/*/*/*"}}
  - {kind: discord.notify, match: {host: discord.com, method: POST, path: "/api/webhooks/{id}/{hook}"}}
  - {kind: links.open, match: {host: crm.example.com, method: GET, path: "/v1/links/{link_secret}/open"}}
authority:
  rules:
    - {name: no-chat-666, scope: "*", deny: [telegram.send], when: {json.chat_id: 666}}
"""
# The same actions, every one refused: replay then names the action it classified each request as.
REFUSE_ALL = POLICY.replace("authority:\n", "authority:\n  default: deny\n")


def needles() -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for name, value in SECRETS.items():
        found[name] = value.encode()
        found[f"{name} (tail)"] = value[-16:].encode()
        found[f"{name} (quoted)"] = quote(value, safe="").encode()
    return found


def assert_clean(what: str, data: bytes | str) -> None:
    blob = data.encode() if isinstance(data, str) else data
    leaked = [name for name, needle in needles().items() if needle in blob]
    assert not leaked, f"{what} contains {', '.join(leaked)}"


def drawdown(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def test_no_credential_in_a_path_is_stored_and_replay_still_decides_alike(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path, tmp_db: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    proxy = drawdown_proxy(policy)
    run = {"X-Drawdown-Agent": "notifier", "X-Drawdown-Run": "n1"}
    with proxy.http_client(headers=run) as http:
        telegram = f"https://api.telegram.org/bot{BOT_TOKEN}"
        assert http.get(f"{telegram}/getMe").status_code == 200
        sent = http.post(f"{telegram}/sendMessage", json={"chat_id": 42, "text": "done"})
        assert sent.status_code == 200
        refused = http.post(f"{telegram}/sendMessage", json={"chat_id": 666, "text": "no"})
        assert refused.status_code == 403
        slack = http.post(f"https://hooks.slack.com/services/{SLACK_HOOK}", json={"text": "hi"})
        assert slack.status_code == 200
        discord = http.post(
            f"https://discord.com/api/webhooks/{DISCORD_ID}/{DISCORD_TOKEN}?wait=true",
            json={"content": "hi"},
        )
        assert discord.status_code == 200
        assert http.get(f"https://crm.example.com/v1/links/{LINK_SECRET}/open").status_code == 200
        # No action for this host: refused, and the reason recorded names the path it refused.
        unknown = http.post(
            f"https://relay.example.org/bot{OTHER_BOT_TOKEN}/sendMessage", json={"chat_id": 1}
        )
        assert unknown.status_code == 403

    # The credentials did reach the upstream (drawdown forwards them, it just never keeps them).
    forwarded = " ".join(r.path for r in standin.requests)
    for name in ("bot token", "slack webhook", "discord token", "link secret"):
        assert SECRETS[name] in forwarded, f"{name} never reached the upstream"

    proxy.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE decision != 'deny' AND completed_at IS NULL",
        until=lambda r: r == [(0,)],
    )
    rows = proxy.query("SELECT request_id, action, decision, path FROM decisions ORDER BY ts, id")
    assert [(action, decision, path) for _, action, decision, path in rows] == [
        ("telegram.read", "allow", "/bot[redacted]/getMe"),
        ("telegram.send", "allow", "/bot[redacted]/sendMessage"),
        ("telegram.send", "deny", "/bot[redacted]/sendMessage"),
        ("slack.notify", "allow", "/services/[redacted]/[redacted]/[redacted]"),
        ("discord.notify", "allow", f"/api/webhooks/{DISCORD_ID}/[redacted]"),
        ("links.open", "allow", "/v1/links/[redacted]/open"),
        (None, "deny", "/bot[redacted]/sendMessage"),
    ]

    assert tmp_db.name + "-wal" in scan_ledger_and_log(proxy, tmp_db, assert_clean)

    for args in (["--json"], ["--jsonl"], ["--run", "n1", "--json"], []):
        report = drawdown("report", "--db", str(tmp_db), *args)
        assert_clean(f"drawdown report {' '.join(args)}", report.stdout + report.stderr)
    logged = [
        json.loads(line)
        for line in drawdown("report", "--db", str(tmp_db), "--jsonl").stdout.splitlines()
    ]
    assert [entry["path"] for entry in logged] == [row[3] for row in rows]
    assert "relay.example.org/bot[redacted]/sendMessage" in logged[-1]["reason"]

    # Replay under the same policy decides every request as the proxy did…
    replayed = drawdown("replay", "--policy", str(policy), "--db", str(tmp_db), "--json")
    assert_clean("drawdown replay", replayed.stdout + replayed.stderr)
    same = json.loads(replayed.stdout)
    assert same["warnings"] == []
    assert same["changed"] == 0
    assert same["decisions"] == same["recorded"] == {"allow": 5, "deny": 2, "would_deny": 0}
    assert [(b["action"], b["reason_code"]) for b in same["blocked"]] == [
        ("telegram.send", "not_authorized"),
        (None, "unknown_host"),
    ]
    # …having classified each redacted path as the action the proxy classified it as.
    refuse = tmp_path / "refuse.yaml"
    refuse.write_text(REFUSE_ALL)
    refused_all = drawdown("replay", "--policy", str(refuse), "--db", str(tmp_db), "--json")
    actions = {b["request_id"]: b["action"] for b in json.loads(refused_all.stdout)["blocked"]}
    assert actions == {request_id: action for request_id, action, _, _ in rows}

    # explain, given the bot token on its command line, echoes it nowhere.
    for url in (
        f"https://api.telegram.org/bot{BOT_TOKEN}",
        f"https://relay.example.org/bot{BOT_TOKEN}",
    ):
        explained = drawdown(
            "explain", "--policy", str(policy), "--db", str(tmp_db), "--method", "POST",
            "--url", f"{url}/sendMessage", "--json", '{"chat_id": 42}',
        )  # fmt: skip
        assert_clean("drawdown explain", explained.stdout + explained.stderr)
        assert "[redacted]" in explained.stdout  # the capture, or the path no action matched
