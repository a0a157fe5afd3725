"""Run one UDF stage over a batch: skip, compute, isolate bad rows, check schema.

Failures fall into two classes:

- a **row error**, an exception of a type the stage declares in ``row_errors``
  (``ImageDecodeError`` for image decoding): the batch is bisected until the
  failing rows are isolated; they get null outputs and an error string in the
  stage's ``_error:<name>`` column, and the rest of the batch is unaffected;
- anything else, and always :data:`SYSTEMIC_ERRORS` (a missing module, a CUDA
  error) is **systemic**: :class:`~laion_ray.errors.SystemicError` names the
  stage and the cause, the job stops, and nothing is recorded against rows.
  ``LaionRayError`` (a bad parameter, a broken UDF contract) propagates as it is.

Out of memory is neither: the batch is halved until it fits, and the smaller
size is kept for the rest of the block (or actor). A canary turns row errors
into a systemic failure when every row a stage tried so far failed with the
same type: that is a broken environment or UDF, not bad data.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from laion_ray.errors import JobFailed, LaionRayError, SystemicError
from laion_ray.udf import UDF

from .plan import UDF_S, add_seconds, error_column

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500
# A UDF that kills its worker on every attempt must fail the job, not retry forever.
MAX_RETRIES = 3
# Never a bad row, whatever a UDF declares: the environment or the code is
# broken, and every row would fail the same way. (torch and CUDA runtime errors
# are recognised by _is_accelerator_error, without importing torch.)
SYSTEMIC_ERRORS: tuple[type[BaseException], ...] = (
    ImportError,
    MemoryError,
    RecursionError,
    SystemError,
    LaionRayError,
    JobFailed,
)
# Rows that must all fail with one error type, and none succeed, before the
# canary stops the stage: enough that a run of bad images is unlikely to look
# like a broken environment, few enough to stop within the first batch.
CANARY_ROWS = 64
_ACCELERATOR_WORDS = ("CUDA", "cuDNN", "CUBLAS", "cuBLAS", "NCCL", "HIP")
WHAT_TO_DO = (
    "fix it and rerun the same command: finished units are reused and no row was recorded as bad"
)


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:MAX_ERROR_CHARS] if first else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """Host or device out of memory (``MemoryError``, ``torch.OutOfMemoryError``)."""
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))
    )


def _is_accelerator_error(exc: BaseException) -> bool:
    """A torch or CUDA runtime error: a broken device or driver, not one row's fault."""
    if not isinstance(exc, RuntimeError):
        return False
    if type(exc).__module__.split(".")[0] == "torch":
        return True
    text = str(exc)
    return any(word in text for word in _ACCELERATOR_WORDS)


def is_row_error(exc: BaseException, stage: UDF) -> bool:
    """Whether ``exc`` marks a bad row of ``stage`` (null plus an error record)."""
    return (
        isinstance(exc, stage.row_errors)
        and not isinstance(exc, SYSTEMIC_ERRORS)
        and not _is_accelerator_error(exc)
    )


def systemic_failure(stage: str, exc: BaseException) -> SystemicError:
    return SystemicError(
        f"{stage}: {_one_line(exc)} — a broken environment or UDF, not bad data; {WHAT_TO_DO}"
    )


def _release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")  # only if the UDF uses it; never imported here
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class StageGuard:
    """What one stage met so far in a block or an actor: the canary's counts and
    the batch size that fits in memory."""

    def __init__(self, stage: UDF, *, canary: bool = True):
        self.stage = stage
        self.canary = canary
        self.ok_rows = 0
        self.failed_rows = 0
        self.first_error: BaseException | None = None
        self.one_type = True
        self.max_rows: int | None = None

    def passed(self, rows: int) -> None:
        self.ok_rows += rows

    def failed(self, exc: BaseException) -> None:
        """Count a failed row; stop the stage if every row so far failed alike."""
        self.failed_rows += 1
        if self.first_error is None:
            self.first_error = exc
        elif type(exc) is not type(self.first_error):
            self.one_type = False
        if self.canary and not self.ok_rows and self.one_type and self.failed_rows >= CANARY_ROWS:
            raise SystemicError(
                f"{self.stage.name}: every row failed with {_one_line(self.first_error)} — "
                f"this looks like an environment or UDF problem, not bad data; {WHAT_TO_DO}"
            ) from self.first_error

    def out_of_memory(self, rows: int, exc: BaseException) -> None:
        """Halve the batch size, or fail the stage if one row does not fit."""
        if rows <= 1:
            raise SystemicError(
                f"{self.stage.name}: out of memory on a single row ({_one_line(exc)}); "
                "give the stage more memory or a smaller model, then rerun the same command"
            ) from exc
        self.max_rows = min(self.max_rows or rows, rows) // 2
        log.warning(
            "%s: out of memory on a batch of %d rows (%s); retrying in batches of %d",
            self.stage.name,
            rows,
            _one_line(exc),
            self.max_rows,
        )
        _release_memory()


