"""``ratelab validate FILE...``: check scenarios against the schema and their meaning."""

from __future__ import annotations

import argparse
import sys

from loadtests.scenario import load_scenario
from loadtests.scenario_schema import ScenarioError

HELP = "Check scenario YAML files; print ok, or each problem as file:line: key: message (exit 2)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ratelab validate``."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="scenario YAML file(s)")


def main(args: argparse.Namespace) -> int:
    """0 when every file is a usable scenario, 2 otherwise (problems on stderr)."""
    status = 0
    for name in args.files:
        try:
            load_scenario(name)
        except ScenarioError as exc:
            print(str(exc), file=sys.stderr)
            status = 2
            continue
        print(f"{name}: ok" if len(args.files) > 1 else "ok")
    return status
