"""The templated wire shapes parse to exactly OpenAI's objects, escapes included."""

from __future__ import annotations

import json

from simulator import wire
from simulator.model.plan import Usage

TRICKY = 'he said "hi"\\ \n\té\x01 🚀'


def test_chat_completion_bytes_are_openai_chat_completion() -> None:
    body = json.loads(wire.chat_completion(42, 1_700_000_000, 'gpt-"4o"', TRICKY, "length",
                                           Usage(3, 4, 7), n=2))
    choice = {"message": {"role": "assistant", "content": TRICKY, "refusal": None},
              "logprobs": None, "finish_reason": "length"}
    assert body == {
        "id": "chatcmpl-rl0000000042", "object": "chat.completion", "created": 1_700_000_000,
        "model": 'gpt-"4o"', "choices": [{"index": 0, **choice}, {"index": 1, **choice}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        "system_fingerprint": "fp_ratelab",
    }


def test_chunk_frames_are_openai_chunks_in_order() -> None:
    writer = wire.ChunkWriter(7, 1_700_000_000, "m", include_usage=True, n=1)
    raw = (writer.role() + writer.content(TRICKY) + writer.finish("stop")
           + writer.usage(Usage(3, 1, 4)) + wire.DONE_FRAME).decode()
    frames = [f.removeprefix("data: ") for f in raw.split("\n\n")[:-1]]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    base = {"id": "chatcmpl-rl0000000007", "object": "chat.completion.chunk",
            "created": 1_700_000_000, "model": "m", "system_fingerprint": "fp_ratelab"}

    def chunk(delta: dict[str, object], reason: str | None) -> dict[str, object]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": reason}], "usage": None}

    assert chunks == [
        chunk({"role": "assistant", "content": "", "refusal": None}, None),
        chunk({"content": TRICKY}, None),
        chunk({}, "stop"),
        {**base, "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
    ]


def test_error_frame_has_top_level_error_and_finish_reason_error() -> None:
    frame = json.loads(wire.ChunkWriter(1, 0, "m", include_usage=False).error()[6:])
    assert frame["error"]["type"] == "server_error"
    assert frame["choices"][0]["finish_reason"] == "error"
    assert "usage" not in frame
