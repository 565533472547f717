"""Grouped-query attention without copies on a CPU, for multi-token verification forwards.

transformers' SDPA attention expands the key/value heads of a GQA model (`repeat_kv`, a copy of the
whole KV cache per layer) whenever an attention mask is passed, which is every forward of more than
one token over a KV cache: exactly the (K+1)-token verification forward of speculative decoding.
A one-token decode step has no mask and already lets torch read the grouped heads in place
(`enable_gqa`). Measured with SmolLM2-135M (9 query / 3 KV heads), fp32, one thread, 300 cached
tokens: a 2-token forward cost 1.16x a 1-token forward with the copy and 1.07x without, a 3-token
forward 1.29x and 1.07x; the logits are identical (bench/verify_cost.py). transformers keeps the copy
on CUDA because there a mask with enable_gqa falls back to the slow math kernel; its switch for
passing the grouped heads anyway is the environment variable TRANSFORMERS_SDPA_FORCE_GQA, read at
every attention call.
"""
from __future__ import annotations

import os

import torch

FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def use_grouped_kv_heads_on_cpu(device: str | torch.device) -> bool:
    """Let SDPA read grouped KV heads in place under a mask when decoding on a CPU; returns whether it is on.

    Sets TRANSFORMERS_SDPA_FORCE_GQA=1 for this process unless the user set it (their value wins); a
    CUDA device leaves it alone.
    """
    if torch.device(device).type == "cpu":
        os.environ.setdefault(FORCE_GQA, "1")
    return os.environ.get(FORCE_GQA) == "1"
