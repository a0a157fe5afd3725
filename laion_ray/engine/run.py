"""Run a planned job: take its lease, plan or resume, stream, commit, finish.

Every job that writes columns (``backfill``, ``merge``, ``dedup``) is a
:class:`Job`: the columns to read, a ``transform`` from the unit stream to
output columns, and the output schema. :func:`run_job` owns the flow after
that: one driver per job (:mod:`.lease`); the plan, or the checkpoint of an
earlier run and the settling of its commits in flight (:mod:`.checkpoint`,
:mod:`.writeback`); the stream of units through an executor
(:mod:`.executors`), judged by the error gate (:mod:`.failures`); fragment by
fragment, the write-back; then the tag and the checkpoint's removal.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.cluster import format_stages
from laion_ray.errors import LaionRayError, SystemicError
from laion_ray.filters import sql_and, sql_any_null
from laion_ray.ray_env import ray_attached
from laion_ray.storage import PinnedVersion, filesystem, open_dataset

from . import checkpoint as ckpt
from .commit import UDF_METADATA, tag_version
from .error_log import checkpoint_root, dataset_identity, failed_keys_by_fragment
from .executors import (
    LOCAL_MAX_ROWS,
    LOCAL_THREADS,
    MAX_UNITS_PER_TASK,
    LocalExecutor,
    RayExecutor,
    choose_executor,
)
from .failpoints import failpoint
from .failures import ErrorGate, root_failure, trusted_parts
from .lanes import build_lanes
from .lease import JobLease
from .phases import PhaseClock, phases_line
from .plan import (
    KEY,
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
from .writeback import WriteBack

log = logging.getLogger(__name__)

COMMIT_EVERY_S = 300.0
__all__ = [
    "COMMIT_EVERY_S",
    "KEY",
    "Job",
    "JobReport",
    "choose_executor",
    "classify_outputs",
    "run_job",
]


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
            when the job can run without Ray (see :func:`choose_executor`); on
            Ray it then runs inside the read tasks.
        plan_tasks: On Ray, with ``local_transform``: plans it on the connected
            cluster, logs the plan, and returns the CPUs a read task asks for.
        where: Optional SQL filter on the rows to compute.
        overwrite: Whether existing output columns may be replaced.
        details: Extra facts for the commit history (UDF keys, parameters).
        stage_report: What ran where so far, one dict per stage (resources
            requested, peak actors, nodes, devices; see :mod:`laion_ray.cluster`),
            given the nodes that ran read tasks; recorded in the report and each
            commit's details.
    """

    uri: str
    name: str
    identity: str
    read_columns: list[str]
    outputs: pa.Schema
    producers: list[str]
    transform: Callable[[Any], Any] | None
    local_transform: Callable[[pa.Table], pa.Table] | None = None
    plan_tasks: Callable[[], float] | None = None
    where: str | None = None
    overwrite: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    stage_report: Callable[[Sequence[str]], list[dict[str, Any]]] | None = None


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
    rows_selected: int | None = None  # rows the filter selects (None: not counted)
    units_total: int = 0
    units_resumed: int = 0
    fragments_committed: int = 0
    commits: int = 0
    elapsed_s: float = 0.0
    tag: str | None = None
    executor: str = "ray"
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    phases: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows_processed / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows_per_s": round(self.rows_per_s, 1)}

    @property
    def rows_filled_before(self) -> int | None:
        """Selected rows whose outputs were there already (an incremental rerun)."""
        if self.rows_selected is None:
            return None
        done = self.rows_processed + self.rows_resumed + self.rows_skipped_failed
        return max(self.rows_selected - done, 0)

    def summary(self) -> str:
        if not self.rows_processed and not self.rows_resumed:
            return self._nothing_to_do()
        filled = self.rows_filled_before
        return (
            (
                f"{self.job}: filled {self.rows_processed + self.rows_resumed:,} rows; "
                f"{filled:,} were filled already\n"
                if filled
                else ""
            )
            + f"{self.job}: {self.rows_processed} rows processed, {self.rows_failed} failed, "
            f"{self.rows_resumed} resumed from checkpoints, {self.rows_skipped_failed} known-bad "
            f"skipped; {self.fragments_committed} fragments committed in {self.commits} commits; "
            f"{self.elapsed_s:.1f}s ({self.rows_per_s:,.0f} rows/s, {self.executor} executor); "
            f"version {self.version}"
            + (f", tagged {self.tag}" if self.tag else "")
            + "".join("\n" + line for line in format_stages(self.stages))
        )

    def _nothing_to_do(self) -> str:
        columns = ", ".join(f"`{c}`" for c in self.columns)
        bad = self.rows_skipped_failed
        left = f"; {bad:,} known-bad rows left alone (--retry-errors retries them)" if bad else ""
        selected = self.rows_selected
        which = f"all {selected - bad:,} selected rows" if selected is not None else "every row"
        if selected is not None and bad:
            which = f"{selected - bad:,} of {selected:,} selected rows"
        return f"nothing to do: {columns} filled for {which} (version {self.version}){left}"

    def phases_line(self) -> str:
        return phases_line(self.phases) if self.phases else ""


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
    """The rows to compute: those ``where`` selects that lack an incremental output."""
    return sql_and(where, sql_any_null(incremental))


