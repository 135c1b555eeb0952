"""The cluster configs in clusters/: valid for Ray's launcher and KubeRay, and on the Ray version rkd pins."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
RAY_VERSION = ray.__version__
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"
IMAGE = f"{RAY_VERSION}-{PY_TAG}-gpu"


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTERS / name).read_text()) if d]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_validates_against_the_ray_schema(name):
    config = load(name)
    jsonschema.validate(config, ray_schema())
    # Ray's own check after filling in the provider defaults, as `ray up` does
    validate_config(prepare_config(copy.deepcopy(config)))


def test_the_schema_check_can_fail():
    config = load("aws.yaml")
    config["available_node_types"]["gpu_spot"]["resources"]["GPU"] = 0.5  # resources must be integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())
    config = load("gcp.yaml")
    config["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        jsonschema.validate(config, ray_schema())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_pins_rays_version_and_installs_rkd(name):
    config = load(name)
    assert config["docker"]["image"] == f"rayproject/ray:{IMAGE}"
    setup = " ".join(config["setup_commands"])
    assert f"ray[default,tune,train]=={RAY_VERSION}" in setup and "/home/ray/rkd[export]" in setup
    assert config["file_mounts"]["/home/ray/rkd"] == "."
    nodes = config["available_node_types"]
    head, workers = nodes[config["head_node_type"]], [v for k, v in nodes.items() if k != config["head_node_type"]]
    assert "GPU" not in head["resources"]  # on-demand CPU head
    assert "InstanceMarketOptions" not in head["node_config"] and "scheduling" not in head["node_config"]
    for worker in workers:  # spot GPU workers
        assert worker["resources"]["GPU"] >= 1
        spot = worker["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" or (
            worker["node_config"].get("scheduling", {}).get("provisioningModel") == "SPOT"
        )
        assert spot
    # the shared run storage is mounted into every container
    assert "-v /mnt/rkd:/mnt/rkd" in config["docker"]["run_options"]


def _images(obj) -> list[str]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == "image" and isinstance(v, str)] + [
            i for v in obj.values() for i in _images(v)
        ]
    if isinstance(obj, list):
        return [i for v in obj for i in _images(v)]
    return []


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    images = _images(spec)
    assert images and all(i.endswith(f":{IMAGE}") for i in images), images
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"


def test_kuberay_raycluster():
    docs = load_all("kuberay/raycluster.yaml")
    kinds = {d["kind"]: d for d in docs}
    cluster = kinds["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(cluster["spec"])
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kuberay_rayjob():
    docs = load_all("kuberay/rayjob.yaml")
    kinds = {d["kind"]: d for d in docs}
    job = kinds["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    assert re.fullmatch(r"python -m rkd\.cli search /home/ray/job/spec\.yaml", job["spec"]["entrypoint"])
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    spec = yaml.safe_load(kinds["ConfigMap"]["data"]["spec.yaml"])
    assert spec["resources"]["ray_address"] == "auto" and spec["output_dir"].startswith("/mnt/rkd")
    assert spec["search"]["space"] in kinds["ConfigMap"]["data"]


def test_kuberay_rayjob_spec_is_a_valid_rkd_spec(tmp_path):
    pytest.importorskip("rkd.data.dataset")  # the data layer the spec loader needs
    from rkd.search.config import load_search_space, parse_search
    from rkd.train.spec import load_spec

    data = {d["kind"]: d for d in load_all("kuberay/rayjob.yaml")}["ConfigMap"]["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.resources.gpus_per_worker == 1
    load_search_space(spec, parse_search(spec))


def test_dockerfile_builds_on_the_pinned_image():
    text = (CLUSTERS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{IMAGE}" in text
    assert f"ray[default,tune,train]=={RAY_VERSION}" in text


def test_runtime_env_is_a_mapping_without_working_dir():
    env = load("runtime_env.yaml")
    assert isinstance(env, dict) and "working_dir" not in env
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())  # Ray requires string values
