"""Cache benchmark on real SmolLM2-135M outputs over ShareGPT: size per entry, build vs bare forward, decode speed.

    .venv/bin/python bench/cache.py [--conversations 48] [--max-length 512] [--out bench/results/cache.json]

Figures (DESIGN.md §10):
  * bytes per top-k entry and per trained position at k in {8, 32, 64, 128} (goal <= 2.5 B/entry at
    k=64; naive int32 id + fp16 log-prob = 6 B/entry), from the model's exact top-128 sliced to k;
  * build throughput / bare target forward throughput on the same model, dtype and batches (goal
    >= 0.90): per batch, interleaved, the bare forward (`pipeline.target_pass.bare_forward`: the
    backbone and the LM head at the trained positions only, the honest limit) against the worker's
    full job (that, plus top-k and log-sum-exp in fp32, copies to the host, shard encode + commit);
    then the real Ray build (`pipeline.build`, one worker with every core) against the same bare rate;
  * reader decode throughput in trained positions per second.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A script run as `python bench/<name>.py` has bench/ first on sys.path, so `import cache` would find
# this file instead of the cache package: put the project root first instead.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if __name__ == "cache":  # a sibling script's `import cache` landed here: hand it the real package
    del sys.modules["cache"]
    importlib.import_module("cache")  # the importer picks up sys.modules["cache"], the package

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from bench.result_file import write_result  # noqa: E402
from trainer.precision import add_precision_arguments, precision_from_args  # noqa: E402

KS = (8, 32, 64, 128)
NAIVE_BYTES_PER_ENTRY = 6  # int32 id + fp16 log-prob


def select_conversations(count: int, max_length: int, tokenizer):
    """The first `count` usable ShareGPT conversations (invalid rows skipped), tokenized and truncated."""
    from pipeline.resolve.chat import tokenize_conversation
    from pipeline.resolve.datasets import InvalidSampleError, open_dataset
    from pipeline.target_pass import Sample

    conversations, samples = [], []
    for item in open_dataset("sharegpt").conversations():
        if isinstance(item, InvalidSampleError):
            continue
        tokens = tokenize_conversation(tokenizer, item.messages, max_length)
        if tokens.num_positions == 0:
            continue
        conversations.append(item)
        samples.append(Sample(item.sample_id, tokens.input_ids, tokens.loss_mask))
        if len(samples) == count:
            break
    return conversations, samples


def build_vs_bare(model, shards, k: int, vocab_size: int, token_budget: int) -> dict:
    """Interleaved per batch: bare forward (LM head at trained positions) vs the worker's job; plus encode + commit."""
    from cache import CacheWriter, SequenceRecord
    from pipeline.target_pass import bare_forward, plan_batches, target_topk

    bare_s = topk_s = write_s = 0.0
    tokens = 0
    with tempfile.TemporaryDirectory() as directory:
        writer = CacheWriter(directory, k=k, vocab_size=vocab_size)
        for index, shard in enumerate(shards):
            records = [None] * len(shard)
            for batch in plan_batches([len(s.input_ids) for s in shard], token_budget):
                samples = [shard[i] for i in batch]
                start = time.perf_counter()
                bare_forward(model, samples)
                middle = time.perf_counter()
                outputs = target_topk(model, samples, k)
                topk_s += time.perf_counter() - middle
                bare_s += middle - start
                for i, (ids, logprobs, _) in zip(batch, outputs):
                    records[i] = SequenceRecord(shard[i].sample_id, shard[i].input_ids, shard[i].loss_mask,
                                                ids, logprobs)
                tokens += sum(len(s.input_ids) for s in samples)
            start = time.perf_counter()
            writer.write_shard(index, records)
            write_s += time.perf_counter() - start
    return {"tokens": tokens, "bare_s": bare_s, "topk_s": topk_s, "write_s": write_s,
            "bare_tokens_per_s": tokens / bare_s, "build_tokens_per_s": tokens / (topk_s + write_s),
            "ratio": bare_s / (topk_s + write_s)}


def ray_build(conversations, args, dtype: str, directory: Path) -> dict:
    """The real pipeline on a local Ray cluster: one TargetWorker with every core, same batches."""
    from pipeline.build import BuildConfig, run_build

    data = directory / "bench.jsonl"
    data.write_text("".join(json.dumps({"id": c.sample_id, "messages": list(c.messages)}) + "\n"
                            for c in conversations))
    config = BuildConfig(target="smollm2-135m", data=str(data), out=directory / "caches", k=64,
                         max_length=args.max_length, workers=1, threads=args.threads, dtype=dtype,
                         shard_size=args.shard_size, token_budget=args.token_budget, progress=False)
    stats = run_build(config, log=lambda message: None).stats
    return {"tokens": stats["tokens_this_run"], "worker_seconds": stats["worker_seconds"],
            "wall_seconds": stats["wall_seconds"],
            "worker_tokens_per_s": stats["tokens_this_run"] / stats["worker_seconds"],
            "wall_tokens_per_s": stats["tokens_per_second"], "bytes_per_position": stats["bytes_per_position"]}


