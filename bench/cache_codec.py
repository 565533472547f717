"""Codec micro-benchmark on synthetic Zipf-like top-k: bytes per entry, encode and decode throughput.

    .venv/bin/python bench/cache_codec.py [--sequences 48] [--json out.json]

The synthetic log-probs are noisier than a real model's (see cache/synthetic.py), so sizes here are
pessimistic; bench/cache.py reports the same figures on real SmolLM2 outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import zstandard

from cache import CacheWriter, content_key, create_manifest, open_cache
from cache.schema import CORE_ZSTD_LEVEL, ID_TABLE_COLUMN
from cache.shard import core_columns
from cache.synthetic import synthetic_records

KS = (8, 32, 64, 128)
NAIVE_BYTES_PER_ENTRY = 6  # int32 id + fp16 log-prob
TOPK_COLUMNS = ("topk_ids", ID_TABLE_COLUMN, "topk_logprobs")


def measure(records: list, k: int, vocab_size: int, num_shards: int) -> dict:
    """Write `records` truncated to top-k as a cache of `num_shards` shards; sizes and throughputs."""
    records = [dataclasses.replace(r, topk_ids=r.topk_ids[:, :k], topk_logprobs=r.topk_logprobs[:, :k])
               for r in records]
    positions = sum(r.num_positions for r in records)
    identity = {"bench": "cache_codec", "k": k}
    with tempfile.TemporaryDirectory() as root:
        manifest = create_manifest(root, key=content_key(identity), identity=identity, k=k, vocab_size=vocab_size,
                                   tokenizer_sha256="0" * 64, features={}, num_shards_planned=num_shards)
        writer = CacheWriter(root, k=k, vocab_size=vocab_size)
        start = time.perf_counter()
        for index in range(num_shards):
            manifest.record_shard(writer.write_shard(index, records[index::num_shards]))
        encode_s = time.perf_counter() - start
        manifest.finalize()
        core_bytes = sum(p.stat().st_size for p in Path(root).glob("shard-*.arrow"))
        reader = open_cache(root)
        decode_s = min(_timed_read(reader) for _ in range(3))
    # What Arrow compresses for the top-k columns of each shard file: a column's concatenated values, one zstd
    # frame each (ids ranked in the shard's id table, that table, the log-probs).
    compressor = zstandard.ZstdCompressor(level=CORE_ZSTD_LEVEL)
    topk_bytes = 0
    for index in range(num_shards):
        columns = core_columns(records[index::num_shards], vocab_size=vocab_size, logprob_dtype="fp16")
        topk_bytes += sum(len(compressor.compress(b"".join(columns[name]))) for name in TOPK_COLUMNS)
    return {
        "k": k,
        "positions": positions,
        "topk_bytes_per_entry": topk_bytes / (positions * k),
        "core_bytes_per_entry": core_bytes / (positions * k),
        "core_bytes_per_position": core_bytes / positions,
        "naive_bytes_per_position": NAIVE_BYTES_PER_ENTRY * k,
        "encode_positions_per_s": positions / encode_s,
        "decode_positions_per_s": positions / decode_s,
    }


def _timed_read(reader) -> float:
    start = time.perf_counter()
    for _ in reader.iter_sequences():
        pass
    return time.perf_counter() - start


def main() -> None:
    """Run the benchmark, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=48)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    records = synthetic_records(args.sequences, vocab_size=args.vocab_size, k=max(KS), length=(256, 768))
    rows = [measure(records, k, args.vocab_size, args.shards) for k in KS]
    print(f"{'k':>4} {'positions':>9} {'top-k B/entry':>13} {'core B/entry':>12} {'core B/pos':>10} "
          f"{'naive B/pos':>11} {'encode pos/s':>12} {'decode pos/s':>12}")
    for row in rows:
        print(f"{row['k']:>4} {row['positions']:>9} {row['topk_bytes_per_entry']:>13.3f} "
              f"{row['core_bytes_per_entry']:>12.3f} {row['core_bytes_per_position']:>10.1f} "
              f"{row['naive_bytes_per_position']:>11} {row['encode_positions_per_s']:>12,.0f} "
              f"{row['decode_positions_per_s']:>12,.0f}")
    if args.json:
        args.json.write_text(json.dumps({"synthetic": True, "vocab_size": args.vocab_size, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
