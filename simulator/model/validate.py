"""Validation of request bodies into small request values; bad input becomes an OpenAI 400 body."""

from __future__ import annotations

from dataclasses import dataclass

from simulator.model.errors import Invalid, invalid_request
from simulator.model.structured import Output, read_shape
from simulator.model.tokens import message_text, text_tokens

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# accepted and ignored: they do not change the simulated reply (``response_format``,
# ``tools`` and ``tool_choice`` do: structured.py)
_PASSIVE_CHAT_FIELDS = frozenset({
    "temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed", "user",
    "logit_bias", "logprobs", "top_logprobs",
    "parallel_tool_calls", "functions", "function_call", "metadata", "store", "service_tier",
    "modalities", "reasoning_effort", "prediction", "audio", "web_search_options",
    "prompt_cache_key", "safety_identifier", "verbosity",
})
CHAT_FIELDS = _PASSIVE_CHAT_FIELDS | {
    "model", "messages", "max_tokens", "max_completion_tokens", "n", "best_of", "stream",
    "stream_options", "response_format", "tools", "tool_choice",
}
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
MAX_EMBEDDING_INPUTS = 2048


@dataclass(slots=True)  # not frozen: made per request, and a frozen __init__ costs 3x
class ChatRequest:
    """A valid chat completion request, reduced to what the model needs (a value: nothing
    changes it once made)."""

    model: str
    texts: tuple[str, ...]  # message contents, in order
    last_user_text: str
    max_tokens: int | None
    n: int
    best_of: int
    stream: bool
    include_usage: bool
    output: Output | None = None  # the reply's shape: JSON mode, a schema, a tool call
    definition_tokens: int = 0  # prompt tokens of the tools and schema sent


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A valid embeddings request: input texts and their token counts."""

    model: str
    inputs: tuple[str, ...]
    tokens: int
    max_input_tokens: int
    dimensions: int | None
    encoding_format: str


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _type_error(param: str, expected: str, value: object) -> Invalid:
    return Invalid(invalid_request(
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
        param, "invalid_type"))


def _int(body: dict, param: str, lo: int, hi: int) -> int | None:
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(param, "an integer", value)
    if value < lo:
        raise Invalid(invalid_request(
            f"Invalid '{param}': integer below minimum value. Expected a value >= {lo}, but "
            f"got {value} instead.", param, "integer_below_min_value"))
    if value > hi:
        raise Invalid(invalid_request(
            f"Invalid '{param}': integer above maximum value. Expected a value <= {hi}, but "
            f"got {value} instead.", param, "integer_above_max_value"))
    return value


def _number(body: dict, param: str, lo: float, hi: float) -> None:
    value = body.get(param)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(param, "a number", value)
    if not lo <= value <= hi:
        raise Invalid(invalid_request(
            f"Invalid '{param}': expected a value between {lo:g} and {hi:g}, but got {value} "
            "instead.", param, "invalid_value"))


def _call_text(call: object) -> str:
    """The text of one tool call an assistant message carries: its name and arguments."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return ""
    return "".join(v for v in (function.get("name"), function.get("arguments"))
                   if isinstance(v, str))


def _check_fields(body: object, allowed: frozenset[str]) -> dict:
    if not isinstance(body, dict):
        raise Invalid(invalid_request(
            "We could not parse the JSON body of your request. The request body must be a JSON "
            "object.", None, "invalid_json"))
    for key in body:
        if key not in allowed:
            raise Invalid(invalid_request(f"Unrecognized request argument supplied: {key}"))
    model = body.get("model")
    if model is None:
        raise Invalid(invalid_request("Missing required parameter: 'model'.", "model",
                                      "missing_required_parameter"))
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    return body


