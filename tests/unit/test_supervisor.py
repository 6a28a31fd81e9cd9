"""The `--workers` supervisor's start-up duties, without starting a proxy."""

from pathlib import Path

from drawdown.workers import ensure_ca


def test_ensure_ca_creates_the_ca_once_so_every_worker_loads_the_same_one(tmp_path: Path) -> None:
    confdir = tmp_path / "confdir"
    ensure_ca(str(confdir))
    ca = confdir / "mitmproxy-ca.pem"
    first = ca.read_bytes()
    assert b"PRIVATE KEY" in first and (confdir / "mitmproxy-ca-cert.pem").exists()
    ensure_ca(str(confdir))  # a second start (or a worker) reuses it rather than minting another
    assert ca.read_bytes() == first
