"""Structured replies: JSON mode, JSON schema instances and tool calls, their 400s, and the
prompt tokens their definitions add."""

from __future__ import annotations

import datetime
import json
import random
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.model.config import ResponderSpec
from simulator.model.errors import Invalid
from simulator.model.provider import Admission
from simulator.model.responder import expected_code
from simulator.model.structured import (
    JSON_OBJECT,
    JSON_SCHEMA,
    TOOL_CALL,
    Output,
    instance,
    read_shape,
    structured_reply,
)
from simulator.model.tokens import text_tokens
from tests.simulator.model.sim_model_helpers import admitted, chat, provider, refused

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now"}}
USER = [{"role": "user", "content": "hi"}]


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _error(body: dict) -> tuple[str | None, str]:
    with pytest.raises(Invalid) as caught:
        read_shape(body, [m["content"] for m in body.get("messages", USER)])
    error = caught.value.body["error"]
    assert error["type"] == "invalid_request_error"
    return error["param"], error["message"]


def test_which_tool_a_reply_calls() -> None:
    tools = [WEATHER, CLOCK]
    shape = read_shape({"messages": USER, "tools": tools}, ["hi"])
    assert shape.output == Output(TOOL_CALL, WEATHER["function"]["parameters"], "get_weather")
    assert shape.definition_tokens == text_tokens(_compact(tools))
    named = read_shape({"messages": USER, "tools": tools,
                        "tool_choice": {"type": "function", "function": {"name": "now"}}}, [])
    assert named.output == Output(TOOL_CALL, {"type": "object", "properties": {}}, "now")
    assert read_shape({"messages": USER, "tools": tools, "tool_choice": "required"},
                      []).output == shape.output
    assert read_shape({"messages": USER, "tools": tools, "tool_choice": "none"},
                      []).output is None
    # after the tool's result, ``auto`` answers in text: an agent loop ends
    answered = [*USER, {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "tool", "tool_call_id": "x", "content": "12 C"}]
    assert read_shape({"messages": answered, "tools": tools}, []).output is None
    assert read_shape({"messages": answered, "tools": tools, "tool_choice": "required"},
                      []).output == shape.output


def test_response_formats() -> None:
    assert read_shape({"response_format": {"type": "text"}}, ["hi"]).output is None
    assert read_shape({"response_format": {"type": "json_object"}},
                      ["Answer in JSON"]).output == Output(JSON_OBJECT)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    shape = read_shape({"response_format": {"type": "json_schema", "json_schema": {
        "name": "thing", "schema": schema, "strict": True}}}, ["hi"])
    assert shape == type(shape)(Output(JSON_SCHEMA, schema, "thing"),
                                text_tokens(_compact(schema)))


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"response_format": {"type": "json_object"}}, "messages", "must contain the word 'json'"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "Supported values"),
    ({"response_format": "json"}, "response_format", "expected an object"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "Missing required parameter"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
     "response_format.json_schema.name", "got 'a b'"),
    ({"tool_choice": "auto"}, "tool_choice", "only allowed when 'tools' are specified"),
    ({"tools": []}, "tools", "empty array"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "Missing required"),
    ({"tools": [WEATHER, {"type": "retrieval"}]}, "tools[1].type", "type 'function'"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "given twice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice.function.name", "no function named 'x'"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "expected 'none'"),
])
def test_malformed_shapes_are_400s_naming_the_parameter(body: dict, param: str,
                                                        words: str) -> None:
    got_param, message = _error({"messages": USER, **body})
    assert got_param == param
    assert words in message


def test_an_instance_keeps_types_enums_bounds_and_formats() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "exclusiveMinimum": 5, "maximum": 7},
            "x": {"type": "number", "minimum": 0.333, "maximum": 0.334},
            "flag": {"type": "boolean"},
            "colour": {"enum": ["red", "blue"]},
            "fixed": {"const": 42},
            "when": {"type": "string", "format": "date"},
            "at": {"type": "string", "format": "date-time"},
            "uid": {"type": "string", "format": "uuid"},
            "mail": {"type": "string", "format": "email"},
            "short": {"type": "string", "minLength": 40, "maxLength": 40},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 4,
                     "maxItems": 4},
            "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "either": {"type": ["integer", "null"]},
            "part": {"$ref": "#/$defs/Part"},
        },
        "$defs": {"Part": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    for seed in range(30):
        value = instance(schema, random.Random(seed))
        assert isinstance(value, dict)
        assert list(value) == list(schema["properties"])  # type: ignore[call-overload]
        assert type(value["n"]) is int and 6 <= value["n"] <= 7
        assert 0.333 <= value["x"] <= 0.334
        assert type(value["flag"]) is bool
        assert value["colour"] in ("red", "blue")
        assert value["fixed"] == 42
        datetime.date.fromisoformat(value["when"])
        datetime.datetime.fromisoformat(value["at"])
        assert uuid.UUID(value["uid"]).version == 4
        assert "@" in value["mail"]
        assert len(value["short"]) == 40
        assert len(value["tags"]) == 4 and all(isinstance(t, str) for t in value["tags"])
        assert isinstance(value["maybe"], str)
        assert type(value["either"]) is int
        assert isinstance(value["part"]["name"], str)
    assert instance(schema, random.Random(3)) == instance(schema, random.Random(3))


def test_recursive_and_degenerate_schemas_end() -> None:
    tree = {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "properties": {
        "label": {"type": "string"},
        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}}}

    def depth(node: dict) -> int:
        return 1 + max((depth(c) for c in node["children"]), default=0)

    assert 1 < depth(instance(tree, random.Random(1))) <= 4  # type: ignore[arg-type]
    # an object that must hold itself, and nested arrays asking for 10**12 values
    assert instance({"type": "object", "properties": {"me": {"$ref": "#"}}},
                    random.Random(0)) is not None
    huge = {"type": "array", "minItems": 10**6, "items": {
        "type": "array", "minItems": 10**6, "items": {"type": "integer"}}}
    value = instance(huge, random.Random(0))
    assert isinstance(value, list) and len(json.dumps(value)) < 200_000
    # bounds that are no numbers, or too large for a float, are ignored
    odd = instance({"type": "integer", "minimum": float("inf"), "maximum": 10**400},
                   random.Random(0))
    assert isinstance(odd, int) and 0 <= odd <= 100


