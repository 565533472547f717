"""`lkspec study`: LK vs KL per drafter family over seeds, and top-k cache fidelity against the full distribution.

Both parts run on one Ray session, in the order caches → (train → bench) per family → top-k:

- reproduction, one section per `--drafter` (family): one cache (top-`k`, tail bucket, the feature
  columns every family reads); every loss × every seed. Primary measure: held-out α per draft step
  (each run's heldout.json) under both tail modes, α(loss) ÷ α(kl) with a paired bootstrap over
  seeds and held-out sequences. Secondary: every run benchmarked at every temperature, τ(loss) ÷
  τ(kl) per domain with confidence intervals (eval.stats).
- topk (the first drafter): one cache per k; `topk_loss` at the first seed with each tail mode,
  plus the same drafter trained on the target's full distribution (`--target-source online`); τ of
  each and its ratio to the online drafter.

Run directories are named by what they compute (`<drafter>-<loss>-k<k>-<tail>-s<seed>`,
`<drafter>-<loss>-online-s<seed>`), so the reproduction's matching run serves the top-k part too,
and a rerun skips finished runs (train_sweep resumes) and reuses caches (same key) and benchmark
reports (same settings). Drafter values go to `lkspec train --drafter` unchanged: any family it
accepts can be studied.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.ray_session import ray_session
from pipeline.stages import BENCH, DRAFTERS, WHAT, StageConfig
from trainer.loss_names import LOSS_NAMES, TAIL_MODES
from trainer.settings import ConfigError, setting

PARTS = ("reproduction", "topk", "all")
REFERENCE_LOSS = "kl"
REPRODUCTION_TAIL = "bucket"


@dataclass
class StudyConfig(StageConfig):
    """Design of the study over the shared stage sizes; the defaults fit about an hour on a 2-core CPU machine."""

    part: str = setting("all", group=WHAT, choices=PARTS, help="which part")
    # `lkspec train --drafter` values: one reproduction section each
    drafters: tuple[str, ...] = setting(
        ("tiny",), key="drafter", aliases=("--family",), group=DRAFTERS, metavar="DRAFTER[,...]",
        parse=lambda text: split_drafters(text), check=lambda drafter: bool(drafter_label(drafter)),
        distinct=lambda drafter: drafter_label(drafter),
        expected="distinct drafters (names as `lkspec train --drafter` takes them)",
        help="drafters as `lkspec train --drafter` takes them (a preset, a model directory, medusa[:KEY=VALUE,...], "
        "mlp[:...], eagle3[:...]), comma-separated; one reproduction section each")
    warmup: int = setting(4, group=DRAFTERS, ge=0, help="warm-up steps")
    seeds: tuple[int, ...] = setting((0, 1, 2), group=DRAFTERS, ge=0, distinct=True, help="training seeds")
    heldout_fraction: float = setting(0.05, group=DRAFTERS, gt=0, le=0.5,
                                      help="sequences held out of training, by sample-id hash")
    eval_sequences: int = setting(256, group=DRAFTERS, ge=1,  # held-out sequences scored per run
                                  help="held-out sequences scored per run: the alpha bootstrap's sequences")
    exact_heldout: bool = setting(False, group=DRAFTERS,
                                  help="also score held-out alpha against the target's full distribution (the exact "
                                  "alpha between the two tail bounds; the target runs in each worker at each run's "
                                  "final evaluation)")
    topk_ks: tuple[int, ...] = setting((8, 32, 128), key="topk_k", group=DRAFTERS, ge=1, distinct=True,
                                       help="top-k part: k values")
    tails: tuple[str, ...] = setting(("drop", "bucket"), key="tail", group=DRAFTERS, choices=TAIL_MODES,
                                     distinct=True, expected=f"distinct tail modes from {', '.join(TAIL_MODES)}",
                                     help="top-k part: tail modes")
    topk_loss: str = setting("lk_lambda", group=DRAFTERS, check=LOSS_NAMES.__contains__,
                             expected=f"one of {', '.join(LOSS_NAMES)}", help="top-k part: the loss")
    topk_temperatures: tuple[float, ...] = setting((1.0,), key="topk_temperature", group=BENCH, ge=0,
                                                   help="top-k part temperatures")
    resamples: int = setting(10_000, group=BENCH, ge=100, help="bootstrap resamples")
    confidence: float = setting(0.95, group=BENCH, gt=0, lt=1, help="confidence level of the intervals")

    def parts(self) -> tuple[str, ...]:
        """The parts to run, in order."""
        return ("reproduction", "topk") if self.part == "all" else (self.part,)

    def validate(self) -> None:
        """Raise ConfigError naming the setting of the first bad value, then run every stage's own checks."""
        super().validate()
        if REFERENCE_LOSS not in self.losses or len(self.losses) < 2:
            raise ConfigError(f"must be distinct losses from {', '.join(LOSS_NAMES)}, including the reference "
                              f"{REFERENCE_LOSS} and at least one other, got {','.join(self.losses)!r}", key="loss")
        # Each stage's own validation, on the values it will receive (paths are placeholders).
        try:
            self.build_config(self.k, features=self.features()).validate()
            for drafter in self.drafters:
                self.train_config(drafter, "<cache>", self.k, REFERENCE_LOSS, self.seeds[0],
                                  REPRODUCTION_TAIL).validate()
            self.bench_config(["<drafter>"], self.temperatures, "bench", dtype=self.bench_dtype()).validate()
        except ConfigError:
            raise
        except ValueError as exc:  # e.g. a drafter family the registry does not know
            raise ConfigError(str(exc)) from exc

    def features(self) -> tuple[str, ...]:
        """The cache feature columns the studied drafter families read (from the drafter registry)."""
        from trainer.drafters import family_for

        return tuple(dict.fromkeys(column for drafter in self.drafters for column in family_for(drafter).columns))

    def train_config(self, drafter: str, cache: str, k: int, loss: str, seed: int, tail: str, *,
                     online: bool = False):
        """One run of `drafter` from the top-k `cache` (its token ids only when online), named by what it computes."""
        what = "online" if online else f"k{k}-{tail}"
        return self.run_config(
            drafter, cache=cache, loss=loss,
            run_name=f"{drafter_label(drafter)}-{loss}-{what}-s{seed}", warmup=self.warmup, tail=tail, seed=seed,
            target_source="online" if online else "cache", heldout_fraction=self.heldout_fraction,
            eval_sequences=self.eval_sequences, exact_heldout=self.exact_heldout, eval_every=0)

    def bench_dtype(self) -> str:
        """The benchmark's precision: --dtype resolved for the benchmark's device, as its report records it."""
        from pipeline.bench_job import BENCH_DEVICE
        from trainer.precision import resolve_dtype

        return resolve_dtype(self.dtype, BENCH_DEVICE, warn=False)

    def to_dict(self) -> dict:
        """The resolved config as JSON data."""
        data = asdict(self)
        data["out"] = str(self.out)
        data.pop("timings")
        return data


