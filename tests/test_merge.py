"""Merge on key: real Lance datasets, real (session) Ray, pylance's merge as the reference."""

from __future__ import annotations

import json
import shutil

import lance
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from laion_ray.cli import main
from laion_ray.errors import LaionRayError
from laion_ray.history import job_history
from laion_ray.merge import merge
from laion_ray.sample import write_sample

pytestmark = pytest.mark.usefixtures("ray_session")

ROWS = 300
STRATEGIES = {
    "broadcast": {},
    "shuffle": {"broadcast_max_bytes": 0, "num_partitions": 3},
    "local": {"executor": "local"},  # the broadcast join, in this process
}


def _check_strategy(report, strategy: str) -> None:
    assert report.strategy == ("broadcast" if strategy == "local" else strategy)
    assert report.job.executor == ("local" if strategy == "local" else "ray")


def _labels(keys) -> pa.Table:
    keys = np.asarray(keys, np.int64)
    return pa.table(
        {
            "key": keys,
            "aesthetic": (keys % 11).astype(np.float64) / 2,
            "label": pa.array([f"l{k % 5}" for k in keys]),
        }
    )


def _reference(uri: str, tmp_path, labels: pa.Table) -> pa.Table:
    """pylance's single-process merge on a copy of the same dataset."""
    copy = str(tmp_path / "reference.lance")
    shutil.copytree(uri, copy)
    ds = lance.dataset(copy)
    ds.merge(labels, left_on="key")
    return _values(copy, labels.column_names)


def _values(uri: str, columns) -> pa.Table:
    table = lance.dataset(uri).to_table(columns=list(columns))
    return table.sort_by("key")


@pytest.fixture
def dataset(tmp_path):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=ROWS, fragments=4, seed=3)
    return uri


@pytest.mark.parametrize(
    "fragments,deleted,unit_rows,strategy",
    [
        (6, None, 40, "broadcast"),
        (1, None, 64, "broadcast"),
        (4, "key % 5 = 2 OR key < 7", 50, "broadcast"),
        (4, "key % 5 = 2 OR key < 7", 50, "shuffle"),
        (6, None, 40, "local"),
        (4, "key % 5 = 2 OR key < 7", 50, "local"),
    ],
    ids=[
        "many-fragments",
        "single-fragment",
        "deleted-rows",
        "deleted-rows-shuffle",
        "many-fragments-local",
        "deleted-rows-local",
    ],
)
def test_partial_coverage_with_extra_keys_equals_pylance(
    tmp_path, strategy, fragments, deleted, unit_rows
):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=ROWS, fragments=fragments, seed=2)
    if deleted:
        lance.dataset(uri).delete(deleted)
    keys = [k for k in range(ROWS) if k % 3] + list(range(10_000, 10_040))
    labels = _labels(np.random.default_rng(0).permutation(keys))
    pq.write_table(labels, tmp_path / "labels.parquet")
    expected = _reference(uri, tmp_path, labels)
    before = lance.dataset(uri)
    files = {f.fragment_id: {d.path for d in f.metadata.files} for f in before.get_fragments()}
    live = set(before.to_table(columns=["key"])["key"].to_pylist())

    report = merge(
        uri, source=str(tmp_path / "labels.parquet"), unit_rows=unit_rows, **STRATEGIES[strategy]
    )
    _check_strategy(report, strategy)
    assert report.source_rows == len(keys)
    assert report.matched_keys == len(live & set(keys))
    assert report.unmatched_keys == len(keys) - report.matched_keys
    assert report.job.rows_processed == before.count_rows()
    got = _values(uri, labels.column_names)
    assert got.equals(expected)
    assert got.filter(pa.compute.is_null(got["aesthetic"]))["key"].to_pylist() == sorted(
        live - set(keys)
    )
    # Existing data files are untouched: each fragment only gains one column file.
    for frag in lance.dataset(uri).get_fragments():
        paths = {d.path for d in frag.metadata.files}
        assert files[frag.fragment_id] < paths and len(paths) == len(files[frag.fragment_id]) + 1
    if deleted:
        assert lance.dataset(uri).count_rows(deleted) == 0


