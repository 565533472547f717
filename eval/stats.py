"""Confidence intervals for acceptance-length ratios between drafters.

τ of a drafter on a set of decodes is a ratio of sums: generated tokens ÷ target forwards. Two
drafters compared on the same prompts, trained with the same seeds, form paired samples
`tokens[seed, prompt]` and `forwards[seed, prompt]`. `paired_ratio_bootstrap` resamples seeds and
prompts jointly (the same draws for both drafters, so prompt difficulty and seed luck cancel) and
recomputes τ_b ÷ τ_a on each resample; `t_interval` is the classical interval of a mean (used over
per-seed ratios, where it captures seed-to-seed variation alone).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float

    def to_dict(self) -> dict:
        """A JSON-serializable copy."""
        return asdict(self)


def pooled_tau(tokens: np.ndarray, forwards: np.ndarray) -> float:
    """τ pooled over every decode: Σ tokens ÷ Σ target forwards."""
    return float(np.sum(tokens) / max(float(np.sum(forwards)), 1.0))


def paired_ratio_bootstrap(tokens_a: np.ndarray, forwards_a: np.ndarray, tokens_b: np.ndarray,
                           forwards_b: np.ndarray, *, resamples: int = 10_000, confidence: float = 0.95,
                           seed: int = 0) -> Interval:
    """τ_b ÷ τ_a with a percentile interval from resampling seeds and prompts jointly (arrays [seeds, prompts])."""
    arrays = [np.asarray(a, dtype=np.float64) for a in (tokens_a, forwards_a, tokens_b, forwards_b)]
    shape = arrays[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        raise ValueError(f"expected four arrays of one shape [seeds, prompts], got {[a.shape for a in arrays]}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    num_seeds, num_prompts = shape
    rng = np.random.default_rng(seed)
    # Multinomial counts are the same as indices drawn with replacement: weight[b, i] = times i was drawn.
    seed_weights = rng.multinomial(num_seeds, [1.0 / num_seeds] * num_seeds, size=resamples)  # [B, seeds]
    prompt_weights = rng.multinomial(num_prompts, [1.0 / num_prompts] * num_prompts, size=resamples)  # [B, prompts]
    sums = [np.einsum("bs,sp,bp->b", seed_weights, a, prompt_weights) for a in arrays]  # 4 × [B]
    ratios = (sums[2] / np.maximum(sums[3], 1.0)) / np.maximum(sums[0] / np.maximum(sums[1], 1.0), 1e-12)
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    estimate = pooled_tau(arrays[2], arrays[3]) / pooled_tau(arrays[0], arrays[1])
    return Interval(estimate, float(low), float(high), confidence)


def t_interval(values: np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of `values` with the Student-t interval (needs at least two values)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        raise ValueError(f"a t-interval needs at least two values, got {values.size}")
    mean = float(values.mean())
    half = student_t_quantile((1 + confidence) / 2, values.size - 1) * float(values.std(ddof=1)) / np.sqrt(values.size)
    return Interval(mean, mean - half, mean + half, confidence)


def student_t_quantile(probability: float, dof: int) -> float:
    """Quantile of Student's t for probability in [0.5, 1): bisection on the integrated density (no scipy)."""
    if not 0.5 <= probability < 1 or dof < 1:
        raise ValueError(f"need 0.5 <= probability < 1 and dof >= 1, got {probability}, {dof}")
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def mass_from_zero(x: float) -> float:  # ∫_0^x density, trapezoid on a fine grid
        grid = np.linspace(0.0, x, 20_001)
        density = np.exp(log_norm - (dof + 1) / 2 * np.log1p(grid**2 / dof))
        return float(np.sum((density[1:] + density[:-1]) * np.diff(grid)) / 2)

    low, high = 0.0, 1.0
    while mass_from_zero(high) < probability - 0.5:
        low, high = high, high * 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mass_from_zero(middle) < probability - 0.5 else (low, middle)
    return (low + high) / 2
