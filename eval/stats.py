"""Confidence intervals for ratios between drafters: of acceptance lengths, and of held-out acceptance rates.

τ of a drafter on a set of decodes is a ratio of sums: generated tokens ÷ target forwards; its
held-out α at a draft step is too: Σα ÷ scored positions over held-out sequences. Two drafters
compared on the same prompts (sequences), trained with the same seeds, form paired samples
`num[seed, item]` and `den[seed, item]`. `paired_ratio_bootstrap` resamples seeds and items jointly
(the same draws for both drafters, so item difficulty and seed luck cancel) and recomputes
(Σnum_b/Σden_b) ÷ (Σnum_a/Σden_a) on each resample; `paired_tau_bootstrap` does the same for the
expected τ 1 + Σ_k Π_{j≤k} α_j of per-step α sums `[seed, item, step]`. `t_interval` is the
classical interval of a mean (used over per-seed ratios, where it captures seed-to-seed variation alone).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from trainer.losses import expected_tau


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
    """τ pooled over every decode: Σ tokens ÷ Σ target forwards (any ratio of sums: Σ num ÷ Σ den)."""
    return float(np.sum(tokens) / max(float(np.sum(forwards)), 1.0))


def resample_sums(arrays: list[np.ndarray], *, resamples: int, seed: int) -> list[np.ndarray]:
    """Σ over seeds and items of each array `[seeds, items, ...]` under the same bootstrap draws: `[B, ...]` each."""
    num_seeds, num_items = arrays[0].shape[:2]
    rng = np.random.default_rng(seed)
    # Multinomial counts are the same as indices drawn with replacement: weight[b, i] = times i was drawn.
    seed_weights = rng.multinomial(num_seeds, [1.0 / num_seeds] * num_seeds, size=resamples)  # [B, seeds]
    item_weights = rng.multinomial(num_items, [1.0 / num_items] * num_items, size=resamples)  # [B, items]
    sums = []
    for a in arrays:  # Σ_i w_item[b, i]·a[s, i, ...] as one matrix product, then Σ_s w_seed[b, s]·(that)
        by_item = item_weights.astype(np.float64) @ np.moveaxis(a, 1, 0).reshape(num_items, -1)
        by_item = by_item.reshape((resamples, num_seeds) + a.shape[2:])  # [B, seeds, ...]
        sums.append(np.einsum("bs,bs...->b...", seed_weights, by_item))
    return sums


def _paired_arrays(arrays, dims: int, what: str) -> list[np.ndarray]:
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    shape = arrays[0].shape
    if len(shape) != dims or any(a.shape != shape for a in arrays):
        raise ValueError(f"expected four arrays of one shape {what}, got {[a.shape for a in arrays]}")
    return arrays


def _percentile(ratios: np.ndarray, estimate: float, confidence: float) -> Interval:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), confidence)


def paired_ratio_bootstrap(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, *,
                           resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """(Σnum_b/Σden_b) ÷ (Σnum_a/Σden_a) with a percentile interval from resampling seeds and items jointly.

    Arrays are `[seeds, items]`: tokens and target forwards of decodes (τ), or Σα and positions of held-out
    sequences at one draft step (α).
    """
    arrays = _paired_arrays((num_a, den_a, num_b, den_b), 2, "[seeds, items]")
    sums = resample_sums(arrays, resamples=resamples, seed=seed)  # 4 × [B]
    ratios = (sums[2] / np.maximum(sums[3], 1.0)) / np.maximum(sums[0] / np.maximum(sums[1], 1.0), 1e-12)
    estimate = pooled_tau(arrays[2], arrays[3]) / pooled_tau(arrays[0], arrays[1])
    return _percentile(ratios, estimate, confidence)


def paired_tau_bootstrap(alpha_a: np.ndarray, positions_a: np.ndarray, alpha_b: np.ndarray, positions_b: np.ndarray,
                         *, draft_len: int, resamples: int = 10_000, confidence: float = 0.95,
                         seed: int = 0) -> Interval:
    """Expected τ_b ÷ τ_a from per-step α sums and positions `[seeds, items, steps]`, resampling seeds and items.

    τ = 1 + Σ_k Π_{j≤k} ᾱ_j over `draft_len` steps (trainer.losses.expected_tau).
    """
    arrays = _paired_arrays((alpha_a, positions_a, alpha_b, positions_b), 3, "[seeds, items, steps]")
    sums = resample_sums(arrays, resamples=resamples, seed=seed)  # 4 × [B, steps]
    tau_a = expected_tau(sums[0] / np.maximum(sums[1], 1.0), draft_len)
    tau_b = expected_tau(sums[2] / np.maximum(sums[3], 1.0), draft_len)
    totals = [a.sum(axis=(0, 1)) for a in arrays]
    estimate = (expected_tau(totals[2] / np.maximum(totals[3], 1.0), draft_len)
                / expected_tau(totals[0] / np.maximum(totals[1], 1.0), draft_len))
    return _percentile(tau_b / tau_a, estimate, confidence)


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
