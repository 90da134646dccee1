"""Task bodies checked as the provider checks them: message content as a string, an array
of parts or an assistant's null; errors name the field."""

from __future__ import annotations

from typing import Any

import pytest

from batchclient.policy.tokens import chat_prompt_tokens
from gateway.config import default_config
from gateway.requests import BadRequest, parse_task

CFG = default_config()


def parse(body: dict[str, Any], **headers: str) -> Any:
    return parse_task(body, headers, CFG, "background")


def test_content_parts_are_accepted_and_counted_by_their_text() -> None:
    plain = parse({"user": "u", "max_tokens": 8, "messages": [
        {"role": "system", "content": "Classify."}, {"role": "user", "content": "hello there"}]})
    parts = parse({"user": "u", "max_tokens": 8, "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Classify."}]},
        {"role": "user", "content": [{"type": "text", "text": "hello "},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None}]})
    expected = chat_prompt_tokens([{"content": "Classify."}, {"content": "hello there"},
                                   {"content": ""}]) + 8
    assert parts.tokens == expected and plain.tokens < expected  # one more (empty) message
    assert parts.body["messages"][1]["content"][1] == {"type": "text", "text": "there"}


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "user", "content": {"text": "x"}}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": ["x"]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0]"),
    ([{"content": "x"}], "messages[0]"),
])
def test_bad_messages_name_the_field(messages: list[Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse({"user": "u", "messages": messages})
    assert (info.value.code, info.value.param) == ("invalid_messages", param)


def test_a_user_field_that_is_not_a_string_is_named_even_with_the_header() -> None:
    with pytest.raises(BadRequest) as info:
        parse({"user": ["a"], "messages": [{"role": "user", "content": "x"}]},
              **{"X-Ratelab-User": "ann"})
    assert (info.value.code, info.value.param) == ("invalid_user", "user")
    ok = parse({"messages": [{"role": "user", "content": "x"}]}, **{"X-Ratelab-User": "ann"})
    assert ok.user == "ann"
