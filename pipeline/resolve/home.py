"""The lkspec home (`$LKSPEC_HOME`) where fetched and converted files live, and the sha256 that verifies them."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def lkspec_home() -> Path:
    """Where converted models and fetched data live (`$LKSPEC_HOME`, default ~/.cache/lkspec)."""
    return Path(os.environ.get("LKSPEC_HOME", Path.home() / ".cache" / "lkspec"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
