"""The facade: order of checks, billing and 402, tenants, GPU queueing, admin, reproducibility."""

from __future__ import annotations

import pytest

from simulator.model.billing import BALANCE_HEADER, CHARGED_HEADER
from simulator.model.config import default_config
from simulator.model.provider import Admission, Provider, Refusal
from tests.simulator.model.sim_model_helpers import admitted, chat, provider, refused

MDB = """
name: mdb
models: {m: {input_usd_per_mtok: 1.0, output_usd_per_mtok: 2.0}}
keys:
  a: {balance_usd: 0.001}
  b: {balance_usd: unlimited}
limits: {rpm: 1000, tpm: 1000000}
responder: {output_tokens: 100}
"""


def _run(p: Provider, now: float, key: str, body: dict | None = None) -> Admission | Refusal:
    result = p.chat(now, key, body or chat())
    if isinstance(result, Admission) and result.plan is not None:
        p.finish(now, result, len(result.plan.chunks))
    return result


def test_402_charges_sum_to_the_balance_spent_and_the_refusal_is_free() -> None:
    p = provider(MDB)
    charges = []
    t = 0.0
    while True:
        result = _run(p, t, "a")
        if isinstance(result, Refusal):
            break
        charges.append(float(result.headers[CHARGED_HEADER]))
        last_balance = float(result.headers[BALANCE_HEADER])
        t += 1.0
    assert charges == [0.000208] * 5  # 8 prompt tokens at $1/M + 100 completion at $2/M
    assert sum(charges) == pytest.approx(0.001 - last_balance, abs=1e-12)
    assert result.status == 402
    assert result.body["error"]["code"] == "insufficient_credits"
    assert "retry-after" not in result.headers
    spent = p.stats()["keys"]["a"]["spent_usd"]
    assert isinstance(_run(p, t + 1, "a"), Refusal)
    assert p.stats()["keys"]["a"]["spent_usd"] == spent  # refusals are not charged
    assert p.stats()["keys"]["a"]["models"]["m"]["requests"] == {"200": 5, "402": 2}
    assert p.topup("a", 1.0) == pytest.approx(1.0 - 0.00004)
    assert isinstance(_run(p, t + 2, "a"), Admission)
    with pytest.raises(KeyError):
        p.topup("nobody", 1.0)


@pytest.mark.parametrize(("style", "status", "type_", "code"), [
    ("openai", 429, "insufficient_quota", "insufficient_quota"),
    ("anthropic", 429, "rate_limit_error", "enforced_spend_limit_reached"),
])
def test_money_styles(style: str, status: int, type_: str, code: str) -> None:
    p = provider(MDB + f"billing: {{money_style: {style}}}\n")
    for i in range(5):
        assert isinstance(_run(p, float(i), "a"), Admission)
    refused = _run(p, 5.0, "a")
    assert isinstance(refused, Refusal)
    assert (refused.status, refused.body["error"]["type"], refused.body["error"]["code"]) == (
        status, type_, code)
    assert "retry-after" not in refused.headers and "retry-after-ms" not in refused.headers


def test_two_tenants_are_isolated() -> None:
    shared = provider(MDB)
    alone = provider(MDB)
    for i in range(20):
        _run(shared, float(i), "a")  # exhausts its balance after 5
        ours = _run(shared, float(i) + 0.5, "b")
        solo = _run(alone, float(i) + 0.5, "b")
        assert isinstance(ours, Admission) and isinstance(solo, Admission)
        assert ours.headers == solo.headers


def test_cost_cap_refuses_the_worst_case_up_front() -> None:
    p = provider(MDB + "billing: {cost_cap_usd: 0.0005}\n")
    refused = _run(p, 0.0, "b", chat(max_tokens=300))  # 8 * 1e-6 + 300 * 2e-6 > cap
    assert isinstance(refused, Refusal) and refused.status == 400
    assert refused.body["error"]["code"] == "cost_cap_exceeded"
    assert isinstance(_run(p, 0.0, "b", chat(max_tokens=200)), Admission)
    # without max_tokens the worst case is the model's whole output
    assert isinstance(_run(p, 0.0, "b"), Refusal)


def test_refund_of_undelivered_tokens() -> None:
    p = provider(MDB)
    adm = p.chat(0.0, "a", chat())
    assert isinstance(adm, Admission) and adm.plan is not None
    p.finish(1.0, adm, 25)  # the client left after 25 of 100 tokens
    stats = p.stats()["keys"]["a"]
    assert stats["models"]["m"]["completion_tokens"] == 25
    assert stats["spent_usd"] == pytest.approx(8e-6 + 25 * 2e-6)


def test_order_of_checks() -> None:
    p = provider(MDB + "faults: {outages: [{start_s: 10, end_s: 20, status: 503}]}\n")
    bad_body = {"model": "m", "messages": []}
    assert refused(_run(p, 0.0, "nobody", bad_body)).status == 400  # body before key
    no_key = refused(_run(p, 0.0, "nobody"))
    assert no_key.status == 401 and no_key.body["error"]["code"] == "invalid_api_key"
    assert refused(p.chat(0.0, None, chat())).status == 401
    missing = refused(_run(p, 0.0, "b", chat(model="nope")))
    assert missing.status == 404 and missing.body["error"]["code"] == "model_not_found"
    long = refused(_run(p, 0.0, "b", chat("x" * 600_000)))
    assert long.status == 400 and long.body["error"]["code"] == "context_length_exceeded"
    assert refused(_run(p, 15.0, "b")).status == 503
    assert isinstance(_run(p, 20.0, "b"), Admission)


