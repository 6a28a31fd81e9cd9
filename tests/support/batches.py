"""The stand-in's batch APIs, in the providers' formats: OpenAI's Files and Batch API (the input
file uploaded, the batch run, its output file downloaded) and Anthropic's Message Batches (the
requests posted, the results downloaded as JSONL). A batch here ends at once: each request is
answered as the stand-in answers it live (wire.plan_reply's usage), and the answers are kept
for the download, with the usage each reported for tests to price independently."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import wire


@dataclass
class Batch:
    id: str
    provider: str  # openai | anthropic
    created_at: int
    lines: list[dict[str, Any]]  # the output (OpenAI) or results (Anthropic) JSONL lines
    usages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (model, usage)
    input_file_id: str | None = None
    output_file_id: str | None = None
    endpoint: str | None = None


class BatchStore:
    """Files and batches, by id, for one stand-in."""

    def __init__(self, next_id: Callable[[str], str], reply_text: Callable[[], str]) -> None:
        self._next_id = next_id
        self._reply_text = reply_text
        self._lock = threading.Lock()
        self.files: dict[str, tuple[str, bytes]] = {}  # id -> (purpose, content)
        self.batches: dict[str, Batch] = {}
        # What reading an OpenAI batch's status says: "completed" (its output file named),
        # "in_progress" or "failed" (no output file), as a test sets it.
        self.openai_status = "completed"

    # --- OpenAI --------------------------------------------------------------------------

    def upload(self, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        file_id = self._next_id("file-")
        with self._lock:
            self.files[file_id] = (purpose, content)
        return _file_object(file_id, filename, purpose, len(content))

    def run_openai(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST /v1/batches: run every line of the input file; None for an unknown file."""
        with self._lock:
            found = self.files.get(str(body.get("input_file_id")))
        if found is None:
            return None
        batch = Batch(
            id=self._next_id("batch_"),
            provider="openai",
            created_at=int(time.time()),
            lines=[],
            input_file_id=str(body["input_file_id"]),
            endpoint=str(body.get("endpoint", "/v1/chat/completions")),
        )
        for i, raw in enumerate(found[1].splitlines()):
            request = json.loads(raw)
            params = request.get("body") or {}
            model = params.get("model", "gpt-4o-mini")
            plan = wire.plan_reply("openai.chat", params, self._reply_text())
            usage = wire.openai_chat_usage(plan.input_tokens, plan.output_tokens)
            answer = json.loads(
                wire.openai_chat_json(
                    id=self._next_id("chatcmpl-"),
                    created=batch.created_at,
                    model=model,
                    text=plan.text,
                    usage=usage,
                    finish_reason="length" if plan.truncated else "stop",
                )
            )
            batch.lines.append(
                {
                    "id": f"batch_req_{i}",
                    "custom_id": request.get("custom_id"),
                    "response": {"status_code": 200, "request_id": f"req_{i}", "body": answer},
                    "error": None,
                }
            )
            batch.usages.append((model, usage))
        output = "".join(json.dumps(line) + "\n" for line in batch.lines).encode()
        out = self.upload("batch_output.jsonl", "batch_output", output)
        batch.output_file_id = out["id"]
        with self._lock:
            self.batches[batch.id] = batch
        created = self.openai_batch(batch.id, "validating")  # as the API answers a creation
        return created

    def openai_batch(self, batch_id: str, status: str | None = None) -> dict[str, Any] | None:
        batch = self.batches.get(batch_id)
        if batch is None:
            return None
        n = len(batch.lines)
        status = status or self.openai_status
        done = status == "completed"
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": None,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": batch.output_file_id if done else None,
            "error_file_id": None,
            "created_at": batch.created_at,
            "in_progress_at": batch.created_at,
            "expires_at": batch.created_at + 86400,
            "finalizing_at": batch.created_at if done else None,
            "completed_at": batch.created_at if done else None,
            "failed_at": batch.created_at if status == "failed" else None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": n, "completed": n if done else 0, "failed": 0},
            "metadata": None,
        }

    def content(self, file_id: str) -> bytes | None:
        found = self.files.get(file_id)
        return None if found is None else found[1]

    # --- Anthropic -----------------------------------------------------------------------

    def run_anthropic(self, body: dict[str, Any], origin: str) -> dict[str, Any]:
        """POST /v1/messages/batches: every request answered at once."""
        batch = Batch(
            id=self._next_id("msgbatch_"),
            provider="anthropic",
            created_at=int(time.time()),
            lines=[],
        )
        for request in body.get("requests") or []:
            params = request.get("params") or {}
            model = params.get("model", "claude-haiku-4-5")
            plan = wire.plan_reply("anthropic.messages", params, self._reply_text())
            usage = wire.anthropic_usage(plan.input_tokens, plan.output_tokens)
            message = json.loads(
                wire.anthropic_message_json(
                    id=self._next_id("msg_"),
                    model=model,
                    text=plan.text,
                    usage=usage,
                    stop_reason="max_tokens" if plan.truncated else "end_turn",
                )
            )
            batch.lines.append(
                {
                    "custom_id": request.get("custom_id"),
                    "result": {"type": "succeeded", "message": message},
                }
            )
            batch.usages.append((model, usage))
        with self._lock:
            self.batches[batch.id] = batch
        found = self.anthropic_batch(batch.id, origin)
        assert found is not None
        return found

    def anthropic_batch(self, batch_id: str, origin: str) -> dict[str, Any] | None:
        batch = self.batches.get(batch_id)
        if batch is None:
            return None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch.created_at))
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": "ended",
            "request_counts": {
                "processing": 0,
                "succeeded": len(batch.lines),
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            },
            "ended_at": stamp,
            "created_at": stamp,
            "expires_at": stamp,
            "archived_at": None,
            "cancel_initiated_at": None,
            # The SDK downloads the results from here, as from the real API.
            "results_url": f"{origin}/v1/messages/batches/{batch.id}/results",
        }

    def results(self, batch_id: str) -> bytes | None:
        batch = self.batches.get(batch_id)
        if batch is None:
            return None
        return "".join(json.dumps(line) + "\n" for line in batch.lines).encode()


