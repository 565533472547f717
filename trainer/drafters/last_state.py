"""What MEDUSA and the MLP speculator share: K steps over the target's final hidden state (the `last` column).

A `StepModel` drafts in K steps from h_t, the target's final hidden state (after the final norm) at
the position t that produced the newest committed token x_{t+1}:

    state_0 = start(h_t)
    state_n = advance(n, state_{n-1}, embed(n, token_n))    token_1 = x_{t+1}, token_n = the token step n−1 drafted
    logits_n = logits(n, state_n)                           step n proposes x_{t+n+1}

MEDUSA ignores the tokens (state_n = h_t, head n reads it); the MLP speculator mixes each token's
embedding into its state. Training teacher-forces token_n = x_{t+n} and scores step n at row t
against the target row of position t + n (base.step_rows); decoding keeps only h_t of the newest
committed position (`LastState`), so a rejection leaves nothing to roll back.

Both may draft over a reduced vocabulary (`draft_vocab=N`, the EAGLE-3 semantics): their heads then
output N rows, draft id i being target id `draft_ids[i]` (the N ids with the most cached target mass,
base.draft_vocabulary). Tokens fed back in (teacher-forced or drafted) are always target ids: the
decoder maps draft logits onto the target vocabulary (base.on_target_vocab) before proposing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trainer.drafters.base import (Drafter, DrafterError, DrafterMismatchError, DrafterSpec, DraftStep,
                                   DraftVocabulary, ExportFormatError, Family, Propose, SpecContext, WEIGHTS,
                                   on_target_vocab, shifted_tokens, step_rows)

LAST = -1  # hidden_states[-1]: the target's final hidden state after the final norm (the `last` column)


def draft_vocab_rows(vocab_size: int, draft_vocab_size: int) -> int:
    """A config's head rows: draft_vocab_size, or the whole vocabulary for 0 (ValueError outside 1..vocab_size)."""
    rows = draft_vocab_size or vocab_size
    if not 0 < rows <= vocab_size:
        raise ValueError(f"draft_vocab_size must be in 1..{vocab_size}, got {draft_vocab_size}")
    return rows


