"""The EAGLE-3 draft model: one Llama-style decoder layer over fused target hidden states.

    step 1:  hidden = fc(concat(target h_low, h_mid, h_high))      [.., 3·d_target] -> [.., d]
    later:   hidden = the previous step's pre-norm output (the drafter's own state)
    layer:   x = concat(input_norm(embed(token)), hidden_norm(hidden))          [.., 2d]
             h = hidden + attn(x);  out = h + mlp(post_attention_norm(h))       (pre-norm output)
    logits:  lm_head(norm(out)) over the reduced draft vocabulary; draft id i is target id d2t_abs[i]

Row t of a step reads the feature of target position t and the token at t + 1 and predicts the
token at t + 2 (position id t). Attention is explicit: the caller passes the keys/values the rows
may see (`prefix`) and a boolean mask, so one layer serves the training-time-test unroll (prefix =
earlier steps, diagonal mask) and decoding (prefix = KV cache). Parameter names follow the EAGLE-3
checkpoints vLLM and SGLang load (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Eagle3Config:
    """Shape of an EAGLE-3 drafter for one target."""

    vocab_size: int  # the target's vocabulary (embedding rows, t2d length)
    draft_vocab_size: int  # lm_head rows
    hidden_size: int
    target_hidden_size: int  # d of each fused target layer (fc takes 3x this)
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    aux_layers: tuple[int, ...] = ()  # the target hidden_states indices fused (recorded for export)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of num_attention_heads="
                             f"{self.num_attention_heads}, and that a multiple of num_key_value_heads="
                             f"{self.num_key_value_heads}")
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in 1..{self.vocab_size}, got {self.draft_vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return {**asdict(self), "aux_layers": list(self.aux_layers)}

    @classmethod
    def from_dict(cls, data: dict) -> Eagle3Config:
        return cls(**{**data, "aux_layers": tuple(data.get("aux_layers", ()))})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Llama (NeoX-layout) rotary embedding of x [B, H, T, hd] at integer positions [B, T]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, hd]
    return (x.float() * angles.cos() + rotate_half(x.float()) * angles.sin()).to(x.dtype)


class Eagle3Attention(nn.Module):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.config = config
        self.q_proj = nn.Linear(2 * d, config.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * d, config.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * d, config.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=False)

    def forward(self, x: Tensor, positions: Tensor, prefix: tuple[Tensor, Tensor] | None,
                mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, 2d] -> (out [B, T, d], own keys, own values [B, H_kv, T, hd], keys post-RoPE).

        Keys seen by the rows: cat(prefix keys, own keys) along time; mask [T, P + T] (True = visible)
        or [B, T, P + T].
        """
        cfg = self.config
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
        keys, values = (k, v) if prefix is None else (torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2))
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        keys_all = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
        values_all = values.repeat_interleave(groups, dim=1) if groups > 1 else values
        attn_mask = mask if mask.dim() == 2 else mask[:, None]
        out = F.scaled_dot_product_attention(q, keys_all, values_all, attn_mask=attn_mask,
                                             scale=1.0 / math.sqrt(cfg.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), k, v


class Eagle3MLP(nn.Module):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3Layer(nn.Module):
    """The single decoder layer (`midlayer`): attention over [token embedding ; hidden state]."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Eagle3MLP(config)

    def forward(self, embeds: Tensor, hidden: Tensor, positions: Tensor, prefix, mask):
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        attn, k, v = self.self_attn(x, positions, prefix, mask)
        h = hidden + attn
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class Eagle3Model(nn.Module):
    """EAGLE-3 drafter weights and one draft step (see the module docstring)."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.fc = nn.Linear(3 * config.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        # Draft id i is target id draft_ids[i]; the export stores vLLM's offsets d2t = draft_ids - i.
        self.register_buffer("draft_ids", torch.arange(config.draft_vocab_size), persistent=True)

    def set_draft_vocab(self, target_ids: Tensor) -> None:
        """Set the reduced vocabulary: target_ids [draft_vocab] ascending, distinct, < vocab_size."""
        ids = torch.as_tensor(target_ids, dtype=torch.long).view(-1)
        if ids.numel() != self.config.draft_vocab_size:
            raise ValueError(f"draft vocabulary needs {self.config.draft_vocab_size} ids, got {ids.numel()}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size or (ids[1:] <= ids[:-1]).any()):
            raise ValueError("draft vocabulary ids must be ascending, distinct and < vocab_size")
        self.draft_ids.copy_(ids)

    def fuse(self, aux: Tensor) -> Tensor:
        """Target features [.., 3·d_target] -> the first step's hidden state [.., d]."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def layer(self, input_ids: Tensor, hidden: Tensor, positions: Tensor,
              prefix: tuple[Tensor, Tensor] | None, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The decoder layer of one draft step: (pre-norm out [B, T, d], keys, values of these rows)."""
        return self.midlayer(self.embed_tokens(input_ids), hidden, positions, prefix, mask)

    def logits(self, out: Tensor) -> Tensor:
        """Draft-vocabulary logits [.., draft_vocab] of pre-norm outputs [.., d]."""
        return self.lm_head(self.norm(out))

    def step(self, input_ids: Tensor, hidden: Tensor, positions: Tensor,
             prefix: tuple[Tensor, Tensor] | None, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One draft step: (logits [B, T, draft_vocab], pre-norm out [B, T, d], keys, values of these rows)."""
        out, k, v = self.layer(input_ids, hidden, positions, prefix, mask)
        return self.logits(out), out, k, v
