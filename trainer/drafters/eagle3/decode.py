"""EAGLE-3 decoding hooks: the drafter's KV cache and its K chained steps (called by eval/speculative.py).

The drafter's cache holds one step-1 row per committed target position t: the target's fused
hidden states at t, the token x_{t+1}, position id t (its keys/values, post-RoPE). A verification
that commits tokens up to x_{j+1} hands the target states of the newly committed positions to
`add_features` (the family's commit hook); `draft` appends their rows, the last of which (row j, predicting x_{j+2}) is draft
step 1. Draft step m > 1 reads the token step m - 1 drafted, step m - 1's pre-norm output as its
hidden state and position id j + m - 1, and attends to every step-1 row plus the chain's earlier
steps: the diagonal of the training-time-test mask. Chain rows are never stored, and a row is only
appended once its target state and next token are committed, so a rejection leaves nothing in the
cache to roll back. Proposals live on the draft vocabulary and are mapped to target ids through
`draft_ids`; the proposal distribution over the target vocabulary is zero outside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.drafters.base import DrafterMismatchError, Propose, on_target_vocab
from trainer.drafters.eagle3.model import Eagle3Config, Eagle3Model


class Eagle3MismatchError(DrafterMismatchError):
    """An EAGLE-3 drafter was trained for another target (hidden size, vocabulary or layers)."""


@dataclass
class Eagle3Cache:
    """The drafter's step-1 keys/values and the committed target states not yet appended as rows."""

    keys: Tensor | None = None  # [1, H_kv, rows, head_dim], post-RoPE; None before the first row
    values: Tensor | None = None
    features: Tensor | None = None  # [n, 3·d_target]: target states of positions rows .. rows + n - 1

    @property
    def rows(self) -> int:
        """Number of step-1 rows held (= committed target positions already appended)."""
        return 0 if self.keys is None else self.keys.shape[2]


def check_target(target_config, drafter_config: Eagle3Config) -> None:
    """Refuse a target whose hidden size, vocabulary or depth differs from what the drafter was trained on."""
    hidden, vocab = target_config.hidden_size, target_config.vocab_size
    layers = tuple(drafter_config.aux_layers)
    problems = []
    if drafter_config.target_hidden_size != hidden:
        problems.append(f"target hidden size {hidden}, drafter expects {drafter_config.target_hidden_size}")
    if drafter_config.vocab_size != vocab:
        problems.append(f"target vocabulary {vocab}, drafter expects {drafter_config.vocab_size}")
    if len(layers) != 3:
        problems.append(f"drafter fuses 3 target layers but records aux layers {list(layers)}")
    elif not all(0 <= i <= target_config.num_hidden_layers for i in layers):
        depth = target_config.num_hidden_layers
        problems.append(f"aux layers {list(layers)} do not exist in a target of {depth} layers "
                        f"(hidden_states 0..{depth})")
    if problems:
        raise Eagle3MismatchError("EAGLE-3 drafter does not match the target: " + "; ".join(problems))


def add_features(cache: Eagle3Cache, features: Tensor) -> None:
    """Queue the target states [n, 3·d] of newly committed positions (they follow the queued ones)."""
    cache.features = features if cache.features is None else torch.cat([cache.features, features])


def draft(model: Eagle3Model, cache: Eagle3Cache, tokens: Tensor, k: int, propose: Propose,
          vocab: int) -> tuple[Tensor, Tensor | None]:
    """Draft k tokens after `tokens`: (target ids [k], their distributions [k, vocab]); none before
    the target has read the prompt (no target states yet)."""
    if cache.features is None:
        return torch.empty(0, dtype=torch.long, device=tokens.device), None
    j = tokens.numel() - 2  # the last committed position with a target state
    logits, hidden = _append_rows(model, cache, tokens)
    keys, values = cache.keys, cache.values
    drafts, draft_probs = [], []
    for m in range(1, k + 1):
        token, q = propose(on_target_vocab(logits, model.draft_ids, vocab))
        drafts.append(token)
        draft_probs.append(q)
        if m == k:
            break
        visible = torch.ones(1, keys.shape[2] + 1, dtype=torch.bool, device=keys.device)
        position = torch.full((1, 1), j + m, dtype=torch.long, device=keys.device)
        step_logits, hidden, k_new, v_new = model.step(token.view(1, 1), hidden, position, (keys, values), visible)
        logits = step_logits[0]
        keys, values = torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2)
    return torch.cat(drafts), torch.cat(draft_probs)


def _append_rows(model: Eagle3Model, cache: Eagle3Cache, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Append step-1 rows for the queued target states; the last row's logits [1, Vd] and output [1, 1, d]."""
    start, features = cache.rows, cache.features
    end = start + features.shape[0]  # rows start .. end - 1 read tokens x_{start+1} .. x_end
    if end != tokens.numel() - 1:
        raise RuntimeError(f"EAGLE-3 cache out of step: {end} target states for {tokens.numel()} tokens")
    positions = torch.arange(start, end, device=features.device)[None]
    mask = torch.ones(end - start, end, dtype=torch.bool, device=features.device).tril(diagonal=start)
    prefix = None if cache.keys is None else (cache.keys, cache.values)
    logits, out, keys, values = model.step(tokens[start + 1:end + 1][None], model.fuse(features)[None],
                                           positions, prefix, mask)
    cache.keys = keys if cache.keys is None else torch.cat([cache.keys, keys], 2)
    cache.values = values if cache.values is None else torch.cat([cache.values, values], 2)
    cache.features = None
    return logits[0, -1:], out[:, -1:]