def test_bad_bodies_never_raise() -> None:
    p = Provider(default_config().providers[0], seed=0)
    bodies: list[object] = [
        None, [], "x", 3, {}, {"model": 3}, {"model": "gpt-4o-mini"},
        {"model": "gpt-4o-mini", "messages": "hi"},
        {"model": "gpt-4o-mini", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "gpt-4o-mini", "messages": [{"role": "user"}]},
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": 5}]},
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [5]}]},
        chat(model="gpt-4o-mini", max_tokens=0), chat(model="gpt-4o-mini", n=True),
        chat(model="gpt-4o-mini", temperature=9), chat(model="gpt-4o-mini", bogus=1),
        chat(model="gpt-4o-mini", stream_options={"include_usage": True}),
        chat(model="gpt-4o-mini", stream=True, stream_options=[]),
        chat(model="gpt-4o-mini", max_tokens=10**6), chat(model="gpt-4o-mini", stop=[1]),
    ]
    for body in bodies:
        result = p.chat(0.0, "sk-ratelab", body)
        assert isinstance(result, Refusal) and result.status == 400, body
        assert set(result.body["error"]) >= {"message", "type", "param", "code"}
    for body in [None, {"model": "text-embedding-3-small"},
                 {"model": "text-embedding-3-small", "input": []},
                 {"model": "text-embedding-3-small", "input": [""]},
                 {"model": "text-embedding-3-small", "input": "x", "dimensions": 99999}]:
        result = p.embeddings(0.0, "sk-ratelab", body)
        assert isinstance(result, Refusal) and result.status == 400, body


def test_embeddings_admission() -> None:
    p = Provider(default_config().providers[0], seed=0)
    adm = p.embeddings(0.0, "sk-ratelab", {"model": "text-embedding-3-small",
                                           "input": ["abcd" * 3, [1, 2, 3]]})
    assert isinstance(adm, Admission) and adm.plan is not None
    assert (adm.kind, adm.n_inputs, adm.dims, adm.plan.usage.prompt_tokens) == (
        "embeddings", 2, 1536, 6)
    wrong = p.embeddings(0.0, "sk-ratelab", {"model": "gpt-4o-mini", "input": "x"})
    assert isinstance(wrong, Refusal) and wrong.status == 400


def test_usage_matches_the_reply_and_streams_in_4_character_chunks() -> None:
    p = provider("name: t\nresponder: {kind: echo}\n")
    adm = p.chat(0.0, "k", chat("abcdefghij", max_tokens=2, stream=True,
                                stream_options={"include_usage": True}))
    assert isinstance(adm, Admission) and adm.plan is not None
    assert adm.stream and adm.include_usage
    assert adm.plan.text == "abcdefgh" and adm.plan.n_chunks == 2
    assert adm.plan.chunks == ("abcd", "efgh")
    assert adm.plan.chunks is adm.plan.chunks  # split once, on first use
    assert adm.plan.finish_reason == "length"
    assert (adm.plan.usage.prompt_tokens, adm.plan.usage.completion_tokens) == (9, 2)


def test_gpu_slots_queue_fifo_and_slow_down_with_load() -> None:
    p = provider("""
name: gpu
gpu: {max_seqs: 2, knee_seqs: 1, itl_growth_per_seq: 0.5}
latency: {ttft_s: 0.1, itl_s: 0.02}
responder: {output_tokens: 5}
""")
    a, b, c, d = (admitted(p.chat(0.0, "k", chat())) for _ in range(4))
    assert a.plan is not None and b.plan is not None
    assert a.plan.itl_s == (0.02,) * 4
    assert b.plan.itl_s == pytest.approx((0.03,) * 4)  # two sequences: 1.5x per token
    assert c.plan is None and d.plan is None
    assert p.stats()["queued"] == 2
    assert p.finish(0.5, d, 0) == []  # a queued request whose client left is withdrawn
    assert p.finish(1.0, a, 5) == [c]
    assert c.plan is not None and c.plan.ttft_s == 0.1
    assert p.stats()["queued"] == 0


def test_same_seed_same_plans_and_reset_restores_everything() -> None:
    cfg = default_config().providers[0]
    p1, p2 = Provider(cfg, seed=7), Provider(cfg, seed=7)
    body = chat(model="gpt-4o-mini")

    def plans(p: Provider) -> list:
        return [admitted(_run(p, i * 0.1, "sk-ratelab", body)).plan for i in range(20)]

    plans1 = plans(p1)
    assert plans1 == plans(p2)
    assert plans1 != plans(Provider(cfg, seed=8))
    p1.reset(100.0)
    assert p1.stats()["keys"]["sk-ratelab"]["models"] == {}
    assert plans(p1) == plans1


def test_models_listing() -> None:
    p = Provider(default_config().providers[0], seed=0)
    ids = [m["id"] for m in p.models()["data"]]
    assert "gpt-4o-mini" in ids and p.models()["object"] == "list"


def test_accept_any_key_creates_tenants_on_the_default_tier() -> None:
    p = provider("name: t\naccept_any_key: true\nkeys: {}\nlimits: {rpm: 1}\n")
    assert isinstance(_run(p, 0.0, "sk-anyone"), Admission)
    assert isinstance(_run(p, 0.0, "sk-anyone"), Refusal)
    assert isinstance(_run(p, 0.0, "sk-someone-else"), Admission)
