"""Run a planned job: stream units through Ray Data, checkpoint, commit.

Every job that writes columns (``backfill``, ``merge``) is a :class:`Job`: the
columns to read, a ``transform`` from the unit stream to output columns, and
the output schema. This module owns everything after that: checkpoints and
resume, the error gate, periodic commits, tags and the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.cluster import format_stages
from laion_ray.error_log import checkpoint_root, failed_keys_by_fragment, record_errors
from laion_ray.errors import LaionRayError
from laion_ray.ray_env import ray_attached
from laion_ray.storage import filesystem, open_dataset
from laion_ray.udf import TASK_CPUS

from . import checkpoint as ckpt
from .assemble import assemble_fragment
from .commit import UDF_METADATA, add_columns, check_unchanged, replace_column_files
from .plan import (
    ROWADDR,
    WorkUnit,
    default_unit_rows,
    error_column_name,
    fragment_states,
    job_fingerprint_of,
    reads_binary,
    split_units,
)
from .progress import Progress
from .stages import MAX_RETRIES

log = logging.getLogger(__name__)

MIN_ROWS_FOR_ERROR_GATE = 1000
COMMIT_EVERY_S = 300.0
LEDGER_FLUSH_S = 2.0
KEY = "key"


@dataclasses.dataclass
class Job:
    """A column-writing job, independent of how its values are computed.

    Attributes:
        uri: The dataset.
        name: Shown in progress and recorded in the commit history.
        identity: What the job computes; with the options it keys the checkpoint.
        read_columns: Dataset columns the transform needs.
        outputs: Stored output columns; field metadata names their producer.
        producers: Stage names that may record row errors.
        transform: Maps the Ray Dataset of unit rows to one that adds the
            outputs and ``_error:<producer>`` columns (and may add ``_keep``);
            None for a job built to run only in this process.
        local_transform: The same as a plain function of one unit's table,
            when the job can run without Ray; see :func:`choose_executor`.
        where: Optional SQL filter on the rows to compute.
        overwrite: Whether existing output columns may be replaced.
        details: Extra facts for the commit history (UDF keys, parameters).
        stage_report: What ran where so far, one dict per stage (resources
            requested, peak actors, nodes, devices; see :mod:`laion_ray.cluster`);
            recorded in the report and each commit's details.
    """

    uri: str
    name: str
    identity: str
    read_columns: list[str]
    outputs: pa.Schema
    producers: list[str]
    transform: Callable[[Any], Any] | None
    local_transform: Callable[[pa.Table], pa.Table] | None = None
    where: str | None = None
    overwrite: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    stage_report: Callable[[], list[dict[str, Any]]] | None = None


@dataclasses.dataclass
class JobReport:
    """What a job did; ``--report FILE`` writes it as JSON."""

    uri: str
    job: str
    columns: list[str]
    version: int | None = None
    rows_processed: int = 0
    rows_failed: int = 0
    rows_resumed: int = 0
    rows_skipped_failed: int = 0
    units_total: int = 0
    units_resumed: int = 0
    fragments_committed: int = 0
    commits: int = 0
    elapsed_s: float = 0.0
    tag: str | None = None
    executor: str = "ray"
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows_processed / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows_per_s": round(self.rows_per_s, 1)}

    def summary(self) -> str:
        return (
            f"{self.job}: {self.rows_processed} rows processed, {self.rows_failed} failed, "
            f"{self.rows_resumed} resumed from checkpoints, {self.rows_skipped_failed} known-bad "
            f"skipped; {self.fragments_committed} fragments committed in {self.commits} commits; "
            f"{self.elapsed_s:.1f}s ({self.rows_per_s:,.0f} rows/s, {self.executor} executor); "
            f"version {self.version}"
            + (f", tagged {self.tag}" if self.tag else "")
            + "".join("\n" + line for line in format_stages(self.stages))
        )


def classify_outputs(
    ds: lance.LanceDataset, outputs: pa.Schema, *, overwrite: bool
) -> tuple[list[str], list[str], list[str]]:
    """Split outputs into (new, overwritten, incremental) columns.

    An existing column is ours to fill incrementally when its metadata names
    the same producer; otherwise it needs ``overwrite`` and the same type.
    """
    new, overwritten, incremental = [], [], []
    for field in outputs:
        if field.name not in ds.schema.names:
            new.append(field.name)
            continue
        existing = ds.schema.field(field.name)
        if overwrite:
            if existing.type != field.type:
                raise LaionRayError(
                    f"cannot overwrite column {field.name!r} of type {existing.type} "
                    f"with values of type {field.type}"
                )
            overwritten.append(field.name)
        elif (existing.metadata or {}).get(UDF_METADATA) == (field.metadata or {}).get(
            UDF_METADATA
        ):
            incremental.append(field.name)
        else:
            raise LaionRayError(
                f"column {field.name!r} already exists in {ds.uri}; pass --overwrite to replace it"
            )
    return new, overwritten, incremental


def _row_filter(where: str | None, incremental: Sequence[str]) -> str | None:
    lacking = " OR ".join(f"`{c}` IS NULL" for c in incremental)
    parts = [f"({p})" for p in (where, lacking) if p]
    return " AND ".join(parts) or None


def _stale_reason(
    manifest: dict, ds: lance.LanceDataset, read_columns: Sequence[str]
) -> str | None:
    if ds.version < manifest["read_version"]:
        return f"dataset version {ds.version} is older than the checkpoint's"
    current = {s.fragment_id: s for s in fragment_states(ds, read_columns)}
    for state in ckpt.states_from_json(manifest["fragments"]):
        if current.get(state.fragment_id) != state:
            return f"fragment {state.fragment_id} changed since the checkpoint was written"
    return None


LOCAL_MAX_ROWS = 4_000_000
LOCAL_THREADS = min(4, os.cpu_count() or 1)


def choose_executor(
    executor: str, *, can_run_local: bool, planned_rows: int, narrow: bool, ray_attached: bool
) -> bool:
    """Whether to run in this process (``True``) or on Ray Data.

    ``auto`` runs locally only what Ray cannot speed up: jobs that can run
    in-process at all (function UDFs, a broadcast merge) over narrow columns of
    at most ``LOCAL_MAX_ROWS`` rows, with no cluster named and no Ray already
    started here; seconds of Ray start-up and scheduling would dwarf
    milliseconds of work. Everything else, and every cluster run, goes to Ray.
    """
    if executor not in ("auto", "ray", "local"):
        raise LaionRayError(f"--executor must be auto, ray or local, got {executor!r}")
    if executor == "local" and not can_run_local:
        raise LaionRayError(
            "--executor local runs function UDFs and broadcast merges only; this job needs Ray"
        )
    if executor != "auto":
        return executor == "local"
    return can_run_local and narrow and planned_rows <= LOCAL_MAX_ROWS and not ray_attached


def run_job(
    job: Job,
    *,
    retry_errors: bool = False,
    max_error_fraction: float = 0.01,
    tag: str | None = None,
    unit_rows: int | None = None,
    commit_every_s: float = COMMIT_EVERY_S,
    checkpoint_uri: str | None = None,
    report_path: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    address: str | None = None,
    executor: str = "auto",
) -> JobReport:
    """Plan (or resume) ``job``, run it and commit its columns fragment by fragment.

    ``executor`` is ``ray`` (Ray Data), ``local`` (this process) or ``auto``
    (see :func:`choose_executor`); both use the same checkpoints and commits.
    """
    if not 0 <= max_error_fraction <= 1:
        raise LaionRayError(f"--max-error-fraction must be in [0, 1], got {max_error_fraction}")
    if unit_rows is not None and unit_rows < 1:
        raise LaionRayError(f"--unit-rows must be >= 1, got {unit_rows}")
    ds = open_dataset(job.uri, storage_options=storage_options)
    new, overwritten, incremental = classify_outputs(ds, job.outputs, overwrite=job.overwrite)
    root = checkpoint_root(job.uri, checkpoint_uri)
    fingerprint = job_fingerprint_of(
        job.identity,
        uri=job.uri,
        where=job.where,
        overwrite=job.overwrite,
        retry=retry_errors,
        parts=ckpt.PART_FORMAT,
    )
    checkpoint = ckpt.JobCheckpoint(root, fingerprint, storage_options)
    manifest = checkpoint.load_manifest()
    if manifest is not None and (reason := _stale_reason(manifest, ds, job.read_columns)):
        log.warning("discarding stale checkpoint %s: %s", fingerprint, reason)
        checkpoint.remove()
        manifest = None
    resumed = manifest is not None
    if manifest is None:
        manifest = {
            "uri": job.uri,
            "read_version": ds.version,
            "filter": _row_filter(job.where, incremental),
            "unit_rows": unit_rows or default_unit_rows(job.read_columns, ds.schema),
            "fragments": ckpt.states_to_json(fragment_states(ds, job.read_columns)),
            "new_fields": new,
            "overwrite": overwritten,
            "committed": [],
        }
        checkpoint.save_manifest(manifest)
    else:
        log.info("resuming job %s from its checkpoint", fingerprint)
    planned_rows = sum(f["physical_rows"] for f in manifest["fragments"])
    narrow = not reads_binary(job.read_columns, ds.schema)
    local = choose_executor(
        executor,
        can_run_local=job.local_transform is not None,
        planned_rows=planned_rows,
        narrow=narrow,
        ray_attached=ray_attached(address),
    )
    run = _Run(job, manifest, checkpoint, root, storage_options, max_error_fraction, local, resumed)
    report = run.execute(retry_errors, commit_every_s, address)
    if tag:
        latest = open_dataset(job.uri, storage_options=storage_options)
        if tag in latest.tags.list():
            latest.tags.update(tag, latest.version)
        else:
            latest.tags.create(tag, latest.version)
        report.tag = tag
    checkpoint.remove()
    if report_path:
        fs, path = filesystem(report_path)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(report.to_dict(), indent=2).encode())
    log.info("%s", report.summary())
    return report


class _Run:
    """One execution of a planned job: stream units, checkpoint, commit."""

    def __init__(
        self, job: Job, manifest, checkpoint, root, storage_options, max_errors, local, resumed
    ):
        self.job, self.manifest, self.checkpoint, self.root = job, manifest, checkpoint, root
        self.local, self.resumed = local, resumed
        self.storage_options = dict(storage_options or {})
        self.max_errors = max_errors
        self.states = {s.fragment_id: s for s in ckpt.states_from_json(manifest["fragments"])}
        self.units = split_units(list(self.states.values()), manifest["unit_rows"])
        self.units_by_fragment: dict[int, list[WorkUnit]] = defaultdict(list)
        for unit in self.units:
            self.units_by_fragment[unit.fragment_id].append(unit)
        self.committed: set[int] = set(manifest["committed"])
        self.done = ckpt.finished_units(checkpoint.records())
        self.report = JobReport(
            uri=job.uri,
            job=job.name,
            columns=job.outputs.names,
            units_total=len(self.units),
            units_resumed=len(self.done),
            rows_resumed=sum(u.rows for u in self.done.values()),
            executor="local" if local else "ray",
        )
        self.errors_before = sum(u.errors for u in self.done.values())
        self.columns_ready = False
        self.started = time.monotonic()

    def execute(self, retry_errors: bool, commit_every_s: float, address) -> JobReport:
        self.retry_errors = retry_errors
        todo = [
            u
            for u in self.units
            if u.index not in self.done and u.fragment_id not in self.committed
        ]
        skip_keys = (
            {}
            if retry_errors
            else failed_keys_by_fragment(self.root, self.job.producers, self.storage_options)
        )
        self.report.rows_skipped_failed = sum(
            len(v) for f, v in skip_keys.items() if f in self.states
        )
        if todo:
            self._stream(todo, skip_keys, commit_every_s, address)
        # The stream ended cleanly, so every unit without records read no rows.
        for unit in todo:
            self.done.setdefault(unit.index, ckpt.FinishedUnit(unit.index, [], 0, 0))
        self._check_errors(final=True)
        self._commit_ready(address)
        self.report.stages = self._stages().get("stages", [])
        self.report.elapsed_s = time.monotonic() - self.started
        self.report.version = open_dataset(
            self.job.uri, storage_options=self.storage_options
        ).version
        return self.report

    def _stages(self) -> dict[str, list[dict[str, Any]]]:
        """What ran where, for the report and the commit details (empty when local)."""
        if self.local or self.job.stage_report is None:
            return {}
        stages = self.job.stage_report()
        return {"stages": stages} if stages else {}

    def _part_args(self) -> dict:
        columns = [
            ROWADDR,
            *([KEY] if KEY in self.job.read_columns else []),
            *self.job.outputs.names,
            *(error_column_name(p) for p in self.job.producers),
        ]
        return dict(
            job_uri=self.checkpoint.uri,
            run_id=uuid.uuid4().hex,
            columns=columns,
            storage_options=self.storage_options,
        )

    def _read_args(self, unit: WorkUnit, skip_keys) -> tuple:
        return (
            self.job.uri,
            self.manifest["read_version"],
            unit,
            self.job.read_columns,
            self.manifest["filter"],
            skip_keys.get(unit.fragment_id, ()),
            self.storage_options,
        )

    def _ray_records(self, todo, skip_keys, address):
        """Ledger records from the Ray Data pipeline: read -> transform -> parts."""
        import ray

        from laion_ray.ray_env import ensure_ray, reclaim_expired_reservations

        from .datasource import UnitDatasource

        ensure_ray(address)
        if self.resumed:  # an earlier driver of this job may have died holding the cluster
            reclaim_expired_reservations()
        source = UnitDatasource([self._read_args(u, skip_keys) for u in todo])
        # Ray 2.60 has no named max_retries for reads yet; ray_remote_args warns.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        read = ray.data.read_datasource(
            source,
            num_cpus=TASK_CPUS,
            override_num_blocks=len(todo),  # one block per unit: no re-splitting
            ray_remote_args={"max_retries": MAX_RETRIES},
        )
        data = self.job.transform(read).map_batches(
            ckpt.write_parts,
            fn_kwargs=self._part_args(),
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=TASK_CPUS,  # same resources as the read: they fuse into one task
            max_retries=MAX_RETRIES,
        )
        return data.iter_batches(batch_size=None, batch_format="pyarrow")

    def _local_records(self, todo, skip_keys):
        """The same steps in this process: no Ray start, no scheduling.

        Units run on a few threads: Lance reads, Arrow and numpy release the GIL.
        """
        from .source import read_unit

        part_args = self._part_args()

        def run_unit(unit: WorkUnit) -> pa.Table | None:
            table = read_unit(*self._read_args(unit, skip_keys))
            if not table.num_rows:
                return None
            return ckpt.write_parts(self.job.local_transform(table), **part_args)

        pool = ThreadPoolExecutor(LOCAL_THREADS, thread_name_prefix="laion-ray-unit")
        try:
            for records in pool.map(run_unit, todo):
                if records is not None:
                    yield records
        finally:
            pool.shutdown(cancel_futures=True)

    def _stream(self, todo, skip_keys, commit_every_s, address) -> None:
        records_stream = (
            self._local_records(todo, skip_keys)
            if self.local
            else self._ray_records(todo, skip_keys, address)
        )
        progress = Progress(
            self.job.name, sum(u.end - u.start for u in todo), len(self.units), len(self.done)
        )
        in_run: dict[tuple[int, str], list[dict]] = defaultdict(list)
        pending: list[pa.Table] = []
        last_flush = last_commit = time.monotonic()
        try:
            for records in records_stream:
                pending.append(records)
                finished_now = 0
                for rec in records.to_pylist():
                    self.report.rows_processed += rec["rows"]
                    self.report.rows_failed += rec["errors"]
                    runs = in_run[(rec["unit"], rec["run"])]
                    runs.append(rec)
                    unit = ckpt.finished_units(runs)
                    if rec["unit"] in unit and rec["unit"] not in self.done:
                        self.done[rec["unit"]] = unit[rec["unit"]]
                        finished_now += 1
                progress.update(
                    pc.sum(records["rows"]).as_py() or 0,
                    pc.sum(records["errors"]).as_py() or 0,
                    finished_now,
                )
                now = time.monotonic()
                if now - last_flush >= LEDGER_FLUSH_S or now - last_commit >= commit_every_s:
                    self.checkpoint.append(pa.concat_tables(pending))
                    pending, last_flush = [], now
                self._check_errors(final=False)
                if now - last_commit >= commit_every_s:
                    self._commit_ready(address)
                    last_commit = time.monotonic()
        finally:
            if pending:
                self.checkpoint.append(pa.concat_tables(pending))
            progress.close()
        log.info("%s", progress.line())

    def _check_errors(self, *, final: bool) -> None:
        rows = self.report.rows_processed + self.report.rows_resumed
        errors = self.report.rows_failed + self.errors_before
        if rows and (final or rows >= MIN_ROWS_FOR_ERROR_GATE) and errors / rows > self.max_errors:
            raise LaionRayError(
                f"{errors} of {rows} rows failed ({errors / rows:.1%}), above "
                f"--max-error-fraction {self.max_errors}; nothing more was committed. "
                "Finished work is checkpointed: fix the input or raise the limit and rerun"
            )

    def _commit_ready(self, address) -> None:
        ready = [
            f
            for f, units in self.units_by_fragment.items()
            if f not in self.committed and all(u.index in self.done for u in units)
        ]
        if not ready:
            return
        with_rows = [
            f for f in ready if any(self.done[u.index].rows for u in self.units_by_fragment[f])
        ]
        if with_rows:
            details = {
                **self.job.details,
                "filter": self.manifest["filter"],
                "overwrite": self.manifest["overwrite"],
                "rows_processed": self.report.rows_processed + self.report.rows_resumed,
                "rows_failed": self.report.rows_failed + self.errors_before,
                "elapsed_s": round(time.monotonic() - self.started, 1),
                "fragments": sorted(with_rows),
                **self._stages(),
            }
            if not self.columns_ready:
                new = [f for f in self.job.outputs if f.name in self.manifest["new_fields"]]
                if new:
                    add_columns(
                        self.job.uri,
                        new,
                        job=self.job.name,
                        details=details,
                        storage_options=self.storage_options,
                    )
                self.columns_ready = True
            assembled = self._assemble(with_rows, address)
            replace_column_files(
                self.job.uri,
                {a.fragment_id: a.file_name for a in assembled},
                self.states,
                job=self.job.name,
                details=details,
                storage_options=self.storage_options,
            )
            record_errors(
                self.root,
                pa.concat_tables([a.errors for a in assembled]),
                job=self.checkpoint.fingerprint,
                replace_fragments=with_rows if self.retry_errors else (),
                udfs=self.job.producers,
                storage_options=self.storage_options,
            )
            self.report.commits += 1
            self.report.fragments_committed += len(with_rows)
        self.committed.update(ready)
        self.manifest["committed"] = sorted(self.committed)
        self.checkpoint.save_manifest(self.manifest)

    def _assemble(self, fragments: Sequence[int], address):
        latest = open_dataset(self.job.uri, storage_options=self.storage_options)
        for f in fragments:  # fail fast, before any work, if a fragment was rewritten
            check_unchanged(latest, f, self.states[f].physical_rows)
        args = [
            (
                self.job.uri,
                f,
                [(u, self.done[u.index].paths) for u in self.units_by_fragment[f]],
                self.states[f].physical_rows,
                self.job.outputs,
                self.manifest["new_fields"],
                self.storage_options,
            )
            for f in fragments
        ]
        if self.local:
            with ThreadPoolExecutor(LOCAL_THREADS) as pool:
                return list(pool.map(lambda a: assemble_fragment(*a), args))
        import ray

        from laion_ray.ray_env import ensure_ray

        ensure_ray(address)
        task = ray.remote(num_cpus=0.5)(assemble_fragment)
        refs = [task.remote(*a) for a in args]
        # Collect every result so no failure is left unhandled in Ray's log.
        results, failure = [], None
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return results
