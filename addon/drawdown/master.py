"""The mitmproxy master behind `drawdown run`: mitmdump's addons, dispatched in a few groups.

mitmproxy's AddonManager delivers every event to every addon in its chain, each inside its
own `safecall` context manager and coroutine, and after each flow event makes a second pass
with an `update` event. With mitmdump's thirty-odd addons that dispatch was about a third of
drawdown's CPU per request (benchmarks/HISTORY.md), most of it on addons with nothing to do. Nested
addons (an addon's `addons` attribute, mitmproxy's own convention, as ScriptLoader uses it)
are found by one traversal inside their parent's single dispatch. So this master nests
mitmdump's addons under a few parents: every addon, option and command is still there, in
mitmdump's order, and an event costs five dispatches instead of thirty-seven.

A group's members never change, so the hooks each event reaches in it are looked up once
and kept (`GroupedAddonManager`): mitmproxy would otherwise walk the group and `getattr`
every member for each of the ~8 events of a request. And the `update` pass mitmproxy makes
after each flow event (four per request) is skipped while no addon has an `update` hook.

What a group gives up: a hook that raises skips the later members of its group for that
event (the error is logged as before). mitmproxy's own addons don't raise in normal
operation; user scripts might, so ScriptLoader keeps a chain entry of its own, and drawdown
heads its own group.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from mitmproxy import addonmanager, ctx, flow, hooks, master, options
from mitmproxy import addons as mitmproxy_addons
from mitmproxy.addons import errorcheck, keepserving, readfile, termlog
from mitmproxy.addons.script import ScriptLoader

from .recording import CREDENTIAL_SHAPES, REDACTED, redact_path


class AddonGroup:
    """A parent for addons that are dispatched together: one chain entry for all of them.

    Its members are fixed: none may have children of its own (ScriptLoader's change as
    scripts load, which is why it keeps its own chain entry), so their hooks can be cached."""

    def __init__(self, name: str, members: list[Any]) -> None:
        dynamic = [type(m).__name__ for m in members if hasattr(m, "addons")]
        if dynamic:
            raise ValueError(f"addons with children of their own cannot join a group: {dynamic}")
        self.name = name  # the AddonManager looks addons up by name; two groups need two
        self.addons = members
        self.hooks: dict[str, list[tuple[Any, Any]]] = {}


_UPDATE = hooks.UpdateHook([])


class GroupedAddonManager(addonmanager.AddonManager):
    """mitmproxy's AddonManager, with each group's hooks per event looked up once."""

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        """As mitmproxy's, less the `update` pass after a flow event when no addon has that hook
        (none of mitmdump's has; a user script may)."""
        message = event.args()[0]
        await self.trigger_event(event)
        if isinstance(message, flow.Flow) and self._anyone_has(_UPDATE):
            await self.trigger_event(hooks.UpdateHook([message]))

    def _anyone_has(self, event: hooks.Hook) -> bool:
        return any(True for entry in self.chain for _ in self._iter_hooks(entry, event))

    def _iter_hooks(self, addon: Any, event: hooks.Hook) -> Any:
        if not isinstance(addon, AddonGroup):
            return super()._iter_hooks(addon, event)
        found = addon.hooks.get(event.name)
        if found is None:
            found = addon.hooks[event.name] = list(super()._iter_hooks(addon, event))
        return found


class _ConnectionChatter(logging.Filter):
    """mitmproxy's lines for each connection opened and closed (two a connection), at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        return not isinstance(message, str) or not (
            message in ("client connect", "client disconnect")
            or message.startswith(("server connect ", "server disconnect "))
        )


_CHATTER = _ConnectionChatter()  # one for the process: the logger is the process's too

# A bytes literal as mitmproxy quotes one (`{line!r}`), and the line breaks in it as `repr`
# writes them.
_QUOTED = re.compile(r"(?<![\w'\"])b(?:'(?:[^'\\]|\\.)*'" r'|"(?:[^"\\]|\\.)*")')
_LINE_BREAK = re.compile(r"\\r\\n|\\n")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST = re.compile(r"[A-Za-z0-9.\-]+(?::[0-9]+)?|\[[0-9A-Fa-f:.]+\](?::[0-9]+)?")
_PLAIN_WORD = re.compile(r"[A-Za-z][A-Za-z\-]{0,39}")  # kept before a line's redacted rest
_START_LINE = re.compile(r"(?P<method>\S+)(?P<gap>\s+)(?P<target>.*?)(?P<version>\s+HTTP/\S*)?")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)?(?P<userinfo>[^/?#@\s]*)@")
_SHAPED = re.compile(rf"(?<![A-Za-z0-9_\-])(?:{CREDENTIAL_SHAPES})\S*")


def _redact_target(target: str) -> str:
    """A request target with its user info's password, credentials in its path, every query
    value and anything after a space in it redacted (`http://u:[redacted]@host/p?key=[redacted]`)."""
    target, space, _ = target.partition(" ")
    if space:
        return f"{_redact_target(target)} {REDACTED}"
    head, question, query = target.partition("?")
    found = _USERINFO.match(head)
    if found is not None:
        userinfo = found["userinfo"]
        user = f"{userinfo.split(':', 1)[0]}:{REDACTED}" if ":" in userinfo else REDACTED
        head = f"{found['scheme'] or ''}{user}@{head[found.end() :]}"
    scheme, slashes, rest = head.partition("://")
    if slashes:
        authority, slash, path = rest.partition("/")
        head = f"{scheme}://{authority}{redact_path(slash + path) if slash else ''}"
    else:
        head = redact_path(head)
    if question:
        pairs = (pair.partition("=") for pair in query.split("&"))
        query = "&".join(f"{n}={REDACTED}" if eq else (REDACTED if n else "") for n, eq, _ in pairs)
    return f"{head}{question}{query}"


def _redact_header_line(line: str) -> str:
    """`Name: [redacted]`; a line without a name (what mitmproxy could not read) keeps at most a
    first plain word (`broken [redacted]`)."""
    name, colon, value = line.partition(":")
    if name.lower() == "host" and _HOST.fullmatch(value.strip()):
        return line
    if colon and _HEADER_NAME.fullmatch(name):
        return f"{name}:{' ' if value.startswith(' ') else ''}{REDACTED}" if value else line
    word, gap, rest = line.partition(" ")
    if gap and rest and _PLAIN_WORD.fullmatch(word):
        return f"{word} {REDACTED}"
    return REDACTED if line else line


def _redact_quoted(quoted: str, header_line: bool) -> str:
    """A bytes literal mitmproxy quoted from the wire, fit for the log: its request or status
    line keeps the method, host, path and parameter names; its header lines their names; a
    body after them (data from a server) is left out."""
    lines = _LINE_BREAK.split(quoted[2:-1])
    breaks = _LINE_BREAK.findall(quoted[2:-1])
    out = []
    for index, line in enumerate(lines):
        if header_line or index > 0:
            if not line and index < len(lines) - 1:  # the blank line: a body follows
                out.append(line)
                if "".join(lines[index + 1 :]):
                    out.append(REDACTED)
                    breaks = breaks[: index + 1]
                break
            out.append(_redact_header_line(line))
        else:
            start = _START_LINE.fullmatch(line)
            if start is not None and start["target"]:
                line = (
                    f"{start['method']}{start['gap']}{_redact_target(start['target'])}"
                    f"{start['version'] or ''}"
                )
            out.append(_SHAPED.sub(REDACTED, line))
    joined = out[0] + "".join(b + line for b, line in zip(breaks, out[1:], strict=False))
    return f"{quoted[:2]}{joined}{quoted[-1]}"


def redact_wire_bytes(message: str) -> str:
    """`message` with the raw bytes mitmproxy quotes in it (`Bad HTTP request line: b'…'`,
    `Invalid header line: b'…'`, `Client closed connection before completing request headers:
    b'…'`) redacted: a client's query values, user info, header values and credentials."""
    if "b'" not in message and 'b"' not in message:
        return message
    return _QUOTED.sub(
        lambda found: _redact_quoted(
            found.group(0), message[: found.start()].endswith("Invalid header line: ")
        ),
        message,
    )


class _WireBytes(logging.Filter):
    """Redacts the bytes mitmproxy's proxy server quotes from a request it cannot parse (at
    INFO): they carry the client's query string, user info and headers, so its API keys."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # one that cannot be formatted is logging's to report, as it does
            return True
        redacted = redact_wire_bytes(text)
        if redacted != text:
            record.msg, record.args = redacted, ()
        return True


WIRE_BYTES = _WireBytes()
SERVER_LOGGER = "mitmproxy.proxy.server"


class WireBytesRedaction:
    """An addon for plain mitmdump (`-s addon/drawdown/mitm.py`): the same redaction of the bytes
    mitmproxy's server quotes in its log as `drawdown run` installs (its TermLog)."""

    def load(self, loader: Any) -> None:
        logging.getLogger(SERVER_LOGGER).addFilter(WIRE_BYTES)

    def done(self) -> None:
        logging.getLogger(SERVER_LOGGER).removeFilter(WIRE_BYTES)


class TermLog(termlog.TermLog):
    """mitmproxy's terminal log, as `drawdown run` wants it for a service: without mitmproxy's
    "client connect", "server disconnect …" lines, so that at the default verbosity it shows
    what happened (drawdown's denials, reloads, ledger trouble; mitmproxy's warnings and failed
    connections) rather than burying it. termlog_verbosity=warn, the other way to be rid of
    them, hid every denial too. termlog_verbosity=debug brings them back."""

    name = "termlog"  # mitmdump's addon, in its place

    def load(self, loader: Any) -> None:
        super().load(loader)
        # At every verbosity: a client's secrets in what mitmproxy quotes of a bad request.
        logging.getLogger(SERVER_LOGGER).addFilter(WIRE_BYTES)
        # At the default verbosity, which no configure event reports unless it is set.
        logging.getLogger("mitmproxy.proxy.server").addFilter(_CHATTER)

    def configure(self, updated: set[str]) -> None:
        super().configure(updated)
        if "termlog_verbosity" in updated:
            logger = logging.getLogger("mitmproxy.proxy.server")
            if ctx.options.termlog_verbosity == "debug":
                logger.removeFilter(_CHATTER)
            else:
                logger.addFilter(_CHATTER)

    def uninstall(self) -> None:
        logging.getLogger("mitmproxy.proxy.server").removeFilter(_CHATTER)
        logging.getLogger(SERVER_LOGGER).removeFilter(WIRE_BYTES)
        super().uninstall()


class DrawdownMaster(master.Master):
    """mitmdump without its flow printer (drawdown logs its own lines) or its per-connection
    lines (TermLog), then `tail`."""

    def __init__(self, opts: options.Options, tail: list[Any]) -> None:
        super().__init__(opts, with_termlog=False)
        self.addons = GroupedAddonManager(self)  # before any addon registers with the manager
        self._termlog_addon = TermLog()
        self.addons.add(self._termlog_addon)
        defaults = [
            *mitmproxy_addons.default_addons(),
            keepserving.KeepServing(),
            readfile.ReadFileStdin(),
            errorcheck.ErrorCheck(),
        ]
        at = next(i for i, addon in enumerate(defaults) if isinstance(addon, ScriptLoader))
        self.addons.add(
            AddonGroup("mitmproxy-core", defaults[:at]),
            defaults[at],
            AddonGroup("mitmproxy-more", defaults[at + 1 :]),
            AddonGroup("drawdown-group", tail),
        )
