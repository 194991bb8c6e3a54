"""cluster.yaml passes Ray's own cluster-launcher validation and describes a GPU cluster."""

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def validated(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # fills the provider's defaults, as `ray up` does
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_a_valid_gpu_cluster_config():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = validated(config)
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "work stays off the head node"
    gpu = [n for name, n in nodes.items() if name != prepared["head_node_type"]]
    assert gpu and all(n["min_workers"] >= 0 and n["max_workers"] >= n["min_workers"] for n in gpu)
    assert any("p4d" in n["node_config"]["InstanceType"] or "p5" in n["node_config"]["InstanceType"] for n in gpu)
    assert any('.[gpu]' in cmd for cmd in prepared["setup_commands"]), "workers install the gpu extra"


@pytest.mark.parametrize("breakage", ["min_workers", "unknown_key"])
def test_ray_validation_rejects_a_broken_config(breakage):
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    if breakage == "min_workers":
        config["available_node_types"]["gpu_worker"]["min_workers"] = "one"
    else:
        config["head_node_typo"] = "head"
    with pytest.raises(Exception, match="min_workers|head_node_typo|Additional properties"):
        validated(config)
