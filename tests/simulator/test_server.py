"""The aiohttp shell over real HTTP: OpenAI framing, routes, bad bodies, admin, metrics,
time scaling, GPU-slot queueing and what the model hears when a client leaves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from simulator.model.config import apply_overrides, default_config, load_config, parse_config
from simulator.model.tokens import text_tokens
from simulator.server import RunningServer

Start = Callable[..., Awaitable[RunningServer]]
AUTH = {"Authorization": "Bearer sk-ratelab"}
CHAT = {"model": "gpt-4o-mini", "max_tokens": 40,
        "messages": [{"role": "user", "content": "Tell me something."}]}
FAST = {"ttft_ms": 0.0, "itl_ms": 0.0}


async def _post(server: RunningServer, path: str, body: object,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(
        server.url + path, data=json.dumps(body), headers=headers or AUTH
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def _frames(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("\n\n")
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[len("data: "):] for f in frames]


async def test_non_stream_completion_has_openai_shape_and_consistent_usage(
    sim_server: Start,
) -> None:
    server = await sim_server(**FAST)
    status, headers, raw = await _post(server, "/v1/chat/completions", CHAT)
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    body = json.loads(raw)
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] == text_tokens(choice["message"]["content"])
    assert usage["completion_tokens"] <= 40
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # conventions.md: 3 priming + 3 per message + ceil(18 / 4)
    assert usage["prompt_tokens"] == 3 + 3 + 5
    assert headers["x-ratelimit-limit-requests"] == "5000"
    assert "x-mdb-charged-usd" in {k.lower() for k in headers}


async def test_stream_with_usage_is_framed_exactly_as_openai(sim_server: Start) -> None:
    server = await sim_server(**FAST)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, raw = await _post(server, "/v1/chat/completions", body)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    frames = _frames(raw)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert all(c["usage"] is None for c in chunks[:-1])
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] in ("stop", "length")
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert all(1 <= len(p) <= 4 for p in pieces)
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == len(pieces) == text_tokens("".join(pieces))


async def test_stream_without_include_usage_has_no_usage_chunk(sim_server: Start) -> None:
    server = await sim_server(**FAST)
    status, _, raw = await _post(server, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    chunks = [json.loads(f) for f in _frames(raw)[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_every_provider_is_served_under_its_prefix(sim_server: Start) -> None:
    second = {"name": "backup", "keys": {"sk-backup": {}},
              "models": {"gpt-4o-mini": {"input_usd_per_mtok": 0.15}}}
    first = {"name": "primary", "keys": {"sk-ratelab": {}},
             "models": {"gpt-4o-mini": {}, "gpt-4o": {}}}
    server = await sim_server(parse_config({"providers": [first, second]}, "<test>"))
    async with aiohttp.ClientSession() as session:
        ids = {}
        for path in ("/v1/models", "/p/primary/v1/models", "/p/backup/v1/models"):
            async with session.get(server.url + path, headers=AUTH) as resp:
                assert resp.status == 200
                ids[path] = sorted(m["id"] for m in (await resp.json())["data"])
        async with session.get(server.url + "/p/nope/v1/models") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "unknown_provider"
    assert ids["/v1/models"] == ids["/p/primary/v1/models"] == ["gpt-4o", "gpt-4o-mini"]
    assert ids["/p/backup/v1/models"] == ["gpt-4o-mini"]
    status, _, _ = await _post(server, "/p/backup/v1/chat/completions", CHAT,
                               {"Authorization": "Bearer sk-backup"})
    assert status == 200
    status, _, raw = await _post(server, "/p/primary/v1/chat/completions", CHAT,
                                 {"Authorization": "Bearer sk-backup"})
    assert status == 401, raw


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"\xff\xfe\x00{}", 400, "invalid_body"),
        (b"[" * 100_000, 400, "invalid_json"),  # nesting deeper than the parser's recursion
        (b'{"x": "' + b"y" * 5000 + b'"}', 413, "request_too_large"),
    ],
)
async def test_unparsable_bodies_get_openai_errors(
    sim_server: Start, body: bytes, status: int, code: str
) -> None:
    import dataclasses

    server = await sim_server(dataclasses.replace(default_config(), max_body_bytes=4096)
                              if status == 413 else None)
    async with aiohttp.ClientSession() as session, session.post(
        server.url + "/v1/chat/completions", data=body, headers=AUTH
    ) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


async def test_unknown_route_and_method_are_openai_shaped(sim_server: Start) -> None:
    server = await sim_server()
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/completions/legacy", json={}) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "unknown_url"
        async with session.get(server.url + "/v1/chat/completions") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("fmt", ["float", "base64"])
async def test_embeddings_reply_has_one_deterministic_vector_per_input(
    sim_server: Start, fmt: str
) -> None:
    import base64

    import numpy as np

    server = await sim_server(ttft_ms=0.0)
    body = {"model": "text-embedding-3-small", "input": ["alpha", "beta", "alpha"],
            "encoding_format": fmt}
    status, _, raw = await _post(server, "/v1/embeddings", body)
    assert status == 200, raw
    reply = json.loads(raw)
    assert reply["object"] == "list" and reply["model"] == "text-embedding-3-small"
    vectors = []
    for i, item in enumerate(reply["data"]):
        assert item["object"] == "embedding" and item["index"] == i
        emb = item["embedding"]
        vec = (np.frombuffer(base64.b64decode(emb), dtype="<f4") if fmt == "base64"
               else np.array(emb, dtype=np.float32))
        vectors.append(vec)
    assert [len(v) for v in vectors] == [1536, 1536, 1536]
    assert np.array_equal(vectors[0], vectors[2])
    assert not np.array_equal(vectors[0], vectors[1])
    # ceil(5/4) + ceil(4/4) + ceil(5/4)
    assert reply["usage"]["prompt_tokens"] == reply["usage"]["total_tokens"] == 5


async def test_admin_api_needs_the_token_and_tops_up_and_resets(sim_server: Start) -> None:
    server = await sim_server(balance_usd=1.0, **FAST)
    admin = {"Authorization": "Bearer ratelab-admin"}
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/admin/default/stats") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "authentication_error"
        async with session.get(server.url + "/admin/default/stats", headers=AUTH) as resp:
            assert resp.status == 401
        async with session.get(server.url + "/admin/nope/stats", headers=admin) as resp:
            assert resp.status == 404
        async with session.post(server.url + "/admin/default/topup", headers=admin,
                                json={"key": "sk-ratelab", "usd": 2.5}) as resp:
            assert resp.status == 200
            assert (await resp.json()) == {"key": "sk-ratelab", "balance_usd": 3.5}
        async with session.post(server.url + "/admin/default/topup", headers=admin,
                                json={"key": "sk-nobody", "usd": 1}) as resp:
            assert resp.status == 404
        async with session.post(server.url + "/admin/default/topup", headers=admin,
                                json={"key": "sk-ratelab", "usd": "lots"}) as resp:
            assert resp.status == 400
        _, headers, _ = await _post(server, "/v1/chat/completions", CHAT)
        assert float(headers["X-MDB-Balance-USD"]) < 3.5
        async with session.post(server.url + "/admin/default/reset", headers=admin) as resp:
            assert resp.status == 200
        _, after, _ = await _post(server, "/v1/chat/completions", CHAT)
        charged = float(after["X-MDB-Charged-USD"])
        assert float(after["X-MDB-Balance-USD"]) == pytest.approx(1.0 - charged, abs=1e-9)
        async with session.get(server.url + "/admin/default/stats", headers=admin) as resp:
            assert resp.status == 200
            assert isinstance(await resp.json(), dict)


async def test_metrics_count_responses_by_status(sim_server: Start) -> None:
    server = await sim_server(**FAST)
    await _post(server, "/v1/chat/completions", CHAT)
    await _post(server, "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-wrong"})
    await _post(server, "/v1/chat/completions", "not an object")
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    for status, n in (("200", 1), ("401", 1), ("400", 1)):
        line = (f'ratelab_http_responses_total{{provider="default",endpoint="chat",'
                f'status="{status}"}} {n}')
        assert line in text.splitlines()
    assert 'ratelab_inflight{provider="default"} 0' in text
    assert 'ratelab_requests_total{provider="default",key="sk-...elab",model="gpt-4o-mini",' \
        'status="200"} 1' in text


async def test_time_scale_divides_the_configured_latency(sim_server: Start) -> None:
    # 1,000 virtual ms of TTFT at time_scale 50 is 20 wall ms.
    server = await sim_server(ttft_ms=1000.0, itl_ms=0.0, time_scale=50.0)
    started = time.monotonic()
    status, _, _ = await _post(server, "/v1/chat/completions", CHAT)
    elapsed = time.monotonic() - started
    assert status == 200
    assert elapsed >= 0.02  # a sleep is never early; the upper side is the benchmark's job


def _gpu_config(max_seqs: int, ttft_s: float) -> Any:
    return parse_config({
        "name": "h100", "keys": {"sk-ratelab": {}}, "models": {"llama-3.3-70b": {}},
        "gpu": {"max_seqs": max_seqs, "knee_seqs": max_seqs},
        "latency": {"ttft_s": ttft_s, "itl_s": 0.0},
        "responder": {"kind": "echo"},
    }, "<test>")


async def test_gpu_slots_queue_requests_until_another_finishes(sim_server: Start) -> None:
    # Two slots, 60 virtual seconds of TTFT at time_scale 600 (0.1 wall s): six requests
    # sent together finish in three waves, each wave starting when the previous ends.
    from dataclasses import replace

    server = await sim_server(replace(_gpu_config(2, 60.0), time_scale=600.0))
    body = {"model": "llama-3.3-70b", "max_tokens": 4,
            "messages": [{"role": "user", "content": "ping"}]}
    clock = server.app.clock
    done: list[float] = []

    async def one() -> int:
        status, _, _ = await _post(server, "/v1/chat/completions", body)
        done.append(clock.now())
        return status

    t0 = clock.now()
    statuses = await asyncio.gather(*(one() for _ in range(6)))
    assert statuses == [200] * 6
    waves = sorted(round((t - t0) / 60.0) for t in done)
    assert waves == [1, 1, 2, 2, 3, 3]


async def test_client_leaving_a_stream_frees_its_slot(sim_server: Start) -> None:
    # Concurrency 1: while a slow stream runs a second request is refused (429); once the
    # client drops the stream, the shell tells the model and the next request is admitted.
    server = await sim_server(concurrency=1, ttft_ms=0.0, itl_ms=200.0)
    body = {**CHAT, "max_tokens": 50, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(server.url + "/v1/chat/completions", json=body,
                                  headers=AUTH)
        assert resp.status == 200
        await resp.content.readline()
        status, _, _ = await _post(server, "/v1/chat/completions", CHAT)
        assert status == 429
        resp.close()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if server.providers["default"].stats()["in_flight"] == 0:
                break
        status, _, raw = await _post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
        assert status == 200, raw


async def test_stream_chunks_are_paced_by_ttft_and_itl_in_virtual_time(sim_server: Start) -> None:
    # TTFT 1,000 ms and ITL 200 ms virtual at time_scale 20: the first chunk is due 50 wall
    # ms after the request, each later one 10 wall ms after the previous. Sleeps are never
    # early, so the server's virtual clock at each arrival is at least the due time.
    server = await sim_server(ttft_ms=1000.0, itl_ms=200.0, time_scale=20.0)
    clock = server.app.clock
    body = {**CHAT, "max_tokens": 5, "stream": True}
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session:
        start = clock.now()
        async with session.post(server.url + "/v1/chat/completions", json=body,
                                headers=AUTH) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"content":"' in line \
                        and b'"role"' not in line:
                    arrivals.append(clock.now() - start)
    assert len(arrivals) == 5, arrivals
    for i, t in enumerate(arrivals):
        assert t >= 1.0 + 0.2 * i - 1e-6, arrivals


PROFILES = sorted((Path(__file__).resolve().parents[2] / "scenarios" / "providers").glob("*.yaml"))


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
async def test_every_shipped_profile_serves_a_chat_request(sim_server: Start, path: Path) -> None:
    cfg = apply_overrides(load_config(path), ttft_ms=0.0, itl_ms=0.0, time_scale=1000.0)
    profile = cfg.providers[0]
    key = profile.keys[0].key if profile.keys else "sk-any"
    model = next(m.name for m in profile.models if m.kind == "chat")
    server = await sim_server(cfg)
    body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(20):  # a profile may inject random faults; one success is enough
        try:
            status, _, raw = await _post(server, "/v1/chat/completions", body,
                                         {"Authorization": f"Bearer {key}"})
        except aiohttp.ClientError:
            continue  # an injected connection reset
        if status == 200:
            break
        assert 400 <= status < 600 and "error" in json.loads(raw)
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["role"] == "assistant"
