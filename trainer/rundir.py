"""A run directory: its layout, run.json, and the per-step metrics log (metrics.jsonl + TensorBoard).

    RUNS/<name>/run.json         what was trained on what, status, final and best metrics
    RUNS/<name>/plan.json        the resolved plan the workers ran (config included)
    RUNS/<name>/metrics.jsonl    one JSON object per optimizer step (rank 0)
    RUNS/<name>/tb/              TensorBoard events
    RUNS/<name>/checkpoints/     DeepSpeed checkpoints (see trainer.checkpoint)
    RUNS/<name>/model/           the final drafter: AutoModelForCausalLM.from_pretrained(...) loads it
    RUNS/<name>/best/            the drafter with the best held-out expected τ
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

RUN_JSON = "run.json"
PLAN_JSON = "plan.json"
METRICS = "metrics.jsonl"
ACTIVE_STATUSES = ("pending", "running")


def process_identity(pid: int) -> tuple[int, float] | None:
    """(pid, start time) of a running process, or None: an identity that a recycled pid never matches."""
    import psutil

    try:
        return pid, psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def process_alive(identity: tuple[int, float]) -> bool:
    """Whether this very process (same pid and start time, not a zombie) still runs."""
    import psutil

    pid, started = identity
    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def driver_record() -> dict[str, Any]:
    """run.json's `driver`: the process (pid, start time) and host of the command that runs the run."""
    pid, started = process_identity(os.getpid())
    return {"pid": pid, "started": started, "host": socket.gethostname()}


def run_status(run: dict[str, Any]) -> str | None:
    """A run's status, `interrupted` for a pending/running run whose driver on this host is gone."""
    status, driver = run.get("status"), run.get("driver")
    if status in ACTIVE_STATUSES and isinstance(driver, dict) and driver.get("host") == socket.gethostname():
        try:
            if not process_alive((int(driver["pid"]), float(driver["started"]))):
                return "interrupted"
        except (KeyError, TypeError, ValueError):
            pass
    return status


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (cache.atomic.atomic_write)."""
    from cache.atomic import atomic_write  # here, not above: `lkspec --help` reaches this module

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(data, indent=1, sort_keys=True, allow_nan=True) + "\n").encode())


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """run.json of a run directory, or None when absent or unreadable."""
    try:
        return json.loads((Path(run_dir) / RUN_JSON).read_text())
    except (OSError, ValueError):
        return None


def update_run(path: Path, /, **fields: Any) -> dict[str, Any]:
    """Merge fields into run.json (created if absent) and return the result."""
    data = read_run(path) or {}
    data.update(fields)
    write_json(Path(path) / RUN_JSON, data)
    return data


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete line of metrics.jsonl, in order."""
    return list(iter_metrics(Path(run_dir) / METRICS))


def iter_metrics(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            return  # a torn last line (the writer was killed mid-write)


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl's lines after `step` (and a torn last line), atomically; no file, nothing to do.

    A run resumed at step s (its last checkpoint's, 0 without one) keeps only what led to that
    checkpoint, so the log always reads as one uninterrupted run.
    """
    from cache.atomic import atomic_write

    path = Path(run_dir) / METRICS
    if path.exists():
        kept = [r for r in iter_metrics(path) if r.get("step", 0) <= step]
        atomic_write(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept).encode())


class MetricsLogger:
    """Rank 0's per-step log: one JSON line per step in metrics.jsonl, scalars to TensorBoard.

    Resuming at step s first drops any line after s (trim_metrics).
    """

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        run_dir = Path(run_dir)
        trim_metrics(run_dir, resume_step)
        self.file = open(run_dir / METRICS, "a")
        from torch.utils.tensorboard import SummaryWriter

        # events after the resumed step (a run that starts over: all of them) are hidden from TensorBoard
        self.tensorboard = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()
        step = record["step"]
        for key, value in _scalars(record):
            self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


def _scalars(record: dict[str, Any], prefix: str = "train/") -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        if key in ("step", "time"):
            continue
        if isinstance(value, dict):
            yield from _scalars(value, prefix=f"{key}/")
        elif isinstance(value, list):
            for n, item in enumerate(value, start=1):
                if isinstance(item, (int, float)):
                    yield f"{prefix}{key}/step{n}", float(item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)
