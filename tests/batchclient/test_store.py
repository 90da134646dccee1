"""SqliteJobStore and SqliteResultCache on real files."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchclient import store as store_module
from batchclient.cache import SqliteResultCache
from batchclient.policy.engine import InputError, ItemResult
from batchclient.policy.state import Accepted, ItemState
from batchclient.policy.wire import Call, Item
from batchclient.store import (
    SCHEMA_VERSION,
    SqliteJobStore,
    StoreBusyError,
    StoreCounts,
    StoreVersionError,
    TaskRecord,
)


def test_cursor_pages_skip_done_and_dead_items(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    assert store.import_items(Item(f"i{n}", f"text {n}") for n in range(10)) == 10
    assert store.import_items([Item("i3", "text 3")]) == 0  # idempotent re-import
    first = store.page(0, 4)
    assert [i.id for _, i in first] == ["i0", "i1", "i2", "i3"]
    store.save_results([ItemResult("i4", "done", "A", "alpha"),
                        ItemResult("i5", "dead", error="boom")])
    rest = store.page(first.last_seq, 100)
    assert [i.id for _, i in rest] == ["i6", "i7", "i8", "i9"]
    c = store.counts()
    assert (c.total, c.done, c.dead, c.pending) == (10, 1, 1, 8)
    assert store.requeue_dead() == 1 and store.counts().pending == 9


def test_dead_errors_are_the_commonest_last_errors_first(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items(Item(f"i{n}", f"text {n}") for n in range(8))
    errors = ["cut", "boom", "cut", "prose", "boom", "cut"]
    store.save_results([ItemResult(f"i{n}", "dead", error=e) for n, e in enumerate(errors)])
    assert store.dead_errors() == [("cut", 3), ("boom", 2), ("prose", 1)]
    assert store.dead_errors(limit=1) == [("cut", 3)]
    assert store.requeue_dead() == 6 and store.dead_errors() == []


def test_the_job_task_is_recorded_once_and_changes_are_named(tmp_path: Path) -> None:
    path = str(tmp_path / "j.sqlite")
    store = SqliteJobStore(path)
    first = TaskRecord("segment", "d1", "m1")
    assert store.bind_task(first) is None and store.bind_task(first) is None
    other = TaskRecord("other", "d2", "m1")
    assert store.bind_task(other) == first  # refused: the record stays
    assert store.bind_task(first) is None
    assert first.differences(other) == ["name 'segment' -> 'other'",
                                        "system prompt, instructions or labels"]
    assert store.bind_task(other, rebind=True) == first
    assert store.bind_task(other) is None
    # a schema-2 store from before the task was recorded gets the table when opened
    store._conn.execute("DROP TABLE job_task")
    store.close()
    reopened = SqliteJobStore(path)
    assert reopened.bind_task(first) is None and reopened.bind_task(other) == first


def test_one_claim_at_a_time_and_close_releases_it(tmp_path: Path) -> None:
    path = str(tmp_path / "j.sqlite")
    first, second = SqliteJobStore(path), SqliteJobStore(path)
    first.claim()
    first.claim()  # again by its holder: nothing changes
    with pytest.raises(StoreBusyError, match="another process is running a job"):
        second.claim()
    # a claim blocks no read or write
    assert second.import_items([Item("a", "text a")]) == 1 and first.counts().total == 1
    first.close()
    second.claim()
    second.close()


def test_a_result_is_never_written_twice(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item("a", "x")])
    assert store.save_results([ItemResult("a", "done", "A", "alpha")]) == 1
    assert store.save_results([ItemResult("a", "done", "B", "beta")]) == 0
    assert store.results()["a"] == ("done", "A", None)


def test_a_locked_database_is_retried_with_backoff_until_it_frees(tmp_path: Path) -> None:
    # another process holds the write lock for 0.3 s, past SQLite's own busy wait (20 ms
    # here): the save fails with "database is locked", is retried with backoff, and lands
    # once the lock is gone; with no retries the same lock is an error
    path = str(tmp_path / "j.sqlite")
    store = SqliteJobStore(path, busy_timeout_s=0.02)
    store.import_items([Item("a", "x"), Item("b", "y")])
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, other.execute, ("COMMIT",))
    release.start()
    started = time.monotonic()
    assert store.save_results([ItemResult("a", "done", "A", "alpha")]) == 1
    assert time.monotonic() - started >= 0.25
    release.join()
    assert store.results()["a"] == ("done", "A", None)
    impatient = SqliteJobStore(path, retries=0, busy_timeout_s=0.02)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            impatient.save_results([ItemResult("b", "done", "B", "beta")])
    finally:
        other.execute("COMMIT")
        other.close()
    assert impatient.save_results([ItemResult("b", "done", "B", "beta")]) == 1


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


def test_labels_costs_and_batches_read_through_the_item_results_view(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item(n, n) for n in "abcd"])
    assert store.save_results([
        ItemResult("a", "done", "A", "alpha", "m1", "p1", cost_usd=0.25, attempts=1),
        ItemResult("b", "done", "B", "beta", "m1", "p1", cost_usd=0.25, attempts=2),
        ItemResult("c", "dead", model="m1", provider="p2", error="boom", attempts=3),
        ItemResult("d", "done", "A", "alpha"),  # a cache hit: no charge, no batch
    ]) == 4
    assert store.counts() == StoreCounts(4, 3, 1, 0, 0.5)
    with sqlite3.connect(tmp_path / "j.sqlite") as conn:
        rows = conn.execute("SELECT item_id, result, label, state, error, attempts, cost_usd, "
                            "model, provider FROM item_results ORDER BY seq").fetchall()
    assert rows == [("a", "A", "alpha", "done", None, 1, 0.25, "m1", "p1"),
                    ("b", "B", "beta", "done", None, 2, 0.25, "m1", "p1"),
                    ("c", None, None, "dead", "boom", 3, 0.0, "m1", "p2"),
                    ("d", "A", "alpha", "done", None, 0, 0.0, None, None)]


# The schema of the store before outcomes had a table of their own (schema 1).
_SCHEMA_1 = """
CREATE TABLE items (seq INTEGER PRIMARY KEY, item_id TEXT NOT NULL UNIQUE,
    canon TEXT NOT NULL UNIQUE, text TEXT NOT NULL, tag TEXT, result TEXT, label TEXT,
    state TEXT NOT NULL DEFAULT 'pending', error TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0, model TEXT, provider TEXT);
