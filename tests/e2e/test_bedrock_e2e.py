"""Amazon Bedrock end to end: a real `drawdown run`, boto3's `bedrock-runtime` client and the
anthropic SDK's AnthropicBedrock through HTTPS_PROXY, to bedrock-runtime.us-east-1.amazonaws.com
(the stand-in, which checks every SigV4 signature as Bedrock does: the proxy must not change a
signed byte). Metered with the usage Bedrock reports, priced as genai-prices prices `aws`,
refused in Bedrock's own error shape, which boto3 raises without retrying."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import anthropic
import certifi
import genai_prices
import pytest
from botocore.exceptions import ClientError
from drawdown.meter.prices import to_nanos

from tests.e2e.test_core_openai import run_under_env
from tests.support import wire
from tests.support.proxy import DrawdownProcess, ProxyAuth
from tests.support.standin import Reply, StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

POLICY = """
mode: enforce
identity:
  agent: [{{proxy_user: true}}, {{value: anonymous}}]
  run: [{{proxy_password: true}}, {{value: r0}}]
actions:
  - {{kind: llm, provider: bedrock, match: {{host: "bedrock-runtime.*.amazonaws.com"}}}}
budgets:
  - {budget}
"""
NOVA = "amazon.nova-pro-v1:0"
CLAUDE = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
CLAUDE_GLOBAL = "global.anthropic.claude-sonnet-4-5-20250929-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "Name three primary colours please"}]}]
AUTH: ProxyAuth = ("fleet", "run-1")


def ledger(proxy: DrawdownProcess, calls: int) -> list[tuple]:
    """(decision, status, provider, model, tokens_in, tokens_out, actual_usd, usage_source) of
    each call, once `calls` of them have settled (a stream settles after the SDK returned)."""
    return proxy.wait_for_query(
        "SELECT decision, status, provider, model, tokens_in, tokens_out, actual_usd, "
        "usage_source FROM decisions ORDER BY ts",
        until=lambda found: sum(r[1] is not None for r in found) >= calls,
    )


def aws_nanos(model: str, input_tokens: int, output_tokens: int) -> int:
    price = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens),
        model,
        provider_id="aws",
    )
    return to_nanos(price.total_price)


def test_boto3_converse_and_converse_stream_are_metered_and_charged(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY.format(budget='{scope: "agent:*", usd: 1.00}'))
    client = proxy.bedrock_client(proxy_auth=AUTH)
    reply = client.converse(modelId=NOVA, messages=MESSAGES, inferenceConfig={"maxTokens": 200})
    assert reply["output"]["message"]["content"][0]["text"] == wire.DEFAULT_REPLY_TEXT
    stream = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
    events = list(stream["stream"])
    text = "".join(
        e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e
    )
    assert text == wire.DEFAULT_REPLY_TEXT
    streamed_usage = next(e["metadata"]["usage"] for e in events if "metadata" in e)

    plain, streamed = standin.matching("/model/*")
    # The model id travels URL-encoded; the stand-in checked both signatures.
    assert (plain.path, plain.status) == (f"/model/{NOVA}/converse", 200)
    assert (streamed.path, streamed.status) == (f"/model/{CLAUDE}/converse-stream", 200)
    assert streamed_usage == streamed.usage
    rows = ledger(proxy, 2)
    expected = [
        ("allow", 200, "bedrock", model, entry.input_tokens, entry.output_tokens,
         aws_nanos(model, entry.input_tokens, entry.output_tokens), "usage")
        for model, entry in ((NOVA, plain), (CLAUDE, streamed))
    ]  # fmt: skip
    assert rows == expected
    ((spent,),) = proxy.query("SELECT spent_usd FROM budget_instances")
    assert spent == sum(row[6] for row in expected) > 0


def test_anthropic_bedrock_invoke_json_and_stream_are_metered_and_charged(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY.format(budget='{scope: "agent:*", usd: 1.00}'))
    with proxy.anthropic_bedrock_client(proxy_auth=AUTH) as client:
        message = client.messages.create(
            model=CLAUDE, max_tokens=100, messages=[{"role": "user", "content": "Hi there"}]
        )
        with client.messages.stream(
            model=CLAUDE_GLOBAL, max_tokens=100, messages=[{"role": "user", "content": "Hi again"}]
        ) as stream:
            streamed_text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert message.content[0].text == streamed_text == wire.DEFAULT_REPLY_TEXT
    plain, streamed = standin.matching("/model/*")
    assert (plain.path, streamed.path) == (
        f"/model/{CLAUDE}/invoke",
        f"/model/{CLAUDE_GLOBAL}/invoke-with-response-stream",
    )
    assert plain.status == streamed.status == 200  # signatures intact
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        streamed.input_tokens,
        streamed.output_tokens,
    )
    # Priced on the model id the path names (Bedrock's answer says only "claude-3-5-haiku-...").
    assert ledger(proxy, 2) == [
        ("allow", 200, "bedrock", model, entry.input_tokens, entry.output_tokens,
         aws_nanos(model, entry.input_tokens, entry.output_tokens), "usage")
        for model, entry in ((CLAUDE, plain), (CLAUDE_GLOBAL, streamed))
    ]  # fmt: skip


# InvokeModel bodies of other families, each in its own format (model id, body).
INVOKES = [
    (
        "global.amazon.nova-2-lite-v1:0",
        {
            "schemaVersion": "messages-v1",
            "system": [{"text": "Be brief."}],
            "messages": MESSAGES,
            "inferenceConfig": {"max_new_tokens": 200},
        },
    ),
    (
        "us.amazon.nova-2-lite-v1:0",  # the regional profile: another price
        {"messages": MESSAGES, "inferenceConfig": {"max_new_tokens": 200}},
    ),
    ("us.meta.llama3-2-11b-instruct-v1:0", {"prompt": "Name three colours", "max_gen_len": 300}),
    (
        "amazon.titan-text-express-v1",
        {"inputText": "Name three colours", "textGenerationConfig": {"maxTokenCount": 300}},
    ),
    # Its answer holds no usage: only Bedrock's headers and metrics can tell it.
    (
        "mistral.mistral-7b-instruct-v0:2",
        {"prompt": "<s>[INST] Colours? [/INST]", "max_tokens": 99},
    ),
]


def test_boto3_invoke_of_nova_llama_and_titan_is_metered_and_charged(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """boto3's invoke_model and invoke_model_with_response_stream, each family in its own body
    format: charged the genai-prices `aws` price of what Bedrock counted (the response headers,
    the stream's invocation metrics), on the model id the path names."""
    proxy = drawdown_proxy(POLICY.format(budget='{scope: "agent:*", usd: 1.00}'))
    client = proxy.bedrock_client(proxy_auth=AUTH)
    for model, body in INVOKES:
        reply = client.invoke_model(modelId=model, body=json.dumps(body))
        assert reply["ResponseMetadata"]["HTTPHeaders"]["x-amzn-bedrock-input-token-count"]
        answer = json.loads(reply["body"].read())
        streamed = client.invoke_model_with_response_stream(modelId=model, body=json.dumps(body))
        chunks = [json.loads(event["chunk"]["bytes"]) for event in streamed["body"]]
        assert "amazon-bedrock-invocationMetrics" in chunks[-1]
        text = "".join(
            c.get("generation") or c.get("outputText") or
            (c.get("contentBlockDelta") or {}).get("delta", {}).get("text", "") or
            (c.get("outputs") or [{}])[0].get("text", "")
            for c in chunks
        )  # fmt: skip
        assert text == wire.DEFAULT_REPLY_TEXT in json.dumps(answer)
    entries = standin.matching("/model/*")
    assert [(e.path, e.status) for e in entries] == [
        (f"/model/{model}/{op}", 200)
        for model, _ in INVOKES
        for op in ("invoke", "invoke-with-response-stream")
    ]  # every signature intact
    rows = ledger(proxy, len(entries))
    expected = [
        ("allow", 200, "bedrock", model, entry.input_tokens, entry.output_tokens,
         aws_nanos(model, entry.input_tokens, entry.output_tokens), "usage")
        for (model, _), entry in zip(
            [m for m in INVOKES for _ in (0, 1)], entries, strict=True
        )
    ]  # fmt: skip
    assert rows == expected
    assert rows[0][6] < rows[2][6]  # global. costs less than us. for the same usage
    ((spent,),) = proxy.query("SELECT spent_usd FROM budget_instances")
    assert spent == sum(row[6] for row in expected) > 0


def test_an_invoke_whose_input_count_header_is_not_a_number_is_charged_its_bodys_counts(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """An input count header that is not a number was read as 0 input tokens beside a good
    output count: the call charged its output only. Bedrock's counts are then not trusted and
    the Llama body's own are charged."""
    model = "us.meta.llama3-3-70b-instruct-v1:0"
    headers = {**wire.bedrock_token_headers(40, 12), "X-Amzn-Bedrock-Input-Token-Count": "4O"}
    answer = wire.llama_invoke_json(
        text=wire.DEFAULT_REPLY_TEXT, input_tokens=39, output_tokens=11, stop_reason="stop"
    )
    standin.script(
        "POST", f"/model/{model}/invoke", Reply(body=answer, headers=headers), label="bad header"
    )
    proxy = drawdown_proxy(POLICY.format(budget='{scope: "agent:*", usd: 1.00}'))
    client = proxy.bedrock_client(proxy_auth=AUTH)
    body = json.dumps({"prompt": "Write the report", "max_gen_len": 100})
    reply = client.invoke_model(modelId=model, body=body)
    assert json.loads(reply["body"].read())["generation"] == wire.DEFAULT_REPLY_TEXT
    (row,) = ledger(proxy, 1)
    assert row == ("allow", 200, "bedrock", model, 39, 11, aws_nanos(model, 39, 11), "usage")


def test_a_usd_budget_refuses_the_next_llama_invoke(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """Once the invokes Bedrock counted have spent the budget, the next one's reserve does not
    fit: a ClientError boto3 does not retry, and the stand-in never sees it."""
    model = "us.meta.llama3-3-70b-instruct-v1:0"  # $0.72/M in and out
    body = json.dumps({"prompt": "Write the report", "max_gen_len": 1000})
    proxy = drawdown_proxy(POLICY.format(budget='{scope: "agent:*", usd: 0.001}'))
    client = proxy.bedrock_client(proxy_auth=AUTH, attempts=3)
    standin.set_usage(input_tokens=300, output_tokens=1000)  # $0.000936 of $0.001
    client.invoke_model(modelId=model, body=body)["body"].read()
    with pytest.raises(ClientError) as caught:
        client.invoke_model_with_response_stream(modelId=model, body=body)
    error = caught.value.response
    assert (error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]) == (
        "ServiceQuotaExceededException",
        402,
    )
    assert error["ResponseMetadata"]["RetryAttempts"] == 0
    assert standin.count("/model/*") == 1
    rows = ledger(proxy, 2)
    assert [(r[0], r[1], r[4], r[5], r[6]) for r in rows] == [
        ("allow", 200, 300, 1000, aws_nanos(model, 300, 1000)),
        ("deny", 402, None, None, None),
    ]


def test_a_usd_budget_refuses_with_a_client_error_boto3_does_not_retry(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY.format(budget='{scope: "agent:*", usd: 0.000001}'))
    client = proxy.bedrock_client(proxy_auth=AUTH, attempts=5)
    with pytest.raises(ClientError) as caught:
        client.converse(modelId=NOVA, messages=MESSAGES)
    error = caught.value.response
    assert error["Error"]["Code"] == "ServiceQuotaExceededException"
    assert "budget agent:fleet usd" in error["Error"]["Message"]
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 402
    assert error["ResponseMetadata"]["RetryAttempts"] == 0
    assert standin.count("/model/*") == 0
    assert [(r[0], r[1]) for r in ledger(proxy, 1)] == [("deny", 402)]  # one attempt, no retry
    # AnthropicBedrock honours x-should-retry: false, as on Anthropic's own API.
    with (
        proxy.anthropic_bedrock_client(proxy_auth=AUTH) as bedrock_claude,
        pytest.raises(anthropic.APIStatusError) as refused,
    ):
        bedrock_claude.messages.create(
            model=CLAUDE, max_tokens=10, messages=[{"role": "user", "content": "Hi"}]
        )
    assert refused.value.status_code == 402
    assert [(r[0], r[1]) for r in ledger(proxy, 2)] == [("deny", 402)] * 2


def test_a_windowed_budgets_429_is_a_throttling_boto3_retries(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """An hourly budget spent: 429 + Retry-After, ThrottlingException, which boto3's standard
    mode retries (each attempt refused and recorded) before raising. (A call above the
    window's whole limit is a 402 instead: no retry would help.)"""
    proxy = drawdown_proxy(POLICY.format(budget='{scope: "agent:*", per: hour, requests: 1}'))
    client = proxy.bedrock_client(proxy_auth=AUTH, attempts=2)
    client.converse(modelId=NOVA, messages=MESSAGES)
    with pytest.raises(ClientError) as caught:
        client.converse(modelId=NOVA, messages=MESSAGES)
    error = caught.value.response
    assert (error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]) == (
        "ThrottlingException",
        429,
    )
    assert error["ResponseMetadata"]["RetryAttempts"] == 1
    assert [(r[0], r[1]) for r in ledger(proxy, 3)] == [("allow", 200)] + [("deny", 429)] * 2
    assert standin.count("/model/*") == 1


def test_an_unmodified_boto3_agent_uses_drawdown_env(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """botocore ignores SSL_CERT_FILE and reads AWS_CA_BUNDLE before REQUESTS_CA_BUNDLE: where
    the shell already names a bundle there (a corporate CA, here certifi's), every Bedrock
    call failed TLS verification unless `drawdown env` exports AWS_CA_BUNDLE too."""
    proxy = drawdown_proxy(POLICY.format(budget='{scope: "agent:*/run:*", requests: 1}'))
    agent = textwrap.dedent(
        f"""
        import boto3, botocore.exceptions
        client = boto3.client("bedrock-runtime", region_name="us-east-1")
        messages = [{{"role": "user", "content": [{{"text": "hi"}}]}}]
        try:
            for _ in range(2):
                client.converse(modelId="{NOVA}", messages=messages)
                print("ok", flush=True)
        except botocore.exceptions.ClientError as exc:
            print("denied", exc.response["Error"]["Code"], flush=True)
        """
    )
    result = run_under_env(
        proxy,
        tmp_path,
        f'{sys.executable} -c "$AGENT"',
        "--agent boto --run b1",
        AGENT=agent,
        AWS_ACCESS_KEY_ID=wire.AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=wire.AWS_SECRET_ACCESS_KEY,
        AWS_CA_BUNDLE=certifi.where(),  # the agent's own, before drawdown
    )
    assert result.stdout.split("\n")[:2] == ["ok", "denied ServiceQuotaExceededException"], (
        result.stdout + result.stderr
    )
    assert standin.count("/model/*") == 1
