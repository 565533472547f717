"""Drafter training losses: KL, TV, LK^α and LK^λ over full or top-k targets (DESIGN §3).

Every loss is built from two per-position quantities of the draft q = softmax(z) against the
target p: KL(p‖q) and the acceptance rate α = Σ_v min(p_v, q_v). One memory-lean kernel
(`kl_alpha`) computes both in a single chunked pass over positions and, in backward, recomputes
them chunk by chunk and writes ∂/∂z straight into one gradient tensor the size of the logits. The
losses are then plain torch on `[N]` vectors, so all four cost the same.

    kl         mean_t KL_t
    tv         mean_t (1 − α_t)                      (ablation only: vanishing gradient at init)
    lk_alpha   mean_t −log α_t                       (log per position, then the masked mean)
    lk_lambda  λ·mean_t KL_t + (1 − λ)·mean_t (1 − α_t),  λ = exp(−η·stopgrad(ᾱ))

Means run over valid (unmasked) positions; ᾱ is that mean of α_t. See docs/losses.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "LOSS_NAMES",
    "TAIL_MODES",
    "DenseTarget",
    "SparseTarget",
    "LossResult",
    "compute_loss",
    "kl_alpha",
    "combine_steps",
    "expected_tau",
]

LOSS_NAMES: tuple[str, ...] = ("kl", "tv", "lk_alpha", "lk_lambda")
TAIL_MODES: tuple[str, ...] = ("bucket", "drop")

# Draft log-probabilities are floored here inside the KL *value* only, so a −inf draft logit under
# target mass gives a huge finite KL instead of inf (the gradient q − p never needs log q).
LOG_FLOOR = -1.0e4
# Each fp32 [rows, V] working buffer of the kernel is at most this big, and at most 1/64 of the
# draft logits: the kernel keeps about seven of them alive, so its scratch stays near 1/9 of the
# logits and the peak extra memory of forward+backward near 1.1× the logits (with the gradient).
MAX_BUFFER_BYTES = 32 * 2**20
MIN_BUFFER_BYTES = 2**20


# --------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class DenseTarget:
    """Full-vocabulary target distribution `[N, V]`, given as logits or as probabilities (one of)."""

    logits: Tensor | None = None
    probs: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.probs is None):
            raise ValueError("DenseTarget takes exactly one of logits= or probs=")
        t = self.tensor
        if not t.is_floating_point() or t.dim() < 2:
            raise ValueError(f"DenseTarget needs a float tensor [..., V], got {t.dtype} {tuple(t.shape)}")

    @property
    def tensor(self) -> Tensor:
        return self.logits if self.logits is not None else self.probs  # type: ignore[return-value]


@dataclass(frozen=True)
class SparseTarget:
    """The cache's top-k target: token ids `[N, k]` and their log-probs normalized over the full vocab.

    A log-prob of −inf marks a padding entry (ignored). Ids in a row must be distinct. The tail
    mode (`bucket` or `drop`) is a choice of the loss, given to `compute_loss(tail=...)`.
    """

    ids: Tensor
    logprobs: Tensor

    def __post_init__(self) -> None:
        if self.ids.dtype.is_floating_point or self.ids.dtype == torch.bool:
            raise ValueError(f"SparseTarget.ids must be an integer tensor, got {self.ids.dtype}")
        if not self.logprobs.is_floating_point():
            raise ValueError(f"SparseTarget.logprobs must be a float tensor, got {self.logprobs.dtype}")
        if self.ids.shape != self.logprobs.shape or self.ids.dim() < 2:
            raise ValueError(
                f"SparseTarget ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} "
                "must have the same shape [..., k]"
            )


Target = DenseTarget | SparseTarget


# ------------------------------------------------------------- targets mapped into draft space
class _DenseRows:
    """A dense target seen from the draft vocabulary; yields per-chunk fp32 quantities."""

    def __init__(self, target: DenseTarget, n: int, v_draft: int, vocab_map: Tensor | None):
        t = target.tensor
        t = t.reshape(-1, t.shape[-1])
        if t.shape[0] != n:
            raise ValueError(f"DenseTarget has {t.shape[0]} positions, draft logits have {n}")
        if vocab_map is None and t.shape[1] != v_draft:
            raise ValueError(
                f"DenseTarget vocabulary {t.shape[1]} != draft vocabulary {v_draft}; "
                "pass vocab_map= for a reduced draft vocabulary"
            )
        if vocab_map is not None and int(vocab_map.max()) >= t.shape[1]:
            raise ValueError(
                f"vocab_map points at target id {int(vocab_map.max())}, "
                f"but the DenseTarget vocabulary has {t.shape[1]} ids"
            )
        self.t, self.is_logits, self.vocab_map = t.detach(), target.logits is not None, vocab_map

    def chunk(self, rows, cdt: torch.dtype):
        """(p raw [c,V], p̃ for KL [c,V], log p̃ [c,V]) with p restricted to the draft vocabulary."""
        t = self.t[rows].to(cdt)
        if self.vocab_map is None:
            if self.is_logits:
                logp = torch.log_softmax(t, dim=-1)
                return logp.exp(), None, logp
            return t, None, t.log()  # log: −inf at zero-probability ids
        logp = torch.log_softmax(t, dim=-1) if self.is_logits else t.log()
        logp = logp.index_select(1, self.vocab_map)  # [c, V_draft], un-renormalized
        log_m = torch.logsumexp(logp, dim=-1, keepdim=True)  # log target mass on the draft vocab
        logp_kl = logp - torch.where(torch.isfinite(log_m), log_m, 0.0)
        return logp.exp(), logp_kl.exp().masked_fill_(~torch.isfinite(log_m), 0.0), logp_kl


class _SparseRows:
    """A top-k target mapped to draft indices; all per-position quantities are small, built once.

    Draft-space ids K = cached ids inside the draft vocabulary (padding and out-of-vocabulary ids
    point at a dummy column `v_draft` that carries no mass). r = 1 − Σ_cached p is the uncached
    tail; m = Σ_K p + r = 1 − (cached mass outside the draft vocabulary) is the target's mass on
    the draft vocabulary as far as the cache knows (m = 1 without a vocab map). KL uses p/m, r/m;
    α uses the raw p and r.
    """

    def __init__(self, target: SparseTarget, n: int, v_draft: int, vocab_map: Tensor | None, tail: str):
        ids = target.ids.reshape(-1, target.ids.shape[-1]).detach()
        logprobs = target.logprobs.reshape(-1, target.logprobs.shape[-1]).detach()
        if ids.shape[0] != n:
            raise ValueError(f"SparseTarget has {ids.shape[0]} positions, draft logits have {n}")
        cdt = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
        logprobs = logprobs.to(cdt)
        present = logprobs > -math.inf  # not padding
        if bool((ids[present] < 0).any()):
            raise ValueError("SparseTarget.ids has negative ids at non-padding entries")
        if vocab_map is None:
            if bool((ids[present] >= v_draft).any()):
                raise ValueError(
                    f"SparseTarget has ids >= draft vocabulary {v_draft}; "
                    "pass vocab_map= for a reduced draft vocabulary"
                )
            draft_ids = ids.long()
        else:  # target id -> draft index (or −1): the inverse of d2t
            size = max(int(vocab_map.max()), int(ids.max()) if ids.numel() else 0) + 1
            t2d = torch.full((size,), -1, dtype=torch.long, device=ids.device)
            t2d[vocab_map] = torch.arange(v_draft, device=ids.device)
            draft_ids = t2d[ids.long().clamp_min(0)]
        valid = present & (draft_ids >= 0)
        p_cached = torch.where(present, logprobs.exp(), 0.0)
        self.idx = torch.where(valid, draft_ids, v_draft)  # [N, k]
        self.p = torch.where(valid, p_cached, 0.0)  # [N, k] raw
        r = (1.0 - p_cached.sum(-1)).clamp_min(0.0)
        # When the cached ids cover the whole draft vocabulary there is no draft tail to match.
        r = torch.where(valid.sum(-1) >= v_draft, 0.0, r)
        m = self.p.sum(-1) + r if vocab_map is not None else torch.ones_like(r)
        has_m = m > 0
        m_safe = torch.where(has_m, m, 1.0)
        self.p_kl = torch.where(has_m[:, None], self.p / m_safe[:, None], 0.0)
        self.logp_kl = torch.where(valid & has_m[:, None], logprobs - m_safe.log()[:, None], 0.0)
        bucket = tail == "bucket"
        self.r = r if bucket else torch.zeros_like(r)  # raw tail mass (α side)
        self.r_kl = torch.where(has_m, r / m_safe, 0.0) if bucket else torch.zeros_like(r)
        self.bucket = bucket

    def chunk(self, rows, cdt: torch.dtype):
        return (self.idx[rows], self.p[rows].to(cdt), self.p_kl[rows].to(cdt), self.logp_kl[rows].to(cdt),
                self.r[rows].to(cdt)[:, None], self.r_kl[rows].to(cdt)[:, None])


# ------------------------------------------------------------------------------ chunk kernels
def _floor(x: Tensor) -> Tensor:
    return x.clamp_min(LOG_FLOOR)


def _dense_chunk(z: Tensor, tgt: _DenseRows, rows, coef: tuple[Tensor, Tensor] | None, cdt):
    """Forward: (KL [c], α [c]). Backward (coef = (a, b), each [c,1]): a·∂KL/∂z + b·∂α/∂z, [c,V]."""
    z32 = z.to(cdt)
    lse = torch.logsumexp(z32, dim=-1, keepdim=True)
    logq = z32.sub_(lse) if z32.data_ptr() != z.data_ptr() else z32 - lse  # [c, V]
    p, p_kl, logp_kl = tgt.chunk(rows, cdt)
    kl_src = p if p_kl is None else p_kl
    if coef is None:
        q = logq.exp()
        alpha = torch.minimum(p, q).sum(-1)
        kl = (logp_kl - _floor(logq)).mul_(kl_src).masked_fill_(kl_src == 0, 0.0).sum(-1)
        return kl, alpha
    a, b = coef
    q = logq.exp_()
    under = q < p  # where the draft under-covers the target, ∂min/∂q = 1
    q_under = q * under
    mass_under = q_under.sum(-1, keepdim=True)
    s = kl_src.sum(-1, keepdim=True)  # 1, or 0 when no target mass lies on the draft vocab
    # ∂KL/∂z = s·q − p̃ ;  ∂α/∂z = q⊙1[q<p] − q·Σ_{q<p} q
    g = q.mul_(a * s - b * mass_under)
    g.addcmul_(q_under, b)
    g.addcmul_(kl_src, -a)
    return g


def _sparse_chunk(z: Tensor, tgt: _SparseRows, rows, coef: tuple[Tensor, Tensor] | None, cdt):
    """As `_dense_chunk` for a top-k target: cached ids K, plus the tail bucket in `bucket` mode."""
    c, v = z.shape
    idx, p, p_kl, logp_kl, r, r_kl = tgt.chunk(rows, cdt)
    logq = z.new_empty((c, v + 1), dtype=cdt)  # last column: dummy id for padding / OOV entries
    logq[:, :v].copy_(z)
    logq[:, v] = -math.inf
    logq.sub_(torch.logsumexp(logq, dim=-1, keepdim=True))
    logq_k = logq.gather(1, idx)  # [c, k]
    q_k = logq_k.exp()
    q = logq.exp() if coef is not None else None
    if tgt.bucket:
        logq.scatter_(1, idx, -math.inf)  # the draft's tail: ids outside K
        log_tail = torch.logsumexp(logq, dim=-1, keepdim=True)  # log Q, −inf for an empty tail
        tail = log_tail.exp()
    if coef is None:
        alpha = torch.minimum(p, q_k).sum(-1)
        kl = ((logp_kl - _floor(logq_k)) * p_kl).masked_fill_(p_kl == 0, 0.0).sum(-1)
        if tgt.bucket:
            alpha = alpha + torch.minimum(r, tail).squeeze(-1)
            kl_tail = r_kl * (r_kl.clamp_min(torch.finfo(cdt).tiny).log() - _floor(log_tail))
            kl = kl + kl_tail.masked_fill_(r_kl == 0, 0.0).squeeze(-1)
        return kl, alpha
    a, b = coef
    q_under_k = q_k * (q_k < p)
    mass_under = q_under_k.sum(-1, keepdim=True)
    s = p_kl.sum(-1, keepdim=True)
    g = q
    if tgt.bucket:
        tail_under = (tail < r).to(cdt)  # ∂min(r, Q)/∂Q
        mass_under = mass_under + tail_under * tail
        s = s + r_kl
        # q_j / Q for j outside K (0 on K and the dummy), computed in log space: Q may underflow.
        tail_dist = logq.sub_(torch.where(torch.isfinite(log_tail), log_tail, 0.0)).exp_()
        g.mul_(a * s - b * mass_under)
        g.addcmul_(tail_dist, b * tail_under * tail - a * r_kl)
    else:
        g.mul_(a * s - b * mass_under)
    # ∂KL/∂z = s·q − scatter(p̃) − r̃·q_tail/Q ;  ∂α/∂z = scatter(q_K⊙1[q<p]) + 1[Q<r]·q_tail − q·mass_under
    g.scatter_add_(1, idx, b * q_under_k - a * p_kl)
    return g[:, :v]


def _chunk_rows(n: int, v: int, elem_size: int) -> int:
    budget = min(MAX_BUFFER_BYTES, max(MIN_BUFFER_BYTES, n * v * elem_size // 64))
    return max(1, min(n, budget // (4 * (v + 1))))


def _row_chunks(valid_rows: Tensor | None, n: int, chunk: int) -> Iterable:
    """Row selectors for the valid positions, `chunk` at a time (slices when all are valid)."""
    if valid_rows is None:
        for start in range(0, n, chunk):
            yield slice(start, min(n, start + chunk))
    else:
        for start in range(0, valid_rows.numel(), chunk):
            yield valid_rows[start:start + chunk]


class _KLAlpha(torch.autograd.Function):
    """Per-position (KL, α) of draft logits [N, V] against a prepared target, chunked both ways."""

    @staticmethod
    def forward(ctx, logits, tgt, valid_rows, chunk):  # type: ignore[override]
        n = logits.shape[0]
        cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        kernel = _sparse_chunk if isinstance(tgt, _SparseRows) else _dense_chunk
        kl = torch.zeros(n, dtype=cdt, device=logits.device)
        alpha = torch.zeros(n, dtype=cdt, device=logits.device)
        with torch.no_grad():
            for rows in _row_chunks(valid_rows, n, chunk):
                kl[rows], alpha[rows] = kernel(logits[rows], tgt, rows, None, cdt)
        ctx.save_for_backward(logits)
        ctx.tgt, ctx.valid_rows, ctx.chunk, ctx.cdt, ctx.kernel = tgt, valid_rows, chunk, cdt, kernel
        return kl, alpha

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl, grad_alpha):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        n = logits.shape[0]
        grad = torch.empty_like(logits) if ctx.valid_rows is None else torch.zeros_like(logits)
        for rows in _row_chunks(ctx.valid_rows, n, ctx.chunk):
            coef = (grad_kl[rows].to(ctx.cdt)[:, None], grad_alpha[rows].to(ctx.cdt)[:, None])
            grad[rows] = ctx.kernel(logits[rows], ctx.tgt, rows, coef, ctx.cdt)
        return grad, None, None, None


# ------------------------------------------------------------------------------- public API
def _check_vocab_map(vocab_map: Tensor | None, v_draft: int, device) -> Tensor | None:
    if vocab_map is None:
        return None
    if vocab_map.dtype.is_floating_point or vocab_map.dim() != 1 or vocab_map.numel() != v_draft:
        raise ValueError(
            f"vocab_map must be an integer tensor [V_draft={v_draft}] of target ids (d2t), "
            f"got {vocab_map.dtype} {tuple(vocab_map.shape)}"
        )
    vocab_map = vocab_map.to(device=device, dtype=torch.long)
    if bool((vocab_map < 0).any()) or torch.unique(vocab_map).numel() != v_draft:
        raise ValueError("vocab_map must hold distinct, non-negative target ids")
    return vocab_map


def kl_alpha(
    draft_logits: Tensor,
    target: Target,
    mask: Tensor | None = None,
    *,
    tail: str = "bucket",
    vocab_map: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position KL(p‖q) and α with gradients, and the valid-position mask, all `[N]` flat."""
    if tail not in TAIL_MODES:
        raise ValueError(f"unknown tail mode {tail!r}; valid: {', '.join(TAIL_MODES)}")
    if not draft_logits.is_floating_point() or draft_logits.dim() < 2:
        raise ValueError(f"draft_logits must be a float tensor [..., V], got {draft_logits.dtype} "
                         f"{tuple(draft_logits.shape)}")
    v_draft = draft_logits.shape[-1]
    logits = draft_logits.reshape(-1, v_draft)  # a view when contiguous: no copy
    n = logits.shape[0]
    if mask is None:
        valid = torch.ones(n, dtype=torch.bool, device=logits.device)
    else:
        if mask.numel() != n:
            raise ValueError(f"mask has {mask.numel()} entries, draft logits have {n} positions")
        valid = mask.reshape(n).to(logits.device) != 0
    vocab_map = _check_vocab_map(vocab_map, v_draft, logits.device)
    if isinstance(target, DenseTarget):
        tgt = _DenseRows(target, n, v_draft, vocab_map)
    elif isinstance(target, SparseTarget):
        tgt = _SparseRows(target, n, v_draft, vocab_map, tail)
    else:
        raise TypeError(f"target must be a DenseTarget or SparseTarget, got {type(target).__name__}")
    valid_rows = None if bool(valid.all()) else valid.nonzero().squeeze(-1)
    chunk = chunk_size or _chunk_rows(n, v_draft, logits.element_size())
    kl, alpha = _KLAlpha.apply(logits, tgt, valid_rows, int(chunk))
    return kl, alpha, valid


