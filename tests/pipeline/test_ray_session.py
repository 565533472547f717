"""A private cluster (pipeline.ray_session) is closed to the network and to clients without its token, and leaks nothing.

The test drives real private clusters from subprocesses (the pytest process may hold the session's
cluster already). What Ray 2.60 lets us bind, measured here: with the node address kept at 127.0.0.1, every
listening socket of the cluster (GCS, raylet, dashboard agent, runtime-env agent, metrics exporter,
every worker's gRPC server) is on loopback; nothing is left on 0.0.0.0 or the host's address. Token
authentication guards every gRPC entry point on loopback too; the agent's `/api/local_raylet_healthz`
answers without a token, which Ray exempts on purpose, and only on loopback.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cluster_registry import ClusterRecord, registry_dir
from trainer.rundir import process_alive

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")

# Holds a private cluster with one actor until stdin closes, then reports the auth environment it ends with.
DRIVER = """
import json, os, sys
import ray
from pipeline.ray_session import private_cluster

with private_cluster(num_cpus=1) as gcs:
    @ray.remote(num_cpus=0)
    class Pinger:
        def ping(self):
            return os.getpid()

    pinger = Pinger.remote()
    print(json.dumps({"gcs": gcs, "actor": ray.get(pinger.ping.remote())}), flush=True)
    sys.stdin.readline()
print(json.dumps({name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}), flush=True)
"""


def host_address() -> str | None:
    """An IPv4 address of this host other than loopback (what another machine would connect to)."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def start_driver(env_overrides: dict[str, str | None]) -> tuple[subprocess.Popen, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = driver.stdout.readline()
    assert line, driver.stderr.read()[-3000:]
    return driver, json.loads(line)


def settled_record(driver_pid: int, timeout_s: float = 60) -> ClusterRecord:
    """The driver's registry record once its process list stops growing (the agents start last)."""
    deadline = time.monotonic() + timeout_s
    seen, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        [path] = registry_dir().glob(f"{driver_pid}-*.json")
        record = ClusterRecord.load(path)
        alive = {p for p in record.processes if process_alive(p)}
        if alive != seen:
            seen, stable_since = alive, time.monotonic()
        elif time.monotonic() - stable_since > 3 and any(_name(p) == "ray::DashboardAgent" for p in alive):
            return record
        time.sleep(0.5)
    raise AssertionError(f"the record of driver {driver_pid} did not settle: {seen}")


def _name(process: tuple[int, float]) -> str:
    import psutil

    try:
        return psutil.Process(process[0]).name()
    except psutil.NoSuchProcess:
        return ""


def listening(processes) -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket of these processes."""
    import psutil

    sockets = []
    for pid, _ in processes:
        try:
            process = psutil.Process(pid)
            sockets += [(c.laddr.ip, c.laddr.port, process.name()) for c in process.net_connections("inet")
                        if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return sockets


def gcs_call(port: int, token: str | None):
    """One real gRPC call to the GCS on loopback (list the internal KV keys), with or without a bearer token."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gcs_service_pb2_grpc.InternalKVGcsServiceStub(channel)
        metadata = [("authorization", f"Bearer {token}")] if token else None
        return stub.InternalKVKeys(gcs_service_pb2.InternalKVKeysRequest(prefix=b"", namespace=b""),
                                   metadata=metadata, timeout=10)


def test_a_private_cluster_is_closed_to_the_network_and_its_leftovers_are_reaped_after_a_sigkill():
    import grpc
    import psutil

    host_ip = host_address()
    if host_ip is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    driver, info = start_driver({})
    try:
        record = settled_record(driver.pid)
        [gcs_server] = [p for p in record.processes if _name(p) == "gcs_server"]
        token = psutil.Process(gcs_server[0]).environ()["RAY_AUTH_TOKEN"]  # what the cluster was started with
        gcs_port = int(info["gcs"].rsplit(":", 1)[1])
        assert info["gcs"].startswith("127.0.0.1:") and len(token) == 64
        assert stat.S_IMODE(os.stat(record.temp_dir).st_mode) == 0o700  # Ray's 0777 dirs sit inside

        sockets = listening([p for p in record.processes if process_alive(p)])
        names = {name for _, _, name in sockets}
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::Pinger"} <= names
        assert gcs_port in {port for _, port, _ in sockets}
        assert [s for s in sockets if s[0] not in LOOPBACK] == []  # every listening socket on loopback

        # From the host's network address, nothing answers: not the GCS, not the agents' HTTP ports.
        # (A subprocess `ray.init(address=f"{host_ip}:{gcs_port}")` would retry for minutes instead of failing.)
        for _, port, name in sockets:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host_ip, port), timeout=5).close()
        # On loopback, the GCS refuses a call without the token or with another one, and serves its own token.
        for wrong in (None, "0" * 64):
            with pytest.raises(grpc.RpcError) as refused:
                gcs_call(gcs_port, wrong)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert gcs_call(gcs_port, token).results  # the probe itself works
    finally:
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies without stopping its cluster
        driver.wait()
    time.sleep(1)
    orphans = [p for p in record.processes if process_alive(p)]
    # What issue 15 found: Ray leaves processes (its agents at least) running after a SIGKILLed driver.
    assert orphans and Path(record.temp_dir).is_dir(), "Ray cleaned up by itself: the reaping is untested"

    # The next private cluster reaps it first (or another session on this machine did already), has a
    # token of its own, and gives the user's environment back when it stops.
    nxt, _ = start_driver({"RAY_AUTH_TOKEN": "the-users-own-token", "RAY_AUTH_MODE": None})
    assert not any(process_alive(p) for p in record.processes)
    assert not Path(record.temp_dir).exists() and not record.path.exists()
    next_record = settled_record(nxt.pid)
    [next_gcs] = [p for p in next_record.processes if _name(p) == "gcs_server"]
    assert psutil.Process(next_gcs[0]).environ()["RAY_AUTH_TOKEN"] not in (token, "the-users-own-token")
    nxt.stdin.close()
    after = json.loads(nxt.stdout.readline())
    assert nxt.wait(timeout=120) == 0
    assert after == {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": "the-users-own-token"}
    assert not any(process_alive(p) for p in next_record.processes)
    assert not Path(next_record.temp_dir).exists() and not next_record.path.exists()
