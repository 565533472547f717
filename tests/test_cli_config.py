"""`--config FILE.yaml`: keys mirror flags, the command line wins, bad keys/values fail by name."""
import argparse

import pytest

from pipeline.cli import _leaf_parsers, build_parser, parse_with_config
from pipeline.cli_error import CliError


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lkspec")
    sub = parser.add_subparsers(dest="command", required=True)
    group = sub.add_parser("cache").add_subparsers(dest="cache_command", required=True)
    build = group.add_parser("build")
    build.add_argument("--target", required=True)
    build.add_argument("--k", type=int, default=64)
    build.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    build.add_argument("--loss", default="kl")
    build.add_argument("--skip-invalid", action="store_true")
    build.set_defaults(func=lambda args: 0)
    for leaf in _leaf_parsers(parser):
        leaf.add_argument("--config", default=None)
        leaf.set_defaults(_leaf_parser=leaf)
    return parser


def _write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_file_supplies_values_and_the_command_line_wins(tmp_path):
    config = _write(tmp_path, "target: smollm2-135m\nk: 32\nloss: [kl, lk_lambda]\nskip-invalid: true\n")
    args = parse_with_config(_toy_parser(), ["cache", "build", "--config", config, "--k", "8"])
    assert (args.target, args.k, args.loss, args.skip_invalid) == ("smollm2-135m", 8, "kl,lk_lambda", True)


def test_required_flag_still_required_when_the_file_lacks_it(tmp_path):
    config = _write(tmp_path, "k: 32\n")
    with pytest.raises(SystemExit):
        parse_with_config(_toy_parser(), ["cache", "build", "--config", config])


@pytest.mark.parametrize(
    "text, message",
    [
        ("target: x\nkk: 3\n", "unknown key 'kk'"),
        ("target: x\nk: many\n", "bad value for key 'k'"),
        ("target: x\ndtype: fp16\n", "key 'dtype' must be one of bf16, fp32"),
        ("target: x\nskip-invalid: 1\n", "key 'skip-invalid' must be true or false"),
        ("- just\n- a list\n", "must hold a mapping"),
    ],
)
def test_bad_config_fails_naming_the_key(tmp_path, text, message):
    config = _write(tmp_path, text)
    with pytest.raises(CliError, match=message):
        parse_with_config(_toy_parser(), ["cache", "build", "--config", config])


def test_every_real_command_accepts_config():
    leaves = _leaf_parsers(build_parser())
    assert leaves, "no commands registered"
    for leaf in leaves:
        assert any("--config" in action.option_strings for action in leaf._actions), leaf.prog
