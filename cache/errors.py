"""Exceptions raised by the cache library."""
from __future__ import annotations


class CacheError(Exception):
    """Base class: invalid input to the cache, or a cache that cannot be used."""


class CacheMismatchError(CacheError):
    """The cache exists but does not match what the caller needs (key, tokenizer, vocabulary, version)."""


class CacheCorruptError(CacheError):
    """A file of the cache is missing, torn, or does not match its recorded checksum."""


class CacheIncompleteError(CacheError):
    """The cache build has not committed every planned shard."""
