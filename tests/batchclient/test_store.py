"""SqliteJobStore and SqliteResultCache on real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchclient.cache import SqliteResultCache
from batchclient.policy.engine import InputError, ItemResult
from batchclient.policy.wire import Item
from batchclient.store import SqliteJobStore


def test_cursor_pages_skip_done_and_dead_items(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    assert store.import_items(Item(f"i{n}", f"text {n}") for n in range(10)) == 10
    assert store.import_items([Item("i3", "text 3")]) == 0  # idempotent re-import
    first = store.page(0, 4)
    assert [i.id for _, i in first] == ["i0", "i1", "i2", "i3"]
    store.save_results([ItemResult("i4", "done", "A", "alpha"),
                        ItemResult("i5", "dead", error="boom")])
    rest = store.page(first[-1][0], 100)
    assert [i.id for _, i in rest] == ["i6", "i7", "i8", "i9"]
    c = store.counts()
    assert (c.total, c.done, c.dead, c.pending) == (10, 1, 1, 8)
    assert store.requeue_dead() == 1 and store.counts().pending == 9


def test_a_result_is_never_written_twice(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item("a", "x")])
    assert store.save_results([ItemResult("a", "done", "A", "alpha")]) == 1
    assert store.save_results([ItemResult("a", "done", "B", "beta")]) == 0
    assert store.results()["a"] == ("done", "A", None)


def test_colliding_ids_are_refused(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item("7", "x")])
    with pytest.raises(InputError, match="'007'"):
        store.import_items([Item("007", "y")])
    with pytest.raises(InputError, match="'7'"):
        store.import_items([Item("7", "other text")])


def test_store_survives_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "j.sqlite")
    store = SqliteJobStore(path)
    store.import_items([Item("a", "x"), Item("b", "y")])
    store.save_results([ItemResult("a", "done", "A", "alpha")])
    store.close()
    again = SqliteJobStore(path)
    assert [i.id for _, i in again.page(0, 10)] == ["b"]


def test_result_cache_round_trip(tmp_path: Path) -> None:
    cache = SqliteResultCache(str(tmp_path / "c.sqlite"))
    cache.put_many([ItemResult("a", "done", "A", "alpha", cache_key="k1"),
                    ItemResult("b", "dead", cache_key="k2")])
    assert cache.get_many(["k1", "k2", "k3"]) == {"k1": "A"}
