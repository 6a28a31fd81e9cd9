"""Secrets never leak: real-looking credentials go through every provider and tool path, and
then nothing drawdown writes or prints — the ledger files (db, -wal, -shm), the proxy's log,
`drawdown report --json/--jsonl/--html`, `drawdown explain`, `budgets`, `replay`, `verify` —
contains any of them. Also: the CA private key is 0600, a public listen address needs proxy
authentication, and every user-controlled string in the HTML report stays text.

Exports are listed in EXPORTS: a new output format is one line there (extension point).
"""

from __future__ import annotations

import base64
import html.parser
import os
import secrets
import stat
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import bcrypt
import openai
import pytest
from drawdown.cli import build_parser
from google.genai import types as genai_types

from tests.support.proxy import DrawdownProcess
from tests.support.secret_scan import scan_ledger_and_log
from tests.support.standin import Reply, StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]
HI = [{"role": "user", "content": "hi"}]


def _random(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


# Shaped like the real thing; random per test run so a match can only be a leak.
OPENAI_KEY = f"sk-proj-{_random(40)}T3BlbkFJ{_random(40)}"
ANTHROPIC_KEY = f"sk-ant-api03-{_random(86)}-{_random(6)}AA"
ANTHROPIC_OAUTH = f"sk-ant-oat01-{_random(86)}AA"
GEMINI_HEADER_KEY = f"AIza{_random(35, string.ascii_letters + string.digits + '-_')}"
GEMINI_QUERY_KEY = f"AIza{_random(35, string.ascii_letters + string.digits + '-_')}"
COOKIE = f"sess_{_random(32)}"
TOOL_TOKEN = f"ghp_{_random(36)}"
BODY_SECRET = f"sk_live_{_random(24)}"
PROXY_USER = "sec-agent"
PROXY_PASSWORD = f"pw-{_random(24)}"

SECRETS = {
    "openai key": OPENAI_KEY,
    "anthropic key": ANTHROPIC_KEY,
    "anthropic oauth": ANTHROPIC_OAUTH,
    "gemini header key": GEMINI_HEADER_KEY,
    "gemini query key": GEMINI_QUERY_KEY,
    "cookie": COOKIE,
    "tool bearer token": TOOL_TOKEN,
    "body secret": BODY_SECRET,
    "proxy password": PROXY_PASSWORD,
}


def needles() -> dict[str, bytes]:
    """Every form a secret could be written in: whole, its random tail alone, URL-quoted, and the
    proxy credentials as they travel in Proxy-Authorization (base64)."""
    found: dict[str, bytes] = {}
    for name, value in SECRETS.items():
        found[name] = value.encode()
        found[f"{name} (tail)"] = value[-16:].encode()
        found[f"{name} (quoted)"] = quote(value, safe="").encode()
    found["proxy credentials (base64)"] = base64.b64encode(
        f"{PROXY_USER}:{PROXY_PASSWORD}".encode()
    )
    return found


def assert_clean(what: str, data: bytes | str) -> None:
    blob = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    leaked = [name for name, needle in needles().items() if needle in blob]
    assert not leaked, f"{what} contains {', '.join(leaked)}"


def drawdown(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drawdown", *args], capture_output=True, text=True, timeout=120
    )


POLICY = """
record: {bodies: full}
identity:
  agent: [{proxy_user: true}]
  run: [{header: X-Drawdown-Run}, {proxy_password: true}, {value: default}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: llm, provider: anthropic, match: {host: api.anthropic.com}}
  - {kind: llm, provider: gemini, match: {host: generativelanguage.googleapis.com}}
  - {kind: crm.read, match: {host: crm.example.com, method: GET, path: "/api/customers/{id}"}, cost: {usd: 0.002}}
  - {kind: crm.write, match: {host: crm.example.com, method: POST}, cost: {usd: 0.002}, cost_header: X-Cost}
authority:
  rules:
    - {scope: "*", action: crm.write, requires: [{action: crm.read, same: {json.customer_id: path.id}}]}
budgets:
  - {scope: "agent:*/run:*", usd: 5, requests: 10}
"""

# --- exports: one line per output format that must stay free of secrets (extension point) ----------
EXPORTS: dict[str, Callable[[Path, Path, Path], list[str]]] = {
    "report": lambda db, policy, tmp: ["report", "--db", str(db)],
    "report --json": lambda db, policy, tmp: ["report", "--db", str(db), "--json"],
    "report --jsonl": lambda db, policy, tmp: ["report", "--db", str(db), "--jsonl"],
    "report --html": lambda db, policy, tmp: [
        "report",
        "--db",
        str(db),
        "--html",
        str(tmp / "report.html"),
    ],
    "report --run": lambda db, policy, tmp: ["report", "--db", str(db), "--run", "r1", "--json"],
    "budgets --json": lambda db, policy, tmp: ["budgets", "--db", str(db), "--json"],
    "verify --json": lambda db, policy, tmp: ["verify", "--db", str(db), "--json"],
    "replay --json": lambda db, policy, tmp: [
        "replay",
        "--policy",
        str(policy),
        "--db",
        str(db),
        "--json",
    ],
}


def _available(args: list[str]) -> bool:
    """Only formats this drawdown has (another engineer may still be adding some)."""
    try:
        build_parser().parse_args(args)
    except SystemExit:
        return False
    return True


def test_no_secret_reaches_the_ledger_the_log_or_any_export(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path, tmp_db: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        f"{PROXY_USER}:{bcrypt.hashpw(PROXY_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
    )
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY)
    proxy = drawdown_proxy(
        policy_path,
        proxy_auth=(PROXY_USER, PROXY_PASSWORD),
        extra_args=["--set", f"proxyauth=@{htpasswd}"],
    )
    run = {"X-Drawdown-Run": "r1"}

    # OpenAI: Authorization: Bearer sk-proj-…, JSON and streamed, and one upstream error.
    with proxy.openai_client(api_key=OPENAI_KEY, default_headers=run, max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=10)
        list(client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True))
        standin.script(
            "POST",
            "/v1/chat/completions",
            Reply(
                status=401,
                json={
                    "error": {
                        "message": "Incorrect API key provided",
                        "type": "invalid_request_error",
                    }
                },
            ),
        )
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    # Anthropic: x-api-key, and Authorization: Bearer (OAuth), with a cookie.
    with proxy.anthropic_client(api_key=ANTHROPIC_KEY, default_headers=run) as claude:
        claude.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=HI)
    with proxy.http_client() as http:
        response = http.post(
            "https://api.anthropic.com/v1/messages",
            json={"model": "claude-haiku-4-5", "max_tokens": 10, "messages": HI},
            headers={
                "authorization": f"Bearer {ANTHROPIC_OAUTH}",
                "anthropic-version": "2023-06-01",
                "cookie": f"session={COOKIE}",
                **run,
            },
        )
        assert response.status_code == 200
        # Gemini: the key as ?key=… in the query string.
        response = http.post(
            f"https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent?key={GEMINI_QUERY_KEY}",
            json={"contents": [{"parts": [{"text": "hi"}]}]},
            headers=run,
        )
        assert response.status_code == 200
        # A tool API: bearer token, cookie, a secret in the JSON body (record.bodies: full).
        tool = {
            "authorization": f"Bearer {TOOL_TOKEN}",
            "cookie": f"sid={COOKIE}; theme=dark",
            **run,
        }
        assert (
            http.get("https://crm.example.com/api/customers/c42", headers=tool).status_code == 200
        )
        write = http.post(
            "https://crm.example.com/api/notes",
            headers=tool,
            json={"customer_id": "c42", "api_key": BODY_SECRET, "note": BODY_SECRET},
        )
        assert write.status_code == 200
        # Denied calls carry secrets too: an unmet `requires` (403) and, further down, the budget (402).
        denied = http.post(
            "https://crm.example.com/api/notes",
            headers=tool,
            json={"customer_id": "c7", "password": BODY_SECRET},
        )
        assert denied.status_code == 403
        assert_clean("a denial's response", denied.text + str(denied.headers))
    # Gemini: x-goog-api-key, with the official SDK.
    with proxy.genai_client(api_key=GEMINI_HEADER_KEY, headers=run) as gemini:
        gemini.models.generate_content(
            model="gemini-2.5-flash",
            contents="hi",
            config=genai_types.GenerateContentConfig(max_output_tokens=10),
        )
    with proxy.openai_client(api_key=OPENAI_KEY, default_headers=run, max_retries=0) as client:
        statuses = []
        for _ in range(4):
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=10)
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
                assert_clean("a budget denial", exc.response.text + str(exc.response.headers))
        assert 402 in statuses

    # The credentials did reach the upstream (drawdown forwards them, it just never keeps them)…
    seen = {value for r in standin.requests for _, value in r.headers} | {
        r.query for r in standin.requests
    }
    for name, value in SECRETS.items():
        if name not in ("proxy password", "body secret"):
            assert any(value in text for text in seen), f"{name} never reached the upstream"
    # …but the proxy's own credentials never did.
    assert not [
        h for r in standin.requests for h in r.headers if h[0].lower() == "proxy-authorization"
    ]
    # The proxy password names no run (a credential file makes it a secret).
    assert proxy.query("SELECT DISTINCT agent, run FROM decisions") == [(PROXY_USER, "r1")]

    proxy.wait_for_query(
        "SELECT COUNT(*) FROM holds WHERE state = 'active'", until=lambda r: r == [(0,)]
    )
    files = scan_ledger_and_log(proxy, tmp_db, assert_clean)
    assert {tmp_db.name, tmp_db.name + "-wal"} <= files

    checked = []
    for label, make in EXPORTS.items():
        args = make(tmp_db, policy_path, tmp_path)
        if not _available(args):
            continue
        result = drawdown(*args)
        assert result.returncode == 0, (label, result.stderr)
        assert "Traceback" not in result.stderr
        assert_clean(f"drawdown {label}", result.stdout + result.stderr)
        checked.append(label)
    html_file = tmp_path / "report.html"
    if html_file.exists():
        assert_clean("the HTML report", html_file.read_bytes())
    assert {"report --json", "report --jsonl", "report --html"} <= set(checked)

    # explain, given every secret on its command line, echoes none of them.
    explain = [
        "explain", "--policy", str(policy_path), "--db", str(tmp_db),
        "--url", f"https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent?key={GEMINI_QUERY_KEY}",
        "--header", f"Authorization: Bearer {OPENAI_KEY}", "--header", f"x-api-key: {ANTHROPIC_KEY}",
        "--header", f"x-goog-api-key: {GEMINI_HEADER_KEY}", "--header", f"Cookie: session={COOKIE}",
        "--header", "X-Drawdown-Run: r1", "--proxy-user", PROXY_USER,
        "--json", f'{{"contents": [{{"parts": [{{"text": "hi"}}]}}], "api_key": "{BODY_SECRET}"}}',
    ]  # fmt: skip
    for extra in ([], ["--as-json"]):
        result = drawdown(*explain, *extra)
        assert result.returncode == 0, result.stderr
        assert_clean(f"drawdown explain {' '.join(extra)}", result.stdout + result.stderr)
        assert "decision" in result.stdout


