"""The engine at scale: lazy units, part files as the checkpoint record, one
dataset open per process, known-bad keys per unit, retried checkpoint I/O.

Most tests run the local executor (same plan, checkpoints and commits as Ray,
no Ray start) so that in-process counters see every open and every write; one
runs the Ray path in several waves.
"""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from laion_ray.backfill import backfill
from laion_ray.engine import checkpoint as ckpt
from laion_ray.engine import executors
from laion_ray.engine.error_log import checkpoint_root, dataset_identity, failed_keys_by_fragment
from laion_ray.engine.plan import UnitPlan, fragment_states, split_units
from laion_ray.engine.writeback import assemble_task
from laion_ray.errors import LaionRayError, StorageError
from laion_ray.sample import write_sample
from laion_ray.storage import PinnedVersion, injected_io_errors, io_counts

ROWS = 600
BAD = [k for k in range(ROWS) if k % 97 == 5]  # what helpers:fail_on_keys fails on


@pytest.fixture
def table(tmp_path) -> str:
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=ROWS, fragments=6, seed=1)
    return uri


def _checkpoint(uri: str) -> ckpt.JobCheckpoint:
    jobs = Path(checkpoint_root(uri)) / "jobs"
    (name,) = [p.name for p in jobs.iterdir()]
    return ckpt.JobCheckpoint(checkpoint_root(uri), name, None)


def _delta(before: dict[str, int]) -> dict[str, int]:
    now = io_counts()
    return {k: now.get(k, 0) - before.get(k, 0) for k in now}


def _failed_run(uri: str, unit_rows: int = 40) -> None:
    """A run stopped by the error gate: its finished work stays checkpointed."""
    with pytest.raises(LaionRayError, match="max-error-fraction"):
        backfill(
            uri,
            udfs=["helpers:fail_on_keys"],
            unit_rows=unit_rows,
            executor="local",
            max_error_fraction=0.0,
        )


def _assert_key_check(uri: str) -> None:
    table = lance.dataset(uri).to_table(columns=["key", "key_check"])
    for key, value in zip(*table.to_pydict().values(), strict=True):
        assert value == (None if key in BAD else 2 * key), key


# --- 1. driver state O(fragments) --------------------------------------------------


def test_unit_plan_is_lazy_and_matches_the_unit_list(table):
    lance.dataset(table).delete("key < 7")  # deleted rows stay in their unit's range
    states = fragment_states(lance.dataset(table), ["key"])
    plan = UnitPlan(states, 30)
    units = split_units(states, 30)
    assert list(plan.all_units()) == units
    assert plan.total == len(units) == 6 * 4
    for unit in units:
        assert plan.states[plan.fragment_of(unit.index)].fragment_id == unit.fragment_id
    # Nothing per unit is held: the plan is its fragment states and one offset each.
    assert len(plan.first_unit) == len(states) + 1


def test_ray_path_in_one_lane_computes_every_unit(table, ray_session, monkeypatch):
    # 18 units of a narrow column, 3 a group (a fragment each): one read task reads all 6.
    monkeypatch.setattr(executors, "LANES_PER_SLOT", 0.01)
    report = backfill(
        table, udfs=["helpers:fail_on_keys"], unit_rows=40, executor="ray", max_error_fraction=1
    )
    assert report.units_total == 18 and report.units_resumed == 0
    assert report.rows_processed == ROWS and report.rows_failed == len(BAD)
    _assert_key_check(table)


# --- 2. checkpoint: part files are the record ------------------------------------------


def test_checkpoint_is_one_file_per_part_and_the_plan_written_once(table):
    before = io_counts()
    _failed_run(table)  # 18 units (3 a fragment), each one part; stopped before any commit
    writes = _delta(before)
    checkpoint = _checkpoint(table)
    root = Path(checkpoint.uri)
    # runs/: the canary found bad data, not a broken stage (see engine/failures.py).
    assert sorted(p.name for p in root.iterdir()) == ["job.json", "parts", "runs"]
    parts = sorted(p.name for p in root.glob("parts/*/*"))
    assert len(parts) == 18 and all(p.endswith(".arrow") for p in parts)
    assert writes["checkpoint_writes"] == 18 + 1 + 1  # the parts, the plan, the run's record
    finished = checkpoint.finished_units()
    assert sorted(finished) == list(range(18))
    assert sum(u.rows for u in finished.values()) == ROWS
    assert sum(u.errors for u in finished.values()) == len(BAD)
    assert "committed" not in json.loads((root / "job.json").read_text())


