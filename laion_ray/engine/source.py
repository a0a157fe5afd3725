"""Read one work unit: only the needed columns, only the unit's rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.storage import cached_dataset

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

    ``skip_keys`` are rows of this unit that failed before: an incremental run
    leaves them alone unless the user asks to retry errors. The dataset is
    opened once per process (:func:`cached_dataset`), not once per unit.
    """
    ds = cached_dataset(uri, version=version, storage_options=storage_options)
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
