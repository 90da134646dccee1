"""Write a plan's run folder: the same ``summary.json`` (mode ``plan``), ``timeseries.csv``,
``report.md`` and ``report.html`` as ``ratelab run``, plus the planner's own section
(capacity answers, offline alternative, optimal batch size, sweep grid) in both reports."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loadtests.planner.sim import PlanResult
from loadtests.planner.sweep import SWEEP_HEADERS, sweep_table
from loadtests.recorder import write_timeseries_csv
from reports.report import fmt_hours, fmt_usd, inline_html, write_report
from reports.summary import write_summary

__all__ = ["planner_lines", "write_run_folder"]


def planner_lines(summary: Mapping[str, Any]) -> list[str]:
    """The planner's section of the report, as Markdown lines."""
    plan = summary.get("plan") or {}
    lines = ["", "## Planner", ""]
    lines.append(f"Planned in {plan.get('wall_s', 0):.2f} s wall time: "
                 f"{plan.get('requests', 0):,} requests, {plan.get('steps', 0):,} events.")
    offline = plan.get("offline") or {}
    if offline:
        lines += ["", "### Online with ratelab vs an offline batch API", "",
                  "| arm | online time | online cost | offline (worst) | offline cost | files "
                  "| pick |", "|---|---|---|---|---|---|---|"]
        for arm, o in offline.items():
            lines.append(f"| {arm} | {fmt_hours(o['online_duration_s'])} | "
                         f"{fmt_usd(o['online_cost_usd'])} | {fmt_hours(o['worst_duration_s'])} "
                         f"| {fmt_usd(o['cost_usd'])} | {o['files']} | {o['pick']}: {o['why']} |")
    deadline = plan.get("deadline") or {}
    for arm, answers in deadline.items():
        lines += ["", f"### To finish the projected job within "
                      f"{fmt_hours(answers['deadline_s'])} ({arm})", ""]
        for what in ("keys", "tier_tpm", "batch_size"):
            found = answers.get(what)
            if what not in answers:
                continue
            if found is None:
                lines.append(f"- {what}: no value in the searched range meets it")
            else:
                lines.append(f"- {what}: {found['value']} ({fmt_hours(found['duration_s'])}, "
                             f"{fmt_usd(found['cost_usd'])})")
    best = plan.get("batch_size") or {}
    if best.get("best"):
        b = best["best"]
        lines += ["", f"### Optimal batch size ({best['arm']})", "",
                  f"Best goodput at {b['batch_size']} items per request: "
                  f"{b['goodput_items_per_min']:,.0f} items/min.", "",
                  "| batch size | goodput items/min | retry amplification | dead-lettered |",
                  "|---|---|---|---|"]
        for p in best["points"]:
            amp = p["retry_amplification"]
            lines.append(f"| {p['batch_size']} | {p['goodput_items_per_min']:,.0f} | "
                         f"{'-' if amp is None else f'{amp:.2f}'} | {p['dead_letter']} |")
    grid = summary.get("grid") or {}
    if grid.get("rows"):
        lines += ["", "### Sweep", "", "| " + " | ".join(SWEEP_HEADERS) + " |",
                  "|" + "---|" * len(SWEEP_HEADERS)]
        lines += ["| " + " | ".join(cells) + " |" for cells in sweep_table(grid)]
    users = plan.get("users") or {}
    for group, answer in users.items():
        lines += ["", f"### Interactive users ({group})", "",
                  f"Holds {answer['users']} users before p95 latency passes "
                  f"{answer['threshold_p95_ms']:.0f} ms or the 429/error rate passes "
                  f"{answer['threshold_429_rate']:.1%}."]
        if answer.get("gpus") is not None:
            lines.append(f"GPUs for {answer['target_users']} users: {answer['gpus']}.")
    return lines


def _html(lines: list[str]) -> str:
    """The section's Markdown lines as HTML: headings, paragraphs, and each run of table
    lines as one table (its first row the header), so that its columns line up."""
    out: list[str] = []
    table: list[list[str]] = []

    def end_table() -> None:
        if table:
            head, *rows = table
            out.append("<table><tr>" + "".join(f"<th>{inline_html(c)}</th>" for c in head)
                       + "</tr>" + "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>"
                                                           for c in row) + "</tr>"
                                           for row in rows) + "</table>")
            table.clear()

    for line in lines:
        if line.startswith("|"):
            if not line.startswith("|---"):
                table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        end_table()
        if line.startswith("### "):
            out.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line:
            out.append(f"<p>{inline_html(line)}</p>")
    end_table()
    return "\n".join(out)


def write_run_folder(out: str | Path, result: PlanResult,
                     summary: Mapping[str, Any]) -> Path:
    """Write the run folder at ``out`` (created) and return its path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_summary(summary, folder / "summary.json")
    write_timeseries_csv(result.recorder.timeseries_rows(), folder / "timeseries.csv")
    md_path, html_path = write_report(folder)
    lines = planner_lines(summary)
    with md_path.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    page = html_path.read_text(encoding="utf-8")
    html_path.write_text(page.replace("</body></html>", _html(lines) + "\n</body></html>"),
                         encoding="utf-8")
    return folder
