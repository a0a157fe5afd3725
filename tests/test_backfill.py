"""Backfill engine on real Lance datasets and a real (session) Ray."""

from __future__ import annotations

import json
import os

import lance
import numpy as np
import pyarrow as pa
import pytest

from laion_ray.backfill import backfill
from laion_ray.cli import main
from laion_ray.engine.error_log import list_errors
from laion_ray.errors import LaionRayError
from laion_ray.history import job_history
from laion_ray.sample import sample_table, write_sample
from laion_ray.udfs.aspect_ratio import aspect_ratio
from laion_ray.udfs.moderation_rules import moderation_rules

pytestmark = pytest.mark.usefixtures("ray_session")


def _reference(table: pa.Table) -> pa.Table:
    return pa.concat_tables([aspect_ratio.compute(table)]).append_column(
        "moderation_label", moderation_rules(table)["moderation_label"]
    )


def _assert_matches_reference(uri: str) -> None:
    table = lance.dataset(uri).to_table(
        columns=[
            "key",
            "width",
            "height",
            "NSFW",
            "aspect_ratio",
            "is_high_res",
            "moderation_label",
        ]
    )
    expected = _reference(table)
    for name in ("aspect_ratio", "is_high_res", "moderation_label"):
        assert table[name].to_pylist() == expected[name].to_pylist(), name


@pytest.fixture
def many_fragments(tmp_path):
    uri = str(tmp_path / "many.lance")
    write_sample(uri, rows=600, fragments=6, seed=1)
    return uri


@pytest.mark.parametrize(
    "fragments,deleted,unit_rows",
    [(6, None, 40), (1, None, 64), (4, "key % 5 = 2 OR key < 7", 50)],
    ids=["many-fragments", "single-fragment", "deleted-rows"],
)
def test_values_equal_single_process_reference(tmp_path, fragments, deleted, unit_rows):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=500, fragments=fragments, seed=2)
    if deleted:
        lance.dataset(uri).delete(deleted)
    before = lance.dataset(uri)
    image_files = {
        f.fragment_id: [d.path for d in f.metadata.files] for f in before.get_fragments()
    }
    report = backfill(uri, udfs=["aspect-ratio", "moderation-rules"], unit_rows=unit_rows)
    assert report.rows_processed == before.count_rows()
    assert report.rows_failed == 0
    _assert_matches_reference(uri)
    after = lance.dataset(uri)
    assert after.count_rows() == before.count_rows()
    # Image bytes are never rewritten: the original data files are all still there.
    for frag in after.get_fragments():
        paths = [d.path for d in frag.metadata.files]
        assert set(image_files[frag.fragment_id]) <= set(paths)
        assert len(paths) == len(image_files[frag.fragment_id]) + 1
    if deleted:
        assert after.count_rows(deleted) == 0


def test_where_leaves_other_rows_null(many_fragments):
    backfill(many_fragments, udfs=["aspect-ratio"], where="`NSFW` = 0")
    table = lance.dataset(many_fragments).to_table(columns=["NSFW", "aspect_ratio", "width"])
    nsfw = np.array(table["NSFW"].to_pylist())
    ratio = table["aspect_ratio"].to_pylist()
    assert all(r is None for r, n in zip(ratio, nsfw, strict=False) if n == 1)
    assert all(
        r is not None
        for r, n, w in zip(ratio, nsfw, table["width"].to_pylist(), strict=False)
        if n == 0 and w
    )


def test_incremental_rerun_fills_only_appended_rows(many_fragments):
    first = backfill(many_fragments, udfs=["aspect-ratio"])
    assert first.rows_processed == 600
    lance.write_dataset(sample_table(120, seed=9, start_key=10_000), many_fragments, mode="append")
    second = backfill(many_fragments, udfs=["aspect-ratio"])
    assert second.rows_processed == 120
    table = lance.dataset(many_fragments).to_table(columns=["aspect_ratio", "width", "height"])
    assert table.filter(pa.compute.is_null(table["aspect_ratio"])).num_rows == 0


def test_existing_column_needs_overwrite_and_overwrite_replaces_in_place(many_fragments):
    ds = lance.dataset(many_fragments)
    emb_type = ds.schema.field("img_emb").type
    with pytest.raises(LaionRayError, match="already exists.*--overwrite"):
        backfill(many_fragments, udfs=["helpers:key_embedding"])
    backfill(many_fragments, udfs=["helpers:key_embedding"], overwrite=True, where="key < 300")
    ds = lance.dataset(many_fragments)
    assert ds.schema.field("img_emb").type == emb_type == pa.list_(pa.float32(), 768)
    table = ds.to_table(columns=["key", "img_emb"])
    old = sample_table(600, seed=1)
    old_emb = dict(
        zip(old["key"].to_pylist(), old["img_emb"].to_numpy(zero_copy_only=False), strict=False)
    )
    for key, emb in zip(table["key"].to_pylist(), table["img_emb"].to_pylist(), strict=False):
        if key < 300:
            assert emb.index(1.0) == key % 768 and sum(emb) == 1.0
        else:  # outside --where: the old embedding is kept
            np.testing.assert_array_equal(np.asarray(emb, np.float32), old_emb[key])
    # Index-ready: the column still reads as a contiguous float32 matrix.
    matrix = np.stack(table["img_emb"].to_numpy(zero_copy_only=False))
    assert matrix.shape == (600, 768) and matrix.dtype == np.float32


