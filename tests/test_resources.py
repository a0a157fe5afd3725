"""Resource planning from the cluster's shape (laion_ray.cluster).

The planning maths runs without Ray on given capacities; reading the
autoscaler's node types runs on the session's real Ray. The two-node cluster
runs are in tests/test_cluster_resources.py.
"""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest

from laion_ray.cluster import (
    CPU_MODEL_SHARE,
    DECODE_CPUS_PER_GPU,
    Capacity,
    Overrides,
    PlacementLog,
    actor_groups,
    cluster_capacity,
    describe_plan,
    format_plan,
    format_stages,
    plan_stages,
)
from laion_ray.errors import LaionRayError
from laion_ray.udf import TASK_CPUS, UDF
from laion_ray.udfs.clip import make_clip_embed
from laion_ray.udfs.clip_score import make_clip_score
from laion_ray.udfs.moderation_clip import make_moderation_clip

MODEL = {"model": "ViT-S-32", "random_weights": True}


class UserModel:  # a user-written class UDF with default resources
    def __call__(self, batch):
        return batch


USER = UDF("user-model", "1", ("width",), pa.schema([("w", pa.int64())]), UserModel)


def _model_stages(decode: str = "auto") -> list[UDF]:
    return [*make_clip_embed(**MODEL, decode=decode), *make_moderation_clip(**MODEL), USER]


def _by_name(plan):
    return {s.name: s for s in plan.stages}


def test_gpu_cluster_one_gpu_per_actor_up_to_gpu_capacity():
    # A 0-CPU head and 8 single-GPU nodes, as in cluster.yaml at full size.
    cap = Capacity.of({"CPU": 32, "GPU": 8}, nodes=9)
    # decode=cpu: the decode tasks feed the GPUs (decode=device: test_decode.py).
    plan = plan_stages(make_clip_embed(**MODEL, decode="cpu"), cap, Overrides())
    pre, embed = plan.stages
    assert embed.num_gpus == 1.0 and embed.concurrency == (1, 8, 8)
    assert pre.num_gpus == 0.0 and pre.concurrency is None  # decode: tasks
    # Decode gets DECODE_CPUS_PER_GPU per GPU, capped by the cluster's CPUs.
    assert plan.decode_cpus == min(32, DECODE_CPUS_PER_GPU * 8)
    assert plan.cpu_limit == plan.decode_cpus + 8 * embed.num_cpus


def test_every_class_udf_gets_the_same_rules():
    cap = Capacity.of({"CPU": 16, "GPU": 2})
    plan = plan_stages(_model_stages(decode="cpu"), cap, Overrides())
    stages = _by_name(plan)
    for name in ("clip-embed", "moderation-clip", "user-model"):
        assert stages[name].num_gpus == 1.0, name
        # Model stages in a row share one pool: both GPUs present start at once.
        assert stages[name].concurrency == (1, 2, 2), name
    # ... and one actor: one GPU each, not one per stage (decode sized for 2 GPUs).
    assert actor_groups(plan.stages, None) == [[1, 2, 3]]
    assert plan.decode_cpus == 2 * DECODE_CPUS_PER_GPU
    cpu_only = _by_name(plan_stages(_model_stages(), Capacity.of({"CPU": 16}), Overrides()))
    most = int(16 * CPU_MODEL_SHARE)
    for name in ("clip-embed", "moderation-clip", "user-model"):
        assert cpu_only[name].num_gpus == 0.0, name
        assert cpu_only[name].concurrency == (1, most, most), name
    # A stage with a pool of its own gets actors of its own.
    fixed = USER.with_options(concurrency=1)
    plan = plan_stages([*make_clip_embed(**MODEL), fixed], cap, Overrides())
    assert actor_groups(plan.stages, None) == [[1], [2]]


def test_cpu_actors_leave_room_for_the_tasks_that_feed_them():
    # Two model pools on a 2-core laptop: their three actors at 1 CPU would take
    # every CPU, and the decode tasks (and so the job) would wait forever.
    laptop = Capacity.of({"CPU": 2})
    fixed = USER.with_options(concurrency=2)  # a pool of its own, two actors
    plan = plan_stages([*_model_stages()[:3], fixed], laptop, Overrides())
    groups = actor_groups(plan.stages, None)
    assert groups == [[1, 2], [3]]
    starting = [1, 2]  # actors each pool starts
    asked = sum(
        n * max(plan.stages[i].num_cpus for i in g) for n, g in zip(starting, groups, strict=True)
    )
    assert asked == pytest.approx(2 * CPU_MODEL_SHARE)
    assert 2 - asked >= TASK_CPUS  # a read/decode task still fits
    # The asks keep their proportions; where they fit they are left alone.
    by_name = _by_name(plan)
    assert by_name["clip-embed"].num_cpus == 2 * by_name["moderation-clip"].num_cpus
    shared = plan_stages([*_model_stages(), *make_clip_score(**MODEL)], laptop, Overrides())
    assert [s.num_cpus for s in shared.stages] == [
        s.num_cpus for s in [*_model_stages(), *make_clip_score(**MODEL)]
    ]


