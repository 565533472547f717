"""The losses read nothing back to the host per chunk: on a GPU each such read is a synchronization.

Host reads are counted with a real TorchDispatchMode over the real kernels: `.item()`/`bool()`/
`int()`/`float()` of a tensor (aten._local_scalar_dense), `nonzero` and boolean-mask indexing.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.losses import LOSS_NAMES, SparseTarget, compute_loss


class HostReads(TorchDispatchMode):
    """Counts the dispatched ops that need a tensor's values on the host."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        bool_index = name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name.startswith(("aten._local_scalar_dense", "aten.nonzero")) or bool_index:
            self.ops.append(name)
        return func(*args, **kwargs)


def _inputs(n: int = 64, v: int = 300, k: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=generator, requires_grad=True)
    ids = torch.stack([torch.randperm(v, generator=generator)[:k] for _ in range(n)])
    logprobs = torch.log_softmax(torch.randn(n, v, generator=generator), -1).gather(1, ids).sort(-1, True).values
    return logits, SparseTarget(ids, logprobs)


@pytest.mark.parametrize("tail", ["bucket", "drop"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_host_reads_do_not_grow_with_the_number_of_chunks(loss, tail):
    counts = {}
    for chunk in (4, 64):  # 16 chunks vs 1
        logits, target = _inputs()
        with HostReads() as forward:
            result = compute_loss(loss, logits, target, tail=tail, chunk_size=chunk)
        with HostReads() as backward:
            result.loss.backward()
        counts[chunk] = (len(forward.ops), len(backward.ops))
    assert counts[4] == counts[64], counts
    reads_forward, reads_backward = counts[4]
    assert reads_backward == 0
    # one read validates the target's ids; bucket mode reads once more whether any draft tail underflowed
    assert reads_forward == (2 if tail == "bucket" else 1)


def test_lambda_stays_a_tensor_on_the_logits_device():
    logits, target = _inputs()
    result = compute_loss("lk_lambda", logits, target)
    assert isinstance(result.lam, torch.Tensor) and result.lam.dim() == 0 and not result.lam.requires_grad
    assert torch.allclose(result.lam, torch.exp(-3.0 * result.alpha_mean))


def test_chunking_does_not_change_the_values_or_gradients():
    results = []
    for chunk in (4, 64):
        logits, target = _inputs(seed=1)
        result = compute_loss("lk_lambda", logits, target, chunk_size=chunk)
        result.loss.backward()
        results.append((result.loss.detach(), result.kl, result.alpha, logits.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
