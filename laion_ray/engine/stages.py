"""Run one UDF stage over a batch: skip, compute, bisect failures, check schema.

A row that makes a UDF raise gets null outputs and an error string in the
stage's ``_error:<name>`` column; the rest of its batch is unaffected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from laion_ray.errors import LaionRayError
from laion_ray.udf import UDF

from .plan import error_column

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500
# A UDF that kills its worker on every attempt must fail the job, not retry forever.
MAX_RETRIES = 3


class UDFContractError(LaionRayError):
    """The UDF returned the wrong schema or row count: a bug, not a bad row."""


def _check_output(stage: UDF, out: pa.Table, rows: int) -> pa.Table:
    if isinstance(out, pa.RecordBatch):
        out = pa.Table.from_batches([out])
    if not isinstance(out, pa.Table):
        raise UDFContractError(
            f"UDF {stage.name} returned {type(out).__name__}, not a pyarrow Table"
        )
    if out.num_rows != rows:
        raise UDFContractError(f"UDF {stage.name} returned {out.num_rows} rows for {rows} inputs")
    try:
        return out.select(stage.outputs).cast(stage.output_schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UDFContractError(
            f"UDF {stage.name} output {out.schema} does not match its declared schema "
            f"{stage.output_schema}: {exc}"
        ) from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


def compute_with_bisect(
    fn: Callable[[pa.Table], pa.Table], stage: UDF, inputs: pa.Table
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Call ``fn``; on failure split the batch until the failing rows are isolated.

    Returns the outputs (null where a row failed) and ``(row, error)`` pairs.
    Costs O(k log n) extra calls for k bad rows in a batch of n.
    """
    try:
        return _check_output(stage, fn(inputs), inputs.num_rows), []
    except UDFContractError:
        raise
    except Exception as exc:  # a bad row; isolate it
        if inputs.num_rows == 1:
            return _null_table(stage.output_schema, 1), [(0, _describe(exc))]
    mid = inputs.num_rows // 2
    left, left_errors = compute_with_bisect(fn, stage, inputs.slice(0, mid))
    right, right_errors = compute_with_bisect(fn, stage, inputs.slice(mid))
    errors = left_errors + [(row + mid, msg) for row, msg in right_errors]
    return pa.concat_tables([left, right]), errors


def _null_table(schema: pa.Schema, rows: int) -> pa.Table:
    return pa.table([pa.nulls(rows, f.type) for f in schema], schema=schema)


def _skipped_rows(batch: pa.Table, stage: UDF, upstream: set[str]) -> np.ndarray:
    """Rows whose in-run inputs are null: an earlier stage already failed them."""
    skip = np.zeros(batch.num_rows, dtype=bool)
    for col in stage.inputs:
        if col in upstream:
            skip |= batch[col].is_null().to_numpy(zero_copy_only=False)
    return skip


def apply_stage(
    fn: Callable[[pa.Table], pa.Table],
    stage: UDF,
    batch: pa.Table,
    *,
    upstream: set[str],
    keep: Sequence[str],
) -> pa.Table:
    """Compute ``stage`` on ``batch`` and return ``keep`` columns plus its outputs."""
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    skip = _skipped_rows(batch, stage, upstream)
    todo = np.flatnonzero(~skip)
    inputs = batch.select(list(stage.inputs))
    if len(todo) < batch.num_rows:
        inputs = inputs.take(pa.array(todo))
    outputs, failures = compute_with_bisect(fn, stage, inputs)
    if failures:
        log.debug(
            "%s: %d failing rows isolated in a batch of %d", stage.name, len(failures), len(todo)
        )
    if len(todo) < batch.num_rows:
        # Scatter back: row i takes output position[i], or the trailing null row.
        position = np.full(batch.num_rows, len(todo), dtype=np.int64)
        position[todo] = np.arange(len(todo))
        padded = pa.concat_tables([outputs, _null_table(stage.output_schema, 1)])
        outputs = padded.take(pa.array(position))
    result = batch.select([c for c in keep if c in batch.column_names and c not in stage.outputs])
    for name in stage.outputs:
        result = result.append_column(stage.output_schema.field(name), outputs[name])
    return result.append_column(
        error_column(stage), _error_messages(batch.num_rows, todo, failures)
    )


def _error_messages(rows: int, todo: np.ndarray, failures: list[tuple[int, str]]) -> pa.Array:
    if not failures:
        return pa.nulls(rows, pa.string())
    errors: list[str | None] = [None] * rows
    for row, message in failures:
        errors[int(todo[row])] = message
    return pa.array(errors, pa.string())


class ActorStage:
    """Ray Data actor wrapper: the UDF's class is built once per actor.

    With ``placement`` (a :class:`laion_ray.cluster.PlacementLog` name) the
    actor reports its node and device once, for the job report.
    """

    def __init__(
        self, stage: UDF, upstream: set[str], keep: Sequence[str], placement: str | None = None
    ):
        self.stage, self.upstream, self.keep = stage, upstream, list(keep)
        self.fn = stage.instantiate()
        if placement:
            from laion_ray.cluster import record_actor

            record_actor(placement, stage, self.fn)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return apply_stage(self.fn, self.stage, batch, upstream=self.upstream, keep=self.keep)


def task_stages(
    batch: pa.Table,
    steps: Sequence[tuple[UDF, set[str], Sequence[str]]],
    placement: str | None = None,
) -> pa.Table:
    """Ray Data task wrapper: consecutive function UDFs run in one task per block.

    A whole block (one work unit) comes in, so the read, these stages and the
    checkpoint write fuse into a single Ray task; each UDF still sees batches
    of its own ``batch_size``. With ``placement`` the node is reported (once
    per worker process) for the job report.
    """
    if placement:
        from laion_ray.cluster import record_task

        record_task(placement, [stage.name for stage, _, _ in steps])
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    for stage, upstream, keep in steps:
        fn = stage.instantiate()
        size = max(stage.batch_size, 1)
        slices = [batch.slice(i, size) for i in range(0, max(batch.num_rows, 1), size)]
        batch = pa.concat_tables(
            [apply_stage(fn, stage, s, upstream=upstream, keep=keep) for s in slices]
        )
    return batch
