"""Resilience on real Lance and real Ray: kills, worker deaths, concurrent writers.

The CLI runs as a subprocess wherever a process has to die or a real exit code and
stderr are checked; it starts its own local Ray (no ``RAY_ADDRESS``). Everything
else uses the session Ray. Where a backfill must be caught between its plan and
its commit, ``helpers:held_ratio`` waits on a gate file instead of a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from lance.file import LanceFileWriter
from lance.fragment import DataFile

from laion_ray.backfill import backfill
from laion_ray.engine import checkpoint as ckpt
from laion_ray.engine import commit as commit_module
from laion_ray.engine import executors, writeback
from laion_ray.engine import run as engine_run
from laion_ray.engine.assemble import read_part_rows
from laion_ray.engine.commit import (
    UDF_METADATA,
    ColumnFile,
    add_columns,
    column_files,
    commit,
    field_ids,
    replace_column_files,
)
from laion_ray.engine.error_log import checkpoint_root
from laion_ray.engine.plan import fragment_states, split_units
from laion_ray.errors import JobFailed
from laion_ray.history import job_history
from laion_ray.sample import sample_table, write_sample

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
UNIT_ROWS = 50
RERUN = "=== rerun ===\n"

APPEND_SCRIPT = """
import sys, lance
from laion_ray.sample import sample_table
lance.write_dataset(sample_table(int(sys.argv[2]), seed=6, start_key=10_000), sys.argv[1], mode="append")
"""
# The other writer's own business: retry its Merge if it loses a race.
ADD_COLUMN_SCRIPT = """
import sys, time, lance
for attempt in range(30):
    try:
        lance.dataset(sys.argv[1]).add_columns({"other_col": "key * 3"})
        break
    except Exception as exc:
        if "onflict" not in str(exc) and "etryable" not in str(exc):
            raise
        time.sleep(0.2)
else:
    sys.exit("add_columns kept conflicting")
"""


# --- processes ------------------------------------------------------------------


def _cli_env(log: Path | None = None, delay: float = 0.0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    env["LAION_RAY_TEST_DELAY"] = str(delay)
    if log is not None:
        env["LAION_RAY_TEST_LOG"] = str(log)
    return env


def _backfill_cmd(uri: str, *extra: str, udf: str = "helpers:slow_ratio") -> list[str]:
    return [
        sys.executable, "-m", "laion_ray.cli", "backfill", uri,
        "--udf", udf, "--unit-rows", str(UNIT_ROWS), "--executor", "ray", *extra,
    ]  # fmt: skip


def _start(cmd: list[str], env: dict[str, str], stderr: Path) -> subprocess.Popen:
    # Own session: the driver and every Ray process it starts share one session id.
    with open(stderr, "wb") as err:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )


def _session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes in session ``sid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(name))
    return found


def _kill_session(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the driver's process group and make sure its Ray dies with it.

    Seen with Ray 2.60: GCS, raylet and agents are in the driver's process group
    and die with it; workers have their own groups and exit once the raylet is
    gone, except workers still starting up, which can hang on as orphans. Those
    are SIGKILLed here by pid (only processes of this session). Returns them.
    """
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not _session_processes(proc.pid), 10, "the killed Ray session to exit")
    return left


