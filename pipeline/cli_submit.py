"""`lkspec submit -- <lkspec command>`: run any stage as a Ray job on a cluster."""
from __future__ import annotations

import argparse

from pipeline.cli_error import CliError


def register(subparsers) -> None:
    """Add the `submit` sub-command."""
    parser = subparsers.add_parser(
        "submit",
        help="run an lkspec command as a Ray job (Jobs API), streaming its logs",
        description=(
            "Submit any lkspec command as a Ray job through the Jobs API, stream its logs and "
            "exit with its status. Example: lkspec submit --address http://127.0.0.1:8265 -- "
            "lkspec cache build --target smollm2-135m --data sharegpt --out /mnt/caches. "
            "The cluster's token (Ray token authentication) is read as Ray reads it: $RAY_AUTH_TOKEN, else "
            "the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (`ray get-auth-token --generate` makes it "
            "before `ray up cluster.yaml`, which copies it to every node; `ray get-auth-token` on a head prints it)."
        ),
    )
    parser.add_argument("--address", default=None,
                        help="Jobs API address of the cluster (default: $RAY_API_SERVER_ADDRESS, "
                        "else http://127.0.0.1:8265, e.g. through `ray dashboard cluster.yaml`)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable)")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the job id and return at once instead of streaming logs")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the lkspec command to run, after `--`")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the request and submit it."""
    import os

    from pipeline.submit import SubmitConfig, TokenError, submit_job

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
    try:
        config = SubmitConfig(address=address, command=command, env=env, wait=not args.no_wait)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    try:
        return submit_job(config)
    except ConnectionError as exc:
        raise CliError(f"cannot reach the Ray Jobs API at {address}: {exc}") from exc
    except TokenError as exc:
        raise CliError(str(exc)) from exc
