"""The core proxy, end to end: a real `drawdown run`, the official openai SDK through HTTPS_PROXY,
a TLS stand-in for api.openai.com. Reserve before, commit after, deny without forwarding."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import genai_prices
import openai
import pytest
from drawdown.meter.openai_transcribe import AUDIO_TOKENS_PER_SECOND

from tests.support import wire
from tests.support.proxy import DrawdownProcess
from tests.support.standin import Reply, StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

POLICY = """
mode: {mode}
identity:
  tenant: [{{header: X-Drawdown-Tenant}}, {{value: acme}}]
  agent: [{{proxy_user: true}}, {{header: X-Drawdown-Agent}}, {{value: anonymous}}]
  run: [{{header: X-Drawdown-Run}}, {{proxy_password: true}}, {{idle_split: 300}}]
actions:
  - {{kind: llm, provider: openai, match: {{host: api.openai.com}}}}
budgets:
{budgets}
"""
MESSAGES = [{"role": "user", "content": "Say hello to the proxy."}]


def policy(budgets: str, mode: str = "enforce") -> str:
    return POLICY.format(mode=mode, budgets=textwrap.indent(budgets.strip(), "  "))


def rows(proxy: DrawdownProcess, sql: str, *params: object) -> list[tuple]:
    with proxy.ledger() as db:
        return db.execute(sql, params).fetchall()


def decision_of(proxy: DrawdownProcess, settled: int = 0) -> list[tuple]:
    """Decision rows; with `settled`, wait until that many have completed (a stream commits after the
    SDK has returned at `data: [DONE]`)."""
    sql = "SELECT decision, reason_code, status, tokens_in, tokens_out, usage_source, scope FROM decisions ORDER BY ts"
    if settled:
        return proxy.wait_for_query(
            sql, until=lambda found: sum(r[2] is not None for r in found) >= settled
        )
    return rows(proxy, sql)


def test_allowed_call_is_committed_with_the_upstreams_usage(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(policy('- {scope: "agent:*/run:*", usd: 1.00}'))
    with proxy.openai_client(
        default_headers={"X-Drawdown-Agent": "research", "X-Drawdown-Run": "r1"}
    ) as client:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=50
        )
    upstream = standin.wait_for("/v1/chat/completions")
    assert reply.usage.prompt_tokens == upstream.usage["prompt_tokens"]
    # Identity headers never leave the proxy.
    assert not [h for h in upstream.headers if h[0].lower().startswith("x-drawdown-")]
    assert upstream.header("proxy-authorization") is None
    ((decision, _reason, status, tokens_in, tokens_out, source, scope),) = decision_of(proxy)
    assert (decision, status, source, scope) == (
        "allow",
        200,
        "usage",
        "tenant:acme/agent:research/run:r1",
    )
    assert (tokens_in, tokens_out) == (
        upstream.usage["prompt_tokens"],
        upstream.usage["completion_tokens"],
    )
    ((spent_usd, spent_tokens, spent_requests, reserved_usd),) = rows(
        proxy, "SELECT spent_usd, spent_tokens, spent_requests, reserved_usd FROM budget_instances"
    )
    assert spent_tokens == tokens_in + tokens_out and spent_requests == 1 and reserved_usd == 0
    assert spent_usd > 0  # priced by genai-prices, in nano-dollars
    ((hold_state, hold_actual),) = rows(proxy, "SELECT state, actual_usd FROM holds")
    assert (hold_state, hold_actual) == ("committed", spent_usd)


def test_over_budget_call_gets_402_and_never_reaches_the_upstream(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(policy('- {scope: "agent:*/run:*", requests: 2}'))
    with proxy.openai_client(
        default_headers={"X-Drawdown-Agent": "a", "X-Drawdown-Run": "r"}
    ) as client:
        for _ in range(2):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    error = caught.value
    assert error.status_code == 402
    assert error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["x-drawdown-decision"] == "deny"
    assert error.response.headers["x-drawdown-reason"] == "budget_exhausted"
    body = error.response.json()["error"]
    assert (
        body["code"] == "budget_exhausted"
        and "budget agent:a/run:r requests 2 exhausted" in body["message"]
    )
    # The SDK did not retry (x-should-retry: false), and the denied call never left the proxy.
    assert standin.count("/v1/chat/completions") == 2
    assert [d[0] for d in decision_of(proxy)] == ["allow", "allow", "deny"]


def test_an_image_the_meter_cannot_price_is_still_a_request_and_a_step(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """Calls OpenAI bills other than per token (DALL·E images, files) passed through uncounted:
    no `requests` budget and no loop guard saw an agent generating images without end. They
    are counted now, at $0; listing the models, which costs nothing, is not. (GPT image
    models bill per token and are metered: see the test below; so are transcriptions.)"""
    image = {"created": 1764460800, "data": [{"url": "https://example.com/cat.png"}]}
    standin.script("POST", "/v1/images/generations", Reply(json=image), times=None)
    text = policy('- {scope: "agent:*/run:*", requests: 2}')
    proxy = drawdown_proxy(text + "anomalies:\n  loop: {repeats: 1, on_detect: deny}\n")
    with proxy.openai_client(
        default_headers={"X-Drawdown-Agent": "a", "X-Drawdown-Run": "r"}
    ) as client:
        assert client.images.generate(model="dall-e-3", prompt="a cat").data[0].url
        for _ in range(3):
            assert client.models.list().data is not None  # free: no step, no budget
        with pytest.raises(openai.APIStatusError) as looped:
            client.images.generate(model="dall-e-3", prompt="a cat")
        assert client.images.generate(model="dall-e-3", prompt="a dog").data[0].url
        with pytest.raises(openai.APIStatusError) as broke:
            client.images.generate(model="dall-e-3", prompt="a bird")
    assert (
        looped.value.status_code == 429
        and "loop" in looped.value.response.json()["error"]["message"]
    )
    assert broke.value.status_code == 402  # two images made: the budget's 2 requests
    assert standin.count("/v1/images/generations") == 2
    images = rows(
        proxy,
        "SELECT d.decision, d.model, d.actual_usd, h.actual_requests FROM decisions d "
        "LEFT JOIN holds h ON h.id = d.hold_id WHERE d.path = '/v1/images/generations' ORDER BY d.id",
    )
    assert images == [
        ("allow", "dall-e-3", 0, 1),
        ("deny", "dall-e-3", None, None),
        ("allow", "dall-e-3", 0, 1),
        ("deny", "dall-e-3", None, None),
    ]
    spent = rows(proxy, "SELECT spent_requests FROM budget_instances")
    assert spent == [(2,)]
    listings = rows(
        proxy,
        "SELECT h.est_requests, h.instance_ids FROM decisions d JOIN holds h ON h.id = d.hold_id "
        "WHERE d.path = '/v1/models'",
    )
    assert listings == [(0, "")] * 3


def _genai_nanos(model: str, **usage: int) -> int:
    price = genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id="openai")
    return math.ceil(price.total_price * 1_000_000_000)


def test_a_gpt_image_is_charged_the_price_of_its_usage_and_a_budget_refuses_the_next(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """GPT image models bill per token (text and image input, image output): the Images API
    was a $0 step for them, so a USD budget never saw an agent's images. Each is now reserved
    by its quality and size, charged the genai-prices price of the usage it reports, and an
    image past the budget is refused before it is made."""
    proxy = drawdown_proxy(policy('- {scope: "agent:*/run:*", usd: 0.10}'))
    prompt = "a lighthouse at dusk"
    with proxy.openai_client(
        default_headers={"X-Drawdown-Agent": "artist", "X-Drawdown-Run": "r1"}
    ) as client:
        made = client.images.generate(
            model="gpt-image-1", prompt=prompt, quality="low", size="1024x1024"
        )
        assert made.data[0].b64_json and made.usage.output_tokens == 272
        with pytest.raises(openai.APIStatusError) as refused:  # 6240 tokens at $40/M: $0.25
            client.images.generate(
                model="gpt-image-1", prompt=prompt, quality="high", size="1024x1536"
            )
    with proxy.openai_client(
        default_headers={"X-Drawdown-Agent": "artist", "X-Drawdown-Run": "r2"}
    ) as client:
        edited = client.images.edit(
            model="gpt-image-1",
            image=[("in.png", b"\x89PNG\r\n\x1a\n" + bytes(100), "image/png")],
            prompt="add a boat",
            quality="low",
        )
        assert edited.usage.input_tokens_details.image_tokens == 323
        stream = client.images.generate(
            model="gpt-image-1", prompt=prompt, quality="low", stream=True, partial_images=1
        )
        kinds = [event.type for event in stream]
        assert kinds == ["image_generation.partial_image", "image_generation.completed"]
    assert refused.value.status_code == 402
    assert "budget agent:artist/run:r1 usd" in refused.value.response.json()["error"]["message"]
    assert standin.count("/v1/images/generations") == 2 and standin.count("/v1/images/edits") == 1
    words = len(prompt.split())
    text_price = _genai_nanos("gpt-image-1", input_tokens=words, output_tokens=272)
    edit_price = _genai_nanos(
        "gpt-image-1", input_tokens=3 + 323, input_image_tokens=323, output_tokens=272
    )
    found = proxy.wait_for_query(
        "SELECT d.decision, d.path, d.model, d.tokens_in, d.tokens_out, d.actual_usd, "
        "d.usage_source FROM decisions d WHERE d.path LIKE '/v1/images/%' ORDER BY d.id",
        until=lambda rows: sum(r[5] is not None for r in rows) >= 3,
    )
    assert found == [
        ("allow", "/v1/images/generations", "gpt-image-1", words, 272, text_price, "usage"),
        ("deny", "/v1/images/generations", "gpt-image-1", None, None, None, None),
        ("allow", "/v1/images/edits", "gpt-image-1", 3 + 323, 272, edit_price, "usage"),
        ("allow", "/v1/images/generations", "gpt-image-1", words, 272, text_price, "usage"),
    ]
    spent = rows(proxy, "SELECT spent_usd, reserved_usd FROM budget_instances ORDER BY id")
    assert spent == [(text_price, 0), (edit_price + text_price, 0)]


def test_the_responses_image_tool_is_charged_on_its_image_model_json_and_streamed(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """The Responses API's image_generation tool bills the image model's tokens, reported in
    `tool_usage.image_gen` apart from `usage`: they were charged $0. Now one image of the
    tool's quality is reserved on gpt-image-1 before the call (a high one does not fit a
    $0.05 budget), and the tokens reported are charged at gpt-image-1's price."""
    proxy = drawdown_proxy(policy('- {scope: "agent:*/run:*", usd: 0.05}'))
    with proxy.openai_client(
        default_headers={"X-Drawdown-Agent": "artist", "X-Drawdown-Run": "r1"}
    ) as client:
        answer = client.responses.create(
            model="gpt-4o-mini",
            input="Draw a lighthouse.",
            tools=[{"type": "image_generation", "quality": "low", "size": "1024x1024"}],
        )
        assert [item.type for item in answer.output] == ["message", "image_generation_call"]
        streamed = client.responses.create(
            model="gpt-4o-mini",
            input="Draw a lighthouse.",
            tools=[{"type": "image_generation", "quality": "low"}],
            stream=True,
        )
        kinds = [event.type for event in streamed]
        assert kinds[-1] == "response.completed"
        with pytest.raises(openai.APIStatusError) as refused:  # 6240 tokens at $40/M: $0.25
            client.responses.create(
                model="gpt-4o-mini",
                input="Draw a lighthouse.",
                tools=[{"type": "image_generation", "quality": "high"}],
            )
    assert refused.value.status_code == 402
    assert standin.count("/v1/responses") == 2
    image = _genai_nanos("gpt-image-1", input_tokens=40, output_tokens=272)
    expected = []
    for i in (1, 2):
        usage = standin.wait_for("/v1/responses", count=i).usage
        text = _genai_nanos(
            "gpt-4o-mini", input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"]
        )
        expected.append(("allow", text + image, "usage"))
    found = proxy.wait_for_query(
        "SELECT decision, actual_usd, usage_source FROM decisions WHERE path = '/v1/responses' "
        "ORDER BY id",
        until=lambda rows: sum(r[1] is not None for r in rows) >= 2,
    )
    assert found == [*expected, ("deny", None, None)]
    spent = rows(proxy, "SELECT spent_usd, reserved_usd FROM budget_instances")
    assert spent == [(sum(e[1] for e in expected), 0)]