def _messages(body: dict) -> tuple[tuple[str, ...], str]:
    messages = body.get("messages")
    if messages is None:
        raise Invalid(invalid_request("Missing required parameter: 'messages'.", "messages",
                                      "missing_required_parameter"))
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise Invalid(invalid_request(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got "
            "an empty array instead.", "messages", "empty_array"))
    texts = []
    last_user = ""
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _type_error(param, "an object", message)
        role = message.get("role")
        if role is None:
            raise Invalid(invalid_request(f"Missing required parameter: '{param}.role'.",
                                          f"{param}.role", "missing_required_parameter"))
        if not isinstance(role, str):  # a list or object is unhashable: no set lookup
            raise _type_error(f"{param}.role", "a string", role)
        if role not in ROLES:
            raise Invalid(invalid_request(
                f"Invalid value: '{role}'. Supported values are: 'system', 'developer', "
                "'user', 'assistant', 'tool', and 'function'.", f"{param}.role",
                "invalid_value"))
        content = message.get("content")
        if content is None:
            if role != "assistant" or ("content" not in message and "tool_calls" not in message):
                raise Invalid(invalid_request(
                    f"Missing required parameter: '{param}.content'.", f"{param}.content",
                    "missing_required_parameter"))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise _type_error(f"{param}.content[{j}]", "an object", part)
                if part.get("type") == "text" and not isinstance(part.get("text"), str):
                    raise _type_error(f"{param}.content[{j}].text", "a string",
                                      part.get("text"))
        elif not isinstance(content, str):
            raise _type_error(f"{param}.content", "a string or an array", content)
        text = message_text(content)
        calls = message.get("tool_calls")
        if role == "assistant" and isinstance(calls, list):
            text += "".join(map(_call_text, calls))  # the calls it made are prompt too
        texts.append(text)
        if role == "user":
            last_user = text
    return tuple(texts), last_user


# The fields of a typical request, each checked inline by ``_plain_chat``.
_PLAIN_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "n", "stream",
    "stream_options", "temperature", "top_p", "seed", "user",
})


def _plain_chat(body: object) -> ChatRequest | None:
    """The common well-formed body read in one pass: plain fields of the right types and
    string contents. None for anything else, which the full validation then explains;
    whatever this accepts, the full validation accepts with the same result.

    One pass over the keys the body has (typically 3 of the 11 it may carry) rather than a
    lookup per possible field: this runs on every request."""
    if type(body) is not dict:
        return None
    model = messages = max_tokens = max_completion = n = stream = options = None
    for key, value in body.items():
        if value is None:
            if key not in _PLAIN_FIELDS:
                return None
        elif key == "model":
            model = value
        elif key == "messages":
            messages = value
        elif key == "max_tokens":
            if type(value) is not int or not 1 <= value <= 1_000_000_000:
                return None
            max_tokens = value
        elif key == "max_completion_tokens":
            if type(value) is not int or not 1 <= value <= 1_000_000_000:
                return None
            max_completion = value
        elif key == "n":
            if type(value) is not int or not 1 <= value <= 128:
                return None
            n = value
        elif key == "stream":
            if type(value) is not bool:
                return None
            stream = value
        elif key == "stream_options":
            options = value
        elif key == "temperature":
            if type(value) not in (int, float) or not 0.0 <= value <= 2.0:
                return None
        elif key == "top_p":
            if type(value) not in (int, float) or not 0.0 <= value <= 1.0:
                return None
        elif key == "user":
            if type(value) is not str:
                return None
        elif key != "seed":
            return None
    if type(model) is not str or type(messages) is not list or not messages:
        return None
    texts = []
    last_user = ""
    for message in messages:
        if type(message) is not dict:
            return None
        role = message.get("role")
        content = message.get("content")
        if type(role) is not str or role not in ROLES or type(content) is not str:
            return None
        texts.append(content)
        if role == "user":
            last_user = content
    include_usage = False
    if options is not None:
        if type(options) is not dict or not stream:
            return None
        usage = options.get("include_usage")
        if usage is not None and type(usage) is not bool:
            return None
        include_usage = bool(usage)
    # positional, in the field order (model, texts, last_user_text, max_tokens, n, best_of,
    # stream, include_usage): keywords cost a name match each
    return ChatRequest(
        model, tuple(texts), last_user,
        max_completion if max_completion is not None else max_tokens,
        n or 1, 1, bool(stream), include_usage,
    )


