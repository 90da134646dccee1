"""``ratelab serve``: help, configuration errors, the demo, and a real served process."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from loadtests.cli import main
from simulator.cli import _config, _replies, add_arguments
from simulator.model.profile import ResponderSpec

FLAGS = ("--config", "--host", "--port", "--rpm", "--tpm", "--concurrency", "--ttft-ms",
         "--itl-ms", "--balance-usd", "--time-scale", "--seed", "--admin-token", "--demo")
ROOT = Path(__file__).resolve().parents[2]


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in FLAGS:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(flag))
        assert len(line.split(flag, 1)[1].strip()) > 3 or flag in ("--config",), line
    assert "sk-ratelab" in out and "gpt-4o-mini" in out


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("name: x\nkeys: {sk-a: {}}\nmodels: {m: {}}\nlimits: {rpm: lots}\n", "limits.rpm"),
        ("name: x\nkeys: {sk-a: {}}\nmodels: {m: {}}\nlatency: {ttft_s: {dist: wobbly}}\n",
         "latency.ttft_s.dist"),
        ("providers: []\n", "providers"),
        # a syntax error: the line and PyYAML's problem, on one line
        ("name: x\n  keys: {}\n", "2: not valid YAML: mapping values are not allowed here"),
    ],
)
def test_config_error_is_one_line_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and key in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err
    assert "absent.yaml" in err and "Traceback" not in err


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_a_port_out_of_range_exits_2(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", port]) == 2
    assert f"--port: expected 0 to 65535, got {port}" in capsys.readouterr().err


@pytest.mark.parametrize("codes", ["A,,B", "A,A", ""])
def test_item_codes_must_be_distinct_and_present(
        codes: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--item-codes", codes]) == 2
    assert capsys.readouterr().err == (f"ratelab serve: --item-codes: expected distinct codes "
                                       f"separated by commas, got {codes!r}\n")


def test_item_codes_make_every_provider_answer_item_batches() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = _config(parser.parse_args(["--item-codes", "A, B,C"]))
    assert {(p.responder.kind, p.responder.codes) for p in cfg.providers} == {
        ("batch_json", ("A", "B", "C"))}
    assert _replies(cfg.providers[0].responder) == "batch_json, item codes A,B,C"


def test_override_flags_out_of_range_exit_2_naming_each(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--rpm", "0", "--tpm", "-5", "--time-scale", "0", "--ttft-ms",
                 "-1", "--concurrency", "2", "--balance-usd", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ratelab serve: --rpm: expected a number >= 1, got 0",
        "ratelab serve: --tpm: expected a number >= 1, got -5",
        "ratelab serve: --ttft-ms: expected a number >= 0, got -1",
        "ratelab serve: --time-scale: expected a number > 0, got 0",
    ]


def test_flags_that_are_not_finite_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--time-scale", "inf", "--balance-usd", "inf", "--itl-ms",
                 "nan"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ratelab serve: --itl-ms: expected a number >= 0, got nan",
        "ratelab serve: --balance-usd: expected a number >= 0, got inf",
        "ratelab serve: --time-scale: expected a number > 0, got inf",
    ]


def test_a_config_that_is_not_utf8_exits_2(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sim.yaml"
    path.write_bytes(b"seed: \xff\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not UTF-8 text" in err and "Traceback" not in err


def test_demo_sends_one_real_request_and_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--demo", "--ttft-ms", "0", "--itl-ms", "0", "--seed", "3",
                 "--balance-usd", "5"]) == 0
    out = capsys.readouterr().out
    assert "> POST http://127.0.0.1:" in out and "/v1/chat/completions" in out
    assert "< HTTP 200 OK" in out
    for header in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-tokens",
                   "X-MDB-Charged-USD"):
        assert header.lower() in out.lower()
    assert "X-MDB-Balance-USD: 4.99" in out
    assert "\nreply: " in out


def test_serve_process_answers_then_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.cli", "serve", "--port", "0", "--ttft-ms", "0",
         "--itl-ms", "0", "--rpm", "7"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", banner)
        assert match, banner
        # the default provider writes prose, and says so: a batch job needs batch_json
        assert proc.stdout.readline() == (
            f"  provider 'default': {match.group(1)}/v1 and {match.group(1)}/p/default/v1; "
            "replies: prose (lorem; for a batch job, serve with --item-codes)\n")
        request = urllib.request.Request(
            match.group(1) + "/v1/chat/completions",
            data=json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                             "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Authorization": "Bearer sk-ratelab", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["x-ratelimit-limit-requests"] == "7"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


@pytest.mark.parametrize(("spec", "said"), [
    (ResponderSpec(), "prose (lorem; for a batch job, serve with --item-codes)"),
    (ResponderSpec(kind="batch_json", codes=("A", "B")), "batch_json, item codes A,B"),
    (ResponderSpec(kind="echo"), "echo"),
])
def test_the_banner_says_what_each_provider_replies(spec: ResponderSpec, said: str) -> None:
    assert _replies(spec) == said
