"""Drafters: the interface the training loop uses, and builders for `independent` drafters.

A drafter is an `nn.Module` whose forward maps a batch (token ids, attention mask, the positions of
the trained targets, plus any cache feature columns it declared) to one `DraftStep` per draft step:
draft logits scored against the batch's target rows. An `independent` drafter is a Hugging Face
causal LM sharing the target's tokenizer: one step, logits at the positions that predict each
trained token. EAGLE-3 (trainer.eagle3_drafter) declares `required_columns = ("aux",)`, returns
several steps, and sets `vocab_map` (its reduced vocabulary's target ids).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

# Architecture presets of `--drafter NAME` (Llama blocks; the vocabulary is always the cache's).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"layers": 2, "hidden": 256, "heads": 4, "kv_heads": 4, "intermediate": 768},
    "small": {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 4, "intermediate": 1536},
}
# Keys of `--drafter-config` and the LlamaConfig fields they set.
ARCH_KEYS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
    "max_positions": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "tie_embeddings": "tie_word_embeddings",
}


class DrafterError(ValueError):
    """A drafter specification that cannot be built (message names the flag)."""


@dataclass(frozen=True)
class DraftStep:
    """One draft step's logits `[N, V_draft]` and the batch target rows `[N]` they are scored against."""

    logits: Tensor
    rows: Tensor | None = None  # None: every target row of the batch, in order


class Drafter(nn.Module):
    """Interface of a trainable drafter (see the module docstring)."""

    kind: ClassVar[str] = ""
    required_columns: ClassVar[tuple[str, ...]] = ()  # cache feature columns forward() reads
    num_steps: int = 1
    vocab_map: Tensor | None = None  # [V_draft] target ids of a reduced draft vocabulary (d2t)

    def forward(self, batch: dict[str, Tensor]) -> list[DraftStep]:  # pragma: no cover - interface
        """Per-step draft logits for the batch's trained positions."""
        raise NotImplementedError

    def export(self, out_dir: Path, tokenizer_dir: str | Path | None = None) -> None:  # pragma: no cover
        """Write the drafter in the layout its consumers load (needs full, un-partitioned weights)."""
        raise NotImplementedError

    def reload(self, model_dir: Path, dtype: torch.dtype) -> Drafter:  # pragma: no cover - interface
        """The export in model_dir loaded back as a drafter of this kind (eval mode), for the export check."""
        raise NotImplementedError


class IndependentDrafter(Drafter):
    """A Hugging Face causal LM drafting on its own: logits at position t−1 predict token t."""

    kind = "independent"

    def __init__(self, model: nn.Module):
        super().__init__()
        config = model.config
        rescaled = getattr(config, "final_logit_softcapping", None) or \
            getattr(config, "logit_scale", None) not in (None, 1, 1.0)
        if rescaled:
            raise DrafterError(
                f"{type(model).__name__} rescales its logits (softcapping / logit_scale): "
                "independent drafters apply the output embedding to the last hidden state directly"
            )
        self.model = model

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def forward(self, batch: dict[str, Tensor]) -> list[DraftStep]:
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state  # [B, T, d]
        # Only the trained positions go through the LM head: [N, d] -> [N, V], never [B, T, V].
        hidden = hidden[batch["target_batch"], batch["target_pos"]]
        return [DraftStep(self.model.get_output_embeddings()(hidden))]

    def export(self, out_dir: Path, tokenizer_dir: str | Path | None = None) -> None:
        """save_pretrained (safetensors) plus the tokenizer: loads with AutoModelForCausalLM."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)

    def reload(self, model_dir: Path, dtype: torch.dtype) -> IndependentDrafter:
        """The export loaded back with AutoModelForCausalLM."""
        from transformers import AutoModelForCausalLM

        return IndependentDrafter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)).eval()


@dataclass(frozen=True)
class DrafterSpec:
    """A resolved drafter description: identical on every worker, recorded in run.json."""

    kind: str  # independent | eagle3
    label: str  # what the user asked for: "tiny", "tiny+layers=3", a directory, "eagle3:steps=4"
    source: str  # "config" (built from hf_config) | "dir" (from_pretrained(path))
    hf_config: dict[str, Any] = field(default_factory=dict)  # LlamaConfig / Eagle3Config kwargs (source=config)
    path: str | None = None  # Hugging Face directory (source=dir)
    init_embeddings_path: str | None = None  # target directory whose input embeddings are copied
    settings: dict[str, Any] = field(default_factory=dict)  # eagle3: steps, freeze_embeddings, draft_vocab_mass
    draft_vocab: list[int] | None = None  # eagle3: the draft vocabulary's target ids, ascending

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DrafterSpec:
        return cls(**data)


def parse_arch_overrides(text: str) -> dict[str, Any]:
    """`layers=2,hidden=256,heads=4` -> {"layers": 2, ...}; unknown keys and non-integers refused."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in ARCH_KEYS:
            raise DrafterError(f"--drafter-config: bad item {item!r}; expected KEY=VALUE with KEY in "
                               f"{', '.join(ARCH_KEYS)}")
        overrides[key] = option_value(key, value.strip())
    return overrides


