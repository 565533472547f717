"""`lkspec study`: LK vs KL per drafter family over seeds, and top-k cache fidelity against the full distribution."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli_error import CliError
from trainer.precision import AUTO_HELP, DTYPE_CHOICES


def register(subparsers) -> None:
    """Add the `study` sub-command."""
    from pipeline.study import PARTS, StudyConfig

    d = StudyConfig()
    parser = subparsers.add_parser(
        "study",
        help="LK vs KL per drafter family over seeds with confidence intervals, and top-k cache fidelity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Answer two questions with your own numbers, on one Ray cluster:\n\n"
            "  reproduction  one top-k cache; for each --drafter (family), drafters trained with each --loss at\n"
            "                each --seeds. Primary: held-out alpha per draft step under both tail modes,\n"
            "                alpha(loss) / alpha(kl) with a paired bootstrap over seeds and held-out sequences.\n"
            "                Secondary: every drafter benchmarked at each --temperature; tau(loss) / tau(kl) per\n"
            "                domain with a paired bootstrap over seeds and prompts and a t-interval over seeds.\n"
            "  topk          the first --drafter: one cache per --topk-k; --topk-loss at the first seed with each\n"
            "                --tail, plus the same drafter trained on the target's full distribution\n"
            "                (--target-source online); tau of each and tau / tau(online) at each\n"
            "                --topk-temperature.\n\n"
            "Writes OUT/study.json, OUT/study.md and PNG plots (caches/, runs/ and bench-*/ beside them).\n"
            "A rerun reuses caches (same key), finished runs and benchmark reports made with the same\n"
            "settings. The defaults take about an hour on a 2-core CPU machine; see docs/results.md."
        ),
    )
    what = parser.add_argument_group("what to run")
    what.add_argument("--out", type=Path, default=d.out, help=f"study directory (default: {d.out})")
    what.add_argument("--part", choices=PARTS, default=d.part, help=f"which part (default: {d.part})")
    what.add_argument("--address", default=None, help="existing Ray cluster (default: start a local one)")

    data = parser.add_argument_group("target and cache")
    data.add_argument("--target", default=d.target, help=f"target model (default: {d.target})")
    data.add_argument("--data", default=d.data, help=f"conversations (default: {d.data})")
    data.add_argument("--conversations", type=int, default=d.conversations,
                      help=f"conversations cached (default: {d.conversations})")
    data.add_argument("--max-length", type=int, default=d.max_length,
                      help=f"tokens per conversation (default: {d.max_length})")
    data.add_argument("--k", type=int, default=d.k, help=f"top-k of the reproduction's cache (default: {d.k})")
    data.add_argument("--dtype", choices=DTYPE_CHOICES, default=d.dtype,
                      help=f"precision of the caches, the training and the benchmark (default {AUTO_HELP})")

    train = parser.add_argument_group("drafters (DeepSpeed ZeRO-2 under Ray Train, embeddings from the target)")
    train.add_argument("--drafter", "--family", dest="drafter", default=_join(d.drafters), metavar="DRAFTER[,...]",
                       help="drafters as `lkspec train --drafter` takes them (a preset, a model directory, "
                       "medusa[:KEY=VALUE,...], mlp[:...], eagle3[:...]), comma-separated; one reproduction section "
                       f"each (default: {_join(d.drafters)})")
    train.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per drafter (default: {d.steps})")
    train.add_argument("--batch-tokens", type=int, default=d.batch_tokens,
                       help=f"tokens per worker and step (default: {d.batch_tokens})")
    train.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr:g})")
    train.add_argument("--warmup", type=int, default=d.warmup, help=f"warm-up steps (default: {d.warmup})")
    train.add_argument("--workers", type=int, default=d.workers,
                       help=f"Ray workers for every stage (default: {d.workers})")
    train.add_argument("--seeds", default=_join(d.seeds), help=f"training seeds (default: {_join(d.seeds)})")
    train.add_argument("--loss", default=_join(d.losses),
                       help=f"reproduction losses, kl included as the reference (default: {_join(d.losses)})")
    train.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction,
                       help=f"sequences held out of training, by sample-id hash (default: {d.heldout_fraction:g})")
    train.add_argument("--eval-sequences", type=int, default=d.eval_sequences,
                       help=f"held-out sequences scored per run: the alpha bootstrap's sequences "
                       f"(default: {d.eval_sequences})")
    train.add_argument("--topk-k", default=_join(d.topk_ks), help=f"top-k part: k values (default: {_join(d.topk_ks)})")
    train.add_argument("--tail", default=_join(d.tails), help=f"top-k part: tail modes (default: {_join(d.tails)})")
    train.add_argument("--topk-loss", default=d.topk_loss, help=f"top-k part: the loss (default: {d.topk_loss})")

    bench = parser.add_argument_group("benchmark and statistics")
    bench.add_argument("--bench", default=_join(d.bench), help=f"benchmarks (default: {_join(d.bench)})")
    bench.add_argument("--bench-limit", type=int, default=d.bench_limit,
                       help=f"prompts per benchmark (default: {d.bench_limit})")
    bench.add_argument("--temperature", default=_join(d.temperatures),
                       help=f"reproduction temperatures (default: {_join(d.temperatures)})")
    bench.add_argument("--topk-temperature", default=_join(d.topk_temperatures),
                       help=f"top-k part temperatures (default: {_join(d.topk_temperatures)})")
    bench.add_argument("--draft-k", type=int, default=d.draft_k,
                       help=f"draft tokens per target forward (default: {d.draft_k})")
    bench.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                       help=f"tokens generated per prompt (default: {d.max_new_tokens})")
    bench.add_argument("--resamples", type=int, default=d.resamples,
                       help=f"bootstrap resamples (default: {d.resamples})")
    bench.add_argument("--confidence", type=float, default=d.confidence,
                       help=f"confidence level of the intervals (default: {d.confidence})")
    parser.set_defaults(func=run)


def _join(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _list(args: argparse.Namespace, key: str, kind=str) -> tuple:
    """A comma-separated flag as a tuple, converted by `kind`, or a CliError naming the flag."""
    text = str(getattr(args, key))
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError as exc:
        raise CliError(f"--{key.replace('_', '-')} expects a comma-separated list of {kind.__name__}, "
                       f"got {text!r}") from exc


def config_from_args(args: argparse.Namespace):
    """A validated StudyConfig from parsed flags (CliError naming the flag otherwise)."""
    from pipeline.study import StudyConfig, StudyConfigError, split_drafters

    config = StudyConfig(
        out=args.out, part=args.part, target=args.target, data=args.data, conversations=args.conversations,
        max_length=args.max_length, dtype=args.dtype, drafters=split_drafters(str(args.drafter)),
        steps=args.steps, batch_tokens=args.batch_tokens, lr=args.lr, warmup=args.warmup, workers=args.workers,
        seeds=_list(args, "seeds", int), heldout_fraction=args.heldout_fraction, eval_sequences=args.eval_sequences,
        losses=_list(args, "loss"), k=args.k, topk_ks=_list(args, "topk_k", int), tails=_list(args, "tail"),
        topk_loss=args.topk_loss, bench=_list(args, "bench"), bench_limit=args.bench_limit,
        temperatures=_list(args, "temperature", float), topk_temperatures=_list(args, "topk_temperature", float),
        draft_k=args.draft_k, max_new_tokens=args.max_new_tokens, resamples=args.resamples,
        confidence=args.confidence, address=args.address,
    )
    try:
        config.validate()
    except StudyConfigError as exc:
        raise CliError(str(exc)) from exc
    return config


def run(args: argparse.Namespace) -> int:
    """Validate the study's settings and run it."""
    from pipeline.study import run_study

    config = config_from_args(args)
    try:
        run_study(config)
    except ValueError as exc:  # every stage's config errors are ValueErrors naming the setting
        raise CliError(str(exc)) from exc
    return 0
