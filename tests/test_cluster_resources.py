"""Cluster-shaped resources on a real two-node Ray cluster (``ray start``).

The head runs the driver with ``--num-cpus 1 --num-gpus 0``; the worker has 4
logical CPUs and, in the first layout, 2 logical GPUs (Ray accepts them on a
CPU machine, so every GPU actor finds no CUDA device and falls back to the
CPU). Jobs go through ``ray job submit`` (which sets ``RAY_ADDRESS`` for the
driver), and the assertions read the job's own ``--report``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from test_cluster import REPO, TESTS, LocalCluster, _runtime_env, _submit_cmd

from laion_ray.history import job_history
from laion_ray.sample import write_sample
from laion_ray.udf import format_param
from laion_ray.udfs.clip import make_clip_embed

pytestmark = pytest.mark.slow

MODEL = {"model": "ViT-S-32", "random_weights": True}
COLUMN = "img_emb_vit_s_32"
HEAD_CPUS, WORKER_CPUS = 1, 4
FALLBACK = "finds no CUDA device"


def _cluster(num_gpus: int):
    from ray._private.utils import get_dashboard_dependency_error

    if (missing := get_dashboard_dependency_error()) is not None:
        pytest.skip(f"the job server needs ray[default] (dashboard): {missing}")
    for attempt in range(3):
        c = LocalCluster()
        # On a loaded machine the dashboard agent can take over a minute to
        # start, and the raylet gives up waiting for its ports after one.
        c.env["RAY_agent_register_timeout_ms"] = "600000"
        try:
            # A loaded machine can miss `ray start`'s fixed 30 s for the head's
            # raylet to register; a fresh head on new ports is fine.
            c.start_head(num_cpus=HEAD_CPUS)
        except (RuntimeError, subprocess.TimeoutExpired):
            c.stop()
            if attempt == 2:
                raise
            continue
        except BaseException:  # interrupted: leave nothing running
            c.stop()
            raise
        break
    try:
        c.worker_id = c.start_worker("worker-1", num_cpus=WORKER_CPUS, num_gpus=num_gpus)
        yield c
    finally:
        c.stop()


def _submit(cluster: LocalCluster, args: list[str], report: Path) -> tuple[str, dict]:
    env = _runtime_env(PYTHONPATH=str(TESTS))
    cmd = _submit_cmd(
        cluster,
        ["--runtime-env-json", env],
        ["python", "-m", "laion_ray.cli", *args, "--report", str(report)],
    )
    proc = subprocess.run(
        cmd, env=cluster.env, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out, json.loads(report.read_text())


def _embed_job(cluster, tmp_path, rows: int = 160) -> tuple[str, str, dict]:
    uri = str(tmp_path / "images.lance")
    write_sample(uri, rows=rows, fragments=4, seed=5)
    params = [f"--param=clip-embed.{k}={format_param(v)}" for k, v in MODEL.items()]
    out, report = _submit(
        cluster,
        ["backfill", uri, "--udf", "clip-embed", *params, "--unit-rows", "20"],
        tmp_path / "embed.json",
    )
    return uri, out, report


def _stage(report: dict, name: str) -> dict:
    (stage,) = [s for s in report["stages"] if s["stage"] == name]
    return stage


def _assert_single_process_equal(uri: str) -> None:
    """The cluster's embeddings equal one process running both stages itself."""
    table = lance.dataset(uri).to_table(columns=["image", COLUMN])
    pre, embed = (s.instantiate() for s in make_clip_embed(**MODEL))
    expected = embed(pre(table.select(["image"])))[COLUMN]
    got = np.stack(table[COLUMN].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, np.stack(expected.to_numpy(zero_copy_only=False)), atol=1e-4)


def _fallback_warnings(cluster: LocalCluster) -> int:
    """The one-per-actor CPU fallback warning, counted per worker process.

    A worker's record can reach both its ``.out`` and its ``.err`` file, so a
    process counts the most times any one of its files has the line.
    """
    per_process: dict[str, int] = {}
    for path in (cluster.root / "worker-1").glob("session_*/logs/worker-*"):
        if path.is_file():
            count = path.read_text(errors="replace").count(FALLBACK)
            per_process[path.stem] = max(per_process.get(path.stem, 0), count)
    return sum(per_process.values())


def _class_udf_job(cluster, uri: str, tmp_path) -> dict:
    params = [f"--param=moderation-clip.{k}={format_param(v)}" for k, v in MODEL.items()]
    _, report = _submit(
        cluster,
        [
            "backfill",
            uri,
            "--udf",
            "moderation-clip",
            "--udf",
            "helpers:DeviceDouble",
            *params,
            "--unit-rows",
            "20",
        ],
        tmp_path / "classes.json",
    )
    return report


