"""The PostgreSQL test plugin (fixture `pg_url`, a summary when its tests were skipped)."""

from __future__ import annotations

import pytest

from tests import support_pg


def pytest_configure(config: pytest.Config) -> None:
    support_pg.register(config)