def test_bad_rows_get_null_and_error_records(many_fragments):
    report = backfill(many_fragments, udfs=["helpers:fail_on_keys"], max_error_fraction=0.05)
    bad = [k for k in range(600) if k % 97 == 5]
    assert report.rows_failed == len(bad)
    table = lance.dataset(many_fragments).to_table(columns=["key", "key_check"])
    values = dict(zip(table["key"].to_pylist(), table["key_check"].to_pylist(), strict=False))
    # Only the bad rows are null: bisection kept the rest of each batch.
    assert [k for k, v in values.items() if v is None] == bad
    assert all(values[k] == 2 * k for k in values if k not in bad)
    errors = list_errors(many_fragments)
    assert sorted(errors["key"].to_pylist()) == bad
    assert set(errors["udf"].to_pylist()) == {"fail-on-keys"}
    assert set(errors["error_type"].to_pylist()) == {"ValueError"}

    # An incremental rerun leaves known-bad rows alone...
    again = backfill(many_fragments, udfs=["helpers:fail_on_keys"], max_error_fraction=0.05)
    assert again.rows_processed == 0 and again.rows_skipped_failed == len(bad)
    # ...unless asked to retry them, which replaces (not duplicates) their records.
    retried = backfill(
        many_fragments, udfs=["helpers:fail_on_keys"], retry_errors=True, max_error_fraction=1
    )
    assert retried.rows_processed == len(bad)
    assert sorted(list_errors(many_fragments)["key"].to_pylist()) == bad
    # Rows the retry did not touch keep their values in the fragments it rewrote.
    table = lance.dataset(many_fragments).to_table(columns=["key", "key_check"])
    values = dict(zip(table["key"].to_pylist(), table["key_check"].to_pylist(), strict=True))
    assert [k for k, v in values.items() if v is None] == bad
    assert all(values[k] == 2 * k for k in values if k not in bad)


def test_error_fraction_limit_commits_nothing(many_fragments):
    version = lance.dataset(many_fragments).version
    with pytest.raises(LaionRayError, match="max-error-fraction"):
        backfill(many_fragments, udfs=["helpers:fail_on_keys"], max_error_fraction=0.001)
    ds = lance.dataset(many_fragments)
    assert ds.version == version and "key_check" not in ds.schema.names
    # The finished work is kept: a rerun with a looser limit resumes it.
    report = backfill(many_fragments, udfs=["helpers:fail_on_keys"], max_error_fraction=0.05)
    assert report.rows_resumed == 600 and report.rows_processed == 0


