"""The CI gate: pass, regression and bad-input exit codes; JUnit, Markdown; baseline update."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from reports import compare, gate
from tests.reports.synthetic import build_run


def args(summary: Path, baseline: Path, **kw: object) -> argparse.Namespace:
    base = {
        "summary": str(summary),
        "baseline": str(baseline),
        "junit": None,
        "markdown": None,
        "update_baseline": False,
    }
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    run, _ = build_run(tmp_path / "base")
    path = tmp_path / "baselines" / "synthetic.json"
    assert gate.main(args(run / "summary.json", path, update_baseline=True)) == 0
    return path


def test_update_baseline_writes_the_default_figures(baseline: Path) -> None:
    data = json.loads(baseline.read_text())
    assert data["schema"] == "ratelab.baseline/1"
    assert set(data["figures"]) == {
        f"{arm}.{fig}"
        for arm in ("batched", "single")
        for fig in (
            "throughput.items_per_min",
            "tokens.per_item",
            "items.per_request",
            "requests.rate_429",
        )
    }
    assert data["figures"]["batched.items.per_request"]["value"] == 20.0
    assert data["figures"]["batched.requests.rate_429"]["abs_tolerance"] == 0.01


def test_same_run_passes(
    tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = build_run(tmp_path / "again")
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    assert gate.main(args(run, baseline, junit=str(junit), markdown=str(md))) == 0
    out = capsys.readouterr().out
    assert "batched.throughput.items_per_min" in out and "ratelab gate: ok" in out
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests") or 0) == 10
    assert "all figures hold" in md.read_text()


def test_smaller_batches_fail_the_gate(
    tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = build_run(tmp_path / "b10", batch=10)
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    assert gate.main(args(run, baseline, junit=str(junit), markdown=str(md))) == 1
    err = capsys.readouterr().err
    assert "batched.items.per_request (10 vs 20, tolerance 2%)" in err
    assert "batched.throughput.items_per_min" in err and "batched.tokens.per_item" in err
    failures = [c.get("name") for c in ET.parse(junit).getroot() if c.find("failure") is not None]
    assert "batched.items.per_request" in failures
    assert "**REGRESSION**" in md.read_text()


def test_429s_fail_the_gate(tmp_path: Path, baseline: Path) -> None:
    run, _ = build_run(tmp_path / "throttle-off", every_429=10)  # 10% of requests 429
    assert gate.main(args(run, baseline)) == 1


def test_bad_input_exits_2(tmp_path: Path, baseline: Path) -> None:
    run, _ = build_run(tmp_path / "ok")
    assert gate.main(args(tmp_path / "missing.json", baseline)) == 2
    (tmp_path / "junk.json").write_text("{not json")
    assert gate.main(args(tmp_path / "junk.json", baseline)) == 2
    (tmp_path / "other.json").write_text(json.dumps({"schema": "ratelab.summary/1"}))
    assert gate.main(args(tmp_path / "other.json", baseline)) == 2
    bad = tmp_path / "bad-baseline.json"
    bad.write_text(json.dumps({"schema": "ratelab.baseline/1", "figures": {"x.y": {"value": "3"}}}))
    assert gate.main(args(run, bad)) == 2
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"schema": "\xff"}')
    assert gate.main(args(binary, baseline)) == 2
    assert gate.main(args(run, binary)) == 2


@pytest.mark.parametrize("change, message", [
    ({"tolerance": float("nan")},
     "figures.batched.items.per_request.tolerance: expected a finite number >= 0"),
    ({"abs_tolerance": float("inf")},
     "figures.batched.items.per_request.abs_tolerance: expected a finite number >= 0"),
    ({"value": float("nan")},
     'figures.batched.items.per_request: expected {"value": finite number, ...}'),
    ({"value": True}, 'figures.batched.items.per_request: expected {"value": finite number, ...}'),
])
def test_a_baseline_that_cannot_fail_exits_2(
    tmp_path: Path, baseline: Path, change: dict[str, object], message: str,
    capsys: pytest.CaptureFixture[str]
) -> None:
    # NaN passes every comparison: as a tolerance or a value it would pass any run
    run, _ = build_run(tmp_path / "b10", batch=10)
    data = json.loads(baseline.read_text())
    data["figures"]["batched.items.per_request"].update(change)
    odd = tmp_path / "odd-baseline.json"
    odd.write_text(json.dumps(data))
    assert gate.main(args(run, odd)) == 2
    assert capsys.readouterr().err == f"ratelab gate: {odd}: {message}\n"


def test_a_figure_that_is_not_a_number_fails_the_gate(
    tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = build_run(tmp_path / "nan")
    summary = json.loads((run / "summary.json").read_text())
    arm = next(a for a in summary["arms"] if a["name"] == "batched")
    arm["items"]["per_request"] = float("nan")
    (run / "summary.json").write_text(json.dumps(summary))
    assert gate.main(args(run, baseline)) == 1
    assert "batched.items.per_request" in capsys.readouterr().err


def test_a_baseline_of_another_scenario_exits_2(
    tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # its figures would all read as missing: regressions that are not
    run, _ = build_run(tmp_path / "ok")
    data = json.loads(baseline.read_text())
    other = tmp_path / "other-baseline.json"
    other.write_text(json.dumps({**data, "scenario": "ci-gate"}))
    summary = json.loads((run / "summary.json").read_text())
    assert gate.main(args(run, other)) == 2
    assert capsys.readouterr().err == (
        f"ratelab gate: {other}: a baseline of scenario 'ci-gate', and {run} a run of "
        f"{summary['scenario']!r}\n")


def test_compare_prints_the_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = build_run(tmp_path / "a")
    b, _ = build_run(tmp_path / "b", batch=10)
    assert compare.main(argparse.Namespace(run_a=str(a), run_b=str(b))) == 0
    out = capsys.readouterr().out
    assert "arm batched" in out and "items/request" in out and "-50.0%" in out
    assert compare.main(argparse.Namespace(run_a=str(a), run_b=str(tmp_path / "nope"))) == 2


@pytest.mark.parametrize(("change", "why"), [({"ok": False}, "failed its expect: checks"),
                                            ({"partial": True}, "is partial")])
def test_a_baseline_is_not_taken_from_a_broken_run(
        tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str],
        change: dict[str, bool], why: str) -> None:
    run, _ = build_run(tmp_path / "broken")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, **change}))
    before = baseline.read_text()
    assert gate.main(args(run / "summary.json", baseline, update_baseline=True)) == 2
    assert capsys.readouterr().err == (
        f"ratelab gate: {run / 'summary.json'}: the run {why}; a baseline is taken only from "
        "a run that passed: fix the run, then update\n")
    assert baseline.read_text() == before
