"""The MLP speculator family (Wertheimer et al. 2024, "Accelerating Production LLMs with Combined
Token/Embedding Speculators"; vLLM `vllm/model_executor/models/mlp_speculator.py`).

    --drafter mlp[:stages=6,inner=<target hidden>,tie=false,scale_input=false,draft_vocab=N]

Stage n mixes a projection of its input state with the embedding of a token, then normalizes:

    state_0 = h_t   (scale_input: RMS-normalized without parameters, / √2)
    state_n = GELU(ln_n(proj_n(state_{n−1}) + (emb_weight / state_weight) · emb_n(token_n)))
    logits_n = head_n(state_n)              state_weight = 0.5^(0.5 / stages)
                                            emb_weight = √((1 − state_weight²) · inner / 2)

h_t is the target's final hidden state at t (after the final norm: the cache's `last` column),
token_1 = x_{t+1} the token just sampled, token_n the token stage n − 1 drafted (the true x_{t+n}
in training: teacher forcing); stage n predicts x_{t+n+1}. ln is vLLM's MLPSpeculatorLayerNorm (an
RMS normalization, eps 1e-6, with a learned scale and shift), GELU the exact one. tie=true shares
emb, ln, head and the inner projection between stages (proj_1 reads the target's width and stays
separate). Initialization as IBM's: weights N(0, 1/inner), norms scale 1 and shift 0 (nothing is
taken from the target: `--init-embeddings-from target` does not apply). With draft_vocab=N the heads
output N rows, over the N ids with the most cached target mass (base.draft_vocabulary, MEDUSA's and
EAGLE-3's semantics); the embeddings stay over the whole vocabulary, since the tokens fed back in
are target ids. Training and decoding: trainer.drafters.last_state.

Export (vLLM's MLPSpeculatorPreTrainedModel):

    config.json        architectures ["MLPSpeculatorPreTrainedModel"], model_type "mlp_speculator",
                       vocab_size, emb_dim (the target's hidden size), inner_dim, n_predict,
                       top_k_tokens_per_head (n_predict ones), n_candidates, tie_weights,
                       scale_input, and an "lkspec" block
    model.safetensors  emb.{i}.weight [vocab, inner], proj.{i}.weight [inner, emb_dim (i = 0) | inner],
                       head.{i}.weight [vocab, inner], ln.{i}.weight and .bias [inner], for every stage
                       i; with tie_weights only the tensors vLLM keeps: emb.0, proj.0, proj.1, head.0, ln.0

vLLM's MLPSpeculator has no token map (its heads span the whole vocabulary), so a draft_vocab=N
speculator has no vLLM layout: save_mlp_speculator refuses it. The run's model/ then holds lkspec's
own layout, which eval.load_drafter and `lkspec bench` load and vLLM does not: architectures
["LkspecMLPSpeculator"], the same keys plus truncated_vocab_size, head.{i}.weight [N, inner] and
token_map int64 [N] (draft id i is target id token_map[i], as in MEDUSA's export).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.drafters.base import (DrafterSpec, ExportFormatError, SpecContext, read_export, read_export_config,
                                   read_json, save_tokenizer, write_export)
from trainer.drafters.last_state import (LastStateFamily, StepDrafter, StepModel, draft_vocab_rows, load_token_map,
                                         token_map)
from trainer.notices import warn  # the driver resolves specs, so the user sees it

NAME = "mlp"
OPTIONS = ("stages", "inner", "tie", "scale_input", "draft_vocab")
DEFAULT_STAGES = 6
ARCHITECTURE = "MLPSpeculatorPreTrainedModel"
TRUNCATED_ARCHITECTURE = "LkspecMLPSpeculator"  # lkspec's own layout of a draft_vocab=N speculator (not vLLM's)
NO_VLLM_LAYOUT = ("vLLM's MLPSpeculator has no token map (its heads span the whole vocabulary); "
                  "train without draft_vocab to export for vLLM")
FORMAT_VERSION = 1
SQRT2 = 2 ** 0.5


@dataclass(frozen=True)
class MLPSpeculatorConfig:
    """Shape of an MLP speculator for one target (vLLM's MLPSpeculatorConfig keys)."""

    emb_dim: int  # the target's hidden size
    vocab_size: int  # the target's
    inner_dim: int = 0  # 0: emb_dim
    n_predict: int = DEFAULT_STAGES
    tie_weights: bool = False
    scale_input: bool = False
    draft_vocab_size: int = 0  # head rows; 0: the whole vocabulary

    def __post_init__(self):
        if self.inner_dim == 0:
            object.__setattr__(self, "inner_dim", self.emb_dim)
        object.__setattr__(self, "draft_vocab_size", draft_vocab_rows(self.vocab_size, self.draft_vocab_size))
        if self.n_predict < 1 or self.inner_dim < 1:
            raise ValueError(f"n_predict and inner_dim must be >= 1, got {self.n_predict}, {self.inner_dim}")
        if self.tie_weights and self.n_predict < 2:
            raise ValueError("tie_weights needs at least 2 stages (n_predict)")

    @property
    def target_hidden_size(self) -> int:
        return self.emb_dim


class SpeculatorNorm(nn.Module):
    """vLLM's MLPSpeculatorLayerNorm: x / √(mean(x²) + eps), then an optional learned scale and shift."""

    def __init__(self, dim: int, affine: bool, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.weight = self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else self.weight * x + self.bias


class MLPSpeculator(StepModel):
    """The stages of an MLP speculator (see the module docstring); parameter names are vLLM's."""

    def __init__(self, config: MLPSpeculatorConfig):
        super().__init__(config, config.n_predict)
        n, inner, vocab, rows = config.n_predict, config.inner_dim, config.vocab_size, config.draft_vocab_size
        if config.tie_weights:
            emb, tied_proj = nn.Embedding(vocab, inner), nn.Linear(inner, inner, bias=False)
            head, norm = nn.Linear(inner, rows, bias=False), SpeculatorNorm(inner, affine=True)
            self.emb = nn.ModuleList([emb] * n)
            self.proj = nn.ModuleList([nn.Linear(config.emb_dim, inner, bias=False)] + [tied_proj] * (n - 1))
            self.head = nn.ModuleList([head] * n)
            self.ln = nn.ModuleList([norm] * n)
        else:
            self.emb = nn.ModuleList(nn.Embedding(vocab, inner) for _ in range(n))
            self.proj = nn.ModuleList(nn.Linear(config.emb_dim if i == 0 else inner, inner, bias=False)
                                      for i in range(n))
            self.head = nn.ModuleList(nn.Linear(inner, rows, bias=False) for _ in range(n))
            self.ln = nn.ModuleList(SpeculatorNorm(inner, affine=True) for _ in range(n))
        self.ln0 = SpeculatorNorm(config.emb_dim, affine=False) if config.scale_input else None
        state_weight = 0.5 ** (0.5 / n)
        self.token_scale = math.sqrt((1 - state_weight ** 2) * (inner / 2)) / state_weight  # emb_weight / state_weight
        for module in self.modules():  # IBM's initialization
            if isinstance(module, (nn.Embedding, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, 1 / math.sqrt(inner))

    def start(self, hidden: Tensor) -> Tensor:
        return self.ln0(hidden) / SQRT2 if self.ln0 is not None else hidden

    def embed(self, step: int, tokens: Tensor) -> Tensor:
        return self.token_scale * self.emb[step](tokens)

    def embed_teacher_forced(self, tokens: Tensor) -> list[Tensor]:
        if not self.config.tie_weights:
            return super().embed_teacher_forced(tokens)
        # Every stage shares emb[0]: one lookup, whose backward builds one dense [vocab, inner] gradient, not K.
        return list(self.embed(0, tokens).unbind(0))

    def advance(self, step: int, state: Tensor, embedded: Tensor) -> Tensor:
        return F.gelu(self.ln[step](self.proj[step](state) + embedded))

    def logits(self, step: int, state: Tensor) -> Tensor:
        return self.head[step](state)


class MLPSpeculatorDrafter(StepDrafter):
    """An MLP speculator trained on the cache's `last` column: K = stages steps, tokens teacher-forced."""

    kind = NAME

    def export(self, out_dir: Path, tokenizer_dir: str | Path | None = None) -> None:
        """vLLM's MLP speculator layout (lkspec's with draft_vocab: see the module docstring) plus the tokenizer."""
        write_mlp_speculator(self.model, out_dir)
        save_tokenizer(tokenizer_dir, out_dir)

    def reload(self, model_dir: Path, dtype: torch.dtype) -> MLPSpeculatorDrafter:
        return MLPSpeculatorDrafter(load_mlp_speculator(model_dir).to(dtype)).eval()


def export_config(config: MLPSpeculatorConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of an MLP speculator export: vLLM's MLPSpeculatorConfig keys plus our `lkspec` block
    (lkspec's own architecture and truncated_vocab_size for a reduced draft vocabulary)."""
    truncated = config.draft_vocab_size < config.vocab_size
    return {
        "architectures": [TRUNCATED_ARCHITECTURE if truncated else ARCHITECTURE],
        "model_type": "mlp_speculator",
        "vocab_size": config.vocab_size,
        "emb_dim": config.emb_dim,
        "inner_dim": config.inner_dim,
        "n_predict": config.n_predict,
        "top_k_tokens_per_head": [1] * config.n_predict,
        "n_candidates": 1,
        "tie_weights": config.tie_weights,
        "scale_input": config.scale_input,
        **({"truncated_vocab_size": config.draft_vocab_size} if truncated else {}),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "lkspec": {"format": NAME, "format_version": FORMAT_VERSION,
                   "input": "the target's final hidden state (after the final norm) at position t and token "
                            "t + 1; stage n (1-based) predicts token t + n + 1",
                   **({"vllm": f"not loadable: {NO_VLLM_LAYOUT}"} if truncated else {})},
    }


def export_tensors(model: MLPSpeculator) -> dict[str, Tensor]:
    """Every distinct parameter under its first name (vLLM's named_parameters: tied stages once), and token_map."""
    return {**dict(model.named_parameters()), **token_map(model)}


def save_mlp_speculator(model: MLPSpeculator, out_dir: str | Path) -> None:
    """Write `model` in vLLM's MLP speculator layout (ExportFormatError for a reduced draft vocabulary)."""
    if model.vocab_map is not None:
        raise ExportFormatError(f"an MLP speculator with draft_vocab={model.config.draft_vocab_size} has no vLLM "
                                f"layout: {NO_VLLM_LAYOUT}")
    write_mlp_speculator(model, out_dir)


def write_mlp_speculator(model: MLPSpeculator, out_dir: str | Path) -> None:
    """Write `model` as an MLP speculator directory: vLLM's layout, lkspec's for a reduced draft vocabulary."""
    write_export(Path(out_dir), export_config(model.config, next(model.parameters()).dtype), export_tensors(model))


def is_mlp_speculator_dir(path: str | Path) -> bool:
    """Whether path holds an MLP speculator (config.json naming MLPSpeculatorPreTrainedModel or
    LkspecMLPSpeculator, and weights)."""
    return read_export_config(Path(path), (ARCHITECTURE, TRUNCATED_ARCHITECTURE)) is not None


def read_config(model_dir: str | Path) -> MLPSpeculatorConfig:
    """The MLPSpeculatorConfig of an MLP speculator directory's config.json."""
    path = Path(model_dir) / "config.json"
    data = read_json(path)
    try:
        return MLPSpeculatorConfig(emb_dim=int(data["emb_dim"]), vocab_size=int(data["vocab_size"]),
                                   inner_dim=int(data.get("inner_dim") or 0), n_predict=int(data["n_predict"]),
                                   tie_weights=bool(data.get("tie_weights", False)),
                                   scale_input=bool(data.get("scale_input", False)),
                                   draft_vocab_size=int(data.get("truncated_vocab_size") or 0))
    except KeyError as exc:
        raise ExportFormatError(f"{path}: missing key {exc} (not an MLP speculator config)") from None
    except (TypeError, ValueError) as exc:
        raise ExportFormatError(f"{path}: {exc}") from None


def load_mlp_speculator(model_dir: str | Path) -> MLPSpeculator:
    """Load an MLP speculator directory into an fp32 MLPSpeculator in eval mode (tensors checked by name and shape)."""
    model = MLPSpeculator(read_config(model_dir))
    tensors = read_export(Path(model_dir), {name: tuple(t.shape) for name, t in export_tensors(model).items()})
    load_token_map(model, tensors, model_dir)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[name])
    return model.float().eval()


class MLPSpeculatorFamily(LastStateFamily):
    """`--drafter mlp[:stages=,inner=,tie=,scale_input=,draft_vocab=]` (η = 3 by default)."""

    name = NAME
    title = "MLP speculator"
    example = "mlp:stages=6,inner=256,draft_vocab=8192"
    reads = "MLP speculators read the target's final hidden state per position"
    init_embeddings = False
    options = OPTIONS
    model_class = MLPSpeculator
    config_class = MLPSpeculatorConfig
    drafter_class = MLPSpeculatorDrafter

    def resolve(self, drafter: str, context: SpecContext) -> DrafterSpec:
        options = self.parse(drafter)
        if context.init_embeddings:
            warn("--init-embeddings-from target does not apply to MLP speculators (their embeddings and heads "
                 "start at random, IBM's initialization); ignored")
        spec = self.make_spec(drafter, dict(emb_dim=self.last_width(context), vocab_size=context.vocab_size,
                                            inner_dim=options.get("inner", 0),
                                            n_predict=options.get("stages", DEFAULT_STAGES),
                                            tie_weights=options.get("tie", False),
                                            scale_input=options.get("scale_input", False)),
                              self.draft_vocab(options, context))
        if spec.draft_vocab is not None:
            warn(f"--drafter {drafter}: every run's model/ will be in lkspec's own layout, which vLLM does not load: "
                 f"{NO_VLLM_LAYOUT}")
        return spec

    def is_export(self, path: Path) -> bool:
        return is_mlp_speculator_dir(path)

    def load(self, path: Path, dtype: torch.dtype) -> MLPSpeculator:
        return load_mlp_speculator(path).to(dtype)

    def read_config(self, path: Path) -> MLPSpeculatorConfig:
        return read_config(path)


FAMILY = MLPSpeculatorFamily()
