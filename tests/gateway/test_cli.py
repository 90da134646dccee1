"""``ratelab gateway`` as a real process: serves, answers, stops on SIGINT or SIGTERM (even
when started with SIGINT ignored); bad config -> 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from loadtests.cli import build_parser, main


def test_help_lists_the_flags() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["gateway"].format_help()  # type: ignore[index]
    for flag in ("--config", "--port", "--host", "--redis", "--workers", "--db"):
        assert flag in text


def test_bad_config_exits_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("upstreams: []\n")
    assert main(["gateway", "--config", str(path)]) == 2
    assert "gw.yaml: upstreams: expected a non-empty list" in capsys.readouterr().err


def test_an_upstream_without_its_scheme_exits_2(capsys) -> None:
    assert main(["gateway", "--upstream", "127.0.0.1:18000"]) == 2
    assert capsys.readouterr().err.endswith(
        "--upstream: expected an http(s) URL, got '127.0.0.1:18000'\n")


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_a_port_out_of_range_exits_2(port: str, capsys) -> None:
    assert main(["gateway", "--port", port]) == 2
    assert f"--port: expected 0 to 65535, got {port}" in capsys.readouterr().err


def test_a_bad_redis_url_or_task_store_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["gateway", "--port", "0", "--redis", "localhost:6379"]) == 2
    assert "--redis: expected a redis://" in capsys.readouterr().err
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("not a database\n")
    assert main(["gateway", "--port", "0", "--db", str(not_sqlite)]) == 2
    assert f"--db {not_sqlite}: cannot open the task store" in capsys.readouterr().err
    assert not_sqlite.read_text() == "not a database\n"


def _ignoring_sigint() -> None:
    # as a background job of a non-interactive shell starts: SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(("sig", "status", "start"), [
    (signal.SIGINT, 130, None), (signal.SIGTERM, 143, None),
    (signal.SIGINT, 130, _ignoring_sigint)])
def test_serves_until_interrupted(sim_thread, tmp_path: Path, sig: signal.Signals, status: int,
                                  start: Callable[[], None] | None) -> None:
    sim = sim_thread(time_scale=20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.cli", "gateway", "--port", "0", "--upstream",
         sim.base_url(), "--db", str(tmp_path / "gw.db"), "--workers", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=start)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ratelab gateway on http://127.0.0.1:"), line
        url = line.split()[3]
        body = json.dumps({"user": "ann", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 5}).encode()
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=20) as r:
            assert json.loads(r.read())["object"] == "chat.completion"
    finally:
        proc.send_signal(sig)
        code = proc.wait(timeout=20)
    assert code == status
