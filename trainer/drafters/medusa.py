"""The MEDUSA family (MEDUSA-1, Cai et al. 2024): heads over the target's final hidden state.

    --drafter medusa[:heads=6,layers=1,draft_vocab=N]

Head h = 1..heads reads h_t, the target's final hidden state at position t (after the final norm:
the cache's `last` column), and predicts x_{t+h+1}; the target itself predicts x_{t+1}. A head is
`layers` residual blocks x + SiLU(W x + b) (W and b zero at init, so a head starts as the target's
own next-token predictor) and its own LM head, copied from the target's: over the whole vocabulary, or
with draft_vocab=N over the N ids with the most cached target mass (base.draft_vocabulary, the
EAGLE-3 semantics). Training, decoding: trainer.drafters.last_state (the state stays h_t).

Export (vLLM `vllm/model_executor/models/medusa.py`, `MedusaModel`):

    config.json        architectures ["MedusaModel"], model_type "medusa", hidden_size, vocab_size,
                       num_heads, num_hidden_layers (blocks per head), truncated_vocab_size,
                       medusa_fc_bias true, and an "lkspec" block for our loader
    model.safetensors  blocks.{h}.layers.{l}.weight [d, d] and .bias [d], lm_heads.{h}.weight
                       [truncated_vocab_size, d], token_map int64 [truncated_vocab_size] (draft id i
                       is target id token_map[i]; only when truncated_vocab_size < vocab_size)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.drafters.base import (DrafterSpec, ExportFormatError, SpecContext, load_embeddings, read_export,
                                   read_export_config, read_json, require_target, save_tokenizer, write_export)
from trainer.drafters.last_state import (LastStateFamily, StepDrafter, StepModel, draft_vocab_rows, load_token_map,
                                         token_map)

NAME = "medusa"
OPTIONS = ("heads", "layers", "draft_vocab")
DEFAULT_HEADS = 6
ARCHITECTURE = "MedusaModel"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MedusaConfig:
    """Shape of a MEDUSA drafter for one target."""

    hidden_size: int  # the target's
    vocab_size: int  # the target's
    num_heads: int = DEFAULT_HEADS
    num_layers: int = 1  # residual blocks per head
    draft_vocab_size: int = 0  # LM head rows; 0: the whole vocabulary

    def __post_init__(self):
        object.__setattr__(self, "draft_vocab_size", draft_vocab_rows(self.vocab_size, self.draft_vocab_size))
        if self.num_heads < 1 or self.num_layers < 1:
            raise ValueError(f"num_heads and num_layers must be >= 1, got {self.num_heads}, {self.num_layers}")

    @property
    def target_hidden_size(self) -> int:
        return self.hidden_size


class ResidualBlock(nn.Module):
    """x + SiLU(W x + b), `layers` times (vLLM's ResidualBlock with medusa_fc_bias)."""

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=True) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaModel(StepModel):
    """MEDUSA-1 heads: head n's logits = lm_heads[n](blocks[n](h_t)) over the draft vocabulary."""

    def __init__(self, config: MedusaConfig):
        super().__init__(config, config.num_heads)
        self.blocks = nn.ModuleList(ResidualBlock(config.hidden_size, config.num_layers)
                                    for _ in range(config.num_heads))
        self.lm_heads = nn.ModuleList(nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
                                      for _ in range(config.num_heads))
        for block in self.blocks:  # identity at init: every head starts as the target's next-token predictor
            for layer in block.layers:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def set_lm_heads(self, target_lm_head: Tensor) -> None:
        """Every head's LM head from the target's [V, d] (its draft vocabulary's rows)."""
        with torch.no_grad():
            for head in self.lm_heads:
                head.weight.copy_(target_lm_head[self.draft_ids.to(target_lm_head.device)])

    def start(self, hidden: Tensor) -> Tensor:
        return hidden

    def advance(self, step: int, state: Tensor, embedded: Tensor | None) -> Tensor:
        return state  # every head reads h_t (embed() is None: no token enters)

    def logits(self, step: int, state: Tensor) -> Tensor:
        return self.lm_heads[step](self.blocks[step](state))


class MedusaDrafter(StepDrafter):
    """MEDUSA heads trained on the cache's `last` column: K = heads steps."""

    kind = NAME

    def export(self, out_dir: Path, tokenizer_dir: str | Path | None = None) -> None:
        """vLLM's MEDUSA layout (see the module docstring) plus the target's tokenizer."""
        save_medusa(self.model, out_dir)
        save_tokenizer(tokenizer_dir, out_dir)

    def reload(self, model_dir: Path, dtype: torch.dtype) -> MedusaDrafter:
        return MedusaDrafter(load_medusa(model_dir).to(dtype)).eval()


