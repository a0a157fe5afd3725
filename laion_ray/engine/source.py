"""Read work units: only the needed columns, only the units' rows."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.filters import sql_and
from laion_ray.storage import LANCE_SCANS, PinnedVersion, cached_dataset

from .plan import (
    READ_S,
    ROWADDR,
    UNIT,
    UNIT_DIGEST,
    UNIT_ROWS,
    WorkUnit,
    add_seconds,
    digest_sum,
    row_digests,
    row_range,
)


def read_units(
    uri: str,
    pinned: PinnedVersion,
    units: Sequence[WorkUnit],
    columns: Sequence[str],
    where: str | None,
    skip_keys: Sequence[int],
    storage_options: Mapping[str, str] | None,
) -> pa.Table:
    """Rows of consecutive ``units`` of one fragment that pass ``where``, with
    their row addresses, each row tagged with its unit.

    One scan covers the run of units (a scan per unit costs ~2 ms of Lance
    set-up, more than a small unit's rows). ``skip_keys`` are rows of these
    units that failed before: an incremental run leaves them alone unless the
    user asks to retry errors. The dataset is opened once per process
    (:func:`cached_dataset`), not once per unit. The read's seconds travel in
    the block (:data:`.plan.READ_S`).
    """
    started = time.perf_counter()
    if any(
        a.end != b.start or a.fragment_id != b.fragment_id for a, b in itertools.pairwise(units)
    ):
        raise ValueError(f"read_units needs adjacent units of one fragment, got {units}")
    ds = cached_dataset(uri, pinned=pinned, storage_options=storage_options)
    fragment_id = units[0].fragment_id
    base = fragment_id << 32
    fragment = ds.get_fragment(fragment_id)
    whole = units[0].start == 0 and units[-1].end == fragment.metadata.physical_rows
    rows = None if whole else row_range(base + units[0].start, base + units[-1].end)
    scanner = fragment.scanner(
        columns=list(columns), filter=sql_and(where, rows), with_row_address=True
    )
    with LANCE_SCANS.shared():  # see storage.ScanGate
        table = scanner.to_table()
    if len(skip_keys) and "key" in table.column_names:
        table = table.filter(pc.invert(pc.is_in(table["key"], pa.array(skip_keys, pa.int64()))))
    addresses = table[ROWADDR].to_numpy()
    which = np.searchsorted([u.start for u in units], addresses & 0xFFFFFFFF, side="right") - 1
    rows_per_unit = np.bincount(which, minlength=len(units))
    digests = row_digests(addresses)
    # A fragment's scan comes in row order, so each unit's rows are one run.
    bounds = np.concatenate([[0], np.cumsum(rows_per_unit)])
    unit_digests = np.array(
        [digest_sum(digests[a:b]) for a, b in itertools.pairwise(bounds)], np.uint64
    )
    table = (
        table.append_column(UNIT, pa.array(np.array([u.index for u in units], np.int32)[which]))
        .append_column(UNIT_ROWS, pa.array(rows_per_unit[which].astype(np.int32)))
        .append_column(UNIT_DIGEST, pa.array(unit_digests[which]))
    )
    return add_seconds(table, READ_S, time.perf_counter() - started)
