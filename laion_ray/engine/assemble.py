"""Turn a fragment's finished units into one new column file, aligned to its rows.

The file holds one value per *physical* row (deleted rows included), which is
what Lance's DataReplacement expects. Rows not processed keep their current
value: null for a new column, the old value for an overwritten one, another
writer's value where it wrote one. The file records which data files those
values came from, so the commit can tell whether they are still the newest.
Memory is bounded by one unit, whatever the fragment size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.file import LanceFileWriter

from laion_ray.errors import JobFailed, brief
from laion_ray.storage import PinnedVersion, cached_dataset, join_uri, resolve_storage_options

from .checkpoint import read_part
from .commit import ColumnFile, check_unchanged, column_files, delete_data_file, field_ids
from .error_log import ERROR_SCHEMA, part_errors
from .plan import ROWADDR, WorkUnit, row_range


class MissingPart(JobFailed):
    """A finished unit's checkpointed outputs are gone: its rows cannot be committed."""


@dataclasses.dataclass
class AssembledFragment:
    fragment_id: int
    file_name: str  # relative to <uri>/data
    errors: pa.Table
    based_on: tuple[str, ...]  # the fragment's data files of these columns that were read

    @property
    def column_file(self) -> ColumnFile:
        return ColumnFile(self.file_name, self.based_on)


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


def _current_values(ds, unit: WorkUnit, schema: pa.Schema, existing: Sequence[str]) -> pa.Table:
    """The unit's stored values: rows this job did not compute keep them.

    Only ``existing`` columns have stored values in this fragment; the others
    are null (a column added but not yet written here).
    """
    rows = unit.end - unit.start
    columns = {f.name: pa.nulls(rows, f.type) for f in schema}
    if existing:
        base = unit.fragment_id << 32
        stored = (
            ds.get_fragment(unit.fragment_id)
            .scanner(
                columns=existing,
                with_row_address=True,
                filter=row_range(base + unit.start, base + unit.end),
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
    storage_options: Mapping[str, str] | None,
    *,
    pinned: PinnedVersion,
    file_name: str,
) -> AssembledFragment:
    """Write ``schema``'s columns for every physical row of ``fragment_id``.

    ``units`` must cover the fragment's rows in order, each with its part paths.
    Rows outside the parts keep their values at ``pinned`` (the newest version
    the driver saw: the tasks of one commit share one dataset open per worker
    process). The file is ``<uri>/data/<file_name>``: the driver names it, and
    records the name before any task writes it, so a crash leaves no file it
    does not know of.
    """
    opts = resolve_storage_options(storage_options)
    ds = cached_dataset(uri, pinned=pinned, storage_options=opts)
    check_unchanged(ds, fragment_id, physical_rows)
    fragment = ds.get_fragment(fragment_id)
    existing = [
        f.name
        for f in schema
        if f.name in ds.schema.names and column_files(fragment, field_ids(ds, [f.name]))
    ]
    based_on = column_files(fragment, field_ids(ds, schema.names))
    writer = LanceFileWriter(join_uri(uri, "data", file_name), schema, storage_options=opts)
    errors: list[pa.Table] = [ERROR_SCHEMA.empty_table()]
    for unit, paths in sorted(units, key=lambda u: u[0].start):
        current = _current_values(ds, unit, schema, existing)
        try:
            part = _read_parts(paths, opts)
        except FileNotFoundError as exc:
            writer.close()
            delete_data_file(uri, file_name, opts)
            raise MissingPart(
                f"fragment {fragment_id}: a checkpoint part of unit {unit.index} (rows "
                f"{unit.start}-{unit.end}) is missing ({brief(exc)}); nothing of fragment "
                f"{fragment_id} was committed. Rerun the same command: a unit without its "
                "parts is recomputed"
            ) from exc
        if part is not None and part.num_rows:
            offsets = part[ROWADDR].to_numpy().astype(np.int64) - (fragment_id << 32) - unit.start
            current = pa.table(
                {f.name: _scatter(current[f.name], offsets, part[f.name]) for f in schema},
                schema=schema,
            )
            if (failed := part_errors(part)).num_rows:
                errors.append(failed)
        writer.write_batch(current)
    writer.close()
    # One chunk: a chunk per unit (thousands in a fragment of tiny units) would
    # travel to the driver, and stay there until the commit, as as many buffers.
    return AssembledFragment(
        fragment_id, file_name, pa.concat_tables(errors).combine_chunks(), based_on
    )
