"""`python -m pipeline.cli`: the same one-line errors as the `lkspec` entry point."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_python_m_prints_a_user_error_as_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("bogus: 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv in (["bench", "--config", str(config)], ["bench", "--target", "t", "--drafter", "d", "--k", "0"]):
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, env=env, text=True,
                                capture_output=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("lkspec: error: ") and result.stderr.count("\n") == 1, result.stderr


def test_a_stage_that_fails_in_a_study_or_demo_is_one_line_that_says_the_command_resumes():
    import re

    import pytest

    from pipeline.cli_error import CliError
    from pipeline.cli_study import run_stage
    from pipeline.target_pass import BuildError
    from pipeline.train_job import TrainingError

    def failing(error):
        def runner(config):
            raise error
        return runner

    for error in (TrainingError("training failed: 4 worker(s) were killed due to the node running low on memory"),
                  BuildError("target worker died")):
        with pytest.raises(CliError, match=rf"^{re.escape(str(error))} \(the same command resumes: finished caches, runs and "
                                           r"reports are reused\)$"):
            run_stage(failing(error), config=None)
    with pytest.raises(RuntimeError, match="a bug"):  # anything else is not a user-facing failure: its traceback stays
        run_stage(failing(RuntimeError("a bug")), config=None)