def _wait_for(
    cond: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def _run_to_end(cmd: list[str], env: dict[str, str], report: Path, timeout: float = 180) -> dict:
    done = subprocess.run(
        [*cmd, "--report", str(report)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(report.read_text())


# --- checkpoints, logs and tables -----------------------------------------------


def _job(uri: str) -> ckpt.JobCheckpoint | None:
    jobs = Path(uri) / "_laion_ray" / "jobs"
    names = sorted(p.name for p in jobs.iterdir()) if jobs.exists() else []
    assert len(names) <= 1, names
    return ckpt.JobCheckpoint(checkpoint_root(uri), names[0], None) if names else None


def _finished_units(uri: str) -> dict[int, ckpt.FinishedUnit]:
    job = _job(uri)
    return job.finished_units() if job else {}


def _unit_keys(unit: ckpt.FinishedUnit) -> set[int]:
    keys: set[int] = set()
    for path in unit.paths:
        keys.update(read_part_rows(path, {})["key"].to_pylist())
    return keys


def _unit_of_key(uri: str) -> dict[int, int]:
    """Key -> planned work unit, as the engine splits the dataset."""
    ds = lance.dataset(uri)
    units = split_units(fragment_states(ds, ["key"]), UNIT_ROWS)
    table = ds.to_table(columns=["key"], with_row_address=True)
    addr = table["_rowaddr"].to_pylist()
    owner = {}
    for key, a in zip(table["key"].to_pylist(), addr, strict=True):
        frag, offset = a >> 32, a & 0xFFFFFFFF
        owner[key] = next(
            u.index for u in units if u.fragment_id == frag and u.start <= offset < u.end
        )
    return owner


def _logged_runs(log: Path) -> list[list[int]]:
    runs: list[list[int]] = [[]]
    for line in log.read_text().splitlines(keepends=True):
        if line == RERUN:
            runs.append([])
        else:
            runs[-1].extend(int(k) for k in line.split())
    return runs


def _sorted_table(uri: str) -> pa.Table:
    return lance.dataset(uri).to_table().sort_by("key")


def _assert_same_table(uri: str, clean: str) -> None:
    got, want = _sorted_table(uri), _sorted_table(clean)
    assert got.schema.equals(want.schema, check_metadata=True)
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        assert got[name].equals(want[name]), name


def _expected_ratio(table: pa.Table) -> list[float | None]:
    return [
        w / h if h > 0 else None
        for w, h in zip(table["width"].to_pylist(), table["height"].to_pylist(), strict=True)
    ]


def _copies(tmp_path: Path, rows: int, fragments: int, seed: int) -> tuple[str, str]:
    """The same sample twice: one to torture, one for a clean reference run."""
    uri, clean = str(tmp_path / "d.lance"), str(tmp_path / "clean.lance")
    for target in (uri, clean):
        write_sample(target, rows=rows, fragments=fragments, seed=seed)
    return uri, clean


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised by the test after join
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _joined(thread: threading.Thread, out: dict, timeout: float = 180) -> object:
    thread.join(timeout)
    assert not thread.is_alive(), "backfill did not finish"
    if "error" in out:
        raise out["error"]
    return out["value"]


# --- 1. driver SIGKILL + resume ---------------------------------------------------


def test_driver_sigkill_resume_recomputes_only_in_flight_units(tmp_path, ray_session):
    rows = 1200  # 24 units: three waves of 8 parallel unit tasks on 2 CPUs
    # One unit per fragment: a read task covers a run of adjacent units of one
    # fragment, and a task of 8 units records them all at once, so with 3
    # fragments the whole job could finish between two polls.
    uri, clean = _copies(tmp_path, rows=rows, fragments=rows // UNIT_ROWS, seed=3)
    log = tmp_path / "keys.log"
    # Slow enough that the kill lands mid-job even with 8 unit tasks in parallel.
    env = _cli_env(log, delay=2.0)
    cmd = _backfill_cmd(uri)
    unit_of = _unit_of_key(uri)
    started = time.monotonic()
    proc = _start(cmd, env, tmp_path / "run1.err")
    _wait_for(lambda: len(_finished_units(uri)) >= 3, 120, "3 finished units in the ledger", proc)
    leftovers = _kill_session(proc)
    killed_after = time.monotonic() - started

    finished = _finished_units(uri)  # what the killed driver had recorded
    done_keys = set().union(*(_unit_keys(u) for u in finished.values()))
    assert len(finished) < rows // UNIT_ROWS, "the kill came too late to leave work undone"
    with log.open("a") as f:
        f.write(RERUN)
    report = _run_to_end(cmd, env, tmp_path / "report.json")
    rerun_s = time.monotonic() - started - killed_after
    backfill(clean, udfs=["helpers:slow_ratio"], unit_rows=UNIT_ROWS)

    # (a) same table as an uninterrupted run on an identical copy
    _assert_same_table(uri, clean)
    first, rerun = _logged_runs(log)
    # (b) nothing the ledger had recorded was computed again...
    assert not done_keys & set(rerun)
    assert report["rows_resumed"] == len(done_keys)
    # ...and the rerun computed every other row exactly once
    assert sorted(rerun) == sorted(set(range(rows)) - done_keys)
    assert report["rows_processed"] == rows - len(done_keys)
    # (c) recomputation is confined to units in flight at the kill: started, not recorded
    in_flight = {unit_of[k] for k in first} - set(finished)
    recomputed = set(first) & set(rerun)
    assert {unit_of[k] for k in recomputed} <= in_flight
    assert len(recomputed) <= len(in_flight) * UNIT_ROWS
    print(
        f"ledger had {len(finished)} units at the kill; {len(in_flight)} in flight; "
        f"{len(recomputed)} rows recomputed; orphaned Ray processes killed: {leftovers}; "
        f"killed after {killed_after:.0f}s, rerun took {rerun_s:.0f}s"
    )


# --- 2. worker death ----------------------------------------------------------------


def test_worker_death_is_retried_and_every_row_is_correct(tmp_path, ray_session):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=300, fragments=3, seed=5)
    marker = tmp_path / "died"
    report = backfill(
        uri,
        udfs=["helpers:die_once_at"],
        udf_params={"helpers:die_once_at": {"marker": str(marker)}},
    )
    assert marker.exists(), "no worker died, so nothing was tested"
    assert report.rows_processed == 300 and report.rows_failed == 0
    table = lance.dataset(uri).to_table(columns=["key", "survivor"])
    assert table["survivor"].to_pylist() == [k + 1 for k in table["key"].to_pylist()]


# --- 3. concurrent writers --------------------------------------------------------------


def test_concurrent_append_and_add_column_survive_backfill(tmp_path, ray_session):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=400, fragments=4, seed=6)
    gate = tmp_path / "gate"
    params = {"helpers:held_ratio": {"gate": str(gate)}}
    thread, out = _in_thread(
        lambda: backfill(uri, udfs=["helpers:held_ratio"], udf_params=params, unit_rows=UNIT_ROWS)
    )
    _wait_for(lambda: (job := _job(uri)) and job.load_manifest(), 60, "the plan")
    # Two other processes commit while the backfill is held between plan and commit.
    env = _cli_env()
    writers = [
        subprocess.Popen([sys.executable, "-c", APPEND_SCRIPT, uri, "100"], env=env),
        subprocess.Popen([sys.executable, "-c", ADD_COLUMN_SCRIPT, uri], env=env),
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    gate.touch()
    report = _joined(thread, out)
    assert report.rows_processed == 400

    table = lance.dataset(uri).to_table(columns=["key", "width", "height", "other_col", "ar_held"])
    assert table.num_rows == 500
    original = table.filter(pc.less(table["key"], 10_000))
    appended = table.filter(pc.greater_equal(table["key"], 10_000))
    assert sorted(appended["key"].to_pylist()) == list(range(10_000, 10_100))
    assert original["other_col"].to_pylist() == [3 * k for k in original["key"].to_pylist()]
    # Appended rows got other_col or not, depending on which commit landed first.
    assert all(
        v in (None, 3 * k)
        for k, v in zip(appended["key"].to_pylist(), appended["other_col"].to_pylist(), strict=True)
    )
    assert original["ar_held"].to_pylist() == _expected_ratio(original)
    assert appended["ar_held"].null_count == 100

    again = backfill(uri, udfs=["helpers:held_ratio"], udf_params=params, unit_rows=UNIT_ROWS)
    assert again.rows_processed == 100
    table = lance.dataset(uri).to_table(columns=["key", "width", "height", "other_col", "ar_held"])
    assert table["ar_held"].null_count == 0
    assert table["ar_held"].to_pylist() == _expected_ratio(table)
    assert "other_col" in table.column_names and table.num_rows == 500


def _prepare_column_files(uri: str) -> tuple[lance.LanceDataset, dict[int, ColumnFile], dict]:
    """Add column ``twice`` and write its files (``key * 2``) against the current version."""
    field = pa.field("twice", pa.int64(), metadata={UDF_METADATA: b"test"})
    add_columns(uri, [field], job="test", details={})
    at = lance.dataset(uri)
    files = {}
    for frag in at.get_fragments():
        name = f"twice-{frag.fragment_id}.lance"
        keys = frag.to_table(columns=["key"])["key"]
        writer = LanceFileWriter(f"{uri}/data/{name}", pa.schema([field]))
        writer.write_batch(pa.table({"twice": pc.multiply(keys, 2)}, schema=pa.schema([field])))
        writer.close()
        files[frag.fragment_id] = ColumnFile(name, column_files(frag, field_ids(at, ["twice"])))
    planned = {s.fragment_id: s for s in fragment_states(at, ["key"])}
    return at, files, planned


def _assert_all_survive(uri: str, appended: int) -> None:
    ds = lance.dataset(uri)
    table = ds.to_table(columns=["key", "twice", "other_col"])
    assert table.num_rows == 300 + appended
    keys = table["key"].to_pylist()
    assert table["other_col"].to_pylist() == [3 * k for k in keys]
    assert table["twice"].to_pylist() == [2 * k if k < 10_000 else None for k in keys]
    assert ds.schema.field("twice").metadata == {UDF_METADATA: b"test"}


def test_column_files_commit_on_top_of_a_concurrent_append_and_merge(tmp_path):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=300, fragments=3, seed=7)
    at, files, planned = _prepare_column_files(uri)
    # Another writer, after our version V: appends rows, then adds a column (Merge).
    lance.write_dataset(sample_table(50, seed=7, start_key=10_000), uri, mode="append")
    lance.dataset(uri).add_columns({"other_col": "key * 3"})
    assert lance.dataset(uri).version == at.version + 2
    replace_column_files(uri, files, planned, job="test", details={})
    _assert_all_survive(uri, appended=50)


def test_commit_retry_rebuilds_instead_of_resending_a_stale_schema(tmp_path):
    """The lance-ray failure: its retry re-sent a Merge and dropped a concurrent column."""
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=300, fragments=3, seed=7)
    _, files, _ = _prepare_column_files(uri)
    seen: list[int] = []

    def build(latest: lance.LanceDataset):
        seen.append(latest.version)
        if len(seen) == 1:  # another writer commits after we read `latest`
            lance.dataset(uri).add_columns({"other_col": "key * 3"})
        return lance.LanceOperation.DataReplacement(
            [
                lance.LanceOperation.DataReplacementGroup(fid, DataFile.create(latest, f.file_name))
                for fid, f in files.items()
            ]
        )

    commit(uri, build, job="test", details={})
    assert seen == [seen[0], seen[0] + 1], "the first attempt should conflict and be rebuilt"
    _assert_all_survive(uri, appended=0)


def _write_twice(uri: str, fragment_id: int, values: pa.Array) -> ColumnFile:
    """A column file of ``twice`` for one fragment, based on the newest version's files."""
    field = lance.dataset(uri).schema.field("twice")
    name = f"twice-{fragment_id}-{os.urandom(4).hex()}.lance"
    writer = LanceFileWriter(f"{uri}/data/{name}", pa.schema([field]))
    writer.write_batch(pa.table({"twice": values}, schema=pa.schema([field])))
    writer.close()
    latest = lance.dataset(uri)
    return ColumnFile(
        name, column_files(latest.get_fragment(fragment_id), field_ids(latest, ["twice"]))
    )


def test_a_commit_that_loses_the_race_re_assembles_only_the_fragments_that_changed(
    tmp_path, monkeypatch
):
    """B commits fragment 0's column after A derived its commit: Lance's conflict, then our check."""
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=300, fragments=3, seed=7)
    _, files, planned = _prepare_column_files(uri)  # A: key * 2 for every row of each fragment
    real_check = commit_module.check_unchanged
    raced: list[int] = []

    def b_commits_meanwhile(latest, fragment_id, physical_rows):
        if not raced:  # inside A's first derivation, after it opened `latest`
            raced.append(latest.version)
            b_file = _write_twice(uri, 0, pa.array([-1] * 100, pa.int64()))
            replace_column_files(uri, {0: b_file}, planned, job="B", details={})
        return real_check(latest, fragment_id, physical_rows)

    reassembled: list[list[int]] = []

    def reassemble(fragment_ids):  # A computed even keys only; odd rows keep current values
        reassembled.append(list(fragment_ids))
        fresh = {}
        for fid in fragment_ids:
            current = lance.dataset(uri).get_fragment(fid).to_table(columns=["key", "twice"])
            even = pc.equal(pc.bit_wise_and(current["key"], 1), 0)
            values = pc.if_else(even, pc.multiply(current["key"], 2), current["twice"])
            fresh[fid] = _write_twice(uri, fid, values)
        return fresh

    monkeypatch.setattr(commit_module, "check_unchanged", b_commits_meanwhile)
    replace_column_files(uri, files, planned, job="A", details={}, reassemble=reassemble)
    assert reassembled == [[0]], "only the fragment B changed is re-assembled"
    table = _sorted_table(uri)
    keys, twice = table["key"].to_pylist(), table["twice"].to_pylist()
    frag0 = set(lance.dataset(uri).get_fragment(0).to_table(columns=["key"])["key"].to_pylist())
    assert twice == [2 * k if k not in frag0 or k % 2 == 0 else -1 for k in keys]
    ops = [
        (e["job"], e["version"]) for e in job_history(uri) if e["operation"] == "DataReplacement"
    ]
    assert [job for job, _ in ops] == ["B", "A"] and ops[0][1] == raced[0] + 1


