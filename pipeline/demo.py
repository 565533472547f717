"""The main job (`lkspec demo`): cache → two drafters (KL, LK^λ) → speculative-decoding report."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.ray_session import ray_session

if TYPE_CHECKING:
    from pipeline.bench_job import BenchConfig
    from pipeline.build import BuildConfig
    from trainer.config import TrainConfig

DEMO_LOSSES = ("kl", "lk_lambda")


@dataclass
class DemoConfig:
    """Sizes of the demo's three stages; the defaults fit 15 minutes on a 2-core CPU machine.

    The drafter is one MEDUSA head over an 8,192-token draft vocabulary (drafting K = 1 token per
    target forward): it starts from the target's own LM head and costs one matrix-vector product
    per draft, so within the training budget it reaches a τ that pays for verifying two tokens at
    once on a CPU; the tiny independent drafter did not (0.42x the target's speed).
    """

    out: Path = Path("lkspec-demo")
    target: str = "smollm2-135m"
    data: str = "sharegpt"
    conversations: int = 250
    max_length: int = 384
    k: int = 32
    drafter: str = "medusa:heads=1,draft_vocab=8192"
    losses: tuple[str, ...] = DEMO_LOSSES
    steps: int = 100
    batch_tokens: int = 2048
    lr: float = 5e-3
    bench: tuple[str, ...] = ("mt-bench", "humaneval", "gsm8k")
    bench_limit: int = 3
    temperatures: tuple[float, ...] = (0.0, 1.0)
    draft_k: int = 1
    max_new_tokens: int = 64
    dtype: str = "auto"  # cache and training: auto is bf16 only where the device computes it natively
    bench_dtype: str = "auto"
    workers: int = 2
    seed: int = 0
    address: str | None = None
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)


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
    from pipeline.bench_job import BenchConfig
    from pipeline.build import BuildConfig
    from pipeline.train_job import sweep_configs
    from trainer.config import TrainConfig

    out = Path(config.out).expanduser().resolve()
    drafter, pretrained = _demo_drafter(config.drafter)
    build_config = BuildConfig(
        target=config.target, data=config.data, out=out / "caches", k=config.k,
        limit=config.conversations, max_length=config.max_length, workers=config.workers,
        dtype=config.dtype, address=config.address, progress=config.progress, seed=config.seed,
        skip_invalid=True,  # ShareGPT has a few empty turns: skip and count them
        shard_size=16,  # small shards: steady progress and even load over the workers
        features=demo_features(config.drafter),  # the hidden-state columns the drafter family reads (MEDUSA: last)
    )
    build_config.validate()
    train_base = TrainConfig(
        cache="<cache>", out=str(out / "runs"), drafter=drafter,
        init_embeddings_from=None if pretrained else "target",  # a pretrained drafter keeps its own
        steps=config.steps, workers=config.workers, zero=2, dtype=config.dtype, batch_tokens=config.batch_tokens,
        lr=config.lr,
        warmup=min(100, config.steps // 10), eval_every=max(1, config.steps // 3),
        checkpoint_every=config.steps, seed=config.seed, resume=True,
    )
    train_configs = sweep_configs(train_base, list(config.losses))  # validates each
    bench_config = BenchConfig(
        target=config.target, drafters=["<drafter>"],
        benchmarks=list(config.bench), limit=config.bench_limit, temperatures=list(config.temperatures),
        k=config.draft_k, max_new_tokens=config.max_new_tokens, workers=config.workers, seed=config.seed,
        dtype=config.bench_dtype, out=out / "report", progress=config.progress,
    )
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
