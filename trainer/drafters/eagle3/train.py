"""The EAGLE-3 drafter for training: the test-time-training (TTT) unroll and the draft vocabulary.

Alignment (docs/training.md, "EAGLE-3"): step n (1..K) at drafter row t reads the token x_{t+n},
the hidden state fc(target features at t) for n = 1 or step n−1's pre-norm output at row t, position
id t + n − 1, and predicts x_{t+n+1}: the batch target row whose predicting position is p is scored
by step n at row t = p − n (rows with p < n have no step n). Step n's queries see the step-1 keys of
rows <= t (causal, padding excluded) and the keys of row t of steps 2..n — exactly the keys row t's
draft chain sees at inference, where the drafter's cache holds one step-1 entry per committed row.

    --drafter eagle3[:hidden=576,heads=9,kv_heads=3,intermediate=1536,draft_vocab=8192,steps=6,
                      freeze_embeddings=true,max_positions=..,rope_theta=..]

Unset keys follow the target (width, heads, MLP, RoPE); the token embeddings are copied from the
target whenever the width is the target's, and then frozen unless freeze_embeddings=false.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainer.drafters.base import (Drafter, DrafterError, DrafterSpec, DraftStep, load_input_embeddings,
                                   parse_options, save_tokenizer, shifted_tokens, step_rows)
from trainer.drafters.eagle3.model import Eagle3Config, Eagle3Model
from trainer.drafters.eagle3.export import load_eagle3, save_eagle3

NAME = "eagle3"
DEFAULT_STEPS = 6  # TTT steps K (the paper's recipe)
# `--drafter eagle3:KEY=VALUE,...` keys (typed by trainer.drafters.base.option_value).
OPTIONS = ("hidden", "heads", "kv_heads", "intermediate", "draft_vocab", "steps", "freeze_embeddings",
           "max_positions", "rope_theta")


def default_draft_vocab(vocab_size: int) -> int:
    """8192 draft tokens for vocabularies up to 64k, 32000 above (the EAGLE-3 habit for 128k ones)."""
    return min(vocab_size, 8192 if vocab_size <= 65536 else 32000)


def draft_vocab_size(drafter: str, vocab_size: int) -> int:
    """The draft vocabulary size `--drafter eagle3[:draft_vocab=N]` asks for."""
    return parse_eagle3(drafter).get("draft_vocab", default_draft_vocab(vocab_size))


def parse_eagle3(drafter: str) -> dict[str, Any]:
    """`eagle3:hidden=256,steps=4` -> {"hidden": 256, "steps": 4}; unknown keys and bad values refused."""
    return parse_options(drafter, NAME, OPTIONS)


def resolve_eagle3_spec(drafter: str, *, vocab_size: int, target_config, target_path: str | None,
                        aux: dict[str, Any], draft_ids: list[int], max_positions: int,
                        draft_vocab_mass: float) -> DrafterSpec:
    """The DrafterSpec of `--drafter eagle3[:...]` for a target (its HF config) and the cache's aux feature."""
    options = parse_eagle3(drafter)
    target_hidden = int(target_config.hidden_size)
    if aux["dim"] != 3 * target_hidden:
        from cache import CacheMismatchError

        raise CacheMismatchError(f"the cache's aux feature has dimension {aux['dim']}, EAGLE-3 needs 3 × the "
                                 f"target's hidden size {target_hidden} = {3 * target_hidden}")
    hidden = options.get("hidden", target_hidden)
    same_width = hidden == target_hidden
    heads = options.get("heads", target_config.num_attention_heads if same_width else max(1, hidden // 64))
    target_heads = same_width and "heads" not in options  # the target's attention shape, KV heads included
    kv_heads = options.get("kv_heads", (getattr(target_config, "num_key_value_heads", None) or heads)
                           if target_heads else heads)
    freeze = options.get("freeze_embeddings", same_width)
    if freeze and not same_width:
        raise DrafterError(f"--drafter eagle3: freeze_embeddings=true needs the target's embeddings, which have "
                           f"width {target_hidden}, not hidden={hidden}")
    if same_width and target_path is None:
        raise DrafterError("--drafter eagle3 copies the target's token embeddings: pass --target MODEL "
                           "(the cache's target was not found on this machine)")
    try:
        config = Eagle3Config(
            vocab_size=vocab_size, draft_vocab_size=len(draft_ids), hidden_size=hidden,
            target_hidden_size=target_hidden,
            intermediate_size=options.get("intermediate",
                                          target_config.intermediate_size if same_width else 3 * hidden),
            num_attention_heads=heads, num_key_value_heads=kv_heads, aux_layers=tuple(aux.get("layers", ())),
            rms_norm_eps=float(getattr(target_config, "rms_norm_eps", 1e-5)),
            rope_theta=float(options.get("rope_theta", target_rope_theta(target_config))),
            max_position_embeddings=options.get("max_positions", max_positions))
    except ValueError as exc:
        raise DrafterError(f"--drafter eagle3: {exc}") from None
    return DrafterSpec(kind=NAME, label=drafter, source="config", hf_config=config.to_dict(),
                       init_embeddings_path=target_path if same_width else None,
                       settings={"steps": options.get("steps", DEFAULT_STEPS), "freeze_embeddings": bool(freeze),
                                 "draft_vocab_mass": draft_vocab_mass},
                       draft_vocab=list(draft_ids))


def target_rope_theta(config) -> float:
    """RoPE base of a transformers config (rope_theta, or rope_parameters["rope_theta"] in transformers 5)."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


class Eagle3Drafter(Drafter):
    """An Eagle3Model trained with the K-step test-time-training unroll (see the module docstring)."""

    kind = NAME
    required_columns = ("aux",)

    def __init__(self, model: Eagle3Model, steps: int = DEFAULT_STEPS):
        super().__init__()
        self.model = model
        self.num_steps = int(steps)

    @property
    def vocab_map(self) -> Tensor:  # type: ignore[override]
        return self.model.draft_ids

    def forward(self, batch: dict[str, Tensor]) -> list[DraftStep]:
        model = self.model
        input_ids, target_batch, target_pos = batch["input_ids"], batch["target_batch"], batch["target_pos"]
        size, length = input_ids.shape
        device = input_ids.device
        eye = torch.eye(length, dtype=torch.bool, device=device).expand(size, length, length)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        # Step-1 keys: causal over real tokens; a row always sees itself (no all-masked row, no NaN).
        first = causal & (batch["attention_mask"].bool()[:, None, :] | eye)  # [B, T, T]
        positions = torch.arange(length, device=device).expand(size, length)
        hidden = model.fuse(batch["aux"])  # [B, T, d]
        keys: list[Tensor] = []
        values: list[Tensor] = []
        steps = []
        for n in range(1, self.num_steps + 1):
            tokens = shifted_tokens(input_ids, n)  # x_{t+n}
            mask = torch.cat([first] + [eye] * (n - 1), dim=-1)  # [B, T, n·T]
            prefix = (torch.cat(keys, 2), torch.cat(values, 2)) if keys else None
            out, k, v = model.layer(tokens, hidden, positions + (n - 1), prefix, mask)
            keys.append(k)
            values.append(v)
            rows, row_batch, row_pos = step_rows(target_batch, target_pos, n)
            picked = out[row_batch, row_pos]  # [N_n, d]: only these rows reach lm_head
            steps.append(DraftStep(model.logits(picked), rows))
            hidden = out
        return steps

    def export(self, out_dir: Path, tokenizer_dir: str | Path | None = None) -> None:
        """The vLLM / SGLang EAGLE-3 layout (trainer.drafters.eagle3.export), plus the target's tokenizer."""
        save_eagle3(self.model, out_dir, metadata={"ttt_steps": self.num_steps})
        save_tokenizer(tokenizer_dir, out_dir)

    def reload(self, model_dir: Path, dtype: torch.dtype) -> Eagle3Drafter:
        """The export in model_dir, loaded back as a drafter of the same steps."""
        return Eagle3Drafter(load_eagle3(model_dir).to(dtype), self.num_steps).eval()


def build_eagle3(spec: DrafterSpec) -> Eagle3Drafter:
    """The drafter of a resolved spec: random weights (torch's RNG), the spec's draft vocabulary, target embeddings."""
    model = Eagle3Model(Eagle3Config.from_dict(spec.hf_config))
    if spec.draft_vocab is None:
        raise DrafterError(f"drafter spec {spec.label!r} has no draft vocabulary")
    model.set_draft_vocab(torch.tensor(spec.draft_vocab, dtype=torch.long))
    if spec.init_embeddings_path:
        with torch.no_grad():
            model.embed_tokens.weight.copy_(load_input_embeddings(spec.init_embeddings_path))
    model.embed_tokens.weight.requires_grad_(not spec.settings.get("freeze_embeddings", False))
    return Eagle3Drafter(model.float().train(), spec.settings.get("steps", DEFAULT_STEPS))
