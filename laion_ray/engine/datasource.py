"""Ray Data source: one read task per work unit (kept apart so local runs skip importing Ray Data)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .source import read_unit


class UnitDatasource(Datasource):
    """One read task per work unit; each gets ``read_unit``'s arguments.

    Only ids, URIs and small metadata travel to read tasks; each opens the
    dataset itself.
    """

    def __init__(self, unit_reads: Sequence[tuple]):
        self.unit_reads = list(unit_reads)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        return [self._task(args) for args in self.unit_reads]

    @staticmethod
    def _task(args: tuple) -> ReadTask:
        def read() -> Iterable[pa.Table]:
            table = read_unit(*args)
            if table.num_rows:
                yield table

        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return ReadTask(read, meta)
