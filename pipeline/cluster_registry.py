"""A record of every private Ray cluster this user runs on this host, so that a killed command's is reaped.

    /tmp/lkspec-clusters-<uid>/<driver pid>-<temp dir name>.json   (directory 0700, files 0600)
        {"host", "driver": [pid, start time], "temp_dir", "processes": [[pid, start time], ...]}

`ray_session` writes a record before it starts a cluster and keeps its process list current; a
command that stops its cluster removes the record. A record whose driver is gone (SIGKILL, the
OOM killer) names what is left behind: `reap_orphans`, called before every new private cluster,
kills exactly those processes (a pid counts only while its start time matches, so a recycled pid
is never touched) and removes the cluster's temp directory. Nothing is ever found by name.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.rundir import process_alive, process_identity

Process = tuple[int, float]  # (pid, start time): a process identity that survives pid reuse

TEMP_ROOT = Path("/tmp")  # short on purpose: Ray's unix socket paths live under a cluster's temp dir
TEMP_PREFIX = "lkray-"


def registry_dir() -> Path:
    """This user's registry directory, created 0700; refused if somebody else owns it."""
    path = TEMP_ROOT / f"lkspec-clusters-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    stat = path.lstat()
    if path.is_symlink() or stat.st_uid != os.getuid():
        raise RuntimeError(f"{path} is not a directory owned by this user: refusing to record Ray clusters there")
    return path


def kill(processes: list[Process]) -> int:
    """SIGKILL every listed process that still runs; returns how many were killed."""
    killed = 0
    for pid, started in processes:
        if process_alive((pid, started)):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


@dataclass
class ClusterRecord:
    """One private cluster: the command (driver) that owns it, its temp directory, its processes."""

    path: Path
    driver: Process
    temp_dir: str
    host: str = field(default_factory=socket.gethostname)
    processes: list[Process] = field(default_factory=list)

    @classmethod
    def create(cls, temp_dir: str) -> ClusterRecord:
        """Record a cluster about to start in temp_dir, owned by this process."""
        driver = process_identity(os.getpid())
        path = registry_dir() / f"{os.getpid()}-{Path(temp_dir).name}.json"
        record = cls(path=path, driver=driver, temp_dir=str(temp_dir))
        record.save()
        return record

    @classmethod
    def load(cls, path: Path) -> ClusterRecord | None:
        """The record in path, or None when it is unreadable (a torn write cannot happen: see save)."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(path=Path(path), driver=tuple(data["driver"]), temp_dir=str(data["temp_dir"]),
                       host=str(data["host"]), processes=[tuple(p) for p in data["processes"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self) -> None:
        """Write the record atomically, readable by this user only (cache.atomic.atomic_write)."""
        from cache.atomic import atomic_write  # here, not above: `lkspec --help` reaches this module

        data = {"host": self.host, "driver": list(self.driver), "temp_dir": self.temp_dir,
                "processes": [list(p) for p in self.processes]}
        atomic_write(self.path, json.dumps(data).encode(), mode=0o600)

    def stop(self) -> int:
        """Kill what is left of the cluster, remove its temp directory and this record; returns processes killed."""
        killed = kill(self.processes)
        temp_dir = Path(self.temp_dir)
        if temp_dir.name.startswith(TEMP_PREFIX) and temp_dir.parent == TEMP_ROOT:
            shutil.rmtree(temp_dir, ignore_errors=True)
        self.path.unlink(missing_ok=True)
        return killed


def reap_orphans() -> list[ClusterRecord]:
    """Stop every recorded cluster on this host whose driver is gone; returns the records reaped."""
    reaped = []
    host = socket.gethostname()
    for path in sorted(registry_dir().glob("*.json")):
        record = ClusterRecord.load(path)
        if record is None or record.host != host or process_alive(record.driver):
            continue
        killed = record.stop()
        reaped.append(record)
        print(f"lkspec: cleaned up the private Ray cluster of a command that was killed (pid {record.driver[0]}): "
              f"{killed} leftover process(es) stopped, {record.temp_dir} removed", file=sys.stderr, flush=True)
    return reaped
