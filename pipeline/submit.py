"""Submit any lkspec command as a Ray job through the Jobs API, stream its logs, return its status."""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.interrupts import signals_held

TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class SubmitConfig:
    """What to run and where: the lkspec argv after `--` and the cluster's Jobs API address."""

    address: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    wait: bool = True

    def __post_init__(self) -> None:
        if self.command[:1] == ["lkspec"]:
            self.command = self.command[1:]
        if not self.command:
            raise ValueError("nothing to submit: give an lkspec command after `--`")
        if not self.address:
            raise ValueError("--address is required (e.g. http://127.0.0.1:8265, the Jobs API)")

    @property
    def entrypoint(self) -> str:
        """The shell command the job runs on the cluster."""
        return shlex.join(["lkspec", *self.command])


class TokenError(ValueError):
    """The cluster's token is missing, unreadable, or refused."""


def cluster_token() -> str | None:
    """The cluster's token as Ray looks for it: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if "RAY_AUTH_TOKEN_PATH" in os.environ:
            raise TokenError(f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist") from None
        return None


def submit_job(config: SubmitConfig) -> int:
    """Submit the job; with wait, stream its logs and return its exit status (0 on success)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = cluster_token()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        client = JobSubmissionClient(config.address, headers=headers)
        job_id = _submit_when_agent_ready(client, config.entrypoint, {"env_vars": config.env})
    except AuthenticationError as exc:
        why = "refused the token" if token else "requires a token and none was found"
        raise TokenError(f"the Ray cluster at {config.address} {why}: put the cluster's token in $RAY_AUTH_TOKEN, "
                         "in a file named by $RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (`ray get-auth-token` "
                         f"on the head prints it) ({str(exc).splitlines()[0]})") from exc
    print(f"submitted job {job_id}: {config.entrypoint}", file=sys.stderr, flush=True)
    if not config.wait:
        print(job_id)
        return 0
    try:
        asyncio.run(_stream_logs(client, job_id))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (pipeline.interrupts): stop the job, then let cli.main report it
        with signals_held():
            client.stop_job(job_id)
        raise
    info = client.get_job_info(job_id)
    while str(info.status) not in TERMINAL_STATUSES:  # logs end slightly before the status settles
        asyncio.run(asyncio.sleep(0.2))
        info = client.get_job_info(job_id)
    print(f"job {job_id} {info.status}", file=sys.stderr, flush=True)
    if info.driver_exit_code is not None:
        return int(info.driver_exit_code)
    return 0 if str(info.status) == "SUCCEEDED" else 1


def _submit_when_agent_ready(client, entrypoint: str, runtime_env: dict, timeout_s: float = 60.0) -> str:
    """Submit, retrying while a freshly started head has no job agent registered yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


async def _stream_logs(client, job_id: str) -> None:
    """Copy the job's log stream to stdout until the job ends."""
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
