"""Pacing of an upstream with the batching client's throttle: pure decisions (settle,
learned limits, holds, graduated steps, the config's counting mode), then the real
gateway in front of the real simulator: a configured TPM filled without 429s whichever
way the provider counts, and an unconfigured one learned from the headers."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
import yaml

from batchclient.configreader import ConfigError
from batchclient.policy.classify import classify
from batchclient.policy.wire import Response, Usage
from gateway.config import LaneSettings, Upstream, parse_config
from gateway.pacing import PacedCall, UpstreamPacer, throttle_settings
from gateway.server import RunningGateway
from simulator.model.config import DEFAULT_PROVIDER_YAML
from simulator.model.config import parse_config as sim_parse
from simulator.server import RunningServer
from tests.gateway.conftest import gateway_config
from tests.gateway.test_worker import post_all

TPM = 6000
PROMPT, MAX_TOKENS, REPLY = 156, 200, 10   # the reproduction's chat: 166 tokens counted


def pacer(tpm: int | None = TPM, rpm: int | None = None, **changes: Any) -> UpstreamPacer:
    up = Upstream("a", "http://127.0.0.1:9/v1", "sk", rpm=rpm, tpm=tpm, **changes)
    return UpstreamPacer(up, throttle_settings(1.0), 4, 1.0)


def answer(prompt: int = PROMPT, reply: int = REPLY,
           headers: dict[str, str] | None = None) -> Response:
    return Response(200, headers or {}, content="x" * reply * 4,
                    usage=Usage(prompt, reply))


def call(key: int, model: str = "m", graduated: bool = True) -> PacedCall:
    return PacedCall(key, model, PROMPT, MAX_TOKENS, MAX_TOKENS, graduated=graduated)


def run_pacer(p: UpstreamPacer, until: float, latency: float = 0.4
              ) -> list[tuple[float, int]]:
    """Send calls as fast as ``p`` admits them (each answered ``latency`` later with the
    reproduction's usage); (dispatch time, tokens counted) of each."""
    now, key, sent = 0.0, 0, []
    pending: list[tuple[float, PacedCall]] = []
    while now < until:
        for done_at, c in [x for x in pending if x[0] <= now]:
            r = answer()
            p.settle(done_at, c, r, classify(r))
            pending.remove((done_at, c))
        key += 1
        c = call(key)
        wait = p.acquire(now, c)
        if wait == 0:
            sent.append((now, PROMPT + REPLY))
            pending.append((now + latency, c))
            continue
        now += min(wait, latency)
    return sent


def test_settled_calls_fill_the_bound_and_never_pass_it() -> None:
    sent = run_pacer(pacer(), 600.0)
    # reserved at prompt + max_tokens (356) and never settled, the window took 16 a minute
    # (36% of the bound); settled to 166 tokens, it takes what the bound holds
    for i, (t0, _) in enumerate(sent):
        inside = sum(tok for t, tok in sent[i:] if t < t0 + 60)
        assert inside <= TPM
    steady = [tok for t, tok in sent if 120 <= t < 540]
    assert sum(steady) / 7 >= 0.95 * TPM


def test_unset_limits_are_learned_from_the_headers() -> None:
    p = pacer(tpm=None)
    assert p.acquire(0.0, call(1)) == 0.0
    r = answer(headers={"x-ratelimit-limit-tokens": "6000",
                        "x-ratelimit-remaining-tokens": "100",
                        "x-ratelimit-reset-tokens": "50s"})
    p.settle(1.0, call(1), r, classify(r))
    assert p.throttle("m").tpm == TPM
    # the provider counts 5,900 tokens (other traffic, and this call as admitted): no
    # room for 356 more until its reset, 50 s after the headers were read
    assert p.acquire(1.0, call(2)) > 0
    assert p.acquire(51.0, call(2)) == 0.0


def test_a_hold_blocks_every_model_and_models_seen_later() -> None:
    p = pacer()
    assert p.acquire(0.0, call(1, "a")) == 0.0
    p.block(30.0)
    p.block(10.0)  # an earlier hold does not shorten it
    assert p.acquire(5.0, call(2, "a")) == 25.0
    assert p.acquire(5.0, call(3, "b")) == 25.0
    assert p.acquire(30.0, call(4, "b")) == 0.0


def test_background_calls_are_graduated_a_waiting_users_are_not() -> None:
    p = pacer()
    for key in range(1, 16):  # 15 x 356 = 5,340 tokens: 89% of the bound, past 85 %
        assert p.acquire(0.0, call(key, graduated=False)) == 0.0
    # the 85 % step spaces background calls by 0.3 s over the 4 workers
    assert p.acquire(0.0, call(16)) == pytest.approx(0.075)
    assert p.acquire(0.0, call(17, graduated=False)) == 0.0


def test_room_tells_the_steps_spacing_from_a_full_window() -> None:
    """At 89% a background call is spaced (acquire waits) though the window has room for
    it (room_wait 0): the worker waits on this upstream rather than spilling to the next;
    a window without room, or a hold, is full. room_wait reserves nothing."""
    p = pacer()
    for key in range(1, 16):
        assert p.acquire(0.0, call(key, graduated=False)) == 0.0
    assert p.acquire(0.0, call(16)) > 0 and p.room_wait(0.0, call(16)) == 0.0
    used = p.throttle("m").used_tokens
    assert p.room_wait(0.0, call(17)) == 0.0 and p.throttle("m").used_tokens == used
    assert p.acquire(0.0, call(18, graduated=False)) == 0.0   # 16 x 356 = 5,696: full now
    assert p.room_wait(0.0, call(19)) > 0
    p.block(90.0)
    assert p.room_wait(61.0, call(20)) == 29.0


def test_a_refusal_counts_one_request_and_no_tokens() -> None:
    p = pacer(rpm=10)
    assert p.acquire(0.0, call(1)) == 0.0
    r = Response(429, {"retry-after": "2"}, '{"error": {"code": "rate_limit_exceeded"}}')
    p.settle(0.5, call(1), r, classify(r))
    assert (p.throttle("m").used_tokens, p.throttle("m").used_requests) == (0, 1)


def test_config_counting_mode_and_share() -> None:
    base = {"upstreams": [{"base_url": "http://x/v1", "api_key": "k"}]}
    up = parse_config(base, "gw.yaml").upstream
    assert (up.reserve_max_tokens, up.share) == (True, 1.0)
    actual = {"upstreams": [{**base["upstreams"][0], "tpm_counting": "actual", "share": 0.5}]}
    up = parse_config(actual, "gw.yaml").upstream
    assert (up.reserve_max_tokens, up.share) == (False, 0.5)
    assert pacer(reserve_max_tokens=False).throttle("m").reserve_max_tokens is False
    bad = {"upstreams": [{**base["upstreams"][0], "tpm_counting": "max_tokens"}]}
    with pytest.raises(ConfigError, match=r"gw.yaml: upstreams\[0\].tpm_counting: expected "
                                          r"one of reserve_max_tokens, actual, got 'max_tokens'"):
        parse_config(bad, "gw.yaml")
    over = {"upstreams": [{**base["upstreams"][0], "share": 2}]}
    with pytest.raises(ConfigError, match=r"upstreams\[0\].share: expected a fraction"):
        parse_config(over, "gw.yaml")


# ---------------------------------------------------------------------- through HTTP

SCALE = 30.0   # a virtual minute is two wall seconds
TASKS = 200


def _provider(counting: str) -> dict[str, Any]:
    """The reproduction's provider: 6,000 TPM on a sliding minute, 10-token replies."""
    p = yaml.safe_load(DEFAULT_PROVIDER_YAML)
    p["limits"] = {**p["limits"], "algorithm": "sliding", "window_s": 60, "rpm": None,
                   "tpm": TPM, "counting": counting, "per_model": {}}
    p["latency"] = {**p["latency"], "ttft_s": 0.3, "itl_s": 0.01}
    p["responder"] = {**p["responder"], "kind": "lorem", "output_tokens": REPLY}
    return p


def _counted(sim: RunningServer) -> tuple[int, dict[str, int]]:
    """Tokens the provider counted for the key so far, and its answers by status."""
    m = sim.providers["default"].stats()["keys"]["sk-ratelab"]["models"]["gpt-4o-mini"]
    return m["prompt_tokens"] + m["completion_tokens"], dict(m["requests"])


async def _run(sim: RunningServer, gw: RunningGateway) -> tuple[float, Counter[str]]:
    """Post the reproduction's 200 chats; the provider's tokens per virtual minute from
    the second to the fifth minute, and the tasks' final states."""
    bodies = [{"user": "bench", "max_tokens": MAX_TOKENS, "messages": [
        {"role": "user", "content": f"Say hi {k:03d}. "
         + "please summarise this sentence about rate limits " * 12}]}
        for k in range(TASKS)]
    start = time.monotonic()
    await post_all(gw, bodies)
    samples = []
    for minute in (1.5, 4.5):
        await asyncio.sleep(max(0.0, start + minute * 60 / SCALE - time.monotonic()))
        samples.append((time.monotonic(), _counted(sim)[0]))
    (t0, c0), (t1, c1) = samples
    rate = (c1 - c0) / ((t1 - t0) * SCALE / 60)
    deadline = time.monotonic() + 30
    while sum(gw.metrics.finished.values()) < TASKS:
        assert time.monotonic() < deadline, gw.metrics.finished
        await asyncio.sleep(0.05)
    return rate, Counter({state: n for (_, state), n in gw.metrics.finished.items()})


@pytest.mark.parametrize("counting", ["reserve", "actual"])
async def test_a_configured_tpm_is_filled_without_429s(sim_server, gateway,
                                                       counting: str) -> None:
    # the reproduction: 200 chats of 156 prompt tokens, max_tokens 200, 10-token replies.
    # The old window reserved 356 tokens a call and never settled: 36% of the bound.
    sim = await sim_server(sim_parse({"providers": [_provider(counting)],
                                      "time_scale": SCALE, "seed": 3}, "<test>"))
    cfg = gateway_config(sim, time_scale=SCALE, workers=8,
                         lanes=LaneSettings(enabled=False))
    mode = "reserve_max_tokens" if counting == "reserve" else "actual"
    up = replace(cfg.upstream, tpm=TPM, reserve_max_tokens=mode == "reserve_max_tokens")
    gw = await gateway(replace(cfg, upstreams=(up,)))
    rate, states = await _run(sim, gw)
    # every chat answered at the first call, at 85% of the bound or more (91% where the
    # provider reserves max_tokens while a reply is generated, 97% where it does not)
    assert (states, _counted(sim)[1], rate >= 0.85 * TPM) == (
        {"done": TASKS}, {"200": TASKS}, True), rate


async def test_unconfigured_limits_are_learned_and_429s_vanish(sim_server, gateway) -> None:
    # the default `ratelab gateway --upstream URL`: no rpm or tpm configured. The old window
    # did not throttle at all and met 23 429s in these 200 chats.
    sim = await sim_server(sim_parse({"providers": [_provider("reserve")],
                                      "time_scale": SCALE, "seed": 3}, "<test>"))
    gw = await gateway(gateway_config(sim, time_scale=SCALE, workers=8))
    _, states = await _run(sim, gw)
    assert (states, _counted(sim)[1].get("429", 0) <= 2) == ({"done": TASKS}, True), \
        _counted(sim)


def test_each_process_paces_its_even_part_of_the_key() -> None:
    """With two gateway processes each plans half of the key's TPM (and of a lower
    configured share); the part follows the count both ways, for throttles made before and
    after it changed."""
    one = pacer()
    one.throttle("m")
    one.set_processes(2)
    assert [t.share for t in one.throttles.values()] == [0.5]
    assert one.throttle("other").share == 0.5
    sent = run_pacer(one, 600.0)
    for i, (t0, _) in enumerate(sent):   # never past half the limit in any minute...
        assert sum(tok for t, tok in sent[i:] if t < t0 + 60) <= TPM / 2
    steady = [tok for t, tok in sent if 120 <= t < 540]   # ...and close to it
    assert sum(steady) / 7 >= 0.85 * TPM / 2
    one.set_processes(1)
    assert one.throttle("m").share == 1.0
    part = pacer(share=0.6)
    part.set_processes(3)
    assert part.throttle("m").share == pytest.approx(0.2)


async def test_processes_sharing_redis_split_the_key_and_follow_each_other(
        redis_server, sim_server, gateway) -> None:
    sim = await sim_server(time_scale=20, seed=5)
    cfg = gateway_config(sim, time_scale=20)
    first = await gateway(cfg, redis_url=redis_server.url)
    assert first.pool.windows["default"].pacer.processes == 1
    second = await gateway(cfg, redis_url=redis_server.url)
    assert second.pool.windows["default"].pacer.processes == 2   # counted at its start
    deadline = time.monotonic() + 5
    while first.pool.windows["default"].pacer.processes != 2:   # at the first's next beat
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await second.close()   # leaves: the first takes the whole key at its next beat
    deadline = time.monotonic() + 5
    while first.pool.windows["default"].pacer.processes != 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
