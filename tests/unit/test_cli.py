"""The CLI, without a proxy: check, env, explain, report."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import sqlite3
import stat
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from drawdown.cacerts import ensure_ca
from drawdown.cli import UsageError, main, parse_listen
from drawdown.ledger.api import SCHEMA_VERSION, Amount, BatchHold, Claim, Completion, DecisionRow
from drawdown.ledger.sqlite import SQLiteLedger
from drawdown.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _runners_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner's own NO_PROXY would make `drawdown env` warn (its own test sets one)."""
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)


def test_check_valid_and_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "policies" / "default.yaml")]) == 0
    digest = load_policy(str(ROOT / "policies" / "default.yaml")).digest[:16]
    # The digest its decisions carry and a report names it by.
    assert (
        capsys.readouterr()
        .out.rstrip()
        .endswith(f"ok — mode shadow, 4 action(s), 3 budget(s) from 1 file(s), policy {digest}")
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: enforce\nbudgets:\n  - {scope: 'agent:*', usd: -1}\n")
    assert main(["check", str(bad)]) == 1
    assert capsys.readouterr().out.strip() == f"{bad}:3: usd must be a number ≥ 0, not -1"


def test_env_prints_what_an_agent_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    confdir = tmp_path / "conf"
    ensure_ca(confdir)  # as `drawdown run` makes it
    assert (
        main(
            [
                "env",
                "--confdir",
                str(confdir),
                "--listen",
                "127.0.0.1:9090",
                "--agent",
                "research bot",
                "--run",
                "r/1",
            ]
        )
        == 0
    )
    lines = dict(
        line.removeprefix("export ").split("=", 1) for line in capsys.readouterr().out.splitlines()
    )
    assert (
        lines["HTTPS_PROXY"] == lines["HTTP_PROXY"] == "http://research%20bot:r%2F1@127.0.0.1:9090"
    )
    bundle = Path(lines["SSL_CERT_FILE"])
    assert (
        lines["REQUESTS_CA_BUNDLE"]
        == lines["NODE_EXTRA_CA_CERTS"]
        == lines["CURL_CA_BUNDLE"]  # curl reads it first: a preset value would win
        == lines["AWS_CA_BUNDLE"]  # boto3 (Bedrock) reads it first: a preset value would win
        == str(bundle)
    )
    assert lines["NODE_USE_ENV_PROXY"] == "1"  # else Node's fetch ignores HTTPS_PROXY
    text = bundle.read_text()
    # The bundle holds drawdown's CA *and* the system's CAs, so the agent's other TLS keeps working.
    assert (confdir / "mitmproxy-ca-cert.pem").read_text().strip() in text
    assert text.count("BEGIN CERTIFICATE") > 1
    # The CA's private key is readable by its owner only.
    assert (confdir / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0
    # JVMs: the proxy and the same certificates as a PKCS#12 truststore, in JAVA_TOOL_OPTIONS.
    java = lines["JAVA_TOOL_OPTIONS"]
    store = confdir / "drawdown-ca-truststore.p12"
    assert java == (
        '"${JAVA_TOOL_OPTIONS:+$JAVA_TOOL_OPTIONS }-Dhttps.proxyHost=127.0.0.1 '
        "-Dhttps.proxyPort=9090 -Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort=9090 "
        f'-Djavax.net.ssl.trustStore={store} -Djavax.net.ssl.trustStoreType=PKCS12"'
    )
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import pkcs12

    with warnings.catch_warnings():  # a system CA with a negative serial number
        warnings.simplefilter("ignore")
        trusted = pkcs12.load_pkcs12(store.read_bytes(), None).additional_certs
    ca = x509.load_pem_x509_certificate((confdir / "mitmproxy-ca-cert.pem").read_bytes())
    assert ca in [entry.certificate for entry in trusted]
    assert len(trusted) > 1  # the system's CAs too


@pytest.mark.parametrize(
    ("variables", "covered"),
    [
        ({"NO_PROXY": "localhost,127.0.0.1,.svc,.cluster.local,169.254.169.254,s3.amazonaws.com"}, None),
        ({"NO_PROXY": "localhost,.amazonaws.com"},
         "NO_PROXY here sends calls to these providers around the proxy, unseen and unbudgeted: "
         "amazonaws.com covers bedrock-runtime.*.amazonaws.com, bedrock-runtime-fips.*.amazonaws.com. "
         "Take those entries out of localhost,.amazonaws.com"),
        ({"no_proxy": "*", "NO_PROXY": "*"},
         "no_proxy and NO_PROXY here send calls to these providers around the proxy, unseen and "
         "unbudgeted: * covers every provider. Take those entries out of *"),
        ({"no_proxy": "internal.example,*.OpenAI.com:443", "NO_PROXY": "europe-west4-aiplatform.googleapis.com"},
         "no_proxy here sends calls to these providers around the proxy, unseen and unbudgeted: "
         "openai.com covers api.openai.com. Take those entries out of internal.example,*.OpenAI.com:443"
         ", or `unset no_proxy NO_PROXY`\n"
         "drawdown: NO_PROXY here sends calls to these providers around the proxy, unseen and "
         "unbudgeted: europe-west4-aiplatform.googleapis.com covers *-aiplatform.googleapis.com. "
         "Take those entries out of europe-west4-aiplatform.googleapis.com"),
    ],
)  # fmt: skip
def test_env_warns_when_no_proxy_would_send_a_providers_calls_around_the_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str], covered: str | None,
) -> None:  # fmt: skip
    """An AWS base image's NO_PROXY=.amazonaws.com, or a CI's `*`, made every Bedrock (or every)
    call go around the proxy: unseen and unbudgeted, and `drawdown env` said nothing. It still
    leaves NO_PROXY alone (the agent's own services stay direct), and says so on stderr: once
    for a value both variables hold, a line for each value that covers a provider."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    ensure_ca(tmp_path / "conf")
    assert main(["env", "--confdir", str(tmp_path / "conf"), "--listen", "127.0.0.1:9090"]) == 0
    out, err = capsys.readouterr()
    assert "export HTTPS_PROXY=http://127.0.0.1:9090" in out and "NO_PROXY" not in out
    if covered is None:
        assert err == ""
        return
    assert err == f"drawdown: {covered}, or `unset no_proxy NO_PROXY`\n"


ACTIONS_POLICY = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: crm.read, match: {host: crm.corp.example, method: GET}, cost: {usd: 0.002}}
  - {kind: crm.write, match: {host: crm.corp.example, method: POST}, cost: {usd: 0.01}}
  - {kind: refund.issue, match: {host: "*.payments.example"}, cost: {usd: 0.01}}
  - {kind: search.local, match: {host: "localhost:8443"}}
  - {kind: ledger.tool, match: {host: 10.20.0.7}}
  - {kind: regional.api, match: {host: "api.*.region.example"}}
  - {kind: vault.read, match: {host: "[fd00::7]:8443"}}
  - {kind: dotted.else, match: {host: "*.*"}}
  - {kind: anything.else, match: {host: "*"}}
"""


@pytest.mark.parametrize(
    ("no_proxy", "covered"),
    [
        ("localhost:9000,127.0.0.1,.svc,other.example,api.openai.com:8080,[fd00::7]:9000", None),
        ("eu.region.example,[fd00::7]:8443,api.openai.com:443",
         "NO_PROXY here sends calls to these hosts around the proxy, unseen and unbudgeted: "
         "eu.region.example covers api.*.region.example (regional.api); fd00::7 covers "
         "[fd00::7]:8443 (vault.read); api.openai.com covers api.openai.com (llm). Take those "
         "entries out of eu.region.example,[fd00::7]:8443,api.openai.com:443"),
        (".corp.example,localhost",
         "NO_PROXY here sends calls to these hosts around the proxy, unseen and unbudgeted: "
         "corp.example covers crm.corp.example (crm.read, crm.write); localhost covers "
         "localhost:8443 (search.local). Take those entries out of .corp.example,localhost"),
        ("eu.payments.example,10.0.0.0/8,api.openai.com",
         "NO_PROXY here sends calls to these hosts around the proxy, unseen and unbudgeted: "
         "eu.payments.example covers *.payments.example (refund.issue); 10.0.0.0/8 covers "
         "10.20.0.7 (ledger.tool); api.openai.com covers api.openai.com (llm). Take those entries "
         "out of eu.payments.example,10.0.0.0/8,api.openai.com"),
        ("*", "NO_PROXY here sends calls to these hosts around the proxy, unseen and unbudgeted: "
         "* covers every host. Take those entries out of *"),
    ],
)  # fmt: skip
def test_env_with_the_policy_warns_when_no_proxy_covers_a_host_its_actions_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    no_proxy: str, covered: str | None,
) -> None:  # fmt: skip
    """NO_PROXY=.corp.example sent every call to the CRM tool around the proxy: its `deny`s,
    budgets and loop guard unchecked, and `env` checked only the LLM providers' hosts. Given
    the policy `run` enforces, it names the hosts its actions match that an entry covers (a
    domain, a host of a glob, an address range, the action's port), and not an entry for a
    port the action does not use or a catch-all action's any host (`*`, `*.*`)."""
    monkeypatch.setenv("NO_PROXY", no_proxy)
    policy = tmp_path / "policy.yaml"
    policy.write_text(ACTIONS_POLICY)
    ensure_ca(tmp_path / "conf")
    argv = ["env", "--confdir", str(tmp_path / "conf"), "--listen", "127.0.0.1:9090"]
    assert main([*argv, "--policy", str(policy)]) == 0
    out, err = capsys.readouterr()
    assert "export HTTPS_PROXY=http://127.0.0.1:9090" in out
    if covered is None:
        assert err == ""
    else:
        assert err == f"drawdown: {covered}, or `unset no_proxy NO_PROXY`\n"
    # Without the policy, only the providers' hosts are checked.
    assert main(argv) == 0
    _, err = capsys.readouterr()
    assert "crm.corp.example" not in err and "search.local" not in err


