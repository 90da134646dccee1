"""Structured replies: ``response_format`` (JSON mode, JSON schema) and forced tool calls.

A request that asks for a shape gets it, as the openai SDK's ``parse`` helpers and an
agent's tool loop expect: a JSON object in JSON mode, an instance of the schema for
``json_schema``, a call of the chosen function with arguments that fit its parameters.
Which tool is called:

* ``tool_choice`` ``"required"``: the first tool; ``{"type": "function", "function":
  {"name": N}}``: tool ``N``; ``"none"``: no call, a text reply;
* ``"auto"`` (the default when tools are given): the first tool, unless the last message
  is a tool's result, which the model then answers in text (so an agent loop ends).

Values are drawn from the provider's seeded reply RNG: the same seed gives the same
arguments. Definitions (tools, a schema) count towards the prompt's tokens as their
compact JSON text, as a provider bills the text it is sent.
"""

from __future__ import annotations

import json
import math
import random
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from simulator.model.config import ResponderSpec
from simulator.model.errors import Invalid, invalid_request
from simulator.model.responder import _LOREM_WORDS, Reply, batch_answers, cut, respond
from simulator.model.tokens import text_tokens

JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"
TOOL_CALL = "tool_call"

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WORDS = _LOREM_WORDS.split()
# a recursive schema (a tree of nodes) stops growing here: arrays get their fewest items
# and a nullable value is null
_MAX_DEPTH = 6
# a schema that still asks for more (a required property referring to its own object,
# nested arrays with large minItems) gets null past these: no reply is worth unbounded work
_HARD_DEPTH = 32
_MAX_VALUES = 10_000
_MAX_STRING = 10_000  # characters


def _refused(message: str, param: str | None, code: str | None = "invalid_value") -> Invalid:
    """The 400 of a malformed ``response_format``, ``tools`` or ``tool_choice``."""
    return Invalid(invalid_request(message, param, code))


@dataclass(frozen=True, slots=True)
class Output:
    """The shape a reply must take: ``kind`` is ``json_object``, ``json_schema`` (an
    instance of ``schema``) or ``tool_call`` (a call of ``name`` whose arguments are an
    instance of ``schema``, the function's parameters)."""

    kind: str
    schema: Mapping[str, object] | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class Shape:
    """What a request's structured fields ask: the reply's shape (None: free text) and the
    prompt tokens its definitions add."""

    output: Output | None
    definition_tokens: int


def read_shape(body: Mapping[str, object], texts: Sequence[str]) -> Shape:
    """The shape ``body`` asks for, its messages' texts being ``texts``; raises
    ``errors.Invalid`` (its 400 body naming the parameter at fault)."""
    tokens = 0
    output = None
    fmt = body.get("response_format")
    if fmt is not None:
        output, tokens = _response_format(fmt, texts)
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice is not None:
            raise _refused("Invalid value for 'tool_choice': 'tool_choice' is only allowed "
                           "when 'tools' are specified.", "tool_choice", None)
        return Shape(output, tokens)
    functions = _tools(tools)
    tokens += text_tokens(_compact(tools))
    called = _chosen(choice, functions, body.get("messages"))
    if called is not None:
        output = Output(TOOL_CALL, functions[called], called)
    return Shape(output, tokens)


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _response_format(fmt: object, texts: Sequence[str]) -> tuple[Output | None, int]:
    if not isinstance(fmt, dict):
        raise _refused("Invalid type for 'response_format': expected an object.",
                       "response_format", "invalid_type")
    kind = fmt.get("type")
    if kind == "text":
        return None, 0
    if kind == JSON_OBJECT:
        if not any("json" in text.lower() for text in texts):
            raise _refused("'messages' must contain the word 'json' in some form, to use "
                           "'response_format' of type 'json_object'.", "messages", None)
        return Output(JSON_OBJECT), 0
    if kind == JSON_SCHEMA:
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _refused("Missing required parameter: 'response_format.json_schema'.",
                           "response_format.json_schema", "missing_required_parameter")
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _refused(
                "Invalid 'response_format.json_schema.name': expected a string of 1 to 64 "
                f"letters, digits, underscores or dashes, got {name!r}.",
                "response_format.json_schema.name")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise _refused("Invalid type for 'response_format.json_schema.schema': "
                           "expected an object.", "response_format.json_schema.schema",
                           "invalid_type")
        return Output(JSON_SCHEMA, schema, name), text_tokens(_compact(schema))
    raise _refused(f"Invalid value: {kind!r}. Supported values are: 'text', "
                   "'json_object', and 'json_schema'.", "response_format.type")


