"""The rolling-window throttle: reserve, settle, wait for room, headers, graduated steps."""

from __future__ import annotations

from batchclient.config import ThrottleSettings
from batchclient.policy.ratelimit_headers import RateHeaders
from batchclient.policy.throttle import Throttle

NO_STEPS = ThrottleSettings(steps=(), ceiling=1.0, expiry_margin_s=0.0)


def test_waits_exactly_until_enough_tokens_leave_the_window() -> None:
    t = Throttle(NO_STEPS, tpm=1000, rpm=None)
    t.reserve(0.0, 1, 600)
    t.reserve(10.0, 2, 300)
    assert t.delay(10.0, 100) == 0.0
    assert t.delay(10.0, 200) == 50.0  # the 600 reserved at t=0 leave at t=60
    assert t.delay(60.0, 200) == 0.0


def test_settle_replaces_the_reservation_by_actual_usage() -> None:
    t = Throttle(NO_STEPS, tpm=1000, rpm=None)
    t.reserve(0.0, 1, 900)
    assert t.delay(1.0, 200) > 0
    t.settle(1.0, 1, 300)
    assert t.used_tokens == 300 and t.delay(1.0, 200) == 0.0
    t.reserve(2.0, 2, 100)
    t.settle(2.5, 2, 0, counted=False)
    assert (t.used_tokens, t.used_requests) == (300, 1)


def test_input_and_output_limits_each_hold_their_own_tokens() -> None:
    # an Anthropic-like key: 1,000 prompt and 200 reply tokens a minute, no total TPM
    t = Throttle(NO_STEPS, tpm=None, rpm=None, input_tpm=1000, output_tpm=200)
    t.reserve(0.0, 1, 700, prompt=600)  # 600 prompt + 100 reply
    t.reserve(10.0, 2, 350, prompt=300)  # 300 + 50
    # 100 prompt tokens fit the input limit; 150 wait for the first request to leave
    assert t.delay(10.0, 120, prompt=100) == 0.0
    assert t.delay(10.0, 170, prompt=150) == 50.0
    # a reply-heavy request waits on the output limit though its prompt fits
    assert t.delay(10.0, 110, prompt=10) == 50.0
    # settled to its usage (a shorter reply), the first request frees output room
    t.settle(11.0, 1, 620, prompt=600)
    assert (t.used_tokens, t.used_prompt) == (970, 900)
    assert t.delay(11.0, 110, prompt=10) == 0.0
    # a refusal counts nothing, prompt included
    t.reserve(12.0, 3, 50, prompt=40)
    t.settle(12.5, 3, 0, prompt=40)
    assert (t.used_tokens, t.used_prompt) == (970, 900)
    # and the prompt's share leaves the window with its request
    assert t.delay(65.0, 700, prompt=600) == 0.0 and t.used_prompt == 300


def test_counting_mode_decides_what_is_reserved() -> None:
    assert Throttle(NO_STEPS, 1000, None, reserve_max_tokens=True).estimate(100, 50, 20) == 150
    assert Throttle(NO_STEPS, 1000, None, reserve_max_tokens=False).estimate(100, 50, 20) == 120


def test_rpm_limit() -> None:
    t = Throttle(NO_STEPS, tpm=None, rpm=2)
    t.reserve(0.0, 1, 1)
    t.reserve(1.0, 2, 1)
    assert t.delay(1.0, 1) == 59.0


def test_provider_headers_correct_an_optimistic_estimate() -> None:
    t = Throttle(NO_STEPS, tpm=None, rpm=None)
    t.reserve(0.0, 1, 100)
    t.settle(1.0, 1, 100)
    # Someone else shares the key: the provider has 900 of 1000 used.
    t.observe(1.0, RateHeaders(limit_tokens=1000, remaining_tokens=100, reset_tokens_s=30.0))
    assert t.tpm == 1000
    assert t.usage(1.0)[0] == 900
    assert t.delay(1.0, 200) > 0
    assert t.delay(31.0, 200) == 0.0  # the snapshot is stale after its reset


def test_graduated_steps_space_dispatches_over_the_slots() -> None:
    t = Throttle(ThrottleSettings(ceiling=1.0, expiry_margin_s=0.0), tpm=1000, rpm=None)
    t.reserve(0.0, 1, 900)
    assert t.delay(0.0, 10, slots=4) == 0.075  # 910/1000 > 85 %: 0.3 s over 4 slots
    t.reserve(0.0, 2, 60)
    assert t.delay(0.0, 10, slots=4) == 0.2  # 970/1000 > 95 %: 0.8 s over 4 slots
    assert t.delay(0.1, 10, slots=4) == 0.1
    assert Throttle(ThrottleSettings(), tpm=1000, rpm=None).delay(0.0, 10) == 0.0


def test_a_share_of_the_key_bounds_our_own_usage_and_the_headers_the_whole() -> None:
    t = Throttle(NO_STEPS, tpm=1000, rpm=10, share=0.5)
    t.reserve(0.0, 1, 450)
    assert t.delay(0.0, 50) == 0.0  # 500 of our 500
    assert t.delay(0.0, 51) == 60.0  # over our half: wait for our own 450 to leave
    # the other client's use, through the headers: 900 of the key's 1000 used
    t.observe(1.0, RateHeaders(limit_tokens=1000, remaining_tokens=100, reset_tokens_s=30.0))
    assert t.delay(1.0, 50) == 0.0  # 950 of the whole
    assert t.delay(1.0, 101) == 59.0  # 1001 of the whole, though ours is 451 of 500
    for call in range(2, 6):
        t.reserve(2.0, call, 1)
    assert t.delay(2.0, 1) == 58.0  # a sixth request of our 5 a minute (RPM 10 / 2)
    # graduated steps count our fraction of our part
    g = Throttle(ThrottleSettings(ceiling=1.0, expiry_margin_s=0.0), tpm=1000, rpm=None,
                 share=0.5)
    g.reserve(0.0, 1, 450)
    assert g.delay(0.0, 10) == 0.3  # 460/500 > 85 %


def test_blocked_by_retry_after() -> None:
    t = Throttle(NO_STEPS, tpm=1000, rpm=None)
    t.block(12.0)
    assert t.delay(10.0, 1) == 2.0