@pytest.mark.parametrize("strategy", ["broadcast", "local"])
def test_full_coverage_cli_tag_history_and_unmatched_out(dataset, tmp_path, strategy):
    labels = _labels(list(range(ROWS)) + [5000, 5001])
    pq.write_table(labels.slice(0, 150), tmp_path / "a.parquet")
    pq.write_table(labels.slice(150), tmp_path / "b.parquet")
    out = tmp_path / "unmatched.csv"
    report_path = tmp_path / "report.json"
    extra = ["--executor", "local"] if strategy == "local" else []
    argv = ["merge", dataset, "--from", str(tmp_path / "a.parquet")]
    argv += ["--from", str(tmp_path / "b.parquet"), "--on", "key", "--columns", "aesthetic"]
    argv += ["--tag", "labels-v1", "--unmatched-out", str(out), "--report", str(report_path)]
    assert main(argv + extra) == 0
    got = _values(dataset, ["key", "aesthetic"])
    assert got["aesthetic"].null_count == 0
    assert got["aesthetic"].to_pylist() == [(k % 11) / 2 for k in range(ROWS)]
    assert "label" not in lance.dataset(dataset).schema.names
    assert sorted(pacsv.read_csv(out)["key"].to_pylist()) == [5000, 5001]
    written = json.loads(report_path.read_text())
    assert written["unmatched_keys"] == 2
    assert written["job"]["executor"] == ("local" if strategy == "local" else "ray")
    ds = lance.dataset(dataset)
    assert "labels-v1" in ds.tags.list()
    history = job_history(dataset)
    assert history[-1]["job"].startswith("merge:") and history[-1]["tags"] == ["labels-v1"]
    assert history[-1]["details"]["unmatched_keys"] == 2


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_duplicate_keys_are_an_error_with_examples_and_nothing_is_committed(
    dataset, tmp_path, strategy
):
    labels = _labels(list(range(ROWS)) + [17, 42, 42])
    pq.write_table(labels, tmp_path / "dup.parquet")
    version = lance.dataset(dataset).version
    with pytest.raises(LaionRayError, match=r"2 duplicate value\(s\) of key 'key', e\.g\. 17, 42"):
        merge(dataset, source=str(tmp_path / "dup.parquet"), **STRATEGIES[strategy])
    assert lance.dataset(dataset).version == version