def test_commits_write_one_summary_per_fragment_and_drop_its_parts(table):
    before = io_counts()
    report = backfill(
        table,
        udfs=["helpers:fail_on_keys"],
        unit_rows=40,
        executor="local",
        commit_every_s=0,
        max_error_fraction=1,
    )
    writes = _delta(before)
    assert report.commits >= 2  # periodic commits, each after some fragments finished
    # Linear in units and fragments, whatever the number of flushes and commits.
    # A part per unit, a summary per fragment, the plan, the run's canary record,
    # and per commit its intent and its failed rows (every fragment holds a bad
    # key), kept until they are recorded (see engine/writeback.py).
    assert writes["checkpoint_writes"] == 18 + 6 + 1 + 1 + 2 * report.commits
    _assert_key_check(table)
    assert not (Path(checkpoint_root(table)) / "jobs").exists() or not any(
        (Path(checkpoint_root(table)) / "jobs").iterdir()
    )


def test_resume_lists_parts_and_summaries_and_recomputes_nothing(table):
    _failed_run(table)
    checkpoint = _checkpoint(table)
    # A torn write left behind by a killed worker is not a part.
    (Path(checkpoint.uri) / "parts" / "0" / "0_x_0_5_40_0.arrow.1234.tmp").write_bytes(b"x")
    report = backfill(
        table, udfs=["helpers:fail_on_keys"], unit_rows=40, executor="local", max_error_fraction=1
    )
    assert report.units_resumed == report.units_total == 18
    assert report.rows_processed == 0 and report.rows_resumed == ROWS
    _assert_key_check(table)


def test_resume_reads_only_the_units_left_between_finished_ones(table):
    # Small units of a narrow column are read several to a task; a finished
    # unit between two unfinished ones must split that read, not be read again.
    _failed_run(table)
    parts = Path(_checkpoint(table).uri) / "parts" / "0"
    for part in parts.iterdir():
        if part.name.split("_")[0] in ("0", "2"):  # units 0 and 2 of fragment 0; 1 stays
            part.unlink()
    report = backfill(
        table, udfs=["helpers:fail_on_keys"], unit_rows=40, executor="local", max_error_fraction=1
    )
    assert report.units_resumed == 16
    assert report.rows_processed == 40 + 20  # fragment 0 has 100 rows: units of 40, 40, 20
    _assert_key_check(table)


def test_an_assembled_fragment_brings_back_one_chunk_not_one_per_unit(table):
    # What an assemble task returns travels to the driver and stays there until
    # the commit: a chunk per unit made it grow ~10 KB per unit (issue 14).
    _failed_run(table, unit_rows=5)  # fragment 0: 20 units of 5 rows
    ds = lance.dataset(table)
    assembled = assemble_task(
        _checkpoint(table), 5, 0, table, 0, 100, pa.schema([("key_check", pa.int64())]),
        None, PinnedVersion.of(ds), 100, "assembled.lance",
    )  # fmt: skip
    assert assembled.errors.num_rows == sum(1 for k in BAD if k < 100)
    assert all(column.num_chunks <= 1 for column in assembled.errors.columns)


# --- 3. one dataset open per process -----------------------------------------------------


@pytest.mark.parametrize("unit_rows", [100, 5])
def test_dataset_opens_do_not_grow_with_units(tmp_path, unit_rows):
    uri = str(tmp_path / f"d{unit_rows}.lance")
    write_sample(uri, rows=ROWS, fragments=6, seed=1)
    before = io_counts()
    report = backfill(uri, udfs=["aspect-ratio"], unit_rows=unit_rows, executor="local")
    opens = _delta(before)["dataset_opens"]
    assert report.units_total == ROWS // unit_rows
    # One open for every read at the pinned version, one for the assembly at the
    # newest version, and the driver's own (plan, its accounting at the pinned
    # version, column add, commit, report).
    assert opens <= 9, opens


# --- 4. known-bad keys go only to their units ----------------------------------------------


