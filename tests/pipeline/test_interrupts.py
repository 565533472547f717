"""A real Ctrl-C / SIGTERM during each stage: exit 130 / 143, one line, no leftovers, and the rerun resumes.

Each slow test runs `lkspec` as its own process (its own private Ray cluster, found through the cluster
registry), signals it once it is in its Ray stage, then checks the exit status, that stderr ends with
the one interrupt line and holds no traceback, that the cluster's processes and temp dir are gone,
and that rerunning continues the work instead of redoing it. Ctrl-C is sent to the command's whole
process group, as a terminal does; SIGTERM to its pid, as `kill` does. The reruns call `lkspec`'s
main() with the same arguments in this process, on the session's cluster: a second private cluster
start would add half a minute and test nothing the interrupted command did not.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cluster_registry import ClusterRecord, registry_dir
from pipeline.train_job import list_runs
from trainer.rundir import process_alive, read_metrics, read_run, update_run

REPO = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location("trainer_cache_helpers", REPO / "tests" / "trainer" / "conftest.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


def lkspec(argv: list[str]) -> subprocess.Popen:
    """`lkspec argv` in a session of its own, starting its own private cluster (no address, no token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def interrupt_when(process: subprocess.Popen, ready, signum: int, timeout_s: float = 600) -> ClusterRecord:
    """Wait until ready(record) holds for the command's private cluster, send signum; returns the record."""
    deadline = time.monotonic() + timeout_s
    record = None
    while time.monotonic() < deadline:
        assert process.poll() is None, f"lkspec ended before it could be interrupted:\n{process.stderr.read()[-3000:]}"
        paths = list(registry_dir().glob(f"{process.pid}-*.json"))
        record = ClusterRecord.load(paths[0]) if paths else None
        if record is not None and ready(record):
            if signum == signal.SIGINT:
                os.killpg(process.pid, signum)  # what Ctrl-C in a terminal does
            else:
                process.send_signal(signum)
            return record
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"not ready within {timeout_s} s")


def assert_stopped_cleanly(process: subprocess.Popen, record: ClusterRecord, signum: int, argv: list[str]) -> str:
    """Exit 128 + signum, the interrupt line last and once, no traceback, nothing of the cluster left; the line."""
    _, err = process.communicate(timeout=300)
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and lines, err[-3000:]
    assert lines[-1].startswith(f"lkspec: {name} interrupted `{shlex.join(['lkspec', *argv])}`: "
                                "its Ray workers and private cluster are stopped; ")
    assert sum("interrupted" in line for line in lines) == 1
    assert record.processes and not any(process_alive(p) for p in record.processes)
    assert not Path(record.temp_dir).exists() and not record.path.exists()
    return lines[-1]


