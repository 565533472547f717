"""Each stage config is declared once: its command's flags, its `--config` YAML keys and its errors come from it."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from pipeline.bench_job import BenchConfig
from pipeline.build import BuildConfig
from pipeline.cli import _leaf_parsers, build_parser, config_file_defaults, parse_with_config
from pipeline.cli_error import CliError
from pipeline.demo import DemoConfig
from pipeline.profiles import DEMO_PROFILES
from pipeline.stages import StageConfig
from pipeline.study import StudyConfig
from trainer.config import TrainConfig
from trainer.settings import declared

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
COMMANDS = {  # command -> (its stage config, the flags it adds itself)
    "lkspec cache build": (BuildConfig, set()),
    "lkspec train": (TrainConfig, {"--loss", "--address", "--no-progress"}),
    "lkspec bench": (BenchConfig, set()),
    "lkspec study": (StudyConfig, set()),
    "lkspec demo": (DemoConfig, {"--profile"}),
}


def _leaves() -> dict:
    return {leaf.prog: leaf for leaf in _leaf_parsers(build_parser())}


EXAMPLES = {  # a valid YAML value for each setting whose default is none, empty or missing
    "target": "t", "data": "d", "out": "o", "cache": "c", "drafter": "d", "drafter_config": "layers=2",
    "features": "last", "limit": "3", "threads": "2", "steps": "5", "max_new_tokens": "5", "stop_after": "5",
    "epochs": "2.0", "eta": "3.0", "init_embeddings_from": "target", "run_name": "r", "address": "127.0.0.1:1",
}


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_every_declared_setting_is_a_flag_and_a_yaml_key_and_nothing_else_is(tmp_path, prog):
    cls, own = COMMANDS[prog]
    leaf = _leaves()[prog]
    actions = {action.dest: action for action in leaf._actions if action.option_strings}
    flags = {option for action in actions.values() for option in action.option_strings} - {"-h", "--help", "--config"}
    items = [item for item in declared(cls) if item.setting.cli]
    assert flags == {option for item in items for option in actions[item.dest].option_strings} | own
    for item in items:
        assert actions[item.dest].declared == item and actions[item.dest].help.startswith(item.setting.help)
        path = tmp_path / f"{item.dest}.yaml"
        path.write_text(f"{item.dest.replace('_', '-')}: {_yaml_value(item)}\n")
        assert item.dest in config_file_defaults(leaf, str(path))


def _yaml_value(item) -> str:
    if item.switch:
        return "true"
    if item.key in EXAMPLES:
        return EXAMPLES[item.key]
    if isinstance(item.default, (list, tuple)):
        return "[" + ", ".join(map(str, item.default)) + "]"
    return str(item.default)


@pytest.mark.parametrize("prog, text, message", [
    ("lkspec study", "steps: 0\n", "key 'steps' must be an integer >= 1, got 0"),
    ("lkspec study", "heldout-fraction: 0.9\n", "key 'heldout-fraction' must be a number in (0, 0.5], got 0.9"),
    ("lkspec study", "tail: [drop, top]\n", "key 'tail' must be distinct tail modes from bucket, drop, got 'top'"),
    ("lkspec study", "seeds: [0, x]\n", "bad value for key 'seeds'"),
    ("lkspec demo", "loss: [kl, nope]\n", "key 'loss' must be distinct losses from kl, tv, lk_alpha, lk_lambda"),
    ("lkspec demo", "bench-dtype: fp16\n", "key 'bench-dtype' must be one of auto, fp32, bf16, got 'fp16'"),
    ("lkspec train", "zero: 4\n", "key 'zero' must be one of 1, 2, 3, got 4"),
    ("lkspec train", "lr: -1\n", "key 'lr' must be a finite number > 0, got -1.0"),
    ("lkspec train", "no-progress: 1\n", "key 'no-progress' must be true or false, got 1"),
    ("lkspec cache build", "gpus-per-worker: 0\n", "key 'gpus-per-worker' must be auto or an integer >= 1, got 0"),
    ("lkspec cache build", "features: mid\n", "bad value for key 'features': 'mid' (must be none, last, aux"),
    ("lkspec bench", "temperature: [0, -1]\n", "key 'temperature' must be >= 0, got -1.0"),
    ("lkspec bench", "seed: 0\nthreads-per-worker: 2\n", "unknown key 'threads-per-worker'"),
])
def test_a_bad_yaml_value_is_refused_naming_the_file_and_the_key(tmp_path, prog, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CliError) as caught:
        config_file_defaults(_leaves()[prog], str(path))
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


@pytest.mark.parametrize("argv, message", [
    (["cache", "build", "--target", "t", "--data", "d", "--out", "o", "--workers", "0"],
     "--workers must be an integer >= 1, got 0"),
    (["bench", "--target", "t", "--drafter", "d", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["demo", "--temperature", "0,x"], "--temperature expects a comma-separated list of float, got '0,x'"),
    (["demo", "--bench", "mt-bench,mmlu"], "--bench must be benchmarks from mt-bench, humaneval, gsm8k"),
    (["study", "--topk-temperature", "-1"], "--topk-temperature must be numbers >= 0, got -1.0"),
])
def test_a_bad_flag_is_refused_naming_the_flag(tmp_path, capsys, argv, message):
    from pipeline.cli import main

    assert main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] in ("demo", "study") else [])]) == 2
    assert message in capsys.readouterr().err


def test_demo_yaml_spells_out_the_demo_preset_of_the_shared_stage_config():
    args = parse_with_config(build_parser(), ["demo", "--config", str(CONFIGS / "demo.yaml")])
    keys = {line.split(":")[0] for line in (CONFIGS / "demo.yaml").read_text().splitlines()
            if line and not line.startswith("#")}
    assert keys | {"address"} == {item.dest.replace("_", "-") for item in declared(DemoConfig) if item.setting.cli}
    demo, shared = DemoConfig(), StageConfig()
    assert all(getattr(args, item.dest) == getattr(demo, item.name)
               for item in declared(DemoConfig) if item.setting.cli)
    preset = {f.name for f in fields(StageConfig) if getattr(demo, f.name) != getattr(shared, f.name)}
    assert preset == {"out", "conversations", "losses", "steps", "batch_tokens", "lr", "bench_limit", "draft_k",
                      "max_new_tokens"}  # the sizes; models, data and the rest are the study's
    assert isinstance(demo, StageConfig) and isinstance(StudyConfig(), StageConfig)


def test_every_profile_names_only_declared_demo_settings():
    names = {item.name for item in declared(DemoConfig)}
    assert all(set(profile) <= names for profile in DEMO_PROFILES.values())


def test_the_demo_hands_the_target_only_to_families_that_take_something_from_it():
    from pipeline.demo import DemoConfig, stage_configs

    flags = {drafter: stage_configs(DemoConfig(drafter=drafter))[1][0].init_embeddings_from
             for drafter in ("tiny", "medusa:heads=1", "mlp:stages=2")}
    assert flags == {"tiny": "target", "medusa:heads=1": "target", "mlp:stages=2": None}


def test_a_stage_run_checkpoints_every_quarter_of_its_steps_so_a_killed_run_keeps_most_of_its_work():
    from pipeline.demo import DemoConfig, stage_configs

    for steps, every in ((80, 20), (120, 30), (10, 3), (1, 1)):
        train = stage_configs(DemoConfig(steps=steps))[1][0]
        assert (train.checkpoint_every, train.resume) == (every, True)
