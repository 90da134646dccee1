"""The items file is checked whole, with the engine's checks and against the job store,
before any of it is imported: the first unusable line is named with the file and line."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from batchclient import itemsfile
from batchclient.itemsfile import check_items, read_lines
from batchclient.policy.engine import Engine, InputError
from batchclient.policy.wire import Item
from batchclient.store import SqliteJobStore
from tests.batchclient.bc_fakes import config, task


def _file(tmp_path: Path, *rows: object) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _refusal(path: Path, store: SqliteJobStore | None = None, **settings: object) -> str:
    with pytest.raises(InputError) as info:
        check_items(str(path), Engine(task(), config(**settings), random.Random(0)), store)
    return str(info.value)


def _ok(n: int) -> dict[str, object]:
    return {"id": n, "text": f"item {n}"}


@pytest.mark.parametrize(("row", "message"), [
    ({"id": 2, "text": ""}, "item '2': empty text"),
    ({"id": 2, "text": " \t"}, "item '2': empty text"),
    ({"id": "a b", "text": "x"}, "item 'a b': id must match [A-Za-z0-9_.-]+"),
])
def test_the_engines_checks_name_the_file_and_line(tmp_path: Path, row: object,
                                                   message: str) -> None:
    path = _file(tmp_path, _ok(1), row, _ok(3), {"id": "c d", "text": "later, not named"})
    assert _refusal(path) == f"{path}:2: {message}"


def test_an_item_over_the_token_budget_alone_is_named(tmp_path: Path) -> None:
    path = _file(tmp_path, _ok(1), _ok(2), {"id": 3, "text": "x" * 2000})
    assert _refusal(path, batch={"token_budget": 400}) == (
        f"{path}:3: item '3': needs 599 tokens alone, over the batch.token_budget of 400")


def test_a_repeated_id_names_both_lines(tmp_path: Path) -> None:
    path = _file(tmp_path, _ok(1), _ok(2), {"id": 2, "text": "another"})
    assert _refusal(path) == (
        f"{path}:3: item '2': repeats the id of line 2 with another text (ids must be "
        "unique; all-digit ids compare as numbers)")
    path = _file(tmp_path, _ok(1), {"id": "x", "text": "t"}, {"id": "001", "text": "item 1"})
    assert _refusal(path) == (
        f"{path}:3: item '001': id collides with item '1' of line 1 (ids must be unique; "
        "all-digit ids compare as numbers)")


def test_a_repeat_on_another_page_is_named_and_the_first_bad_line_wins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(itemsfile, "_PAGE", 2)
    path = _file(tmp_path, _ok(1), _ok(2), _ok(3), {"id": 1, "text": "again"})
    assert _refusal(path).startswith(f"{path}:4: item '1': repeats the id of line 1 ")
    # a page's repeat comes after an unusable line before it, and before one after it
    path = _file(tmp_path, _ok(1), _ok(2), {"id": 3, "text": ""}, {"id": 1, "text": "x"})
    assert _refusal(path) == f"{path}:3: item '3': empty text"
    path = _file(tmp_path, _ok(1), _ok(2), {"id": 1, "text": "x"}, {"id": 4, "text": ""})
    assert _refusal(path).startswith(f"{path}:3: item '1': repeats the id of line 1 ")


def test_an_exact_copy_of_a_line_is_one_item_as_the_store_imports_it(tmp_path: Path) -> None:
    path = _file(tmp_path, _ok(1), _ok(2), _ok(1))
    checker = Engine(task(), config(), random.Random(0))
    assert check_items(str(path), checker) == 3
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    assert store.import_items(item for _, item in read_lines(str(path))) == 2
    store.close()


def test_an_item_the_store_holds_otherwise_is_named(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "j.sqlite"))
    store.import_items([Item("1", "item 1"), Item("2", "item 2"), Item("x", "stored")])
    # what the store holds as it is (imported before), and new items, pass
    path = _file(tmp_path, _ok(1), _ok(2), _ok(3))
    assert check_items(str(path), Engine(task(), config(), random.Random(0)), store) == 3
    path = _file(tmp_path, _ok(1), {"id": "x", "text": "changed"}, {"id": "02", "text": "t"})
    assert _refusal(path, store) == (
        f"{path}:2: item 'x': the job store holds it with another text, and a stored item "
        "cannot change: restore its text, or start a new job with another --db")
    path = _file(tmp_path, _ok(3), {"id": "02", "text": "item 2"})
    assert _refusal(path, store) == (
        f"{path}:2: item '02': id collides with item '2' the job store holds (ids must be "
        "unique; all-digit ids compare as numbers)")
    assert store.counts().total == 3  # checks write nothing
    store.close()


def test_a_byte_order_mark_at_the_start_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n')
    assert list(read_lines(str(path))) == [(1, Item("1", "a")), (2, Item("2", "b"))]
    # only at the start: one further on is a line that is not JSON, as any other
    path.write_bytes(b'{"id": 1, "text": "a"}\n\xef\xbb\xbf{"id": 2, "text": "b"}\n')
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}:2: invalid JSON"):
        list(read_lines(str(path)))
