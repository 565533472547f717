"""`lkspec bench` as a Ray job: speculative decoding of benchmark prompts, sharded over actors.

Each actor holds the target and every drafter, pins its torch threads, and decodes one prompt at a
time: the target alone (the baseline) and then each drafter, at each temperature, timed back to
back on the same cores. A drafter is a run directory or an export of any family (trainer.drafters:
an independent causal LM, EAGLE-3, MEDUSA, an MLP speculator), loaded by eval.load_drafter; the
families that read the target's hidden states are checked against the target's shape first. The
driver merges the per-prompt results into report.json / report.md / plots (see eval/report.py) and
a per-prompt outputs.jsonl, each written atomically (cache.atomic), report.json last.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.ray_session import ray_session
from trainer.precision import AUTO_HELP, DTYPE_CHOICES, resolve_dtype
from trainer.settings import ConfigError, check_settings, setting

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")  # any one: a tokenizer ships
BENCH_DEVICE = "cpu"  # where BenchWorker actors decode


@dataclass
class BenchConfig:
    """Everything `lkspec bench` needs; `validate()` checks values that do not need models."""

    target: str = setting(help="target model: alias, HF directory or .gguf file")
    drafters: list[str] = setting(
        key="drafter", metavar="RUN_OR_DIR[,...]", expected="at least one drafter (run directory or HF directory)",
        help="drafters: training run directories (run.json + model/), EAGLE-3 exports (config.json + "
        "model.safetensors, vLLM/SGLang layout) or HF directories")
    benchmarks: list[str] = setting(["mt-bench", "humaneval", "gsm8k"], key="bench", metavar="NAME[,...]",
                                    help='mt-bench, humaneval, gsm8k or .jsonl files of {"prompt": ...} lines '
                                    "(default: all three)")
    limit: int | None = setting(None, ge=1, expected=">= 1",  # N evenly spaced prompts per benchmark (None: all)
                                help="N evenly spaced prompts per benchmark (deterministic; default: all)")
    temperatures: list[float] = setting([0.0], key="temperature", ge=0, expected=">= 0", metavar="T[,...]",
                                        help="sampling temperatures, 0 = greedy (default: 0)")
    k: int = setting(7, ge=1, expected=">= 1 (drafted tokens per step)", help="drafted tokens per target forward")
    max_new_tokens: int = setting(256, ge=1, expected=">= 1", help="per prompt")
    workers: int = setting(1, ge=1, expected=">= 1", help="Ray actors, each holding all models")
    threads_per_worker: int | None = setting(None, key="threads", ge=1,  # default: the cluster's CPUs / workers
                                             help="torch threads per worker (default: cluster CPUs / workers)")
    seed: int = setting(0, ge=0, help="sampling seed (T > 0)")
    # auto: bf16 only where BENCH_DEVICE computes it natively; run_bench resolves it
    dtype: str = setting("auto", choices=DTYPE_CHOICES, help=f"precision of the target and drafters (default "
                         f"{AUTO_HELP}); the report records the resolved one")
    # fp32 on a CPU: eval.few_row_linear's products for decode and verification forwards
    few_row_gemm: bool = setting(True, help="fp32 on a CPU: torch's own nn.Linear for every product (default: "
                                 "inputs of up to 5 rows are multiplied without reading the weights once per row; "
                                 "docs/eval.md)")
    # GPUs per actor's target: auto = none on a CPU cluster, else the fewest that hold it
    gpus_per_worker: int | str = setting(
        "auto", auto=True, ge=0, metavar="N|auto",
        help="GPUs each actor's target holds, split over them layer by layer (auto: none on a CPU cluster, else the "
        "fewest that hold the target; 0: decode on the CPU)")
    out: Path = setting(Path("bench-report"), help="report directory")
    address: str | None = setting(None, help="existing Ray cluster (default: start a private local one)")
    progress: bool = setting(True, help="no progress bar")

    def validate(self) -> None:
        """Reject bad values with a message naming the setting."""
        from pipeline.resolve.prompts import BENCHMARKS, is_benchmark

        check_settings(self)
        for name in self.benchmarks:
            if not is_benchmark(name):
                raise ConfigError(
                    f"unknown benchmark {name!r}: expected one of {', '.join(BENCHMARKS)} "
                    "or a .jsonl file of {\"prompt\": ...} lines"
                )


@dataclass(frozen=True)
class BenchedDrafter:
    """A drafter to benchmark: display name, model directory, kind and its training run record."""

    name: str
    path: Path
    run: dict | None = None
    kind: str = "independent"  # its family (trainer.drafters): independent, eagle3, medusa or mlp


def resolve_drafter(spec: str) -> BenchedDrafter:
    """A training run directory (run.json + model/), an export of any drafter family, a HF directory, or a model alias."""
    from pipeline.resolve.models import EMBEDDED_MODELS, resolve_model

    path = Path(spec).expanduser()
    if (path / "run.json").is_file():
        model_dir = path / "model"
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"drafter run {spec!r} has run.json but no exported model in {model_dir}")
        return BenchedDrafter(path.resolve().name, model_dir.resolve(),
                              json.loads((path / "run.json").read_text()), _drafter_kind(model_dir))
    if (path / "config.json").is_file():
        return BenchedDrafter(path.resolve().name, path.resolve(), kind=_drafter_kind(path))
    if spec in EMBEDDED_MODELS:
        return BenchedDrafter(spec, resolve_model(spec).path)
    raise ConfigError(
        f"drafter {spec!r} not found: expected a training run directory (run.json + model/), an EAGLE-3, "
        "MEDUSA or MLP speculator export (config.json + model.safetensors) or a Hugging Face directory with "
        "config.json"
    )


def _drafter_kind(model_dir: Path) -> str:
    from trainer.drafters import family_of_dir

    return family_of_dir(model_dir).name


def run_bench(config: BenchConfig) -> Path:
    """Run the benchmark and write the report into config.out; returns that directory."""
    from cache.atomic import atomic_write
    from eval.report import BASELINE, summarize, write_report
    from pipeline.resolve.models import ModelNotFoundError, resolve_model
    from pipeline.resolve.prompts import PromptSetError

    config.validate()
    config = replace(config, dtype=resolve_dtype(config.dtype, BENCH_DEVICE))  # the report records fp32 or bf16
    try:
        target = resolve_model(config.target)
    except ModelNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    drafters = _unique_names([resolve_drafter(spec) for spec in config.drafters])
    tokenizer = _check_tokenizers(target.path, drafters)
    _check_drafter_targets(target.path, drafters)
    _check_vocab_sizes(target.path, drafters)
    try:
        items = _prompt_items(config, tokenizer)
    except PromptSetError as exc:
        raise ConfigError(str(exc)) from exc
    out = Path(config.out)
    settings = _settings_sha256(config, target, drafters, items)
    if _is_finished(out, settings):  # a rerun (e.g. after Ctrl-C later on) reuses the finished report
        print(f"reusing the finished benchmark report in {out} (same target, drafters, prompts and settings)",
              file=sys.stderr, flush=True)
        return out
    (out / "report.json").unlink(missing_ok=True)  # an old report never passes for this run's, half written

    started = time.time()
    with ray_session(config.address):
        records, threads = _run_on_actors(config, target.path, drafters, items)
    elapsed = time.time() - started

    order = {name: i for i, name in enumerate([BASELINE] + [d.name for d in drafters])}
    bench_order = {item["benchmark"]: i for i, item in reversed(list(enumerate(items)))}
    records.sort(key=lambda r: (bench_order[r["benchmark"]], r["index"], r["temperature"], order[r["drafter"]]))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "outputs.jsonl", "".join(
        json.dumps({**_public(record), "output_ids": record["output_ids"],
                    "text": tokenizer.decode(record["output_ids"], skip_special_tokens=False)}) + "\n"
        for record in records).encode())
    report = summarize(records, drafters=[d.name for d in drafters], k=config.k)
    report["config"] = {**asdict(config), "out": str(out), "threads_per_worker": threads}
    report["target"] = {"spec": target.spec, "path": str(target.path), "identity": target.identity}
    report["drafters"] = [{"name": d.name, "path": str(d.path), "kind": d.kind, "run": d.run} for d in drafters]
    report["wall_seconds"] = elapsed
    report["settings_sha256"] = settings
    write_report(report, out)
    return out


def _settings_sha256(config: BenchConfig, target, drafters: list[BenchedDrafter], items: list[dict]) -> str:
    """What a report depends on: its settings, the target's identity, each drafter's files, the prompts."""
    settings = {key: value for key, value in asdict(config).items() if key not in ("out", "address", "progress")}
    stamps = [{"name": d.name, "kind": d.kind, "path": str(d.path),
               "files": sorted((str(f.relative_to(d.path)), f.stat().st_size, f.stat().st_mtime_ns)
                               for f in d.path.rglob("*") if f.is_file())} for d in drafters]
    payload = {"settings": settings, "target": target.identity, "drafters": stamps, "prompts": items}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _is_finished(out: Path, settings: str) -> bool:
    """Whether out holds a complete report of these settings (report.json and every file written with it)."""
    from eval.report import PLOTS, read_report

    report = read_report(out)  # None when missing, or unreadable (with a warning naming it)
    if report is None:
        return False
    files = ["outputs.jsonl", "report.md", *PLOTS]
    return report.get("settings_sha256") == settings and all((out / name).is_file() for name in files)


# --- driver-side preparation ------------------------------------------------------------------

def _unique_names(drafters: list[BenchedDrafter]) -> list[BenchedDrafter]:
    from eval.report import BASELINE

    seen: dict[str, int] = {}
    unique = []
    for drafter in drafters:
        seen[drafter.name] = seen.get(drafter.name, 0) + 1
        name = drafter.name if seen[drafter.name] == 1 else f"{drafter.name}-{seen[drafter.name]}"
        unique.append(BenchedDrafter(name, drafter.path, drafter.run, drafter.kind))
    if any(d.name == BASELINE for d in unique):
        raise ConfigError(f"a drafter may not be named {BASELINE!r} (reserved for the target alone)")
    return unique


def _check_tokenizers(target_path: Path, drafters: list[BenchedDrafter]):
    """The target's tokenizer, after checking that every drafter's tokenizer is the same.

    An EAGLE-3, MEDUSA or MLP speculator export need not ship tokenizer files (vLLM and SGLang use the
    target's); when it has none, its vocabulary size is checked against the target's instead
    (`_check_drafter_targets`).
    """
    from transformers import AutoConfig

    from pipeline.resolve.models import tokenizer_fingerprint

    target_tokenizer = _load_tokenizer(target_path, "target")
    target_sha = tokenizer_fingerprint(target_tokenizer)
    target_config = AutoConfig.from_pretrained(target_path)
    for drafter in drafters:
        if drafter.kind != "independent" and not any((drafter.path / name).is_file() for name in TOKENIZER_FILES):
            continue
        # An export's config.json is no Hugging Face model config: its tokenizer is read with the target's.
        config = None if drafter.kind == "independent" else target_config
        drafter_sha = tokenizer_fingerprint(_load_tokenizer(drafter.path, f"drafter {drafter.name!r}", config))
        if drafter_sha != target_sha:
            raise ConfigError(
                f"drafter {drafter.name!r} ({drafter.path}) has a different tokenizer than the target "
                f"({target_path}): drafter tokenizer sha {drafter_sha[:12]}…, target {target_sha[:12]}…"
            )
    return target_tokenizer


def _check_drafter_targets(target_path: Path, drafters: list[BenchedDrafter]) -> None:
    """Refuse a drafter whose target hidden size, vocabulary or layers do not fit the target (from its config)."""
    from transformers import AutoConfig

    from trainer.drafters import DrafterMismatchError, family
    from trainer.drafters.base import ExportFormatError

    readers = [d for d in drafters if d.kind != "independent"]
    if not readers:
        return
    target_config = AutoConfig.from_pretrained(target_path)
    for drafter in readers:
        kind = family(drafter.kind)
        try:
            kind.check_target(kind.read_config(drafter.path), target_config)
        except (DrafterMismatchError, ExportFormatError) as exc:
            raise ConfigError(f"drafter {drafter.name!r} ({drafter.path}): {exc} (target {target_path})") from exc


def _check_vocab_sizes(target_path: Path, drafters: list[BenchedDrafter]) -> None:
    """Refuse an independent drafter whose vocabulary is smaller than the target's (it cannot read every token)."""
    from transformers import AutoConfig

    def vocab_size(path: Path) -> int | None:
        config = AutoConfig.from_pretrained(path)
        return getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)

    independent = [d for d in drafters if d.kind == "independent"]
    if not independent:
        return
    target_vocab = vocab_size(target_path)
    for drafter in independent:
        drafter_vocab = vocab_size(drafter.path)
        if not isinstance(drafter_vocab, int) or drafter_vocab < target_vocab:
            raise ConfigError(f"target {target_path} has vocabulary size {target_vocab}, drafter "
                                   f"{drafter.path} has vocab_size {drafter_vocab}")


