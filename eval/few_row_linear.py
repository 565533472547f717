"""fp32 linear layers that read their weights once for a few rows, for decoding on a CPU.

A decode step multiplies one row by every weight matrix of the target, a K-draft verification K + 1
rows. Both should cost one read of the weights. On a 2-core AMD EPYC with AVX-512, torch's fp32
`x @ W.T` costs about one weight read per row for 2 or 3 rows, and its one-row path reaches only part
of the memory bandwidth: a 2-token verification forward of SmolLM2-135M cost 1.6x a decode step (a real
AVX2-only EPYC showed the same 1.5-1.6x), so speculative decoding with τ ≈ 1.2 ran slower than the
target alone. The same product taken as `(W @ x.T).T` (x contiguous, one row repeated to two) reads
the weights once: 1-token forward 59.8 -> 51.0 ms, 2-token 96.1 -> 49.1 ms, one thread
(bench/verify_cost.py, docs/eval.md). The values differ from `x @ W.T` by float rounding only. bf16
takes another path that is already fast, so only fp32 layers on a CPU change.
"""
from __future__ import annotations

import os

import torch
from torch import nn

FEW_ROW_GEMM = "LKSPEC_FEW_ROW_GEMM"  # "0" keeps torch's own nn.Linear
MAX_ROWS = 8  # verification forwards up to K = 7; longer inputs (prompts) keep nn.Linear


class FewRowLinear(nn.Linear):
    """nn.Linear whose inputs of at most MAX_ROWS rows are multiplied as (W @ x.T).T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        if count > MAX_ROWS:
            return super().forward(x)
        rows = rows.repeat(2, 1) if count == 1 else rows.contiguous()
        out = torch.mm(self.weight, rows.t()).t()[:count]
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], self.out_features)


def few_row_gemm(module: nn.Module, enabled: bool) -> int:
    """Turn every fp32 nn.Linear on a CPU in `module` into a FewRowLinear (or back); returns how many changed.

    The layers keep their parameters (tied weights stay tied); other dtypes, devices and Linear
    subclasses are left alone.
    """
    source, goal = (nn.Linear, FewRowLinear) if enabled else (FewRowLinear, nn.Linear)
    changed = 0
    for layer in module.modules():
        if type(layer) is source and layer.weight.dtype == torch.float32 and layer.weight.device.type == "cpu":
            layer.__class__ = goal
            changed += 1
    return changed


def use_few_row_gemm_on_cpu(module: nn.Module) -> int:
    """few_row_gemm(module, True) unless the user set LKSPEC_FEW_ROW_GEMM=0; returns how many layers changed."""
    if os.environ.get(FEW_ROW_GEMM) == "0":
        return 0
    return few_row_gemm(module, True)
