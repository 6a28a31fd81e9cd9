"""Credentials in URL paths: what `recording.redact_path` keeps, what older ledger rows show
when read back, the `requires … same` facts that would hold a secret, and how replay treats a
redacted capture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from drawdown import report
from drawdown.authority import evaluate, facts_of
from drawdown.classify import RequestView, classify
from drawdown.ledger.reader import Reader
from drawdown.policy.match import compile_path
from drawdown.recording import REDACTED, redact, redact_path
from drawdown.replay import replay

from tests.support.policies import policy_from
from tests.unit.seeding import Seeder

BOT = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw1"  # Telegram's documented example form
SLACK = "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
DISCORD = "Ab-cD_" * 11 + "xy"  # 68 token characters


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/bot{BOT}/sendMessage", "/bot[redacted]/sendMessage"),
        (f"/file/bot{BOT}/photos/file_1.jpg", "/file/bot[redacted]/photos/file_1.jpg"),
        (f"/services/{SLACK}", "/services/[redacted]/[redacted]/[redacted]"),
        (
            f"/api/webhooks/123456789012345678/{DISCORD}",
            "/api/webhooks/123456789012345678/[redacted]",
        ),
        (
            f"/api/v10/webhooks/123456789012345678/{DISCORD}/messages/99",
            "/api/v10/webhooks/123456789012345678/[redacted]/messages/99",
        ),
        (
            "/webhookb2/a1@b2/IncomingWebhook/0123abcd/c0ffee-11",
            "/webhookb2/a1@b2/IncomingWebhook/[redacted]/[redacted]",
        ),
        ("/v1/keys/sk-proj-abcdefgh/usage", "/v1/keys/[redacted]/usage"),
        ("/v1/AIzaSyA-0123456789abcdefghij/models", "/v1/[redacted]/models"),
        ("/repos/ghp_0123456789abcdefghij/x", "/repos/[redacted]/x"),
        ("/t/Bearer%20abc.def/x", "/t/[redacted]/x"),
        ("/s/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "/s/[redacted]"),
        (f"/{BOT}/getMe", "/[redacted]/getMe"),  # the bare bot token, without `bot`
    ],
)
def test_credential_shapes_in_paths_are_redacted(path: str, expected: str) -> None:
    assert redact_path(path) == expected
    assert expected.count("/") == path.count("/")  # the segment count is kept
    assert redact_path(expected) == expected  # and a redacted path stays as it is


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/v1beta/models/gemini-2.0-flash:generateContent",
        "/v1/projects/p-123/locations/us-central1/publishers/google/models/gemini-2.5-pro:streamGenerateContent",
        "/v1/messages/count_tokens",
        "/customers/cus_12345/refunds",
        "/services/billing/v2/invoices",  # a /services/ path that is no Slack webhook
        "/api/webhooks/list",
        "/robots.txt",
        "/bot/status",
        "/skills/sk/x",
        "/",
        "",
    ],
)
def test_ordinary_paths_are_kept(path: str) -> None:
    assert redact_path(path) == path


def test_captures_named_like_secrets_are_redacted_whatever_they_look_like() -> None:
    pattern = compile_path("/hooks/{secret}/send/{channel}")
    assert redact_path("/hooks/abc123/send/general", pattern) == "/hooks/[redacted]/send/general"
    # Only the captured text: the policy's own literal text around it stays, so the
    # pattern still matches the redacted path.
    telegram = compile_path("/bot{token}/sendMessage")
    assert redact_path("/botXYZ/sendMessage", telegram) == "/bot[redacted]/sendMessage"
    assert telegram.match("/bot[redacted]/sendMessage") == {"token": REDACTED}
    several = compile_path("/{apiKey}/{id}/{session_token}.json")
    assert redact_path("/k1/42/s1.json", several) == "/[redacted]/42/[redacted].json"
    # Ordinary names keep their values; a path the pattern does not match is only shape-checked.
    assert redact_path("/customers/42", compile_path("/customers/{id}")) == "/customers/42"
    assert redact_path("/other/abc", pattern) == "/other/abc"


def test_the_telegram_token_shape_is_redacted_in_query_and_body_values_too() -> None:
    assert redact({"bot": f"bot{BOT}", "chat": "123456789"}) == {
        "bot": REDACTED,
        "chat": "123456789",
    }


# --- policies ------------------------------------------------------------------------------


policy = policy_from


ACTIONS = """
actions:
  - {kind: telegram.send, match: {host: api.telegram.org, method: POST, path: "/bot{token}/sendMessage"}}
  - {kind: telegram.read, match: {host: api.telegram.org, method: GET, path: "/bot*/getMe"}}
  - {kind: vault.open, match: {host: vault.example.com, path: "/open/{link_secret}"}}
