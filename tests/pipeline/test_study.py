"""`lkspec study`: the interval maths against scipy, refusals before Ray, and a tiny end-to-end study."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from eval.stats import paired_ratio_bootstrap, paired_tau_bootstrap, student_t_quantile, t_interval
from pipeline import study as study_module
from pipeline.cli import build_parser, main, parse_with_config
from pipeline.study import StudyConfig, drafter_label, run_study, split_drafters
from trainer.heldout import HeldoutSums

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
    with pytest.raises(ValueError, match=r"\[seeds, items\]"):
        paired_ratio_bootstrap(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\[seeds, items, steps\]"):
        paired_tau_bootstrap(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3)), draft_len=2)


def test_one_step_tau_bootstrap_matches_scipy():
    # With one draft step and K = 1, E[τ] = 1 + α: the ratio (1 + α_b) ÷ (1 + α_a) of pooled held-out α.
    rng = np.random.default_rng(6)
    positions = rng.integers(5, 40, size=(1, 40)).astype(float)
    alpha_a = positions * rng.uniform(0.2, 0.4, size=(1, 40))
    alpha_b = positions * rng.uniform(0.25, 0.45, size=(1, 40))

    def tau_ratio(a, n_a, b, n_b, axis=-1):
        return (1 + np.sum(b, axis) / np.sum(n_b, axis)) / (1 + np.sum(a, axis) / np.sum(n_a, axis))

    ours = paired_tau_bootstrap(alpha_a[..., None], positions[..., None], alpha_b[..., None], positions[..., None],
                                draft_len=1, resamples=40_000, seed=2)
    reference = stats.bootstrap((alpha_a[0], positions[0], alpha_b[0], positions[0]), tau_ratio, paired=True,
                                vectorized=True, n_resamples=40_000, method="percentile", random_state=9)
    assert ours.estimate == pytest.approx(tau_ratio(alpha_a, positions, alpha_b, positions)[0])
    assert ours.low == pytest.approx(reference.confidence_interval.low, abs=0.003)
    assert ours.high == pytest.approx(reference.confidence_interval.high, abs=0.003)


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
                    accepted = int(rng.binomial(forwards * 3, acceptance))
                    rows.append({"drafter": name, "benchmark": bench, "index": index, "temperature": temperature,
                                 "target_forwards": forwards, "new_tokens": forwards + accepted,
                                 "accepted": accepted, "drafted": 3 * forwards, "draft_positions": 3})
    return {"prompts": rows, "overall": [], "config": {"k": 3, "limit": prompts, "max_new_tokens": 32}}


def _tau(report, names, temperature, bench="all"):
    rows = [r for r in report["prompts"] if r["drafter"] in names and r["temperature"] == temperature
            and bench in ("all", r["benchmark"])]
    return sum(r["new_tokens"] for r in rows) / sum(r["target_forwards"] for r in rows)


def _heldout(alpha_by_loss: dict[str, float], seeds: int = 3, sequences: int = 30, steps: int = 3, seed: int = 0,
             exact: bool = False):
    """HeldoutSums per loss and seed: α ≈ alpha_by_loss[loss]·0.8^n at step n (tail dropped), +0.05 as a bucket
    (and +0.01 as the exact α, when asked)."""
    rng = np.random.default_rng(seed)
    positions = rng.integers(10, 40, size=(sequences, steps)).astype(float)  # the same positions for every run
    out = {}
    for loss, alpha in alpha_by_loss.items():
        out[loss] = []
        for _ in range(seeds):
            drop = positions * np.clip(alpha * 0.8 ** np.arange(steps) + rng.normal(0, 0.05, (sequences, steps)), 0, 1)
            sums = np.stack([drop, drop + 0.05 * positions, positions * 0.3, positions]
                            + ([drop + 0.01 * positions] if exact else []))
            out[loss].append(HeldoutSums([f"s{i}" for i in range(sequences)], sums, step=9))
    return out


def test_heldout_summary_pairs_runs_over_seeds_and_sequences():
    from eval.study_report import summarize_heldout

    heldout = _heldout({"kl": 0.30, "lk_lambda": 0.36})
    part = summarize_heldout(heldout, reference="kl", draft_len=4, resamples=2000, confidence=0.95)
    assert (part["seeds"], part["sequences"], part["steps"]) == (3, 30, 3) and part["evaluated_at"] == [9]
    drop = {row["loss"]: row for row in part["tails"]["drop"]}
    bucket = {row["loss"]: row for row in part["tails"]["bucket"]}
    pooled = [sum(h.sums[0].sum(0) for h in heldout[loss]) / sum(h.sums[3].sum(0) for h in heldout[loss])
              for loss in ("kl", "lk_lambda")]
    assert drop["kl"]["alpha"] == pytest.approx(pooled[0]) and drop["lk_lambda"]["alpha"] == pytest.approx(pooled[1])
    assert all(b > d for b, d in zip(bucket["kl"]["alpha"], drop["kl"]["alpha"]))  # the bucket bound is higher
    for n, ratio in enumerate(drop["lk_lambda"]["ratio"]):
        assert ratio["estimate"] == pytest.approx(pooled[1][n] / pooled[0][n])
        assert ratio["low"] < ratio["estimate"] < ratio["high"] and ratio["low"] > 1.0  # 0.36 vs 0.30: clearly better
        assert ratio["half_width"] == pytest.approx((ratio["high"] - ratio["low"]) / 2)
    tau = drop["lk_lambda"]["tau_ratio"]
    assert drop["kl"]["tau"] == pytest.approx(1 + sum(np.cumprod(list(pooled[0]) + [pooled[0][-1]])))  # K = 4
    assert tau["estimate"] == pytest.approx(drop["lk_lambda"]["tau"] / drop["kl"]["tau"]) and tau["low"] > 1.0
    assert "ratio" not in drop["kl"] and len(drop["kl"]["alpha_by_seed"]) == 3
    for tail, rows in (("drop", drop), ("bucket", bucket)):
        checks = part["checks"][tail]
        alpha = rows["kl"]["alpha"][0]
        assert checks["reference_alpha_step1"] == pytest.approx(alpha) and checks["alpha_met"] == (alpha >= 0.3)
        width = rows["lk_lambda"]["ratio"][0]["half_width"]
        assert checks["half_width_step1"] == {"lk_lambda": pytest.approx(width)}
        assert checks["half_width_met"] == {"lk_lambda": width <= 0.015}
    assert part["checks"]["bucket"]["reference_alpha_step1"] > part["checks"]["drop"]["reference_alpha_step1"]


def test_heldout_summary_adds_the_exact_alpha_where_every_run_scored_it():
    from eval.study_report import markdown, summarize_heldout

    heldout = _heldout({"kl": 0.30, "lk_lambda": 0.36}, exact=True)
    part = summarize_heldout(heldout, reference="kl", draft_len=4, resamples=500, confidence=0.95)
    assert list(part["tails"]) == ["drop", "bucket", "exact"] and list(part["checks"]) == ["drop", "bucket", "exact"]
    exact = {row["loss"]: row for row in part["tails"]["exact"]}
    pooled = [sum(h.sums[4].sum(0) for h in heldout[loss]) / sum(h.sums[3].sum(0) for h in heldout[loss])
              for loss in ("kl", "lk_lambda")]
    assert exact["kl"]["alpha"] == pytest.approx(pooled[0]) and exact["lk_lambda"]["alpha"] == pytest.approx(pooled[1])
    assert exact["lk_lambda"]["ratio"][0]["estimate"] == pytest.approx(pooled[1][0] / pooled[0][0])
    assert part["checks"]["exact"]["reference_alpha_step1"] == pytest.approx(pooled[0][0])
    text = markdown({"reproduction": [{"drafter": "medusa", "label": "medusa", "losses": ["kl", "lk_lambda"],
                                       "seeds": [0, 1, 2], "reference": "kl", "rows": [], "bench": {},
                                       "greedy_mismatches": 0, "greedy_near_ties": 0, "heldout": part}]})
    assert "Exact α (against the target's full distribution):" in text
    assert f"- exact α: α(kl) = {pooled[0][0]:.3f}, goal ≥ 0.3" in text
    heldout["lk_lambda"][2] = HeldoutSums(heldout["lk_lambda"][2].sample_ids, heldout["lk_lambda"][2].sums[:4], step=9)
    part = summarize_heldout(heldout, reference="kl", draft_len=4, resamples=200, confidence=0.95)
    assert list(part["tails"]) == ["drop", "bucket"]  # one run without it: the bounds only


def test_heldout_summary_refuses_runs_scored_on_other_sequences():
    from eval.study_report import summarize_heldout

    heldout = _heldout({"kl": 0.3, "lk_alpha": 0.3}, seeds=2)
    heldout["lk_alpha"][1].sample_ids = heldout["lk_alpha"][1].sample_ids[::-1]
    with pytest.raises(ValueError, match="lk_alpha run #1 scored other held-out sequences"):
        summarize_heldout(heldout, reference="kl", draft_len=3, resamples=200, confidence=0.95)


def test_reproduction_summary_pools_seeds_and_prompts(tmp_path):
    from eval.study_report import HELDOUT_PLOT, markdown, summarize_heldout, summarize_reproduction, write_study

    names = {(loss, seed): f"{loss}-s{seed}" for loss in ("kl", "lk_lambda") for seed in (0, 1, 2)}
    report = _report({name: 0.2 if loss == "kl" else 0.4 for (loss, _), name in names.items()}, temperatures=(0.0, 1.0))
    report["overall"] = [{"drafter": "kl-s0", "greedy_mismatches": 0, "greedy_near_ties": 1},
                         {"drafter": "kl-s1", "greedy_mismatches": 1, "greedy_near_ties": 0},
                         {"drafter": "lk_lambda-s2", "greedy_mismatches": 0, "greedy_near_ties": 2}]
    runs = [{"name": name, "loss": loss, "seed": seed} for (loss, seed), name in names.items()]
    part = summarize_reproduction(report, runs=runs, losses=["kl", "lk_lambda"], seeds=[0, 1, 2], reference="kl",
                                  resamples=500, confidence=0.95)
    row = next(r for r in part["rows"] if (r["temperature"], r["benchmark"], r["loss"]) == (1.0, "gsm8k", "lk_lambda"))
    lk, kl = [names[("lk_lambda", s)] for s in (0, 1, 2)], [names[("kl", s)] for s in (0, 1, 2)]
    assert row["tau"] == pytest.approx(_tau(report, lk, 1.0, "gsm8k"))
    assert row["ratio"]["estimate"] == pytest.approx(_tau(report, lk, 1.0, "gsm8k") / _tau(report, kl, 1.0, "gsm8k"))
    assert row["ratio_by_seed"][2] == pytest.approx(_tau(report, lk[2:], 1.0, "gsm8k") / _tau(report, kl[2:], 1.0, "gsm8k"))
    assert row["num_prompts"] == 4 and row["ratio"]["low"] > 1.0  # 0.4 vs 0.2 acceptance: clearly better
    rows = [r for r in report["prompts"]
            if r["drafter"] in lk and r["benchmark"] == "gsm8k" and r["temperature"] == 1.0]
    assert row["tau_paper"] == pytest.approx(3 * sum(r["accepted"] for r in rows) / sum(r["drafted"] for r in rows) + 1)

    part["heldout"] = summarize_heldout(_heldout({"kl": 0.3, "lk_lambda": 0.33}), reference="kl", draft_len=4,
                                        resamples=500, confidence=0.95)
    study = {"reproduction": [{"drafter": "medusa:heads=3", "label": "medusa-heads-3", **part}]}
    text = markdown(study)
    assert "## medusa-heads-3: LK vs KL" in text and "Drafter `medusa:heads=3`" in text
    assert "| 1 | gsm8k (n=4) |" in text and "Tail dropped (lower bound of α):" in text
    assert ("Lossless check at T = 0: 1 failure(s) (outputs that differ from target greedy); 3 output(s) that "
            "differ first at a near-tie of the target's top-2 logits") in text  # near-ties counted, not hidden
    ratio = part["heldout"]["tails"]["drop"][1]["ratio"][0]
    assert f"| 1 | {part['heldout']['tails']['drop'][0]['alpha'][0]:.3f} |" in text
    assert f"±{100 * ratio['half_width']:.1f}%" in text and "Sizing at step 1" in text
    for tail, label in (("drop", "dropped"), ("bucket", "as a bucket")):
        checks = part["heldout"]["checks"][tail]
        verdict = "met" if checks["half_width_met"]["lk_lambda"] else "missed"
        assert (f"- tail {label}: α(kl) = {checks['reference_alpha_step1']:.3f}, goal ≥ 0.3: "
                f"{'met' if checks['alpha_met'] else 'missed'}; half-widths lk_lambda ÷ kl "
                f"±{100 * checks['half_width_step1']['lk_lambda']:.1f}% ({verdict})") in text
    write_study(study, tmp_path)
    assert (tmp_path / HELDOUT_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "tau_ratios-medusa-heads-3.png").stat().st_size > 0


def test_drafter_lists_keep_each_drafters_options():
    assert split_drafters("tiny,medusa:heads=4,layers=2, mlp") == ("tiny", "medusa:heads=4,layers=2", "mlp")
    assert split_drafters("eagle3:steps=3,draft_vocab=256") == ("eagle3:steps=3,draft_vocab=256",)
    assert drafter_label("medusa:heads=4,layers=2") == "medusa-heads-4-layers-2" and drafter_label("tiny") == "tiny"


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
    (["--drafter", "tiny,tiny"], "--drafter must be distinct drafters"),
    (["--family", "eagle3:layers=2"], "--drafter eagle3: bad option 'layers=2'"),
    (["--eval-sequences", "0"], "--eval-sequences must be an integer >= 1"),
    (["--heldout-fraction", "0.9"], "--heldout-fraction must be a number in (0, 0.5]"),
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


def test_a_bench_report_left_unreadable_is_run_again_not_reused(tmp_path, capsys):
    from pipeline.bench_job import BenchConfig

    bench = BenchConfig(target="smollm2-135m", drafters=["runs/kl"], out=tmp_path / "bench-kl")
    bench.out.mkdir()
    report = {"config": {key: getattr(bench, key) for key in study_module.BENCH_KEYS}}
    text = json.dumps(report, default=str)
    (bench.out / "report.json").write_text(text)
    assert study_module._reusable_report(bench) == json.loads(text)  # finished, same settings: reused
    (bench.out / "report.json").write_text(text[:40])  # a truncated report (the process was killed mid-write)
    assert study_module._reusable_report(bench) is None
    assert f"{bench.out / 'report.json'} is unreadable" in capsys.readouterr().err


def test_shipped_study_config_is_the_default_budget():
    from pipeline.cli_study import config_from_args

    config = config_from_args(parse_with_config(build_parser(), ["study", "--config", str(CONFIGS / "study.yaml")]))
    assert config.to_dict() == StudyConfig().to_dict()



@pytest.mark.parametrize("name, drafters, losses, seeds", [
    ("study-medusa.yaml", ["medusa:draft_vocab=4096"], ["kl", "lk_alpha", "lk_lambda"], 3),
    ("study-mlp.yaml", ["mlp:tie=true,draft_vocab=4096"], ["kl", "lk_alpha", "lk_lambda"], 3),
    ("study-compare.yaml", ["tiny", "eagle3:draft_vocab=4096"], ["kl", "lk_lambda"], 1),
])
def test_shipped_family_study_configs_are_valid_and_share_one_budget(name, drafters, losses, seeds):
    from pipeline.cli_study import config_from_args

    args = parse_with_config(build_parser(), ["study", "--config", str(CONFIGS / name)])
    config = config_from_args(args)
    config.validate()
    assert list(config.drafters) == drafters
    assert list(config.losses) == losses and len(config.seeds) == seeds
    assert config.part == "reproduction" and config.draft_k == 6
    assert (config.steps, config.batch_tokens, config.conversations, config.k) == (300, 2048, 1000, 32)
    assert (config.heldout_fraction, config.eval_sequences, config.exact_heldout) == (0.25, 256, True)
    assert config.train_config(drafters[0], "<cache>", config.k, "kl", 0, "bucket").exact_heldout


def test_init_embeddings_from_target_goes_only_to_families_that_take_something_from_the_target():
    study = StudyConfig()
    flags = {drafter: study.train_config(drafter, "cache", 8, "kl", 0, "bucket").init_embeddings_from
             for drafter in ("tiny", "eagle3", "medusa", "mlp:stages=2")}
    assert flags == {"tiny": "target", "eagle3": "target", "medusa": "target", "mlp:stages=2": None}

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


FAMILIES = ("tiny", "medusa:heads=2")  # an independent drafter and one reading the target's last hidden state
LABELS = ("tiny", "medusa-heads-2")


@pytest.fixture(scope="module")
def tiny_study(ray_address, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello", "Count to five", "Say hi")))
    config = StudyConfig(
        out=root / "out", target=str(tiny_llama_dir), data=str(_write_conversations(root / "data.jsonl", 24)),
        conversations=24, max_length=128, drafters=FAMILIES, steps=2, batch_tokens=256, warmup=0, seeds=(0, 1),
        workers=1,  # one Ray worker per stage: a study's multi-worker training is tested in test_train_job
        heldout_fraction=0.25, eval_sequences=8, losses=("kl", "lk_lambda"), k=8, topk_ks=(8,), tails=("bucket",),
        bench=(str(prompts),), bench_limit=3, temperatures=(0.0, 1.0), draft_k=3, max_new_tokens=6, resamples=300,
        address=ray_address, progress=False)
    run_study(config)
    return config


@pytest.mark.slow
def test_tiny_study_end_to_end(tiny_study):
    from cache import open_cache
    from trainer.heldout import read_heldout

    out = Path(tiny_study.out)
    study = json.loads((out / "study.json").read_text())
    # the tiny / k=8 / bucket / lk_lambda / seed 0 run serves both parts: trained once
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted([f"{label}-{loss}-k8-bucket-s{seed}" for label in LABELS for loss in ("kl", "lk_lambda")
                           for seed in (0, 1)] + ["tiny-lk_lambda-online-s0"])
    assert all(json.loads((out / "runs" / r / "run.json").read_text())["status"] == "done" for r in runs)
    [cache] = [p for p in (out / "caches").iterdir() if p.is_dir()]
    assert "last" in open_cache(cache).manifest["features"]  # the MEDUSA family reads it: the registry said so

    assert [part["label"] for part in study["reproduction"]] == list(LABELS)
    for part in study["reproduction"]:
        label = part["label"]
        # primary: held-out α per draft step, recomputed from the runs' heldout.json
        sums = {loss: [read_heldout(out / "runs" / f"{label}-{loss}-k8-bucket-s{s}") for s in (0, 1)]
                for loss in ("kl", "lk_lambda")}
        heldout = part["heldout"]
        assert heldout["seeds"] == 2 and heldout["sequences"] == len(sums["kl"][0].sample_ids) >= 2
        assert heldout["steps"] == sums["kl"][0].sums.shape[2] == (2 if label.startswith("medusa") else 1)

        def alpha(loss, quantity=0):
            return sum(h.sums[quantity].sum(0) for h in sums[loss]) / sum(h.sums[3].sum(0) for h in sums[loss])

        rows = {row["loss"]: row for row in heldout["tails"]["drop"]}
        assert rows["kl"]["alpha"] == pytest.approx(alpha("kl"))
        for n, ratio in enumerate(rows["lk_lambda"]["ratio"]):
            assert ratio["estimate"] == pytest.approx(alpha("lk_lambda")[n] / alpha("kl")[n])
            assert ratio["low"] <= ratio["estimate"] <= ratio["high"]
        bucket = {row["loss"]: row for row in heldout["tails"]["bucket"]}
        assert bucket["kl"]["alpha"] == pytest.approx(alpha("kl", 1))
        assert all(b >= d for b, d in zip(bucket["kl"]["alpha"], rows["kl"]["alpha"]))

        # secondary: the τ ratio over all prompts and seeds, from the bench report's merged per-drafter counters
        report = json.loads((out / f"bench-{label}" / "report.json").read_text())
        for temperature in (0.0, 1.0):
            overall = {r["drafter"]: r for r in report["overall"] if r["temperature"] == temperature}

            def tau(loss):
                merged = [overall[f"{label}-{loss}-k8-bucket-s{s}"] for s in (0, 1)]
                return sum(r["new_tokens"] for r in merged) / sum(r["target_forwards"] for r in merged)

            row = next(r for r in part["rows"]
                       if r["temperature"] == temperature and r["benchmark"] == "all" and r["loss"] == "lk_lambda")
            assert row["ratio"]["estimate"] == pytest.approx(tau("lk_lambda") / tau("kl"))
            assert row["ratio"]["low"] <= row["ratio"]["estimate"] <= row["ratio"]["high"]
            assert row["num_prompts"] == 3 and len(row["ratio_by_seed"]) == 2 and row["tau_paper"] >= 1.0
        assert part["greedy_mismatches"] == 0

    topk = study["topk"]
    assert topk["online"] == "tiny-lk_lambda-online-s0" and topk["drafter"] == "tiny"
    assert {r["name"] for r in topk["rows"]} == {"tiny-lk_lambda-k8-bucket-s0", "tiny-lk_lambda-online-s0"}
    assert all(r["temperature"] == 1.0 for r in topk["rows"])
    overall = {r["drafter"]: r for r in json.loads((out / "bench-topk" / "report.json").read_text())["overall"]}
    row = next(r for r in topk["rows"] if r["name"] == "tiny-lk_lambda-k8-bucket-s0" and r["benchmark"] == "all")
    assert row["ratio"]["estimate"] == pytest.approx(overall["tiny-lk_lambda-k8-bucket-s0"]["tau"]
                                                     / overall["tiny-lk_lambda-online-s0"]["tau"])
    for name in ("heldout_alpha.png", "tau_ratios-tiny.png", "tau_ratios-medusa-heads-2.png", "topk_tau.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "study.md").read_text()
    assert "## tiny: LK vs KL" in text and "## medusa-heads-2: LK vs KL" in text and "Tail dropped" in text


@pytest.mark.slow
def test_a_rerun_reuses_caches_runs_and_bench_reports(tiny_study, capsys):
    out = Path(tiny_study.out)
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run.json")}
    bench_before = (out / "bench-topk" / "report.json").stat().st_mtime_ns
    run_study(tiny_study)
    err = capsys.readouterr().err
    assert "reused cache" in err and "the target pass was not rerun" in err
    assert err.count("reusing ") >= 3  # every bench report
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run.json")} == before
    assert (out / "bench-topk" / "report.json").stat().st_mtime_ns == bench_before
