"""`lkspec train` end to end on a local Ray cluster with real DeepSpeed (CPU, gloo), plus the driver's refusals.

The slow tests read runs of one sweep (`two_worker_runs`): every family, ZeRO stage and target source they
check trains in one worker group, which starts once; `lkspec train` itself runs end to end in the ZeRO-3
test, which resumes a run of that sweep.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import CacheMismatchError, open_cache
from pipeline.cli import main
from pipeline.train_job import (_ProgressBar, default_run_name, list_runs, plan_run, prepare_run_dir, sweep_configs,
                                train_sweep)
from trainer.config import ConfigError, TrainConfig
from trainer.data import DataError
from trainer.rundir import read_metrics, read_run, update_run

# The tiny-cache builder lives with the trainer tests; load it as a plain module.
_spec = importlib.util.spec_from_file_location("trainer_cache_helpers",
                                               Path(__file__).parents[1] / "trainer" / "conftest.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

TINY_DRAFTER = {"layers": 1, "hidden": 64, "heads": 2, "kv_heads": 2, "intermediate": 128}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, target_dir) -> Path:
    return helpers.build_cache(tmp_path_factory.mktemp("caches"), target_dir, helpers.random_sequences(48))


def _config(cache, out, **overrides) -> TrainConfig:
    values = dict(cache=str(cache), out=str(out), drafter="tiny", drafter_config=TINY_DRAFTER, workers=2, zero=2,
                  lr=3e-3, warmup=2, batch_tokens=192, steps=6, eval_every=3, checkpoint_every=0,
                  eval_sequences=8, heldout_fraction=0.1, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- refusals (no Ray)
@pytest.mark.parametrize("argv, message", [
    (["--batch-tokens", "0"], "--batch-tokens must be an integer >= 2"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--loss", "kl,nope"], "--loss must be one of kl, tv, lk_alpha, lk_lambda, got 'nope'"),
    (["--loss", "kl,kl"], "--loss lists a loss twice"),
    (["--drafter-config", "layers=two"], "--drafter-config layers must be a number"),
    (["--drafter-config", "depth=3"], "--drafter-config: bad item 'depth=3'"),
    (["--heldout-fraction", "0.9"], "--heldout-fraction must be a finite number > 0 and <= 0.5"),
    (["--workers", "0"], "--workers must be an integer >= 1"),
    (["--run-name", "../x"], "--run-name must be a plain directory name"),
])
def test_bad_flag_values_fail_before_ray_naming_the_flag(tmp_path, capsys, argv, message):
    code = main(["train", "--cache", str(tmp_path), "--out", str(tmp_path / "runs"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_tokenizer_mismatch_is_refused_naming_both(tmp_path, target_dir):
    cache = helpers.build_cache(tmp_path, target_dir, helpers.random_sequences(8, seed=1), num_shards=1,
                                tokenizer_sha256="0" * 64)
    with pytest.raises(CacheMismatchError, match="tokenizer sha256 0{64}, the drafter's tokenizer .* has [0-9a-f]{64}"):
        plan_run(_config(cache, tmp_path / "runs"))


def test_vocabulary_mismatch_is_refused_naming_both(tmp_path, cache_dir, target_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    drafter_dir = tmp_path / "small-vocab-drafter"
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(drafter_dir)
    AutoTokenizer.from_pretrained(target_dir).save_pretrained(drafter_dir)
    with pytest.raises(CacheMismatchError, match="vocabulary size 49152, drafter .* has vocab_size 1000"):
        plan_run(_config(cache_dir, tmp_path / "runs", drafter=str(drafter_dir), drafter_config={}))


def test_empty_cache_is_refused(tmp_path, target_dir):
    cache = helpers.build_cache(tmp_path, target_dir, [], num_shards=1)
    with pytest.raises(DataError, match="is empty"):
        plan_run(_config(cache, tmp_path / "runs"))


def test_too_many_workers_for_the_cache_is_refused(tmp_path, cache_dir):
    with pytest.raises(DataError, match="training sequences for 100 workers"):
        plan_run(_config(cache_dir, tmp_path / "runs", workers=100))


def test_epochs_become_steps_and_run_names_follow_the_loss(tmp_path, cache_dir):
    configs = sweep_configs(_config(cache_dir, tmp_path, steps=None, epochs=2.0), ["kl", "lk_lambda"])
    plans = [plan_run(c) for c in configs]
    key = plans[0].cache_key
    assert [Path(p.run_dir).name for p in plans] == [f"kl-{key[:8]}-s0", f"lk_lambda-{key[:8]}-s0"]
    one_epoch = plan_run(_config(cache_dir, tmp_path, steps=None, epochs=1.0)).total_steps
    assert plans[0].total_steps >= 2 * one_epoch - 1 and one_epoch >= 3  # ~21 sequences per worker, ~7 per batch
    named = sweep_configs(_config(cache_dir, tmp_path, run_name="ablation"), ["kl", "tv"])
    assert [c.run_name for c in named] == ["ablation-kl", "ablation-tv"]


def test_default_run_names_keep_eagle3_and_independent_sweeps_apart(tmp_path):
    key = "ab12cd34" + "0" * 12
    names = [default_run_name(TrainConfig(cache="c", out=str(tmp_path), drafter=drafter, loss="kl"), key)
             for drafter in ("tiny", "eagle3", "eagle3:draft_vocab=256")]
    assert names == ["kl-ab12cd34-s0", "eagle3-kl-ab12cd34-s0", "eagle3-kl-ab12cd34-s0"]


def test_a_model_alias_as_drafter_resolves_to_its_local_directory(tmp_path, cache_dir, smollm2_path):
    plan = plan_run(_config(cache_dir, tmp_path, drafter="smollm2-135m", drafter_config={}))
    assert plan.drafter["source"] == "dir" and Path(plan.drafter["path"]) == Path(smollm2_path).resolve()


def test_an_existing_run_needs_resume_with_the_same_settings(tmp_path, cache_dir):
    plan = plan_run(_config(cache_dir, tmp_path))
    Path(plan.run_dir).mkdir(parents=True)
    (Path(plan.run_dir) / "run.json").write_text(json.dumps({"status": "stopped", "config": plan.config.to_dict(),
                                                              "cache": {"key": plan.cache_key}}))
    with pytest.raises(ConfigError, match="already holds a run .*pass --resume"):
        plan_run(_config(cache_dir, tmp_path))
    with pytest.raises(ConfigError, match=r"different settings \(--lr 0.003 -> 0.001\)"):
        plan_run(_config(cache_dir, tmp_path, resume=True, lr=1e-3))
    assert plan_run(_config(cache_dir, tmp_path, resume=True, stop_after=3)).run_dir == plan.run_dir


def test_a_stopped_run_from_before_exact_heldout_existed_resumes_and_may_add_it(tmp_path, cache_dir):
    plan = plan_run(_config(cache_dir, tmp_path))
    Path(plan.run_dir).mkdir(parents=True)
    older = {k: v for k, v in plan.config.to_dict().items() if k != "exact_heldout"}  # a run.json of an older lkspec
    (Path(plan.run_dir) / "run.json").write_text(json.dumps({"status": "stopped", "config": older,
                                                              "cache": {"key": plan.cache_key}}))
    assert plan_run(_config(cache_dir, tmp_path, resume=True)).target_path is None
    # an evaluation-only setting: a resumed run may add the exact α to its evaluations still to come
    assert plan_run(_config(cache_dir, tmp_path, resume=True, exact_heldout=True)).target_path is not None


def test_exact_heldout_is_a_flag_that_plans_the_target_into_each_worker(tmp_path, cache_dir):
    [config] = _cli_configs(cache_dir, tmp_path, [*TINY_FLAGS, "--exact-heldout"])
    assert config.exact_heldout and not _cli_configs(cache_dir, tmp_path, TINY_FLAGS)[0].exact_heldout
    plan = plan_run(config)
    assert plan.target_path is not None and Path(plan.target_path).is_dir()  # the cache's own target
    assert plan_run(_config(cache_dir, tmp_path)).target_path is None  # scored against the cache alone


def test_a_rerun_starts_from_the_last_checkpoint_with_its_log_and_progress_bar_to_match(tmp_path, cache_dir, capsys):
    config = dict(steps=120, checkpoint_every=120)
    first = plan_run(_config(cache_dir, tmp_path, **config))
    run_dir = Path(first.run_dir)
    prepare_run_dir(first, use_gpu=False)
    old_log = "".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 90)) + '{"step": 9'
    (run_dir / "metrics.jsonl").write_text(old_log)  # killed at step 89 (mid-write), before its first checkpoint
    resumed = plan_run(_config(cache_dir, tmp_path, resume=True, **config))
    assert prepare_run_dir(resumed, use_gpu=False) == 0  # no checkpoint: training starts over
    assert read_metrics(run_dir) == [] and read_run(run_dir)["steps_done"] == 0

    (run_dir / "checkpoints" / "step-00000050").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step-00000050")
    (run_dir / "metrics.jsonl").write_text(old_log)
    assert prepare_run_dir(resumed, use_gpu=False) == 50
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 51))
    assert read_run(run_dir)["steps_done"] == 50
    capsys.readouterr()
    update_run(run_dir, status="stopped")  # the bar follows a run until it ends
    bar = _ProgressBar([resumed], [50])
    bar.stop()
    err = capsys.readouterr().err
    assert " 50/120 " in err and "89/120" not in err


def test_the_cache_target_is_found_from_the_build_stats_and_verified(tmp_path, target_dir, tiny_llama_dir):
    cache = helpers.build_cache(tmp_path, target_dir, helpers.random_sequences(8, seed=2), num_shards=1,
                                record_target_path=False)
    with pytest.raises(ConfigError, match="pass --target MODEL"):
        plan_run(_config(cache, tmp_path / "runs"))
    (cache / "stats.json").write_text(json.dumps({"target": str(tiny_llama_dir)}))  # not the cache's target
    with pytest.raises(ConfigError, match="pass --target MODEL"):
        plan_run(_config(cache, tmp_path / "runs"))
    (cache / "stats.json").write_text(json.dumps({"target": str(target_dir)}))  # what `lkspec cache build` writes
    plan = plan_run(_config(cache, tmp_path / "runs", target_source="online"))
    assert plan.tokenizer_dir == plan.target_path == str(target_dir.resolve())


def test_online_target_must_be_the_cache_target(tmp_path, cache_dir, tiny_llama_dir):
    with pytest.raises(CacheMismatchError, match="was built from target weights"):
        plan_run(_config(cache_dir, tmp_path, target_source="online", target=str(tiny_llama_dir)))


# -------------------------------------------------------------------- training on Ray (slow)
TINY_FLAGS = ["--drafter", "tiny", "--drafter-config", "layers=1,hidden=64,heads=2,kv_heads=2,intermediate=128",
              "--workers", "2", "--lr", "3e-3", "--warmup", "2", "--batch-tokens", "192", "--eval-sequences", "8",
              "--heldout-fraction", "0.1"]  # the drafter and optimizer settings of _config
ZERO3_FLAGS = [*TINY_FLAGS, "--zero", "3", "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4"]
ONLINE_FLAGS = [*TINY_FLAGS, "--loss", "lk_lambda,lk_alpha", "--zero", "1", "--steps", "4", "--eval-every", "0",
                "--target-source", "online"]  # the target model runs in each worker
EAGLE3 = "eagle3:draft_vocab=256,steps=3"
EAGLE3_FLAGS = ["--loss", "kl,lk_lambda", "--drafter", EAGLE3, "--workers", "2", "--zero", "2", "--steps", "16",
                "--warmup", "2", "--lr", "3e-3", "--batch-tokens", "512", "--eval-every", "4", "--eval-sequences", "8",
                "--heldout-fraction", "0.15", "--no-progress"]
STATE_DRAFTERS = {"medusa": ("medusa:heads=3,draft_vocab=256", 10.0),  # family: (drafter, its default eta)
                  "mlp": ("mlp:stages=3,inner=48,draft_vocab=512", 3.0)}  # both over reduced vocabularies


@pytest.fixture(scope="module")
def hidden_state_cache(ray_address, target_dir, tmp_path_factory) -> Path:
    """A real `cache build --features aux,last` of the tiny target over 32 conversations of a small word set.

    EAGLE-3 reads its `aux` column; MEDUSA and the MLP speculator read `last`.
    """
    from pipeline.build import BuildConfig, run_build

    words = "the cat sat on a mat and ran far away from home to see a bird sing about rivers".split()
    rng = np.random.default_rng(0)
    data = tmp_path_factory.mktemp("data") / "chat.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": [
        {"role": "user", "content": " ".join(rng.choice(words, 6))},
        {"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(20, 50))))}]}) + "\n"
        for i in range(32)))
    outcome = run_build(BuildConfig(target=str(target_dir), data=str(data),
                                    out=tmp_path_factory.mktemp("hidden-state-caches"), k=8, max_length=256,
                                    shard_size=8, workers=1, threads=1, features=("aux", "last"), progress=False))
    return outcome.path


def _cli_configs(cache: Path, out: Path, flags: list[str]) -> list[TrainConfig]:
    """The runs `lkspec train --cache CACHE --out OUT FLAGS` plans."""
    from pipeline.cli import build_parser, parse_with_config
    from pipeline.cli_train import configs_from_args

    return configs_from_args(parse_with_config(build_parser(), ["train", "--cache", str(cache), "--out", str(out),
                                                                *flags]))


@pytest.fixture(scope="module")
def cache_before_training(cache_dir) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file of the cache before the module's runs train from it."""
    return _snapshot(cache_dir)


