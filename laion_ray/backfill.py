"""``backfill``: compute UDF columns over a Lance dataset and write them back.

plan (pin version, split into units) -> run (Ray Data: read -> UDF stages ->
checkpoint parts) -> commit (assemble per fragment, DataReplacement). Image
bytes are never rewritten: each fragment gains one new column file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import lance
import pyarrow as pa

from laion_ray.engine import checkpoint as ckpt
from laion_ray.engine.assemble import assemble_fragment
from laion_ray.engine.commit import (
    UDF_METADATA,
    add_columns,
    replace_column_files,
)
from laion_ray.engine.plan import (
    ROWADDR,
    UNIT,
    UNIT_ROWS,
    WorkUnit,
    dataset_inputs,
    default_unit_rows,
    error_column,
    fragment_states,
    job_fingerprint,
    split_units,
)
from laion_ray.engine.progress import Progress
from laion_ray.error_log import checkpoint_root, failed_keys_by_fragment, record_errors
from laion_ray.errors import LaionRayError, brief
from laion_ray.storage import filesystem, open_dataset
from laion_ray.udf import UDF, resolve

log = logging.getLogger(__name__)

MIN_ROWS_FOR_ERROR_GATE = 1000
COMMIT_EVERY_S = 300.0
LEDGER_FLUSH_S = 2.0


@dataclasses.dataclass
class BackfillReport:
    """What a backfill did; ``--report FILE`` writes it as JSON."""

    uri: str
    job: str
    udfs: list[str]
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
            f"{self.elapsed_s:.1f}s ({self.rows_per_s:,.0f} rows/s); version {self.version}"
            + (f", tagged {self.tag}" if self.tag else "")
        )


def resolve_stages(
    udfs: Sequence[str | UDF],
    *,
    batch_size: int | None = None,
    concurrency: int | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[UDF]:
    """Expand UDF names into stages; equal stages (e.g. one image decode) run once."""
    stages: list[UDF] = []
    for spec in udfs:
        name = spec if isinstance(spec, str) else spec.name
        for stage in resolve(spec, **dict((params or {}).get(name, {}))):
            if batch_size:
                stage = stage.with_options(batch_size=batch_size)
            if concurrency and stage.is_actor:
                stage = stage.with_options(concurrency=concurrency)
            if all(s.key != stage.key for s in stages):
                stages.append(stage)
    outputs = [c for s in stages for c in s.outputs]
    dupes = sorted({c for c in outputs if outputs.count(c) > 1})
    if dupes:
        raise LaionRayError(f"several UDFs write the same column(s): {', '.join(dupes)}")
    return stages


def _validate(
    ds: lance.LanceDataset, stages: Sequence[UDF], where: str | None, overwrite: bool
) -> tuple[list[pa.Field], list[str], list[str]]:
    """Check inputs, outputs and filter; return (new fields, overwritten, incremental)."""
    names = set(ds.schema.names)
    produced: set[str] = set()
    for stage in stages:
        for col in stage.inputs:
            if col not in names and col not in produced:
                raise LaionRayError(
                    f"UDF {stage.name} needs column {col!r}, which {ds.uri} does not have"
                )
        produced.update(stage.outputs)
    if where:
        try:
            ds.scanner(filter=where, columns=[], with_row_id=True, limit=1).to_table()
        except Exception as exc:  # Lance raises several types for a bad expression
            raise LaionRayError(f"bad --where {where!r}: {brief(exc)}") from exc
    new_fields, overwritten, incremental = [], [], []
    for stage in stages:
        for field in stage.output_schema:
            if field.name not in stage.stored_outputs:
                continue
            tagged = field.with_metadata({UDF_METADATA: stage.key.encode()})
            if field.name not in names:
                new_fields.append(tagged)
                continue
            existing = ds.schema.field(field.name)
            if overwrite:
                if existing.type != field.type:
                    raise LaionRayError(
                        f"cannot overwrite column {field.name!r} of type {existing.type} "
                        f"with {stage.name}'s {field.type}"
                    )
                overwritten.append(field.name)
            elif (existing.metadata or {}).get(UDF_METADATA) == stage.key.encode():
                incremental.append(field.name)  # ours: fill only rows that lack it
            else:
                raise LaionRayError(
                    f"column {field.name!r} already exists in {ds.uri}; "
                    "pass --overwrite to replace it"
                )
    return new_fields, overwritten, incremental


def _row_filter(where: str | None, incremental: Sequence[str]) -> str | None:
    lacking = " OR ".join(f"`{c}` IS NULL" for c in incremental)
    parts = [f"({p})" for p in (where, lacking) if p]
    return " AND ".join(parts) or None


def _plan(ds, stages, where, overwrite, unit_rows, read_columns) -> dict:
    new_fields, overwritten, incremental = _validate(ds, stages, where, overwrite)
    states = fragment_states(ds, read_columns)
    return {
        "uri": ds.uri,
        "read_version": ds.version,
        "filter": _row_filter(where, incremental),
        "unit_rows": unit_rows or default_unit_rows(read_columns, ds.schema),
        "fragments": ckpt.states_to_json(states),
        "new_fields": [f.name for f in new_fields],
        "overwrite": overwritten,
        "committed": [],
        "created": time.time(),
    }


def _stale_reason(manifest: dict, ds: lance.LanceDataset, read_columns: Sequence[str]) -> str | None:
    if ds.version < manifest["read_version"]:
        return f"dataset version {ds.version} is older than the checkpoint's"
    current = {s.fragment_id: s for s in fragment_states(ds, read_columns)}
    for state in ckpt.states_from_json(manifest["fragments"]):
        if current.get(state.fragment_id) != state:
            return f"fragment {state.fragment_id} changed since the checkpoint was written"
    return None


def backfill(
    uri: str,
    *,
    udfs: Sequence[str | UDF],
    where: str | None = None,
    overwrite: bool = False,
    retry_errors: bool = False,
    max_error_fraction: float = 0.01,
    tag: str | None = None,
    batch_size: int | None = None,
    concurrency: int | None = None,
    udf_params: Mapping[str, Mapping[str, Any]] | None = None,
    unit_rows: int | None = None,
    commit_every_s: float = COMMIT_EVERY_S,
    checkpoint_uri: str | None = None,
    report_path: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    address: str | None = None,
    job_name: str | None = None,
) -> BackfillReport:
    """Compute ``udfs`` over ``uri`` and write their outputs back as columns.

    Resumable: rerunning the same call after a crash skips finished work.
    Incremental: rerunning after rows were appended fills only rows that lack
    the outputs (rows that failed before are left alone unless ``retry_errors``).

    Args:
        uri: Lance dataset (local path or object-store URI).
        udfs: Registry names (``aspect-ratio``), ``package.module:Name`` or UDFs.
        where: SQL filter; other rows keep their value (null for new columns).
        overwrite: Replace existing columns in place (e.g. ``img_emb``).
        retry_errors: Also recompute rows recorded as failed earlier.
        max_error_fraction: Stop, committing nothing more, above this failure rate.
        tag: Tag the resulting version.
        batch_size, concurrency: Override the UDFs' defaults.
        udf_params: Per-UDF parameters, e.g. ``{"moderation-rules": {"nsfw_threshold": 0.8}}``.
        unit_rows: Rows per work unit (default: 1024 for image inputs, else 131072).
        commit_every_s: Commit finished fragments at least this often.
        checkpoint_uri: Where checkpoints and errors live (default ``<uri>/_laion_ray``).
        report_path: Write the final report as JSON here.
        storage_options: Object-store options for Lance.
        address: Ray cluster address (default ``$RAY_ADDRESS`` or a local Ray).
        job_name: Recorded in the commit history (default: the UDF names).

    Returns:
        A :class:`BackfillReport`.

    Examples:
        >>> backfill("laion.lance", udfs=["aspect-ratio"])  # doctest: +SKIP
    """
    if not 0 <= max_error_fraction <= 1:
        raise LaionRayError(f"--max-error-fraction must be in [0, 1], got {max_error_fraction}")
    if not udfs:
        raise LaionRayError("give at least one --udf")
    stages = resolve_stages(udfs, batch_size=batch_size, concurrency=concurrency, params=udf_params)
    ds = open_dataset(uri, storage_options=storage_options)
    job = job_name or "backfill:" + "+".join(s if isinstance(s, str) else s.name for s in udfs)
    read_columns = dataset_inputs(stages, ds.schema.names)
    if "key" in ds.schema.names and "key" not in read_columns:
        read_columns.append("key")  # error records name rows by key
    root = checkpoint_root(uri, checkpoint_uri)
    fingerprint = job_fingerprint(
        stages, uri=uri, where=where, overwrite=overwrite, retry_errors=retry_errors
    )
    checkpoint = ckpt.JobCheckpoint(root, fingerprint, storage_options)
    manifest = checkpoint.load_manifest()
    if manifest is not None:
        reason = _stale_reason(manifest, ds, read_columns)
        if reason:
            log.warning("discarding stale checkpoint %s: %s", fingerprint, reason)
            checkpoint.remove()
            manifest = None
        else:
            _validate(ds, stages, where, overwrite)
    if manifest is None:
        manifest = _plan(ds, stages, where, overwrite, unit_rows, read_columns)
        checkpoint.save_manifest(manifest)
    run = _Run(uri, stages, manifest, checkpoint, root, job, storage_options, max_error_fraction)
    report = run.execute(read_columns, retry_errors, commit_every_s, address)
    if tag:
        latest = open_dataset(uri, storage_options=storage_options)
        try:
            latest.tags.create(tag, latest.version)
        except Exception:  # tag exists: move it to this version
            latest.tags.update(tag, latest.version)
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

    def __init__(self, uri, stages, manifest, checkpoint, root, job, storage_options, max_errors):
        self.uri, self.stages, self.manifest = uri, list(stages), manifest
        self.checkpoint, self.root, self.job = checkpoint, root, job
        self.storage_options = dict(storage_options or {})
        self.max_errors = max_errors
        self.states = {s.fragment_id: s for s in ckpt.states_from_json(manifest["fragments"])}
        self.units = split_units(list(self.states.values()), manifest["unit_rows"])
        self.units_by_fragment: dict[int, list[WorkUnit]] = defaultdict(list)
        for unit in self.units:
            self.units_by_fragment[unit.fragment_id].append(unit)
        self.committed: set[int] = set(manifest["committed"])
        self.done = ckpt.finished_units(checkpoint.records())
        self.stored = [c for s in stages for c in s.stored_outputs]
        self.report = BackfillReport(
            uri=uri,
            job=job,
            udfs=[s.key for s in stages],
            columns=self.stored,
            units_total=len(self.units),
            units_resumed=len(self.done),
            rows_resumed=sum(u.rows for u in self.done.values()),
        )
        self.errors_before = sum(u.errors for u in self.done.values())
        self.columns_ready = False
        self.started = time.monotonic()

    # --- run ------------------------------------------------------------------
    def execute(self, read_columns, retry_errors, commit_every_s, address) -> BackfillReport:
        todo = [
            u for u in self.units if u.index not in self.done and u.fragment_id not in self.committed
        ]
        skip_keys = (
            {}
            if retry_errors
            else failed_keys_by_fragment(self.root, [s.name for s in self.stages], self.storage_options)
        )
        self.report.rows_skipped_failed = sum(
            len(v) for f, v in skip_keys.items() if f in self.states
        )
        self.retry_errors = retry_errors
        if todo:
            self._stream(todo, read_columns, skip_keys, commit_every_s, address)
        # Every unit either finished or read no rows, since the stream ended cleanly.
        for unit in todo:
            self.done.setdefault(unit.index, ckpt.FinishedUnit(unit.index, [], 0, 0))
        self._check_errors(final=True)
        self._commit_ready(address)
        self.report.elapsed_s = time.monotonic() - self.started
        self.report.version = open_dataset(self.uri, storage_options=self.storage_options).version
        return self.report

    def _pipeline(self, todo, read_columns, skip_keys):
        import ray

        from laion_ray.engine.source import UnitDatasource
        from laion_ray.engine.stages import ActorStage, task_stage

        source = UnitDatasource(
            self.uri,
            self.manifest["read_version"],
            todo,
            read_columns,
            self.manifest["filter"],
            skip_keys,
            self.storage_options,
        )
        data = ray.data.read_datasource(source, num_cpus=0.25)
        produced: set[str] = set()
        bookkeeping = [ROWADDR, UNIT, UNIT_ROWS, "key"]
        for i, stage in enumerate(self.stages):
            later = [c for s in self.stages[i + 1 :] for c in s.inputs]
            so_far = [c for s in self.stages[:i] for c in (*s.stored_outputs, error_column(s))]
            keep = [*bookkeeping, *so_far, *later]
            common = dict(
                batch_size=stage.batch_size,
                batch_format="pyarrow",
                num_cpus=stage.num_cpus,
                num_gpus=stage.num_gpus or None,
            )
            args = dict(stage=stage, upstream=set(produced), keep=keep)
            if stage.is_actor:
                data = data.map_batches(
                    ActorStage,
                    fn_constructor_kwargs=args,
                    concurrency=stage.concurrency or 1,
                    **common,
                )
            else:
                data = data.map_batches(task_stage, fn_kwargs=args, **common)
            produced.update(stage.outputs)
        part_columns = [ROWADDR, *(["key"] if "key" in read_columns else []), *self.stored]
        part_columns += [error_column(s) for s in self.stages]
        return data.map_batches(
            ckpt.write_parts,
            fn_kwargs=dict(
                job_uri=self.checkpoint.uri,
                run_id=uuid.uuid4().hex,
                columns=part_columns,
                storage_options=self.storage_options,
            ),
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=0.25,
        )

    def _stream(self, todo, read_columns, skip_keys, commit_every_s, address) -> None:
        from laion_ray.ray_env import ensure_ray

        ensure_ray(address)
        total_rows = sum(u.end - u.start for u in todo)
        progress = Progress(self.job, total_rows, len(self.units), len(self.done))
        in_run: dict[tuple[int, str], list[dict]] = defaultdict(list)
        pending: list[pa.Table] = []
        last_flush = last_commit = time.monotonic()
        try:
            for records in self._pipeline(todo, read_columns, skip_keys).iter_batches(
                batch_size=None, batch_format="pyarrow"
            ):
                pending.append(records)
                finished_now = 0
                for rec in records.to_pylist():
                    self.report.rows_processed += rec["rows"]
                    self.report.rows_failed += rec["errors"]
                    in_run[(rec["unit"], rec["run"])].append(rec)
                    finished = ckpt.finished_units(
                        pa.Table.from_pylist(in_run[(rec["unit"], rec["run"])], ckpt.RECORD_SCHEMA)
                    )
                    if rec["unit"] in finished and rec["unit"] not in self.done:
                        self.done[rec["unit"]] = finished[rec["unit"]]
                        finished_now += 1
                progress.update(
                    int(pa.compute.sum(records["rows"]).as_py() or 0),
                    int(pa.compute.sum(records["errors"]).as_py() or 0),
                    finished_now,
                )
                now = time.monotonic()
                if now - last_flush >= LEDGER_FLUSH_S:
                    self.checkpoint.append(pa.concat_tables(pending))
                    pending, last_flush = [], now
                self._check_errors(final=False)
                if now - last_commit >= commit_every_s:
                    self.checkpoint.append(pa.concat_tables(pending)) if pending else None
                    pending = []
                    self._commit_ready(address)
                    last_commit = time.monotonic()
        finally:
            if pending:
                self.checkpoint.append(pa.concat_tables(pending))
            progress.close()
        log.info("%s", progress.line())

    # --- errors and commits -------------------------------------------------------
    def _check_errors(self, *, final: bool) -> None:
        rows = self.report.rows_processed + self.report.rows_resumed
        errors = self.report.rows_failed + self.errors_before
        if rows and (final or rows >= MIN_ROWS_FOR_ERROR_GATE) and errors / rows > self.max_errors:
            raise LaionRayError(
                f"{errors} of {rows} rows failed ({errors / rows:.1%}), above "
                f"--max-error-fraction {self.max_errors}; nothing more was committed. "
                f"See `laion-ray errors`-style records in the checkpoint; fix the input or "
                f"raise the limit and rerun to resume"
            )

    def _ready_fragments(self) -> list[int]:
        return [
            f
            for f, units in self.units_by_fragment.items()
            if f not in self.committed and all(u.index in self.done for u in units)
        ]

    def _commit_ready(self, address) -> None:
        ready = self._ready_fragments()
        if not ready:
            return
        details = {
            "udfs": [s.key for s in self.stages],
            "filter": self.manifest["filter"],
            "overwrite": self.manifest["overwrite"],
            "rows_processed": self.report.rows_processed + self.report.rows_resumed,
            "rows_failed": self.report.rows_failed + self.errors_before,
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }
        with_rows = [f for f in ready if any(self.done[u.index].rows for u in self.units_by_fragment[f])]
        if with_rows:
            if not self.columns_ready:
                self._ensure_columns(details)
            assembled = self._assemble(with_rows, address)
            replace_column_files(
                self.uri,
                {a.fragment_id: a.file_name for a in assembled},
                self.states,
                job=self.job,
                details={**details, "fragments": sorted(with_rows)},
                storage_options=self.storage_options,
            )
            errors = pa.concat_tables([a.errors for a in assembled])
            record_errors(
                self.root,
                errors,
                job=self.checkpoint.fingerprint,
                replace_fragments=with_rows if self.retry_errors else (),
                udfs=[s.name for s in self.stages],
                storage_options=self.storage_options,
            )
            self.report.commits += 1
        self.committed.update(ready)
        self.report.fragments_committed += len(with_rows)
        self.manifest["committed"] = sorted(self.committed)
        self.checkpoint.save_manifest(self.manifest)

    def _ensure_columns(self, details) -> None:
        tagged = [
            f.with_metadata({UDF_METADATA: s.key.encode()})
            for s in self.stages
            for f in s.output_schema
            if f.name in self.manifest["new_fields"]
        ]
        if tagged:
            add_columns(self.uri, tagged, job=self.job, details=details, storage_options=self.storage_options)
        self.columns_ready = True

    def _assemble(self, fragments: Sequence[int], address):
        import ray

        from laion_ray.ray_env import ensure_ray

        ensure_ray(address)
        schema = pa.schema(
            [s.output_schema.field(c) for s in self.stages for c in s.stored_outputs]
        )
        task = ray.remote(num_cpus=0.5)(assemble_fragment)
        refs = [
            task.remote(
                self.uri,
                f,
                [(u, self.done[u.index].paths) for u in self.units_by_fragment[f]],
                schema,
                self.manifest["overwrite"],
                self.storage_options,
            )
            for f in fragments
        ]
        return ray.get(refs)
