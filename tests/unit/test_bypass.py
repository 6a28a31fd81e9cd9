"""NO_PROXY entries that send a provider's calls around the proxy (drawdown.bypass), as the
agents' HTTP stacks read them."""

from __future__ import annotations

import fnmatch
from urllib.request import proxy_bypass_environment

import pytest
from drawdown import bypass

# Hosts of each pattern, as agents call them.
HOSTS = (
    "api.openai.com",
    "acme-prod.openai.azure.com",
    "acme.cognitiveservices.azure.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "us-central1-aiplatform.googleapis.com",
    "europe-west4-aiplatform.googleapis.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
    "bedrock-runtime.eu-central-1.amazonaws.com",
    "bedrock-runtime-fips.us-gov-west-1.amazonaws.com",
    "api.groq.com",
    "openrouter.ai",
)
# NO_PROXY entries seen in base images, CI and the docs of cloud proxies.
ENTRIES = (
    "localhost", "127.0.0.1", "::1", "169.254.169.254", ".svc", ".cluster.local", ".internal",
    "s3.amazonaws.com", ".s3.us-east-1.amazonaws.com", ".eks.amazonaws.com", "sts.amazonaws.com",
    ".amazonaws.com", "amazonaws.com", "us-east-1.amazonaws.com", ".eu-central-1.amazonaws.com",
    "bedrock-runtime.us-east-1.amazonaws.com", "storage.googleapis.com", ".googleapis.com",
    "googleapis.com", "us-central1-aiplatform.googleapis.com", "aiplatform.googleapis.com",
    "openai.com", "api.openai.com", "azure.com", ".openai.azure.com", "acme-prod.openai.azure.com",
    "blob.core.windows.net", "anthropic.com", "com", "groq.com", "example.com",
)  # fmt: skip


def _pattern_of(host: str) -> str:
    return next(p for p in bypass.PROVIDER_HOSTS if fnmatch.fnmatch(host, p))


@pytest.mark.parametrize("entry", ENTRIES)
def test_an_entry_python_would_bypass_a_providers_host_for_is_found(entry: str) -> None:
    """Every provider host that Python's own NO_PROXY matching sends around the proxy for this
    entry is found (and only those: none for an entry that covers no provider's host)."""
    skipped = {_pattern_of(h) for h in HOSTS if proxy_bypass_environment(h, {"no": entry})}
    found = {pattern for _, pattern in bypass.exempted(entry)}
    assert skipped <= found
    if not skipped:
        assert found == set(), f"{entry} covers no provider host Python would bypass"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("*", set(bypass.PROVIDER_HOSTS)),
        # Other stacks' spellings: undici and Go take `*.domain`, and a host with its port.
        ("*.openai.com", {"api.openai.com"}),
        ("api.openai.com:443", {"api.openai.com"}),
        (" API.Anthropic.com , ,localhost", {"api.anthropic.com"}),
        # One region's domain covers its Bedrock endpoint; a service's domain does not.
        ("us-west-2.amazonaws.com", {"bedrock-runtime.*.amazonaws.com", "bedrock-runtime-fips.*.amazonaws.com"}),
        ("s3.amazonaws.com,.s3.us-west-2.amazonaws.com,ec2.us-west-2.amazonaws.com", set()),
        # A host of a pattern names itself.
        ("bedrock-runtime.ap-south-1.amazonaws.com", {"bedrock-runtime.*.amazonaws.com"}),
        ("my-res.openai.azure.com", {"*.openai.azure.com"}),
        ("asia-northeast1-aiplatform.googleapis.com", {"*-aiplatform.googleapis.com"}),
        ("storage.googleapis.com,oauth2.googleapis.com", set()),
        # A port other than the APIs' skips the proxy for that port alone; a trailing dot is
        # the same name.
        ("api.openai.com:8443,api.groq.com:80,api.anthropic.com:443", {"api.anthropic.com"}),
        (".amazonaws.com.", {"bedrock-runtime.*.amazonaws.com", "bedrock-runtime-fips.*.amazonaws.com"}),
        ("::1,[::1]:8080,fd00::/8,10.0.0.0/8", set()),
    ],
)  # fmt: skip
def test_entries_as_other_stacks_spell_them(value: str, expected: set[str]) -> None:
    assert {pattern for _, pattern in bypass.exempted(value)} == expected


def test_aws_regions_come_from_botocore() -> None:
    regions = bypass._aws_regions()
    assert {"us-east-1", "eu-central-1", "us-gov-west-1"} <= set(regions)
    assert "s3" not in regions


def test_only_a_regions_domain_reads_botocores_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading botocore's endpoint data cost `drawdown env` ~0.5 s for any NO_PROXY at all."""

    def regions() -> tuple[str, ...]:
        raise AssertionError("botocore's regions read for an entry under no AWS domain")

    monkeypatch.setattr(bypass, "_aws_regions", regions)
    assert bypass.exempted("localhost,127.0.0.1,.svc,.cluster.local,api.openai.com") == [
        ("api.openai.com", "api.openai.com")
    ]
