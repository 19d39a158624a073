"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema check), sized as the
README says: a CPU head that trains nothing and GPU workers the autoscaler adds."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_rays_schema_and_has_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` checks: keys, types, defaults
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [n for n in nodes.values() if n["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all(n["max_workers"] >= 1 for n in gpu)
    setup = " ".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install -q -e" in setup
    assert "/home/ubuntu/lora-diffusion" in config["file_mounts"]


def test_cluster_yaml_with_an_unknown_key_is_rejected():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["max_wokers"] = 3
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(config))