def _stamp(uri: str, job: int, **options) -> object:
    return backfill(
        uri,
        udfs=["helpers:stamp"],
        udf_params={"helpers:stamp": {"job": job}},
        unit_rows=UNIT_ROWS,
        executor="local",
        **options,
    )


def test_no_lost_update_when_another_job_commits_the_column_between_assembly_and_commit(
    tmp_path, monkeypatch
):
    """Job A assembles, job B commits the same column on other rows, then A commits."""
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=300, fragments=3, seed=10)
    _stamp(uri, 0)  # every row: key * 10
    real_replace = writeback.replace_column_files
    a_files: list[dict[int, ColumnFile]] = []

    def b_commits_first(dataset_uri, files, *args, **kwargs):
        if not a_files:  # A's first commit: its files are assembled, B commits now
            a_files.append(dict(files))
            b = _stamp(uri, 2, where="key % 2 = 1 AND key < 100", overwrite=True)
            assert b.rows_processed == 50 and b.commits == 1
        return real_replace(dataset_uri, files, *args, **kwargs)

    monkeypatch.setattr(writeback, "replace_column_files", b_commits_first)
    a = _stamp(uri, 1, where="key % 2 = 0", overwrite=True)
    assert a.rows_processed == 150
    # A's tasks wrote its files once (no parts to assemble from): the re-assembly
    # reads A's values back from them.
    assert all(f.file_name.startswith("lr-") for f in a_files[0].values()), a_files

    table = _sorted_table(uri)
    expected = [
        10 * k + (1 if k % 2 == 0 else 2 if k < 100 else 0) for k in table["key"].to_pylist()
    ]
    assert table["stamp"].to_pylist() == expected  # both jobs' rows survive
    history = [(e["operation"], e["details"].get("filter")) for e in job_history(uri)]
    assert [f for op, f in history if op == "DataReplacement"][-2:] == [
        "(key % 2 = 1 AND key < 100)",
        "(key % 2 = 0)",
    ], "B must commit between A's assembly and A's commit"
    # Only the fragment B changed was re-assembled; the others kept A's first files.
    final = {f.fragment_id: f for f in lance.dataset(uri).get_fragments()}
    ids = field_ids(lance.dataset(uri), ["stamp"])
    for fid, first in a_files[0].items():
        (path,) = column_files(final[fid], ids)
        if fid == 0:
            assert path != first.file_name
            assert not (Path(uri) / "data" / first.file_name).exists(), "superseded file kept"
        else:
            assert path == first.file_name


