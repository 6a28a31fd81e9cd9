"""`./scripts/standin`: the tests' stand-in upstream, for a reader following the README's week.

Starts `StandIn` (the providers' formats over TLS, synthetic usage) with a fresh test CA, and
prints what the shell that starts `drawdown run` needs: the DRAWDOWN_TEST_RESOLVE mapping that
tests/support/mitm_resolve.py reads, and the `--set` flags that load it and trust the CA. The
proxy still sees the real host names (policies, certificates, the ledger); only its TCP
connections go to the stand-in. Runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path

from tests.conftest import standin_resolve
from tests.support import mitm_resolve
from tests.support.standin import StandIn
from tests.support.tls import make_tls_material

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="scripts/standin",
        description="The tests' stand-in upstream (OpenAI, Anthropic, Gemini, Bedrock, tools) "
        "over TLS on loopback: prints what the shell that starts `drawdown run` needs to send "
        "its connections there. Runs until Ctrl-C or SIGTERM.",
    ).parse_args(argv)  # --help, and no argument taken silently
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="drawdown-standin-") as folder:
        tls = make_tls_material(folder)
        standin = StandIn(tls).start()
        resolve = standin_resolve(standin, tls.names)  # as the tests' proxies resolve
        hosts = list(resolve["tls"])
        script = ROOT / "tests" / "support" / "mitm_resolve.py"
        print(f"stand-in upstream on {standin.host_port} (TLS) and {standin.http_host_port}")
        print(f"answering as {', '.join(hosts)}")
        print("in the shell that starts drawdown run:")
        print(f"  export {mitm_resolve.ENV_VAR}={shlex.quote(json.dumps(resolve))}")
        print(
            f"  drawdown run … --set scripts={shlex.quote(str(script))} "
            f"--set ssl_verify_upstream_trusted_ca={shlex.quote(str(tls.ca_cert))}"
        )
        print("Ctrl-C stops it", flush=True)
        try:
            stop.wait()
        finally:
            standin.stop()
            print(f"stand-in stopped after {len(standin.requests)} request(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
