"""A scenario aimed at an external OpenAI-compatible URL: here a simulator started on its own
(``ratelab serve``, loopback) stands for a real deployment. Its key comes from an environment
variable and never reaches the run folder; the spend cap and the error-rate guard stop it."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.loadtests.runs import ROOT, arm, summary

KEY_ENV = "RATELAB_TEST_TARGET_KEY"
PRICE_IN, PRICE_OUT = 0.15, 0.60  # USD per million tokens, in the target's `prices`

# Two providers of one server: "steady" answers, "broken" fails half its requests with 500.
# Neither sends the simulator's charge headers, as a real deployment would not: the client
# meters cost with the scenario's prices.
PROVIDERS = """\
seed: 5
providers:
  - name: steady
    models: {{gpt-4o-mini: {{input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}}}
    keys: {{{key}: {{}}}}
    limits: {{tpm: 100000000, rpm: 1000000}}
    billing: {{charge_headers: false}}
    latency: {{ttft_s: {{dist: constant, value: 0.01}}, itl_s: {{dist: constant, value: 0}}}}
    responder: {{kind: batch_json}}
  - name: broken
    models: {{gpt-4o-mini: {{input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}}}
    keys: {{{key}: {{}}}}
    limits: {{tpm: 100000000, rpm: 1000000}}
    billing: {{charge_headers: false}}
    responder: {{kind: batch_json}}
    faults: {{error_500_rate: 0.5}}
"""

SCENARIO = """\
name: external
seed: 2
time_scale: 1
duration_s: 120
target:
  base_url: {url}
  api_key_env: {env}
  model: gpt-4o-mini
  prices: {{input_usd_per_mtok: {pin}, output_usd_per_mtok: {pout}}}
  max_error_rate: 0.2
{extra}
workload:
  items: {items}
  item_tokens: 15
  reply_tokens_per_item: 5
  system_prompt_tokens: 200
arms:
  - name: arm
    strategy: {strategy}
    client:
      concurrency: {{limit: 8}}
load:
  batch: {{}}
  error_guard: {{max_error_rate: 0.5, min_requests: 40}}
"""


@pytest.fixture(scope="module")
def key() -> str:
    return f"sk-ext-{secrets.token_hex(16)}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, key: str) -> Iterator[str]:
    """``ratelab serve`` in a process of its own on a free loopback port: its root URL."""
    config = tmp_path_factory.mktemp("target") / "providers.yaml"
    config.write_text(PROVIDERS.format(key=key))
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.cli", "serve", "--config",
                             str(config), "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    banner = proc.stdout.readline()
    found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", banner)
    assert found, banner
    yield found.group(1)
    proc.terminate()
    proc.wait(20)
    proc.stdout.close()


def run_external(tmp_path: Path, url: str, key: str, *, items: int, strategy: str,
                 extra: str = "", edit: Callable[[dict[str, Any]], None] | None = None,
                 ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``ratelab run`` of the external scenario with the key in the environment only
    (``edit`` changes the scenario's YAML mapping first)."""
    scenario = tmp_path / "external.yaml"
    text = SCENARIO.format(url=url, env=KEY_ENV, pin=PRICE_IN, pout=PRICE_OUT, items=items,
                           strategy=strategy, extra=textwrap.indent(extra, "  "))
    if edit is not None:
        data = yaml.safe_load(text)
        edit(data)
        text = yaml.safe_dump(data, sort_keys=False)
    scenario.write_text(text)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.cli", "run", str(scenario), "--out", str(out),
         "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=150,
        env={**os.environ, KEY_ENV: key})
    return out, proc


def files_holding(folder: Path, secret: str) -> list[str]:
    """Every file under ``folder`` whose bytes contain ``secret`` (SQLite stores, logs, CSV,
    HTML and PNG alike)."""
    needle = secret.encode()
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*"))
            if p.is_file() and needle in p.read_bytes()]


def test_external_target_is_measured_and_its_key_never_written(
        tmp_path: Path, server: str, key: str) -> None:
    out, proc = run_external(tmp_path, f"{server}/p/steady/v1", key, items=600,
                             strategy="semantic_batch")
    assert proc.returncode == 0, proc.stderr
    s = summary(out)
    a = arm(s, "arm")
    assert s["partial"] is False and s["stopped"] is None
    assert a["items"]["done"] == 600 and a["items"]["lost"] == 0
    assert a["requests"]["ok"] == a["requests"]["total"] == 30  # 20 items per request
    # cost metered from the target's prices (the endpoint reports no charge)
    tokens = a["tokens"]
    expected = (tokens["input"] * PRICE_IN + tokens["output"] * PRICE_OUT) / 1e6
    assert a["cost_usd"]["total"] == pytest.approx(expected, rel=1e-6) and expected > 0
    # the key was used (the server refuses unknown keys with 401) but is nowhere to be read
    assert len(list(out.iterdir())) >= 10
    assert files_holding(out, key) == []
    assert key not in proc.stdout + proc.stderr
    assert KEY_ENV in (out / "run.json").read_text()  # only the variable's name is kept


