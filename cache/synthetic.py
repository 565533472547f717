"""Synthetic records that look like a language model's top-k (Zipfian ids, peaked log-probs), for tests and benchmarks."""
from __future__ import annotations

import numpy as np

from cache.records import SequenceRecord

ZIPF_EXPONENT = 1.15
NOISE = 2.0  # std of the per-position logit noise on the plausible tokens
PEAK = (0.0, 14.0)  # range of the logit boost of the actual next token (how sure the model is)


def synthetic_records(num_sequences: int, *, vocab_size: int, k: int, seed: int = 0,
                      length: tuple[int, int] = (32, 256), feature_dims: dict[str, int] | None = None,
                      id_prefix: str = "synthetic") -> list[SequenceRecord]:
    """Deterministic records: a prompt, then a trained-on response with exact top-k of a Zipf-like distribution."""
    rng = np.random.default_rng(seed)
    # Logits by frequency rank: Zipf prior, noise on the `plausible` most frequent ranks only.
    plausible = min(vocab_size, 8 * k + 1024)
    prior = (-ZIPF_EXPONENT * np.log1p(np.arange(vocab_size))).astype(np.float32)
    tail_logsumexp = np.logaddexp.reduce(prior[plausible:].astype(np.float64)) if plausible < vocab_size else -np.inf
    zipf = np.exp(prior.astype(np.float64))
    # Token ids follow frequency only loosely (as BPE merge order does).
    rank_to_id = np.argsort(np.log1p(np.arange(vocab_size)) + rng.normal(0.0, 3.0, vocab_size), kind="stable")
    records = []
    for i in range(num_sequences):
        num_tokens = int(rng.integers(length[0], length[1] + 1))
        ranks = rng.choice(vocab_size, size=num_tokens, p=zipf / zipf.sum())
        loss_mask = np.arange(num_tokens) >= int(rng.integers(1, max(2, num_tokens // 2)))
        targets = np.flatnonzero(loss_mask[1:]) + 1  # positions t whose token is predicted at t - 1
        top_ranks, topk_logprobs = _topk(rng, prior, plausible, tail_logsumexp, ranks[targets], k)
        features = {name: rng.standard_normal((num_tokens, dim), dtype=np.float32)
                    for name, dim in (feature_dims or {}).items()}
        records.append(SequenceRecord(f"{id_prefix}:{i}", rank_to_id[ranks].astype(np.int32), loss_mask,
                                      rank_to_id[top_ranks].astype(np.int32), topk_logprobs, features))
    return records


def _topk(rng: np.random.Generator, prior: np.ndarray, plausible: int, tail_logsumexp: float,
          next_ranks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (ranks int64, log-probs float32 [P, k]) of prior + noise on plausible ranks + a next-token peak."""
    n = len(next_ranks)
    logits = prior[:plausible] + NOISE * rng.standard_normal((n, plausible), dtype=np.float32)
    seen = np.flatnonzero(next_ranks < plausible)  # a rare next token gets no peak: the model is surprised
    logits[seen, next_ranks[seen]] += rng.uniform(*PEAK, len(seen)).astype(np.float32)
    log_z = np.logaddexp(np.logaddexp.reduce(logits.astype(np.float64), axis=1), tail_logsumexp)
    # Ranks past `plausible` keep their decreasing prior, so only the first k of them can reach the top-k.
    extra = np.arange(plausible, min(plausible + k, len(prior)))
    candidates = np.concatenate([logits, np.broadcast_to(prior[extra], (n, len(extra)))], axis=1)
    candidate_ranks = np.concatenate([np.arange(plausible), extra])
    order = np.argsort(-candidates, axis=1, kind="stable")[:, :k]
    logprobs = (np.take_along_axis(candidates, order, axis=1) - log_z[:, None]).astype(np.float32)
    return candidate_ranks[order], np.minimum(logprobs, 0.0)
