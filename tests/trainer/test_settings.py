"""trainer.settings: one declaration per field gives the flag, the YAML conversion, the check and its message."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from trainer.settings import (ConfigError, add_flags, check_settings, declared, from_args, preset, setting)


@dataclass
class Toy:
    """A config with one field of every shape the stage configs use."""

    out: Path = setting(help="where")
    steps: int = setting(10, ge=1, help="steps")
    lr: float = setting(1e-3, gt=0, help="learning rate")
    fraction: float = setting(0.05, gt=0, le=0.5, group="data", help="held out")
    mode: str = setting("a", choices=("a", "b"), help="mode")
    seeds: tuple[int, ...] = setting((0, 1), ge=0, distinct=True, key="seed", help="seeds")
    temperatures: list[float] = setting([0.0], ge=0, key="temperature", metavar="T[,...]", help="temperatures")
    features: tuple[str, ...] = setting((), choices=("x", "y"), help="features, may be none")
    gpus: int | str = setting("auto", auto=True, ge=0, metavar="N|auto", help="gpus")
    limit: int | None = setting(None, ge=1, help="limit")
    resume: bool = setting(False, help="resume")
    progress: bool = setting(True, help="no progress bar")
    internal: int = setting(3, cli=False, ge=1, help="not a flag")

    def validate(self) -> None:
        check_settings(self)


def _parser(cls=Toy, **options) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_flags(parser, cls, **options)
    return parser


def _error(**values) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        Toy(out=Path("o"), **values).validate()
    return caught.value


@pytest.mark.parametrize("values, key, message", [
    ({"steps": 0}, "steps", "steps must be an integer >= 1, got 0"),
    ({"steps": True}, "steps", "steps must be an integer >= 1, got True"),
    ({"lr": 0.0}, "lr", "lr must be a finite number > 0, got 0.0"),
    ({"lr": float("nan")}, "lr", "lr must be a finite number > 0, got nan"),
    ({"fraction": 0.9}, "fraction", "fraction must be a number in (0, 0.5], got 0.9"),
    ({"mode": "c"}, "mode", "mode must be one of a, b, got 'c'"),
    ({"seeds": (0, 0)}, "seed", "seed must be distinct integers >= 0, got '0,0'"),
    ({"seeds": ()}, "seed", "seed must be distinct integers >= 0, got ''"),
    ({"temperatures": [0.0, -1.0]}, "temperature", "temperature must be numbers >= 0, got -1.0"),
    ({"features": ("z",)}, "features", "features must be values from x, y, got 'z'"),
    ({"gpus": -1}, "gpus", "gpus must be auto or an integer >= 0, got -1"),
    ({"limit": 0}, "limit", "limit must be an integer >= 1, got 0"),
    ({"internal": 0}, "internal", "internal must be an integer >= 1, got 0"),
])
def test_checks_name_the_key_and_say_what_is_valid(values, key, message):
    error = _error(**values)
    assert (error.key, str(error)) == (key, message)
    assert error.flag_message() == "--" + message.replace(key, key.replace("_", "-"), 1)


def test_valid_values_pass_and_optional_ones_may_be_none():
    Toy(out=Path("o")).validate()
    Toy(out="o", limit=None, gpus=2, features=(), temperatures=[0.0, 1.5]).validate()


def test_every_flag_is_derived_with_its_spelling_default_and_help():
    parser = _parser()
    flags = {option: action for action in parser._actions for option in action.option_strings}
    assert {"--out", "--steps", "--lr", "--fraction", "--mode", "--seed", "--temperature", "--features", "--gpus",
            "--limit", "--resume", "--no-progress"} <= set(flags)
    assert "--internal" not in flags and "--progress" not in flags
    assert flags["--out"].required and not flags["--steps"].required
    assert flags["--mode"].choices == ("a", "b") and flags["--temperature"].metavar == "T[,...]"
    assert flags["--steps"].help == "steps (default: 10)" and flags["--resume"].help == "resume"
    assert flags["--seed"].help == "seeds (default: 0,1)" and flags["--limit"].help == "limit"
    assert any(group.title == "data" and flags["--fraction"] in group._group_actions for group in parser._action_groups)


def test_parsed_flags_make_the_config():
    args = _parser().parse_args(["--out", "o", "--steps", "5", "--seed", "3,4", "--temperature", "0,0.5",
                                 "--gpus", "2", "--no-progress", "--resume", "--features", "y"])
    config = from_args(Toy, args)
    assert (config.out, config.steps, config.seeds, config.temperatures, config.gpus) == (
        Path("o"), 5, (3, 4), [0.0, 0.5], 2)
    assert (config.progress, config.resume, config.features, config.internal) == (False, True, ("y",), 3)
    defaults = from_args(Toy, _parser().parse_args(["--out", "o"]))
    assert defaults == Toy(out=Path("o"))


def test_bad_lists_are_config_errors_and_bad_scalars_argparse_errors():
    with pytest.raises(ConfigError, match=r"^seed expects a comma-separated list of int, got '0,x'$"):
        _parser().parse_args(["--out", "o", "--seed", "0,x"])
    with pytest.raises(SystemExit):  # auto-or-integer flags are checked as they are read
        _parser().parse_args(["--out", "o", "--gpus", "-1"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--out", "o", "--mode", "c"])
    args = _parser().parse_args(["--out", "o", "--steps", "0"])  # bounds: checked with the whole config
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        from_args(Toy, args)


def test_a_yaml_value_is_converted_like_the_flag_text():
    items = {item.key: item for item in declared(Toy)}
    assert items["seed"].from_file([0, 2]) == (0, 2) and items["seed"].from_file("0,2") == (0, 2)
    assert items["lr"].from_file("5e-3") == 0.005 and items["limit"].from_file(None) is None
    assert items["gpus"].from_file("auto") == "auto" and items["gpus"].from_file(3) == 3
    assert items["resume"].problem(1) == "must be true or false, got 1"
    with pytest.raises(ConfigError, match="invalid literal"):
        items["steps"].from_file("many")


@dataclass
@preset(steps=99, seeds=(5,))
class Preset(Toy):
    extra: str = setting("e", help="one more")


def test_a_preset_keeps_the_declarations_and_their_order_with_new_defaults():
    assert [f.name for f in fields(Preset)] == [f.name for f in fields(Toy)] + ["extra"]
    config = Preset(out=Path("o"))
    assert (config.steps, config.seeds, config.lr) == (99, (5,), 1e-3)
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        Preset(out=Path("o"), steps=0).validate()
    assert {item.key for item in declared(Preset)} == {item.key for item in declared(Toy)} | {"extra"}


def test_presets_leave_flags_unset_and_the_given_ones_win():
    presets = {"small": {"steps": 2, "mode": "b"}}
    parser = _parser(Preset, presets=presets)
    flags = {option: action for action in parser._actions for option in action.option_strings}
    assert flags["--steps"].default is None and flags["--steps"].help == "steps (default: 99; small: 2)"
    config = from_args(Preset, parser.parse_args(["--out", "o", "--mode", "a"]), preset=presets["small"])
    assert (config.steps, config.mode, config.seeds) == (2, "a", (5,))