def run_to_end(argv: list[str], capsys) -> str:
    """`lkspec argv` to the end on the session's cluster (this process has joined it); its stderr."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    return err


def write_conversations(path: Path, count: int) -> Path:
    """JSONL chats with replies of a few hundred words: a build of one shard per chat takes a while."""
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat and ran far away to see what would happen next in the quiet evening".split()
    path.write_text("".join(json.dumps({"id": f"s{i}", "messages": [
        {"role": "user", "content": " ".join(rng.choices(words, k=20))},
        {"role": "assistant", "content": " ".join(rng.choices(words, k=300))}]}) + "\n" for i in range(count)))
    return path


def cache_files(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache_dir.iterdir()) if p.name != "stats.json"}


def committed_shards(out: Path) -> int:
    for manifest in out.glob("*/manifest.json"):
        try:
            return len(json.loads(manifest.read_text())["shards"])
        except ValueError:
            return 0
    return 0


@pytest.mark.slow
def test_sigterm_during_cache_build_stops_cleanly_and_the_rerun_resumes_byte_identically(
        ray_address, tiny_llama_dir, tmp_path, capsys):
    from pipeline.build import BuildConfig, run_build

    data = write_conversations(tmp_path / "chat.jsonl", 12)  # 12 shards: ~5 s of work left after the first
    out = tmp_path / "caches"
    argv = ["cache", "build", "--target", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--k", "8",
            "--max-length", "512", "--shard-size", "1", "--workers", "1", "--threads", "1", "--no-progress"]
    process = lkspec(argv)
    record = interrupt_when(process, lambda _: committed_shards(out) >= 1, signal.SIGTERM)
    line = assert_stopped_cleanly(process, record, signal.SIGTERM, argv)
    assert line.endswith("run the same command to resume it")
    [cache_dir] = out.iterdir()
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert not manifest["complete"], "the build finished before the signal: nothing was interrupted"

    run_to_end(argv, capsys)  # the same command
    stats = json.loads((cache_dir / "stats.json").read_text())
    assert stats["shards"]["already_committed"] >= 1  # resumed, not redone
    clean = run_build(BuildConfig(target=str(tiny_llama_dir), data=str(data), out=tmp_path / "clean", k=8,
                                  max_length=512, shard_size=1, workers=1, threads=1, progress=False))
    assert cache_files(cache_dir) == cache_files(clean.path)


TRAIN_FLAGS = ["--drafter", "tiny", "--drafter-config", "layers=1,hidden=64,heads=2,kv_heads=2,intermediate=128",
               "--workers", "1", "--zero", "1", "--steps", "40", "--checkpoint-every", "5", "--keep-checkpoints",
               "1", "--eval-every", "0", "--eval-sequences", "8", "--heldout-fraction", "0.1", "--batch-tokens", "192",
               "--lr", "3e-3", "--warmup", "2", "--run-name", "run", "--no-progress"]


@pytest.mark.slow
def test_ctrl_c_during_training_stops_cleanly_and_the_printed_command_continues_from_the_checkpoint(
        ray_address, tiny_llama_dir, tmp_path, capsys):
    target = helpers.make_tiny_target(tiny_llama_dir, tmp_path / "target")
    cache = helpers.build_cache(tmp_path / "caches", target, helpers.random_sequences(48))
    runs = tmp_path / "runs"
    argv = ["train", "--cache", str(cache), "--out", str(runs), *TRAIN_FLAGS]
    latest = runs / "run" / "checkpoints" / "latest"
    process = lkspec(argv)
    record = interrupt_when(process, lambda _: latest.is_file(), signal.SIGINT)
    line = assert_stopped_cleanly(process, record, signal.SIGINT, argv)
    resume = shlex.join(["lkspec", *argv, "--resume"])
    assert line.endswith(f"resume it from its last checkpoint with `{resume}`")

    run = read_run(runs / "run")
    assert run["status"] in ("pending", "running") and run["driver"]["pid"] == process.pid
    assert [row["status"] for row in list_runs(runs)] == ["interrupted"]  # `lkspec runs`: its driver is gone
    checkpoint = int(latest.read_text().rsplit("-", 1)[1])
    assert 5 <= checkpoint < 40
    before = [m for m in read_metrics(runs / "run") if m["step"] <= checkpoint]

    run_to_end(shlex.split(resume)[1:], capsys)  # the command the line printed
    metrics = read_metrics(runs / "run")
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert metrics[:checkpoint] == before  # steps up to the checkpoint kept, the rest trained on from there
    assert read_run(runs / "run")["status"] == "done"


@pytest.mark.slow
def test_ctrl_c_during_bench_stops_cleanly_the_rerun_finishes_and_a_finished_report_is_reused(
        ray_address, tiny_llama_dir, tmp_path, capsys):
    import psutil

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {n}, please."}) + "\n" for n in range(6)))
    argv = ["bench", "--target", str(tiny_llama_dir), "--drafter", str(tiny_llama_dir), "--bench", str(prompts),
            "--k", "3", "--max-new-tokens", "48", "--temperature", "0", "--workers", "1",
            "--out", str(tmp_path / "report"), "--no-progress"]

    def bench_workers_up(record: ClusterRecord) -> bool:
        names = []
        for pid, _ in record.processes:
            try:
                names.append(psutil.Process(pid).name())
            except psutil.NoSuchProcess:
                continue
        return any("BenchWorker" in name for name in names)

    process = lkspec(argv)
    record = interrupt_when(process, bench_workers_up, signal.SIGINT)
    line = assert_stopped_cleanly(process, record, signal.SIGINT, argv)
    assert line.endswith("run the same command to resume it")
    assert not (tmp_path / "report" / "report.json").exists()

    run_to_end(argv, capsys)
    report = (tmp_path / "report" / "report.json").read_bytes()
    err = run_to_end(argv, capsys)  # finished: reused, not recomputed
    assert f"reusing the finished benchmark report in {tmp_path / 'report'}" in err
    assert (tmp_path / "report" / "report.json").read_bytes() == report


def test_a_run_whose_driver_is_gone_lists_as_interrupted(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    drivers = {"gone": {"pid": gone.pid, "started": 1.0, "host": host},
               "alive": {"pid": os.getpid(), "started": __import__("psutil").Process().create_time(), "host": host},
               "elsewhere": {"pid": gone.pid, "started": 1.0, "host": f"not-{host}"}}
    for name, driver in drivers.items():
        update_run(tmp_path / name, status="running", driver=driver)
    update_run(tmp_path / "finished", status="done", driver=drivers["gone"])
    statuses = {row["name"]: row["status"] for row in list_runs(tmp_path)}
    assert statuses == {"alive": "running", "elsewhere": "running", "finished": "done", "gone": "interrupted"}