def _tools(tools: object) -> dict[str, Mapping[str, object]]:
    """Each function's name and parameters schema, in the order given."""
    if not isinstance(tools, list):
        raise _refused("Invalid type for 'tools': expected an array.", "tools",
                       "invalid_type")
    if not tools:
        raise _refused("Invalid 'tools': empty array. Expected an array with minimum "
                       "length 1, but got an empty array instead.", "tools", "empty_array")
    functions: dict[str, Mapping[str, object]] = {}
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _refused(f"Invalid '{param}': expected an object with type 'function'.",
                           f"{param}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _refused(f"Missing required parameter: '{param}.function'.",
                           f"{param}.function", "missing_required_parameter")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _refused(
                f"Invalid '{param}.function.name': expected a string of 1 to 64 letters, "
                f"digits, underscores or dashes, got {name!r}.", f"{param}.function.name")
        if name in functions:
            raise _refused(f"Invalid 'tools': the function name {name!r} is given twice.",
                           f"{param}.function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise _refused(f"Invalid type for '{param}.function.parameters': expected an "
                           "object.", f"{param}.function.parameters", "invalid_type")
        functions[name] = parameters
    return functions


def _chosen(choice: object, functions: Mapping[str, object], messages: object) -> str | None:
    """The function the reply calls, or None for a text reply."""
    first = next(iter(functions))
    if choice is None or choice == "auto":
        last = messages[-1] if isinstance(messages, list) and messages else None
        answered = isinstance(last, dict) and last.get("role") in ("tool", "function")
        return None if answered else first
    if choice == "none":
        return None
    if choice == "required":
        return first
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise _refused("Missing required parameter: 'tool_choice.function.name'.",
                           "tool_choice.function.name", "missing_required_parameter")
        if name not in functions:
            raise _refused(f"Invalid 'tool_choice': no function named {name!r} is in "
                           "'tools'.", "tool_choice.function.name")
        return name
    raise _refused("Invalid value for 'tool_choice': expected 'none', 'auto', 'required' "
                   "or an object naming a function.", "tool_choice")


# ----------------------------------------------------------------------- the reply


def structured_reply(output: Output, spec: ResponderSpec, rng: random.Random,
                     last_user_text: str, max_tokens: int | None) -> Reply:
    """The reply in ``output``'s shape, cut at ``max_tokens`` (finish ``length``).

    JSON mode wraps what the responder would say: a ``batch_json`` array as
    ``{"results": [...]}``, any other text as ``{"text": "..."}``."""
    if output.kind == JSON_OBJECT:
        said = respond(spec, rng, last_user_text, None).text
        wrapped = (batch_object(said) if spec.kind == "batch_json"
                   else '{"text":' + _compact(said) + "}")
        return cut(wrapped, max_tokens)
    schema = output.schema or {}
    if output.kind == JSON_SCHEMA and spec.kind == "batch_json":
        filled = batch_instance(schema, batch_answers(spec, rng, last_user_text),
                                spec.codes, rng)
        if filled is not None:
            return cut(_compact(filled), max_tokens)
    text = _compact(instance(schema, rng))
    if output.kind == JSON_SCHEMA:
        return cut(text, max_tokens)
    reply = cut(text, max_tokens)
    finish = "tool_calls" if reply.finish_reason == "stop" else reply.finish_reason
    return Reply(reply.text, finish, output.name)


# the property of an answer object that holds the item's id; the first other string
# property holds its code
_ID_NAMES = ("id", "item_id", "itemId")


