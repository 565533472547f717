"""`lkspec plan`'s cache-size estimate against real builds of the embedded SmolLM2-135M target.

    .venv/bin/python bench/plan.py [--sizes 24,96] [--ks 32,64] [--out bench/results/plan.json]
    .venv/bin/python bench/plan.py --measure        # re-measure the byte table in pipeline/plan.py

Validate (default): for each ShareGPT prefix size, k and feature set (none, last), run the real build
(`pipeline.build.run_build` on a private local Ray cluster) and compare its bytes on disk (every
file in the cache directory) with `pipeline.plan.cache_size` from an exact token count; goal
|error| <= 15%. Builds reuse one local Ray cluster; the target runs in bf16.

Measure: one forward of the target (bf16) over ShareGPT conversations 1000-1127 (not the ones
validated), exact top-256 sliced to each k, encoded the way a build encodes shards; prints the
constants of pipeline/plan.py (bytes per top-k id and log-prob, per token, per row and file, the
compression of bf16 features).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/plan.py` puts bench/ first on sys.path: keep the project root first instead.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from bench.result_file import write_result  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MEASURE_KS = (1, 8, 16, 32, 64, 128, 256)
MEASURE_SLICE = (1000, 128)  # first conversation index, count
SHARD_SIZE = 64  # sequences per shard, as `cache build` writes them


def sharegpt_slice(start: int, count: int) -> list:
    """Valid ShareGPT conversations start..start+count-1 (invalid rows skipped, as --skip-invalid does)."""
    from pipeline.plan import read_conversations
    from pipeline.resolve.datasets import open_dataset

    conversations, _ = read_conversations(open_dataset("sharegpt"), start + count)
    return conversations[start:start + count]


def write_jsonl(conversations: list, path: Path) -> Path:
    """Conversations as a JSONL file of {"id", "messages"} rows (the build's own input format)."""
    path.write_text("".join(json.dumps({"id": c.sample_id, "messages": list(c.messages)}) + "\n"
                            for c in conversations))
    return path


def directory_bytes(directory: Path) -> int:
    """Bytes of every file in a cache directory (shards, feature files, manifest, stats)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def validate(args) -> dict:
    """Real builds vs the plan's estimate, one row per (conversations, k, features)."""
    from transformers import AutoTokenizer

    from pipeline.build import BuildConfig, run_build
    from pipeline.resolve.datasets import open_dataset
    from pipeline.resolve.models import resolve_model
    from pipeline.plan import cache_size, count_tokens, load_model_shape, read_conversations
    from pipeline.ray_session import ray_session

    target = resolve_model("smollm2-135m")
    shape = load_model_shape(str(target.path))
    tokenizer = AutoTokenizer.from_pretrained(target.path)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lkspec-plan-bench-") as tmp, ray_session(num_cpus=os.cpu_count()):
        for size in args.sizes:
            conversations = sharegpt_slice(0, size)
            data = write_jsonl(conversations, Path(tmp) / f"sharegpt-{size}.jsonl")
            counted, skipped = read_conversations(open_dataset(str(data)), None)
            counts = count_tokens(counted, tokenizer, max_length=args.max_length, sample=10**9, skipped=skipped)
            for k in args.ks:
                for features in ((), ("last",)):
                    config = BuildConfig(target="smollm2-135m", data=str(data), out=Path(tmp) / "caches", k=k,
                                         max_length=args.max_length, workers=1, threads=os.cpu_count(),
                                         features=features, progress=False)
                    config.validate()
                    started = time.perf_counter()
                    outcome = run_build(config, log=lambda message: None)
                    real = directory_bytes(outcome.path)
                    estimate = cache_size(shape, counts, k=k, features=features)
                    row = {"conversations": size, "k": k, "features": ",".join(features) or "none",
                           "positions": outcome.stats["positions"], "estimated_positions": counts.positions,
                           "tokens": counts.tokens, "real_bytes": real, "estimated_bytes": round(estimate.total),
                           "error": estimate.total / real - 1, "build_s": time.perf_counter() - started}
                    rows.append(row)
                    print(f"{size:>5} {k:>4} {row['features']:>8} {row['positions']:>9} {real:>12,} "
                          f"{row['estimated_bytes']:>12,} {100 * row['error']:>+7.1f}%", flush=True)
    return {"rows": rows, "max_abs_error": max(abs(r["error"]) for r in rows), "goal": 0.15}


def measure(args) -> dict:
    """The byte constants of pipeline/plan.py from one real forward over conversations not validated."""
    import numpy as np
    import torch
    import zstandard
    from transformers import AutoTokenizer

    from cache import SequenceRecord
    from cache.schema import CORE_ZSTD_LEVEL, ID_TABLE_COLUMN
    from cache.shard import core_columns, encode_core, encode_feature
    from pipeline.resolve.chat import tokenize_conversation
    from pipeline.resolve.models import load_model, resolve_model
    from pipeline.target_pass import Sample, aux_layers, plan_batches, target_topk

    torch.set_num_threads(os.cpu_count() or 1)
    target = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(target.path)
    model = load_model(target.path, dtype="bf16")
    config = model.config
    vocab, hidden = config.vocab_size, config.hidden_size
    samples = []
    for conversation in sharegpt_slice(*MEASURE_SLICE):
        tokens = tokenize_conversation(tokenizer, conversation.messages, args.max_length)
        if tokens.num_positions:
            samples.append(Sample(conversation.sample_id, tokens.input_ids, tokens.loss_mask))
    aux = aux_layers(config.num_hidden_layers)
    records = []
    for batch in plan_batches([len(s.input_ids) for s in samples], 8192):
        chosen = [samples[i] for i in batch]
        for sample, (ids, logprobs, feats) in zip(chosen, target_topk(model, chosen, max(MEASURE_KS),
                                                                      ("last", "aux"), aux)):
            records.append(SequenceRecord(sample.sample_id, sample.input_ids, sample.loss_mask, ids, logprobs, feats))
    records.sort(key=lambda r: r.sample_id)
    zstd = zstandard.ZstdCompressor(level=CORE_ZSTD_LEVEL)
    positions = sum(r.num_positions for r in records)
    tokens = sum(len(r.input_ids) for r in records)

    def sliced(rows: list, k: int) -> list:
        return [SequenceRecord(r.sample_id, r.input_ids, r.loss_mask, r.topk_ids[:, :k], r.topk_logprobs[:, :k])
                for r in rows]

    def column_bytes(rows: list, k: int) -> dict[str, int]:
        """Compressed bytes of each core column of one shard, as Arrow's zstd compresses each buffer."""
        columns = core_columns(sliced(rows, k), vocab_size=vocab, logprob_dtype="fp16")
        return {name: len(zstd.compress(b"".join(values))) for name, values in columns.items()
                if name not in ("sample_id", "num_tokens", "num_positions")}

    shards = [records[i:i + SHARD_SIZE] for i in range(0, len(records), SHARD_SIZE)]  # as a default build
    table = {}
    for k in MEASURE_KS:
        sizes = [column_bytes(shard, k) for shard in shards]
        ids = sum(s["topk_ids"] + s[ID_TABLE_COLUMN] for s in sizes)
        lps = sum(s["topk_logprobs"] for s in sizes)
        table[k] = (round(ids / (positions * k), 3), round(lps / (positions * k), 3))
    token_bytes = sum(s["input_ids"] + s["loss_mask"] for s in (column_bytes(shard, 1) for shard in shards))

    def core_overhead(rows: list) -> float:
        """Core file bytes beyond the compressed column data: schema, footer, per-row fields and offsets."""
        data = sum(column_bytes(rows, 64).values())
        return len(encode_core(sliced(rows, 64), k=64, vocab_size=vocab, logprob_dtype="fp16")) - data

    file_bytes = core_overhead(records[:1])
    row_bytes = (core_overhead(records[:SHARD_SIZE]) - file_bytes) / (SHARD_SIZE - 1)
    ratios = {}
    for name, dim in (("last", hidden), ("aux", 3 * hidden)):
        stored = sum(len(encode_feature(shard, name=name, dim=dim)) for shard in shards)
        ratios[name] = round(stored / (tokens * dim * 2), 3)
    result = {"sequences": len(records), "tokens": tokens, "positions": positions, "topk_entry_bytes": table,
              "token_bytes": round(token_bytes / tokens, 3), "file_bytes": round(file_bytes),
              "row_bytes": round(row_bytes, 1), "feature_ratio": ratios,
              "tail_mass_k64": float(np.mean(1 - np.exp(np.concatenate([r.topk_logprobs[:, :64] for r in records])
                                                      .astype(np.float64)).sum(axis=1)))}
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="re-measure the byte table instead of validating")
    parser.add_argument("--sizes", default="24,96", help="ShareGPT prefix sizes to build (validate)")
    parser.add_argument("--ks", default="32,64", help="top-k values to build (validate)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/plan[-measure].json)")
    args = parser.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.ks = [int(x) for x in args.ks.split(",")]
    header = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                            "processor": platform.processor()},
              "target": "smollm2-135m (bf16)", "data": "sharegpt", "max_length": args.max_length}
    if args.measure:
        result = {**header, **measure(args)}
    else:
        print(f"{'convs':>5} {'k':>4} {'features':>8} {'positions':>9} {'real bytes':>12} {'estimate':>12} {'error':>8}")
        result = {**header, **validate(args)}
        print(f"max |error| {100 * result['max_abs_error']:.1f}% (goal <= 15%)")
    out = args.out or ROOT / "bench" / "results" / ("plan-measure.json" if args.measure else "plan.json")
    write_result(out, result)


if __name__ == "__main__":
    main()
