"""Where a job's units run: Ray Data across the cluster, or this process.

Both executors take the same lanes of units (:mod:`.lanes`), read them with
:func:`.source.read_units`, run the job's stages, write the same part files
(:func:`.checkpoint.write_parts`) or a whole fragment's column file
(:func:`run_range`), and give the driver the parts' records; both run the
write-back's assembly tasks (:meth:`map`). What runs is the job's; only where
it runs differs.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.errors import LaionRayError
from laion_ray.udf import TASK_CPUS

from . import checkpoint as ckpt
from .assemble import write_fragment
from .lanes import LANES_PER_SLOT, Lane, UnitRange
from .plan import KEEP, UNIT, runs
from .source import read_units
from .stages import MAX_RETRIES

LOCAL_MAX_ROWS = 4_000_000
LOCAL_THREADS = min(4, os.cpu_count() or 1)
# Units smaller than a task's worth of rows are read in groups of up to this
# many (see lanes.py); the bound keeps a job many tasks wide.
MAX_UNITS_PER_TASK = 64
ASSEMBLE_CPUS = 0.5
# A whole fragment's values are written once (its column file) unless its
# group takes longer than this, or holds more outputs than this, to compute:
# then its units get parts as they finish, so a crash loses little work.
WRITE_ONCE_MAX_S = 5.0
WRITE_ONCE_MAX_BYTES = 256 * 1024**2


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


def run_range(
    lane: Lane,
    r: UnitRange,
    columns: Sequence[str],
    sink: ckpt.PartSink,
    transform: Callable[[pa.Table], pa.Table],
) -> Iterator[pa.Table]:
    """Read one range of a fragment, compute it and write it: a cheap job's work.

    The range is read group by group (one scan each) and computed unit by
    unit. A whole fragment keeps its outputs and writes the fragment's column
    file itself (:func:`.assemble.write_fragment`): values written once, not
    as parts and again at assembly. Expensive work gets parts unit by unit
    instead, as each is done: once the range has taken ``WRITE_ONCE_MAX_S`` or
    holds ``WRITE_ONCE_MAX_BYTES`` of outputs, a crash would cost more than a
    second write. Rows a transform keeps out (``_keep``, a merge's unmatched
    keys) always need parts. Yields the parts' records.
    """
    started = time.monotonic()
    held: list[pa.Table] | None = [] if r.whole else None  # for the column file
    held_bytes = 0
    groups = list(lane.groups_of(r))
    for g, group in enumerate(groups):
        table = read_units(
            sink.uri, sink.pinned, group.units, columns, sink.where, group.skip_keys,
            sink.storage_options,
        )  # fmt: skip
        if not table.num_rows:
            continue
        spans = runs(table[UNIT].to_numpy())
        for u, (begin, end) in enumerate(spans):
            outputs = transform(table.slice(begin, end - begin))
            if held is not None:
                held.append(outputs)
                held_bytes += outputs.nbytes
                keeps_all = KEEP not in outputs.column_names or pc.all(outputs[KEEP]).as_py()
                expensive = (
                    time.monotonic() - started > WRITE_ONCE_MAX_S
                    or held_bytes > WRITE_ONCE_MAX_BYTES
                )
                last = g == len(groups) - 1 and u == len(spans) - 1
                if keeps_all and (last or not expensive):
                    continue
                outputs, held = pa.concat_tables(held), None  # parts from here on
            yield ckpt.write_parts(outputs, sink=sink, as_read=True)
    if held:
        whole = r.group(r.begin, r.end, lane.unit_rows)
        yield write_fragment(pa.concat_tables(held), whole, sink)


def run_lane(
    lane: Lane,
    columns: Sequence[str],
    sink: ckpt.PartSink,
    transform: Callable[[pa.Table], pa.Table],
) -> Iterator[pa.Table]:
    """A lane's ranges one after another (a Ray task of the Ray executor)."""
    for r in lane.ranges:
        yield from run_range(lane, r, columns, sink, transform)


