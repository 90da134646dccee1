"""The planner's page source gives the job's items as ``items`` does, whatever the sizes
taken, and the engine fed by pages holds what it holds when fed items."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from batchclient.policy.engine import Engine, InputError
from batchclient.policy.wire import Item
from loadtests.planner.assemble import ItemPages, arm_setup, items, task_for
from loadtests.scenario import load_scenario, with_overrides

SCENARIO = Path(__file__).resolve().parents[3] / "scenarios" / "seed001-semantic-batching.yaml"


def test_pages_taken_in_any_sizes_are_the_items() -> None:
    scenario = load_scenario(SCENARIO)
    whole = list(items(scenario, 9000))
    assert list(ItemPages(scenario, 9000)) == whole
    source = ItemPages(scenario, 9000)
    rng = random.Random(3)
    taken: list[Item] = []
    while True:
        ids, texts = source.take(rng.choice([1, 7, 1000, 5000]))
        if not ids:
            break
        taken += map(Item, ids, texts)
    assert taken == whole
    assert source.take(10) == ([], [])


def test_add_page_is_add_items() -> None:
    scenario = with_overrides(load_scenario(SCENARIO), {"workload.duplicate_rate": 0.2})
    arm = next(a for a in scenario.arms if a.name == "semantic_batch")
    setup, task = arm_setup(scenario, arm), task_for(scenario, arm)
    page = list(items(scenario, 3000))
    a = Engine(task, setup.config, random.Random(1))
    b = Engine(task, setup.config, random.Random(1))
    a.add_page([i.id for i in page], [i.text for i in page])
    b.add_items(page)
    assert a.counts == b.counts and a._keys == b._keys and a._leaders == b._leaders
    assert a._followers == b._followers and {k: list(q) for k, q in a._ready.items()} == {
        k: list(q) for k, q in b._ready.items()}
    assert [(s.id, s.text, s.tag, s.model, s.key, s.sizes, s.sends) for s in a._items.values()] == [
        (s.id, s.text, s.tag, s.model, s.key, s.sizes, s.sends) for s in b._items.values()]
    # an unusable page is refused naming the item, as add_items does
    first = page[0].id
    with pytest.raises(InputError, match=rf"'0{first}'.*collides with item '{first}'"):
        a.add_page(["fresh", "0" + first], ["text", "text"])


@pytest.mark.parametrize(("scheme", "unique"), [
    ({}, True), ({"scheme": "prefixed", "prefix": "doc-"}, True), ({"scheme": "hex"}, False)])
def test_the_feed_keeps_no_id_when_the_scheme_makes_them_unique(
        scheme: dict[str, object], unique: bool) -> None:
    scenario = with_overrides(load_scenario(SCENARIO), {"workload.ids": scheme})
    source = ItemPages(scenario, 3000)
    assert source.unique_ids is unique
    ids = [item.id for item in ItemPages(scenario, 3000)]
    if unique:  # what the flag promises, canonical forms included
        assert len({i.lstrip("0") or "0" for i in ids}) == len(ids)
    arm = next(a for a in scenario.arms if a.name == "semantic_batch")
    setup, task = arm_setup(scenario, arm), task_for(scenario, arm)
    engine = Engine(task, setup.config, random.Random(1))
    while True:
        page = source.take(1000)
        if not page[0]:
            break
        engine.add_page(*page, unique=source.unique_ids)
    assert engine.counts.fed == 3000
    assert len(engine._keys) == (0 if unique else 3000)