def _ratio_local(uri: str) -> object:
    return backfill(uri, udfs=["helpers:held_ratio"], unit_rows=UNIT_ROWS, executor="local")


def test_a_part_deleted_between_its_write_and_the_commit_fails_the_job(tmp_path, monkeypatch):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=300, fragments=3, seed=11)
    real_commit_ready = engine_run._Run._commit_ready
    lost: list[str] = []

    def lose_a_part(self):
        if not lost:
            lost.append(self.checkpoint.fragment_parts(1)[0][0])
            os.remove(lost[0])
        return real_commit_ready(self)

    monkeypatch.setattr(engine_run._Run, "_commit_ready", lose_a_part)
    with pytest.raises(JobFailed, match=r"^fragment 1: its checkpoint holds parts for 50 of"):
        _ratio_local(uri)
    ds = lance.dataset(uri)
    assert "ar_held" not in ds.schema.names or ds.to_table()["ar_held"].null_count == 300
    assert not [e for e in job_history(uri) if e["operation"] == "DataReplacement"]
    # The fragments' files, and the column files tasks wrote whole (still their record).
    before = {f.name for f in (Path(uri) / "data").iterdir() if not f.name.startswith("lr-")}
    assert len(before) == 3, "the failed assembly left a column file behind"

    monkeypatch.undo()
    report = _ratio_local(uri)  # the unit without its part is recomputed, the rest resumed
    assert report.rows_processed == 50 and report.rows_resumed == 250
    table = lance.dataset(uri).to_table(columns=["width", "height", "ar_held"])
    assert table["ar_held"].to_pylist() == _expected_ratio(table)


