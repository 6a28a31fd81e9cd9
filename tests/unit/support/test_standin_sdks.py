"""The official SDKs accept the stand-in's output and see the usage it reported.

Every endpoint is driven directly (no proxy) with openai, anthropic and google-genai,
trusting only the stand-in's CA.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support import clients, wire
from tests.support.standin import StandIn
from tests.support.wire import DEFAULT_REPLY_TEXT, expected_input_tokens

REPLY_WORDS = len(DEFAULT_REPLY_TEXT.split())
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three primary colours please"},
]
PROMPT_WORDS = 3 + 5  # words in MESSAGES' contents (roles do not count)


@pytest.fixture
def openai_direct(standin: StandIn):
    client = clients.openai_client(standin.url + "/v1", verify=standin.ssl_context())
    yield client
    client.close()


@pytest.fixture
def anthropic_direct(standin: StandIn):
    client = clients.anthropic_client(standin.url, verify=standin.ssl_context())
    yield client
    client.close()


@pytest.fixture
def genai_direct(standin: StandIn):
    client = clients.genai_client(standin.url, verify=standin.ssl_context())
    yield client
    client.close()


# ---------------------------------------------------------------------------- OpenAI


def test_openai_chat_json(standin: StandIn, openai_direct) -> None:
    r = openai_direct.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    entry = standin.wait_for("/v1/chat/completions")
    assert r.choices[0].message.content == DEFAULT_REPLY_TEXT
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (PROMPT_WORDS, REPLY_WORDS)
    assert r.usage.prompt_tokens == expected_input_tokens("openai.chat", entry.json)
    assert entry.usage["prompt_tokens"] == r.usage.prompt_tokens
    assert entry.usage["completion_tokens"] == r.usage.completion_tokens
    assert (entry.input_tokens, entry.output_tokens) == (PROMPT_WORDS, REPLY_WORDS)
    assert standin.last_usage == entry.usage
    assert entry.header("authorization") == f"Bearer {clients.OPENAI_TEST_KEY}"


def test_openai_chat_stream_without_include_usage(standin: StandIn, openai_direct) -> None:
    chunks = list(
        openai_direct.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == DEFAULT_REPLY_TEXT
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # no usage-only chunk the client never asked for
    entry = standin.last()
    assert entry.usage is None  # nothing reported upstream...
    assert entry.output_tokens == REPLY_WORDS  # ...though the stand-in knows what it sent
    assert b'"usage"' not in entry.response_body


def test_openai_chat_stream_with_include_usage(standin: StandIn, openai_direct) -> None:
    chunks = list(
        openai_direct.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == PROMPT_WORDS
    assert chunks[-1].usage.completion_tokens == REPLY_WORDS
    assert standin.last().usage == chunks[-1].usage.model_dump(exclude_none=True)


def test_openai_chat_max_tokens_truncates(standin: StandIn, openai_direct) -> None:
    r = openai_direct.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_completion_tokens=3
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    assert r.choices[0].message.content == " ".join(DEFAULT_REPLY_TEXT.split()[:3])


def test_openai_async_chat_json_and_stream(standin: StandIn) -> None:
    async def main() -> tuple[int, int]:
        client = clients.async_openai_client(standin.url + "/v1", verify=standin.ssl_context())
        async with client:
            r = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            stream = await client.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            last = None
            async for chunk in stream:
                last = chunk
            assert last is not None and last.usage is not None
            return r.usage.total_tokens, last.usage.total_tokens

    json_total, stream_total = asyncio.run(main())
    assert json_total == stream_total == PROMPT_WORDS + REPLY_WORDS
    assert standin.count("/v1/chat/completions") == 2


def test_openai_responses_json(standin: StandIn, openai_direct) -> None:
    r = openai_direct.responses.create(
        model="gpt-4o-mini", instructions="Be brief.", input="Say hello to the world"
    )
    assert r.output_text == DEFAULT_REPLY_TEXT
    assert r.status == "completed"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (2 + 5, REPLY_WORDS)
    assert standin.last().usage["input_tokens"] == r.usage.input_tokens


def test_openai_responses_stream(standin: StandIn, openai_direct) -> None:
    with openai_direct.responses.stream(model="gpt-4o-mini", input="Say hello") as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.in_progress" in types
    assert types.count("response.output_text.delta") == REPLY_WORDS
    assert final.output_text == DEFAULT_REPLY_TEXT
    assert (final.usage.input_tokens, final.usage.output_tokens) == (2, REPLY_WORDS)
    assert standin.last().usage == final.usage.model_dump(exclude_none=True)


def test_openai_responses_stream_incomplete(standin: StandIn, openai_direct) -> None:
    events = list(
        openai_direct.responses.create(
            model="gpt-4o-mini", input="Say hello", max_output_tokens=2, stream=True
        )
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage.output_tokens == 2


def test_openai_embeddings_base64_and_float(standin: StandIn, openai_direct) -> None:
    # The SDK asks for base64 unless told otherwise and decodes it itself.
    r = openai_direct.embeddings.create(model="text-embedding-3-small", input=["a b c", "d"])
    f = openai_direct.embeddings.create(
        model="text-embedding-3-small", input=["a b c", "d"], encoding_format="float"
    )
    assert [d.embedding for d in r.data] == [d.embedding for d in f.data]
    assert len(r.data) == 2 and len(r.data[0].embedding) == 8
    assert r.usage.prompt_tokens == r.usage.total_tokens == 4
    assert standin.requests[0].json["encoding_format"] == "base64"


def test_openai_legacy_completions_and_models(standin: StandIn, openai_direct) -> None:
    r = openai_direct.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi now")
    assert r.choices[0].text == DEFAULT_REPLY_TEXT
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, REPLY_WORDS)
    chunks = list(
        openai_direct.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="Say hi now",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == REPLY_WORDS
    assert "gpt-4o-mini" in [m.id for m in openai_direct.models.list()]


def test_openai_azure_deployment(standin: StandIn) -> None:
    import openai

    client = openai.AzureOpenAI(
        api_key="azure-test-key",
        api_version="2024-10-21",
        azure_endpoint=standin.url,
        http_client=openai.DefaultHttpxClient(verify=standin.ssl_context(), trust_env=False),
    )
    with client:
        r = client.chat.completions.create(model="my-deployment", messages=MESSAGES)
    entry = standin.last()
    assert entry.path == "/openai/deployments/my-deployment/chat/completions"
    assert "api-version=2024-10-21" in entry.query
    assert entry.header("api-key") == "azure-test-key"
    assert r.usage.prompt_tokens == PROMPT_WORDS


# ---------------------------------------------------------------------------- Anthropic


def test_anthropic_messages_json(standin: StandIn, anthropic_direct) -> None:
    m = anthropic_direct.messages.create(
        model="claude-haiku-4-5",
        max_tokens=256,
        system="You are terse.",
        messages=[{"role": "user", "content": "Name three primary colours please"}],
    )
    assert m.content[0].text == DEFAULT_REPLY_TEXT
    assert m.stop_reason == "end_turn"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (PROMPT_WORDS, REPLY_WORDS)
    entry = standin.last()
    assert entry.usage["input_tokens"] == m.usage.input_tokens
    # anthropic 2.x sends the API key as a bearer token, not x-api-key.
    assert entry.header("authorization") == f"Bearer {clients.ANTHROPIC_TEST_KEY}"
    assert entry.header("anthropic-version")


def test_anthropic_messages_stream_helper(standin: StandIn, anthropic_direct) -> None:
    with anthropic_direct.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=256,
        messages=[{"role": "user", "content": "Name three primary colours please"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == DEFAULT_REPLY_TEXT
    assert (final.usage.input_tokens, final.usage.output_tokens) == (5, REPLY_WORDS)
    assert standin.last().usage["output_tokens"] == REPLY_WORDS


def test_anthropic_stream_truncated_by_max_tokens(standin: StandIn, anthropic_direct) -> None:
    with anthropic_direct.messages.stream(
        model="claude-haiku-4-5", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 4


def test_anthropic_count_tokens(standin: StandIn, anthropic_direct) -> None:
    r = anthropic_direct.messages.count_tokens(
        model="claude-haiku-4-5",
        system="You are terse.",
        messages=[{"role": "user", "content": "Name three primary colours please"}],
    )
    assert r.input_tokens == PROMPT_WORDS
    assert standin.last().path == "/v1/messages/count_tokens"
    assert standin.last().usage is None  # counting is not a billed call


def test_anthropic_async_stream(standin: StandIn) -> None:
    async def main() -> int:
        client = clients.async_anthropic_client(standin.url, verify=standin.ssl_context())
        async with (
            client,
            client.messages.stream(
                model="claude-haiku-4-5",
                max_tokens=100,
                messages=[{"role": "user", "content": "hello there"}],
            ) as stream,
        ):
            final = await stream.get_final_message()
        return final.usage.output_tokens

    assert asyncio.run(main()) == REPLY_WORDS


# ---------------------------------------------------------------------------- Gemini


def test_gemini_generate_content(standin: StandIn, genai_direct) -> None:
    r = genai_direct.models.generate_content(
        model="gemini-2.5-flash", contents="Name three primary colours please"
    )
    assert r.text == DEFAULT_REPLY_TEXT
    um = r.usage_metadata
    assert (um.prompt_token_count, um.candidates_token_count) == (5, REPLY_WORDS)
    assert um.total_token_count == 5 + REPLY_WORDS
    entry = standin.last()
    assert entry.path.endswith("/models/gemini-2.5-flash:generateContent")
    assert entry.header("x-goog-api-key") == clients.GEMINI_TEST_KEY
    assert entry.usage["candidatesTokenCount"] == REPLY_WORDS


def test_gemini_generate_content_stream(standin: StandIn, genai_direct) -> None:
    chunks = list(
        genai_direct.models.generate_content_stream(
            model="gemini-2.5-flash", contents="Name three primary colours please"
        )
    )
    assert "".join(c.text for c in chunks) == DEFAULT_REPLY_TEXT
    # usageMetadata is cumulative: the last chunk carries the totals.
    counts = [c.usage_metadata.candidates_token_count for c in chunks]
    assert counts == list(range(1, REPLY_WORDS + 1))
    assert chunks[-1].usage_metadata.prompt_token_count == 5
    entry = standin.last()
    assert entry.query == "alt=sse"
    assert entry.usage == {
        "promptTokenCount": 5,
        "candidatesTokenCount": REPLY_WORDS,
        "totalTokenCount": 5 + REPLY_WORDS,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 5}],
    }


def test_gemini_async_and_count_tokens(standin: StandIn, genai_direct) -> None:
    async def main() -> int:
        # The aio client pools connections per event loop: close it inside this loop.
        async with genai_direct.aio as aio:
            r = await aio.models.generate_content(model="gemini-2.5-flash", contents="one two")
        return r.usage_metadata.total_token_count

    assert asyncio.run(main()) == 2 + REPLY_WORDS
    counted = genai_direct.models.count_tokens(model="gemini-2.5-flash", contents="one two three")
    assert counted.total_tokens == 3


# ---------------------------------------------------------------------------- overrides


def test_usage_override_is_reported_verbatim(standin: StandIn, openai_direct) -> None:
    standin.set_usage(input_tokens=12_345, output_tokens=40)
    r = openai_direct.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_completion_tokens=5
    )
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (12_345, 40)
    assert len(r.choices[0].message.content.split()) == 40
    r2 = openai_direct.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        extra_headers={"x-standin-output-tokens": "2"},
    )
    assert r2.usage.completion_tokens == 2  # a header beats the sticky override


# ---------------------------------------------------------------------------- Amazon Bedrock


@pytest.fixture
def bedrock_direct(standin: StandIn):
    return clients.bedrock_runtime_client(standin.url, verify=standin.ca_path)


BEDROCK_MESSAGES = [{"role": "user", "content": [{"text": "Name three primary colours please"}]}]


def test_bedrock_converse_and_stream(standin: StandIn, bedrock_direct) -> None:
    model = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    r = bedrock_direct.converse(
        modelId=model, messages=BEDROCK_MESSAGES, system=[{"text": "Be terse."}]
    )
    assert r["output"]["message"]["content"][0]["text"] == DEFAULT_REPLY_TEXT
    assert r["usage"] == {
        "inputTokens": 7,
        "outputTokens": REPLY_WORDS,
        "totalTokens": 7 + REPLY_WORDS,
    }
    assert standin.last().path == f"/model/{model}/converse"
    events = list(
        bedrock_direct.converse_stream(
            modelId=model, messages=BEDROCK_MESSAGES, inferenceConfig={"maxTokens": 3}
        )["stream"]
    )
    deltas = [e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e]
    assert deltas == ["This", " is", " a"]
    assert events[-2] == {"messageStop": {"stopReason": "max_tokens"}}
    assert events[-1]["metadata"]["usage"] == {
        "inputTokens": 5,
        "outputTokens": 3,
        "totalTokens": 8,
    }


def test_bedrock_claude_invoke_with_anthropic_bedrock(standin: StandIn) -> None:
    with clients.anthropic_bedrock_client(standin.url, verify=standin.ssl_context()) as client:
        message = client.messages.create(
            model="anthropic.claude-3-5-haiku-20241022-v1:0",
            max_tokens=50,
            messages=[{"role": "user", "content": "one two three"}],
        )
        with client.messages.stream(
            model="global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            max_tokens=2,
            messages=[{"role": "user", "content": "one two"}],
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, REPLY_WORDS)
    assert (text, final.usage.input_tokens, final.usage.output_tokens) == ("This is", 2, 2)
    assert standin.last().header("content-type") is not None
    assert standin.last().status == 200


def test_bedrock_refuses_a_request_its_signature_does_not_cover(standin: StandIn) -> None:
    """As Bedrock: one signed byte changed on the way (or a wrong secret) is a 403."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=standin.url,
        aws_access_key_id=wire.AWS_ACCESS_KEY_ID,
        aws_secret_access_key="not-the-secret",
        verify=standin.ca_path,
    )
    with pytest.raises(ClientError) as caught:
        client.converse(modelId="amazon.nova-pro-v1:0", messages=BEDROCK_MESSAGES)
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"
    signed = clients.bedrock_runtime_client(standin.url, verify=standin.ca_path)

    def tamper(request, **_: object) -> None:  # after signing: a proxy rewriting the body
        request.data = request.body.replace(b"three", b"four")
        request.headers["Content-Length"] = str(len(request.data))

    signed.meta.events.register_last("before-send.bedrock-runtime.Converse", tamper)
    with pytest.raises(ClientError) as caught:
        signed.converse(modelId="amazon.nova-pro-v1:0", messages=BEDROCK_MESSAGES)
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"