def test_env_refuses_a_broken_policy_before_printing_an_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("actions:\n  - {kind: llm, match: {host: [}\n")
    ensure_ca(tmp_path / "conf")
    assert main(["env", "--confdir", str(tmp_path / "conf"), "--policy", str(policy)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("drawdown: invalid policy:\n" + str(policy) + ":2:")


def test_env_says_when_jvm_agents_cannot_be_configured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The JVM splits JAVA_TOOL_OPTIONS on whitespace: a truststore path with a space would
    have become two broken options in every JVM the shell starts."""
    ensure_ca(tmp_path / "my conf")
    assert main(["env", "--confdir", str(tmp_path / "my conf")]) == 0
    out, err = capsys.readouterr()
    assert "JAVA_TOOL_OPTIONS" not in out and "export SSL_CERT_FILE=" in out
    assert err.startswith("drawdown: JVM agents not configured: JAVA_TOOL_OPTIONS cannot carry")


def test_explain_shows_the_decision_path(capsys: pytest.CaptureFixture[str]) -> None:
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    )
    code = main(
        ["explain", "--policy", str(ROOT / "policies" / "example.yaml"), "--url", "https://api.openai.com/v1/chat/completions",
         "--header", "X-Drawdown-Agent:research", "--header", "X-Drawdown-Run:r1", "--json", body, "--as-json"]
    )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scope"] == "tenant:acme/agent:research/run:r1" and out["action"] == "llm"
    assert out["decision"] == "allow"
    stages = [stage for stage, _ in out["steps"]]
    assert stages[:3] == ["identity", "action", "estimate"] and stages.count("budget") == 4


def test_explain_shows_a_budgets_dollar_limit_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`usd: 0.015` was shown "usd 0.02" (cents), and `usd: 5` stays "usd 5.00"."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "actions: [{kind: llm, provider: openai, match: {host: api.openai.com}}]\n"
        "budgets:\n"
        "  - {name: small, scope: 'agent:*', usd: 0.015}\n"
        "  - {name: daily, scope: 'agent:*', usd: 5, per: day}\n"
    )
    code = main(
        ["explain", "--policy", str(policy), "--url", "https://api.openai.com/v1/chat/completions",
         "--json", '{"model": "gpt-4o-mini", "messages": [], "max_tokens": 10}']
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "budget    agent:anonymous (small; usd 0.015)\n" in out
    assert "budget    agent:anonymous (daily; usd 5.00 per day)\n" in out


def test_explain_counts_an_image_and_authorizes_a_free_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain said an image generation "passes through uncharged" (the proxy now counts it
    as a request), and stopped before authority on count_tokens, which the proxy authorizes."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "actions:\n"
        "  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
        "  - {kind: claude, provider: anthropic, match: {host: api.anthropic.com}}\n"
        'authority:\n  rules:\n    - {scope: "*", deny: [claude]}\n'
        'budgets:\n  - {scope: "agent:*", requests: 5}\n'
    )

    def explain(url: str, body: str) -> dict[str, Any]:
        args = ["explain", "--policy", str(policy), "--url", url, "--json", body, "--as-json"]
        assert main(args) == 0
        return json.loads(capsys.readouterr().out)

    image = explain("https://api.openai.com/v1/images/generations", '{"model": "dall-e-3"}')
    assert image["decision"] == "allow" and image["estimate"]["requests"] == 1
    assert any("counted as a request" in text for _, text in image["steps"])
    assert [stage for stage, _ in image["steps"]].count("budget") == 1
    counted = explain("https://api.anthropic.com/v1/messages/count_tokens", '{"model": "m"}')
    assert counted["decision"] == "deny" and counted["reason"].startswith("not_authorized")


def test_explain_words_no_tokens_and_a_captured_path_plainly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Python values reached the text: `openai other model None: 0 input tokens + up to 0
    output = ≈$0.0000` for a model listing (a call with no tokens), and `captured {'id': 'c7'}`."""
    policy = str(ROOT / "policies" / "example.yaml")
    listing = ["--method", "GET", "--url", "https://api.openai.com/v1/models"]
    assert main(["explain", "--policy", policy, *listing]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "input tokens" not in out and "≈$" not in out
    (estimate,) = [line for line in out.splitlines() if line.startswith("estimate")]
    assert estimate.split(None, 1)[1] == (
        "openai other: no tokens to meter; the provider does not bill it: uncharged and unguarded"
    )
    customer = ["--method", "GET", "--url", "https://crm.example.com/api/customers/c7"]
    assert main(["explain", "--policy", policy, *customer]) == 0
    out = capsys.readouterr().out
    assert "(the action at " in out and ", captured id=c7)" in out and "{" not in out


def test_explain_says_a_batchs_results_are_held_at_zero_and_charged_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "actions:\n"
        "  - {kind: llm, provider: anthropic, match: {host: api.anthropic.com}}\n"
        'budgets:\n  - {scope: "agent:*", usd: 5}\n'
    )
    url = "https://api.anthropic.com/v1/messages/batches/msgbatch_1/results"
    args = ["explain", "--policy", str(policy), "--method", "GET", "--url", url, "--as-json"]
    assert main(args) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["decision"] == "allow"
    assert explained["estimate"] == {"usd_nanos": 0, "tokens": 0, "requests": 1}
    (said,) = [text for stage, text in explained["steps"] if stage == "estimate"]
    assert "a batch's results, held at $0" in said and "the first time they are read" in said
    # The batch itself, submitted: held at its requests' estimate, as the proxy holds it.
    params = {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
    }
    body = json.dumps({"requests": [{"custom_id": "a", "params": params}] * 3})
    url = "https://api.anthropic.com/v1/messages/batches"
    assert (
        main(["explain", "--policy", str(policy), "--url", url, "--json", body, "--as-json"]) == 0
    )
    submitted = json.loads(capsys.readouterr().out)
    said, held = [text for stage, text in submitted["steps"] if stage == "estimate"]
    assert "a batch of 3 requests at the batch price, most on claude-haiku-4-5" in said
    assert held.startswith("held past the submission, until the batch's results are read")
    assert submitted["estimate"]["tokens"] > 300 and submitted["estimate"]["usd_nanos"] > 0


def test_explain_prices_an_uploaded_transcription_as_the_proxy_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain took a JSON body only: a transcription (a multipart upload) could not be
    explained. --form and --file build the form; the estimate names the seconds of audio it
    reserves, at genai-prices' price (Groq's on api.groq.com)."""
    import io
    import wave

    import genai_prices

    audio = io.BytesIO()
    with wave.open(audio, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(2 * 8000 * 42))
    clip = tmp_path / "meeting.wav"
    clip.write_bytes(audio.getvalue())
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "actions:\n  - {kind: llm, provider: openai, match: {host: [api.openai.com, api.groq.com]}}\n"
    )

    def explain(url: str, model: str) -> dict[str, Any]:
        args = ["explain", "--policy", str(policy), "--url", url, "--form", f"model={model}"]
        assert main([*args, "--file", f"file={clip}", "--as-json"]) == 0
        return json.loads(capsys.readouterr().out)

    def price(model: str, provider: str) -> int:
        usage = genai_prices.Usage(audio_seconds=42, input_audio_seconds=42)
        total = genai_prices.calc_price(usage, model, provider_id=provider).total_price
        return math.ceil(total * 1_000_000_000)

    found = explain("https://api.openai.com/v1/audio/transcriptions", "whisper-1")
    assert found["estimate"]["usd_nanos"] == price("whisper-1", "openai")
    assert any("+ 42 audio_seconds" in text for _, text in found["steps"])
    groq = explain("https://api.groq.com/openai/v1/audio/transcriptions", "whisper-large-v3")
    assert groq["estimate"]["usd_nanos"] == price("whisper-large-v3", "groq")
    base = ["explain", "--policy", str(policy), "--url", "https://api.openai.com/v1/audio/x"]
    assert main([*base, "--file", f"file={tmp_path / 'missing.wav'}"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main([*base, "--json", "{}", "--form", "model=whisper-1"]) == 2
    assert "two kinds of body" in capsys.readouterr().err


def test_explain_rejects_bad_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "explain",
            "--policy",
            str(ROOT / "policies" / "example.yaml"),
            "--url",
            "https://x/",
            "--json",
            "{nope",
        ]
    )
    assert code == 2 and "--json is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://files.example.com/x", "--url wants an http:// or https:// URL"),
        ("https://", "--url names no host"),
        ("https://api.openai.com:99999/v1/models", "Port out of range"),
        ("https://[::1/v1/models", "Invalid IPv6 URL"),
        ("https://a b.example/v1", "--url's host holds a space or control character"),
    ],
)
def test_explain_refuses_a_url_no_proxy_would_see(
    url: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """These once explained a request to nowhere, or ended in a traceback."""
    code = main(["explain", "--policy", str(ROOT / "policies" / "example.yaml"), "--url", url])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("drawdown: ") and says in err and "Traceback" not in err


def test_explain_refuses_a_header_no_request_could_carry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--header $'X-A: b\\r\\nX-B: c'` was explained as one header holding a line break."""
    code = main(
        ["explain", "--policy", str(ROOT / "policies" / "example.yaml"), "--url",
         "https://api.openai.com/v1/models", "--header", "X-A: b\r\nX-B: c"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--header holds a line break or NUL, which no header can" in err


def test_explain_prints_the_policys_warnings_as_check_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A policy that loads with warnings (here: no actions, so nothing is classified) was
    explained without them, the likely reason for its decision unsaid."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    code = main(
        ["explain", "--policy", str(policy), "--url", "https://api.openai.com/v1/models",
         "--as-json"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["action"] is None
    assert captured.err == (
        f"{policy}:1: warning: the policy defines no actions: no request is classified, so no "
        "budget, rule or anomaly check applies to any\n"
    )


def test_listen_takes_ipv6_in_brackets_and_env_writes_it_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_listen("[::1]:9090") == ("::1", 9090)
    with pytest.raises(UsageError, match=r"in brackets: \[::1\]:8080"):
        parse_listen("::1")  # once read as host ':' and port 1
    ensure_ca(tmp_path)
    assert main(["env", "--confdir", str(tmp_path), "--listen", "[::1]:9090"]) == 0
    assert "export HTTPS_PROXY='http://[::1]:9090'" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    ("listen", "fqdn", "hostname", "expected"),
    [
        ("0.0.0.0:9090", "proxy.corp.example", "proxy", "proxy.corp.example"),
        # /etc/hosts mapping the host name to a loopback address makes getfqdn() say localhost
        ("[::]:9090", "localhost", "build-7", "build-7"),
        ("0.0.0.0:9090", "localhost.localdomain", "localhost", "127.0.0.1"),
    ],
)
def test_env_for_a_proxy_on_every_address_names_one_an_agent_can_reach(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    listen: str,
    fqdn: str,
    hostname: str,
    expected: str,
) -> None:
    """`--listen 0.0.0.0:8080` printed HTTPS_PROXY=http://0.0.0.0:8080, which no agent can
    connect to; the machine's name is what agents on other hosts (the reason to listen on
    every address) and this one alike reach."""
    import socket

    monkeypatch.setattr(socket, "getfqdn", lambda name="": fqdn)
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    ensure_ca(tmp_path)
    assert main(["env", "--confdir", str(tmp_path), "--listen", listen, "--agent", "a"]) == 0
    out, err = capsys.readouterr()
    lines = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    assert lines["HTTPS_PROXY"] == lines["HTTP_PROXY"] == f"http://a:@{expected}:9090"
    assert f"-Dhttps.proxyHost={expected} " in lines["JAVA_TOOL_OPTIONS"]
    every = listen.rpartition(":")[0]
    assert err.startswith(f"drawdown: {every} is every address of this machine")
    assert f"the proxy URL names {expected} instead" in err


def test_env_for_a_proxy_on_one_address_keeps_it_and_says_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ensure_ca(tmp_path)
    for listen, url in (
        ("10.1.2.3:9090", "http://10.1.2.3:9090"),
        ("proxy:9090", "http://proxy:9090"),
    ):
        assert main(["env", "--confdir", str(tmp_path), "--listen", listen]) == 0
        out, err = capsys.readouterr()
        assert f"export HTTPS_PROXY={url}" in out.splitlines() and err == ""


def _traffic(db: Path) -> None:
    ledger = SQLiteLedger(db)
    claims = [Claim("agent:*/run:*", "agent:research/run:7f3a", 500_000_000, None, 200)]
    for i in range(3):
        row = DecisionRow(
            uuid.uuid4().hex,
            1000.0 + i,
            "allow",
            "enforce",
            "agent:research/run:7f3a",
            agent="research",
            run="7f3a",
            action="llm",
        )
        outcome = ledger.reserve(row, claims, Amount(usd=40_000_000, tokens=900, requests=1), 5000)
        if i < 2:
            ledger.commit(
                row.request_id,
                outcome.hold_id,
                Completion(Amount(usd=30_000_000, tokens=700, requests=1), 200, 600, 100, "usage"),
                1001.0 + i,
            )
        else:
            ledger.release(
                row.request_id,
                outcome.hold_id,
                Completion(status=500),
                "upstream answered 500",
                1003.0,
            )
    denied = DecisionRow(
        uuid.uuid4().hex,
        1004.0,
        "allow",
        "enforce",
        "agent:research/run:7f3a",
        agent="research",
        run="7f3a",
        action="llm",
    )
    ledger.reserve(denied, claims, Amount(usd=600_000_000, requests=1), 5000)
    ledger.close()


def test_budgets_and_report_write_a_window_start_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`drawdown budgets` wrote `2026-12-05T00:00Z` where `drawdown report` wrote
    `2026-12-05T00:00:00Z`: a tool reading both met two formats for one field."""
    db = tmp_path / "ledger.db"
    day = 1_796_428_800  # 2026-12-05T00:00:00Z
    ledger = SQLiteLedger(db)
    claim = Claim("agent:*", "agent:a", 1_000_000_000, None, None, "day", day, day + 86_400)
    row = DecisionRow(uuid.uuid4().hex, day + 60.0, "allow", "enforce", "agent:a", agent="a")
    ledger.reserve(row, [claim], Amount(usd=1_000_000, requests=1), 5000)
    ledger.close()
    assert main(["budgets", "--db", str(db), "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert main(["report", "--db", str(db), "--json"]) == 0
    (reported,) = json.loads(capsys.readouterr().out)["budgets"]
    assert listed["window_start"] == reported["window_start"] == "2026-12-05T00:00:00Z"
    assert main(["budgets", "--db", str(db)]) == 0
    assert "day from 2026-12-05T00:00:00Z" in capsys.readouterr().out


def test_budgets_names_the_batch_jobs_held_while_they_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch's estimate stays held until its results are read: `drawdown budgets` says for
    which batch, or the held figure would look stranded."""
    db = tmp_path / "ledger.db"
    ledger = SQLiteLedger(db)
    claim = Claim("run:*", "agent:a/run:r", 10_000_000, None, None)
    for n, key in enumerate(
        ("https://api.anthropic.com messages.batches.results msgbatch_1", "k2")
    ):
        row = DecisionRow(uuid.uuid4().hex, 1000.0 + n, "allow", "enforce", "agent:a/run:r")
        hold = ledger.reserve(row, [claim], Amount(usd=2_900_000, tokens=900, requests=1), 5000)
        kept = BatchHold(key, keep_until=1_796_428_800.0 + n)
        done = Completion(actual=Amount(requests=1), status=200, batch=kept)
        ledger.commit(row.request_id, hold.hold_id, done, 1001.0 + n)
    ended = DecisionRow(uuid.uuid4().hex, 1100.0, "allow", "enforce", "agent:a/run:r")
    read = ledger.reserve(ended, [claim], Amount(requests=1), 5000)
    batch_ended = Completion(status=200, batch=BatchHold("k2", ended=True))
    ledger.commit(ended.request_id, read.hold_id, batch_ended, 1101.0)
    ledger.close()
    assert main(["budgets", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "held for 1 batch job(s) until their results are read:" in out
    assert (
        "  https://api.anthropic.com messages.batches.results msgbatch_1: $0.0029, 900 tokens, "
        "agent:a/run:r, at most until 2026-12-05T00:00:00Z" in out
    )
    assert "k2" not in out  # ended: released
    assert re.search(r"\s0 \+ 0\.0029 / 0\.01\s", out)  # the held figure it explains
    assert main(["budgets", "--db", str(db), "--json"]) == 0
    (instance,) = json.loads(capsys.readouterr().out)
    assert instance["held"]["usd_nanos"] == 2_900_000
    assert instance["held_for_batches"] == [
        {
            "key": "https://api.anthropic.com messages.batches.results msgbatch_1",
            "scope": "agent:a/run:r",
            "usd": 0.0029,
            "usd_nanos": 2_900_000,
            "tokens": 900,
            "until": "2026-12-05T00:00:00Z",
        }
    ]


def test_budgets_write_dollars_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As the report does: rounded to 4 places, $0.04995 spent of $0.05 read as spent."""
    db = tmp_path / "ledger.db"
    ledger = SQLiteLedger(db)
    claim = Claim("run:*", "agent:a/run:r", 50_000_000, None, None)
    row = DecisionRow(uuid.uuid4().hex, 1000.0, "allow", "enforce", "agent:a/run:r")
    hold = ledger.reserve(row, [claim], Amount(usd=40_000_000), 5000)
    spent = Completion(actual=Amount(usd=49_950_000, requests=1), status=200)
    ledger.commit(row.request_id, hold.hold_id, spent, 1001.0)
    ledger.close()
    assert main(["budgets", "--db", str(db)]) == 0
    assert re.search(r"\s0\.04995 / 0\.05\s", capsys.readouterr().out)


def test_report_json_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "ledger.db"
    _traffic(db)
    assert main(["report", "--db", str(db), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decisions"] == {"allow": 3, "deny": 1, "would_deny": 0}
    (budget,) = report["budgets"]
    assert (
        budget["scope"] == "agent:research/run:7f3a"
        and budget["per"] is None
        and budget["window_start"] is None
    )
    assert budget["limit"] == {"usd": 0.5, "tokens": None, "requests": 200}
    assert budget["spent"] == {"usd": 0.06, "tokens": 1400, "requests": 2}
    assert budget["reserved"] == {"usd": 0.0, "tokens": 0, "requests": 0}
    (run,) = report["runs"]
    assert {k: run[k] for k in ("run", "scope", "requests", "allowed", "denied", "would_deny", "usd", "tokens_in", "tokens_out", "status")} == {
        "run": "7f3a", "scope": "agent:research/run:7f3a", "requests": 4, "allowed": 3, "denied": 1, "would_deny": 0,
        "usd": 0.06, "tokens_in": 1200, "tokens_out": 200, "status": "budget_exhausted",
    }  # fmt: skip
    assert run["anomalies"] == [] and report["anomalies"] == []


@pytest.mark.parametrize(
    "command",
    [
        ["report"],
        ["budgets"],
        ["verify"],
        ["prune", "--older-than", "90d"],
        ["replay", "--policy", str(ROOT / "policies" / "default.yaml")],
    ],
)
def test_a_missing_ledger_is_told_to_pass_db_only_when_none_was(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    """`--db missing.db` was advised "or pass --db"; without --db (./drawdown.db, not here) the
    user may well have meant another ledger."""
    from drawdown import cli
    from drawdown.ledger import reader

    assert reader.DEFAULT_DB == cli.DEFAULT_DB
    missing = tmp_path / "missing.db"
    assert main([*command, "--db", str(missing)]) == 1
    assert capsys.readouterr().err == (
        f"drawdown: no ledger at {missing} (start `drawdown run --db {missing}` first)\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(command) == 1
    assert capsys.readouterr().err == (
        "drawdown: no ledger at ./drawdown.db (start `drawdown run --db ./drawdown.db` first, "
        "or pass --db)\n"
    )


def test_a_ledger_this_user_may_not_read_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "cannot read ledger …: unable to open database file", SQLite's words for any
    failure to open. Mode 000 stops no root: for root, the refusal the kernel would give, from
    both the access check and SQLite's open."""
    from drawdown.ledger import reader

    db = tmp_path / "ledger.db"
    _traffic(db)
    capsys.readouterr()
    db.chmod(0)
    if os.geteuid() == 0:
        real_access, real_connect = os.access, reader._connect

        def access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
            return Path(path) != db and real_access(path, mode, *args, **kwargs)

        def connect(uri: str) -> sqlite3.Connection:
            if uri.startswith(f"file:{db}"):
                raise sqlite3.OperationalError("unable to open database file")
            return real_connect(uri)

        monkeypatch.setattr(reader.os, "access", access)
        monkeypatch.setattr(reader, "_connect", connect)
    try:
        for command in (["report"], ["verify"], ["budgets"]):
            assert main([*command, "--db", str(db)]) == 1
            assert capsys.readouterr().err == (
                f"drawdown: cannot read ledger {db}: permission denied\n"
            )
    finally:
        db.chmod(0o644)


def test_report_text_and_missing_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "ledger.db"
    _traffic(db)
    assert main(["report", "--db", str(db)]) == 0
    text = capsys.readouterr().out
    assert "agent:research/run:7f3a" in text and "budget_exhausted" in text
    assert main(["report", "--db", str(tmp_path / "none.db")]) == 1
    assert "no ledger at" in capsys.readouterr().err
    assert main(["report", "--db", str(db), "--since", "soon"]) == 2


def test_a_since_longer_than_the_ledger_can_be_old_means_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--since 99999999999d` once reached past year 1 and ended in a traceback."""
    db = tmp_path / "ledger.db"
    _traffic(db)
    capsys.readouterr()
    for since in ("99999999999d", "10000000000000000000000000s"):
        assert main(["report", "--db", str(db), "--since", since, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["decisions"]["allow"] == 3
        policy = ROOT / "policies" / "example.yaml"
        assert main(["replay", "--policy", str(policy), "--db", str(db), "--since", since]) == 0
        capsys.readouterr()


@pytest.mark.parametrize(
    "args",
    [
        ["report", "--since", "0m"],  # read as no --since: the whole ledger
        ["report", "--since", ""],
        ["report", "--run", ""],
        ["replay", "--policy", str(ROOT / "policies" / "example.yaml"), "--since", "0d"],
    ],
)
def test_a_window_or_run_that_selects_nothing_is_refused_not_read_as_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    db = tmp_path / "ledger.db"
    _traffic(db)
    capsys.readouterr()
    assert main([*args, "--db", str(db)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and ("above zero" in captured.err or "wants a" in captured.err)


@pytest.mark.parametrize("command", ["report", "replay"])
@pytest.mark.parametrize("since", ["-5m", "-x", "-1.5h"])
def test_a_since_that_looks_like_an_option_gets_drawdowns_message_not_argparses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, since: str
) -> None:
    """`--since -5m` ended in argparse's "expected one argument", which names no duration."""
    db = tmp_path / "ledger.db"
    _traffic(db)
    capsys.readouterr()
    policy = ["--policy", str(ROOT / "policies" / "example.yaml")] if command == "replay" else []
    assert main([command, *policy, "--db", str(db), "--since", since]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("drawdown: --since ")
    assert repr(since) in captured.err and "expected one argument" not in captured.err


def test_a_since_with_no_value_before_another_option_is_still_a_missing_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--since", "--json"])
    assert exit_.value.code == 2 and "expected one argument" in capsys.readouterr().err


def test_a_mistyped_run_fails_in_jsonl_as_in_the_other_formats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "ledger.db"
    _traffic(db)
    capsys.readouterr()
    for form in ([], ["--json"], ["--jsonl"]):
        assert main(["report", "--db", str(db), "--run", "nosuch", *form]) == 1
        assert "no run 'nosuch'" in capsys.readouterr().err
    assert main(["report", "--db", str(db), "--run", "7f3a", "--jsonl"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "--html", ""], "--html wants a file to write; got an empty name"),
        (["env", "--agent", ""], "--agent wants an agent id; got an empty one"),
        (["env", "--agent", "a", "--run", ""], "--run wants a run id; got an empty one"),
    ],
)
def test_an_empty_html_agent_or_run_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """`report --html ''` (an unset shell variable) printed the text report, and `env --agent
    ''` a proxy URL naming no agent, as if neither had been asked for (`--tenant ''` is
    refused)."""
    db = tmp_path / "ledger.db"
    _traffic(db)
    ensure_ca(tmp_path / "conf")
    capsys.readouterr()
    where = ["--db", str(db)] if args[0] == "report" else ["--confdir", str(tmp_path / "conf")]
    assert main([*args, *where]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"drawdown: {message}\n")


def test_report_html_to_a_path_it_cannot_write_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "ledger.db"
    _traffic(db)
    for target, reason in (
        (tmp_path / "no" / "such" / "folder" / "week.html", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        assert main(["report", "--db", str(db), "--html", str(target)]) == 1
        assert capsys.readouterr().err == f"drawdown: cannot write {target}: {reason}\n"


def test_a_mistyped_run_writes_no_html_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--run nope --html x.html` said there was no run 'nope' and exited 1, yet wrote (and
    announced) a page of 0 runs, over any page already at that path."""
    db = tmp_path / "ledger.db"
    _traffic(db)
    page = tmp_path / "x.html"
    assert main(["report", "--db", str(db), "--run", "nope", "--html", str(page)]) == 1
    captured = capsys.readouterr()
    assert not page.exists() and captured.out == ""
    assert captured.err == f"drawdown: no run 'nope' in {db}\n"
    page.write_text("last week's page")
    assert main(["report", "--db", str(db), "--run", "nope", "--html", str(page)]) == 1
    assert page.read_text() == "last week's page"
    assert main(["report", "--db", str(db), "--run", "7f3a", "--html", str(page)]) == 0
    assert "wrote" in capsys.readouterr().out and "7f3a" in page.read_text()


def test_explain_with_a_missing_ledger_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.db"
    code = main(
        ["explain", "--policy", str(ROOT / "policies" / "examples" / "support.yaml"),
         "--url", "https://api.stripe.com/v1/refunds", "--method", "POST",
         "--header", "X-Drawdown-Agent:support-1", "--json", '{"amount": 100, "customer": "c-42"}',
         "--db", str(missing)]
    )  # fmt: skip
    assert code == 1
    assert capsys.readouterr().err.startswith(f"drawdown: no ledger at {missing}")


def test_explain_reads_the_model_as_the_proxy_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's `when: {model: {in: [...]}}` rule: explain must see the request's model."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nmode: enforce\n"
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
        "authority:\n  default: deny\n  rules:\n"
        "    - {scope: '*', allow: [llm]}\n"
        "    - {scope: '*', action: llm, when: {model: {in: [gpt-4o-mini]}}}\n"
    )

    def decision(model: str) -> str:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        code = main(
            ["explain", "--policy", str(policy), "--url", "https://api.openai.com/v1/chat/completions",
             "--json", body, "--as-json"]
        )  # fmt: skip
        assert code == 0
        return json.loads(capsys.readouterr().out)["decision"]

    assert decision("gpt-4o-mini") == "allow"
    assert decision("gpt-4o") == "deny"


def test_explain_prices_an_openai_compatible_host_at_its_own_prices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the proxy: a Groq call at genai-prices' Groq price, not openai's fallback price."""
    import genai_prices

    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nmode: enforce\n"
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.groq.com}}\n"
    )
    url = "https://api.groq.com/openai/v1/chat/completions"
    body = json.dumps(
        {
            "model": "llama-3.3-70b-versatile",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 100,
        }
    )
    assert (
        main(["explain", "--policy", str(policy), "--url", url, "--json", body, "--as-json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    estimate = out["estimate"]
    usage = genai_prices.Usage(input_tokens=estimate["tokens"] - 100, output_tokens=100)
    price = genai_prices.calc_price(usage, "llama-3.3-70b-versatile", provider_api_url=url)
    assert estimate["usd_nanos"] == math.ceil(price.total_price * 1_000_000_000)
    (line,) = [text for stage, text in out["steps"] if stage == "estimate"]
    assert line.endswith("(genai-prices' groq prices, else openai's)")


def test_env_names_the_ca_bundle_by_an_absolute_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent that evals these lines may start in another directory."""
    monkeypatch.chdir(tmp_path)
    ensure_ca(tmp_path / "conf")
    assert main(["env", "--confdir", "conf", "--listen", "127.0.0.1:9090"]) == 0
    lines = dict(
        line.removeprefix("export ").split("=", 1) for line in capsys.readouterr().out.splitlines()
    )
    assert lines["SSL_CERT_FILE"] == str(tmp_path / "conf" / "drawdown-ca-bundle.pem")


def test_run_on_a_port_in_use_says_so_in_drawdowns_terms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            ["run", "--policy", str(ROOT / "policies" / "default.yaml"), "--db", str(tmp_path / "l.db"),
             "--listen", f"127.0.0.1:{port}", "--confdir", str(tmp_path / "conf")]
        )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err == (
        f"drawdown: 127.0.0.1:{port} is already in use (another drawdown run?); "
        "choose another with --listen HOST:PORT, or :0 for a free port\n"
    )
    assert not (tmp_path / "l.db").exists()  # refused before anything started


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("192.0.2.1:8080", "192.0.2.1 is not an address of this machine"),  # TEST-NET-1
        ("nosuchhost.invalid:8080", "nosuchhost.invalid cannot be resolved to an address"),
    ],
)
def test_run_on_an_address_it_cannot_listen_on_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str, reason: str
) -> None:
    """mitmproxy's `[Errno None] HTTP(S) proxy failed to listen on … could not bind on any
    address` and `[Errno -2] … Name or service not known`, after starting everything else."""
    code = main(
        ["run", "--policy", str(ROOT / "policies" / "default.yaml"), "--db", str(tmp_path / "l.db"),
         "--listen", listen, "--set", "proxyauth=u:p", "--confdir", str(tmp_path / "conf")]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"drawdown: cannot listen on {listen}: {reason}; ")
    assert err.count("\n") == 1 and "Errno" not in err
    assert not (tmp_path / "l.db").exists()  # refused before anything started


def _run_subprocess(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`drawdown run` on the default policy, as a subprocess: a proxy that wrongly starts fails
    the test by its timeout."""
    return subprocess.run(
        [sys.executable, "-m", "drawdown", "run", "--policy", str(ROOT / "policies" / "default.yaml"),
         "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "conf"), *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("option", "choices"),
    [
        ("termlog_verbosity", "error, warn, info, alert, debug"),
        ("tls_version_client_min", "UNBOUNDED, SSL3, TLS1, TLS1_1, TLS1_2, TLS1_3"),
        ("connection_strategy", "eager, lazy"),
    ],
)
def test_run_refuses_a_value_an_option_does_not_list_in_one_line(
    tmp_path: Path, option: str, choices: str
) -> None:
    """mitmproxy lists an option's values but takes any: `termlog_verbosity=bogus` printed a
    15-line traceback (`ValueError: Unknown level: 'BOGUS'`), `connection_strategy=x` started
    a proxy. Refused as drawdown's own options are (`drawdown_drain=abc`), with their status."""
    result = _run_subprocess(tmp_path, "--db", str(tmp_path / "l.db"), "--set", f"{option}=bogus")
    assert result.returncode == 1
    assert result.stderr == f"drawdown: {option} must be one of {choices}, not 'bogus'\n"
    drain = _run_subprocess(tmp_path, "--db", str(tmp_path / "l.db"), "--set", "drawdown_drain=x")
    assert drain.returncode == result.returncode and drain.stderr.count("\n") == 1


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_refuses_an_option_it_does_not_have_once_naming_the_nearest(
    tmp_path: Path, workers: str
) -> None:
    """mitmproxy's "Unknown option(s): drawdown_drian" came after the ledger was opened, with
    status 1, and under --workers from every worker, each then stopped by the supervisor."""
    ledger = tmp_path / "l.db"
    result = _run_subprocess(
        tmp_path, "--db", str(ledger), "--workers", workers, "--set", "drawdown_drian=1"
    )
    assert result.returncode == 2
    assert result.stderr == (
        "drawdown: --set drawdown_drian: no such option (did you mean drawdown_drain?)\n"
    )
    assert result.stdout == "" and not ledger.exists()
    bad_value = _run_subprocess(
        tmp_path, "--db", str(ledger), "--workers", workers, "--set", "connection_strategy=x"
    )
    assert bad_value.returncode == 1  # as a worker refuses it
    assert bad_value.stderr == "drawdown: connection_strategy must be one of eager, lazy, not 'x'\n"


def test_an_option_value_is_taken_in_any_case_and_passed_on_as_listed() -> None:
    """`termlog_verbosity=WARN` worked (mitmproxy's log reads it upper-cased) before values
    were checked against the option's list, which is lower-case."""
    from drawdown.cli import _checked_choices
    from mitmproxy import exceptions, optmanager

    opts = optmanager.OptManager()
    opts.add_option("termlog_verbosity", str, "info", "", choices=["error", "warn", "info"])
    opts.add_option("listen_port", int, 0, "")
    sets = ["termlog_verbosity=WARN", "listen_port=1", "switch"]
    assert _checked_choices(opts, sets) == ["termlog_verbosity=warn", "listen_port=1", "switch"]
    with pytest.raises(exceptions.OptionsError, match="not 'loud'"):
        _checked_choices(opts, ["termlog_verbosity=loud"])


def test_run_reports_the_real_reason_it_cannot_start_not_the_undo_s(tmp_path: Path) -> None:
    """mitmproxy undoes a refused option update by configuring again with the old options, no
    policy among them: "drawdown_policy is not set" used to replace the real reason. (A
    subprocess, so that a proxy that wrongly starts fails the test by its timeout.)"""
    db = tmp_path / "future.db"
    SQLiteLedger(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    result = _run_subprocess(tmp_path, "--db", str(db))
    assert result.returncode == 1
    assert result.stderr == (
        "drawdown: this ledger has schema version 99, newer than this drawdown understands "
        f"({SCHEMA_VERSION}); upgrade drawdown\n"
    )


@pytest.mark.parametrize("content", ["tables", "meta"])
def test_run_refuses_a_database_that_is_not_a_ledger_and_leaves_it_as_it_was(
    tmp_path: Path, content: str
) -> None:
    """`--db app.db`, an application's SQLite file, had ~30 ledger tables added to it and its
    journal switched to WAL. It is refused at start, untouched, as report, budgets and verify
    refused it already. (A file that is no database at all may be a damaged ledger: the proxy
    stays up on it, answering 503; tests/e2e/test_reliability.py.)"""
    db = tmp_path / "app.db"
    if content == "tables":
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
            conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        reason = "it holds tables drawdown does not make (orders, users)"
    else:  # as every Chromium database has: a `meta`, not drawdown's
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("CREATE TABLE meta (key LONGVARCHAR NOT NULL UNIQUE PRIMARY KEY, value)")
            conn.execute("INSERT INTO meta VALUES ('version', '64')")
            conn.execute("CREATE TABLE urls (id INTEGER PRIMARY KEY, url LONGVARCHAR)")
        reason = "it holds tables drawdown does not make (meta, urls)"
    before = db.read_bytes()
    result = _run_subprocess(tmp_path, "--db", str(db))
    assert result.returncode == 1
    assert result.stderr.startswith(f"drawdown: {db} is not a drawdown ledger")
    assert reason in result.stderr and result.stderr.endswith(
        "point --db at the ledger, or at a new file\n"
    )
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("app.db")) == ["app.db"]


def _pg_tables(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        )]  # fmt: skip


@pytest.mark.parametrize("content", ["tables", "meta"])
def test_run_refuses_a_postgres_schema_of_another_application(
    tmp_path: Path, pg_url: str, content: str
) -> None:
    """`--db postgresql://…/appdb` had ~30 ledger tables added to the application's `public`
    schema, where SQLite's `--db app.db` is refused. It is refused at start, untouched, with
    the way to give the ledger a schema of its own; a `meta` of another application's (without
    drawdown's columns) is no ledger's either."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        if content == "tables":
            conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
            conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
            named = "orders, users"
        else:
            conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, version INTEGER)")
            conn.execute("CREATE TABLE urls (id INTEGER PRIMARY KEY, url TEXT)")
            named = "meta, urls"
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
    before = _pg_tables(pg_url)
    result = _run_subprocess(tmp_path, "--db", pg_url)
    assert result.returncode == 1
    assert result.stderr.startswith("drawdown: postgresql://")
    assert (
        f"is not a drawdown ledger: its schema {schema} holds tables drawdown does not make "
        f"({named}); give the ledger a schema of its own (CREATE SCHEMA drawdown, then add "
        "options=-c%20search_path%3Ddrawdown to the URL's parameters), or point --db at the "
        "ledger\n"
    ) in result.stderr
    assert _pg_tables(pg_url) == before


def test_the_postgres_refusal_reads_the_search_path_as_the_ledger_does(
    tmp_path: Path, pg_url: str
) -> None:
    """A schema of views (an application's reporting schema) is an application's too; a
    ledger found further down the search_path is used, not refused for the first schema's
    tables; a search_path naming no schema that exists says to create it."""
    import psycopg
    from drawdown.ledger.api import LedgerError, NotALedger
    from drawdown.ledger.postgres import PostgresLedger

    from tests.support_pg import fresh_schema, with_search_path

    with psycopg.connect(pg_url, autocommit=True) as conn:
        app = conn.execute("SELECT current_schema()").fetchone()[0]
        conn.execute("CREATE VIEW monthly AS SELECT 1 AS n")
        conn.execute("CREATE MATERIALIZED VIEW totals AS SELECT 2 AS n")
    with pytest.raises(NotALedger, match=rf"its schema {app} holds tables .* \(monthly, totals\)"):
        PostgresLedger(pg_url, register=False)
    base = pg_url.split("?", 1)[0]
    with fresh_schema("led") as ledger_url:
        PostgresLedger(ledger_url, register=False).close()  # a ledger in a schema of its own
        with psycopg.connect(ledger_url) as conn:
            led = conn.execute("SELECT current_schema()").fetchone()[0]
        both = with_search_path(base, f"{app},{led}")
        PostgresLedger(both, register=False).close()  # found there, as migrate finds it
        assert "budget_instances" not in _pg_tables(pg_url)  # nothing made in the first
    nowhere = with_search_path(base, f"drawdown_missing_{uuid.uuid4().hex[:8]}")
    with pytest.raises(
        LedgerError, match=r"names no schema that exists, .*: CREATE SCHEMA it first"
    ):
        PostgresLedger(nowhere, register=False)
    for command in ("budgets", "verify", "report"):  # and the read commands, each its own way
        result = subprocess.run(
            [sys.executable, "-m", "drawdown", command, "--db", nowhere],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1
        assert result.stderr == (
            f"drawdown: {nowhere}: its search_path names no schema that exists, so there is no "
            "ledger there: check the schema's name\n"
        )


def test_a_ledger_is_made_beside_an_extensions_tables(pg_url: str) -> None:
    """PostGIS puts its spatial_ref_sys in `public`: an extension's tables are no
    application's, and the ledger is made beside them (hstore stands in for PostGIS)."""
    import psycopg
    from drawdown.ledger.postgres import PostgresLedger

    with psycopg.connect(pg_url, autocommit=True) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        conn.execute(f'CREATE EXTENSION hstore SCHEMA "{schema}"')
        try:
            conn.execute("CREATE TABLE spatial_ref_sys (srid INTEGER PRIMARY KEY)")
            conn.execute("ALTER EXTENSION hstore ADD TABLE spatial_ref_sys")
            PostgresLedger(pg_url, register=False).close()
            assert "budget_instances" in _pg_tables(pg_url)
        finally:
            conn.execute("DROP EXTENSION hstore CASCADE")


@pytest.mark.parametrize("command", ["report", "budgets", "verify", "run"])
def test_a_sqlite_url_naming_no_file_is_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--db sqlite:///` read the current folder ("drawdown:  is a folder"), and `run` would have
    written its ledger to a private temporary database, lost at exit."""
    args = [command, "--db", "sqlite:///"]
    if command == "run":
        result = _run_subprocess(tmp_path, *args[1:])
        code, err = result.returncode, result.stderr
    else:
        code, err = main(args), capsys.readouterr().err
    assert code == 1
    assert err == "drawdown: --db names no file: give it the ledger's path\n"


def test_run_makes_a_ledger_of_an_empty_file(tmp_path: Path) -> None:
    """A file made empty beforehand (a volume's placeholder, `touch`) is a new ledger."""
    db = tmp_path / "ledger.db"
    db.touch()
    SQLiteLedger(db).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION),
        )


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_run_wants_at_least_one_worker(
    workers: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--policy", str(ROOT / "policies" / "default.yaml"), "--workers", workers])
    assert exited.value.code == 2
    assert (
        f"--workers: wants a whole number of at least 1, got '{workers}'" in capsys.readouterr().err
    )


def test_report_on_a_run_the_ledger_does_not_hold_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "ledger.db"
    _traffic(db)
    assert main(["report", "--db", str(db), "--run", "7f3a"]) == 0
    assert "agent:research/run:7f3a" in capsys.readouterr().out
    assert main(["report", "--db", str(db), "--run", "7f3b", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["runs"] == []  # the document still comes, for tools
    assert captured.err == f"drawdown: no run '7f3b' in {db}\n"
    # The scope the RUNS table shows, pasted whole: the message names the run id to give.
    assert main(["report", "--db", str(db), "--run", "agent:research/run:7f3a"]) == 1
    assert capsys.readouterr().err == (
        f"drawdown: no run 'agent:research/run:7f3a' in {db}; --run takes the run id, the "
        "scope's last part ('7f3a')\n"
    )


@pytest.mark.parametrize("address", ["notip", "10.0.0", "example.com"])
def test_explain_wants_an_address_for_client_ip(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--client-ip took any text, and explain then decided as if it were an address."""
    with pytest.raises(SystemExit) as exited:
        main(["explain", "--policy", str(ROOT / "policies" / "default.yaml"), "--url",
              "https://api.openai.com/v1/models", "--client-ip", address])  # fmt: skip
    assert exited.value.code == 2
    assert f"--client-ip: wants an IP address, such as 10.0.0.7 or fd00::7; got '{address}'" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("auth", "says"),
    [
        ("proxyauth=any", "without proxy authentication (proxyauth=any accepts anyone)"),
        (
            "proxyauth=@/nonexistent/htpasswd",
            "proxyauth names no credentials file: /nonexistent/htpasswd",
        ),
    ],
)
def test_a_public_listen_address_wants_real_credentials(
    auth: str, says: str, tmp_path: Path
) -> None:
    """`any` once passed the guard (anyone could claim any agent's budget), and a missing
    credentials file was reported as no proxy authentication at all. (A subprocess, so that a
    proxy that wrongly starts fails the test by its timeout instead of holding it.)"""
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", "run", "--policy", str(ROOT / "policies" / "default.yaml"),
         "--db", str(tmp_path / "x.db"), "--listen", "0.0.0.0:0", "--set", auth],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and says in result.stderr


@pytest.mark.parametrize(
    "db", ["sqlite://m.db", "postgresq://127.0.0.1/walk", "mysql://x/y", "postgresql://", ""]
)
def test_a_ledger_url_with_a_typo_is_refused(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """These once became folders named after the scheme (./sqlite:/m.db), silently."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["budgets", "--db", db])
    assert exited.value.code == 2 and "argument --db: wants a path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_env_refuses_a_run_without_an_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run once vanished from the output without a word (it rides as the proxy password)."""
    assert main(["env", "--confdir", str(tmp_path), "--run", "r1"]) == 2
    assert "--run needs --agent" in capsys.readouterr().err


def test_the_ca_is_created_once_so_every_worker_loads_the_same_one(tmp_path: Path) -> None:
    confdir = tmp_path / "confdir"
    ensure_ca(confdir)
    ca = confdir / "mitmproxy-ca.pem"
    first = ca.read_bytes()
    assert b"PRIVATE KEY" in first and (confdir / "mitmproxy-ca-cert.pem").exists()
    ensure_ca(confdir)  # a second start (or a worker) reuses it rather than minting another
    assert ca.read_bytes() == first


def run_args(tmp_path: Path, confdir: Path) -> list[str]:
    return ["run", "--policy", str(ROOT / "policies" / "default.yaml"),
            "--db", str(tmp_path / "l.db"), "--listen", "127.0.0.1:0", "--confdir", str(confdir)]  # fmt: skip


@pytest.mark.parametrize("command", ["run", "env"])
def test_a_broken_ca_is_one_line_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A corrupt CA printed mitmproxy's traceback after `drawdown listening on`, then exit 1.
    A CA that is no CA is the one case for minting another, and then every agent needs it."""
    confdir = tmp_path / "conf"
    confdir.mkdir()
    (confdir / "mitmproxy-ca.pem").write_text("not a key\n")
    argv = run_args(tmp_path, confdir) if command == "run" else ["env", "--confdir", str(confdir)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    if command == "env":  # env reads no key: it wants a certificate, and there is none
        assert err.startswith(
            f"drawdown: no CA certificate in {confdir} (mitmproxy-ca.pem: no certificate in it): "
        )
        assert err.count("\n") == 1
        return
    assert err == (
        f"drawdown: the CA in {confdir} cannot be read (Unable to load PEM file); if it is lost, "
        "move its mitmproxy-ca*.pem files away to mint a new one, then give every agent the "
        "new certificate (mitmproxy-ca-cert.pem, or `drawdown env` run again)\n"
    )


def encrypted_ca(confdir: Path, passphrase: bytes) -> None:
    """A CA whose key is kept encrypted, as some teams keep theirs."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "team CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    confdir.mkdir()
    (confdir / "mitmproxy-ca.pem").write_bytes(
        pem_key + cert.public_bytes(serialization.Encoding.PEM)
    )


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (None, "is encrypted: give its passphrase with --set cert_passphrase=PASSPHRASE"),
        ("wrong", "cannot be decrypted with cert_passphrase"),
    ],
)
def test_an_encrypted_ca_key_asks_for_its_passphrase_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str | None, message: str
) -> None:
    """mitmproxy reads the CA's passphrase from cert_passphrase; without it (or with a wrong
    one) `run` ended in cryptography's traceback, and a wrong one would have been told to mint
    a new CA."""
    from drawdown.cacerts import ensure_ca

    confdir = tmp_path / "conf"
    encrypted_ca(confdir, b"secret")
    extra = ["--set", f"cert_passphrase={given}"] if given else []
    assert main(run_args(tmp_path, confdir) + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "mint" not in err
    assert b"BEGIN CERTIFICATE" in ensure_ca(confdir, "secret")  # the right one reads it


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("ssl_verify_upstream_trusted_ca=missing.pem", "(No such file or directory)"),
        (
            "ssl_verify_upstream_trusted_ca=garbage.pem",
            "(no PEM certificate OpenSSL can read in it)",
        ),
        ("ssl_verify_upstream_trusted_confdir=missing", "is not a folder of certificates"),
    ],
)
def test_an_upstream_ca_that_cannot_be_loaded_is_one_line_before_anything_starts(
    tmp_path: Path, setting: str, message: str
) -> None:
    """The README's `--set ssl_verify_upstream_trusted_ca=/path/ca.pem` with a wrong path
    started the proxy, and every call got a 502 and a traceback in its log. (A subprocess, so
    that a proxy that wrongly starts fails the test by its timeout.)"""
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    name, _, value = setting.partition("=")
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", *run_args(tmp_path, tmp_path / "conf"),
         "--set", f"{name}={tmp_path / value}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"drawdown: {name}: ")
    assert result.stderr.endswith(f"{message}\n") and str(tmp_path / value) in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["run", "env"])
def test_a_confdir_that_is_a_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    confdir = tmp_path / "conf"
    confdir.write_text("")
    argv = run_args(tmp_path, confdir) if command == "run" else ["env", "--confdir", str(confdir)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"drawdown: --confdir {confdir} cannot be used: it is not a directory\n"
    )


def test_run_refreshes_the_agents_bundle_with_the_ca_it_will_use(tmp_path: Path) -> None:
    """Only `env` wrote the bundle: a CA minted or replaced since left agents trusting the old one."""
    from drawdown.cli import _ready_ca

    confdir = tmp_path / "conf"
    with _ready_ca(confdir):
        pass
    bundle = confdir / "drawdown-ca-bundle.pem"
    for name in ("mitmproxy-ca.pem", "mitmproxy-ca-cert.pem"):
        (confdir / name).unlink()  # a new CA, as after `rm ~/.drawdown/mitmproxy-ca*`
    with _ready_ca(confdir):
        pass
    assert (confdir / "mitmproxy-ca-cert.pem").read_text().strip() in bundle.read_text()


@pytest.mark.parametrize("command", ["report", "budgets", "verify"])
def test_a_database_that_is_no_ledger_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Pointing --db at another SQLite file printed `no such table: decisions` alone."""
    import sqlite3

    other = tmp_path / "app.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    assert main([command, "--db", str(other)]) == 1
    assert capsys.readouterr().err == (
        f"drawdown: {other} is not a drawdown ledger (no such table: decisions): point --db at "
        "the ledger `drawdown run` writes\n"
    )


CHAT_HI = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def explained_decision(
    policy: Path, db: Path, body: str, capsys: pytest.CaptureFixture[str]
) -> str:
    """What `explain --db` decides for agent bot's run r1 sending `body` to OpenAI's chat."""
    assert main(
        ["explain", "--policy", str(policy), "--db", str(db), "--url", "https://api.openai.com/v1/chat/completions",
         "--header", "X-Drawdown-Agent:bot", "--header", "X-Drawdown-Run:r1", "--json", body, "--as-json"]
    ) == 0  # fmt: skip
    return json.loads(capsys.readouterr().out)["decision"]


def test_explain_counts_the_steps_the_proxy_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request the proxy turned away for its own state (a stop, a bug) is no step of the
    run, for `explain --db` as for the reserve-time guard."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "identity:\n  agent: [{header: X-Drawdown-Agent}]\n  run: [{header: X-Drawdown-Run}]\n"
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
        "anomalies:\n  step_count: {max: 2, on_detect: deny}\n"
    )
    db = tmp_path / "ledger.db"
    ledger = SQLiteLedger(db)

    def step(reason_code: str | None) -> None:
        row = DecisionRow(
            request_id=uuid.uuid4().hex, ts=1.0, decision="deny" if reason_code else "allow",
            mode="enforce", scope="tenant:default/agent:bot/run:r1", tenant="default", agent="bot",
            run="r1", action="llm",
            reason_code=reason_code,
        )  # fmt: skip
        ledger.record(row)

    def decision() -> str:
        return explained_decision(policy, db, CHAT_HI, capsys)

    try:
        step(None)
        step("shutting_down")
        step("internal_error")
        assert decision() == "allow"
        step("not_authorized")  # the agent's own denied request is a step
        assert decision() == "deny"
    finally:
        ledger.close()


def test_explain_forgives_the_failed_attempts_the_proxy_forgives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain --db asks the ledger what the loop guard asks: the first loop.retries failed
    attempts of the request are no repeats, the next are."""
    from drawdown.addon import fingerprint
    from drawdown.classify import RequestView, classify
    from drawdown.policy import load_policy

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "identity:\n  agent: [{header: X-Drawdown-Agent}]\n  run: [{header: X-Drawdown-Run}]\n"
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
        "anomalies:\n  loop: {repeats: 1, retries: 1, on_detect: deny}\n"
    )
    body = CHAT_HI
    view = RequestView("POST", "api.openai.com", 443, "/v1/chat/completions", {}, {}, body.encode())
    loaded = load_policy(str(policy))
    classification = classify(loaded, view)
    assert classification.kind == "llm"
    db = tmp_path / "ledger.db"
    ledger = SQLiteLedger(db)

    def failed_attempt() -> None:
        row = DecisionRow(
            request_id=uuid.uuid4().hex, ts=1.0, decision="allow", mode="enforce",
            scope="tenant:default/agent:bot/run:r1", tenant="default", agent="bot", run="r1",
            action="llm", fingerprint=fingerprint("llm", view, classification),
        )  # fmt: skip
        outcome = ledger.reserve(row, [], Amount(requests=1), 900.0)
        assert outcome.hold_id is not None
        ledger.release(row.request_id, outcome.hold_id, Completion(status=500), "500", 2.0)

    def decision() -> str:
        return explained_decision(policy, db, body, capsys)

    try:
        failed_attempt()
        assert decision() == "allow"
        failed_attempt()
        assert decision() == "deny"
    finally:
        ledger.close()


def test_explain_forgives_a_budget_windows_refusals_as_the_loop_guard_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain --db counts the window refusals among a request's rows as the ledger's loop
    guard does: the first loop.retries of them are no repeats."""
    from drawdown.addon import fingerprint
    from drawdown.classify import RequestView, classify
    from drawdown.policy import load_policy

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "identity:\n  agent: [{header: X-Drawdown-Agent}]\n  run: [{header: X-Drawdown-Run}]\n"
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
        "anomalies:\n  loop: {repeats: 2, retries: 1, on_detect: deny}\n"
    )
    body = CHAT_HI
    view = RequestView("POST", "api.openai.com", 443, "/v1/chat/completions", {}, {}, body.encode())
    classification = classify(load_policy(str(policy)), view)
    db = tmp_path / "ledger.db"
    ledger = SQLiteLedger(db)

    def recorded(decision: str, reason_code: str | None, status: int) -> None:
        ledger.record(
            DecisionRow(
                request_id=uuid.uuid4().hex, ts=1.0, decision=decision, mode="enforce",
                scope="tenant:default/agent:bot/run:r1", tenant="default", agent="bot", run="r1",
                action="llm", fingerprint=fingerprint("llm", view, classification),
                reason_code=reason_code, status=status,
            )
        )  # fmt: skip

    try:
        recorded("allow", None, 200)
        recorded("deny", "budget_exhausted", 429)  # a window's refusal: forgiven
        assert explained_decision(policy, db, body, capsys) == "allow"
        recorded("deny", "budget_exhausted", 402)  # a lifetime budget's: a repeat
        assert explained_decision(policy, db, body, capsys) == "deny"
    finally:
        ledger.close()


IDLE_SPLIT_POLICY = (
    "identity:\n  agent: [{header: X-Drawdown-Agent}]\n"
    "  run: [{header: X-Drawdown-Run}, {idle_split: 300}]\n"
    "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
)


class _IdleSplitLedger:
    """A ledger of agent support-1's requests, and what `explain --db` says of its next one,
    which names no run."""

    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.policy = tmp_path / "policy.yaml"
        self.policy.write_text(IDLE_SPLIT_POLICY)
        self.db = tmp_path / "ledger.db"
        self.ledger = SQLiteLedger(self.db)
        self.capsys = capsys

    def request(self, run: str, ago: float) -> None:
        import time

        row = DecisionRow(
            uuid.uuid4().hex, time.time() - ago, "allow", "enforce",
            f"tenant:default/agent:support-1/run:{run}", tenant="default", agent="support-1",
            run=run, action="llm",
        )  # fmt: skip
        self.ledger.record(row)

    def explain(self) -> tuple[str, str]:
        """(the run explain puts the request in, what it says of where that run came from)"""
        assert main(
            ["explain", "--policy", str(self.policy), "--db", str(self.db),
             "--url", "https://api.openai.com/v1/chat/completions",
             "--header", "X-Drawdown-Agent:support-1", "--json", CHAT_HI, "--as-json"]
        ) == 0  # fmt: skip
        out = json.loads(self.capsys.readouterr().out)
        (said,) = [text for stage, text in out["steps"] if stage == "identity"]
        return out["scope"].rpartition("/run:")[2], said.partition("run from ")[2]


@pytest.fixture
def idle_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[_IdleSplitLedger]:
    ledger = _IdleSplitLedger(tmp_path, capsys)
    yield ledger
    ledger.ledger.close()


def test_explain_does_not_put_an_unnamed_request_in_a_named_run(
    idle_split: _IdleSplitLedger,
) -> None:
    """The agent's latest requests named their run (X-Drawdown-Run: t1); explain put one that
    names none in run t1, "the agent's current run in the ledger". The proxy continues only a
    run idle_split started: it mints a new one."""
    idle_split.request("t1", ago=5)
    run, said = idle_split.explain()
    assert run != "t1" and re.fullmatch(r"[0-9a-f]{8}", run)
    assert said.startswith("idle_split 300s (minted") and "current run" not in said
    idle_split.request("0a1b2c3d", ago=400)  # an idle-split run, idle longer than 300s
    run, said = idle_split.explain()
    assert run not in ("t1", "0a1b2c3d") and said.startswith("idle_split 300s (minted")


def test_explain_continues_the_idle_split_run_the_shared_ledger_holds(
    idle_split: _IdleSplitLedger,
) -> None:
    """Proxies started with --workers keep an agent's idle-split run in the ledger (idle_runs):
    explain reads it there, as they do, whatever runs the agent named since."""
    import time

    key = "tenant:default/workflow:/agent:support-1"
    assert idle_split.ledger.idle_run(key, 300, "0a1b2c3d", time.time() - 60) == "0a1b2c3d"
    idle_split.request("0a1b2c3d", ago=60)
    idle_split.request("t1", ago=5)
    run, said = idle_split.explain()
    assert run == "0a1b2c3d" and "the agent's current run in the ledger" in said
    assert "assumed" not in said
    # Idle for longer than idle_split: the workers would mint a new run.
    idle_split.ledger.idle_run(key, 300, "0a1b2c3d", time.time() - 400)
    run, said = idle_split.explain()
    assert run not in ("t1", "0a1b2c3d") and said.startswith("idle_split 300s (minted")


def test_explain_says_it_assumes_a_single_proxys_idle_split_run(
    idle_split: _IdleSplitLedger,
) -> None:
    """One proxy process keeps its idle-split runs in memory, not in the ledger: explain takes
    the agent's latest run whose id is one idle_split mints, and says it assumed it."""
    idle_split.request("5e6f7a8b", ago=20)
    idle_split.request("t1", ago=5)
    run, said = idle_split.explain()
    assert run == "5e6f7a8b" and said.startswith("idle_split 300s (assumed")
    assert "the agent's current run in the ledger" in said and "in memory" in said


def _not_utf8(raw: bytes) -> str:
    """An argument as Python hands it over when the bytes on the command line are not UTF-8."""
    return os.fsdecode(raw)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (
            ["explain", "--policy", str(ROOT / "policies" / "example.yaml"), "--url",
             "https://api.openai.com/v1/chat/completions", "--json",
             _not_utf8(b'{"model":"x\xff","messages":[]}')],
            "--json",
        ),
        (["env", "--agent", _not_utf8(b"\xff")], "--agent"),
        (["env", "--agent", "bot", "--run", _not_utf8(b"r\xfe1")], "--run"),
        (["report", "--run", _not_utf8(b"\xff")], "--run"),
        (["report", "--db", _not_utf8(b"postgresql://u:s3cret@h/\xff")], "--db"),
    ],
)  # fmt: skip
def test_an_argument_that_is_not_utf8_is_a_usage_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], name: str
) -> None:
    """These ended in a UnicodeEncodeError traceback, or (report --run) blamed the ledger."""
    db = tmp_path / "ledger.db"
    _traffic(db)
    capsys.readouterr()
    if args[0] == "report" and "--db" not in args:
        args = [*args, "--db", str(db)]
    if args[0] == "env":
        args = [*args, "--confdir", str(tmp_path / "conf")]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"drawdown: {name} is not valid UTF-8")
    assert "s3cret" not in captured.err and "\\udc" not in captured.err  # named, never shown


