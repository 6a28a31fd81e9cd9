"""Test infrastructure: a stand-in upstream speaking the providers' wire formats over TLS,
and a harness that runs a real `drawdown run` process (see tests/conftest.py for fixtures)."""

from .proxy import DrawdownProcess, DrawdownStartupError
from .recorded import Recorded, load_recorded, recorded_names
from .standin import LoggedRequest, Reply, StandIn
from .tls import TlsMaterial, make_tls_material
from .wire import DEFAULT_REPLY_TEXT, expected_input_tokens

__all__ = [
    "DEFAULT_REPLY_TEXT",
    "DrawdownProcess",
    "DrawdownStartupError",
    "LoggedRequest",
    "Recorded",
    "Reply",
    "StandIn",
    "TlsMaterial",
    "expected_input_tokens",
    "load_recorded",
    "make_tls_material",
    "recorded_names",
]
