"""Run a planned job: stream units through Ray Data, checkpoint, commit.

Every job that writes columns (``backfill``, ``merge``) is a :class:`Job`: the
columns to read, a ``transform`` from the unit stream to output columns, and
the output schema. This module owns everything after that: checkpoints and
resume, the error gate, periodic commits, tags and the report.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import logging
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.cluster import format_stages
from laion_ray.error_log import (
    checkpoint_root,
    describe_errors,
    failed_keys_by_fragment,
    read_part_errors,
    record_errors,
)
from laion_ray.errors import JobFailed, LaionRayError, SystemicError
from laion_ray.ray_env import ray_attached
from laion_ray.storage import cached_dataset, filesystem, open_dataset
from laion_ray.udf import TASK_CPUS

from . import checkpoint as ckpt
from .assemble import MissingPart, assemble_fragment
from .commit import (
    UDF_METADATA,
    add_columns,
    check_unchanged,
    delete_data_file,
    replace_column_files,
    tag_version,
)
from .lease import JobLease
from .plan import (
    ROWADDR,
    UnitPlan,
    WorkUnit,
    default_unit_rows,
    error_column_name,
    fragment_states,
    job_fingerprint_of,
    reads_binary,
)
from .progress import Progress
from .stages import CANARY_ROWS, MAX_RETRIES, WHAT_TO_DO

log = logging.getLogger(__name__)

MIN_ROWS_FOR_ERROR_GATE = 1000
COMMIT_EVERY_S = 300.0
KEY = "key"
# Ray Data builds (and ray.puts) every read task before it runs any, so units go
# to it in waves: WAVE_ROUNDS read tasks per read slot of the cluster, within
# [WAVE_MIN_UNITS, WAVE_MAX_UNITS] units. Driver memory is bounded by one wave.
WAVE_ROUNDS = 16
WAVE_MIN_UNITS = 2048
WAVE_MAX_UNITS = 32768
# Units smaller than a task's worth of rows are read in runs of up to this many
# per Ray task (see _Run._task_groups); the bound keeps waves many tasks wide.
MAX_UNITS_PER_TASK = 64


class AccountingError(JobFailed):
    """The rows a job computed for a fragment are not the rows it selects."""


# Failed rows read back from checkpoint parts to show what the gate saw; the
# driver remembers at most this many parts with errors, so it stays O(1).
EVIDENCE_PARTS = 256
EVIDENCE_ROWS = 10_000


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
        per_unit: Whether ``transform`` maps each unit's rows on their own, so
            units can reach it in waves; False for a transform that joins the
            whole stream at once (a shuffle), which then gets every unit.
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
    per_unit: bool = True
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
    # One driver per job: a second one exits here, before it touches the checkpoint.
    with JobLease(root, fingerprint, storage_options) as lease:
        return _run_leased(
            job, lease, ds, root, fingerprint, new, overwritten, incremental,
            retry_errors=retry_errors, max_error_fraction=max_error_fraction, tag=tag,
            unit_rows=unit_rows, commit_every_s=commit_every_s, report_path=report_path,
            storage_options=storage_options, address=address, executor=executor,
        )  # fmt: skip


def _run_leased(
    job, lease, ds, root, fingerprint, new, overwritten, incremental, *, retry_errors,
    max_error_fraction, tag, unit_rows, commit_every_s, report_path, storage_options, address,
    executor,
) -> JobReport:  # fmt: skip
    """:func:`run_job` once this driver holds the job's lease."""
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
    run.lease = lease
    # A Ray task reads at least a default unit's worth of bytes, however small the units.
    task_units = default_unit_rows(job.read_columns, ds.schema) // manifest["unit_rows"]
    run.units_per_task = min(MAX_UNITS_PER_TASK, max(1, task_units))
    report = run.execute(retry_errors, commit_every_s, address)
    if tag:
        latest = open_dataset(job.uri, storage_options=storage_options)
        tag_version(job.uri, tag, latest.version, storage_options=storage_options)
        report.tag = tag
    lease.check()
    checkpoint.remove()
    if report_path:
        fs, path = filesystem(report_path)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(report.to_dict(), indent=2).encode())
    log.debug("%s", report.summary())  # callers print it; the CLI does
    return report


class _Run:
    """One execution of a planned job: stream units, checkpoint, commit.

    Driver state is O(fragments): units come lazily from a :class:`UnitPlan`,
    finished ones are one byte each in a :class:`~.checkpoint.UnitLedger`, and
    a part's record is dropped once its unit is finished (the part file itself
    is the durable record).
    """

    def __init__(
        self, job: Job, manifest, checkpoint, root, storage_options, max_errors, local, resumed
    ):
        self.job, self.manifest, self.checkpoint, self.root = job, manifest, checkpoint, root
        self.local, self.resumed = local, resumed
        self.storage_options = dict(storage_options or {})
        self.max_errors = max_errors
        self.plan = UnitPlan(ckpt.states_from_json(manifest["fragments"]), manifest["unit_rows"])
        self.error_parts: list[str] = []  # parts with failed rows: the gate's evidence
        self.states = {s.fragment_id: s for s in self.plan.states}
        self.ledger = ckpt.UnitLedger(self.plan)
        self.committed: set[int] = set()
        if resumed:
            self._load_checkpoint()
        self.report = JobReport(
            uri=job.uri,
            job=job.name,
            columns=job.outputs.names,
            units_total=self.plan.total,
            units_resumed=self.ledger.units_done,
            rows_resumed=int(self.ledger.rows.sum()),
            executor="local" if local else "ray",
        )
        self.errors_before = int(self.ledger.errors.sum())
        self.known_bad: dict = {}
        self.columns_ready = False
        self.lease: JobLease | None = None  # set by run_job; checked before every commit
        self.units_per_task = 1  # set by run_job from the read columns' width
        self.started = time.monotonic()
        # Parts whose every row failed, kept until the canary settles: if it
        # finds a systemic failure they are deleted, so a rerun recomputes them.
        self.held: list[str] = []
        self.canary_settled = False

    def _load_checkpoint(self) -> None:
        """Committed summaries, then the parts of uncommitted fragments."""
        for fragment_id, (rows, errors) in self.checkpoint.committed().items():
            if fragment_id in self.states:
                self.ledger.add_fragment(fragment_id, rows, errors)
                self.committed.add(fragment_id)
        pending = [
            f
            for f in self.checkpoint.fragments_with_parts()
            if f in self.states and f not in self.committed
        ]
        # One listing per fragment with parts; several at once on an object store.
        with ThreadPoolExecutor(LOCAL_THREADS * 2) as pool:
            for parts in pool.map(self.checkpoint.fragment_parts, pending):
                for unit in ckpt.finished_units(parts).values():
                    self.ledger.add(unit.unit, unit.rows, unit.errors)
                room = EVIDENCE_PARTS - len(self.error_parts)
                self.error_parts += [path for path, rec in parts if rec["errors"]][: max(room, 0)]

    def execute(self, retry_errors: bool, commit_every_s: float, address) -> JobReport:
        self.retry_errors = retry_errors
        if not retry_errors:
            self.known_bad = failed_keys_by_fragment(
                self.root, self.job.producers, self.storage_options
            )
        self.report.rows_skipped_failed = sum(
            len(v.keys) for f, v in self.known_bad.items() if f in self.states
        )
        if self.ledger.units_done < self.plan.total:
            self._stream(commit_every_s, address)
        # The stream ended cleanly, so every unit without records read no rows.
        for unit in self._todo():
            self.ledger.add(unit.index, 0, 0)
        self._check_errors(final=True)
        self._commit_ready(address)
        self.report.stages = self._stages().get("stages", [])
        self.report.elapsed_s = time.monotonic() - self.started
        self.report.version = open_dataset(
            self.job.uri, storage_options=self.storage_options
        ).version
        return self.report

    def _todo(self) -> Iterator[WorkUnit]:
        """Units not finished yet, generated as they are needed."""
        for state in self.plan.states:
            if state.fragment_id in self.committed or self.ledger.finished(state.fragment_id):
                continue
            for unit in self.plan.units(state.fragment_id):
                if not self.ledger.done[unit.index]:
                    yield unit

    def _rows_todo(self) -> int:
        return sum(
            u.end - u.start
            for s in self.plan.states
            if not self.ledger.finished(s.fragment_id)
            for u in self.plan.units(s.fragment_id)
            if not self.ledger.done[u.index]
        )

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
            run_id=uuid.uuid4().hex[:16],
            columns=columns,
            storage_options=self.storage_options,
        )

    def _read_args(self, units: list[WorkUnit]) -> tuple:
        """``read_units``'s arguments for consecutive units of one fragment."""
        known_bad = self.known_bad.get(units[0].fragment_id)
        return (
            self.job.uri,
            self.manifest["read_version"],
            units,
            self.job.read_columns,
            self.manifest["filter"],
            known_bad.keys_in(units[0].start, units[-1].end) if known_bad else (),
            self.storage_options,
        )

    def _wave_tasks(self) -> int | None:
        """Read tasks per Ray Data execution (None: all at once), sized by the cluster."""
        if not self.job.per_unit:
            return None
        import ray

        slots = ray.cluster_resources().get("CPU", 1.0) / TASK_CPUS
        units = min(WAVE_MAX_UNITS, max(WAVE_MIN_UNITS, WAVE_ROUNDS * slots * self.units_per_task))
        return max(1, int(units) // self.units_per_task)

    def _ray_records(self, address) -> Iterator[pa.Table]:
        """Part records from Ray Data pipelines (read -> transform -> parts), one per wave."""
        import ray

        from laion_ray.ray_env import ensure_ray, reclaim_expired_reservations

        from .datasource import UnitDatasource

        ensure_ray(address)
        if self.resumed:  # an earlier driver of this job may have died holding the cluster
            reclaim_expired_reservations()
        # Ray 2.60 has no named max_retries for reads yet; ray_remote_args warns.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        part_args = self._part_args()
        groups, per_wave = self._task_groups(), self._wave_tasks()
        while wave := list(itertools.islice(groups, per_wave)):
            source = UnitDatasource([self._read_args(group) for group in wave])
            read = ray.data.read_datasource(
                source,
                num_cpus=TASK_CPUS,
                override_num_blocks=len(wave),  # one block per group: no re-splitting
                ray_remote_args={"max_retries": MAX_RETRIES},
            )
            # A stage's own error (SystemicError naming the stage), not Ray Data's
            # UserCodeException, whose pickled form loses the cause.
            read.context.raise_original_map_exception = True
            data = self.job.transform(read).map_batches(
                ckpt.write_parts,
                fn_kwargs=part_args,
                batch_size=None,
                batch_format="pyarrow",
                num_cpus=TASK_CPUS,  # same resources as the read: they fuse into one task
                max_retries=MAX_RETRIES,
            )
            yield from data.iter_batches(batch_size=None, batch_format="pyarrow")

    def _task_groups(self) -> Iterator[list[WorkUnit]]:
        """Todo units in runs of up to ``units_per_task`` adjacent units of one
        fragment, one Ray task each: units smaller than a task's worth of rows
        refine the checkpoint without multiplying Ray's per-task cost (tens of
        ms on a small machine, more than a small unit's work). A finished unit
        breaks a run (a resumed job must not read it again)."""
        group: list[WorkUnit] = []
        for unit in self._todo():
            if group and (
                unit.index != group[-1].index + 1
                or unit.fragment_id != group[0].fragment_id
                or len(group) == self.units_per_task
            ):
                yield group
                group = []
            group.append(unit)
        if group:
            yield group

    def _local_records(self) -> Iterator[pa.Table]:
        """The same steps in this process: no Ray start, no scheduling.

        Groups of units (as the Ray tasks get them) run on a few threads: Lance
        reads, Arrow and numpy release the GIL. At most two groups per thread
        are queued, so memory does not grow with the job.
        """
        from .source import read_units

        part_args = self._part_args()

        def run_group(group: list[WorkUnit]) -> pa.Table | None:
            table = read_units(*self._read_args(group))
            if not table.num_rows:
                return None
            return ckpt.write_parts(self.job.local_transform(table), **part_args)

        pool = ThreadPoolExecutor(LOCAL_THREADS, thread_name_prefix="laion-ray-unit")
        queued: collections.deque = collections.deque()
        try:
            for group in self._task_groups():
                queued.append(pool.submit(run_group, group))
                while len(queued) >= 2 * LOCAL_THREADS or (queued and queued[0].done()):
                    if (records := queued.popleft().result()) is not None:
                        yield records
            while queued:
                if (records := queued.popleft().result()) is not None:
                    yield records
        finally:
            pool.shutdown(cancel_futures=True)

    def _stream(self, commit_every_s, address) -> None:
        records_stream = self._local_records() if self.local else self._ray_records(address)
        progress = Progress(
            self.job.name, self._rows_todo(), self.plan.total, self.ledger.units_done
        )
        tally = ckpt.UnitTally()
        last_commit = time.monotonic()
        stream = iter(records_stream)
        try:
            for records in stream:
                self._note_failed(records)
                finished_now = 0
                for rec in records.to_pylist():
                    self.report.rows_processed += rec["rows"]
                    self.report.rows_failed += rec["errors"]
                    if self.ledger.done[rec["unit"]]:
                        continue  # a retried task's duplicate
                    unit = tally.add(rec)
                    if unit is not None and self.ledger.add(unit.unit, unit.rows, unit.errors):
                        tally.forget(unit.unit)
                        finished_now += 1
                progress.update(
                    pc.sum(records["rows"]).as_py() or 0,
                    pc.sum(records["errors"]).as_py() or 0,
                    finished_now,
                )
                self._check_errors(final=False)
                if time.monotonic() - last_commit >= commit_every_s:
                    self._commit_ready(address)
                    last_commit = time.monotonic()
        except Exception as exc:
            cause = _root_failure(exc, self.job.name)
            if cause is exc:
                raise
            raise cause from exc
        finally:
            # Stops Ray Data's executor now, not when the iterator is collected.
            getattr(stream, "close", lambda: None)()
            progress.close()
        log.info("%s", progress.line())

    # --- failures: evidence, the canary, held parts ------------------------
    def _part_path(self, rec: dict) -> str:
        fragment_id = self.plan.states[self.plan.fragment_of(rec["unit"])].fragment_id
        return self.checkpoint.part_path(fragment_id, rec)

    def _note_failed(self, records: pa.Table) -> None:
        """Note parts with failed rows as evidence, and hold those whose every
        row failed until the canary has settled."""
        for rec in records.filter(pc.greater(records["errors"], 0)).to_pylist():
            if len(self.error_parts) < EVIDENCE_PARTS:
                self.error_parts.append(self._part_path(rec))
            if rec["errors"] == rec["rows"] and not self.canary_settled:
                self.held.append(self._part_path(rec))

    def _evidence(self) -> pa.Table:
        return read_part_errors(self.error_parts, self.storage_options, limit=EVIDENCE_ROWS)

    def _canary(self, rows: int, errors: int) -> None:
        """Stop the job when every row so far (at least ``CANARY_ROWS``) failed
        with one error type.

        Stages check this per block; here it covers many small blocks. Not when
        rows that failed before are retried: they may fail alike again.
        """
        if self.canary_settled or self.retry_errors or rows < CANARY_ROWS:
            return
        self.canary_settled = True  # settled either way: it is read once
        held, self.held = self.held, []
        if errors < rows:
            return
        evidence = self._evidence()
        kinds = set(evidence["error_type"].to_pylist())
        if len(kinds) == 1:
            first = evidence.slice(0, 1).to_pylist()[0]
            for path in held:  # not bad data: a rerun must compute these rows again
                self.checkpoint.delete_part(path)
            raise SystemicError(
                f"{first['udf']}: every row failed with {first['error_type']}: "
                f"{first['message'][:200]} — this looks like an environment or UDF problem, "
                f"not bad data; {WHAT_TO_DO}"
            )

    def _check_errors(self, *, final: bool) -> None:
        rows = self.report.rows_processed + self.report.rows_resumed
        errors = self.report.rows_failed + self.errors_before
        self._canary(rows, errors)
        if rows and (final or rows >= MIN_ROWS_FOR_ERROR_GATE) and errors / rows > self.max_errors:
            evidence = describe_errors(self._evidence(), failed=errors)
            raise LaionRayError(
                f"{errors} of {rows} rows failed ({errors / rows:.1%}), above "
                f"--max-error-fraction {self.max_errors}; nothing more was committed; "
                f"{evidence}. `laion-ray errors {self.job.uri}` lists them. "
                "Finished work is checkpointed: fix the input or raise the limit and rerun"
            )

    def _commit_ready(self, address) -> None:
        ready = [f for f in self.states if f not in self.committed and self.ledger.finished(f)]
        if not ready:
            return
        if self.lease is not None:
            self.lease.check()
        self._check_accounting(ready)
        with_rows = [f for f in ready if self.ledger.counts(f)[0]]
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
            assembled = {a.fragment_id: a for a in self._assemble(with_rows, address)}

            def reassemble(fragments: Sequence[int]) -> dict:
                # Another writer committed these columns meanwhile: rebuild the files
                # from our parts on top of its values.
                fresh = {a.fragment_id: a for a in self._assemble(fragments, address)}
                assembled.update(fresh)
                return {f: a.column_file for f, a in fresh.items()}

            replace_column_files(
                self.job.uri,
                {f: a.column_file for f, a in assembled.items()},
                self.states,
                job=self.job.name,
                details=details,
                storage_options=self.storage_options,
                reassemble=reassemble,
            )
            record_errors(
                self.root,
                pa.concat_tables([a.errors for a in assembled.values()]),
                job=self.checkpoint.fingerprint,
                replace_fragments=with_rows if self.retry_errors else (),
                udfs=self.job.producers,
                storage_options=self.storage_options,
            )
            self.report.commits += 1
            self.report.fragments_committed += len(with_rows)
        self.checkpoint.mark_committed({f: self.ledger.counts(f) for f in ready})
        self.committed.update(ready)

    def _check_accounting(self, fragments: Sequence[int]) -> None:
        """Fail, naming the fragment, unless its finished units hold every selected row.

        Rows written (the finished units' counts) must equal the rows the filter
        selects at the pinned version, less the known-bad keys the reads skip.
        A unit that silently produced nothing never reaches a commit. Costs one
        count per fragment at commit time (a scan of the filter's columns).
        """
        # The pinned version never changes: one open per process, shared with reads.
        ds = cached_dataset(
            self.job.uri,
            version=self.manifest["read_version"],
            storage_options=self.storage_options,
        )
        where = self.manifest["filter"]
        for f in fragments:
            written = self.ledger.counts(f)[0]
            fragment = ds.get_fragment(f)
            known_bad = self.known_bad.get(f)
            skip = known_bad.keys if known_bad and KEY in self.job.read_columns else ()
            if len(skip):
                keys = fragment.to_table(columns=[KEY], filter=where)[KEY]
                selected = len(keys) - pc.sum(pc.is_in(keys, pa.array(skip, keys.type))).as_py()
            else:
                selected = fragment.count_rows(where)
            if written != selected:
                raise AccountingError(
                    f"fragment {f}: {written} rows were computed, but the job selects "
                    f"{selected} (known-bad rows skipped excluded); nothing of fragment {f} "
                    "was committed. Rerun the same command: units without records are "
                    "recomputed"
                )

    def _assemble(self, fragments: Sequence[int], address):
        latest = open_dataset(self.job.uri, storage_options=self.storage_options)
        for f in fragments:  # fail fast, before any work, if a fragment was rewritten
            check_unchanged(latest, f, self.states[f].physical_rows)
        # Tasks get O(1) arguments per fragment and list the fragment's parts themselves.
        args = [
            (
                self.checkpoint,
                self.plan.unit_rows,
                int(self.plan.first_unit[self.plan.position[f]]),
                self.job.uri,
                f,
                self.states[f].physical_rows,
                self.job.outputs,
                self.storage_options,
                latest.version,
                self.ledger.counts(f)[0],
            )
            for f in fragments
        ]
        if self.local:
            with ThreadPoolExecutor(LOCAL_THREADS) as pool:
                futures = [pool.submit(_assemble_from_parts, *a) for a in args]
            outcomes = [f.result for f in futures]
        else:
            import ray

            from laion_ray.ray_env import ensure_ray

            ensure_ray(address)
            task = ray.remote(num_cpus=0.5)(_assemble_from_parts)
            outcomes = [functools.partial(ray.get, task.remote(*a)) for a in args]
        # Collect every result so no failure is left unhandled in Ray's log.
        results, failure = [], None
        for outcome in outcomes:
            try:
                results.append(outcome())
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            for assembled in results:  # nothing references them: no orphans
                delete_data_file(self.job.uri, assembled.file_name, self.storage_options)
            raise failure
        return results


def _assemble_from_parts(
    checkpoint: ckpt.JobCheckpoint,
    unit_rows: int,
    first_unit: int,
    uri: str,
    fragment_id: int,
    physical_rows: int,
    schema: pa.Schema,
    storage_options: Mapping[str, str] | None,
    version: int,
    rows_computed: int,
):
    """Assemble task: list the fragment's finished parts, then build its column file.

    The parts must hold the ``rows_computed`` rows the driver counted: a part
    lost since its write would otherwise leave its rows at their old values.
    """
    finished = ckpt.finished_units(checkpoint.fragment_parts(fragment_id))
    found = sum(u.rows for u in finished.values())
    if found != rows_computed:
        raise MissingPart(
            f"fragment {fragment_id}: its checkpoint holds parts for {found} of the "
            f"{rows_computed} rows this job computed, so a part is missing; nothing of "
            f"fragment {fragment_id} was committed. Rerun the same command: units without "
            "their parts are recomputed"
        )
    units = []
    for k, start in enumerate(range(0, physical_rows, unit_rows)):
        unit = WorkUnit(first_unit + k, fragment_id, start, min(start + unit_rows, physical_rows))
        units.append((unit, finished[unit.index].paths if unit.index in finished else []))
    return assemble_fragment(
        uri, fragment_id, units, physical_rows, schema, storage_options, version=version
    )


def _is_ray_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "ray"


# "laion_ray.errors.SystemicError: <message>" in a remote traceback's text.
_REMOTE_ERROR = re.compile(r"^(laion_ray(?:\.\w+)*)\.(\w+): (.+)$", re.MULTILINE)


def _from_text(text: str) -> BaseException | None:
    """Our own error, rebuilt from a Ray error that kept only its text (an
    actor that failed in ``__init__`` surfaces as ``ActorDiedError``)."""
    for module, name, message in _REMOTE_ERROR.findall(text):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, (SystemicError, LaionRayError, JobFailed)):
            return cls(message)
    return None


