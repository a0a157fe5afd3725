"""``backfill``: compute UDF columns over a Lance dataset and write them back.

The UDF stages become the job's transform (Ray Data ``map_batches``: functions
as tasks, classes as actor pools); planning, checkpoints and commits are the
engine's (``laion_ray.engine.run``). Image bytes are never rewritten: each
fragment gains one new column file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lance
import pyarrow as pa

from laion_ray.cluster import (
    Overrides,
    Plan,
    cluster_capacity,
    format_plan,
    placement_report,
    plan_stages,
    shares_actor,
    start_placement_log,
)
from laion_ray.engine.commit import UDF_METADATA
from laion_ray.engine.phases import PhaseClock
from laion_ray.engine.plan import (
    READ_S,
    ROWADDR,
    UDF_S,
    UNIT,
    UNIT_DIGEST,
    UNIT_ROWS,
    dataset_inputs,
    error_column,
)
from laion_ray.engine.run import COMMIT_EVERY_S, KEY, Job, JobReport, run_job
from laion_ray.errors import LaionRayError
from laion_ray.filters import check_filter, to_lance_sql
from laion_ray.storage import open_dataset
from laion_ray.udf import UDF, check_params, resolve

BackfillReport = JobReport
log = logging.getLogger(__name__)


def resolve_stages(
    udfs: Sequence[str | UDF],
    *,
    batch_size: int | None = None,
    concurrency: int | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[UDF]:
    """Expand UDF names into stages; equal stages (e.g. one image decode) run once.

    Raises:
        LaionRayError: ``params`` name a parameter that its UDF does not declare.
    """
    check_params(udfs, params or {})
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
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:  # a stage's name owns its error column
        raise LaionRayError(f"several different stages are named {', '.join(dupes)}")
    return stages


def _check_inputs(
    ds: lance.LanceDataset, stages: Sequence[UDF], where: str | None, given_where: str | None
) -> None:
    # Each column as a stage will get it: from the dataset, or from an earlier
    # stage of this run (tagged with that stage's key, as if it were stored).
    fields = {f.name: f for f in ds.schema}
    for stage in stages:
        for col in stage.inputs:
            if col not in fields:
                raise LaionRayError(
                    f"UDF {stage.name} needs column {col!r}, which {ds.uri} does not have"
                )
        if stage.validate is not None:
            stage.validate(pa.schema([fields[col] for col in stage.inputs]))
        for field in stage.output_schema:
            fields[field.name] = field.with_metadata({UDF_METADATA: stage.key.encode()})
    check_filter(ds, where, given=given_where)


def _output_schema(stages: Sequence[UDF]) -> pa.Schema:
    """Stored outputs, each tagged with its producer so reruns recognise it."""
    return pa.schema(
        [
            stage.output_schema.field(name).with_metadata({UDF_METADATA: stage.key.encode()})
            for stage in stages
            for name in stage.stored_outputs
        ]
    )


def _steps(stages: Sequence[UDF]) -> list[tuple[UDF, set[str], list[str]]]:
    """Each stage with the in-run columns it may skip on and the columns to keep."""
    steps, produced = [], set()
    for i, stage in enumerate(stages):
        later = [c for s in stages[i + 1 :] for c in s.inputs]
        so_far = [c for s in stages[:i] for c in (*s.stored_outputs, error_column(s))]
        # A column made earlier and read later is named twice: keep it once.
        keep = list(
            dict.fromkeys(
                [ROWADDR, UNIT, UNIT_ROWS, UNIT_DIGEST, READ_S, UDF_S, KEY, *so_far, *later]
            )
        )
        steps.append((stage, set(produced), keep))
        produced.update(stage.outputs)
    return steps


class _StagePipeline:
    """The job's transform: function UDFs run as tasks, class UDFs as actor pools.

    Resources are planned when the transform is applied, on the connected
    cluster (:mod:`laion_ray.cluster`), never from this machine's hardware.
    Consecutive function stages with the same resources share one task per
    block; each stage keeps only the columns later stages still need.
    ``canary=False`` when rows that failed before are retried: they may all
    fail alike again, as bad data.
    """

    def __init__(self, stages: Sequence[UDF], overrides: Overrides, *, canary: bool = True):
        self.stages, self.overrides, self.canary = list(stages), overrides, canary
        self.plan: Plan | None = None
        self.placement: str | None = None
        self._placement_actor = None  # referenced so the log lives as long as the job

    def stage_report(self, task_nodes: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Per stage: requested resources, peak actors, nodes and devices so far;
        ``task_nodes`` ran the read tasks (and with them fused function stages)."""
        if self.plan is None:
            return []
        return placement_report(self.plan, self.placement, task_nodes)

    def plan_tasks(self) -> float:
        """Plan function stages that run inside the read tasks: log the plan and
        return the CPUs a read task asks for (the largest stage's)."""
        self.plan = plan_stages(self.stages, cluster_capacity(), self.overrides)
        log.info("%s", format_plan(self.plan))
        return max(1.0, max(s.num_cpus for s in self.plan.stages))

    def __call__(self, data):
        from laion_ray.engine.stages import MAX_RETRIES, ActorStage, Step, task_stages

        self.plan = plan_stages(self.stages, cluster_capacity(), self.overrides)
        if self.placement is None:
            self.placement, self._placement_actor = start_placement_log()
        log.info("%s", format_plan(self.plan))
        if self.plan.cpu_limit is not None:
            options = data.context.execution_options
            options.resource_limits = options.resource_limits.copy(cpu=self.plan.cpu_limit)
        tasks: list[Step] = []  # consecutive function stages: one task per block
        actors: list[Step] = []  # consecutive class stages with one pool: one actor

        def flush(data):
            if tasks:
                first = tasks[0][0]
                data = data.map_batches(
                    task_stages,
                    fn_kwargs=dict(steps=list(tasks), placement=self.placement, canary=self.canary),
                    batch_size=None,
                    batch_format="pyarrow",
                    num_cpus=first.num_cpus,
                    num_gpus=first.num_gpus or None,
                    max_retries=MAX_RETRIES,
                )
            if actors:
                first = actors[0][0]
                data = data.map_batches(
                    ActorStage,
                    fn_constructor_kwargs=dict(
                        steps=list(actors), placement=self.placement, canary=self.canary
                    ),
                    batch_size=first.batch_size,
                    batch_format="pyarrow",
                    # The stages run one after the other in the actor's process.
                    num_cpus=max(s.num_cpus for s, _, _ in actors),
                    num_gpus=max(s.num_gpus or 0 for s, _, _ in actors) or None,
                    compute=_actor_pool(first.concurrency),
                )
            tasks.clear()
            actors.clear()
            return data

        for step in _steps(self.plan.stages):
            stage = step[0]
            group, other = (actors, tasks) if stage.is_actor else (tasks, actors)
            if other or (group and not _same_worker(group[0][0], stage)):
                data = flush(data)
            group.append(step)
        return flush(data)


