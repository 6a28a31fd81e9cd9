"""The proxy's CA as a fleet ships it: the public certificate to agents on other hosts or pods
(a ConfigMap), the CA and its key to the proxy as a read-only Kubernetes Secret.

`drawdown env` in an agent pod must trust the proxy's CA, never one of its own; `drawdown run`
must serve from a CA it may read but not write beside. Each test ends in a real TLS call
through the proxy from an agent whose shell only ran `eval "$(drawdown env …)"`.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from drawdown.cacerts import ensure_ca

from tests.conftest import standin_resolve
from tests.support.proxy import DrawdownProcess
from tests.support.standin import StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]
POLICY = "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
AGENT = """
import openai
client = openai.OpenAI(api_key="sk-test-agent", max_retries=0)
client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
print("ok")
"""
# Mount the folder ($0) read-only for the command ("$@") alone, in a mount namespace of its own.
_READ_ONLY_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], list[str]]]:
    """Makes a folder read-only, as a Secret or ConfigMap volume is, for a command run under the
    argv prefix it returns. Root ignores a folder's mode, so root gets a read-only bind mount
    in a mount namespace of its own (skipped where that is not allowed); anyone else, the mode."""
    made: list[Path] = []

    def make(folder: Path) -> list[str]:
        if os.geteuid() != 0:
            folder.chmod(0o555)
            made.append(folder)
            return []
        prefix = ["unshare", "--mount", "sh", "-c", _READ_ONLY_MOUNT, str(folder)]
        probe = folder / ".probe"
        if not shutil.which("unshare"):
            pytest.skip("root needs unshare(1) for a read-only folder")
        tried = subprocess.run([*prefix, "touch", str(probe)], capture_output=True, text=True)
        if tried.returncode == 0 or "Read-only file system" not in tried.stderr:
            probe.unlink(missing_ok=True)
            pytest.skip(f"no read-only bind mount here: {tried.stderr.strip()}")
        return prefix

    yield make
    for folder in made:
        folder.chmod(0o755)


def agent_call(
    tmp_path: Path, proxy: DrawdownProcess, env_flags: list[str], prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """An agent whose shell ran `eval "$(drawdown env ENV_FLAGS …)"` and nothing else, then
    called the OpenAI API; prints `ok` when the call went through (its TLS trusted)."""
    host, port = proxy.address
    env = f"{sys.executable} -m drawdown env {' '.join(env_flags)} --listen {host}:{port}"
    script = (
        f'exports="$({env})" && eval "$exports" '
        f'&& unset NO_PROXY no_proxy SSL_CERT_DIR && exec {sys.executable} -c "$AGENT"'
    )
    home = tmp_path / "agent-home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [*prefix, "bash", "-c", script],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "AGENT": AGENT},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("source", "pod_read_only"),
    [("confdir", False), ("confdir", True), ("ca-cert", True)],
)
def test_an_agent_pod_given_only_the_certificate_trusts_the_proxy(
    drawdown_proxy: Factory,
    standin: StandIn,
    tmp_path: Path,
    read_only: Callable[[Path], list[str]],
    source: str,
    pod_read_only: bool,
) -> None:
    """An agent pod holding only the proxy's mitmproxy-ca-cert.pem (a ConfigMap) ran `drawdown
    env --confdir` there: exit 0 and not a word, but env had made a CA of its own over the
    shipped certificate, and every TLS call through the proxy failed."""
    proxy = drawdown_proxy(POLICY)
    pod = tmp_path / "pod"
    pod.mkdir()
    shipped = proxy.ca_path.read_bytes()
    (pod / "mitmproxy-ca-cert.pem").write_bytes(shipped)
    prefix = read_only(pod) if pod_read_only else []
    flags = (
        ["--confdir", str(pod)]
        if source == "confdir"
        else ["--ca-cert", str(pod / "mitmproxy-ca-cert.pem")]
    )
    result = agent_call(tmp_path, proxy, flags, prefix)
    assert result.stdout == "ok\n", result.stderr
    assert (pod / "mitmproxy-ca-cert.pem").read_bytes() == shipped
    assert not (pod / "mitmproxy-ca.pem").exists()  # no CA of its own, no key
    cache = tmp_path / "agent-home" / ".cache" / "drawdown"
    if source == "confdir" and pod_read_only:  # the bundle went to the cache, and env said so
        assert result.stderr.startswith(f"drawdown: {pod} cannot take the agents' CA bundle (")
        assert result.stderr.count("\n") == 1 and str(cache) in result.stderr
    else:
        assert result.stderr == ""
    assert (pod / "drawdown-ca-bundle.pem").exists() == (not pod_read_only)
    assert cache.exists() == pod_read_only


def test_an_agent_without_the_certificate_is_told_where_it_is(tmp_path: Path) -> None:
    """No certificate: one line naming where it is, and nothing made."""
    pod = tmp_path / "pod"
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", "env", "--confdir", str(pod)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.startswith(f"drawdown: no CA certificate in {pod}: the proxy's host ")
    assert "mitmproxy-ca-cert.pem" in result.stderr and "--ca-cert FILE" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not pod.exists()


class _Prefixed(DrawdownProcess):
    """A proxy run under an argv prefix (the read-only mount)."""

    prefix: Sequence[str] = ()

    @property
    def command(self) -> list[str]:
        return [*self.prefix, *super().command]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_proxy_serves_from_a_read_only_secret_holding_only_the_ca(
    standin: StandIn,
    upstream_ca: Path,
    tmp_path: Path,
    read_only: Callable[[Path], list[str]],
    workers: int,
) -> None:
    """A read-only confdir holding only mitmproxy-ca.pem (a Kubernetes Secret) stopped `drawdown
    run` with "the CA … cannot be read (Read-only file system); move its mitmproxy-ca*.pem
    files away to mint a new CA": the CA was readable, mitmproxy only wanted to write beside
    it, and following the advice would have changed the CA of the whole fleet."""
    made = tmp_path / "made"
    ensure_ca(made)
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(made / "mitmproxy-ca.pem", secret / "mitmproxy-ca.pem")
    (secret / "mitmproxy-ca.pem").chmod(0o600)
    agents_cert = tmp_path / "configmap" / "mitmproxy-ca-cert.pem"
    agents_cert.parent.mkdir()
    shutil.copy(made / "mitmproxy-ca-cert.pem", agents_cert)
    private = tmp_path / "tmp"
    private.mkdir()
    proxy = _Prefixed(
        POLICY,
        tmp_path / "drawdown.db",
        secret,
        ["--workers", str(workers)] if workers > 1 else [],
        upstream_ca,
        resolve=standin_resolve(standin),
        env={"TMPDIR": str(private)},
        start=False,
    )
    proxy.prefix = read_only(secret)
    try:
        proxy.start()
        # mitmproxy loads a private copy of the CA: folder 0700, key 0600. (Beside it under
        # --workers: the supervisor's metrics folder.)
        (copy,) = private.glob("drawdown-ca-*")
        assert stat.S_IMODE(copy.stat().st_mode) == 0o700
        assert stat.S_IMODE((copy / "mitmproxy-ca.pem").stat().st_mode) == 0o600
        result = agent_call(tmp_path, proxy, ["--ca-cert", str(agents_cert)])
        assert result.stdout == "ok\n", result.stderr + proxy.log_text()
    finally:
        proxy.stop()
    log = proxy.log_text()
    assert f"drawdown: warning: cannot write the agents' CA bundle in {secret} (" in log
    assert "move its" not in log and "mint" not in log
    assert sorted(p.name for p in secret.iterdir()) == ["mitmproxy-ca.pem"]
    assert list(private.iterdir()) == []  # the copy is gone with the proxy