"""


def telegram(method: str, path: str, body: Any = None) -> RequestView:
    data = json.dumps(body).encode() if body is not None else b""
    return RequestView(method, "api.telegram.org", 443, path, {}, {}, data)


# --- reading a ledger written before paths were redacted -----------------------------------


@pytest.fixture
def seed(tmp_path: Path) -> Seeder:
    seeder = Seeder(tmp_path / "ledger.db")
    yield seeder
    seeder.close()


def test_rows_written_with_raw_paths_are_shown_redacted(seed: Seeder) -> None:
    raw = f"/bot{BOT}/sendMessage"
    seed.call(action="telegram.send", provider=None, host="api.telegram.org", path=raw)
    reason = f"no action matches POST relay.example.org{raw} (unknown_hosts: deny)"
    seed.call(host="relay.example.org", path=raw, deny=("unknown_host", reason))
    reader = Reader(str(seed.path))
    try:
        rows = reader.query("SELECT path, reason FROM decisions ORDER BY id")
    finally:
        reader.close()
    assert [r["path"] for r in rows] == ["/bot[redacted]/sendMessage"] * 2
    assert rows[1]["reason"] == (
        "no action matches POST relay.example.org/bot[redacted]/sendMessage (unknown_hosts: deny)"
    )
    logged = list(report.decision_log(str(seed.path)))
    assert BOT not in json.dumps(logged) and BOT not in json.dumps(report.build(str(seed.path)))


# --- requires … same: the facts a secret would be stored as ---------------------------------

REQUIRES = (
    ACTIONS
    + """
authority:
  rules:
    - {name: read-first, scope: "*", action: telegram.send, requires: [{action: telegram.read, same: {path.token: path.token}}]}
"""
)
READ_BY_TOKEN = REQUIRES.replace('path: "/bot*/getMe"', 'path: "/bot{token}/getMe"')


def test_a_secret_requires_compares_is_kept_as_a_digest(tmp_path: Path) -> None:
    p = policy(tmp_path, READ_BY_TOKEN)
    read = telegram("GET", f"/bot{BOT}/getMe")
    assert classify(p, read).kind == "telegram.read"
    (fact,) = facts_of(p.authority, "telegram.read", read)
    assert fact[0] == "path.token" and fact[1].startswith("sha256:") and BOT not in fact[1]
    send = telegram("POST", f"/bot{BOT}/sendMessage", {"chat_id": 1})
    assert classify(p, send).kind == "telegram.send"
    (check,) = evaluate(p.authority, {}, "s", "telegram.send", send).checks
    assert check.value == fact[1]  # the same secret, the same digest: the requirement is met
    other = telegram("POST", f"/bot9{BOT}/sendMessage", {"chat_id": 1})
    classify(p, other)
    assert evaluate(p.authority, {}, "s", "telegram.send", other).checks[0].value != fact[1]


def test_ordinary_values_requires_compares_are_kept_as_they_are(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        ACTIONS.replace("/open/{link_secret}", "/open/{id}")
        + """
authority:
  rules:
    - {scope: "*", action: telegram.send, requires: [{action: vault.open, same: {json.chat_id: path.id}}]}