CREATE INDEX items_pending ON items(seq) WHERE result IS NULL AND state = 'pending';
INSERT INTO items VALUES (1, 'a', 'a', 'text a', NULL, 'A', 'alpha', 'done', NULL, 1, 0.5,
                          'm1', 'p1');
INSERT INTO items VALUES (2, 'b', 'b', 'text b', 't', NULL, NULL, 'dead', 'boom', 4, 0,
                          'm1', 'p2');
INSERT INTO items(seq, item_id, canon, text) VALUES (3, 'c', 'c', 'text c');
"""


def test_a_schema_1_store_is_migrated_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_1)
    store = SqliteJobStore(str(path))
    assert [(seq, i.id, i.text) for seq, i in store.page(0, 10)] == [(3, "c", "text c")]
    assert store.counts() == StoreCounts(3, 1, 1, 1, 0.5)
    assert store.results() == {"a": ("done", "A", None), "b": ("dead", None, "boom"),
                               "c": ("pending", None, None)}
    assert store.save_results([ItemResult("a", "done", "B", "beta")]) == 0  # still done once
    assert store.requeue_dead() == 1
    assert store.save_results([ItemResult("b", "done", "B", "beta", "m1", "p1",
                                          cost_usd=0.25, attempts=5)]) == 1
    assert store.import_items([Item("d", "text d")]) == 1
    assert [i.id for _, i in store.page(0, 10)] == ["c", "d"]
    store.close()
    again = SqliteJobStore(str(path))  # schema 2 now: opened as it is
    assert again.counts() == StoreCounts(4, 2, 0, 2, 0.75)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT item_id, label, cost_usd, model, provider, attempts "
                            "FROM item_results ORDER BY seq").fetchall() == [
            ("a", "alpha", 0.5, "m1", "p1", 1), ("b", "beta", 0.25, "m1", "p1", 5),
            ("c", None, 0.0, None, None, 0), ("d", None, 0.0, None, None, 0)]


def test_a_newer_or_foreign_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite"
    SqliteJobStore(str(newer)).close()
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreVersionError, match=f"schema {SCHEMA_VERSION + 1} .* newer"):
        SqliteJobStore(str(newer))
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(StoreVersionError, match="not a ratelab job store"):
        SqliteJobStore(str(foreign))
    with sqlite3.connect(foreign) as conn:
        assert [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")] == ["items"]
    assert issubclass(StoreVersionError, sqlite3.Error)  # ratelab job: "cannot open"


def test_a_migration_that_fails_midway_leaves_schema_1_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_1)
        before = conn.execute("SELECT * FROM items ORDER BY seq").fetchall()
    # fails after the old table was renamed and the new ones filled, before the commit
    monkeypatch.setattr(store_module, "_MIGRATE_1",
                        store_module._MIGRATE_1 + "SELECT * FROM no_such_table;")
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        SqliteJobStore(str(path), retries=0)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = "
                                           "'table'")] == ["items"]
        assert conn.execute("SELECT * FROM items ORDER BY seq").fetchall() == before
    monkeypatch.undo()
    assert SqliteJobStore(str(path)).counts() == StoreCounts(3, 1, 1, 1, 0.5)


def test_a_page_holds_its_items_as_columns(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item("a", "text a"), Item("b", "text b", tag="long"), Item("c", "c")])
    page = store.page(0, 10)
    assert (page.seqs, page.ids, page.texts, page.tags) == (
        [1, 2, 3], ["a", "b", "c"], ["text a", "text b", "c"], [None, "long", None])
    assert list(page) == [(1, Item("a", "text a")), (2, Item("b", "text b", "long")),
                          (3, Item("c", "c"))]
    assert len(page) == 3 and page.last_seq == 3 and page.tagged
    rest = store.page(1, 10)
    assert rest.ids == ["b", "c"] and rest.tagged
    untagged = store.page(2, 10)
    assert untagged.ids == ["c"] and not untagged.tagged
    empty = store.page(3, 10)
    assert not empty and len(empty) == 0 and list(empty) == [] and not empty.tagged
    store.close()


def test_an_import_chunk_is_checked_against_itself_and_the_store(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    # an identical item twice in one chunk is one item
    assert store.import_items([Item("1", "a"), Item("2", "b"), Item("1", "a")]) == 2
    # a chunk with a collision (in itself, or with the store) is refused whole
    for chunk, name in (([Item("3", "c"), Item("4", "d"), Item("4", "other")], "'4'"),
                        ([Item("5", "e"), Item("01", "f")], "'01'.*'1'"),
                        ([Item("6", "g"), Item("2", "not b")], "'2'.*'2'")):
        with pytest.raises(InputError, match=name):
            store.import_items(chunk)
        assert store.counts().total == 2 and [i.id for _, i in store.page(0, 10)] == ["1", "2"]
    # a re-import of what is stored, with new items, adds only the new ones
    assert store.import_items([Item("2", "b"), Item("7", "h"), Item("1", "a")]) == 1
    assert store.page(0, 10).ids == ["1", "2", "7"]
    assert store.counts().pending == 3
    store.close()


def _accepted(ids: list[str], codes: str, attempts: list[int], share: float = 0.5) -> Accepted:
    call = Call(1, "p1", "m1", tuple(ids), {}, 10, 10, 20, 0, 60.0)
    states = [ItemState(i, i, "m1", i, attempts=a) for i, a in zip(ids, attempts, strict=True)]
    return Accepted(0.0, call, share, dict(zip(ids, codes, strict=True)), states)


@pytest.mark.parametrize("rows_per_statement", [250, 2])
def test_a_reply_is_written_by_seq_once_with_its_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows_per_statement: int) -> None:
    # One statement per reply (or per rows_per_statement rows) marks its items done by
    # seq; an item without a seq is written by id; a done row is never written again.
    monkeypatch.setattr(store_module, "_ROWS_PER_STATEMENT", rows_per_statement)
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item(n, f"text {n}") for n in "abcdefg"])
    page = store.page(0, 10)
    seqs = dict(zip(page.ids, page.seqs, strict=True))
    assert store.save_results([ItemResult("b", "done", "B", "beta")]) == 1
    labels = {"A": "alpha", "B": "beta"}
    del seqs["e"]  # written by its id
    reply = _accepted(["d", "b", "e", "a", "f"], "ABAAB", [0, 0, 2, 1, 0], share=0.25)
    assert store.save_results([reply], seqs, labels) == 4  # b was done already
    assert store.results() == {
        "a": ("done", "A", None), "b": ("done", "B", None), "c": ("pending", None, None),
        "d": ("done", "A", None), "e": ("done", "A", None), "f": ("done", "B", None),
        "g": ("pending", None, None)}
    assert store.save_results([_accepted(["a", "g"], "BB", [0, 0])], seqs, labels) == 1
    assert store.results()["a"] == ("done", "A", None)
    assert store.counts() == StoreCounts(7, 6, 0, 1, 1.5)
    with sqlite3.connect(tmp_path / "j.sqlite") as conn:
        rows = conn.execute("SELECT item_id, label, attempts, cost_usd, model, provider "
                            "FROM item_results ORDER BY seq").fetchall()
    assert rows == [("a", "alpha", 2, 0.25, "m1", "p1"), ("b", "beta", 0, 0.0, None, None),
                    ("c", None, 0, 0.0, None, None), ("d", "alpha", 1, 0.25, "m1", "p1"),
                    ("e", "alpha", 3, 0.25, "m1", "p1"), ("f", "beta", 1, 0.25, "m1", "p1"),
                    ("g", "beta", 1, 0.5, "m1", "p1")]


@pytest.mark.parametrize("codes,attempts", [
    ("ABBA", [1, 1, 1, 1]),  # consecutive seqs in order, one-character codes: a seq range
    ("ABBA", [1, 0, 1, 1]),  # attempts differ: a row each
    (["A", "BB", "BB", "A"], [1, 1, 1, 1]),  # a longer code: a row each
])
def test_a_reply_of_consecutive_rows_is_written_as_any_other(
        tmp_path: Path, codes: str | list[str], attempts: list[int]) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item(n, f"text {n}") for n in "abcdef"])
    page = store.page(0, 10)
    seqs = dict(zip(page.ids, page.seqs, strict=True))
    assert store.save_results([ItemResult("c", "done", "B", "beta")]) == 1
    labels = {"A": "alpha", "B": "beta", "BB": "beta2"}
    call = Call(1, "p1", "m1", ("b", "c", "d", "e"), {}, 10, 10, 20, 0, 60.0)
    states = [ItemState(i, i, "m1", i, attempts=a) for i, a in zip("bcde", attempts,
                                                                     strict=True)]
    reply = Accepted(0.0, call, 0.5, dict(zip("bcde", codes, strict=True)), states)
    assert store.save_results([reply], seqs, labels) == 3  # c was done already
    with sqlite3.connect(tmp_path / "j.sqlite") as conn:
        rows = conn.execute("SELECT item_id, result, state, attempts, cost_usd "
                            "FROM item_results ORDER BY seq").fetchall()
    assert rows == [("a", None, "pending", 0, 0.0),
                    ("b", codes[0], "done", attempts[0] + 1, 0.5),
                    ("c", "B", "done", 0, 0.0),
                    ("d", codes[2], "done", attempts[2] + 1, 0.5),
                    ("e", codes[3], "done", attempts[3] + 1, 0.5),
                    ("f", None, "pending", 0, 0.0)]


def test_a_one_item_reply_is_written_once(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item(n, f"text {n}") for n in "ab"])
    page = store.page(0, 10)
    seqs = dict(zip(page.ids, page.seqs, strict=True))
    labels = {"A": "alpha", "B": "beta"}
    assert store.save_results([_accepted(["b"], "B", [2])], seqs, labels) == 1
    assert store.save_results([_accepted(["b"], "A", [0])], seqs, labels) == 0
    assert store.save_results([_accepted(["a"], "A", [0])], {}, labels) == 1  # by id
    with sqlite3.connect(tmp_path / "j.sqlite") as conn:
        rows = conn.execute("SELECT item_id, result, attempts, cost_usd "
                            "FROM item_results ORDER BY seq").fetchall()
    assert rows == [("a", "A", 1, 0.5), ("b", "B", 3, 0.5)]


def test_an_import_is_marked_unfinished_until_its_last_chunk_commits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_IMPORT_CHUNK", 2)
    path = str(tmp_path / "j.sqlite")
    store = SqliteJobStore(path)
    assert store.import_complete()  # nothing was imported: nothing is unfinished

    def interrupted() -> Iterator[Item]:
        yield from (Item(str(n), f"text {n}") for n in range(5))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.import_items(interrupted())
    # the two chunks committed before the interrupt stay, and the store says so
    assert store.page(0, 10).ids == ["0", "1", "2", "3"] and not store.import_complete()
    store.close()
    store = SqliteJobStore(path)
    assert not store.import_complete()
    # the import given again: what is stored is skipped, the rest added, and it is complete
    assert store.import_items(Item(str(n), f"text {n}") for n in range(6)) == 2
    assert store.counts().total == 6 and store.import_complete()
    # an import that fails on an item (a collision) is unfinished too
    with pytest.raises(InputError):
        store.import_items([Item("6", "x"), Item("7", "y"), Item("06", "z")])
    assert store.counts().total == 8 and not store.import_complete()
    assert store.import_items([]) == 0 and store.import_complete()
    store.close()


def test_a_store_from_before_imports_were_marked_opens_as_complete(tmp_path: Path) -> None:
    path = str(tmp_path / "j.sqlite")
    store = SqliteJobStore(path)
    store.import_items(iter([Item("a", "x")]))
    store._conn.execute("DROP TABLE job_import")  # as a store written before it was
    store.close()
    old = SqliteJobStore(path)
    assert old.import_complete() and old.counts().total == 1
    assert old._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert old._conn.execute("SELECT * FROM job_import").fetchall() == []
    old.close()


def test_an_import_names_a_repeat_within_it_apart_from_a_stored_item(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item("1", "a")])
    with pytest.raises(InputError) as info:
        store.import_items([Item("2", "b"), Item("2", "c")])
    assert str(info.value) == "item '2': id collides with item '2' earlier in this import"
    with pytest.raises(InputError) as info:
        store.import_items([Item("01", "b")])
    assert str(info.value) == "item '01': id collides with stored item '1'"
    assert store.counts().total == 1
    store.close()


def test_stored_items_are_looked_up_by_canonical_id(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item("007", "seven"), *(Item(f"i{n}", f"t{n}") for n in range(600))])
    canons = ["7", "8", *(f"i{n}" for n in range(0, 600, 2))]  # over one statement's worth
    found = store.stored_items(canons)
    assert found["7"] == ("007", "seven") and "8" not in found
    assert len(found) == 301 and found["i598"] == ("i598", "t598")
    assert store.stored_items([]) == {}
    store.close()
