"""`DrawdownProcess`: a real `drawdown run` (or `mitmdump -s addon/drawdown/mitm.py`) process.

Contract relied on (SPEC §8): `drawdown run --policy P --db D --listen HOST:PORT
--confdir C [--mode shadow] [--set name=value]...` prints exactly
`drawdown listening on http://HOST:PORT` once it accepts connections (the real port
when 0 was asked), and exits 0 on SIGTERM. mitmproxy writes its CA to
`<confdir>/mitmproxy-ca-cert.pem` on first start.

Unless `resolve` is None, the process also loads tests/support/mitm_resolve.py (through
mitmproxy's `scripts` option) so that requests for api.openai.com & co. are connected
to the stand-in while keeping their host name, SNI and certificate checks.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from . import clients
from .mitm_resolve import ENV_VAR as RESOLVE_ENV_VAR

REPO_ROOT = Path(__file__).resolve().parents[2]
MITM_ADDON = REPO_ROOT / "addon" / "drawdown" / "mitm.py"
RESOLVE_SCRIPT = Path(__file__).resolve().parent / "mitm_resolve.py"

_READY_RE = re.compile(r"drawdown listening on http://(?P<host>\[[^\]]+\]|[^\s:]+):(?P<port>\d+)")
# ready="mitmproxy": mitmproxy's own line, for addons that print no readiness line.
_MITM_READY_RE = re.compile(
    r"proxy listening at \*?(?P<host>\[[^\]]+\]|[^\s:]+)?:(?P<port>\d+)", re.IGNORECASE
)

_PROXY_ENV_VARS = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)

ProxyAuth = tuple[str, str]


# Safety net for processes started outside the fixture: none may outlive the test run.
_LIVE: weakref.WeakSet[DrawdownProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        proc.kill()


class _LedgerConnection(sqlite3.Connection):
    """A sqlite3 connection whose with-block also closes it."""

    def __exit__(self, *exc: Any) -> Literal[False]:
        try:
            super().__exit__(*exc)
        finally:
            self.close()
        return False


class DrawdownStartupError(AssertionError):
    """The proxy did not announce that it was listening."""


class DrawdownProcess:
    """Runs the proxy under test as a subprocess and helps clients talk through it.

    `policy` is policy YAML text, or a path (str/Path) to an existing file or folder.
    Text is written to `<confdir>/../policy-<id>.yaml` (see `.policy_path`).
    `upstream_ca` is the CA the proxy trusts for upstream TLS (the stand-in's).
    `resolve` maps host globs to the stand-in: {"tls": {glob: "host:port"}, "plain": {...}}.
    `proxy_auth` (user, password) goes into `.proxy_url` for every client built here.
    `mode` "run" starts `python -m drawdown run`; "mitmdump" starts mitmdump with
    `mitm_script` (default addon/drawdown/mitm.py) and drawdown_policy/drawdown_db options.
    `ready` "drawdown" waits for drawdown's readiness line; "mitmproxy" also accepts
    mitmproxy's own "proxy listening at HOST:PORT". Default: "drawdown" in run mode,
    "mitmproxy" in mitmdump mode.
    """

    def __init__(
        self,
        policy: str | os.PathLike[str],
        db_path: str | os.PathLike[str],
        confdir: str | os.PathLike[str],
        extra_args: Sequence[str] = (),
        upstream_ca: str | os.PathLike[str] | None = None,
        *,
        mode: Literal["run", "mitmdump"] = "run",
        mitm_script: str | os.PathLike[str] | None = None,
        resolve: Mapping[str, Mapping[str, str]] | None = None,
        proxy_auth: ProxyAuth | None = None,
        env: Mapping[str, str] | None = None,
        listen_host: str = "127.0.0.1",
        startup_timeout: float = 60.0,
        ready: Literal["drawdown", "mitmproxy"] | None = None,
        start: bool = True,
    ) -> None:
        self.confdir = Path(confdir)
        self.confdir.mkdir(parents=True, exist_ok=True)
        self.db_path = str(db_path)
        self.upstream_ca = str(upstream_ca) if upstream_ca is not None else None
        self.extra_args = list(extra_args)
        self.mode = mode
        self.mitm_script = Path(mitm_script) if mitm_script is not None else MITM_ADDON
        self.resolve = resolve
        self.proxy_auth = proxy_auth
        self.listen_host = listen_host
        self.startup_timeout = startup_timeout
        # mitm.py under plain mitmdump need not announce itself; mitmproxy's line will do.
        self.ready = ready or ("drawdown" if mode == "run" else "mitmproxy")
        self._extra_env = dict(env or {})
        self.policy_path = self._materialise_policy(policy)

        self.host: str | None = None
        self.port: int | None = None
        self.returncode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._readers: list[threading.Thread] = []
        self._open_streams = 0
        self._killed = False
        if start:
            self.start()

    # ------------------------------------------------------------------ setup

    def _materialise_policy(self, policy: str | os.PathLike[str]) -> Path:
        if isinstance(policy, os.PathLike):
            return Path(policy)
        if "\n" not in policy and Path(policy).exists():
            return Path(policy)
        path = self.confdir.parent / f"policy-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(policy)
        return path

    @property
    def command(self) -> list[str]:
        sets = []
        if self.upstream_ca is not None:
            sets += ["--set", f"ssl_verify_upstream_trusted_ca={self.upstream_ca}"]
        if self.mode == "run":
            if self.resolve is not None:
                sets += ["--set", f"scripts={RESOLVE_SCRIPT}"]
            return [
                sys.executable,
                "-m",
                "drawdown",
                "run",
                "--policy",
                str(self.policy_path),
                "--db",
                self.db_path,
                "--listen",
                f"{self.listen_host}:0",
                "--confdir",
                str(self.confdir),
                *sets,
                *self.extra_args,
            ]
        mitmdump = Path(sys.executable).with_name("mitmdump")
        launcher = (
            [str(mitmdump)]
            if mitmdump.exists()
            else [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]
        )
        return [
            *launcher,
            "-s",
            str(self.mitm_script),
            # mitmdump's -s and --set scripts= would overwrite each other; -s appends.
            *(["-s", str(RESOLVE_SCRIPT)] if self.resolve is not None else []),
            "--listen-host",
            self.listen_host,
            "--listen-port",
            "0",
            "--set",
            f"confdir={self.confdir}",
            "--set",
            f"drawdown_policy={self.policy_path}",
            "--set",
            f"drawdown_db={self.db_path}",
            *sets,
            *self.extra_args,
        ]

    def start(self) -> DrawdownProcess:
        if self._proc is not None:
            raise RuntimeError("already started")
        env = {**os.environ, **self._extra_env}
        env["PYTHONUNBUFFERED"] = "1"  # the readiness line must not sit in a pipe buffer
        for var in _PROXY_ENV_VARS:  # the proxy itself talks to upstreams directly
            env.pop(var, None)
        if self.resolve is not None:
            env[RESOLVE_ENV_VAR] = json.dumps(self.resolve)
        self._proc = subprocess.Popen(
            self.command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the proxy
        )
        _LIVE.add(self)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._open_streams = 2
        for name, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr)):
            t = threading.Thread(
                target=self._pump, args=(stream, name), name=f"drawdown-{name}", daemon=True
            )
            t.start()
            self._readers.append(t)
        self._await_ready()
        return self

    def _pump(self, stream: Any, name: str) -> None:
        prefix = "" if name == "stdout" else "[stderr] "
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._cond:
                    self._lines.append(prefix + line)
                    self._cond.notify_all()
        finally:
            stream.close()
            with self._cond:
                self._open_streams -= 1
                self._cond.notify_all()

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        patterns = [_READY_RE] if self.ready == "drawdown" else [_READY_RE, _MITM_READY_RE]
        with self._cond:
            while True:
                for pattern in patterns:
                    for line in self._lines:
                        m = pattern.search(line)
                        if m:
                            self.host = (m.group("host") or self.listen_host).strip("[]")
                            self.port = int(m.group("port"))
                            return
                if self._open_streams == 0:  # the process closed its output: it is gone
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        assert self._proc is not None
        if self._open_streams == 0:  # output closed: the exit status follows shortly
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        exited = self._proc.poll() is not None
        if not exited:
            self.kill()
        else:
            self._finish()
        reason = (
            f"exited with code {self.returncode}"
            if exited
            else f"printed no readiness line ({self.ready}) within {self.startup_timeout:.0f} s"
        )
        raise DrawdownStartupError(
            f"drawdown proxy {reason}.\ncommand: {' '.join(self.command)}\n"
            f"--- output ---\n{self.log_text()}"
        )

    # ------------------------------------------------------------------ addresses

    @property
    def address(self) -> tuple[str, int]:
        if self.host is None or self.port is None:
            raise RuntimeError("the proxy is not running")
        return self.host, self.port

    def proxy_url_for(self, auth: ProxyAuth | None = None) -> str:
        """The proxy URL, with `user:password@` when `auth` is given."""
        host, port = self.address
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if auth is not None:
            user, password = auth
            netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{netloc}"
        return f"http://{netloc}"

    @property
    def proxy_url(self) -> str:
        """http://[user:pass@]HOST:PORT (credentials from `proxy_auth`)."""
        return self.proxy_url_for(self.proxy_auth)

    @property
    def ca_path(self) -> Path:
        """mitmproxy's CA certificate (the one clients must trust)."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    # ------------------------------------------------------------------ client side

    def ssl_context(self, *, trust_upstream: bool = False) -> ssl.SSLContext:
        """Client context trusting only the proxy's CA (plus the stand-in CA if asked)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        if trust_upstream and self.upstream_ca is not None:
            ctx.load_verify_locations(cafile=self.upstream_ca)
        return ctx

    def ca_bundle(self, *, trust_upstream: bool = False) -> Path:
        """A PEM bundle file with the proxy CA (and the stand-in CA if asked)."""
        parts = [self.ca_path.read_text()]
        if trust_upstream and self.upstream_ca is not None:
            parts.append(Path(self.upstream_ca).read_text())
        suffix = "-with-upstream" if trust_upstream else ""
        path = self.confdir / f"client-bundle{suffix}.pem"
        path.write_text("\n".join(p.strip() + "\n" for p in parts))
        return path

    def client_env(
        self,
        base: Mapping[str, str] | None = None,
        *,
        proxy_auth: ProxyAuth | None = None,
        trust_upstream: bool = False,
    ) -> dict[str, str]:
        """Environment for an unmodified agent subprocess routed through this proxy.

        HTTPS_PROXY/HTTP_PROXY (both cases) point here; NO_PROXY is removed so loopback
        upstreams are proxied too; SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE,
        NODE_EXTRA_CA_CERTS and AWS_CA_BUNDLE name a bundle holding only the proxy CA; SSL_CERT_DIR is
        dropped so nothing else is trusted (the stand-in's CA is the proxy's business).
        """
        env = dict(os.environ if base is None else base)
        for var in (*_PROXY_ENV_VARS, "SSL_CERT_DIR"):
            env.pop(var, None)
        url = self.proxy_url_for(proxy_auth if proxy_auth is not None else self.proxy_auth)
        bundle = str(self.ca_bundle(trust_upstream=trust_upstream))
        env.update(
            {
                "HTTPS_PROXY": url,
                "HTTP_PROXY": url,
                "https_proxy": url,
                "http_proxy": url,
                "SSL_CERT_FILE": bundle,
                "REQUESTS_CA_BUNDLE": bundle,
                "CURL_CA_BUNDLE": bundle,
                "NODE_EXTRA_CA_CERTS": bundle,
                "AWS_CA_BUNDLE": bundle,
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _client_kwargs(self, proxy_auth: ProxyAuth | None) -> dict[str, Any]:
        auth = proxy_auth if proxy_auth is not None else self.proxy_auth
        return {"verify": self.ssl_context(), "proxy": self.proxy_url_for(auth)}

    def openai_client(
        self, base_url: str | None = None, *, proxy_auth: ProxyAuth | None = None, **kw: Any
    ) -> Any:
        """openai.OpenAI through this proxy (base_url defaults to https://api.openai.com/v1)."""
        return clients.openai_client(base_url, **self._client_kwargs(proxy_auth), **kw)

    def async_openai_client(
        self, base_url: str | None = None, *, proxy_auth: ProxyAuth | None = None, **kw: Any
    ) -> Any:
        return clients.async_openai_client(base_url, **self._client_kwargs(proxy_auth), **kw)

    def anthropic_client(
        self, base_url: str | None = None, *, proxy_auth: ProxyAuth | None = None, **kw: Any
    ) -> Any:
        """anthropic.Anthropic through this proxy (base_url defaults to api.anthropic.com)."""
        return clients.anthropic_client(base_url, **self._client_kwargs(proxy_auth), **kw)

    def async_anthropic_client(
        self, base_url: str | None = None, *, proxy_auth: ProxyAuth | None = None, **kw: Any
    ) -> Any:
        return clients.async_anthropic_client(base_url, **self._client_kwargs(proxy_auth), **kw)

    def bedrock_client(self, *, proxy_auth: ProxyAuth | None = None, **kw: Any) -> Any:
        """boto3's bedrock-runtime client for us-east-1 through this proxy, trusting its CA."""
        auth = proxy_auth if proxy_auth is not None else self.proxy_auth
        return clients.bedrock_runtime_client(
            verify=str(self.ca_bundle()), proxy=self.proxy_url_for(auth), **kw
        )

    def anthropic_bedrock_client(
        self, base_url: str | None = None, *, proxy_auth: ProxyAuth | None = None, **kw: Any
    ) -> Any:
        """anthropic.AnthropicBedrock (us-east-1) through this proxy."""
        return clients.anthropic_bedrock_client(base_url, **self._client_kwargs(proxy_auth), **kw)

    def genai_client(
        self, base_url: str | None = None, *, proxy_auth: ProxyAuth | None = None, **kw: Any
    ) -> Any:
        """google.genai.Client through this proxy (generativelanguage.googleapis.com)."""
        return clients.genai_client(base_url, **self._client_kwargs(proxy_auth), **kw)

    def http_client(self, *, proxy_auth: ProxyAuth | None = None, **kw: Any) -> Any:
        """A plain httpx2.Client through this proxy, for tool-API calls."""
        import httpx2

        return httpx2.Client(trust_env=False, **self._client_kwargs(proxy_auth), **kw)

    # ------------------------------------------------------------------ logs

    def log_lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def log_text(self) -> str:
        return "\n".join(self.log_lines())

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        """Block until a log line matches `pattern` (regex); return the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(self._lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._open_streams == 0:
                    raise AssertionError(
                        f"no proxy log line matched {regex.pattern!r}\n--- output ---\n"
                        + "\n".join(self._lines)
                    )
                self._cond.wait(remaining)

    # ------------------------------------------------------------------ control

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def reload_policy(self, text: str) -> None:
        """Rewrite the policy file (atomically, same path) and make sure its mtime moves."""
        path = self.policy_path
        if path.is_dir():
            raise ValueError("policy is a folder; write its files directly")
        before = path.stat().st_mtime_ns if path.exists() else 0
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        after = path.stat().st_mtime_ns
        if after <= before:  # coarse timestamps: a watcher comparing mtimes must see a change
            os.utime(path, ns=(before + 1_000_000, before + 1_000_000))

    def stop(self, timeout: float = 20.0, *, check: bool = True) -> int:
        """SIGTERM, wait; SIGKILL and fail when it outlives `timeout` or exits non-zero."""
        proc = self._proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self._finish()
                raise AssertionError(
                    f"drawdown proxy did not exit within {timeout:.0f} s of SIGTERM; killed.\n"
                    f"--- output ---\n{self.log_text()}"
                ) from None
        self._finish()
        rc = proc.returncode
        already = self._stopped  # a test that stopped it itself has already judged its status
        self._stopped = True
        if check and rc != 0 and not self._killed and not already:
            raise AssertionError(
                f"drawdown proxy exited with code {rc} after SIGTERM (expected 0).\n"
                f"--- output ---\n{self.log_text()}"
            )
        return rc

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for an exit the test has set off itself (no signal sent); its status."""
        proc = self._proc
        assert proc is not None
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"drawdown proxy still running after {timeout:.0f} s.\n"
                f"--- output ---\n{self.log_text()}"
            ) from None
        return self.stop(check=False)

    def kill(self) -> None:
        """SIGKILL (a crash, for lease/hold recovery tests)."""
        proc = self._proc
        self._killed = True
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._finish()

    def _finish(self) -> None:
        if self._proc is not None:
            self.returncode = self._proc.returncode
        for t in self._readers:
            t.join(5)

    # ------------------------------------------------------------------ ledger

    def ledger(self) -> sqlite3.Connection:
        """Read-only sqlite3 connection to the ledger (plain path or sqlite:/// URL).

        Rows are plain tuples. `with proxy.ledger() as db:` closes the connection at the
        end of the block (a bare sqlite3 connection would stay open and leak).
        """
        path = (
            self.db_path.removeprefix("sqlite:///")
            if self.db_path.startswith("sqlite:")
            else self.db_path
        )
        if "://" in path:
            raise ValueError(f"not a SQLite ledger: {self.db_path}")
        return sqlite3.connect(
            f"file:{quote(os.path.abspath(path))}?mode=ro",
            uri=True,
            timeout=10,
            factory=_LedgerConnection,
        )

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Run one read-only query on the ledger; rows as tuples."""
        with self.ledger() as db:
            return db.execute(sql, params).fetchall()

    def wait_for_query(
        self,
        sql: str,
        *params: object,
        until: Callable[[list[tuple[Any, ...]]], bool] = bool,
        timeout: float = 10.0,
    ) -> list[tuple[Any, ...]]:
        """Re-run `sql` until `until(rows)` holds; return those rows.

        The proxy commits after the upstream response ends, which can be just after the
        client has returned (an SDK stops reading at `data: [DONE]`); wait for the ledger
        rather than sleeping.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                rows = self.query(sql, *params)
            except sqlite3.OperationalError:  # ledger not created yet, or busy
                rows = []
            if until(rows):
                return rows
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"ledger query never satisfied within {timeout:.0f} s: {sql}\nlast rows: {rows}"
                )
            time.sleep(0.02)  # SQLite offers no change notification; poll the condition

    def __enter__(self) -> DrawdownProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.is_running():
            self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.returncode}"
        return f"<DrawdownProcess {self.mode} {self.host}:{self.port} {state}>"


def assert_ledger_verifies(db: str | Path, *, settled: bool = True) -> None:
    """`drawdown verify` finds the ledger's invariants intact (every hold settled, with `settled`)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "drawdown",
            "verify",
            "--db",
            str(db),
            *(["--settled"] if settled else []),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
