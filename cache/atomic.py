"""Crash-safe file commits: temp file in the same directory, fsync, rename, fsync the directory."""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # no reader ever accepts a name with this prefix


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Make `path` hold exactly `data`, or (after a crash at any point) leave its old state.

    A new file gets permissions `mode` (less the umask), as `open` would create it.
    """
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Persist a directory's entries (renames, creations)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