def test_stages_sharing_an_actor_each_report_it():
    log = PlacementLog()  # the named actor's class, called in this process
    facts = {"node": "n1", "device": "cpu", "gpu_ids": ["0"], "cpu_fallback": True}
    for stage in ("clip-embed", "moderation-clip"):
        log.actor_started(stage, "actor-1", facts)
    seen = log.snapshot()
    assert sorted(a["stage"] for a in seen["actors"].values()) == ["clip-embed", "moderation-clip"]
    assert seen["peak"] == {"clip-embed": 1, "moderation-clip": 1}


def test_autoscalable_gpus_count_although_none_is_up():
    # Autoscaling from zero: no worker yet, the node types say 4 GPU nodes.
    cap = Capacity.of({"CPU": 0}, {"CPU": 64, "GPU": 4})
    embed = plan_stages(make_clip_embed(**MODEL), cap, Overrides()).stages[1]
    assert embed.num_gpus == 1.0 and embed.concurrency == (1, 4, 1)
    assert cap.worker_count() == 64 and Capacity.of({"CPU": 0}).worker_count() == 1


@pytest.mark.parametrize(
    ("overrides", "gpus", "pool"),
    [
        (Overrides(gpus=0), 0.0, (1, 12, 12)),
        (Overrides(device="cpu"), 0.0, (1, 12, 12)),
        (Overrides(gpus=3), 1.0, (1, 3, 2)),
        (Overrides(max_actors=1), 1.0, 1),
        (Overrides(max_actors=5), 1.0, (1, 5, 2)),
        (Overrides(gpus=0, max_actors=2), 0.0, (1, 2, 2)),
    ],
)
def test_overrides(overrides, gpus, pool):
    cap = Capacity.of({"CPU": 16, "GPU": 2})
    embed = plan_stages(make_clip_embed(**MODEL), cap, overrides).stages[1]
    assert (embed.num_gpus, embed.concurrency) == (gpus, pool)


def test_explicit_choices_are_kept():
    cap = Capacity.of({"CPU": 16, "GPU": 2})
    fixed = make_clip_embed(**MODEL, concurrency=3)[1]
    assert plan_stages([fixed], cap, Overrides()).stages[0].concurrency == 3
    cpu_udf = USER.with_options(num_gpus=0)
    assert plan_stages([cpu_udf], cap, Overrides()).stages[0].num_gpus == 0.0
    # --device sets the device of built-ins that take one; the stage key follows.
    embed = plan_stages(make_clip_embed(**MODEL), cap, Overrides(device="cpu")).stages[1]
    assert embed.params["device"] == "cpu" and embed.num_gpus == 0.0
    # Decode budget override, also without GPUs.
    plan = plan_stages(make_clip_embed(**MODEL), Capacity.of({"CPU": 8}), Overrides(decode_cpus=2))
    assert plan.decode_cpus == 2 and plan.cpu_limit == 2 + 6 * 1.0
    assert (
        plan_stages(make_clip_embed(**MODEL), Capacity.of({"CPU": 8}), Overrides()).cpu_limit
        is None
    )


@pytest.mark.parametrize(
    "overrides",
    [Overrides(gpus=-1), Overrides(max_actors=0), Overrides(device="tpu"), Overrides("x")],
)
def test_bad_overrides_name_the_flag(overrides):
    with pytest.raises(LaionRayError, match="--"):
        plan_stages(make_clip_embed(**MODEL), Capacity.of({"CPU": 4}), overrides)


def test_report_lines_say_what_ran_where():
    cap = Capacity.of({"CPU": 8, "GPU": 2})
    plan = plan_stages(make_clip_embed(**MODEL, decode="cpu"), cap, Overrides())
    stages = describe_plan(plan)
    stages[1].update(
        peak_actors=2, nodes=["a" * 56], devices={"cuda": 2}, cpu_fallback=0, actors_started=2
    )
    stages[0].update(nodes=["a" * 56, "b" * 56])
    lines = format_stages(stages)
    assert "clip-preprocess: tasks, 0.25 CPU each, 8 CPUs budget, on 2 node(s)" in lines[0]
    assert "clip-embed: 2 actor(s) at peak (pool 1..2), 1 CPU + 1 GPU each" in lines[1]
    assert "device cuda x2" in lines[1]


