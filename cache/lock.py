"""One lock per cache directory: exclusive for the build driver and gc, shared for readers.

The lock is an flock(2) on CACHE_DIR/.lock. The kernel drops it when its holder exits, however it
exits (kill -9 included), so a crashed build never leaves a cache locked. The lock file is empty and
is no part of the cache's content.
"""
from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from cache.atomic import TEMP_PREFIX
from cache.errors import CacheError

LOCK_NAME = ".lock"


class CacheLock:
    """A held (or, for a reader of a directory that cannot hold a lock file, a vacuous) lock on one cache."""

    def __init__(self, path: Path, fd: int | None, exclusive: bool):
        self.path = path
        self.exclusive = exclusive
        self._fd = fd

    @property
    def held(self) -> bool:
        """True until release() for a real lock; always False for a vacuous one."""
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the open file releases the flock
            self._fd = None

    def __enter__(self) -> CacheLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def lock_cache(cache_dir: str | Path, *, exclusive: bool, wait: bool = True,
               on_wait: Callable[[Path], None] | None = None) -> CacheLock | None:
    """Take the lock of `cache_dir`; None if another process holds a conflicting one and not `wait`.

    exclusive creates the directory. A shared lock on a directory that does not exist, or where the
    lock file cannot be created (read-only), is vacuous: no writer can work there either. `on_wait`
    is called once, with the lock file's path, before blocking on another process's lock.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / LOCK_NAME
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    waited = False
    while True:
        if exclusive:
            cache_dir.mkdir(parents=True, exist_ok=True)
        fd = _open(path, exclusive)
        if fd is None:
            return CacheLock(path, None, exclusive)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    return None
                if on_wait is not None and not waited:
                    on_wait(path)
                waited = True
                fcntl.flock(fd, mode)
            if _same_file(fd, path):
                return CacheLock(path, fd, exclusive)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # gc removed the cache while we waited: lock whatever is there now


def _open(path: Path, exclusive: bool) -> int | None:
    """A descriptor of the lock file (created if needed); None for a reader where none can exist."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exclusive or exc.errno not in (errno.ENOENT, errno.EACCES, errno.EROFS):
            raise CacheError(f"{path}: cannot open the cache's lock file ({exc.strerror})") from None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # a read-only cache: lock the existing file
    except OSError:
        return None  # no directory, or no lock file and none can be made: no writer can work here


def _same_file(fd: int, path: Path) -> bool:
    """Whether `fd` is still the file at `path` (gc renames a cache away before deleting it)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def remove_temp_files(lock: CacheLock) -> int:
    """Delete the temp files of killed writers in a cache whose exclusive lock the caller holds; returns the count."""
    if not (lock.held and lock.exclusive):
        raise CacheError(f"{lock.path.parent}: only the holder of the exclusive lock may remove temp files")
    removed = 0
    for temp in lock.path.parent.glob(f"{TEMP_PREFIX}*"):
        temp.unlink(missing_ok=True)
        removed += 1
    return removed
