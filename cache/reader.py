"""CacheReader: verified, rank-partitioned streaming of a cache's shards."""
from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from cache.atomic import sha256_hex
from cache.errors import CacheCorruptError, CacheError, CacheIncompleteError, CacheMismatchError
from cache.lock import CacheLock, lock_cache
from cache.manifest import MANIFEST_NAME, Manifest, load_manifest
from cache.records import SequenceRecord, ShardInfo, validate_record
from cache.schema import CORE, is_int_at_least
from cache.shard import core_counts, iter_core, iter_feature


def open_cache(path: str | Path, *, allow_incomplete: bool = False) -> CacheReader:
    """Open a cache directory under its shared lock after the structural checks; refuses an unfinished build.

    A reader of a complete cache waits for a build or gc holding the lock, and holds its shared lock until
    close() (gc never removes a cache in use). With allow_incomplete (info, verify) it never waits: it
    takes the lock only if free. The structural checks are cheap (no checksum; that is verify's job).
    """
    lock = lock_cache(path, exclusive=False, wait=not allow_incomplete, on_wait=_report_wait)
    try:
        manifest = load_manifest(path)
        if not manifest["complete"] and not allow_incomplete:
            raise CacheIncompleteError(
                f"{path}: the build is incomplete ({len(manifest.committed_indices())} of "
                f"{manifest['num_shards_planned']} shards committed); rerun the build to resume it")
        reader = CacheReader(manifest, lock)
        problems = reader.structure_problems()
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise type(problems[0])(f"{Path(path) / MANIFEST_NAME} does not match the shard files: "
                                    f"{problems[0]}{more}; run lkspec cache verify, then rebuild")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return reader


def _report_wait(lock_path: Path) -> None:
    print(f"waiting for the build or gc that holds {lock_path} to finish", file=sys.stderr, flush=True)