def test_plan_line_is_prose():
    laptop = plan_stages(make_clip_embed(**MODEL), Capacity.of({"CPU": 2}), Overrides())
    assert format_plan(laptop) == (
        "cluster: 2 CPUs, 0 GPUs, 1 node · clip-preprocess: tasks of 0.25 CPU · "
        "clip-embed: 1 actor of 1 CPU"
    )
    growing = Capacity.of({"CPU": 8, "GPU": 2}, {"CPU": 34, "GPU": 8}, nodes=3)
    line = format_plan(plan_stages(make_clip_embed(**MODEL), growing, Overrides()))
    assert line.startswith("cluster: 8 CPUs, 2 GPUs, 3 nodes (autoscales to 34 CPUs, 8 GPUs) · ")
    # decode=auto on GPUs decodes in the actors: 2 task CPUs per GPU for the headers.
    assert "clip-preprocess: tasks of 0.25 CPU, 16 CPUs in all" in line
    assert line.endswith("clip-embed: 1..8 actors of 1 CPU + 1 GPU")
    on_cpus = format_plan(plan_stages(make_clip_embed(**MODEL, decode="cpu"), growing, Overrides()))
    assert "clip-preprocess: tasks of 0.25 CPU, 32 CPUs in all" in on_cpus
    assert "{" not in line and "\n" not in line


def test_device_outside_ray_is_this_process():
    """In a fresh interpreter: the session's Ray, if up, would make this a driver.

    Nor does deciding it import Ray: a model run outside Ray (bench_gpu.py on
    a machine without Ray) needs none.
    """
    code = """
import sys, pytest, torch
from laion_ray.cluster import actor_device
from laion_ray.errors import LaionRayError
expected = "cuda" if torch.cuda.is_available() else "cpu"
assert actor_device() == expected and actor_device("cpu") == "cpu"
assert "ray" not in sys.modules
if not torch.cuda.is_available():
    with pytest.raises(LaionRayError, match="CUDA is not available"):
        actor_device("cuda")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_capacity_reads_the_autoscaler_node_types(ray_session):
    """The node types the autoscaler publishes to the GCS count as capacity.

    Written here exactly where Ray's autoscaler puts them (the GCS key Ray Data
    reads too), on the session's real Ray, and removed afterwards.
    """
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    before = cluster_capacity()
    assert not before.autoscaler and before.cpus == ray.cluster_resources()["CPU"]
    config = autoscaler_pb2.ClusterConfig(
        node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 0}, max_count=1),
            autoscaler_pb2.NodeGroupConfig(
                name="gpu_worker", resources={"CPU": 4, "GPU": 1}, max_count=8
            ),
            autoscaler_pb2.NodeGroupConfig(name="cpu_worker", resources={"CPU": 16}, max_count=6),
        ]
    )
    key, namespace = (
        ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY,
        ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE,
    )
    internal_kv._internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        cap = cluster_capacity()
    finally:
        internal_kv._internal_kv_del(key, namespace=namespace)
    assert cap.autoscaler and (cap.cpus, cap.gpus) == (8 * 4 + 6 * 16, 8)
    assert cap.gpus_now == 0 and cap.worker_count() == 128
    embed = plan_stages(make_clip_embed(**MODEL), cap, Overrides()).stages[1]
    assert embed.num_gpus == 1.0 and embed.concurrency == (1, 8, 1)
    assert not cluster_capacity().autoscaler


def test_history_lists_each_stage_of_a_commit():
    from laion_ray.history import format_history

    plan = plan_stages(make_clip_embed(**MODEL), Capacity.of({"CPU": 8, "GPU": 8}), Overrides())
    stages = describe_plan(plan)
    stages[1].update(peak_actors=8, nodes=[f"{i:056x}" for i in range(8)], devices={"cuda": 8})
    entry = {
        "version": 3,
        "timestamp": "2026-11-30T12:00:00",
        "job": "backfill:clip-embed",
        "operation": "DataReplacement",
        "details": {"rows_processed": 10, "stages": stages},
        "tags": [],
    }
    text = format_history([entry])
    assert "clip-embed: 8 actor(s) at peak (pool 1..8), 1 CPU + 1 GPU each, on 8 node(s)" in text
    assert "device cuda x8" in text
