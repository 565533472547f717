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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.ray_session import ray_session

PARTS = ("reproduction", "topk", "all")
REFERENCE_LOSS = "kl"
REPRODUCTION_TAIL = "bucket"
STUDY_JSON, STUDY_MD = "study.json", "study.md"


class StudyConfigError(ValueError):
    """A study setting is invalid; the message names the flag. Raised before Ray starts."""


@dataclass
class StudyConfig:
    """Budget and design of the study; the defaults fit about an hour on a 2-core CPU machine."""

    out: Path = Path("lkspec-study")
    part: str = "all"
    target: str = "smollm2-135m"
    data: str = "sharegpt"
    conversations: int = 150
    max_length: int = 384
    dtype: str = "auto"  # cache, training and benchmark precision: auto is bf16 only where it is native
    drafters: tuple[str, ...] = ("tiny",)  # `lkspec train --drafter` values: one reproduction section each
    steps: int = 45
    batch_tokens: int = 512
    lr: float = 1e-3
    warmup: int = 4
    workers: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    heldout_fraction: float = 0.05
    eval_sequences: int = 256  # held-out sequences scored per run: the sequences of the α bootstrap
    losses: tuple[str, ...] = ("kl", "lk_alpha", "lk_lambda")
    k: int = 32
    topk_ks: tuple[int, ...] = (8, 32, 128)
    tails: tuple[str, ...] = ("drop", "bucket")
    topk_loss: str = "lk_lambda"
    bench: tuple[str, ...] = ("mt-bench", "humaneval", "gsm8k")
    bench_limit: int = 5
    temperatures: tuple[float, ...] = (0.0, 1.0)
    topk_temperatures: tuple[float, ...] = (1.0,)
    draft_k: int = 4
    max_new_tokens: int = 32
    resamples: int = 10_000
    confidence: float = 0.95
    address: str | None = None
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    def parts(self) -> tuple[str, ...]:
        """The parts to run, in order."""
        return ("reproduction", "topk") if self.part == "all" else (self.part,)

    def validate(self) -> None:
        """Raise StudyConfigError naming the flag of the first bad value, then run every stage's own checks."""
        from pipeline.resolve.prompts import BENCHMARKS, is_benchmark
        from trainer.losses import LOSS_NAMES, TAIL_MODES

        _check("part", self.part in PARTS, f"one of {', '.join(PARTS)}", self.part)
        for key in ("conversations", "steps", "batch_tokens", "workers", "k", "bench_limit", "draft_k",
                    "max_new_tokens", "eval_sequences"):
            value = getattr(self, key)
            _check(key, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an integer >= 1", value)
        _check("max_length", isinstance(self.max_length, int) and self.max_length >= 2, "an integer >= 2",
               self.max_length)
        _check("warmup", isinstance(self.warmup, int) and self.warmup >= 0, "an integer >= 0", self.warmup)
        _check("resamples", isinstance(self.resamples, int) and self.resamples >= 100, "an integer >= 100",
               self.resamples)
        _check("confidence", 0 < self.confidence < 1, "a number in (0, 1)", self.confidence)
        _check("seeds", bool(self.seeds) and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
               "distinct integers >= 0", ",".join(map(str, self.seeds)))
        _check("loss", REFERENCE_LOSS in self.losses and len(self.losses) >= 2
               and len(set(self.losses)) == len(self.losses) and set(self.losses) <= set(LOSS_NAMES),
               f"distinct losses from {', '.join(LOSS_NAMES)}, including the reference {REFERENCE_LOSS} "
               "and at least one other", ",".join(self.losses))
        _check("topk_k", bool(self.topk_ks) and len(set(self.topk_ks)) == len(self.topk_ks)
               and min(self.topk_ks) >= 1, "distinct integers >= 1", ",".join(map(str, self.topk_ks)))
        _check("tail", bool(self.tails) and set(self.tails) <= set(TAIL_MODES)
               and len(set(self.tails)) == len(self.tails),
               f"distinct tail modes from {', '.join(TAIL_MODES)}", ",".join(self.tails))
        _check("topk_loss", self.topk_loss in LOSS_NAMES, f"one of {', '.join(LOSS_NAMES)}", self.topk_loss)
        for key, values in (("temperature", self.temperatures), ("topk_temperature", self.topk_temperatures)):
            _check(key, bool(values) and all(t >= 0 for t in values), "numbers >= 0", ",".join(map(str, values)))
        unknown = [name for name in self.bench if not is_benchmark(name)]
        _check("bench", bool(self.bench) and not unknown,
               f"benchmarks from {', '.join(BENCHMARKS)} or .jsonl prompt files", ",".join(self.bench))
        _check("lr", self.lr > 0, "a number > 0", self.lr)
        _check("heldout_fraction", 0 < self.heldout_fraction <= 0.5, "a number in (0, 0.5]", self.heldout_fraction)
        labels = [drafter_label(d) for d in self.drafters]
        _check("drafter", bool(self.drafters) and all(labels) and len(set(labels)) == len(labels),
               "distinct drafters (names as `lkspec train --drafter` takes them)", ",".join(self.drafters))
        # Each stage's own validation, on the values it will receive (paths are placeholders).
        try:
            self.build_config(self.k).validate()
            for drafter in self.drafters:
                self.train_config(drafter, "<cache>", self.k, REFERENCE_LOSS, self.seeds[0],
                                  REPRODUCTION_TAIL).validate()
            self.bench_config(["<drafter>"], self.temperatures, "bench").validate()
        except ValueError as exc:
            raise StudyConfigError(str(exc)) from exc

    def features(self) -> tuple[str, ...]:
        """The cache feature columns the studied drafter families read (from the drafter registry)."""
        from trainer.drafters import family_for

        return tuple(dict.fromkeys(column for drafter in self.drafters for column in family_for(drafter).columns))

    # ---- the stage configs this study hands to the existing commands' functions
    def build_config(self, k: int):
        """The cache build for top-k `k`."""
        from pipeline.build import BuildConfig

        return BuildConfig(target=self.target, data=self.data, out=Path(self.out) / "caches", k=k,
                           limit=self.conversations, max_length=self.max_length, workers=self.workers,
                           dtype=self.dtype, address=self.address, progress=self.progress,
                           skip_invalid=True, shard_size=16, features=self.features())

    def train_config(self, drafter: str, cache: str, k: int, loss: str, seed: int, tail: str, *,
                     online: bool = False):
        """One run of `drafter` from the top-k `cache` (its token ids only when online), named by what it computes."""
        from trainer.config import TrainConfig
        from trainer.drafters import family_for

        what = "online" if online else f"k{k}-{tail}"
        return TrainConfig(
            cache=cache, out=str(Path(self.out) / "runs"), loss=loss, drafter=drafter,
            init_embeddings_from="target" if family_for(drafter).init_embeddings else None,  # mlp takes nothing from the target
            run_name=f"{drafter_label(drafter)}-{loss}-{what}-s{seed}",
            steps=self.steps, workers=self.workers, zero=2, dtype=self.dtype, lr=self.lr, warmup=self.warmup,
            batch_tokens=self.batch_tokens, tail=tail, seed=seed, target_source="online" if online else "cache",
            heldout_fraction=self.heldout_fraction, eval_sequences=self.eval_sequences, eval_every=0,
            checkpoint_every=self.steps, resume=True,
        )

    def bench_config(self, drafters: list[str], temperatures: tuple[float, ...], name: str):
        """One benchmark over `drafters` at `temperatures`, written to OUT/<name>/."""
        from pipeline.bench_job import BENCH_DEVICE, BenchConfig
        from trainer.precision import resolve_dtype

        return BenchConfig(target=self.target, drafters=drafters, benchmarks=list(self.bench),
                           limit=self.bench_limit, temperatures=list(temperatures), k=self.draft_k,
                           max_new_tokens=self.max_new_tokens, workers=self.workers, seed=0,
                           dtype=resolve_dtype(self.dtype, BENCH_DEVICE, warn=False),  # as its report records it
                           out=Path(self.out) / name, address=self.address, progress=self.progress)

    def to_dict(self) -> dict:
        """The resolved config as JSON data."""
        data = asdict(self)
        data["out"] = str(self.out)
        data.pop("timings")
        return data


def _check(key: str, ok: bool, expected: str, value) -> None:
    if not ok:
        raise StudyConfigError(f"--{key.replace('_', '-')} must be {expected}, got {value!r}")


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
    from eval.study_report import summarize_topk, write_study

    config.validate()
    config.out = Path(config.out).expanduser().resolve()
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "study-config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
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
    outcome = run_build(config.build_config(k))
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

    bench = config.bench_config([str(path) for path in run_dirs], temperatures, f"bench-{part}")
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
    path = Path(bench.out) / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
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
                     "steps": run.get("steps_done")})
    return rows


def _stage(number: int, total: int, name: str, detail: str) -> None:
    _say(f"\n== [{number}/{total}] {name}: {detail}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
