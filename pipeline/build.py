"""The target-pass driver: plan shards, dispatch them to TargetWorker actors on Ray, own the manifest.

The driver tokenizes, plans and records; it never holds a logit. Workers compute top-k, write and
commit shard files, and return a ShardInfo that the driver records in the manifest. A rerun of the
same build resumes by skipping committed shards; the finished cache (manifest + shard files) is
byte-identical to an uninterrupted build. `stats.json` (timings of the last run) is not part of that
content: it differs between runs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.ray_session import ray_session  # noqa: E402
from pipeline.target_pass import BuildError, Sample, aux_layers  # noqa: E402
from pipeline.target_worker import SHARDS_IN_FLIGHT, ShardTask, WorkerSpec  # noqa: E402
from trainer.precision import AUTO_HELP, DTYPE_CHOICES, resolve_dtype  # noqa: E402
from trainer.settings import ConfigError, check_settings, setting  # noqa: E402

STATS_NAME = "stats.json"
MASK_RULES = "assistant-content+closing-special-v1"  # version of pipeline.resolve.chat's loss-mask rules
FEATURE_NAMES = ("last", "aux")
DEVICES = ("auto", "cpu", "cuda")
ACTOR_PREFIX = "lkspec-target"
ACTOR_NAMESPACE = "lkspec"
MAX_SKIP_EXAMPLES = 20
REGENERATED_TOKENS = 256  # longest regenerated reply unless --max-new-tokens says otherwise


def parse_features(text: str) -> tuple[str, ...]:
    """'none' | 'last' | 'aux' | 'last,aux' -> a tuple of feature names."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["none"] or not names:
        return ()
    unknown = [n for n in names if n not in FEATURE_NAMES]
    if unknown:
        raise ConfigError(f"must be none, last, aux or last,aux, got {text!r}", key="features")
    return tuple(n for n in FEATURE_NAMES if n in names)


