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

# Lance's default scan batch (8k rows) makes many small chunks that every later
# step copies together again; 64k rows halves the read of a narrow unit.
SCAN_BATCH_ROWS = 65536


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
    physical_rows = fragment.metadata.physical_rows
    whole = units[0].start == 0 and units[-1].end == physical_rows
    rows = None if whole else row_range(base + units[0].start, base + units[-1].end)
    # Every row of a whole fragment without deletions, unfiltered, is read in
    # order: its addresses are known, and asking Lance for them costs a third
    # of a narrow scan.
    every_row = whole and where is None and fragment.metadata.deletion_file is None
    scanner = fragment.scanner(
        columns=list(columns),
        filter=sql_and(where, rows),
        with_row_address=not every_row,
        batch_size=SCAN_BATCH_ROWS,
    )
    with LANCE_SCANS.shared():  # see storage.ScanGate
        table = scanner.to_table()
    if every_row:
        if table.num_rows != physical_rows:
            raise RuntimeError(
                f"fragment {fragment_id}: read {table.num_rows} rows of {physical_rows}, "
                "with no deletions and no filter"
            )
        table = table.append_column(
            ROWADDR, pa.array(np.arange(base, base + physical_rows, dtype=np.uint64))
        )
    if len(skip_keys) and "key" in table.column_names:
        table = table.filter(pc.invert(pc.is_in(table["key"], pa.array(skip_keys, pa.int64()))))
    addresses = table[ROWADDR].to_numpy()
    # A fragment's scan comes in row order, so each unit's rows are one run.
    edges = [base + u.start for u in units] + [base + units[-1].end]
    bounds = np.searchsorted(addresses, np.array(edges, np.uint64))
    rows_per_unit = np.diff(bounds)
    digests = row_digests(addresses)
    unit_digests = [digest_sum(digests[a:b]) for a, b in itertools.pairwise(bounds)]

    def per_row(values: list[int], dtype) -> pa.Array:
        return pa.array(np.repeat(np.array(values, dtype), rows_per_unit))

    table = (
        table.append_column(UNIT, per_row([u.index for u in units], np.int32))
        .append_column(UNIT_ROWS, per_row(rows_per_unit.tolist(), np.int32))
        .append_column(UNIT_DIGEST, per_row(unit_digests, np.uint64))
    )
    return add_seconds(table, READ_S, time.perf_counter() - started)
