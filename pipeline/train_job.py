"""Drafter training on Ray Train: resolve and check every run first, then one TorchTrainer per run.

    configs = sweep_configs(TrainConfig(cache=..., out=..., drafter="tiny"), ["kl", "lk_lambda"])
    run_dirs = train_sweep(configs)          # -> [RUNS/kl-<key>-s0, RUNS/lk_lambda-<key>-s0]

Everything that can be wrong with a run (flag values, the cache, tokenizer / vocabulary mismatch,
the target, an existing run directory) fails in `plan_run` on the driver, before any worker starts.
All runs of a sweep read the same cache directory; nothing rebuilds or rewrites it.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.ray_session import ray_session
from trainer.config import RESUMABLE_CHANGES, ConfigError, RunPlan, TrainConfig, flag
from trainer.data import DataError, LoaderSpec, count_epoch_batches, heldout_split, scan_index
from trainer.drafters import Family, SpecContext, family_for
from trainer.rundir import (METRICS, PLAN_JSON, driver_record, iter_metrics, read_run, run_status, trim_metrics,
                            update_run, write_json)


class TrainingError(RuntimeError):
    """A training run failed on the cluster (the message carries the worker's error)."""


def sweep_configs(base: TrainConfig, losses: list[str]) -> list[TrainConfig]:
    """One config per loss (a sweep); an explicit run name gets the loss appended when there are several."""
    if not losses:
        raise ConfigError(f"{flag('loss')} needs at least one loss")
    if len(set(losses)) != len(losses):
        raise ConfigError(f"{flag('loss')} lists a loss twice: {','.join(losses)}")
    configs = []
    for loss in losses:
        name = base.run_name
        if name is not None and len(losses) > 1:
            name = f"{name}-{loss}"
        config = replace(base, loss=loss, run_name=name)
        config.validate()
        configs.append(config)
    return configs


def default_run_name(config: TrainConfig, cache_key: str) -> str:
    """[<family>-]<loss>-<first 8 digits of the cache key>-s<seed> (runs of different families never collide)."""
    return f"{family_for(config.drafter).run_prefix()}{config.loss}-{cache_key[:8]}-s{config.seed}"


def plan_run(config: TrainConfig) -> RunPlan:
    """Validate one run against its cache, drafter and target and resolve everything workers need."""
    from cache import CacheMismatchError, open_cache
    from pipeline.resolve.models import EMBEDDED_MODELS, resolve_model, tokenizer_fingerprint

    config.validate()
    cache_path = Path(config.cache).expanduser().resolve()
    reader = open_cache(cache_path)
    manifest = reader.manifest
    key, vocab_size = manifest["key"], manifest["vocab_size"]
    if manifest["num_sequences"] == 0:
        raise DataError(f"cache {cache_path} is empty (0 sequences): nothing to train on")

    identity = manifest["identity"]
    recorded = identity.get("target") if isinstance(identity.get("target"), dict) else None
    if config.target is not None:
        resolved = resolve_model(config.target)
        if recorded and not _same_model(recorded, resolved.identity):
            raise CacheMismatchError(
                f"cache {key} was built from target weights {str(recorded.get('weights_sha256'))[:16]}…, "
                f"--target {config.target} has weights {str(resolved.identity.get('weights_sha256'))[:16]}…")
        target_path = str(resolved.path)
    else:
        target_path = locate_target(cache_path, identity)
    scores_online = config.target_source == "online" or config.exact_heldout  # the target runs in each worker
    if (scores_online or config.init_embeddings_from == "target") and target_path is None:
        why = ("--target-source online" if config.target_source == "online" else "--exact-heldout"
               if config.exact_heldout else "--init-embeddings-from target")
        raise ConfigError(f"{why} needs the target model: pass --target MODEL "
                          f"(the cache's target was not found on this machine)")

    drafter_is_dir = Path(config.drafter).expanduser().is_dir()
    tokenizer_dir = str(Path(config.drafter).expanduser().resolve()) if drafter_is_dir else target_path
    if tokenizer_dir is None:
        raise ConfigError(f"{flag('drafter')} {config.drafter} is built from a config: pass --target MODEL "
                          "so its tokenizer can be checked and saved (the cache's target was not found here)")
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {tokenizer_dir}: {exc}") from exc
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint != manifest["tokenizer_sha256"]:
        raise CacheMismatchError(f"cache {key} was built with tokenizer sha256 {manifest['tokenizer_sha256']}, "
                                 f"the drafter's tokenizer ({tokenizer_dir}) has {fingerprint}")

    init_embeddings = target_config = None
    max_positions = 2048
    if target_path is not None:
        target_config = AutoConfig.from_pretrained(target_path)
        max_positions = int(getattr(target_config, "max_position_embeddings", max_positions) or max_positions)
        if scores_online and target_config.vocab_size != vocab_size:
            raise CacheMismatchError(f"cache {key} has vocabulary size {vocab_size}, the target "
                                     f"{target_path} has {target_config.vocab_size}")
        if config.init_embeddings_from == "target":
            init_embeddings = (target_path, int(target_config.hidden_size))
    index = _index(reader)
    max_positions = max([max_positions] + [e.num_tokens for e in index])
    split = heldout_split(index, config.heldout_fraction, config.eval_sequences)
    family = family_for(config.drafter)
    _check_feature_columns(family, manifest, cache_path)
    # A model alias (e.g. qwen2.5-coder-0.5b) becomes its local directory, fetched on first use.
    drafter = str(resolve_model(config.drafter).path) if config.drafter in EMBEDDED_MODELS else config.drafter
    spec = family.resolve(drafter, SpecContext(
        vocab_size=vocab_size, max_positions=max_positions,
        token_ids={"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id},
        features=manifest["features"], target_path=target_path, target_config=target_config,
        init_embeddings=init_embeddings, overrides=config.drafter_config,
        draft_vocabulary=lambda size: _draft_vocabulary(reader, size, split.heldout_threshold)))
    columns = list(family.columns)  # the feature columns the drafter reads
    reader.check_compatible(requires_features=columns)

    if split.num_train < config.workers:
        raise DataError(f"cache {key} has {split.num_train} training sequences for {config.workers} workers "
                        f"({flag('workers')}): each worker needs at least one")
    total_steps = config.steps if config.steps is not None else _steps_for_epochs(config, index, split)

    run_name = config.run_name or default_run_name(config, key)
    run_dir = Path(config.out).expanduser().resolve() / run_name
    plan = RunPlan(
        config=config, run_dir=str(run_dir), cache_path=str(cache_path), cache_key=key, vocab_size=vocab_size,
        k=manifest["k"], tokenizer_sha256=manifest["tokenizer_sha256"], tokenizer_dir=str(tokenizer_dir),
        drafter=spec.to_dict(), total_steps=total_steps, heldout_threshold=split.heldout_threshold,
        num_train_sequences=split.num_train, num_heldout_sequences=split.num_heldout, eval_ids=split.eval_ids,
        eval_shards={str(shard): ids for shard, ids in split.eval_shards.items()},
        target_path=target_path if scores_online else None, columns=columns,
    )
    _check_run_dir(plan)
    return plan


def _check_feature_columns(family: Family, manifest: dict, cache_path: Path) -> None:
    """Refuse a cache without the feature columns the family reads, naming the build command that adds them."""
    from cache import CacheMismatchError

    missing = [name for name in family.columns if name not in manifest["features"]]
    if not missing:
        return
    try:
        stats = json.loads((cache_path / "stats.json").read_text())
    except (OSError, ValueError):
        stats = {}
    names = ", ".join(f"'{name}'" for name in missing)
    raise CacheMismatchError(
        f"cache {manifest['key']} has no {names} feature column (features: "
        f"{', '.join(manifest['features']) or 'none'}): {family.reads}. Build a cache with them: "
        f"lkspec cache build --target {stats.get('target', 'MODEL')} --data {stats.get('data', 'DATA')} "
        f"--features {','.join(family.columns)} (plus the other flags of the original build)")


_INDEXES: dict[str, list] = {}
_VOCABULARIES: dict[tuple, object] = {}


def _draft_vocabulary(reader, size: int, heldout_threshold: int):
    """trainer.drafters.draft_vocabulary, computed once per process for a (cache, size, split) (a sweep)."""
    from trainer.drafters import draft_vocabulary

    key = (str(reader.path.resolve()), reader.manifest["key"], size, heldout_threshold)
    if key not in _VOCABULARIES:
        _VOCABULARIES.clear()
        _VOCABULARIES[key] = draft_vocabulary(reader, size, heldout_threshold)
    return _VOCABULARIES[key]


def _index(reader) -> list:
    """The cache's sequence index, scanned once per process (a cache key names immutable content)."""
    key = f"{reader.path.resolve()}:{reader.manifest['key']}"
    if key not in _INDEXES:
        _INDEXES.clear()
        _INDEXES[key] = scan_index(reader)
    return _INDEXES[key]


def _same_model(recorded: dict, identity: dict) -> bool:
    """Whether two model identities (pipeline.resolve.models) name the same weights and config."""
    keys = [k for k in ("weights_sha256", "config_sha256") if recorded.get(k) is not None]
    return bool(keys) and all(recorded[k] == identity.get(k) for k in keys)


def locate_target(cache_path: Path, identity: dict) -> str | None:
    """The local directory of the cache's target model, verified against its identity; None if not found.

    Tried in order: `target_path` in the identity; the target spec `lkspec cache build` wrote to the
    cache's stats.json; the models already converted under $LKSPEC_HOME/models.
    """
    from pipeline.resolve.home import lkspec_home
    from pipeline.resolve.models import IDENTITY_FILE, resolve_model

    if isinstance(identity.get("target_path"), str) and Path(identity["target_path"]).is_dir():
        return identity["target_path"]
    recorded = identity.get("target")
    if not isinstance(recorded, dict):
        return None
    try:
        spec = json.loads((cache_path / "stats.json").read_text()).get("target")
        if isinstance(spec, str):
            resolved = resolve_model(spec)
            if _same_model(recorded, resolved.identity):
                return str(resolved.path)
    except Exception:  # noqa: BLE001 - a hint only: absent, unreadable or not resolvable here
        pass
    models = lkspec_home() / "models"
    for identity_file in sorted(models.glob(f"*/{IDENTITY_FILE}")) if models.is_dir() else []:
        try:
            if _same_model(recorded, json.loads(identity_file.read_text())):
                return str(identity_file.parent)
        except ValueError:
            continue
    return None


def _steps_for_epochs(config: TrainConfig, index, split) -> int:
    """Optimizer steps for --epochs E: enough for every worker to see its share E times."""
    whole, fraction = int(config.epochs), config.epochs - int(config.epochs)
    longest = 0.0
    for rank in range(config.workers):
        spec = LoaderSpec(rank=rank, world_size=config.workers, seed=config.seed, batch_tokens=config.batch_tokens,
                          heldout_threshold=split.heldout_threshold, pool_sequences=config.pool_sequences)
        counts = [count_epoch_batches(index, spec, epoch) for epoch in range(whole + (fraction > 0))]
        longest = max(longest, sum(counts[:whole]) + (fraction * counts[whole] if fraction else 0.0))
    return max(1, math.ceil(longest))


def _check_run_dir(plan: RunPlan) -> None:
    """Refuse to overwrite a run; on --resume refuse a config that changes what is computed."""
    run_dir = Path(plan.run_dir)
    existing = read_run(run_dir)
    if existing is None:
        if run_dir.exists() and any(run_dir.iterdir()) and not plan.config.resume:
            raise ConfigError(f"{run_dir} exists and is not empty; choose another {flag('run_name')}")
        return
    if not plan.config.resume:
        raise ConfigError(f"{run_dir} already holds a run ({existing.get('status', '?')}); pass --resume to "
                          f"continue it or choose another {flag('run_name')}")
    before = existing.get("config", {})
    now = plan.config.to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k])
    if changed:
        details = ", ".join(f"{flag(k)} {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"--resume of {run_dir} with different settings ({details}); "
                          "a resumed run must compute exactly what the original would have")
    if existing.get("cache", {}).get("key") != plan.cache_key:
        raise ConfigError(f"--resume of {run_dir}: it trained on cache {existing.get('cache', {}).get('key')}, "
                          f"{flag('cache')} is {plan.cache_key}")
    if rescores_exact(plan, existing) and start_step(plan) != plan.total_steps:  # resuming would train it again
        raise ConfigError(f"{run_dir} is done but its checkpoint of step {plan.total_steps} is gone: "
                          f"{flag('exact_heldout')} cannot score it without training it again")