@dataclass
class LossResult:
    """One draft step's loss and what to log about it."""

    loss: Tensor  # scalar, with grad
    alpha: Tensor  # [...] per-position α, detached (0 at masked positions)
    alpha_mean: Tensor  # 0-dim, detached: masked mean of α (0 when nothing is valid)
    kl: Tensor  # [...] per-position KL(p‖q), detached (0 at masked positions)
    kl_mean: Tensor  # 0-dim, detached
    lam: Tensor | None  # 0-dim, detached λ (lk_lambda only)
    n_valid: Tensor  # 0-dim int: number of valid positions


def compute_loss(
    name: str,
    draft_logits: Tensor,
    target: Target,
    mask: Tensor | None = None,
    *,
    eta: float = 3.0,
    tail: str = "bucket",
    vocab_map: Tensor | None = None,
    chunk_size: int | None = None,
) -> LossResult:
    """Loss `name` (kl | tv | lk_alpha | lk_lambda) of draft logits `[..., V_draft]` against a target."""
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSS_NAMES)}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    kl, alpha, valid = kl_alpha(draft_logits, target, mask, tail=tail, vocab_map=vocab_map,
                                chunk_size=chunk_size)
    w = valid.to(kl.dtype)
    n_valid = valid.sum()
    denom = n_valid.clamp_min(1).to(kl.dtype)
    kl_mean = (kl * w).sum() / denom
    alpha_mean = (alpha * w).sum() / denom
    tv_mean = ((1.0 - alpha) * w).sum() / denom
    lam = None
    if name == "kl":
        loss = kl_mean
    elif name == "tv":
        loss = tv_mean
    elif name == "lk_alpha":
        # log of where(α>0, α, 1): a position with α = 0 adds 0 to the value and 0 to the gradient.
        loss = (-torch.log(torch.where(alpha > 0, alpha, 1.0)) * w).sum() / denom
    else:
        lam = torch.exp(-eta * alpha_mean.detach())
        loss = lam * kl_mean + (1.0 - lam) * tv_mean
    shape = draft_logits.shape[:-1]
    return LossResult(
        loss=loss,
        alpha=alpha.detach().reshape(shape),
        alpha_mean=alpha_mean.detach(),
        kl=kl.detach().reshape(shape),
        kl_mean=kl_mean.detach(),
        lam=lam,
        n_valid=n_valid,
    )


def combine_steps(step_results: Sequence[LossResult | Tensor], gamma: float = 0.8) -> Tensor:
    """Multi-step drafter loss Σ_n γ^(n−1)·L_n (each step's λ was already computed on that step)."""
    if len(step_results) == 0:
        raise ValueError("combine_steps needs at least one step")
    total = None
    for n, step in enumerate(step_results):
        loss = step.loss if isinstance(step, LossResult) else step
        term = (gamma ** n) * loss
        total = term if total is None else total + term
    return total  # type: ignore[return-value]


def expected_tau(alpha_per_step: Sequence[float | Tensor] | Tensor) -> float:
    """Expected acceptance length E[τ] = 1 + Σ_k Π_{j≤k} ᾱ_j from the per-step mean acceptance rates."""
    tau, run = 1.0, 1.0
    for a in alpha_per_step:
        run *= float(a)
        tau += run
    return tau
