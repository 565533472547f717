"""The main job (`lkspec demo`): cache → three drafters (KL, LK^α, LK^λ) → speculative-decoding report."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.ray_session import ray_session

DEMO_LOSSES = ("kl", "lk_alpha", "lk_lambda")


@dataclass
class DemoConfig:
    """Sizes of the demo's three stages; the defaults fit 15 minutes on a 2-core CPU machine."""

    out: Path = Path("lkspec-demo")
    target: str = "smollm2-135m"
    data: str = "sharegpt"
    conversations: int = 150
    max_length: int = 384
    k: int = 32
    drafter: str = "tiny"
    losses: tuple[str, ...] = DEMO_LOSSES
    steps: int = 40
    batch_tokens: int = 1024
    lr: float = 4e-4
    bench: tuple[str, ...] = ("mt-bench", "humaneval", "gsm8k")
    bench_limit: int = 2
    temperatures: tuple[float, ...] = (0.0, 1.0)
    draft_k: int = 4
    max_new_tokens: int = 32
    dtype: str = "auto"  # cache and training: auto is bf16 only where the device computes it natively
    bench_dtype: str = "auto"
    workers: int = 2
    seed: int = 0
    address: str | None = None
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(config: DemoConfig) -> Path:
    """Run the three stages on one Ray cluster and return the report directory."""
    from pipeline.bench_job import BenchConfig, run_bench
    from pipeline.build import BuildConfig, run_build
    from pipeline.train_job import sweep_configs, train_sweep
    from trainer.config import TrainConfig

    out = Path(config.out).expanduser().resolve()
    drafter, pretrained = _demo_drafter(config.drafter)
    build_config = BuildConfig(
        target=config.target, data=config.data, out=out / "caches", k=config.k,
        limit=config.conversations, max_length=config.max_length, workers=config.workers,
        dtype=config.dtype, address=config.address, progress=config.progress, seed=config.seed,
        skip_invalid=True,  # ShareGPT has a few empty turns: skip and count them
        shard_size=16,  # small shards: steady progress and even load over the workers
    )
    train_base = TrainConfig(
        cache="", out=str(out / "runs"), drafter=drafter,
        init_embeddings_from=None if pretrained else "target",  # a pretrained drafter keeps its own
        steps=config.steps, workers=config.workers, zero=2, dtype=config.dtype, batch_tokens=config.batch_tokens,
        lr=config.lr,
        warmup=min(100, config.steps // 10), eval_every=max(1, config.steps // 3),
        checkpoint_every=config.steps, seed=config.seed, resume=True,
    )
    with ray_session(config.address):
        _stage(1, "target cache", f"{config.target} over {config.conversations} {config.data} conversations, top-{config.k}")
        started = time.time()
        build = run_build(build_config)
        verb = "reused" if build.reused else "built"
        _say(f"{verb} cache {build.key} at {build.path}"
             + (" (same key: the target pass was not rerun)" if build.reused else ""))
        config.timings["cache"] = time.time() - started

        start_from = "fine-tuned from its weights" if pretrained else "from scratch"
        _stage(2, "drafters", f"{config.drafter} drafter ({start_from}) x {', '.join(config.losses)}, "
               f"{config.steps} steps each, DeepSpeed ZeRO-2 on {config.workers} Ray Train worker(s)")
        started = time.time()
        train_base.cache = str(build.path)
        run_dirs = train_sweep(sweep_configs(train_base, list(config.losses)), progress=config.progress)
        config.timings["train"] = time.time() - started

        _stage(3, "speculative decoding", f"{', '.join(config.bench)} x {config.bench_limit} prompts, "
               f"T={', '.join(f'{t:g}' for t in config.temperatures)}, K={config.draft_k}")
        started = time.time()
        untuned = [config.drafter] if pretrained else []  # the pretrained drafter before fine-tuning
        report_dir = run_bench(BenchConfig(
            target=config.target, drafters=untuned + [str(path) for path in run_dirs],
            benchmarks=list(config.bench), limit=config.bench_limit, temperatures=list(config.temperatures),
            k=config.draft_k, max_new_tokens=config.max_new_tokens, workers=config.workers, seed=config.seed,
            dtype=config.bench_dtype, out=out / "report", progress=config.progress,
        ))
        config.timings["bench"] = time.time() - started
    print((report_dir / "report.md").read_text())
    timing = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in config.timings.items())
    _say(f"stage times: {timing}")
    _say(f"report: {report_dir / 'report.md'} (+ report.json and PNG plots)")
    return report_dir


def _demo_drafter(spec: str) -> tuple[str, bool]:
    """The drafter as `lkspec train` takes it, and whether it starts from pretrained weights.

    A preset is built from a config; a model alias is resolved (fetched and converted on first use)
    to its directory; a directory is used as it is.
    """
    from pipeline.models import EMBEDDED_MODELS, resolve_model
    from trainer.drafters import PRESETS

    if spec in PRESETS:
        return spec, False
    if spec in EMBEDDED_MODELS:
        return str(resolve_model(spec).path), True
    return spec, True


def _stage(number: int, name: str, detail: str) -> None:
    _say(f"\n== [{number}/3] {name}: {detail}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