def test_a_unit_that_lost_its_records_fails_the_job_and_the_rerun_recomputes_it(
    tmp_path, monkeypatch
):
    """The stream ends cleanly but a unit's records never arrived: not taken as 0 rows."""
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=300, fragments=3, seed=12)
    real_records = executors.LocalExecutor.records

    def drop_fragment_2(self, groups, read_args, part_args):
        for records in real_records(self, groups, read_args, part_args):
            # Fragment 2 holds units 4 and 5 (100 rows per fragment, units of 50).
            yield records.filter(pa.array([u not in (4, 5) for u in records["unit"].to_pylist()]))

    monkeypatch.setattr(executors.LocalExecutor, "records", drop_fragment_2)
    with pytest.raises(
        JobFailed, match="^fragment 2: 0 rows were computed, but the job selects 100"
    ):
        _ratio_local(uri)
    assert not [e for e in job_history(uri) if e["operation"] == "DataReplacement"]

    monkeypatch.undo()
    # The rerun finds fragment 2's parts (a part's file is its record) and resumes them.
    report = _ratio_local(uri)
    assert report.rows_processed + report.rows_resumed == 300
    table = lance.dataset(uri).to_table(columns=["width", "height", "ar_held"])
    assert table["ar_held"].to_pylist() == _expected_ratio(table)


