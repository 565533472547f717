"""Exact speculative decoding (chain drafting, batch size 1) for Hugging Face causal LMs.

One target forward verifies K drafted tokens. At T = 0 a draft is accepted when it equals the
target's argmax; at T > 0 by rejection sampling (accept with min(1, p/q), otherwise resample from
the normalized max(0, p - q), and a bonus token from the target when all K are accepted). The output
is distributed exactly as the target's own sampling (identical to greedy decoding at T = 0).
The target keeps a KV cache that is cropped back to the accepted prefix after every step. What a
drafter does is its family's (trainer.drafters: new_cache, draft, commit): an independent causal
LM keeps its own KV cache; EAGLE-3, MEDUSA and the MLP speculator also read the target's hidden
states, which the verification forward returns for the positions it commits, so they draft nothing
before the target has read the prompt. Every tensor lives on the target's device (the drafter must
share it); random draws come from `generator` on its own device.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from trainer.drafters import family_of_model
from trainer.drafters.causal_lm import cache_length, forward, rollback
from trainer.losses import expected_tau


def speculative_generate(
    target,
    drafter,
    input_ids: torch.Tensor,
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Generate up to max_new_tokens tokens after input_ids; returns (new token ids [n], stats).

    `drafter=None` or `k=0` decodes with the target alone (the baseline, same code path).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = k if drafter is not None else 0
    device = target.device
    eos_ids = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=device).view(-1)
    tokens = torch.as_tensor(input_ids, dtype=torch.long).view(-1).to(device)  # [prompt + generated]
    prompt_len = tokens.numel()
    if prompt_len == 0:
        raise ValueError("input_ids must hold at least one token")
    target_cache = DynamicCache(config=target.config)
    draft_cache, layers = new_draft_cache(target, drafter)
    vocab = target.get_input_embeddings().num_embeddings  # drafts must be ids the target can read
    stats = new_stats(k)

    with torch.inference_mode():
        while tokens.numel() - prompt_len < max_new_tokens:
            # Never draft past max_new_tokens: a step yields at most k_step + 1 tokens.
            k_step = min(k, max_new_tokens - (tokens.numel() - prompt_len) - 1)
            drafts, draft_probs = draft(drafter, draft_cache, tokens, k_step, temperature, generator, vocab)
            n_drafts = drafts.numel()  # < k_step before the target has read the prompt, or past a drafter's K

            # One target forward scores the last committed token and every draft: [n_drafts + 1, V].
            rollback(target_cache, tokens.numel() - 1)
            verify_ids = torch.cat([tokens[cache_length(target_cache):], drafts])
            target_logits, features = forward(target, verify_ids, target_cache, n_drafts + 1, layers)
            target_probs = to_probs(target_logits, temperature)

            n_accepted, next_token = accept(target_probs, draft_probs, drafts, generator)
            if features is not None:  # the drafter reads the target states of the committed positions
                family_of_model(drafter).commit(draft_cache, features[:verify_ids.numel() - n_drafts + n_accepted])
            new_tokens = torch.cat([drafts[:n_accepted], next_token])
            tokens = torch.cat([tokens, new_tokens])
            record_step(stats, target_probs, draft_probs, n_drafts, n_accepted)

            if eos_ids.numel() and torch.isin(new_tokens, eos_ids).any():
                break

    output = tokens[prompt_len:prompt_len + max_new_tokens]
    if eos_ids.numel() and torch.isin(output, eos_ids).any():
        output = output[: int(torch.isin(output, eos_ids).nonzero()[0]) + 1]  # stop at eos, inclusive
    finish_stats(stats, output.numel(), cut=tokens.numel() - prompt_len - output.numel())
    return output, stats


# --- the drafter: its family's hooks (trainer.drafters.base.Family) -------------------------------

def new_draft_cache(target, drafter) -> tuple[Any, tuple[int, ...]]:
    """The drafter's empty decoding state and the target hidden_states indices it reads (checked against the target)."""
    if drafter is None:
        return None, ()
    family = family_of_model(drafter)
    family.check_target(drafter.config, target.config)
    return family.new_cache(drafter), family.target_layers(drafter)


