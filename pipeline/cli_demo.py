"""`lkspec demo`: the whole product on a local Ray cluster in about ten minutes."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import CliError


def register(subparsers) -> None:
    """Add the `demo` sub-command."""
    from pipeline.demo import DEMO_LOSSES, DemoConfig

    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        help="cache -> train KL / LK drafters -> speculative-decoding report, on a local Ray cluster",
        description=(
            "Run lkspec end to end: build a top-k cache of the embedded SmolLM2-135M-Instruct over "
            "ShareGPT conversations, train three small drafters from that one cache (KL, LK^alpha, "
            "LK^lambda) with DeepSpeed under Ray Train, benchmark them with exact speculative "
            "decoding on MT-bench / HumanEval / GSM8K at T=0 and T=1, print the tau table and write "
            "the report with plots. A second run reuses the cache and the finished runs."
        ),
    )
    parser.add_argument("--out", type=Path, default=defaults.out, help=f"output directory (default: {defaults.out})")
    parser.add_argument("--target", default=defaults.target, help=f"target model (default: {defaults.target})")
    parser.add_argument("--data", default=defaults.data, help=f"conversations (default: {defaults.data})")
    parser.add_argument("--conversations", type=int, default=defaults.conversations,
                        help=f"conversations cached (default: {defaults.conversations})")
    parser.add_argument("--max-length", type=int, default=defaults.max_length,
                        help=f"tokens per conversation (default: {defaults.max_length})")
    parser.add_argument("--k", type=int, default=defaults.k, help=f"top-k cached per position (default: {defaults.k})")
    parser.add_argument("--drafter", default=defaults.drafter, help=f"drafter preset (default: {defaults.drafter})")
    parser.add_argument("--loss", default=",".join(DEMO_LOSSES),
                        help=f"losses, one drafter each (default: {','.join(DEMO_LOSSES)})")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"steps per drafter (default: {defaults.steps})")
    parser.add_argument("--bench", default=",".join(defaults.bench), help="benchmarks (default: all three)")
    parser.add_argument("--bench-limit", type=int, default=defaults.bench_limit,
                        help=f"prompts per benchmark (default: {defaults.bench_limit})")
    parser.add_argument("--temperature", default=",".join(f"{t:g}" for t in defaults.temperatures),
                        help="sampling temperatures (default: 0,1)")
    parser.add_argument("--draft-k", type=int, default=defaults.draft_k,
                        help=f"draft tokens per target forward (default: {defaults.draft_k})")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help=f"tokens generated per prompt (default: {defaults.max_new_tokens})")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help=f"Ray workers per stage (default: {defaults.workers})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed (default: 0)")
    parser.add_argument("--address", default=None, help="existing Ray cluster (default: start a local one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the demo's settings and run it."""
    from pipeline.demo import DemoConfig, run_demo

    try:
        temperatures = tuple(float(t) for t in args.temperature.split(","))
    except ValueError as exc:
        raise CliError(f"--temperature expects numbers like 0,1, got {args.temperature!r}") from exc
    for flag in ("conversations", "max_length", "k", "steps", "bench_limit", "draft_k", "max_new_tokens", "workers"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    config = DemoConfig(
        out=args.out, target=args.target, data=args.data, conversations=args.conversations,
        max_length=args.max_length, k=args.k, drafter=args.drafter,
        losses=tuple(args.loss.split(",")), steps=args.steps, bench=tuple(args.bench.split(",")),
        bench_limit=args.bench_limit, temperatures=temperatures, draft_k=args.draft_k,
        max_new_tokens=args.max_new_tokens, workers=args.workers, seed=args.seed, address=args.address,
    )
    try:
        run_demo(config)
    except ValueError as exc:  # every stage's config errors are ValueErrors naming the flag
        raise CliError(str(exc)) from exc
    return 0
