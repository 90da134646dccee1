"""The batch job's GC settings, checked in a child process (they are process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from batchclient.gc_tuning import YOUNG_THRESHOLD

_CHILD = """
import asyncio, gc, json, sys, tempfile
from batchclient import FunctionTransport, Item, Response, Runner, SqliteJobStore, Task
from batchclient import gc_tuning, parse_client_config

def run():
    # a job run through the library: an embedding process keeps its own settings
    cfg = parse_client_config({"providers": [{"name": "p", "base_url": "http://x/v1",
                                              "api_key": "k"}]}, "child")
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteJobStore(tmp + "/j.sqlite")
        store.import_items([Item("1", "some text")])
        body = json.dumps({"choices": [{"message": {"content": '[{"id":1,"c":"A"}]'},
                                        "finish_reason": "stop"}]})
        runner = Runner(Task("t", "sys", {"A": "a"}, "m"), cfg,
                        FunctionTransport(lambda call: Response(200, {}, body)), store)
        return asyncio.run(runner.run()).done

before = gc.get_threshold()
done = run()
embedded = {"after": gc.get_threshold(), "frozen": gc.get_freeze_count(), "done": done}
gc_tuning.tune_for_job()
tuned = {"after": gc.get_threshold(), "frozen": gc.get_freeze_count()}
print(json.dumps({"before": before, "embedded": embedded, "tuned": tuned}))
"""


def test_a_job_process_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    got = json.loads(out)
    embedded, tuned = got["embedded"], got["tuned"]
    assert embedded["done"] == 1
    assert embedded["after"] == got["before"] and embedded["frozen"] == 0  # untouched
    assert tuned["after"] == [YOUNG_THRESHOLD, *got["before"][1:]]
    assert tuned["frozen"] > 10_000  # imports no longer walked by full collections


_CLI_CHILD = """
import argparse, asyncio, gc, json, sys
from batchclient import JobResult, cli

seen = {}

def run(coro):
    # stands in for the event loop of the job: record the collector the run would get
    coro.close()
    seen.update(threshold=gc.get_threshold(), frozen=gc.get_freeze_count())
    return JobResult(0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0.0, 0.0)

asyncio.run = run
parser = argparse.ArgumentParser()
cli.add_arguments(parser)
status = cli.main(parser.parse_args(sys.argv[1:]))
print(json.dumps({"status": status, **seen}))
"""


def test_ratelab_job_runs_with_the_tuned_collector(tmp_path: Path) -> None:
    task = tmp_path / "task.yaml"
    task.write_text("name: t\nsystem_prompt: sys\nlabels: {A: a}\nmodel: m\n")
    items = tmp_path / "items.jsonl"
    items.write_text('{"id": 1, "text": "some text"}\n')
    out = subprocess.run(
        [sys.executable, "-c", _CLI_CHILD, str(items), "--task", str(task), "--db",
         str(tmp_path / "j.sqlite"), "--base-url", "http://127.0.0.1:9/v1", "--no-progress"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "OPENAI_API_KEY": "k"}).stdout
    got = json.loads(out.splitlines()[-1])
    assert got["status"] == 0
    assert got["threshold"][0] == YOUNG_THRESHOLD and got["frozen"] > 10_000
