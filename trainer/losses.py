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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.loss_names import LOSS_NAMES, TAIL_MODES

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

# Log-probabilities (draft and target) are floored here inside the KL *value*, so a −inf draft
# logit under target mass gives a huge finite KL instead of inf, and 0·log 0 never makes a NaN;
# exp(LOG_FLOOR) is exactly 0, and the gradient (s·q − p) never needs a log.
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
# Each prepared target knows how to compute, for a chunk of rows z [c, V] of draft logits:
#   forward(z, rows)            -> (KL [c], α [c], aux [c] or None)
#   finish(logits, kl, aux, valid_rows) -> (KL [N], aux [N]): once per pass, after every chunk
#   backward(z, rows, a, b, aux) -> a·∂KL/∂z + b·∂α/∂z  [c, V]   (a, b: [c, 1])
# in the compute dtype `cdt` (fp32, or fp64 for fp64 logits). No chunk reads a value back to the
# host: on a GPU a host synchronization per chunk would stall the queue hundreds of times a step.


def _floor(x: Tensor) -> Tensor:
    return x.clamp_min(LOG_FLOOR)


# exp_flushed_ writes 0 for results up to this many times the dtype's smallest normal number.
FLUSHED_BELOW = math.exp(1.5)


def exp_flushed_(x: Tensor) -> Tensor:
    """x.exp_() in place, with every result below FLUSHED_BELOW × the dtype's smallest normal number written as 0.

    torch's CPU exp leaves its vectorized path for inputs under log(tiny) (≈ −87.3 in fp32): 10–50×
    slower on AVX2 and AVX-512 alike. A draft trained with LK^α spreads its logits that far within
    a few dozen steps, and its training step then took 2–4× as long. Here inputs are clamped into the
    fast range first and the results that came from there are zeroed: each is < 5.3e-38 in fp32 (subnormal
    or barely normal anyway), so a sum over V of them moves by less than V × 5.3e-38.
    """
    tiny = torch.finfo(x.dtype).tiny
    x.clamp_min_(math.log(tiny) + 1.0).exp_()  # fp32: −86.3, fp64: −707.4, inside the fast range
    return F.threshold_(x, FLUSHED_BELOW * tiny, 0.0)  # x if x > e^1.5·tiny else 0


class _DenseRows:
    """A dense target seen from the draft vocabulary (restricted by the vocab map, if any)."""

    def __init__(self, target: DenseTarget, n: int, v_draft: int, vocab_map: Tensor | None, cdt, device):
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
        self.t = t.detach().to(device)  # a no-op when the target already lives with the logits
        self.is_logits, self.vocab_map, self.cdt = target.logits is not None, vocab_map, cdt

    def _logp(self, rows) -> Tensor:
        """log p restricted to the draft vocabulary (un-renormalized), floored: [c, V_draft]."""
        t = self.t[rows]
        logp = torch.log_softmax(t, dim=-1, dtype=self.cdt) if self.is_logits else t.to(self.cdt).log()
        if self.vocab_map is not None:
            logp = logp.index_select(1, self.vocab_map)
        return logp.clamp_min_(LOG_FLOOR)

    def _p(self, rows) -> Tensor:
        if self.is_logits and self.vocab_map is None:
            return torch.softmax(self.t[rows], dim=-1, dtype=self.cdt)
        if self.vocab_map is None:
            return self.t[rows].to(self.cdt)  # read only
        return exp_flushed_(self._logp(rows))

    def _mass(self, p: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """(1/m, s): m the target mass that KL renormalizes by (1 without a map), s = Σ p / m."""
        if self.vocab_map is None:
            return 1.0, (1.0 if self.is_logits else p.sum(-1, keepdim=True))
        psum = p.sum(-1, keepdim=True)
        inv_m = torch.where(psum > 0, 1.0 / psum, 0.0)
        return inv_m, psum * inv_m

    def forward(self, z: Tensor, rows):
        logq = torch.log_softmax(z, dim=-1, dtype=self.cdt).clamp_min_(LOG_FLOOR)
        logp = self._logp(rows)
        kl_raw = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)  # Σ p (log p − log q)
        p, q = exp_flushed_(logp), exp_flushed_(logq)
        alpha = torch.minimum(p, q).sum(-1)
        if self.vocab_map is None:
            return kl_raw, alpha, None
        inv_m = self._mass(p)[0].squeeze(-1)
        # KL(p/m ‖ q) = Σ p (log p − log q) / m − log m
        kl = torch.where(inv_m > 0, kl_raw * inv_m + torch.where(inv_m > 0, inv_m, 1.0).log(), 0.0)
        return kl, alpha, None

    def finish(self, logits: Tensor, kl: Tensor, aux, valid_rows) -> tuple[Tensor, None]:
        """Nothing to complete for a dense target."""
        return kl, aux

    def backward(self, z: Tensor, rows, a: Tensor, b: Tensor, aux) -> Tensor:
        q = torch.softmax(z, dim=-1, dtype=self.cdt)
        p = self._p(rows)
        inv_m, s = self._mass(p)
        q_under = torch.where(q < p, q, 0.0)  # where the draft under-covers the target: ∂min/∂q = 1
        mass_under = q_under.sum(-1, keepdim=True)
        # ∂KL/∂z = s·q − p/m ;  ∂α/∂z = q⊙1[q<p] − q·Σ_{q<p} q
        g = q_under.mul_(b)
        g.addcmul_(q, a * s - b * mass_under)
        g.addcmul_(p, -a * inv_m)
        return g