def test_a_ledger_whose_file_name_is_not_utf8_is_still_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """File names are bytes: such a --db is taken, not refused, and read like any other."""
    db = Path(_not_utf8(bytes(tmp_path) + b"/ledger\xff.db"))
    _traffic(db)
    capsys.readouterr()
    assert main(["verify", "--db", str(db)]) == 0
    assert "ledger invariants hold" in capsys.readouterr().out
    assert main(["report", "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decisions"]["allow"] == 3


@pytest.mark.parametrize("listen", [":0", "127.0.0.1:0", "[::1]:0"])
def test_env_refuses_port_0_which_only_run_can_choose(
    listen: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`env --listen :0` once printed http://127.0.0.1:0, a proxy URL that points agents nowhere."""
    confdir = tmp_path / "conf"
    assert main(["env", "--confdir", str(confdir), "--listen", listen]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"drawdown: --listen {listen}: port 0 means a free port, chosen when ")
    assert "drawdown listening on http://HOST:PORT" in err
    assert not confdir.exists()  # refused before the CA is minted
    assert parse_listen(listen)[1] == 0  # `run --listen :0` still takes it


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy that wrongly starts fails the test at once instead of holding it."""

    def started(*_: object) -> None:
        raise AssertionError("the proxy started")

    monkeypatch.setattr("drawdown.cli._run_proxy", started)


@pytest.mark.parametrize(
    ("entry", "flag"),
    [
        ("listen_port=9000", "--listen HOST:PORT"),
        ("listen_host=0.0.0.0", "--listen HOST:PORT"),
        (" listen_port = 9000", "--listen HOST:PORT"),
        ("listen_port", "--listen HOST:PORT"),
        ("confdir=/elsewhere", "--confdir DIR"),
        ("drawdown_policy=other.yaml", "--policy PATH"),
        ("drawdown_db=other.db", "--db PATH"),
        ("drawdown_mode=enforce", "--mode"),
    ],
)
def test_run_refuses_a_set_that_would_override_one_of_its_flags(
    entry: str, flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_proxy: None
) -> None:
    """`--set listen_port=9000` was applied after --listen and silently won over it; so did
    `--set confdir=` (the CA made in one folder, mitmproxy using another) and the others."""
    assert main([*run_args(tmp_path, tmp_path / "conf"), "--set", entry]) == 2
    err = capsys.readouterr().err
    name = entry.split("=")[0].strip()
    assert err == f"drawdown: --set {name} would override {flag}: use that\n"
    assert not (tmp_path / "conf").exists() and not (tmp_path / "l.db").exists()


@pytest.mark.parametrize("entry", ["", "=5", " =5"])
def test_a_set_entry_without_a_name_is_a_usage_error(
    entry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_proxy: None
) -> None:
    """mitmproxy read an empty name as "Unknown option(s): " naming nothing, after the ledger
    was opened."""
    assert main([*run_args(tmp_path, tmp_path / "conf"), "--set", entry]) == 2
    err = capsys.readouterr().err
    assert err == f"drawdown: --set wants NAME=VALUE (or NAME, for a switch), got {entry!r}\n"
    assert not (tmp_path / "conf").exists() and not (tmp_path / "l.db").exists()


def test_a_bare_set_name_keeps_mitmproxys_meaning(tmp_path: Path, no_proxy: None) -> None:
    """`--set ssl_insecure` turns the switch on, as mitmproxy documents: not refused."""
    with pytest.raises(AssertionError, match="the proxy started"):
        main([*run_args(tmp_path, tmp_path / "conf"), "--set", "ssl_insecure"])


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Makes a directory read-only: `chmod 0o555`, and for root, whom that mode does not stop,
    the same refusal from every file opened for writing in it."""
    made: list[Path] = []

    def make(directory: Path) -> None:
        directory.chmod(0o555)
        made.append(directory)
        if os.geteuid() != 0:
            return
        real_open = Path.open

        def open_(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if self.parent == directory and set(mode) & set("wax+"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_)

    yield make
    for directory in made:
        directory.chmod(0o755)


def test_an_empty_confdir_that_cannot_be_written_is_named_so(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    read_only: Callable[[Path], None],
    no_proxy: None,
) -> None:
    """It said the CA there "cannot be read" and to move its files away: there were none."""
    confdir = tmp_path / "conf"
    confdir.mkdir()
    read_only(confdir)
    assert main(run_args(tmp_path, confdir)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"drawdown: --confdir {confdir} holds no CA yet and cannot take a new one "
        "(Permission denied): make it writable, or choose another --confdir\n"
    )


def _exports(out: str) -> dict[str, str]:
    return dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's cache (XDG_CACHE_HOME), where `env` writes a bundle no confdir takes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "drawdown"


NO_CA = (
    "no CA certificate in {confdir}: the proxy's host has it, as mitmproxy-ca-cert.pem in the "
    "--confdir of its `drawdown run` (made when the proxy first starts); run `drawdown env` "
    "there, or copy that file to this host and pass it with --ca-cert FILE"
)


@pytest.mark.parametrize("confdir_is", ["absent", "empty"])
def test_env_never_makes_a_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], confdir_is: str
) -> None:
    """env made a CA wherever it found none: in an agent pod, over the certificate shipped
    there, with exit 0 and not a word, and the agent then trusted a CA no proxy used."""
    confdir = tmp_path / "conf"
    if confdir_is == "empty":
        confdir.mkdir()
    assert main(["env", "--confdir", str(confdir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"drawdown: {NO_CA.format(confdir=confdir)}\n"
    assert list(confdir.iterdir()) == [] if confdir_is == "empty" else not confdir.exists()


def test_env_takes_a_confdir_holding_the_certificate_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent pod's copy of the proxy's certificate (a ConfigMap), as `--confdir`."""
    ensure_ca(tmp_path / "proxy")
    shipped = (tmp_path / "proxy" / "mitmproxy-ca-cert.pem").read_bytes()
    pod = tmp_path / "pod"
    pod.mkdir()
    (pod / "mitmproxy-ca-cert.pem").write_bytes(shipped)
    assert main(["env", "--confdir", str(pod)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    bundle = Path(_exports(out)["SSL_CERT_FILE"])
    assert bundle == pod / "drawdown-ca-bundle.pem" and shipped in bundle.read_bytes()
    assert (pod / "mitmproxy-ca-cert.pem").read_bytes() == shipped
    assert sorted(p.name for p in pod.iterdir()) == [
        "drawdown-ca-bundle.pem",
        "drawdown-ca-truststore.p12",
        "mitmproxy-ca-cert.pem",
    ]


def test_env_takes_the_certificate_from_anywhere_with_ca_cert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cache: Path
) -> None:
    """--ca-cert: the bundle goes to the user's cache, a folder per CA, or to --bundle-dir."""
    from drawdown.cacerts import BUNDLE, TRUSTSTORE

    ensure_ca(tmp_path / "proxy")
    cert = tmp_path / "shipped.pem"
    cert.write_bytes((tmp_path / "proxy" / "mitmproxy-ca-cert.pem").read_bytes())
    assert main(["env", "--ca-cert", str(cert)]) == 0
    out, err = capsys.readouterr()
    (folder,) = cache.iterdir()
    assert err == "" and folder.name.startswith("ca-")
    lines = _exports(out)
    assert lines["SSL_CERT_FILE"] == str(folder / BUNDLE)
    assert cert.read_text().strip() in (folder / BUNDLE).read_text()
    assert f"-Djavax.net.ssl.trustStore={folder / TRUSTSTORE} " in lines["JAVA_TOOL_OPTIONS"]
    ensure_ca(tmp_path / "other")  # another proxy's CA: never the same bundle
    assert main(["env", "--ca-cert", str(tmp_path / "other" / "mitmproxy-ca-cert.pem")]) == 0
    assert len(list(cache.iterdir())) == 2
    chosen = tmp_path / "bundles" / "here"
    capsys.readouterr()
    assert main(["env", "--ca-cert", str(cert), "--bundle-dir", str(chosen)]) == 0
    assert _exports(capsys.readouterr().out)["SSL_CERT_FILE"] == str(chosen / BUNDLE)
    assert (chosen / TRUSTSTORE).is_file()
    # Handed the CA file itself, key and all: its certificate only reaches the bundle.
    keyed = tmp_path / "keyed"
    assert main(["env", "--ca-cert", str(tmp_path / "proxy" / "mitmproxy-ca.pem"),
                 "--bundle-dir", str(keyed)]) == 0  # fmt: skip
    assert cert.read_bytes() in (keyed / BUNDLE).read_bytes()
    assert b"PRIVATE KEY" not in (keyed / BUNDLE).read_bytes()


def key_of_another_user(monkeypatch: pytest.MonkeyPatch, confdir: Path) -> None:
    """The CA's key (0600) belongs to the proxy's user: reading it is refused."""
    read_bytes = Path.read_bytes

    def not_ours(self: Path) -> bytes:
        if self == confdir / "mitmproxy-ca.pem":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", not_ours)


def test_env_on_the_proxys_host_reads_the_certificate_when_the_key_is_not_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is 0600, the proxy's user's; another user's env wants the certificate only.
    It said "the CA … cannot be read; move its mitmproxy-ca*.pem files away"."""
    confdir = tmp_path / "conf"
    ensure_ca(confdir)
    key_of_another_user(monkeypatch, confdir)
    assert main(["env", "--confdir", str(confdir)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    cert = (confdir / "mitmproxy-ca-cert.pem").read_text().strip()
    assert cert in Path(_exports(out)["SSL_CERT_FILE"]).read_text()


@pytest.mark.parametrize("problem", ["missing", "no certificate", "both sources"])
def test_env_names_a_certificate_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    cert = tmp_path / "ca.pem"
    if problem == "no certificate":
        cert.write_text("not a certificate\n")
    argv = ["env", "--ca-cert", str(cert)]
    if problem == "both sources":  # which one would it be? argparse says no
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--confdir", str(tmp_path)])
        assert exited.value.code == 2
        assert "argument --confdir: not allowed with argument --ca-cert" in capsys.readouterr().err
        return
    assert main(argv) == 2
    out, err = capsys.readouterr()
    reason = (
        "cannot be read (No such file or directory)"
        if problem == "missing"
        else "holds no PEM certificate: give it the proxy's mitmproxy-ca-cert.pem"
    )
    assert out == "" and err == f"drawdown: --ca-cert {cert} {reason}\n"


def test_env_says_when_the_bundle_dir_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], read_only: Callable[[Path], None]
) -> None:
    ensure_ca(tmp_path / "conf")
    chosen = tmp_path / "bundles"
    chosen.mkdir()
    read_only(chosen)
    argv = ["env", "--confdir", str(tmp_path / "conf"), "--bundle-dir", str(chosen)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"drawdown: cannot write the agents' CA bundle in {chosen} (Permission denied): "
        "give --bundle-dir a folder this user can write\n"
    )


@pytest.mark.parametrize("bundle", ["missing", "stale"])
def test_env_on_a_read_only_confdir_writes_the_bundle_in_the_users_cache(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    read_only: Callable[[Path], None],
    cache: Path,
    bundle: str,
) -> None:
    """A valid CA and a missing or stale bundle in a read-only confdir (a mounted Secret or
    ConfigMap): env stopped, to "make it writable". It needs only to read the certificate."""
    from drawdown.cacerts import BUNDLE, ca_bundle

    confdir = tmp_path / "conf"
    ca_bundle(confdir)
    if bundle == "missing":
        (confdir / BUNDLE).unlink()
    else:
        (confdir / BUNDLE).write_text("an older CA\n")
    before = {p.name: p.read_bytes() for p in confdir.iterdir()}
    read_only(confdir)
    assert main(["env", "--confdir", str(confdir)]) == 0
    out, err = capsys.readouterr()
    (folder,) = cache.iterdir()
    assert err == (
        f"drawdown: {confdir} cannot take the agents' CA bundle (Permission denied); it is "
        f"written to {folder} instead (--bundle-dir DIR to choose)\n"
    )
    assert _exports(out)["SSL_CERT_FILE"] == str(folder / BUNDLE)
    cert = (confdir / "mitmproxy-ca-cert.pem").read_text().strip()
    assert cert in (folder / BUNDLE).read_text()
    assert {p.name: p.read_bytes() for p in confdir.iterdir()} == before


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stands in for the proxy: records the confdir mitmproxy would load, what is in it and
    its mode, then stops as a signalled proxy does."""
    seen: list[dict[str, Any]] = []

    async def serve(args: Any, *_: object) -> int:
        folder = Path(args.confdir)
        files = {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()}
        seen.append(
            {"confdir": folder, "mode": stat.S_IMODE(folder.stat().st_mode), "files": files}
        )
        return 0

    monkeypatch.setattr("drawdown.cli._run_proxy", serve)
    return seen


@pytest.mark.parametrize("bundle", ["missing", "stale"])
def test_run_on_a_read_only_confdir_warns_of_the_bundle_and_serves(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    read_only: Callable[[Path], None],
    served: list[dict[str, Any]],
    bundle: str,
) -> None:
    """A read-only confdir whose bundle is missing or stale (another image's system CAs):
    `run` stopped, though the proxy needs no bundle. It serves, and says so."""
    from drawdown.cacerts import BUNDLE, ca_bundle

    confdir = tmp_path / "conf"
    ca_bundle(confdir)
    if bundle == "missing":
        (confdir / BUNDLE).unlink()
    else:
        (confdir / BUNDLE).write_text("an older CA\n")
    read_only(confdir)
    assert main(run_args(tmp_path, confdir)) == 0
    assert capsys.readouterr().err == (
        f"drawdown: warning: cannot write the agents' CA bundle in {confdir} (Permission "
        "denied); the proxy runs without it, and `drawdown env` writes each agent's own (in "
        "the user's cache, or --bundle-dir DIR)\n"
    )
    assert [s["confdir"] for s in served] == [confdir]  # all mitmproxy needs is there


def test_run_serves_from_a_read_only_secret_holding_only_the_ca(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    read_only: Callable[[Path], None],
    served: list[dict[str, Any]],
) -> None:
    """A Kubernetes Secret: mitmproxy-ca.pem alone, read-only. mitmproxy writes its dhparam
    file beside the CA; `run` said the CA "cannot be read" and to mint a new one, which would
    have changed the CA of every agent. mitmproxy now loads a private copy, gone at exit."""
    ensure_ca(tmp_path / "made")
    key = (tmp_path / "made" / "mitmproxy-ca.pem").read_bytes()
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "mitmproxy-ca.pem").write_bytes(key)
    read_only(secret)
    assert main(run_args(tmp_path, secret)) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"drawdown: warning: cannot write the agents' CA bundle in {secret} (")
    assert err.count("\n") == 1 and "mint" not in err
    (seen,) = served
    copy = seen["confdir"]
    assert copy != secret and seen["mode"] == 0o700
    assert seen["files"]["mitmproxy-ca.pem"] == (key, 0o600)
    assert set(seen["files"]) == {"mitmproxy-ca.pem", "mitmproxy-dhparam.pem"}
    assert not copy.exists()  # removed when the proxy stopped
    assert [p.name for p in secret.iterdir()] == ["mitmproxy-ca.pem"]


def test_run_says_a_ca_it_may_not_read_is_not_its_own_rather_than_to_mint_one(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_proxy: None,
) -> None:
    """Permission denied on the CA said to move its files away and mint a new one: a new CA
    for every agent, where running as the key's owner was the fix."""
    confdir = tmp_path / "conf"
    ensure_ca(confdir)
    key_of_another_user(monkeypatch, confdir)
    assert main(run_args(tmp_path, confdir)) == 2
    assert capsys.readouterr().err == (
        f"drawdown: the CA in {confdir} cannot be read by this user (Permission denied): run "
        f"drawdown as the user that owns {confdir / 'mitmproxy-ca.pem'}, or let this one read it\n"
    )


def test_run_refuses_a_confdir_holding_the_certificate_without_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_proxy: None
) -> None:
    """The agents' ConfigMap mounted where the key's Secret belonged: `run` minted a CA over
    the shipped certificate, one no agent trusts, without a word."""
    ensure_ca(tmp_path / "made")
    shipped = (tmp_path / "made" / "mitmproxy-ca-cert.pem").read_bytes()
    confdir = tmp_path / "conf"
    confdir.mkdir()
    (confdir / "mitmproxy-ca-cert.pem").write_bytes(shipped)
    assert main(run_args(tmp_path, confdir)) == 2
    assert capsys.readouterr().err == (
        f"drawdown: --confdir {confdir} holds the CA's certificate (mitmproxy-ca-cert.pem) but "
        "not its key (mitmproxy-ca.pem): give `drawdown run` the confdir the CA was made in, "
        "or move mitmproxy-ca-cert.pem away to mint a new CA\n"
    )
    assert [p.name for p in confdir.iterdir()] == ["mitmproxy-ca-cert.pem"]
    assert (confdir / "mitmproxy-ca-cert.pem").read_bytes() == shipped


def test_two_envs_writing_one_bundle_at_once_both_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agents of one pod starting together share the cache's bundle. With one temporary name
    for all, a second writer's rename took the first's file away (env failed), or its write
    truncated the file the first was renaming into place (an agent read half a bundle)."""
    from drawdown.cacerts import BUNDLE, write_bundle

    ensure_ca(tmp_path / "conf")
    ca = (tmp_path / "conf" / "mitmproxy-ca-cert.pem").read_bytes()
    folder = tmp_path / "shared"
    replace = Path.replace
    other: list[Path] = []

    def interleaved(self: Path, target: Path) -> Path:
        if not other:  # the other agent writes all of its own between this one's write and rename
            other.append(folder)
            other.append(write_bundle(folder, ca))
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", interleaved)
    bundle = write_bundle(folder, ca)
    assert other == [folder, bundle] and ca in bundle.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == [BUNDLE, "drawdown-ca-truststore.p12"]


@pytest.mark.parametrize("method", ["GE T", "", "GET\r\n", "G/ET", "GÉT", "(GET)"])
def test_explain_refuses_a_method_that_is_no_http_token(
    method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--method 'GE T'` was explained as a request no client can send."""
    code = main(
        ["explain", "--policy", str(ROOT / "policies" / "example.yaml"), "--url",
         "https://api.openai.com/v1/models", "--method", method]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (
        "drawdown: --method wants an HTTP method such as GET or POST (letters, digits and "
        f"!#$%&'*+-.^_`|~), got {method!r}\n"
    )


@pytest.mark.parametrize("method", ["get", "M-SEARCH", "PROPFIND"])
def test_explain_takes_any_method_token(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["explain", "--policy", str(ROOT / "policies" / "example.yaml"), "--url",
         "https://api.openai.com/v1/models", "--method", method]
    )  # fmt: skip
    assert code == 0 and capsys.readouterr().err == ""


def test_version_names_drawdown_and_the_mitmproxy_it_runs_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`drawdown --version` was a usage error ("the following arguments are required:
    COMMAND"); a user told to upgrade (a ledger from a newer drawdown) could not tell which
    one they ran."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == (
        f"drawdown {version('drawdown')} (mitmproxy {version('mitmproxy')})\n"
    )


def test_explain_prices_a_bedrock_invoke_of_any_family_as_the_proxy_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Titan Text invoke was a $0 step in explain as in the proxy: it is now estimated from
    its own body (inputText, textGenerationConfig.maxTokenCount) at genai-prices' `aws` price;
    an image model's invoke is still a request at $0."""
    import genai_prices
    from drawdown.meter import MeterConfig, inspect_request

    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nmode: enforce\nactions:\n"
        '  - {kind: llm, provider: bedrock, match: {host: "bedrock-runtime.*.amazonaws.com"}}\n'
    )
    host = "https://bedrock-runtime.eu-west-3.amazonaws.com"
    path = "/model/amazon.titan-text-express-v1/invoke"
    body = json.dumps(
        {"inputText": "Name three colours", "textGenerationConfig": {"maxTokenCount": 80}}
    )
    args = ["explain", "--policy", str(policy), "--url", host + path, "--json", body, "--as-json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    estimate = out["estimate"]
    input_tokens = inspect_request(
        "bedrock", "POST", path, {}, body.encode(), MeterConfig()
    ).input_tokens
    assert estimate["tokens"] == input_tokens + 80
    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=80)
    price = genai_prices.calc_price(usage, "amazon.titan-text-express-v1", provider_id="aws")
    assert estimate["usd_nanos"] == math.ceil(price.total_price * 1_000_000_000) > 0
    (line,) = [text for stage, text in out["steps"] if stage == "estimate"]
    assert line.startswith("bedrock invoke model amazon.titan-text-express-v1")
    image = "/model/stability.sd3-5-large-v1%3A0/invoke"
    args[4] = host + image
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimate"] == {"usd_nanos": 0, "tokens": 0, "requests": 1}
    assert any("counted as a request at $0" in text for _, text in out["steps"])


def test_a_folder_given_as_the_ledger_is_named_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite opening a folder says "disk I/O error", which sends a user looking at the disk."""
    assert main(["report", "--db", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"drawdown: {tmp_path} is a folder, not a ledger: pass --db the ledger's file"
    )


def test_explain_without_a_ledger_refuses_a_call_no_empty_budget_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A limit below the call's estimate refuses it whatever was spent, as the proxy does on
    its first call; explain without --db said "allow — if every budget above has room"."""
    policy = tmp_path / "p.yaml"
    budgets = 'budgets:\n  - {scope: "agent:*", usd: %s}\n'
    actions = "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
    body = '{"model": "gpt-4o-mini", "max_tokens": 1000, "messages": []}'

    def explain(usd: str) -> dict[str, Any]:
        policy.write_text(actions + budgets % usd)
        args = ["explain", "--policy", str(policy), "--url",
                "https://api.openai.com/v1/chat/completions", "--header", "X-Drawdown-Agent:a",
                "--json", body, "--as-json"]  # fmt: skip
        assert main(args) == 0
        return json.loads(capsys.readouterr().out)

    tight = explain("0.0001")  # 1,000 output tokens of gpt-4o-mini: $0.0006
    assert tight["decision"] == "deny", tight
    assert tight["reason"] == (
        "budget agent:a usd: its limit is below this call's estimate, so it refuses it "
        "whatever was spent (402)"
    )
    roomy = explain("1")
    assert roomy["decision"] == "allow"
    assert roomy["reason"] == "if every budget above has room (pass --db to check the ledger)"


def test_explain_takes_the_callers_address_and_proxy_password_and_says_when_it_lacks_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The example policy falls back to the caller's address for the agent, which every live
    request has: explain without it showed a scope with no agent (so no per-agent budgets),
    and said nothing. --client-ip and --proxy-password give what the proxy would know."""
    args = ["explain", "--policy", str(ROOT / "policies" / "example.yaml"), "--url",
            "https://api.anthropic.com/v1/messages", "--json",
            '{"model": "claude-haiku-4-5", "max_tokens": 10, "messages": []}', "--as-json"]  # fmt: skip
    assert main(args) == 0
    bare = json.loads(capsys.readouterr().out)
    assert "/agent:" not in bare["scope"]
    assert ["identity", "agent: the proxy would take it from the caller's address, which "
            "explain was not given (pass --client-ip)"] in bare["steps"]  # fmt: skip
    assert main([*args, "--client-ip", "10.0.0.7", "--proxy-password", "r9"]) == 0
    told = json.loads(capsys.readouterr().out)
    assert told["scope"] == "tenant:acme/agent:10.0.0.7/run:r9"
    assert not any("was not given" in text for _, text in told["steps"])


def test_explain_reads_hosts_paths_and_methods_as_the_proxy_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain decides as the proxy: `api.openai.com.` is the LLM's host, an IP address is
    classified by the Host header naming its host; a Host header naming another host than the
    URL's, a path a server reads as another action's and a method override are refused."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "actions:\n"
        "  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
        "  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}}\n"
        "  - {kind: crm.delete, match: {host: crm.example.com, method: DELETE}}\n"
    )
    chat = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})

    def explain(url: str, *more: str, body: str = "{}") -> dict[str, Any]:
        args = ["explain", "--policy", str(policy), "--url", url, "--json", body, "--as-json"]
        assert main([*args, *more]) == 0
        return json.loads(capsys.readouterr().out)

    for url, more in (
        ("https://API.openai.com./v1/chat/completions", ()),
        ("https://10.9.8.7/v1/chat/completions", ("--header", "Host:api.openai.com")),
    ):
        found = explain(url, *more, body=chat)
        assert (found["action"], found["decision"]) == ("llm", "allow"), found
    for url, more, stage, says in (
        ("https://crm.example.com/v1/refunds", ("--header", "Host:api.stripe.com"), "host",
         "the request goes to crm.example.com but its Host header names api.stripe.com"),
        ("https://api.stripe.com/v1//refunds", (), "path", "a server that merges repeated slashes"),
        ("https://crm.example.com/api/customers/1", ("--header", "X-HTTP-Method-Override:DELETE"),
         "path", "the method POST reads as DELETE"),
    ):  # fmt: skip
        found = explain(url, *more)
        assert (found["decision"], found["reason"]) == ("deny", "bad_request (400)"), found
        assert any(s == stage and says in text for s, text in found["steps"]), found["steps"]


def test_terminal_escapes_only_the_lines_that_need_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_terminal` escaped every character of a report in Python: 1.27 s for the 26 MB text of
    a week of fleet traffic. Printable lines now pass as they are; the output is the same."""
    from drawdown import cli

    lines = [
        "decisions: 3 allowed, 1 denied",
        "tenant:t/agent:a/run:r  normal  5  0.0000315  30/45  -",
        "model gpt\x1b[31m-red\x07",
        "",
        "café ☕ naïve — unicode is printable",
        "tab\there and a bell\x07 and \u2028 a line separator",
        "\x00\x7f\x9b",
        "  trailing spaces  ",
    ]
    text = "\n".join(lines * 50)

    def every_character(text: str) -> str:  # as _terminal escaped before
        return "\n".join(
            "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in line)
            for line in text.split("\n")
        )

    escaped: list[str] = []
    original = cli._escaped

    def counting(line: str) -> str:
        escaped.append(line)
        return original(line)

    monkeypatch.setattr(cli, "_escaped", counting)
    assert cli._terminal(text) == every_character(text)
    assert "\\x1b[31m" in cli._terminal(text) and "\x1b" not in cli._terminal(text)
    escaped.clear()
    cli._terminal(text)
    assert len(escaped) == 3 * 50  # only the lines with a control character