def test_speech_is_charged_per_character_or_per_token(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """Speech was a $0 step. tts-1-hd is now charged genai-prices' price of the characters
    it reads, exact before the call; gpt-4o-mini-tts the price of the usage its SSE stream
    reports, or, as raw audio (no usage), its reserve; and the audio reaches the agent."""
    proxy = drawdown_proxy(policy('- {scope: "agent:*/run:*", usd: 1.00}'))
    text = "Welcome aboard. The proxy meters every word you hear."
    with proxy.openai_client(
        default_headers={"X-Drawdown-Agent": "voice", "X-Drawdown-Run": "r1"}
    ) as client:
        hd = client.audio.speech.create(model="tts-1-hd", voice="alloy", input=text)
        assert hd.read().startswith(b"\xff\xfb")
        raw = client.audio.speech.create(model="gpt-4o-mini-tts", voice="coral", input=text)
        assert len(raw.read()) == 4 + 64 * len(text)
        sse = client.audio.speech.create(
            model="gpt-4o-mini-tts", voice="coral", input=text, stream_format="sse"
        )
        assert b"speech.audio.done" in sse.read()
    usage = standin.wait_for("/v1/audio/speech", count=3).usage
    found = proxy.wait_for_query(
        "SELECT d.model, d.tokens_in, d.tokens_out, d.actual_usd, d.usage_source, h.est_usd "
        "FROM decisions d JOIN holds h ON h.id = d.hold_id WHERE d.path = '/v1/audio/speech' "
        "ORDER BY d.id",
        until=lambda rows: sum(r[3] is not None for r in rows) >= 3,
    )
    characters = _genai_nanos("tts-1-hd", input_characters=len(text))
    assert found[0] == ("tts-1-hd", 0, 0, characters, "estimate", characters)
    model, _, _, charged, source, reserved = found[1]
    assert (model, source, charged) == ("gpt-4o-mini-tts", "estimate", reserved)
    tokens = _genai_nanos(
        "gpt-4o-mini-tts", input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"]
    )
    model, tokens_in, tokens_out, charged, source, reserved = found[2]
    assert (model, tokens_in, tokens_out, charged, source) == (
        "gpt-4o-mini-tts",
        usage["input_tokens"],
        usage["output_tokens"],
        tokens,
        "usage",
    )
    assert 0 < charged <= reserved  # the reserve was not short
    spent = rows(proxy, "SELECT spent_usd, spent_requests, reserved_usd FROM budget_instances")
    assert spent == [(characters + found[1][3] + tokens, 3, 0)]


TRANSCRIBE_POLICY = """
mode: enforce
identity:
  tenant: [{value: acme}]
  agent: [{header: X-Drawdown-Agent}, {value: anonymous}]
  run: [{header: X-Drawdown-Run}, {value: r0}]
actions:
  - {kind: llm, provider: openai, match: {host: [api.openai.com, api.groq.com]}}
budgets:
  - {scope: "agent:*/run:*", usd: 0.05}
"""


def _seconds_nanos(model: str, seconds: int, provider: str = "openai") -> int:
    usage = genai_prices.Usage(audio_seconds=seconds, input_audio_seconds=seconds)
    price = genai_prices.calc_price(usage, model, provider_id=provider)
    return math.ceil(price.total_price * 1_000_000_000)


def _token_nanos(model: str, usage: dict) -> int:
    audio = usage["input_token_details"]["audio_tokens"]
    return _genai_nanos(
        model,
        input_tokens=usage["input_tokens"],
        input_audio_tokens=audio,
        output_tokens=usage["output_tokens"],
    )


def test_transcriptions_are_charged_per_second_or_per_token_and_a_budget_refuses_the_next(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """Transcriptions and translations were a $0 step. whisper-1 is now charged genai-prices'
    price of the seconds its answer reports (a text answer: the seconds read from the WAV),
    gpt-4o-*-transcribe the tokens reported in JSON or at the end of a stream, Groq's
    whisper Groq's price with its 10 s minimum; and a file past the budget is refused."""
    proxy = drawdown_proxy(TRANSCRIBE_POLICY)
    wav = wire.wav_audio
    headers = {"X-Drawdown-Agent": "scribe", "X-Drawdown-Run": "r1"}
    with proxy.openai_client(default_headers=headers) as client:
        made = client.audio.transcriptions.create(
            model="whisper-1", file=("a.wav", wav(61.2, rate=8000), "audio/wav")
        )
        assert made.text == standin.reply_text and made.usage.seconds == pytest.approx(61.2)
        text = client.audio.transcriptions.create(
            model="whisper-1", file=("b.wav", wav(9.5, rate=8000)), response_format="text"
        )
        assert text.strip() == standin.reply_text
        tokens = client.audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("c.wav", wav(5)), prompt="Names: Drawdown, Acme"
        )
        assert tokens.usage.type == "tokens"
        stream = client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("d.wav", wav(7)), stream=True
        )
        kinds = [event.type for event in stream]
        assert kinds[-1] == "transcript.text.done" and kinds[0] == "transcript.text.delta"
        translated = client.audio.translations.create(
            model="whisper-1", file=("e.wav", wav(20, rate=8000))
        )
        assert translated.text == standin.reply_text
    with proxy.openai_client("https://api.groq.com/openai/v1", default_headers=headers) as groq:
        short = groq.audio.transcriptions.create(
            model="whisper-large-v3", file=("f.wav", wav(3, rate=8000))
        )
        assert short.text == standin.reply_text
    requests = standin.matching("*/audio/*")
    assert len(requests) == 6
    expected = [
        ("/v1/audio/transcriptions", "whisper-1", _seconds_nanos("whisper-1", 62), "usage"),
        ("/v1/audio/transcriptions", "whisper-1", _seconds_nanos("whisper-1", 10), "estimate"),
        (
            "/v1/audio/transcriptions",
            "gpt-4o-transcribe",
            _token_nanos("gpt-4o-transcribe", requests[2].usage),
            "usage",
        ),
        (
            "/v1/audio/transcriptions",
            "gpt-4o-mini-transcribe",
            _token_nanos("gpt-4o-mini-transcribe", requests[3].usage),
            "usage",
        ),
        ("/v1/audio/translations", "whisper-1", _seconds_nanos("whisper-1", 20), "usage"),
        (
            "/openai/v1/audio/transcriptions",
            "whisper-large-v3",
            _seconds_nanos("whisper-large-v3", 10, "groq"),  # Groq's minimum, not 3 s
            "usage",
        ),
    ]
    found = proxy.wait_for_query(
        "SELECT d.path, d.model, d.actual_usd, d.usage_source, h.est_usd FROM decisions d "
        "JOIN holds h ON h.id = d.hold_id WHERE d.path LIKE '%/audio/%' ORDER BY d.id",
        until=lambda rows: sum(r[2] is not None for r in rows) >= 6,
    )
    assert [row[:4] for row in found] == expected
    assert all(0 < actual <= reserved for _, _, actual, _, reserved in found)
    spent = rows(proxy, "SELECT spent_usd, reserved_usd FROM budget_instances")
    assert spent == [(sum(e[2] for e in expected), 0)]

    # A second run: four minutes of audio fit its $0.05, five more do not.
    headers = {"X-Drawdown-Agent": "scribe", "X-Drawdown-Run": "r2"}
    with proxy.openai_client(default_headers=headers) as client:
        client.audio.transcriptions.create(model="whisper-1", file=("g.wav", wav(240, rate=8000)))
        with pytest.raises(openai.APIStatusError) as refused:
            client.audio.transcriptions.create(
                model="whisper-1", file=("h.wav", wav(300, rate=8000))
            )
    assert refused.value.status_code == 402
    assert "budget agent:scribe/run:r2 usd" in refused.value.response.json()["error"]["message"]
    assert standin.count("*/audio/*") == 7  # the refused file never left the proxy


