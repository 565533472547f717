"""The shard file format: Arrow IPC files, one row per sequence, versioned in schema metadata."""
from __future__ import annotations

import json
import numbers
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cache.errors import CacheCorruptError, CacheError, CacheMismatchError

FORMAT_VERSION = 2  # 2: top-k ids as ranks in a per-shard id table (cache.codec); version-1 caches are refused
CORE = "core"  # column group of the token ids, loss mask and top-k targets
METADATA_KEY = b"lkspec"
# zstd levels: the core columns gain nothing measurable above 3 (bench/cache_codec.py); hidden-state
# features barely compress, so they take the fastest level.
CORE_ZSTD_LEVEL = 3
FEATURE_ZSTD_LEVEL = 1

CORE_COLUMNS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "topk_id_table")  # encoded by cache.codec
ID_TABLE_COLUMN = "topk_id_table"  # the shard's top-k id table in row 0, empty in every other row
FEATURE_COLUMN = "values"
_ROW = [pa.field("sample_id", pa.string(), nullable=False), pa.field("num_tokens", pa.int32(), nullable=False)]
CORE_FIELDS = pa.schema([*_ROW, pa.field("num_positions", pa.int32(), nullable=False),
                         *(pa.field(name, pa.large_binary(), nullable=False) for name in CORE_COLUMNS)])
FEATURE_FIELDS = pa.schema([*_ROW, pa.field(FEATURE_COLUMN, pa.large_binary(), nullable=False)])
_FEATURE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def check_cache_params(*, k: int, vocab_size: int, feature_dims: dict[str, int]) -> None:
    """Raise CacheError unless 1 <= k <= vocab_size and every feature has a valid name and dimension."""
    if not is_int_at_least(vocab_size, 1) or not is_int_at_least(k, 1) or k > vocab_size:
        raise CacheError(f"need integers 1 <= k <= vocab_size, got k={k!r}, vocab_size={vocab_size!r}")
    for name, dim in feature_dims.items():
        if not isinstance(name, str) or not _FEATURE_NAME.fullmatch(name) or name == CORE:
            raise CacheError(f"invalid feature name {name!r}: use lowercase letters, digits and _, not {CORE!r}")
        if not is_int_at_least(dim, 1):
            raise CacheError(f"feature {name!r} needs a positive integer dimension, got {dim!r}")


def is_int_at_least(value: object, minimum: int) -> bool:
    """True for integers >= minimum (numpy integers included, bools excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def shard_file_name(index: int, group: str) -> str:
    """File name of one column group of shard `index`, e.g. shard-00003.arrow, shard-00003.aux.arrow."""
    return f"shard-{index:05d}.arrow" if group == CORE else f"shard-{index:05d}.{group}.arrow"


def write_ipc(fields: pa.Schema, meta: dict[str, Any], columns: dict[str, list], level: int) -> bytes:
    """One record batch as Arrow IPC file bytes, buffers zstd-compressed; same input -> same bytes."""
    text = json.dumps({"format_version": FORMAT_VERSION, **meta}, sort_keys=True)
    schema = fields.with_metadata({METADATA_KEY: text.encode()})
    batch = pa.RecordBatch.from_arrays([pa.array(columns[f.name], type=f.type) for f in fields], schema=schema)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=level))
    with pa.ipc.new_file(sink, schema, options=options) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def read_ipc(data: bytes, file_name: str, fields: pa.Schema,
             expected: dict[str, Any]) -> tuple[pa.RecordBatch, dict[str, Any]]:
    """Parse bytes from write_ipc: check version, columns and the `expected` metadata; return (batch, metadata)."""
    reader, meta = _open_ipc(pa.py_buffer(data), file_name, fields, expected)
    return _first_batch(reader, file_name), meta


def read_ipc_column(path: Path, fields: pa.Schema, expected: dict[str, Any], column: str) -> np.ndarray:
    """One numeric column of a write_ipc file, checked like read_ipc; only that column is read and decompressed."""
    try:
        with pa.memory_map(str(path)) as source:
            _open_ipc(source, path.name, fields, expected)
            options = pa.ipc.IpcReadOptions(included_fields=[fields.get_field_index(column)])
            batch = _first_batch(pa.ipc.open_file(source, options=options), path.name)
            return batch.column(0).to_numpy(zero_copy_only=False).copy()  # a copy: the map closes here
    except OSError as exc:
        raise CacheCorruptError(f"{path}: cannot read shard file ({exc.strerror or exc})") from None


def _open_ipc(source: pa.Buffer | pa.NativeFile, file_name: str, fields: pa.Schema,
              expected: dict[str, Any]) -> tuple[pa.ipc.RecordBatchFileReader, dict[str, Any]]:
    """Open a write_ipc file: check version, columns, the single batch and the `expected` metadata."""
    try:
        reader = pa.ipc.open_file(source)
        meta = json.loads((reader.schema.metadata or {})[METADATA_KEY])
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
    except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
        raise CacheCorruptError(f"{file_name}: not a readable lkspec shard ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(f"{file_name}: shard format version {meta.get('format_version')!r}, "
                                 f"this lkspec reads version {FORMAT_VERSION}")
    wrong = {key: meta.get(key) for key, value in expected.items() if meta.get(key) != value}
    if wrong:
        raise CacheCorruptError(f"{file_name}: shard metadata {wrong} does not match the manifest {expected}")
    if not reader.schema.remove_metadata().equals(fields) or reader.num_record_batches != 1:
        raise CacheCorruptError(f"{file_name}: expected one record batch with columns {fields.names}, "
                                f"got {reader.num_record_batches} with {reader.schema.names}")
    return reader, meta


def _first_batch(reader: pa.ipc.RecordBatchFileReader, file_name: str) -> pa.RecordBatch:
    try:
        return reader.get_batch(0)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CacheCorruptError(f"{file_name}: not a readable lkspec shard ({exc})") from None


def binary_column(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy (offsets int64 [rows + 1], data uint8) of a large_binary column."""
    column = batch.column(name)
    _, offsets, data = column.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[column.offset:column.offset + len(column) + 1]
    return offsets, (np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8))
