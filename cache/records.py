"""What a cache holds: one SequenceRecord per sequence, one ShardInfo per committed shard."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from cache.errors import CacheError

# Log-probs may exceed a normalized distribution by this much in log space (fp16 rounding of
# a whole-vocabulary top-k); anything more means the values are not normalized over the vocabulary.
LOGSUMEXP_TOLERANCE = 1e-2


@dataclass
class SequenceRecord:
    """One tokenized sequence with the target's top-k log-probs at every trained position."""

    sample_id: str
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    topk_ids: np.ndarray  # int32 [P, k], P = count of t >= 1 with loss_mask[t]
    topk_logprobs: np.ndarray  # float32 [P, k], normalized over the full vocabulary, descending
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [T, dim]

    @property
    def num_positions(self) -> int:
        """P: the number of trained positions (t >= 1 with loss_mask[t])."""
        return int(np.count_nonzero(self.loss_mask[1:]))


@dataclass(frozen=True)
class ShardInfo:
    """What a writer committed for one shard: its files (per column group), checksums and counts."""

    index: int
    files: dict[str, str]
    sha256: dict[str, str]
    bytes: dict[str, int]
    num_sequences: int
    num_positions: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy."""
        return {f.name: _copy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardInfo:
        """Parse to_dict() output; raises CacheError on missing or unknown keys."""
        expected = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != expected:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise CacheError(f"shard info must have keys {sorted(expected)}, got {got}")
        return cls(**{name: _copy(value) for name, value in data.items()})


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


def validate_record(record: SequenceRecord, *, k: int, vocab_size: int, feature_dims: dict[str, int]) -> None:
    """Raise CacheError naming the sample and field unless the record fits a cache with these settings."""
    sid = record.sample_id
    if not isinstance(sid, str) or not sid:
        raise CacheError(f"record sample_id must be a non-empty string, got {sid!r}")

    def fail(field_name: str, problem: str) -> None:
        raise CacheError(f"record {sid!r}: {field_name}: {problem}")

    input_ids = _array(record.input_ids, "input_ids", "integer", fail)
    if input_ids.ndim != 1 or input_ids.size == 0:
        fail("input_ids", f"must have shape [T] with T >= 1, got {list(input_ids.shape)}")
    _check_ids(input_ids, vocab_size, "input_ids", fail)
    num_tokens = input_ids.shape[0]

    loss_mask = _array(record.loss_mask, "loss_mask", "bool", fail)
    if loss_mask.shape != (num_tokens,):
        fail("loss_mask", f"must have shape [{num_tokens}] like input_ids, got {list(loss_mask.shape)}")
    num_positions = record.num_positions

    topk_ids = _array(record.topk_ids, "topk_ids", "integer", fail)
    if topk_ids.shape != (num_positions, k):
        fail("topk_ids", f"must have shape [P={num_positions}, k={k}] (P = trained positions t >= 1), "
                         f"got {list(topk_ids.shape)}")
    _check_ids(topk_ids, vocab_size, "topk_ids", fail)
    if k > 1:
        repeated = np.flatnonzero((np.diff(np.sort(topk_ids, axis=1), axis=1) == 0).any(axis=1))
        if repeated.size:
            fail("topk_ids", f"row {repeated[0]} repeats a token id")

    logprobs = _array(record.topk_logprobs, "topk_logprobs", "float", fail)
    if logprobs.shape != (num_positions, k):
        fail("topk_logprobs", f"must have shape [P={num_positions}, k={k}], got {list(logprobs.shape)}")
    _check_logprobs(logprobs.astype(np.float64), fail)

    if set(record.features) != set(feature_dims):
        fail("features", f"must be exactly {sorted(feature_dims)}, got {sorted(record.features)}")
    for name, dim in feature_dims.items():
        values = _array(record.features[name], f"features[{name!r}]", "float", fail)
        if values.shape != (num_tokens, dim):
            fail(f"features[{name!r}]", f"must have shape [{num_tokens}, {dim}], got {list(values.shape)}")
        if not np.isfinite(values).all():
            fail(f"features[{name!r}]", "contains NaN or inf")


_KINDS = {"integer": "iu", "bool": "b", "float": "f"}


def _array(value: Any, name: str, kind: str, fail) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        fail(name, f"must be a numpy array, got {type(value).__name__}")
    if value.dtype.kind not in _KINDS[kind]:
        fail(name, f"must have a {kind} dtype, got {value.dtype}")
    return value


def _check_ids(ids: np.ndarray, vocab_size: int, name: str, fail) -> None:
    bad = np.flatnonzero(((ids < 0) | (ids >= vocab_size)).reshape(-1))
    if bad.size:
        fail(name, f"id {ids.reshape(-1)[bad[0]]} at flat index {bad[0]} is outside [0, {vocab_size})")


def _check_logprobs(logprobs: np.ndarray, fail) -> None:
    # [P, k] float64
    rows = np.flatnonzero(~np.isfinite(logprobs).all(axis=1))
    if rows.size:
        fail("topk_logprobs", f"row {rows[0]} contains NaN or inf")
    rows = np.flatnonzero((logprobs > 0).any(axis=1))
    if rows.size:
        fail("topk_logprobs", f"row {rows[0]} has a log-prob > 0")
    rows = np.flatnonzero((np.diff(logprobs, axis=1) > 0).any(axis=1))
    if rows.size:
        fail("topk_logprobs", f"row {rows[0]} is not sorted by descending probability")
    if logprobs.size:
        top = logprobs[:, :1]
        logsumexp = top[:, 0] + np.log(np.exp(logprobs - top).sum(axis=1))
        rows = np.flatnonzero(logsumexp > LOGSUMEXP_TOLERANCE)
        if rows.size:
            fail("topk_logprobs", f"row {rows[0]} has total probability {np.exp(logsumexp[rows[0]]):.4f} > 1: "
                                  "log-probs must be normalized over the full vocabulary")
