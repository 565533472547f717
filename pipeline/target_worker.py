"""The Ray actor of a build: `TargetWorker` holds the target and commits the shards it is given.

A worker holds one shard on the model while the previous shard is encoded and written (a threaded
actor, two shards in flight), and within a shard it queues the next batch's forward before it reads
the previous batch's results back (pipeline.target_pass does the maths).
"""
from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field

from pipeline.resolve.models import load_model
from pipeline.target_pass import BuildError, Sample, launch_topk, load_placed_model, plan_batches, regenerate

SHARDS_IN_FLIGHT = 2  # per worker: one on the model, one being encoded and written


@dataclass(frozen=True)
class ShardTask:
    """The unit of work of a TargetWorker: one shard's samples in dataset order."""

    index: int
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a TargetWorker needs; identical for every worker of a build."""

    model_path: str
    dtype: str
    cache_dir: str
    k: int
    vocab_size: int
    features: tuple[str, ...] = ()
    feature_dims: dict = field(default_factory=dict)
    aux_layers: tuple[int, ...] = ()
    token_budget: int = 8192
    threads: int = 1
    regenerate: bool = False
    max_new_tokens: int = 256
    max_length: int = 1024
    seed: int = 0
    device: str = "cpu"  # "cpu" or "cuda" (resolved by the driver)
    gpus: int = 1  # GPUs a cuda worker holds; > 1 splits the target over them (accelerate device map)
    max_memory_bytes: int = 0  # weight budget per GPU for the device map (pipeline.plan.plan_placement)


def load_target(spec: WorkerSpec):
    """The worker's model: on one device, or split over `spec.gpus` GPUs."""
    if spec.device == "cuda" and spec.gpus > 1:
        return load_placed_model(spec.model_path, dtype=spec.dtype,
                                 max_memory={gpu: spec.max_memory_bytes for gpu in range(spec.gpus)})
    return load_model(spec.model_path, dtype=spec.dtype, device=spec.device)


class TargetWorker:
    """Ray actor (threaded, SHARDS_IN_FLIGHT at once): holds the target model and commits the shards it is given."""

    def __init__(self, spec: WorkerSpec):
        import torch

        from cache import CacheWriter

        torch.set_num_threads(spec.threads)  # same thread count everywhere: same bits everywhere
        self.spec = spec
        self.model = load_target(spec)
        self.model_lock = threading.Lock()  # one shard on the model at a time
        self.tokenizer = None
        if spec.regenerate:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
        self.writer = CacheWriter(spec.cache_dir, k=spec.k, vocab_size=spec.vocab_size,
                                  features=spec.features, feature_dims=spec.feature_dims)

    def pid(self) -> int:
        """The worker's process id (tests kill it to check fault tolerance)."""
        return os.getpid()

    def run_shard(self, task: ShardTask) -> dict:
        """Compute and commit one shard; returns {"info": ShardInfo, "tokens", "seconds", "skipped", ...}.

        The model is held only to compute; encoding and the atomic commit run after it is released,
        alongside the next shard's forward.
        """
        with self.model_lock:
            started = time.perf_counter()
            samples, skipped = list(task.samples), {}
            if self.spec.regenerate:
                samples, skipped = self._regenerate(samples)
            records = self.compute_records(samples)
            computed = time.perf_counter()
        try:
            info = self.writer.write_shard(task.index, records)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise BuildError(
                    f"no space left on the device while writing shard {task.index} into "
                    f"{self.spec.cache_dir}: free space and rerun the same command (committed shards are "
                    "kept; no partial file is ever accepted)"
                ) from None
            raise
        done = time.perf_counter()
        return {"info": info, "tokens": int(sum(len(s.input_ids) for s in samples)), "seconds": done - started,
                "compute_seconds": computed - started, "write_seconds": done - computed, "skipped": skipped}

    def compute_records(self, samples: list[Sample]) -> list:
        """SequenceRecords of `samples`: batch i+1 is queued before batch i's results are read back."""
        from cache import SequenceRecord

        records: list = [None] * len(samples)
        pending = None
        for batch in [*plan_batches([len(s.input_ids) for s in samples], self.spec.token_budget), None]:
            launched = None if batch is None else (batch, launch_topk(
                self.model, [samples[i] for i in batch], self.spec.k, self.spec.features, self.spec.aux_layers))
            if pending is not None:
                indices, result = pending
                for i, (ids, logprobs, feats) in zip(indices, result.result()):
                    sample = samples[i]
                    records[i] = SequenceRecord(sample.sample_id, sample.input_ids, sample.loss_mask, ids, logprobs,
                                                feats)
            pending = launched
        return records

    def _regenerate(self, samples: list[Sample]) -> tuple[list[Sample], dict]:
        from pipeline.resolve.chat import tokenize_conversation

        result, skipped = [], {}
        for sample in samples:
            messages = regenerate(self.model, self.tokenizer, sample.messages, sample_id=sample.sample_id,
                                  seed=self.spec.seed, max_new_tokens=self.spec.max_new_tokens,
                                  max_length=self.spec.max_length)
            tokens = tokenize_conversation(self.tokenizer, messages, self.spec.max_length) if messages else None
            if tokens is None or tokens.num_positions == 0:
                reason = "no assistant tokens within max length"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            result.append(Sample(sample.sample_id, tokens.input_ids, tokens.loss_mask))
        return result, skipped
