"""`lkspec train` (a drafter per loss from one cache, on Ray Train + DeepSpeed) and `lkspec runs`."""
from __future__ import annotations

import argparse
import json

from pipeline.cli_error import CliError
from trainer.precision import AUTO_HELP, DTYPE_CHOICES

EXAMPLE = (
    "examples: lkspec train --cache ~/.cache/lkspec/caches/<key> --drafter tiny "
    "--loss kl,lk_lambda --out runs --steps 2000 --workers 2 --zero 2; "
    "lkspec train --cache <an aux cache> --drafter eagle3:draft_vocab=8192,steps=6 "
    "--loss kl,lk_lambda --out runs; "
    "lkspec train --cache <a `--features last` cache> --drafter medusa:heads=6 --loss kl,lk_lambda --out runs"
)


def register(subparsers) -> None:
    """Add the `train` and `runs` sub-commands."""
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
    data = parser.add_argument_group("what to train")
    data.add_argument("--cache", required=True, metavar="DIR", help="cache directory (from `lkspec cache build`)")
    data.add_argument("--drafter", default="tiny", metavar="SPEC",
                      help="architecture preset (tiny: 2 layers, hidden 256; small: 4 layers, hidden 512), "
                      "a Hugging Face model directory sharing the target's tokenizer, "
                      "eagle3[:KEY=VALUE,...] (EAGLE-3 over the cache's aux features; keys hidden, heads, "
                      "kv_heads, intermediate, draft_vocab, steps, freeze_embeddings, max_positions, rope_theta), "
                      "medusa[:heads=6,layers=1,draft_vocab=N] (MEDUSA-1 heads over the cache's last feature) or "
                      "mlp[:stages=6,inner=D,tie=false,scale_input=false,draft_vocab=N] (an MLP speculator over the "
                      "cache's last feature; with draft_vocab its model/ loads in lkspec only: vLLM's MLPSpeculator "
                      "has no token map) (default: tiny)")
    data.add_argument("--drafter-config", default="", metavar="K=V,...",
                      help="override preset fields: layers, hidden, heads, kv_heads, intermediate, "
                      "max_positions, rope_theta, tie_embeddings (e.g. layers=4,hidden=384,heads=6); "
                      "not for eagle3, medusa or mlp, whose options follow `NAME:`")
    data.add_argument("--init-embeddings-from", choices=["target"], default=None,
                      help="copy the target's token embeddings into an independent drafter (its width becomes "
                      "the target's); eagle3 takes the target's embeddings whenever its width is the target's (this "
                      "flag makes another hidden= an error), "
                      "medusa always copies the target's LM head, mlp takes nothing from the target (the flag is "
                      "ignored with a warning)")
    data.add_argument("--loss", default="kl", metavar="LOSS[,LOSS...]",
                      help="kl, tv, lk_alpha, lk_lambda (or lk-alpha, lk-lambda); several = a sweep (default: kl)")
    data.add_argument("--out", required=True, metavar="RUNS", help="runs directory")
    data.add_argument("--run-name", default=None,
                      help="run directory name (default [<family>-]<loss>-<cache key[:8]>-s<seed>, the family prefix "
                      "for eagle3, medusa and mlp; a sweep appends -<loss>)")
    data.add_argument("--target-source", choices=["cache", "online"], default="cache",
                      help="cache: the cached top-k (default); online: the target model runs in each worker "
                      "and supplies its full distribution (the baseline the top-k cache is judged against)")
    data.add_argument("--target", default=None, metavar="MODEL",
                      help="target model (alias, HF directory or .gguf) for --target-source online, "
                      "--init-embeddings-from target, or the tokenizer of a preset drafter "
                      "(default: the target recorded in the cache manifest)")
    data.add_argument("--tail", choices=["bucket", "drop"], default="bucket",
                      help="top-k tail handling: one extra category (bucket, default) or ignored (drop)")

    length = parser.add_argument_group("how long").add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None,
                        help="passes over each worker's share of the training sequences (default: 1)")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (default: 4e-4)")
    optim.add_argument("--warmup", type=int, default=100,
                       help="linear warm-up steps before cosine decay (default: 100)")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    optim.add_argument("--grad-clip", type=float, default=0.5, help="gradient clipping norm (default: 0.5)")
    optim.add_argument("--batch-tokens", type=int, default=8192,
                       help="tokens per worker and step, padding included (default: 8192)")
    optim.add_argument("--eta", type=float, default=None,
                       help="LK^lambda temperature: lambda = exp(-eta*alpha) (default: the drafter family's, "
                       "10 for medusa as in the paper, 3 for the others)")
    optim.add_argument("--seed", type=int, default=0, help="initialization and data order seed (default: 0)")
    optim.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help=f"training precision (default {AUTO_HELP})")

    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--workers", type=int, default=2, help="data-parallel Ray Train workers (default: 2)")
    cluster.add_argument("--zero", type=int, choices=[1, 2, 3], default=2, help="DeepSpeed ZeRO stage (default: 2)")
    cluster.add_argument("--address", default=None,
                         help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster is started)")

    evals = parser.add_argument_group("evaluation and checkpoints")
    evals.add_argument("--eval-every", type=int, default=100,
                       help="steps between held-out evaluations; 0 = only at the end (default: 100)")
    evals.add_argument("--heldout-fraction", type=float, default=0.05,
                       help="fraction of sequences (by sample-id hash) never trained on "
                       "(default: 0.05, at least 1 sequence)")
    evals.add_argument("--eval-sequences", type=int, default=256,
                       help="held-out sequences scored at each evaluation (default: 256)")
    evals.add_argument("--checkpoint-every", type=int, default=500,
                       help="steps between DeepSpeed checkpoints; 0 = only at the end (default: 500)")
    evals.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default: 2)")
    evals.add_argument("--resume", action="store_true",
                       help="continue the run(s) from their latest checkpoint (same settings, exact continuation)")
    evals.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                       help="checkpoint and stop this invocation after STEP (continue later with --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train)

    runs = subparsers.add_parser("runs", help="list training runs with their metrics",
                                 description="List the runs under a runs directory with status and metrics.")
    runs.add_argument("runs_dir", metavar="RUNS", help="runs directory (the --out of lkspec train)")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.set_defaults(func=run_runs)


