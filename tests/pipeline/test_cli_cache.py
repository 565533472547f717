"""`lkspec cache ls|gc|info|build` on caches written with the cache library (no Ray, no model run)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cache import CacheWriter, content_key, create_manifest, lock_cache, open_cache
from cache.synthetic import synthetic_records
from pipeline.cli import main


def make_cache(root: Path, name: str, *, complete: bool = True) -> Path:
    """A small real cache (2 shards planned) under root; the second shard only when complete."""
    identity = {"test": name}
    key = content_key(identity)
    directory = root / key
    manifest = create_manifest(directory, key=key, identity=identity, k=4, vocab_size=1000, tokenizer_sha256="t" * 64,
                               features={}, num_shards_planned=2)
    writer = CacheWriter(directory, k=4, vocab_size=1000)
    for index in range(2 if complete else 1):
        records = synthetic_records(3, vocab_size=1000, k=4, seed=index, id_prefix=f"{name}-{index}", length=(8, 16))
        manifest.record_shard(writer.write_shard(index, records))
    if complete:
        manifest.finalize()
    return directory


def age(path: Path, hours: float) -> None:
    past = time.time() - hours * 3600
    os.utime(path, (past, past))


def test_ls_lists_every_cache_with_its_status(tmp_path, capsys):
    done = make_cache(tmp_path, "a")
    partial = make_cache(tmp_path, "b", complete=False)
    assert main(["cache", "ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["KEY", "STATUS", "SEQS", "POSITIONS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[done.name][1:3] == ["complete", "6"] and rows[partial.name][1:3] == ["partial", "1/2"]


def test_gc_removes_unreferenced_and_stale_caches_and_dead_temp_files(tmp_path, capsys):
    root, runs = tmp_path / "caches", tmp_path / "runs"
    used = make_cache(root, "used")
    unused = make_cache(root, "unused")
    fresh_partial = make_cache(root, "building", complete=False)
    stale_partial = make_cache(root, "abandoned", complete=False)
    age(stale_partial / "manifest.json", 48)
    dead_temp = used / ".tmp-shard-00009.arrow.123.abcd"
    dead_temp.write_bytes(b"torn")
    live_temp = fresh_partial / ".tmp-shard-00001.arrow.456.ef01"
    live_temp.write_bytes(b"being written")
    build = lock_cache(fresh_partial, exclusive=True)  # a build in progress
    also_used = make_cache(root, "also-used")
    (runs / "sweep" / "kl").mkdir(parents=True)
    (runs / "sweep" / "kl" / "run.json").write_text(json.dumps({"cache_key": used.name}))
    (runs / "lk").mkdir(parents=True)  # the trainer's layout: "cache": {"path", "key", "k"}
    (runs / "lk" / "run.json").write_text(json.dumps({"cache": {"path": str(also_used), "key": also_used.name}}))

    assert main(["cache", "gc", str(root), "--runs", str(runs), "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and unused.exists() and stale_partial.exists()

    assert main(["cache", "gc", str(root), "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == sorted([used.name, also_used.name, fresh_partial.name])
    assert not dead_temp.exists() and live_temp.exists()  # the build's in-flight file survives
    assert "no run references it" in out and "untouched for" in out and "temporary file of a dead writer" in out
    assert f"skip {fresh_partial.name}: in use" in out and str(fresh_partial / ".lock") in out
    build.release()
    assert main(["cache", "verify", str(used)]) == 0


def test_gc_skips_a_cache_that_a_reader_holds_open(tmp_path, capsys):
    root, runs = tmp_path / "caches", tmp_path / "runs"
    runs.mkdir()
    unused = make_cache(root, "unused")
    reader = open_cache(unused)  # a training run reading it: holds the shared lock
    assert main(["cache", "gc", str(root), "--runs", str(runs)]) == 0
    assert f"skip {unused.name}: in use" in capsys.readouterr().out
    assert len(list(reader.iter_sequences())) == 6
    reader.close()
    killed_gc = root / ".tmp-gc-0123456789abcdef0123.999999999"  # what a gc killed mid-delete leaves
    shutil.copytree(unused, killed_gc)
    assert main(["cache", "ls", str(root)]) == 0 and killed_gc.name not in capsys.readouterr().out
    assert main(["cache", "gc", str(root), "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "no run references it" in out and "left by an interrupted gc" in out and not unused.exists()
    assert list(root.iterdir()) == []  # the renamed-away copy is gone too


def _lie(cache: Path, edit) -> None:
    """Rewrite the manifest with `edit` applied, as a user or a buggy tool might."""
    data = json.loads((cache / "manifest.json").read_text())
    edit(data)
    (cache / "manifest.json").write_text(json.dumps(data))


def _drop_last_shard(data: dict) -> None:
    dropped = data["shards"].pop()
    data["num_sequences"] -= dropped["num_sequences"]
    data["num_positions"] -= dropped["num_positions"]


def _undercount_shard_0(data: dict) -> None:
    data["shards"][0]["num_sequences"] -= 1
    data["num_sequences"] -= 1


@pytest.mark.parametrize("edit, message", [
    (_drop_last_shard, "complete is true but shards lists 1 of the num_shards_planned=2 shards (missing [1])"),
    (_undercount_shard_0, "holds 3 sequences / "),
])
def test_a_lying_manifest_fails_verify_and_train_refuses_it_before_ray(tmp_path, capsys, edit, message):
    import ray

    cache = make_cache(tmp_path / "caches", "lie")
    _lie(cache, edit)
    assert main(["cache", "verify", str(cache)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL ") and message in out and "1 problem(s)" in out
    was_running = ray.is_initialized()
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "runs"), "--drafter", "tiny"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert ray.is_initialized() == was_running and not (tmp_path / "runs").exists()


def test_gc_refuses_to_run_without_a_runs_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_cache(tmp_path / "caches", "a")
    assert main(["cache", "gc", str(tmp_path / "caches")]) == 2
    assert "no runs directory" in capsys.readouterr().err and len(list((tmp_path / "caches").iterdir())) == 1


def test_verify_and_info_report_an_incomplete_cache(tmp_path, capsys):
    partial = make_cache(tmp_path, "b", complete=False)
    assert main(["cache", "verify", str(partial)]) == 1
    assert "incomplete: 1 of 2" in capsys.readouterr().out
    assert main(["cache", "info", str(partial)]) == 0
    assert "INCOMPLETE (1 of 2 shards)" in capsys.readouterr().out
    assert main(["cache", "info", str(tmp_path)]) == 2
    assert "not a cache directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--target", "no-such-model"], "unknown model 'no-such-model'"),
    (["--k", "0"], "--k must be an integer >= 1"),
    (["--features", "mid"], "features must be none, last, aux"),
    (["--max-new-tokens", "5"], "--max-new-tokens only applies with --regenerate"),
    (["--data", "no-such-data.jsonl"], "dataset 'no-such-data.jsonl' not found"),
])
def test_build_refuses_bad_arguments_before_starting_ray(tmp_path, capsys, tiny_llama_dir, argv, message):
    import ray

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    base = {"--target": str(tiny_llama_dir), "--data": str(data), "--out": str(tmp_path / "out")}
    base.update(dict(zip(argv[::2], argv[1::2])))
    was_running = ray.is_initialized()
    assert main(["cache", "build", *[x for pair in base.items() for x in pair]]) == 2
    assert message in capsys.readouterr().err
    assert ray.is_initialized() == was_running and not (tmp_path / "out").exists()


@pytest.mark.parametrize("cpu, device, dtype, expected", [
    ("avx2", "cpu", "auto", "fp32"), ("avx2", "auto", "auto", "fp32"), ("amx", "cpu", "auto", "bf16"),
    ("avx512_bf16", "auto", "auto", "bf16"), ("avx2", "cpu", "bf16", "bf16"), ("amx", "cpu", "fp32", "fp32"),
])
def test_build_resolves_dtype_auto_for_the_workers_device_before_the_key(monkeypatch, tmp_path, cpu, device, dtype,
                                                                         expected):
    import torch

    from pipeline.build import BuildConfig, resolve_build_dtype

    monkeypatch.setenv("LKSPEC_ASSUME_CPU", cpu)
    if torch.cuda.is_available():
        pytest.skip("device auto is cuda on a machine with a GPU")
    config = BuildConfig(target="t", data="d", out=tmp_path, device=device, dtype=dtype)
    assert resolve_build_dtype(config) == expected


def test_build_refuses_k_larger_than_the_vocabulary(tmp_path, capsys, tiny_llama_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    argv = ["cache", "build", "--target", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "out"),
            "--k", "50000"]
    assert main(argv) == 2
    assert "k (50000) is larger than the target's vocabulary (49152)" in capsys.readouterr().err


def _trainer_helpers():
    """tests/trainer/conftest.py as a plain module: its builder of a real, trainable cache."""
    spec = importlib.util.spec_from_file_location("trainer_cache_helpers",
                                                  Path(__file__).parents[1] / "trainer" / "conftest.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers


@pytest.fixture(scope="module")
def trainable_cache(tmp_path_factory, tiny_llama_dir) -> Path:
    """8 sequences in 2 shards from a real forward of a tiny target: a cache `lkspec train` accepts."""
    helpers = _trainer_helpers()
    target = helpers.make_tiny_target(tiny_llama_dir, tmp_path_factory.mktemp("target"))
    return helpers.build_cache(tmp_path_factory.mktemp("caches"), target, helpers.random_sequences(8), num_shards=2)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_flip_a_byte, lambda path: path.write_bytes(path.read_bytes()[:-100]),
                                     Path.unlink], ids=["flipped-byte", "truncated", "deleted"])
def test_train_refuses_a_corrupted_shard_before_ray(trainable_cache, tmp_path, capsys, corrupt):
    import ray

    cache = shutil.copytree(trainable_cache, tmp_path / trainable_cache.name)
    corrupt(cache / "shard-00001.arrow")
    was_running = ray.is_initialized()
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "runs"), "--drafter", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "shard-00001.arrow" in err and len(err.strip().splitlines()) == 1
    assert ray.is_initialized() == was_running and not (tmp_path / "runs").exists()