class CacheReader:
    """Reads one cache directory; trusts only the files its manifest lists, with matching sha256."""

    def __init__(self, manifest: Manifest, lock: CacheLock | None = None):
        self.manifest = manifest
        self.path = manifest.path
        self._lock = lock
        self._shards = {info.index: info for info in manifest.shard_infos()}

    def close(self) -> None:
        """Release the shared lock (a closed reader still reads, unprotected from gc)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def shard_indices(self) -> list[int]:
        """Indices of the committed shards, ascending."""
        return sorted(self._shards)

    def check_compatible(self, *, tokenizer_sha256: str | None = None, vocab_size: int | None = None,
                         requires_features: Sequence[str] = ()) -> None:
        """Raise CacheMismatchError unless the cache fits a consumer with this tokenizer, vocabulary and needs."""
        key = self.manifest["key"]
        if tokenizer_sha256 is not None and tokenizer_sha256 != self.manifest["tokenizer_sha256"]:
            raise CacheMismatchError(f"cache {key} was built with tokenizer sha256 "
                                     f"{self.manifest['tokenizer_sha256']}, the consumer uses {tokenizer_sha256}")
        if vocab_size is not None and vocab_size != self.manifest["vocab_size"]:
            raise CacheMismatchError(f"cache {key} has vocabulary size {self.manifest['vocab_size']}, "
                                     f"the consumer uses {vocab_size}")
        self._feature_groups(requires_features)

    def iter_sequences(self, rank: int = 0, world_size: int = 1, columns: Sequence[str] | None = None,
                       shard_order: Sequence[int] | None = None) -> Iterator[SequenceRecord]:
        """Stream the records of the shards owned by `rank` (index % world_size == rank), one shard at a time."""
        if not is_int_at_least(world_size, 1) or not is_int_at_least(rank, 0) or rank >= world_size:
            raise CacheError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        groups = [CORE, *self._feature_groups(columns or ())]
        order = self.shard_indices() if shard_order is None else list(shard_order)
        unknown = [i for i in order if i not in self._shards]
        if unknown or len(set(order)) != len(order):
            raise CacheError(f"shard_order must list distinct committed shards; unknown or repeated: "
                             f"{unknown or [i for i, n in Counter(order).items() if n > 1]}")
        owned = [self._shards[i] for i in order if i % world_size == rank]
        return (record for info in owned for record in self._decode(info, self._load(info, groups)))

    def structure_problems(self) -> list[CacheError]:
        """The cheap checks of every shard's core file (presence, size, schema, counts); open_cache refuses any."""
        return [problem for info in self._shards.values() if (problem := self._structure_problem(info))]

    def verify(self) -> list[str]:
        """Check every file (structure, sha256, version, decoding, record validity); return the problems."""
        problems = []
        if not self.manifest["complete"]:
            problems.append(f"incomplete: {len(self._shards)} of {self.manifest['num_shards_planned']} "
                            f"planned shards committed")
        features = self.manifest["features"]
        feature_dims = {name: spec["dim"] for name, spec in features.items()}
        sample_ids: Counter[str] = Counter()
        for info in self._shards.values():
            structural = self._structure_problem(info)
            if structural:
                problems.append(str(structural))
                continue
            contents = {}
            for group in info.files:
                try:
                    contents |= self._load(info, [group])
                except CacheError as exc:
                    problems.append(str(exc))
            if len(contents) != len(info.files):
                continue
            try:
                records = list(self._decode(info, contents))
                for record in records:
                    validate_record(record, k=self.manifest["k"], vocab_size=self.manifest["vocab_size"],
                                    feature_dims=feature_dims)
            except CacheError as exc:
                problems.append(f"shard {info.index}: {exc}")
                continue
            sample_ids.update(r.sample_id for r in records)
        repeated = [sid for sid, n in sample_ids.items() if n > 1]
        if repeated:
            problems.append(f"{len(repeated)} sample ids appear in more than one shard, e.g. {repeated[0]!r}")
        return problems

    def _structure_problem(self, info: ShardInfo) -> CacheError | None:
        """What is wrong with the core file of one shard, found without reading its payload, or None."""
        path = self.path / info.files[CORE]
        try:
            size = path.stat().st_size
        except OSError as exc:
            return CacheCorruptError(f"{path}: cannot read shard file ({exc.strerror})")
        if size != info.bytes[CORE]:
            return CacheCorruptError(f"{path}: {size} bytes, the manifest's shard {info.index} says "
                                     f"bytes {info.bytes[CORE]}")
        try:
            counts = core_counts(path, k=self.manifest["k"], vocab_size=self.manifest["vocab_size"])
        except CacheError as exc:
            return exc
        if counts != (info.num_sequences, info.num_positions):
            return CacheCorruptError(
                f"shard {info.index}: {info.files[CORE]} holds {counts[0]} sequences / {counts[1]} positions, "
                f"the manifest says num_sequences={info.num_sequences} / num_positions={info.num_positions}")
        return None

    def _feature_groups(self, names: Sequence[str]) -> list[str]:
        if isinstance(names, str):
            raise CacheError(f"feature columns must be a sequence of names, got the string {names!r}")
        missing = [name for name in names if name not in self.manifest["features"]]
        if missing:
            raise CacheMismatchError(f"cache {self.manifest['key']} has features "
                                     f"{sorted(self.manifest['features'])}, the consumer needs {missing}")
        return list(dict.fromkeys(names))

    def _load(self, info: ShardInfo, groups: list[str]) -> dict[str, bytes]:
        """Read the files of these column groups, each checked against the manifest's size and sha256."""
        contents = {}
        for group in groups:
            path = self.path / info.files[group]
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise CacheCorruptError(f"{path}: cannot read shard file ({exc.strerror})") from None
            if len(data) != info.bytes[group] or sha256_hex(data) != info.sha256[group]:
                raise CacheCorruptError(f"{path}: sha256 or size does not match the manifest "
                                        f"(file changed or corrupted)")
            contents[group] = data
        return contents

    def _decode(self, info: ShardInfo, contents: dict[str, bytes]) -> Iterator[SequenceRecord]:
        """Records of one shard, with the feature groups present in `contents`, checked for row alignment."""
        k, vocab_size = self.manifest["k"], self.manifest["vocab_size"]
        features = self.manifest["features"]
        rows = iter_core(contents[CORE], info.files[CORE], k=k, vocab_size=vocab_size)
        feature_rows = {name: iter_feature(data, info.files[name], name=name, dim=features[name]["dim"])
                        for name, data in contents.items() if name != CORE}
        for record in rows:
            for name, values in feature_rows.items():
                sample_id, array = next(values, (None, None))
                if sample_id != record.sample_id or array.shape[0] != len(record.input_ids):
                    raise CacheCorruptError(f"{info.files[name]}: rows do not align with {info.files[CORE]} "
                                            f"at sample {record.sample_id!r}")
                record.features[name] = array
            yield record
        for name, values in feature_rows.items():
            if next(values, None) is not None:
                raise CacheCorruptError(f"{info.files[name]}: more rows than {info.files[CORE]}")