def test_replies_in_each_shape() -> None:
    lorem = ResponderSpec(kind="lorem")
    call = structured_reply(Output(TOOL_CALL, WEATHER["function"]["parameters"],
                                   "get_weather"), lorem, random.Random(0), "hi", None)
    assert (call.tool, call.finish_reason) == ("get_weather", "tool_calls")
    arguments = json.loads(call.text)
    assert set(arguments) == {"city", "unit", "days"} and arguments["unit"] in ("c", "f")
    cut = structured_reply(Output(TOOL_CALL, WEATHER["function"]["parameters"],
                                  "get_weather"), lorem, random.Random(0), "hi", 3)
    assert (cut.text, cut.finish_reason, cut.tool) == (call.text[:12], "length", "get_weather")
    wrapped = structured_reply(Output(JSON_OBJECT), lorem, random.Random(0), "hi", None)
    assert (set(json.loads(wrapped.text)), wrapped.finish_reason, wrapped.tool) == (
        {"text"}, "stop", None)
    codes = ("A", "B", "C")
    batch = ResponderSpec(kind="batch_json", codes=codes)
    prompt = "Label these in JSON.\nid=1: red apple\nid=2: blue sky"
    answer = json.loads(structured_reply(Output(JSON_OBJECT), batch, random.Random(0),
                                         prompt, None).text)
    assert answer == {"results": [{"id": 1, "c": expected_code("red apple", codes)},
                                  {"id": 2, "c": expected_code("blue sky", codes)}]}


ANSWERS = {"type": "object", "properties": {
    "results": {"type": "array", "items": {"$ref": "#/$defs/Answer"}},
    "note": {"type": "string"}},
    "required": ["results", "note"], "additionalProperties": False,
    "$defs": {"Answer": {"type": "object", "properties": {
        "id": {"type": "integer"}, "c": {"type": "string", "enum": ["A", "B", "C"]}},
        "required": ["id", "c"], "additionalProperties": False}}}
ITEMS = [("7", "red apple"), ("8", "blue sky"), ("x9", "green tree"), ("10", "grey cloud")]
BATCH_PROMPT = "Label these.\n" + "\n".join(f"id={i}: {t}" for i, t in ITEMS)


