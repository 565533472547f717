"""`lkspec submit` runs a command as a real Ray job on a local head with token auth and the Jobs API on 127.0.0.1."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from pipeline.cli import main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def jobs_head():
    """A Ray head of its own with token auth, every port on 127.0.0.1: (Jobs API address, token).

    Stopped by the pids of the processes that name its temp dir and their children (never `ray stop`).
    """
    import psutil

    temp_dir = tempfile.mkdtemp(prefix="lkjob-", dir="/tmp")
    dashboard_port = _free_port()
    token = secrets.token_hex(32)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run(
        [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}", "--num-cpus=1",
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
            except urllib.error.HTTPError:  # 401: up, and asking for the token
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield address, token
    finally:
        roots = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        processes = {q for p in roots for q in [p, *_children(p)]}
        for process in processes:
            process.terminate()
        _, alive = psutil.wait_procs(list(processes), timeout=3)  # what outlives SIGTERM this long is killed
        for process in alive:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _children(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def jobs_address(jobs_head, monkeypatch):
    """The head's Jobs API address, with its token in $RAY_AUTH_TOKEN as a user supplies it."""
    address, token = jobs_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    return address


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


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_submit_without_the_clusters_token_is_refused_with_one_line(jobs_head, monkeypatch, capfd, tmp_path, token):
    address, _ = jobs_head
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    if token is None:
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    status = main(["submit", "--address", address, "--", "lkspec", "submit", "--help"])
    captured = capfd.readouterr()
    why = "requires a token and none was found" if token is None else "refused the token"
    assert status == 2 and f"the Ray cluster at {address} {why}" in captured.err
    assert "Traceback" not in captured.err and "submitted job" not in captured.err


def test_submit_reads_the_token_from_ray_auth_token_path(tmp_path, monkeypatch):
    from pipeline.submit import TokenError, cluster_token

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    with pytest.raises(TokenError, match="does not exist"):
        cluster_token()
    (tmp_path / "token").write_text("abc123\n")
    assert cluster_token() == "abc123"
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert cluster_token() is None  # and no ~/.ray/auth_token under this HOME
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home")
    assert cluster_token() == "from-home"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert cluster_token() == "from-env"


def test_submit_refuses_an_empty_command(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--"]) == 2
    assert "nothing to submit" in capsys.readouterr().err


def test_submit_reports_an_unreachable_cluster(capsys):
    assert main(["submit", "--address", f"http://127.0.0.1:{_free_port()}", "--", "cache", "ls", "x"]) == 2
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err
