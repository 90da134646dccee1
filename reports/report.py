"""The capacity report: ``report.md`` and one self-contained ``report.html`` (plots embedded).

Written for a person who must decide: the first paragraph answers how fast, how much,
which limit binds and what to change; tables and plots follow. Built from the run folder's
``summary.json`` and ``timeseries.csv`` only.
"""

from __future__ import annotations

import base64
import csv
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reports.plots import render_all
from reports.summary import load_summary

Block = tuple[Any, ...]

ADVICE = {
    "tpm": "pack more items per request and keep the system prompt short, or buy more TPM",
    "rpm": "put more items in each request (RPM binds, not tokens)",
    "tokens_per_day": ("the key's daily token cap binds: a long job goes at its daily "
                       "average whatever the TPM; pack more items per request, add keys "
                       "or move to a tier without a daily cap"),
    "concurrency": "the provider's concurrent-request limit binds: add keys or ask for more",
    "latency": "raise the client's in-flight limit (latency over concurrency binds)",
}


# why a run stopped early (summary ``stopped``), in the first paragraph's words
STOPPED = {
    "interrupted": "interrupted",
    "ui_stop": "stopped from the web UI",
    "error_guard": "stopped by the error-rate guard",
    "spend_cap": "stopped at the spend cap, the requests in flight finishing",
    "batch_failed": "a batch slot failed",
}


def fmt_int(value: float | None) -> str:
    """``3,600`` (rounded), or ``n/a``."""
    return "n/a" if value is None else f"{round(value):,}"


def fmt_usd(value: float | None) -> str:
    """``USD 41.20`` for amounts of a cent or more, else four significant digits."""
    if value is None:
        return "n/a"
    if abs(value) >= 0.01 or value == 0:
        return f"USD {value:,.2f}"
    return f"USD {value:.4g}"


def fmt_hours(seconds: float | None) -> str:
    """``9.3 h`` (or days past 48 h)."""
    if seconds is None:
        return "n/a"
    hours = seconds / 3600.0
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"


def fmt_pct(value: float | None) -> str:
    """``87%``."""
    return "n/a" if value is None else f"{value * 100:.0f}%"


def fmt_ms(value: float | None) -> str:
    """``1,234 ms``."""
    return "n/a" if value is None else f"{value:,.0f} ms"


