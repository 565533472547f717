"""Content keys: a cache directory is named by a hash of everything that changes its contents."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from cache.errors import CacheError
from cache.schema import FORMAT_VERSION

KEY_LENGTH = 20


def canonical_json(value: Any) -> str:
    """Canonical JSON text of a value: sorted keys, no whitespace, no NaN."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CacheError(f"cache identity is not canonical JSON: {exc}") from None


def content_key(identity: dict) -> str:
    """First 20 hex digits of the sha256 of the canonical JSON of identity plus FORMAT_VERSION."""
    if not isinstance(identity, dict):
        raise CacheError(f"cache identity must be a dict, got {type(identity).__name__}")
    text = canonical_json({"format_version": FORMAT_VERSION, "identity": identity})
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]
