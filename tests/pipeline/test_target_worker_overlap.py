"""A worker encodes and writes one shard while the next one is on the model (what its threaded Ray actor does).

The model is tiny; its forward (a real forward pre-hook) and its shard write are each slowed down on purpose by a
sleep, so that the overlap shows on a loaded machine too: overlapped, a shard then
costs about max(forward, write), not their sum. Run with `-s` to see the figures.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.target_pass import Sample
from pipeline.target_worker import SHARDS_IN_FLIGHT, ShardTask, TargetWorker, WorkerSpec

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


def worker(model_dir: Path, cache_dir: Path, delay: float) -> TargetWorker:
    """A real worker whose forward and whose shard write each take at least `delay` seconds longer."""
    spec = WorkerSpec(model_path=str(model_dir), dtype="fp32", cache_dir=str(cache_dir), k=K, vocab_size=VOCAB,
                      token_budget=ROWS * LENGTH, threads=1)
    target = TargetWorker(spec)
    target.model.get_decoder().register_forward_pre_hook(lambda *_: time.sleep(delay))
    write_shard = target.writer.write_shard

    def slow_write_shard(*args, **kwargs):
        time.sleep(delay)
        return write_shard(*args, **kwargs)

    target.writer.write_shard = slow_write_shard
    return target


def run(target: TargetWorker, tasks: list[ShardTask], in_flight: int) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        results = list(pool.map(target.run_shard, tasks))
    return time.perf_counter() - started, results


@pytest.mark.slow
def test_encoding_overlaps_the_next_forward(model_dir, tmp_path):
    delay = 0.4  # sleeps, not CPU work: the overlap shows however loaded the machine is
    serial_wall, serial = run(worker(model_dir, tmp_path / "serial", delay), shards(), 1)
    overlap_wall, overlapped = run(worker(model_dir, tmp_path / "overlap", delay), shards(), SHARDS_IN_FLIGHT)
    compute = float(np.mean([r["compute_seconds"] for r in serial]))
    write = float(np.mean([r["write_seconds"] for r in serial]))
    print(f"\nper shard, one at a time: forward {compute:.3f} s, encode+write {write:.3f} s (each incl. a {delay} s "
          f"sleep); {SHARDS} shards: one at a time {serial_wall:.2f} s, {SHARDS_IN_FLIGHT} in flight {overlap_wall:.2f} s")
    # Serialized, every shard costs forward + write; overlapped, each write hides behind the next forward,
    # saving about a delay per shard but the last: (SHARDS - 1) * delay = 2.0 s of about 5 s.
    assert serial_wall - overlap_wall > 0.5 * (SHARDS - 1) * delay
    for a, b in zip(serial, overlapped):  # the same bytes either way
        assert a["info"].sha256 == b["info"].sha256