def draft(drafter, cache, tokens: torch.Tensor, k: int, temperature: float, generator, vocab: int):
    """Draft up to k tokens after `tokens` (chain drafting); returns drafts [n] and their distributions [n, V].

    The drafter proposes from its distribution over the first `vocab` ids (the target's vocabulary);
    any proposal distribution keeps the output exact.
    """
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=tokens.device), None
    propose = functools.partial(propose_token, temperature=temperature, generator=generator)
    return family_of_model(drafter).draft(drafter, cache, tokens, k, propose, vocab)


def propose_token(logits: torch.Tensor, *, temperature: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a draft token from logits [1, V]: (token [1], the proposal distribution q [1, V])."""
    q = to_probs(logits, temperature)
    return sample(q, generator), q


# --- the maths ----------------------------------------------------------------------------------

def accept(target_probs, draft_probs, drafts, generator) -> tuple[int, torch.Tensor]:
    """Rejection sampling: the number of drafts accepted and the token the target adds after them.

    target_probs [k+1, V], draft_probs [k, V] (None when k = 0), drafts [k].
    """
    k = drafts.numel()
    if k == 0:
        return 0, sample(target_probs[:1], generator)
    target_probs, draft_probs = same_width(target_probs, draft_probs)
    rows = torch.arange(k, device=drafts.device)
    p, q = target_probs[rows, drafts], draft_probs[rows, drafts]
    accepted = uniform((k,), generator, p.device) * q < p  # u < p/q, i.e. with probability min(1, p/q)
    n_accepted = k if bool(accepted.all()) else int((~accepted).nonzero()[0])
    if n_accepted == k:  # bonus token from the target
        return k, sample(target_probs[k:], generator)
    residual = residual_distribution(target_probs[n_accepted], draft_probs[n_accepted])
    return n_accepted, sample(residual[None], generator)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution to resample from after a rejection: max(0, p - q), normalized."""
    residual = (p - q).clamp_min(0)
    total = residual.sum()
    return residual / total if total > 0 else p  # total = 0 only if p == q (rejection by rounding)


def to_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sampling distribution in fp32; at T = 0 the one-hot of the argmax (greedy)."""
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample(probs: torch.Tensor, generator) -> torch.Tensor:
    """One token per row of probs [n, V] -> [n], by inverting the fp64 CDF (also for unnormalized rows)."""
    cdf = probs.double().cumsum(-1)
    u = uniform(cdf.shape[:-1] + (1,), generator, cdf.device, torch.float64) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # first id whose CDF exceeds u


def uniform(shape: tuple[int, ...], generator, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) draws from `generator` on its own device (CPU's default generator when None), moved to `device`."""
    source = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=source, dtype=dtype).to(device)


