"""Entry point for plain mitmproxy: `mitmdump -s addon/drawdown/mitm.py --set drawdown_policy=…`."""

import logging
import sys
from pathlib import Path

from mitmproxy import exceptions

try:
    from drawdown import addon
except ImportError:  # run from a checkout without `pip install`: the package sits next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from drawdown import addon
from drawdown.master import WireBytesRedaction

log = logging.getLogger("drawdown")


class Drawdown(addon.Drawdown):
    """drawdown's addon, with a user's mistake at start-up said in its own lines.

    mitmproxy logs any error a script raises while it loads with the script's traceback (a
    missing `drawdown_policy`, a policy's `FILE:LINE: message` lines under six of Python's);
    `drawdown run` says these without one. Logged as an error, it still stops mitmdump."""

    def configure(self, updated: set[str]) -> None:
        try:
            super().configure(updated)
        except exceptions.OptionsError as exc:
            if self._running:  # a change made while serving: mitmproxy refuses it, keeps the old
                raise
            log.error(str(exc))


# WireBytesRedaction: mitmproxy logs the raw bytes of a request it cannot parse (its query's
# API keys, its headers); `drawdown run` redacts them in its own terminal log, mitmdump here.
addons = [Drawdown(), WireBytesRedaction()]