def _load_tokenizer(path: Path, what: str, config=None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, config=config)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{what} at {path} has no loadable tokenizer files: {exc}") from exc


def _prompt_items(config: BenchConfig, tokenizer) -> list[dict]:
    """Every benchmark prompt rendered with the target's chat template, as token ids."""
    from pipeline.resolve.prompts import benchmark_name, load_prompts

    items = []
    for bench in config.benchmarks:
        for index, prompt in enumerate(load_prompts(bench, config.limit)):
            items.append({
                "benchmark": benchmark_name(bench), "index": index, "id": prompt.id,
                "input_ids": encode_chat(tokenizer, prompt.text),
            })
    return items


def encode_chat(tokenizer, text: str) -> list[int]:
    """Token ids of one user message under the chat template, ready for the assistant's answer."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


# --- Ray --------------------------------------------------------------------------------------

def _run_on_actors(config: BenchConfig, target_path: Path, drafters: list[BenchedDrafter], items: list[dict]):
    """Shard prompts over `workers` actors (one prompt per call) and gather every record."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    node_cpus = max(int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"])
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = config.threads_per_worker or max(1, min(node_cpus, total_cpus // config.workers))
    if threads > node_cpus:
        raise ConfigError(f"threads_per_worker={threads} exceeds the largest node's {node_cpus} CPUs: "
                               "no actor could ever be placed")
    gpus, max_memory, workers = _target_gpus(config, target_path, items)
    actor_cls = ray.remote(num_cpus=threads, num_gpus=gpus)(BenchWorker)
    actors = [
        actor_cls.remote(
            str(target_path), [(d.name, str(d.path)) for d in drafters], dtype=config.dtype,
            threads=threads, k=config.k, temperatures=list(config.temperatures),
            max_new_tokens=config.max_new_tokens, seed=config.seed, gpus=gpus, max_memory_bytes=max_memory,
            few_row_gemm=config.few_row_gemm,
        )
        for _ in range(workers)
    ]
    try:
        records = []
        pool = ActorPool(actors)
        results = pool.map_unordered(lambda actor, item: actor.run.remote(item), items)
        for prompt_records in tqdm(results, total=len(items), desc="bench", unit="prompt",
                                   disable=not config.progress):
            records.extend(prompt_records)
        return records, threads
    finally:
        for actor in actors:
            ray.kill(actor)


def _target_gpus(config: BenchConfig, target_path: Path, items: list[dict]) -> tuple[int, int, int]:
    """(GPUs per actor, weight budget per GPU, actors): none on a CPU cluster, else as `cache build` places targets."""
    import ray

    from pipeline.build import place_target_on_gpus
    from pipeline.target_pass import BuildError

    if ray.cluster_resources().get("GPU", 0) < 1 or config.gpus_per_worker == 0:
        if config.gpus_per_worker not in ("auto", 0):
            raise ConfigError(f"gpus_per_worker={config.gpus_per_worker}: the Ray cluster has no GPU")
        return 0, 0, config.workers
    longest = max(len(item["input_ids"]) for item in items) + config.max_new_tokens + config.k + 1
    try:
        placement, slots = place_target_on_gpus(target_path, config.target, config.gpus_per_worker,
                                                token_budget=longest, dtype=config.dtype, k=1)
    except BuildError as exc:
        raise ConfigError(str(exc)) from None
    return placement.gpus_per_worker, placement.max_memory_bytes, max(1, min(config.workers, slots))


class BenchWorker:
    """Holds the target and the drafters; decodes one prompt under every setting per call."""

    def __init__(self, target_path: str, drafters: list[tuple[str, str]], *, dtype: str, threads: int,
                 k: int, temperatures: list[float], max_new_tokens: int, seed: int, gpus: int = 0,
                 max_memory_bytes: int = 0, few_row_gemm: bool):
        import torch

        from eval import load_drafter
        from eval.attention import use_grouped_kv_heads_on_cpu
        from eval.few_row_linear import set_few_row_gemm
        from eval.report import BASELINE
        from pipeline.resolve.models import load_model
        from pipeline.target_pass import load_placed_model

        torch.set_num_threads(threads)
        if gpus > 1:  # split over the actor's GPUs; the drafters go to the first
            self.target = load_placed_model(target_path, dtype=dtype,
                                            max_memory={gpu: max_memory_bytes for gpu in range(gpus)})
        else:
            self.target = load_model(target_path, dtype=dtype, device="cuda" if gpus else "cpu")
        use_grouped_kv_heads_on_cpu(self.target.device)  # cheaper (K+1)-token verification forwards
        self.drafters = [(BASELINE, None)] + [(name, load_drafter(path, self.target)) for name, path in drafters]
        for model in [self.target] + [drafter for _, drafter in self.drafters[1:]]:
            set_few_row_gemm(model, few_row_gemm)  # fp32 on a CPU; a no-op otherwise
        self.eos_token_id = self.target.generation_config.eos_token_id
        self.dtype = dtype  # the target's: its rounding step sets the near-tie tolerance at T = 0
        self.k, self.temperatures, self.max_new_tokens, self.seed = k, temperatures, max_new_tokens, seed
        self._decode([1, 2, 3], BASELINE, None, 0.0, max_new_tokens=4)  # warm-up before timing
        for name, drafter in self.drafters[1:]:
            self._decode([1, 2, 3], name, drafter, 0.0, max_new_tokens=4)

    def run(self, item: dict) -> list[dict]:
        """Decode one prompt with the target alone and with each drafter, at each temperature."""
        from eval.exactness import divergence

        records = []
        for temperature in self.temperatures:
            greedy = None  # the target's own output at T = 0: the baseline decodes first
            for name, drafter in self.drafters:
                key = f"{self.seed}|{item['benchmark']}|{item['id']}|{temperature}|{name}"
                seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
                record = self._decode(item["input_ids"], name, drafter, temperature, self.max_new_tokens, seed)
                if temperature == 0 and drafter is None:
                    greedy = record["output_ids"]
                elif temperature == 0 and greedy is not None:  # where it leaves greedy, and whether at a near-tie
                    record["divergence"] = divergence(self.target, item["input_ids"], greedy, record["output_ids"],
                                                      self.dtype)
                records.append({"benchmark": item["benchmark"], "index": item["index"], "id": item["id"],
                                "prompt_tokens": len(item["input_ids"]), **record})
        return records

    def _decode(self, input_ids, name, drafter, temperature, max_new_tokens, seed=0) -> dict:
        import torch

        from eval.speculative import speculative_generate

        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        output, stats = speculative_generate(
            self.target, drafter, torch.tensor(input_ids), k=self.k if drafter is not None else 0,
            temperature=temperature, max_new_tokens=max_new_tokens, eos_token_id=self.eos_token_id,
            generator=generator,
        )
        seconds = time.perf_counter() - start
        return {"drafter": name, "temperature": temperature, "seconds": seconds,
                "output_ids": output.tolist(), "stats": stats}


def _public(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "output_ids"}