@dataclass
class BuildConfig:
    """Everything `lkspec cache build` takes; `validate()` checks it before anything starts."""

    target: str = setting(help="model: smollm2-135m, a Hugging Face directory or a .gguf")
    data: str = setting(help="dataset: sharegpt, alpaca-demo, or a .jsonl/.json/.parquet file of 'messages' (OpenAI) "
                        "or 'conversations' (ShareGPT) rows")
    out: Path = setting(help="cache root; the cache goes to OUT/<key>")
    k: int = setting(64, ge=1, help="top-k log-probs kept per trained position")
    limit: int | None = setting(None, ge=1, help="keep the first N usable conversations (dataset order)")
    max_length: int = setting(1024, ge=2, help="truncate sequences to this many tokens")
    workers: int = setting(2, ge=1, help="TargetWorker actors")
    # auto: bf16 where the workers' device computes it natively, else fp32 (resolve_build_dtype)
    dtype: str = setting("auto", choices=DTYPE_CHOICES,
                         help=f"target precision; {AUTO_HELP}, judged for --device (with --device cuda on a cluster "
                         "whose GPUs this machine cannot see, auto is fp32: pass bf16). The resolved dtype enters "
                         "the cache key")
    device: str = setting("auto", choices=DEVICES, help="where the target runs: cuda puts each worker on its own "
                          "GPU(s); auto picks cuda when the Ray cluster has GPUs")
    gpus_per_worker: int | str = setting(
        "auto", auto=True, ge=1, metavar="N|auto",
        help="GPUs each cuda worker holds, the target split over them layer by layer; auto: the fewest whose memory "
        "holds the weights and a batch (see `lkspec plan`)")
    features: tuple[str, ...] = setting(
        (), choices=FEATURE_NAMES, parse=parse_features, expected="none, last, aux or last,aux",
        help="hidden-state features to store: none, last, aux (EAGLE-3 low/mid/high) or last,aux (default: none)")
    regenerate: bool = setting(False, help="replace each assistant reply by one sampled from the target at T=1")
    max_new_tokens: int | None = setting(
        None, ge=1, help=f"longest regenerated reply, with --regenerate (default: {REGENERATED_TOKENS})")
    seed: int = setting(0, ge=0, help="seed of the regenerated replies")
    skip_invalid: bool = setting(False, help="skip and count malformed rows instead of stopping at the first")
    shard_size: int = setting(64, ge=1, help="sequences per shard (the unit of work)")
    token_budget: int = setting(8192, ge=1, help="padded tokens per forward batch")
    threads: int | None = setting(None, ge=1, help="torch threads per worker (default: CPUs / workers)")
    address: str | None = setting(None, help="Ray cluster to use, e.g. 127.0.0.1:6379 (default: start a local one)")
    progress: bool = setting(True, help="no progress bar")
    max_attempts: int = setting(3, cli=False, ge=1, help="attempts per shard, counting attempts lost to dead actors")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad setting."""
        self.out = Path(self.out).expanduser()
        if isinstance(self.features, str):
            self.features = parse_features(self.features)
        check_settings(self)
        self.features = tuple(name for name in FEATURE_NAMES if name in self.features)
        if self.max_new_tokens is not None and not self.regenerate:
            raise ConfigError("only applies with --regenerate", key="max_new_tokens")
        if self.token_budget < self.max_length:
            raise ConfigError(f"({self.token_budget}) must be >= max_length ({self.max_length}) so that the longest "
                              "sequence fits in a batch", key="token_budget")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"must be a directory, {self.out} is a file", key="out")
        if self.device == "cuda" and not (self.address or os.environ.get("RAY_ADDRESS")) and not _local_cuda():
            raise ConfigError("cuda needs a GPU, and torch sees no CUDA device on this machine: use --device cpu "
                              "(or auto), or --address of a Ray cluster with GPU nodes", key="device")

    def reply_tokens(self) -> int:
        """The longest regenerated reply."""
        return REGENERATED_TOKENS if self.max_new_tokens is None else self.max_new_tokens

    def threads_per_worker(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_build_dtype(config: BuildConfig) -> str:
    """The target's dtype (fp32 or bf16) for the workers' device, resolved before the cache key is computed.

    Device auto is judged on this machine (cuda when torch sees a GPU here); a remote cluster's GPUs
    are not visible here, so `--device cuda --dtype auto` without a local GPU resolves to fp32.
    """
    device = config.device if config.device != "auto" else ("cuda" if _local_cuda() else "cpu")
    return resolve_dtype(config.dtype, device)


@dataclass
class BuildOutcome:
    """What a build produced: the cache directory, whether it already existed complete, the run stats."""

    path: Path
    key: str
    reused: bool
    stats: dict = field(default_factory=dict)


@dataclass
class _Target:
    """The resolved target as the driver sees it: identity and shapes, no weights."""

    path: Path
    identity: dict
    tokenizer: object
    tokenizer_sha256: str
    chat_template_sha256: str
    vocab_size: int
    hidden_size: int
    num_layers: int


def build_cache(config: BuildConfig) -> Path:
    """Build (or resume, or reuse) the cache for `config`; returns the cache directory ROOT/<key>."""
    return run_build(config).path


def run_build(config: BuildConfig, log: Callable[[str], None] | None = None) -> BuildOutcome:
    """build_cache with the details: whether the cache was reused, and the stats of this run.

    The build holds the cache directory's exclusive lock: a second build of the same cache waits
    (saying so once), then reuses the finished cache, or resumes it if the first build died.
    """
    from cache import content_key, lock_cache
    from pipeline.resolve.datasets import open_dataset

    log = log or _stderr
    started = time.perf_counter()
    config.validate()
    config = replace(config, dtype=resolve_build_dtype(config))  # the key, manifest and stats get fp32 or bf16
    target = _load_target(config)
    dataset = open_dataset(config.data)
    identity = cache_identity(config, target, dataset.identity)
    key = content_key(identity)
    cache_dir = config.out / key
    waited: list[Path] = []

    def report_wait(lock_path: Path) -> None:
        if not waited:
            log(f"waiting for another build of cache {key} to release {lock_path}")
        waited.append(lock_path)

    with lock_cache(cache_dir, exclusive=False, on_wait=report_wait):  # a complete cache needs no more
        reused = _reuse_complete(cache_dir, key, log)
    if reused:
        return reused
    try:
        lock = lock_cache(cache_dir, exclusive=True, on_wait=report_wait)
    except OSError as exc:
        raise _disk_error(exc, cache_dir) from None
    with lock:
        return _reuse_complete(cache_dir, key, log) or _build_locked(
            config, target, dataset, identity, lock, log, started)


def _reuse_complete(cache_dir: Path, key: str, log: Callable[[str], None]) -> BuildOutcome | None:
    """The outcome of reusing `cache_dir` if it holds a complete cache (the caller holds its lock)."""
    from cache import load_manifest

    if not (cache_dir / "manifest.json").is_file():
        return None
    manifest = load_manifest(cache_dir)
    if not manifest["complete"]:
        return None
    log(f"reusing cache {key}: {manifest['num_sequences']} sequences, "
        f"{manifest['num_positions']} positions, already complete in {cache_dir}")
    return BuildOutcome(cache_dir, key, True, _read_stats(cache_dir))


def _build_locked(config: BuildConfig, target: _Target, dataset, identity: dict, lock, log: Callable[[str], None],
                  started: float) -> BuildOutcome:
    """Plan, create or resume the manifest, compute the missing shards and finalize, under the exclusive `lock`."""
    from cache import create_manifest
    from cache.lock import remove_temp_files

    cache_dir = lock.path.parent
    key = cache_dir.name
    plan = plan_samples(dataset, target.tokenizer, config)
    samples = plan.samples
    shards = [ShardTask(i, tuple(samples[s:s + config.shard_size]))
              for i, s in enumerate(range(0, len(samples), config.shard_size))]
    features = feature_specs(config.features, target)
    try:
        manifest = create_manifest(cache_dir, key=key, identity=identity, k=config.k, vocab_size=target.vocab_size,
                                   tokenizer_sha256=target.tokenizer_sha256, features=features,
                                   num_shards_planned=len(shards), lock=lock)
    except OSError as exc:
        raise _disk_error(exc, cache_dir) from None
    committed = manifest.committed_indices()
    pending = [shard for shard in shards if shard.index not in committed]
    if committed:
        log(f"resuming cache {key}: {len(committed)} of {len(shards)} shards already committed")
    spec = WorkerSpec(
        model_path=str(target.path), dtype=config.dtype, cache_dir=str(cache_dir), k=config.k,
        vocab_size=target.vocab_size, features=config.features,
        feature_dims={name: spec["dim"] for name, spec in features.items()},
        aux_layers=tuple(features.get("aux", {}).get("layers", ())), token_budget=config.token_budget,
        threads=config.threads_per_worker(), regenerate=config.regenerate,
        max_new_tokens=config.reply_tokens(), max_length=config.max_length, seed=config.seed,
    )
    run = _RunState()
    if pending:
        cpus = max(os.cpu_count() or 1, config.workers * config.threads_per_worker())
        with ray_session(config.address, num_cpus=cpus):
            _dispatch(pending, spec, manifest, config, key, run)
    try:
        manifest.finalize()
    except OSError as exc:
        raise _disk_error(exc, cache_dir) from None
    remove_temp_files(lock)  # only the lock holder may: nobody else writes here now
    plan.skipped.update(run.skipped)
    stats = _stats(config, manifest, plan, len(shards) - len(pending), run, time.perf_counter() - started)
    _write_json(cache_dir / STATS_NAME, stats)
    if plan.skipped:
        log(skip_summary(plan.skipped))
    log(f"built cache {key} ({config.dtype} target): {stats['sequences']} sequences, {stats['positions']} positions, "
        f"{stats['bytes']['total'] / 2**20:.1f} MiB, {stats['wall_seconds']:.1f} s")
    return BuildOutcome(cache_dir, key, False, stats)


def skip_summary(skipped: Counter) -> str:
    """One line for the end of a build: how many rows were left out of the cache, and why."""
    reasons = "; ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
    return f"left out {sum(skipped.values())} row(s) ({reasons}); stats.json lists the first invalid rows"


def cache_identity(config: BuildConfig, target: _Target, dataset_identity: dict) -> dict:
    """Everything that changes the cache's bytes (the content key is its hash)."""
    return {
        "target": target.identity,
        "tokenizer_sha256": target.tokenizer_sha256,
        "chat_template_sha256": target.chat_template_sha256,
        "mask_rules": MASK_RULES,
        "dataset": {**dataset_identity, "limit": config.limit, "order": "file"},
        "k": config.k,
        "features": feature_specs(config.features, target),
        "max_length": config.max_length,
        "dtype": config.dtype,
        "generation": ({"regenerate": True, "temperature": 1.0, "max_new_tokens": config.reply_tokens(),
                        "seed": config.seed} if config.regenerate else {"regenerate": False}),
        "layout": {"shard_size": config.shard_size, "token_budget": config.token_budget},
    }


