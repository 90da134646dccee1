"""The whole-reply match of ``parse_reply`` (a reply at a time) agrees with the element by
element definition on every reply, including the ones it must hand to the id map."""

from __future__ import annotations

import json
import random

from batchclient.policy.parsing import _in_order, parse_reply

LABELS = {"A": "alpha", "B": "beta"}


def _reference(elements: list[object], sent_ids: list[str]) -> dict[str, str] | None:
    found: dict[str, str] = {}
    for element, item_id in zip(elements, sent_ids, strict=True):
        if type(element) is not dict:
            return None
        raw = element.get("id")
        if not ((type(raw) is int and raw >= 0 and str(raw) == item_id)
                or (type(raw) is str and raw == item_id)):
            return None
        code = element.get("c")
        if type(code) is not str or code not in LABELS:
            return None
        found[item_id] = code
    return found


def _element(rng: random.Random, item_id: str) -> object:
    roll = rng.random()
    if roll < 0.02:
        return rng.choice([None, 3, "x", [1], True])
    raw: object = int(item_id) if item_id.isdigit() and rng.random() < 0.8 else item_id
    if roll < 0.06:
        raw = rng.choice([-1, True, None, 7, "07", [], 1.0, item_id + "x"])
    code: object = rng.choice(["A", "B"])
    if roll > 0.97:
        code = rng.choice(["Z", None, 1, ["A"], {"A": 1}])
    element: dict[str, object] = {"id": raw, "c": code}
    if rng.random() < 0.01:
        del element[rng.choice(["id", "c"])]
    return element


def test_whole_reply_match_is_the_element_by_element_one() -> None:
    rng = random.Random(11)
    pools = [["1", "2", "3"], ["007", "8"], ["a", "b.c"], ["-1", "4"], ["True", "5"], ["9"]]
    accepted = 0
    for _ in range(20000):
        sent = rng.choice(pools)
        elements = [_element(rng, i) for i in sent]
        if rng.random() < 0.05:
            rng.shuffle(elements)
        got = _in_order(elements, sent, LABELS)
        assert got == _reference(elements, sent), (elements, sent)
        accepted += got is not None
    assert accepted > 5000  # the common case is exercised too


def test_a_reply_handed_to_the_id_map_parses_the_same() -> None:
    # a negative JSON integer is no id (the id "-1" comes back as a string): unknown
    reply = json.dumps([{"id": -1, "c": "A"}, {"id": 4, "c": "B"}])
    parsed = parse_reply(reply, ["-1", "4"], LABELS)
    assert parsed.codes == {"4": "B"} and parsed.missing == ("-1",) and parsed.unknown_ids == 1
    reply = json.dumps([{"id": "-1", "c": "A"}, {"id": 4, "c": "B"}])
    assert parse_reply(reply, ["-1", "4"], LABELS).codes == {"-1": "A", "4": "B"}
    # mixed id types, in order
    reply = json.dumps([{"id": "1", "c": "A"}, {"id": 2, "c": "B"}])
    assert parse_reply(reply, ["1", "2"], LABELS).codes == {"1": "A", "2": "B"}
