"""Property test: the model answers any JSON value with an Admission or a 4xx, never raises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.model.config import default_config
from simulator.model.provider import Admission, Provider, Refusal

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
                          "max_completion_tokens", "user", "best_of"])
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
