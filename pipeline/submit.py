"""Submit any lkspec command as a Ray job through the Jobs API, stream its logs, return its status."""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

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


def submit_job(config: SubmitConfig) -> int:
    """Submit the job; with wait, stream its logs and return its exit status (0 on success)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(config.address)
    env_vars = {"RAY_AUTH_MODE": "disabled", **config.env}
    job_id = _submit_when_agent_ready(client, config.entrypoint, {"env_vars": env_vars})
    print(f"submitted job {job_id}: {config.entrypoint}", file=sys.stderr, flush=True)
    if not config.wait:
        print(job_id)
        return 0
    try:
        asyncio.run(_stream_logs(client, job_id))
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"stopped job {job_id}", file=sys.stderr)
        return 130
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
