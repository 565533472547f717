"""The EAGLE-3 family: its model (model.py), training step (train.py), decoding (decode.py) and export (export.py)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from trainer.drafters.base import DrafterError, DrafterSpec, Family, Propose, SpecContext, require_target
from trainer.drafters.eagle3 import decode
from trainer.drafters.eagle3.export import is_eagle3_dir, load_eagle3, read_config
from trainer.drafters.eagle3.model import Eagle3Config, Eagle3Model
from trainer.drafters.eagle3.train import (NAME, OPTIONS, Eagle3Drafter, build_eagle3, draft_vocab_size,
                                           resolve_eagle3_spec)


class Eagle3Family(Family):
    """`--drafter eagle3[:...]`: one decoder layer over three fused target hidden states (the `aux` column)."""

    name = NAME
    title = "EAGLE-3"
    example = "eagle3:draft_vocab=4096,steps=6"
    columns = ("aux",)
    reads = "EAGLE-3 drafters read three of the target's hidden states per position"
    options = OPTIONS

    def resolve(self, drafter: str, context: SpecContext) -> DrafterSpec:
        target_config = require_target(context, "--drafter eagle3 reads the target's shape and embeddings")
        vocab = context.vocabulary(draft_vocab_size(drafter, context.vocab_size), "--drafter eagle3")
        spec = resolve_eagle3_spec(drafter, vocab_size=context.vocab_size, target_config=target_config,
                                   target_path=context.target_path, aux=context.features["aux"],
                                   draft_ids=vocab.ids, max_positions=context.max_positions,
                                   draft_vocab_mass=vocab.mass)
        if context.init_embeddings and spec.init_embeddings_path is None:
            raise DrafterError(f"--init-embeddings-from target: the target's embeddings have width "
                               f"{target_config.hidden_size}, the drafter has hidden={spec.hf_config['hidden_size']}")
        return spec

    def build(self, spec: DrafterSpec) -> Eagle3Drafter:
        return build_eagle3(spec)

    def is_export(self, path: Path) -> bool:
        return is_eagle3_dir(path)

    def load(self, path: Path, dtype: torch.dtype) -> nn.Module:
        return load_eagle3(path).to(dtype)

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, Eagle3Model)

    def read_config(self, path: Path) -> Eagle3Config:
        return read_config(path)

    def check_target(self, config: Eagle3Config, target_config) -> None:
        decode.check_target(target_config, config)

    def target_layers(self, model: nn.Module) -> tuple[int, ...]:
        return tuple(model.config.aux_layers)

    def new_cache(self, model: nn.Module) -> decode.Eagle3Cache:
        return decode.Eagle3Cache()

    def draft(self, model: nn.Module, cache: decode.Eagle3Cache, tokens: Tensor, k: int, propose: Propose,
              vocab: int) -> tuple[Tensor, Tensor | None]:
        return decode.draft(model, cache, tokens, k, propose, vocab)

    def commit(self, cache: decode.Eagle3Cache, states: Tensor) -> None:
        decode.add_features(cache, states)


FAMILY = Eagle3Family()
