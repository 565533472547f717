"""Properties of the drafter losses (trainer/losses.py) against independent brute-force formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    LOSS_NAMES,
    DenseTarget,
    SparseTarget,
    combine_steps,
    compute_loss,
    exp_flushed_,
    expected_tau,
    kl_alpha,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------- brute-force reference
def brute(name: str, z: torch.Tensor, p_full: torch.Tensor, *, eta: float = 3.0, vocab_map=None,
          detach_lambda: bool = True) -> torch.Tensor:
    """Loss written straight from DESIGN §3 in plain autograd (no chunking, no custom backward)."""
    q = torch.softmax(z, dim=-1)
    p = p_full if vocab_map is None else p_full[:, vocab_map]  # un-renormalized on the draft vocab
    alpha = torch.minimum(p, q).sum(-1)
    p_kl = p / p.sum(-1, keepdim=True)
    kl = (torch.special.xlogy(p_kl, p_kl) - p_kl * torch.log(q)).sum(-1)
    if name == "kl":
        return kl.mean()
    if name == "tv":
        return (1 - alpha).mean()
    if name == "lk_alpha":
        return (-torch.log(alpha)).mean()
    abar = alpha.mean()
    lam = torch.exp(-eta * (abar.detach() if detach_lambda else abar))
    return lam * kl.mean() + (1 - lam) * (1 - alpha).mean()


def grad_of(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_()
    loss = fn(z)
    loss.backward()
    return loss.detach(), z.grad


def rand_case(n=6, v=11, dtype=F64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=dtype) * scale
    t = torch.randn(n, v, generator=g, dtype=dtype) * scale
    return z, t


def topk_target(target_logits: torch.Tensor, k: int, shuffle_seed: int | None = 0) -> SparseTarget:
    logp = torch.log_softmax(target_logits, dim=-1)
    lp, ids = logp.topk(k, dim=-1)
    if shuffle_seed is not None:  # order must not matter
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(shuffle_seed))
        lp, ids = lp[:, perm], ids[:, perm]
    return SparseTarget(ids=ids, logprobs=lp)


# ------------------------------------------------------------------------------- definitions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_distributions_give_alpha_one_and_zero_losses(dtype):
    z, _ = rand_case(dtype=torch.float32)
    z = z.to(dtype)
    for name in LOSS_NAMES:
        res = compute_loss(name, z.float().detach().requires_grad_(), DenseTarget(logits=z.float()))
        assert torch.allclose(res.alpha, torch.ones_like(res.alpha), atol=1e-5)
        assert abs(res.loss.item()) < 1e-5, name
        assert abs(float(res.kl_mean)) < 1e-5
    # bf16 logits in, fp32 maths inside, grad in the logits' dtype
    zz = z.detach().clone().requires_grad_()
    res = compute_loss("lk_alpha", zz, DenseTarget(logits=z.float()))
    res.loss.backward()
    assert res.loss.dtype == torch.float32 and zz.grad.dtype == dtype
    assert abs(res.loss.item()) < 1e-5


@pytest.mark.parametrize("tail", ["bucket", "drop"])
def test_point_mass_target_lk_alpha_is_cross_entropy(tail):
    z, _ = rand_case()
    y = torch.tensor([3, 0, 10, 5, 5, 1])
    ce, ce_grad = grad_of(lambda x: F.cross_entropy(x, y), z)
    dense = DenseTarget(probs=F.one_hot(y, z.shape[1]).to(F64))
    sparse = SparseTarget(ids=y[:, None], logprobs=torch.zeros(len(y), 1, dtype=F64))
    for target in (dense, sparse):
        loss, grad = grad_of(lambda x: compute_loss("lk_alpha", x, target, tail=tail).loss, z)
        assert torch.allclose(loss, ce, atol=1e-12)
        assert torch.allclose(grad, ce_grad, atol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("mapped", [False, True])
def test_dense_losses_match_brute_force_autograd(name, mapped):
    z, t = rand_case(v=9)
    vocab_map = None
    if mapped:  # draft vocab = 9 of 15 target ids
        _, t = rand_case(v=15, seed=1)
        vocab_map = torch.tensor([14, 0, 3, 7, 2, 9, 11, 5, 1])
    p_full = torch.softmax(t, dim=-1)
    ref, ref_grad = grad_of(lambda x: brute(name, x, p_full, vocab_map=vocab_map), z)
    for target in (DenseTarget(logits=t), DenseTarget(probs=p_full)):
        loss, grad = grad_of(lambda x: compute_loss(name, x, target, vocab_map=vocab_map).loss, z)
        assert torch.allclose(loss, ref, atol=1e-12), (name, loss.item(), ref.item())
        assert torch.allclose(grad, ref_grad, atol=1e-12)


def test_lk_alpha_gradient_is_tv_gradient_over_alpha():
    z, t = rand_case()
    target = DenseTarget(logits=t)
    _, g_lk = grad_of(lambda x: compute_loss("lk_alpha", x, target).loss, z)
    _, g_tv = grad_of(lambda x: compute_loss("tv", x, target).loss, z)
    alpha = compute_loss("tv", z, target).alpha
    assert torch.allclose(g_lk, g_tv / alpha[:, None], atol=1e-12)
    assert g_tv.abs().max() > 1e-3  # not trivially zero


TARGET_CASES = ["dense_logits", "dense_probs", "dense_map", "topk_bucket", "topk_drop", "topk_map_bucket",
                "topk_map_drop", "topk_padded_bucket"]


def make_target(case: str, n=5, v=8, seed=0):
    """(target, tail, vocab_map) for draft vocabulary v."""
    g = torch.Generator().manual_seed(seed)
    if "map" in case:
        t = torch.randn(n, 13, generator=g, dtype=F64) * 2
        vocab_map = torch.tensor([0, 12, 4, 5, 9, 2, 7, 11])
    else:
        t = torch.randn(n, v, generator=g, dtype=F64) * 2
        vocab_map = None
    tail = "drop" if case.endswith("drop") else "bucket"
    if case == "dense_probs":
        return DenseTarget(probs=torch.softmax(t, -1)), tail, vocab_map
    if case.startswith("dense"):
        return DenseTarget(logits=t), tail, vocab_map
    target = topk_target(t, 5 if "map" in case else 3)
    if case == "topk_padded_bucket":  # padding entries (−inf) and one all-padding row
        lp = target.logprobs.clone()
        lp[0, 1] = -math.inf
        lp[2, :] = -math.inf
        target = SparseTarget(ids=target.ids, logprobs=lp)
    return target, tail, vocab_map


@pytest.mark.parametrize("case", TARGET_CASES)
def test_kernel_gradient_matches_finite_differences(case):
    """gradcheck: the custom backward against central finite differences of its own forward, fp64."""
    target, tail, vocab_map = make_target(case)
    z = (torch.randn(5, 8, generator=torch.Generator().manual_seed(3), dtype=F64) * 2).requires_grad_()
    mask = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool) if "padded" not in case else None
    fn = lambda x: kl_alpha(x, target, mask, tail=tail, vocab_map=vocab_map, chunk_size=2)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7)


def test_lambda_is_detached():
    z, t = rand_case()
    p_full = torch.softmax(t, -1)
    _, g = grad_of(lambda x: compute_loss("lk_lambda", x, DenseTarget(logits=t)).loss, z)
    _, g_detached = grad_of(lambda x: brute("lk_lambda", x, p_full, detach_lambda=True), z)
    _, g_attached = grad_of(lambda x: brute("lk_lambda", x, p_full, detach_lambda=False), z)
    assert torch.allclose(g, g_detached, atol=1e-12)
    assert (g - g_attached).abs().max() > 1e-4
    res = compute_loss("lk_lambda", z.requires_grad_(), DenseTarget(logits=t), eta=3.0)
    assert not res.lam.requires_grad
    assert math.isclose(float(res.lam), math.exp(-3.0 * float(res.alpha_mean)), rel_tol=1e-12)
    assert compute_loss("kl", z, DenseTarget(logits=t)).lam is None


def test_eta_limits_are_kl_and_tv():
    z, t = rand_case()
    target = DenseTarget(logits=t)
    for eta, ref_name in ((0.0, "kl"), (1e6, "tv")):
        loss, grad = grad_of(lambda x: compute_loss("lk_lambda", x, target, eta=eta).loss, z)
        ref, ref_grad = grad_of(lambda x: compute_loss(ref_name, x, target).loss, z)
        assert torch.allclose(loss, ref, atol=1e-12) and torch.allclose(grad, ref_grad, atol=1e-12)


# ------------------------------------------------------------------------------ top-k targets
@pytest.mark.parametrize("tail", ["bucket", "drop"])
@pytest.mark.parametrize("mapped", [False, True])
def test_sparse_with_k_equal_v_equals_dense(tail, mapped):
    z, t = rand_case(v=10)
    vocab_map = None
    if mapped:
        _, t = rand_case(v=16, seed=2)
        vocab_map = torch.tensor([15, 3, 0, 8, 9, 1, 12, 6, 4, 11])
    dense, sparse = DenseTarget(logits=t), topk_target(t, t.shape[1])
    for name in LOSS_NAMES:
        ref, ref_grad = grad_of(lambda x: compute_loss(name, x, dense, vocab_map=vocab_map).loss, z)
        loss, grad = grad_of(lambda x: compute_loss(name, x, sparse, tail=tail, vocab_map=vocab_map).loss, z)
        assert torch.allclose(loss, ref, atol=1e-12), (name, loss.item(), ref.item())
        assert torch.allclose(grad, ref_grad, atol=1e-12)
    # fp32: Σ_k p rounds to 1 ± 1e-7, which must not open a phantom tail (Q = 0, r > 0)
    sparse32 = SparseTarget(ids=sparse.ids, logprobs=sparse.logprobs.float())
    for name in LOSS_NAMES:
        ref = compute_loss(name, z.float(), DenseTarget(logits=t.float()), vocab_map=vocab_map).loss
        loss = compute_loss(name, z.float(), sparse32, tail=tail, vocab_map=vocab_map).loss
        assert torch.allclose(loss, ref, atol=1e-5), (name, loss.item(), ref.item())


@pytest.mark.parametrize("k", [1, 4, 16, 60])
def test_topk_alpha_bounds_and_bucket_kl_below_true_kl(k):
    g = torch.Generator().manual_seed(k)
    n, v = 64, 64
    z = torch.randn(n, v, generator=g, dtype=F64) * torch.rand(n, 1, generator=g, dtype=F64) * 4
    t = torch.randn(n, v, generator=g, dtype=F64) * torch.rand(n, 1, generator=g, dtype=F64) * 4
    p = torch.softmax(t, -1)
    q = torch.softmax(z, -1)
    alpha_true = torch.minimum(p, q).sum(-1)
    kl_true = (p * (p.log() - q.log())).sum(-1)
    sparse = topk_target(t, k)
    drop = compute_loss("kl", z, sparse, tail="drop")
    bucket = compute_loss("kl", z, sparse, tail="bucket")
    eps = 1e-12
    assert (drop.alpha <= alpha_true + eps).all() and (alpha_true <= bucket.alpha + eps).all()
    assert (bucket.kl <= kl_true + eps).all()
    assert (bucket.alpha - drop.alpha).max() > 1e-3  # the bounds differ: the test could fail
    # drop: exactly the sums over the cached ids with their raw probabilities
    ids, pk = sparse.ids, sparse.logprobs.exp()
    qk = q.gather(1, ids)
    assert torch.allclose(drop.alpha, torch.minimum(pk, qk).sum(-1), atol=1e-12)
    assert torch.allclose(drop.kl, (pk * (pk.log() - qk.log())).sum(-1), atol=1e-12)
    # bucket: exact KL and α of the distributions coarsened to (K, tail)
    r, tail_q = 1 - pk.sum(-1), 1 - qk.sum(-1)
    assert torch.allclose(bucket.alpha, drop.alpha + torch.minimum(r, tail_q), atol=1e-12)
    assert torch.allclose(bucket.kl, drop.kl + r * (r.log() - tail_q.log()), atol=1e-9)


def test_vocab_map_hand_computed_example():
    # target vocab {0,1,2,3}, p = (.4, .3, .2, .1); the draft knows target ids 0, 2, 3 (d2t)
    vocab_map = torch.tensor([0, 2, 3])
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=F64)
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)
    z = q.log()
    # dense: α and TV against the un-renormalized target on {0,2,3}; KL against p renormalized by .7
    res = compute_loss("tv", z, DenseTarget(probs=p), vocab_map=vocab_map)
    assert math.isclose(float(res.alpha[0]), 0.4 + 0.2 + 0.1, abs_tol=1e-12)  # not (4+2+1)/7-based
    assert math.isclose(res.loss.item(), 0.3, abs_tol=1e-12)
    kl = sum(pt * math.log(pt / qt) for pt, qt in zip((4 / 7, 2 / 7, 1 / 7), (0.5, 0.3, 0.2)))
    assert math.isclose(float(res.kl[0]), kl, abs_tol=1e-12)
    # top-2 cache holds ids 0 (p=.4) and 1 (p=.3, not in the draft vocab); tail r = .3
    sparse = SparseTarget(ids=torch.tensor([[0, 1]]), logprobs=torch.tensor([[0.4, 0.3]], dtype=F64).log())
    m = 0.4 + 0.3  # = 1 − cached mass outside the draft vocab
    bucket = compute_loss("kl", z, sparse, tail="bucket", vocab_map=vocab_map)
    assert math.isclose(float(bucket.alpha[0]), 0.4 + min(0.3, 0.5), abs_tol=1e-12)
    kl_bucket = (0.4 / m) * math.log((0.4 / m) / 0.5) + (0.3 / m) * math.log((0.3 / m) / 0.5)
    assert math.isclose(float(bucket.kl[0]), kl_bucket, abs_tol=1e-12)
    drop = compute_loss("kl", z, sparse, tail="drop", vocab_map=vocab_map)
    assert math.isclose(float(drop.alpha[0]), 0.4, abs_tol=1e-12)
    assert math.isclose(float(drop.kl[0]), (0.4 / m) * math.log((0.4 / m) / 0.5), abs_tol=1e-12)


# ------------------------------------------------------------------------------------ numerics
def test_no_nan_when_alpha_is_zero():
    v = 16
    # fully underflowed draft: all mass on id 0 (others e^-1000 = 0 in bf16/fp32); target on id 1
    z = torch.full((3, v), -1000.0)
    z[:, 0] = 0.0
    z = z.to(torch.bfloat16)
    point = torch.zeros(3, v)
    point[:, 1] = 1.0
    # disjoint supports with −inf draft logits under the target's mass
    z_inf = torch.zeros(3, v)
    z_inf[:, 1:4] = -math.inf
    padded = SparseTarget(ids=torch.zeros(3, 4, dtype=torch.long), logprobs=torch.full((3, 4), -math.inf))
    no_mass = DenseTarget(probs=torch.zeros(3, v))
    cases = [
        (z, DenseTarget(probs=point), "bucket"),
        (z, SparseTarget(ids=torch.tensor([[1]] * 3), logprobs=torch.zeros(3, 1)), "drop"),
        (z, SparseTarget(ids=torch.tensor([[1]] * 3), logprobs=torch.zeros(3, 1)), "bucket"),
        (z_inf, DenseTarget(probs=point), "bucket"),
        (z_inf, SparseTarget(ids=torch.tensor([[1, 2]] * 3), logprobs=torch.full((3, 2), 0.5).log()), "bucket"),
        (z, padded, "drop"),  # padded rows: no target mass at all
        (z, no_mass, "bucket"),
    ]
    for logits, target, tail in cases:
        for name in LOSS_NAMES:
            x = logits.clone().requires_grad_()
            res = compute_loss(name, x, target, tail=tail)
            res.loss.backward()
            assert torch.isfinite(res.loss) and torch.isfinite(res.kl).all(), (name, tail)
            assert torch.isfinite(x.grad.float()).all(), (name, tail)
            if name in ("tv", "lk_alpha"):
                assert float(res.alpha.max()) == 0.0
            if name == "lk_alpha":  # log(where(α>0, α, 1)): nothing to learn from α = 0
                assert res.loss.item() == 0.0
    # bucket mode on an all-padding row: one category (the tail) on both sides, α = 1, KL = 0
    x = z.clone().requires_grad_()
    res = compute_loss("lk_lambda", x, padded, tail="bucket")
    res.loss.backward()
    assert torch.equal(res.alpha, torch.ones(3)) and torch.equal(res.kl, torch.zeros(3))
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_underflowed_draft_tail_is_computed_in_log_space():
    """Bucket tail Q ≈ e^-100: below fp32's range; fp32 must agree with fp64 (exact fast path)."""
    v = 40
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, v, generator=g, dtype=F64) - 100.0
    ids = torch.tensor([[0, 1, 2]] * 4)
    z[:, :3] = torch.randn(4, 3, generator=g, dtype=F64)
    target = SparseTarget(ids=ids, logprobs=torch.tensor([[0.5, 0.2, 0.1]] * 4, dtype=F64).log())
    for name in ("kl", "lk_lambda"):
        ref, ref_grad = grad_of(lambda x: compute_loss(name, x, target).loss, z)
        loss, grad = grad_of(lambda x: compute_loss(name, x, target).loss, z.float())
        assert torch.isfinite(grad).all()
        assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
        assert torch.allclose(grad.double(), ref_grad, atol=1e-6)
        assert ref_grad[:, 3:].abs().max() > 1e-3  # the tail gradient matters here


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_exp_flushed_is_exp_or_zero_below_the_normal_range(dtype):
    x = torch.cat([torch.linspace(-800.0, 20.0, 20001, dtype=dtype),
                   torch.tensor([-math.inf, math.inf, math.nan], dtype=dtype)])
    expected = torch.exp(x)
    out = exp_flushed_(x.clone())
    kept = out != 0
    assert torch.equal(out[kept & ~x.isnan()], expected[kept & ~x.isnan()])  # bit-identical where kept
    assert out[-1].isnan() and out[-2] == math.inf and out[-3] == 0
    flushed = expected[~kept]
    assert flushed.max() < 5 * torch.finfo(dtype).tiny  # only (near-)subnormal results become 0
    assert (expected[kept & ~x.isnan()] >= torch.finfo(dtype).tiny).all()
    y = x.clone()
    assert exp_flushed_(y) is y  # in place


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_widely_spread_logits_agree_with_fp64(name):
    """Logits 100s apart (a draft trained with LK^α spreads that far): fp32, with its flushed exps, vs fp64."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 300, generator=g, dtype=F64) * 60.0
    z[:, :4] = torch.randn(8, 4, generator=g, dtype=F64) * 2.0 + z.max()  # the mass sits on a few ids
    t = torch.randn(8, 300, generator=g, dtype=F64) * 3.0
    t[:, :4] += 8.0  # ... where most of the target's mass is too (α stays within fp32's range)
    assert (torch.log_softmax(z.float(), -1) < math.log(torch.finfo(torch.float32).tiny)).float().mean() > 0.3
    for target, tail in ((topk_target(t, 16), "bucket"), (topk_target(t, 16), "drop"), (DenseTarget(logits=t), "bucket")):
        ref, ref_grad = grad_of(lambda x: compute_loss(name, x, target, tail=tail).loss, z)
        loss, grad = grad_of(lambda x: compute_loss(name, x, target, tail=tail).loss, z.float())
        assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5), (name, tail)
        assert torch.allclose(grad.double(), ref_grad, atol=1e-6), (name, tail)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_masked_batch_is_zero_with_zero_grads(name):
    z = torch.full((4, 9), math.nan).requires_grad_()  # masked rows may hold anything
    t = torch.randn(4, 9)
    res = compute_loss(name, z, DenseTarget(logits=t), torch.zeros(4, dtype=torch.bool))
    res.loss.backward()
    assert res.loss.item() == 0.0 and float(res.alpha_mean) == 0.0 and int(res.n_valid) == 0
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("case", ["dense_logits", "topk_bucket", "topk_drop", "topk_map_bucket"])
def test_masked_positions_contribute_nothing(case):
    target, tail, vocab_map = make_target(case, n=6)
    z, _ = rand_case(n=6, v=8, seed=5)
    z[2] = math.nan  # a masked row's logits must not leak anywhere
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    keep = mask.nonzero().squeeze(-1)
    if isinstance(target, DenseTarget):
        sub = DenseTarget(logits=target.logits[keep])
    else:
        sub = SparseTarget(ids=target.ids[keep], logprobs=target.logprobs[keep])
    for name in LOSS_NAMES:
        loss, grad = grad_of(lambda x: compute_loss(name, x, target, mask, tail=tail, vocab_map=vocab_map).loss, z)
        ref, ref_grad = grad_of(lambda x: compute_loss(name, x, sub, tail=tail, vocab_map=vocab_map).loss, z[keep])
        assert torch.allclose(loss, ref, atol=1e-12)
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
        assert torch.allclose(grad[keep], ref_grad, atol=1e-12)


@pytest.mark.parametrize("case", ["dense_logits", "dense_map", "topk_bucket", "topk_drop", "topk_padded_bucket"])
def test_chunked_equals_unchunked(case):
    target, tail, vocab_map = make_target(case, n=7)
    z, _ = rand_case(n=7, v=8, seed=6, dtype=torch.float32)
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    for name in ("lk_alpha", "lk_lambda"):
        results = []
        for chunk in (1, 3, 7):
            x = z.clone().requires_grad_()
            res = compute_loss(name, x, target, mask, tail=tail, vocab_map=vocab_map, chunk_size=chunk)
            res.loss.backward()
            results.append((res.loss.detach(), res.alpha, x.grad))
        for loss, alpha, grad in results[:2]:
            assert torch.allclose(loss, results[2][0], atol=1e-6)
            assert torch.allclose(alpha, results[2][1], atol=1e-6)
            assert torch.allclose(grad, results[2][2], atol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_logits_match_fp32_maths(masked):
    z, t = rand_case(n=8, v=50, dtype=torch.float32)
    zb = z.to(torch.bfloat16)
    sparse = topk_target(t, 8)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1]) if masked else None
    for target in (DenseTarget(logits=t), sparse):
        for name in LOSS_NAMES:
            ref, ref_grad = grad_of(lambda x: compute_loss(name, x, target, mask).loss, zb.float())
            loss, grad = grad_of(lambda x: compute_loss(name, x, target, mask).loss, zb)
            assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
            assert torch.allclose(loss, ref, atol=1e-6)
            assert torch.allclose(grad.float(), ref_grad, atol=1e-2, rtol=1e-2)


def test_leading_dimensions_and_result_fields():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 10, generator=g).requires_grad_()
    t = torch.randn(2, 3, 10, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    res = compute_loss("lk_lambda", z, DenseTarget(logits=t), mask)
    flat = compute_loss("lk_lambda", z.detach().reshape(6, 10), DenseTarget(logits=t.reshape(6, 10)),
                        mask.reshape(6))
    assert res.alpha.shape == (2, 3) and res.kl.shape == (2, 3)
    assert res.alpha[0, 2] == 0 and not res.alpha.requires_grad and not res.alpha_mean.requires_grad
    assert int(res.n_valid) == 4
    assert torch.allclose(res.loss, flat.loss) and torch.allclose(res.alpha_mean, res.alpha[mask.bool()].mean())
    assert torch.allclose(res.kl_mean, res.kl[mask.bool()].mean())
    assert res.loss.requires_grad and res.loss.dim() == 0


def test_bad_arguments_are_rejected_with_clear_messages():
    z, t = rand_case(v=5)
    with pytest.raises(ValueError, match="kl, tv, lk_alpha, lk_lambda"):
        compute_loss("ce", z, DenseTarget(logits=t))
    with pytest.raises(ValueError, match="bucket, drop"):
        compute_loss("kl", z, topk_target(t, 2), tail="spread")
    with pytest.raises(ValueError, match="exactly one"):
        DenseTarget(logits=t, probs=t)
    with pytest.raises(ValueError, match="vocab_map"):
        compute_loss("kl", z, DenseTarget(logits=torch.randn(6, 7, dtype=F64)))
    with pytest.raises(ValueError, match="distinct"):
        compute_loss("kl", z, DenseTarget(logits=t), vocab_map=torch.tensor([0, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match="positions"):
        compute_loss("kl", z, DenseTarget(logits=t[:3]))
    with pytest.raises(ValueError, match="draft vocabulary"):
        compute_loss("kl", z, SparseTarget(ids=torch.full((6, 1), 7), logprobs=torch.zeros(6, 1)))
    with pytest.raises(ValueError, match="eta"):
        compute_loss("lk_lambda", z, DenseTarget(logits=t), eta=-1.0)


# ----------------------------------------------------------------------------- multi-step helpers
def test_combine_steps_and_expected_tau():
    z, t = rand_case()
    target = DenseTarget(logits=t)
    zs = [z.clone().requires_grad_() for _ in range(3)]
    steps = [compute_loss("lk_lambda", zi * (i + 1), target) for i, zi in enumerate(zs)]
    total = combine_steps(steps, gamma=0.8)
    expected = steps[0].loss + 0.8 * steps[1].loss + 0.64 * steps[2].loss
    assert torch.allclose(total, expected)
    total.backward()
    assert all(zi.grad is not None for zi in zs)
    assert len({float(s.lam) for s in steps}) == 3  # λ per step, from that step's ᾱ
    assert math.isclose(expected_tau([0.8, 0.5, 0.25]), 1 + 0.8 + 0.4 + 0.1)
    assert math.isclose(expected_tau(torch.tensor([0.5, 0.5])), 1.75)
    assert expected_tau([]) == 1.0
