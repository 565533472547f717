"""What MEDUSA and the MLP speculator share: K steps over the target's final hidden state (the `last` column).

A `StepModel` drafts in K steps from h_t, the target's final hidden state (after the final norm) at
the position t that produced the newest committed token x_{t+1}:

    state_0 = start(h_t)
    state_n = advance(n, state_{n-1}, token_n)    token_1 = x_{t+1}, token_n = the token step n−1 drafted
    logits_n = logits(n, state_n)                 step n proposes x_{t+n+1}

MEDUSA ignores the tokens (state_n = h_t, head n reads it); the MLP speculator mixes each token's
embedding into its state. Training teacher-forces token_n = x_{t+n} and scores step n at row t
against the target row of position t + n (base.step_rows); decoding keeps only h_t of the newest
committed position (`LastState`), so a rejection leaves nothing to roll back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from trainer.drafters.base import (Drafter, DrafterMismatchError, DraftStep, Family, Propose, on_target_vocab,
                                   shifted_tokens, step_rows)

LAST = -1  # hidden_states[-1]: the target's final hidden state after the final norm (the `last` column)


class StepModel(nn.Module):
    """Interface of a drafter that steps from the target's final hidden state (see the module docstring)."""

    num_steps: int
    config: object  # its family's config: target_hidden_size and vocab_size (the target's) among its fields

    @property
    def vocab_map(self) -> Tensor | None:  # pragma: no cover - interface
        """[V_draft] target ids of a reduced draft vocabulary, None when it is the target's."""
        raise NotImplementedError

    def start(self, hidden: Tensor) -> Tensor:  # pragma: no cover - interface
        """state_0 from the target's final hidden states [.., d_target]."""
        raise NotImplementedError

    def advance(self, step: int, state: Tensor, tokens: Tensor) -> Tensor:  # pragma: no cover - interface
        """state_n from state_{n−1} and token_n (step = n − 1, 0-based)."""
        raise NotImplementedError

    def logits(self, step: int, state: Tensor) -> Tensor:  # pragma: no cover - interface
        """Step n's draft logits [.., V_draft] from state_n (step = n − 1, 0-based)."""
        raise NotImplementedError


class StepDrafter(Drafter):
    """Training module of a StepModel: K steps, each scored against the target rows it predicts."""

    required_columns: ClassVar[tuple[str, ...]] = ("last",)

    def __init__(self, model: StepModel):
        super().__init__()
        self.model = model
        self.num_steps = model.num_steps

    @property
    def vocab_map(self) -> Tensor | None:  # type: ignore[override]
        return self.model.vocab_map

    def forward(self, batch: dict[str, Tensor]) -> list[DraftStep]:
        model = self.model
        dtype = next(model.parameters()).dtype
        state = model.start(batch["last"].to(dtype))  # [B, T, d]: h_t at every row t
        steps = []
        for n in range(1, self.num_steps + 1):
            state = model.advance(n - 1, state, shifted_tokens(batch["input_ids"], n))  # token x_{t+n}
            rows, row_batch, row_pos = step_rows(batch["target_batch"], batch["target_pos"], n)
            steps.append(DraftStep(model.logits(n - 1, state[row_batch, row_pos]), rows))  # only these reach a head
        return steps


@dataclass
class LastState:
    """Decoding state: the target's final hidden state [1, d] at the position that produced the newest token."""

    state: Tensor | None = None  # None until the target has read the prompt


class LastStateFamily(Family):
    """Decoding hooks and target checks of the StepModel families."""

    columns = ("last",)
    model_class: ClassVar[type[StepModel]] = StepModel

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)

    def check_target(self, config, target_config) -> None:
        problems = []
        if config.target_hidden_size != target_config.hidden_size:
            problems.append(f"target hidden size {target_config.hidden_size}, drafter expects "
                            f"{config.target_hidden_size}")
        if config.vocab_size != target_config.vocab_size:
            problems.append(f"target vocabulary {target_config.vocab_size}, drafter expects {config.vocab_size}")
        if problems:
            raise DrafterMismatchError(f"{self.name} drafter does not match the target: " + "; ".join(problems))

    def target_layers(self, model: nn.Module) -> tuple[int, ...]:
        return (LAST,)

    def new_cache(self, model: nn.Module) -> LastState:
        return LastState()

    def draft(self, model: nn.Module, cache: LastState, tokens: Tensor, k: int, propose: Propose,
              vocab: int) -> tuple[Tensor, Tensor | None]:
        if cache.state is None or k == 0:  # no target state before the target has read the prompt
            return torch.empty(0, dtype=torch.long, device=tokens.device), None
        state = model.start(cache.state.to(next(model.parameters()).dtype))
        token = tokens[-1:]  # x_{t+1}, sampled from the target at t
        drafts, draft_probs = [], []
        for step in range(min(k, model.num_steps)):
            state = model.advance(step, state, token)
            token, q = propose(on_target_vocab(model.logits(step, state), model.vocab_map, vocab))
            drafts.append(token)
            draft_probs.append(q)
        return torch.cat(drafts), torch.cat(draft_probs)

    def commit(self, cache: LastState, states: Tensor) -> None:
        cache.state = states[-1:]