class _SparseRows:
    """A top-k target mapped to draft indices; its per-position quantities are small, built once.

    K = the cached ids that are inside the draft vocabulary and not padding. Entries outside K
    carry p = 0 and point at a column already in K (or column 0 when K is empty), so gathers and
    scatters over all k entries stay correct. r = 1 − Σ_cached p is the uncached tail; with a vocab
    map, m = Σ_K p + r = 1 − (cached mass outside the draft vocabulary) is the target's mass on the
    draft vocabulary as far as the cache tells (m = 1 without a map). KL uses p/m and r/m; α uses
    the raw p and r. When K covers the whole draft vocabulary there is no tail: r = 0.
    """

    def __init__(self, target: SparseTarget, n: int, v_draft: int, vocab_map: Tensor | None, tail: str, cdt,
                 device):
        ids = target.ids.reshape(-1, target.ids.shape[-1]).detach().to(device)
        logprobs = target.logprobs.reshape(-1, target.logprobs.shape[-1]).detach().to(device, cdt)
        if ids.shape[0] != n:
            raise ValueError(f"SparseTarget has {ids.shape[0]} positions, draft logits have {n}")
        present = logprobs > -math.inf  # not padding
        # both checks in one host read (one GPU synchronization): bit 0 negative ids, bit 1 ids >= V
        bad = int((present & (ids < 0)).any() + 2 * (present & (ids >= v_draft)).any())
        if bad & 1:
            raise ValueError("SparseTarget.ids has negative ids at non-padding entries")
        if vocab_map is None:
            if bad & 2:
                raise ValueError(
                    f"SparseTarget has ids >= draft vocabulary {v_draft}; "
                    "pass vocab_map= for a reduced draft vocabulary"
                )
            draft_ids = torch.where(present, ids.long(), -1)
        else:  # target id -> draft index or −1: the inverse of d2t
            size = max(int(vocab_map.max()), int(ids.max()) if ids.numel() else 0) + 1
            t2d = torch.full((size,), -1, dtype=torch.long, device=ids.device)
            t2d[vocab_map] = torch.arange(v_draft, device=ids.device)
            draft_ids = torch.where(present, t2d[ids.long().clamp_min(0)], -1)
        valid = draft_ids >= 0
        k = ids.shape[1]
        first = torch.where(valid, torch.arange(k, device=ids.device), k).amin(-1, keepdim=True)  # [N,1]
        self.has_valid = (first < k)[:, 0]
        first = first.clamp_max(k - 1)
        # invalid entries point at the row's first valid id, and take their gradient value from it
        self.idx = torch.where(valid, draft_ids, draft_ids.gather(1, first).clamp_min(0))
        self.src = torch.where(valid | ~self.has_valid[:, None], torch.arange(k, device=ids.device), first)
        p_cached = torch.where(present, logprobs.exp(), 0.0)
        self.p = torch.where(valid, p_cached, 0.0)
        r = (1.0 - p_cached.sum(-1)).clamp_min(0.0)
        r = torch.where(valid.sum(-1) >= v_draft, 0.0, r)
        m = self.p.sum(-1) + r if vocab_map is not None else torch.ones_like(r)
        has_m = m > 0
        m_safe = torch.where(has_m, m, 1.0)
        self.p_kl = torch.where(has_m[:, None], self.p / m_safe[:, None], 0.0)
        self.logp_kl = torch.where(valid & has_m[:, None], logprobs - m_safe.log()[:, None], 0.0)
        self.bucket = tail == "bucket"
        zero = torch.zeros_like(r)
        self.r = r if self.bucket else zero  # raw tail mass (α side)
        self.r_kl = torch.where(has_m, r / m_safe, 0.0) if self.bucket else zero
        self.cdt = cdt
        # Below this the draft tail Q is recomputed in log space: its q_j may underflow, and exp_flushed_
        # may have dropped up to V·FLUSHED_BELOW·tiny of it, which stays under Q's own rounding above here.
        finfo = torch.finfo(cdt)
        self.tiny = max(finfo.tiny ** 0.75, v_draft * FLUSHED_BELOW * finfo.tiny / finfo.eps)
        self.slow_tail = True  # whether backward may meet Q < tiny; set by finish()

    def _masked_logq(self, z: Tensor, idx: Tensor, has_valid: Tensor) -> Tensor:
        """log q with the ids of K set to −inf: [c, V]."""
        logq = torch.log_softmax(z, dim=-1, dtype=self.cdt)
        return logq.scatter_(1, idx, torch.where(has_valid[:, None], -math.inf, logq.gather(1, idx)))

    def forward(self, z: Tensor, rows):
        idx, has_valid = self.idx[rows], self.has_valid[rows]
        p, p_kl, logp_kl = self.p[rows], self.p_kl[rows], self.logp_kl[rows]
        logq = torch.log_softmax(z, dim=-1, dtype=self.cdt)
        logq_k = logq.gather(1, idx)  # [c, k]
        alpha = torch.minimum(p, logq_k.exp()).sum(-1)
        kl = torch.where(p_kl > 0, p_kl * (logp_kl - _floor(logq_k)), 0.0).sum(-1)
        if not self.bucket:
            return kl, alpha, None
        logq.scatter_(1, idx, torch.where(has_valid[:, None], -math.inf, logq_k))
        tail = exp_flushed_(logq).sum(-1)  # Q: the draft's mass outside K
        alpha = alpha + torch.minimum(self.r[rows], tail)
        return kl, alpha, tail  # KL's tail term needs log Q: finish() adds it

    def finish(self, logits: Tensor, kl: Tensor, tail, valid_rows) -> tuple[Tensor, Tensor | None]:
        """KL's tail term over the whole pass, with exact log Q where Q underflowed; aux becomes log Q.

        The only host read of the forward pass: whether any Q underflowed (then its rows are redone in
        log space) and whether backward can meet an underflowing Q at all (else it skips that check).
        """
        if tail is None:
            return kl, None
        rows = slice(None) if valid_rows is None else valid_rows
        tail_v = tail[rows]
        log_tail = tail_v.log()
        rare = tail_v < self.tiny
        flags = int(rare.any() + 2 * (log_tail.exp() < self.tiny).any())  # one host read for the pass
        self.slow_tail = bool(flags & 2)
        if flags & 1:  # exact log Q where the q_j underflow
            picked = rare.nonzero().squeeze(-1) if valid_rows is None else valid_rows[rare]
            log_tail[rare] = torch.logsumexp(
                self._masked_logq(logits[picked], self.idx[picked], self.has_valid[picked]), dim=-1)
            self.slow_tail = True
        r_kl = self.r_kl[rows]
        kl[rows] = kl[rows] + torch.where(r_kl > 0, r_kl * (r_kl.clamp_min(self.tiny).log() - _floor(log_tail)),
                                          0.0)
        out = torch.zeros_like(tail)
        out[rows] = log_tail
        return kl, out

    def backward(self, z: Tensor, rows, a: Tensor, b: Tensor, log_tail) -> Tensor:
        idx, src, has_valid = self.idx[rows], self.src[rows], self.has_valid[rows]
        p, p_kl = self.p[rows], self.p_kl[rows]
        q = torch.softmax(z, dim=-1, dtype=self.cdt)
        q_k = q.gather(1, idx)
        q_under_k = torch.where(q_k < p, q_k, 0.0)
        mass_under = q_under_k.sum(-1, keepdim=True)
        s = p_kl.sum(-1, keepdim=True)
        # ∂KL/∂z = s·q − scatter_K(p/m) − (r/m)·q_tail/Q
        # ∂α/∂z  = scatter_K(q⊙1[q<p]) + 1[Q<r]·q_tail − q·(Σ_K q⊙1[q<p] + 1[Q<r]·Q)
        # (q_tail = q off K, 0 on K; the tail terms exist in bucket mode only)
        k_vals = b * q_under_k - a * p_kl
        if not self.bucket:
            g = q.mul_(a * s - b * mass_under)
            return g.scatter_add_(1, idx, k_vals)  # entries outside K add 0
        r, r_kl = self.r[rows][:, None], self.r_kl[rows][:, None]
        tail = log_tail[:, None].exp()
        under_tail = (tail < r).to(self.cdt)
        coef = a * (s + r_kl) - b * (mass_under + under_tail * tail)
        tail_coef = b * under_tail * tail - a * r_kl  # multiplies q_j / Q off K
        fast = tail >= self.tiny
        coef_off_k = coef + torch.where(fast, tail_coef / torch.where(fast, tail, 1.0), 0.0)
        g = q.mul_(coef_off_k)
        # overwrite the K columns (no cancellation): invalid entries copy their row's first valid value
        on_k = torch.where(has_valid[:, None], coef * q_k + k_vals, coef_off_k * q_k).gather(1, src)
        g.scatter_(1, idx, on_k)
        rare = ~fast[:, 0] & (tail_coef[:, 0] != 0)
        if self.slow_tail and bool(rare.any()):  # q_j / Q in log space where Q underflows
            lt = log_tail[rare][:, None]
            ratio = exp_flushed_(self._masked_logq(z[rare], idx[rare], has_valid[rare]).sub_(
                torch.where(torch.isfinite(lt), lt, 0.0)))
            g[rare] += tail_coef[rare] * ratio
        return g


