"""Calls of a Hugging Face causal LM with a KV cache: the decoder's target and `independent` drafters.

`forward` also returns the target hidden states a drafter family reads (`Family.target_layers`):
`hidden_states[i]` is the input of decoder layer i, and `hidden_states[-1]` the final hidden state
after the final norm, the cache's `last` feature.
"""
from __future__ import annotations

import functools
import inspect

import torch


def forward(model, input_ids: torch.Tensor, cache, keep: int, layers: tuple[int, ...] = ()):
    """Run model on new tokens [n] with its KV cache: (logits of the last `keep` positions [keep, V],
    the hidden_states in `layers` concatenated for all n positions [n, len·d], None without layers)."""
    kwargs = {_cache_kwarg(type(model)): cache, "use_cache": True, "logits_to_keep": keep}
    outputs = model(input_ids.view(1, -1), output_hidden_states=bool(layers), **kwargs)
    features = target_features(outputs.hidden_states, layers) if layers else None
    return outputs.logits[0, -keep:], features


def target_features(hidden_states: tuple[torch.Tensor, ...], layers: tuple[int, ...]) -> torch.Tensor:
    """hidden_states[i] for i in layers, concatenated -> [T, len·d] (batch 1): the cache's feature layout."""
    return torch.cat([hidden_states[i][0] for i in layers], dim=-1)


def cache_length(cache) -> int:
    """Number of positions held in a KV cache."""
    return cache.get_seq_length()


def rollback(cache, length: int) -> None:
    """Crop a KV cache to its first `length` positions (no-op when it is already that short)."""
    excess = cache_length(cache) - length
    if excess > 0:
        cache.crop(-excess)


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class) -> str:
    """transformers >= 5.x names the KV-cache argument `cache`, earlier versions `past_key_values`."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