@pytest.fixture(scope="module")
def two_worker_runs(ray_address, cache_dir, cache_before_training, hidden_state_cache,
                    tmp_path_factory) -> dict[str, list[Path]]:
    """The runs of the slow tests below, trained in one sweep: one worker group of two (one TorchTrainer start
    where a group per test started five); each test's runs in a directory of their own.

    zero2: 24 steps of KL under ZeRO-2. zero3: `lkspec train ZERO3_FLAGS` in full (run `full`), and stopped
    after step 5 (run `part`, which the ZeRO-3 test resumes). online: the two runs `lkspec train ONLINE_FLAGS`
    plans. eagle3: those of `lkspec train --cache <aux,last cache> EAGLE3_FLAGS`. state: MEDUSA and the MLP
    speculator from the same cache's `last` column.
    """
    out = {name: tmp_path_factory.mktemp(f"{name}-runs") for name in ("zero2", "zero3", "online", "eagle3", "state")}
    groups = {
        "zero2": [_config(cache_dir, out["zero2"], steps=24, eval_every=8, checkpoint_every=12)],
        "zero3": [*_cli_configs(cache_dir, out["zero3"], [*ZERO3_FLAGS, "--run-name", "full"]),
                  *_cli_configs(cache_dir, out["zero3"], [*ZERO3_FLAGS, "--run-name", "part", "--stop-after", "5"])],
        "online": _cli_configs(cache_dir, out["online"], ONLINE_FLAGS),
        "eagle3": _cli_configs(hidden_state_cache, out["eagle3"], EAGLE3_FLAGS),
        "state": [TrainConfig(cache=str(hidden_state_cache), out=str(out["state"]), drafter=drafter, loss="lk_lambda",
                              workers=2, steps=12, warmup=2, lr=3e-3, batch_tokens=512, eval_every=6,
                              eval_sequences=8, heldout_fraction=0.15, checkpoint_every=0, exact_heldout=True)
                  for drafter, _ in STATE_DRAFTERS.values()],
    }
    run_dirs = iter(train_sweep([config for configs in groups.values() for config in configs], progress=False))
    return {name: [next(run_dirs) for _ in configs] for name, configs in groups.items()}