def test_spend_cap_stops_an_external_run(tmp_path: Path, server: str, key: str) -> None:
    cap = 0.001  # USD: about 26 single-item requests of ~230 prompt tokens
    out, proc = run_external(tmp_path, f"{server}/p/steady/v1", key, items=2000,
                             strategy="single", extra=f"spend_cap_usd: {cap}\n")
    assert proc.returncode == 1, proc.stderr
    s = summary(out)
    a = arm(s, "arm")
    assert s["partial"] is True and s["stopped"] == "spend_cap"
    # each request in flight holds its most possible cost against the cap: it is never
    # passed (it was by the 8 in flight, about USD 0.00004 each, when the cost was counted
    # only as it was known), and the job stops within the 8 in flight and the next of it
    per_request = a["cost_usd"]["total"] / a["requests"]["ok"]
    assert cap - 9 * 2 * per_request <= a["cost_usd"]["total"] <= cap, a["cost_usd"]
    assert a["job_stop"]["exit_status"] == 6  # the batch client's own stop, and why
    assert a["job_stop"]["reason"].startswith(f"spend cap USD {cap:g} reached")
    assert 0 < a["items"]["done"] < 2000 and a["items"]["lost"] == 0
    assert files_holding(out, key) == []


def test_the_spend_cap_holds_the_chats_and_the_batch_together(
        tmp_path: Path, server: str, key: str) -> None:
    # the batch job and the chats of a process hold their requests in flight against one
    # budget: before, the batch held the whole cap alone and the chats' cost was counted
    # only as it was known, so the two together passed it
    cap = 0.002

    def add_chats(data: dict[str, Any]) -> None:
        data["duration_s"] = 60
        data["arms"][0]["client"]["concurrency"]["limit"] = 4
        data["arms"].append({"name": "chat", "strategy": "interactive",
                             "client": {"concurrency": {"limit": 8}}})
        data["load"] = {"batch": {"arms": ["arm"]}, "users": [{
            "name": "chatters", "arm": "chat", "mode": "closed", "think_s": 0,
            "stages": [{"name": "all", "duration_s": 60, "users": 8}]}]}

    out, proc = run_external(tmp_path, f"{server}/p/steady/v1", key, items=2000,
                             strategy="single", extra=f"spend_cap_usd: {cap}\n",
                             edit=add_chats)
    assert proc.returncode == 1, proc.stderr
    s = summary(out)
    assert s["partial"] is True and s["stopped"] == "spend_cap"
    spent = arm(s, "arm")["cost_usd"]["total"] + arm(s, "chat")["cost_usd"]["total"]
    assert arm(s, "chat")["requests"]["ok"] > 0 and arm(s, "arm")["requests"]["ok"] > 0
    assert cap / 2 < spent <= cap, (arm(s, "arm")["cost_usd"], arm(s, "chat")["cost_usd"])


def test_error_guard_stops_an_external_run(tmp_path: Path, server: str, key: str) -> None:
    out, proc = run_external(tmp_path, f"{server}/p/broken/v1", key, items=2000,
                             strategy="single")
    assert proc.returncode == 1, proc.stderr
    s = summary(out)
    a = arm(s, "arm")
    # the target's 0.2 is stricter than the scenario's 0.5: the stricter one applies
    assert s["partial"] is True and s["stopped"] == "error_guard"
    assert a["requests"]["http_5xx"] > 0 and a["requests"]["error_rate"] > 0.2
    assert a["items"]["done"] < 2000 and a["items"]["lost"] == 0
    assert files_holding(out, key) == []


def test_a_target_runs_in_wall_time_and_a_cap_needs_prices(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.yaml"
    text = SCENARIO.format(url="http://127.0.0.1:9/v1", env=KEY_ENV, pin=1, pout=1, items=10,
                           strategy="single", extra="  spend_cap_usd: 1\n")
    text = text.replace("time_scale: 1", "time_scale: 60")
    scenario.write_text(text.replace("  prices: {input_usd_per_mtok: 1, output_usd_per_mtok: 1}"
                                     "\n", ""))
    proc = subprocess.run([sys.executable, "-m", "loadtests.cli", "validate", str(scenario)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{scenario}:3: time_scale: a target is a real endpoint" in proc.stderr
    assert "target.spend_cap_usd: a spend cap needs target.prices" in proc.stderr
