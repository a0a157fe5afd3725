"""cluster.yaml and jobs/runtime_env.yaml: structure, pinning and no secrets."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RUNTIME_ENV = ROOT / "jobs" / "runtime_env.yaml"

SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"ASIA[0-9A-Z]{16}"),  # temporary AWS access key id
    re.compile(r"aws_secret_access_key", re.I),
    re.compile(r"aws_session_token", re.I),
    re.compile(r"password", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"hf_[A-Za-z0-9]{30,}"),  # Hugging Face token
]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def workers(cluster) -> dict:
    head = cluster["head_node_type"]
    return {k: v for k, v in cluster["available_node_types"].items() if k != head}


@pytest.mark.parametrize(
    "key",
    [
        "cluster_name",
        "max_workers",
        "provider",
        "auth",
        "docker",
        "available_node_types",
        "head_node_type",
        "file_mounts",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ],
)
def test_required_keys(cluster, key):
    assert cluster.get(key) not in (None, "", [], {}), key


def test_matches_ray_cluster_schema(cluster):
    """The launcher's own JSON schema (shipped with Ray) accepts the file."""
    jsonschema = pytest.importorskip("jsonschema")
    ray = pytest.importorskip("ray")
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))


def test_ray_prepares_and_validates_it(cluster):
    """What `ray up` does first: fill defaults, then validate (private Ray API)."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(copy.deepcopy(cluster))
    util.validate_config(prepared)
    assert prepared["available_node_types"][cluster["head_node_type"]]["resources"] == {"CPU": 0}


def test_provider_is_aws(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["provider"]["region"]


def test_node_types_are_defined_and_complete(cluster, workers):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert workers, "no worker node types"
    for name, spec in types.items():
        assert spec["node_config"]["InstanceType"], name
        assert "resources" in spec, name
        assert spec["node_config"].get("IamInstanceProfile"), f"{name}: no IAM instance profile"


def test_head_runs_no_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert not head["resources"].get("GPU")
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--num-cpus=0" in start


def test_gpu_and_cpu_worker_types(workers):
    gpu = [n for n, s in workers.items() if s["resources"].get("GPU", 0) >= 1]
    cpu = [n for n, s in workers.items() if not s["resources"].get("GPU")]
    assert gpu, "no GPU worker type"
    assert cpu, "no CPU-only worker type"
    for name in gpu:
        assert re.match(r"(g[4-6]|p[3-5])", workers[name]["node_config"]["InstanceType"]), name
    for name in cpu:
        assert workers[name]["resources"]["CPU"] > 0


def test_workers_autoscale_from_zero_on_spot(cluster, workers):
    for name, spec in workers.items():
        assert spec["min_workers"] == 0, name
        assert 0 < spec["max_workers"] <= cluster["max_workers"], name
        market = spec["node_config"].get("InstanceMarketOptions", {})
        assert market.get("MarketType") == "spot", name


def test_image_is_pinned(cluster):
    images = [cluster["docker"]["image"]]
    images += [
        cluster["docker"][k] for k in ("head_image", "worker_image") if k in cluster["docker"]
    ]
    for spec in cluster["available_node_types"].values():
        images += [v for k, v in spec.get("docker", {}).items() if k.endswith("image")]
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{image}: tag is not a version"
    # The image's Ray must match the Ray the package is pinned to (pyproject: <2.61).
    assert images[0].split(":")[1].startswith("2.60.")


def test_package_installed_from_synced_checkout(cluster):
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    assert any("pip install" in c and mount in c for c in cluster["setup_commands"])
    assert ".git" in cluster.get("rsync_exclude", [])


@pytest.mark.parametrize("path", [CLUSTER, RUNTIME_ENV], ids=lambda p: p.name)
def test_no_credentials(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{path.name}: matches {pattern.pattern}"
    # A key path is not a secret, but it ties the file to one laptop.
    assert "ssh_private_key" not in (yaml.safe_load(text).get("auth") or {})


def test_runtime_env():
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert env["working_dir"] == "."
    excludes = set(env["excludes"])
    for pattern in (".git", "*.lance", "benchmarks/out", "__pycache__", ".pytest_cache"):
        assert pattern in excludes, pattern
    assert env["env_vars"]["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] == "0"
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    # Ray requires string values for env vars.
    assert all(isinstance(v, str) for v in env["env_vars"].values())