def test_ca_private_key_is_readable_by_its_owner_only(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy("actions: []\n")
    keys = [
        p
        for p in proxy.confdir.glob("mitmproxy-ca*")
        if p.suffix in (".pem", ".p12") and "cert" not in p.name
    ]
    assert keys, sorted(p.name for p in proxy.confdir.iterdir())
    for key in keys:
        assert b"PRIVATE KEY" in key.read_bytes() or key.suffix == ".p12"
        mode = stat.S_IMODE(key.stat().st_mode)
        assert mode & 0o077 == 0, f"{key.name} has mode {oct(mode)}"
    # drawdown env's bundle holds certificates only, never the key.
    result = drawdown("env", "--confdir", str(proxy.confdir))
    bundle = Path(
        next(line for line in result.stdout.splitlines() if "SSL_CERT_FILE" in line)
        .split("=", 1)[1]
        .strip("'\"")
    )
    assert b"PRIVATE KEY" not in bundle.read_bytes()


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.10:0"])
def test_a_public_listen_address_needs_proxy_authentication(tmp_path: Path, listen: str) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("actions: []\n")
    base = [
        "run",
        "--policy",
        str(policy),
        "--listen",
        listen,
        "--db",
        str(tmp_path / "x.db"),
        "--confdir",
        str(tmp_path / "c"),
    ]
    for extra in ([], ["--set", "proxyauth="]):
        result = drawdown(*base, *extra)
        assert result.returncode == 2 and "refusing to listen" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_plain_mitmdump_also_refuses_a_public_address_without_proxy_authentication(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("actions: []\n")
    mitmdump = Path(sys.executable).with_name("mitmdump")
    addon = Path(__file__).resolve().parents[2] / "addon" / "drawdown" / "mitm.py"
    result = subprocess.run(
        [str(mitmdump), "-s", str(addon), "--listen-host", "0.0.0.0", "--listen-port", "0",
         "--set", f"confdir={tmp_path / 'c'}", "--set", f"drawdown_policy={policy}", "--set", f"drawdown_db={tmp_path / 'x.db'}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "refusing to listen" in result.stdout + result.stderr


# --- the HTML report: user-controlled strings stay text -----------------------------------------

PAYLOADS = [
    "<img src=x onerror=alert(1)>",
    "</script><script>alert(1)</script>",
    '"><svg onload=alert(1)>',
    "<!--",
    "]]>&amp;&lt;",
    "\u2028\u2029",
    "\x1b]0;pwned\x07\x1b[2J",  # terminal escapes, for the text report
]

# The page as drawdown ships it: these tags and no others.
_TEMPLATE_TAGS = [
    "html",
    "head",
    "meta",
    "meta",
    "meta",
    "title",
    "style",
    "body",
    "noscript",
    "p",
    "code",
    "main",
    "script",
    "script",
]


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(attrs)


def test_user_controlled_strings_in_the_html_report_stay_text(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path, tmp_db: Path
) -> None:
    """Agent, run, tenant and workflow names, request paths and model names — all chosen by the
    caller — travel into the page as JSON that cannot close its <script> element, and the page
    builds its DOM with textContent only."""
    policy = """
identity:
  tenant: [{header: X-Drawdown-Tenant}]
  workflow: [{header: X-Drawdown-Workflow}]
  agent: [{header: X-Drawdown-Agent}]
  run: [{header: X-Drawdown-Run}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: tool, match: {host: crm.example.com}, cost: {usd: 0.001}}
budgets:
  - {scope: "agent:*/run:*", requests: 1}
"""
    proxy = drawdown_proxy(policy)
    with proxy.http_client() as http:
        for i, payload in enumerate(PAYLOADS):
            names = {
                "X-Drawdown-Tenant": payload,
                "X-Drawdown-Workflow": payload,
                "X-Drawdown-Agent": payload,
                "X-Drawdown-Run": f"{payload}{i}",
            }
            encoded = {k: v.encode() for k, v in names.items()}  # raw UTF-8 on the wire
            http.post(
                "https://api.openai.com/v1/chat/completions",
                json={"model": payload, "messages": HI},
                headers=encoded,
            )
            http.post(
                "https://api.openai.com/v1/chat/completions",
                json={"model": payload, "messages": HI},
                headers=encoded,
            )  # denied: the reason names the scope
            http.get(f"https://crm.example.com/api/{quote(payload, safe='')}", headers=encoded)
    proxy.stop()
    page_path = tmp_path / "report.html"
    result = drawdown("report", "--db", str(tmp_db), "--html", str(page_path))
    assert result.returncode == 0, result.stderr
    page = page_path.read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    assert parser.tags == _TEMPLATE_TAGS, parser.tags  # no payload became an element
    assert not [a for a in parser.attributes if a[0].startswith("on")]
    assert page.count("</script>") == 2
    assert "<img" not in page and "<svg" not in page and "\u2028" not in page
    assert "\\u003cimg src=x onerror=alert(1)\\u003e" in page  # it is there, as JSON text
    script = (
        Path(__file__).resolve().parents[2] / "addon" / "drawdown" / "report_html" / "report.js"
    ).read_text()
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
    ):
        assert sink not in script, f"report.js uses {sink}"
    # Neither the terminal report nor the proxy's log prints a control character a name smuggled in
    # (an escape sequence drives the terminal; a newline forges a log line).
    text = drawdown("report", "--db", str(tmp_db)).stdout
    assert not [c for c in text if not c.isprintable() and c not in "\n"]
    assert "pwned" in proxy.log_text()  # the unknown model was logged…
    assert not [c for c in proxy.log_text() if not c.isprintable() and c not in "\n"]  # …escaped


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert os.environ.get("HTTPS_PROXY") is None
