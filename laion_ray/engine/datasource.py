"""Ray Data source: one read task per group of consecutive work units.

Kept apart so that local runs skip importing Ray Data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .source import read_units


class UnitDatasource(Datasource):
    """One read task per group of consecutive work units: ``read_units``'s arguments.

    A group's units come back as one block (``write_parts`` splits it into one
    part per unit again). Only ids, URIs and small metadata travel to read
    tasks; each worker opens the dataset once (``cached_dataset``).
    """

    def __init__(self, groups: Sequence[tuple]):
        self.groups = list(groups)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        return [self._task(group) for group in self.groups]

    @staticmethod
    def _task(args: tuple) -> ReadTask:
        def read() -> Iterable[pa.Table]:
            table = read_units(*args)
            if table.num_rows:
                yield table

        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return ReadTask(read, meta)