def feature_specs(features: tuple[str, ...], target: _Target) -> dict:
    """Manifest entries of the stored features: dimension and which hidden states they are."""
    specs = {}
    if "last" in features:
        specs["last"] = {"dim": target.hidden_size, "source": "final hidden state (after the final norm)"}
    if "aux" in features:
        specs["aux"] = {"dim": 3 * target.hidden_size, "layers": list(aux_layers(target.num_layers)),
                        "source": "hidden_states[i] = input of decoder layer i, low/mid/high concatenated"}
    return specs


def _load_target(config: BuildConfig) -> _Target:
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.resolve.chat import chat_template_sha256
    from pipeline.resolve.models import resolve_model, tokenizer_fingerprint

    resolved = resolve_model(config.target)
    model_config = AutoConfig.from_pretrained(resolved.path)
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    vocab_size = int(text_config.vocab_size)
    if config.k > vocab_size:
        raise ConfigError(f"({config.k}) is larger than the target's vocabulary ({vocab_size})", key="k")
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    return _Target(resolved.path, resolved.identity, tokenizer, tokenizer_fingerprint(tokenizer),
                   chat_template_sha256(tokenizer), vocab_size, int(text_config.hidden_size),
                   int(text_config.num_hidden_layers))


@dataclass
class Plan:
    """The sequences of a build, in dataset order, and what was left out."""

    samples: list[Sample]
    skipped: Counter  # reason -> rows
    skip_examples: list[str]  # the first messages, for stats.json
    truncated: int  # sequences cut to max_length


