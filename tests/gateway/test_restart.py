"""A `ratelab gateway` process killed outright (SIGKILL, no clean shutdown) with tasks in
flight: the next process on the same SQLite file loses no accepted task, re-runs exactly
those that were running, and does not call the provider again for those already done."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

CHAT = {"user": "ann", "lane": "interactive", "max_tokens": 8,
        "messages": [{"role": "user", "content": "count to three"}]}
TASKS = 8


def _start(db: Path, upstream: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.cli", "gateway", "--port", "0", "--upstream",
         upstream, "--db", str(db), "--workers", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ratelab gateway on http://127.0.0.1:"), line
    return proc, line.split()[3]


def _call(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _stored(db: Path) -> dict[str, tuple[str, int, str | None]]:
    """What the file holds: id -> (state, attempts, result)."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT id, state, attempts, result FROM tasks").fetchall()
    finally:
        con.close()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_killed_gateway_loses_nothing_and_pays_done_tasks_once(sim_thread,
                                                               tmp_path: Path) -> None:
    sim = sim_thread(time_scale=10, ttft_ms=1500, itl_ms=1, seed=12)   # 150 ms wall a call
    db = tmp_path / "gw.db"
    first, url = _start(db, sim.base_url())
    try:
        ids = [_call(f"{url}/v1/tasks", CHAT)["id"] for _ in range(TASKS)]
        deadline = time.monotonic() + 20
        while True:   # kill once some tasks are done and others are still running
            states = [_call(f"{url}/v1/tasks/{i}")["state"] for i in ids]
            if "done" in states and "running" in states:
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.01)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    at_kill = _stored(db)
    assert sorted(at_kill) == sorted(ids)          # every accepted task is in the file
    done = {i for i, (state, _, _) in at_kill.items() if state == "done"}
    running = {i for i, (state, _, _) in at_kill.items() if state == "running"}
    assert done and running
    second, url = _start(db, sim.base_url())
    try:
        deadline = time.monotonic() + 30
        while True:
            after = {i: _call(f"{url}/v1/tasks/{i}") for i in ids}
            if all(a["state"] == "done" for a in after.values()):
                break
            assert time.monotonic() < deadline, {i: a["state"] for i, a in after.items()}
            time.sleep(0.05)
        calls = _call(f"{url}/metrics?format=json")["upstream_calls"]
    finally:
        second.send_signal(signal.SIGINT)
        second.wait(timeout=20)
    for task_id in done:        # finished before the kill: kept, never called again
        assert after[task_id]["attempts"] == 1
        assert after[task_id]["result"] == json.loads(at_kill[task_id][2] or "null")
    for task_id in running:     # in flight at the kill: run again
        assert after[task_id]["attempts"] == 2
    # the second process called the provider once for each task not done at the kill
    assert calls == {"200": TASKS - len(done)}
    provider = next(iter(sim.providers.values())).stats()["keys"]["sk-ratelab"]
    seen = sum(int(n) for m in provider["models"].values() for n in m["requests"].values())
    # a call cut off by the kill may or may not have reached the provider
    assert TASKS <= seen <= TASKS + len(running)