def export_config(config: MedusaConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a MEDUSA export: the keys vLLM's MedusaConfig reads, plus our `lkspec` block."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "medusa",
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "num_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "truncated_vocab_size": config.draft_vocab_size,
        "medusa_fc_bias": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "lkspec": {"format": NAME, "format_version": FORMAT_VERSION,
                   "input": "the target's final hidden state (after the final norm) at position t; "
                            "head h (1-based) predicts token t + h + 1"},
    }


def export_tensors(model: MedusaModel) -> dict[str, Tensor]:
    """The checkpoint tensors under vLLM's names; token_map only for a truncated vocabulary."""
    return {**{name: t for name, t in model.state_dict().items() if name != "draft_ids"}, **token_map(model)}


def save_medusa(model: MedusaModel, out_dir: str | Path) -> None:
    """Write `model` as a MEDUSA directory (config.json + model.safetensors)."""
    write_export(Path(out_dir), export_config(model.config, next(model.parameters()).dtype), export_tensors(model))


def is_medusa_dir(path: str | Path) -> bool:
    """Whether path holds a MEDUSA export (config.json naming MedusaModel, and weights)."""
    return read_export_config(Path(path), (ARCHITECTURE,)) is not None


def read_config(model_dir: str | Path) -> MedusaConfig:
    """The MedusaConfig of a MEDUSA directory's config.json."""
    path = Path(model_dir) / "config.json"
    data = read_json(path)
    try:
        return MedusaConfig(hidden_size=int(data["hidden_size"]), vocab_size=int(data["vocab_size"]),
                            num_heads=int(data["num_heads"]), num_layers=int(data.get("num_hidden_layers", 1)),
                            draft_vocab_size=int(data.get("truncated_vocab_size") or data["vocab_size"]))
    except KeyError as exc:
        raise ExportFormatError(f"{path}: missing key {exc} (not a MEDUSA config)") from None
    except (TypeError, ValueError) as exc:
        raise ExportFormatError(f"{path}: {exc}") from None


def load_medusa(model_dir: str | Path) -> MedusaModel:
    """Load a MEDUSA directory into an fp32 MedusaModel in eval mode (tensors checked by name and shape)."""
    config = read_config(model_dir)
    model = MedusaModel(config)
    expected = {name: tuple(t.shape) for name, t in export_tensors(model).items()}
    tensors = read_export(Path(model_dir), expected)
    load_token_map(model, tensors, model_dir)
    model.load_state_dict({**tensors, "draft_ids": model.draft_ids}, strict=True)
    return model.float().eval()


class MedusaFamily(LastStateFamily):
    """`--drafter medusa[:heads=,layers=,draft_vocab=]` (η = 10 by default, as in the paper)."""

    name = NAME
    title = "MEDUSA"
    example = "medusa:heads=6,draft_vocab=8192"
    reads = "MEDUSA heads read the target's final hidden state per position"
    default_eta = 10.0
    options = OPTIONS
    model_class = MedusaModel
    config_class = MedusaConfig
    drafter_class = MedusaDrafter

    def resolve(self, drafter: str, context: SpecContext) -> DrafterSpec:
        options = self.parse(drafter)
        require_target(context, "--drafter medusa copies the target's LM head")
        return self.make_spec(drafter, dict(hidden_size=self.last_width(context), vocab_size=context.vocab_size,
                                            num_heads=options.get("heads", DEFAULT_HEADS),
                                            num_layers=options.get("layers", 1)),
                              self.draft_vocab(options, context), init_embeddings_path=context.target_path)

    def initialize(self, model: MedusaModel, spec: DrafterSpec) -> None:
        """Every head's LM head from the target's (its draft vocabulary's rows)."""
        if spec.init_embeddings_path:
            model.set_lm_heads(load_embeddings(spec.init_embeddings_path, output=True))

    def is_export(self, path: Path) -> bool:
        return is_medusa_dir(path)

    def load(self, path: Path, dtype: torch.dtype) -> MedusaModel:
        return load_medusa(path).to(dtype)

    def read_config(self, path: Path) -> MedusaConfig:
        return read_config(path)


FAMILY = MedusaFamily()
