"""CacheWriter: validates records, encodes one shard and commits its files crash-safely."""
from __future__ import annotations

from pathlib import Path

from cache import codec
from cache.atomic import atomic_write, sha256_hex
from cache.errors import CacheError
from cache.records import SequenceRecord, ShardInfo, validate_record
from cache.schema import CORE, check_cache_params, is_int_at_least, shard_file_name
from cache.shard import encode_core, encode_feature


class CacheWriter:
    """Writes shards into one cache directory; the manifest is recorded separately by the build driver."""

    def __init__(self, cache_dir: str | Path, *, k: int, vocab_size: int, features: tuple[str, ...] = (),
                 feature_dims: dict[str, int] | None = None, logprob_dtype: str = "fp16"):
        feature_dims = feature_dims or {}
        if len(set(features)) != len(features) or not set(features) <= set(feature_dims):
            raise CacheError(f"features {list(features)} must be distinct and each have a dimension in "
                             f"feature_dims {dict(feature_dims)}")
        feature_dims = {name: feature_dims[name] for name in features}
        check_cache_params(k=k, vocab_size=vocab_size, feature_dims=feature_dims)
        if logprob_dtype not in codec.LOGPROB_DTYPES:
            raise CacheError(f"logprob_dtype must be one of {sorted(codec.LOGPROB_DTYPES)}, got {logprob_dtype!r}")
        self.cache_dir = Path(cache_dir)
        self.k = int(k)
        self.vocab_size = int(vocab_size)
        self.feature_dims = {name: int(dim) for name, dim in feature_dims.items()}
        self.logprob_dtype = logprob_dtype

    def write_shard(self, index: int, records: list[SequenceRecord]) -> ShardInfo:
        """Validate, encode and commit shard `index` (deterministic bytes); return what was committed."""
        if not is_int_at_least(index, 0):
            raise CacheError(f"shard index must be a non-negative integer, got {index!r}")
        index = int(index)
        seen: set[str] = set()
        for record in records:
            validate_record(record, k=self.k, vocab_size=self.vocab_size, feature_dims=self.feature_dims)
            if record.sample_id in seen:
                raise CacheError(f"record {record.sample_id!r}: sample_id: appears twice in shard {index}")
            seen.add(record.sample_id)
        contents = {CORE: encode_core(records, k=self.k, vocab_size=self.vocab_size,
                                      logprob_dtype=self.logprob_dtype)}
        for name, dim in self.feature_dims.items():
            contents[name] = encode_feature(records, name=name, dim=dim)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        files = {group: shard_file_name(index, group) for group in contents}
        for group, data in contents.items():
            atomic_write(self.cache_dir / files[group], data)
        return ShardInfo(
            index=index,
            files=files,
            sha256={group: sha256_hex(data) for group, data in contents.items()},
            bytes={group: len(data) for group, data in contents.items()},
            num_sequences=len(records),
            num_positions=sum(r.num_positions for r in records),
        )