def _chunk_rows(n: int, v: int, elem_size: int) -> int:
    budget = min(MAX_BUFFER_BYTES, max(MIN_BUFFER_BYTES, n * v * elem_size // 64))
    return max(1, min(n, budget // (4 * v)))


def _row_chunks(valid_rows: Tensor | None, n: int, chunk: int) -> Iterable:
    """Row selectors for the valid positions, `chunk` at a time (slices when all are valid)."""
    if valid_rows is None:
        for start in range(0, n, chunk):
            yield slice(start, min(n, start + chunk))
    else:
        for start in range(0, valid_rows.numel(), chunk):
            yield valid_rows[start:start + chunk]


class _KLAlpha(torch.autograd.Function):
    """Per-position (KL, α) of draft logits [N, V] against a prepared target, chunked both ways.

    Forward keeps nothing of size [N, V]; backward recomputes each chunk and writes its gradient
    into one tensor the size of the logits.
    """

    @staticmethod
    def forward(ctx, logits, tgt, valid_rows, chunk):  # type: ignore[override]
        n = logits.shape[0]
        kl = torch.zeros(n, dtype=tgt.cdt, device=logits.device)
        alpha = torch.zeros(n, dtype=tgt.cdt, device=logits.device)
        aux = None
        for rows in _row_chunks(valid_rows, n, chunk):
            kl[rows], alpha[rows], aux_rows = tgt.forward(logits[rows], rows)
            if aux_rows is not None:
                aux = torch.zeros(n, dtype=tgt.cdt, device=logits.device) if aux is None else aux
                aux[rows] = aux_rows
        kl, aux = tgt.finish(logits, kl, aux, valid_rows)
        ctx.save_for_backward(logits)
        ctx.tgt, ctx.valid_rows, ctx.chunk, ctx.aux = tgt, valid_rows, chunk, aux
        return kl, alpha

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl, grad_alpha):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        tgt, n = ctx.tgt, logits.shape[0]
        grad = torch.empty_like(logits) if ctx.valid_rows is None else torch.zeros_like(logits)
        for rows in _row_chunks(ctx.valid_rows, n, ctx.chunk):
            a = grad_kl[rows].to(tgt.cdt)[:, None]
            b = grad_alpha[rows].to(tgt.cdt)[:, None]
            aux = None if ctx.aux is None else ctx.aux[rows]
            grad[rows] = tgt.backward(logits[rows], rows, a, b, aux).to(grad.dtype)
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
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32  # fp32 maths for bf16/fp16
    if isinstance(target, DenseTarget):
        tgt = _DenseRows(target, n, v_draft, vocab_map, cdt, logits.device)
    elif isinstance(target, SparseTarget):
        tgt = _SparseRows(target, n, v_draft, vocab_map, tail, cdt, logits.device)
    else:
        raise TypeError(f"target must be a DenseTarget or SparseTarget, got {type(target).__name__}")
    # without a mask every row is valid: no host read (a GPU synchronization) to find that out
    valid_rows = None if mask is None or bool(valid.all()) else valid.nonzero().squeeze(-1)
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


def expected_tau(alpha_per_step: Sequence[float | Tensor] | Tensor | np.ndarray,
                 draft_len: int | None = None) -> float | np.ndarray:
    """Expected acceptance length 1 + Σ_k Π_{j≤k} ᾱ_j from per-step mean acceptance rates (the last axis).

    With `draft_len`, the chain has exactly that many steps: the last ᾱ is repeated (or the list cut).
    One chain gives a float; a stack `[..., steps]` gives an array of τ.
    """
    if isinstance(alpha_per_step, Tensor):
        alphas = alpha_per_step.detach().cpu().double().numpy()
    elif isinstance(alpha_per_step, np.ndarray):
        alphas = alpha_per_step.astype(np.float64)
    else:
        alphas = np.array([float(a) for a in alpha_per_step], dtype=np.float64)
    if draft_len is not None and alphas.shape[-1] > 0:
        last = np.repeat(alphas[..., -1:], max(0, draft_len - alphas.shape[-1]), axis=-1)
        alphas = np.concatenate([alphas, last], axis=-1)[..., :draft_len]
    tau = 1.0 + np.cumprod(alphas, axis=-1).sum(axis=-1)
    return float(tau) if tau.ndim == 0 else tau
