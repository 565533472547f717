"""One shard's records <-> the bytes of its Arrow files (one core file, one file per feature)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from cache import codec
from cache.errors import CacheCorruptError
from cache.records import SequenceRecord
from cache.schema import (CORE, CORE_COLUMNS, CORE_FIELDS, CORE_ZSTD_LEVEL, FEATURE_COLUMN, FEATURE_FIELDS,
                          FEATURE_ZSTD_LEVEL, ID_TABLE_COLUMN, binary_column, read_ipc, read_ipc_column, write_ipc)


def encode_core(records: list[SequenceRecord], *, k: int, vocab_size: int, logprob_dtype: str) -> bytes:
    """Core file bytes: ids, loss mask and top-k targets of validated records, in order."""
    columns = core_columns(records, vocab_size=vocab_size, logprob_dtype=logprob_dtype)
    meta = {"group": CORE, "k": k, "vocab_size": vocab_size, "logprob_dtype": logprob_dtype}
    return write_ipc(CORE_FIELDS, meta, columns, CORE_ZSTD_LEVEL)


def core_columns(records: list[SequenceRecord], *, vocab_size: int, logprob_dtype: str) -> dict[str, list]:
    """The core file's column values, one per record; top-k ids are ranks in the shard's id table (row 0)."""
    width = codec.id_width(vocab_size)
    table = codec.id_table(np.concatenate([r.topk_ids.reshape(-1) for r in records] + [np.zeros(0, np.int64)]))
    ranks = np.zeros(vocab_size, dtype=np.int64)
    ranks[table] = np.arange(table.size)
    return {
        "sample_id": [r.sample_id for r in records],
        "num_tokens": [len(r.input_ids) for r in records],
        "num_positions": [r.num_positions for r in records],
        "input_ids": [codec.encode_ids(r.input_ids, width) for r in records],
        "loss_mask": [codec.encode_mask(r.loss_mask) for r in records],
        "topk_ids": [codec.encode_ranked_ids(ranks[r.topk_ids], table.size, width) for r in records],
        "topk_logprobs": [codec.encode_logprobs(r.topk_logprobs, logprob_dtype) for r in records],
        ID_TABLE_COLUMN: [codec.encode_id_table(table, width) if i == 0 else b"" for i in range(len(records))],
    }


def encode_feature(records: list[SequenceRecord], *, name: str, dim: int) -> bytes:
    """Feature file bytes: feature `name` [T, dim] of every record as bf16."""
    columns = {
        "sample_id": [r.sample_id for r in records],
        "num_tokens": [len(r.input_ids) for r in records],
        FEATURE_COLUMN: [codec.encode_bf16(r.features[name]) for r in records],
    }
    return write_ipc(FEATURE_FIELDS, {"group": name, "dim": dim, "dtype": "bf16"}, columns, FEATURE_ZSTD_LEVEL)


def iter_core(data: bytes, file_name: str, *, k: int, vocab_size: int) -> Iterator[SequenceRecord]:
    """Decode a core file row by row into records (without features)."""
    batch, meta = read_ipc(data, file_name, CORE_FIELDS, {"group": CORE, "k": k, "vocab_size": vocab_size})
    logprob_dtype = meta.get("logprob_dtype")
    if logprob_dtype not in codec.LOGPROB_DTYPES:
        raise CacheCorruptError(f"{file_name}: unknown logprob_dtype {logprob_dtype!r}")
    width = codec.id_width(vocab_size)
    sample_ids, num_tokens, num_positions = _row_fields(batch, "num_positions")
    columns = {name: binary_column(batch, name) for name in CORE_COLUMNS}
    table = _id_table(columns[ID_TABLE_COLUMN], file_name, vocab_size=vocab_size, width=width)
    for i, sample_id in enumerate(sample_ids):
        row = {name: values[offsets[i]:offsets[i + 1]] for name, (offsets, values) in columns.items()}
        tokens, positions = int(num_tokens[i]), int(num_positions[i])
        try:
            record = SequenceRecord(
                sample_id=sample_id,
                input_ids=codec.decode_ids(row["input_ids"], width),
                loss_mask=codec.decode_mask(row["loss_mask"], tokens),
                topk_ids=codec.decode_ranked_ids(row["topk_ids"], positions * k, table, width).reshape(positions, k),
                topk_logprobs=codec.decode_logprobs(row["topk_logprobs"], k, logprob_dtype),
            )
        except (ValueError, IndexError) as exc:
            raise CacheCorruptError(f"{file_name}: row {i} ({sample_id!r}) does not decode: {exc}") from None
        if len(record.input_ids) != tokens or record.topk_logprobs.shape[0] != positions \
                or record.num_positions != positions:
            raise CacheCorruptError(f"{file_name}: row {i} ({sample_id!r}) has inconsistent lengths")
        yield record


def core_counts(path: Path, *, k: int, vocab_size: int) -> tuple[int, int]:
    """(sequences, trained positions) of a core file, from its schema and num_positions column alone (no checksum)."""
    positions = read_ipc_column(path, CORE_FIELDS, {"group": CORE, "k": k, "vocab_size": vocab_size},
                                "num_positions")
    return len(positions), int(positions.sum(dtype=np.int64))


def _id_table(column: tuple[np.ndarray, np.ndarray], file_name: str, *, vocab_size: int, width: int) -> np.ndarray:
    """The shard's top-k id table from row 0 of its column (every other row empty), its ids within the vocabulary."""
    offsets, values = column
    if offsets.size < 2:
        return np.zeros(0, dtype=np.int64)
    if offsets[-1] != offsets[1]:
        raise CacheCorruptError(f"{file_name}: {ID_TABLE_COLUMN} is not empty after row 0")
    try:
        table = codec.decode_id_table(values[offsets[0]:offsets[1]], width)
    except ValueError as exc:
        raise CacheCorruptError(f"{file_name}: {ID_TABLE_COLUMN} does not decode: {exc}") from None
    if table.size and not (0 <= table.min() and table.max() < vocab_size):
        raise CacheCorruptError(f"{file_name}: {ID_TABLE_COLUMN} holds ids outside [0, {vocab_size})")
    return table


def iter_feature(data: bytes, file_name: str, *, name: str, dim: int) -> Iterator[tuple[str, np.ndarray]]:
    """Decode a feature file row by row into (sample_id, float32 [T, dim])."""
    batch, _ = read_ipc(data, file_name, FEATURE_FIELDS, {"group": name, "dim": dim, "dtype": "bf16"})
    sample_ids, num_tokens = _row_fields(batch)
    offsets, values = binary_column(batch, FEATURE_COLUMN)
    for i, sample_id in enumerate(sample_ids):
        row = values[offsets[i]:offsets[i + 1]]
        if row.size != 2 * int(num_tokens[i]) * dim:
            raise CacheCorruptError(f"{file_name}: row {i} ({sample_id!r}) has {row.size} bytes, "
                                    f"expected {2 * int(num_tokens[i]) * dim}")
        yield sample_id, codec.decode_bf16(row, dim)


def _row_fields(batch: pa.RecordBatch, *extra: str) -> list:
    return [batch.column("sample_id").to_pylist(), batch.column("num_tokens").to_numpy(),
            *(batch.column(name).to_numpy() for name in extra)]
