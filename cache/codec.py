"""Array <-> bytes transforms that make token ids, log-probs and features compress well under zstd.

Every multi-byte integer stream is split into little-endian byte planes (all low bytes, then all
next bytes, ...), so zstd sees the near-constant high bytes of token ids as long runs. Log-probs
of a row are sorted descending, so the bit patterns of their magnitudes (fp16 or fp32) are
non-decreasing along k: we store the first pattern and the small non-negative deltas.

Top-k ids are stored as ranks in a per-shard id table (the shard's distinct top-k ids, most
frequent first), in one byte each for the T most frequent and an escape byte plus the remaining
low bytes for the rest: a few hundred ids (punctuation, common words) fill most top-k lists, and
zstd's order-0 coder then sees their skew instead of two near-uniform byte planes.
"""
from __future__ import annotations

import numpy as np

LOGPROB_DTYPES = {"fp16": np.float16, "fp32": np.float32}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 3: np.uint32, 4: np.uint32}
_FP16_MAX = float(np.finfo(np.float16).max)
# -(fp16 value) as float32 for every fp16 bit pattern: a table lookup beats numpy's fp16 conversion.
_NEGATED_FP16 = -np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def id_width(vocab_size: int) -> int:
    """Bytes per token id: the fewest little-endian bytes that hold vocab_size - 1."""
    return max(1, (max(vocab_size - 1, 0).bit_length() + 7) // 8)


def to_planes(values: np.ndarray, width: int) -> bytes:
    """Unsigned integers (< 256**width) as `width` byte planes, lowest byte first."""
    itemsize = np.dtype(_UNSIGNED[width]).itemsize
    flat = np.ascontiguousarray(values.reshape(-1), dtype=f"<u{itemsize}")
    return flat.view(np.uint8).reshape(flat.size, itemsize)[:, :width].T.tobytes()


def from_planes(data: np.ndarray, width: int) -> np.ndarray:
    """Inverse of to_planes: uint8 planes -> 1-D unsigned integers (uint8/16/32 by width)."""
    planes = data.reshape(width, -1)
    dtype = _UNSIGNED[width]
    values = planes[0].astype(dtype)
    for j in range(1, width):
        values |= planes[j].astype(dtype) << (8 * j)
    return values


def encode_ids(ids: np.ndarray, width: int) -> bytes:
    """Token ids (any shape, values in [0, 256**width)) as byte planes."""
    return to_planes(ids.astype(np.uint32), width)


def decode_ids(data: np.ndarray, width: int) -> np.ndarray:
    """Byte planes -> int32 token ids, 1-D."""
    return from_planes(data, width).astype(np.int32)


def id_table(ids: np.ndarray) -> np.ndarray:
    """A shard's distinct top-k ids, most frequent first: by count class floor(log2 count), ascending within one."""
    distinct, counts = np.unique(np.asarray(ids).reshape(-1), return_counts=True)
    classes = np.floor(np.log2(counts)).astype(np.int64)
    return distinct[np.lexsort((distinct, -classes))].astype(np.int64)


def encode_id_table(table: np.ndarray, width: int) -> bytes:
    """An id_table as bytes: uint32 count of classes, each class's size, then per-class id deltas as byte planes."""
    table = np.asarray(table, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[table.size > 0], np.diff(table) <= 0]))  # where ids stop rising
    sizes = np.diff(np.append(starts, table.size))
    deltas = np.diff(table, prepend=np.int64(0))
    deltas[starts] = table[starts]  # each class restarts from 0
    header = np.array([sizes.size, *sizes], dtype="<u4").tobytes()
    return header + to_planes(deltas.astype(np.uint32), width)


def decode_id_table(data: np.ndarray, width: int) -> np.ndarray:
    """Inverse of encode_id_table: int64 ids [n]."""
    num_classes = int(data[:4].view("<u4")[0]) if data.size >= 4 else 0
    sizes = data[4:4 + 4 * num_classes].view("<u4").astype(np.int64)
    if data.size < 4 or sizes.size != num_classes:
        raise ValueError(f"id table of {data.size} bytes is truncated")
    planes = data[4 + 4 * num_classes:]
    if planes.size != width * int(sizes.sum()):
        raise ValueError(f"id table has {planes.size} bytes of ids, its classes say {int(sizes.sum())} ids")
    deltas = from_planes(planes, width).astype(np.int64)
    running = np.cumsum(deltas)
    starts = np.cumsum(sizes) - sizes
    return running - np.repeat(running[starts] - deltas[starts], sizes)


