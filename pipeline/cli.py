"""The `lkspec` command line: one sub-command module per stage, each with its own --help."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`, which adds its sub-command(s) and sets
# `func(args) -> int` on the parser. Heavy imports (torch, ray) stay inside those functions
# so that `lkspec --help` answers instantly.
COMMAND_MODULES = (
    "pipeline.cli_cache",
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="lkspec",
        description=(
            "Train speculative-decoding drafters that maximize acceptance with the target model "
            "(LK losses), from a cache of the target's top-k log-probabilities built once on Ray."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lkspec` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"lkspec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
