"""Scenario loading: shipped scenarios validate; bad ones are refused naming file, line, key."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest

from loadtests import validate
from loadtests.scenario import ScenarioError, load_scenario, with_overrides

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.yaml"))

GOOD = """\
name: tiny
seed: 3
time_scale: 60
providers:
  - name: main
    models: {m1: {input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}
    keys: {sk-1: {}}
    limits: {tpm: 200000, rpm: 500}
    responder: {kind: batch_json}
workload:
  items: 100
  item_tokens: {dist: normal, mean: 15, sd: 3, min: 5, max: 30}
arms:
  - name: batched
    strategy: semantic_batch
    client:
      batch: {max_items: 20}
  - name: chat
    strategy: interactive
load:
  batch: {}
  users:
    - name: people
      arm: chat
      mode: closed
      stages:
        - {duration_s: 60, users: 5}
        - {duration_s: 60, users: 10}
expect:
  all: {min_efficiency: 0.8}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def refuse(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return str(info.value)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_scenario_validates(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert all(p.config is not None for p in scenario.providers)
    assert all(a.client_config is not None for a in scenario.arms)


def test_library_is_complete() -> None:
    names = {p.name for p in SHIPPED}
    assert {
        "quickstart.yaml",
        "seed000-concurrency-sweep.yaml",
        "seed001-semantic-batching.yaml",
        "seed002-lanes-and-cache.yaml",
        "seed003-failover-and-streaming.yaml",
        "ci-gate.yaml",
    } <= names


def test_good_scenario_parses_into_dataclasses(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, GOOD))
    assert s.seed == 3 and s.time_scale == 60.0
    assert s.workload.items == 100 and s.workload.project_items == 2_000_000
    assert s.workload.item_tokens.dist == "normal" and s.workload.item_tokens.max == 30
    assert [a.name for a in s.arms] == ["batched", "chat"]
    assert s.arm("batched").providers == ("main",)
    assert s.load.batch is not None and s.load.batch.arms == ("batched",)
    assert [st.users for st in s.load.users[0].stages] == [5, 10]
    assert s.expect.for_arm("chat") == {"min_efficiency": 0.8}


def test_typo_key_names_file_line_and_key(tmp_path: Path) -> None:
    text = GOOD.replace("    strategy: semantic_batch", "    stratgy: semantic_batch")
    message = refuse(tmp_path, text)
    path = tmp_path / "scenario.yaml"
    assert f"{path}:15: arms[0].stratgy: unknown key (did you mean 'strategy'?)" in message
    assert f"{path}:14: arms[0]: 'strategy' is required" in message


def test_wrong_type_names_line(tmp_path: Path) -> None:
    message = refuse(tmp_path, GOOD.replace("items: 100", "items: many"))
    assert (
        message
        == f"{tmp_path / 'scenario.yaml'}:11: workload.items: expected integer, got string 'many'"
    )


def test_missing_provider_referenced_by_arm(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    strategy: semantic_batch\n", "    strategy: semantic_batch\n    providers: [mian]\n"
    )
    message = refuse(tmp_path, text)
    assert (
        message == f"{tmp_path / 'scenario.yaml'}:16: arms[0].providers[0]: "
        "unknown provider 'mian' (known: main)"
    )


def test_zero_limit_refused(tmp_path: Path) -> None:
    message = refuse(tmp_path, GOOD.replace("tpm: 200000", "tpm: 0"))
    assert message.startswith(
        f"{tmp_path / 'scenario.yaml'}:8: providers[0].limits.tpm: a limit of 0 admits nothing"
    )


def test_stage_with_no_users_refused(tmp_path: Path) -> None:
    message = refuse(tmp_path, GOOD.replace("users: 10}", "users: 0}"))
    assert (
        message == f"{tmp_path / 'scenario.yaml'}:28: load.users[0].stages[1]: "
        "a stage with no users: set users >= 1"
    )


def test_an_arm_model_for_a_provider_it_lists_that_serves_it(tmp_path: Path) -> None:
    arm = "    strategy: semantic_batch\n"
    unserved = refuse(tmp_path, GOOD.replace(arm, arm + "    models: {main: m2}\n"))
    assert unserved == (f"{tmp_path / 'scenario.yaml'}:16: arms[0].models.main: provider "
                        "'main' does not serve model 'm2' (it serves m1)")
    unlisted = refuse(tmp_path, GOOD.replace(arm, arm + "    models: {spare: m1}\n"))
    assert unlisted == (f"{tmp_path / 'scenario.yaml'}:16: arms[0].models.spare: unknown "
                        "provider of this arm 'spare' (known: main)")
    fine = load_scenario(write(tmp_path, GOOD.replace(arm, arm + "    models: {main: m1}\n")))
    assert dict(fine.arms[0].models) == {"main": "m1"}


def test_negative_rate_and_unknown_arm(tmp_path: Path) -> None:
    text = GOOD.replace("  item_tokens:", "  duplicate_rate: -0.1\n  item_tokens:").replace(
        "arm: chat", "arm: chatt"
    )
    message = refuse(tmp_path, text)
    assert "workload.duplicate_rate: -0.1 is less than the minimum of 0" in message


def test_nan_and_infinity_are_refused_wherever_they_are(tmp_path: Path) -> None:
    """YAML's .nan passes every bound (each comparison is false) and .inf means nothing."""
    text = GOOD.replace("time_scale: 60", "time_scale: .nan").replace(
        "mean: 15, sd: 3", "mean: .inf, sd: 3")
    assert refuse(tmp_path, text).splitlines() == [
        f"{tmp_path / 'scenario.yaml'}:3: time_scale: expected a finite number, got nan",
        f"{tmp_path / 'scenario.yaml'}:12: workload.item_tokens.mean: expected a finite "
        "number, got inf",
    ]


def test_unknown_arm_in_users(tmp_path: Path) -> None:
    message = refuse(tmp_path, GOOD.replace("arm: chat", "arm: chatt"))
    assert (
        message == f"{tmp_path / 'scenario.yaml'}:24: load.users[0].arm: "
        "unknown arm 'chatt' (known: batched, chat)"
    )


def test_client_settings_checked_by_the_client_parser(tmp_path: Path) -> None:
    message = refuse(tmp_path, GOOD.replace("max_items: 20", "max_itemz: 20"))
    assert message.startswith(f"{tmp_path / 'scenario.yaml'}:17: arms[0].client.batch.max_itemz: ")


def test_provider_checked_by_the_simulator_parser(tmp_path: Path) -> None:
    message = refuse(tmp_path, GOOD.replace("kind: batch_json", "kind: batch_jsn"))
    assert message.startswith(
        f"{tmp_path / 'scenario.yaml'}:9: providers[0].responder.kind: expected one of"
    )


def test_profile_reference_with_overrides(tmp_path: Path) -> None:
    (tmp_path / "providers").mkdir()
    (tmp_path / "providers" / "tier.yaml").write_text(
        "name: tier\nmodels: {m1: {}}\nkeys: {sk-1: {}}\nlimits: {tpm: 1000, rpm: 10}\n"
        "responder: {kind: batch_json}\n"
    )
    text = GOOD.replace(
        "    models: {m1: {input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}\n"
        "    keys: {sk-1: {}}\n    limits: {tpm: 200000, rpm: 500}\n"
        "    responder: {kind: batch_json}\n",
        "    profile: providers/tier.yaml\n    overrides: {limits: {tpm: 5000}}\n",
    )
    s = load_scenario(write(tmp_path, text))
    limits = s.provider("main").data["limits"]
    assert (limits["tpm"], limits["rpm"]) == (5000, 10)
    message = refuse(tmp_path, text.replace("tier.yaml", "nope.yaml"))
    assert message.startswith(
        f"{tmp_path / 'scenario.yaml'}:6: providers[0].profile: "
        "no profile file 'providers/nope.yaml'"
    )


def test_a_batch_job_needs_providers_that_answer_item_batches(tmp_path: Path) -> None:
    # prose answers no item, and codes outside the labels are refused: every item would be
    # paid for again and again, then dead-lettered
    message = refuse(tmp_path, GOOD.replace("kind: batch_json", "kind: lorem"))
    assert message.startswith(
        f"{tmp_path / 'scenario.yaml'}:9: providers[0].responder.kind: arm 'batched' sends "
        "item batches to provider 'main', whose responder writes 'lorem' replies")
    message = refuse(tmp_path, GOOD.replace("    responder: {kind: batch_json}\n", ""))
    assert message.startswith(f"{tmp_path / 'scenario.yaml'}:5: providers[0]: arm 'batched'")
    message = refuse(tmp_path, GOOD.replace("kind: batch_json", "kind: batch_json, codes: [A, Q]"))
    assert message.startswith(
        f"{tmp_path / 'scenario.yaml'}:9: providers[0].responder.codes: provider 'main' "
        "answers with codes Q that workload.labels does not have")
    # without a batch job, a prose provider serves chats as intended
    load_scenario(write(tmp_path, GOOD.replace("kind: batch_json", "kind: lorem").replace(
        "  batch: {}\n", "")))


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    message = refuse(tmp_path, GOOD.replace("seed: 3", "seed: [3"))
    assert message.startswith(f"{tmp_path / 'scenario.yaml'}:3: <root>: invalid YAML")


def test_a_file_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    path.write_bytes(path.read_bytes().replace(b"seed: 3", b"seed: \xff3"))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}:2: <root>: not UTF-8 text")


def test_with_overrides_sets_a_key_and_refuses_missing_ones(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, GOOD))
    changed = with_overrides(
        s, {"arms.batched.client.batch.max_items": 10, "providers.main.limits.tpm": 90000}
    )
    assert changed.arm("batched").client["batch"]["max_items"] == 10
    assert changed.provider("main").data["limits"]["tpm"] == 90000
    with pytest.raises(ScenarioError, match=r"arms\.nope\.client: no element 'nope'"):
        with_overrides(s, {"arms.nope.client": 1})
    with pytest.raises(ScenarioError, match=r"workload\.items: expected integer"):
        with_overrides(s, {"workload.items": "x"})


