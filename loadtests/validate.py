"""``ratelab validate FILE...``: check scenarios against the schema and their meaning (a
folder stands for the ``*.yaml`` files directly in it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from loadtests.scenario import load_scenario
from loadtests.scenario_schema import ScenarioError

HELP = "Check scenario YAML files; print ok, or each problem as file:line: key: message (exit 2)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ratelab validate``."""
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="scenario YAML file(s), or a folder of them")


def main(args: argparse.Namespace) -> int:
    """0 when every file is a usable scenario, 2 otherwise (problems on stderr)."""
    status = 0
    names: list[str] = []
    for name in args.files:
        path = Path(name)
        if path.is_dir():
            # its scenarios, not its subfolders (scenarios/providers/ holds provider files)
            found = sorted(str(p) for p in path.glob("*.yaml"))
            if not found:
                print(f"{name}: no *.yaml file in this folder", file=sys.stderr)
                status = 2
            names += found
        else:
            names.append(name)
    for name in names:
        try:
            load_scenario(name)
        except ScenarioError as exc:
            provider = _provider_file_check(name)
            if provider is not None:
                # a provider profile or simulator configuration: checked as what it is
                ok, line = provider
                print(line, file=sys.stdout if ok else sys.stderr)
                status = status if ok else 2
                continue
            print(str(exc), file=sys.stderr)
            status = 2
            continue
        print(f"{name}: ok" if len(names) > 1 else "ok")
    return status


# keys a scenario has at its top level and a provider profile or simulator config has not
_SCENARIO_KEYS = ("arms", "workload", "load")
_PROVIDER_KEYS = ("limits", "models", "keys", "latency", "responder", "providers")


def _provider_file_check(name: str) -> tuple[bool, str] | None:
    """For a file that is a provider profile or a simulator configuration rather than a
    scenario (no arms, workload or load, but provider keys): whether it is usable, and the
    line to print (ok, or its problem as ``ratelab serve --config`` reports it). None
    for any other file."""
    from simulator.model.config import ConfigError, load_config

    try:
        data = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if (not isinstance(data, dict) or any(k in data for k in _SCENARIO_KEYS)
            or not any(k in data for k in _PROVIDER_KEYS)):
        return None
    try:
        load_config(name)
    except ConfigError as exc:
        return False, f"{exc} (a provider file, checked as ratelab serve --config reads it)"
    return True, f"{name}: ok (a provider file, for ratelab serve --config or a profile:)"
