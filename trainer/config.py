"""Training configuration: one strict dataclass per run, validated before any Ray worker starts.

`TrainConfig` is what a user chooses (it maps one-to-one onto `lkspec train` flags; unknown keys
are refused). `RunPlan` is what the driver resolved from it (cache key, paths, step count, the
held-out split) and hands to every worker as a plain dict.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trainer.loss_names import LOSS_NAMES, TAIL_MODES
from trainer.precision import AUTO_HELP, DTYPE_CHOICES, resolve_dtype
from trainer.settings import ConfigError, check_settings, flag, setting

TARGET_SOURCES = ("cache", "online")
ZERO_STAGES = (1, 2, 3)
# Keys that may change between a run and its --resume (they do not change what is trained; exact_heldout
# adds a measurement to the evaluations still to come).
RESUMABLE_CHANGES = frozenset({"resume", "stop_after", "checkpoint_every", "keep_checkpoints", "exact_heldout"})
WHAT, HOW_LONG, OPTIMIZATION, CLUSTER, EVALUATION = (
    "what to train", "how long", "optimization", "cluster", "evaluation and checkpoints")


def _plain_name(name: str) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and not name.startswith(".")


def _arch_overrides(text: str) -> dict[str, Any]:
    from trainer.drafters import parse_arch_overrides

    return parse_arch_overrides(text)


@dataclass
class TrainConfig:
    """One training run: drafter, loss, optimization and data settings (defaults: the paper's recipe)."""

    cache: str = setting(group=WHAT, metavar="DIR", help="cache directory (from `lkspec cache build`)")
    out: str = setting(group=WHAT, metavar="RUNS", help="runs directory")  # the run lives in <out>/<run_name>/
    loss: str = setting("kl", choices=LOSS_NAMES, cli=False, help="the loss (`lkspec train --loss` takes several)")
    drafter: str = setting(
        "tiny", group=WHAT, metavar="SPEC",
        help="architecture preset (tiny: 2 layers, hidden 256; small: 4 layers, hidden 512), a Hugging Face model "
        "directory sharing the target's tokenizer, eagle3[:KEY=VALUE,...] (EAGLE-3 over the cache's aux features; keys "
        "hidden, heads, kv_heads, intermediate, draft_vocab, steps, freeze_embeddings, max_positions, rope_theta), "
        "medusa[:heads=6,layers=1,draft_vocab=N] (MEDUSA-1 heads over the cache's last feature) or "
        "mlp[:stages=6,inner=D,tie=false,scale_input=false,draft_vocab=N] (an MLP speculator over the cache's last "
        "feature; with draft_vocab its model/ loads in lkspec only: vLLM's MLPSpeculator has no token map)")
    drafter_config: dict[str, Any] = setting(
        {}, group=WHAT, metavar="K=V,...", parse=_arch_overrides, expected="a mapping like layers=2,hidden=256",
        help="override preset fields: layers, hidden, heads, kv_heads, intermediate, max_positions, rope_theta, "
        "tie_embeddings (e.g. layers=4,hidden=384,heads=6); not for eagle3, medusa or mlp, whose options follow "
        "`NAME:`")
    init_embeddings_from: str | None = setting(
        None, group=WHAT, choices=("target",),
        help="copy the target's token embeddings into an independent drafter (its width becomes the target's); "
        "eagle3 takes the target's embeddings whenever its width is the target's (this flag makes another hidden= an "
        "error), medusa always copies the target's LM head, mlp takes nothing from the target (the flag is ignored "
        "with a warning)")
    run_name: str | None = setting(
        None, group=WHAT, check=_plain_name, expected="a plain directory name",
        help="run directory name (default [<family>-]<loss>-<cache key[:8]>-s<seed>, the family prefix for eagle3, "
        "medusa and mlp; a sweep appends -<loss>)")
    steps: int | None = setting(None, group=HOW_LONG, ge=1, help="optimizer steps")  # exclusive with epochs
    epochs: float | None = setting(None, group=HOW_LONG, gt=0,
                                   help="passes over each worker's share of the training sequences (default: 1)")
    workers: int = setting(2, group=CLUSTER, ge=1, help="data-parallel Ray Train workers")
    zero: int = setting(2, group=CLUSTER, choices=ZERO_STAGES, help="DeepSpeed ZeRO stage")
    dtype: str = setting("auto", group=OPTIMIZATION, choices=DTYPE_CHOICES, help=f"training precision ({AUTO_HELP})")
    lr: float = setting(4e-4, group=OPTIMIZATION, gt=0, help="peak learning rate")
    warmup: int = setting(100, group=OPTIMIZATION, ge=0, help="linear warm-up steps before cosine decay")
    weight_decay: float = setting(0.0, group=OPTIMIZATION, ge=0, help="AdamW weight decay (default: 0)")
    adam_beta1: float = setting(0.9, cli=False, ge=0, lt=1, help="AdamW beta1")
    adam_beta2: float = setting(0.95, cli=False, ge=0, lt=1, help="AdamW beta2")
    grad_clip: float = setting(0.5, group=OPTIMIZATION, ge=0, help="gradient clipping norm")
    batch_tokens: int = setting(8192, group=OPTIMIZATION, ge=2,
                                help="tokens per worker and step, padding included")
    eta: float | None = setting(None, group=OPTIMIZATION, ge=0,
                                help="LK^lambda temperature: lambda = exp(-eta*alpha) (default: the drafter family's, "
                                "10 for medusa as in the paper, 3 for the others)")
    tail: str = setting("bucket", group=WHAT, choices=TAIL_MODES,
                        help="top-k tail handling: one extra category (bucket, default) or ignored (drop)")
    target_source: str = setting(
        "cache", group=WHAT, choices=TARGET_SOURCES,
        help="cache: the cached top-k (default); online: the target model runs in each worker and supplies its "
        "full distribution (the baseline the top-k cache is judged against)")
    target: str | None = setting(
        None, group=WHAT, metavar="MODEL",
        help="target model (alias, HF directory or .gguf) for --target-source online, --exact-heldout, "
        "--init-embeddings-from target, "
        "or the tokenizer of a preset drafter (default: the target recorded in the cache manifest)")
    seed: int = setting(0, group=OPTIMIZATION, ge=0, help="initialization and data order seed")
    heldout_fraction: float = setting(
        0.05, group=EVALUATION, gt=0, le=0.5, expected="a finite number > 0 and <= 0.5",
        help="fraction of sequences (by sample-id hash) never trained on (default: 0.05, at least 1 sequence)")
    eval_sequences: int = setting(256, group=EVALUATION, ge=1,
                                  help="held-out sequences scored at each evaluation")
    exact_heldout: bool = setting(
        False, group=EVALUATION,
        help="also score held-out alpha against the target's full distribution: the exact alpha, between the two "
        "tail bounds (the target model runs in each worker at each evaluation; a run with --target-source online "
        "always does)")
    eval_every: int = setting(100, group=EVALUATION, ge=0,
                              help="steps between held-out evaluations; 0 = only at the end")
    checkpoint_every: int = setting(500, group=EVALUATION, ge=0,
                                    help="steps between DeepSpeed checkpoints; 0 = only at the end")
    keep_checkpoints: int = setting(2, group=EVALUATION, ge=1, help="checkpoints kept")
    tau_draft_len: int = setting(7, cli=False, ge=1, help="K of the expected acceptance length 1 + Σ_k ᾱ^k")
    pool_sequences: int = setting(256, cli=False, ge=1, help="sequences grouped by length before packing into batches")
    prefetch_batches: int = setting(4, cli=False, ge=1, help="batches read ahead of the step")
    resume: bool = setting(False, group=EVALUATION,
                           help="continue the run(s) from their latest checkpoint (same settings, exact continuation)")
    stop_after: int | None = setting(
        None, group=EVALUATION, ge=1, metavar="STEP",
        help="checkpoint and stop this invocation after STEP (continue later with --resume)")

    def __post_init__(self):
        from trainer.drafters import family_for

        if self.eta is None and isinstance(self.drafter, str):
            self.eta = family_for(self.drafter).default_eta
        if self.steps is None and self.epochs is None:
            self.epochs = 1.0

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
        """Raise ConfigError naming the first invalid setting."""
        from trainer.drafters import DrafterError, family_for

        check_settings(self)
        family = family_for(self.drafter)
        try:
            family.parse(self.drafter)
        except DrafterError as exc:
            raise ConfigError(str(exc)) from None
        if self.drafter_config and family.options:
            raise ConfigError(f"{flag('drafter_config')} does not apply to {family.title} drafters: give their "
                              f"options in --drafter, e.g. --drafter {family.example}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either --steps or --epochs, not both")

    def resolved_dtype(self, device, *, warn: bool = False) -> str:
        """fp32 or bf16 on `device` (trainer.precision.resolve_dtype: auto is bf16 only where native)."""
        return resolve_dtype(self.dtype, device, warn=warn)


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
    target_path: str | None = None  # target model directory (--target-source online, --exact-heldout)
    columns: list[str] = field(default_factory=list)  # cache feature columns the drafter reads
    rescore_exact: bool = False  # a finished run: its final evaluation again with the exact α, nothing trained

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
