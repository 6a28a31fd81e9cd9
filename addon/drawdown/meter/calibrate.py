"""Measure the input-token estimate against what providers reported, on a recorded corpus.

    python -m drawdown.meter.calibrate tests/fixtures/recorded

prints the tables of ESTIMATION.md. The corpus is a folder with MANIFEST.json and the
request/response files it names (see tests/fixtures/recorded/README.md).

Two kinds of samples:
* prompt samples: our estimate of a request's input tokens vs the input tokens the
  provider billed for the first model pass (Anthropic: message_start or iterations[0];
  later passes add server-tool results nobody can know before the call);
* output samples: tiktoken count of the visible text a response returned vs the output
  tokens the provider reported for it: more text per sample, same tokenizer question.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from ._util import ParsedRequest
from .api import inspect_request, parse, prompt_counts
from .config import DEFAULT_SAFETY_FACTORS, MeterConfig
from .tokens import count_tokens

FAMILIES = {"openai": "gpt", "anthropic": "claude", "gemini": "gemini"}


@dataclass(frozen=True)
class PromptSample:
    name: str
    family: str
    actual: int  # input tokens billed for the first pass
    estimate: int  # our estimate with the default safety factors
    raw: int  # tiktoken count + framing (before the factor)
    exact: int  # tokens by provider rules (images, hidden tool prompts), not scaled
    excluded: str | None  # why the sample says nothing about the estimator

    @property
    def error(self) -> float:
        """Estimate error relative to the actual count (+ over, - under)."""
        return (self.estimate - self.actual) / self.actual

    @property
    def needed_factor(self) -> float:
        return (self.actual - self.exact) / self.raw if self.raw else 0.0


@dataclass(frozen=True)
class OutputSample:
    name: str
    family: str
    reported: int
    counted: int

    @property
    def ratio(self) -> float:
        return self.reported / self.counted


def _first_pass_input(entry: dict[str, Any]) -> int:
    u = entry["usage"]
    if entry["provider"] == "openai":
        return int(u.get("prompt_tokens", u.get("input_tokens", 0)))
    if entry["provider"] == "gemini":
        return int(u.get("promptTokenCount", 0)) + int(u.get("toolUsePromptTokenCount", 0))
    final = u.get("message_delta") or u
    src = (final.get("iterations") or [u.get("message_start") or u])[0]
    return sum(
        int(src.get(k, 0))
        for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )


def _exclusion(entry: dict[str, Any], request: dict[str, Any]) -> str | None:
    feats = set(entry["features"])
    if entry["provider"] == "openai" and "server_tool" in feats:
        return "built-in tool results are billed as input"
    if (
        entry["provider"] == "anthropic"
        and "server_tool" in feats
        and not entry["streamed"]
        and "usage_iterations" not in feats
    ):
        return "server-tool results are billed as input; no first-pass figure"
    if entry["provider"] == "gemini":
        if request.get("cachedContent"):
            return "input comes from a server-side cache"
        text = json.dumps(request)
        if '"fileData"' in text:
            return "media by URL (a video)"
    return None


def _visible_text(entry: dict[str, Any], body: bytes) -> str | None:
    """The visible text of a plain (no tools, no thinking) response, else None."""
    if set(entry["features"]) & {
        "tool_use",
        "tool_calls",
        "server_tool",
        "usage_iterations",
        "error",
    }:
        return None
    if entry["provider"] == "anthropic" and "thinking" in entry["features"]:
        return None  # Claude 4 returns a summary of the thinking it bills in full
    if entry["provider"] == "openai":
        return None  # reasoning models: hidden tokens; tiktoken is OpenAI's own tokenizer
    objs: list[Any] = []
    if entry["streamed"]:
        for line in body.splitlines():
            if line.startswith(b"data:"):
                try:
                    objs.append(json.loads(line[5:]))
                except ValueError:
                    pass
    else:
        objs.append(json.loads(body))
    texts: list[str] = []
    for obj in objs:
        if entry["provider"] == "anthropic":
            for block in obj.get("content") or []:
                texts.append(block.get("text", ""))
            texts.append((obj.get("delta") or {}).get("text", ""))
        else:
            for cand in obj.get("candidates") or []:
                for part in (cand.get("content") or {}).get("parts") or []:
                    if not part.get("thought"):
                        texts.append(part.get("text", ""))
    return "".join(texts)


def _reported_visible(entry: dict[str, Any]) -> int:
    u = entry["usage"]
    if entry["provider"] == "anthropic":
        return int((u.get("message_delta") or u)["output_tokens"])
    return int(u.get("candidatesTokenCount", 0))


def collect(
    corpus: Path, config: MeterConfig | None = None
) -> tuple[list[PromptSample], list[OutputSample]]:
    config = config or MeterConfig()
    manifest = json.loads((corpus / "MANIFEST.json").read_text())
    prompts: list[PromptSample] = []
    outputs: list[OutputSample] = []
    for entry in manifest:
        if entry["status"] != 200 or not entry["usage"]:
            continue
        url = urllib.parse.urlsplit(entry["url"])
        body = (corpus / entry["request_file"]).read_bytes()
        est = inspect_request(entry["provider"], entry["method"], url.path, {}, body, config)
        parsed = parse(entry["provider"], entry["method"], url.path, body)
        assert isinstance(parsed, ParsedRequest)
        raw, exact = prompt_counts(parsed)
        family = FAMILIES[entry["provider"]]
        prompts.append(
            PromptSample(
                name=entry["file"].rsplit(".", 2)[0],
                family=family,
                actual=_first_pass_input(entry),
                estimate=est.input_tokens,
                raw=raw,
                exact=exact,
                excluded=_exclusion(entry, json.loads(body)),
            )
        )
        text = _visible_text(entry, (corpus / entry["file"]).read_bytes())
        if text:
            counted = count_tokens(text, None)
            if counted >= 20:
                outputs.append(
                    OutputSample(
                        entry["file"].rsplit(".", 2)[0], family, _reported_visible(entry), counted
                    )
                )
    return prompts, outputs


def _pct(x: float) -> str:
    return f"{x * 100:+.0f}%"


def _row(
    family: str, factor: object, prompts: list[PromptSample], outputs: list[OutputSample]
) -> str:
    used = [p for p in prompts if p.family == family and not p.excluded]
    outs = [o for o in outputs if o.family == family]
    errors = [p.error for p in used]
    together = sum(p.estimate for p in used) / sum(p.actual for p in used) - 1
    needed = f"{max(p.needed_factor for p in used):.3f}" if family != "gpt" else "-"
    ratio = f"{max(o.ratio for o in outs):.3f}" if outs else "-"
    return (
        f"| {family} | {factor} | {len(used)} "
        f"| {_pct(sum(errors) / len(errors))} | {_pct(min(errors))} | {_pct(max(errors))} "
        f"| {_pct(together)} | {needed} | {ratio} |"
    )


def report(corpus: Path) -> str:
    prompts, outputs = collect(corpus)
    unscaled, _ = collect(
        corpus, MeterConfig(safety_factors={"claude": Decimal(1), "gemini": Decimal(1)})
    )
    lines = [
        "| family | safety factor | prompt samples | mean error | min error | max error "
        "| all tokens together | factor the prompts need | max output-text ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family in ("claude", "gemini", "gpt"):
        factor = DEFAULT_SAFETY_FACTORS.get(family, "- (OpenAI tokenizer)")
        lines.append(_row(family, factor, prompts, outputs))
    for family in ("claude", "gemini"):
        lines.append(_row(family, "1 (none)", unscaled, outputs))
    lines += [
        "",
        "| sample | family | actual | estimate | error | excluded because |",
        "|---|---|---|---|---|---|",
    ]
    for p in prompts:
        lines.append(
            f"| {p.name} | {p.family} | {p.actual} | {p.estimate} | {_pct(p.error)} "
            f"| {p.excluded or ''} |"
        )
    lines += [
        "",
        "| output sample | family | reported | tiktoken | ratio |",
        "|---|---|---|---|---|",
    ]
    for o in outputs:
        lines.append(f"| {o.name} | {o.family} | {o.reported} | {o.counted} | {o.ratio:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/recorded")))
