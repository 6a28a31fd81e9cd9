"""End-to-end tests: official SDK clients -> a real `drawdown run` process -> the stand-in.

The fixtures live in tests/conftest.py (shared with the harness self-tests in
tests/unit/support):

* `standin`        the stand-in upstream (one server per session, reset for every test)
* `upstream_ca`    the CA the proxy trusts for upstream TLS
* `tmp_db`         a ledger path in the test's temp dir
* `drawdown_proxy` factory: drawdown_proxy(policy_yaml_or_path, **options) -> DrawdownProcess,
                   stopped with SIGTERM (must exit 0) at teardown, its output attached to
                   the report of a failing test

Every test collected under tests/e2e is marked `e2e` (select with -m e2e / -m "not e2e").
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)
