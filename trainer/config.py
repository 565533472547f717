"""Training configuration: one strict dataclass per run, validated before any Ray worker starts.

`TrainConfig` is what a user chooses (it maps one-to-one onto `lkspec train` flags; unknown keys
are refused). `RunPlan` is what the driver resolved from it (cache key, paths, step count, the
held-out split) and hands to every worker as a plain dict.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trainer.drafters import DrafterError, family_for
from trainer.losses import LOSS_NAMES, TAIL_MODES
from trainer.precision import DTYPE_CHOICES, resolve_dtype

TARGET_SOURCES = ("cache", "online")
ZERO_STAGES = (1, 2, 3)
# Keys that may change between a run and its --resume (they do not change what is computed).
RESUMABLE_CHANGES = frozenset({"resume", "stop_after", "checkpoint_every", "keep_checkpoints"})


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag."""


def flag(key: str) -> str:
    """The command-line flag of a config key (`batch_tokens` -> `--batch-tokens`)."""
    return "--" + key.replace("_", "-")


@dataclass
class TrainConfig:
    """One training run: drafter, loss, optimization and data settings (defaults: the paper's recipe)."""

    cache: str  # cache directory (a `lkspec cache build` output)
    out: str  # runs root: the run lives in <out>/<run_name>/
    loss: str = "kl"
    drafter: str = "tiny"  # preset (tiny, small), a HF model directory, or eagle3|medusa|mlp[:KEY=VALUE,...]
    drafter_config: dict[str, Any] = field(default_factory=dict)  # overrides of the preset (independent only)
    init_embeddings_from: str | None = None  # "target": copy the target's token embeddings
    run_name: str | None = None  # default [<family>-]<loss>-<cache key[:8]>-s<seed>
    steps: int | None = None  # optimizer steps (exclusive with epochs)
    epochs: float | None = None  # passes over each worker's training share
    workers: int = 2
    zero: int = 2
    dtype: str = "auto"  # auto = bf16 where the workers' device computes it natively, else fp32
    lr: float = 4e-4
    warmup: int = 100
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 0.5
    batch_tokens: int = 8192  # per worker per step, padding included
    eta: float | None = None  # LK^λ η; None: the drafter family's default (medusa 10, the others 3)
    tail: str = "bucket"
    target_source: str = "cache"
    target: str | None = None  # target model for --target-source online / --init-embeddings-from target
    seed: int = 0
    heldout_fraction: float = 0.05
    eval_sequences: int = 256  # held-out sequences scored at each evaluation (at most)
    eval_every: int = 100  # steps between held-out evaluations (0: only at the end)
    checkpoint_every: int = 500  # steps between DeepSpeed checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    tau_draft_len: int = 7  # K of the expected acceptance length 1 + Σ_k ᾱ^k
    pool_sequences: int = 256  # sequences grouped by length before packing into batches
    prefetch_batches: int = 4
    resume: bool = False
    stop_after: int | None = None  # stop this invocation after that step (checkpointed), e.g. to resume later

    def __post_init__(self):
        if self.eta is None and isinstance(self.drafter, str):
            self.eta = family_for(self.drafter).default_eta

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, refusing unknown keys by name, then validate."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(map(repr, unknown))}; "
                              f"valid: {', '.join(sorted(known))}")
        for key in ("cache", "out"):
            if key not in data:
                raise ConfigError(f"{flag(key)} is required")
        config = cls(**data)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy."""
        return asdict(self)

    def validate(self) -> None:
        """Raise ConfigError naming the flag of the first invalid value."""
        _choice("loss", self.loss, LOSS_NAMES)
        _choice("tail", self.tail, TAIL_MODES)
        _choice("dtype", self.dtype, DTYPE_CHOICES)
        _choice("target_source", self.target_source, TARGET_SOURCES)
        _choice("zero", self.zero, ZERO_STAGES)
        for key in ("cache", "out", "drafter"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"{flag(key)} must be a non-empty string")
        if not isinstance(self.drafter_config, dict):
            raise ConfigError(f"{flag('drafter_config')} must be a mapping like layers=2,hidden=256")
        family = family_for(self.drafter)
        try:
            family.parse(self.drafter)
        except DrafterError as exc:
            raise ConfigError(str(exc)) from None
        if self.drafter_config and family.options:
            raise ConfigError(f"{flag('drafter_config')} does not apply to {family.title} drafters: give their "
                              f"options in --drafter, e.g. --drafter {family.example}")
        if self.init_embeddings_from not in (None, "target"):
            raise ConfigError(f"{flag('init_embeddings_from')} must be 'target', got {self.init_embeddings_from!r}")
        if self.run_name is not None:
            if not self.run_name or "/" in self.run_name or self.run_name.startswith("."):
                raise ConfigError(f"{flag('run_name')} must be a plain directory name, got {self.run_name!r}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either --steps or --epochs, not both")
        if self.steps is not None:
            _int("steps", self.steps, minimum=1)
        if self.epochs is not None:
            _number("epochs", self.epochs, low=0.0, low_open=True)
        _int("workers", self.workers, minimum=1)
        _number("lr", self.lr, low=0.0, low_open=True)
        _int("warmup", self.warmup, minimum=0)
        _number("weight_decay", self.weight_decay, low=0.0)
        _number("adam_beta1", self.adam_beta1, low=0.0, high=1.0, high_open=True)
        _number("adam_beta2", self.adam_beta2, low=0.0, high=1.0, high_open=True)
        _number("grad_clip", self.grad_clip, low=0.0)
        _int("batch_tokens", self.batch_tokens, minimum=2)
        _number("eta", self.eta, low=0.0)
        _int("seed", self.seed, minimum=0)
        _number("heldout_fraction", self.heldout_fraction, low=0.0, high=0.5, low_open=True)
        _int("eval_sequences", self.eval_sequences, minimum=1)
        _int("eval_every", self.eval_every, minimum=0)
        _int("checkpoint_every", self.checkpoint_every, minimum=0)
        _int("keep_checkpoints", self.keep_checkpoints, minimum=1)
        _int("tau_draft_len", self.tau_draft_len, minimum=1)
        _int("pool_sequences", self.pool_sequences, minimum=1)
        _int("prefetch_batches", self.prefetch_batches, minimum=1)
        if not isinstance(self.resume, bool):
            raise ConfigError(f"{flag('resume')} must be true or false")
        if self.stop_after is not None:
            _int("stop_after", self.stop_after, minimum=1)

    def resolved_dtype(self, device, *, warn: bool = False) -> str:
        """fp32 or bf16 on `device` (trainer.precision.resolve_dtype: auto is bf16 only where native)."""
        return resolve_dtype(self.dtype, device, warn=warn)


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{flag(key)} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _int(key: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag(key)} must be an integer >= {minimum}, got {value!r}")


def _number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        raise ConfigError(f"{flag(key)} must be a finite number {' and '.join(bounds)}, got {value!r}")


@dataclass
class RunPlan:
    """Everything a worker needs, resolved and checked by the driver (plain JSON data)."""

    config: TrainConfig
    run_dir: str
    cache_path: str
    cache_key: str
    vocab_size: int
    k: int
    tokenizer_sha256: str
    tokenizer_dir: str  # saved with the exported drafter
    drafter: dict[str, Any]  # trainer.drafters.DrafterSpec.to_dict()
    total_steps: int
    heldout_threshold: int  # sample-id hash < threshold -> held out (never trained on)
    num_train_sequences: int
    num_heldout_sequences: int
    eval_ids: list[str]  # held-out sequences scored at each evaluation, in order
    eval_shards: dict[str, list[str]]  # shard index (str) -> the eval ids it holds
    target_path: str | None = None  # online target model directory
    columns: list[str] = field(default_factory=list)  # cache feature columns the drafter reads

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy (the config nested)."""
        data = asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        """Inverse of to_dict()."""
        data = dict(data)
        data["config"] = TrainConfig.from_dict(data["config"])
        return cls(**data)