def drafter_label(drafter: str) -> str:
    """A drafter's name in run and report names: its directory's name, or the value with separators as '-'."""
    path = Path(drafter).expanduser()
    if path.is_dir():
        return path.name
    return re.sub(r"[^A-Za-z0-9_.+]+", "-", drafter).strip("-")


def split_drafters(text: str) -> tuple[str, ...]:
    """`tiny,medusa:heads=4,layers=2,mlp` -> ("tiny", "medusa:heads=4,layers=2", "mlp").

    A KEY=VALUE item (an `=` and no `:`) is an option of the drafter before it.
    """
    drafters: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if drafters and "=" in item and ":" not in item:
            drafters[-1] += "," + item
        else:
            drafters.append(item)
    return tuple(drafters)


def run_study(config: StudyConfig) -> Path:
    """Run the chosen parts on one Ray session; write study.json, study.md and plots into config.out."""
    from cache.atomic import atomic_write
    from eval.study_report import STUDY_JSON, STUDY_MD, summarize_topk, write_study

    config.validate()
    config.out = Path(config.out).expanduser().resolve()
    config.out.mkdir(parents=True, exist_ok=True)
    atomic_write(config.out / "study-config.json", (json.dumps(config.to_dict(), indent=1) + "\n").encode())
    parts = config.parts()
    ks = list(dict.fromkeys(([config.k] if "reproduction" in parts else [])
                            + (list(config.topk_ks) if "topk" in parts else [])))
    stages = 1 + 2 * (len(config.drafters) if "reproduction" in parts else 0) + (2 if "topk" in parts else 0)
    study: dict = {"config": config.to_dict()}
    with ray_session(config.address):
        features = config.features()
        _stage(1, stages, "target caches", f"{config.target} over {config.conversations} {config.data} "
               f"conversations, top-k for k = {', '.join(map(str, ks))}"
               + (f", features {', '.join(features)}" if features else ""))
        caches = {k: _build(config, k) for k in ks}
        number = 2
        if "reproduction" in parts:
            study["reproduction"] = []
            for drafter in config.drafters:
                study["reproduction"].append(_reproduce(config, drafter, caches[config.k], number, stages))
                write_study(study, config.out)  # each family's results stand on their own
                number += 2
        if "topk" in parts:
            seed, drafter = config.seeds[0], config.drafters[0]
            runs = [config.train_config(drafter, caches[k], k, config.topk_loss, seed, tail)
                    for k in config.topk_ks for tail in config.tails]
            smallest = min(config.topk_ks)  # online: the cache supplies token ids and masks only
            runs.append(config.train_config(drafter, caches[smallest], smallest, config.topk_loss, seed,
                                            REPRODUCTION_TAIL, online=True))
            detail = (f"{config.topk_loss} at seed {seed}: k in {{{', '.join(map(str, config.topk_ks))}}} "
                      f"x tail {{{', '.join(config.tails)}}} + the full distribution (online)")
            report = _train_and_bench(config, runs, config.topk_temperatures, "topk", number, stages, detail)
            study["topk"] = summarize_topk(report, runs=_run_table(runs), resamples=config.resamples,
                                           confidence=config.confidence)
            study["topk"]["drafter"] = drafter
    study["timings"] = config.timings
    write_study(study, config.out)
    print((config.out / STUDY_MD).read_text())
    _say("stage times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in config.timings.items()))
    _say(f"study: {config.out / STUDY_MD} (+ {STUDY_JSON} and PNG plots)")
    return config.out


def _reproduce(config: StudyConfig, drafter: str, cache: str, number: int, stages: int) -> dict:
    """One family's reproduction: every loss x seed trained and benchmarked; held-out α and τ summarized."""
    from eval.study_report import summarize_heldout, summarize_reproduction
    from trainer.heldout import read_heldout

    runs = [config.train_config(drafter, cache, config.k, loss, seed, REPRODUCTION_TAIL)
            for seed in config.seeds for loss in config.losses]
    detail = f"{len(config.losses)} losses x {len(config.seeds)} seeds from the top-{config.k} cache"
    report = _train_and_bench(config, runs, config.temperatures, drafter_label(drafter), number, stages, detail)
    heldout = {loss: [read_heldout(Path(run.out) / run.run_name) for run in runs if run.loss == loss]
               for loss in config.losses}  # per loss, in seed order: paired over seeds and sequences
    part = summarize_reproduction(report, runs=_run_table(runs), losses=list(config.losses),
                                  seeds=list(config.seeds), reference=REFERENCE_LOSS, resamples=config.resamples,
                                  confidence=config.confidence)
    part["heldout"] = summarize_heldout(heldout, reference=REFERENCE_LOSS, draft_len=config.draft_k,
                                        resamples=config.resamples, confidence=config.confidence)
    return {"drafter": drafter, "label": drafter_label(drafter), **part}


def _build(config: StudyConfig, k: int) -> str:
    """Build or reuse the top-k cache; returns its directory."""
    from pipeline.build import run_build

    started = time.time()
    outcome = run_build(config.build_config(k, features=config.features()))
    _say(f"k={k}: {'reused' if outcome.reused else 'built'} cache {outcome.key}"
         + (" (same key: the target pass was not rerun)" if outcome.reused else ""))
    config.timings[f"cache k={k}"] = time.time() - started
    return str(outcome.path)


def _train_and_bench(config: StudyConfig, runs: list, temperatures: tuple[float, ...], part: str,
                     number: int, stages: int, detail: str) -> dict:
    """Train the runs (finished ones are skipped) and benchmark them into OUT/bench-<part>/; returns the report."""
    from pipeline.bench_job import run_bench
    from pipeline.train_job import train_sweep

    drafter = runs[0].drafter
    _stage(number, stages, f"{part}: drafters", f"{detail}; drafter {drafter}, {config.steps} steps each")
    started = time.time()
    run_dirs = train_sweep(runs, progress=config.progress)
    config.timings[f"{part} train"] = time.time() - started

    bench = config.bench_config([str(path) for path in run_dirs], temperatures, f"bench-{part}",
                                dtype=config.bench_dtype())
    _stage(number + 1, stages, f"{part}: speculative decoding",
           f"{len(run_dirs)} drafters on {', '.join(config.bench)} x {config.bench_limit} prompts, "
           f"T={', '.join(f'{t:g}' for t in temperatures)}, K={config.draft_k}, {config.max_new_tokens} new tokens")
    started = time.time()
    report = _reusable_report(bench)
    if report is None:
        report = json.loads((run_bench(bench) / "report.json").read_text())
    else:
        _say(f"reusing {bench.out / 'report.json'} (same drafters and settings)")
    config.timings[f"{part} bench"] = time.time() - started
    return report


BENCH_KEYS = ("target", "drafters", "benchmarks", "limit", "temperatures", "k", "max_new_tokens", "seed", "dtype")


def _reusable_report(bench) -> dict | None:
    """The existing report in bench.out when it was made with the same drafters and settings."""
    from eval.report import read_report

    report = read_report(bench.out)
    if report is None:
        return None
    wanted = json.loads(json.dumps({key: getattr(bench, key) for key in BENCH_KEYS}, default=str))
    found = {key: report.get("config", {}).get(key) for key in BENCH_KEYS}
    return report if found == wanted else None


def _run_table(runs: list) -> list[dict]:
    """Per run: name, drafter, loss, seed, k, tail, target source and its held-out measurement from run.json."""
    from trainer.rundir import read_run

    rows = []
    for config in runs:
        run = read_run(Path(config.out) / config.run_name) or {}
        heldout = run.get("heldout") or {}
        rows.append({"name": config.run_name, "drafter": config.drafter, "loss": config.loss, "seed": config.seed,
                     "k": None if config.target_source == "online" else (run.get("cache") or {}).get("k"),
                     "tail": config.tail, "target_source": config.target_source,
                     "heldout_alpha_drop": heldout.get("alpha_drop"),
                     "heldout_alpha_bucket": heldout.get("alpha_bucket"),
                     "heldout_tau_drop": heldout.get("tau_drop"), "heldout_tau_bucket": heldout.get("tau_bucket"),
                     "heldout_alpha_exact": heldout.get("alpha_exact"), "heldout_tau_exact": heldout.get("tau_exact"),
                     "steps": run.get("steps_done")})
    return rows


def _stage(number: int, total: int, name: str, detail: str) -> None:
    _say(f"\n== [{number}/{total}] {name}: {detail}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
