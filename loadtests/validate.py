"""``ratelab validate FILE...``: check scenarios against the schema and their meaning (a
folder stands for the ``*.yaml`` files directly in it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
            print(str(exc), file=sys.stderr)
            status = 2
            continue
        print(f"{name}: ok" if len(names) > 1 else "ok")
    return status
