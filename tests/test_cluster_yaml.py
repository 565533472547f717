"""cluster.yaml is a valid Ray cluster-launcher config that exposes nothing beyond the cluster."""
import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_validates_against_the_schema_ray_ships(cluster_config, ray_schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cluster_config, ray_schema)
    validate_config(prepare_config(copy.deepcopy(cluster_config)))


def test_schema_check_rejects_an_unknown_key(cluster_config, ray_schema):
    broken = dict(cluster_config, max_worker=3)  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(broken, ray_schema)


def test_cpu_head_and_gpu_worker_group_with_bounded_autoscaling(cluster_config):
    node_types = cluster_config["available_node_types"]
    head = node_types[cluster_config["head_node_type"]]
    workers = [spec for name, spec in node_types.items() if name != cluster_config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head should not run model work"
    assert len(workers) == 1 and workers[0]["min_workers"] == 0
    assert 0 < workers[0]["max_workers"] <= cluster_config["max_workers"]


def test_nothing_is_exposed_beyond_the_cluster_network(cluster_config):
    start = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    ranges = [
        ip_range["CidrIp"]
        for permission in cluster_config["provider"]["security_group"]["IpPermissions"]
        for ip_range in permission["IpRanges"]
    ]
    assert ranges and "0.0.0.0/0" not in ranges


def test_setup_installs_the_project(cluster_config):
    setup = "\n".join(cluster_config["setup_commands"])
    assert "pip install" in setup and "lkspec" in setup and "torch==" in setup


def test_every_node_starts_ray_with_token_auth_from_the_synced_token(cluster_config):
    starts = cluster_config["head_start_ray_commands"] + cluster_config["worker_start_ray_commands"]
    ray_starts = [command for command in starts if "ray start" in command]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in ray_starts)
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()
    assert cluster_config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
