"""The stand-in's batch APIs, in the providers' formats: OpenAI's Files and Batch API (the input
file uploaded, the batch run, its output file downloaded), Anthropic's Message Batches (the
requests posted, the results downloaded as JSONL) and Gemini's batch mode (its requests inline,
or in a JSONL file sent with the Files API's resumable upload, its responses then a file to
download). A batch here ends at once: each request is answered as the stand-in answers it live
(wire.plan_reply's usage), and the answers are kept for the download, with the usage each
reported for tests to price independently."""

from __future__ import annotations

import base64
import hashlib
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
    provider: str  # openai | anthropic | gemini
    created_at: int
    lines: list[dict[str, Any]]  # the output (OpenAI), results (Anthropic) or responses (Gemini)
    usages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (model, usage)
    input_file_id: str | None = None
    output_file_id: str | None = None
    endpoint: str | None = None
    display_name: str | None = None


@dataclass
class GeminiFile:
    """A file of Gemini's Files API: uploaded (a batch's input) or generated (its responses)."""

    id: str  # the name is files/{id}
    mime_type: str
    content: bytes
    created_at: float
    source: str  # UPLOADED | GENERATED
    display_name: str | None = None


@dataclass
class GeminiUpload:
    """A resumable upload under way: what its start declared, and the bytes received so far."""

    id: str
    file_id: str
    mime_type: str
    display_name: str | None
    size: int | None  # X-Goog-Upload-Header-Content-Length, when the start said it
    received: bytearray = field(default_factory=bytearray)


class UploadRefused(Exception):
    """A Files API upload request the API would refuse: its status and message."""

    def __init__(self, status: int, message: str, grpc_status: str) -> None:
        super().__init__(message)
        self.status = status
        self.grpc_status = grpc_status


class BatchStore:
    """Files and batches, by id, for one stand-in."""

    def __init__(self, next_id: Callable[[str], str], reply_text: Callable[[], str]) -> None:
        self._next_id = next_id
        self._reply_text = reply_text
        self._lock = threading.Lock()
        self.files: dict[str, tuple[str, bytes]] = {}  # id -> (purpose, content)
        self.batches: dict[str, Batch] = {}
        # Gemini's Files API, apart from OpenAI's: its files by id, and its uploads under way.
        self.gemini_files: dict[str, GeminiFile] = {}
        self.gemini_uploads: dict[str, GeminiUpload] = {}
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


def run_gemini(store: BatchStore, model: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """POST …/models/{model}:batchGenerateContent: every request answered at once, whether
    inline (`inputConfig.requests.requests`) or in an uploaded JSONL file
    (`inputConfig.fileName`, each line `{"key", "request"}`, answered in a generated file of
    `{"key", "response"}` lines). None for an unknown file."""
    spec = body.get("batch") or {}
    config = spec.get("inputConfig") or {}
    batch = Batch(
        id=store._next_id("batch"),
        provider="gemini",
        created_at=int(time.time()),
        lines=[],
        endpoint=model,  # the model the path names
        display_name=spec.get("displayName"),
    )
    file_name = config.get("fileName")
    if file_name is not None:
        with store._lock:
            found = store.gemini_files.get(str(file_name).removeprefix("files/"))
        if found is None:
            return None
        batch.input_file_id = f"files/{found.id}"
        for line in _jsonl(found.content):
            request = line.get("request")
            if not isinstance(request, dict):
                continue
            named, usage, response = _gemini_answer(store, model, request)
            key = line.get("key", (line.get("metadata") or {}).get("key"))
            batch.lines.append({**({"key": key} if key is not None else {}), "response": response})
            batch.usages.append((named, usage))
        output = "".join(json.dumps(line) + "\n" for line in batch.lines).encode()
        results = GeminiFile(
            id=store._next_id("batch-"),
            mime_type="application/jsonl",
            content=output,
            created_at=time.time(),
            source="GENERATED",
            display_name=f"batch-{batch.id}-responses",
        )
        with store._lock:
            store.gemini_files[results.id] = results
        batch.output_file_id = f"files/{results.id}"
    else:
        for item in (config.get("requests") or {}).get("requests") or []:
            named, usage, response = _gemini_answer(store, model, item.get("request") or {})
            batch.lines.append({"response": response, "metadata": item.get("metadata") or {}})
            batch.usages.append((named, usage))
    with store._lock:
        store.batches[batch.id] = batch
    # As the API answers a creation: the batch pending, its responses to come.
    return {"name": f"batches/{batch.id}", "metadata": _gemini_metadata(batch, "PENDING")}


def _gemini_answer(
    store: BatchStore, model: str, request: dict[str, Any]
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(model, usage, GenerateContentResponse) for one request of a batch, as answered live."""
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
    return named, usage, response


def _jsonl(content: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a blank or unreadable line is skipped."""
    out = []
    for raw in content.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            out.append(line)
    return out


def _gemini_metadata(batch: Batch, state: str, **more: Any) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "model": f"models/{batch.endpoint}",
        "displayName": batch.display_name or batch.id,
        "createTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch.created_at)),
        "state": f"BATCH_STATE_{state}",
        "name": f"batches/{batch.id}",
        **more,
    }


def gemini_batch(store: BatchStore, batch_id: str) -> dict[str, Any] | None:
    """GET /v1beta/batches/{id}: the operation, done, with its inlined responses, or the name
    of its responses file for a batch whose input was a file."""
    batch = store.batches.get(batch_id)
    if batch is None:
        return None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch.created_at))
    output: dict[str, Any] = (
        {"responsesFile": batch.output_file_id}
        if batch.output_file_id is not None
        else {"inlinedResponses": {"inlinedResponses": batch.lines}}
    )
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


