"""The Ray path (issue 23): values written once, one pipeline per job, where the time goes.

A task that computes a whole fragment writes the fragment's column file itself
(``data/lr-<run>-<fragment>.lance``) and only small parts; fragments split
across tasks go through parts and an assemble task. Both must give the same
values as a single-process reference, on both executors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from laion_ray.backfill import backfill
from laion_ray.cli import main
from laion_ray.engine import executors, writeback
from laion_ray.engine.commit import column_files, field_ids
from laion_ray.engine.datasource import LaneDatasource
from laion_ray.engine.phases import DRIVER_PHASES, WORKER_PHASES
from laion_ray.errors import StorageError
from laion_ray.sample import write_sample

pytestmark = pytest.mark.usefixtures("ray_session")

OUTPUTS = ["aspect_ratio", "is_high_res"]


def _expected(table: pa.Table) -> list:
    width = table["width"].to_numpy().astype(np.float64)
    height = table["height"].to_numpy().astype(np.float64)
    return [w / h if h > 0 else None for w, h in zip(width, height, strict=True)]


def _output_files(uri: str) -> dict[int, str]:
    """Each fragment's data file holding the outputs."""
    ds = lance.dataset(uri)
    ids = field_ids(ds, OUTPUTS)
    return {f.fragment_id: column_files(f, ids)[0] for f in ds.get_fragments()}


def _assert_no_unused_column_files(uri: str) -> None:
    used = {f.path for frag in lance.dataset(uri).get_fragments() for f in frag.metadata.files}
    written = {p.name for p in (Path(uri) / "data").iterdir() if p.name.startswith("lr-")}
    assert written <= used, f"column files no version uses: {sorted(written - used)}"


def _two_sizes(tmp_path) -> str:
    """Fragment 0: 3 units (read by one task); fragment 1: 70 units (more than a task reads)."""
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=30, fragments=1, seed=1)
    write_sample(str(tmp_path / "big.lance"), rows=700, fragments=1, seed=2)
    big = lance.dataset(str(tmp_path / "big.lance")).to_table()
    big = big.set_column(0, "key", pa.array(np.arange(30, 730, dtype=np.int64)))
    lance.write_dataset(big, uri, mode="append")
    return uri


@pytest.mark.parametrize("executor", ["ray", "local"])
@pytest.mark.parametrize(
    "deleted,where", [(None, None), ("key % 7 = 3", "key % 3 != 0")], ids=["all", "deleted-where"]
)
def test_whole_fragments_are_written_once_and_split_ones_assembled(
    tmp_path, executor, deleted, where
):
    uri = _two_sizes(tmp_path)
    if deleted:
        lance.dataset(uri).delete(deleted)
    report = backfill(uri, udfs=["aspect-ratio"], where=where, unit_rows=10, executor=executor)

    table = lance.dataset(uri).to_table(columns=["key", "width", "height", *OUTPUTS])
    expected = _expected(table)
    keys = table["key"].to_pylist()
    selected = [where is None or k % 3 != 0 for k in keys]
    got = table["aspect_ratio"].to_pylist()
    assert got == [e if s else None for e, s in zip(expected, selected, strict=True)]
    assert report.rows_processed == sum(selected)
    files = _output_files(uri)
    assert files[0].startswith("lr-"), "the one-task fragment was not written once"
    assert not files[1].startswith("lr-"), "a fragment split across tasks is assembled"
    _assert_no_unused_column_files(uri)
    assert not list((Path(uri) / "_laion_ray" / "jobs").iterdir())


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_incremental_fill_writes_the_new_fragment_once_and_keeps_the_rest(tmp_path, executor):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=200, fragments=2, seed=3)
    backfill(uri, udfs=["aspect-ratio"], executor=executor)
    before = _output_files(uri)
    appended = lance.dataset(uri).to_table().slice(0, 50)
    for name in OUTPUTS:  # new rows, without the outputs
        i = appended.schema.get_field_index(name)
        appended = appended.set_column(i, appended.schema.field(i), pa.nulls(50, appended[i].type))
    lance.write_dataset(appended, uri, mode="append")

    report = backfill(uri, udfs=["aspect-ratio"], executor=executor)
    assert report.rows_processed == 50 and report.rows_filled_before == 200
    assert "filled 50 rows; 200 were filled already" in report.summary()
    after = _output_files(uri)
    assert {f: after[f] for f in before} == before  # untouched
    (new,) = set(after) - set(before)
    assert after[new].startswith("lr-")
    table = lance.dataset(uri).to_table(columns=["width", "height", "aspect_ratio"])
    assert table["aspect_ratio"].to_pylist() == _expected(table)

    again = backfill(uri, udfs=["aspect-ratio"], executor=executor)
    assert again.rows_processed == 0
    assert again.summary() == (
        f"nothing to do: `aspect_ratio`, `is_high_res` filled for all 250 selected rows "
        f"(version {lance.dataset(uri).version})"
    )


