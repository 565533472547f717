"""The `lkspec` command line: one sub-command module per stage, each with its own --help."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pipeline import cli_bench, cli_cache, cli_demo, cli_plan, cli_study, cli_submit, cli_train
from pipeline.cli_error import CliError

# Each module defines `register(subparsers)`, which adds its sub-command(s) and sets
# `func(args) -> int` on the parser. Heavy imports (torch, ray) stay inside those functions
# so that `lkspec --help` answers instantly. The order is the order of `lkspec --help`.
COMMAND_MODULES = (cli_cache, cli_submit, cli_train, cli_demo, cli_bench, cli_study, cli_plan)


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
    for module in COMMAND_MODULES:
        module.register(subparsers)
    for leaf in _leaf_parsers(parser):
        leaf.add_argument(
            "--config", metavar="FILE.yaml", default=None,
            help="read options from a YAML file whose keys mirror this command's flags "
            "(a flag on the command line wins; unknown keys are refused)",
        )
        leaf.set_defaults(_leaf_parser=leaf)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser that runs a command (has `func`), walking nested sub-commands."""
    leaves = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                leaves.extend(_leaf_parsers(child))
    if parser.get_default("func") is not None:
        leaves.append(parser)
    return leaves


def config_file_defaults(leaf: argparse.ArgumentParser, path: str) -> dict:
    """Validate a YAML config against a command's flags and return it as parser defaults."""
    import yaml

    config_path = Path(path)
    if not config_path.is_file():
        raise CliError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CliError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise CliError(f"config file {path} must hold a mapping of option names to values")
    actions = {
        action.dest: action for action in leaf._actions
        if action.option_strings and action.dest not in ("help", "config")
    }
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            valid = ", ".join(sorted(name.replace("_", "-") for name in actions))
            raise CliError(f"{path}: unknown key {key!r} for `{leaf.prog}` (valid keys: {valid})")
        defaults[dest] = _config_value(path, key, value, action)
    return defaults


def _config_value(path: str, key: str, value, action: argparse.Action):
    """Convert one YAML value the way argparse would convert the same flag, or fail naming it."""
    from trainer.settings import ConfigError

    declared = getattr(action, "declared", None)  # a flag derived from a stage config's declaration
    if declared is not None:
        try:
            value = declared.from_file(value)
        except ConfigError as exc:
            raise CliError(f"{path}: bad value for key {key!r}: {value!r} ({exc.problem})") from None
        problem = None if value is None else declared.problem(value)
        if problem is not None:
            raise CliError(f"{path}: key {key!r} {problem}")
        return value
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise CliError(f"{path}: key {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    if action.type is not None and value is not None:
        try:
            value = action.type(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise CliError(f"{path}: bad value for key {key!r}: {value!r} ({exc})") from exc
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise CliError(f"{path}: key {key!r} must be one of {choices}, got {value!r}")
    return value


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv; with --config, the file supplies defaults (required flags included)."""
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        return parser.parse_args(argv)
    required = [
        action for leaf in _leaf_parsers(parser) for action in leaf._actions
        if action.required and action.option_strings
    ]
    for action in required:  # the file may supply them: check after it is read
        action.required = False
    args = parser.parse_args(argv)
    defaults = config_file_defaults(args._leaf_parser, args.config)
    args._leaf_parser.set_defaults(**defaults)
    for action in required:
        action.required = action.dest not in defaults
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lkspec` console script.

    Ctrl-C (SIGINT) or SIGTERM at any point unwinds the command (its Ray workers and private
    cluster stop), prints one line naming the command that resumes it, and returns 130 / 143.
    """
    from pipeline.interrupts import Interrupted, SignalLog, interrupt_message
    from trainer.notices import warnings_once
    from trainer.settings import ConfigError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    error = None
    with SignalLog() as signals:
        try:
            args = parse_with_config(parser, argv)
            with warnings_once():  # a warning about each of a sweep's runs is printed once
                status = int(args.func(args) or 0)
        except CliError as exc:
            error, status = exc, 2
        except ConfigError as exc:  # a setting refused where no command turned it into a CliError
            error, status = exc.flag_message(), 2
        except KeyboardInterrupt as exc:  # Interrupted, or a SIGINT that a library's handler turned into one
            signals.received.append(exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)
        except BaseException:
            if signals.first() is None:
                raise
            # anything else that ends a command after a signal (a library's sys.exit(0) in its SIGINT
            # handler, a Ray error from a cluster that stopped underneath) is that interruption
    signum = signals.first()
    if signum is not None:
        print(interrupt_message(argv, signum), file=sys.stderr, flush=True)
        return 128 + signum
    if error is not None:
        print(f"lkspec: error: {error}", file=sys.stderr)
    return status


if __name__ == "__main__":  # `python -m pipeline.cli`: run the imported module's main, so nothing in it loads twice
    from pipeline.cli import main as imported_main

    sys.exit(imported_main())
