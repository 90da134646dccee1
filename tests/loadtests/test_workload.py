"""Seeded work item generation: exact sizes, duplicate and poison figures, ids, system prompt."""

from __future__ import annotations

import random

from loadtests.scenario_model import IdScheme, Size, Workload
from loadtests.workload import (
    POISON_MARKER,
    WorkloadGenerator,
    chat_text,
    filler_text,
    sample_size,
    system_prompt,
    system_prompt_min_tokens,
    text_tokens,
)

WORKLOAD = Workload(
    items=10_000,
    duplicate_rate=0.1,
    poison_rate=0.01,
    item_tokens=Size(dist="normal", mean=15, sd=4, min=3, max=40),
)


def test_seeded_figures_are_exact() -> None:
    items = list(WorkloadGenerator(WORKLOAD, seed=7))
    seen: set[str] = set()
    repeats = 0
    for item in items:
        repeats += item.text in seen
        seen.add(item.text)
    assert len(items) == 10_000
    # figures of the counter-based per-item stream (splitmix64) and cached filler tails
    assert repeats == 925  # exact repeats of earlier texts: ~10%
    assert sum(i.duplicate_of is not None for i in items) == 925
    assert sum(i.poison for i in items) == 112  # ~1%
    assert sum(i.tokens for i in items) == 150_736
    assert (min(i.tokens for i in items), max(i.tokens for i in items)) == (3, 32)
    assert items[1].text == "w1 street mesa robin indigo jade opal spruce salt dune bay h"


def test_sizes_follow_the_ratelab_tokenizer() -> None:
    for item in WorkloadGenerator(WORKLOAD, seed=1).items(0, 500):
        assert len(item.text) == 4 * item.tokens
        assert text_tokens(item.text) == item.tokens
        assert "\n" not in item.text and item.text == item.text.strip()
        assert (POISON_MARKER in item.text) == item.poison


def test_duplicates_repeat_their_original_exactly() -> None:
    gen = WorkloadGenerator(WORKLOAD, seed=7)
    dups = [i for i in gen.items(0, 2000) if i.duplicate_of is not None]
    assert dups
    for item in dups:
        original = gen.item(item.duplicate_of or 0)
        assert original.duplicate_of is None and original.index < item.index
        assert original.text == item.text and original.id != item.id


def test_random_access_matches_iteration_and_strides_split_the_work() -> None:
    gen = WorkloadGenerator(WORKLOAD, seed=3, count=300)
    whole = list(gen)
    assert [gen.item(i) for i in (5, 150, 299)] == [whole[5], whole[150], whole[299]]
    halves = list(gen.items(0, None, 2)) + list(gen.items(1, None, 2))
    assert sorted(i.index for i in halves) == list(range(300))


def test_paged_iteration_of_constant_sizes_matches_random_access() -> None:
    # constant sizes are drawn a page at a time in numpy: the same numbers as item(i)
    workload = Workload(items=9000, duplicate_rate=0.1, poison_rate=0.05,
                        item_tokens=Size(value=15))
    gen = WorkloadGenerator(workload, seed=11)
    whole = list(gen)
    assert whole[::97] == [gen.item(i) for i in range(0, 9000, 97)]
    assert list(gen.items(5, 8000, 1000)) == [gen.item(i) for i in range(5, 8000, 1000)]
    assert sum(i.poison for i in whole) == 461
    assert sum(i.duplicate_of is not None for i in whole) == 878
    assert {len(i.text) for i in whole} == {60}


def test_generation_is_lazy() -> None:
    gen = WorkloadGenerator(Workload(items=2_000_000), seed=0)
    it = iter(gen)
    first = [next(it) for _ in range(3)]
    assert [i.id for i in first] == ["1", "2", "3"]
    assert gen.item(1_999_999).id == "2000000"


def test_id_schemes() -> None:
    for ids, expected in (
        (IdScheme("sequential", 548033), "548035"),
        (IdScheme("prefixed", 0, "a-"), "a-2"),
    ):
        assert WorkloadGenerator(Workload(items=5, ids=ids), seed=0).item(2).id == expected
    hex_id = WorkloadGenerator(Workload(items=5, ids=IdScheme("hex")), seed=0).item(2).id
    assert len(hex_id) == 12 and int(hex_id, 16) >= 0


def test_size_distributions() -> None:
    rng = random.Random(5)
    assert sample_size(Size(value=15), rng) == 15
    assert {sample_size(Size("uniform", min=3, max=5), rng) for _ in range(200)} == {3, 4, 5}
    draws = [sample_size(Size("lognormal", median=100, p99=400), rng) for _ in range(4000)]
    assert sorted(draws)[2000] in range(95, 106)
    assert sample_size(Size("empirical", values=(7, 9), weights=(0.0, 1.0)), rng) == 9
    assert len(filler_text(10, rng)) == 40


def test_system_prompt_has_the_stated_size_and_lists_codes() -> None:
    workload = Workload(
        items=1, system_prompt_tokens=700, labels=(("A", "Prime Product"), ("B", "Budget Product"))
    )
    prompt = system_prompt(workload, seed=1)
    assert len(prompt) == 2800 and text_tokens(prompt) == 700
    assert "A=Prime Product; B=Budget Product" in prompt
    assert system_prompt_min_tokens(workload) < 700
    assert system_prompt(workload, seed=1) == prompt


def test_base36_tags_at_digit_boundaries() -> None:
    from loadtests.workload import _base36

    assert [_base36(n) for n in (0, 35, 36, 1295, 1296, 46655, 46656, 1296 ** 2)] == [
        "w0", "wz", "w10", "wzz", "w100", "wzzz", "w1000", "w10000"]
    assert all(int(_base36(n)[1:], 36) == n for n in range(0, 2_000_000, 997))


def test_pages_carry_the_ids_and_texts_of_the_items() -> None:
    # the planner's feed: ids and texts a page at a time, the very items of iteration
    for size, ids in ((Size(value=15), IdScheme("sequential", 548033)),
                      (Size(value=1), IdScheme("prefixed", 0, "a-")),
                      (Size(value=2), IdScheme("sequential", 0)),
                      (Size(dist="uniform", min=1, max=30), IdScheme("hex"))):
        workload = Workload(items=9000, duplicate_rate=0.1, poison_rate=0.05,
                            item_tokens=size, ids=ids)
        gen = WorkloadGenerator(workload, seed=11)
        whole = _pairs(gen)
        assert whole == [(i.id, i.text) for i in gen]
        assert _pairs(gen, 4000, 4500) == whole[4000:4500]
        # tags grow a digit at 46,656 (texts are made a block of 1,296 tags at a time)
        far = [(i.id, i.text) for i in map(gen.item, range(46000, 47500))]
        assert _pairs(gen, 46000, 47500) == far


def _pairs(gen: WorkloadGenerator, *span: int) -> list[tuple[str, str]]:
    return [pair for ids, texts in gen.pages(*span) for pair in zip(ids, texts, strict=True)]


def test_a_chat_text_makes_a_prompt_of_the_size_asked() -> None:
    # the simulator counts the chat's prompt (priming, message overhead, text) to the token
    from simulator.model.tokens import chat_prompt_tokens

    for tokens in range(7, 3000, 13):
        assert chat_prompt_tokens([chat_text(tokens)]) == tokens
    assert chat_prompt_tokens([chat_text(3)]) == 7  # at least one token of text
    assert chat_text(300) is chat_text(300)  # one text per size, made once
