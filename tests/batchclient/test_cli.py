"""``ratelab job``'s items file: each line an object with id and text; a bad line is an
InputError naming the file and line, before any request."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import pytest

from batchclient import cli as cli_module
from batchclient import store as store_module
from batchclient.cli import read_items
from batchclient.policy.engine import InputError
from batchclient.policy.wire import Item
from batchclient.store import SqliteJobStore
from loadtests.cli import main
from simulator.model.config import parse_config
from simulator.server import serve_in_thread

REPO = Path(__file__).resolve().parents[2]


def test_items_are_read_in_order_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"id": 1, "text": "caf\xc3\xa9"}\r\n\n'
                     b'{"id": "b", "text": "x", "tag": "t"}\n')
    assert list(read_items(str(path))) == [Item("1", "café", None), Item("b", "x", "t")]


@pytest.mark.parametrize(("line", "message"), [
    (b'{"id": 2, "text": "a\xff"}', "not UTF-8 text"),
    (b'{"id": 2, "text": ', "invalid JSON"),
    (b'{"id": 2}', "expected an object with id and text"),
    (b'{"id": true, "text": "a"}', "id must be a string or an integer"),
])
def test_a_bad_line_is_named(tmp_path: Path, line: bytes, message: str) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"id": 1, "text": "ok"}\n' + line + b"\n")
    with pytest.raises(InputError) as info:
        list(read_items(str(path)))
    assert str(info.value).startswith(f"{path}:2: {message}")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "missing.jsonl"
    with pytest.raises(InputError) as info:
        list(read_items(str(path)))
    assert str(info.value).startswith(f"{path}: cannot read")


def _one_item_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An items file of one item and its task file, with an API key in the environment."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    items = tmp_path / "items.jsonl"
    items.write_text('{"id": 1, "text": "ok"}\n', encoding="utf-8")
    task = tmp_path / "task.yaml"
    task.write_text("name: t\nsystem_prompt: Classify.\nlabels: {A: alpha}\n"
                    "model: gpt-4o-mini\n", encoding="utf-8")
    return items, task


@pytest.mark.parametrize("where", ["db", "cache"])
def test_a_store_that_cannot_be_opened_is_an_input_error(
        tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    items, task = _one_item_job(tmp_path, monkeypatch)
    paths = {"db": str(tmp_path / "job.db"), "cache": str(tmp_path / "cache.db")}
    paths[where] = str(items)  # not an SQLite file: left as it was
    status = main(["job", str(items), "--task", str(task), "--db", paths["db"], "--cache",
                   paths["cache"], "--base-url", "http://127.0.0.1:9/v1", "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err
    assert f"{items}: cannot open the" in err and "Traceback" not in err
    assert items.read_text(encoding="utf-8") == '{"id": 1, "text": "ok"}\n'



def test_an_unreachable_provider_is_named_before_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    items, task = _one_item_job(tmp_path, monkeypatch)
    # 1000x: the retries and breaker cooldowns of a job nobody answers pass in a moment
    status = main(["job", str(items), "--task", str(task), "--db", str(tmp_path / "j.db"),
                   "--base-url", "http://127.0.0.1:9/v1", "--no-progress", "--time-scale",
                   "1000"])
    err = capsys.readouterr().err
    assert status == 0 and "Traceback" not in err
    assert ("ratelab job: warning: provider 'default' at http://127.0.0.1:9/v1 cannot be "
            "reached") in err


def _simulator(responder: dict[str, object]):  # type: ignore[no-untyped-def]
    """A simulator at 1000x that takes _one_item_job's key and model."""
    return serve_in_thread(parse_config({"time_scale": 1000, "providers": [{
        "name": "p", "models": {"gpt-4o-mini": {}}, "keys": {"sk-test": {}},
        "responder": responder}]}, "test"))


def test_dead_letters_are_explained_then_sent_again_with_retry_dead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    items, task = _one_item_job(tmp_path, monkeypatch)
    db = str(tmp_path / "job.db")
    args = ["job", "--task", str(task), "--db", db, "--no-progress", "--time-scale", "1000"]
    # a provider that writes prose: the item is dead-lettered, and stderr says why
    with _simulator({"kind": "lorem"}) as server:
        status = main([*args, str(items), "--base-url", server.base_url("p")])
    out, err = capsys.readouterr()
    assert status == 0 and out.startswith("exit 0: 0 done, 1 dead, 0 pending of 1")
    assert ("ratelab job: 1 item dead-lettered, by last error: reply cut at max_tokens (1). "
            "Once the cause is fixed, re-run with --retry-dead") in err
    # a provider that answers in JSON: resumed with --retry-dead, the item is done
    with _simulator({"kind": "batch_json", "codes": ["A"]}) as server:
        status = main([*args, "--retry-dead", "--base-url", server.base_url("p")])
    out, err = capsys.readouterr()
    assert status == 0 and out.startswith("exit 0: 1 done, 0 dead, 0 pending of 1")
    assert "ratelab job: 1 dead-lettered item back in the queue" in err
    assert "dead-lettered, by last error" not in err


