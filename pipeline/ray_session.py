"""One way for every stage to get a Ray cluster: reuse, connect, or start a private local one."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Reuse an initialized Ray; else connect to `address` (or $RAY_ADDRESS); else start a local one.

    A cluster this function started is shut down on exit; one it merely joined is left running.
    The local cluster runs without a dashboard on 127.0.0.1 and never attaches to somebody else's.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 refuses local clusters without it
    import ray

    if ray.is_initialized():
        yield
        return
    temp_dir = None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        temp_dir = tempfile.mkdtemp(prefix="lkray-", dir="/tmp")  # short: unix socket path limit
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False,
            _node_ip_address="127.0.0.1", _temp_dir=temp_dir, log_to_driver=False,
        )
    try:
        yield
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