class StepModel(nn.Module):
    """A drafter that steps from the target's final hidden state (see the module docstring)."""

    num_steps: int
    config: Any  # its family's config: target_hidden_size, vocab_size (the target's), draft_vocab_size

    def __init__(self, config: Any, num_steps: int):
        super().__init__()
        self.config = config
        self.num_steps = num_steps
        # Draft id i is target id draft_ids[i] (vLLM MEDUSA's token_map).
        self.register_buffer("draft_ids", torch.arange(config.draft_vocab_size), persistent=True)

    @property
    def vocab_map(self) -> Tensor | None:
        """[V_draft] target ids of a reduced draft vocabulary, None when it is the target's."""
        return self.draft_ids if self.config.draft_vocab_size < self.config.vocab_size else None

    def set_draft_vocab(self, target_ids: Tensor) -> None:
        """Set the reduced vocabulary: target_ids [draft_vocab_size] ascending, distinct, < vocab_size."""
        ids = torch.as_tensor(target_ids, dtype=torch.long).view(-1)
        if ids.numel() != self.config.draft_vocab_size:
            raise ValueError(f"draft vocabulary needs {self.config.draft_vocab_size} ids, got {ids.numel()}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size or (ids[1:] <= ids[:-1]).any():
            raise ValueError("draft vocabulary ids must be ascending, distinct and < vocab_size")
        self.draft_ids.copy_(ids)

    def start(self, hidden: Tensor) -> Tensor:  # pragma: no cover - interface
        """state_0 from the target's final hidden states [.., d_target]."""
        raise NotImplementedError

    def embed(self, step: int, tokens: Tensor) -> Tensor | None:
        """What advance() reads of token_n (step = n − 1, 0-based); None: the steps ignore their tokens."""
        return None

    def embed_teacher_forced(self, tokens: Tensor) -> list[Tensor | None]:
        """embed() of every step's token at once: tokens [K, ..] holds token_n of step n at index n − 1."""
        return [self.embed(step, step_tokens) for step, step_tokens in enumerate(tokens)]

    def advance(self, step: int, state: Tensor, embedded: Tensor | None) -> Tensor:  # pragma: no cover - interface
        """state_n from state_{n−1} and embed(n, token_n) (step = n − 1, 0-based)."""
        raise NotImplementedError

    def logits(self, step: int, state: Tensor) -> Tensor:  # pragma: no cover - interface
        """Step n's draft logits [.., V_draft] from state_n (step = n − 1, 0-based)."""
        raise NotImplementedError


def token_map(model: StepModel) -> dict[str, Tensor]:
    """An export's `token_map` tensor (int64 draft_ids) for a reduced draft vocabulary, nothing otherwise."""
    return {"token_map": model.draft_ids.long()} if model.vocab_map is not None else {}


def load_token_map(model: StepModel, tensors: dict[str, Tensor], model_dir: Path) -> None:
    """Pop an export's `token_map` from tensors into the model's draft vocabulary (ExportFormatError if invalid)."""
    ids = tensors.pop("token_map", None)
    if ids is not None:
        try:
            model.set_draft_vocab(ids)
        except ValueError as exc:
            raise ExportFormatError(f"{Path(model_dir) / WEIGHTS}: token_map: {exc}") from None


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
        tokens = torch.stack([shifted_tokens(batch["input_ids"], n) for n in range(1, self.num_steps + 1)])
        embedded = model.embed_teacher_forced(tokens)  # step n at row t reads token x_{t+n}
        steps = []
        for n in range(1, self.num_steps + 1):
            state = model.advance(n - 1, state, embedded[n - 1])
            rows, row_batch, row_pos = step_rows(batch["target_batch"], batch["target_pos"], n)
            steps.append(DraftStep(model.logits(n - 1, state[row_batch, row_pos]), rows))  # only these reach a head
        return steps


@dataclass
class LastState:
    """Decoding state: the target's final hidden state [1, d] at the position that produced the newest token."""

    state: Tensor | None = None  # None until the target has read the prompt


class LastStateFamily(Family):
    """Spec, build, decoding hooks and target checks of the StepModel families."""

    columns = ("last",)
    model_class: ClassVar[type[StepModel]] = StepModel
    config_class: ClassVar[type] = object  # the model's config dataclass
    drafter_class: ClassVar[type[StepDrafter]] = StepDrafter

    # --- training -------------------------------------------------------------------------------
    def last_width(self, context: SpecContext) -> int:
        """The width of the cache's `last` column (CacheMismatchError when the target's hidden size differs)."""
        hidden = int(context.features["last"]["dim"])
        if context.target_config is not None and hidden != context.target_config.hidden_size:
            from cache import CacheMismatchError

            raise CacheMismatchError(f"the cache's last feature has dimension {hidden}, the target's hidden "
                                     f"size is {context.target_config.hidden_size}")
        return hidden

    def draft_vocab(self, options: dict[str, Any], context: SpecContext) -> DraftVocabulary | None:
        """The reduced vocabulary `draft_vocab=N` asks for (None: N absent or the whole vocabulary)."""
        size = options.get("draft_vocab", context.vocab_size)
        return context.vocabulary(size, f"--drafter {self.name}") if size != context.vocab_size else None

    def make_spec(self, drafter: str, config_kwargs: dict[str, Any], vocab: DraftVocabulary | None,
                  init_embeddings_path: str | None = None) -> DrafterSpec:
        """The DrafterSpec of a config (DrafterError naming --drafter for a bad one) over `vocab`."""
        try:
            config = self.config_class(**config_kwargs, draft_vocab_size=len(vocab.ids) if vocab else 0)
        except ValueError as exc:
            raise DrafterError(f"--drafter {self.name}: {exc}") from None
        return DrafterSpec(kind=self.name, label=drafter, source="config", hf_config=asdict(config),
                           init_embeddings_path=init_embeddings_path,
                           settings={"draft_vocab_mass": vocab.mass if vocab else None},
                           draft_vocab=vocab.ids if vocab else None)

    def build(self, spec: DrafterSpec) -> StepDrafter:
        model = self.model_class(self.config_class(**spec.hf_config))
        if spec.draft_vocab is not None:
            model.set_draft_vocab(torch.tensor(spec.draft_vocab, dtype=torch.long))
        self.initialize(model, spec)
        return self.drafter_class(model.float().train())

    def initialize(self, model: StepModel, spec: DrafterSpec) -> None:
        """Weights taken from the target after the draft vocabulary is set (none by default)."""

    # --- decoding -------------------------------------------------------------------------------

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
            state = model.advance(step, state, model.embed(step, token))
            token, q = propose(on_target_vocab(model.logits(step, state), model.vocab_map, vocab))
            drafts.append(token)
            draft_probs.append(q)
        return torch.cat(drafts), torch.cat(draft_probs)

    def commit(self, cache: LastState, states: Tensor) -> None:
        cache.state = states[-1:]
