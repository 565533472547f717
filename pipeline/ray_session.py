"""One way for every stage to get a Ray cluster: reuse, connect, or start a private local one.

A private cluster is closed: it runs with token authentication (`RAY_AUTH_MODE=token` and a fresh
random `RAY_AUTH_TOKEN`, set for this process and the cluster's processes only, the user's
environment restored afterwards), and with the node address 127.0.0.1, so that its gRPC servers
(GCS, raylet, every worker) and its agents listen on loopback only. It is recorded in
pipeline.cluster_registry while it runs, so that a later command reaps it if this one is SIGKILLed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import tempfile
import threading
from typing import Iterator

from pipeline.cluster_registry import TEMP_PREFIX, TEMP_ROOT, ClusterRecord, reap_orphans
from pipeline.interrupts import handlers_kept, signals_held
from trainer.rundir import process_identity

LOOPBACK = "127.0.0.1"
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Reuse an initialized Ray; else connect to `address` (or $RAY_ADDRESS); else start a private local one.

    A cluster this function started is shut down on exit (also on Ctrl-C / SIGTERM); one it merely
    joined is left running. Joining uses the user's own token ($RAY_AUTH_TOKEN, the file
    $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) as Ray reads it.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        with private_cluster(num_cpus=num_cpus):
            yield
        return
    loopback = address.rpartition(":")[0] in (LOOPBACK, "localhost")
    # Joining a private cluster on 127.0.0.1: Ray would rewrite the address to the routable one.
    with _loopback_node_address() if loopback else contextlib.nullcontext(), handlers_kept():
        ray.init(address=address, log_to_driver=False, **({"_node_ip_address": LOOPBACK} if loopback else {}))
    try:
        yield
    finally:
        with signals_held():
            ray.shutdown()


@contextlib.contextmanager
def private_cluster(*, num_cpus: int | None = None, object_store_memory: int | None = None) -> Iterator[str]:
    """Start a closed local Ray cluster (token auth, loopback only, no dashboard); yields its GCS address."""
    import ray

    reap_orphans()
    # Short (unix socket paths are limited to ~107 bytes) and 0700: Ray makes its own temp dir and
    # everything below it world-writable, so it lives one level down where other users cannot reach
    # its unix sockets (raylet, object store).
    temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=TEMP_ROOT)
    record = ClusterRecord.create(temp_dir)
    try:
        with _cluster_auth(secrets.token_hex(32)):
            watcher = _ProcessWatcher(record)  # from the start: an interrupted ray.init leaves processes too
            try:
                with _loopback_node_address(), handlers_kept():
                    context = ray.init(
                        address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                        include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                        _node_ip_address=LOOPBACK, _temp_dir=os.path.join(temp_dir, "ray"),
                    )
                node_ip = context.address_info["node_ip_address"]
                if node_ip != LOOPBACK:
                    print(f"lkspec: warning: Ray put this private cluster on {node_ip}, not {LOOPBACK}: its "
                          "ports are reachable from the network (token authentication still applies)",
                          file=sys.stderr, flush=True)
                yield context.address_info["gcs_address"]
            finally:
                with signals_held():
                    watcher.stop()
                    ray.shutdown()
    finally:
        with signals_held():
            record.stop()  # whatever outlived the shutdown, the temp dir and the record


@contextlib.contextmanager
def _cluster_auth(token: str) -> Iterator[None]:
    """Token authentication with `token` for this process and the processes it starts; then the user's settings."""
    saved = {name: os.environ.get(name) for name in AUTH_VARIABLES}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = token
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    _reload_auth_settings()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reload_auth_settings()


def _reload_auth_settings() -> None:
    """Make this process's Ray core read RAY_AUTH_MODE and the token again (it caches both at import)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _loopback_node_address() -> Iterator[None]:
    """Let `ray.init(_node_ip_address="127.0.0.1")` keep 127.0.0.1.

    Ray rewrites a loopback node address to the routable one unless it treats the machine as a
    single-node platform (`ray_constants.ENABLE_RAY_CLUSTER`, what RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    sets at import); its servers bind 127.0.0.1 only when the node address is exactly that.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


class _ProcessWatcher:
    """Keeps the record's process list current: Ray's own processes (their command line names the
    cluster's temp dir) and everything they start (workers, agents), checked every second."""

    def __init__(self, record: ClusterRecord, interval_s: float = 1.0):
        self.record = record
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._refresh()
        self._thread = threading.Thread(target=self._run, name="lkspec-cluster-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self._refresh()

    def _refresh(self) -> None:
        import psutil

        found: set = set()
        for child in psutil.Process(os.getpid()).children():
            try:
                if self.record.temp_dir in " ".join(child.cmdline()):
                    found.update(process_identity(p.pid) for p in [child, *child.children(recursive=True)])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # exited meanwhile
        found.discard(None)
        known = set(self.record.processes)
        if not found <= known:
            self.record.processes = sorted(known | found)  # keep the exited ones: pid + start time never match again
            self.record.save()

    def stop(self) -> None:
        """Stop watching (the record keeps the last list: `ClusterRecord.stop` kills what is still alive)."""
        self._stopping.set()
        self._thread.join(timeout=5)
        self._refresh()