def test_accounting_counts_known_bad_rows_as_skipped(tmp_path):
    """An incremental rerun skips rows that failed before; that is not a mismatch."""
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=400, fragments=2, seed=13)
    first = backfill(uri, udfs=["helpers:fail_on_keys"], where="key < 300", executor="local",
                     max_error_fraction=0.5)  # fmt: skip
    assert first.rows_failed > 0
    again = backfill(uri, udfs=["helpers:fail_on_keys"], executor="local", max_error_fraction=0.5)
    assert again.rows_skipped_failed == first.rows_failed
    assert again.rows_processed == 100


# --- 4. periodic commits ---------------------------------------------------------------


def test_periodic_commits_publish_finished_fragments(tmp_path, ray_session):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=600, fragments=6, seed=8)
    report = backfill(
        uri,
        udfs=["helpers:held_ratio"],
        udf_params={"helpers:held_ratio": {"delay": 0.2}},
        unit_rows=UNIT_ROWS,
        commit_every_s=0,
    )
    replaced = [e for e in job_history(uri) if e["operation"] == "DataReplacement"]
    assert len(replaced) >= 2 and report.commits == len(replaced)
    committed = [f for e in replaced for f in e["details"]["fragments"]]
    assert sorted(committed) == [f.fragment_id for f in lance.dataset(uri).get_fragments()]
    # A reader of the first periodic commit sees its fragments' values, the rest null.
    first = replaced[0]
    for frag in lance.dataset(uri, version=first["version"]).get_fragments():
        table = frag.to_table(columns=["width", "height", "ar_held"])
        if frag.fragment_id in first["details"]["fragments"]:
            assert table["ar_held"].to_pylist() == _expected_ratio(table)
        else:
            assert table["ar_held"].null_count == table.num_rows
    final = lance.dataset(uri).to_table(columns=["width", "height", "ar_held"])
    assert final["ar_held"].to_pylist() == _expected_ratio(final)