def _same_worker(a: UDF, b: UDF) -> bool:
    """Whether two consecutive stages of one kind run in the same task or actor."""
    if a.is_actor:
        return shares_actor(a, b)
    return (a.num_cpus, a.num_gpus) == (b.num_cpus, b.num_gpus)


def _actor_pool(concurrency: int | tuple[int, ...]):
    """Ray Data's actor pool for a planned ``concurrency``: ``n`` or ``(min, max[, initial])``."""
    from ray.data import ActorPoolStrategy

    if isinstance(concurrency, int):
        return ActorPoolStrategy(size=concurrency)
    low, high, *initial = concurrency
    return ActorPoolStrategy(
        min_size=low, max_size=high, initial_size=initial[0] if initial else None
    )


def _local_transform(stages: Sequence[UDF], *, canary: bool = True):
    """The same stages in this process, when none needs an actor or a GPU."""
    if any(s.is_actor or s.num_gpus for s in stages):
        return None
    from laion_ray.engine.stages import task_stages

    steps = _steps(stages)
    return lambda table: task_stages(table, steps, canary=canary)


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
    gpus: int | None = None,
    max_actors: int | None = None,
    device: str | None = None,
    decode_cpus: float | None = None,
    unit_rows: int | None = None,
    commit_every_s: float = COMMIT_EVERY_S,
    checkpoint_uri: str | None = None,
    report_path: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    address: str | None = None,
    job_name: str | None = None,
    executor: str = "auto",
    clock: PhaseClock | None = None,
) -> JobReport:
    """Compute ``udfs`` over ``uri`` and write their outputs back as columns.

    Resumable: rerunning the same call after a crash skips finished work.
    Incremental: rerunning after rows were appended fills only rows that lack
    the outputs (rows that failed before are left alone unless ``retry_errors``).
    Several UDFs in one call share one read of the data.

    Args:
        uri: Lance dataset (local path or object-store URI).
        udfs: Registry names (``aspect-ratio``), ``package.module:Name`` or UDFs.
        where: SQL filter; other rows keep their value (null for new columns).
            The one filter language of every command (:mod:`laion_ray.filters`):
            ``"NSFW" = 0`` and `` `NSFW` = 0 `` both name the column.
        overwrite: Replace existing columns in place (e.g. ``img_emb``).
        retry_errors: Also recompute rows recorded as failed earlier.
        max_error_fraction: Stop, committing nothing more, above this failure rate.
        tag: Tag the resulting version.
        batch_size, concurrency: Override the UDFs' defaults (``concurrency``
            fixes every model stage's pool size).
        udf_params: Per-UDF parameters, e.g. ``{"moderation-rules": {"nsfw_threshold": 0.8}}``.
        gpus: GPUs for each model stage's actor pool (default: the cluster's
            GPU capacity, autoscalable nodes included); ``0`` runs model actors
            on CPUs.
        max_actors: Upper bound of each model stage's actor pool.
        device: ``cpu`` or ``cuda`` for every model stage.
        decode_cpus: CPU budget of decode and other task stages (default: up
            to the cluster's CPUs; with GPU model stages at most
            ``DECODE_CPUS_PER_GPU`` per GPU, see :mod:`laion_ray.cluster`).
        unit_rows: Rows per work unit (default: about 64 MiB of input, e.g. 1024 image rows).
        commit_every_s: Commit finished fragments at least this often.
        checkpoint_uri: Where checkpoints and errors live (default ``<uri>/_laion_ray``).
        report_path: Write the final report as JSON here.
        storage_options: Object-store options for Lance.
        address: Ray cluster address (default ``$RAY_ADDRESS`` or a local Ray).
        job_name: Recorded in the commit history (default: the UDF names).
        executor: ``ray``, ``local`` or ``auto``: small jobs of function UDFs on
            narrow columns run in this process when no Ray is running or named.
        clock: Collects where the time goes (``JobReport.phases``); the CLI
            passes one that already holds its import time.

    Returns:
        A :class:`JobReport`.

    Examples:
        >>> backfill("laion.lance", udfs=["aspect-ratio", "moderation-rules"])  # doctest: +SKIP
    """
    if not udfs:
        raise LaionRayError("give at least one --udf")
    given_where, where = where, to_lance_sql(where)  # the engine gets Lance SQL
    stages = resolve_stages(udfs, batch_size=batch_size, concurrency=concurrency, params=udf_params)
    overrides = Overrides(gpus, max_actors, device, decode_cpus).validate()
    pipeline = _StagePipeline(stages, overrides, canary=not retry_errors)
    ds = open_dataset(uri, storage_options=storage_options)
    _check_inputs(ds, stages, where, given_where)
    read_columns = dataset_inputs(stages)
    if KEY in ds.schema.names and KEY not in read_columns:
        read_columns.append(KEY)  # error records name rows by key
    job = Job(
        uri=uri,
        name=job_name or "backfill:" + "+".join(s if isinstance(s, str) else s.name for s in udfs),
        identity="|".join(s.key + s.output_schema.to_string() for s in stages),
        read_columns=read_columns,
        outputs=_output_schema(stages),
        producers=[s.name for s in stages],
        transform=pipeline,
        stage_report=pipeline.stage_report,
        local_transform=_local_transform(stages, canary=not retry_errors),
        plan_tasks=pipeline.plan_tasks,
        where=where,
        overwrite=overwrite,
        details={"udfs": [s.key for s in stages]},
    )
    return run_job(
        job,
        retry_errors=retry_errors,
        max_error_fraction=max_error_fraction,
        tag=tag,
        unit_rows=unit_rows,
        commit_every_s=commit_every_s,
        checkpoint_uri=checkpoint_uri,
        report_path=report_path,
        storage_options=storage_options,
        address=address,
        executor=executor,
        clock=clock,
    )