def _stale_reason(
    manifest: dict, ds: lance.LanceDataset, read_columns: Sequence[str], storage_options
) -> str | None:
    if ds.version < manifest["read_version"]:
        return f"dataset version {ds.version} is older than the checkpoint's"
    pinned = PinnedVersion(**manifest["pinned"])
    try:
        at_pin = open_dataset(job_uri(manifest), version=pinned.version,
                              storage_options=storage_options)  # fmt: skip
    except LaionRayError:
        return f"version {pinned.version} of the dataset is gone (cleaned up)"
    if PinnedVersion.of(at_pin) != pinned:
        return "the dataset was written again at this path since the checkpoint was planned"
    current = {s.fragment_id: s for s in fragment_states(ds, read_columns)}
    for state in ckpt.states_from_json(manifest["fragments"]):
        if current.get(state.fragment_id) != state:
            return f"fragment {state.fragment_id} changed since the checkpoint was written"
    return None


def job_uri(manifest: Mapping[str, Any]) -> str:
    return manifest["uri"]


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
    clock: PhaseClock | None = None,
) -> JobReport:
    """Plan (or resume) ``job``, run it and commit its columns fragment by fragment.

    ``executor`` is ``ray`` (Ray Data), ``local`` (this process) or ``auto``
    (see :func:`choose_executor`); both use the same checkpoints and commits.
    ``clock`` collects where the time goes (the CLI passes one holding its
    import time); the report carries its phases.
    """
    clock = clock or PhaseClock()
    with clock.phase("plan"):
        report = _run_job(
            job, clock, retry_errors=retry_errors, max_error_fraction=max_error_fraction,
            tag=tag, unit_rows=unit_rows, commit_every_s=commit_every_s,
            checkpoint_uri=checkpoint_uri, storage_options=storage_options, address=address,
            executor=executor,
        )  # fmt: skip
    report.phases = clock.to_dict()
    if report_path:
        fs, path = filesystem(report_path)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(report.to_dict(), indent=2).encode())
    log.debug("%s", report.summary())  # callers print it; the CLI does
    return report


