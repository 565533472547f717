"""What `lkspec demo` and `lkspec study` share: one target cache, drafters trained from it, one benchmark.

StageConfig declares those settings once, with the study's budget as defaults (the demo is a preset
of it, pipeline.demo.DemoConfig), and hands each stage the config of its own command: BuildConfig,
TrainConfig, BenchConfig.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.loss_names import LOSS_NAMES
from trainer.precision import AUTO_HELP, DTYPE_CHOICES
from trainer.settings import ConfigError, check_settings, setting

if TYPE_CHECKING:
    from pipeline.bench_job import BenchConfig
    from pipeline.build import BuildConfig
    from trainer.config import TrainConfig

CHECKPOINTS_PER_RUN = 4  # a study or demo run checkpoints every quarter of its steps
WHAT, DATA, DRAFTERS, BENCH = ("what to run", "target and cache", "drafters (DeepSpeed ZeRO-2 under Ray Train)",
                               "benchmark and statistics")


@dataclass
class StageConfig:
    """The sizes of the three stages; the defaults are the study's (about an hour on a 2-core CPU machine)."""

    out: Path = setting(Path("lkspec-study"), group=WHAT, help="output directory")
    target: str = setting("smollm2-135m", group=DATA, help="target model")
    data: str = setting("sharegpt", group=DATA, help="conversations")
    conversations: int = setting(150, group=DATA, ge=1, help="conversations cached")
    max_length: int = setting(384, group=DATA, ge=2, help="tokens per conversation")
    k: int = setting(32, group=DATA, ge=1, help="top-k cached per position")
    # auto is bf16 only where the device computes it natively
    dtype: str = setting("auto", group=DATA, choices=DTYPE_CHOICES, help=f"cache and training precision ({AUTO_HELP})")
    losses: tuple[str, ...] = setting(("kl", "lk_alpha", "lk_lambda"), key="loss", group=DRAFTERS, choices=LOSS_NAMES,
                                      distinct=True, expected=f"distinct losses from {', '.join(LOSS_NAMES)}",
                                      help="losses, one drafter each")
    steps: int = setting(45, group=DRAFTERS, ge=1, help="optimizer steps per drafter")
    batch_tokens: int = setting(512, group=DRAFTERS, ge=1, help="tokens per worker and training step")
    lr: float = setting(1e-3, group=DRAFTERS, gt=0, help="peak learning rate")
    workers: int = setting(2, group=DRAFTERS, ge=1, help="Ray workers for every stage")
    bench: tuple[str, ...] = setting(("mt-bench", "humaneval", "gsm8k"), group=BENCH, help="benchmarks")
    bench_limit: int = setting(5, group=BENCH, ge=1, help="prompts per benchmark")
    temperatures: tuple[float, ...] = setting((0.0, 1.0), key="temperature", group=BENCH, ge=0,
                                              help="sampling temperatures")
    draft_k: int = setting(4, group=BENCH, ge=1, help="draft tokens per target forward")
    max_new_tokens: int = setting(32, group=BENCH, ge=1, help="tokens generated per prompt")
    address: str | None = setting(None, group=WHAT, help="existing Ray cluster (default: start a local one)")
    progress: bool = setting(True, cli=False, help="progress bars")
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.out, str):
            self.out = Path(self.out)

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that breaks its declaration, or an unknown benchmark."""
        from pipeline.resolve.prompts import BENCHMARKS, is_benchmark

        check_settings(self)
        unknown = [name for name in self.bench if not is_benchmark(name)]
        if unknown:
            raise ConfigError(f"must be benchmarks from {', '.join(BENCHMARKS)} or .jsonl prompt files, "
                              f"got {','.join(unknown)!r}", key="bench")

    def root(self) -> Path:
        """The output directory, absolute."""
        return Path(self.out).expanduser().resolve()

    def build_config(self, k: int, *, features: tuple[str, ...], seed: int = 0) -> BuildConfig:
        """The top-`k` cache of the target over the conversations, with the feature columns the drafters read."""
        from pipeline.build import BuildConfig

        return BuildConfig(target=self.target, data=self.data, out=self.root() / "caches", k=k,
                           limit=self.conversations, max_length=self.max_length, workers=self.workers,
                           dtype=self.dtype, address=self.address, progress=self.progress, seed=seed,
                           skip_invalid=True,  # ShareGPT has a few empty turns: skip and count them
                           shard_size=16,  # small shards: steady progress and even load over the workers
                           features=features)

    def run_config(self, drafter: str, *, pretrained: bool = False, **settings) -> TrainConfig:
        """A run of `drafter` for `steps` (ZeRO-2, resumed when rerun); `settings` on top.

        It checkpoints every quarter of its steps and at its end, so a run killed or interrupted midway (a
        worker taken by Ray's memory monitor, Ctrl-C) loses at most a quarter of its training when rerun.

        The drafter starts from the target's embeddings / LM head when its family takes them (not the MLP
        speculator's) and it is not a `pretrained` model, which keeps its own.
        """
        from trainer.config import TrainConfig
        from trainer.drafters import family_for

        takes_target = not pretrained and family_for(drafter).init_embeddings
        return TrainConfig(out=str(self.root() / "runs"), drafter=drafter, steps=self.steps, workers=self.workers,
                           zero=2, dtype=self.dtype, lr=self.lr, batch_tokens=self.batch_tokens,
                           checkpoint_every=-(-self.steps // CHECKPOINTS_PER_RUN), resume=True,
                           init_embeddings_from="target" if takes_target else None, **settings)

    def bench_config(self, drafters: list[str], temperatures: tuple[float, ...], name: str, *, dtype: str,
                     seed: int = 0) -> BenchConfig:
        """One benchmark of `drafters` at `temperatures`, written to OUT/<name>/."""
        from pipeline.bench_job import BenchConfig

        return BenchConfig(target=self.target, drafters=drafters, benchmarks=list(self.bench),
                           limit=self.bench_limit, temperatures=list(temperatures), k=self.draft_k,
                           max_new_tokens=self.max_new_tokens, workers=self.workers, seed=seed, dtype=dtype,
                           out=self.root() / name, address=self.address, progress=self.progress)
