"""Entry point for plain mitmproxy: `mitmdump -s addon/drawdown/mitm.py --set drawdown_policy=…`."""

import sys
from pathlib import Path

try:
    from drawdown.addon import Drawdown
except ImportError:  # run from a checkout without `pip install`: the package sits next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from drawdown.addon import Drawdown
from drawdown.master import WireBytesRedaction

# WireBytesRedaction: mitmproxy logs the raw bytes of a request it cannot parse (its query's
# API keys, its headers); `drawdown run` redacts them in its own terminal log, mitmdump here.
addons = [Drawdown(), WireBytesRedaction()]
