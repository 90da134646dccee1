"""Gateway configuration: a full file parsed into frozen values, errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from batchclient.config import StreamSettings
from batchclient.configreader import ConfigError
from gateway.config import TierLimits, load_config, parse_config

FULL = """
upstreams:
  - name: paid
    base_url: http://127.0.0.1:8000/v1/
    api_key_env: GW_TEST_KEY
    models: [gpt-4o-mini, gpt-4o]
    rpm: 5000
    tpm: 4000000
tiers:
  free: {rpm: 10, tokens_per_day: 100000}
  pro: {rpm: 60, tokens_per_day: 1000000, burst: 20}
  enterprise: {rpm: 600, tokens_per_day: null}
default_tier: free
users: {alice: pro, bigco: enterprise}
lanes: {interactive_p95_budget_s: 1.5, reserved_workers: 2, background_ceiling: 0.7}
workers: 12
batching: {max_items: 25, labels: [A, B, C], system_prompt: Classify.}
time_scale: 60
lease_s: 120
stream: {first_token_s: 8, loop_repeats: 5}
"""


def test_full_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_KEY", "sk-from-env")
    path = tmp_path / "gw.yaml"
    path.write_text(FULL)
    cfg = load_config(path)
    up = cfg.upstream
    assert (up.name, up.base_url, up.api_key, up.models, up.rpm, up.tpm) == (
        "paid", "http://127.0.0.1:8000/v1", "sk-from-env", ("gpt-4o-mini", "gpt-4o"), 5000,
        4_000_000)
    assert cfg.tiers["pro"] == TierLimits(60, 1_000_000, 20)
    assert cfg.tiers["pro"].capacity == 20 and cfg.tiers["free"].capacity == 10
    assert cfg.tiers["enterprise"].tokens_per_day is None
    assert (cfg.tier_of("alice"), cfg.tier_of("nobody")) == ("pro", "free")
    assert (cfg.workers, cfg.lanes.reserved_workers, cfg.lanes.background_ceiling) == (12, 2, 0.7)
    assert dict(cfg.batching.labels) == {"A": "A", "B": "B", "C": "C"}
    assert (cfg.time_scale, cfg.lease_s, cfg.batching.max_items) == (60.0, 120.0, 25)
    # the watchdog: the batching client's settings, its defaults where the file is silent
    assert cfg.stream == StreamSettings(enabled=True, first_token_s=8.0, loop_min_period=8,
                                        loop_repeats=5)
    with pytest.raises(AttributeError):
        cfg.workers = 3  # type: ignore[misc]


@pytest.mark.parametrize(("change", "message"), [
    ("workers: 0", "gw.yaml: workers: expected an integer >= 1, got 0"),
    ("users: {alice: gold}", "gw.yaml: users.alice: expected one of free, pro, enterprise, "
                             "got 'gold'"),
    ("default_tier: gold", "gw.yaml: default_tier: expected one of free, pro, enterprise"),
    ("lanes: {reserved_workers: 12}", "gw.yaml: lanes.reserved_workers: expected fewer than "
                                      "workers (12)"),
    ("tiers: {free: {rpm: 0}}", "gw.yaml: tiers.free.rpm: expected a number > 0"),
    ("colour: blue", "gw.yaml: colour: unknown key"),
    ("stream: {first_token_s: 0}", "gw.yaml: stream.first_token_s: expected a finite number "
                                   ">= 1e-09, got 0"),
    ("stream: {loop_repeats: 1}", "gw.yaml: stream.loop_repeats: expected an integer >= 2"),
    ("stream: {loop_min_period: 0}", "gw.yaml: stream.loop_min_period: expected an integer"),
    ("stream: {enabled: false}", "gw.yaml: stream.enabled: unknown key"),
    ("upstreams: []", "gw.yaml: upstreams: expected a non-empty list"),
])
def test_errors_name_file_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  change: str, message: str) -> None:
    monkeypatch.setenv("GW_TEST_KEY", "k")
    data = {**yaml.safe_load(FULL), **yaml.safe_load(change)}
    if "tiers" in yaml.safe_load(change):
        del data["users"], data["default_tier"]
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(str(tmp_path / message.split(":")[0]) + ":" +
                                     message.split(":", 1)[1]), str(err.value)


def test_missing_key_env_is_named() -> None:
    data = {"upstreams": [{"base_url": "http://x/v1", "api_key_env": "GW_UNSET_VAR_X"}]}
    with pytest.raises(ConfigError, match=r"<t>: upstreams\[0\].api_key_env: environment "
                                          r"variable 'GW_UNSET_VAR_X' is not set"):
        parse_config(data, "<t>")


def test_an_upstream_url_without_its_scheme_is_refused() -> None:
    data = {"upstreams": [{"base_url": "127.0.0.1:18000/v1", "api_key": "k"}]}
    with pytest.raises(ConfigError, match=r"^<t>: upstreams\[0\].base_url: expected an "
                                          r"http\(s\) URL, got '127.0.0.1:18000/v1'$"):
        parse_config(data, "<t>")
