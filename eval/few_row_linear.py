"""fp32 linear layers that multiply a few rows without reading the weights once per row, for decoding on a CPU.

A decode step multiplies one row by every weight matrix of the target, a K-draft verification K + 1
rows. Both should cost about one read of the weights. On a 2-core AMD EPYC with AVX-512, torch's fp32
`x @ W.T` reads the weights once per row for 2 or 3 rows, and its one-row path reaches only part of
the memory bandwidth: a 2-token verification forward of SmolLM2-135M cost 1.6x a decode step (a real
AVX2-only EPYC showed the same 1.5-1.6x), so speculative decoding with τ ≈ 1.2 ran slower than the
target alone. The same product taken as `(W @ x.T).T` (x contiguous, one row repeated to two) reads
the weights once for one or two rows and is cheaper than `x @ W.T` up to five: forward of 1 token
59.8 -> 51.0 ms, 2 tokens 96.1 -> 49.1 ms, 4 tokens 87.2 -> 64.7 ms, 6 tokens no faster, one thread
(bench/verify_cost.py, docs/results.md). The values differ from `x @ W.T` by float rounding only.
bf16 takes another path that is already fast, so only fp32 layers on a CPU change.
"""
from __future__ import annotations

import torch
from torch import nn

MAX_ROWS = 5  # verification forwards up to K = 4; longer inputs (prompts, K > 4) keep nn.Linear


class FewRowLinear(nn.Linear):
    """nn.Linear whose inputs of at most MAX_ROWS rows are multiplied as (W @ x.T).T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        if count > MAX_ROWS:
            return super().forward(x)
        columns = (rows.repeat(2, 1) if count == 1 else rows.contiguous()).t()  # [in, ≥ 2]
        if self.bias is None:
            out = torch.mm(self.weight, columns)
        else:
            out = torch.addmm(self.bias[:, None], self.weight, columns)  # [out, ≥ 2]
        return out.t()[:count].contiguous().view(*x.shape[:-1], self.out_features)


def set_few_row_gemm(module: nn.Module, enabled: bool) -> int:
    """Turn every fp32 nn.Linear on a CPU in `module` into a FewRowLinear (or every FewRowLinear back into an
    nn.Linear); returns how many layers changed.

    The layers keep their parameters (tied weights stay tied). Other dtypes and devices, Linear
    subclasses and layers wrapped by accelerate hooks (whose saved forward would bypass the change)
    are left as they are.
    """
    if not enabled:
        layers = [layer for layer in module.modules() if type(layer) is FewRowLinear]
        for layer in layers:
            layer.__class__ = nn.Linear
        return len(layers)
    layers = [layer for layer in module.modules()
              if type(layer) is nn.Linear and layer.weight.dtype == torch.float32
              and layer.weight.device.type == "cpu" and not hasattr(layer, "_hf_hook")]
    for layer in layers:
        layer.__class__ = FewRowLinear
    return len(layers)
