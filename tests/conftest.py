"""Shared fixtures: TLS material, the stand-in upstream, and drawdown proxy processes.

Used by tests/e2e (the end-to-end suite) and tests/unit/support (self-tests of the
stand-in and the harness). Import helpers as `from tests.support import Reply, ...`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

# `tests.support` must import under plain `pytest` too, not only `python -m pytest`.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.proxy import DrawdownProcess, ProxyAuth  # noqa: E402
from tests.support.standin import StandIn  # noqa: E402
from tests.support.tls import DEFAULT_NAMES, TlsMaterial, make_tls_material  # noqa: E402

_PROCS = pytest.StashKey[list[DrawdownProcess]]()
_DEFAULT: Any = object()


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A throwaway CA + server certificate for the stand-in (ca.pem, server.pem, server-key.pem)."""
    return make_tls_material(tmp_path_factory.mktemp("standin-tls"))


@pytest.fixture(scope="session")
def upstream_ca(tls_material: TlsMaterial) -> Path:
    """The CA the proxy must trust for upstream TLS (`ssl_verify_upstream_trusted_ca`)."""
    return tls_material.ca_cert


@pytest.fixture(scope="session")
def standin_server(tls_material: TlsMaterial) -> Iterator[StandIn]:
    """The session's stand-in upstream; tests use `standin`, which resets it."""
    server = StandIn(tls_material).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def standin(standin_server: StandIn) -> Iterator[StandIn]:
    """The stand-in upstream with an empty log, no scripts and default replies."""
    standin_server.reset()
    yield standin_server
    standin_server.reset()


def standin_resolve(standin: StandIn, names: Sequence[str] = DEFAULT_NAMES) -> dict:
    """DrawdownProcess `resolve` mapping: every certificate name (but loopback) to the stand-in."""
    hosts = [n for n in names if n not in ("localhost", "127.0.0.1", "::1")]
    return {
        "tls": {h: standin.host_port for h in hosts},
        "plain": {h: standin.http_host_port for h in hosts},
    }


@pytest.fixture
def tmp_db(tmp_path: Path) -> Path:
    """A ledger path in the test's temp dir (not created)."""
    return tmp_path / "drawdown.db"


@pytest.fixture
def drawdown_proxy(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tmp_db: Path,
    standin: StandIn,
    upstream_ca: Path,
) -> Iterator[Callable[..., DrawdownProcess]]:
    """Factory: start a drawdown proxy process; all are stopped (SIGTERM, exit 0) at teardown.

    drawdown_proxy(policy, *, db=tmp_db, confdir=tmp_path/"confdir", extra_args=(),
                   mode="run" | "mitmdump", mitm_script=None, proxy_auth=None,
                   resolve=<provider + example hosts -> stand-in>, env=None, start=True,
                   startup_timeout=60, ready=None | "drawdown" | "mitmproxy")

    Processes of one test share the ledger file and the confdir (hence the CA) unless
    told otherwise. Their output is attached to the report of a failing test.
    """
    procs: list[DrawdownProcess] = []
    request.node.stash[_PROCS] = procs

    def factory(
        policy: str | Path,
        *,
        db: str | Path | None = None,
        confdir: str | Path | None = None,
        extra_args: Sequence[str] = (),
        mode: str = "run",
        mitm_script: str | Path | None = None,
        proxy_auth: ProxyAuth | None = None,
        resolve: Mapping[str, Mapping[str, str]] | None = _DEFAULT,
        env: Mapping[str, str] | None = None,
        start: bool = True,
        startup_timeout: float = 60.0,
        ready: str | None = None,
    ) -> DrawdownProcess:
        proc = DrawdownProcess(
            policy,
            db if db is not None else tmp_db,
            confdir if confdir is not None else tmp_path / "confdir",
            extra_args,
            upstream_ca,
            mode=mode,  # type: ignore[arg-type]
            mitm_script=mitm_script,
            resolve=standin_resolve(standin) if resolve is _DEFAULT else resolve,
            proxy_auth=proxy_auth,
            env=env,
            startup_timeout=startup_timeout,
            ready=ready,  # type: ignore[arg-type]
            start=False,
        )
        procs.append(proc)  # registered first, so a failed start still shows its log
        if start:
            proc.start()
        return proc

    yield factory

    errors = []
    for proc in reversed(procs):
        try:
            proc.stop()
        except AssertionError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for i, proc in enumerate(item.stash.get(_PROCS, []), 1):
            # Stop it now (teardown would anyway) so its output is complete; teardown still
            # checks the exit code.
            with contextlib.suppress(AssertionError):
                proc.stop(check=False)
            title = f"drawdown proxy #{i} ({proc.mode}, pid {proc.pid}) output"
            report.sections.append((title, proc.log_text() or "(no output)"))
    return report