def escape_threshold(table_size: int, width: int) -> int:
    """T of encode_ranked_ids: ranks below T take one byte; the largest T whose escapes still reach every rank."""
    if table_size <= 256:
        return 256
    return 256 - -(-(table_size - 256) // (256 ** (width - 1) - 1))


def encode_ranked_ids(ranks: np.ndarray, table_size: int, width: int) -> bytes:
    """Ranks in a shard's id table: one byte each (r < T, or T + high part), then the escaped ranks' low bytes."""
    ranks = np.asarray(ranks, dtype=np.int64).reshape(-1)
    threshold = escape_threshold(table_size, width)
    escaped = ranks >= threshold
    over = ranks[escaped] - threshold
    shift = 8 * (width - 1)
    first = np.where(escaped, threshold + (np.maximum(ranks - threshold, 0) >> shift), ranks)
    rest = to_planes((over & ((1 << shift) - 1)).astype(np.uint32), width - 1) if width > 1 else b""
    return first.astype(np.uint8).tobytes() + rest


def decode_ranked_ids(data: np.ndarray, count: int, table: np.ndarray, width: int) -> np.ndarray:
    """Inverse of encode_ranked_ids and the table lookup: int32 token ids [count]."""
    threshold = escape_threshold(table.size, width)
    first = data[:count]
    escaped = np.flatnonzero(first >= threshold)
    if first.size != count or data.size != count + escaped.size * (width - 1):
        raise ValueError(f"{data.size} bytes do not hold {count} ranked ids with {escaped.size} escapes")
    table = table.astype(np.int32)
    one_byte = np.full(256, -1, dtype=np.int32)  # id of each one-byte rank; -1: an escape or outside the table
    one_byte[:min(threshold, table.size)] = table[:threshold]
    ids = np.take(one_byte, first)
    if escaped.size:
        low = from_planes(data[count:], width - 1).astype(np.int64)
        ids[escaped] = table[threshold + ((first[escaped].astype(np.int64) - threshold) << (8 * (width - 1))) + low]
    if ids.size and ids.min() < 0:
        raise ValueError(f"a rank is outside the id table of {table.size} ids")
    return ids  # (an escaped rank outside the table raised IndexError above)


def encode_mask(mask: np.ndarray) -> bytes:
    """A bool mask as packed bits."""
    return np.packbits(mask).tobytes()


def decode_mask(data: np.ndarray, length: int) -> np.ndarray:
    """Packed bits -> bool [length]."""
    return np.unpackbits(data, count=length).astype(bool)


def encode_logprobs(logprobs: np.ndarray, dtype: str) -> bytes:
    """Rows of descending log-probs [P, k] as byte planes of per-row deltas of |logprob| bit patterns."""
    magnitude = np.abs(logprobs)  # abs, not negate: log-prob 0.0 must map to +0.0
    if dtype == "fp16":
        magnitude = np.minimum(magnitude, _FP16_MAX)  # below -65504, probability is exactly 0
    bits = magnitude.astype(LOGPROB_DTYPES[dtype]).view(_UNSIGNED[_width(dtype)])
    deltas = np.diff(bits, axis=1, prepend=bits.dtype.type(0))  # >= 0: |logprob| rises along k
    return to_planes(deltas, _width(dtype))


def decode_logprobs(data: np.ndarray, k: int, dtype: str) -> np.ndarray:
    """Inverse of encode_logprobs: float32 [P, k]."""
    deltas = from_planes(data, _width(dtype)).reshape(-1, k)
    bits = np.cumsum(deltas, axis=1, dtype=np.uint32)  # uint32 accumulates faster than uint16
    return np.take(_NEGATED_FP16, bits) if dtype == "fp16" else -bits.view(np.float32)


def encode_bf16(values: np.ndarray) -> bytes:
    """Float features as byte planes of bfloat16 patterns (round to nearest even)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    return to_planes(rounded.astype(np.uint16), 2)


def decode_bf16(data: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of encode_bf16: float32 [T, dim]."""
    return (from_planes(data, 2).astype(np.uint32) << 16).view(np.float32).reshape(-1, dim)


def _width(dtype: str) -> int:
    return np.dtype(LOGPROB_DTYPES[dtype]).itemsize