def plan_samples(dataset, tokenizer, config: BuildConfig) -> Plan:
    """Tokenize conversations in dataset order up to `limit`; invalid rows raise or are skipped and counted."""
    from pipeline.resolve.chat import ChatTemplateError, tokenize_conversation
    from pipeline.resolve.datasets import DataError, InvalidSampleError

    samples: list[Sample] = []
    skipped: Counter = Counter()
    examples: list[str] = []
    truncated = 0
    for item in dataset.conversations():
        if config.limit is not None and len(samples) >= config.limit:
            break
        if not isinstance(item, InvalidSampleError):
            try:
                tokens = tokenize_conversation(tokenizer, item.messages, config.max_length)
            except ChatTemplateError as exc:
                item = InvalidSampleError(item.where, "chat template", str(exc), item.sample_id)
        if isinstance(item, InvalidSampleError):
            if not config.skip_invalid:
                raise DataError(f"{item} (pass --skip-invalid to skip and count such rows)")
            skipped[item.reason] += 1
            if len(examples) < MAX_SKIP_EXAMPLES:
                examples.append(str(item))
            continue
        if tokens.num_positions == 0:
            skipped[f"no assistant token within --max-length {config.max_length}"] += 1
            continue
        truncated += tokens.truncated
        samples.append(Sample(item.sample_id, tokens.input_ids, tokens.loss_mask,
                              item.messages if config.regenerate else None))
    if not samples:
        raise DataError(f"{dataset.spec}: no usable conversation (skipped: {dict(skipped) or 'none'})")
    return Plan(samples, skipped, examples, truncated)


@dataclass
class _RunState:
    computed_shards: int = 0
    tokens: int = 0
    worker_seconds: float = 0.0
    worker_restarts: int = 0
    workers: int = 0
    device: str | None = None  # resolved device of the workers (None: nothing computed this run)
    gpus_per_worker: int = 0
    skipped: Counter = field(default_factory=Counter)


def worker_name(key: str, slot: int, generation: int) -> str:
    """Name of a TargetWorker actor (namespace "lkspec"): findable by tests and operators."""
    return f"{ACTOR_PREFIX}-{key[:12]}-{os.getpid()}-{slot}-{generation}"