def test_corrupt_images_and_bad_rows_in_cli(tmp_path):
    uri = str(tmp_path / "bad.lance")
    sample = write_sample(uri, rows=300, fragments=3, seed=4, bad_fraction=0.05)
    assert sample.bad_keys
    rc = main(["backfill", uri, "--udf", "aspect-ratio", "--tag", "ar-v1"])
    assert rc == 0
    ds = lance.dataset(uri)
    assert "ar-v1" in ds.tags.list()
    history = job_history(uri)
    assert history[-1]["job"] == "backfill:aspect-ratio"
    assert history[-1]["details"]["udfs"][0].startswith("aspect-ratio@1")
    assert history[-1]["tags"] == ["ar-v1"]
    # Another writer compacts, rewriting an index: pylance cannot decode that
    # transaction, and the history must still read.
    ds.create_scalar_index("key", "BTREE")
    lance.dataset(uri).delete("key < 3")
    lance.dataset(uri).optimize.compact_files(materialize_deletions_threshold=0.0)
    assert [e["job"] for e in job_history(uri)] == [e["job"] for e in history]
    assert main(["history", uri]) == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--udf", "no-such-udf"], "unknown UDF 'no-such-udf'"),
        (["--udf", "helpers:missing_attr"], "cannot import UDF"),
        (["--udf", "aspect-ratio", "--where", "width >>> 3"], "bad --where"),
        (["--udf", "aspect-ratio", "--max-error-fraction", "2"], "max-error-fraction"),
        (["--udf", "aspect-ratio", "--param", "oops"], "UDF.KEY=VALUE"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(many_fragments, capsys, args, message):
    assert main(["backfill", many_fragments, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_missing_input_column_is_named(tmp_path, capsys):
    uri = str(tmp_path / "narrow.lance")
    lance.write_dataset(pa.table({"key": [1, 2], "width": [3, 4]}), uri)
    assert main(["backfill", uri, "--udf", "aspect-ratio"]) == 2
    assert "needs column 'height'" in capsys.readouterr().err


def test_report_json(many_fragments, tmp_path):
    path = tmp_path / "report.json"
    assert main(["backfill", many_fragments, "--udf", "aspect-ratio", "--report", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["rows_processed"] == 600 and report["rows_failed"] == 0
    assert report["rows_per_s"] > 0


def test_local_executor_gives_the_same_result_and_resumes(tmp_path):
    ray_uri, local_uri = str(tmp_path / "ray.lance"), str(tmp_path / "local.lance")
    for uri in (ray_uri, local_uri):
        write_sample(uri, rows=500, fragments=4, seed=2)
        lance.dataset(uri).delete("key % 5 = 2")
    backfill(ray_uri, udfs=["aspect-ratio", "moderation-rules"], unit_rows=64, executor="ray")
    backfill(local_uri, udfs=["aspect-ratio", "moderation-rules"], unit_rows=64, executor="local")
    columns = ["key", "aspect_ratio", "is_high_res", "moderation_label"]
    assert lance.dataset(ray_uri).to_table(columns=columns) == lance.dataset(local_uri).to_table(
        columns=columns
    )
    _assert_matches_reference(local_uri)
    # Same checkpoints as on Ray: a stopped local run resumes without recomputing.
    with pytest.raises(LaionRayError, match="max-error-fraction"):
        backfill(local_uri, udfs=["helpers:fail_on_keys"], max_error_fraction=0, executor="local")
    report = backfill(
        local_uri, udfs=["helpers:fail_on_keys"], max_error_fraction=0.05, executor="local"
    )
    assert (
        report.rows_processed == 0 and report.rows_resumed == lance.dataset(local_uri).count_rows()
    )


def test_auto_executor_runs_cheap_jobs_in_process_and_the_rest_on_ray(many_fragments, tmp_path):
    import subprocess
    import sys

    from laion_ray.backfill import _local_transform, resolve_stages
    from laion_ray.engine.executors import LOCAL_MAX_ROWS
    from laion_ray.engine.run import Job
    from laion_ray.engine.run import choose_executor as choose

    def job(udfs):
        stages = resolve_stages(udfs, params={"clip-embed": {"random_weights": True}})
        return Job(many_fragments, "j", "i", [], pa.schema([]), [], None, _local_transform(stages))

    def choose_executor(job, executor, **kw):
        return choose(executor, can_run_local=job.local_transform is not None, **kw)

    cheap = job(["aspect-ratio"])
    small = dict(planned_rows=600, narrow=True)
    assert choose_executor(cheap, "auto", **small, ray_attached=False)
    assert not choose_executor(cheap, "auto", **small, ray_attached=True)  # cluster / running Ray
    assert not choose_executor(
        cheap, "auto", planned_rows=LOCAL_MAX_ROWS + 1, narrow=True, ray_attached=False
    )
    assert not choose_executor(cheap, "auto", planned_rows=600, narrow=False, ray_attached=False)
    assert choose_executor(cheap, "local", **small, ray_attached=True)
    assert not choose_executor(cheap, "ray", **small, ray_attached=False)
    with pytest.raises(LaionRayError, match="executor must be"):
        choose_executor(cheap, "gpu", **small, ray_attached=False)
    model = job(["clip-embed"])  # an actor stage: never in-process
    assert model.local_transform is None
    with pytest.raises(LaionRayError, match="function UDFs and broadcast merges only"):
        choose_executor(model, "local", **small, ray_attached=False)
    # A fresh CLI process with no Ray: the cheap job runs in-process.
    report = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable,
        "-m",
        "laion_ray.cli",
        "backfill",
        many_fragments,
        "--udf",
        "aspect-ratio",
    ]
    subprocess.run([*cmd, "--report", str(report)], check=True, env=env, capture_output=True)
    assert json.loads(report.read_text())["executor"] == "local"


def test_units_are_sized_by_bytes_of_input():
    from laion_ray.engine.plan import MAX_UNIT_ROWS, UNIT_BYTES, default_unit_rows
    from laion_ray.sample import SCHEMA

    def rows(*columns):
        return default_unit_rows(list(columns), SCHEMA)

    assert rows("image") == 1024  # ~64 KB JPEGs: a unit stays ~64 MiB
    assert rows("width", "height") == MAX_UNIT_ROWS  # 16 B a row: capped, not 4M rows
    assert rows("img_emb") == UNIT_BYTES // (768 * 4)  # 3 KB vectors: ~21k rows
    assert rows("image", "caption") < rows("image") < rows("img_emb") < rows("caption")


def test_resource_plan_is_logged_as_prose(many_fragments, caplog):
    caplog.set_level("INFO", logger="laion_ray")
    backfill(many_fragments, udfs=["aspect-ratio"], executor="ray")
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cluster: ")]
    assert plans, [r.getMessage() for r in caplog.records]
    assert plans[0].endswith(" · aspect-ratio: tasks of 0.25 CPU")
    assert "{" not in plans[0]
