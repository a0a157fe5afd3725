"""Ray Data source: one read task per lane of work units (see :mod:`.lanes`),
for jobs with actor stages; jobs of function stages run lanes as Ray tasks
(:meth:`.executors.RayExecutor.records`). Kept apart so that local runs skip
importing Ray Data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .checkpoint import PartSink
from .lanes import Lane
from .source import read_units


class LaneDatasource(Datasource):
    """One read task per lane; the task reads the lane's groups one after another
    and yields each group's rows for the job's Ray Data stages.

    Only ids, URIs and small metadata travel to read tasks; each worker opens
    the dataset once (``cached_dataset``).
    """

    def __init__(self, lanes: Sequence[Lane], columns: Sequence[str], sink: PartSink):
        self.lanes, self.columns, self.sink = list(lanes), list(columns), sink

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        return [self._task(lane) for lane in self.lanes]

    def _task(self, lane: Lane) -> ReadTask:
        columns, sink = self.columns, self.sink

        def read() -> Iterable[pa.Table]:
            for group in lane.groups():
                rows = read_units(
                    sink.uri, sink.pinned, group.units, columns, sink.where,
                    group.skip_keys, sink.storage_options,
                )  # fmt: skip
                if rows.num_rows:
                    yield rows

        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return ReadTask(read, meta)
