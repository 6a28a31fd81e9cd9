"""Official SDK clients wired to a given trust anchor and, optionally, an HTTP proxy.

All three SDKs installed here use `httpx2`. Each builder passes the SDK's own default
http client class (so SDK defaults for timeouts, limits and redirects stay), with
`verify=<ssl.SSLContext>` and `proxy=<url>` explicit and `trust_env=False`, so the test
runner's own HTTPS_PROXY / NO_PROXY / SSL_CERT_FILE cannot change where a call goes.
Base URLs default to the real provider URLs: through a DrawdownProcess those host names
are redirected to the stand-in (see mitm_resolve.py).
"""

from __future__ import annotations

import ssl
from typing import Any

import anthropic
import openai
from google import genai
from google.genai import types as genai_types

from . import wire

OPENAI_BASE_URL = "https://api.openai.com/v1"
ANTHROPIC_BASE_URL = "https://api.anthropic.com"
GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/"
BEDROCK_REGION = "us-east-1"  # boto3 and AnthropicBedrock then call wire.BEDROCK_HOST

#: Dummy credentials: the stand-in accepts anything; the proxy must never log them.
OPENAI_TEST_KEY = "sk-test-standin-openai-key"
ANTHROPIC_TEST_KEY = "sk-ant-test-standin-key"
GEMINI_TEST_KEY = "test-standin-gemini-key"


def _http_kwargs(verify: ssl.SSLContext, proxy: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"verify": verify, "trust_env": False}
    if proxy is not None:
        kwargs["proxy"] = proxy
    return kwargs


def openai_client(
    base_url: str | None = None,
    *,
    verify: ssl.SSLContext,
    proxy: str | None = None,
    api_key: str = OPENAI_TEST_KEY,
    http2: bool = False,
    **kwargs: Any,
) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=api_key,
        base_url=base_url or OPENAI_BASE_URL,
        http_client=openai.DefaultHttpxClient(**_http_kwargs(verify, proxy), http2=http2),
        **kwargs,
    )


def async_openai_client(
    base_url: str | None = None,
    *,
    verify: ssl.SSLContext,
    proxy: str | None = None,
    api_key: str = OPENAI_TEST_KEY,
    **kwargs: Any,
) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=api_key,
        base_url=base_url or OPENAI_BASE_URL,
        http_client=openai.DefaultAsyncHttpxClient(**_http_kwargs(verify, proxy)),
        **kwargs,
    )


def anthropic_client(
    base_url: str | None = None,
    *,
    verify: ssl.SSLContext,
    proxy: str | None = None,
    api_key: str = ANTHROPIC_TEST_KEY,
    **kwargs: Any,
) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=api_key,
        base_url=base_url or ANTHROPIC_BASE_URL,
        http_client=anthropic.DefaultHttpxClient(**_http_kwargs(verify, proxy)),
        **kwargs,
    )


def async_anthropic_client(
    base_url: str | None = None,
    *,
    verify: ssl.SSLContext,
    proxy: str | None = None,
    api_key: str = ANTHROPIC_TEST_KEY,
    **kwargs: Any,
) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key=api_key,
        base_url=base_url or ANTHROPIC_BASE_URL,
        http_client=anthropic.DefaultAsyncHttpxClient(**_http_kwargs(verify, proxy)),
        **kwargs,
    )


def genai_client(
    base_url: str | None = None,
    *,
    verify: ssl.SSLContext,
    proxy: str | None = None,
    api_key: str = GEMINI_TEST_KEY,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> genai.Client:
    # google-genai builds its own httpx2 clients from client_args/async_client_args;
    # `verify` there wins over its SSL_CERT_FILE handling.
    http_args = _http_kwargs(verify, proxy)
    return genai.Client(
        api_key=api_key,
        vertexai=False,
        http_options=genai_types.HttpOptions(
            base_url=base_url or GEMINI_BASE_URL,
            headers=headers,
            client_args=dict(http_args),
            async_client_args=dict(http_args),
        ),
        **kwargs,
    )


def bedrock_runtime_client(
    endpoint_url: str | None = None,
    *,
    verify: str,
    proxy: str | None = None,
    attempts: int = 3,
    **kwargs: Any,
) -> Any:
    """boto3's `bedrock-runtime` client, signing with the stand-in's test credentials. boto3
    takes a CA bundle path (not an SSLContext) and its proxies from its Config; its standard
    retry mode, as boto3 ships it, with `attempts` attempts in all."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "bedrock-runtime",
        region_name=BEDROCK_REGION,
        endpoint_url=endpoint_url,
        aws_access_key_id=wire.AWS_ACCESS_KEY_ID,
        aws_secret_access_key=wire.AWS_SECRET_ACCESS_KEY,
        verify=verify,
        config=Config(
            proxies={"https": proxy} if proxy else {},
            retries={"mode": "standard", "total_max_attempts": attempts},
        ),
        **kwargs,
    )


def anthropic_bedrock_client(
    base_url: str | None = None,
    *,
    verify: ssl.SSLContext,
    proxy: str | None = None,
    **kwargs: Any,
) -> anthropic.AnthropicBedrock:
    """anthropic.AnthropicBedrock (InvokeModel for Claude), SigV4-signed with the test credentials."""
    return anthropic.AnthropicBedrock(
        aws_region=BEDROCK_REGION,
        aws_access_key=wire.AWS_ACCESS_KEY_ID,
        aws_secret_key=wire.AWS_SECRET_ACCESS_KEY,
        base_url=base_url,
        http_client=anthropic.DefaultHttpxClient(**_http_kwargs(verify, proxy)),
        **kwargs,
    )
