"""The feed's page-at-a-time shortcuts agree with the item-by-item definitions: the
normalised texts (dedup keys) and the validation of a page (sizes, or the same error)."""

from __future__ import annotations

import contextlib
import random

import pytest

from batchclient.policy.engine import Engine, InputError
from batchclient.policy.job import normalise, normalise_page, page_is_normal
from batchclient.policy.wire import Item
from tests.batchclient.bc_fakes import config, task

ALPHABET = "aB \t\n\x1c\x00\u00c9.\u03a3\u2028\u212a\u0130"


def test_page_normalisation_is_the_per_text_one() -> None:
    rng = random.Random(5)
    pages = [["A b", "c D"], ["a  b"], [" a", "b"], ["a "], ["a\tb"], ["\u03a3A\u03a3", "b"],
             ["a\x00b", "c"], ["x\x1fy"], []]
    pages += [["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6)))
               for _ in range(rng.randint(1, 4))] for _ in range(5000)]
    for page in pages:
        assert normalise_page(page) == [normalise(t) for t in page], page
        assert normalise_page(page, page_is_normal(page)) == normalise_page(page), page
        if page_is_normal(page) and page and page[0]:
            # what the page checks take from it: no empty text, none of whitespace alone
            assert all(page) and not any(map(str.isspace, page)), page


def _outcome(engine: Engine, page: list[Item], whole: bool, normal: bool = False) -> object:
    try:
        if normal:
            # as add_page checks: the page pass told whether the page is normal
            ids, texts = [i.id for i in page], [i.text for i in page]
            sizes = engine._check_page_whole(ids, texts, True, page_is_normal(texts))
            return sizes if sizes is not None else engine._check_page_items(page, True)
        if whole:
            return engine._check_page(page, record=True)
        return engine._check_page_items(page, record=True)
    except InputError as error:
        return str(error)


@pytest.mark.parametrize("seed", range(40))
def test_page_validation_matches_the_item_pass(seed: int) -> None:
    rng = random.Random(seed)
    # ids of digits include other scripts' digits and a superscript (isdigit, not ASCII)
    ids = ["7", "007", "0", "a", "a.b", "x y", "", "12", "12", "big", "e", "Z-9", "3\n4",
           "\u0661\u0662", "4\u00b2"]
    texts = ["text", "  ", "", "Some Words", "x" * 70000, "two\nlines", " ", "\u00a0", "a b"]
    fed = [Item(rng.choice(ids), rng.choice(texts)) for _ in range(rng.randint(0, 3))]
    pages = [[Item(rng.choice(ids), rng.choice(texts)) for _ in range(rng.randint(1, 4))]
             for _ in range(30)]
    pages += [[Item(str(n), "text") for n in range(1, 50)]]
    for page in pages:
        a = Engine(task(), config(), random.Random(1))
        b = Engine(task(), config(), random.Random(1))
        c = Engine(task(), config(), random.Random(1))
        for engine in (a, b, c):
            with contextlib.suppress(InputError):
                engine._check_page_items(fed, record=True)
        assert _outcome(a, page, True) == _outcome(b, page, False) == _outcome(
            c, page, True, normal=True), page
        assert a._keys == b._keys == c._keys


def test_a_clean_page_takes_the_page_pass() -> None:
    engine = Engine(task(), config(), random.Random(1))
    page = [Item(str(n), f"Text {n}") for n in range(1, 200)] + [Item("abc", "more")]
    sizes = engine._check_page_whole([i.id for i in page], [i.text for i in page], True)
    assert sizes is not None and sizes == Engine(task(), config(), random.Random(1)
                                                 )._check_page_items(page, True)
    # a later page colliding with it (as numbers) is refused naming the item
    assert engine._check_page_whole(["0199"], ["x"], True) is None
    with pytest.raises(InputError, match=r"'0199'.*collides with item '199'"):
        engine._check_page([Item("0199", "x")], record=True)


def test_a_page_near_the_budget_takes_the_page_pass() -> None:
    # the longest id and the longest text of different items: their sum is over the
    # budget, the longest line is not, and the page pass still gives the sizes
    engine = Engine(task(), config(), random.Random(1))
    long_id = "1" * 40  # all digits: every item's reply is bounded by it alike
    length = 70000
    while engine._check_page_whole(["1", long_id], ["x" * length, "t"], record=False) is None:
        length -= 1
    # the same page with the long text on the long id does not fit: the first one passed
    # on its longest line, not on the longest id plus the longest text
    assert engine._check_page_whole(["1", long_id], ["t", "x" * length], record=False) is None
    ids, texts = ["1", long_id], ["x" * length, "t"]
    sizes = engine._check_page_whole(ids, texts, record=True)
    assert sizes is not None and sizes == Engine(task(), config(), random.Random(1)
                                                 )._check_page_items(
        [Item(i, t) for i, t in zip(ids, texts, strict=True)], record=True)
