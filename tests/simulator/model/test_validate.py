"""Property tests: the model answers any JSON value with an Admission or a 4xx, never raises;
the one-pass reading of common bodies agrees with the full validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.model.config import default_config
from simulator.model.provider import Admission, Provider, Refusal
from simulator.model.validate import parse_chat

PROVIDER = Provider(default_config().providers[0], seed=0)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**7) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(["model", "messages", "max_tokens", "n", "stream", "stream_options",
                          "temperature", "stop", "input", "dimensions", "encoding_format",
                          "max_completion_tokens", "user", "best_of", "response_format",
                          "tools", "tool_choice"])
near_valid = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o-mini", "text-embedding-3-small", "nope"]),
     "messages": st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["user", "system", "assistant", "robot"]),
          "content": json_values}), max_size=3)},
).flatmap(lambda base: st.dictionaries(fields, json_values, max_size=3).map(
    lambda extra: {**base, **extra}))


@settings(max_examples=400, deadline=None)
@given(body=st.one_of(json_values, near_valid), key=st.sampled_from(["sk-ratelab", None, "x"]))
def test_any_body_gets_an_admission_or_a_client_error(body: object, key: str | None) -> None:
    for call in (PROVIDER.chat, PROVIDER.embeddings):
        result = call(1.0, key, body)
        if isinstance(result, Refusal):
            assert 400 <= result.status < 500, result
            assert isinstance(result.body["error"]["message"], str)
        else:
            assert isinstance(result, Admission) and result.plan is not None
            PROVIDER.finish(1.0, result, len(result.plan.chunks))


def _mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` values most of the time, else the edges and wrong types checks refuse."""
    edges: st.SearchStrategy = st.sampled_from(
        [None, 0, 1, 2, 128, 129, 10**9, 10**9 + 1, -1, True, False, 1.5, 2.5, -0.1,
         float("nan"), "1", [1], {}])
    return st.one_of(valid, valid, valid, valid, valid, edges)


texts = st.text(max_size=6)
plain_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o-mini"] * 4 + ["gpt-4o", 7]),
     "messages": st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["user"] * 6 + ["system", "assistant", "robot", None]),
          "content": _mostly(texts | st.just([{"type": "text", "text": "ab"}]))}),
         max_size=3)},
    optional={"max_tokens": _mostly(st.integers(1, 130)),
              "max_completion_tokens": _mostly(st.integers(1, 130)),
              "n": _mostly(st.integers(1, 130)), "stream": _mostly(st.booleans()),
              "temperature": _mostly(st.floats(0.0, 2.0) | st.integers(0, 2)),
              "top_p": _mostly(st.floats(0.0, 1.0)), "seed": _mostly(st.integers()),
              "user": _mostly(texts),
              "stream_options": _mostly(st.fixed_dictionaries(
                  {}, optional={"include_usage": _mostly(st.booleans())}))},
)


@settings(max_examples=600, deadline=None)
@given(plain_bodies)
def test_common_bodies_read_in_one_pass_as_the_full_validation_reads_them(body: dict) -> None:
    # presence_penalty 0 changes nothing but takes the body off the one-pass reading
    assert parse_chat(body) == parse_chat({**body, "presence_penalty": 0})


_PROBES = [None, 0, 1, 2, 16, 128, 129, 10**9, 10**9 + 1, -1, True, False, 0.0, 0.5, 1.0, 1.5,
           1.05, 2.0, 2.05, 2.5, -0.1, float("nan"), "", "1", "user", [], [1], {},
           {"include_usage": True}, {"include_usage": False}, {"include_usage": 1},
           {"include_usage": None}, {"x": 1}]
_MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
_BASE = {"model": "gpt-4o-mini", "messages": _MESSAGES}


@pytest.mark.parametrize("field", ["model", "messages", "max_tokens", "max_completion_tokens",
                                   "n", "stream", "stream_options", "temperature", "top_p",
                                   "seed", "user", "role", "content"])
def test_each_plain_field_at_its_edges_reads_as_the_full_validation(field: str) -> None:
    for value in _PROBES:
        for stream in (None, True):
            body: dict = dict(_BASE) if stream is None else {**_BASE, "stream": stream}
            if field in ("role", "content"):
                body["messages"] = [_MESSAGES[0], {**_MESSAGES[1], field: value}]
            else:
                body[field] = value
            assert parse_chat(body) == parse_chat({**body, "presence_penalty": 0}), body


def test_a_role_of_the_wrong_type_is_a_400_not_a_crash() -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": ["user"], "content": "hi"}]}
    error = parse_chat(body)
    assert isinstance(error, dict)
    assert (error["error"]["param"], error["error"]["code"]) == ("messages[0].role",
                                                                 "invalid_type")
