"""batch_json replies, their faults at configured rates, lorem and echo, and connection faults."""

from __future__ import annotations

import json
import math
import random

import pytest

from simulator.model.config import FaultSpec, ResponderSpec
from simulator.model.faults import draw_connection_fault, random_5xx
from simulator.model.provider import Admission
from simulator.model.responder import (
    ITEM_RE,
    batch_json,
    expected_code,
    parse_items,
    respond,
)
from tests.simulator.model.sim_model_helpers import chat, provider

CODES = ("A", "B", "C", "D", "E", "F", "G", "H")
PROMPT = "Classify each item.\n" + "\n".join(
    f"id={i}: item number {i} text" for i in range(1, 11)) + "\nid=a-7: Mixed  CASE text\n"


def _within(count: int, trials: int, rate: float) -> bool:
    """Whether ``count`` successes in ``trials`` is within 4 standard deviations of ``rate``."""
    sd = math.sqrt(trials * rate * (1 - rate))
    return abs(count - trials * rate) <= 4 * sd + 1


def test_expected_code_is_the_documented_function() -> None:
    assert expected_code("Mixed  CASE text", CODES) == expected_code("mixed case text", CODES)
    assert expected_code("hello", CODES) == "G"  # crc32(b"hello") = 0x3610a686, 6 mod 8
    assert expected_code("hello", ["x", "y", "z"]) == "y"  # 1 mod 3


def test_batch_json_answers_every_item_by_id_in_order() -> None:
    reply = batch_json(ResponderSpec(kind="batch_json"), random.Random(0), PROMPT, None)
    assert reply.finish_reason == "stop"
    parsed = json.loads(reply.text)
    assert [e["id"] for e in parsed] == [*range(1, 11), "a-7"]
    texts = dict(parse_items(PROMPT))
    for entry in parsed:
        assert entry["c"] == expected_code(texts[str(entry["id"])], CODES)
    assert reply.text.startswith('[{"id":1,"c":')  # compact


def test_poison_items_are_never_answered() -> None:
    prompt = "id=1: fine\nid=2: this is POISON\nid=3: fine too"
    reply = batch_json(ResponderSpec(kind="batch_json"), random.Random(0), prompt, None)
    assert [e["id"] for e in json.loads(reply.text)] == [1, 3]


def test_a_reply_longer_than_max_tokens_is_cut_with_finish_length() -> None:
    reply = batch_json(ResponderSpec(kind="batch_json"), random.Random(0), PROMPT, 10)
    assert reply.finish_reason == "length" and len(reply.text) == 40


@pytest.mark.parametrize("fault", ["invent_id", "repeat_id", "malformed_json", "truncate"])
def test_each_reply_fault_at_its_rate(fault: str) -> None:
    rate = 0.1
    spec = ResponderSpec(kind="batch_json", **{f"{fault}_rate": rate})  # type: ignore[arg-type]
    rng = random.Random(42)
    trials = 3000
    hits = 0
    expected_ids = [*range(1, 11), "a-7"]
    for _ in range(trials):
        reply = batch_json(spec, rng, PROMPT, 200)
        if fault == "truncate":
            hits += reply.finish_reason == "length"
            continue
        try:
            ids = [e["id"] for e in json.loads(reply.text)]
        except json.JSONDecodeError:
            hits += fault == "malformed_json"
            continue
        if fault == "invent_id":
            hits += len(ids) == 12 and set(ids) > set(expected_ids)
        elif fault == "repeat_id":
            hits += len(ids) == 12 and set(ids) == set(expected_ids)
    assert _within(hits, trials, rate), hits


def test_truncation_fault_burns_max_tokens() -> None:
    spec = ResponderSpec(kind="batch_json", truncate_rate=1.0)
    reply = batch_json(spec, random.Random(1), PROMPT, 200)
    assert (reply.finish_reason, len(reply.text)) == ("length", 800)


def test_dropped_items_at_their_per_item_rate() -> None:
    spec = ResponderSpec(kind="batch_json", drop_item_rate=0.05)
    rng = random.Random(3)
    answered = sum(len(json.loads(batch_json(spec, rng, PROMPT, None).text))
                   for _ in range(1000))
    assert _within(11_000 - answered, 11_000, 0.05)