def _dispatch(pending: list[ShardTask], spec: WorkerSpec, manifest, config: BuildConfig, key: str,
              run: _RunState) -> None:
    """Run the pending shards on a pool of actors; replace dead actors and redo their shards."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
    from tqdm import tqdm

    from cache import CacheError
    from pipeline.target_worker import TargetWorker

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    spec = replace(spec, device=worker_device(config.device, gpus))
    if cpus < spec.threads:
        raise BuildError(f"the Ray cluster has {cpus:g} CPUs, a worker needs {spec.threads} (--threads)")
    workers = min(config.workers, len(pending), max(1, int(cpus // spec.threads)))
    if workers < config.workers and workers < len(pending):
        _stderr(f"only {cpus:g} CPUs in the cluster: running {workers} workers of {spec.threads} threads")
    if spec.device == "cuda":
        placement, slots = place_target_on_gpus(Path(spec.model_path), config.target, config.gpus_per_worker,
                                                token_budget=spec.token_budget, dtype=spec.dtype, k=spec.k,
                                                features=spec.features)
        spec = replace(spec, gpus=placement.gpus_per_worker, max_memory_bytes=placement.max_memory_bytes)
        if slots < workers:
            workers = slots
            _stderr(f"{gpus:g} GPUs in the cluster: running {workers} workers of {spec.gpus} GPU(s) each")
    elif config.gpus_per_worker not in ("auto", 1):
        raise BuildError(f"--gpus-per-worker {config.gpus_per_worker} needs GPU workers, but they run on the CPU "
                         "(the cluster has no GPU, or --device cpu)")
    run.workers, run.device, run.gpus_per_worker = workers, spec.device, spec.gpus if spec.device == "cuda" else 0
    num_gpus = spec.gpus if spec.device == "cuda" else 0
    # threaded actors: one shard on the model while the previous one is encoded and written
    remote_worker = ray.remote(TargetWorker)
    generations = Counter()

    def start(slot: int):
        name = worker_name(key, slot, generations[slot])
        generations[slot] += 1
        return remote_worker.options(num_cpus=spec.threads, num_gpus=num_gpus, name=name,
                                     namespace=ACTOR_NAMESPACE, max_restarts=0, max_task_retries=0,
                                     max_concurrency=SHARDS_IN_FLIGHT).remote(spec)

    actors = {slot: start(slot) for slot in range(workers)}
    queue = deque(pending)
    attempts: Counter = Counter()
    in_flight: dict = {}  # ObjectRef -> (slot, actor, task)
    total_tokens = sum(len(s.input_ids) for task in pending for s in task.samples)
    progress = tqdm(total=total_tokens, unit="tok", unit_scale=True, disable=not config.progress,
                    desc=f"cache {key[:8]}", file=sys.stderr, dynamic_ncols=True)
    progress.set_postfix_str(f"0/{len(pending)} shards")
    try:
        while queue or in_flight:
            busy = Counter(slot for slot, _, _ in in_flight.values())
            for slot in sorted(actors):
                while queue and busy[slot] < SHARDS_IN_FLIGHT:
                    task = queue.popleft()
                    in_flight[actors[slot].run_shard.remote(task)] = (slot, actors[slot], task)
                    busy[slot] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            slot, actor, task = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except (RayActorError, WorkerCrashedError) as exc:
                attempts[task.index] += 1
                if attempts[task.index] >= config.max_attempts:
                    raise BuildError(f"shard {task.index} failed {attempts[task.index]} times because its worker "
                                     f"died (out of memory?): {_first_line(exc)}") from None
                queue.appendleft(task)
                if actor is actors[slot]:  # the other shard in flight on a dead actor finds it replaced
                    run.worker_restarts += 1
                    _stderr(f"worker {slot} died on shard {task.index}; starting a replacement and redoing it")
                    ray.kill(actor, no_restart=True)
                    actors[slot] = start(slot)
                continue
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, (BuildError, CacheError, ValueError, OSError)):
                    raise BuildError(f"shard {task.index}: {cause}") from None
                raise BuildError(f"shard {task.index} failed on a worker: {_first_line(exc)}") from None
            try:
                manifest.record_shard(result["info"])
            except OSError as exc:
                raise _disk_error(exc, manifest.path) from None
            run.computed_shards += 1
            run.tokens += result["tokens"]
            run.worker_seconds += result["seconds"]
            run.skipped.update(result["skipped"])
            progress.update(sum(len(s.input_ids) for s in task.samples))
            progress.set_postfix_str(f"{run.computed_shards}/{len(pending)} shards")
    finally:
        progress.close()
        for actor in actors.values():
            ray.kill(actor, no_restart=True)


def place_target_on_gpus(model_dir: Path, name: str, gpus_per_worker: int | str, *, token_budget: int, dtype: str,
                         k: int, features: tuple[str, ...] = ()):
    """(Placement, worker slots in the cluster) of a target on the Ray cluster's GPUs, from its config.json.

    `gpus_per_worker` is a number, or `auto` for the fewest GPUs that hold the weights and a batch
    (pipeline.plan.plan_placement); BuildError when that many do not fit on one node.
    """
    import ray

    from pipeline.plan import PlanError, plan_placement, read_model_shape

    node_gpus = [int(node["Resources"].get("GPU", 0)) for node in ray.nodes() if node["Alive"]]
    shape = read_model_shape(json.loads((model_dir / "config.json").read_text()), name=name)
    try:
        placement = plan_placement(shape, gpu_memory_bytes=_gpu_memory_bytes(), gpus_per_node=max(node_gpus),
                                   token_budget=token_budget, dtype=dtype, k=k, features=features,
                                   gpus=None if gpus_per_worker == "auto" else int(gpus_per_worker))
    except PlanError as exc:
        raise BuildError(f"--gpus-per-worker {gpus_per_worker}: {exc}") from None
    return placement, sum(count // placement.gpus_per_worker for count in node_gpus)


def _gpu_memory_bytes() -> int:
    """Memory of one of the cluster's GPUs (Ray does not report it: a one-GPU task asks torch)."""
    import ray

    def total_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(ray.remote(num_gpus=1, num_cpus=0)(total_memory).remote())


