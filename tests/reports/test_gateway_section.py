"""The report's gateway section from gateway figures: polling against subscribing callers,
queue depth per lane as a table and as a plot embedded in report.html and beside report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.config import default_config
from loadtests.gateway_figures import Admitted, gateway_figures
from reports.gateway_section import gateway_blocks, queue_depth_plot
from reports.report import write_report
from tests.reports.synthetic import build_run

PNG = b"\x89PNG"


def _gateway() -> dict[str, Any]:
    """Gateway figures of a small made-up run: two pollers, one subscriber, a backlog."""
    cfg = default_config()
    admitted = [Admitted(f"t{i}", f"u{i % 3}", "free", "interactive", 50, 10.0 * i,
                         10.0 * i + 2.0, "done") for i in range(6)]
    lines = [{"id": f"t{i}", "user": f"u{i % 3}", "tier": "free", "lane": "interactive",
              "status": 202, "enqueue_ms": 3.0, "t_send": 10.0 * i,
              "t_final": 10.0 * i + (2.1 if i % 3 == 2 else 3.0),
              "results": "subscribe" if i % 3 == 2 else "poll"} for i in range(6)]
    depths = [(2.5 * i, {"interactive": i % 3, "batch": 20 - i, "background": 0,
                         "shared": 0}) for i in range(20)]
    return gateway_figures(lines, admitted, cfg, depths=depths,
                           provider={"name": "p", "rpm_limit": 100, "tpm_limit": None,
                                     "requests": {"200": 6}, "http_429": 0,
                                     "busiest_60s_requests": 6, "within_limit": True},
                           backend="sqlite", processes=1, job_user=None)


def test_blocks_show_modes_and_depth_per_lane() -> None:
    blocks = gateway_blocks({"gateway": _gateway()})
    tables = {b[1][0]: b[2] for b in blocks if b[0] == "table"}
    modes = {row[0]: row for row in tables["callers"]}
    assert set(modes) == {"polling", "subscribing (SSE)"}
    assert modes["polling"][1:3] == ("2", "4")           # users, tasks
    assert modes["subscribing (SSE)"][1:3] == ("1", "2")
    # the caller saw its result 1.0 s (polling) and 0.1 s (subscribing) after the gateway
    assert modes["polling"][8] == "1.00" and modes["subscribing (SSE)"][8] == "0.10"
    lanes = {row[0]: row for row in tables["lane"]}
    assert lanes["background"][1] == "20" and lanes["interactive"][1] == "2"


def test_queue_depth_plot_only_with_samples() -> None:
    png = queue_depth_plot({"gateway": _gateway()})
    assert png is not None and png.startswith(PNG)
    assert queue_depth_plot({"gateway": {"queue_depth": {"t_s": []}}}) is None
    assert queue_depth_plot({}) is None


def test_report_embeds_the_queue_depth_plot(tmp_path: Path) -> None:
    run_dir, summary = build_run(tmp_path / "run")
    summary["gateway"] = _gateway()
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    md, html = write_report(run_dir)
    assert "![Gateway queue depth over time](plot-gateway-queue-depth.png)" in md.read_text()
    assert (run_dir / "plot-gateway-queue-depth.png").read_bytes().startswith(PNG)
    assert "id='plot-gateway-queue-depth'" in html.read_text()