def _root_failure(exc: BaseException, job: str) -> BaseException:
    """The exception to report for a failed stream, without Ray's wrappers.

    A stage's own ``SystemicError`` or ``LaionRayError`` (raised in a worker,
    wrapped in ``RayTaskError``) is raised with its original message, without
    the retry notes Ray Data appends. Any other failure from Ray (a worker that
    kept dying) becomes a ``SystemicError`` naming the job and the innermost
    cause. Exceptions that did not come through Ray are returned as they are.
    """
    chain, seen, current = [], set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    for cause in chain:
        if isinstance(cause, (SystemicError, LaionRayError, JobFailed)) and not _is_ray_wrapper(
            cause
        ):
            first_line = (str(cause).splitlines() or [""])[0]
            return cause if cause is exc else type(cause)(first_line)
    if not any(_is_ray_wrapper(c) for c in chain):
        return exc
    for cause in chain:
        if (own_error := _from_text(str(cause))) is not None:
            return own_error
    own = [c for c in chain if not _is_ray_wrapper(c)]
    root = own[-1] if own else next((c for c in chain if str(c).strip()), chain[0])
    text = str(root).strip().splitlines()
    return SystemicError(
        f"{job}: {type(root).__name__}: {text[0] if text else ''} — failed after Ray's "
        f"retries; {WHAT_TO_DO}"
    )
