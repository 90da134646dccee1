"""The report: every plot embedded as a non-empty PNG; the first paragraph matches summary.json."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from reports.report import fmt_hours, fmt_int, fmt_pct, fmt_usd, headline, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("throughput", "tokens", "latency", "errors", "cost", "arms", "sweep")


def test_html_embeds_every_plot_as_png(run_dir: Path) -> None:
    md, html = write_report(run_dir)
    page = html.read_text()
    found = dict(
        re.findall(r"id='plot-(\w+)'[^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    )
    assert set(found) == set(PLOTS)
    for key in PLOTS:
        png = base64.b64decode(found[key])
        assert png.startswith(PNG_MAGIC) and len(png) > 5000, key
    assert "src='http" not in page and "<script" not in page  # self-contained
    assert md.read_text().startswith("# ratelab report: synthetic")


def test_first_paragraph_matches_summary(run_dir: Path) -> None:
    _, html = write_report(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    lead = re.search(r"<p class='lead' id='lead'>(.*?)</p>", html.read_text()).group(1)  # type: ignore[union-attr]
    arm = summary["arms"][0]
    assert arm["name"] == "batched"
    for figure in (
        fmt_int(arm["throughput"]["items_per_min"]),  # how fast
        fmt_int(arm["bound"]["items_per_min"]),
        fmt_pct(arm["bound"]["efficiency"]),
        f"the <b>{arm['bound']['binding']}</b> limit binds",  # which limit
        fmt_usd(arm["cost_usd"]["per_item"]),  # how much
        fmt_hours(arm["projection"]["duration_s"]),
        fmt_usd(arm["projection"]["cost_usd"]),
        f"about {fmt_int(arm['projection']['needed_tpm'])} TPM or "
        f"{arm['projection']['needed_keys']} keys",  # what to change
    ):
        assert figure in lead, figure
    assert "3,580 items/min" in lead and "9.3 h" in lead and "3 keys" in lead


def test_stage_and_projection_tables(run_dir: Path) -> None:
    md, _ = write_report(run_dir)
    text = md.read_text()
    assert "## Stages" in text and "| stage1 |" in text
    assert "## Projection" in text and "## Sweep of batch_size" in text
    assert "The knee is at 20" in text


def test_markdown_shows_the_plots_written_beside_it(run_dir: Path) -> None:
    md, _ = write_report(run_dir)
    text = md.read_text()
    linked = re.findall(r"!\[[^\]]+\]\((plot-\w+\.png)\)", text)
    assert linked == [f"plot-{key}.png" for key in PLOTS]
    for name in linked:
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_a_rate_above_the_bound_without_a_steady_state_is_explained(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    arm = summary["arms"][0]
    assert "never reached a steady state" not in headline(summary)  # steady, under the bound
    # a 86-second job at 122% of the bound: the limit window's first, empty minute
    arm["bound"]["efficiency"] = 1.22
    arm["duration_s"] = 86.3
    arm["throughput"]["steady_items_per_min"] = None
    assert ("limit binds (above the bound because the job, 86 s, never reached a steady "
            "state: it ran on the limit window's first, empty minute, and a longer job "
            "settles at or below the bound).") in headline(summary)


def test_a_whole_run_rate_above_the_bound_gives_the_steady_rate(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    arm = summary["arms"][0]
    assert "steady rate" not in headline(summary)  # under the bound
    # a 5-minute job at 106% over the whole run: the first minute's burst
    arm["bound"]["efficiency"] = 1.06
    arm["bound"]["items_per_min"] = 3422.0
    arm["throughput"]["steady_items_per_min"] = 3360.0
    assert ("limit binds (above the bound because the whole run began on the limit "
            "window's first, empty minute; its steady rate was 3,360 items/min, 98% of the "
            "bound).") in headline(summary)


def test_a_rate_above_the_bound_from_the_result_cache_is_explained(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    arm = summary["arms"][0]
    # seed-002's live run: 39% of the items answered by the cache, 129% of a latency bound
    arm["bound"].update(items_per_min=3130.6, efficiency=1.2945, binding="latency")
    arm["items"].update(done=5999, cached=2321)
    arm["throughput"].update(items_per_min=4052.7, steady_items_per_min=None)
    arm["duration_s"] = 88.8
    assert ("limit binds (above the bound because 2,321 items (39%) came from the result "
            "cache without a request, and the bound counts items sent: 2,485 items/min were "
            "sent, 79% of the bound).") in headline(summary)
    # a latency bound has no window to start empty: nothing else is claimed
    arm["items"]["cached"] = 0
    assert "(above the bound" not in headline(summary)
    # a window bound, the cache and a short job: both reasons
    arm["bound"]["binding"] = "tpm"
    arm["items"]["cached"] = 500
    assert ("limit binds (above the bound because 500 items (8%) came from the result cache "
            "without a request, and the bound counts items sent: 3,715 items/min were sent, "
            "119% of the bound; and the job, 89 s, never reached a steady state") in (
                headline(summary))


def test_chats_cost_per_request_and_gateway_callers_what_the_provider_charged(
        run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["arms"] = summary["arms"][:1]
    arm = summary["arms"][0]
    arm["items"]["total"] = 0
    arm["bound"]["items_per_min"] = None
    arm["projection"]["duration_s"] = None
    arm["cost_usd"].update(total=2.0844621, per_item=None, per_request=0.0001275056)
    assert "It cost **USD 0.0001275 per request** (USD 2.08 in all)." in headline(summary)
    # seed-003's queue pattern: callers pay nothing themselves; the gateway's key does
    arm["cost_usd"].update(total=0.0, per_request=0.0)
    summary["gateway"] = {"tasks": {"by_state": {"done": 4840}},
                          "provider": {"name": "paid", "spent_usd": 0.6171}}
    assert ("Through the gateway, the provider charged **USD 0.0001275 per task done** "
            "(USD 0.62 in all).") in headline(summary)


def test_the_deadline_advice_says_why_more_tpm_is_not_enough(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    proj = summary["arms"][0]["projection"]
    proj.update(meets_deadline=False, needed_tpm=None, needed_keys=3,
                other_limit={"binding": "latency", "items_per_min": 6261.4})
    assert ("To finish in 4.0 h you need 3 keys (more TPM alone would stop at the latency "
            "limit, 6,261 items/min).") in headline(summary)


def test_a_partial_run_says_why_it_stopped(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(partial=True, stopped="spend_cap", mode="live")
    assert headline(summary).startswith(
        "Scenario synthetic (live, partial: stopped at the spend cap, the requests in flight "
        "finishing): arm")
    summary["stopped"] = None
    assert headline(summary).startswith("Scenario synthetic (live, partial): arm")


def test_a_job_that_stopped_early_says_why(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    arm = summary["arms"][0]
    assert "stopped early" not in headline(summary)
    arm["job_stop"] = {"exit_status": 6, "reason": "spend cap USD 0.05 reached: USD 0.049869 "
                       "spent; the items left are pending"}
    assert (" Its job stopped early (client exit status 6): spend cap USD 0.05 reached: USD "
            "0.049869 spent; the items left are pending. It cost") in headline(summary)
