"""`lkspec demo`: the whole product on a local Ray cluster, for the embedded model or a named profile."""
from __future__ import annotations

import argparse

from pipeline.cli_study import run_stage

DEFAULT_PROFILE = "smollm2"


def register(subparsers) -> None:
    """Add the `demo` sub-command."""
    from pipeline.demo import DemoConfig
    from pipeline.profiles import DEMO_PROFILES
    from trainer.settings import add_flags

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
    add_flags(parser, DemoConfig, presets=DEMO_PROFILES)  # every flag defaults to "the profile's value"
    parser.set_defaults(func=run)


def demo_config(args: argparse.Namespace):
    """The profile's DemoConfig with every flag that was given (command line or --config) on top."""
    from pipeline.demo import DemoConfig
    from pipeline.profiles import DEMO_PROFILES
    from trainer.settings import from_args

    return from_args(DemoConfig, args, preset=DEMO_PROFILES[args.profile])


def run(args: argparse.Namespace) -> int:
    """Validate the demo's settings and run it."""
    from pipeline.demo import run_demo

    return run_stage(run_demo, demo_config(args))