def test_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, GOOD)
    assert validate.main(argparse.Namespace(files=[str(good)])) == 0
    assert capsys.readouterr().out == "ok\n"
    good.write_text(GOOD.replace("tpm: 200000", "tpm: 0"))
    assert validate.main(argparse.Namespace(files=[str(good)])) == 2
    assert "providers[0].limits.tpm: a limit of 0" in capsys.readouterr().err



def test_validate_takes_a_folder_of_scenarios(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "scenarios"
    (folder / "providers").mkdir(parents=True)
    (folder / "a.yaml").write_text(textwrap.dedent(GOOD))
    (folder / "b.yaml").write_text(textwrap.dedent(GOOD))
    (folder / "providers" / "not-a-scenario.yaml").write_text("headers: openai\n")
    assert validate.main(argparse.Namespace(files=[str(folder)])) == 0
    assert capsys.readouterr().out == f"{folder / 'a.yaml'}: ok\n{folder / 'b.yaml'}: ok\n"
    # a provider profile is checked as one, not as a scenario missing its arms
    shipped = SCENARIOS / "providers"
    assert validate.main(argparse.Namespace(files=[str(shipped)])) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"{shipped / 'paid-tier.yaml'}: ok (a provider file, for ratelab serve --config " \
        "or a profile:)" in out
    bad = folder / "providers" / "bad.yaml"
    bad.write_text("name: x\nmodels: {m: {}}\nlimits: {rpm: 0}\n")
    assert validate.main(argparse.Namespace(files=[str(bad)])) == 2
    assert capsys.readouterr().err.startswith(f"{bad}: limits.rpm: expected ")
    assert validate.main(argparse.Namespace(files=[str(folder / "providers" / "x")])) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert validate.main(argparse.Namespace(files=[str(empty)])) == 2
    assert capsys.readouterr().err.endswith(f"{empty}: no *.yaml file in this folder\n")


def test_a_trace_with_a_bad_row_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("t_s,prompt_tokens,max_tokens\n1.0,100,16\nsoon,100,16\n")
    stages = "      stages:\n" + "".join(f"        - {{duration_s: 60, users: {n}}}\n"
                                          for n in (5, 10))
    assert stages in GOOD
    text = GOOD.replace("mode: closed", "mode: trace\n      trace: t.csv").replace(stages, "")
    message = refuse(tmp_path, text)
    assert "load.users[0].trace" in message
    assert f"{tmp_path / 't.csv'}:3: expected t_s, prompt_tokens, max_tokens" in message
    for row, problem in (("nan,100,16", "t_s: expected seconds >= 0, got nan"),
                         ("-2,100,16", "t_s: expected seconds >= 0, got -2"),
                         ("3,-100,16", "expected token counts >= 0")):
        (tmp_path / "t.csv").write_text(f"t_s,prompt_tokens,max_tokens\n1.0,100,16\n{row}\n")
        assert f"{tmp_path / 't.csv'}:3: {problem}" in refuse(tmp_path, text)


def test_a_workload_model_no_provider_of_an_arm_serves_is_refused(tmp_path: Path) -> None:
    items = "  items: 100\n"
    message = refuse(tmp_path, GOOD.replace(items, items + "  model: gpt-9\n"))
    assert message == (
        f"{tmp_path / 'scenario.yaml'}:12: workload.model: arm 'batched': no provider of the "
        f"arm serves model 'gpt-9' (they serve m1)\n{tmp_path / 'scenario.yaml'}:12: "
        "workload.model: arm 'chat': no provider of the arm serves model 'gpt-9' (they serve m1)")
    # served, directly or through an arm's model for a provider
    load_scenario(write(tmp_path, GOOD.replace(items, items + "  model: m1\n")))
