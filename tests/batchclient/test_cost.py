"""Cost meter: charge headers, price-table fallback, per model/task totals, low balance."""

from batchclient.config import Price
from batchclient.cost import CostMeter
from batchclient.policy.wire import Usage
from batchclient.progress import ProgressSnapshot, render


def test_headers_win_over_the_price_table_and_totals_are_tagged() -> None:
    meter = CostMeter({"p": {"m": Price(1.0, 2.0)}})
    assert meter.charge("p", "m", "t", {"x-mdb-charged-usd": "0.5"}, Usage(10, 10)) == 0.5
    assert meter.charge("p", "m", "t", {}, Usage(1_000_000, 500_000)) == 2.0
    assert meter.charge("p", "cheap", "u", {}, Usage(10, 10)) == 0.0
    assert meter.total_usd == 2.5 and meter.by_model == {"m": 2.5, "cheap": 0.0}
    assert meter.by_task == {"t": 2.5, "u": 0.0}


def test_low_balance_fires_once_per_crossing() -> None:
    meter = CostMeter(low_balance_usd=1.0)
    meter.charge("p", "m", "t", {"x-mdb-balance-usd": "5"}, None)
    assert not meter.low_balance_crossed()
    meter.charge("p", "m", "t", {"x-mdb-balance-usd": "0.9"}, None)
    assert meter.low_balance_crossed() and not meter.low_balance_crossed()
    meter.charge("p", "m", "t", {"x-mdb-balance-usd": "10"}, None)  # topped up
    assert not meter.low_balance_crossed()
    meter.charge("p", "m", "t", {"x-mdb-balance-usd": "0.5"}, None)
    assert meter.low_balance_crossed()


def test_progress_line() -> None:
    line = render(ProgressSnapshot(elapsed_s=60.0, done=500, dead=0, total=1000,
                                   tokens=150_000, cost_usd=0.25, tpm_limit=200_000,
                                   rate_limited=2), width=10)
    assert line == ("[#####.....] 500/1000 done 0 dead | 500 items/min | 150,000 tok/min of "
                    "200,000 (75%) | 429s 2 | $0.2500 | ETA 1:00")


def test_progress_line_of_a_resumed_job_counts_earlier_runs_apart_from_its_rate() -> None:
    # 600 settled before (598 done, 2 dead), 200 of the 400 left done in this run's minute
    line = render(ProgressSnapshot(elapsed_s=60.0, done=200, dead=0, total=400, tokens=6_000,
                                   cost_usd=0.01, done_before=598, dead_before=2), width=10)
    assert line == ("[########..] 798/1000 done 2 dead (600 before) | 200 items/min | "
                    "6,000 tok/min | 429s 0 | $0.0100 | ETA 1:00")


def test_progress_line_says_when_every_provider_waits_out_a_429() -> None:
    line = render(ProgressSnapshot(elapsed_s=60.0, done=0, dead=0, total=100, tokens=0,
                                   cost_usd=0.0, rate_limited=3, paused_s=3 * 3600 + 125.0),
                  width=10)
    assert line.endswith("| 429s 3 | $0.0000 | ETA --:-- | paused 3:02:05 on a 429's "
                         "retry-after")
    assert "paused" not in render(ProgressSnapshot(60.0, 0, 0, 100, 0, 0.0, paused_s=0.5))


def test_the_eta_of_a_paused_job_counts_the_pause() -> None:
    # 100 of 200 items in a minute, then a day's retry-after: the rest is a minute after it
    line = render(ProgressSnapshot(60.0, 100, 0, 200, 0, 0.0, paused_s=86_400.0), width=10)
    assert line.endswith("| ETA 24:01:00 | paused 24:00:00 on a 429's retry-after")


def test_no_rate_is_given_over_less_than_a_virtual_second() -> None:
    # 20 items answered 5 ms into the job: not 240,000 items/min
    early = ProgressSnapshot(0.005, 20, 0, 200, 3_000, 0.0, tpm_limit=1_000_000)
    assert (early.items_per_min, early.tokens_per_min, early.eta_s) == (0.0, 0.0, None)
    assert "| 0 items/min | 0 tok/min of 1,000,000 (0%) |" in render(early)
