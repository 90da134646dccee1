"""The ``ratelab`` command line: one subcommand per module, imported only when used.

Each subcommand module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``main(args) -> int`` (the process exit status). Keeping the imports lazy means
``ratelab serve`` does not pay for Locust or matplotlib at start-up.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> module implementing it
SUBCOMMANDS: dict[str, str] = {
    "serve": "simulator.cli",
    "validate": "loadtests.validate",
    "gate": "reports.gate",
    "compare": "reports.compare",
    "job": "batchclient.cli",
    "run": "loadtests.run",
    "plan": "loadtests.plan",
    "gateway": "gateway.cli",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="ratelab",
        description="Load-test and plan LLM API workloads against a simulated provider.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        child = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(child)
        child.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ratelab`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.main(args))
    except KeyboardInterrupt:
        print("ratelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
