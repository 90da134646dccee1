"""The text-level match of a compact reply (``parsing._exact``) accepts a reply only when
the JSON parse would make the same codes of it: every reply, canonical or perturbed, parses
as the JSON path alone parses it."""

from __future__ import annotations

import json
import random

from batchclient.policy import parsing
from batchclient.policy.parsing import ParsedReply, parse_reply

LABELS = {"A": "alpha", "B": "beta", "CC": "gamma", "d-1": "delta"}
CODES = [*LABELS, "Z", "A\\u0041", "", "\u00e9"]


def _by_json(text: str, sent: tuple[str, ...], finish: str | None) -> ParsedReply:
    """parse_reply without the text-level match: what the JSON path makes of ``text``."""
    return parsing._by_json(text, sent, LABELS, finish)


def _id(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind < 3:
        return str(rng.randrange(10 ** rng.randint(1, 7)))
    if kind == 3:
        return "0" * rng.randint(1, 2) + str(rng.randrange(100))
    if kind == 4:
        return rng.choice(["a-7", "x.y_z", "B1", "0", "00", "7e3", "1.5"])
    return rng.choice(['q"t', "b\\s", "t\tab", "\u0661\u0662", "", "n\nl"])


def _literal(item_id: str, rng: random.Random) -> str:
    if item_id.isdigit() and item_id.isascii() and rng.random() < 0.9:
        return item_id.lstrip("0") or "0" if rng.random() < 0.9 else item_id
    return json.dumps(item_id) if rng.random() < 0.9 else '"' + item_id + '"'


def _reply(sent: list[str], rng: random.Random) -> str:
    objects = [(_literal(i, rng), rng.choice(CODES) if rng.random() < 0.1 else
                rng.choice(list(LABELS))) for i in sent]
    if rng.random() < 0.1 and objects:
        objects.insert(rng.randrange(len(objects)), objects[rng.randrange(len(objects))])
    if rng.random() < 0.05 and len(objects) > 1:
        rng.shuffle(objects)
    text = "[" + ",".join(f'{{"id":{i},"c":"{c}"}}' for i, c in objects) + "]"
    change = rng.randrange(12)
    if change == 0:
        text = text[: rng.randrange(len(text) + 1)]
    elif change == 1:
        text = text.replace(",", ", ", 1)
    elif change == 2:
        text = "Results:\n" + text
    elif change == 3:
        text += rng.choice(["\n", " ", "x", "]"])
    elif change == 4 and len(text) > 3:
        pos = rng.randrange(len(text))
        text = text[:pos] + rng.choice('"\\,{}[]: a0') + text[pos + 1:]
    return text


def test_text_match_agrees_with_the_json_parse() -> None:
    rng = random.Random(11)
    accepted = 0
    for _ in range(20000):
        sent = tuple(dict.fromkeys(_id(rng) for _ in range(rng.randint(1, 6))))
        text = _reply(list(sent), rng)
        finish = rng.choice([None, "stop", "length"])
        assert parse_reply(text, sent, LABELS, finish) == _by_json(text, sent, finish), (
            text, sent)
        accepted += len(parse_reply(text, sent, LABELS, finish).codes) == len(sent)
    assert accepted > 2000  # the canonical replies were among them


def test_canonical_reply_of_a_page_of_numbers() -> None:
    sent = ("548033", "548034", "0", "12")
    text = '[{"id":548033,"c":"A"},{"id":548034,"c":"CC"},{"id":0,"c":"d-1"},{"id":12,"c":"B"}]'
    assert parse_reply(text, sent, LABELS).codes == dict(zip(sent, ["A", "CC", "d-1", "B"],
                                                             strict=True))


def test_texts_that_are_not_json_are_left_to_the_json_parse() -> None:
    cases = [(("1", ""), '[{"id":1,"c":"A"},{"id":,"c":"B"}]'),
             (("007",), '[{"id":007,"c":"A"}]'),
             (('a"b',), '[{"id":"a"b","c":"A"}]'),
             (("5",), '[{"id":5,"c":"A\\"}]')]
    for sent, text in cases:
        assert parse_reply(text, sent, LABELS) == _by_json(text, sent, None), text
        assert len(parse_reply(text, sent, LABELS).codes) < len(sent)


def test_pages_of_consecutive_numbers_agree_with_the_json_parse() -> None:
    # ids of one length put one-character codes a fixed step apart (the slice and byte
    # comparison of _exact): perturbed replies of such pages, a character changed at or
    # next to a code's place among them
    rng = random.Random(5)
    accepted = 0
    for _ in range(5000):
        first = rng.choice([0, 7, 98, 548033, 999990, 1000])
        sent = tuple(str(i) for i in range(first, first + rng.randint(1, 20)))
        if rng.random() < 0.1:
            sent = tuple("0" + i if rng.random() < 0.2 else i for i in sent)
        text = _reply(list(sent), rng)
        if rng.random() < 0.3 and len(text) > 20:
            pos = text.find('"c":"', rng.randrange(len(text) - 10))
            if pos >= 0:
                pos += 5 + rng.choice([-1, 0, 0, 1])
                text = text[:pos] + rng.choice('AB"\\\x00\u00e9Z') + text[pos + 1:]
        assert parse_reply(text, sent, LABELS) == _by_json(text, sent, None), (text, sent)
        accepted += len(parse_reply(text, sent, LABELS).codes) == len(sent)
    assert accepted > 1000
