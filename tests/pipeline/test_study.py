"""`lkspec study`: the interval maths against scipy, refusals before Ray, and a tiny end-to-end study."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from eval.stats import paired_ratio_bootstrap, student_t_quantile, t_interval
from pipeline import study as study_module
from pipeline.cli import build_parser, main, parse_with_config
from pipeline.study import StudyConfig, run_study

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _ratio_of_pooled_tau(tokens_a, forwards_a, tokens_b, forwards_b, axis=-1):
    return (np.sum(tokens_b, axis) / np.sum(forwards_b, axis)) / (np.sum(tokens_a, axis) / np.sum(forwards_a, axis))


def _decodes(rng, shape, acceptance):
    """tokens and target forwards of `shape` decodes with a per-forward acceptance of about `acceptance`."""
    forwards = rng.integers(8, 20, size=shape)
    tokens = forwards + rng.binomial(forwards * 3, acceptance)
    return tokens, forwards


# ------------------------------------------------------------------------------ statistics
def test_prompt_bootstrap_matches_scipy_paired_percentile_bootstrap():
    rng = np.random.default_rng(1)
    tokens_a, forwards_a = _decodes(rng, (1, 30), 0.2)
    tokens_b, forwards_b = _decodes(rng, (1, 30), 0.25)
    ours = paired_ratio_bootstrap(tokens_a, forwards_a, tokens_b, forwards_b, resamples=40_000, seed=3)
    reference = stats.bootstrap((tokens_a[0], forwards_a[0], tokens_b[0], forwards_b[0]), _ratio_of_pooled_tau,
                                paired=True, vectorized=True, n_resamples=40_000, method="percentile",
                                confidence_level=0.95, random_state=7)
    assert ours.estimate == pytest.approx(_ratio_of_pooled_tau(tokens_a, forwards_a, tokens_b, forwards_b)[0])
    assert ours.low == pytest.approx(reference.confidence_interval.low, abs=0.006)
    assert ours.high == pytest.approx(reference.confidence_interval.high, abs=0.006)
    assert ours.low < ours.estimate < ours.high


def test_seed_level_of_the_bootstrap_matches_scipy_when_prompts_do_not_vary():
    # Every prompt of a seed decodes alike, so only the seed draws move the ratio.
    rng = np.random.default_rng(2)
    per_seed = [_decodes(rng, (8, 1), p) for p in (0.2, 0.3)]
    tokens_a, forwards_a = (np.repeat(x, 12, axis=1) for x in per_seed[0])
    tokens_b, forwards_b = (np.repeat(x, 12, axis=1) for x in per_seed[1])
    ours = paired_ratio_bootstrap(tokens_a, forwards_a, tokens_b, forwards_b, resamples=40_000, seed=4)
    reference = stats.bootstrap((tokens_a[:, 0], forwards_a[:, 0], tokens_b[:, 0], forwards_b[:, 0]),
                                _ratio_of_pooled_tau, paired=True, vectorized=True, n_resamples=40_000,
                                method="percentile", random_state=8)
    assert ours.low == pytest.approx(reference.confidence_interval.low, abs=0.01)
    assert ours.high == pytest.approx(reference.confidence_interval.high, abs=0.01)


def test_identical_drafters_give_ratio_one_with_an_empty_interval():
    rng = np.random.default_rng(3)
    tokens, forwards = _decodes(rng, (3, 10), 0.3)
    interval = paired_ratio_bootstrap(tokens, forwards, tokens, forwards, resamples=500)
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((1.0, 1.0, 1.0))


def test_bootstrap_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[seeds, prompts\]"):
        paired_ratio_bootstrap(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 4)), np.ones((2, 4)))


@pytest.mark.parametrize("values", [[1.02, 0.97, 1.05], [0.9, 1.1], [1.0, 1.01, 0.99, 1.03, 0.98, 1.0]])
def test_t_interval_matches_scipy(values):
    ours = t_interval(np.array(values), confidence=0.9)
    low, high = stats.t.interval(0.9, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (ours.low, ours.high) == pytest.approx((low, high), rel=1e-7)


@pytest.mark.parametrize("dof", [1, 2, 7, 40])
def test_student_t_quantile_matches_scipy(dof):
    for probability in (0.5, 0.9, 0.975, 0.995):
        assert student_t_quantile(probability, dof) == pytest.approx(stats.t.ppf(probability, dof), rel=1e-7, abs=1e-9)


# ------------------------------------------------------------------------------ summaries of bench reports
def _report(drafters: dict[str, float], temperatures=(1.0,), benchmarks=("mt-bench", "gsm8k"), prompts=4) -> dict:
    """A bench report whose drafter d accepts about drafters[d] of its drafts, with a baseline row per prompt."""
    rng = np.random.default_rng(5)
    rows = []
    for temperature in temperatures:
        for bench in benchmarks:
            for index in range(prompts):
                for name, acceptance in {"baseline": 0.0, **drafters}.items():
                    forwards = int(rng.integers(8, 20))
                    rows.append({"drafter": name, "benchmark": bench, "index": index, "temperature": temperature,
                                 "target_forwards": forwards,
                                 "new_tokens": forwards + int(rng.binomial(forwards * 3, acceptance))})
    return {"prompts": rows, "overall": [], "config": {"k": 3, "limit": prompts, "max_new_tokens": 32}}


def _tau(report, names, temperature, bench="all"):
    rows = [r for r in report["prompts"] if r["drafter"] in names and r["temperature"] == temperature
            and bench in ("all", r["benchmark"])]
    return sum(r["new_tokens"] for r in rows) / sum(r["target_forwards"] for r in rows)


def test_reproduction_summary_pools_seeds_and_prompts():
    from eval.study_report import markdown, summarize_reproduction

    names = {(loss, seed): f"{loss}-s{seed}" for loss in ("kl", "lk_lambda") for seed in (0, 1, 2)}
    report = _report({name: 0.2 if loss == "kl" else 0.4 for (loss, _), name in names.items()}, temperatures=(0.0, 1.0))
    runs = [{"name": name, "loss": loss, "seed": seed, "heldout_tau": 1.1 + seed / 100, "heldout_alpha": 0.1}
            for (loss, seed), name in names.items()]
    part = summarize_reproduction(report, runs=runs, losses=["kl", "lk_lambda"], seeds=[0, 1, 2], reference="kl",
                                  resamples=500, confidence=0.95)
    row = next(r for r in part["rows"] if (r["temperature"], r["benchmark"], r["loss"]) == (1.0, "gsm8k", "lk_lambda"))
    lk, kl = [names[("lk_lambda", s)] for s in (0, 1, 2)], [names[("kl", s)] for s in (0, 1, 2)]
    assert row["tau"] == pytest.approx(_tau(report, lk, 1.0, "gsm8k"))
    assert row["ratio"]["estimate"] == pytest.approx(_tau(report, lk, 1.0, "gsm8k") / _tau(report, kl, 1.0, "gsm8k"))
    assert row["ratio_by_seed"][2] == pytest.approx(_tau(report, lk[2:], 1.0, "gsm8k") / _tau(report, kl[2:], 1.0, "gsm8k"))
    assert row["num_prompts"] == 4 and row["ratio"]["low"] > 1.0  # 0.4 vs 0.2 acceptance: clearly better
    assert part["heldout"]["kl"]["tau_mean"] == pytest.approx(1.11)
    assert "| 1 | gsm8k (n=4) |" in markdown({"reproduction": part})


def test_topk_summary_compares_each_setting_with_online_and_picks_the_best_k32():
    from eval.study_report import summarize_topk

    runs = [{"name": f"k{k}-{tail}", "k": k, "tail": tail, "target_source": "cache"}
            for k in (8, 32) for tail in ("drop", "bucket")]
    runs.append({"name": "online", "k": None, "tail": "bucket", "target_source": "online"})
    acceptance = {"k8-drop": 0.1, "k8-bucket": 0.15, "k32-drop": 0.2, "k32-bucket": 0.28, "online": 0.3}
    report = _report(acceptance)
    part = summarize_topk(report, runs=runs, resamples=500, confidence=0.95)
    best = part["best_k32"]["1"]
    assert best["name"] == "k32-bucket"
    assert best["ratio"]["estimate"] == pytest.approx(_tau(report, ["k32-bucket"], 1.0) / _tau(report, ["online"], 1.0))
    assert best["meets_goal"] == (best["ratio"]["estimate"] >= 0.99)
    assert {r["name"] for r in part["rows"] if "ratio" not in r} == {"online"}


# ------------------------------------------------------------------------------ refusals before Ray
@pytest.fixture
def no_ray(monkeypatch):
    def refuse(address=None):
        raise AssertionError("Ray was started before the configuration was refused")
    monkeypatch.setattr(study_module, "ray_session", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--loss", "lk_alpha,lk_lambda"], "--loss must be distinct losses"),
    (["--loss", "kl,nope"], "--loss must be distinct losses"),
    (["--seeds", "0,0"], "--seeds must be distinct integers >= 0"),
    (["--seeds", "0,x"], "--seeds expects a comma-separated list of int"),
    (["--topk-k", "8,0"], "--topk-k must be distinct integers >= 1"),
    (["--tail", "drop,top"], "--tail must be distinct tail modes"),
    (["--topk-loss", "mse"], "--topk-loss must be one of"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--temperature", "0,-1"], "--temperature must be numbers >= 0"),
    (["--confidence", "1.5"], "--confidence must be a number in (0, 1)"),
    (["--bench", "mt-bench,nope"], "--bench must be benchmarks from"),
    (["--part", "both"], None),  # argparse choices: exit status 2 from argparse itself
])
def test_bad_values_fail_before_ray_naming_the_flag(argv, message, capsys, no_ray, tmp_path):
    if message is None:
        with pytest.raises(SystemExit) as exited:
            main(["study", "--out", str(tmp_path), *argv])
        assert exited.value.code == 2
        assert "--part" in capsys.readouterr().err
        return
    assert main(["study", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_config_file_keys_are_checked(tmp_path, capsys, no_ray):
    bad = tmp_path / "study.yaml"
    bad.write_text("steps: 10\nseed: 3\n")
    assert main(["study", "--config", str(bad)]) == 2
    assert "unknown key 'seed'" in capsys.readouterr().err
    bad.write_text("steps: many\n")
    assert main(["study", "--config", str(bad)]) == 2
    assert "bad value for key 'steps'" in capsys.readouterr().err


def test_shipped_study_config_is_the_default_budget():
    from pipeline.cli_study import config_from_args

    config = config_from_args(parse_with_config(build_parser(), ["study", "--config", str(CONFIGS / "study.yaml")]))
    assert config.to_dict() == StudyConfig().to_dict()


# ------------------------------------------------------------------------------ end to end (slow)
def _write_conversations(path: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and ran far away to see what would happen next".split()
    with open(path, "w") as handle:
        for i in range(count):
            reply = " ".join(rng.choice(words, size=int(rng.integers(20, 60))))
            handle.write(json.dumps({"id": f"c{i}", "messages": [{"role": "user", "content": "tell me a story"},
                                                                 {"role": "assistant", "content": reply}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_study(ray_address, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello", "Count to five", "Say hi")))
    config = StudyConfig(
        out=root / "out", target=str(tiny_llama_dir), data=str(_write_conversations(root / "data.jsonl", 24)),
        conversations=24, max_length=128, steps=2, batch_tokens=256, warmup=0, seeds=(0, 1),
        losses=("kl", "lk_lambda"), k=8, topk_ks=(8,), tails=("bucket",), bench=(str(prompts),),
        bench_limit=3, temperatures=(0.0, 1.0), draft_k=3, max_new_tokens=6, resamples=300,
        address=ray_address, progress=False)
    run_study(config)
    return config


@pytest.mark.slow
def test_tiny_study_end_to_end(tiny_study):
    out = Path(tiny_study.out)
    study = json.loads((out / "study.json").read_text())
    # the k=8 / bucket / lk_lambda / seed 0 run serves both parts: trained once
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["kl-k8-bucket-s0", "kl-k8-bucket-s1", "lk_lambda-k8-bucket-s0", "lk_lambda-k8-bucket-s1",
                    "lk_lambda-online-s0"]
    assert all(json.loads((out / "runs" / r / "run.json").read_text())["status"] == "done" for r in runs)

    # the ratio over all prompts and seeds, recomputed from the bench report's merged per-drafter counters
    report = json.loads((out / "bench-reproduction" / "report.json").read_text())
    for temperature in (0.0, 1.0):
        overall = {r["drafter"]: r for r in report["overall"] if r["temperature"] == temperature}

        def tau(loss):
            rows = [overall[f"{loss}-k8-bucket-s{s}"] for s in (0, 1)]
            return sum(r["new_tokens"] for r in rows) / sum(r["target_forwards"] for r in rows)

        row = next(r for r in study["reproduction"]["rows"]
                   if r["temperature"] == temperature and r["benchmark"] == "all" and r["loss"] == "lk_lambda")
        assert row["ratio"]["estimate"] == pytest.approx(tau("lk_lambda") / tau("kl"))
        assert row["ratio"]["low"] <= row["ratio"]["estimate"] <= row["ratio"]["high"]
        assert row["num_prompts"] == 3 and len(row["ratio_by_seed"]) == 2
    assert study["reproduction"]["greedy_mismatches"] == 0

    topk = study["topk"]
    assert topk["online"] == "lk_lambda-online-s0"
    assert {r["name"] for r in topk["rows"]} == {"lk_lambda-k8-bucket-s0", "lk_lambda-online-s0"}
    assert all(r["temperature"] == 1.0 for r in topk["rows"])
    overall = {r["drafter"]: r for r in json.loads((out / "bench-topk" / "report.json").read_text())["overall"]}
    row = next(r for r in topk["rows"] if r["name"] == "lk_lambda-k8-bucket-s0" and r["benchmark"] == "all")
    assert row["ratio"]["estimate"] == pytest.approx(overall["lk_lambda-k8-bucket-s0"]["tau"]
                                                     / overall["lk_lambda-online-s0"]["tau"])
    for name in ("study.md", "reproduction_ratios.png", "topk_tau.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "reproduction_ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## LK vs KL (reproduction)" in (out / "study.md").read_text()


@pytest.mark.slow
def test_a_rerun_reuses_caches_runs_and_bench_reports(tiny_study, capsys):
    out = Path(tiny_study.out)
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run.json")}
    bench_before = (out / "bench-topk" / "report.json").stat().st_mtime_ns
    run_study(tiny_study)
    err = capsys.readouterr().err
    assert "reused cache" in err and "the target pass was not rerun" in err
    assert err.count("reusing ") >= 2  # both bench reports
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run.json")} == before
    assert (out / "bench-topk" / "report.json").stat().st_mtime_ns == bench_before