@pytest.fixture(scope="module")
def zero2_run(two_worker_runs) -> Path:
    """Two workers, ZeRO-2, 24 steps of KL."""
    return two_worker_runs["zero2"][0]


@pytest.mark.slow
def test_two_workers_zero2_loss_falls(zero2_run):
    metrics = read_metrics(zero2_run)
    assert [m["step"] for m in metrics] == list(range(1, 25))
    losses = [m["loss"] for m in metrics]
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.5, losses
    assert all(0.0 <= m["alpha"][0] <= 1.0 and m["tokens_per_s"] > 0 and m["tau"] >= 1.0 for m in metrics)
    assert metrics[0]["lr"] < metrics[1]["lr"] == pytest.approx(3e-3)  # warm-up, then cosine decay
    assert metrics[-1]["lr"] < metrics[5]["lr"]
    evals = [m for m in metrics if "eval" in m]
    assert [m["step"] for m in evals] == [8, 16, 24]
    run = read_run(zero2_run)
    assert run["status"] == "done" and run["world_size"] == 2 and run["zero"] == 2
    assert run["dtype"] == "fp32"  # --dtype auto on the AVX2 CPU the tests assume (conftest)
    assert run["best"]["tau"] == max(m["eval"]["tau"] for m in evals)
    assert (zero2_run / "best" / "config.json").is_file()
    assert any((zero2_run / "tb").iterdir())
    tags = sorted(p.name for p in (zero2_run / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step-00000012", "step-00000024"]


@pytest.mark.slow
def test_exported_drafter_reloads_with_the_trained_logits(zero2_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    probe = load_file(str(zero2_run / "export_probe.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(zero2_run / "model").eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.reshape(-1, model.config.vocab_size)
    torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=1e-4)
    assert read_run(zero2_run)["export_check"]["max_abs_diff"] < 1e-4
    assert AutoTokenizer.from_pretrained(zero2_run / "model").vocab_size > 0
    assert list((zero2_run / "model").glob("*.safetensors"))


@pytest.mark.slow
def test_runs_lists_the_run(zero2_run, capsys):
    assert main(["runs", str(zero2_run.parent)]) == 0
    table = capsys.readouterr().out
    assert zero2_run.name in table and "done" in table and "24/24" in table
    [row] = list_runs(zero2_run.parent)
    assert row["loss"] == "kl" and row["heldout_step"] == 24
    assert 1.0 <= row["heldout_tau_drop"] <= row["heldout_tau_bucket"]
    assert all(0 <= d <= b <= 1 for d, b in zip(row["heldout_alpha_drop"], row["heldout_alpha_bucket"]))


@pytest.mark.slow
def test_heldout_json_holds_the_per_sequence_sums_of_the_last_evaluation(zero2_run):
    from trainer.heldout import read_heldout

    run, plan = read_run(zero2_run), json.loads((zero2_run / "plan.json").read_text())
    sums = read_heldout(zero2_run)
    assert sums.step == 24 and sums.sample_ids == plan["eval_ids"]  # every rank's share, in the plan's order
    final = run["final"]["eval"]
    assert sums.pooled("alpha_bucket_sum") == pytest.approx(final["alpha"])
    assert sums.pooled("alpha_drop_sum") == pytest.approx(final["alpha_lower"])
    assert run["heldout"]["alpha_drop"] == pytest.approx(final["alpha_lower"])
    assert run["heldout"]["tau_bucket"] == pytest.approx(final["tau"])
    assert run["heldout"]["sequences"] == len(plan["eval_ids"]) and run["heldout"]["num_heldout"] >= 1


@pytest.mark.slow
def test_a_finished_run_resumed_with_exact_heldout_is_scored_again_not_trained(zero2_run, cache_dir, tmp_path,
                                                                              capsys):
    """`--resume --exact-heldout` on a done run: its final checkpoint's evaluation again, now with the exact α."""
    import shutil

    from safetensors.torch import load_file

    from trainer.heldout import EXACT, HELDOUT_JSON, read_heldout

    run_dir = tmp_path / "runs" / zero2_run.name  # a copy: the module's other tests read the original
    shutil.copytree(zero2_run, run_dir)
    trained = read_run(run_dir)
    (run_dir / "run.json").write_text(json.dumps({**trained, "config": {**trained["config"],
                                                                         "out": str(run_dir.parent)}}))
    before, weights = read_heldout(run_dir), load_file(str(run_dir / "model" / "model.safetensors"))
    metrics = (run_dir / "metrics.jsonl").read_text()
    config = _config(cache_dir, run_dir.parent, steps=24, eval_every=8, checkpoint_every=12, resume=True,
                     exact_heldout=True)
    train_sweep([config], progress=False)
    assert "its final evaluation again, with the exact held-out α" in capsys.readouterr().err
    after, run = read_heldout(run_dir), read_run(run_dir)
    assert after.quantities[-1] == EXACT and after.step == 24
    np.testing.assert_allclose(after.sums[:4], before.sums, rtol=1e-6)  # the same weights, the same bounds
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing trained, nothing logged
    for name, tensor in load_file(str(run_dir / "model" / "model.safetensors")).items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)
    assert run["status"] == "done" and run["steps_done"] == 24 and run["rescored"] > trained["finished"]
    for key in ("finished", "worker_timings", "best", "export_check", "started"):  # the training's record stays
        assert run[key] == trained[key], key
    assert run["final"]["train"] == trained["final"]["train"]
    assert run["final"]["eval"]["alpha_exact"] == pytest.approx(after.pooled(EXACT))
    assert run["heldout"]["alpha_exact"] == pytest.approx(after.pooled(EXACT))
    drop, exact, bucket = (np.array(run["heldout"][f"alpha_{m}"]) for m in ("drop", "exact", "bucket"))
    assert (drop <= exact + 1e-3).all() and (exact <= bucket + 1e-3).all()

    scored = (run_dir / HELDOUT_JSON).stat().st_mtime_ns
    train_sweep([config], progress=False)  # scored already: nothing to do
    assert "already done (24 steps)" in capsys.readouterr().err
    assert (run_dir / HELDOUT_JSON).stat().st_mtime_ns == scored

    shutil.rmtree(run_dir / "checkpoints")  # without its final checkpoint, resuming would train it again
    (run_dir / "run.json").write_text(json.dumps({**run, "heldout": {}}))
    with pytest.raises(ConfigError, match="checkpoint of step 24 is gone: --exact-heldout cannot score it"):
        plan_run(config)


@pytest.mark.slow
def test_cli_sweep_of_two_losses_reads_one_cache_without_rebuilding_it(two_worker_runs, cache_dir,
                                                                       cache_before_training):
    """`lkspec train ONLINE_FLAGS`: LK^α and LK^λ under ZeRO-1, the target model running online in each worker.

    The cache is as it was before the module's sweep, whose runs all read it.
    """
    assert _snapshot(cache_dir) == cache_before_training
    run_dirs = sorted(two_worker_runs["online"])
    runs = [read_run(d) for d in run_dirs]
    assert [r["loss"] for r in runs] == ["lk_alpha", "lk_lambda"] and all(r["status"] == "done" for r in runs)
    assert {r["cache"]["key"] for r in runs} == {cache_dir.name}
    assert all(r["target_source"] == "online" and r["zero"] == 1 for r in runs)
    assert all(r["steps_done"] == r["total_steps"] == 4 for r in runs)
    lam = [m["lam"][0] for m in read_metrics(run_dirs[1])]
    assert all(0 < x <= 1 for x in lam)
    assert all(m["lam"] is None for m in read_metrics(run_dirs[0]))
    final = runs[0]["final"]["eval"]
    assert final["alpha"] == final["alpha_lower"]  # a full target distribution has no tail to bound
    assert final["alpha_exact"] == final["alpha"]  # and online targets are the exact α's reference
    assert runs[0]["heldout"]["alpha_exact"] == final["alpha"]


@pytest.mark.slow
def test_stopped_and_resumed_run_logs_the_same_losses_zero3(two_worker_runs, cache_dir, capsys):
    """Run `part` of the sweep, stopped after step 5, resumed by `lkspec train ... --resume` (end to end:
    its progress bar and closing table) logs the losses of run `full`."""
    full, part = two_worker_runs["zero3"]
    assert read_run(part)["status"] == "stopped" and len(read_metrics(part)) == 5
    # As if killed after logging step 5 but before its checkpoint: resume from step 4, redo step 5.
    checkpoints = part / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-00000005"
    (checkpoints / "latest").write_text("step-00000004")
    code = main(["train", "--cache", str(cache_dir), "--out", str(part.parent), *ZERO3_FLAGS, "--run-name", "part",
                 "--resume"])
    assert code == 0
    out, err = capsys.readouterr()
    assert "part" in out and "8/8" in out and "full" not in out  # the closing table: the resumed run
    assert "8/8" in err  # the progress bar
    full_losses = [m["loss"] for m in read_metrics(full)]
    part_losses = [m["loss"] for m in read_metrics(part)]
    assert len(part_losses) == 8
    np.testing.assert_allclose(part_losses, full_losses, rtol=1e-5, atol=1e-6)
    assert read_run(part)["status"] == "done"
    assert read_run(part)["best"]["tau"] == pytest.approx(read_run(full)["best"]["tau"], rel=1e-5)


# ------------------------------------------------------------------------------- EAGLE-3
def test_eagle3_refuses_a_cache_without_aux_features_saying_how_to_build_one(tmp_path, cache_dir):
    with pytest.raises(CacheMismatchError, match="has no 'aux' feature column .*lkspec cache build --target .* "
                                                 "--features aux"):
        plan_run(_config(cache_dir, tmp_path, drafter=EAGLE3, drafter_config={}))


@pytest.mark.parametrize("argv, message", [
    (["--drafter", "eagle3:layers=2"], "--drafter eagle3: bad option 'layers=2'"),
    (["--drafter", "eagle3:steps=0"], "--drafter eagle3 steps must be > 0"),
    (["--drafter", "eagle3", "--drafter-config", "layers=2"], "--drafter-config does not apply to EAGLE-3"),
])
def test_bad_eagle3_options_fail_before_ray_naming_the_option(tmp_path, capsys, argv, message):
    assert main(["train", "--cache", str(tmp_path), "--out", str(tmp_path / "runs"), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_eagle3_sweep_trains_from_an_aux_cache_and_exports_a_loadable_drafter(two_worker_runs, hidden_state_cache):
    """The sweep `lkspec train ... EAGLE3_FLAGS` plans, from the `aux,last` cache: EAGLE-3 reads `aux` only."""
    from cache import open_cache
    from trainer.drafters.eagle3.export import is_eagle3_dir, load_eagle3

    aux = open_cache(hidden_state_cache).manifest["features"]["aux"]
    assert [read_run(d)["loss"] for d in two_worker_runs["eagle3"]] == ["kl", "lk_lambda"]
    for run_dir in two_worker_runs["eagle3"]:
        run = read_run(run_dir)
        assert run["status"] == "done" and run["drafter"]["kind"] == "eagle3" and run["drafter"]["draft_vocab"] == 256
        metrics = read_metrics(run_dir)
        assert all(len(m["alpha"]) == 3 for m in metrics)
        losses = [m["loss"] for m in metrics]
        assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
        evals = [m["eval"] for m in metrics if "eval" in m]
        assert evals[-1]["alpha"][0] > evals[0]["alpha"][0], [e["alpha"] for e in evals]
        assert run["export_check"]["steps"] == 3
        assert run["export_check"]["max_abs_diff"] <= run["export_check"]["tolerance"]
        model_dir = run_dir / "model"
        assert is_eagle3_dir(model_dir)
        model = load_eagle3(model_dir)
        plan = json.loads((run_dir / "plan.json").read_text())
        assert model.draft_ids.tolist() == plan["drafter"]["draft_vocab"] and plan["columns"] == ["aux"]
        config = json.loads((model_dir / "config.json").read_text())
        assert config["eagle_aux_hidden_state_layer_ids"] == aux["layers"]
        assert config["target_hidden_size"] * 3 == aux["dim"]


# ------------------------------------------------------------- MEDUSA and the MLP speculator
@pytest.mark.slow
def test_medusa_and_mlp_train_from_a_last_cache_and_decode_exactly(two_worker_runs, target_dir, tmp_path):
    """Both families train from the cache's `last` column (in the shared sweep); one bench decodes with both, T = 0."""
    from pipeline.bench_job import BenchConfig, run_bench
    from trainer.drafters import family, family_of_dir

    run_dirs = two_worker_runs["state"]
    for run_dir, (kind, (_, eta)) in zip(run_dirs, STATE_DRAFTERS.items()):
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
    assert [d["kind"] for d in report["drafters"]] == list(STATE_DRAFTERS)
    assert len(report["results"]) == 2
    for row in report["results"]:
        assert row["greedy_mismatches"] == 0 and row["drafted"] > 0  # lossless at T = 0, and it did draft


@pytest.mark.slow
def test_exact_heldout_alpha_of_medusa_and_mlp_is_their_overlap_with_the_target(two_worker_runs, hidden_state_cache,
                                                                                 target_dir, capsys):
    """`--exact-heldout` (the state runs of the sweep): each held-out sequence's Σα against the target's full
    distribution equals Σ_V min(p, q) written out from the exported heads and the target's own forward."""
    from transformers import AutoModelForCausalLM

    from trainer.data import collate
    from trainer.drafters import family_of_dir
    from trainer.heldout import EXACT, read_heldout

    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    reader = open_cache(hidden_state_cache)
    for run_dir in two_worker_runs["state"]:
        sums = read_heldout(run_dir)
        assert sums.quantities[-1] == EXACT
        drop, bucket, exact, positions = (sums.sums[sums.quantities.index(q)] for q in
                                          ("alpha_drop_sum", "alpha_bucket_sum", EXACT, "positions"))
        slack = 1e-3 * positions
        assert (drop <= exact + slack).all() and (exact <= bucket + slack).all() and (exact < bucket - slack).any()
        assert read_run(run_dir)["heldout"]["alpha_exact"] == pytest.approx(sums.pooled(EXACT))

        family = family_of_dir(run_dir / "model")
        drafter = family.drafter_class(family.load(run_dir / "model", torch.float32)).eval()
        draft_ids = drafter.vocab_map
        records = {r.sample_id: r for r in reader.iter_sequences(columns=("last",))}
        for i, sample_id in enumerate(sums.sample_ids[:3]):
            batch = collate([records[sample_id]], batch_tokens=512, columns=("last",))
            with torch.no_grad():
                p = torch.softmax(target(input_ids=batch.input_ids).logits[0][batch.target_pos].double(), dim=-1)
                steps = drafter(batch.model_inputs())
            for n, step in enumerate(steps):
                q = torch.softmax(step.logits.double(), dim=-1)  # over the draft vocabulary
                rows = p if step.rows is None else p[step.rows]
                expected = torch.minimum(rows[:, draft_ids], q).sum()  # q is 0 outside the draft vocabulary
                assert exact[i, n] == pytest.approx(float(expected), rel=1e-4, abs=1e-6), (run_dir.name, i, n)

    assert main(["runs", str(two_worker_runs["state"][0].parent)]) == 0
    table = capsys.readouterr().out
    assert "held-out α (exact)" in table and "E[τ] (exact)" in table
