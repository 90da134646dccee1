"""Wire formats: Go-style durations, RFC 3339 times, retry headers, tokenizer."""

from __future__ import annotations

import pytest

from simulator.model.billing import format_usd
from simulator.model.headers import format_duration, retry_headers, rfc3339
from simulator.model.tokens import chat_prompt_tokens, split_chunks, text_tokens


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0s"), (0.02, "20ms"), (0.0061, "7ms"), (1.0, "1s"), (1.574, "1.574s"),
    (360.0, "6m0s"), (90.5, "1m30.5s"), (3600.0, "1h0m0s"), (-3.0, "0s"),
])
def test_format_duration_like_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_retry_headers_are_wall_clock_and_round_up() -> None:
    assert retry_headers(1.5, 1.0) == {"retry-after": "2", "retry-after-ms": "1500"}
    assert retry_headers(60.0, 60.0) == {"retry-after": "1", "retry-after-ms": "1000"}
    assert retry_headers(0.0001, 1.0) == {"retry-after": "1", "retry-after-ms": "1"}


def test_rfc3339() -> None:
    assert rfc3339(1_700_000_000.0) == "2023-11-14T22:13:20Z"
    assert rfc3339(1_700_000_000.2) == "2023-11-14T22:13:21Z"  # never earlier than the reset


def test_usd_strings() -> None:
    assert format_usd(0.000208) == "0.000208"
    assert format_usd(0.0) == "0"
    assert format_usd(-0.00004) == "-0.00004"


def test_ratelab_tokenizer() -> None:
    assert [text_tokens(s) for s in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]
    assert chat_prompt_tokens(["x" * 2800, "hello"]) == 3 + 3 + 700 + 3 + 2
    assert split_chunks("abcdefghij") == ("abcd", "efgh", "ij")
