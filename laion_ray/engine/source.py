"""Ray Data source: one read task per work unit, reading only needed columns."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from laion_ray.storage import open_dataset

from .plan import ROWADDR, UNIT, UNIT_ROWS, WorkUnit


def read_unit(
    uri: str,
    version: int,
    unit: WorkUnit,
    columns: Sequence[str],
    where: str | None,
    skip_keys: Sequence[int],
    storage_options: Mapping[str, str] | None,
) -> pa.Table:
    """Rows of ``unit`` that pass ``where``, with their row addresses.

    ``skip_keys`` are rows that failed before: an incremental run leaves them
    alone unless the user asks to retry errors.
    """
    ds = open_dataset(uri, version=version, storage_options=storage_options)
    base = unit.fragment_id << 32
    bounds = f"{ROWADDR} >= {base + unit.start} AND {ROWADDR} < {base + unit.end}"
    query = f"({where}) AND {bounds}" if where else bounds
    table = (
        ds.get_fragment(unit.fragment_id)
        .scanner(columns=list(columns), filter=query, with_row_address=True)
        .to_table()
    )
    if len(skip_keys) and "key" in table.column_names:
        table = table.filter(pc.invert(pc.is_in(table["key"], pa.array(skip_keys, pa.int64()))))
    n = table.num_rows
    return table.append_column(UNIT, pa.array(np.full(n, unit.index, np.int32))).append_column(
        UNIT_ROWS, pa.array(np.full(n, n, np.int32))
    )


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