def run_gemini(store: BatchStore, model: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST …/models/{model}:batchGenerateContent: every inline request answered at once."""
    batch = Batch(
        id=store._next_id("batch"),
        provider="gemini",
        created_at=int(time.time()),
        lines=[],
        endpoint=model,  # the model the path names
    )
    config = (body.get("batch") or {}).get("inputConfig") or {}
    for item in (config.get("requests") or {}).get("requests") or []:
        request = item.get("request") or {}
        named = str(request.get("model") or model).rsplit("/", 1)[-1]
        plan = wire.plan_reply("gemini.generate", request, store._reply_text())
        usage = wire.gemini_usage(plan.input_tokens, plan.output_tokens)
        response = json.loads(
            wire.gemini_json(
                model=named,
                text=plan.text,
                usage=usage,
                finish_reason="MAX_TOKENS" if plan.truncated else "STOP",
                response_id=store._next_id("standin"),
            )
        )
        batch.lines.append({"response": response, "metadata": item.get("metadata") or {}})
        batch.usages.append((named, usage))
    with store._lock:
        store.batches[batch.id] = batch
    # As the API answers a creation: the batch pending, its responses to come.
    return {"name": f"batches/{batch.id}", "metadata": _gemini_metadata(batch, "PENDING")}


def _gemini_metadata(batch: Batch, state: str, **more: Any) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "model": f"models/{batch.endpoint}",
        "displayName": batch.id,
        "createTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch.created_at)),
        "state": f"BATCH_STATE_{state}",
        "name": f"batches/{batch.id}",
        **more,
    }


def gemini_batch(store: BatchStore, batch_id: str) -> dict[str, Any] | None:
    """GET /v1beta/batches/{id}: the operation, with its inlined responses (it is done)."""
    batch = store.batches.get(batch_id)
    if batch is None:
        return None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch.created_at))
    output = {"inlinedResponses": {"inlinedResponses": batch.lines}}
    metadata = _gemini_metadata(
        batch,
        "SUCCEEDED",
        updateTime=stamp,
        endTime=stamp,
        batchStats={
            "requestCount": str(len(batch.lines)),
            "successfulRequestCount": str(len(batch.lines)),
        },
        output=output,
    )
    return {
        "name": f"batches/{batch.id}",
        "metadata": metadata,
        "done": True,
        "response": {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput",
            **output,
        },
    }


def _file_object(file_id: str, filename: str, purpose: str, size: int) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }
