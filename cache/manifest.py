"""manifest.json: the single source of truth for what a cache directory contains.

Only the build driver writes it; every rewrite is atomic and its content is a deterministic
function of the committed shards, so a resumed build ends byte-identical to a clean one. Every
rewrite happens under the cache's exclusive lock (cache.lock) and starts from the manifest on disk,
so two Manifest objects of one directory never undo each other's shards or a finalization.
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cache.atomic import atomic_write
from cache.errors import CacheCorruptError, CacheError, CacheIncompleteError, CacheMismatchError
from cache.keys import canonical_json, content_key
from cache.lock import CacheLock, lock_cache
from cache.records import ShardInfo
from cache.schema import CORE, FORMAT_VERSION, check_cache_params, is_int_at_least, shard_file_name

MANIFEST_NAME = "manifest.json"
_IDENTITY_FIELDS = ("key", "identity", "k", "vocab_size", "tokenizer_sha256", "features", "num_shards_planned")
_FIELDS = {"format_version", *_IDENTITY_FIELDS, "complete", "num_sequences", "num_positions", "shards"}


class Manifest(Mapping[str, Any]):
    """Read-only mapping view of manifest.json plus the driver's operations on it.

    Writes use `lock` when it is the directory's held exclusive lock (the build driver's), else they
    take that lock for the duration of one rewrite.
    """

    def __init__(self, cache_dir: Path, data: dict[str, Any], lock: CacheLock | None = None):
        self.path = cache_dir
        self._data = data
        self._lock = lock

    def __getitem__(self, name: str) -> Any:
        return copy.deepcopy(self._data[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def shard_infos(self) -> list[ShardInfo]:
        """Committed shards, sorted by index."""
        return [ShardInfo.from_dict(shard) for shard in self._data["shards"]]

    def committed_indices(self) -> set[int]:
        """Indices of the shards recorded so far."""
        return {shard["index"] for shard in self._data["shards"]}

    def record_shard(self, info: ShardInfo) -> None:
        """Add (or replace) a committed shard after checking its files are in this directory; rewrite atomically."""
        with self._exclusive():
            data = self._reread()
            if data["complete"]:
                raise CacheError(f"{self.path}: cache is finalized; cannot record shard {info.index}")
            _check_shard(info, data)
            for group, name in info.files.items():
                path = self.path / name
                size = path.stat().st_size if path.is_file() else None
                if size != info.bytes[group]:
                    raise CacheError(f"shard {info.index}: {path} has size {size}, the writer reported "
                                     f"{info.bytes[group]} (was it written into another directory?)")
            shards = [s for s in data["shards"] if s["index"] != info.index] + [info.to_dict()]
            data["shards"] = sorted(shards, key=lambda s: s["index"])
            data["num_sequences"] = sum(s["num_sequences"] for s in shards)
            data["num_positions"] = sum(s["num_positions"] for s in shards)
            self._data = data
            self._write()

    def finalize(self) -> None:
        """Mark the cache complete; raises CacheIncompleteError if a planned shard is missing."""
        with self._exclusive():
            self._data = self._reread()
            missing = sorted(set(range(self._data["num_shards_planned"])) - self.committed_indices())
            if missing:
                raise CacheIncompleteError(f"{self.path}: {len(missing)} planned shards not committed, "
                                           f"first missing: {missing[:5]}")
            self._data["complete"] = True
            self._write()

    def _exclusive(self) -> contextlib.AbstractContextManager:
        """The directory's exclusive lock for one rewrite: the held one of the driver, or a fresh one."""
        if _holds_exclusive(self._lock, self.path):
            return contextlib.nullcontext()
        return lock_cache(self.path, exclusive=True)

    def _reread(self) -> dict[str, Any]:
        """The manifest as on disk now (another writer may have changed it), checked to be the same cache."""
        data = load_manifest(self.path)._data
        if data["key"] != self._data["key"]:
            raise CacheMismatchError(f"{self.path / MANIFEST_NAME} now holds cache {data['key']}, "
                                     f"not {self._data['key']}")
        return data

    def _write(self) -> None:
        text = json.dumps(self._data, sort_keys=True, indent=2, allow_nan=False) + "\n"
        atomic_write(self.path / MANIFEST_NAME, text.encode())


def create_manifest(cache_dir: str | Path, *, key: str, identity: dict, k: int, vocab_size: int,
                    tokenizer_sha256: str, features: dict[str, dict], num_shards_planned: int,
                    lock: CacheLock | None = None) -> Manifest:
    """Write a new incomplete manifest, or return the existing one with the same key (resume).

    `lock`: the directory's exclusive lock held by the caller (the build driver) for its later writes.
    """
    cache_dir = Path(cache_dir)
    if lock is not None and not _holds_exclusive(lock, cache_dir):
        raise CacheError(f"{cache_dir}: create_manifest needs this directory's held exclusive lock, got "
                         f"{lock.path} ({'exclusive' if lock.exclusive else 'shared'}, "
                         f"{'held' if lock.held else 'released'})")
    if key != content_key(identity):
        raise CacheError(f"key {key!r} is not content_key(identity) = {content_key(identity)!r}")
    data = json.loads(canonical_json({
        "format_version": FORMAT_VERSION, "key": key, "identity": identity, "k": k, "vocab_size": vocab_size,
        "tokenizer_sha256": tokenizer_sha256, "features": features, "num_shards_planned": num_shards_planned,
        "complete": False, "num_sequences": 0, "num_positions": 0, "shards": [],
    }))
    _check_fields(data, f"new manifest for {cache_dir}", CacheError)
    manifest = Manifest(cache_dir, data, lock)
    with manifest._exclusive():
        if (cache_dir / MANIFEST_NAME).exists():
            existing = load_manifest(cache_dir)
            if existing["key"] != key:
                raise CacheMismatchError(f"{cache_dir} holds cache {existing['key']}, not {key}")
            for name in _IDENTITY_FIELDS:
                if canonical_json(existing[name]) != canonical_json(data[name]):
                    raise CacheMismatchError(f"{cache_dir}: manifest has {name}={existing[name]!r}, "
                                             f"the build asks for {data[name]!r}")
            return Manifest(cache_dir, existing._data, lock)
        manifest._write()
    return manifest


def load_manifest(cache_dir: str | Path) -> Manifest:
    """Read and check manifest.json; CacheError if absent, CacheCorruptError if torn or inconsistent."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(f"{cache_dir} is not a cache directory: no {MANIFEST_NAME}")
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:
        raise CacheCorruptError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CacheCorruptError(f"{path}: not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(f"{path}: cache format version {data.get('format_version')!r}, "
                                 f"this lkspec reads version {FORMAT_VERSION}")
    _check_fields(data, str(path), CacheCorruptError)
    for shard in data["shards"]:
        try:
            _check_shard(ShardInfo.from_dict(shard), data)
        except CacheError as exc:
            raise CacheCorruptError(f"{path}: {exc}") from None
    indices = [shard["index"] for shard in data["shards"]]
    if indices != sorted(set(indices)):
        raise CacheCorruptError(f"{path}: shard indices {indices} are not sorted and unique")
    for total in ("num_sequences", "num_positions"):
        if data[total] != sum(shard[total] for shard in data["shards"]):
            raise CacheCorruptError(f"{path}: {total}={data[total]} is not the sum over shards")
    if data["complete"] and len(indices) != data["num_shards_planned"]:
        missing = sorted(set(range(data["num_shards_planned"])) - set(indices))
        raise CacheCorruptError(f"{path}: complete is true but shards lists {len(indices)} of the "
                                f"num_shards_planned={data['num_shards_planned']} shards (missing {missing[:5]})")
    if data["key"] != content_key(data["identity"]):
        raise CacheCorruptError(f"{path}: key {data['key']} does not match its identity")
    return Manifest(Path(cache_dir), data)


def _holds_exclusive(lock: CacheLock | None, cache_dir: Path) -> bool:
    """Whether `lock` is the held exclusive lock of `cache_dir`."""
    return (lock is not None and lock.held and lock.exclusive
            and lock.path.parent.resolve() == Path(cache_dir).resolve())


def _check_fields(data: dict[str, Any], where: str, error: type[CacheError]) -> None:
    """Raise `error` unless the manifest fields are present and well-typed (shards checked separately)."""
    try:
        if set(data) != _FIELDS:
            raise CacheError(f"fields {sorted(data)} differ from {sorted(_FIELDS)}")
        features = data["features"]
        if not isinstance(features, dict) or not all(isinstance(spec, dict) for spec in features.values()):
            raise CacheError(f"features must map names to dicts with a 'dim', got {features!r}")
        check_cache_params(k=data["k"], vocab_size=data["vocab_size"],
                           feature_dims={name: spec.get("dim") for name, spec in features.items()})
        if not isinstance(data["tokenizer_sha256"], str) or not data["tokenizer_sha256"]:
            raise CacheError(f"tokenizer_sha256 must be a non-empty string, got {data['tokenizer_sha256']!r}")
        if not is_int_at_least(data["num_shards_planned"], 1):
            raise CacheError(f"num_shards_planned must be an integer >= 1, got {data['num_shards_planned']!r}")
        if not isinstance(data["complete"], bool) or not isinstance(data["shards"], list):
            raise CacheError("complete must be a bool and shards a list")
    except CacheError as exc:
        raise error(f"{where}: {exc}") from None


def _check_shard(info: ShardInfo, data: dict[str, Any]) -> None:
    """Raise CacheError unless the shard's index, column groups and file names fit this manifest."""
    if not is_int_at_least(info.index, 0) or info.index >= data["num_shards_planned"]:
        raise CacheError(f"shard index {info.index!r} is outside [0, {data['num_shards_planned']})")
    groups = {CORE, *data["features"]}
    if set(info.files) != groups or set(info.sha256) != groups or set(info.bytes) != groups:
        raise CacheError(f"shard {info.index} has column groups {sorted(info.files)}, the cache has {sorted(groups)}")
    for group in groups:
        if info.files[group] != shard_file_name(info.index, group):
            raise CacheError(f"shard {info.index} names file {info.files[group]!r} for {group!r}, "
                             f"expected {shard_file_name(info.index, group)!r}")
    if not all(is_int_at_least(v, 0) for v in (info.num_sequences, info.num_positions, *info.bytes.values())):
        raise CacheError(f"shard {info.index} has invalid counts {info.to_dict()}")
    if not all(isinstance(v, str) and len(v) == 64 for v in info.sha256.values()):
        raise CacheError(f"shard {info.index} has invalid sha256 values {info.sha256}")