""",
    )
    opened = RequestView("GET", "vault.example.com", 443, "/open/42", {}, {}, b"")
    classify(p, opened)
    assert facts_of(p.authority, "vault.open", opened) == [("path.id", "42")]


# --- replay ----------------------------------------------------------------------------------


def record(
    seed: Seeder, method: str, path: str, action: str, host: str = "api.telegram.org"
) -> Any:
    """A tool call as the proxy records it now: its path redacted for the action it matched."""
    return seed.call(
        action=action, provider=None, model=None, method=method, host=host, path=path,
        est_usd=0, actual_usd=0, features={"port": 443},
    )  # fmt: skip


def test_replay_classifies_redacted_paths_as_live(seed: Seeder, tmp_path: Path) -> None:
    p = policy(tmp_path, ACTIONS + "authority: {default: deny}\n")
    rows = []
    for view in (
        telegram("GET", f"/bot{BOT}/getMe"),
        telegram("POST", f"/bot{BOT}/sendMessage"),
        RequestView("GET", "vault.example.com", 443, "/open/s3cr3t", {}, {}, b""),
    ):
        action = classify(p, view).action
        assert action is not None
        kept = redact_path(view.path, action.match.path)  # as the proxy records it
        assert kept != view.path
        row = record(seed, view.method, kept, action.kind, host=view.host)
        rows.append(row)
    data = replay(p, str(seed.path))
    assert [(b["request_id"], b["action"]) for b in data["blocked"]] == [
        (r.request_id, r.action) for r in rows
    ]
    assert data["warnings"] == []  # the policy reads no redacted capture


def test_replay_treats_a_redacted_capture_as_absent_and_says_so(
    seed: Seeder, tmp_path: Path
) -> None:
    """Two requests' `[redacted]` tokens are no evidence they were the same bot: the requirement
    comparing them is unmet in replay, not met by two equal placeholders, and replay warns."""
    record(seed, "GET", "/bot[redacted]/getMe", "telegram.read")
    send = record(seed, "POST", "/bot[redacted]/sendMessage", "telegram.send")
    data = replay(policy(tmp_path, READ_BY_TOKEN), str(seed.path))
    (blocked,) = data["blocked"]
    assert blocked["request_id"] == send.request_id
    assert blocked["reason_code"] == "requires_unmet" and "no path.token" in blocked["reason"]
    (warning,) = data["warnings"]
    assert "path.token (2 request(s))" in warning and "redacted" in warning
    # A condition on it does not hold either.
    conditioned = (
        ACTIONS
        + """
authority:
  rules:
    - {name: bot-id, scope: "*", deny: [telegram.send], when: {path.token: {regex: "^[0-9]"}}}
    - {name: no-token, scope: "*", deny: [telegram.send], when: {path.token: {exists: false}}}
"""
    )
    data = replay(policy(tmp_path, conditioned, "conditioned.yaml"), str(seed.path))
    (blocked,) = data["blocked"]
    assert blocked["request_id"] == send.request_id and "no-token" in blocked["reason"]
    assert data["warnings"]


def test_replay_treats_a_redacted_body_value_as_absent(seed: Seeder, tmp_path: Path) -> None:
    fields = {"json.api_key": REDACTED}
    for action, method, host, path in (
        ("telegram.send", "POST", "api.telegram.org", "/bot1/sendMessage"),
        ("vault.open", "GET", "vault.example.com", "/open/1"),
    ):
        last = seed.call(
            action=action, provider=None, model=None, method=method, host=host, path=path,
            est_usd=0, actual_usd=0, features={"port": 443, "body_fields": json.dumps(fields)},
        )  # fmt: skip
    p = policy(
        tmp_path,
        ACTIONS
        + """
authority:
  rules:
    - {scope: "*", action: vault.open, requires: [{action: telegram.send, same: {json.api_key: json.api_key}}]}
""",
    )
    data = replay(p, str(seed.path))
    assert last.request_id in {b["request_id"] for b in data["blocked"]}
    assert any("json.api_key (2 request(s))" in w for w in data["warnings"])
