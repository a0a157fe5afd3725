"""Where a job's units run: Ray Data across the cluster, or this process.

Both executors take the same groups of units, read them with
:func:`.source.read_units`, run the job's stages, write the same part files
(:func:`.checkpoint.write_parts`) and give the driver the parts' records; both
run the write-back's assembly tasks (:meth:`map`). What runs is the job's;
only where it runs differs.
"""

from __future__ import annotations

import collections
import itertools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from laion_ray.errors import LaionRayError
from laion_ray.udf import TASK_CPUS

from . import checkpoint as ckpt
from .plan import WorkUnit
from .stages import MAX_RETRIES

LOCAL_MAX_ROWS = 4_000_000
LOCAL_THREADS = min(4, os.cpu_count() or 1)
# Ray Data builds (and ray.puts) every read task before it runs any, so units go
# to it in waves: WAVE_ROUNDS read tasks per read slot of the cluster, within
# [WAVE_MIN_UNITS, WAVE_MAX_UNITS] units. Driver memory is bounded by one wave.
WAVE_ROUNDS = 16
WAVE_MIN_UNITS = 2048
WAVE_MAX_UNITS = 32768
# Units smaller than a task's worth of rows are read in runs of up to this many
# per task (see task_groups); the bound keeps waves many tasks wide.
MAX_UNITS_PER_TASK = 64
ASSEMBLE_CPUS = 0.5

ReadArgs = Callable[[list[WorkUnit]], tuple]


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


def task_groups(todo: Iterator[WorkUnit], units_per_task: int) -> Iterator[list[WorkUnit]]:
    """Todo units in runs of up to ``units_per_task`` adjacent units of one
    fragment, one task each: units smaller than a task's worth of rows refine
    the checkpoint without multiplying the per-task cost (tens of ms on Ray,
    ~2 ms of Lance scan set-up), which is more than a small unit's work. A
    finished unit breaks a run (a resumed job must not read it again)."""
    group: list[WorkUnit] = []
    for unit in todo:
        if group and (
            unit.index != group[-1].index + 1
            or unit.fragment_id != group[0].fragment_id
            or len(group) == units_per_task
        ):
            yield group
            group = []
        group.append(unit)
    if group:
        yield group


class LocalExecutor:
    """The job's steps in this process: no Ray start, no scheduling.

    Groups of units (as Ray tasks would get them) run on a few threads: Lance
    reads, Arrow and numpy release the GIL. At most two groups per thread are
    queued, so memory does not grow with the job.
    """

    name = "local"

    def __init__(self, transform: Callable[[pa.Table], pa.Table]):
        self.transform = transform

    def records(
        self, groups: Iterator[list[WorkUnit]], read_args: ReadArgs, part_args: dict
    ) -> Iterator[pa.Table]:
        from .source import read_units

        def run_group(group: list[WorkUnit]) -> pa.Table | None:
            table = read_units(*read_args(group))
            if not table.num_rows:
                return None
            return ckpt.write_parts(self.transform(table), **part_args)

        pool = ThreadPoolExecutor(LOCAL_THREADS, thread_name_prefix="laion-ray-unit")
        queued: collections.deque = collections.deque()
        try:
            for group in groups:
                queued.append(pool.submit(run_group, group))
                while len(queued) >= 2 * LOCAL_THREADS or (queued and queued[0].done()):
                    if (records := queued.popleft().result()) is not None:
                        yield records
            while queued:
                if (records := queued.popleft().result()) is not None:
                    yield records
        finally:
            pool.shutdown(cancel_futures=True)

    def map(self, fn: Callable, args: Sequence[tuple]) -> list[Any]:
        """``fn(*a)`` for each ``a`` on threads: each result, or the exception it raised."""
        with ThreadPoolExecutor(LOCAL_THREADS) as pool:
            futures = [pool.submit(fn, *a) for a in args]
        return [f.exception() or f.result() for f in futures]


class RayExecutor:
    """Ray Data pipelines (read -> the job's transform -> parts), one per wave.

    Args:
        transform: The job's transform of the unit stream (``Job.transform``).
        per_unit: Whether units may reach it in waves (False: all at once).
        address: The Ray cluster (None: ``$RAY_ADDRESS`` or a local Ray).
        resumed: Whether an earlier driver of this job may have died holding
            cluster resources.
        units_per_task: Units per read task (see :func:`task_groups`).
    """

    name = "ray"

    def __init__(
        self,
        transform: Callable[[Any], Any],
        *,
        per_unit: bool,
        address: str | None,
        resumed: bool,
        units_per_task: int,
    ):
        self.transform, self.per_unit, self.address = transform, per_unit, address
        self.resumed, self.units_per_task = resumed, units_per_task

    def _wave_tasks(self) -> int | None:
        """Read tasks per Ray Data execution (None: all at once), sized by the cluster."""
        if not self.per_unit:
            return None
        import ray

        slots = ray.cluster_resources().get("CPU", 1.0) / TASK_CPUS
        units = min(WAVE_MAX_UNITS, max(WAVE_MIN_UNITS, WAVE_ROUNDS * slots * self.units_per_task))
        return max(1, int(units) // self.units_per_task)

    def records(
        self, groups: Iterator[list[WorkUnit]], read_args: ReadArgs, part_args: dict
    ) -> Iterator[pa.Table]:
        import ray

        from laion_ray.ray_env import ensure_ray, reclaim_expired_reservations

        from .datasource import UnitDatasource

        ensure_ray(self.address)
        if self.resumed:  # an earlier driver of this job may have died holding the cluster
            reclaim_expired_reservations()
        # Ray 2.60 has no named max_retries for reads yet; ray_remote_args warns.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        per_wave = self._wave_tasks()
        while wave := list(itertools.islice(groups, per_wave)):
            source = UnitDatasource([read_args(group) for group in wave])
            read = ray.data.read_datasource(
                source,
                num_cpus=TASK_CPUS,
                override_num_blocks=len(wave),  # one block per group: no re-splitting
                ray_remote_args={"max_retries": MAX_RETRIES},
            )
            # A stage's own error (SystemicError naming the stage), not Ray Data's
            # UserCodeException, whose pickled form loses the cause.
            read.context.raise_original_map_exception = True
            data = self.transform(read).map_batches(
                ckpt.write_parts,
                fn_kwargs=part_args,
                batch_size=None,
                batch_format="pyarrow",
                num_cpus=TASK_CPUS,  # same resources as the read: they fuse into one task
                max_retries=MAX_RETRIES,
            )
            yield from data.iter_batches(batch_size=None, batch_format="pyarrow")

    def map(self, fn: Callable, args: Sequence[tuple]) -> list[Any]:
        """``fn(*a)`` for each ``a`` as Ray tasks: each result, or the exception it raised.

        Every result is collected, so no failure is left unhandled in Ray's log.
        """
        import ray

        from laion_ray.ray_env import ensure_ray

        ensure_ray(self.address)
        task = ray.remote(num_cpus=ASSEMBLE_CPUS)(fn)
        refs = [task.remote(*a) for a in args]
        outcomes: list[Any] = []
        for ref in refs:
            try:
                outcomes.append(ray.get(ref))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes
