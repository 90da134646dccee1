"""``ratelab job``'s items file: JSONL of ``{id, text[, tag]}``, read with its line numbers
and checked whole before any of it is imported.

Every check an item must pass (the engine's own: id syntax, text, the token budget alone;
ids unique within the file; no clash with an item the job store holds) runs over the whole
file first, so a refused file leaves the store as it was, and each error names the file
and line. The import then reads the file again (``read_items``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice

from batchclient.policy.engine import Engine, InputError
from batchclient.policy.tokens import canonical_id
from batchclient.policy.wire import Item
from batchclient.store import SqliteJobStore

# lines checked together: the engine checks a page at a time, the store answers in bulk
_PAGE = 5000

_UNIQUE = "ids must be unique; all-digit ids compare as numbers"


def read_lines(path: str) -> Iterator[tuple[int, Item]]:
    """The items of a JSONL file with their line numbers (from 1; blank lines skipped, a
    UTF-8 byte order mark at the start ignored); raises InputError naming the line."""
    try:
        # bytes, decoded line by line: a line that is not UTF-8 is named like any other
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    with handle:
        for n, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{n}: not UTF-8 text: {exc.reason}") from exc
            if n == 1 and line.startswith("\ufeff"):
                line = line[1:]  # Windows editors write one; json.loads refuses it
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n}: invalid JSON: {exc.msg}") from exc
            if not isinstance(data, dict) or "id" not in data or not isinstance(
                    data.get("text"), str):
                raise InputError(f"{path}:{n}: expected an object with id and text")
            raw_id = data["id"]
            if isinstance(raw_id, bool) or not isinstance(raw_id, int | str):
                raise InputError(f"{path}:{n}: id must be a string or an integer")
            tag = data.get("tag")
            yield n, Item(str(raw_id), data["text"], tag if isinstance(tag, str) else None)


def read_items(path: str) -> Iterator[Item]:
    """The items of a JSONL file (``read_lines`` without the line numbers)."""
    for _, item in read_lines(path):
        yield item


def check_items(path: str, checker: Engine, store: SqliteJobStore | None = None) -> int:
    """Check every item of ``path`` before any is imported; return how many it holds.

    ``checker`` (an engine of the job's task and settings) makes its per-item checks;
    a repeated id is refused naming both lines, unless the line repeats the first one's id
    and text exactly (the store imports that item once, as it always has); an item that
    ``store`` holds with another text or another spelling of its id is refused. Raises
    InputError naming the file and line of the first unusable item."""
    # canonical id -> hash of (id, text) of its first line: a repeat is told apart from
    # an exact copy without keeping the texts (the first line is looked up again to name
    # it, only when the file is refused)
    first: dict[str, int] = {}
    count = 0
    lines = read_lines(path)
    while page := list(islice(lines, _PAGE)):
        count += len(page)
        kept: list[tuple[int, Item]] = []
        canons: list[str] = []
        repeat: tuple[int, str] | None = None
        for n, item in page:
            canon = canonical_id(item.id)
            copy = hash((item.id, item.text))
            known = first.get(canon)
            if known is None:
                first[canon] = copy
                kept.append((n, item))
                canons.append(canon)
            elif known != copy:
                # the lines before it are checked too: the first bad line is named
                repeat = (n, _repeat(path, canon, n, item))
                break
        found = [p for p in (_engine_problem(path, kept, checker),
                             _store_problem(path, kept, canons, store), repeat) if p]
        if found:
            # the first line wins; on one line, the engine's reason before the others
            raise InputError(min(found, key=lambda p: p[0])[1])
    return count


def _repeat(path: str, canon: str, n: int, item: Item) -> str:
    """The message for line ``n``, whose id an earlier line of ``path`` holds."""
    at, other = next(((m, it) for m, it in read_lines(path) if canonical_id(it.id) == canon),
                     (0, item))  # 0: the file changed since it was read
    if other.id == item.id:
        return (f"{path}:{n}: item {item.id!r}: repeats the id of line {at} with another "
                f"text ({_UNIQUE})")
    return (f"{path}:{n}: item {item.id!r}: id collides with item {other.id!r} of line "
            f"{at} ({_UNIQUE})")


def _engine_problem(path: str, kept: list[tuple[int, Item]], checker: Engine
                    ) -> tuple[int, str] | None:
    """The first of ``kept`` (ids unique) the engine would refuse, with its message."""
    try:
        checker.check_page([item.id for _, item in kept], [item.text for _, item in kept])
    except InputError:
        # the page pass says only that one is unusable: the same checks item by item find
        # which (ids are unique, so it is a check of the item alone)
        for n, item in kept:
            try:
                checker.check_item(item)
            except InputError as exc:
                return n, f"{path}:{n}: {exc}"
        raise
    return None


def _store_problem(path: str, kept: list[tuple[int, Item]], canons: list[str],
                   store: SqliteJobStore | None) -> tuple[int, str] | None:
    """The first of ``kept`` that clashes with an item ``store`` holds, with its message."""
    if store is None:
        return None
    stored = store.stored_items(canons)
    if not stored:
        return None
    for (n, item), canon in zip(kept, canons, strict=True):
        found = stored.get(canon)
        if found is None or found == (item.id, item.text):
            continue  # new, or imported before: the import skips it
        other, _ = found
        if other != item.id:
            return n, (f"{path}:{n}: item {item.id!r}: id collides with item {other!r} "
                       f"the job store holds ({_UNIQUE})")
        return n, (f"{path}:{n}: item {item.id!r}: the job store holds it with another "
                   "text, and a stored item cannot change: restore its text, or start a "
                   "new job with another --db")
    return None