def parse_chat(body: object) -> ChatRequest | dict:
    """A ChatRequest, or the 400 body saying what is wrong with ``body``."""
    plain = _plain_chat(body)
    if plain is not None:
        return plain
    try:
        data = _check_fields(body, CHAT_FIELDS)
        texts, last_user = _messages(data)
        max_tokens = _int(data, "max_tokens", 1, 10**9)
        max_completion = _int(data, "max_completion_tokens", 1, 10**9)
        n = _int(data, "n", 1, 128) or 1
        best_of = _int(data, "best_of", 1, 20) or 1
        stream = data.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _type_error("stream", "a boolean", stream)
        include_usage = False
        options = data.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise _type_error("stream_options", "an object", options)
            if not stream:
                raise Invalid(invalid_request(
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                    "stream_options", "invalid_value"))
            usage = options.get("include_usage")
            if usage is not None and not isinstance(usage, bool):
                raise _type_error("stream_options.include_usage", "a boolean", usage)
            include_usage = bool(usage)
        _number(data, "temperature", 0.0, 2.0)
        _number(data, "top_p", 0.0, 1.0)
        _number(data, "presence_penalty", -2.0, 2.0)
        _number(data, "frequency_penalty", -2.0, 2.0)
        stop = data.get("stop")
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, list) and len(stop) <= 4
                and all(isinstance(s, str) for s in stop)):
            raise _type_error("stop", "a string or an array of at most 4 strings", stop)
        user = data.get("user")
        if user is not None and not isinstance(user, str):
            raise _type_error("user", "a string", user)
        shape = read_shape(data, texts)
        return ChatRequest(
            model=data["model"], texts=texts, last_user_text=last_user,
            max_tokens=max_completion if max_completion is not None else max_tokens,
            n=n, best_of=best_of, stream=bool(stream), include_usage=include_usage,
            output=shape.output, definition_tokens=shape.definition_tokens,
        )
    except Invalid as exc:
        return exc.body


def parse_embeddings(body: object) -> EmbeddingRequest | dict:
    """An EmbeddingRequest, or the 400 body saying what is wrong with ``body``."""
    try:
        data = _check_fields(body, EMBEDDING_FIELDS)
        raw = data.get("input")
        if raw is None:
            raise Invalid(invalid_request("Missing required parameter: 'input'.", "input",
                                          "missing_required_parameter"))
        inputs: list[str] = []
        counts: list[int] = []
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items:
            raise Invalid(invalid_request(
                "'input' must be a non-empty string or a non-empty array of strings or of "
                "token arrays.", "input", "invalid_value"))
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            items = [items]  # one input given as a token array
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise Invalid(invalid_request(
                f"'input' has {len(items)} items; at most {MAX_EMBEDDING_INPUTS} are allowed.",
                "input", "invalid_value"))
        for i, item in enumerate(items):
            if isinstance(item, str) and item:
                inputs.append(item)
                counts.append(text_tokens(item))
            elif (isinstance(item, list) and item
                  and all(isinstance(t, int) and not isinstance(t, bool) for t in item)):
                inputs.append(" ".join(map(str, item)))
                counts.append(len(item))
            else:
                raise Invalid(invalid_request(
                    f"Invalid 'input[{i}]': expected a non-empty string or token array.",
                    "input", "invalid_value"))
        encoding = data.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise Invalid(invalid_request(
                "Invalid 'encoding_format': expected 'float' or 'base64'.", "encoding_format",
                "invalid_value"))
        dims = _int(data, "dimensions", 1, 1 << 16)
        user = data.get("user")
        if user is not None and not isinstance(user, str):
            raise _type_error("user", "a string", user)
        return EmbeddingRequest(model=data["model"], inputs=tuple(inputs), tokens=sum(counts),
                                max_input_tokens=max(counts), dimensions=dims,
                                encoding_format=encoding)
    except Invalid as exc:
        return exc.body