# --- Gemini's Files API ------------------------------------------------------------------


def gemini_upload_start(
    store: BatchStore, body: dict[str, Any], size: str | None, mime_type: str | None
) -> str:
    """The start of a resumable upload (`X-Goog-Upload-Command: start`): its upload id. The
    file is named by the body's `file.name` when it has one, as the API names it. Its fields
    may be camelCase or snake_case (google-genai sends `mime_type`, `display_name`), as the
    API's JSON parsing accepts both."""
    meta = body.get("file") or {}

    def field(camel: str, snake: str) -> Any:
        return meta.get(camel, meta.get(snake))

    file_id = str(meta.get("name") or "").removeprefix("files/") or store._next_id("file")
    upload = GeminiUpload(
        id=store._next_id("standin-upload-"),
        file_id=file_id,
        mime_type=str(field("mimeType", "mime_type") or mime_type or "application/octet-stream"),
        display_name=field("displayName", "display_name"),
        size=int(size) if size and size.isdigit() else None,
    )
    with store._lock:
        if file_id in store.gemini_files:
            raise UploadRefused(409, f"File files/{file_id} already exists.", "ALREADY_EXISTS")
        store.gemini_uploads[upload.id] = upload
    return upload.id


def gemini_upload_chunk(
    store: BatchStore,
    upload_id: str,
    commands: set[str],
    offset: str | None,
    data: bytes,
    origin: str,
    version: str,
) -> dict[str, Any] | None:
    """One request of an upload under way: `upload` appends its bytes at `offset` (which must
    be what was received so far), `finalize` ends it. The file object once finalized, else
    None (still active). Raises UploadRefused."""
    with store._lock:
        upload = store.gemini_uploads.get(upload_id)
        if upload is None:
            raise UploadRefused(404, "Failed to find upload session.", "NOT_FOUND")
        if "upload" in commands:
            if offset is None or not offset.isdigit():
                raise UploadRefused(400, "X-Goog-Upload-Offset is required.", "INVALID_ARGUMENT")
            if int(offset) != len(upload.received):
                raise UploadRefused(
                    400,
                    f"Invalid X-Goog-Upload-Offset {offset}: "
                    f"{len(upload.received)} bytes were received.",
                    "INVALID_ARGUMENT",
                )
            upload.received += data
        if "finalize" not in commands:
            return None
        if upload.size is not None and upload.size != len(upload.received):
            raise UploadRefused(
                400,
                f"Upload finalized at {len(upload.received)} bytes, {upload.size} declared.",
                "INVALID_ARGUMENT",
            )
        del store.gemini_uploads[upload_id]
        file = GeminiFile(
            id=upload.file_id,
            mime_type=upload.mime_type,
            content=bytes(upload.received),
            created_at=time.time(),
            source="UPLOADED",
            display_name=upload.display_name,
        )
        store.gemini_files[file.id] = file
    return gemini_file_object(file, origin, version)


def gemini_file_object(file: GeminiFile, origin: str, version: str) -> dict[str, Any]:
    """A File resource as the API answers it (camelCase, sizeBytes a string, the sha256Hash
    base64 of the hex digest); a generated file's has a downloadUri."""
    created = _rfc3339(file.created_at)
    found = {
        "name": f"files/{file.id}",
        **({"displayName": file.display_name} if file.display_name else {}),
        "mimeType": file.mime_type,
        "sizeBytes": str(len(file.content)),
        "createTime": created,
        "updateTime": created,
        "expirationTime": _rfc3339(file.created_at + 48 * 3600),
        "sha256Hash": base64.b64encode(hashlib.sha256(file.content).hexdigest().encode()).decode(),
        "uri": f"{origin}/{version}/files/{file.id}",
        "state": "ACTIVE",
        "source": file.source,
    }
    if file.source == "GENERATED":
        found["downloadUri"] = f"{origin}/download/{version}/files/{file.id}:download?alt=media"
    return found


def _rfc3339(seconds: float) -> str:
    whole = int(seconds)
    micros = int((seconds - whole) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


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
