"""drawdown: runtime authority for AI agents, as a mitmproxy addon."""

__version__ = "0.1.0"