def batch_instance(schema: Mapping[str, object], answers: Sequence[tuple[int | str, str]],
                   codes: Sequence[str], rng: random.Random) -> object | None:
    """An instance of ``schema`` carrying a ``batch_json`` reply's ``answers`` (id, code),
    as a model held to the schema writes them: its first array of objects that have an id
    property (``id``, ``item_id`` or ``itemId``), at the root or a property of the root
    object, gets one object per answer, with the id (as the property's type asks) and the
    code in the object's first other string property. A code the property's ``enum`` does
    not hold is the enum's value at the code's place in the taxonomy. Every other value is
    drawn as ``instance`` draws it. None when the schema has no such array."""
    drawer = _Drawer(rng, schema)
    root = _plain(schema, schema)
    fields = _answer_fields(root, schema)
    if fields is not None:
        return _answers(fields, answers, codes, drawer)
    properties = root.get("properties") if root.get("type", "object") == "object" else None
    if not isinstance(properties, dict):
        return None
    for place, sub in properties.items():
        fields = _answer_fields(_plain(sub, schema), schema)
        if fields is not None:
            return {name: (_answers(fields, answers, codes, drawer) if name == place
                           else drawer.value(other, 1))
                    for name, other in properties.items()}
    return None


def _plain(schema: object, root: object) -> Mapping[str, object]:
    """``schema`` with its ``$ref`` resolved ({} for anything but an object schema)."""
    for _ in range(_HARD_DEPTH):
        if not isinstance(schema, dict):
            return {}
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return schema
        schema = _resolve(ref, root)
    return {}


def _answer_fields(array: Mapping[str, object], root: object
                   ) -> tuple[str, str | None, Mapping[str, object]] | None:
    """(id property, code property or None, the items' properties) of an array of answer
    objects; None for any other schema."""
    if array.get("type") != "array":
        return None
    items = _plain(array.get("items"), root)
    properties = items.get("properties")
    if not isinstance(properties, dict):
        return None
    id_name = next((n for n in _ID_NAMES if n in properties), None)
    if id_name is None:
        return None
    code_name = None
    for name, sub in properties.items():
        plain = _plain(sub, root)
        if name != id_name and (plain.get("type") == "string" or "enum" in plain):
            code_name = name
            break
    return id_name, code_name, properties


def _answers(fields: tuple[str, str | None, Mapping[str, object]],
             answers: Sequence[tuple[int | str, str]], codes: Sequence[str],
             drawer: _Drawer) -> list[dict[str, object]]:
    """The answer objects of ``_answer_fields``' (id, code, properties), one per answer."""
    id_name, code_name, properties = fields
    id_schema = _plain(properties[id_name], drawer.root)
    kind = id_schema.get("type")
    # the id as batch_json writes it (all digits: an integer) unless the type says otherwise
    types = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else None
    enum = _plain(properties[code_name], drawer.root).get("enum") if code_name else None
    out = []
    for item_id, code in answers:
        value = item_id if types is None or (
            isinstance(item_id, int) and ("integer" in types or "number" in types)) \
            else str(item_id)
        if isinstance(enum, list) and enum and code not in enum:
            code = enum[codes.index(code) % len(enum)] if code in codes else enum[0]
        out.append({name: (value if name == id_name else code if name == code_name
                           else drawer.value(sub, 2))
                    for name, sub in properties.items()})
    return out


def batch_object(array: str) -> str:
    """A ``batch_json`` array as JSON mode answers it: ``{"results":[...]}``."""
    return '{"results":' + array + "}"


def instance(schema: object, rng: random.Random, root: object = None) -> object:
    """A value that fits the JSON schema ``schema`` (``$ref`` resolved against ``root``,
    by default ``schema`` itself): every property of an object, enums and bounds kept,
    string formats (date, date-time, time, email, uuid, uri) well formed. Patterns are not
    followed. A recursive schema stops growing at depth 6 (arrays get their fewest items,
    a nullable value is null), and an absurd one at 10,000 values in all."""
    return _Drawer(rng, schema if root is None else root).value(schema, 0)


