"""parse_client_config / parse_task: values, defaults, and errors naming source and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchclient.config import ConfigError, parse_client_config, parse_task
from batchclient.configreader import load_yaml


def test_full_mapping_parses_into_frozen_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_VAR", "sk-env")
    cfg = parse_client_config({
        "strategy": "single", "time_scale": 60,
        "providers": [
            {"name": "a", "base_url": "http://h/v1/", "api_key_env": "KEY_VAR", "tpm": 1000,
             "tpm_counting": "actual", "failover_on_429": True,
             "prices": {"m": {"input": 0.15, "output": 0.6}},
             "model_limits": {"m": {"tpm": 500, "rpm": 10},
                              "c": {"input_tpm": 4000, "output_tpm": 800}}},
            {"name": "b", "base_url": "https://x", "api_key": "k", "time_scale": 1},
        ],
        "batch": {"max_items": 30, "token_budget": 9000, "adaptive": True},
        "concurrency": {"mode": "aimd", "limit": 4, "max": 32},
        "throttle": {"steps": [[0.9, 0.5]], "ceiling": 0.95},
        "retry": {"max_attempts": 3, "naive_sleep": "immediate"},
        "routing": [{"model": "cheap", "max_item_tokens": 20}],
        "stream": {"enabled": True, "first_token_s": 2},
    }, "arm.yaml")
    a, b = cfg.providers
    assert (a.api_key, a.base_url, a.time_scale, a.reserve_max_tokens) == (
        "sk-env", "http://h/v1", 60.0, False)
    assert a.limits_for("m").tpm == 500 and a.limits_for("other").tpm == 1000
    assert (a.limits_for("c").input_tpm, a.limits_for("c").output_tpm) == (4000, 800)
    assert a.prices["m"].output_per_m == 0.6 and b.time_scale == 1.0
    assert cfg.batch.max_items == 30 and cfg.concurrency.mode == "aimd"
    assert cfg.throttle.steps == ((0.9, 0.5),) and cfg.retry.naive_sleep == "immediate"
    assert cfg.routing[0].model == "cheap" and cfg.stream.enabled
    with pytest.raises(AttributeError):
        cfg.strategy = "naive"  # type: ignore[misc]


def test_naive_strategy_turns_the_throttle_off_by_default() -> None:
    assert not parse_client_config({"strategy": "naive"}, "s").throttle.enabled
    assert parse_client_config({}, "s").throttle.enabled


@pytest.mark.parametrize(("data", "message"), [
    ({"strategy": "fast"}, "arm.yaml: strategy: expected one of single, semantic_batch, naive"),
    ({"batch": {"max_items": 0}}, "arm.yaml: batch.max_items: expected an integer >= 1"),
    ({"batch": {"size": 3}}, "arm.yaml: batch.size: unknown key"),
    ({"providers": [{"name": "a", "base_url": "ftp://x", "api_key": "k"}]},
     "arm.yaml: providers[0].base_url: expected an http(s) URL"),
    ({"providers": [{"name": "a", "base_url": "http://x"}]},
     "arm.yaml: providers[0].api_key: expected a non-empty string (or api_key_env)"),
    ({"providers": [{"name": "a", "base_url": "http://x", "api_key_env": "NOPE_NOT_SET"}]},
     "arm.yaml: providers[0].api_key_env: $NOPE_NOT_SET is not set"),
    ({"throttle": {"steps": [[2, 1]]}}, "arm.yaml: throttle.steps: expected a list"),
    ({"routing": [{"model": "m"}]}, "arm.yaml: routing[0]: expected max_item_tokens or tag"),
    ({"concurrency": "lots"}, "arm.yaml: concurrency: expected a mapping"),
    ({"providers": [{"name": "a", "base_url": "http://x", "api_key": "k", "share": 1.5}]},
     "arm.yaml: providers[0].share: expected a fraction of the key's limits, at most 1"),
    ({"time_scale": float("nan")}, "arm.yaml: time_scale: expected a finite number >= 1e-09"),
    ({"retry": {"base_s": float("inf")}},
     "arm.yaml: retry.base_s: expected a finite number >= 0.0"),
    ({"batch": {"json_mode": "yes"}}, "arm.yaml: batch.json_mode: expected"),
    ({"batch": {"json_mode": True, "json_schema": True}},
     "arm.yaml: batch.json_schema: json_mode and json_schema are two ways"),
])
def test_errors_name_the_source_and_key(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_client_config(data, "arm.yaml")
    assert str(info.value).startswith(message)


def test_task_parsing_and_an_empty_taxonomy() -> None:
    task = parse_task({"system_prompt": "s", "labels": {"A": "alpha"}, "model": "m"}, "t.yaml")
    assert task.labels == {"A": "alpha"} and task.max_tokens_per_item == 16
    with pytest.raises(ConfigError, match=r"t\.yaml: labels: .*taxonomy has no codes"):
        parse_task({"system_prompt": "s", "labels": {}, "model": "m"}, "t.yaml")
    with pytest.raises(ConfigError, match=r"t\.yaml: model: expected a non-empty string"):
        parse_task({"system_prompt": "s", "labels": {"A": "a"}}, "t.yaml")


def test_load_yaml_names_the_file_it_cannot_use(tmp_path: Path) -> None:
    good = tmp_path / "ok.yaml"
    good.write_text("a: 1\n", encoding="utf-8")
    assert load_yaml(good) == {"a": 1}
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1,\n", encoding="utf-8")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"a: \xff\xfe\n")
    for path, what in ((broken, ":2: not valid YAML: expected the node content"),
                       (binary, ": not UTF-8 text"), (tmp_path / "missing.yaml", ": cannot read")):
        with pytest.raises(ConfigError) as info:
            load_yaml(path)
        assert str(info.value).startswith(f"{path}{what}")
        assert "\n" not in str(info.value)