class TestGpuWorker:
    """Worker declares 2 GPUs: model actors take one each, on the worker."""

    @pytest.fixture(scope="class")
    def cluster(self):
        yield from _cluster(num_gpus=2)

    @pytest.fixture(scope="class")
    def embedded(self, cluster, tmp_path_factory):
        return _embed_job(cluster, tmp_path_factory.mktemp("gpu"))

    def test_two_gpu_actors_on_the_worker_fall_back_to_cpu(self, cluster, embedded):
        uri, out, report = embedded
        assert report["rows_processed"] == 160 and report["rows_failed"] == 0
        embed = _stage(report, "clip-embed")
        assert embed["num_gpus"] == 1.0 and embed["pool"] == [1, 2], embed
        assert embed["peak_actors"] == 2 and embed["actors_started"] == 2, embed
        assert embed["nodes"] == [cluster.worker_id], embed
        # Logical GPUs, no CUDA: each actor fell back to the CPU, with one warning.
        assert embed["devices"] == {"cpu": 2} and embed["cpu_fallback"] == 2, embed
        assert _fallback_warnings(cluster) == 2
        decode = _stage(report, "clip-preprocess")
        assert decode["kind"] == "tasks" and decode["num_gpus"] == 0 and decode["nodes"], decode
        # decode=auto: the plan gave the model GPUs, so the bytes went to the actors
        # (the tasks only checked headers), and actors without CUDA decoded on their
        # CPU with the decode=cpu decoder.
        assert decode["decode"] == "check" and embed["decode"] == "device", (decode, embed)
        assert embed["decode_ran"] == {"on its CPU (no CUDA device)": 2}, embed
        assert embed["decode_fallback_rows"] == 0, embed
        # The summary and the history say the same.
        assert "clip-embed: 2 actor(s) at peak (pool 1..2), 1 CPU + 1 GPU each" in out, out
        assert "2 got a GPU but no CUDA device: ran on CPU" in out
        assert "decoded on its CPU (no CUDA device) x2" in out, out
        (entry,) = [e for e in job_history(uri) if e["operation"] == "DataReplacement"][-1:]
        assert _stage(entry["details"], "clip-embed")["peak_actors"] == 2
        assert _stage(entry["details"], "clip-embed")["decode_ran"] == embed["decode_ran"]
        _assert_single_process_equal(uri)

    def test_moderation_and_user_class_udfs_follow_the_same_rules(
        self, cluster, embedded, tmp_path
    ):
        uri = embedded[0]
        report = _class_udf_job(cluster, uri, tmp_path)
        for name in ("moderation-clip", "device-double"):
            stage = _stage(report, name)
            assert stage["num_gpus"] == 1.0 and stage["pool"] == [1, 2], stage
            assert stage["nodes"] == [cluster.worker_id], stage
            # Devices are counted per actor started; on a loaded machine a second
            # actor can start after the first stopped, so the peak may be lower.
            assert stage["peak_actors"] >= 1, stage
            assert stage["devices"] == {"cpu": stage["actors_started"]}, stage
            assert stage["cpu_fallback"] == stage["actors_started"], stage
        table = lance.dataset(uri).to_table(columns=["width", "width_x2", "moderation_clip_label"])
        assert table["width_x2"].to_pylist() == [2 * w for w in table["width"].to_pylist()]
        assert table["moderation_clip_label"].null_count == 0


class TestCpuWorker:
    """The same cluster without GPUs: model actors scale with the CPUs."""

    @pytest.fixture(scope="class")
    def cluster(self):
        yield from _cluster(num_gpus=0)

    def test_cpu_actors_scale_with_the_cluster_cpus(self, cluster, tmp_path):
        # The pool starts its three actors at once, but an actor that is still
        # importing torch (~9 s of CPU here, more under load) when the work runs
        # out is stopped before it reports: enough rows that the first actor
        # cannot finish them alone. (The GPU class checks the embeddings.)
        uri, out, report = _embed_job(cluster, tmp_path, rows=960)
        embed = _stage(report, "clip-embed")
        most = int((HEAD_CPUS + WORKER_CPUS) * 0.75)
        assert embed["num_gpus"] == 0 and embed["pool"] == [1, most], embed
        assert embed["peak_actors"] >= 2, embed  # more than one actor: the worker has the CPUs
        assert embed["devices"] == {"cpu": embed["actors_started"]} and not embed["cpu_fallback"]
        # decode=auto without GPUs: decode tasks feed the actors pixels.
        assert embed["decode"] == "cpu", embed
        assert embed["decode_ran"] == {"in the decode tasks": embed["actors_started"]}, embed

        report = _class_udf_job(cluster, uri, tmp_path)
        for name in ("moderation-clip", "device-double"):
            stage = _stage(report, name)
            assert stage["num_gpus"] == 0 and stage["pool"] == [1, most], stage
            assert stage["peak_actors"] >= 1 and not stage["cpu_fallback"], stage

    def test_index_build_and_shuffle_merge_split_over_the_cluster_cpus(self, cluster, tmp_path):
        rows, dim = 800, 16
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((rows, dim)).astype(np.float32)
        uri = str(tmp_path / "vectors.lance")
        table = pa.table(
            {
                "key": pa.array(np.arange(rows), pa.int64()),
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            }
        )
        lance.write_dataset(table, uri, max_rows_per_file=100)  # 8 fragments
        cpus = HEAD_CPUS + WORKER_CPUS
        _, index = _submit(
            cluster,
            ["reindex", uri, "--column", "vec", "--partitions", "4", "--sub-vectors", "4"],
            tmp_path / "index.json",
        )
        # One segment per cluster CPU, not one from the driver's head.
        assert index["num_workers"] == cpus and index["segments"] == cpus, index

        labels = tmp_path / "labels.parquet"
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"key": table["key"], "label": table["key"]}), labels)
        _, merged = _submit(
            cluster,
            [
                "merge",
                uri,
                "--from",
                str(labels),
                "--broadcast-max-bytes",
                "0",
                "--executor",
                "ray",
            ],
            tmp_path / "merge.json",
        )
        assert merged["strategy"] == "shuffle" and merged["partitions"] == 2 * cpus, merged
        assert lance.dataset(uri).to_table(columns=["label"])["label"].null_count == 0