def worker_device(requested: str, cluster_gpus: float) -> str:
    """The TargetWorkers' device: `auto` is cuda when the cluster has a GPU; cuda without one is a BuildError."""
    if requested == "cuda" and cluster_gpus < 1:
        raise BuildError(f"--device cuda: the Ray cluster has {cluster_gpus:g} GPUs; a worker needs one "
                         "(use --device cpu or auto)")
    if requested == "auto":
        return "cuda" if cluster_gpus >= 1 else "cpu"
    return requested


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _disk_error(exc: OSError, where: Path) -> Exception:
    import errno

    if exc.errno == errno.ENOSPC:
        return BuildError(f"no space left on the device while writing to {where}: free space and rerun the "
                          "same command (committed shards are kept; no partial file is ever accepted)")
    return exc


def _stats(config: BuildConfig, manifest, plan: Plan, reused_shards: int, run: _RunState, wall: float) -> dict:
    """stats.json: what was built and how fast (differs between runs; not part of the cache content)."""
    shard_bytes: Counter = Counter()
    for info in manifest.shard_infos():
        shard_bytes.update(info.bytes)
    positions = manifest["num_positions"]
    total_bytes = sum(shard_bytes.values())
    return {
        "key": manifest["key"],
        "target": config.target,
        "data": config.data,
        "sequences": manifest["num_sequences"],
        "positions": positions,
        "truncated_sequences": plan.truncated,
        "skipped": {"total": sum(plan.skipped.values()), "reasons": dict(sorted(plan.skipped.items())),
                    "examples": plan.skip_examples},
        "bytes": {**dict(sorted(shard_bytes.items())), "total": total_bytes},
        "bytes_per_position": total_bytes / positions if positions else None,
        "shards": {"planned": manifest["num_shards_planned"], "computed_this_run": run.computed_shards,
                   "already_committed": reused_shards},
        "wall_seconds": round(wall, 3),
        "tokens_this_run": run.tokens,
        "tokens_per_second": round(run.tokens / wall, 1) if wall > 0 else None,
        "worker_seconds": round(run.worker_seconds, 3),
        "workers": run.workers,
        "threads_per_worker": config.threads_per_worker(),
        "worker_restarts": run.worker_restarts,
        "dtype": config.dtype,
        "device": run.device,
        "gpus_per_worker": run.gpus_per_worker,
        "k": config.k,
        "features": list(config.features),
    }


def _read_stats(cache_dir: Path) -> dict:
    try:
        return json.loads((cache_dir / STATS_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, value: dict) -> None:
    from cache.atomic import atomic_write

    try:
        atomic_write(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())
    except OSError as exc:
        raise _disk_error(exc, path) from None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
