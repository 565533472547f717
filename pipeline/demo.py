"""The main job (`lkspec demo`): cache → two drafters (KL, LK^λ) → speculative-decoding report."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.ray_session import ray_session
from pipeline.stages import BENCH, DRAFTERS, StageConfig
from trainer.precision import DTYPE_CHOICES
from trainer.settings import preset, setting

if TYPE_CHECKING:
    from pipeline.bench_job import BenchConfig
    from pipeline.build import BuildConfig
    from trainer.config import TrainConfig

DEMO_LOSSES = ("kl", "lk_lambda")


@dataclass
@preset(out=Path("lkspec-demo"), conversations=200, losses=DEMO_LOSSES, steps=80, batch_tokens=2048, lr=5e-3,
        bench_limit=2, draft_k=1, max_new_tokens=64)
class DemoConfig(StageConfig):
    """The study's stage sizes as a preset that fits 15 minutes on a 2-core CPU machine, with one drafter.

    The drafter is one MEDUSA head over an 8,192-token draft vocabulary (drafting K = 1 token per
    target forward): it starts from the target's own LM head and costs one matrix-vector product
    per draft, so within the training budget it reaches a τ that pays for verifying two tokens at
    once on a CPU; the tiny independent drafter did not (0.42x the target's speed).
    """

    drafter: str = setting("medusa:heads=1,draft_vocab=8192", group=DRAFTERS,
                           help="drafter: a preset, or a model alias / directory that is fine-tuned and also "
                           "benchmarked untuned")
    bench_dtype: str = setting("auto", group=BENCH, choices=DTYPE_CHOICES, help="benchmark precision")
    seed: int = setting(0, group=DRAFTERS, ge=0, help="seed")


def run_demo(config: DemoConfig) -> Path:
    """Run the three stages on one Ray cluster and return the report directory."""
    from dataclasses import replace

    from pipeline.bench_job import run_bench
    from pipeline.build import run_build
    from pipeline.train_job import train_sweep

    drafter, pretrained = _demo_drafter(config.drafter)
    build_config, train_configs, bench_config = stage_configs(config)
    with ray_session(config.address):
        _stage(1, "target cache", f"{config.target} over {config.conversations} {config.data} conversations, "
               f"top-{config.k}" + (f", features {', '.join(build_config.features)}" if build_config.features else ""))
        started = time.time()
        build = run_build(build_config)
        verb = "reused" if build.reused else "built"
        _say(f"{verb} cache {build.key} at {build.path}"
             + (" (same key: the target pass was not rerun)" if build.reused else ""))
        config.timings["cache"] = time.time() - started

        start_from = "fine-tuned from its weights" if pretrained else "new"
        _stage(2, "drafters", f"{config.drafter} drafter ({start_from}) x {', '.join(config.losses)}, "
               f"{config.steps} steps each, DeepSpeed ZeRO-2 on {config.workers} Ray Train worker(s)")
        started = time.time()
        run_dirs = train_sweep([replace(train, cache=str(build.path)) for train in train_configs],
                               progress=config.progress)
        config.timings["train"] = time.time() - started

        _stage(3, "speculative decoding", f"{', '.join(config.bench)} x {config.bench_limit} prompts, "
               f"T={', '.join(f'{t:g}' for t in config.temperatures)}, K={config.draft_k}")
        started = time.time()
        untuned = [config.drafter] if pretrained else []  # the pretrained drafter before fine-tuning
        report_dir = run_bench(replace(bench_config, drafters=untuned + [str(path) for path in run_dirs]))
        config.timings["bench"] = time.time() - started
    print((report_dir / "report.md").read_text())
    _say(speedup_summary(report_dir))
    timing = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in config.timings.items())
    _say(f"stage times: {timing}")
    _say(f"report: {report_dir / 'report.md'} (+ report.json and PNG plots)")
    return report_dir


def stage_configs(config: DemoConfig) -> tuple[BuildConfig, list[TrainConfig], BenchConfig]:
    """The cache build, the training runs (one per loss) and the benchmark of `config`, each validated.

    Raises ValueError naming the setting before anything runs; run_demo fills in the cache path and
    the benchmarked drafters as the stages finish.
    """
    from pipeline.train_job import sweep_configs

    drafter, pretrained = _demo_drafter(config.drafter)
    build_config = config.build_config(config.k, features=demo_features(config.drafter), seed=config.seed)
    build_config.validate()
    train_base = config.run_config(
        drafter, cache="<cache>", warmup=min(100, config.steps // 10), eval_every=max(1, config.steps // 3),
        seed=config.seed, pretrained=pretrained)
    train_configs = sweep_configs(train_base, list(config.losses))  # validates each
    bench_config = config.bench_config(["<drafter>"], config.temperatures, "report", dtype=config.bench_dtype,
                                       seed=config.seed)
    bench_config.validate()
    return build_config, train_configs, bench_config


def speedup_summary(report_dir: Path) -> str:
    """One line: each drafter's τ and speed-up over the target alone, over all prompts, per temperature."""
    import json

    overall = json.loads((Path(report_dir) / "report.json").read_text())["overall"]
    parts = [f"{row['drafter']} T={row['temperature']:g}: "
             + (f"{row['speedup']:.2f}x" if row["speedup"] is not None else "–")
             + f" (τ {row['tau']:.2f})" for row in overall]
    return "speed-up over the target alone (tokens/s, same run): " + "; ".join(parts)


def _demo_drafter(spec: str) -> tuple[str, bool]:
    """The drafter as `lkspec train` takes it, and whether it starts from pretrained weights.

    A preset is built from a config; a model alias is resolved (fetched and converted on first use)
    to its directory; a directory is used as it is.
    """
    from pipeline.resolve.models import EMBEDDED_MODELS, resolve_model
    from trainer.drafters import PRESETS, family_for

    if spec in PRESETS or family_for(spec).name != "independent":  # a preset, or medusa[:..], mlp[:..], eagle3[:..]
        return spec, False
    if spec in EMBEDDED_MODELS:
        return str(resolve_model(spec).path), True
    return spec, True


def demo_features(spec: str) -> tuple[str, ...]:
    """The cache feature columns the drafter's family reads (none for an independent drafter)."""
    from trainer.drafters import family_for

    return family_for(spec).columns


def _stage(number: int, name: str, detail: str) -> None:
    _say(f"\n== [{number}/3] {name}: {detail}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
