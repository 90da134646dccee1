"""The throughput bound of DESIGN.md against the seed article's figures."""

from __future__ import annotations

import pytest

from loadtests.bound import BoundInputs, throughput_bound


def test_single_item_requests_at_200k_tpm() -> None:
    # 700-token system prompt, 15-token item, 15-token label reply: ~270 requests/min
    bound = throughput_bound(BoundInputs(700, 1, 15, 15, latency_s=1.0, tpm=200_000))
    assert bound.items_per_min == pytest.approx(273.97, abs=0.01)
    assert bound.binding == "tpm" and bound.requests_per_min == bound.items_per_min
    assert round(bound.items_per_min, -1) == 270


def test_semantic_batching_20_per_request() -> None:
    # 20 items a request, 5 reply tokens per item: ~3,600 items/min, 12-fold fewer tokens
    batched = throughput_bound(BoundInputs(700, 20, 15, 5, latency_s=1.0, tpm=200_000))
    single = throughput_bound(BoundInputs(700, 1, 15, 15, latency_s=1.0, tpm=200_000))
    assert batched.items_per_min == pytest.approx(3636.36, abs=0.01)
    assert batched.tokens_per_item == 55.0 and single.tokens_per_item == 730.0
    assert 12 <= single.tokens_per_item / batched.tokens_per_item < 14
    # 2,000,000 items: ~9 h batched against ~5 days single-item at the bound
    assert 2_000_000 / batched.items_per_min / 60 == pytest.approx(9.17, abs=0.01)
    assert 2_000_000 / single.items_per_min / 60 / 24 == pytest.approx(5.07, abs=0.01)


def test_each_term_and_its_binding() -> None:
    rpm = throughput_bound(BoundInputs(700, 1, 15, 15, 1.0, tpm=10**9, rpm=100))
    assert (rpm.binding, rpm.items_per_min) == ("rpm", 100)
    latency = throughput_bound(BoundInputs(700, 1, 15, 15, 2.0, tpm=10**9, client_concurrency=4))
    assert (latency.binding, latency.items_per_min) == ("latency", 120)
    conc = throughput_bound(
        BoundInputs(700, 10, 15, 5, 2.0, provider_concurrency=2, client_concurrency=8)
    )
    assert (conc.binding, conc.items_per_min) == ("concurrency", 600)
    assert set(conc.terms) == {"concurrency", "latency"}


def test_split_input_output_tpm_binds_as_tpm() -> None:
    bound = throughput_bound(
        BoundInputs(700, 20, 15, 5, 1.0, tpm=10**9, input_tpm=100_000, output_tpm=1_000)
    )
    assert bound.terms["output_tpm"] == 200.0
    assert bound.terms["input_tpm"] == pytest.approx(2000.0)
    assert (bound.binding, bound.items_per_min) == ("tpm", 200.0)


def test_a_daily_token_cap_binds_at_its_daily_average() -> None:
    # seed 003's free tier: 100,000 tokens a day. 20 items of 15 + 5 tokens and a 700-token
    # prompt are 1,100 tokens a request: 1,818 items a day, 1.26 items/min, whatever TPM
    day = throughput_bound(BoundInputs(700, 20, 15, 5, 1.0, tpm=200_000, rpm=500,
                                       tokens_per_day=100_000, max_tokens=400,
                                       reserve_max_tokens=True))
    assert day.binding == "tokens_per_day"
    # a day counts the reply's actual tokens, not the max_tokens a minute's window reserves
    assert day.items_per_min == pytest.approx(100_000 * 20 / 1100 / 1440)
    assert day.terms["tpm"] == pytest.approx(200_000 * 20 / 1400)
    two_keys = throughput_bound(BoundInputs(700, 20, 15, 5, 1.0, tokens_per_day=100_000,
                                            keys=2))
    assert two_keys.items_per_min == pytest.approx(2 * day.items_per_min)


def test_max_tokens_reservation_and_keys() -> None:
    reserved = throughput_bound(
        BoundInputs(700, 20, 15, 5, 1.0, tpm=200_000, max_tokens=400, reserve_max_tokens=True)
    )
    assert reserved.items_per_min == pytest.approx(200_000 * 20 / 1400)
    three_keys = throughput_bound(BoundInputs(700, 20, 15, 5, 1.0, tpm=200_000, keys=3))
    assert three_keys.items_per_min == pytest.approx(3 * 3636.3636, abs=0.01)


def test_efficiency_and_refusals() -> None:
    bound = throughput_bound(BoundInputs(0, 1, 10, 0, 1.0, rpm=60))
    assert bound.efficiency(30) == 0.5
    with pytest.raises(ValueError, match="no limit"):
        throughput_bound(BoundInputs(700, 1, 15, 15, 1.0))
    with pytest.raises(ValueError, match="batch_size"):
        throughput_bound(BoundInputs(700, 0, 15, 15, 1.0, tpm=1))
