"""Rate limits through the facade: exact 429 bodies, headers, retry times, per algorithm."""

from __future__ import annotations

from simulator.model.provider import Admission, Refusal
from tests.simulator.model.sim_model_helpers import chat, provider

RPM60 = """
name: t
limits: {algorithm: sliding, rpm: 60}
responder: {output_tokens: 10}
"""


def _admit(p, now: float, key: str = "k", body: dict | None = None) -> Admission:
    result = p.chat(now, key, body or chat())
    assert isinstance(result, Admission), result
    assert result.plan is not None
    p.finish(now, result, len(result.plan.chunks))
    return result


def _refuse(p, now: float, key: str = "k", body: dict | None = None) -> Refusal:
    result = p.chat(now, key, body or chat())
    assert isinstance(result, Refusal), result
    return result


def test_rpm_60_sliding_refuses_request_61_and_admits_after_retry_after() -> None:
    p = provider(RPM60)
    for i in range(60):
        last = _admit(p, float(i))
    assert last.headers["x-ratelimit-remaining-requests"] == "0"
    assert last.headers["x-ratelimit-reset-requests"] == "1m0s"

    refused = _refuse(p, 59.5)
    assert refused.status == 429
    # the refusal itself counts (OpenAI style), so two entries (t=0, t=1) must expire
    assert refused.headers["retry-after-ms"] == "1500"
    assert refused.headers["retry-after"] == "2"
    assert refused.headers["x-ratelimit-limit-requests"] == "60"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert refused.body == {"error": {
        "message": "Rate limit reached for m in organization org-ratelab on requests per min "
                   "(RPM): Limit 60, Used 60, Requested 1. Please try again in 1.5s. Visit "
                   "https://platform.openai.com/account/rate-limits to learn more.",
        "type": "requests", "param": None, "code": "rate_limit_exceeded"}}

    admitted = _admit(p, 61.0)
    assert admitted.headers["x-ratelimit-remaining-requests"] == "0"


def test_without_counting_refusals_the_retry_comes_sooner() -> None:
    p = provider(RPM60 + "count_refused: false\n")
    for i in range(60):
        _admit(p, float(i))
    refused = _refuse(p, 59.5)
    assert refused.headers["retry-after-ms"] == "500"
    assert refused.headers["retry-after"] == "1"
    _admit(p, 60.0)


def test_refusals_counted_against_rpm_turn_a_retry_loop_into_a_storm() -> None:
    p = provider(RPM60)
    for i in range(60):
        _admit(p, i / 100)  # a burst at the start
    # a naive client retrying every 100 ms keeps pushing its own admission back
    refusals = sum(isinstance(p.chat(1.0 + i / 10, "k", chat()), Refusal) for i in range(600))
    assert refusals == 600


def test_time_scale_divides_wire_durations() -> None:
    p = provider(RPM60 + "count_refused: false\n", time_scale=60.0)
    for i in range(60):
        _admit(p, float(i))
    refused = _refuse(p, 59.5)
    assert refused.headers["retry-after-ms"] == "9"  # 0.5 virtual s = 8.33 wall ms, rounded up
    assert refused.headers["x-ratelimit-reset-requests"] == "992ms"  # 59.5 virtual s


TPM = """
name: t
limits: {{tpm: 1000, counting: {counting}}}
responder: {{output_tokens: 20}}
"""


def test_reservation_refuses_what_actual_counting_admits() -> None:
    body = chat(max_tokens=600)  # prompt 8 tokens
    reserve = provider(TPM.format(counting="reserve"))
    actual = provider(TPM.format(counting="actual"))
    first = reserve.chat(0.0, "k", body)
    assert isinstance(first, Admission)
    assert first.headers["x-ratelimit-remaining-tokens"] == "392"  # 1000 - (8 + 600)
    refused = _refuse(reserve, 1.0, body=body)
    assert refused.body["error"]["type"] == "tokens"
    assert "on tokens per min (TPM): Limit 1000, Used 608, Requested 608." in (
        refused.body["error"]["message"])
    assert refused.headers["retry-after"] == "59"
    assert isinstance(actual.chat(0.0, "k", body), Admission)
    assert isinstance(actual.chat(1.0, "k", body), Admission)

    # settling the reservation to actual usage frees the difference at once
    assert first.plan is not None and first.plan.usage.total_tokens == 28
    reserve.finish(2.0, first, len(first.plan.chunks))
    second = reserve.chat(2.0, "k", body)
    assert isinstance(second, Admission)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 28 - 608)


def test_a_request_larger_than_the_limit_says_no_retry_can_succeed() -> None:
    p = provider(TPM.format(counting="reserve"))
    refused = _refuse(p, 0.0, body=chat(max_tokens=5000))
    assert refused.status == 429
    assert refused.headers["x-should-retry"] == "false"
    assert "retry-after" not in refused.headers
    assert refused.body["error"]["message"].startswith(
        "Request too large for m in organization org-ratelab on tokens per min (TPM): "
        "Limit 1000, Requested 5008.")


