"""Toy capacity studies: a draft that cannot represent the target, fitted by each loss (fixed seeds).

Run this file directly to print the α table: `python tests/trainer/test_toy_capacity.py`.
"""
from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import LOSS_NAMES, DenseTarget, SparseTarget, compute_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def low_rank_study(steps: int = 200, seed: int = 0) -> dict[str, float]:
    """Rank-4 draft logits H·W for 64 positions of rank-32 targets over 512 tokens; Adam, same init."""
    n, v, rank_target, rank_draft = 64, 512, 32, 4
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(n, rank_target, generator=g) @ torch.randn(rank_target, v, generator=g)
    target = DenseTarget(logits=target_logits * 3.0 / math.sqrt(rank_target))
    h0 = torch.randn(n, rank_draft, generator=g) * 0.1
    w0 = torch.randn(rank_draft, v, generator=g) * 0.1
    alphas = {}
    for name in LOSS_NAMES:
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        opt = torch.optim.Adam([h, w], lr=0.05)
        for _ in range(steps):
            loss = compute_loss(name, h @ w, target).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        alphas[name] = float(compute_loss("kl", (h @ w).detach(), target).alpha_mean)
    return alphas


def gaussian_study(steps: int = 300) -> dict[str, float]:
    """One discretized Gaussian (μ, σ) fitted to 0.6·N(−4, 1) + 0.4·N(4, 1) on 200 bins of [−15, 15].

    The paper's example: KL covers both modes (≈50% overlap), the α objectives take one (≈60%).
    """
    x = torch.linspace(-15, 15, 200)
    target_logits = torch.logsumexp(torch.stack([math.log(0.6) - (x + 4) ** 2 / 2,
                                                 math.log(0.4) - (x - 4) ** 2 / 2]), dim=0)
    target = DenseTarget(logits=target_logits[None])
    alphas = {}
    for name in LOSS_NAMES:
        mu = torch.tensor(-2.0, requires_grad=True)
        log_sigma = torch.tensor(math.log(2.0), requires_grad=True)
        opt = torch.optim.Adam([mu, log_sigma], lr=0.05)
        draft = lambda: (-((x - mu) ** 2) / (2 * torch.exp(2 * log_sigma)))[None]  # noqa: E731
        for _ in range(steps):
            loss = compute_loss(name, draft(), target).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        alphas[name] = float(compute_loss("kl", draft().detach(), target).alpha_mean)
    return alphas


def uniform_start_study(steps: int = 30, v: int = 32768) -> dict[str, float]:
    """Free logits from zero (uniform q) on V = 32768 toward 4-token targets; plain SGD, lr 50.

    App. A of the paper: at q = 1/V, ∇TV = O(1/V) while ∇LK^α = ∇TV/α = O(1/k). SGD (not Adam,
    which would rescale the tiny gradient away) makes the difference visible.
    """
    n, k = 8, 4
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    probs = torch.rand(n, k, generator=g) + 0.5
    target = SparseTarget(ids=ids, logprobs=(probs / probs.sum(-1, keepdim=True)).log())
    alphas = {"init": float(compute_loss("tv", torch.zeros(n, v), target).alpha_mean)}
    for name in ("tv", "lk_alpha"):
        z = torch.zeros(n, v, requires_grad=True)
        opt = torch.optim.SGD([z], lr=50.0)
        for _ in range(steps):
            loss = compute_loss(name, z, target).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        alphas[name] = float(compute_loss("tv", z.detach(), target).alpha_mean)
    return alphas


def test_lk_losses_beat_kl_on_a_low_rank_draft():
    a = low_rank_study()
    assert a["lk_alpha"] > a["kl"] + 0.05, a
    assert a["lk_lambda"] > a["kl"] + 0.05, a


def test_alpha_objectives_seek_a_mode_where_kl_covers_both():
    a = gaussian_study()
    assert a["kl"] < 0.5 and a["lk_alpha"] > 0.58 and a["tv"] > 0.58, a


def test_tv_barely_moves_from_uniform_on_a_large_vocab_while_lk_alpha_does():
    a = uniform_start_study()
    assert a["init"] < 2e-4
    assert a["tv"] - a["init"] < 1e-5, a
    assert a["lk_alpha"] > 0.5, a


if __name__ == "__main__":
    torch.set_num_threads(1)
    for study in (low_rank_study, gaussian_study, uniform_start_study):
        print(study.__name__, {k: round(v, 4) for k, v in study().items()})
