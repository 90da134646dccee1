"""Run folders built with the real Recorder from synthetic, seeded events (no live run)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from loadtests.bound import BoundInputs
from loadtests.recorder import ArmInfo, Event, Recorder, write_timeseries_csv
from reports.summary import write_summary

TPM = 200_000


def arm_events(
    arm: str,
    batch: int,
    items: int,
    tokens_per_request: int,
    rate_limit_tpm: float,
    seed: int,
    every_429: int = 0,
    stage_every_s: float | None = None,
) -> list[Event]:
    """A TPM-paced arm: requests of ``batch`` items spaced so tokens stay at the limit."""
    rng = random.Random(seed)
    gap = tokens_per_request * 60.0 / rate_limit_tpm
    events: list[Event] = []
    t = 0.0
    done = 0
    n = 0
    while done < items:
        n += 1
        t += gap
        latency = 0.8 + rng.random() * 0.4
        stage = f"stage{int(t // stage_every_s) + 1}" if stage_every_s else None
        if every_429 and n % every_429 == 0:
            events.append(
                Event(
                    t=t,
                    kind="request",
                    arm=arm,
                    outcome="http_429",
                    status=429,
                    latency_s=0.01,
                    items=batch,
                    stage=stage,
                )
            )
            continue
        k = min(batch, items - done)
        events.append(
            Event(
                t=t,
                kind="request",
                arm=arm,
                outcome="ok",
                status=200,
                latency_s=latency,
                ttft_s=latency / 2,
                tokens_in=tokens_per_request - 5 * k,
                tokens_out=5 * k,
                items=k,
                items_ok=k,
                cost_usd=1e-4 * k,
                retry=False,
                stage=stage,
            )
        )
        events.append(Event(t=t, kind="item", arm=arm, outcome="done", items=k, stage=stage))
        done += k
    return events


def build_run(
    tmp: Path, *, batch: int = 20, every_429: int = 0, sweep: bool = False, stages: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Write a run folder (summary.json, timeseries.csv) of a two-arm scenario."""
    arms = [
        ArmInfo(
            "batched",
            "semantic_batch",
            2000,
            BoundInputs(700, batch, 15, 5, 1.0, tpm=TPM, rpm=500, client_concurrency=8),
            thresholds={"min_items_per_min": 3000.0, "max_429_rate": 0.05},
            sweep_value=20.0 if sweep else None,
        ),
        ArmInfo(
            "single",
            "single",
            300,
            BoundInputs(700, 1, 15, 15, 1.0, tpm=TPM, rpm=500, client_concurrency=8),
            sweep_value=1.0 if sweep else None,
        ),
    ]
    rec = Recorder(
        "synthetic",
        "plan",
        arms,
        bucket_s=5.0,
        meta={"sweep_key": "batch_size"} if sweep else None,
        tolerances={"batched.throughput.items_per_min": 0.03},
    )
    rec.add_many(
        arm_events(
            "batched",
            batch,
            2000,
            700 + batch * 20,
            TPM,
            seed=1,
            every_429=every_429,
            stage_every_s=10.0 if stages else None,
        )
    )
    rec.add_many(arm_events("single", 1, 300, 730, TPM, seed=2))
    summary = rec.summary()
    tmp.mkdir(parents=True, exist_ok=True)
    write_summary(summary, tmp / "summary.json")
    write_timeseries_csv(rec.timeseries_rows(), tmp / "timeseries.csv")
    return tmp, json.loads((tmp / "summary.json").read_text())
