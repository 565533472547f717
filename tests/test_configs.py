"""The shipped configs/ files are accepted by their commands (keys and values validated)."""
from pathlib import Path

import pytest

from pipeline.cli import build_parser, parse_with_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("argv", [
    ["demo", "--config", str(CONFIGS / "demo.yaml")],
    ["train", "--cache", "some-cache", "--config", str(CONFIGS / "train-sweep.yaml")],
])
def test_shipped_config_parses(argv):
    args = parse_with_config(build_parser(), argv)
    assert args.config.endswith(".yaml")
    assert "lk_lambda" in args.loss


def test_demo_config_matches_the_demo_defaults():
    from pipeline.cli_demo import demo_config
    from pipeline.demo import DemoConfig

    args = parse_with_config(build_parser(), ["demo", "--config", str(CONFIGS / "demo.yaml")])
    assert demo_config(args) == DemoConfig()  # every key, not just the sizes