def test_known_bad_keys_are_handed_out_by_unit_row_range(table):
    _failed_run(table)
    backfill(
        table, udfs=["helpers:fail_on_keys"], unit_rows=40, executor="local", max_error_fraction=1
    )
    known = failed_keys_by_fragment(
        checkpoint_root(table), ["fail-on-keys"], dataset=dataset_identity(table)
    )
    assert sorted(k for v in known.values() for k in v.keys.tolist()) == BAD
    ds = lance.dataset(table)
    addresses = ds.to_table(columns=["key"], with_row_address=True)
    where = {
        k: (a >> 32, a & 0xFFFFFFFF)
        for k, a in zip(
            addresses["key"].to_pylist(), addresses["_rowaddr"].to_pylist(), strict=True
        )
    }
    handed = []
    for unit in split_units(fragment_states(ds, ["key"]), 40):
        keys = known[unit.fragment_id].keys_in(unit.start, unit.end).tolist()
        for key in keys:  # each key only to the unit that holds its row
            fragment, offset = where[key]
            assert fragment == unit.fragment_id and unit.start <= offset < unit.end
        handed.extend(keys)
    assert sorted(handed) == BAD

    # An incremental rerun of a new column skips exactly those rows.
    lance.dataset(table).drop_columns(["key_check"])
    report = backfill(table, udfs=["helpers:fail_on_keys"], unit_rows=40, executor="local")
    assert report.rows_skipped_failed == len(BAD)
    assert report.rows_processed == ROWS - len(BAD) and report.rows_failed == 0
    _assert_key_check(table)


def test_known_bad_slice_of_an_empty_range_is_empty():
    from laion_ray.engine.error_log import KnownBad

    bad = KnownBad(np.array([3, 10, 11, 40]), np.array([103, 110, 111, 140]))
    assert bad.keys_in(0, 3).tolist() == []
    assert bad.keys_in(3, 11).tolist() == [103, 110]
    assert bad.keys_in(11, 41).tolist() == [111, 140]


# --- 7. transient I/O errors are retried, never absence ---------------------------------


@pytest.mark.parametrize("op", ["read", "list"])
def test_transient_checkpoint_error_is_retried_not_read_as_no_checkpoint(table, op):
    _failed_run(table)
    before = io_counts()
    with injected_io_errors(op, count=2):
        report = backfill(
            table,
            udfs=["helpers:fail_on_keys"],
            unit_rows=40,
            executor="local",
            max_error_fraction=1,
        )
    assert _delta(before)["io_retries"] == 2
    # No re-plan: every unit came from the checkpoint, nothing was recomputed.
    assert report.units_resumed == 18 and report.rows_processed == 0
    _assert_key_check(table)


def test_a_checkpoint_that_stays_unreadable_stops_the_job_and_keeps_it(table):
    _failed_run(table)
    version = lance.dataset(table).version
    with injected_io_errors("read", count=100), pytest.raises(StorageError, match="failed"):
        backfill(
            table,
            udfs=["helpers:fail_on_keys"],
            unit_rows=40,
            executor="local",
            max_error_fraction=1,
        )
    assert lance.dataset(table).version == version
    assert len(_checkpoint(table).finished_units()) == 18  # not replaced by a new plan


# --- the same checkpoint on an object store ------------------------------------------------


@pytest.mark.slow
def test_checkpoint_on_s3_resumes_from_part_names(s3_server, tmp_path):
    """Local executor over a dataset in (moto) S3: parts, summaries and resume."""
    uri = s3_server.uri("ckpt", "d.lance")
    opts = s3_server.storage_options
    local = str(tmp_path / "d.lance")
    write_sample(local, rows=ROWS, fragments=6, seed=1)
    lance.write_dataset(
        lance.dataset(local).to_table(), uri, max_rows_per_file=100, storage_options=opts
    )
    with pytest.raises(LaionRayError, match="max-error-fraction"):
        backfill(
            uri,
            udfs=["helpers:fail_on_keys"],
            unit_rows=40,
            executor="local",
            max_error_fraction=0.0,
            storage_options=opts,
        )
    (name,) = [  # the one job under the checkpoint root, listed through the same store
        i.base_name
        for i in ckpt.JobCheckpoint(checkpoint_root(uri), "x", opts)._list(
            checkpoint_root(uri) + "/jobs"
        )
    ]
    checkpoint = ckpt.JobCheckpoint(checkpoint_root(uri), name, opts)
    assert checkpoint.load_manifest() is not None
    assert sorted(checkpoint.finished_units()) == list(range(18))
    with injected_io_errors("list", count=1):
        report = backfill(
            uri,
            udfs=["helpers:fail_on_keys"],
            unit_rows=40,
            executor="local",
            max_error_fraction=1,
            storage_options=opts,
        )
    assert report.units_resumed == 18 and report.rows_processed == 0
    assert ckpt.JobCheckpoint(checkpoint_root(uri), name, opts).load_manifest() is None
    table = lance.dataset(uri, storage_options=opts).to_table(columns=["key", "key_check"])
    for key, value in zip(*table.to_pydict().values(), strict=True):
        assert value == (None if key in BAD else 2 * key), key
