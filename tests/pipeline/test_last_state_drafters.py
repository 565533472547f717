"""MEDUSA and the MLP speculator: a cache without `last` is refused, eta defaults to the family's.

Their end-to-end test (`cache build --features last` -> `lkspec train` -> `lkspec bench`, lossless at T = 0)
is test_train_job.py::test_medusa_and_mlp_train_from_a_last_cache_and_decode_exactly: it trains in the worker
group of the other two-worker runs there.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cache import CacheMismatchError
from pipeline.cli import main
from pipeline.train_job import plan_run
from trainer.config import TrainConfig

_spec = importlib.util.spec_from_file_location("trainer_cache_helpers",
                                               Path(__file__).parents[1] / "trainer" / "conftest.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


@pytest.mark.parametrize("drafter", ["medusa", "mlp:stages=2"])
def test_a_cache_without_the_last_feature_is_refused_with_the_command_that_builds_one(drafter, target_dir,
                                                                                       tmp_path):
    cache = helpers.build_cache(tmp_path / "caches", target_dir, helpers.random_sequences(8), num_shards=1)
    config = TrainConfig(cache=str(cache), out=str(tmp_path / "runs"), drafter=drafter, steps=2)
    with pytest.raises(CacheMismatchError, match=r"has no 'last' feature column \(features: none\): .*final hidden "
                                                 r"state.*lkspec cache build --target .* --features last"):
        plan_run(config)


@pytest.mark.parametrize("argv, eta", [(["--drafter", "medusa"], 10.0), (["--drafter", "mlp"], 3.0),
                                       (["--drafter", "tiny"], 3.0), (["--drafter", "medusa", "--eta", "2"], 2.0)])
def test_eta_defaults_to_the_drafter_familys(argv, eta, tmp_path):
    from pipeline.cli import build_parser
    from pipeline.cli_train import configs_from_args

    args = build_parser().parse_args(["train", "--cache", str(tmp_path), "--out", str(tmp_path), *argv])
    [config] = configs_from_args(args)
    assert config.eta == eta


def test_a_sweep_of_truncated_mlp_runs_says_once_that_vllm_cannot_load_them(target_dir, tmp_path, capsys):
    cache = helpers.build_cache(tmp_path / "caches", target_dir, helpers.random_sequences(8), num_shards=1, last=True)
    runs = tmp_path / "runs"
    (runs / "sweep-lk_alpha").mkdir(parents=True)
    (runs / "sweep-lk_alpha" / "run.json").write_text('{"status": "done"}')  # planning stops at the third run
    drafter = "mlp:stages=2,draft_vocab=64"
    code = main(["train", "--cache", str(cache), "--out", str(runs), "--drafter", drafter, "--loss", "kl,tv,lk_alpha",
                 "--run-name", "sweep", "--steps", "2", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "sweep-lk_alpha already holds a run (done)" in err  # all three runs were planned
    assert err.count(f"lkspec: warning: --drafter {drafter}: every run's model/ will be in lkspec's own layout, "
                     "which vLLM does not load") == 1
