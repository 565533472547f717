"""The per-step log of a run directory: a run that starts over or resumes reads as one uninterrupted run."""
from __future__ import annotations

from trainer.rundir import MetricsLogger, read_metrics


def _train(run_dir, steps: range, resume_step: int = 0, loss: float = 0.0) -> None:
    logger = MetricsLogger(run_dir, enabled=True, resume_step=resume_step)
    for step in steps:
        logger.log({"step": step, "loss": loss + step})
    logger.close()


def _tensorboard_losses(run_dir) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("train/loss")]


def test_a_run_that_starts_over_or_resumes_logs_only_its_own_steps(tmp_path):
    _train(tmp_path, range(1, 10))  # killed at step 9 before any checkpoint
    _train(tmp_path, range(1, 4), resume_step=0, loss=100.0)  # the rerun starts over
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(1, 101.0), (2, 102.0), (3, 103.0)]
    assert _tensorboard_losses(tmp_path) == [(1, 101.0), (2, 102.0), (3, 103.0)]

    _train(tmp_path, range(3, 5), resume_step=2, loss=200.0)  # resumed from a checkpoint at step 2
    assert [m["loss"] for m in read_metrics(tmp_path)] == [101.0, 102.0, 203.0, 204.0]
    assert _tensorboard_losses(tmp_path) == [(1, 101.0), (2, 102.0), (3, 203.0), (4, 204.0)]