def lead_arm(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """The arm the first paragraph is about: the fastest batch arm, else the first arm."""
    arms = summary["arms"]
    batch = [a for a in arms if a.get("items", {}).get("total")]
    if batch:
        return max(batch, key=lambda a: a["throughput"]["items_per_min"] or 0.0)
    first: Mapping[str, Any] = arms[0]
    return first


def what_to_change(arm: Mapping[str, Any]) -> str:
    """One or two sentences of advice from the binding limit, efficiency and the deadline."""
    bound = arm["bound"]
    proj = arm["projection"]
    parts = []
    binding = bound.get("binding")
    if binding:
        parts.append(f"To go faster, {ADVICE[binding]}.")
    eff = bound.get("efficiency")
    if eff is not None and eff < 0.8:
        parts.append(
            f"The client reaches only {fmt_pct(eff)} of the bound "
            f"(429 rate {fmt_pct(arm['requests']['rate_429'])}): check its throttle and retries."
        )
    if proj.get("duration_s") is not None:
        deadline = fmt_hours(proj["deadline_s"])
        if proj.get("meets_deadline"):
            parts.append(f"It finishes within the {deadline} deadline as it is.")
        else:
            need = []
            if proj.get("needed_tpm") is not None:
                need.append(f"about {fmt_int(proj['needed_tpm'])} TPM")
            if proj.get("needed_keys") is not None:
                keys = proj["needed_keys"]
                need.append(f"{keys} key{'s' if keys != 1 else ''}")
            if need:
                text = f"To finish in {deadline} you need {' or '.join(need)}"
                other = proj.get("other_limit")
                if other is not None and proj.get("needed_tpm") is None:
                    # more TPM is the obvious wish; say why it is not on the list
                    text += (f" (more TPM alone would stop at the {other['binding']} limit, "
                             f"{fmt_int(other['items_per_min'])} items/min)")
                parts.append(text + ".")
    return " ".join(parts)


def _above_bound(arm: Mapping[str, Any]) -> str:
    """Why an arm's rate above its bound is no contradiction, as a parenthesis ('' when
    it is not above, or no reason is known): items the result cache answered were never
    sent, and the first window of a TPM or RPM limit starts empty."""
    bound, tp, items = arm["bound"], arm["throughput"], arm["items"]
    if not (bound.get("efficiency") or 0) > 1:
        return ""
    reasons = []
    cached, done = items.get("cached") or 0, items.get("done") or 0
    sent_share = (done - cached) / done if done else 1.0
    sent = tp["items_per_min"] * sent_share
    if cached:
        reasons.append(
            f"{fmt_int(cached)} items ({fmt_pct(cached / done)}) came from the result cache "
            "without a request, and the bound counts items sent: "
            f"{fmt_int(sent)} items/min were sent, {fmt_pct(sent / bound['items_per_min'])} "
            "of the bound")
    # a window explains the rest only where something is left and a window binds
    if bound["efficiency"] * sent_share > 1 and bound.get("binding") in ("tpm", "rpm"):
        steady = tp.get("steady_items_per_min")
        took = arm.get("duration_s")
        reasons.append(
            "the job" + (f", {took:,.0f} s," if took is not None else "")
            + " never reached a steady state: it ran on the limit window's first, empty "
            "minute, and a longer job settles at or below the bound" if steady is None else
            "the whole run began on the limit window's first, empty minute; its steady rate "
            f"was {fmt_int(steady)} items/min, "
            f"{fmt_pct(steady * sent_share / bound['items_per_min'])} of the bound"
            + (" in items sent" if cached else ""))
    if bound["efficiency"] * sent_share > 1 and bound.get("binding") == "tokens_per_day":
        reasons.append("a daily token cap is a budget per day, spent at full pace as each "
                       "day starts; a job of many days settles at the daily average")
    return " (above the bound because " + "; and ".join(reasons) + ")" if reasons else ""


def _alerts_sentence(summary: Mapping[str, Any], lead: Mapping[str, Any]) -> str:
    """The fuel gauge: when each arm's low-balance alert (its client's ``low_balance_usd``)
    fired, ahead of a 402 ('' when none did)."""
    parts = []
    for arm in summary["arms"]:
        alert = arm.get("low_balance")
        if not alert:
            continue
        left = alert.get("balance_usd")
        who = "Its" if arm is lead else f"Arm {arm['name']}'s"
        parts.append(f" {who} balance fell below its alert threshold at {alert['t_s']:,.0f} s"
                     + (f" ({fmt_usd(left)} left)" if left is not None else "") + ".")
    return "".join(parts)


def _cost_sentence(summary: Mapping[str, Any], arm: Mapping[str, Any]) -> str:
    """What the lead arm cost: per item for a job, per request for chats; for callers of
    the gateway, who pay nothing themselves, what the provider charged the gateway."""
    cost = arm["cost_usd"]
    if arm["items"]["total"]:
        return (f" It cost **{fmt_usd(cost['per_item'])} per item** "
                f"({fmt_usd(cost['total'])} in all)")
    gateway = summary.get("gateway") or {}
    spent = (gateway.get("provider") or {}).get("spent_usd")
    if spent is not None and not cost["total"]:
        done = (gateway.get("tasks") or {}).get("by_state", {}).get("done", 0)
        return (" Through the gateway, the provider charged **"
                + (f"{fmt_usd(spent / done)} per task done** ({fmt_usd(spent)} in all)" if done
                   else f"{fmt_usd(spent)}** in all"))
    return (f" It cost **{fmt_usd(cost['per_request'])} per request** "
            f"({fmt_usd(cost['total'])} in all)")


def headline(summary: Mapping[str, Any]) -> str:
    """The first paragraph: how fast, how much, which limit binds, what to change."""
    arm = lead_arm(summary)
    state = summary["mode"]
    if summary.get("partial"):
        why = STOPPED.get(summary.get("stopped") or "")
        state += f", partial: {why}" if why else ", partial"
    name = f"**{arm['name']}** ({arm['strategy']})"
    tp = arm["throughput"]
    bound = arm["bound"]
    if arm["items"]["total"]:
        text = (
            f"Scenario {summary['scenario']} ({state}): arm {name} did "
            f"{fmt_int(arm['items']['done'])} of {fmt_int(arm['items']['total'])} items at "
            f"**{fmt_int(tp['items_per_min'])} items/min** ({fmt_int(tp['requests_per_min'])} "
            f"requests/min, {fmt_int(tp['tokens_per_min'])} tokens/min)"
        )
    else:
        text = (
            f"Scenario {summary['scenario']} ({state}): arm {name} served "
            f"{fmt_int(arm['requests']['total'])} requests at "
            f"**{fmt_int(tp['requests_per_min'])} requests/min**, latency p95 "
            f"{fmt_ms(arm['latency_ms']['p95'])}, TTFT p95 {fmt_ms(arm['ttft_ms']['p95'])}"
        )
    if bound.get("items_per_min") is not None:
        text += (
            f", {fmt_pct(bound['efficiency'])} of the bound of "
            f"{fmt_int(bound['items_per_min'])} items/min; the **{bound['binding']}** limit binds"
        )
        text += _above_bound(arm)
        text += "."
    else:
        text += "."
    stop = arm.get("job_stop")
    if stop:
        # the client's own stop (a 402, the spend cap, replies that answer nothing): why
        # the items above are not all done
        text += (f" Its job stopped early (client exit status {stop['exit_status']}): "
                 f"{stop['reason'].rstrip('.')}.")
    text += _cost_sentence(summary, arm)
    proj = arm["projection"]
    if proj.get("duration_s") is not None:
        text += (
            f"; {fmt_int(proj['items'])} items at this rate: {fmt_hours(proj['duration_s'])}, "
            f"{fmt_usd(proj['cost_usd'])}."
        )
    else:
        text += "."
    text += _alerts_sentence(summary, arm)
    others = [a for a in summary["arms"] if a is not arm and a["items"]["total"]]
    if others:
        text += (
            " The other arms: "
            + "; ".join(
                f"{a['name']} {fmt_int(a['throughput']['items_per_min'])} items/min, "
                f"{fmt_usd(a['cost_usd']['per_item'])} per item"
                for a in others
            )
            + "."
        )
    advice = what_to_change(arm)
    slo = _slo_blocks(summary)
    if slo:
        # an SLO search answers its own question first
        text = f"{slo[1][1]} {text}"
    return f"{text} {advice}".strip()


def _arm_table(summary: Mapping[str, Any]) -> Block:
    headers = (
        "arm",
        "strategy",
        "items done",
        "items/min",
        "bound",
        "binds",
        "efficiency",
        "req/min",
        "429s",
        "errors",
        "tokens/item",
        "items/req",
        "p50",
        "p95",
        "TTFT p95",
        "USD/item",
    )
    rows = []
    for a in summary["arms"]:
        r = a["requests"]
        errors = r["total"] - r["ok"] - r["http_429"]
        tokens = a.get("tokens", {})
        rows.append(
            (
                a["name"],
                a["strategy"],
                fmt_int(a["items"]["done"]),
                fmt_int(a["throughput"]["items_per_min"]),
                fmt_int(a["bound"]["items_per_min"]),
                a["bound"]["binding"] or "n/a",
                fmt_pct(a["bound"]["efficiency"]),
                fmt_int(a["throughput"]["requests_per_min"]),
                fmt_int(r["http_429"]),
                fmt_int(errors),
                _f1(tokens.get("per_item")),
                _f1(a["items"].get("per_request")),
                fmt_ms(a["latency_ms"]["p50"]),
                fmt_ms(a["latency_ms"]["p95"]),
                fmt_ms(a["ttft_ms"]["p95"]),
                fmt_usd(a["cost_usd"]["per_item"]),
            )
        )
    return ("table", headers, rows)


def _f1(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _projection_table(summary: Mapping[str, Any]) -> Block:
    headers = ("arm", "items", "time", "cost", "deadline", "to meet it")
    rows = []
    for a in summary["arms"]:
        p = a["projection"]
        if not a["items"]["total"]:
            continue
        need = (
            "meets it"
            if p.get("meets_deadline")
            else " or ".join(
                x
                for x in (
                    f"~{fmt_int(p['needed_tpm'])} TPM" if p.get("needed_tpm") is not None else "",
                    f"{p['needed_keys']} keys" if p.get("needed_keys") is not None else "",
                )
                if x
            )
            or "n/a"
        )
        rows.append(
            (
                a["name"],
                fmt_int(p["items"]),
                fmt_hours(p["duration_s"]),
                fmt_usd(p["cost_usd"]),
                fmt_hours(p.get("deadline_s")),
                need,
            )
        )
    return ("table", headers, rows)


def _blocks(summary: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = [
        ("h1", f"ratelab report: {summary['scenario']}"),
        ("p", headline(summary)),
    ]
    if summary.get("description"):
        blocks.append(("p", str(summary["description"]).strip()))
    blocks += [("h2", "Arms"), _arm_table(summary)]
    proj = _projection_table(summary)
    if proj[2]:
        blocks += [("h2", "Projection"), proj]
    checks = summary.get("checks") or []
    if checks:
        blocks += [
            ("h2", "Expectations"),
            (
                "table",
                ("figure", "limit", "now", "verdict"),
                [
                    (
                        c["figure"],
                        f"{c['op']} {c['limit']:g}",
                        "n/a" if c["now"] is None else f"{c['now']:.4g}",
                        "ok" if c["ok"] else "FAILED",
                    )
                    for c in checks
                ],
            ),
        ]
    stages = summary.get("stages") or []
    if stages:
        blocks += [
            ("h2", "Stages"),
            (
                "table",
                (
                    "stage",
                    "requests",
                    "req/min",
                    "error rate",
                    "429 rate",
                    "USD/request",
                    "USD/item",
                    "p50",
                    "p95",
                    "p99",
                ),
                [
                    (
                        s["name"],
                        fmt_int(s["requests"]),
                        fmt_int(s["requests_per_min"]),
                        fmt_pct(s["error_rate"]),
                        fmt_pct(s.get("rate_429")),
                        fmt_usd(s["cost_per_request_usd"]),
                        fmt_usd(s["cost_per_item_usd"]),
                        fmt_ms(s["latency_ms"]["p50"]),
                        fmt_ms(s["latency_ms"]["p95"]),
                        fmt_ms(s["latency_ms"]["p99"]),
                    )
                    for s in stages
                ],
            ),
        ]
    blocks += _slo_blocks(summary)
    from reports.gateway_section import gateway_blocks

    blocks += gateway_blocks(summary)
    sweep = summary.get("sweep")
    if sweep:
        knee = sweep["knee"]
        blocks += [
            ("h2", f"Sweep of {sweep.get('key') or 'the setting'}"),
            (
                "p",
                f"The knee is at {knee['value']:g} ({knee['arm']}, "
                f"{fmt_int(knee['items_per_min'])} items/min): past it throughput stops "
                "improving or errors appear.",
            ),
            (
                "table",
                ("value", "arm", "items/min", "req/min", "errors+429 rate", "p95"),
                [
                    (
                        f"{p['value']:g}",
                        p["arm"],
                        fmt_int(p["items_per_min"]),
                        fmt_int(p["requests_per_min"]),
                        fmt_pct(p["error_rate"]),
                        fmt_ms(p["latency_p95_ms"]),
                    )
                    for p in sweep["points"]
                ],
            ),
        ]
    return blocks


def _slo_blocks(summary: Mapping[str, Any]) -> list[Block]:
    """The SLO search: the answer in a sentence, then every probe."""
    slo = summary.get("slo_search")
    if not slo:
        return []
    what = "users" if slo["variable"] == "users" else "requests/s"
    target = f"p{slo['percentile']:g} {slo['metric'].upper()} <= {fmt_ms(slo['threshold_ms'])}"
    if slo.get("best") is None:
        answer = f"No probed load met {target}: even {slo['probes'][0]['value']:g} {what} failed."
    else:
        answer = (
            f"The highest load meeting {target} is **{slo['best']:g} {what}**, with a goodput "
            f"of {slo['goodput_per_s']:.2f} requests/s meeting the SLO."
        )
    rows = [
        (
            f"{p['value']:g}",
            fmt_int(p["requests"]),
            fmt_int(p["failed"]),
            fmt_ms(p["measured_ms"]),
            f"{p['goodput_per_s']:.2f}",
            "ok" if p["ok"] else "FAILED",
        )
        for p in slo["probes"]
    ]
    headers = (what, "requests", "failed", f"p{slo['percentile']:g} {slo['metric']}",
               "goodput/s", "verdict")
    return [("h2", "SLO search"), ("p", answer), ("table", headers, rows)]


def render_markdown(
    summary: Mapping[str, Any], plot_titles: Sequence[str] = (), plot_files: Sequence[str] = ()
) -> str:
    """The Markdown report: tables, then the plots as images (``plot_files``, PNGs written
    beside report.md) or, without files, their titles (they live in report.html)."""
    out: list[str] = []
    for block in _blocks(summary):
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            out.append(f"{block[1]}\n")
        else:
            headers, rows = block[1], block[2]
            out.append("| " + " | ".join(headers) + " |")
            out.append("|" + "---|" * len(headers))
            out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
            out.append("")
    if plot_titles and plot_files:
        out.append("## Plots\n")
        for title, name in zip(plot_titles, plot_files, strict=True):
            out.append(f"### {title}\n\n![{title}]({name})\n")
    elif plot_titles:
        out.append("## Plots\n")
        out.append("In report.html: " + "; ".join(plot_titles) + ".\n")
    return "\n".join(out)


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
    "th{background:#f3f3f3}td:first-child{text-align:left}"
    "p.lead{font-size:16px;line-height:1.5;background:#f6f8fa;padding:1em}"
    "img{max-width:100%;display:block;margin:0.5em 0 1.5em}"
)


def inline_html(text: str) -> str:
    """``text`` escaped for HTML, its Markdown ``**bold**`` made bold."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def render_html(summary: Mapping[str, Any], plots: Sequence[tuple[str, str, bytes]]) -> str:
    """One self-contained HTML page: the tables and every plot as an embedded base64 PNG."""
    out = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>ratelab report: {html.escape(str(summary['scenario']))}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    first_p = True
    for block in _blocks(summary):
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(str(block[1]))}</{kind}>")
        elif kind == "p":
            cls = " class='lead' id='lead'" if first_p else ""
            first_p = False
            out.append(f"<p{cls}>{inline_html(str(block[1]))}</p>")
        else:
            out.append(
                "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block[1]) + "</tr>"
            )
            for row in block[2]:
                out.append(
                    "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                )
            out.append("</table>")
    if plots:
        out.append("<h2>Plots</h2>")
    for key, title, png in plots:
        data = base64.b64encode(png).decode("ascii")
        out.append(f"<h3>{html.escape(title)}</h3>")
        out.append(
            f"<img id='plot-{key}' alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    out.append("</body></html>")
    return "\n".join(out)


def read_timeseries(path: str | Path) -> list[dict[str, Any]]:
    """Read ``timeseries.csv``: numbers as floats, empty cells as None (missing file: no rows)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            rows.append(
                {k: v if k == "arm" else (float(v) if v != "" else None) for k, v in raw.items()}
            )
    return rows


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` (with ``plot-<key>.png`` beside it) and ``report.html`` (plots
    embedded) into ``run_dir`` from its summary and time series."""
    run_dir = Path(run_dir)
    summary = load_summary(run_dir / "summary.json")
    rows = read_timeseries(run_dir / "timeseries.csv")
    from reports.gateway_section import gateway_plots

    plots = render_all(summary, rows) + gateway_plots(summary)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    files = []
    for key, _, png in plots:
        # beside report.md, so the Markdown shows them wherever the folder is opened
        (run_dir / f"plot-{key}.png").write_bytes(png)
        files.append(f"plot-{key}.png")
    md_path.write_text(
        render_markdown(summary, [t for _, t, _ in plots], files), encoding="utf-8"
    )
    html_path.write_text(render_html(summary, plots), encoding="utf-8")
    return md_path, html_path
