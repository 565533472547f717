"""`lkspec submit` runs a command as a real Ray job on a local head with the Jobs API on 127.0.0.1."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from pipeline.cli import main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def jobs_address():
    """A Ray head of its own, dashboard (Jobs API) bound to 127.0.0.1; stopped by its own temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="lkjob-", dir="/tmp")
    dashboard_port = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run(
        [ray_cli, "start", "--head", f"--port={_free_port()}", "--num-cpus=1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # another Ray on this machine (the session's ray_address cluster) holds the default
         # agent ports: take free ones so that this head's job agent can start
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}"],
        check=True, env=env, capture_output=True, timeout=120,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        # `ray stop` would kill every Ray cluster on the machine: stop only this one.
        subprocess.run(["pkill", "-f", temp_dir], check=False)
        time.sleep(1)
        subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_streams_logs_and_returns_success(jobs_address, capfd):
    status = main(["submit", "--address", jobs_address, "--", "lkspec", "submit", "--help"])
    out = capfd.readouterr().out
    assert status == 0
    assert "Submit any lkspec command as a Ray job" in out  # the job's own output, streamed back


@pytest.mark.slow
def test_submit_returns_the_job_exit_status(jobs_address, capfd):
    status = main(["submit", "--address", jobs_address, "--", "lkspec", "no-such-command"])
    captured = capfd.readouterr()
    assert status == 2  # argparse's exit status inside the job, carried back
    assert "invalid choice" in captured.out + captured.err


def test_submit_refuses_an_empty_command(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--"]) == 2
    assert "nothing to submit" in capsys.readouterr().err


def test_submit_reports_an_unreachable_cluster(capsys):
    assert main(["submit", "--address", f"http://127.0.0.1:{_free_port()}", "--", "cache", "ls", "x"]) == 2
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err
