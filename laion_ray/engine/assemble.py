"""Turn a fragment's finished units into one new column file, aligned to its rows.

The file holds one value per *physical* row (deleted rows included), which is
what Lance's DataReplacement expects. Rows not processed keep their current
value: null for a new column, the old value for an overwritten one. Memory is
bounded by one unit, whatever the fragment size.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.file import LanceFileWriter

from laion_ray.error_log import ERROR_SCHEMA, part_errors
from laion_ray.storage import join_uri, open_dataset, resolve_storage_options

from .checkpoint import read_part
from .commit import check_unchanged
from .plan import ROWADDR, WorkUnit


@dataclasses.dataclass
class AssembledFragment:
    fragment_id: int
    file_name: str  # relative to <uri>/data
    errors: pa.Table


def _read_parts(paths: Sequence[str], opts: Mapping[str, str]) -> pa.Table | None:
    if not paths:
        return None
    table = pa.concat_tables([read_part(p, opts) for p in paths])
    addr = table[ROWADDR].to_numpy()
    if np.all(addr[1:] > addr[:-1]):  # the usual case: one part, in row order
        return table
    # One value per row address, in physical order (a unit retried within a run).
    table = table.take(pc.sort_indices(table[ROWADDR]))
    addr = table[ROWADDR].to_numpy()
    return table.filter(pa.array(np.concatenate([[True], addr[1:] != addr[:-1]])))


def _current_values(ds, unit: WorkUnit, schema: pa.Schema, added: Sequence[str]) -> pa.Table:
    """The unit's stored values: rows this job did not compute keep them.

    A column this job ``added`` is null until its own commit; one that existed
    before (incremental fill, overwrite) keeps its values outside the parts.
    """
    rows = unit.end - unit.start
    columns = {f.name: pa.nulls(rows, f.type) for f in schema}
    existing = [f.name for f in schema if f.name in ds.schema.names and f.name not in added]
    if existing:
        base = unit.fragment_id << 32
        stored = (
            ds.get_fragment(unit.fragment_id)
            .scanner(
                columns=existing,
                with_row_address=True,
                filter=f"{ROWADDR} >= {base + unit.start} AND {ROWADDR} < {base + unit.end}",
            )
            .to_table()
        )
        offsets = stored[ROWADDR].to_numpy().astype(np.int64) - base - unit.start
        for name in existing:
            columns[name] = _scatter(columns[name], offsets, stored[name])
    return pa.table(columns, schema=schema)


def _scatter(target: pa.Array | pa.ChunkedArray, offsets: np.ndarray, values) -> pa.Array:
    if len(values) == len(target):  # every row computed: nothing of target survives
        return pa.chunked_array(values).combine_chunks()
    position = np.arange(len(target), dtype=np.int64) + len(values)
    position[offsets] = np.arange(len(values))
    return pa.concat_arrays(
        [pa.chunked_array(values).combine_chunks(), pa.chunked_array(target).combine_chunks()]
    ).take(pa.array(position))


def assemble_fragment(
    uri: str,
    fragment_id: int,
    units: Sequence[tuple[WorkUnit, Sequence[str]]],
    physical_rows: int,
    schema: pa.Schema,
    added: Sequence[str],
    storage_options: Mapping[str, str] | None,
) -> AssembledFragment:
    """Write ``schema``'s columns for every physical row of ``fragment_id``.

    ``units`` must cover the fragment's rows in order, each with its part paths.
    """
    opts = resolve_storage_options(storage_options)
    ds = open_dataset(uri, storage_options=opts)
    check_unchanged(ds, fragment_id, physical_rows)
    file_name = f"{uuid.uuid4().hex}.lance"
    writer = LanceFileWriter(join_uri(uri, "data", file_name), schema, storage_options=opts)
    errors: list[pa.Table] = [ERROR_SCHEMA.empty_table()]
    for unit, paths in sorted(units, key=lambda u: u[0].start):
        current = _current_values(ds, unit, schema, added)
        part = _read_parts(paths, opts)
        if part is not None and part.num_rows:
            offsets = part[ROWADDR].to_numpy().astype(np.int64) - (fragment_id << 32) - unit.start
            current = pa.table(
                {f.name: _scatter(current[f.name], offsets, part[f.name]) for f in schema},
                schema=schema,
            )
            errors.append(part_errors(part))
        writer.write_batch(current)
    writer.close()
    return AssembledFragment(fragment_id, file_name, pa.concat_tables(errors))
