"""Thousands of malformed requests against the live simulator: each gets a 4xx with
OpenAI's error object (never a 500, never a dropped connection), and the server keeps
serving good requests afterwards."""

from __future__ import annotations

import dataclasses
import http.client
import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.model.config import apply_overrides, default_config
from simulator.server import RunningServer

MAX_BODY = 4096
GOOD_KEY = "sk-ratelab"
GOOD_CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "Say hi"}],
}

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
not_a_string = st.one_of(st.none(), st.booleans(), st.integers(), st.lists(json_scalars,
                         max_size=2), st.dictionaries(st.text(max_size=4), json_scalars,
                         max_size=2))


def _set(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def apply(body: dict[str, Any]) -> None:
        body[key] = value
    return apply


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def apply(body: dict[str, Any]) -> None:
        body.pop(key, None)
    return apply


def _message(value: object) -> Callable[[dict[str, Any]], None]:
    def apply(body: dict[str, Any]) -> None:
        body["messages"] = [value]
    return apply


# Each mutation alone makes a valid chat body invalid.
mutations = st.one_of(
    st.builds(_drop, st.sampled_from(["model", "messages"])),
    st.builds(lambda m: _set("model", m), st.text(min_size=1, max_size=30).filter(
        lambda m: m.strip() not in ("gpt-4o-mini",) and not m.startswith("gpt"))),
    st.builds(lambda m: _set("model", m), not_a_string),
    st.builds(lambda m: _set("messages", m), st.one_of(st.just([]), json_scalars)),
    st.builds(_message, st.one_of(json_scalars, st.just({}), st.just({"role": "user"}))),
    st.builds(lambda r: _message({"role": r, "content": "x"}),
              st.text(max_size=10).filter(lambda r: r not in ("system", "user", "assistant",
                                                            "developer", "tool", "function"))),
    st.builds(lambda c: _message({"role": "user", "content": c}),
              st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.dictionaries(st.text(max_size=4), json_scalars, min_size=1,
                                        max_size=2))),
    st.builds(lambda v: _set("max_tokens", v),
              st.one_of(st.integers(max_value=0), st.text(max_size=5), st.booleans(),
                        st.floats(allow_nan=False, allow_infinity=False).filter(
                            lambda f: not f.is_integer()))),
    st.builds(lambda v: _set("stream", v), st.one_of(st.text(max_size=5), st.integers(2, 9))),
    st.builds(lambda v: _set("temperature", v),
              st.one_of(st.text(max_size=5), st.floats(min_value=2.01, max_value=1e9))),
    st.builds(lambda k, v: _set(k, v), st.text(st.characters(categories=["Ll"]), min_size=3,
              max_size=12).map(lambda k: "zz_" + k), json_values),
)


@st.composite
def bad_chat_bodies(draw: st.DrawFn) -> bytes:
    body = json.loads(json.dumps(GOOD_CHAT))
    for mutation in draw(st.lists(mutations, min_size=1, max_size=3)):
        mutation(body)
    return json.dumps(body).encode()


raw_bodies = st.one_of(
    st.binary(max_size=200),  # almost always invalid JSON or UTF-8
    st.just(b""),
    st.binary(min_size=1, max_size=40).map(lambda b: b"\xff\xfe" + b),  # never UTF-8
    st.text(max_size=40).map(lambda t: ('{"model": ' + t).encode()),  # truncated JSON
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.integers(MAX_BODY + 1, 4 * MAX_BODY).map(
        lambda n: json.dumps({**GOOD_CHAT, "pad": "x" * n}).encode()),  # oversized
)

auth_headers = st.sampled_from([
    None, "", "Bearer", "Bearer ", "Bearer sk-wrong", "Basic c2stcmF0ZWxhYg==", "sk-ratelab",
    "Bearer sk-ratelab-but-longer",
])


@st.composite
def bad_requests(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """(path, body, Authorization) with at least one defect."""
    path = draw(st.sampled_from(["/v1/chat/completions", "/p/default/v1/chat/completions",
                                 "/v1/embeddings"]))
    kind = draw(st.sampled_from(["raw", "chat", "auth"]))
    if kind == "raw":
        return path, draw(raw_bodies), draw(st.one_of(st.just(f"Bearer {GOOD_KEY}"),
                                                      auth_headers))
    if kind == "chat" and path.endswith("chat/completions"):
        return path, draw(bad_chat_bodies()), f"Bearer {GOOD_KEY}"
    good = GOOD_CHAT if path.endswith("chat/completions") else {
        "model": "text-embedding-3-small", "input": "hello"}
    return path, json.dumps(good).encode(), draw(auth_headers)


def _post(server: RunningServer, path: str, body: bytes, auth: str | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _assert_openai_error(status: int, payload: bytes) -> None:
    assert 400 <= status < 500, (status, payload[:300])
    error = json.loads(payload)["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert set(error) >= {"message", "type", "param", "code"}


def test_malformed_requests_get_openai_4xx_and_server_keeps_serving(
    sim_thread: Callable[..., RunningServer],
) -> None:
    cfg = dataclasses.replace(apply_overrides(default_config(), rpm=10**9, tpm=10**12,
                                              balance_usd=10**6),
                              max_body_bytes=MAX_BODY)
    server = sim_thread(cfg)

    @settings(max_examples=1500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(bad_requests())
    def check(request: tuple[str, bytes, str | None]) -> None:
        status, payload = _post(server, *request)
        _assert_openai_error(status, payload)

    check()
    answered = sum(server.app.counters.responses().values())
    assert answered >= 1500  # every example reached the server and was answered
    status, payload = _post(server, "/v1/chat/completions", json.dumps(GOOD_CHAT).encode(),
                            f"Bearer {GOOD_KEY}")
    assert status == 200, payload[:300]
    assert json.loads(payload)["object"] == "chat.completion"