def same_width(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad p or q so both cover the same vocabulary (models may pad their embedding rows)."""
    width = max(p.shape[-1], q.shape[-1])
    if p.shape[-1] == q.shape[-1]:
        return p, q
    return F.pad(p, (0, width - p.shape[-1])), F.pad(q, (0, width - q.shape[-1]))


# --- statistics ---------------------------------------------------------------------------------

def new_stats(k: int) -> dict:
    """Empty counters for a run drafting k tokens per step."""
    return {
        "k": k,
        "target_forwards": 0,
        "drafted": 0,
        "accepted": 0,
        "accepted_by_position": [0] * k,  # draft position i accepted
        "reached_by_position": [0] * k,  # draft position i verified with every earlier one accepted
        "alpha_sum_by_position": [0.0] * k,  # sum over steps of alpha_i = sum_v min(p_v, q_v)
        "verified_by_position": [0] * k,  # steps in which position i was drafted and verified
    }


def record_step(stats: dict, target_probs, draft_probs, k_step: int, n_accepted: int) -> None:
    """Add one verification step to the counters (finish_stats may still cut the last one at an EOS)."""
    alphas = []
    if k_step:
        target_probs, draft_probs = same_width(target_probs[:k_step], draft_probs)
        alphas = torch.minimum(target_probs, draft_probs).sum(-1).tolist()  # [k_step]
    stats["target_forwards"] += 1
    count_drafts(stats, alphas, n_accepted)
    stats["last_step"] = {"alphas": alphas, "accepted": n_accepted}


def count_drafts(stats: dict, alphas: list[float], n_accepted: int, sign: int = 1) -> None:
    """Add (sign 1) or take back (sign -1) one step's drafts: len(alphas) verified, the first n_accepted accepted."""
    stats["drafted"] += sign * len(alphas)
    stats["accepted"] += sign * n_accepted
    for i, alpha in enumerate(alphas):
        stats["alpha_sum_by_position"][i] += sign * alpha
        stats["verified_by_position"][i] += sign
    for i in range(min(n_accepted + 1, len(alphas))):
        stats["reached_by_position"][i] += sign
        stats["accepted_by_position"][i] += sign * int(i < n_accepted)


def finish_stats(stats: dict, new_tokens: int, cut: int) -> None:
    """Close the counters of a decode that output new_tokens tokens after dropping `cut` generated past an EOS.

    Only the last step can hold an EOS. When the EOS is one of its accepted drafts, the drafts after it
    are not part of the output: the step counts as if it had drafted up to the EOS and accepted all of it.
    """
    last = stats.pop("last_step", None)
    if cut and last is not None:
        kept = last["accepted"] + 1 - cut  # the step's accepted drafts up to and including the EOS
        if not 1 <= kept <= last["accepted"]:
            raise RuntimeError(f"{cut} tokens cut after an EOS, but the last step added {last['accepted'] + 1}")
        count_drafts(stats, last["alphas"], last["accepted"], sign=-1)
        count_drafts(stats, last["alphas"][:kept], kept)
    stats["new_tokens"] = new_tokens
    derive_taus(stats)


def derive_taus(stats: dict) -> None:
    """Set tau (tokens per target forward), tau_paper and expected_tau from the counters."""
    stats["tau"] = stats["new_tokens"] / max(stats["target_forwards"], 1)
    stats["tau_paper"] = paper_tau(stats)
    stats["expected_tau"] = measured_expected_tau(stats)


def paper_tau(stats: dict) -> float:
    """τ as the LK paper computes it, K·accepted/drafted + 1 over the run: about the mean tokens per drafting step.

    K is the number of draft positions ever verified: the decoder's k, or fewer for a drafter with fewer
    heads. Forwards that verify no draft (the baseline's, the first one over the prompt of a drafter that
    reads target states) do not count.
    """
    k = sum(1 for verified in stats["verified_by_position"] if verified)
    return k * stats["accepted"] / stats["drafted"] + 1 if stats["drafted"] else 1.0


def merge_stats(all_stats: list[dict]) -> dict:
    """Sum the counters of several runs (same k) and recompute tau, tau_paper, acceptance and expected tau."""
    merged = new_stats(all_stats[0]["k"])
    merged["new_tokens"] = 0
    for stats in all_stats:
        for key, value in stats.items():
            if isinstance(merged.get(key), list):
                merged[key] = [a + b for a, b in zip(merged[key], value)]
            elif key in ("target_forwards", "drafted", "accepted", "new_tokens"):
                merged[key] += value
    derive_taus(merged)
    return merged


def acceptance_by_position(stats: dict) -> list[float | None]:
    """Acceptance rate at each draft position, conditional on reaching it (None if never reached)."""
    return [a / r if r else None for a, r in zip(stats["accepted_by_position"], stats["reached_by_position"])]


def alpha_by_position(stats: dict) -> list[float | None]:
    """Mean exact acceptance probability alpha at each draft position (None if never verified)."""
    return [s / n if n else None for s, n in zip(stats["alpha_sum_by_position"], stats["verified_by_position"])]


def measured_expected_tau(stats: dict) -> float:
    """Expected acceptance length 1 + sum_k prod_{j<=k} alpha_j over the positions verified at least once."""
    alphas = alpha_by_position(stats)
    measured = alphas[:alphas.index(None)] if None in alphas else alphas
    return expected_tau(measured)
