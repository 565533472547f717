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
