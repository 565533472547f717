"""A worker encodes and writes one shard while the next one is on the model (what its threaded Ray actor does).

The model is tiny and its forward slowed down on purpose (a real forward pre-hook that sleeps as long
as a shard's encoding takes), while a large k makes the encoding costly: overlapped, a shard then
costs about max(forward, write), not their sum. Run with `-s` to see the figures.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.target_worker import SHARDS_IN_FLIGHT, Sample, ShardTask, TargetWorker, WorkerSpec

VOCAB, K, LENGTH, ROWS, SHARDS = 512, 256, 512, 16, 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 1-layer random Llama, narrow: its own compute is small next to the sleep and the encoding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    out = tmp_path_factory.mktemp("overlap-model")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def shards() -> list[ShardTask]:
    rng = np.random.default_rng(0)
    return [ShardTask(index, tuple(Sample(f"{index}:{i}", rng.integers(0, VOCAB, LENGTH, dtype=np.int32),
                                          np.arange(LENGTH) >= 16) for i in range(ROWS)))
            for index in range(SHARDS)]


def worker(model_dir: Path, cache_dir: Path, forward_sleep: float) -> TargetWorker:
    spec = WorkerSpec(model_path=str(model_dir), dtype="fp32", cache_dir=str(cache_dir), k=K, vocab_size=VOCAB,
                      token_budget=ROWS * LENGTH, threads=1)
    target = TargetWorker(spec)
    if forward_sleep:
        target.model.get_decoder().register_forward_pre_hook(lambda *_: time.sleep(forward_sleep))
    return target


def run(target: TargetWorker, tasks: list[ShardTask], in_flight: int) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        results = list(pool.map(target.run_shard, tasks))
    return time.perf_counter() - started, results


@pytest.mark.slow
def test_encoding_overlaps_the_next_forward(model_dir, tmp_path):
    probe = worker(model_dir, tmp_path / "probe", 0.0)
    _, measured = run(probe, shards()[:3], 1)
    write_s = float(np.median([r["write_seconds"] for r in measured[1:]]))  # warm writes
    forward_sleep = max(0.1, write_s)  # a forward at least as long as a write: the writes can hide behind it

    serial_wall, serial = run(worker(model_dir, tmp_path / "serial", forward_sleep), shards(), 1)
    overlap_wall, overlapped = run(worker(model_dir, tmp_path / "overlap", forward_sleep), shards(), SHARDS_IN_FLIGHT)

    compute = float(np.mean([r["compute_seconds"] for r in serial]))
    write = float(np.mean([r["write_seconds"] for r in serial]))
    bound = SHARDS * max(compute, write) + min(compute, write)
    print(f"\nper shard, one at a time: forward {compute:.3f} s (incl. a {forward_sleep:.3f} s sleep), encode+write "
          f"{write:.3f} s; {SHARDS} shards: one at a time {serial_wall:.2f} s (sum {SHARDS * (compute + write):.2f} s), "
          f"{SHARDS_IN_FLIGHT} in flight {overlap_wall:.2f} s (max-bound {bound:.2f} s)")
    assert overlap_wall < serial_wall - 0.5 * (SHARDS - 1) * min(compute, write)
    assert overlap_wall < 1.25 * bound
    for a, b in zip(serial, overlapped):  # the same bytes either way
        assert a["info"].sha256 == b["info"].sha256