def test_a_job_resumed_with_another_task_is_refused_unless_said_on_purpose(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    items, task = _one_item_job(tmp_path, monkeypatch)
    db = str(tmp_path / "job.db")
    args = ["job", str(items), "--db", db, "--no-progress", "--time-scale", "1000"]
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(task.read_text(encoding="utf-8").replace("name: t", "name: u"),
                       encoding="utf-8")
    # a first run that answered nothing (no provider at that port): the task may change
    assert main([*args, "--task", str(renamed), "--base-url", "http://127.0.0.1:9/v1"]) == 0
    with _simulator({"kind": "batch_json", "codes": ["A"]}) as server:
        url = ["--base-url", server.base_url("p")]
        assert main([*args, "--task", str(task), "--retry-dead", *url]) == 0
        capsys.readouterr()
        assert main([*args, "--task", str(renamed), *url]) == 2
        err = capsys.readouterr().err
        assert ("ratelab job: task: the job store holds answers to another task (changed: "
                "name 't' -> 'u')") in err and "--task-changed" in err
        assert main([*args, "--task", str(renamed), "--task-changed", *url]) == 0
        assert main([*args, "--task", str(renamed), *url]) == 0  # now bound to the new one


def test_a_resume_of_a_store_that_is_not_there_creates_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, task = _one_item_job(tmp_path, monkeypatch)
    db = tmp_path / "typo.db"
    status = main(["job", "--task", str(task), "--db", str(db), "--base-url",
                   "http://127.0.0.1:9/v1", "--no-progress"])
    assert status == 2 and not db.exists()
    assert capsys.readouterr().err == (f"ratelab job: --db {db}: no such job store; give "
                                       "ITEMS.jsonl to start a job\n")


def test_a_store_another_process_is_running_is_refused_before_import(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    items, task = _one_item_job(tmp_path, monkeypatch)
    db = tmp_path / "job.db"
    holder = SqliteJobStore(str(db))
    holder.claim()  # the other run
    try:
        status = main(["job", str(items), "--task", str(task), "--db", str(db),
                       "--base-url", "http://127.0.0.1:9/v1", "--no-progress"])
        assert status == 2
        assert capsys.readouterr().err == (
            f"ratelab job: --db {db}: another process is running a job on this store; wait "
            "for it to finish, or stop it (Ctrl-C saves its progress)\n")
        assert holder.counts().total == 0  # nothing imported
    finally:
        holder.close()


def test_a_job_store_that_fails_mid_job_is_named_without_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    items, task = _one_item_job(tmp_path, monkeypatch)
    db = tmp_path / "job.db"

    def full(self: SqliteJobStore, _items: object) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(SqliteJobStore, "import_items", full)
    status = main(["job", str(items), "--task", str(task), "--db", str(db),
                   "--base-url", "http://127.0.0.1:9/v1", "--no-progress"])
    assert status == 1
    assert capsys.readouterr().err == (
        f"ratelab job: --db {db}: the job store failed: database or disk is full; the "
        "results saved before it are kept, re-run to resume\n")


def test_share_gives_the_job_a_part_of_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    items, task = _one_item_job(tmp_path, monkeypatch)
    args = ["job", str(items), "--task", str(task), "--no-progress", "--time-scale", "1000"]
    with _simulator({"kind": "batch_json", "codes": ["A"]}) as server:
        status = main([*args, "--db", str(tmp_path / "a.db"), "--share", "1.5",
                       "--base-url", server.base_url("p")])
        assert status == 2
        assert capsys.readouterr().err == (
            "ratelab job: command line: providers[0].share: expected a fraction of the key's "
            "limits, at most 1, got 1.5\n")
        status = main([*args, "--db", str(tmp_path / "b.db"), "--share", "0.5",
                       "--base-url", server.base_url("p")])
    assert status == 0 and capsys.readouterr().out.startswith("exit 0: 1 done, 0 dead")


def test_a_spend_cap_stops_the_job_with_status_6_and_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, task = _one_item_job(tmp_path, monkeypatch)
    items = tmp_path / "many.jsonl"
    items.write_text("".join(f'{{"id": {i}, "text": "item {i} words"}}\n' for i in range(50)),
                     encoding="utf-8")
    db = str(tmp_path / "job.db")
    args = ["job", "--task", str(task), "--db", db, "--no-progress", "--time-scale", "1000",
            "--batch-size", "5"]
    priced = parse_config({"time_scale": 1000, "providers": [{
        "name": "p", "keys": {"sk-test": {}}, "responder": {"kind": "batch_json", "codes": ["A"]},
        "models": {"gpt-4o-mini": {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}}}]},
        "test")
    with serve_in_thread(priced) as server:
        url = server.base_url("p")
        assert main([*args, str(items), "--base-url", url, "--spend-cap", "0"]) == 2
        assert "spend_cap_usd: expected an amount of USD > 0" in capsys.readouterr().err
        # no price table: the first request goes alone and tells what one costs; a second
        # would pass the cap
        assert main([*args, str(items), "--base-url", url, "--spend-cap", "0.00001"]) == 6
        out = capsys.readouterr().out
        assert out.startswith("exit 6: 5 done, 0 dead, 45 pending of 50; 1 requests")
        assert "(spend cap USD 1e-05 reached: USD " in out
        # a new budget resumes the job
        assert main([*args, "--base-url", url, "--spend-cap", "1"]) == 0
        assert capsys.readouterr().out.startswith("exit 0: 50 done, 0 dead, 0 pending of 50")


@pytest.mark.parametrize(("bad", "fixed", "message"), [
    ({"id": 2, "text": ""}, {"id": 2, "text": "b"}, "item '2': empty text"),
    ({"id": "a b", "text": "b"}, {"id": "a-b", "text": "b"},
     "item 'a b': id must match [A-Za-z0-9_.-]+"),
    ({"id": 1, "text": "b"}, {"id": 2, "text": "b"},
     "item '1': repeats the id of line 1 with another text (ids must be unique; all-digit "
     "ids compare as numbers)"),
])
def test_a_refused_items_file_imports_nothing_and_names_its_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        bad: object, fixed: object, message: str) -> None:
    items, task = _one_item_job(tmp_path, monkeypatch)
    db = tmp_path / "job.db"
    args = ["job", str(items), "--task", str(task), "--db", str(db), "--no-progress",
            "--time-scale", "1000"]

    def write(second: object) -> None:
        items.write_text("".join(json.dumps(row) + "\n" for row in (
            {"id": 1, "text": "a"}, second, {"id": 3, "text": "c"})), encoding="utf-8")

    write(bad)
    # a new job: no store is created
    assert main([*args, "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert capsys.readouterr().err == f"ratelab job: {items}:2: {message}\n"
    assert not db.exists()
    # a job the store holds already: the file adds nothing, the store is as it was
    store = SqliteJobStore(str(db))
    store.import_items([Item("9", "stored before")])
    before = store.results()
    store.close()
    assert main([*args, "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert capsys.readouterr().err == f"ratelab job: {items}:2: {message}\n"
    store = SqliteJobStore(str(db))
    assert store.results() == before and store.import_complete()
    store.close()
    # the line fixed, the same command runs the job
    write(fixed)
    with _simulator({"kind": "batch_json", "codes": ["A"]}) as server:
        assert main([*args, "--base-url", server.base_url("p")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("exit 0: 4 done, 0 dead, 0 pending of 4") and err == ""


def test_an_items_file_that_changes_a_stored_item_is_refused_before_import(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    items, task = _one_item_job(tmp_path, monkeypatch)
    db = tmp_path / "job.db"
    args = ["job", str(items), "--task", str(task), "--db", str(db), "--no-progress",
            "--base-url", "http://127.0.0.1:9/v1"]
    store = SqliteJobStore(str(db))
    store.import_items([Item("1", "first text")])
    store.close()
    items.write_text('{"id": 2, "text": "new"}\n{"id": 1, "text": "ok"}\n', encoding="utf-8")
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"ratelab job: {items}:2: item '1': the job store holds it with another text, and a "
        "stored item cannot change: restore its text, or start a new job with another --db\n")
    store = SqliteJobStore(str(db))
    assert store.results() == {"1": ("pending", None, None)}
    store.close()
    # a file of no items starts no job (and creates no store)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    fresh = tmp_path / "fresh.db"
    assert main(["job", str(empty), "--task", str(task), "--db", str(fresh),
                 "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert capsys.readouterr().err == f"ratelab job: {empty}: no items\n"
    assert not fresh.exists()


def test_an_interrupted_import_is_finished_only_with_the_items_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, task = _one_item_job(tmp_path, monkeypatch)
    items = tmp_path / "items.jsonl"
    items.write_text("".join(f'{{"id": {i}, "text": "item {i}"}}\n' for i in range(7)),
                     encoding="utf-8")
    db = tmp_path / "job.db"
    args = ["job", "--task", str(task), "--db", str(db), "--no-progress", "--time-scale",
            "1000"]
    monkeypatch.setattr(store_module, "_IMPORT_CHUNK", 2)

    def interrupted(path: str) -> Iterator[Item]:
        # Ctrl-C while the fifth item is read: two chunks of two were committed
        yield from islice(read_items(path), 4)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "read_items", interrupted)
    assert main([*args, str(items), "--base-url", "http://127.0.0.1:9/v1"]) == 130
    assert capsys.readouterr().err == (
        f"ratelab job: interrupted during the import of {items}: the import is incomplete "
        "(4 items stored); re-run with the items file to finish it (a resume without it is "
        "refused)\n")
    monkeypatch.setattr(cli_module, "read_items", read_items)
    # a resume without the file would run the four items as the whole job: refused
    assert main([*args, "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert capsys.readouterr().err == (
        f"ratelab job: --db {db}: the import of the job's items did not finish (it was "
        "interrupted): give ITEMS.jsonl again to finish it (the items stored are kept, none "
        "is imported twice)\n")
    store = SqliteJobStore(str(db))
    assert store.page(0, 10).ids == ["0", "1", "2", "3"] and not store.import_complete()
    store.close()
    # with the file the import is finished and the job runs; then a resume needs none
    with _simulator({"kind": "batch_json", "codes": ["A"]}) as server:
        assert main([*args, str(items), "--base-url", server.base_url("p")]) == 0
        assert capsys.readouterr().out.startswith("exit 0: 7 done, 0 dead, 0 pending of 7")
        assert main([*args, "--base-url", server.base_url("p")]) == 0
        assert capsys.readouterr().out.startswith("exit 0: 7 done, 0 dead, 0 pending of 7")


def test_an_interrupt_while_the_file_is_checked_imports_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    items, task = _one_item_job(tmp_path, monkeypatch)
    db = tmp_path / "job.db"

    def interrupted(*_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "check_items", interrupted)
    assert main(["job", str(items), "--task", str(task), "--db", str(db), "--no-progress",
                 "--base-url", "http://127.0.0.1:9/v1"]) == 130
    assert capsys.readouterr().err == ("ratelab job: interrupted before the import: nothing "
                                       "was imported\n")
    assert not db.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_a_large_import_leaves_it_marked_incomplete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals) -> None:
    """The user's case, with a real SIGINT (and SIGTERM, as a service manager stops it):
    the items come through a named pipe, held open after the first chunk (5,000 items) is
    committed, so the signal lands mid-import."""
    _, task = _one_item_job(tmp_path, monkeypatch)
    items = tmp_path / "pipe.jsonl"
    os.mkfifo(items)
    db = tmp_path / "job.db"
    lines = "".join(f'{{"id": {i}, "text": "item {i}"}}\n' for i in range(6000)).encode()
    command = [sys.executable, "-m", "loadtests.cli", "job", "--task", str(task), "--db",
               str(db), "--no-progress", "--base-url", "http://127.0.0.1:9/v1"]
    job = subprocess.Popen([*command, str(items)], cwd=REPO, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 60

    def wait_for(done: Callable[[], bool]) -> None:
        while not done():
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.02)

    def writer() -> BinaryIO:
        # opened once the job opens the pipe to read (a blocking open would wait for ever
        # on a job that failed first)
        while True:
            try:
                fd = os.open(items, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader yet
                assert time.monotonic() < deadline and job.poll() is None
                time.sleep(0.02)
                continue
            os.set_blocking(fd, True)
            return os.fdopen(fd, "wb")

    try:
        with writer() as pipe:  # read whole by the checks
            pipe.write(lines)
        # the store is created once the checks are done with the pipe: the next writer
        # meets the import's read
        wait_for(db.exists)
        with writer() as pipe:  # the import's read: 5,500 items, then it waits
            pipe.write(lines[:lines.index(b'{"id": 5500,')])
            pipe.flush()
            wait_for(lambda: _stored(db) == 5000)
            job.send_signal(sig)
            _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130
    assert err == (f"ratelab job: interrupted during the import of {items}: the import is "
                   "incomplete (5000 items stored); re-run with the items file to finish it "
                   "(a resume without it is refused)\n")
    resume = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert resume.returncode == 2 and resume.stdout == ""
    assert resume.stderr == (
        f"ratelab job: --db {db}: the import of the job's items did not finish (it was "
        "interrupted): give ITEMS.jsonl again to finish it (the items stored are kept, none "
        "is imported twice)\n")
    assert _stored(db) == 5000


def _stored(db: Path) -> int:
    """Items a job store holds, read beside the process writing it (0 before it exists)."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        try:
            return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        except sqlite3.OperationalError:  # the schema not written yet
            return 0
