"""Exact, seeded limit and billing figures over HTTP, and the equivalence the planner relies
on: the pure model driven with a fake clock admits exactly what the live server admits."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from simulator.model.config import SimulatorConfig, apply_overrides, default_config, parse_config
from simulator.model.provider import Admission
from simulator.server import RunningServer, build_providers

Start = Callable[..., Awaitable[RunningServer]]
CHAT = {"model": "gpt-4o-mini", "max_tokens": 20,
        "messages": [{"role": "user", "content": "Classify: hello there"}]}
ADMIN = {"Authorization": "Bearer ratelab-admin"}


class Client:
    """Sequential requests over one keep-alive session, each stamped with the virtual time
    the server's clock read just before it was sent."""

    def __init__(self, server: RunningServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    async def chat(self, key: str = "sk-ratelab", body: dict[str, Any] | None = None
                   ) -> tuple[float, int, CIMultiDict[str], dict[str, Any]]:
        sent_at = self.server.app.clock.now()
        async with self.session.post(
            self.server.base_url() + "/chat/completions", json=body or CHAT,
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            return sent_at, resp.status, CIMultiDict(resp.headers), await resp.json()


def _provider(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "default", "keys": {"sk-ratelab": {}},
        "models": {"gpt-4o-mini": {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}},
        "responder": {"kind": "lorem", "output_tokens": 8},
    }
    base.update(extra)
    return base


def _config(time_scale: float = 1.0, seed: int = 0, **extra: object) -> SimulatorConfig:
    return parse_config({"providers": [_provider(**extra)], "time_scale": time_scale,
                         "seed": seed}, "<test>")


async def test_rpm_60_sliding_window_refuses_request_61_then_admits_after_reset(
    sim_server: Start,
) -> None:
    # time_scale 60: the sliding minute lasts one wall second.
    cfg = apply_overrides(default_config(), rpm=60, ttft_ms=0.0, itl_ms=0.0, time_scale=60.0)
    server = await sim_server(cfg)
    async with aiohttp.ClientSession() as session:
        client = Client(server, session)
        sent = [await client.chat() for _ in range(60)]
        assert [s[1] for s in sent] == [200] * 60
        remaining = [int(s[2]["x-ratelimit-remaining-requests"]) for s in sent]
        assert remaining == list(range(59, -1, -1))
        assert {s[2]["x-ratelimit-limit-requests"] for s in sent} == {"60"}

        t61, status, headers, body = await client.chat()
        assert status == 429
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        error = body["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert error["message"].startswith(
            "Rate limit reached for gpt-4o-mini in organization org-ratelab on requests per "
            "min (RPM): Limit 60, Used ")
        # Refusals count (OpenAI style), so a slot frees when the *second* request leaves
        # the window, 60 virtual s after it was sent: in wall ms, (t2 + 60 - t61) / 60.
        expected_ms = (sent[1][0] + 60.0 - t61) / 60.0 * 1000.0
        retry_ms = int(headers["retry-after-ms"])
        assert abs(retry_ms - expected_ms) <= 5.0, (retry_ms, expected_ms)
        assert headers["retry-after"] == str(max(1, math.ceil(retry_ms / 1000)))

        await asyncio.sleep(retry_ms / 1000.0)
        _, status, _, _ = await client.chat()
        assert status == 200


async def test_max_tokens_reservation_refuses_what_actual_counting_admits(
    sim_server: Start,
) -> None:
    # Prompt 3 + 3 + 6 = 12 tokens, max_tokens 200, TPM 100: reserving refuses the request
    # as too large for the limit; counting actual usage (12 + 8) admits it.
    body = {**CHAT, "max_tokens": 200}
    results = {}
    for counting in ("reserve", "actual"):
        server = await sim_server(_config(limits={"tpm": 100, "counting": counting}))
        async with aiohttp.ClientSession() as session:
            results[counting] = await Client(server, session).chat(body=body)
    _, status, headers, error = results["reserve"]
    assert status == 429
    assert headers["x-should-retry"] == "false"
    assert error["error"]["message"].startswith(
        "Request too large for gpt-4o-mini in organization org-ratelab on tokens per min "
        "(TPM): Limit 100, Requested 212.")
    _, status, headers, reply = results["actual"]
    assert status == 200
    assert reply["usage"] == {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}
    assert headers["x-ratelimit-remaining-tokens"] == "88"


async def test_402_charges_in_headers_sum_to_the_balance_spent(sim_server: Start) -> None:
    # 12 prompt tokens at 100 USD/M and 8 completion tokens at 1,000 USD/M: 0.0092 USD each.
    models = {"gpt-4o-mini": {"input_usd_per_mtok": 100.0, "output_usd_per_mtok": 1000.0}}
    server = await sim_server(_config(models=models, billing={"balance_usd": 0.05}))
    async with aiohttp.ClientSession() as session:
        client = Client(server, session)
        charges, balances = [], []
        while True:
            _, status, headers, body = await client.chat()
            if status != 200:
                break
            charges.append(float(headers["X-MDB-Charged-USD"]))
            balances.append(float(headers["X-MDB-Balance-USD"]))
        assert status == 402
        assert body["error"]["code"] == "insufficient_credits"
        assert "X-MDB-Charged-USD" not in headers
        assert charges == [0.0092] * 6  # the sixth dips below zero, the seventh is refused
        assert sum(charges) == pytest.approx(0.05 - balances[-1], abs=1e-12)
        _, again, _, _ = await client.chat()
        assert again == 402
        async with session.get(server.url + "/admin/default/stats", headers=ADMIN) as resp:
            stats = (await resp.json())["keys"]["sk-ratelab"]
        assert stats["spent_usd"] == pytest.approx(sum(charges), abs=1e-12)
        assert stats["models"]["gpt-4o-mini"]["requests"] == {"200": 6, "402": 2}
        async with session.post(server.url + "/admin/default/topup", headers=ADMIN,
                                json={"key": "sk-ratelab", "usd": 1.0}) as resp:
            assert resp.status == 200
        _, status, headers, _ = await client.chat()
        assert status == 200
        assert float(headers["X-MDB-Balance-USD"]) == pytest.approx(
            0.05 - 7 * 0.0092 + 1.0, abs=1e-9)


async def test_one_tenant_exhausting_its_budget_leaves_the_other_unchanged(
    sim_server: Start,
) -> None:
    keys = {"sk-a": {"balance_usd": 0.02}, "sk-b": {"balance_usd": 1.0}}
    models = {"gpt-4o-mini": {"input_usd_per_mtok": 100.0, "output_usd_per_mtok": 1000.0}}
    solo_keys = {"sk-b": {"balance_usd": 1.0}}
    observed = {}
    for name, ks, keys_sending in (("shared", keys, ("sk-a", "sk-b")), ("solo", solo_keys,
                                                                         ("sk-b",))):
        server = await sim_server(_config(keys=ks, models=models, limits={"rpm": 100}))
        async with aiohttp.ClientSession() as session:
            client = Client(server, session)
            seen: dict[str, list[tuple[int, str, str, str]]] = {k: [] for k in keys_sending}
            for _ in range(6):
                for key in keys_sending:
                    _, status, headers, _ = await client.chat(key)
                    seen[key].append((status, headers.get("x-ratelimit-remaining-requests", ""),
                                      headers.get("X-MDB-Charged-USD", "-"),
                                      headers.get("X-MDB-Balance-USD", "-")))
        observed[name] = seen
    assert [s[0] for s in observed["shared"]["sk-a"]] == [200, 200, 200, 402, 402, 402]
    assert observed["shared"]["sk-b"] == observed["solo"]["sk-b"]
    assert [s[0] for s in observed["solo"]["sk-b"]] == [200] * 6
    assert [s[1] for s in observed["solo"]["sk-b"]] == ["99", "98", "97", "96", "95", "94"]


def _comparable(status: int, headers: Any, body: dict[str, Any]) -> tuple[Any, ...]:
    """What must match between live and model: reset durations differ by the few virtual
    milliseconds between the client's clock read and the server's, so they are left out."""
    kept = {k.lower(): v for k, v in headers.items()
            if k.lower().startswith(("x-ratelimit-remaining", "x-ratelimit-limit", "x-mdb-"))}
    if status == 200:
        content = body["choices"][0]["message"]["content"]
        return status, kept, content, json.dumps(body["usage"], sort_keys=True)
    return status, kept, body["error"]["type"], body["error"]["code"]


async def test_pure_model_with_fake_clock_admits_exactly_what_the_live_server_admits(
    sim_server: Start,
) -> None:
    # Bursts against RPM, TPM and a balance, with random output lengths and random 5xx,
    # at time_scale 60. The second burst starts well after the first left the window so
    # no decision sits within the client/server clock skew of a window edge.
    cfg = _config(
        time_scale=60.0, seed=7,
        limits={"algorithm": "sliding", "rpm": 40, "tpm": 700, "counting": "reserve"},
        billing={"balance_usd": 0.02},
        models={"gpt-4o-mini": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 30.0}},
        responder={"kind": "lorem", "output_tokens": {"dist": "lognormal", "median": 12,
                                                       "p99": 60}},
        faults={"error_500_rate": 0.05, "error_503_rate": 0.05},
    )
    server = await sim_server(cfg)
    sent: list[tuple[float, tuple[Any, ...]]] = []
    async with aiohttp.ClientSession() as session:
        client = Client(server, session)

        async def burst(n: int) -> None:
            for _ in range(n):
                t, status, headers, body = await client.chat()
                sent.append((t, _comparable(status, headers, body)))

        await burst(50)
        probe = sent[-1][0] + 20.0
        await server.app.clock.sleep_until(probe)
        await burst(3)
        await server.app.clock.sleep_until(sent[-1][0] + 65.0)
        await burst(50)

    provider = build_providers(cfg, epoch_s=server.providers["default"].epoch_s)["default"]
    replayed = []
    for t, _ in sent:
        result = provider.chat(t, "sk-ratelab", CHAT)
        if isinstance(result, Admission):
            assert result.plan is not None
            provider.finish(t, result, len(result.plan.chunks))
            plan = result.plan
            body = {"choices": [{"message": {"content": "".join(plan.chunks)}}],
                    "usage": {"prompt_tokens": plan.usage.prompt_tokens,
                              "completion_tokens": plan.usage.completion_tokens,
                              "total_tokens": plan.usage.total_tokens}}
            replayed.append(_comparable(200, result.headers, body))
        else:
            replayed.append(_comparable(result.status, result.headers, result.body))
    live = [c for _, c in sent]
    statuses = [c[0] for c in live]
    # the run exercises every path: admissions, 429s, 5xx and, at the end, 402
    assert {200, 429, 402} <= set(statuses) and {500, 503} & set(statuses), str(statuses)
    assert replayed == live
