"""Pure policy pieces: tokens, packing, parsing, headers, classify, retry, breaker,
concurrency, routing, user limits, lanes, watchdog, adaptive batch size."""

from __future__ import annotations

import json
import random

import pytest

from batchclient.config import (
    BreakerSettings,
    ConcurrencySettings,
    RetrySettings,
    RouteRule,
)
from batchclient.policy.adaptive import AdaptiveBatchSize
from batchclient.policy.breaker import Breaker
from batchclient.policy.classify import Verdict, classify
from batchclient.policy.concurrency import Concurrency
from batchclient.policy.lanes import LanePolicy
from batchclient.policy.packing import Packer, item_line
from batchclient.policy.parsing import parse_reply
from batchclient.policy.ratelimit_headers import parse_duration, read_rate_headers, retry_after_s
from batchclient.policy.retry import full_jitter, naive_delay, retry_delay
from batchclient.policy.routing import choose_provider, route_model
from batchclient.policy.tokens import chat_prompt_tokens, reply_tokens, text_tokens
from batchclient.policy.userlimits import Tier, UserLimits
from batchclient.policy.watchdog import LoopWatch, repetition_loop
from batchclient.policy.wire import Item, Response
from tests.batchclient.bc_fakes import config, provider, task

LABELS = {c: c.lower() for c in "ABCDEFGH"}


def test_tokens_mirror_the_ratelab_tokenizer() -> None:
    assert [text_tokens(s) for s in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]
    assert chat_prompt_tokens([{"role": "system", "content": "x" * 2800},
                               {"role": "user", "content": "y" * 60}]) == 3 + 703 + 18
    reply = '[{"id":548033,"c":"E"},{"id":"a-7","c":"B"}]'
    assert reply_tokens(["548033", "a-7"], 1) >= text_tokens(reply)
    assert reply_tokens(["548033", "a-7"], 1) - text_tokens(reply) <= 1


def test_packer_respects_count_and_budget_and_sizes_max_tokens_tightly() -> None:
    packer = Packer(task(), reply_slack_tokens=0)
    items = [Item(str(i), "x" * 60) for i in range(1, 51)]
    assert packer.pack(items, 20, 100000) == 20
    exact = packer.request_tokens(items[:7])
    assert packer.pack(items, 20, exact) == 7
    assert packer.pack(items, 20, exact - 1) == 6
    assert packer.prompt_tokens(items[:3]) == chat_prompt_tokens(packer.messages(items[:3]))
    reply = json.dumps([{"id": i, "c": "A"} for i in range(1, 21)], separators=(",", ":"))
    assert packer.max_tokens(items[:20]) in (text_tokens(reply), text_tokens(reply) + 1)
    assert item_line(Item("a", "two\nlines")) == "id=a: two lines"


def test_user_message_puts_each_item_on_one_line_whatever_its_text_breaks_on() -> None:
    packer = Packer(task())
    plain = [Item("1", "plain text"), Item("a-2", "more")]
    assert packer.user_message(plain) == "\n".join(
        [task().instructions, "id=1: plain text", "id=a-2: more"])
    for brk in ("\n", "\r\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"):
        items = [*plain, Item("3", f"two{brk}lines"), Item("4", f"trailing{brk}")]
        assert packer.user_message(items) == "\n".join(
            [task().instructions, *(item_line(i) for i in items)])
    assert packer.user_message([]) == task().instructions


def test_parse_reply_is_keyed_by_id_never_by_position() -> None:
    sent = ["548033", "548034", "a-7"]
    parsed = parse_reply('[{"id":548034,"c":"B"},{"id":"a-7","c":"C"}]', sent, LABELS)
    assert parsed.codes == {"548034": "B", "a-7": "C"} and parsed.missing == ("548033",)


