"""`lkspec study`: LK vs KL per drafter family over seeds, and top-k cache fidelity against the full distribution.

`lkspec demo` runs through the same glue (`run_stage`): both are stage configs of pipeline.stages.
"""
from __future__ import annotations

import argparse
from typing import Callable

from pipeline.cli_error import CliError


def register(subparsers) -> None:
    """Add the `study` sub-command."""
    from pipeline.study import StudyConfig
    from trainer.settings import add_flags

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
            "settings. --dtype is the benchmark's precision too. The defaults take about an hour on a\n"
            "2-core CPU machine; see docs/results.md."
        ),
    )
    add_flags(parser, StudyConfig)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The validated StudyConfig the flags describe (ConfigError naming the flag otherwise)."""
    from pipeline.study import StudyConfig
    from trainer.settings import from_args

    return from_args(StudyConfig, args)


def run(args: argparse.Namespace) -> int:
    """Validate the study's settings and run it."""
    from pipeline.study import run_study

    return run_stage(run_study, config_from_args(args))


def run_stage(runner: Callable, config) -> int:
    """Run a study or a demo (`runner(config)`), every refusal or failure of a stage as a one-line CliError."""
    from cache import CacheError
    from trainer.settings import ConfigError

    from pipeline.target_pass import BuildError
    from pipeline.train_job import TrainingError

    try:
        runner(config)
    except ConfigError as exc:
        raise CliError(exc.flag_message()) from None
    except ValueError as exc:  # the stages' other refusals (models, data, drafters) are ValueErrors naming the setting
        raise CliError(str(exc)) from exc
    except (BuildError, TrainingError, CacheError) as exc:  # e.g. a worker killed by Ray's memory monitor
        raise CliError(f"{exc} (the same command resumes: finished caches, runs and reports are reused)") from exc
    return 0
