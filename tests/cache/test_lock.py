"""The per-cache lock: exclusive vs shared, released when the holder is killed, waits reported once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cache import CacheError
from cache.lock import LOCK_NAME, lock_cache, remove_temp_files

_HOLD = """
import sys, time
from cache.lock import lock_cache
lock = lock_cache(sys.argv[1], exclusive=True)
print("locked", flush=True)
time.sleep(600)
"""


def _wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_exclusive_excludes_everyone_and_shared_locks_coexist(cache_dir):
    with lock_cache(cache_dir, exclusive=True) as lock:
        assert lock.held and (cache_dir / LOCK_NAME).is_file()
        assert lock_cache(cache_dir, exclusive=True, wait=False) is None
        assert lock_cache(cache_dir, exclusive=False, wait=False) is None
    first = lock_cache(cache_dir, exclusive=False)
    second = lock_cache(cache_dir, exclusive=False, wait=False)
    assert first.held and second.held
    assert lock_cache(cache_dir, exclusive=True, wait=False) is None
    first.release()
    second.release()
    assert lock_cache(cache_dir, exclusive=True, wait=False).held


def test_a_killed_holder_releases_the_lock(cache_dir):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(cache_dir)], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline() == b"locked\n"
        assert lock_cache(cache_dir, exclusive=False, wait=False) is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_cache(cache_dir, exclusive=True, wait=False).held


def test_a_waiter_reports_once_then_gets_the_lock(cache_dir):
    holder = lock_cache(cache_dir, exclusive=True)
    reports, got = [], []
    waiter = threading.Thread(target=lambda: got.append(lock_cache(cache_dir, exclusive=True,
                                                                    on_wait=reports.append)))
    waiter.start()
    _wait_for(lambda: reports)
    assert reports == [cache_dir / LOCK_NAME] and not got
    holder.release()
    waiter.join(timeout=10)
    assert got and got[0].held and reports == [cache_dir / LOCK_NAME]


def test_a_waiter_relocks_when_gc_renamed_the_cache_away(tmp_path):
    cache_dir = tmp_path / "key"
    holder = lock_cache(cache_dir, exclusive=True)
    reports, got = [], []
    waiter = threading.Thread(target=lambda: got.append(lock_cache(cache_dir, exclusive=True,
                                                                    on_wait=reports.append)))
    waiter.start()
    _wait_for(lambda: reports)  # the waiter holds the old lock file open
    cache_dir.rename(tmp_path / "trash")  # what gc does before deleting, under the exclusive lock
    holder.release()
    waiter.join(timeout=10)
    assert got and got[0].held and cache_dir.is_dir()
    assert os.stat(cache_dir / LOCK_NAME).st_ino != os.stat(tmp_path / "trash" / LOCK_NAME).st_ino


def test_a_reader_of_a_missing_directory_gets_a_vacuous_lock(tmp_path):
    lock = lock_cache(tmp_path / "nothing", exclusive=False)
    assert not lock.held and not (tmp_path / "nothing").exists()


def test_only_the_exclusive_holder_removes_temp_files(cache_dir):
    cache_dir.mkdir()
    (cache_dir / ".tmp-shard-00000.arrow.1.ab").write_bytes(b"in flight")
    with lock_cache(cache_dir, exclusive=False) as shared, pytest.raises(CacheError, match="exclusive lock"):
        remove_temp_files(shared)
    assert (cache_dir / ".tmp-shard-00000.arrow.1.ab").exists()
    with lock_cache(cache_dir, exclusive=True) as lock:
        assert remove_temp_files(lock) == 1
    assert not (cache_dir / ".tmp-shard-00000.arrow.1.ab").exists()
