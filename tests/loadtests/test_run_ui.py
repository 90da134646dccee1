"""``ratelab run --ui``: Locust's web UI on loopback, driven over HTTP as a person's browser
would (the page, its stats JSON, its Start and Stop buttons), and how such a run ends."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.loadtests.runs import ROOT, SCENARIOS, arm, descendants, summary, survivors


class UiRun:
    """A ``ratelab run --ui`` in a subprocess and the web UI's URL it announced."""

    def __init__(self, out: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "loadtests.cli", "run", str(SCENARIOS / "quickstart.yaml"),
               "--ui", "--web-port", "0", "--out", str(out), "--no-progress", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # the first line names the UI's address
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert found, line
        self.url = found.group(0).rstrip("/")

    def get(self, path: str) -> tuple[int, str]:
        """GET ``path``: status and body."""
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return resp.status, resp.read().decode()

    def stats(self) -> dict[str, Any]:
        """The UI's stats JSON (what its charts and tables poll)."""
        return dict(json.loads(self.get("/stats/requests")[1]))

    def post(self, path: str, form: dict[str, str]) -> dict[str, Any]:
        """POST a form as the UI's buttons do; the JSON reply."""
        data = urllib.parse.urlencode(form).encode()
        with urllib.request.urlopen(self.url + path, data=data, timeout=10) as resp:
            body = resp.read().decode()
        return dict(json.loads(body)) if body.strip() else {}

    def wait_ready(self, workers: int = 0, timeout_s: float = 60) -> str:
        """Wait until the page is served (and ``workers`` have connected); the page's HTML."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:   # say why: its stderr (the UI's page is gone)
                assert self.proc.stderr is not None
                raise AssertionError("ratelab run exited before the UI came up "
                                     f"(status {self.proc.returncode}): "
                                     f"{self.proc.stderr.read()[-2000:]}")
            try:
                status, page = self.get("/")
                if status == 200 and self.stats().get("worker_count", 0) >= workers:
                    return page
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError("the web UI did not come up")

    def requests_counted(self) -> int:
        """Requests the UI's statistics hold under the ``REQ`` type."""
        return sum(int(row["num_requests"]) for row in self.stats()["stats"]
                   if row["method"] == "REQ")

    def wait_requests(self, n: int, timeout_s: float = 60) -> None:
        """Wait until the UI's statistics count ``n`` requests (the swarm is running)."""
        deadline = time.monotonic() + timeout_s
        while self.requests_counted() < n:
            assert time.monotonic() < deadline, f"fewer than {n} requests in {timeout_s} s"
            time.sleep(0.3)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def ui_runs() -> Iterator[list[UiRun]]:
    runs: list[UiRun] = []
    yield runs
    for run in runs:
        run.close()


def test_ui_start_then_ctrl_c_writes_a_partial_summary_and_leaves_no_orphans(
        tmp_path: Path, ui_runs: list[UiRun]) -> None:
    out = tmp_path / "ui-int"
    ui = UiRun(out, "--processes", "2")
    ui_runs.append(ui)
    page = ui.wait_ready(workers=2)
    assert "Locust" in page
    before = ui.stats()
    assert before["state"] == "ready" and before["user_count"] == 0
    assert ui.requests_counted() == 0  # nothing runs until the swarm is started
    started = ui.post("/swarm", {"user_count": "1", "spawn_rate": "1"})
    assert started["success"] is True and "ScenarioShape" in started["message"]
    ui.wait_requests(20)
    running = ui.stats()
    assert running["state"] in ("spawning", "running")
    # a batch-job user per worker: the scenario, not the form, sets the users
    assert running["user_count"] == 2
    children = descendants(ui.proc.pid)
    assert len(children) >= 3  # Locust's master and its two workers
    ui.proc.send_signal(signal.SIGINT)
    assert ui.proc.wait(60) == 130
    s = summary(out)
    a = arm(s, "batched")
    assert s["partial"] is True and s["stopped"] == "interrupted"
    assert 0 < a["items"]["done"] < 20000 and a["items"]["lost"] == 0
    assert a["items"]["done"] + a["items"]["pending"] == 20000
    assert (out / "locust_stats.csv").is_file()  # Locust saved its reports as it quit
    assert survivors(children) == []


def test_ui_run_starts_its_clock_at_start_and_ends_when_its_load_is_over(
        tmp_path: Path, ui_runs: list[UiRun]) -> None:
    out = tmp_path / "ui-done"
    # 300 virtual seconds at time_scale 60 last 5 wall seconds: waiting 6 s before Start
    # would leave no time at all if the clock had started when Locust loaded the run
    ui = UiRun(out, "--items", "4000", "--duration-s", "300")
    ui_runs.append(ui)
    ui.wait_ready()
    time.sleep(6)
    assert ui.requests_counted() == 0
    assert ui.post("/swarm", {})["success"] is True
    status = ui.proc.wait(90)  # no Ctrl-C: the run ends with its load
    s = summary(out)
    a = arm(s, "batched")
    assert s["partial"] is False and s["stopped"] is None
    # 1 only if an expectation failed (efficiency follows the machine's load)
    assert status == (0 if s["ok"] else 1)
    assert a["items"]["done"] == 4000 and a["items"]["lost"] == 0
    assert a["duration_s"] < 300
    rows = {(r["Type"], r["Name"]): r for r in _csv_rows(out / "locust_stats.csv")}
    assert int(rows[("REQ", "batched")]["Request Count"]) == a["requests"]["ok"]
    assert int(rows[("ITEM", "batched:done")]["Request Count"]) == 4000


def test_ui_stop_ends_the_run_early_as_partial(tmp_path: Path, ui_runs: list[UiRun]) -> None:
    out = tmp_path / "ui-stop"
    ui = UiRun(out)
    ui_runs.append(ui)
    ui.wait_ready()
    assert ui.post("/swarm", {})["success"] is True
    ui.wait_requests(20)
    ui.post("/stop", {})
    assert ui.proc.wait(60) == 130
    s = summary(out)
    a = arm(s, "batched")
    assert s["partial"] is True and s["stopped"] == "ui_stop"
    assert 0 < a["items"]["done"] < 20000 and a["items"]["lost"] == 0
    assert a["items"]["done"] + a["items"]["pending"] == 20000


def test_ui_refuses_a_run_it_cannot_drive(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.cli", "run", str(SCENARIOS / "slo-search.yaml"),
         "--ui", "--out", str(tmp_path / "never")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "load.slo_search: --ui drives one swarm" in proc.stderr
    assert not (tmp_path / "never").exists()


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))
