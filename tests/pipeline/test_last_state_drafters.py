"""MEDUSA and the MLP speculator end to end: `cache build --features last` -> `lkspec train` -> `lkspec bench`."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cache import CacheMismatchError
from pipeline.train_job import plan_run
from trainer.config import TrainConfig
from trainer.drafters import family, family_of_dir
from trainer.rundir import read_metrics, read_run

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


@pytest.mark.slow
def test_medusa_and_mlp_train_from_a_last_cache_and_decode_exactly(hidden_state_cache, target_dir, tmp_path):
    """One sweep (one worker group) trains both families from the shared `aux,last` cache (conftest.py);
    one bench decodes with both at T = 0."""
    from pipeline.bench_job import BenchConfig, run_bench
    from pipeline.train_job import train_sweep

    drafters = {"medusa": ("medusa:heads=3,draft_vocab=256", 10.0),
                "mlp": ("mlp:stages=3,inner=48,draft_vocab=512", 3.0)}  # both over reduced vocabularies
    configs = [TrainConfig(cache=str(hidden_state_cache), out=str(tmp_path / "runs"), drafter=drafter, loss="lk_lambda",
                           workers=1, steps=12, warmup=2, lr=3e-3, batch_tokens=512, eval_every=6,
                           eval_sequences=8, heldout_fraction=0.15, checkpoint_every=0)
               for drafter, _ in drafters.values()]
    run_dirs = train_sweep(configs, progress=False)
    for run_dir, (kind, (_, eta)) in zip(run_dirs, drafters.items()):
        assert run_dir.name.startswith(f"{kind}-lk_lambda-")
        run = read_run(run_dir)
        assert run["status"] == "done" and run["drafter"]["kind"] == kind and run["config"]["eta"] == eta
        metrics = read_metrics(run_dir)
        assert all(len(m["alpha"]) == 3 and len(m["lam"]) == 3 for m in metrics)
        losses = [m["loss"] for m in metrics]
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), (kind, losses)
        assert run["export_check"]["steps"] == 3
        assert run["export_check"]["max_abs_diff"] <= run["export_check"]["tolerance"]
        assert family_of_dir(run_dir / "model") is family(kind)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the cat sat", "a bird sang about"]))
    out = run_bench(BenchConfig(target=str(target_dir), drafters=[str(d) for d in run_dirs],
                                benchmarks=[str(prompts)], temperatures=[0.0], k=4, max_new_tokens=16, workers=1,
                                out=tmp_path / "report", progress=False))
    report = json.loads((out / "report.json").read_text())
    assert [d["kind"] for d in report["drafters"]] == list(drafters)
    assert len(report["results"]) == 2
    for row in report["results"]:
        assert row["greedy_mismatches"] == 0 and row["drafted"] > 0  # lossless at T = 0, and it did draft
