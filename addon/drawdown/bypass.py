"""Which providers' API hosts an agent's NO_PROXY sends around the proxy.

`drawdown env` leaves NO_PROXY as the shell has it (the agent's own services stay direct), but
an entry that covers a provider's host makes every call to it bypass drawdown: unseen and
unbudgeted. HTTP stacks read the variable differently: Python and curl match an entry as a
host or a domain suffix (`.amazonaws.com` and `amazonaws.com` alike), undici and Go also take
`*.example.com` and `host:port`. An entry counts here if any of them would skip the proxy for
a provider's host.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from functools import cache

from .policy.match import HostPattern, glob_regex
from .policy.model import Policy

# The providers' API hosts drawdown meters, as host patterns: `*` stands for one label, or the
# part of one, that varies (an Azure resource, a Vertex or AWS region).
PROVIDER_HOSTS = (
    "api.openai.com",
    "*.openai.azure.com",
    "*.cognitiveservices.azure.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "*-aiplatform.googleapis.com",
    "bedrock-runtime.*.amazonaws.com",
    "bedrock-runtime-fips.*.amazonaws.com",
    "api.groq.com",
    "api.deepseek.com",
    "openrouter.ai",
)
# A port an entry names: undici and Go then skip the proxy for that port alone, so only the
# ports of the providers' APIs count.
_PORT = re.compile(r":(\d+)$")
API_PORTS = ("443",)  # every provider API is HTTPS on its default port


def entries(value: str) -> Iterator[str]:
    """A NO_PROXY value's entries, as a host or a domain: lower case, without a trailing dot,
    a leading `*.` or `.`, or an API port (`*` alone stays); an entry naming another port is
    left out."""
    for entry, port in entries_and_ports(value):
        if port is None or port in API_PORTS:
            yield entry


def entries_and_ports(value: str) -> Iterator[tuple[str, str | None]]:
    """Each entry (as entries() gives it; an IPv6 address without its brackets) and the port it
    names, if it names one."""
    for raw in value.split(","):
        entry, named = raw.strip().lower(), None
        if entry.startswith("["):  # [fd00::7] or [fd00::7]:8443, as Go reads them
            address, _, rest = entry[1:].partition("]")
            entry, named = address, (rest[1:] if rest[1:].isdigit() else None)
        elif (port := _PORT.search(entry)) and entry.count(":") == 1:  # not an IPv6 address
            named, entry = port.group(1), entry[: port.start()]
        entry = entry.removeprefix("*.").strip(".")
        if entry:
            yield entry, named


# The ports an action that names none is called on: an entry naming another port leaves it.
DEFAULT_PORTS = ("443", "80")


def actions_exempted(value: str, policy: Policy) -> list[tuple[str, str, str]]:
    """(entry, host pattern, `host (action kinds)`) for each host pattern of the policy's
    actions an entry of `value` covers: the tools an agent calls directly then go unchecked,
    their `deny`s and budgets too. A pattern of any host (`*`, `*.*`) is left out: an agent's
    own services are what NO_PROXY is for, and the policy's catch-all action does not name
    them. An entry naming a port covers an action of that port, or of none on 443 or 80."""
    kinds: dict[HostPattern, list[str]] = {}
    for action in policy.actions:
        for pattern in action.match.hosts:
            if not set(pattern.glob) <= set("*?."):
                kinds.setdefault(pattern, []).append(action.kind)
    found = []
    for entry, port in entries_and_ports(value):
        for pattern, named in kinds.items():
            if port is not None and (
                port not in DEFAULT_PORTS if pattern.port is None else int(port) != pattern.port
            ):
                continue  # the entry skips the proxy for another port than the action's
            if entry == "*" or _covers_glob(entry, pattern):
                kinds_named = ", ".join(dict.fromkeys(named))
                found.append((entry, pattern.text, f"{pattern.text} ({kinds_named})"))
    return found


def _covers_glob(entry: str, pattern: HostPattern) -> bool:
    """Whether some host `pattern` matches is `entry` or lies under it (a glob's `*` crosses
    dots: `api.*.corp.example` has hosts under `eu.corp.example`), or, for an address range
    (Go's and undici's `10.0.0.0/8`), whether the pattern's address lies in it."""
    if "/" in entry:
        try:
            return ipaddress.ip_address(pattern.glob) in ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False
    return pattern.host.match(entry) is not None or _may_end_in(pattern.glob, "." + entry)


def _may_end_in(glob: str, suffix: str) -> bool:
    """Whether some text `glob` matches ends in `suffix`: read from the end, each character of
    the suffix is one of the glob's, until a `*`, which takes the rest."""
    tokens: list[str] = []
    at = 0
    while at < len(glob):
        end = glob.find("]", at + 1) if glob[at] == "[" else -1
        tokens.append(glob[at : end + 1] if end != -1 else glob[at])
        at = end + 1 if end != -1 else at + 1
    for offset, char in enumerate(reversed(suffix)):
        if offset >= len(tokens):
            return False
        token = tokens[-1 - offset]
        if token == "*":
            return True
        if token != "?" and re.fullmatch(glob_regex(token), char) is None:
            return False
    return True


def exempted(value: str) -> list[tuple[str, str]]:
    """(entry, provider host pattern) for each pattern an entry of `value` covers."""
    found = []
    for entry in entries(value):
        for pattern in PROVIDER_HOSTS:
            if entry == "*" or covers(entry, pattern):
                found.append((entry, pattern))
    return found


def covers(entry: str, pattern: str) -> bool:
    """Whether a host of `pattern` is `entry` or lies under it."""
    if "*" not in pattern:
        return pattern == entry or pattern.endswith("." + entry)
    head, tail = pattern.split("*")
    if re.fullmatch(re.escape(head) + r"[a-z0-9-]+" + re.escape(tail), entry):
        return True  # a host of the pattern (a resource, a region) named itself
    # Under the domain every host of the pattern shares (`amazonaws.com`, `googleapis.com`).
    shared = tail[1:] if tail.startswith(".") else tail.partition(".")[2]
    if shared == entry or shared.endswith("." + entry):
        return True
    # Under one region's domain (`us-east-1.amazonaws.com`): the varying label is a region.
    # (Only such an entry reads botocore's regions: `env` stays quick for `localhost`.)
    return (
        head.endswith(".")
        and entry.endswith(tail)
        and any(
            f"{region}{tail}" == entry or f"{region}{tail}".endswith("." + entry)
            for region in _aws_regions()
        )
    )


@cache
def _aws_regions() -> tuple[str, ...]:
    """Every AWS region, from botocore's endpoint data (a dependency already: Bedrock's
    event-stream framing)."""
    import botocore.session

    session = botocore.session.get_session()
    return tuple(
        region
        for partition in session.get_available_partitions()
        for region in session.get_available_regions("ec2", partition_name=partition)
    )