def train_sweep(configs: list[TrainConfig], *, address: str | None = None, progress: bool = True) -> list[Path]:
    """Plan every run (all checks before Ray), then train them in order; return the run directories.

    Consecutive runs with the same worker count share one Ray Train worker group (one TorchTrainer).
    """
    plans = [plan_run(config) for config in configs]
    dirs = [plan.run_dir for plan in plans]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"two runs of the sweep would share a directory: {sorted(dirs)}")
    groups: list[list[RunPlan]] = []
    for plan in plans:
        if groups and groups[-1][0].config.workers == plan.config.workers:
            groups[-1].append(plan)
        else:
            groups.append([plan])
    with ray_session(address):
        for group in groups:
            train_runs(group, progress=progress)
    return [Path(d) for d in dirs]


def train_runs(plans: list[RunPlan], *, progress: bool = True) -> None:
    """Train planned runs (same worker count) one after the other in one TorchTrainer on the connected cluster."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.loop import train_loop_per_worker

    todo = []
    for plan in plans:
        existing = read_run(Path(plan.run_dir))
        if plan.config.resume and existing and existing.get("status") == "done":
            if rescores_exact(plan, existing):
                _say(f"{Path(plan.run_dir).name}: done; its final evaluation again, with the exact held-out α")
                todo.append(replace(plan, rescore_exact=True))
            else:
                _say(f"{Path(plan.run_dir).name}: already done ({existing.get('steps_done')} steps), nothing to resume")
        else:
            todo.append(plan)
    if not todo:
        return
    workers = todo[0].config.workers
    if any(plan.config.workers != workers for plan in todo):
        raise ConfigError("runs trained together must use the same number of workers")
    use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    # a rescored run keeps its run.json (status done) and its plan.json as its training left them
    starts = [plan.total_steps if plan.rescore_exact else prepare_run_dir(plan, use_gpu) for plan in todo]
    first = Path(todo[0].run_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plans": [plan.to_dict() for plan in todo]},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"{first.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(first / "ray"), failure_config=FailureConfig(max_failures=0)),
    )
    watcher = _ProgressBar(todo, starts) if progress else None
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps the worker's exception; keep its message
        message = f"{type(exc).__name__}: {exc}"
        for plan in todo:
            if (read_run(Path(plan.run_dir)) or {}).get("status") in ("running", "pending"):
                update_run(Path(plan.run_dir), status="failed", error=message[-2000:])
        raise TrainingError(f"training failed: {message.strip().splitlines()[-1][:500]}") from exc
    finally:
        if watcher:
            watcher.stop()
    for plan in todo:
        run = read_run(Path(plan.run_dir)) or {}
        if run.get("status") not in ("done", "stopped"):
            update_run(Path(plan.run_dir), status="failed", error="the workers exited without finishing the run")
            raise TrainingError(f"run {Path(plan.run_dir).name}: the workers exited without finishing it")


def rescores_exact(plan: RunPlan, existing: dict) -> bool:
    """Whether resuming this finished run scores its final evaluation again, to add the exact held-out α."""
    return (plan.config.resume and plan.config.exact_heldout and existing.get("status") == "done"
            and "alpha_exact" not in (existing.get("heldout") or {}))


def start_step(plan: RunPlan) -> int:
    """The step the run's workers start from: its newest checkpoint's under --resume, else 0."""
    from trainer.checkpoint import CHECKPOINTS_DIR, latest_step

    return latest_step(Path(plan.run_dir) / CHECKPOINTS_DIR) if plan.config.resume else 0


def prepare_run_dir(plan: RunPlan, use_gpu: bool) -> int:
    """Write plan.json and the static part of run.json (status pending) before the workers start.

    Returns the step the workers start from; metrics.jsonl keeps only the lines up to it (a run
    interrupted before its first checkpoint starts over with an empty log, not the old run's lines).
    """
    run_dir, config = Path(plan.run_dir), plan.config
    start = start_step(plan)
    run_dir.mkdir(parents=True, exist_ok=True)
    trim_metrics(run_dir, start)
    write_json(run_dir / PLAN_JSON, plan.to_dict())
    update_run(
        run_dir, name=run_dir.name, status="pending", loss=config.loss, run_dir=str(run_dir),
        cache={"path": plan.cache_path, "key": plan.cache_key, "k": plan.k},
        drafter=_drafter_summary(plan.drafter), target_source=config.target_source, tail=config.tail,
        total_steps=plan.total_steps, steps_done=start, driver=driver_record(),
        config=config.to_dict(), world_size=config.workers, zero=config.zero, use_gpu=use_gpu,
        dtype=config.resolved_dtype("cuda" if use_gpu else "cpu", warn=True),  # the workers record theirs too
        heldout={"fraction": config.heldout_fraction, "num_heldout": plan.num_heldout_sequences,
                 "num_train": plan.num_train_sequences, "eval_sequences": len(plan.eval_ids)},
        error=None,
    )
    return start


def _drafter_summary(drafter: dict[str, Any]) -> dict[str, Any]:
    """run.json's drafter entry: the spec, a draft vocabulary's id list replaced by its size (plan.json has it)."""
    ids = drafter.get("draft_vocab")
    return {**drafter, "draft_vocab": len(ids)} if ids is not None else dict(drafter)


class _ProgressBar:
    """Driver-side tqdm bars, one per run in turn, fed by tailing each run's metrics.jsonl (rank 0 writes it).

    Each bar opens at the step its run starts from (prepare_run_dir: the last checkpoint's, 0 without one).
    """

    def __init__(self, plans: list[RunPlan], starts: list[int]):
        self.plans = list(zip(plans, starts))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for plan, start in self.plans:
            if not self._follow(plan, start):
                return

    def _follow(self, plan: RunPlan, start: int) -> bool:
        """Show one run until it ends; False when asked to stop first."""
        from tqdm import tqdm

        run_dir = Path(plan.run_dir)
        total = min(plan.total_steps, plan.config.stop_after or plan.total_steps)
        shown = start
        bar = tqdm(total=total, initial=shown, desc=run_dir.name, unit="step", file=sys.stderr, dynamic_ncols=True)
        last_eval: dict[str, Any] | None = None
        try:
            while True:
                stopping = self._stop.wait(0.5)
                for record in iter_metrics(run_dir / METRICS):
                    if record.get("step", 0) <= shown:
                        continue
                    last_eval = record.get("eval", last_eval)
                    postfix = {"loss": f"{record['loss']:.4f}", "alpha": f"{record['alpha'][0]:.3f}",
                               "tok/s": f"{record['tokens_per_s']:.0f}"}
                    if last_eval:
                        postfix["heldout_tau"] = f"{last_eval['tau']:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(record["step"] - shown)
                    shown = record["step"]
                status = (read_run(run_dir) or {}).get("status")
                if status in ("done", "stopped", "failed"):
                    return True
                if stopping:
                    return False
        finally:
            bar.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def list_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every run under runs_dir (sorted by name) with its status and headline metrics."""
    from trainer.heldout import acceptance_summary

    rows = []
    for run_dir in sorted(Path(runs_dir).expanduser().iterdir()) if Path(runs_dir).expanduser().is_dir() else []:
        run = read_run(run_dir)
        if run is None:
            continue
        final = run.get("final") or {}
        train, heldout = final.get("train") or {}, run.get("heldout") or {}
        if "alpha_drop" not in heldout and final.get("eval"):  # a run.json written before the measurement block
            heldout = acceptance_summary(final["eval"], (run.get("config") or {}).get("tau_draft_len"))
        best = run.get("best") or {}
        rows.append({
            "name": run_dir.name,
            "status": run_status(run),  # `interrupted` when its driver is gone
            "loss": run.get("loss"),
            "tail": run.get("tail"),
            "target": run.get("target_source"),
            "drafter": (run.get("drafter") or {}).get("label"),
            "cache": (run.get("cache") or {}).get("key"),
            "steps": f"{run.get('steps_done', 0) or 0}/{run.get('total_steps', '?')}",
            "train_loss": train.get("loss"),
            "train_alpha": (train.get("alpha") or [None])[0],
            "heldout_alpha_drop": heldout.get("alpha_drop"),  # per draft step: lower bound of α
            "heldout_alpha_bucket": heldout.get("alpha_bucket"),  # per draft step: upper bound of α
            "heldout_tau_drop": heldout.get("tau_drop"),
            "heldout_tau_bucket": heldout.get("tau_bucket"),
            "heldout_alpha_exact": heldout.get("alpha_exact"),  # per draft step, when scored (--exact-heldout)
            "heldout_tau_exact": heldout.get("tau_exact"),
            "heldout_step": heldout.get("step"),
            "best_tau": best.get("tau"),
            "best_step": best.get("step"),
            "tokens_per_s": train.get("tokens_per_s"),
            "path": str(run_dir),
        })
    return rows
