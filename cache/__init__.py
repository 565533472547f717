"""The target-logit cache: Arrow shards of top-k log-probs (+ optional features) and a manifest.

A pure library (numpy, pyarrow, stdlib): the build driver takes the cache's exclusive lock, creates
the manifest and records shards; workers write shards with CacheWriter; trainers read with
open_cache(), under the shared lock.
"""
from cache.errors import CacheCorruptError, CacheError, CacheIncompleteError, CacheMismatchError
from cache.keys import content_key
from cache.lock import CacheLock, lock_cache
from cache.manifest import Manifest, create_manifest, load_manifest
from cache.reader import CacheReader, open_cache
from cache.records import SequenceRecord, ShardInfo
from cache.schema import FORMAT_VERSION
from cache.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION", "CacheCorruptError", "CacheError", "CacheIncompleteError", "CacheLock", "CacheMismatchError",
    "CacheReader", "CacheWriter", "Manifest", "SequenceRecord", "ShardInfo", "content_key", "create_manifest",
    "load_manifest", "lock_cache", "open_cache",
]
