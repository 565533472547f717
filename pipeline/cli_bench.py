"""`lkspec bench`: speculative decoding benchmark (τ, acceptance, speed-up) as a Ray job."""
from __future__ import annotations

import argparse

from pipeline.cli_error import CliError


def register(subparsers) -> None:
    """Add the `bench` sub-command."""
    from pipeline.bench_job import BenchConfig
    from trainer.settings import add_flags

    parser = subparsers.add_parser(
        "bench",
        help="measure speculative decoding (τ, acceptance per position, speed-up) on benchmarks",
        description=(
            "Exact speculative decoding of MT-bench / HumanEval / GSM8K prompts with a target and "
            "one or more drafters, sharded over Ray actors. Writes report.json, report.md, PNG "
            "plots and outputs.jsonl. Example: lkspec bench --target smollm2-135m --drafter "
            "runs/lk-lambda --bench mt-bench,gsm8k --limit 20 --temperature 0,1 --out reports/lk"
        ),
    )
    add_flags(parser, BenchConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the settings, run the job, print where the report is."""
    from pipeline.bench_job import BenchConfig, run_bench
    from trainer.settings import ConfigError, from_args

    try:
        out = run_bench(from_args(BenchConfig, args))
    except ConfigError as exc:
        raise CliError(exc.flag_message()) from None
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.json'}, {out / 'report.md'}, plots and outputs.jsonl in {out}")
    return 0
