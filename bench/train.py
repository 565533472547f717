"""Benchmark drafter training on this machine: tokens/s per loss, loader headroom, online vs cache targets.

    python bench/train.py                                  # SmolLM2-135M target, tiny drafter, k = 64
    python bench/train.py --steps 4 --skip 1 --batch-tokens 512 --out /tmp/train.json
    python bench/train.py --cache ~/.cache/lkspec/caches/<key>   # an existing cache instead

What is measured (one DeepSpeed worker in this process, ZeRO-2, the real training step of
trainer.loop.run_worker; medians over the steps after --skip warm-up steps):

- train: tokens/s (all measured steps; and of the fastest step, less disturbed by other jobs on a
  shared machine) and median ms/step of each loss (kl, tv, lk_alpha, lk_lambda) from the cached top-k.
- online: the same KL step with `--target-source online` (the target model runs a forward per step
  and supplies the full distribution); reported as ms/step and ÷ the cached-target step, plus the
  target forward alone on the same batches (tokens/s), which is what `online` adds to every step.
- loader: decode + collate throughput of the batch stream alone (one thread, no training), in
  tokens/s, ÷ the trainer's consumption (KL from the cache). The goal is ≥ 10: the loader's
  background thread then needs < 10 % of a core to keep a worker fed.

The cache, unless --cache is given, is built here once (kept in --workdir): alpaca-demo
conversations (random tokens if that dataset is unavailable) in the target's chat template,
responses trained on, exact top-k of the target's fp32 log-softmax.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.result_file import write_result  # noqa: E402
from trainer.precision import add_precision_arguments, precision_from_args  # noqa: E402

LOSSES = ("kl", "tv", "lk_alpha", "lk_lambda")


def _sequences(tokenizer, count: int, max_len: int, seed: int):
    """(sample_id, ids int32, loss_mask bool): chat-formatted alpaca conversations, or random tokens."""
    import numpy as np

    try:
        from pipeline.resolve.datasets import read_conversations

        conversations = read_conversations("alpaca-demo")[:count]
    except Exception as exc:  # noqa: BLE001 - the dataset is optional for a throughput benchmark
        print(f"alpaca-demo unavailable ({exc}); using random tokens", file=sys.stderr)
        conversations = []
    out = []
    for conversation in conversations:
        messages = list(conversation.messages)
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
        full = tokenizer.apply_chat_template(messages, tokenize=True)
        prompt, full = _ids(prompt), _ids(full)
        ids = np.asarray(full[:max_len], dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[min(len(prompt), len(ids)):] = True
        if mask[1:].any():
            out.append((conversation.sample_id, ids, mask))
    rng = np.random.default_rng(seed)
    while len(out) < count:
        length = int(rng.integers(max_len // 2, max_len + 1))
        ids = rng.integers(100, tokenizer.vocab_size, size=length).astype(np.int32)
        mask = np.zeros(length, dtype=bool)
        mask[length // 4:] = True
        out.append((f"random-{len(out):05d}", ids, mask))
    return out


def _ids(encoded):
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


def build_cache(workdir: Path, target: str, *, sequences: int, max_len: int, k: int, shards: int) -> Path:
    """A cache from a real fp32 forward of the target (reused when the same one exists in workdir)."""
    import torch
    from transformers import AutoTokenizer

    from cache import CacheWriter, SequenceRecord, content_key, create_manifest, open_cache
    from pipeline.resolve.models import load_model, resolve_model, tokenizer_fingerprint

    resolved = resolve_model(target)
    identity = {"bench": "train", "target": resolved.identity, "target_path": str(resolved.path),
                "target_spec": target, "sequences": sequences, "max_len": max_len, "k": k, "shards": shards}
    key = content_key(identity)
    cache_dir = workdir / "caches" / key
    try:
        open_cache(cache_dir)
        return cache_dir
    except Exception:  # noqa: BLE001 - absent or incomplete: (re)build it
        shutil.rmtree(cache_dir, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    model = load_model(resolved.path, dtype="fp32")
    vocab_size = model.config.vocab_size
    records = []
    started = time.perf_counter()
    with torch.no_grad():
        for sample_id, ids, mask in _sequences(tokenizer, sequences, max_len, seed=0):
            logprobs = model(torch.from_numpy(ids.astype("int64"))[None]).logits[0].float().log_softmax(-1)
            positions = torch.from_numpy((mask[1:].nonzero()[0]).astype("int64"))  # = t − 1 for trained t
            top = logprobs[positions].topk(k, dim=-1)
            records.append(SequenceRecord(sample_id=sample_id, input_ids=ids, loss_mask=mask,
                                          topk_ids=top.indices.numpy().astype("int32"),
                                          topk_logprobs=top.values.numpy()))
    print(f"built the bench cache ({sequences} sequences) in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    manifest = create_manifest(cache_dir, key=key, identity=identity, k=k, vocab_size=vocab_size,
                               tokenizer_sha256=tokenizer_fingerprint(tokenizer), features={},
                               num_shards_planned=shards)
    writer = CacheWriter(cache_dir, k=k, vocab_size=vocab_size)
    for shard in range(shards):
        manifest.record_shard(writer.write_shard(shard, records[shard::shards]))
    manifest.finalize()
    return cache_dir


def train_case(cache: Path, runs: Path, *, loss: str, source: str, args) -> dict:
    """Run one single-worker training run in-process and summarize its steady-state steps."""
    from pipeline.train_job import plan_run, prepare_run_dir
    from trainer.config import TrainConfig
    from trainer.loop import run_worker
    from trainer.rundir import read_metrics

    config = TrainConfig(
        cache=str(cache), out=str(runs), run_name=f"{loss}-{source}", loss=loss, drafter=args.drafter,
        steps=args.steps, workers=1, zero=2, dtype=args.dtype, warmup=1, batch_tokens=args.batch_tokens,
        eval_every=0, checkpoint_every=0, eval_sequences=4, target_source=source,
        target=args.target if source == "online" else None,
    )
    plan = plan_run(config)
    prepare_run_dir(plan, use_gpu=False)
    run_worker(plan, rank=0, world_size=1)
    steps = read_metrics(Path(plan.run_dir))[args.skip:]
    step_s = statistics.median(m["step_time_s"] for m in steps)
    tokens = sum(m["tokens"] for m in steps)
    seconds = sum(m["step_time_s"] for m in steps)
    return {
        "loss": loss, "target_source": source, "steps": len(steps),
        "tokens_per_s": tokens / seconds, "targets_per_s": sum(m["targets"] for m in steps) / seconds,
        # the least-disturbed step: on a shared machine the median mixes in other jobs' load
        "tokens_per_s_best": max(m["tokens"] / m["step_time_s"] for m in steps),
        "step_ms": 1000 * step_s, "data_wait_ms": 1000 * statistics.median(m["data_wait_s"] for m in steps),
        "tokens_per_step": tokens / len(steps),
    }


def target_forward_case(cache: Path, target: str, *, dtype: str, batch_tokens: int, batches: int) -> dict:
    """What `online` adds to a step: the target's no-grad forward on the same batches (this process)."""
    import torch

    from cache import open_cache
    from pipeline.resolve.models import resolve_model
    from trainer.data import BatchStream, LoaderSpec, heldout_split, scan_index
    from trainer.loop import TargetSource

    reader = open_cache(cache)
    split = heldout_split(scan_index(reader), 0.05, 16)
    spec = LoaderSpec(rank=0, world_size=1, seed=0, batch_tokens=batch_tokens,
                      heldout_threshold=split.heldout_threshold)
    source = TargetSource("online", str(resolve_model(target).path), dtype, torch.device("cpu"))
    stream = BatchStream(reader, spec, prefetch=2)
    try:
        source(next(stream))  # warm-up
        per_token = []
        for _ in range(batches):
            batch = next(stream)
            started = time.perf_counter()
            source(batch)
            per_token.append((time.perf_counter() - started) / batch.num_tokens)
    finally:
        stream.close()
    return {"ms_per_1k_tokens_median": 1e6 * statistics.median(per_token),
            "ms_per_1k_tokens_best": 1e6 * min(per_token)}