def test_lorem_honours_max_tokens_and_echo_repeats() -> None:
    rng = random.Random(0)
    lorem = ResponderSpec(kind="lorem")
    lengths = [len(respond(lorem, rng, "", 50).text) for _ in range(500)]
    assert max(lengths) == 200 and all(n % 4 == 0 for n in lengths)
    assert respond(ResponderSpec(kind="echo"), rng, "say this", None).text == "say this"


def test_random_5xx_at_their_rates() -> None:
    spec = FaultSpec(error_500_rate=0.05, error_503_rate=0.1)
    rng = random.Random(5)
    draws = [random_5xx(spec, rng) for _ in range(4000)]
    assert _within(draws.count(500), 4000, 0.05)
    assert _within(draws.count(503), 4000, 0.1)


def test_connection_faults_each_at_its_own_rate() -> None:
    spec = FaultSpec(reset_rate=0.04, hold_rate=0.03, stall_rate=0.05,
                     mid_stream_error_rate=0.06, slow_first_token_rate=0.1,
                     slow_first_token_s=7.0, stall_s=3.0, hold_s=90.0)
    rng = random.Random(9)
    trials = 4000
    drawn = [draw_connection_fault(spec, rng, 50) for _ in range(trials)]
    kinds = [d.fault.kind if d.fault else None for d in drawn]
    for kind, rate in (("reset", 0.04), ("hold", 0.03), ("stall", 0.05), ("error", 0.06)):
        assert _within(kinds.count(kind), trials, rate), kind
    assert _within(sum(d.slow_first_token_s == 7.0 for d in drawn), trials, 0.1)
    stalls = [d.fault for d in drawn if d.fault and d.fault.kind == "stall"]
    assert all(0 < f.at_chunk < 50 and f.duration_s == 3.0 for f in stalls)


def test_faults_reach_the_plan_through_the_provider() -> None:
    p = provider("""
name: t
latency: {ttft_s: 0.2}
responder: {output_tokens: 40}
faults: {repetition_rate: 0.2, slow_first_token_rate: 1.0, slow_first_token_s: 5}
""")
    loops = 0
    for i in range(500):
        adm = p.chat(float(i), "k", chat(max_tokens=300))
        assert isinstance(adm, Admission) and adm.plan is not None
        assert adm.plan.ttft_s == pytest.approx(5.2)
        if adm.plan.finish_reason == "length":
            loops += 1
            assert len(adm.plan.chunks) == 300
        p.finish(float(i), adm, len(adm.plan.chunks))
    assert _within(loops, 500, 0.2)


@pytest.mark.parametrize("text", [
    "plain words here", "Mixed CASE Words", "  leading", "trailing  ", "two  spaces",
    "tab\there", "form\x0cfeed", "unit\x1fsep", "cr\rinside", "", " ", "caf\u00e9 au lait",
    "non\u00a0breaking", "line\u2028sep", "DOTTED \u0130 capital",
])
def test_batch_json_codes_are_expected_code_whatever_the_whitespace(text: str) -> None:
    # the ASCII single-space fast path and the item-by-item normalisation must agree
    neighbours = [f"id={i}: item {i} text" for i in range(3)]
    prompt = "Classify.\n" + "\n".join([*neighbours, f"id=x9: {text}"]) + "\n"
    reply = json.loads(batch_json(ResponderSpec(kind="batch_json"), random.Random(0), prompt,
                                  None).text)
    texts = dict(parse_items(prompt))
    assert [str(e["id"]) for e in reply] == ["0", "1", "2", "x9"]
    for entry in reply:
        assert entry["c"] == expected_code(texts[str(entry["id"])], CODES)


def test_parse_items_finds_what_the_documented_pattern_finds() -> None:
    rng = random.Random(3)
    pieces = ["id=", "id=a", "id=1", ":", ": ", "\n", "\r", "x", "\u00e9", " ", "-", ".", "_",
              "Z", "id=:", "::", "id=\u00e9: ", "id=a\n", "\r\n", "id=ab: c: d"]
    for _ in range(20_000):
        prompt = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 15)))
        assert parse_items(prompt) == ITEM_RE.findall(prompt), repr(prompt)
