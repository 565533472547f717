"""`lkspec bench`: speculative decoding benchmark (τ, acceptance, speed-up) as a Ray job."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli_error import CliError
from trainer.precision import AUTO_HELP, DTYPE_CHOICES


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _floats(value: str) -> list[float]:
    try:
        return [float(part) for part in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from exc


def _gpus(value: str) -> int | str:
    """--gpus-per-worker: `auto` or an integer >= 0."""
    if value == "auto":
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 0, got {value!r}")
    return int(value)


def register(subparsers) -> None:
    """Add the `bench` sub-command."""
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
    parser.add_argument("--target", required=True, help="target model: alias, HF directory or .gguf file")
    parser.add_argument("--drafter", required=True, type=_csv, metavar="RUN_OR_DIR[,...]",
                        help="drafters: training run directories (run.json + model/), EAGLE-3 exports "
                        "(config.json + model.safetensors, vLLM/SGLang layout) or HF directories")
    parser.add_argument("--bench", type=_csv, default=["mt-bench", "humaneval", "gsm8k"],
                        metavar="NAME[,...]", help="mt-bench, humaneval, gsm8k or .jsonl files of "
                        '{"prompt": ...} lines (default: all three)')
    parser.add_argument("--limit", type=int, default=None,
                        help="N evenly spaced prompts per benchmark (deterministic; default: all)")
    parser.add_argument("--temperature", type=_floats, default=[0.0], metavar="T[,...]",
                        help="sampling temperatures, 0 = greedy (default: 0)")
    parser.add_argument("--k", type=int, default=7, help="drafted tokens per target forward (default: 7)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="per prompt (default: 256)")
    parser.add_argument("--workers", type=int, default=1, help="Ray actors, each holding all models")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: cluster CPUs / workers)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help=f"precision of the target and drafters (default {AUTO_HELP}); the report "
                             "records the resolved one")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (T > 0)")
    parser.add_argument("--gpus-per-worker", type=_gpus, default="auto", metavar="N|auto",
                        help="GPUs each actor's target holds, split over them layer by layer (auto: none on a "
                             "CPU cluster, else the fewest that hold the target; 0: decode on the CPU)")
    parser.add_argument("--out", type=Path, default=Path("bench-report"), help="report directory")
    parser.add_argument("--address", default=None,
                        help="existing Ray cluster (default: start a private local one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the settings, run the job, print where the report is."""
    from pipeline.bench_job import BenchConfig, BenchConfigError, run_bench

    config = BenchConfig(
        target=args.target, drafters=args.drafter, benchmarks=args.bench, limit=args.limit,
        temperatures=args.temperature, k=args.k, max_new_tokens=args.max_new_tokens,
        workers=args.workers, threads_per_worker=args.threads, seed=args.seed, dtype=args.dtype,
        gpus_per_worker=args.gpus_per_worker,
        out=args.out, address=args.address, progress=not args.no_progress,
    )
    try:
        out = run_bench(config)
    except BenchConfigError as exc:
        raise CliError(str(exc)) from exc
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.json'}, {out / 'report.md'}, plots and outputs.jsonl in {out}")
    return 0