def test_parse_reply_reads_a_whole_reply_in_order_or_shuffled_alike() -> None:
    sent = ["548033", "0", "007", "a-7", "9"]
    objects = [{"id": 548033, "c": "E"}, {"id": 0, "c": "A"}, {"id": 7, "c": "B"},
               {"id": "a-7", "c": "C"}, {"id": "9", "c": "D"}]
    expected = {"548033": "E", "0": "A", "007": "B", "a-7": "C", "9": "D"}
    for order in (objects, objects[::-1]):
        parsed = parse_reply(json.dumps(order), sent, LABELS, "stop")
        assert parsed.codes == expected and list(parsed.codes) == [
            str(o["id"]) if o["id"] != 7 else "007" for o in order]
        assert not (parsed.rejected or parsed.missing or parsed.malformed or parsed.truncated)
    cut = parse_reply(json.dumps(objects), sent, LABELS, "length")
    assert cut.codes == expected and cut.truncated and not cut.malformed


def test_parse_reply_rejects_bad_codes_unknown_and_repeated_ids() -> None:
    sent = ["1", "2", "3"]
    text = '[{"id":1,"c":"A"},{"id":1,"c":"B"},{"id":2,"c":"Z"},{"id":99,"c":"A"},{"id":3,"c":"C"}]'
    parsed = parse_reply(text, sent, LABELS)
    assert parsed.codes == {"3": "C"}
    assert set(parsed.rejected) == {"1", "2"} and parsed.unknown_ids == 1


def test_parse_reply_keeps_the_safe_prefix_of_truncated_or_malformed_replies() -> None:
    sent = ["1", "2", "3"]
    cut = 'Here are the results:\n[{"id":1,"c":"A"},{"id":2,"c":"B"},{"id":3,"c'
    parsed = parse_reply(cut, sent, LABELS, "length")
    assert parsed.codes == {"1": "A", "2": "B"} and parsed.truncated and parsed.missing == ("3",)
    trailing = parse_reply('[{"id":1,"c":"A"},{"id":2,"c":"B"},]', sent, LABELS)
    assert trailing.codes == {"1": "A", "2": "B"} and trailing.malformed
    quotes = parse_reply("[{'id':1,'c':'A'}]", sent, LABELS)
    assert quotes.codes == {} and quotes.malformed
    assert parse_reply("no json here", sent, LABELS).codes == {}


def test_parse_reply_reads_an_array_wrapped_in_an_object_as_whole() -> None:
    # JSON mode makes a model write an object: the one array in it is the answer, undamaged
    sent = ["1", "2", "3"]
    wrapped = parse_reply('{"results": [{"id":1,"c":"A"},{"id":2,"c":"B"},{"id":3,"c":"C"}]}',
                          sent, LABELS, "stop")
    assert wrapped.codes == {"1": "A", "2": "B", "3": "C"}
    assert not (wrapped.malformed or wrapped.truncated or wrapped.missing)
    cut = parse_reply('{"results":[{"id":1,"c":"A"},{"id":2,"c":"B"},{"id":3,', sent, LABELS,
                      "length")
    assert cut.codes == {"1": "A", "2": "B"} and cut.truncated and cut.missing == ("3",)
    # two arrays: which holds the answers is unknown, so the reply is not taken as whole
    two = parse_reply('{"a": [{"id":1,"c":"A"}], "b": []}', sent, LABELS, "stop")
    assert two.malformed


def test_parse_reply_matches_all_digit_ids_as_numbers() -> None:
    parsed = parse_reply('[{"id":7,"c":"A"},{"id":true,"c":"B"}]', ["007", "x"], LABELS)
    assert parsed.codes == {"007": "A"}


def test_rate_headers_both_families_scaled_to_virtual_time() -> None:
    assert parse_duration("6m0s") == 360.0 and parse_duration("20ms") == 0.02
    assert parse_duration("1h2m3.5s") == 3723.5 and parse_duration("bogus") is None
    openai = read_rate_headers({"x-ratelimit-limit-tokens": "1000",
                                "x-ratelimit-remaining-tokens": "250",
                                "x-ratelimit-reset-tokens": "1s"}, time_scale=60)
    assert (openai.limit_tokens, openai.remaining_tokens, openai.reset_tokens_s) == (
        1000, 250, 60.0)
    anthropic = read_rate_headers({"anthropic-ratelimit-tokens-limit": "500",
                                   "anthropic-ratelimit-tokens-remaining": "100"})
    assert (anthropic.limit_tokens, anthropic.remaining_tokens) == (500, 100)
    split = read_rate_headers({"anthropic-ratelimit-requests-limit": "1000",
                               "anthropic-ratelimit-input-tokens-limit": "450000",
                               "anthropic-ratelimit-output-tokens-limit": "90000"})
    assert (split.limit_requests, split.limit_input_tokens, split.limit_output_tokens) == (
        1000, 450000, 90000)
    assert openai.limit_input_tokens is None  # OpenAI's family has no such headers
    assert read_rate_headers({}).empty
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}, 10) == 2.5
    assert retry_after_s({"retry-after": "2"}, 10) == 20.0