def test_a_schema_held_batch_reply_carries_the_items_codes() -> None:
    codes = ("A", "B", "C")
    batch = ResponderSpec(kind="batch_json", codes=codes)
    reply = structured_reply(Output(JSON_SCHEMA, ANSWERS, "answers"), batch,
                             random.Random(0), BATCH_PROMPT, None)
    answer = json.loads(reply.text)
    assert reply.finish_reason == "stop" and set(answer) == {"results", "note"}
    # an integer id where the id is all digits, a string where it cannot be one
    assert answer["results"] == [{"id": int(i) if i.isdigit() else i,
                                  "c": expected_code(t, codes)} for i, t in ITEMS]
    assert isinstance(answer["note"], str)
    # a string id, codes named by another enum (at the code's place in the taxonomy),
    # another property drawn within its bounds, the array at the root
    other = {"type": "array", "items": {"type": "object", "properties": {
        "item_id": {"type": "string"}, "label": {"enum": ["red", "green", "blue"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1}}}}
    rows = json.loads(structured_reply(Output(JSON_SCHEMA, other, "rows"), batch,
                                       random.Random(0), BATCH_PROMPT, None).text)
    names = {"A": "red", "B": "green", "C": "blue"}
    assert [(r["item_id"], r["label"]) for r in rows] == [
        (i, names[expected_code(t, codes)]) for i, t in ITEMS]
    assert all(0 <= r["score"] <= 1 for r in rows)
    # cut at max_tokens as any reply is
    cut = structured_reply(Output(JSON_SCHEMA, ANSWERS, "answers"), batch, random.Random(0),
                           BATCH_PROMPT, 5)
    assert (cut.text, cut.finish_reason) == (reply.text[:20], "length")
    # a schema with no array of objects holding an id gets a plain instance
    plain = {"type": "object", "properties": {"summary": {"type": "string"}}}
    assert set(json.loads(structured_reply(Output(JSON_SCHEMA, plain, "s"), batch,
                                           random.Random(0), BATCH_PROMPT, None).text)) == {
        "summary"}


def test_a_schema_held_batch_reply_keeps_the_id_faults_not_the_text_ones() -> None:
    codes = ("A", "B", "C")
    sent = {int(i) if i.isdigit() else i for i, _ in ITEMS}
    faults = ResponderSpec(kind="batch_json", codes=codes, drop_item_rate=0.3,
                           repeat_id_rate=0.5, invent_id_rate=0.5, malformed_json_rate=1.0,
                           truncate_rate=1.0)
    seen = {"dropped": 0, "repeated": 0, "invented": 0}
    for seed in range(40):
        reply = structured_reply(Output(JSON_SCHEMA, ANSWERS, "answers"), faults,
                                 random.Random(seed), BATCH_PROMPT, None)
        # always whole JSON in the schema's shape: a schema-held reply is never malformed
        # nor wrapped in prose, whatever those rates
        assert reply.finish_reason == "stop"
        ids = [r["id"] for r in json.loads(reply.text)["results"]]
        seen["dropped"] += len(sent - set(ids)) > 0
        seen["repeated"] += len(ids) != len(set(ids))
        seen["invented"] += len(set(ids) - sent) > 0
    assert all(count > 0 for count in seen.values()), seen


def test_the_provider_bills_definitions_and_plans_the_call() -> None:
    p = provider("name: t\nresponder: {output_tokens: 5}\n")
    plain = admitted(p.chat(0.0, "k", chat("hi")))
    tooled = admitted(p.chat(0.0, "k", chat("hi", tools=[WEATHER])))
    assert plain.plan is not None and tooled.plan is not None
    assert (tooled.plan.usage.prompt_tokens - plain.plan.usage.prompt_tokens
            == text_tokens(_compact([WEATHER])))
    assert tooled.plan.tool_call == "get_weather" and plain.plan.tool_call is None
    assert tooled.plan.finish_reason == "tool_calls"
    assert tooled.plan.usage.completion_tokens == text_tokens(tooled.plan.text)
    again = provider("name: t\nresponder: {output_tokens: 5}\n")
    admitted(again.chat(0.0, "k", chat("hi")))
    same = admitted(again.chat(0.0, "k", chat("hi", tools=[WEATHER])))
    assert same.plan is not None and same.plan.text == tooled.plan.text  # seeded
    bad = refused(p.chat(0.0, "k", chat("hi", response_format={"type": "json_object"})))
    assert (bad.status, bad.body["error"]["param"]) == (400, "messages")
    # the calls an assistant message made are prompt tokens of the next request
    follow = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": None, "tool_calls": [{
                  "id": "c1", "type": "function",
                  "function": {"name": "get_weather", "arguments": tooled.plan.text}}]},
              {"role": "tool", "tool_call_id": "c1", "content": "12 C"}]
    answer = admitted(p.chat(0.0, "k", {"model": "m", "messages": follow, "tools": [WEATHER]}))
    assert answer.plan is not None and answer.plan.tool_call is None
    assert answer.plan.usage.prompt_tokens == (
        3 + 3 * 3 + text_tokens("hi") + text_tokens("get_weather" + tooled.plan.text)
        + text_tokens("12 C") + text_tokens(_compact([WEATHER])))


_schema_words = st.sampled_from(
    ["type", "properties", "items", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
     "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems",
     "minLength", "maxLength", "format", "$defs", "required"])
_schema_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(), st.sampled_from(
        ["object", "array", "string", "integer", "number", "boolean", "null", "date",
         "uuid", "#", "#/$defs/a", "#/properties", ["integer", "null"]]))
schemas = st.recursive(
    _schema_values,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(_schema_words | st.text(max_size=3), inner, max_size=4),
    max_leaves=16)


@settings(max_examples=300, deadline=None)
@given(parameters=schemas, fmt=schemas, choice=st.sampled_from(
    [None, "auto", "none", "required", {"type": "function", "function": {"name": "f"}}]))
def test_any_schema_gets_an_answer_or_a_400_never_an_exception(
        parameters: object, fmt: object, choice: object) -> None:
    p = provider("name: t\nresponder: {output_tokens: 5}\n")
    for body in (
        chat("json", tools=[{"type": "function", "function": {
            "name": "f", "parameters": parameters}}], tool_choice=choice),
        chat("json", response_format={"type": "json_schema", "json_schema": {
            "name": "s", "schema": fmt}}),
    ):
        result = p.chat(0.0, "k", body)
        if isinstance(result, Admission):
            assert result.plan is not None
            shaped = result.plan.tool_call is not None or "response_format" in body
            if shaped and result.plan.finish_reason != "length":
                json.loads(result.plan.text)
        else:
            assert result.status == 400, result