def test_a_diarized_transcription_with_speaker_clips_is_charged_not_free(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """gpt-4o-transcribe-diarize bills tokens, which genai-prices prices; its diarized_json
    always states `duration` and may leave `usage` out. Read as seconds, that answer was
    charged $0. Its speaker reference clips are audio heard too: a 1 s file and two 5 s clips
    are reserved, and charged, as 11 s of audio tokens and the transcript counted."""
    proxy = drawdown_proxy(TRANSCRIBE_POLICY)
    wav = wire.wav_audio
    answer = {
        "task": "transcribe",
        "duration": 1.0,
        "text": standin.reply_text,
        "segments": [
            {
                "type": "transcript.text.segment",
                "id": "seg_0",
                "start": 0.0,
                "end": 1.0,
                "speaker": "agent",
                "text": standin.reply_text,
            }
        ],
    }
    standin.script("POST", "/v1/audio/transcriptions", Reply(json=answer))
    clip = "data:audio/wav;base64," + base64.b64encode(wav(5)).decode()
    with proxy.openai_client(default_headers={"X-Drawdown-Agent": "diarist"}) as client:
        made = client.audio.transcriptions.create(
            model="gpt-4o-transcribe-diarize",
            file=("meeting.wav", wav(1)),
            response_format="diarized_json",
            chunking_strategy="auto",
            extra_body={
                "known_speaker_names": ["agent", "customer"],
                "known_speaker_references": [clip, clip],
            },
        )
    assert made.segments[0].speaker == "agent"
    sent = standin.matching("/v1/audio/transcriptions")[0].body
    assert sent.count(b'name="known_speaker_references[]"') == 2
    found = proxy.wait_for_query(
        "SELECT d.actual_usd, d.usage_source, d.tokens_in, h.est_usd FROM decisions d "
        "JOIN holds h ON h.id = d.hold_id WHERE d.path LIKE '%/audio/%'",
        until=lambda rows: rows and rows[0][0] is not None,
    )
    actual, source, tokens_in, reserved = found[0]
    assert source == "counted" and 0 < actual < reserved
    assert tokens_in >= 11 * AUDIO_TOKENS_PER_SECOND  # the file's second and the clips' ten


def test_a_malformed_transcription_is_refused_before_it_is_forwarded(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """A request the meter cannot read (here a response_format the API does not have) is
    answered 400 in plain words, not forwarded and not charged."""
    proxy = drawdown_proxy(TRANSCRIBE_POLICY)
    with proxy.openai_client() as client, pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(
            model="whisper-1",
            file=("a.wav", wire.wav_audio(1)),
            response_format="mp3",  # type: ignore[arg-type]
        )
    assert "response_format must be one of" in refused.value.response.json()["error"]["message"]
    # A form smuggled ahead of the one its Content-Type names (the host reads it as a
    # preamble): the meter would have read a model that is not speech to text, a $0 step.
    fake = wire.multipart_form({"model": "not-a-stt-model"}, {"file": wire.wav_audio(1)}, "fake")
    real = wire.multipart_form({"model": "whisper-1"}, {"file": wire.wav_audio(600)}, "real")
    with proxy.http_client() as http:
        smuggled = http.post(
            "https://api.openai.com/v1/audio/transcriptions",
            content=fake + real,
            headers={"Content-Type": "multipart/form-data; boundary=real"},
        )
    assert smuggled.status_code == 400
    assert "not the one its Content-Type names" in smuggled.json()["error"]["message"]
    assert standin.count("*/audio/*") == 0


def test_windowed_budget_denies_with_429_and_retry_after(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(policy('- {scope: "agent:*", per: hour, requests: 1}'))
    with proxy.openai_client(default_headers={"X-Drawdown-Agent": "w"}, max_retries=3) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 3601
    assert standin.count("/v1/chat/completions") == 1  # no retry despite max_retries=3


def test_an_exhausted_lifetime_budget_answers_402_whatever_the_policys_order(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """Listed after an exhausted windowed budget, the run's lifetime budget once got a 429 with
    a Retry-After: the agent was told to wait for a call that can never succeed."""
    budgets = """
- {scope: "agent:*", per: minute, requests: 1}
- {scope: "agent:*/run:*", requests: 1}
"""
    proxy = drawdown_proxy(policy(budgets))
    headers = {"X-Drawdown-Agent": "o", "X-Drawdown-Run": "r"}
    with proxy.openai_client(default_headers=headers, max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.status_code == 402 and "retry-after" not in caught.value.response.headers
    assert "budget agent:o/run:r requests 1 exhausted" in caught.value.message
    explained = subprocess.run(
        [sys.executable, "-m", "drawdown", "explain", "--policy", str(proxy.policy_path),
         "--db", proxy.db_path, "--url", "https://api.openai.com/v1/chat/completions",
         "--header", "X-Drawdown-Agent:o", "--header", "X-Drawdown-Run:r",
         "--json", json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}), "--as-json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(explained.stdout)["reason"] == "budget agent:o/run:r requests exhausted (402)"


def test_a_call_above_a_windows_whole_limit_answers_402_not_wait(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """A first call asking for more tokens than an hourly budget's whole limit got a 429 with
    a Retry-After, "exhausted (used 0…)": a client honouring it slept and failed again."""
    proxy = drawdown_proxy(policy('- {scope: "agent:*", per: hour, tokens: 1000}'))
    headers = {"X-Drawdown-Agent": "big"}
    with (
        proxy.openai_client(default_headers=headers, max_retries=0) as client,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5000)
    assert caught.value.status_code == 402 and "retry-after" not in caught.value.response.headers
    assert "tokens 1000 per hour is less than this call needs" in caught.value.message
    assert standin.count("/v1/chat/completions") == 0
    # replay and explain answer alike
    replayed = subprocess.run(
        [sys.executable, "-m", "drawdown", "replay", "--policy", str(proxy.policy_path),
         "--db", proxy.db_path, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    assert '"status": 402' in replayed.stdout and '"status": 429' not in replayed.stdout
    explained = subprocess.run(
        [sys.executable, "-m", "drawdown", "explain", "--policy", str(proxy.policy_path),
         "--url", "https://api.openai.com/v1/chat/completions", "--header", "X-Drawdown-Agent:big",
         "--json", json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5000}),
         "--as-json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(explained.stdout)["reason"].endswith("whatever was spent (402)")


def test_shadow_mode_forwards_and_records_would_deny(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(policy('- {scope: "agent:*/run:*", requests: 1}', mode="shadow"))
    with proxy.openai_client(
        default_headers={"X-Drawdown-Agent": "s", "X-Drawdown-Run": "r"}
    ) as client:
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert standin.count("/v1/chat/completions") == 3
    decisions = decision_of(proxy)
    assert [(d[0], d[1], d[2]) for d in decisions] == [
        ("allow", None, 200),
        ("would_deny", "budget_exhausted", 200),
        ("would_deny", "budget_exhausted", 200),
    ]
    # Shadow mode still accounts: the spend is real.
    assert rows(proxy, "SELECT spent_requests FROM budget_instances") == [(3,)]


def test_mode_flag_overrides_the_policy(drawdown_proxy: Factory, standin: StandIn) -> None:
    proxy = drawdown_proxy(
        policy('- {scope: "agent:*", requests: 0}'), extra_args=["--mode", "shadow"]
    )
    with proxy.openai_client() as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert decision_of(proxy)[0][0] == "would_deny"


def test_stream_with_include_usage_is_passed_through_and_committed(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(policy('- {scope: "agent:*", usd: 1}'))
    with proxy.openai_client() as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    upstream = standin.wait_for("/v1/chat/completions")
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    assert usage_chunks[0].usage.prompt_tokens == upstream.usage["prompt_tokens"]
    ((_, _, status, tokens_in, tokens_out, source, _),) = decision_of(proxy, settled=1)
    assert (status, source) == (200, "usage")
    assert (tokens_in, tokens_out) == (
        upstream.usage["prompt_tokens"],
        upstream.usage["completion_tokens"],
    )


def test_stream_without_include_usage_is_metered_and_looks_untouched(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(policy('- {scope: "agent:*", usd: 1}'))
    with proxy.openai_client() as client:
        chunks = list(
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        )
        text = "".join(
            c.choices[0].delta.content or "" for c in chunks
        )  # the usual loop: must not crash
    upstream = standin.wait_for("/v1/chat/completions")
    # drawdown asked the upstream for usage on the agent's behalf...
    assert upstream.json["stream_options"] == {"include_usage": True}
    # ...and removed the usage-only chunk the agent never asked for.
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert text
    ((_, _, status, tokens_in, tokens_out, source, _),) = decision_of(proxy, settled=1)
    assert (status, source) == (200, "usage")
    assert (tokens_in, tokens_out) == (
        upstream.usage["prompt_tokens"],
        upstream.usage["completion_tokens"],
    )


def test_sse_events_are_forwarded_as_they_arrive(drawdown_proxy: Factory, standin: StandIn) -> None:
    import threading

    gate = threading.Event()
    body = (
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":"first"},"finish_reason":null}]}\n\n'
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" second"},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    first, rest = body.split(b"\n\n", 1)
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(body=body, content_type="text/event-stream", chunks=[first + b"\n\n", gate, rest]),
    )
    proxy = drawdown_proxy(policy('- {scope: "agent:*", usd: 1}', mode="shadow"))
    with proxy.openai_client() as client:
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        # The first event reaches the agent while the upstream is still holding the rest back.
        assert next(iter(stream)).choices[0].delta.content == "first"
        gate.set()
        assert [c.choices[0].delta.content for c in stream] == [" second"]
    ((_, _, status, _, _, source, _),) = decision_of(proxy, settled=1)
    assert (status, source) == (200, "counted")  # no usage in the stream: counted, marked as such


def test_upstream_error_releases_the_hold(drawdown_proxy: Factory, standin: StandIn) -> None:
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(status=500, json={"error": {"message": "boom", "type": "server_error"}}),
        times=1,
    )
    proxy = drawdown_proxy(policy('- {scope: "agent:*", requests: 5}'))
    with proxy.openai_client(max_retries=0) as client, pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert rows(proxy, "SELECT state, settle_reason FROM holds") == [
        ("released", "upstream answered 500")
    ]
    assert rows(proxy, "SELECT spent_requests, reserved_requests FROM budget_instances") == [(0, 0)]


async def _race(proxy: DrawdownProcess, n: int) -> list[int]:
    async with proxy.async_openai_client(
        default_headers={"X-Drawdown-Agent": "racer", "X-Drawdown-Run": "r"}, max_retries=0
    ) as client:

        async def one() -> int:
            try:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=20
                )
                return 200
            except openai.APIStatusError as exc:
                return exc.status_code

        return await asyncio.gather(*(one() for _ in range(n)))


def test_concurrent_calls_racing_for_a_budget_admit_at_most_what_fits(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(policy('- {scope: "agent:*/run:*", requests: 10}'))
    statuses = asyncio.run(_race(proxy, 40))
    assert statuses.count(200) == 10 and statuses.count(402) == 30
    assert standin.count("/v1/chat/completions") == 10
    assert rows(proxy, "SELECT spent_requests, reserved_requests FROM budget_instances") == [
        (10, 0)
    ]
    assert rows(proxy, "SELECT COUNT(*) FROM decisions") == [(40,)]


def test_two_proxies_on_one_ledger_never_overspend_together(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    text = policy('- {scope: "agent:*/run:*", requests: 12}')
    first = drawdown_proxy(text)
    second = drawdown_proxy(text)

    async def both() -> list[int]:
        results = await asyncio.gather(_race(first, 15), _race(second, 15))
        return [s for group in results for s in group]

    statuses = asyncio.run(both())
    assert statuses.count(200) == 12
    assert standin.count("/v1/chat/completions") == 12
    assert rows(first, "SELECT spent_requests, reserved_requests FROM budget_instances") == [
        (12, 0)
    ]


def test_proxy_credentials_name_the_agent_and_run(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(
        policy('- {scope: "agent:*/run:*", usd: 1}'), proxy_auth=("planner", "run-42")
    )
    with proxy.openai_client() as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert decision_of(proxy)[0][6] == "tenant:acme/agent:planner/run:run-42"
    assert standin.last().header("proxy-authorization") is None


def test_idle_split_gives_an_unmodified_agent_per_run_budgets(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    text = policy('- {scope: "agent:*/run:*", requests: 2}').replace(
        "{idle_split: 300}", "{idle_split: 2}"
    )
    proxy = drawdown_proxy(text)
    with proxy.openai_client(max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    runs = rows(proxy, "SELECT DISTINCT run FROM decisions")
    assert len(runs) == 1
    import time

    time.sleep(2.5)  # the agent goes idle longer than idle_split: its next call starts a new run
    with proxy.openai_client() as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(rows(proxy, "SELECT DISTINCT run FROM decisions")) == 2


def run_under_env(
    proxy: DrawdownProcess,
    tmp_path: Path,
    command: str,
    env_flags: str = "",
    timeout: float = 60,
    **environ: str,
) -> subprocess.CompletedProcess[str]:
    """`command` in a bash whose only preparation for drawdown is `eval "$(drawdown env …)"`,
    in an environment holding nothing else but PATH, HOME and `environ`."""
    host, port = proxy.address
    script = (
        f'eval "$({sys.executable} -m drawdown env --confdir {proxy.confdir} --listen {host}:{port} {env_flags})" '
        f"&& unset NO_PROXY no_proxy SSL_CERT_DIR && exec {command}"
    )
    return subprocess.run(
        ["bash", "-c", script],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **environ},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_unmodified_agent_uses_drawdown_env(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """An agent process that knows nothing of drawdown: only `eval "$(drawdown env …)"` in its shell."""
    proxy = drawdown_proxy(policy('- {scope: "agent:*/run:*", requests: 1}'))
    agent = textwrap.dedent(
        """
        import openai, sys
        client = openai.OpenAI(api_key="sk-test-agent")
        try:
            for _ in range(2):
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
                print("ok", flush=True)
        except openai.APIStatusError as exc:
            print("denied", exc.status_code, flush=True)
        """
    )
    result = run_under_env(
        proxy, tmp_path, f'{sys.executable} -c "$AGENT"', "--agent envagent --run e1", AGENT=agent
    )
    assert result.stdout.split("\n")[:2] == ["ok", "denied 402"], result.stderr
    assert decision_of(proxy)[0][6] == "tenant:acme/agent:envagent/run:e1"


NODE_AGENT = Path(__file__).resolve().parents[1] / "agents" / "node"


def node_agent() -> Path:
    """The Node the agent's package installed (scripts/test runs `npm ci` there). Skipped
    without npm; in CI (DRAWDOWN_REQUIRE_NODE=1) its absence is a failure."""
    node = NODE_AGENT / "node_modules" / ".bin" / "node"
    if node.exists():
        return node
    missing = f"no Node agent installed in {NODE_AGENT} (npm ci there)"
    if os.environ.get("DRAWDOWN_REQUIRE_NODE", "") not in ("", "0"):
        pytest.fail(f"{missing}; DRAWDOWN_REQUIRE_NODE=1 demands it", pytrace=False)
    pytest.skip(missing)


def test_an_unmodified_node_agent_uses_drawdown_env(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """The official openai TypeScript SDK on Node, with only `eval "$(drawdown env …)"` in its
    shell: Node's fetch ignores HTTPS_PROXY unless NODE_USE_ENV_PROXY=1, which `env` exports,
    and trusts drawdown's CA through NODE_EXTRA_CA_CERTS."""
    node = node_agent()
    proxy = drawdown_proxy(policy('- {scope: "agent:*/run:*", requests: 1}'))
    command = f"{node} {NODE_AGENT / 'agent.mjs'}"
    result = run_under_env(proxy, tmp_path, command, "--agent nodeagent --run n1")
    assert result.stdout.split("\n")[:2] == ["ok", "denied 402"], result.stdout + result.stderr
    assert decision_of(proxy)[0][6] == "tenant:acme/agent:nodeagent/run:n1"
    assert standin.count("/v1/chat/completions") == 1


JAVA_AGENT = Path(__file__).resolve().parents[1] / "agents" / "java" / "Agent.java"


def test_an_unmodified_jvm_agent_uses_drawdown_env(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """The JDK's HttpClient reads no HTTPS_PROXY and no PEM bundle: a JVM agent under
    `eval "$(drawdown env)"` went straight to the provider, ungoverned. JAVA_TOOL_OPTIONS now
    carries the proxy and a PKCS#12 truststore; what the shell had set there is kept. Skipped
    without a JDK; in CI (DRAWDOWN_REQUIRE_JAVA=1) its absence is a failure."""
    java = shutil.which("java")
    if java is None or shutil.which("javac") is None:  # `java Agent.java` needs the JDK
        if os.environ.get("DRAWDOWN_REQUIRE_JAVA", "") not in ("", "0"):
            pytest.fail("no JDK on PATH; DRAWDOWN_REQUIRE_JAVA=1 demands it", pytrace=False)
        pytest.skip("no JDK on PATH")
    proxy = drawdown_proxy(policy('- {scope: "agent:*/run:*", requests: 1}'))
    result = run_under_env(
        proxy,
        tmp_path,
        f'{java} "$AGENT"',
        AGENT=str(JAVA_AGENT),
        JAVA_TOOL_OPTIONS="-Xss2m",  # the agent's own: env adds to it
        timeout=120,
    )
    assert result.stdout.split("\n")[:2] == ["ok", "denied 402"], result.stdout + result.stderr
    assert "Picked up JAVA_TOOL_OPTIONS: -Xss2m -Dhttps.proxyHost=" in result.stderr
    assert standin.count("/v1/chat/completions") == 1
    assert [d[0] for d in decision_of(proxy)] == ["allow", "deny"]


def test_hot_reload_applies_good_edits_and_keeps_the_last_good_policy(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(policy('- {scope: "agent:*", requests: 1}'))
    with proxy.openai_client(max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        proxy.reload_policy(policy('- {scope: "agent:*", requests: 3}'))
        proxy.wait_for_log("policy reloaded")
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )  # the raised limit applies
        proxy.reload_policy(policy('- {scope: "agent:*", requests: 100, usdd: 3}'))
        line = proxy.wait_for_log(r"policy edit rejected")
        assert line
        proxy.wait_for_log(r"unknown key 'usdd' in budget")
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )  # 3rd of 3: still the last good policy
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        # An editor saving in place leaves the file empty for a moment: not a policy without
        # budgets, which would let every call through.
        proxy.reload_policy("")
        proxy.wait_for_log(r"holds no policy \(empty, or only comments\)")
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert caught.value.status_code == 402
    assert proxy.is_running()


def test_a_reload_that_changes_mode_under_a_mode_flag_says_the_flag_still_wins(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """Monday starts the proxy with --mode shadow; Friday's `mode: enforce` edit must not look
    applied while the flag keeps it in shadow."""
    budgets = '- {scope: "agent:*", requests: 1}'
    proxy = drawdown_proxy(policy(budgets, mode="shadow"), extra_args=["--mode", "shadow"])
    proxy.reload_policy(policy(budgets, mode="enforce"))
    proxy.wait_for_log(
        r"is in enforce mode \(its `mode:`, enforce where it names none\), but --mode shadow "
        "overrides it"
    )
    # The reload names the policy by the digest its decisions carry (and reports name).
    reloaded = proxy.wait_for_log(r"policy reloaded from \S+ \(policy ([0-9a-f]{16})\)")
    with proxy.openai_client(max_retries=0) as client:
        for _ in range(2):  # the second is over budget: recorded, not refused
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert [d[0] for d in decision_of(proxy)] == ["allow", "would_deny"]
    assert {row[0] for row in proxy.query("SELECT policy_digest FROM decisions")} == {
        reloaded.group(1)
    }


def test_plain_mitmdump_with_the_addon_script(drawdown_proxy: Factory, standin: StandIn) -> None:
    proxy = drawdown_proxy(
        policy('- {scope: "agent:*", requests: 1}'), mode="mitmdump", ready="mitmproxy"
    )
    with proxy.openai_client(max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.status_code == 402
    assert [d[0] for d in decision_of(proxy)] == ["allow", "deny"]


def test_invalid_policy_is_refused_at_start_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets:\n  - {scope: 'agent:*', usd: lots}\n")
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", "run", "--policy", str(bad), "--listen", "127.0.0.1:0", "--db", str(tmp_path / "x.db"), "--confdir", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"{bad}:2: usd must be a number" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_a_public_listen_address_without_proxy_auth(tmp_path: Path) -> None:
    good = tmp_path / "p.yaml"
    good.write_text("actions: []\n")
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", "run", "--policy", str(good), "--listen", "0.0.0.0:0", "--db", str(tmp_path / "x.db")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0" in result.stderr


def test_json_body_is_the_one_the_agent_sent_when_not_streaming(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(policy('- {scope: "agent:*", usd: 1}'))
    with proxy.openai_client() as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0.25)
    sent = standin.wait_for("/v1/chat/completions").json
    assert (
        sent["temperature"] == 0.25
        and "stream_options" not in sent
        and json.dumps(sent["messages"]) == json.dumps(MESSAGES)
    )


def test_client_abort_mid_stream_commits_what_was_streamed(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    import threading

    gate = threading.Event()
    chunk = (
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}],"usage":null}\n\n'
    )
    body = chunk % b"one two three four five" + chunk % b"six seven" + b"data: [DONE]\n\n"
    first = chunk % b"one two three four five"
    standin.script(
        "POST",
        "/v1/chat/completions",
        Reply(
            body=body, content_type="text/event-stream", chunks=[first, gate, body[len(first) :]]
        ),
    )
    proxy = drawdown_proxy(policy('- {scope: "agent:*", usd: 1}'))
    try:
        with proxy.openai_client() as client:
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            assert next(iter(stream)).choices[0].delta.content == "one two three four five"
            stream.close()  # the agent gives up mid-stream
        held = proxy.wait_for_query(
            "SELECT state, usage_source, actual_tokens FROM holds",
            until=lambda r: r and r[0][0] != "active",
        )
    finally:
        gate.set()
    ((state, source, actual_tokens),) = held
    # The provider bills what it generated: the prompt plus the text streamed so far, counted.
    assert (state, source) == ("committed", "counted")
    assert actual_tokens >= 5
    assert rows(proxy, "SELECT COUNT(*) FROM decisions") == [(1,)]
    assert rows(proxy, "SELECT reserved_usd FROM budget_instances") == [(0,)]