def _err(status: int, code: str = "", message: str = "", **headers: str) -> Response:
    body = json.dumps({"error": {"type": "x", "code": code, "message": message}})
    return Response(status, headers, body)


def test_classify_every_kind_of_answer() -> None:
    assert classify(Response(200)).verdict == Verdict.OK
    assert classify(_err(429, "rate_limit_exceeded", **{"retry-after": "3"}), 2).retry_after_s \
        == 6.0
    assert classify(_err(429, "insufficient_quota")).verdict == Verdict.FATAL_BALANCE
    assert classify(_err(429, "", "You have reached your spend limit")).verdict == \
        Verdict.FATAL_BALANCE
    assert classify(_err(402)).verdict == Verdict.FATAL_BALANCE
    assert classify(_err(401)).verdict == Verdict.FATAL_AUTH
    assert classify(_err(429, "", "Request too large for gpt")).verdict == Verdict.NEVER_RETRY
    assert classify(_err(503, **{"x-should-retry": "false"})).verdict == Verdict.NEVER_RETRY
    assert classify(_err(500)).verdict == Verdict.RETRY
    assert classify(Response(0, error="timeout")).server_error
    assert classify(_err(400, "context_length_exceeded")).verdict == Verdict.NEVER_RETRY
    # refused for its size: a smaller batch of the same items may pass
    for answer in (_err(429, "", "Request too large for gpt"), _err(400, "cost_cap_exceeded"),
                   _err(400, "context_length_exceeded")):
        assert classify(answer).too_large
    assert not classify(_err(400, "invalid_value")).too_large
    assert not classify(_err(429, "rate_limit_exceeded")).too_large


def test_retry_delays() -> None:
    rng = random.Random(4)
    settings = RetrySettings(base_s=1.0, cap_s=8.0)
    delays = [full_jitter(n, rng, 1.0, 8.0) for n in range(10)]
    assert all(0 <= d <= min(8.0, 2.0 ** n) for n, d in enumerate(delays))
    assert 5.0 <= retry_delay(0, rng, settings, retry_after_s=5.0) <= 6.0
    assert 4.0 <= naive_delay(2, rng, settings) < 5.0
    assert naive_delay(2, rng, RetrySettings(naive_sleep="immediate")) == 0.0


def test_breaker_opens_probes_and_closes() -> None:
    b = Breaker(BreakerSettings(failures=3, cooldown_s=10))
    for t in range(3):
        assert b.allows(t)
        b.on_failure(t)
    assert b.state(3) == "open" and not b.allows(5)
    assert b.state(12) == "half_open" and b.allows(12)
    b.on_dispatch(12)
    assert not b.allows(12.5)  # one probe at a time
    b.on_failure(13)
    assert b.state(14) == "open"
    b.on_dispatch(23)
    b.on_success(24)
    assert b.state(24) == "closed"


def test_aimd_concurrency() -> None:
    c = Concurrency(ConcurrencySettings(mode="aimd", limit=8, min=1, max=16))
    c.on_rate_limited(10.0, 1.0)
    assert c.limit == 4
    c.on_rate_limited(10.5, 1.0)  # within one round trip: no second cut
    assert c.limit == 4
    for _ in range(20):
        c.on_success(20.0, 1.0)
    assert c.limit > 4
    fixed = Concurrency(ConcurrencySettings(limit=5))
    fixed.on_rate_limited(1.0, 1.0)
    assert fixed.limit == 5