def test_a_part_whose_column_file_is_gone_is_recomputed(tmp_path, monkeypatch):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=300, fragments=3, seed=4)
    real_commit = writeback.WriteBack.commit

    def refused(self, *args, **kwargs):
        raise StorageError("commit refused (test)")

    monkeypatch.setattr(writeback.WriteBack, "commit", refused)
    with pytest.raises(StorageError):
        backfill(uri, udfs=["aspect-ratio"], executor="local")
    written = sorted((Path(uri) / "data").glob("lr-*.lance"))
    assert len(written) == 3  # every fragment computed whole, nothing committed
    written[1].unlink()  # as if its task died between its parts and its file

    monkeypatch.setattr(writeback.WriteBack, "commit", real_commit)
    report = backfill(uri, udfs=["aspect-ratio"], executor="local")
    assert report.rows_resumed == 200 and report.rows_processed == 100
    table = lance.dataset(uri).to_table(columns=["width", "height", "aspect_ratio"])
    assert table["aspect_ratio"].to_pylist() == _expected(table)
    _assert_no_unused_column_files(uri)


def test_model_is_loaded_once_per_actor_for_the_whole_job(tmp_path, monkeypatch):
    """Many read tasks, one execution: the actor pool (of one) lives for the whole job."""
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=240, fragments=12, seed=5)
    loads = tmp_path / "loads.log"
    executions: list[int] = []  # read tasks (lanes) of each Ray Data execution
    built = LaneDatasource.__init__

    def counted(self, lanes, *args, **kwargs):
        executions.append(len(lanes))
        built(self, lanes, *args, **kwargs)

    monkeypatch.setattr(LaneDatasource, "__init__", counted)
    report = backfill(
        uri,
        udfs=["helpers:CountedModel"],
        udf_params={"helpers:CountedModel": {"log": str(loads)}},
        unit_rows=20,
        concurrency=1,
        executor="ray",
    )
    assert report.units_total == 12 and report.rows_processed == 240
    assert executions == [12]  # a read task per fragment, all in one execution
    assert len(loads.read_text().splitlines()) == 1
    table = lance.dataset(uri).to_table(columns=["key", "key_x3"])
    assert table["key_x3"].to_pylist() == [3 * k for k in table["key"].to_pylist()]


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_report_splits_the_time_into_phases(tmp_path, executor):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=200, fragments=2, seed=6)
    phases = backfill(uri, udfs=["aspect-ratio"], executor=executor).phases
    assert list(phases["driver_s"]) == list(DRIVER_PHASES)
    assert list(phases["worker_s"]) == list(WORKER_PHASES)
    assert all(isinstance(v, float) and v >= 0 for p in phases.values() for v in p.values())


def test_cli_report_and_verbose_show_the_phases(tmp_path, capsys):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=100, fragments=2, seed=7)
    out = tmp_path / "report.json"
    assert main(["-v", "backfill", uri, "--udf", "aspect-ratio", "--report", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["phases"]["driver_s"]) == set(DRIVER_PHASES)
    assert report["phases"]["driver_s"]["import"] > 0  # the CLI's own start
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("time: ") and "worker seconds: read" in line for line in lines)


def test_cli_rerun_of_a_finished_job_says_there_is_nothing_to_do(tmp_path, capsys):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=120, fragments=2, seed=8)
    assert main(["backfill", uri, "--udf", "aspect-ratio"]) == 0
    capsys.readouterr()
    assert main(["backfill", uri, "--udf", "aspect-ratio"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == (
        "nothing to do: `aspect_ratio`, `is_high_res` filled for all 120 selected rows "
        f"(version {lance.dataset(uri).version})"
    )


def test_the_program_attached_to_a_running_ray_exits_cleanly(ray_session, tmp_path):
    """``laion-ray`` on a running Ray (``RAY_ADDRESS``, as under ``ray job submit``)
    disconnects itself before exiting; its rerun finds nothing to do while the
    background attach may still be importing Ray, and exits as cleanly."""
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=120, fragments=2, seed=8)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "laion_ray.cli", "backfill", uri, "--udf", "aspect-ratio"]
    for says in ("backfill:aspect-ratio: 120 rows processed", "nothing to do:"):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout.startswith(says), proc.stdout
    assert lance.dataset(uri).to_table(columns=["aspect_ratio"])["aspect_ratio"].null_count == 0


def test_slow_whole_fragments_get_parts_unit_by_unit(tmp_path, monkeypatch):
    """Past the write-once budget a whole fragment's units are checkpointed as they
    finish (a crash then loses little), and assembled at commit like any others."""
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=90, fragments=3, seed=9)
    monkeypatch.setattr(executors, "WRITE_ONCE_MAX_S", 0.0)
    report = backfill(uri, udfs=["aspect-ratio"], unit_rows=10, executor="local")
    assert report.rows_processed == 90
    assert not any(name.startswith("lr-") for name in _output_files(uri).values())
    table = lance.dataset(uri).to_table(columns=["width", "height", "aspect_ratio"])
    assert table["aspect_ratio"].to_pylist() == _expected(table)
