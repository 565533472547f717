"""`lkspec demo`: the whole product on a local Ray cluster, for the embedded model or a named profile."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli_error import CliError
from trainer.precision import AUTO_HELP, DTYPE_CHOICES

DEFAULT_PROFILE = "smollm2"


def register(subparsers) -> None:
    """Add the `demo` sub-command."""
    from pipeline.demo import DemoConfig
    from pipeline.profiles import DEMO_PROFILES

    base = DemoConfig()
    qwen = DEMO_PROFILES["qwen-coder"]

    def default(name: str) -> str:
        value = getattr(base, name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        if name in qwen:
            other = qwen[name]
            return f"{shown}; qwen-coder: {','.join(map(str, other)) if isinstance(other, tuple) else other}"
        return str(shown)

    parser = subparsers.add_parser(
        "demo",
        help="cache -> train KL / LK drafters -> speculative-decoding report, on a local Ray cluster",
        description=(
            "Run lkspec end to end: build a top-k cache of the target over ShareGPT conversations, "
            "train drafters from that one cache (KL and LK^lambda) with DeepSpeed under Ray "
            "Train, benchmark them with exact speculative decoding on MT-bench / HumanEval / GSM8K at "
            "T=0 and T=1, print the tau and speed-up tables and write the report with plots. A second "
            "run reuses the cache and the finished runs. --profile smollm2 (default): the embedded "
            "SmolLM2-135M-Instruct and a MEDUSA head over its last hidden state (8,192-token draft "
            "vocabulary, one draft token per target forward), about ten minutes on 2 CPU cores. "
            "--profile qwen-coder: Qwen2.5-Coder-1.5B-Instruct with its 0.5B sibling fine-tuned as "
            "the drafter and benchmarked untuned too (1.6 GB fetched from PyPI on first use; see "
            "docs/qwen.md). Any flag overrides the profile's value."
        ),
    )
    parser.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(DEMO_PROFILES),
                        help=f"preset sizes and models (default: {DEFAULT_PROFILE})")
    # Every other flag defaults to None, meaning "the profile's value".
    parser.add_argument("--out", type=Path, help=f"output directory (default: {default('out')})")
    parser.add_argument("--target", help=f"target model (default: {default('target')})")
    parser.add_argument("--data", help=f"conversations (default: {default('data')})")
    parser.add_argument("--conversations", type=int, help=f"conversations cached (default: {default('conversations')})")
    parser.add_argument("--max-length", type=int, help=f"tokens per conversation (default: {default('max_length')})")
    parser.add_argument("--k", type=int, help=f"top-k cached per position (default: {default('k')})")
    parser.add_argument("--drafter", help="drafter: a preset, or a model alias / directory that is fine-tuned "
                        f"and also benchmarked untuned (default: {default('drafter')})")
    parser.add_argument("--loss", help=f"losses, one drafter each (default: {default('losses')})")
    parser.add_argument("--steps", type=int, help=f"steps per drafter (default: {default('steps')})")
    parser.add_argument("--batch-tokens", type=int, help=f"tokens per training step (default: {default('batch_tokens')})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default: {default('lr')})")
    parser.add_argument("--bench", help=f"benchmarks (default: {default('bench')})")
    parser.add_argument("--bench-limit", type=int, help=f"prompts per benchmark (default: {default('bench_limit')})")
    parser.add_argument("--temperature", help=f"sampling temperatures (default: {default('temperatures')})")
    parser.add_argument("--draft-k", type=int, help=f"draft tokens per target forward (default: {default('draft_k')})")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"tokens generated per prompt (default: {default('max_new_tokens')})")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES,
                        help=f"cache and training precision (default: {default('dtype')}; {AUTO_HELP})")
    parser.add_argument("--bench-dtype", choices=DTYPE_CHOICES,
                        help=f"benchmark precision (default: {default('bench_dtype')})")
    parser.add_argument("--workers", type=int, help=f"Ray workers per stage (default: {default('workers')})")
    parser.add_argument("--seed", type=int, help="seed (default: 0)")
    parser.add_argument("--address", default=None, help="existing Ray cluster (default: start a local one)")
    parser.set_defaults(func=run)


def demo_config(args: argparse.Namespace):
    """The profile's DemoConfig with every flag that was given (command line or --config) on top."""
    from dataclasses import replace

    from pipeline.demo import DemoConfig
    from pipeline.profiles import DEMO_PROFILES

    given = {name: getattr(args, name) for name in (
        "out", "target", "data", "conversations", "max_length", "k", "drafter", "steps", "batch_tokens", "lr",
        "bench_limit", "draft_k", "max_new_tokens", "dtype", "bench_dtype", "workers", "seed", "address",
    ) if getattr(args, name) is not None}
    for flag in ("conversations", "max_length", "k", "steps", "batch_tokens", "bench_limit", "draft_k",
                 "max_new_tokens", "workers"):
        if flag in given and given[flag] < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be >= 1, got {given[flag]}")
    if "lr" in given and not given["lr"] > 0:
        raise CliError(f"--lr must be > 0, got {given['lr']}")
    if args.loss is not None:
        given["losses"] = tuple(args.loss.split(","))
    if args.bench is not None:
        given["bench"] = tuple(args.bench.split(","))
    if args.temperature is not None:
        try:
            given["temperatures"] = tuple(float(t) for t in args.temperature.split(","))
        except ValueError as exc:
            raise CliError(f"--temperature expects numbers like 0,1, got {args.temperature!r}") from exc
    config = replace(DemoConfig(), **{**DEMO_PROFILES[args.profile], **given})
    config.out = Path(config.out)
    return config


def run(args: argparse.Namespace) -> int:
    """Validate the demo's settings and run it."""
    from pipeline.demo import run_demo

    config = demo_config(args)
    try:
        run_demo(config)
    except ValueError as exc:  # every stage's config errors are ValueErrors naming the flag
        raise CliError(str(exc)) from exc
    return 0