def test_routing_by_length_tag_and_failover() -> None:
    rules = [RouteRule("cheap", max_item_tokens=5), RouteRule("vision", tag="img")]
    assert route_model(Item("1", "short"), "big", rules) == "cheap"
    assert route_model(Item("2", "x" * 100, tag="img"), "big", rules) == "vision"
    assert route_model(Item("3", "x" * 100), "big", rules) == "big"
    assert route_model(Item("4", "x" * 100), "big", rules, [(lambda i: True, "p")]) == "p"
    providers = [provider("a", failover_on_429=True), provider("b")]
    breakers = {p.name: Breaker(BreakerSettings(failures=1)) for p in providers}
    serves = lambda p, m: True  # noqa: E731
    assert choose_provider(0, providers, breakers, lambda p: 0.0, "m", serves) == "a"
    assert choose_provider(0, providers, breakers, lambda p: 5.0 if p == "a" else 0.0, "m",
                           serves) == "b"
    breakers["a"].on_failure(0)
    assert choose_provider(1, providers, breakers, lambda p: 0.0, "m", serves) == "b"
    breakers["b"].on_failure(0)
    assert choose_provider(1, providers, breakers, lambda p: 0.0, "m", serves) is None


def test_user_limits_rpm_and_tokens_per_day() -> None:
    limits = UserLimits({"free": Tier(rpm=2, tokens_per_day=1000), "pro": Tier(rpm=100)})
    assert limits.admit(0, "u", 10).allowed and limits.admit(0, "u", 10).allowed
    refused = limits.admit(0, "u", 10)
    assert not refused.allowed and refused.retry_in_s == pytest.approx(30.0)
    assert limits.admit(30, "u", 10).allowed
    assert not limits.admit(60, "v", 2000).allowed
    assert all(limits.admit(0, "w", 10, tier="pro").allowed for _ in range(50))


def test_lanes_leave_slots_to_interactive_requests() -> None:
    lanes = LanePolicy(reserved_slots=2)
    assert lanes.background_slots(10, 0) == 8
    assert lanes.background_slots(10, 5) == 5


def test_watchdog_spots_repetition_loops() -> None:
    assert repetition_loop("intro " + "and so on, " * 5)
    assert not repetition_loop('[{"id":1,"c":"A"},{"id":2,"c":"B"},{"id":3,"c":"C"}]')


def test_loop_watch_checks_every_32_characters_of_a_growing_text() -> None:
    watch = LoopWatch()
    # 31 characters of a loop: not looked at yet; the 32nd character triggers the check
    assert not any(watch.feed(c) for c in ("ab" * 16)[:31])
    assert watch.feed("b")
    prose = LoopWatch()
    sentence = "the quick brown fox jumps over a lazy dog while seven zebras vex kings. "
    assert not any(prose.feed(c) for c in sentence * 2)
    # the text before the tail it keeps does not matter: a loop after 5,000 characters
    late = LoopWatch(min_period=8, repeats=4)
    assert not late.feed("".join(f"{i:05d}" for i in range(1000)))
    assert [late.feed("and so on, ") for _ in range(6)][-1]


def test_adaptive_batch_size() -> None:
    a = AdaptiveBatchSize(10, 1, 20, grow_after=2)
    a.on_reply(10, 10, False, False)
    a.on_reply(10, 10, False, False)
    assert a.size == 11
    a.on_reply(11, 5, True, False)
    assert a.size == 5
    a.on_reply(5, 4, False, False)
    assert a.size == 4


def test_engine_config_defaults_are_the_article_values() -> None:
    cfg = config()
    assert cfg.throttle.steps == ((0.85, 0.3), (0.95, 0.8), (0.98, 2.0))
    assert cfg.batch.max_items == 20 and cfg.strategy == "semantic_batch"


def test_alone_tokens_matches_a_one_item_batch() -> None:
    packer = Packer(task())
    for item in (Item("1", "x"), Item("abc-9", "y" * 77), Item("0042", "z" * 3)):
        assert packer.alone_tokens(packer.sizes(item)) == packer.request_tokens([item])
