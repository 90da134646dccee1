"""Profile parsing: shipped profiles load, errors name file, key and expectation, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from simulator.model.config import (
    ConfigError,
    apply_overrides,
    default_config,
    load_config,
    parse_config,
    parse_provider,
)

PROFILES = Path(__file__).resolve().parents[3] / "scenarios" / "providers"


@pytest.mark.parametrize("name", ["free-tier", "paid-tier", "modeldatabase", "azure-like",
                                  "anthropic-like", "h100-70b"])
def test_shipped_profiles_load(name: str) -> None:
    cfg = load_config(PROFILES / f"{name}.yaml")
    assert cfg.providers[0].name == name
    assert cfg.providers[0].keys


def test_default_config_is_the_documented_paid_tier() -> None:
    p = default_config().providers[0]
    assert p.name == "default" and [k.key for k in p.keys] == ["sk-ratelab"]
    assert "gpt-4o-mini" in [m.name for m in p.models]
    assert p.keys[0].limits["gpt-4o-mini"].rpm == 5000


BASE: dict = {"models": {"m": {}}, "keys": {"k": {}}}


@pytest.mark.parametrize(("patch", "message"), [
    ({"models": {"m": {"context_window": "big"}}},
     "p.yaml: models.m.context_window: expected an integer, got 'big'"),
    ({"limits": {"rmp": 5}}, "p.yaml: limits.rmp: expected one of the keys"),
    ({"limits": {"rpm": 0}}, "p.yaml: limits.rpm: expected an integer >= 1, got 0"),
    ({"limits": {"algorithm": "leaky"}},
     "p.yaml: limits.algorithm: expected one of sliding, token_bucket, fixed, got 'leaky'"),
    ({"limits": {"per_model": {"x": {}}}},
     "p.yaml: limits.per_model.x: expected a model declared under models: m"),
    ({"latency": {"ttft_s": {"dist": "lognormal", "median": 2, "p99": 1}}},
     "p.yaml: latency.ttft_s.p99: expected a number >= median (2), got 1.0"),
    ({"faults": {"reset_rate": 2}},
     "p.yaml: faults.reset_rate: expected a number <= 1, got 2"),
    ({"faults": {"outages": [{"start_s": 5, "end_s": 1}]}},
     "p.yaml: faults.outages[0].end_s: expected a number >= 5, got 1"),
    ({"keys": {}}, "p.yaml: keys: expected at least one API key"),
    ({"billing": {"money_style": "euro"}},
     "p.yaml: billing.money_style: expected one of 402, openai, anthropic, got 'euro'"),
    ({"headers": True}, "p.yaml: headers: expected a non-empty string, got True"),
])
def test_errors_name_file_key_and_expectation(patch: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_provider({**BASE, **patch}, "p.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_errors_inside_a_providers_list_name_the_index(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump({"providers": [
        {**BASE, "name": "a"}, {**BASE, "name": "b", "gpu": {"max_seqs": -1}}]}))
    with pytest.raises(ConfigError, match=r"sim\.yaml: providers\[1\]\.gpu\.max_seqs: "
                                          r"expected an integer >= 1, got -1"):
        load_config(path)
    path.write_text("providers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_duplicate_provider_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"providers\[1\]\.name: expected a name unique"):
        parse_config({"providers": [BASE, BASE]}, "x.yaml")


def test_empirical_latency_from_a_file_relative_to_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "ttft.txt").write_text("# seconds\n0.1\n0.2\n\n0.3\n")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(
        {**BASE, "latency": {"ttft_s": {"dist": "empirical", "file": "ttft.txt"}}}))
    cfg = load_config(tmp_path / "p.yaml")
    assert cfg.providers[0].latency.ttft_s.values == (0.1, 0.2, 0.3)


def test_overrides_apply_to_every_key_and_model_with_a_sliding_minute() -> None:
    cfg = load_config(PROFILES / "azure-like.yaml")
    out = apply_overrides(cfg, rpm=10, tpm=1000, concurrency=2, ttft_ms=50, itl_ms=5,
                          balance_usd=1.5, time_scale=60, seed=3)
    p = out.providers[0]
    spec = p.keys[0].limits["gpt-4o-mini"]
    assert (spec.rpm, spec.tpm, spec.concurrency, spec.algorithm, spec.window_s,
            spec.request_window_s) == (10, 1000, 2, "sliding", 60.0, None)
    assert p.default_limits["gpt-4o-mini"].rpm == 10
    assert p.latency.ttft_s.value == 0.05 and p.latency.itl_s.value == 0.005
    assert p.keys[0].balance_usd == 1.5
    assert (out.time_scale, out.seed) == (60, 3)
    assert apply_overrides(cfg) == cfg
