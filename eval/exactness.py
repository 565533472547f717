"""T = 0 exactness: where a speculative decode leaves the target's own greedy decode, and why.

In bf16 a (K+1)-token verification forward and a 1-token forward round differently, so an argmax
between two logits within rounding of each other can flip without any bug. At the first position
where a decode differs from the target's greedy output, `divergence` recomputes the target's logits
(one forward of the prompt and the shared prefix) and calls the difference a near-tie when both
competing tokens are within TIE_STEPS steps of the top logit (a step: the spacing of the decode's
dtype at that logit's magnitude). Each of the two logits compared is rounded by up to one step, so
their difference moves by up to two: a `make demo` in bf16 flipped a top-2 pair 0.125 apart where
one step was 0.0625. Only a difference that is not a near-tie fails the lossless check (eval.report).
"""
from __future__ import annotations

import math

# Relative spacing (machine epsilon) of each decode dtype: one step at |x| is EPS * 2**floor(log2 |x|).
EPS = {"fp32": 2.0 ** -23, "bf16": 2.0 ** -7}
TIE_STEPS = 2  # two logits, each rounded by up to one step: their order can flip within two


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token lists differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def logit_step(dtype: str, value: float) -> float:
    """The spacing of `dtype` (fp32, bf16) at |value|: one rounding step of a logit that large."""
    magnitude = abs(value)
    if magnitude == 0:
        return 0.0
    return EPS[dtype] * 2.0 ** math.floor(math.log2(magnitude))


def divergence(target, prompt_ids: list[int], greedy_ids: list[int], output_ids: list[int],
               dtype: str) -> dict | None:
    """Where `output_ids` first leaves the target's `greedy_ids`, the top-2 gap there, and whether it is a near-tie.

    Returns None when the outputs are equal; else {"position", "greedy_token", "output_token", "gap",
    "step", "near_tie"} (gap, step in logits; gap = top logit − the lower of the two tokens' logits).
    A length difference without a differing token is never a near-tie.
    """
    import torch

    position = first_difference(greedy_ids, output_ids)
    if position is None:
        return None
    if position >= min(len(greedy_ids), len(output_ids)):
        return {"position": position, "greedy_token": None, "output_token": None, "gap": None, "step": None,
                "near_tie": False}
    prefix = torch.tensor([list(prompt_ids) + list(greedy_ids[:position])], device=target.device)
    with torch.inference_mode():
        logits = target(input_ids=prefix).logits[0, -1].float()  # [V]
    top = float(logits.max())
    chosen = (greedy_ids[position], output_ids[position])
    gap = top - min(float(logits[token]) for token in chosen)
    step = logit_step(dtype, top)
    return {"position": position, "greedy_token": chosen[0], "output_token": chosen[1], "gap": gap, "step": step,
            "near_tie": gap <= TIE_STEPS * step}
