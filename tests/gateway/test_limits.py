"""Per-user buckets: pure decisions on seeded sequences, the
tier bound as an invariant, and the limits through HTTP (refusals name the limit)."""

from __future__ import annotations

import random

import aiohttp

from gateway.config import TierLimits
from gateway.limits import (
    LIMIT_RPM,
    LIMIT_TOO_BIG,
    LIMIT_TPD,
    admit_user,
    full_buckets,
)
from tests.gateway.conftest import gateway_config

TIERS = {"free": TierLimits(rpm=10, tokens_per_day=20_000),
         "pro": TierLimits(rpm=60, tokens_per_day=200_000, burst=20)}


def seeded_sequence(seed: int, n: int) -> list[tuple[float, str, int]]:
    """(virtual time, user, tokens) arrivals: 12 users, bursts and lulls."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(8.0) if rng.random() < 0.99 else rng.uniform(5, 60)
        out.append((t, f"u{rng.randrange(12)}", rng.randrange(20, 300)))
    return out


def tier_of(user: str) -> str:
    return "pro" if int(user[1:]) % 3 == 0 else "free"


def test_user_buckets_exact_on_seeded_sequence() -> None:
    states: dict[str, object] = {}
    outcome = {"ok": 0, LIMIT_RPM: 0, LIMIT_TPD: 0}
    accepted: dict[str, list[tuple[float, int]]] = {}
    for now, user, tokens in seeded_sequence(11, 4000):
        tier = TIERS[tier_of(user)]
        state = states.setdefault(user, full_buckets(tier, now))
        d = admit_user(state, tier, now, tokens)  # type: ignore[arg-type]
        if d.allowed:
            outcome["ok"] += 1
            accepted.setdefault(user, []).append((now, tokens))
        else:
            assert d.retry_in_s > 0
            outcome[d.limit] += 1
    assert outcome == {"ok": 2434, LIMIT_RPM: 226, LIMIT_TPD: 1340}
    # The tier bound: in any interval of T seconds a user gets at most
    # capacity + rpm/60 * T requests and tokens_per_day + tpd/86400 * T tokens.
    for user, got in accepted.items():
        tier = TIERS[tier_of(user)]
        assert tier.rpm is not None and tier.tokens_per_day is not None
        for i in range(len(got)):
            for j in range(i, min(len(got), i + 80)):
                span = got[j][0] - got[i][0]
                assert j - i + 1 <= (tier.capacity or 0) + tier.rpm / 60 * span + 1e-9
                tokens = sum(tok for _, tok in got[i:j + 1])
                assert tokens <= tier.tokens_per_day * (1 + span / 86400) + 1e-6


def test_request_larger_than_a_day_is_refused_by_name() -> None:
    tier = TierLimits(rpm=10, tokens_per_day=1000)
    d = admit_user(full_buckets(tier, 0.0), tier, 0.0, 1001)
    assert (d.allowed, d.limit) == (False, LIMIT_TOO_BIG)


async def test_user_limits_through_http(sim_server, gateway) -> None:
    sim = await sim_server(time_scale=1)
    gw = await gateway(gateway_config(sim))
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    results: dict[str, list[int]] = {}
    async with aiohttp.ClientSession() as s:
        refusals = []
        for user, n in (("ann", 8), ("pat", 12)):  # free: burst 5; pro: burst 10
            for _ in range(n):
                async with s.post(f"{gw.url}/v1/tasks", json={**chat, "user": user}) as r:
                    results.setdefault(user, []).append(r.status)
                    if r.status == 429:
                        refusals.append((await r.json(), r.headers))
        # free tier: 5,000 tokens a day; 2,400 + prompt each: two fit, the third does not
        big = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2400}
        for _ in range(3):
            async with s.post(f"{gw.url}/v1/tasks", json={**big, "user": "zoe"}) as r:
                results.setdefault("zoe", []).append(r.status)
                last = await r.json()
    assert results == {"ann": [202] * 5 + [429] * 3, "pat": [202] * 10 + [429] * 2,
                       "zoe": [202, 202, 429]}
    err, headers = refusals[0]
    assert err["error"]["limit"] == "requests_per_minute" and err["error"]["tier"] == "free"
    assert "requests per minute (5/min, burst 5)" in err["error"]["message"]
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
    assert refusals[-1][0]["error"]["tier"] == "pro"
    assert last["error"]["limit"] == "tokens_per_day"
    assert "tokens per day (5,000 tokens/day)" in last["error"]["message"]
