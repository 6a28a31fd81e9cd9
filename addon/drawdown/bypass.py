"""Which providers' API hosts an agent's NO_PROXY sends around the proxy.

`drawdown env` leaves NO_PROXY as the shell has it (the agent's own services stay direct), but
an entry that covers a provider's host makes every call to it bypass drawdown: unseen and
unbudgeted. HTTP stacks read the variable differently: Python and curl match an entry as a
host or a domain suffix (`.amazonaws.com` and `amazonaws.com` alike), undici and Go also take
`*.example.com` and `host:port`. An entry counts here if any of them would skip the proxy for
a provider's host.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache

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
    for raw in value.split(","):
        entry = raw.strip().lower()
        port = _PORT.search(entry)
        if port and "]" not in entry and entry.count(":") == 1:  # not an IPv6 address
            if port.group(1) not in API_PORTS:
                continue
            entry = entry[: port.start()]
        entry = entry.removeprefix("*.").strip(".")
        if entry:
            yield entry


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