def _run_job(job: Job, clock: PhaseClock, *, retry_errors, max_error_fraction, tag, unit_rows,
             commit_every_s, checkpoint_uri, storage_options, address, executor) -> JobReport:  # fmt: skip
    if not 0 <= max_error_fraction <= 1:
        raise LaionRayError(f"--max-error-fraction must be in [0, 1], got {max_error_fraction}")
    if unit_rows is not None and unit_rows < 1:
        raise LaionRayError(f"--unit-rows must be >= 1, got {unit_rows}")
    ds = open_dataset(job.uri, storage_options=storage_options)
    classify_outputs(ds, job.outputs, overwrite=job.overwrite)  # bad input fails before the lease
    chosen = _executor(job, ds, executor, address)
    chosen.start()  # Ray connects while the driver plans
    root = checkpoint_root(job.uri, checkpoint_uri)
    fingerprint = job_fingerprint_of(
        job.identity,
        uri=job.uri,
        where=job.where,
        overwrite=job.overwrite,
        retry=retry_errors,
        parts=ckpt.PART_FORMAT,
    )
    options = dict(
        retry_errors=retry_errors, max_errors=max_error_fraction, unit_rows=unit_rows,
        commit_every_s=commit_every_s, storage_options=dict(storage_options or {}),
        clock=clock,
    )  # fmt: skip
    # One driver per job: a second one exits here, before it touches the checkpoint.
    with JobLease(root, fingerprint, storage_options) as lease:
        checkpoint = ckpt.JobCheckpoint(root, fingerprint, storage_options)
        while True:
            run = _Run.start(job, checkpoint, root, lease, ds, executor=chosen, **options)
            ds = None  # a second round plans on the newest version
            report = run.execute()
            with clock.phase("cleanup"):
                _finish(job, checkpoint, lease, report, tag, storage_options)
            # A checkpoint whose every fragment was committed before this call is
            # what a run killed at its very end leaves: that job is done, so the
            # same command fills, incrementally, what was appended since.
            if not run.finished_on_resume or job.overwrite:
                break
            log.info("job %s was finished by an earlier run; looking for rows to fill since",
                     fingerprint)  # fmt: skip
    return report


def _executor(job: Job, ds: lance.LanceDataset, executor: str, address: str | None):
    """The executor for ``job`` (see :func:`choose_executor`), not started yet."""
    local = choose_executor(
        executor,
        can_run_local=job.local_transform is not None,
        planned_rows=sum(f.metadata.physical_rows for f in ds.get_fragments()),
        narrow=not reads_binary(job.read_columns, ds.schema),
        ray_attached=ray_attached(address),
    )
    if local:
        return LocalExecutor(job.local_transform)
    return RayExecutor(
        job.transform,
        fused=job.local_transform,
        plan_tasks=job.plan_tasks,
        address=address,
    )


def _finish(job, checkpoint, lease, report, tag, storage_options) -> None:
    """The job's last steps: tag its version, remove its checkpoint.

    Redo after a crash: the checkpoint is left with every fragment committed,
    and the next run of the same command comes here again (a tag is created
    or moved, a removal deletes what is left).
    """
    if tag:
        latest = open_dataset(job.uri, storage_options=storage_options)
        tag_version(job.uri, tag, latest.version, storage_options=storage_options)
        report.tag = tag
        failpoint("job.after_tag")
    lease.check()
    checkpoint.remove()