def test_token_bucket_with_anthropic_headers() -> None:
    p = provider("""
name: t
headers: anthropic
limits: {algorithm: token_bucket, rpm: 60, tpm: 100000}
responder: {output_tokens: 10}
""")
    for _ in range(60):
        _admit(p, 0.0)
    refused = _refuse(p, 0.0)
    assert refused.headers["retry-after-ms"] == "1000"  # one request refills per second
    assert refused.headers["anthropic-ratelimit-requests-remaining"] == "0"
    admitted = _admit(p, 1.0)
    h = admitted.headers
    assert h["anthropic-ratelimit-requests-limit"] == "60"
    assert h["anthropic-ratelimit-requests-reset"] == "2023-11-14T22:14:21Z"  # epoch + 61 s
    # the bucket refilled in the second; 100000 - (8 + 15 reserved) = 99977 is sent rounded
    assert h["anthropic-ratelimit-tokens-remaining"] == "100000"
    assert not any(k.startswith("x-ratelimit") for k in h)


def test_fixed_window_admits_at_the_boundary() -> None:
    p = provider("name: t\nlimits: {algorithm: fixed, rpm: 2}\ncount_refused: false\n")
    _admit(p, 0.0)
    _admit(p, 1.0)
    refused = _refuse(p, 30.0)
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["x-ratelimit-reset-requests"] == "30s"
    _admit(p, 60.0)


def test_azure_one_second_sub_windows_refuse_a_burst() -> None:
    p = provider("""
name: t
limits: {algorithm: sliding, rpm: 600, request_window_s: 1, tpm: 100000, counting: azure}
count_refused: false
""")
    for i in range(10):
        last = _admit(p, i / 100)
    assert last.headers["x-ratelimit-limit-requests"] == "10"
    refused = _refuse(p, 0.5)
    assert refused.headers["retry-after-ms"] == "500"
    _admit(p, 1.0)


def test_separate_output_tpm_counts_tokens_as_generated() -> None:
    p = provider("""
name: t
headers: anthropic
limits: {algorithm: token_bucket, input_tpm: 10000, output_tpm: 120}
responder: {output_tokens: 150}
""")
    first = p.chat(0.0, "k", chat())
    assert isinstance(first, Admission) and first.plan is not None
    assert isinstance(p.chat(0.0, "k", chat()), Admission)  # max_tokens is not reserved
    p.finish(1.0, first, 150)
    refused = _refuse(p, 1.0)
    assert "output tokens per min (OTPM)" in refused.body["error"]["message"]
    # the full bucket (120) minus 150 is -30, refilling 2 per second: 31 tokens take 15.5 s
    assert refused.headers["retry-after-ms"] == "15500"


def test_concurrency_limit_and_release() -> None:
    p = provider("name: t\nlimits: {concurrency: 2}\n")
    a = p.chat(0.0, "k", chat())
    b = p.chat(0.0, "k", chat())
    assert isinstance(a, Admission) and isinstance(b, Admission)
    refused = _refuse(p, 0.0)
    assert "concurrent requests: Limit 2, Used 2" in refused.body["error"]["message"]
    p.finish(0.1, a, 0)
    p.finish(0.1, a, 0)  # a second finish is ignored
    assert isinstance(p.chat(0.2, "k", chat()), Admission)
    assert isinstance(p.chat(0.2, "k", chat()), Refusal)


def test_tokens_per_day() -> None:
    p = provider("name: t\nlimits: {tokens_per_day: 100}\nresponder: {output_tokens: 30}\n")
    for _ in range(2):
        _admit(p, 0.0)  # 2 * (8 + 30) = 76 tokens
    _admit(p, 10.0)
    refused = _refuse(p, 20.0)
    assert "tokens per day (TPD)" in refused.body["error"]["message"]
    _admit(p, 86_400.0)


def test_per_model_and_per_key_overrides_of_the_tier() -> None:
    p = provider("""
name: t
models: {a: {}, b: {}}
limits: {rpm: 1, per_model: {b: {rpm: 2}}}
keys:
  k: {}
  vip: {limits: {rpm: 3}}
""")
    assert p.limit_spec("k", "a").rpm == 1
    assert p.limit_spec("k", "b").rpm == 2
    assert p.limit_spec("vip", "a").rpm == 3
    assert p.limit_spec("vip", "b").rpm == 3
    _admit(p, 0.0, body=chat(model="a"))
    _refuse(p, 0.0, body=chat(model="a"))
    _admit(p, 0.0, body=chat(model="b"))  # each model has its own windows
