"""OpenAI wire shapes the shell writes: completion, chunk and embedding bodies, errors, SSE frames.

Pure functions from the model's values to JSON-ready dicts and bytes, so the aiohttp
handlers in ``simulator.server`` only sequence them in time.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
from collections.abc import Sequence
from typing import Any

from simulator.model.errors import error_body
from simulator.model.responder import embedding_vector

SYSTEM_FINGERPRINT = "fp_ratelab"
DONE_FRAME = b"data: [DONE]\n\n"

# The message OpenAI sends for an unparsable body; clients match on its start.
INVALID_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON.)"
)
STREAM_ERROR_MESSAGE = "The provider returned an error mid-stream (simulated fault)."


# A JSON string literal (quotes and escapes), C-accelerated.
_string = json.encoder.encode_basestring

# One encoder for every reply: json.dumps with non-default options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(value: object) -> bytes:
    """Compact JSON bytes (no spaces), as OpenAI's API writes them."""
    return _ENCODER.encode(value).encode()


def sse_frame(value: object) -> bytes:
    """One server-sent event carrying ``value`` as JSON: ``data: {...}\\n\\n``."""
    return b"data: " + dumps(value) + b"\n\n"


def completion_id(admission_id: int) -> str:
    """The ``id`` of a chat completion (and of all its chunks)."""
    return f"chatcmpl-rl{admission_id:010d}"


def tool_call_id(admission_id: int) -> str:
    """The ``id`` of the tool call a tool-call reply makes (one per reply)."""
    return f"call_rl{admission_id:010d}"


def usage_dict(usage: Any) -> dict[str, int]:
    """OpenAI's ``usage`` object from the model's Usage value (token counts)."""
    return {
        "prompt_tokens": int(usage.prompt_tokens),
        "completion_tokens": int(usage.completion_tokens),
        "total_tokens": int(usage.total_tokens),
    }


# JSON literals of the few strings every reply repeats (model names, finish reasons).
@functools.lru_cache(maxsize=1024)
def _literal(value: str) -> str:
    """``_string(value)``, memoised for the handful of values a server repeats."""
    return _string(value)


def chat_completion(
    admission_id: int, created: int, model: str, content: str, finish_reason: str, usage: Any,
    n: int = 1, tool_call: str | None = None,
) -> bytes:
    """The non-stream ``chat.completion`` body as JSON bytes; ``n`` choices carry the same
    content. Written from a template: it is the simulator's hottest path. With
    ``tool_call`` the message calls that function, ``content`` being its arguments."""
    text = _string(content)
    if tool_call is not None:
        # the message's content is null and its one call carries the text: the template's
        # ``"content":{text}`` spliced with the call
        text = ('null,"tool_calls":[{"id":"' + tool_call_id(admission_id) + '",'
                '"type":"function","function":{"name":' + _string(tool_call)
                + ',"arguments":' + text + "}}]")
    reason = _literal(finish_reason)
    head = (f'{{"id":"chatcmpl-rl{admission_id:010d}","object":"chat.completion",'
            f'"created":{int(created)},"model":{_literal(model)},')
    tail = (f'"usage":{{"prompt_tokens":{int(usage.prompt_tokens)},'
            f'"completion_tokens":{int(usage.completion_tokens)},'
            f'"total_tokens":{int(usage.total_tokens)}}},'
            f'"system_fingerprint":"{SYSTEM_FINGERPRINT}"}}')
    if n == 1:  # the usual reply: one template, no generator and join
        return (f'{head}"choices":[{{"index":0,"message":{{"role":"assistant","content":{text},'
                f'"refusal":null}},"logprobs":null,"finish_reason":{reason}}}],{tail}').encode()
    choices = ",".join(
        f'{{"index":{i},"message":{{"role":"assistant","content":{text},'
        f'"refusal":null}},"logprobs":null,"finish_reason":{reason}}}'
        for i in range(n)
    )
    return f'{head}"choices":[{choices}],{tail}'.encode()


class ChunkWriter:
    """Builds the SSE frames of one streamed completion, in OpenAI's order and shape.

    With ``n`` choices each step writes one chunk per choice index. Every chunk carries
    ``"usage": null`` when the client asked for usage; the usage itself comes last in a
    chunk with empty ``choices``.
    """

    __slots__ = ("_base", "_include_usage", "_n", "_prefix", "_suffix")

    def __init__(self, admission_id: int, created: int, model: str, include_usage: bool,
                 n: int = 1) -> None:
        self._base = {
            "id": completion_id(admission_id),
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        self._include_usage = include_usage
        self._n = n
        # content frames are the bulk of a stream: prefix and suffix rendered once
        self._prefix = (
            f'data: {{"id":"{completion_id(admission_id)}","object":"chat.completion.chunk",'
            f'"created":{int(created)},"model":{_string(model)},'
            f'"system_fingerprint":"{SYSTEM_FINGERPRINT}","choices":[{{"index":'
        )
        self._suffix = ',"usage":null}\n\n' if include_usage else "}\n\n"

    def _chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None
               ) -> dict[str, Any]:
        chunk = dict(self._base)
        chunk["choices"] = [
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ]
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def _each(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        return b"".join(sse_frame(self._chunk(i, delta, finish_reason)) for i in range(self._n))

    def role(self) -> bytes:
        """The first frame(s): the assistant role with empty content."""
        return self._each({"role": "assistant", "content": "", "refusal": None}, None)

    def tool_start(self, name: str, call_id: str) -> bytes:
        """The first frame(s) of a tool-call reply: the role and the call, no arguments yet."""
        return self._each({"role": "assistant", "content": None, "tool_calls": [{
            "index": 0, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": ""}}], "refusal": None}, None)

    def tool_arguments(self, text: str) -> bytes:
        """Frame(s) with one piece of a tool call's arguments."""
        return self._each({"tool_calls": [{"index": 0, "function": {"arguments": text}}]},
                          None)

    def content(self, text: str) -> bytes:
        """Frame(s) with one piece of content."""
        middle = (f',"delta":{{"content":{_string(text)}}},"logprobs":null,'
                  f'"finish_reason":null}}]')
        return "".join(f"{self._prefix}{i}{middle}{self._suffix}"
                       for i in range(self._n)).encode()

    def finish(self, finish_reason: str) -> bytes:
        """Frame(s) with an empty delta and the finish reason."""
        return self._each({}, finish_reason)

    def usage(self, usage: Any) -> bytes:
        """The usage frame (empty ``choices``), sent only when ``include_usage``."""
        chunk = dict(self._base)
        chunk["choices"] = []
        chunk["usage"] = usage_dict(usage)
        return sse_frame(chunk)

    def error(self) -> bytes:
        """A mid-stream error frame as OpenRouter sends it: a top-level ``error`` and
        ``finish_reason: "error"``, status staying 200 (the openai SDK raises on it)."""
        chunk = self._chunk(0, {"content": ""}, "error")
        chunk["error"] = error_body(STREAM_ERROR_MESSAGE, "server_error", None,
                                    "server_error")["error"]
        return sse_frame(chunk)


def embeddings_body(
    inputs: Sequence[str], dims: int, model: str, usage: Any, encoding_format: str
) -> dict[str, Any]:
    """The ``list`` body of ``POST /v1/embeddings``: the model's deterministic vector per
    input; base64 is little-endian float32, as OpenAI sends it."""
    data = []
    for index, text in enumerate(inputs):
        vec = embedding_vector(text, dims)
        encoded: object = vec
        if encoding_format == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
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
