"""Secrets the ledger, the log and the messages must not keep (README, Guarantees 5): names run
together with a secret word, secrets inside text values, the bytes mitmproxy quotes from a
request it cannot parse, a DSN's password in any spelling, credential headers as identity."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from drawdown.addon import Drawdown
from drawdown.classify import RequestView, classify
from drawdown.cli import Announce, main
from drawdown.ledger.dsn import redact_dsn
from drawdown.ledger.postgres import scrub
from drawdown.master import DrawdownMaster, redact_wire_bytes
from drawdown.policy import PolicyInvalid, load_policy
from drawdown.policy.schema import credential_header
from drawdown.recording import (
    _NAME_STEMS,
    _SECRET_PARTS,
    REDACTED,
    SECRET_WORDS,
    features,
    redact,
    secret_name,
)
from mitmproxy import options
from mitmproxy.net.http.http1 import read_request_head

from tests.support.policies import policy_from

SECRET = "CNRYs3cr3tValue0042"
ACTIONS = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: crm.write, match: {host: crm.example.com, method: POST}, cost: {usd: 0.002}}
  - {kind: crm.read, match: {host: crm.example.com, method: GET}, cost: {usd: 0.002}}
"""


def view(method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
         host: str = "crm.example.com") -> RequestView:  # fmt: skip
    raw = json.dumps(body).encode() if body is not None else b""
    return RequestView(method, host, 443, path, query or {}, {}, raw)


# --- 1. names run together with a secret word ---------------------------------------------------

RUN_TOGETHER = [
    "authtoken", "accesstoken", "apitoken", "refreshtoken", "idtoken", "sessiontoken",
    "clientsecret", "apisecret", "secretkey", "privatekey", "accesskey", "authkey", "masterkey",
    "passcode", "adminpassword", "dbpassword", "userpassword", "csrftoken", "apiKey2", "api_key2",
    "AUTHTOKEN", "x-authtoken", "authentication",
]  # fmt: skip
ORDINARY = [
    "max_tokens", "tokens", "prompt_tokens", "completion_tokens", "total_tokens",
    "max_completion_tokens", "maxOutputTokens", "maxtokens", "monkey", "turkey", "hockey",
    "keys", "keyword", "keyboard", "model", "messages", "secretary", "code", "json.code",
]  # fmt: skip


@pytest.mark.parametrize("name", RUN_TOGETHER)
def test_a_name_run_together_with_a_secret_word_is_secret(name: str) -> None:
    assert secret_name(name)


@pytest.mark.parametrize("name", ORDINARY)
def test_usage_fields_and_ordinary_words_stay_readable(name: str) -> None:
    """metering, `when` conditions and replay read max_tokens and the usage counts."""
    assert not secret_name(name)
    assert redact({name: 7}) == {name: 7}


def test_run_together_names_are_redacted_in_the_query_the_fields_and_the_body(
    tmp_path: Path,
) -> None:
    names = RUN_TOGETHER[:17]
    fields = ", ".join(f"json.{n}" for n in names)
    p = policy_from(tmp_path, ACTIONS + f"record: {{bodies: full, fields: [{fields}]}}\n")
    query = {n: f"{SECRET}{i}" for i, n in enumerate(names)} | {"page": "2"}
    got = features(p, v := view("GET", "/api/customers/c1", query=query), classify(p, v))
    assert json.loads(got["query"]) == {n: REDACTED for n in names} | {"page": "2"}
    body = {n: f"{SECRET}{i}" for i, n in enumerate(names)} | {"max_tokens": 5, "note": "x"}
    got = features(p, v := view("POST", "/api/notes", body), classify(p, v))
    assert SECRET not in json.dumps(got)
    assert json.loads(got["body"]) == {n: REDACTED for n in names} | {"max_tokens": 5, "note": "x"}
    assert json.loads(got["body_fields"]) == {f"json.{n}": REDACTED for n in names}


def test_a_query_code_is_a_credential_but_a_body_code_is_kept(tmp_path: Path) -> None:
    """`?code=` is an Azure Functions key or an OAuth authorization code; a body's `code` is
    program text or an error's code, which policies read."""
    p = policy_from(tmp_path, ACTIONS + "record: {bodies: full}\n")
    v = view("POST", "/api/run", {"code": "print(1)"}, query={"code": SECRET, "country_code": "DE"})
    got = features(p, v, classify(p, v))
    assert json.loads(got["query"]) == {"code": REDACTED, "country_code": "DE"}
    assert json.loads(got["body"]) == {"code": "print(1)"}
    assert secret_name("query.code")  # a `requires … same` on it keeps only its digest


def test_every_secret_name_holds_a_stem_the_text_search_looks_for() -> None:
    """A text is searched for `name=value` pairs only when it holds one of the stems."""
    for word in [*SECRET_WORDS, *_SECRET_PARTS, *RUN_TOGETHER]:
        assert any(stem in word.lower() for stem in _NAME_STEMS), word


