"""OpenAI wire shapes the shell writes: completion, chunk and embedding bodies, errors, SSE frames.

Pure functions from the model's values to JSON-ready dicts and bytes, so the aiohttp
handlers in ``simulator.server`` only sequence them in time.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from simulator.model.errors import error_body

SYSTEM_FINGERPRINT = "fp_ratelab"
DONE_FRAME = b"data: [DONE]\n\n"

# The message OpenAI sends for an unparsable body; clients match on its start.
INVALID_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON.)"
)
STREAM_ERROR_MESSAGE = "The provider returned an error mid-stream (simulated fault)."


def dumps(value: object) -> bytes:
    """Compact JSON bytes (no spaces), as OpenAI's API writes them."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def sse_frame(value: object) -> bytes:
    """One server-sent event carrying ``value`` as JSON: ``data: {...}\\n\\n``."""
    return b"data: " + dumps(value) + b"\n\n"


def completion_id(admission_id: int) -> str:
    """The ``id`` of a chat completion (and of all its chunks)."""
    return f"chatcmpl-rl{admission_id:010d}"


def usage_dict(usage: Any) -> dict[str, int]:
    """OpenAI's ``usage`` object from the model's Usage value (token counts)."""
    return {
        "prompt_tokens": int(usage.prompt_tokens),
        "completion_tokens": int(usage.completion_tokens),
        "total_tokens": int(usage.total_tokens),
    }


def chat_completion(
    admission_id: int, created: int, model: str, content: str, finish_reason: str, usage: Any
) -> dict[str, Any]:
    """The non-stream ``chat.completion`` body."""
    return {
        "id": completion_id(admission_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_dict(usage),
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


class ChunkWriter:
    """Builds the SSE frames of one streamed completion, in OpenAI's order and shape.

    Every chunk carries ``"usage": null`` when the client asked for usage; the usage
    itself comes last in a chunk with empty ``choices``.
    """

    __slots__ = ("_base", "_include_usage")

    def __init__(self, admission_id: int, created: int, model: str, include_usage: bool) -> None:
        self._base = {
            "id": completion_id(admission_id),
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        self._include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        chunk = dict(self._base)
        chunk["choices"] = [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ]
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def role(self) -> bytes:
        """The first frame: the assistant role with empty content."""
        return sse_frame(self._chunk({"role": "assistant", "content": "", "refusal": None}, None))

    def content(self, text: str) -> bytes:
        """A frame with one piece of content."""
        return sse_frame(self._chunk({"content": text}, None))

    def finish(self, finish_reason: str) -> bytes:
        """The frame with an empty delta and the finish reason."""
        return sse_frame(self._chunk({}, finish_reason))

    def usage(self, usage: Any) -> bytes:
        """The usage frame (empty ``choices``), sent only when ``include_usage``."""
        chunk = dict(self._base)
        chunk["choices"] = []
        chunk["usage"] = usage_dict(usage)
        return sse_frame(chunk)

    def error(self) -> bytes:
        """A mid-stream error frame as OpenRouter sends it: a top-level ``error`` and
        ``finish_reason: "error"``, status staying 200 (the openai SDK raises on it)."""
        chunk = self._chunk({"content": ""}, "error")
        chunk["error"] = error_body(STREAM_ERROR_MESSAGE, "server_error", None,
                                    "server_error")["error"]
        return sse_frame(chunk)


def embedding_inputs(body: object) -> list[object]:
    """The inputs of an embeddings request as a list (one entry per vector)."""
    raw = body.get("input") if isinstance(body, dict) else None
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        return [raw]  # one input given as token ids
    if isinstance(raw, list):
        return list(raw)
    return []


def embedding_vector(item: object, dims: int) -> np.ndarray:
    """A unit float32 vector of ``dims`` that is a deterministic function of the input."""
    digest = hashlib.sha256(dumps(item)).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    vec = rng.standard_normal(dims).astype(np.float32)
    norm = float(np.linalg.norm(vec)) or 1.0
    return vec / np.float32(norm)


def embeddings_body(
    inputs: Sequence[object], dims: int, model: str, usage: Any, encoding_format: str
) -> dict[str, Any]:
    """The ``list`` body of ``POST /v1/embeddings``; base64 is little-endian float32 as OpenAI's."""
    data = []
    for index, item in enumerate(inputs):
        vec = embedding_vector(item, dims)
        encoded: object
        if encoding_format == "base64":
            encoded = base64.b64encode(vec.astype("<f4").tobytes()).decode()
        else:
            encoded = [float(x) for x in vec]
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {
            "prompt_tokens": int(usage.prompt_tokens),
            "total_tokens": int(usage.total_tokens),
        },
    }