def sizes_by_k(model, shards, vocab_size: int, token_budget: int) -> tuple[list[dict], dict]:
    """Exact top-128 records sliced to each k, written as a cache: bytes, decode speed, tail mass."""
    from bench.cache_codec import measure  # one size/decode measurement for synthetic and real records
    from cache import SequenceRecord
    from pipeline.target_pass import plan_batches, target_topk

    records = []
    for shard in shards:
        for batch in plan_batches([len(s.input_ids) for s in shard], token_budget):
            samples = [shard[i] for i in batch]
            for sample, (ids, logprobs, _) in zip(samples, target_topk(model, samples, max(KS))):
                records.append(SequenceRecord(sample.sample_id, sample.input_ids, sample.loss_mask, ids, logprobs))
    probs = np.exp(np.concatenate([r.topk_logprobs for r in records]).astype(np.float64))  # [P, 128]
    tail = {k: float((1.0 - probs[:, :k].sum(axis=1)).mean()) for k in KS}
    return [measure(records, k, vocab_size, len(shards)) for k in KS], tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=512)
    add_precision_arguments(parser)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--no-ray", action="store_true", help="skip the end-to-end Ray build")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cache.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from pipeline.resolve.models import load_model, resolve_model

    precision = precision_from_args(parser, args, "cpu")
    dtype = precision["dtype"]
    torch.set_num_threads(args.threads)
    target = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(target.path)
    model = load_model(target.path, dtype=dtype)
    vocab_size = model.config.vocab_size
    conversations, samples = select_conversations(args.conversations, args.max_length, tokenizer)
    shards = [samples[i:i + args.shard_size] for i in range(0, len(samples), args.shard_size)]
    positions = sum(int(s.loss_mask[1:].sum()) for s in samples)
    print(f"SmolLM2-135M-Instruct {dtype}, {args.threads} threads; {len(samples)} ShareGPT conversations, "
          f"{sum(len(s.input_ids) for s in samples)} tokens, {positions} trained positions (max length "
          f"{args.max_length})", flush=True)

    build_vs_bare(model, shards[:1], 64, vocab_size, args.token_budget)  # warm-up
    throughput = build_vs_bare(model, shards, 64, vocab_size, args.token_budget)
    sizes, tail = sizes_by_k(model, shards, vocab_size, args.token_budget)
    end_to_end = None
    if not args.no_ray:
        del model  # the Ray worker loads its own copy
        with tempfile.TemporaryDirectory() as directory:
            end_to_end = ray_build(conversations, args, dtype, Path(directory))
        end_to_end["ratio_to_bare"] = end_to_end["worker_tokens_per_s"] / throughput["bare_tokens_per_s"]

    print(f"\n{'k':>4} {'top-k B/entry':>13} {'core B/entry':>12} {'core B/pos':>10} {'naive B/pos':>11} "
          f"{'tail mass':>9} {'decode pos/s':>12}")
    for row in sizes:
        print(f"{row['k']:>4} {row['topk_bytes_per_entry']:>13.3f} {row['core_bytes_per_entry']:>12.3f} "
              f"{row['core_bytes_per_position']:>10.1f} {row['naive_bytes_per_position']:>11} "
              f"{tail[row['k']]:>9.3f} {row['decode_positions_per_s']:>12,.0f}")
    print("  (core = everything stored: input ids, loss mask, top-k ids and log-probs; goal <= 2.5 B/entry at k=64)")
    print(f"\nbare forward (trained LM head)  {throughput['bare_tokens_per_s']:>9,.0f} tok/s")
    print(f"worker job (top-k 64 + commit)  {throughput['build_tokens_per_s']:>9,.0f} tok/s   "
          f"ratio {throughput['ratio']:.3f} (goal >= 0.90)")
    if end_to_end:
        print(f"Ray build, in the worker        {end_to_end['worker_tokens_per_s']:>9,.0f} tok/s   "
              f"ratio {end_to_end['ratio_to_bare']:.3f}")
        print(f"Ray build, wall incl. start-up  {end_to_end['wall_tokens_per_s']:>9,.0f} tok/s   "
              f"({end_to_end['wall_seconds']:.1f} s for {end_to_end['tokens']} tokens)")

    result = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF Q4_1, dequantized)", "dtype": dtype, "precision": precision,
        "threads": args.threads, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "data": {"dataset": "sharegpt", "conversations": len(samples), "max_length": args.max_length,
                 "tokens": sum(len(s.input_ids) for s in samples), "trained_positions": positions},
        "sizes": sizes, "tail_mass": {str(k): v for k, v in tail.items()},
        "throughput": throughput, "ray_build": end_to_end,
        "goals": {"bytes_per_entry_k64": 2.5, "build_over_bare": 0.9},
    }
    print()
    write_result(args.out, result)


if __name__ == "__main__":
    main()