def compute_with_bisect(
    fn: Callable[[pa.Table], pa.Table],
    stage: UDF,
    inputs: pa.Table,
    guard: StageGuard | None = None,
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Call ``fn``; split the batch to isolate bad rows, or to fit in memory.

    Returns the outputs (null where a row failed) and ``(row, error)`` pairs.
    Costs O(k log n) extra calls for k bad rows in a batch of n.

    Raises:
        SystemicError: a failure that is not a row error, or the canary.
        LaionRayError: a bad parameter or a broken UDF contract.
    """
    guard = guard or StageGuard(stage)
    rows = inputs.num_rows
    if not rows:
        return _null_table(stage.output_schema, 0), []
    if guard.max_rows is None or rows <= guard.max_rows:
        try:
            outputs = _check_output(stage, fn(inputs), rows)
        except LaionRayError:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                guard.out_of_memory(rows, exc)
            elif not is_row_error(exc, stage):
                raise systemic_failure(stage.name, exc) from exc
            elif rows == 1:
                guard.failed(exc)
                return _null_table(stage.output_schema, 1), [(0, _describe(exc))]
        else:
            guard.passed(rows)
            return outputs, []
    mid = rows // 2
    left, left_errors = compute_with_bisect(fn, stage, inputs.slice(0, mid), guard)
    right, right_errors = compute_with_bisect(fn, stage, inputs.slice(mid), guard)
    errors = left_errors + [(row + mid, msg) for row, msg in right_errors]
    return pa.concat_tables([left, right]), errors


def _null_table(schema: pa.Schema, rows: int) -> pa.Table:
    return pa.table([pa.nulls(rows, f.type) for f in schema], schema=schema)


def _rows_to_do(batch: pa.Table, stage: UDF, upstream: set[str]) -> np.ndarray | None:
    """Rows whose in-run inputs are not null (null: an earlier stage failed
    them); None when that is every row, the usual case."""
    skip = np.zeros(batch.num_rows, dtype=bool)
    for col in stage.inputs:
        if col in upstream and batch[col].null_count:
            skip |= batch[col].is_null().to_numpy(zero_copy_only=False)
    return np.flatnonzero(~skip) if skip.any() else None


def apply_stage(
    fn: Callable[[pa.Table], pa.Table],
    stage: UDF,
    batch: pa.Table,
    *,
    upstream: set[str],
    keep: Sequence[str],
    guard: StageGuard | None = None,
) -> pa.Table:
    """Compute ``stage`` on ``batch`` and return ``keep`` columns plus its outputs."""
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    todo = _rows_to_do(batch, stage, upstream)
    inputs = batch.select(list(stage.inputs))
    if todo is not None:
        inputs = inputs.take(pa.array(todo))
    outputs, failures = compute_with_bisect(fn, stage, inputs, guard)
    if failures:
        log.debug(
            "%s: %d failing rows isolated in a batch of %d", stage.name, len(failures), len(inputs)
        )
    if todo is not None:
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


def _error_messages(
    rows: int, todo: np.ndarray | None, failures: list[tuple[int, str]]
) -> pa.Array:
    if not failures:
        return pa.nulls(rows, pa.string())
    errors: list[str | None] = [None] * rows
    for row, message in failures:
        errors[row if todo is None else int(todo[row])] = message
    return pa.array(errors, pa.string())


Step = tuple[UDF, set[str], Sequence[str]]  # a stage, the in-run columns it skips on, columns kept


def _run_steps(batch: pa.Table, prepared: Sequence[tuple[Step, Callable, StageGuard]]) -> pa.Table:
    """Each stage in turn over the whole block, in batches of its own ``batch_size``;
    the seconds spent travel in the block (:data:`.plan.UDF_S`)."""
    started = time.perf_counter()
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    for (stage, upstream, keep), fn, guard in prepared:
        size = max(stage.batch_size, 1)
        slices = [batch.slice(i, size) for i in range(0, max(batch.num_rows, 1), size)]
        batch = pa.concat_tables(
            [apply_stage(fn, stage, s, upstream=upstream, keep=keep, guard=guard) for s in slices]
        )
    return add_seconds(batch, UDF_S, time.perf_counter() - started)


class ActorStage:
    """Ray Data actor wrapper: consecutive class UDFs built once per actor.

    Stages that share an actor (the planner gives them the same pool, e.g.
    ``clip-embed``, ``moderation-clip`` and ``clip-score``) run one after the
    other on each block, in one process: one torch import and one set of model
    loads per actor, one GPU instead of one per stage. With ``placement`` (a
    :class:`laion_ray.cluster.PlacementLog` name) the actor reports its node and
    each stage's device once, for the job report.
    """

    def __init__(
        self,
        steps: Sequence[Step],
        placement: str | None = None,
        *,
        canary: bool = True,
    ):
        self.prepared = []
        for stage, upstream, keep in steps:
            try:
                fn = stage.instantiate()
            except LaionRayError:
                raise
            except Exception as exc:  # a model that fails to load fails every row
                raise systemic_failure(stage.name, exc) from exc
            if placement:
                from laion_ray.cluster import record_actor

                record_actor(placement, stage, fn)
            self.prepared.append(((stage, upstream, keep), fn, StageGuard(stage, canary=canary)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _run_steps(batch, self.prepared)


def task_stages(
    batch: pa.Table,
    steps: Sequence[Step],
    placement: str | None = None,
    *,
    canary: bool = True,
) -> pa.Table:
    """Ray Data task wrapper: consecutive function UDFs run in one task per block.

    A whole block (a read task's units) comes in, so the read, these stages and
    the checkpoint write fuse into a single Ray task; each UDF still sees
    batches of its own ``batch_size``, and the canary and memory cap span the
    block. With ``placement`` the node is reported (once per worker process)
    for the job report.
    """
    if placement:
        from laion_ray.cluster import record_task

        record_task(placement, [stage.name for stage, _, _ in steps])
    prepared = [(step, step[0].instantiate(), StageGuard(step[0], canary=canary)) for step in steps]
    return _run_steps(batch, prepared)