def option_value(key: str, value: Any, flag: str = "--drafter-config") -> Any:
    """One architecture option as its type: true/false for *_embeddings keys, a float rope_theta, else an int > 0."""
    if key.endswith("_embeddings"):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes"):
            return True
        if str(value).lower() in ("0", "false", "no"):
            return False
        raise DrafterError(f"{flag} {key} must be true or false, got {value!r}")
    try:
        number = float(value) if key == "rope_theta" else int(value)
    except (TypeError, ValueError):
        raise DrafterError(f"{flag} {key} must be a number, got {value!r}") from None
    if number <= 0:
        raise DrafterError(f"{flag} {key} must be > 0, got {value!r}")
    return number


def resolve_drafter_spec(drafter: str, overrides: dict[str, Any], *, vocab_size: int,
                         token_ids: dict[str, int | None], max_positions: int,
                         init_embeddings: tuple[str, int] | None = None) -> DrafterSpec:
    """Turn `--drafter` / `--drafter-config` into a DrafterSpec for a cache with this vocabulary.

    `token_ids` holds bos/eos/pad ids of the target's tokenizer; `init_embeddings` is
    (target directory, target hidden size) for `--init-embeddings-from target`.
    """
    overrides = {key: option_value(key, value) for key, value in overrides.items()}
    unknown = sorted(set(overrides) - set(ARCH_KEYS))
    if unknown:
        raise DrafterError(f"--drafter-config: unknown key(s) {unknown}; valid: {', '.join(ARCH_KEYS)}")
    init_path = init_embeddings[0] if init_embeddings else None
    if drafter in PRESETS:
        arch = {**PRESETS[drafter], "max_positions": max_positions, "rope_theta": 10000.0,
                "tie_embeddings": True}
        if init_embeddings and "hidden" not in overrides:
            # The target's embeddings fix the width; keep the preset's head count.
            arch["hidden"] = init_embeddings[1]
            arch["intermediate"] = 3 * init_embeddings[1]
        arch.update(overrides)
        if init_embeddings and arch["hidden"] != init_embeddings[1]:
            raise DrafterError(
                f"--init-embeddings-from target: the target's embeddings have width {init_embeddings[1]}, "
                f"the drafter has hidden={arch['hidden']} (drop hidden= from --drafter-config)"
            )
        if arch["hidden"] % arch["heads"] or arch["heads"] % arch["kv_heads"]:
            raise DrafterError(
                f"--drafter-config: hidden={arch['hidden']} must be a multiple of heads={arch['heads']}, "
                f"and heads a multiple of kv_heads={arch['kv_heads']}"
            )
        hf_config = {ARCH_KEYS[key]: value for key, value in arch.items()}
        hf_config.update(vocab_size=vocab_size, bos_token_id=token_ids.get("bos"),
                         eos_token_id=token_ids.get("eos"), pad_token_id=token_ids.get("pad"),
                         attention_dropout=0.0)
        label = drafter + "".join(f"+{k}={v}" for k, v in sorted(overrides.items()))
        return DrafterSpec(kind="independent", label=label, source="config", hf_config=hf_config,
                           init_embeddings_path=init_path)
    path = Path(drafter).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise DrafterError(f"--drafter must be a preset ({', '.join(PRESETS)}) or a Hugging Face "
                           f"model directory with config.json, got {drafter!r}")
    if overrides:
        raise DrafterError("--drafter-config only applies to presets, not to a model directory")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    model_vocab = getattr(config, "vocab_size", None)
    if model_vocab != vocab_size:
        from cache import CacheMismatchError

        raise CacheMismatchError(f"cache was built with vocabulary size {vocab_size}, drafter {path} "
                                 f"has vocab_size {model_vocab}")
    if init_embeddings and getattr(config, "hidden_size", None) != init_embeddings[1]:
        raise DrafterError(f"--init-embeddings-from target: the target's embeddings have width "
                           f"{init_embeddings[1]}, drafter {path} has hidden_size {config.hidden_size}")
    return DrafterSpec(kind="independent", label=str(path.resolve()), source="dir", path=str(path.resolve()),
                       init_embeddings_path=init_path)


def build_drafter(spec: DrafterSpec) -> Drafter:
    """Instantiate the drafter in fp32 on CPU (weights from the directory, or initialized from torch's RNG)."""
    if spec.kind == "eagle3":
        from trainer.drafters.eagle3.train import build_eagle3

        return build_eagle3(spec)
    if spec.kind != "independent":
        raise DrafterError(f"unknown drafter kind {spec.kind!r}")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if spec.source == "config":
        model = LlamaForCausalLM(LlamaConfig(**spec.hf_config))
    elif spec.source == "dir":
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32, trust_remote_code=False)
    else:
        raise DrafterError(f"unknown drafter source {spec.source!r}")
    if spec.init_embeddings_path:
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(load_input_embeddings(spec.init_embeddings_path))
    model.config.use_cache = False
    return IndependentDrafter(model.float().train())


def load_input_embeddings(model_dir: str | Path) -> Tensor:
    """The input token-embedding matrix `[V, d]` of a Hugging Face model, read alone from its safetensors."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    embedding = skeleton.get_input_embeddings().weight
    name = next(n for n, p in skeleton.named_parameters() if p is embedding)
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = [model_dir / json.loads(index.read_text())["weight_map"][name]]
    for weights in files:
        with safe_open(weights, framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name).float()
    raise DrafterError(f"{model_dir}: no tensor {name!r} (the input embeddings) in its safetensors files")