def loader_case(cache: Path, *, batch_tokens: int, batches: int) -> dict:
    """Decode + collate throughput of the batch stream alone (epochs cycle as needed)."""
    from cache import open_cache
    from trainer.data import BatchStream, LoaderSpec, heldout_split, scan_index

    reader = open_cache(cache)
    split = heldout_split(scan_index(reader), 0.05, 16)
    spec = LoaderSpec(rank=0, world_size=1, seed=0, batch_tokens=batch_tokens,
                      heldout_threshold=split.heldout_threshold)
    stream = BatchStream(reader, spec, prefetch=2)
    try:
        next(stream)  # thread started, first shard decoded
        started = time.perf_counter()
        tokens = targets = 0
        for _ in range(batches):
            batch = next(stream)
            tokens += batch.num_tokens
            targets += batch.num_targets
        seconds = time.perf_counter() - started
    finally:
        stream.close()
    return {"batches": batches, "tokens_per_s": tokens / seconds, "targets_per_s": targets / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m", help="target model (default: smollm2-135m)")
    parser.add_argument("--cache", default=None, help="use this cache instead of building one")
    parser.add_argument("--drafter", default="tiny", help="drafter preset or directory (default: tiny)")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="steps per case (default: 6)")
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the figures (default: 2)")
    parser.add_argument("--loader-batches", type=int, default=40)
    parser.add_argument("--workdir", default="/tmp/lkspec-bench-train")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    add_precision_arguments(parser)  # of the training step and the online target (the cache is built in fp32)
    args = parser.parse_args(argv)
    if args.steps <= args.skip:
        parser.error("--steps must exceed --skip")
    precision = precision_from_args(parser, args, "cpu")
    args.dtype = precision["dtype"]  # fp32 or bf16 from here on

    import torch

    from trainer.loop import flush_subnormals

    flush_subnormals()  # as the training workers do, before the cache build starts torch's threads
    load_at_start = os.getloadavg()[0]
    workdir = Path(args.workdir)
    cache = Path(args.cache) if args.cache else build_cache(workdir, args.target, sequences=args.sequences,
                                                            max_len=args.max_len, k=args.k, shards=args.shards)
    runs = workdir / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29571"))

    loader = loader_case(cache, batch_tokens=args.batch_tokens, batches=args.loader_batches)
    train = {loss: train_case(cache, runs, loss=loss, source="cache", args=args) for loss in LOSSES}
    online = train_case(cache, runs, loss="kl", source="online", args=args)
    forward = target_forward_case(cache, args.target, dtype=args.dtype, batch_tokens=args.batch_tokens, batches=4)
    kl = train["kl"]
    result = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "load_average_1min": [load_at_start, os.getloadavg()[0]]},
        "setup": {"target": args.target, "drafter": args.drafter, "k": args.k, "batch_tokens": args.batch_tokens,
                  "steps": args.steps, "skip": args.skip, "zero": 2, "workers": 1, "dtype": args.dtype,
                  "precision": precision,
                  "cache": str(cache)},
        "train": train,
        "online": {**online, "step_ratio_vs_cache": online["step_ms"] / kl["step_ms"], "target_forward": forward,
                   # the least-disturbed estimate: target forward time per token ÷ a cached-target step's
                   "best_ratio_vs_cache": 1 + forward["ms_per_1k_tokens_best"] / (1e6 / kl["tokens_per_s_best"])},
        "loader": {**loader, "ratio_vs_trainer": loader["tokens_per_s"] / kl["tokens_per_s"], "goal": 10},
    }
    rows = [(f"train {loss} (cache)", c) for loss, c in train.items()] + [("train kl (online target)", online)]
    print(f"{'case':28} {'tokens/s':>10} {'best tok/s':>10} {'ms/step':>9} {'÷ kl':>6}")
    for name, case in rows:
        print(f"{name:28} {case['tokens_per_s']:10.0f} {case['tokens_per_s_best']:10.0f} {case['step_ms']:9.0f} "
              f"{case['step_ms'] / kl['step_ms']:6.2f}")
    print(f"{'target forward (online adds)':28} {1e6 / forward['ms_per_1k_tokens_median']:10.0f} "
          f"{1e6 / forward['ms_per_1k_tokens_best']:10.0f}   -> online step ≈ "
          f"{result['online']['best_ratio_vs_cache']:.2f} × cached-target step (fastest steps)")
    print(f"{'loader decode+collate':28} {loader['tokens_per_s']:10.0f} {'':>9} "
          f"÷ trainer = {result['loader']['ratio_vs_trainer']:.1f} (goal ≥ 10)")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
