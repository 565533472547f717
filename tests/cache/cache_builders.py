"""Builders shared by the cache tests: small synthetic shards and whole caches."""
from __future__ import annotations

from pathlib import Path

from cache import CacheWriter, SequenceRecord, content_key, create_manifest
from cache.synthetic import synthetic_records

VOCAB = 1000
K = 8
DIMS = {"last": 4, "aux": 12}
IDENTITY = {"target": "tiny", "dataset": "synthetic", "k": K}


def shard_records(index: int, num_sequences: int = 3, features: tuple[str, ...] = ()) -> list[SequenceRecord]:
    """Deterministic records for shard `index` (distinct sample ids across shards)."""
    return synthetic_records(num_sequences, vocab_size=VOCAB, k=K, seed=index, length=(8, 40),
                             feature_dims={name: DIMS[name] for name in features}, id_prefix=f"shard{index}")


def build_cache(cache_dir: Path, num_shards: int = 3, features: tuple[str, ...] = (), *, finalize: bool = True,
                committed: range | None = None) -> Path:
    """Write and record shards (all, or those in `committed`) of a cache with the test identity."""
    manifest = create_manifest(cache_dir, key=content_key(IDENTITY), identity=IDENTITY, k=K, vocab_size=VOCAB,
                               tokenizer_sha256="a" * 64, features={name: {"dim": DIMS[name]} for name in features},
                               num_shards_planned=num_shards)
    writer = CacheWriter(cache_dir, k=K, vocab_size=VOCAB, features=features, feature_dims=DIMS)
    for index in committed if committed is not None else range(num_shards):
        manifest.record_shard(writer.write_shard(index, shard_records(index, features=features)))
    if finalize:
        manifest.finalize()
    return cache_dir


def accepted_files(cache_dir: Path) -> dict[str, bytes]:
    """Every non-temporary file in a cache directory, by name."""
    return {p.name: p.read_bytes() for p in sorted(cache_dir.iterdir()) if not p.name.startswith(".tmp-")}