def test_sigkill_after_a_periodic_commit_then_rerun_matches_clean_run(tmp_path, ray_session):
    uri, clean = _copies(tmp_path, rows=600, fragments=12, seed=8)
    cmd = _backfill_cmd(uri, "--commit-every", "0")

    def committed() -> list[dict]:
        return [e for e in job_history(uri) if e["operation"] == "DataReplacement"]

    proc = _start(cmd, _cli_env(delay=2.0), tmp_path / "run1.err")
    _wait_for(committed, 120, "the first periodic commit", proc)
    leftovers = _kill_session(proc)
    print(f"orphaned Ray processes killed after the driver: {leftovers}")
    partial = lance.dataset(uri).to_table(columns=["ar_slow"])["ar_slow"]
    assert 0 < partial.null_count < 600, "the kill should land between periodic commits"

    # The same job (same fingerprint) rerun in-process on the session Ray.
    report = backfill(uri, udfs=["helpers:slow_ratio"], unit_rows=UNIT_ROWS, commit_every_s=0)
    assert report.rows_processed <= partial.null_count  # committed rows were not recomputed
    backfill(clean, udfs=["helpers:slow_ratio"], unit_rows=UNIT_ROWS)
    _assert_same_table(uri, clean)


# --- 5. not rebaseable ------------------------------------------------------------------


def test_compaction_before_commit_fails_cleanly_and_rerun_recovers(tmp_path, ray_session):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=400, fragments=8, seed=9)
    gate = tmp_path / "gate"
    cmd = _backfill_cmd(uri, "--param", f"helpers:held_ratio.gate={gate}", udf="helpers:held_ratio")
    # Attach to the session Ray: this test needs a real exit code, not its own cluster.
    env = {**_cli_env(), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = _start(cmd, env, tmp_path / "run.err")
    _wait_for(lambda: (job := _job(uri)) and job.load_manifest(), 120, "the plan", proc)
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=1000)
    before = _sorted_table(uri)
    assert len(lance.dataset(uri).get_fragments()) == 1
    gate.touch()

    # Another writer stopped the job: a failed job (exit 1), not bad input (2).
    assert proc.wait(timeout=180) == 1
    err = (tmp_path / "run.err").read_text()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("laion-ray: failed:")]
    assert len(errors) == 1 and "rewritten by another writer" in errors[0], err[-2000:]
    after = _sorted_table(uri)
    assert after.num_rows == 400
    for name in before.column_names:
        assert after[name].equals(before[name]), name
    # At most the (all-null) column, added before the failed commit, is new.
    assert set(after.column_names) - set(before.column_names) <= {"ar_held"}
    if "ar_held" in after.column_names:
        assert after["ar_held"].null_count == 400

    report = backfill(
        uri,
        udfs=["helpers:held_ratio"],
        udf_params={"helpers:held_ratio": {"gate": str(gate)}},
        unit_rows=UNIT_ROWS,
    )
    assert report.rows_processed == 400
    table = lance.dataset(uri).to_table(columns=["width", "height", "ar_held"])
    assert table["ar_held"].to_pylist() == _expected_ratio(table)