def test_key_type_mismatch_needs_cast_and_bad_values_are_named(dataset, tmp_path, capsys):
    text_keys = pa.table({"key": [str(k) for k in range(ROWS)], "score": np.arange(ROWS) * 1.0})
    pq.write_table(text_keys, tmp_path / "s.parquet")
    assert main(["merge", dataset, "--from", str(tmp_path / "s.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "key 'key' is int64 in the dataset but string" in err and "--cast" in err
    merge(dataset, source=str(tmp_path / "s.parquet"), cast=True)
    assert _values(dataset, ["key", "score"])["score"].to_pylist() == list(np.arange(ROWS) * 1.0)

    bad = pa.table({"key": ["1", "x2"], "other": [1.0, 2.0]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(LaionRayError, match="cannot cast column 'key' from string to int64"):
        merge(dataset, source=str(tmp_path / "bad.parquet"), cast=True)
    assert "other" not in lance.dataset(dataset).schema.names


def test_column_type_conflict_on_overwrite(dataset, tmp_path):
    pq.write_table(pa.table({"key": [1, 2], "NSFW": [0.5, 1.5]}), tmp_path / "f.parquet")
    with pytest.raises(LaionRayError, match="column 'NSFW' is int64 in the dataset but double"):
        merge(dataset, source=str(tmp_path / "f.parquet"), overwrite=True)
    narrow = pa.table({"key": [1, 2], "NSFW": pa.array([7, 8], pa.int32())})
    pq.write_table(narrow, tmp_path / "n.parquet")
    with pytest.raises(LaionRayError, match="pass --cast"):
        merge(dataset, source=str(tmp_path / "n.parquet"), overwrite=True)
    merge(dataset, source=str(tmp_path / "n.parquet"), overwrite=True, cast=True)
    ds = lance.dataset(dataset)
    assert ds.schema.field("NSFW").type == pa.int64()
    values = dict(zip(*_values(dataset, ["key", "NSFW"]).to_pydict().values(), strict=True))
    assert values[1] == 7 and values[2] == 8


@pytest.mark.parametrize("strategy", ["broadcast", "local"])
def test_overwrite_updates_matched_rows_and_keeps_the_rest(dataset, tmp_path, strategy):
    old = _values(dataset, ["key", "caption"])
    update = pa.table(
        {"key": np.arange(0, ROWS, 2), "caption": [f"new {k}" for k in range(0, ROWS, 2)]}
    )
    pq.write_table(update, tmp_path / "captions.parquet")
    with pytest.raises(LaionRayError, match="already exists.*--overwrite"):
        merge(dataset, source=str(tmp_path / "captions.parquet"))
    merge(
        dataset, source=str(tmp_path / "captions.parquet"), overwrite=True, **STRATEGIES[strategy]
    )
    got = _values(dataset, ["key", "caption"])
    for key, before, after in zip(
        got["key"].to_pylist(), old["caption"].to_pylist(), got["caption"].to_pylist(), strict=True
    ):
        assert after == (f"new {key}" if key % 2 == 0 else before)


def test_rerun_is_an_incremental_fill(dataset, tmp_path):
    pq.write_table(_labels(range(0, ROWS, 2)), tmp_path / "half.parquet")
    first = merge(dataset, source=str(tmp_path / "half.parquet"))
    assert first.job.rows_processed == ROWS
    # Same source name, more keys now: only rows still null are read and filled.
    pq.write_table(_labels(range(ROWS)), tmp_path / "half.parquet")
    second = merge(dataset, source=str(tmp_path / "half.parquet"))
    assert second.job.rows_processed == ROWS // 2
    assert _values(dataset, ["key", "aesthetic"])["aesthetic"].null_count == 0


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "lance", "dir"])
def test_source_formats(dataset, tmp_path, fmt):
    labels = _labels(range(ROWS - 10))
    if fmt == "csv":
        path = str(tmp_path / "labels.csv")
        pacsv.write_csv(labels, path)
    elif fmt == "jsonl":
        path = str(tmp_path / "labels.jsonl")
        with open(path, "w") as f:
            for row in labels.to_pylist():
                f.write(json.dumps(row) + "\n")
    elif fmt == "lance":
        path = str(tmp_path / "labels.lance")
        lance.write_dataset(labels, path, max_rows_per_file=100)
    else:
        path = str(tmp_path / "labels")
        (tmp_path / "labels").mkdir()
        for i in range(3):
            pq.write_table(labels.slice(i * 100, 100), tmp_path / "labels" / f"part-{i}.parquet")
    expected = _reference(dataset, tmp_path, labels)
    report = merge(dataset, source=path)
    assert report.unmatched_keys == 0 and report.matched_keys == ROWS - 10
    assert _values(dataset, labels.column_names).equals(expected)


def test_auto_executor_merges_small_sources_in_process_without_ray(dataset, tmp_path):
    import os
    import subprocess
    import sys

    labels = _labels(range(0, ROWS, 3))
    pq.write_table(labels, tmp_path / "l.parquet")
    expected = _reference(dataset, tmp_path, labels)
    report = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "laion_ray.cli", "merge", dataset]
    cmd += ["--from", str(tmp_path / "l.parquet"), "--report", str(report)]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    assert json.loads(report.read_text())["job"]["executor"] == "local"
    assert _values(dataset, labels.column_names).equals(expected)
    # A shuffle join needs Ray: asking for it in-process is a clear error.
    with pytest.raises(LaionRayError, match="broadcast merges only"):
        merge(dataset, source=str(tmp_path / "l.parquet"), executor="local", broadcast_max_bytes=0)


def test_changed_source_is_not_resumed_from_stale_checkpoints(dataset, tmp_path):
    from laion_ray.merge import _identity, open_source

    path = tmp_path / "l.parquet"
    pq.write_table(_labels(range(10)), path)
    first = _identity(open_source(str(path)), "key", {"aesthetic": pa.float64()})
    pq.write_table(_labels(range(11)), path)
    assert _identity(open_source(str(path)), "key", {"aesthetic": pa.float64()}) != first


def test_bad_arguments_exit_2_with_one_line(dataset, tmp_path, capsys):
    pq.write_table(_labels(range(5)), tmp_path / "l.parquet")
    (tmp_path / "l.txt").write_text("key,aesthetic\n1,2.0\n")  # unknown extension
    cases = [
        (["--from", str(tmp_path / "missing.parquet")], "no such source"),
        (["--from", str(tmp_path / "l.parquet"), "--columns", "nope"], "column 'nope' is not in"),
        (
            ["--from", str(tmp_path / "l.parquet"), "--on", "url"],
            "key column 'url' is not in source",
        ),
        (["--from", str(tmp_path / "l.txt")], "--format"),
    ]
    for args, message in cases:
        assert main(["merge", dataset, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_jobs_entry_point(dataset, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    jobs = Path(__file__).resolve().parent.parent / "jobs"
    sys.path.insert(0, str(jobs))  # the entry point imports its sibling ``_common``
    spec = importlib.util.spec_from_file_location("merge_labels", jobs / "merge_labels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    job_main = module.main

    pq.write_table(_labels(range(ROWS)), tmp_path / "l.parquet")
    assert job_main([dataset, "--from", str(tmp_path / "l.parquet"), "--columns", "label"]) == 0
    assert _values(dataset, ["key", "label"])["label"].null_count == 0
    assert job_main([dataset, "--from", str(tmp_path / "nope.parquet")]) == 2


def test_source_on_s3(dataset, tmp_path, s3_server):
    labels = _labels(range(ROWS))
    uri = s3_server.uri("labels", "l.parquet")
    from laion_ray.storage import filesystem

    fs, path = filesystem(uri, s3_server.storage_options)
    with fs.open_output_stream(path) as f:
        pq.write_table(labels, f)
    expected = _reference(dataset, tmp_path, labels)
    report = merge(dataset, source=uri, source_storage_options=s3_server.storage_options)
    assert report.matched_keys == ROWS
    assert _values(dataset, labels.column_names).equals(expected)
