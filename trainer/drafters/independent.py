"""The `independent` family: a Hugging Face causal LM sharing the target's tokenizer, drafting on its own.

    --drafter tiny | small | <HF model directory>   [--drafter-config layers=2,hidden=256,...]

One step: the logits at the position that predicts each trained token. Decoding keeps the
drafter's own KV cache, cropped back to the committed prefix before every draft.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainer.drafters.base import (Drafter, DrafterError, DrafterSpec, DraftStep, Family, Propose, SpecContext,
                                   load_input_embeddings, option_value, save_tokenizer)
from trainer.drafters.causal_lm import cache_length, forward, rollback

NAME = "independent"
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


class IndependentDrafter(Drafter):
    """A Hugging Face causal LM drafting on its own: logits at position t−1 predict token t."""

    kind = NAME

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
        save_tokenizer(tokenizer_dir, out_dir)

    def reload(self, model_dir: Path, dtype: torch.dtype) -> IndependentDrafter:
        """The export loaded back with AutoModelForCausalLM."""
        return IndependentDrafter(load_causal_lm(model_dir, dtype))


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype) -> nn.Module:
    """A local Hugging Face causal LM in eval mode (never trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False).eval()


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
        return DrafterSpec(kind=NAME, label=label, source="config", hf_config=hf_config,
                           init_embeddings_path=init_path)
    path = Path(drafter).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise DrafterError(f"--drafter must be a preset ({', '.join(PRESETS)}), a family "
                           f"(eagle3, medusa, mlp) or a Hugging Face model directory with config.json, "
                           f"got {drafter!r}")
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
    return DrafterSpec(kind=NAME, label=str(path.resolve()), source="dir", path=str(path.resolve()),
                       init_embeddings_path=init_path)


class IndependentFamily(Family):
    """Presets and Hugging Face directories (the fallback: any `--drafter` no other family claims)."""

    name = NAME
    title = "independent"

    def matches(self, drafter: str) -> bool:
        return True

    def parse(self, drafter: str) -> dict[str, Any]:
        return {}

    def run_prefix(self) -> str:
        return ""

    def resolve(self, drafter: str, context: SpecContext) -> DrafterSpec:
        return resolve_drafter_spec(drafter, context.overrides, vocab_size=context.vocab_size,
                                    token_ids=context.token_ids, max_positions=context.max_positions,
                                    init_embeddings=context.init_embeddings)

    def build(self, spec: DrafterSpec) -> IndependentDrafter:
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

    def is_export(self, path: Path) -> bool:
        return (Path(path) / "config.json").is_file()

    def load(self, path: Path, dtype: torch.dtype) -> nn.Module:
        return load_causal_lm(path, dtype)

    def read_config(self, path: Path):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path)

    def owns(self, model: nn.Module) -> bool:
        return True

    def new_cache(self, model: nn.Module):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def draft(self, model: nn.Module, cache, tokens: Tensor, k: int, propose: Propose,
              vocab: int) -> tuple[Tensor, Tensor | None]:
        rollback(cache, tokens.numel() - 1)
        inputs = tokens[cache_length(cache):]  # what the drafter has not seen yet (>= 1 token)
        drafts, draft_probs = [], []
        for _ in range(k):
            inputs, q = propose(forward(model, inputs, cache, 1)[0][:, :vocab])  # [1], [1, V]
            drafts.append(inputs)
            draft_probs.append(q)
        return torch.cat(drafts), torch.cat(draft_probs)


FAMILY = IndependentFamily()