def configs_from_args(args: argparse.Namespace):
    """The validated TrainConfig of every run the arguments ask for (CliError naming the flag otherwise)."""
    from trainer.config import ConfigError, TrainConfig
    from trainer.drafters import DrafterError, parse_arch_overrides

    from pipeline.train_job import sweep_configs

    try:
        base = TrainConfig(
            cache=args.cache, out=args.out, drafter=args.drafter,
            drafter_config=parse_arch_overrides(args.drafter_config or ""),
            init_embeddings_from=args.init_embeddings_from, run_name=args.run_name,
            steps=args.steps, epochs=args.epochs if args.epochs is not None or args.steps is not None else 1.0,
            workers=args.workers, zero=args.zero, dtype=args.dtype, lr=args.lr, warmup=args.warmup,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, batch_tokens=args.batch_tokens,
            eta=args.eta, tail=args.tail, target_source=args.target_source, target=args.target, seed=args.seed,
            heldout_fraction=args.heldout_fraction, eval_sequences=args.eval_sequences,
            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints, resume=args.resume, stop_after=args.stop_after,
        )
        # lk-lambda is lk_lambda
        losses = [loss.strip().replace("-", "_") for loss in str(args.loss).split(",") if loss.strip()]
        return sweep_configs(base, losses)
    except (ConfigError, DrafterError) as exc:
        raise CliError(str(exc)) from exc


def run_train(args: argparse.Namespace) -> int:
    """Plan every run (all checks first), train them, print where they are."""
    from cache import CacheError
    from pipeline.resolve.models import ModelNotFoundError
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.drafters import DrafterError

    from pipeline.train_job import TrainingError, list_runs, train_sweep

    configs = configs_from_args(args)
    try:
        run_dirs = train_sweep(configs, address=args.address, progress=not args.no_progress)
    except (ConfigError, DrafterError, CacheError, DataError, ModelNotFoundError, TrainingError) as exc:
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
           ("heldout_tau_drop", "E[τ] (drop)"), ("heldout_tau_bucket", "E[τ] (bucket)"), ("best_tau", "best τ"),
           ("best_step", "@step"), ("tokens_per_s", "tok/s"), ("cache", "cache")]


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