class _Run:
    """One execution of a planned job: stream units, checkpoint, commit.

    Driver state is O(fragments): units come lazily from a :class:`UnitPlan`,
    finished ones are one byte each in a :class:`~.checkpoint.UnitLedger`, and
    a part's record is dropped once its unit is finished (the part file itself
    is the durable record).
    """

    @classmethod
    def start(cls, job, checkpoint, root, lease, ds, *, storage_options, unit_rows, executor,
              clock, **options) -> _Run:  # fmt: skip
        """Load this job's checkpoint (discarding a stale one) or plan it anew on
        ``ds`` (the newest version; None: open it)."""
        ds = ds or open_dataset(job.uri, storage_options=storage_options)
        new, overwritten, incremental = classify_outputs(ds, job.outputs, overwrite=job.overwrite)
        manifest = checkpoint.load_manifest()
        if manifest is not None and (
            reason := _stale_reason(manifest, ds, job.read_columns, storage_options)
        ):
            log.warning("discarding stale checkpoint %s: %s", checkpoint.fingerprint, reason)
            cls(job, manifest, checkpoint, root, lease, storage_options=storage_options,
                executor=None, resumed=True, clock=clock, **options).writeback.discard()  # fmt: skip
            checkpoint.remove()
            manifest = None
        resumed = manifest is not None
        if manifest is None:
            manifest = {
                "uri": job.uri,
                "plan": uuid.uuid4().hex[:16],
                "read_version": ds.version,
                "pinned": dataclasses.asdict(PinnedVersion.of(ds)),
                "filter": _row_filter(job.where, incremental),
                "unit_rows": unit_rows or default_unit_rows(job.read_columns, ds.schema),
                "fragments": ckpt.states_to_json(fragment_states(ds, job.read_columns)),
                "new_fields": new,
                "overwrite": overwritten,
            }
            checkpoint.save_manifest(manifest)
            failpoint("plan.after_manifest")
        else:
            log.info("resuming job %s from its checkpoint", checkpoint.fingerprint)
        executor.resumed = resumed
        run = cls(job, manifest, checkpoint, root, lease, storage_options=storage_options,
                  executor=executor, resumed=resumed, clock=clock, **options)  # fmt: skip
        # A task reads at least a default unit's worth of bytes, however small the units.
        task_units = default_unit_rows(job.read_columns, ds.schema) // manifest["unit_rows"]
        run.units_per_task = min(MAX_UNITS_PER_TASK, max(1, task_units))
        return run

    def __init__(
        self, job: Job, manifest: dict, checkpoint: ckpt.JobCheckpoint, root: str,
        lease: JobLease, *, storage_options, executor, resumed: bool, retry_errors: bool,
        max_errors: float, commit_every_s: float, clock: PhaseClock,
    ):  # fmt: skip
        self.job, self.manifest, self.checkpoint, self.root = job, manifest, checkpoint, root
        self.lease, self.executor, self.resumed, self.clock = lease, executor, resumed, clock
        self.storage_options = dict(storage_options or {})
        self.retry_errors, self.commit_every_s = retry_errors, commit_every_s
        self.run_id = uuid.uuid4().hex[:16]
        self.plan = UnitPlan(ckpt.states_from_json(manifest["fragments"]), manifest["unit_rows"])
        self.states = {s.fragment_id: s for s in self.plan.states}
        self.ledger = ckpt.UnitLedger(self.plan)
        self.committed: set[int] = set()
        self.units_per_task = 1
        self.identity = {
            "dataset": dataset_identity(job.uri),
            # Whose errors this job reads: see error_log.dataset_scope.
            "scope": None if root == checkpoint_root(job.uri) else dataset_identity(job.uri),
            "job": checkpoint.fingerprint,
            "plan": manifest["plan"],
            "run": self.run_id,
        }
        self.writeback = WriteBack(
            job, manifest, checkpoint, self.plan, self.ledger,
            run_tasks=lambda fn, args: self.executor.map(fn, args),
            fence=lease.fence, identity=self.identity, root=root,
            retry_errors=retry_errors, storage_options=self.storage_options, clock=clock,
        )  # fmt: skip
        evidence: list[str] = []
        if resumed and executor is not None:
            evidence = self._load_checkpoint()
        self.gate = ErrorGate(
            job.uri, checkpoint, self.plan, self.run_id, self.storage_options,
            max_errors=max_errors, retry_errors=retry_errors, evidence=evidence,
        )  # fmt: skip
        self.finished_on_resume = resumed and len(self.committed) == len(self.states)
        self.report = JobReport(
            uri=job.uri,
            job=job.name,
            columns=job.outputs.names,
            units_total=self.plan.total,
            units_resumed=self.ledger.units_done,
            rows_resumed=int(self.ledger.rows.sum()),
            executor=getattr(executor, "name", "ray"),
        )
        self.errors_before = int(self.ledger.errors.sum())
        self.known_bad: dict = {}
        self.task_nodes: set[str] = set()
        self._progress_line = ""
        self.started = time.monotonic()

    def _load_checkpoint(self) -> list[str]:
        """Committed summaries, the parts of uncommitted fragments, then the
        commits a killed driver left in flight; returns parts with failed rows."""
        for fragment_id, (rows, errors) in self.checkpoint.committed().items():
            if fragment_id in self.states:
                self.ledger.add_fragment(fragment_id, rows, errors)
                self.committed.add(fragment_id)
        pending = [
            f
            for f in self.checkpoint.fragments_with_parts()
            if f in self.states and f not in self.committed
        ]
        vouched = self.checkpoint.vouched()
        evidence: list[str] = []
        # One listing per fragment with parts; several at once on an object store.
        with ThreadPoolExecutor(LOCAL_THREADS * 2) as pool:
            for fragment_id, parts in zip(
                pending, pool.map(self.checkpoint.fragment_parts, pending), strict=True
            ):
                kept, untrusted = trusted_parts(parts, vouched)
                # Parts of a run that failed systemically, and parts whose column
                # file never appeared, are no record: their units are recomputed.
                kept, lost = self.writeback.without_lost_files(fragment_id, kept)
                self.writeback.delete_parts(fragment_id, [*untrusted, *lost], kept)
                parts = kept
                for unit in ckpt.finished_units(parts).values():
                    self.ledger.add(unit.unit, unit.rows, unit.errors)
                evidence += [path for path, rec in parts if rec["errors"]]
        for fragment_id in self.writeback.recover():
            self.committed.add(fragment_id)
        return evidence

    def execute(self) -> JobReport:
        if not self.retry_errors:
            self.known_bad = failed_keys_by_fragment(
                self.root, self.job.producers, self.storage_options,
                dataset=self.identity["scope"], exclude_plan=self.identity["plan"],
            )  # fmt: skip
        self.report.rows_skipped_failed = sum(
            len(v.keys) for f, v in self.known_bad.items() if f in self.states
        )
        self.report.rows_selected = self._count(self.job.where)
        nothing = self._nothing_selected()
        if self.ledger.units_done < self.plan.total and not nothing:
            self._stream()
        # The stream ended cleanly, so every unit without records read no rows.
        for unit in self._todo():
            self.ledger.add(unit.index, 0, 0)
        self._check_errors(final=True)
        if not nothing:  # else the job is done: nothing to commit, nor to mark
            self._commit_ready()
        with self.clock.phase("cleanup"):
            self.report.stages = self._stages().get("stages", [])
            self.report.elapsed_s = time.monotonic() - self.started
            self.report.version = open_dataset(
                self.job.uri, storage_options=self.storage_options
            ).version
        return self.report

    def _count(self, where: str | None) -> int | None:
        """Rows ``where`` selects at the pinned version, where that costs the driver
        little: no filter (fragment metadata), or a table small enough to scan here.
        None otherwise: the read tasks find the rows anyway."""
        total = sum(s.physical_rows for s in self.plan.states)
        if where is not None and total > LOCAL_MAX_ROWS:
            return None
        return self.writeback.pinned_dataset().count_rows(where)

    def _nothing_selected(self) -> bool:
        """Whether a fresh plan's filter selects no row: then Ray is not even needed."""
        if self.ledger.units_done or self.manifest["filter"] is None:
            return False
        return self._count(self.manifest["filter"]) == 0

    def _todo(self) -> Iterator[WorkUnit]:
        """Units not finished yet, generated as they are needed."""
        for state in self.plan.states:
            if state.fragment_id in self.committed or self.ledger.finished(state.fragment_id):
                continue
            for unit in self.plan.units(state.fragment_id):
                if not self.ledger.done[unit.index]:
                    yield unit

    def _rows_todo(self) -> int:
        return sum(u.end - u.start for u in self._todo())

    def _stages(self) -> dict[str, list[dict[str, Any]]]:
        """What ran where, for the report and the commit details (empty when local)."""
        if self.report.executor == "local" or self.job.stage_report is None:
            return {}
        stages = self.job.stage_report(sorted(self.task_nodes))
        return {"stages": stages} if stages else {}

    def _sink(self) -> ckpt.PartSink:
        """Where this run's tasks write their parts."""
        columns = [
            ROWADDR,
            *([KEY] if KEY in self.job.read_columns else []),
            *self.job.outputs.names,
            *(error_column_name(p) for p in self.job.producers),
        ]
        return ckpt.PartSink(
            job_uri=self.checkpoint.uri,
            run_id=self.run_id,
            columns=tuple(columns),
            storage_options=self.storage_options,
            uri=self.job.uri,
            pinned=self.writeback.pinned,
            where=self.manifest["filter"],
            outputs=self.job.outputs,
        )

    def _stream(self) -> None:
        with self.clock.phase("stream"):
            self._stream_records()
        log.info("%s", self._progress_line)

    def _stream_records(self) -> None:
        with self.clock.phase("connect"):  # Ray connected while the driver planned
            max_lanes = self.executor.max_lanes()
        lanes = build_lanes(
            self.plan,
            self.ledger.done,
            skip=self.committed,
            known_bad=self.known_bad,
            units_per_task=self.units_per_task,
            max_lanes=max_lanes,
        )
        progress = Progress(
            self.job.name, self._rows_todo(), self.plan.total, self.ledger.units_done
        )
        tally = ckpt.UnitTally()
        last_commit = time.monotonic()
        stream = self.executor.records(lanes, self.job.read_columns, self._sink())
        waiting = "pipeline_start"
        try:
            while True:
                with self.clock.phase(waiting):
                    records = next(stream, None)
                waiting = "driver_idle"
                if records is None:
                    break
                failpoint("stream.after_records")
                self.clock.add_worker(
                    *(
                        float(pc.sum(records[c]).as_py() or 0)
                        for c in ("read_s", "udf_s", "write_s")
                    )
                )
                self.task_nodes.update(n for n in records["node"].unique().to_pylist() if n)
                self.gate.note(records)
                finished_now = 0
                for rec in records.to_pylist():
                    if self.ledger.done[rec["unit"]]:
                        continue  # a retried task's duplicate
                    unit = tally.add(rec)
                    if unit is not None and self.ledger.add(unit.unit, unit.rows, unit.errors):
                        tally.forget(unit.unit)
                        finished_now += 1
                        # Counted once per unit, whatever a retried task wrote twice.
                        self.report.rows_processed += unit.rows
                        self.report.rows_failed += unit.errors
                progress.update(
                    pc.sum(records["rows"]).as_py() or 0,
                    pc.sum(records["errors"]).as_py() or 0,
                    finished_now,
                )
                self._check_errors(final=False)
                if time.monotonic() - last_commit >= self.commit_every_s and self.gate.may_commit(
                    self.report.rows_failed + self.errors_before
                ):
                    self._commit_ready()
                    last_commit = time.monotonic()
        except Exception as exc:
            cause = root_failure(exc, self.job.name)
            if isinstance(cause, SystemicError):
                self.gate.stopped_systemically()
            if cause is exc:
                raise
            raise cause from exc
        finally:
            # Stops Ray Data's executor now, not when the iterator is collected.
            getattr(stream, "close", lambda: None)()
            progress.close()
            self._progress_line = progress.line()

    def _check_errors(self, *, final: bool) -> None:
        self.gate.check(
            self.report.rows_processed + self.report.rows_resumed,
            self.report.rows_failed + self.errors_before,
            final=final,
        )

    def _commit_ready(self) -> None:
        ready = [f for f in self.states if f not in self.committed and self.ledger.finished(f)]
        if not ready:
            return
        self.lease.check()
        details = {
            **self.job.details,
            "plan": self.identity["plan"],
            "filter": self.manifest["filter"],
            "overwrite": self.manifest["overwrite"],
            "rows_processed": self.report.rows_processed + self.report.rows_resumed,
            "rows_failed": self.report.rows_failed + self.errors_before,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            **self._stages(),
        }
        before = self.writeback.committed_batches
        with self.clock.phase("commit"):
            with_rows = self.writeback.commit(ready, self.known_bad, details)
        self.report.commits += self.writeback.committed_batches - before
        self.report.fragments_committed += len(with_rows)
        self.committed.update(ready)
