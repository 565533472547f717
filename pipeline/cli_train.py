"""`lkspec train` (a drafter per loss from one cache, on Ray Train + DeepSpeed) and `lkspec runs`."""
from __future__ import annotations

import argparse
import json

from pipeline.cli_error import CliError

EXAMPLE = (
    "examples: lkspec train --cache ~/.cache/lkspec/caches/<key> --drafter tiny "
    "--loss kl,lk_lambda --out runs --steps 2000 --workers 2 --zero 2; "
    "lkspec train --cache <an aux cache> --drafter eagle3:draft_vocab=8192,steps=6 "
    "--loss kl,lk_lambda --out runs; "
    "lkspec train --cache <a `--features last` cache> --drafter medusa:heads=6 --loss kl,lk_lambda --out runs"
)


def register(subparsers) -> None:
    """Add the `train` and `runs` sub-commands."""
    from trainer.config import CLUSTER, WHAT, TrainConfig
    from trainer.settings import add_flags, flag_group

    parser = subparsers.add_parser(
        "train",
        help="train drafters from a cache (one run per loss) on Ray Train + DeepSpeed ZeRO",
        description=(
            "Train speculative-decoding drafters from a target cache with DeepSpeed ZeRO workers "
            "under Ray Train. Several losses make a sweep: one run per loss, all reading the same "
            "cache, each in OUT/<run-name>/ (metrics.jsonl, tb/, checkpoints/, best/, model/, run.json). "
            "Defaults follow the LK paper: AdamW (0.9, 0.95), lr 4e-4, 100 warm-up steps then "
            "cosine decay, gradient clipping 0.5."
        ),
        epilog=EXAMPLE,
    )
    add_flags(parser, TrainConfig)
    flag_group(parser, WHAT).add_argument(
        "--loss", default="kl", metavar="LOSS[,LOSS...]",
        help="kl, tv, lk_alpha, lk_lambda (or lk-alpha, lk-lambda); several = a sweep (default: kl)")
    flag_group(parser, CLUSTER).add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster is started)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train)

    runs = subparsers.add_parser("runs", help="list training runs with their metrics",
                                 description="List the runs under a runs directory with status and metrics.")
    runs.add_argument("runs_dir", metavar="RUNS", help="runs directory (the --out of lkspec train)")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.set_defaults(func=run_runs)


def configs_from_args(args: argparse.Namespace):
    """The validated TrainConfig of every run the arguments ask for (CliError naming the flag otherwise)."""
    from trainer.config import TrainConfig
    from trainer.settings import ConfigError, from_args

    from pipeline.train_job import sweep_configs

    try:
        # lk-lambda is lk_lambda
        losses = [loss.strip().replace("-", "_") for loss in str(args.loss).split(",") if loss.strip()]
        return sweep_configs(from_args(TrainConfig, args), losses)
    except ConfigError as exc:
        raise CliError(exc.flag_message()) from None


def run_train(args: argparse.Namespace) -> int:
    """Plan every run (all checks first), train them, print where they are."""
    from cache import CacheError
    from pipeline.resolve.models import ModelNotFoundError
    from trainer.data import DataError
    from trainer.drafters import DrafterError
    from trainer.settings import ConfigError

    from pipeline.train_job import TrainingError, list_runs, train_sweep

    configs = configs_from_args(args)
    try:
        run_dirs = train_sweep(configs, address=args.address, progress=not args.no_progress)
    except ConfigError as exc:
        raise CliError(exc.flag_message()) from None
    except (DrafterError, CacheError, DataError, ModelNotFoundError, TrainingError) as exc:
        raise CliError(str(exc)) from exc
    names = {d.name for d in run_dirs}
    rows = [row for row in list_runs(run_dirs[0].parent) if row["name"] in names]
    print(format_runs(rows))
    return 0


def run_runs(args: argparse.Namespace) -> int:
    """Print the runs table (or JSON)."""
    from pathlib import Path

    from pipeline.train_job import list_runs

    if not Path(args.runs_dir).expanduser().is_dir():
        raise CliError(f"{args.runs_dir} is not a directory")
    rows = list_runs(args.runs_dir)
    print(json.dumps(rows, indent=1) if args.json else format_runs(rows))
    return 0


COLUMNS = [("name", "run"), ("status", "status"), ("loss", "loss"), ("tail", "tail"), ("target", "target"),
           ("steps", "steps"), ("train_loss", "train loss"), ("train_alpha", "train α"),
           ("heldout_alpha_drop", "held-out α (drop)"), ("heldout_alpha_bucket", "held-out α (bucket)"),
           ("heldout_tau_drop", "E[τ] (drop)"), ("heldout_tau_bucket", "E[τ] (bucket)"),
           ("heldout_alpha_exact", "held-out α (exact)"), ("heldout_tau_exact", "E[τ] (exact)"),
           ("best_tau", "best τ"), ("best_step", "@step"), ("tokens_per_s", "tok/s"), ("cache", "cache")]


def format_runs(rows: list[dict]) -> str:
    """A plain-text table of runs."""
    if not rows:
        return "no runs"

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        if isinstance(value, list):  # per draft step
            return " ".join(f"{item:.3f}" for item in value)
        return str(value)

    table = [[title for _, title in COLUMNS]] + [[cell(row.get(key)) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in table)
