"""Capacity answers on seeded plans: deadline needs, optimal batch size, users an H100 holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.cli import main
from loadtests.planner.batchsize import optimal_batch_size
from loadtests.planner.capacity import deadline_answers, gpus_needed, users_held
from loadtests.planner.sim import plan_scenario
from loadtests.scenario import load_scenario

HERE = Path(__file__).parent / "scenarios"
SEED_FIGURES = Path(__file__).parents[3] / "scenarios" / "seed-figures.yaml"


def test_deadline_answers_name_the_smallest_keys_tier_and_batch_size() -> None:
    scenario = load_scenario(HERE / "cap-batch.yaml")
    summary = plan_scenario(scenario).summary()
    answers = deadline_answers(scenario, summary, 1000, min_span_s=240)["batched"]
    assert answers["deadline_s"] == 5400.0
    assert answers["meets_now"] is False
    keys, tier, size = answers["keys"], answers["tier_tpm"], answers["batch_size"]
    assert keys["value"] == 2 and round(keys["duration_s"]) == 3672
    assert tier["value"] == 200_000 and round(tier["duration_s"]) == 1811
    assert size["value"] == 40 and round(size["duration_s"]) == 5109
    assert size["cost_usd"] == pytest.approx(0.8513, abs=1e-4)


def test_optimal_batch_size_counts_truncation_growing_with_the_batch() -> None:
    scenario = load_scenario(HERE / "cap-batch.yaml")
    answer = optimal_batch_size(scenario, "batched", sizes=(10, 20, 40, 80),
                                sample_items=1000, min_span_s=240)
    points = {p["batch_size"]: p for p in answer["points"]}
    assert [round(p["goodput_items_per_min"]) for p in answer["points"]] == [527, 964, 1184,
                                                                             1569]
    # more items per reply: more of them lost to cuts and sent again
    assert (points[10]["retry_amplification"] < points[40]["retry_amplification"]
            < points[80]["retry_amplification"])
    assert answer["best"]["batch_size"] == 80


def test_one_h100_holds_the_articles_30_to_50_users() -> None:
    scenario = load_scenario(SEED_FIGURES)
    answer = users_held(scenario, "h100-users", max_p95_ms=12_000, max_429_rate=0.01)
    assert answer["users"] == 45
    assert round(answer["figures"]["p95_ms"]) == 11863
    assert gpus_needed(answer["users"], 200) == 5
    assert gpus_needed(0, 10) is None


def test_cli_prints_the_capacity_answers(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["plan", str(HERE / "cap-batch.yaml"), "--items", "1000", "--capacity",
                   "--sample-items", "1000", "--sample-span-s", "240",
                   "--out", str(tmp_path / "run")])
    assert status == 0
    out = capsys.readouterr().out
    assert ("the smallest change meeting it: 2 keys; 200,000 TPM; 40 items a request"
            in out)
    assert "optimal batch size: 80" in out