# --- 3. secrets inside text values (record: {bodies: full}) ----------------------------------


def test_secrets_inside_text_values_of_a_full_body_are_redacted(tmp_path: Path) -> None:
    p = policy_from(tmp_path, ACTIONS + "record: {bodies: full}\n")
    arguments = json.dumps({"username": "u", "password": f"{SECRET}a", "page": 2})
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "look up the customer"},
            {"role": "assistant", "tool_calls": [{"id": "t1", "type": "function",
             "function": {"name": "login", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "t1", "content": f"ok token={SECRET}b"},
        ],
        "metadata": {
            "db": f"postgresql://admin:{SECRET}c@db/x",
            "webhook": f"https://u:{SECRET}d@hooks.example.com/x",
            "connection_string": f"Server=x;Password={SECRET}e;User Id=sa",
            "headers": [["X-Api-Key", f"{SECRET}f"], ["Accept", "application/json"]],
            "har": [{"name": "Authorization", "value": f"{SECRET}g"}],
            "link": f"https://x.example/cb?state=1&access_token={SECRET}h",
        },
    }  # fmt: skip
    v = view("POST", "/v1/chat/completions", body, host="api.openai.com")
    kept = json.loads(features(p, v, classify(p, v))["body"])
    assert SECRET not in json.dumps(kept)
    call = kept["messages"][1]["tool_calls"][0]["function"]
    assert json.loads(call["arguments"]) == {"username": "u", "password": REDACTED, "page": 2}
    assert kept["messages"][2]["content"] == f"ok token={REDACTED}"
    assert kept["metadata"] == {
        "db": f"postgresql://admin:{REDACTED}@db/x",
        "webhook": f"https://u:{REDACTED}@hooks.example.com/x",
        "connection_string": f"Server=x;Password={REDACTED};User Id=sa",
        "headers": [["X-Api-Key", REDACTED], ["Accept", "application/json"]],
        "har": [{"name": "Authorization", "value": REDACTED}],
        "link": f"https://x.example/cb?state=1&access_token={REDACTED}",
    }
    assert kept["max_tokens"] == 5 and kept["messages"][0]["content"] == "look up the customer"


def test_a_pem_private_key_in_text_is_redacted_whatever_it_is_called() -> None:
    pem = f"-----BEGIN RSA PRIVATE KEY-----\nMII{SECRET} abc\n-----END RSA PRIVATE KEY-----"
    assert redact({"note": f"use this: {pem} then go"}) == {"note": f"use this: {REDACTED} then go"}


def test_text_without_secrets_is_kept_exactly() -> None:
    """Replay reads the recorded body: a JSON string with nothing secret in it is not rewritten."""
    arguments = '{ "city": "Paris",  "units": "metric" }'
    text = "Note: the key point is max_tokens=5; see https://example.com/a?b=1 and a:b"
    assert redact({"arguments": arguments, "text": text}) == {"arguments": arguments, "text": text}


def test_searching_text_for_secrets_is_bounded() -> None:
    started = time.monotonic()
    for text in ["[" * 200_000, "a" * 500_000 + ":" + "b", "a.a." * 100_000 + "://x@",
                 "key=" * 100_000, json.dumps({"password": "x"}) * 20_000,
                 "[" * 500 + '"password=' + SECRET + '"' + "]" * 500]:  # fmt: skip
        assert SECRET not in json.dumps(redact(text))
    assert time.monotonic() - started < 5


# --- 2. the bytes mitmproxy quotes from a request it cannot parse ----------------------------


def _mitmproxy_says(*lines: bytes) -> str:
    """The message mitmproxy's HTTP/1 layer logs for these request head lines."""
    with pytest.raises(ValueError) as caught:
        read_request_head(list(lines))
    return f"127.0.0.1:50000: {caught.value}"


def test_the_log_redacts_what_mitmproxy_quotes_of_a_request_it_cannot_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    said = [
        _mitmproxy_says(f"GET /v1beta/models?key={SECRET}1 x HTTP/1.1".encode()),
        _mitmproxy_says(f"GET http://u:{SECRET}2@crm.example.com/api/c6 HTTP/1.1".encode()),
        _mitmproxy_says(b"GET /v1/models HTTP/1.1", b"Host: a", f"broken header {SECRET}3".encode()),
        "Client closed connection before completing request headers: "
        + repr(f"POST /x?api_key={SECRET}4 HTTP/1.1\r\nHost: api.openai.com\r\n"
               f"Authorization: Bearer {SECRET}5\r\n".encode()),
    ]  # fmt: skip
    server = logging.getLogger("mitmproxy.proxy.server")

    async def run() -> None:
        master = DrawdownMaster(options.Options(), tail=[Drawdown(), Announce()])
        try:
            for message in said:
                server.info(message)
            master.options.update(termlog_verbosity="debug")  # at every verbosity
            server.info(said[0])
        finally:
            master._termlog_addon.uninstall()

    caplog.set_level(logging.INFO)
    asyncio.run(run())
    logged = [r.getMessage() for r in caplog.records if r.name == "mitmproxy.proxy.server"]
    assert SECRET in "".join(said) and SECRET not in "\n".join(logged), logged
    assert logged == [
        f"127.0.0.1:50000: Bad HTTP request line: b'GET /v1beta/models?key={REDACTED} {REDACTED} HTTP/1.1'",
        f"127.0.0.1:50000: Bad HTTP request line: b'GET http://u:{REDACTED}@crm.example.com/api/c6 HTTP/1.1'",
        f"127.0.0.1:50000: Invalid header line: b'broken {REDACTED}'",
        "Client closed connection before completing request headers: "
        f"b'POST /x?api_key={REDACTED} HTTP/1.1\\r\\nHost: api.openai.com\\r\\n"
        f"Authorization: {REDACTED}\\r\\n'",
        f"127.0.0.1:50000: Bad HTTP request line: b'GET /v1beta/models?key={REDACTED} {REDACTED} HTTP/1.1'",
    ]  # fmt: skip


def test_wire_bytes_redaction_leaves_other_messages_be() -> None:
    for message in ["client connect", "server connect api.openai.com:443 (1.2.3.4:443)",
                    "drawdown: deny agent:a/run:b crm.write: Bob's rule",
                    "Bad HTTP request line: b'CONNECT api.openai.com:443 HTTP/1.1'"]:  # fmt: skip
        assert redact_wire_bytes(message) == message
    shaped = redact_wire_bytes("Bad HTTP request line: b'sk-proj-abcdefabcdef'")
    assert shaped == f"Bad HTTP request line: b'{REDACTED}'"
    telegram = redact_wire_bytes(
        "Bad HTTP request line: b'GET /bot123456:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/x y'"
    )
    assert telegram == f"Bad HTTP request line: b'GET /bot{REDACTED}/x {REDACTED}'"


# --- 4. a mistyped ledger URL ----------------------------------------------------------------


@pytest.mark.parametrize(
    "db",
    [
        f"postgresq://user:{SECRET}@127.0.0.1/db",
        f"POSTGRESQL://user:{SECRET}@127.0.0.1:5432/db",
        f"mysql://root:{SECRET}@x/y?sslpassword={SECRET}",
        f"postgresq://user@h/db?password={SECRET}",
    ],
)
def test_a_mistyped_ledger_url_is_refused_without_its_password(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["budgets", "--db", db])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "argument --db: wants a path" in err
    assert SECRET not in err and "***" in err and db.split("://")[0] + "://" in err


# --- 5. every password parameter of a DSN ----------------------------------------------------


def test_a_dsn_loses_every_password_parameter() -> None:
    url = f"postgresql://postgres@127.0.0.1:5999/test?sslpassword={SECRET}&sslmode=require"
    assert (
        redact_dsn(url)
        == "postgresql://postgres@127.0.0.1:5999/test?sslpassword=***&sslmode=require"
    )
    assert redact_dsn(f"postgresql://u@h/d?PassWord={SECRET}") == "postgresql://u@h/d?PassWord=***"
    for shown in ("sqlite:///tmp/x.db", "./drawdown.db", "postgresql://u@h/d?sslmode=require"):
        assert redact_dsn(shown) == shown
    message = f"connection failed: {url}; sslpassword {SECRET} rejected"
    scrubbed = scrub(message, url)
    assert SECRET not in scrubbed and "sslpassword=***" in scrubbed


# --- 6. credential headers as identity sources -----------------------------------------------


@pytest.mark.parametrize(
    "header",
    ["X-Auth", "Authentication", "X-Authentication", "X-Otp", "X-Session", "X-Api-Auth",
     "X-Csrftoken", "X-Passcode", "X-Api-Key2", "X-Signature", "X-Authtoken", "X-Admin-Password"],
)  # fmt: skip
def test_more_credential_headers_are_no_identity_source(tmp_path: Path, header: str) -> None:
    assert credential_header(header)
    path = tmp_path / "policy.yaml"
    path.write_text(f"identity:\n  agent: [{{header: {header}}}, {{value: a}}]\nactions: []\n")
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(str(path))
    assert f"identity.agent: header '{header}' carries a credential" in str(caught.value)


@pytest.mark.parametrize(
    "header",
    ["X-Drawdown-Agent", "X-Drawdown-Run", "X-Drawdown-Tenant", "X-Drawdown-Workflow",
     "X-Auth-Request-User", "X-Forwarded-User", "X-Session-Id", "X-SessionId", "X-Agent", "X-Run",
     "X-Tokens", "X-Monkey"],
)  # fmt: skip
def test_headers_that_name_callers_are_still_identity_sources(tmp_path: Path, header: str) -> None:
    assert not credential_header(header)
    path = tmp_path / "policy.yaml"
    path.write_text(f"identity:\n  agent: [{{header: {header}}}]\nactions: []\n")
    assert [s.arg for s in load_policy(str(path)).identity["agent"]] == [header]