class _Drawer:
    """One instance being drawn: the RNG, the root its references resolve in, and how many
    values it may still make (a schema could ask for millions: minItems on nested arrays)."""

    def __init__(self, rng: random.Random, root: object):
        self.rng = rng
        self.root = root
        self.left = _MAX_VALUES

    def value(self, schema: object, depth: int) -> object:
        rng = self.rng
        self.left -= 1
        if self.left < 0 or depth > _HARD_DEPTH:
            return None  # only a degenerate schema gets here
        if not isinstance(schema, dict):
            return _words(rng, 2)  # ``true`` or a malformed part: any value fits
        ref = schema.get("$ref")
        if isinstance(ref, str):
            return self.value(_resolve(ref, self.root), depth + 1)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return rng.choice(enum)
        options = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(options, list) and options:
            chosen = [o for o in options
                      if not (isinstance(o, dict) and o.get("type") == "null")]
            if not chosen or (depth >= _MAX_DEPTH and len(chosen) < len(options)):
                return None
            return self.value(rng.choice(chosen), depth + 1)
        every = schema.get("allOf")
        if isinstance(every, list) and every:
            merged: dict[str, object] = {}
            for part in every:
                if isinstance(part, dict) and isinstance(part.get("$ref"), str):
                    part = _resolve(part["$ref"], self.root)
                if isinstance(part, dict):
                    merged.update(part)
            return self.value(merged, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            types = [t for t in kind if t != "null"]
            if not types or (depth >= _MAX_DEPTH and len(types) < len(kind)):
                return None
            kind = types[0]
        if kind is None:
            kind = ("object" if "properties" in schema else
                    "array" if "items" in schema else "string")
        if kind == "object":
            properties = schema.get("properties")
            if not isinstance(properties, dict):
                return {}
            return {name: self.value(sub, depth + 1) for name, sub in properties.items()}
        if kind == "array":
            fewest = min(_int_of(schema.get("minItems"), 0), self.left)
            most = _int_of(schema.get("maxItems"), max(fewest, 3))
            count = fewest if depth >= _MAX_DEPTH else min(most, max(fewest, rng.randint(1, 3)))
            items = schema.get("items", {})
            return [self.value(items, depth + 1) for _ in range(max(0, count))]
        if kind == "integer":
            low, high = _bounds(schema, 0, 100, 1)
            return rng.randint(math.ceil(low), max(math.ceil(low), math.floor(high)))
        if kind == "number":
            low, high = _bounds(schema, 0.0, 100.0, 0.01)
            high = max(low, high)
            # two decimals, as a model writes a number, kept within the bounds
            return min(max(round(rng.uniform(low, high), 2), low), high)
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "null":
            return None
        return _string(schema, rng)


def _resolve(ref: str, root: object) -> object:
    """The schema a local ``$ref`` (``#``, ``#/$defs/X``, ``#/definitions/X``...) points at;
    an empty schema (any value) for one it cannot follow."""
    if not ref.startswith("#"):
        return {}
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return {}
        node = node[part]
    return node


def _int_of(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _bounds(schema: Mapping[str, object], low: float, high: float,
            step: float) -> tuple[float, float]:
    """The range a number may take: the schema's inclusive and exclusive bounds, else
    ``low`` to ``high`` moved to lie within whichever bound is given."""
    floor = _bound(schema, "minimum", "exclusiveMinimum", step)
    ceiling = _bound(schema, "maximum", "exclusiveMaximum", -step)
    if floor is not None and ceiling is not None:
        return floor, ceiling
    if floor is not None:
        return floor, floor + (high - low)
    if ceiling is not None:
        return ceiling - (high - low), ceiling
    return low, high


def _bound(schema: Mapping[str, object], inclusive: str, exclusive: str,
           step: float) -> float | None:
    """An inclusive bound, or an exclusive one moved ``step`` inwards; None without."""
    value = schema.get(inclusive)
    if _finite(value):
        return float(value)  # type: ignore[arg-type]  # _finite: a number
    value = schema.get(exclusive)
    if _finite(value):
        return float(value) + step  # type: ignore[arg-type]  # _finite: a number
    return None


def _finite(value: object) -> bool:
    """A JSON number that is finite (Python's json reads ``Infinity`` and ``NaN`` too)."""
    if isinstance(value, float):
        return math.isfinite(value)
    # an int may be too large for a float: such a bound is no bound worth keeping
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53


def _words(rng: random.Random, count: int) -> str:
    start = rng.randrange(len(_WORDS))
    return " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(count))


def _string(schema: Mapping[str, object], rng: random.Random) -> str:
    fmt = schema.get("format")
    if fmt == "date-time":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00Z"
    if fmt == "date":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if fmt == "time":
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00"
    if fmt == "email":
        return f"user{rng.randrange(1000)}@example.com"
    if fmt == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if fmt in ("uri", "url"):
        return f"https://example.com/{rng.randrange(1000)}"
    text = _words(rng, rng.randint(1, 5))
    low = min(_int_of(schema.get("minLength"), 0), _MAX_STRING)
    high = _int_of(schema.get("maxLength"), max(low, len(text)))
    while len(text) < low:
        text += " " + _words(rng, 3)
    return text[:max(0, low, high)]
