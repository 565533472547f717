"""`lkspec plan`: size a cache build before running it (GPUs per worker, bytes on disk, GPU-hours)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.cli_error import CliError

DEFAULT_TOKENIZER = "smollm2-135m"  # embedded: always available without a download
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def register(subparsers) -> None:
    """Add the `plan` sub-command."""
    from pipeline.plan import DEFAULT_GPU_TFLOPS, DEFAULT_UTILIZATION

    parser = subparsers.add_parser(
        "plan", help="estimate GPUs per worker, cache size and GPU-hours of a cache build (no weights needed)",
        description="Size `lkspec cache build` before it runs, from the target's config.json alone: GPUs per "
                    "target worker and workers per node, the cache's bytes on disk (measured bytes per top-k "
                    "entry x the dataset's trained tokens), the hidden-state feature bytes, and the target "
                    "pass's GPU-hours at a stated utilization. Example: lkspec plan --target llama-3.1-70b "
                    "--data sharegpt --k 64 --features aux",
    )
    parser.add_argument("--target", required=True,
                        help="a config.json, a model directory, or a name from configs/targets (llama-3.1-8b, "
                             "llama-3.1-70b, qwen3-235b-a22b, deepseek-v3, gpt-oss-120b, smollm2-135m, ...)")
    parser.add_argument("--data", required=True, help="dataset, as for `cache build` (sharegpt, a .jsonl file, ...)")
    parser.add_argument("--limit", type=int, default=None, help="the first N usable conversations")
    parser.add_argument("--k", type=int, default=64, help="top-k log-probs per trained position (default: 64)")
    parser.add_argument("--features", default="none", help="none, last, aux or last,aux (default: none)")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (default: 1024)")
    parser.add_argument("--token-budget", type=int, default=8192, help="padded tokens per forward batch (default: 8192)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="target weights (default: bf16)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default: 80)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs on one node (default: 8)")
    parser.add_argument("--gpu-tflops", type=float, default=DEFAULT_GPU_TFLOPS,
                        help=f"peak dense bf16 TFLOP/s of one GPU (default: {DEFAULT_GPU_TFLOPS:g}, H100/H200)")
    parser.add_argument("--utilization", type=float, default=DEFAULT_UTILIZATION,
                        help=f"fraction of that peak the target pass reaches (default: {DEFAULT_UTILIZATION})")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer for the token count: alias or directory (default: the target's own when "
                             f"its directory has one, else {DEFAULT_TOKENIZER})")
    parser.add_argument("--sample", type=int, default=1000,
                        help="tokenize at most this many conversations, evenly spaced, and extrapolate (default: 1000)")
    parser.add_argument("--shard-size", type=int, default=64, help="sequences per shard, as for `cache build`")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)


def tokenizer_source(target: str, override: str | None) -> str:
    """What to tokenize with: --tokenizer, else the target directory when it ships a tokenizer, else the default."""
    if override:
        return override
    path = Path(target).expanduser()
    directory = path if path.is_dir() else path.parent
    if path.exists() and any((directory / name).is_file() for name in TOKENIZER_FILES):
        return str(directory)
    return DEFAULT_TOKENIZER


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    from pipeline.resolve.models import EMBEDDED_MODELS, resolve_model

    path = resolve_model(source).path if source in EMBEDDED_MODELS else Path(source).expanduser()
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CliError(f"--tokenizer {source}: cannot load a tokenizer ({exc})") from None


def run(args: argparse.Namespace) -> int:
    """Count the data's tokens, size the build and print the plan."""
    from pipeline.build import ConfigError, parse_features
    from pipeline.resolve.datasets import DataError, open_dataset
    from pipeline.plan import PlanError, count_tokens, load_model_shape, make_plan, read_conversations

    for name in ("k", "max_length", "token_budget", "gpus_per_node", "sample", "shard_size"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be >= 1, got {args.limit}")
    try:
        features = parse_features(args.features)
        shape = load_model_shape(args.target)
        source = tokenizer_source(args.target, args.tokenizer)
        tokenizer = _load_tokenizer(source)
        conversations, skipped = read_conversations(open_dataset(args.data), args.limit)
        if not conversations:
            raise PlanError(f"{args.data}: no valid conversation")
        counts = count_tokens(conversations, tokenizer, max_length=args.max_length, sample=args.sample,
                              tokenizer_name=source, skipped=skipped)
        plan = make_plan(shape, counts, k=args.k, features=features, gpu_memory_gib=args.gpu_memory_gib,
                         gpus_per_node=args.gpus_per_node, token_budget=args.token_budget, dtype=args.dtype,
                         shard_size=args.shard_size, gpu_tflops=args.gpu_tflops, utilization=args.utilization)
    except (ConfigError, PlanError, DataError) as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(render(plan, args))
    return 0


def _gib(value: float) -> str:
    return f"{value / 2**30:,.2f} GiB" if value < 2**40 else f"{value / 2**40:,.2f} TiB"


def render(plan, args: argparse.Namespace) -> str:
    """The plan as a short human-readable table."""
    from pipeline.plan import DTYPE_BYTES, entry_bytes

    counts, size, place = plan.counts, plan.size, plan.placement
    how = "all tokenized" if counts.exact else f"{counts.sampled:,} tokenized evenly spaced, extrapolated"
    spread = f" (± {counts.positions_stderr / counts.positions:.1%})" if not counts.exact else ""
    skipped = sum(counts.skipped.values())
    lines = [
        ("model", f"{plan.target}: {plan.params_total / 1e9:,.2f} B parameters ({plan.params_active / 1e9:,.2f} B "
                  f"active per token), {args.dtype} weights {_gib(plan.params_total * DTYPE_BYTES[args.dtype])}"),
        ("placement", f"{place.gpus_per_worker} GPU(s) per target worker, {place.workers_per_node} worker(s) per "
                      f"{args.gpus_per_node}-GPU node ({args.gpu_memory_gib:g} GiB GPUs); per GPU: weights "
                      f"≈{_gib(place.weight_bytes / place.gpus_per_worker)}, activations {_gib(place.activation_bytes)}, "
                      f"top-k buffers {_gib(place.topk_buffer_bytes)} (last GPU), reserved {_gib(place.reserved_bytes)}"),
        ("data", f"{args.data}: {counts.sequences:,} sequences ({how}), {counts.tokens:,.0f} tokens, "
                 f"{counts.positions:,.0f} trained positions{spread}; tokenizer {counts.tokenizer}, max length "
                 f"{args.max_length}" + (f"; {skipped:,} rows skipped (cache build needs --skip-invalid)"
                                         if skipped else "")),
        ("cache", f"{_gib(size.total)} on disk: core {_gib(size.core)} (top-k {_gib(size.topk)}, token ids "
                  f"{_gib(size.tokens)}; {size.core / counts.positions:,.1f} B per trained position, "
                  f"{size.core / counts.tokens:,.1f} B per token)"
                  + "".join(f" + {name} {_gib(b)}" for name, b in size.features.items())),
        ("", f"k = {plan.k}: {entry_bytes(plan.k):.2f} B per top-k entry (measured on SmolLM2's builds); features "
             "are bf16 at every token of a sequence"),
        ("target pass", f"{plan.flops:.3g} FLOPs = {plan.gpu_hours:,.2f} GPU-hours at {plan.gpu_tflops:g} TFLOP/s × "
                        f"{plan.utilization:.0%} utilization"
                        + (f"; {plan.gpu_hours_held:,.2f} GPU-hours held ({place.gpus_per_worker} GPUs per worker "
                           "take turns layer by layer)" if place.gpus_per_worker > 1 else "")),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)