class LocalExecutor:
    """The job's steps in this process: no Ray start, no scheduling.

    The lanes' unit ranges (as the Ray executor's tasks run them) run on a few
    threads: Lance reads, Arrow and numpy release the GIL. At most two ranges
    per thread are queued, so memory does not grow with the job.
    """

    name = "local"

    def __init__(self, transform: Callable[[pa.Table], pa.Table]):
        self.transform = transform
        self.resumed = False

    def start(self) -> None:
        """Nothing to start: the work runs here."""

    def max_lanes(self) -> int:
        return LANES_PER_SLOT * LOCAL_THREADS

    def _run_range(self, lane: Lane, r: UnitRange, columns: Sequence[str], sink: ckpt.PartSink):
        records = list(run_range(lane, r, columns, sink, self.transform))
        return pa.concat_tables(records) if records else None

    def records(
        self, lanes: Sequence[Lane], columns: Sequence[str], sink: ckpt.PartSink
    ) -> Iterator[pa.Table]:
        ranges = ((lane, r) for lane in lanes for r in lane.ranges)
        pool = ThreadPoolExecutor(LOCAL_THREADS, thread_name_prefix="laion-ray-unit")
        queued: collections.deque = collections.deque()
        try:
            for lane, r in ranges:
                queued.append(pool.submit(self._run_range, lane, r, columns, sink))
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
    """One execution per job over lanes of units, on the Ray cluster.

    Jobs whose stages are functions (``fused``: a table-to-table function) run
    one Ray task per lane, a streaming generator of :func:`run_lane`: read,
    compute and write happen in the task, and only records come back. Ray
    Data adds nothing to such a task but its start and its scheduling (about
    0.1 s, then 50 ms per task on this machine, against 5 ms for a task), so it
    is not used. Jobs with actor stages (models) read in Ray Data read tasks
    (:class:`.datasource.LaneDatasource`) feeding the job's ``transform`` (Ray
    Data stages) and a part-writing stage: one execution, so one actor pool for
    the whole job.

    Args:
        transform: The job's transform of the unit stream (``Job.transform``).
        fused: The job's stages as a function of one table, or None.
        plan_tasks: For ``fused``: plans it on the connected cluster and
            returns the CPUs a lane task asks for (``Job.plan_tasks``).
        address: The Ray cluster (None: ``$RAY_ADDRESS`` or a local Ray).

    Attributes:
        resumed: Whether an earlier driver of this job may have died holding
            cluster resources (set by the run once it has read the checkpoint).
    """

    name = "ray"

    def __init__(
        self,
        transform: Callable[[Any], Any] | None,
        *,
        fused: Callable[[pa.Table], pa.Table] | None,
        plan_tasks: Callable[[], float] | None,
        address: str | None,
    ):
        self.transform, self.fused, self.plan_tasks = transform, fused, plan_tasks
        self.address = address
        self.resumed = False
        self.task_cpus = TASK_CPUS
        self._connecting: threading.Thread | None = None
        self._connect_error: BaseException | None = None

    def start(self) -> None:
        """Attach to a running Ray in the background: the driver plans meanwhile.

        A private local Ray is started later, in the calling thread: Ray makes
        its daemons die with the thread that started them (PR_SET_PDEATHSIG
        is per thread on Linux), so a short-lived thread must not start them.
        """
        from laion_ray.ray_env import ray_attached

        if not ray_attached(self.address):
            return

        def connect() -> None:
            try:
                from laion_ray.ray_env import ensure_ray, ray_data

                ensure_ray(self.address)
                if self.fused is None:  # Ray Data runs the job: its import is part of the wait
                    ray_data()
            except BaseException as exc:  # re-raised where the connection is needed
                self._connect_error = exc

        # A daemon: a job with nothing to do exits without waiting for it.
        self._connecting = threading.Thread(target=connect, name="laion-ray-connect", daemon=True)
        self._connecting.start()

    def _connected(self) -> None:
        from laion_ray.ray_env import ensure_ray

        if self._connecting is not None:
            self._connecting.join()
            if self._connect_error is not None:
                raise self._connect_error
        ensure_ray(self.address)  # a private local Ray, or nothing to do

    def max_lanes(self) -> int:
        """Lanes for the whole job: a few per task slot of the cluster."""
        import ray

        self._connected()
        if self.fused is not None and self.plan_tasks is not None:
            self.task_cpus = self.plan_tasks()
        slots = ray.cluster_resources().get("CPU", 1.0) / self.task_cpus
        return max(1, int(LANES_PER_SLOT * slots))

    def records(
        self, lanes: Sequence[Lane], columns: Sequence[str], sink: ckpt.PartSink
    ) -> Iterator[pa.Table]:
        self._connected()
        if not lanes:
            return
        if self.fused is not None:
            yield from self._lane_tasks(lanes, columns, sink)
        else:
            yield from self._pipeline(lanes, columns, sink)

    def _lane_tasks(
        self, lanes: Sequence[Lane], columns: Sequence[str], sink: ckpt.PartSink
    ) -> Iterator[pa.Table]:
        """One streaming Ray task per lane; records as any lane yields them."""
        import ray

        task = ray.remote(
            num_cpus=self.task_cpus, max_retries=MAX_RETRIES, num_returns="streaming"
        )(run_lane)
        running = [task.remote(lane, columns, sink, self.fused) for lane in lanes]
        try:
            while running:
                ready, running = ray.wait(running, num_returns=1)
                try:
                    ref = next(ready[0])
                except StopIteration:  # that lane is done
                    continue
                running.append(ready[0])
                yield ray.get(ref)
        finally:  # a stream stopped early (an error, the gate) stops its lanes
            for lane_task in running:
                ray.cancel(lane_task)

    def _pipeline(
        self, lanes: Sequence[Lane], columns: Sequence[str], sink: ckpt.PartSink
    ) -> Iterator[pa.Table]:
        """Ray Data: read tasks per lane -> the job's stages -> parts."""
        from laion_ray.ray_env import ray_data, reclaim_expired_reservations

        from .datasource import LaneDatasource

        if self.resumed:  # an earlier driver of this job may have died holding the cluster
            reclaim_expired_reservations()
        # Ray 2.60 has no named max_retries for reads yet; ray_remote_args warns.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        read = ray_data().read_datasource(
            LaneDatasource(lanes, columns, sink),
            num_cpus=TASK_CPUS,
            override_num_blocks=len(lanes),  # one read task per lane: no re-splitting
            ray_remote_args={"max_retries": MAX_RETRIES},
        )
        # A stage's own error (SystemicError naming the stage), not Ray Data's
        # UserCodeException, whose pickled form loses the cause.
        read.context.raise_original_map_exception = True
        data = self.transform(read).map_batches(
            ckpt.write_parts,
            fn_kwargs={"sink": sink},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=TASK_CPUS,
            max_retries=MAX_RETRIES,
        )
        yield from data.iter_batches(batch_size=None, batch_format="pyarrow")

    def map(self, fn: Callable, args: Sequence[tuple]) -> list[Any]:
        """``fn(*a)`` for each ``a`` as Ray tasks: each result, or the exception it raised.

        Every result is collected, so no failure is left unhandled in Ray's log.
        """
        import ray

        self._connected()
        task = ray.remote(num_cpus=ASSEMBLE_CPUS)(fn)
        refs = [task.remote(*a) for a in args]
        outcomes: list[Any] = []
        for ref in refs:
            try:
                outcomes.append(ray.get(ref))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes
